"""The merge policy: checks and verdicts decide; only drawn verifiers count; a proven cheater is banned; a
trainer whose audit failed without proof merges only audited until an audit passes."""

from __future__ import annotations

from gpunite.identity import Identity
from gpunite.proof.audit import PROVEN, AuditResult, make_verdict
from gpunite.proof.checks import Finding
from gpunite.proof.policy import (
    AuditAssignment,
    BanList,
    MergePolicy,
    SuspectList,
    apply_decision,
    assign_audit,
    audit_outcome,
    merge_decision,
    note_audit,
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


def test_a_proof_beside_an_unproven_reject_is_the_reason_the_ban_gives():
    """Two verifiers, one rejecting without proof (it could not fetch the delta, say) and one proving the
    cheat: the decision is a proven cheat and its reason is the proof, whatever order the verdicts came in."""
    c = _contribution()
    assignment = AuditAssignment(True, (V1.peer_id, V2.peer_id), (0,))
    one = MergePolicy(audit_fraction=1.0, segments_per_audit=2, verifiers_per_audit=2, accepts_required=1)
    for verdicts in ([_verdict(V1, c, False), _verdict(V2, c, False, proven=True)],
                     [_verdict(V2, c, False, proven=True), _verdict(V1, c, False)]):
        decision = merge_decision(c, [], verdicts, one, assignment)
        assert not decision.merge and decision.cheat and decision.reason.startswith(PROVEN)


def test_bans_as_of_a_round_leave_out_later_proofs():
    bans = BanList()
    bans.ban(TRAINER.peer_id, 3, "proven: replay", ("x" * 64,))
    assert not bans.as_of(3).is_banned(TRAINER.peer_id)  # judging round 3 itself: not banned yet
    assert bans.as_of(4).is_banned(TRAINER.peer_id)
    assert bans.as_of(4).bans[TRAINER.peer_id].evidence == ("x" * 64,)


AUDITED = AuditAssignment(True, (V1.peer_id, V2.peer_id), (0, 1))
SKIPPED = AuditAssignment(False)


def _judge(round_index, suspects, verdict_accepts, assignment=AUDITED):
    """One round of the trainer: the decision under the suspects as of that round, then the outcome noted."""
    c = _contribution(round_index)
    verdicts = [_verdict(v, c, ok) for v, ok in zip((V1, V2), verdict_accepts)]
    decision = merge_decision(c, [], verdicts, POLICY, assignment, BanList(), suspects.as_of(round_index))
    note_audit(suspects, audit_outcome(c, verdicts, assignment, decision))
    return decision


def test_a_failed_audit_makes_a_suspect_that_never_merges_unaudited():
    suspects = SuspectList()
    assert _judge(1, suspects, (), SKIPPED).merge  # not drawn, never failed: merges on the cheap checks
    failed = _judge(2, suspects, (False, True))  # a reject verdict without proof (e.g. a trail not served)
    assert not failed.merge and not failed.cheat
    assert suspects.as_of(2).suspects() == set()  # round 2 itself is judged without its own outcome
    assert suspects.as_of(3).suspects() == {TRAINER.peer_id}
    for round_index in (3, 4):  # skipped by the beacon: rejected, however often it happens
        skipped = _judge(round_index, suspects, (), SKIPPED)
        assert not skipped.merge and not skipped.cheat
        assert "not audited this round" in skipped.reason and "round 2" in skipped.reason
    assert suspects.as_of(5).is_suspect(TRAINER.peer_id)
    assert not _judge(5, suspects, (True,)).merge  # audited but short of accepts: waits, still a suspect
    assert suspects.as_of(6).is_suspect(TRAINER.peer_id)


def test_a_passed_audit_clears_the_suspicion():
    suspects = SuspectList()
    _judge(1, suspects, (False, False))
    assert suspects.as_of(2).is_suspect(TRAINER.peer_id)
    passed = _judge(2, suspects, (True, True))  # a suspect drawn for audit and accepted merges
    assert passed.merge
    assert not suspects.as_of(3).is_suspect(TRAINER.peer_id)
    assert suspects.as_of(2).is_suspect(TRAINER.peer_id)  # round 2 is still judged as a suspect
    assert _judge(3, suspects, (), SKIPPED).merge  # cleared: unaudited rounds merge again


def test_suspects_agree_whatever_the_order_outcomes_arrive_in():
    c1, c2 = _contribution(1), _contribution(2)
    failed = audit_outcome(c1, [_verdict(V1, c1, False)], AUDITED, merge_decision(
        c1, [], [_verdict(V1, c1, False)], POLICY, AUDITED))
    passed = audit_outcome(c2, [_verdict(V1, c2, True), _verdict(V2, c2, True)], AUDITED, merge_decision(
        c2, [], [_verdict(V1, c2, True), _verdict(V2, c2, True)], POLICY, AUDITED))
    assert failed is not None and not failed.passed and passed is not None and passed.passed
    ahead, behind = SuspectList(), SuspectList()
    for outcome in (failed, passed):
        note_audit(ahead, outcome)
    for outcome in (passed, failed):  # a peer that settled the rounds in another order
        note_audit(behind, outcome)
    for round_index in range(1, 5):
        assert ahead.as_of(round_index).suspects() == behind.as_of(round_index).suspects()
    assert ahead.as_of(2).suspects() == {TRAINER.peer_id} and ahead.as_of(3).suspects() == set()
    same_round = SuspectList()  # a pass and a failure in one round: the failure counts
    same_round.note(TRAINER.peer_id, 1, True, "accepted")
    same_round.note(TRAINER.peer_id, 1, False, "trail not served")
    same_round.note(TRAINER.peer_id, 1, True, "accepted")
    assert same_round.as_of(2).is_suspect(TRAINER.peer_id)


def test_no_blame_without_a_drawn_verifier_rejecting():
    c = _contribution()
    assert audit_outcome(c, [], SKIPPED, merge_decision(c, [], [], POLICY, SKIPPED)) is None
    timed_out = merge_decision(c, [], [], POLICY, AUDITED)  # no verdict arrived in time
    assert audit_outcome(c, [], AUDITED, timed_out) is None
    outsider = [_verdict(OUTSIDER, c, False)]  # a reject by a peer the beacon did not draw counts for nothing
    assert audit_outcome(c, outsider, AUDITED, merge_decision(c, [], outsider, POLICY, AUDITED)) is None
