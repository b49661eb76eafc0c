"""The merge policy: checks and verdicts decide; only drawn verifiers count; a proven cheater is banned."""

from __future__ import annotations

from gpunite.identity import Identity
from gpunite.proof.audit import PROVEN, AuditResult, make_verdict
from gpunite.proof.checks import Finding
from gpunite.proof.policy import (
    AuditAssignment,
    BanList,
    MergePolicy,
    apply_decision,
    assign_audit,
    merge_decision,
)
from gpunite.records import Contribution, WorkUnit, sign_record

TRAINER, V1, V2, OUTSIDER = (Identity.from_seed(s) for s in (b"trainer", b"v1", b"v2", b"outsider"))
POLICY = MergePolicy(audit_fraction=1.0, segments_per_audit=2, verifiers_per_audit=2, accepts_required=2)


def _contribution(round_index: int = 1) -> Contribution:
    return sign_record(TRAINER, Contribution(
        run_id="1" * 64, round=round_index, base_hash="2" * 64,
        work_units=[WorkUnit(shard="3" * 64, first=0, count=8)], inner_steps=4, tokens=64, trail_interval=2,
        trail=["4" * 64, "5" * 64, "6" * 64], delta_hash="7" * 64, delta_norm=1.0, claimed_flops=64.0, time=0.0))


def _verdict(verifier, contribution, accept, proven=False):
    reason = "replayed within 0" if accept else (PROVEN if proven else "") + "replay lands far away"
    result = AuditResult(accept, reason, proven, 0, 0.0 if accept else 0.9, 10.0)
    return make_verdict(verifier, contribution, result, time=1.0)


def test_unaudited_and_audited_merges():
    c = _contribution()
    assert merge_decision(c, [], [], POLICY, AuditAssignment(False)).merge
    assignment = AuditAssignment(True, (V1.peer_id, V2.peer_id), (0, 1))
    one = [_verdict(V1, c, True)]
    assert not merge_decision(c, [], one, POLICY, assignment).merge  # needs 2 accepts
    outsider = [*one, _verdict(OUTSIDER, c, True)]
    assert not merge_decision(c, [], outsider, POLICY, assignment).merge  # an undrawn verifier does not count
    both = [*one, _verdict(V2, c, True)]
    decision = merge_decision(c, [], both, POLICY, assignment)
    assert decision.merge and len(decision.evidence) == 2
    other_round = _contribution(2)
    assert not merge_decision(other_round, [], both, POLICY, assignment).merge  # verdicts on another record


def test_findings_reject_and_suspicions_force_an_audit():
    c = _contribution()
    late = merge_decision(c, [Finding("contribution is for round 0")], [], POLICY, AuditAssignment(False))
    assert not late.merge and not late.cheat
    lie = merge_decision(c, [Finding("claims 2x tokens", cheat=True)], [], POLICY, AuditAssignment(False))
    assert not lie.merge and lie.cheat and lie.reason.startswith(PROVEN)
    copy = Finding("same delta as another identity", blocking=False)
    assert not merge_decision(c, [copy], [], POLICY, AuditAssignment(False)).merge
    assignment = assign_audit(b"\x01" * 32, c, POLICY, [V1.peer_id, V2.peer_id, TRAINER.peer_id], "coordinator",
                              forced=True)
    assert assignment.audited and TRAINER.peer_id not in assignment.verifiers and len(assignment.segments) == 2


def test_proven_rejection_bans_the_trainer_for_the_run():
    c = _contribution()
    assignment = AuditAssignment(True, (V1.peer_id, V2.peer_id), (0,))
    bans = BanList()
    unproven = merge_decision(c, [], [_verdict(V1, c, False), _verdict(V2, c, True)], POLICY, assignment)
    assert not unproven.merge and not unproven.cheat
    verdicts = [_verdict(V1, c, False, proven=True), _verdict(V2, c, False, proven=True)]
    decision = merge_decision(c, [], verdicts, POLICY, assignment, bans)
    assert not decision.merge and decision.cheat
    apply_decision(bans, c, decision)
    assert bans.is_banned(TRAINER.peer_id)
    assert set(bans.bans[TRAINER.peer_id].evidence) == {c.record_id, *(v.record_id for v in verdicts)}
    later = _contribution(2)
    accepted = [_verdict(V1, later, True), _verdict(V2, later, True)]
    after = merge_decision(later, [], accepted, POLICY, assignment, bans)
    assert not after.merge and "banned" in after.reason


def test_bans_as_of_a_round_leave_out_later_proofs():
    bans = BanList()
    bans.ban(TRAINER.peer_id, 3, "proven: replay", ("x" * 64,))
    assert not bans.as_of(3).is_banned(TRAINER.peer_id)  # judging round 3 itself: not banned yet
    assert bans.as_of(4).is_banned(TRAINER.peer_id)
    assert bans.as_of(4).bans[TRAINER.peer_id].evidence == ("x" * 64,)
