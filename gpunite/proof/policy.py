"""Merge policy: which contributions may enter a round's aggregation given their checks and verdicts, and bans.

A contribution merges only if (1) its signer is not banned, (2) no cheap check blocks it, and (3) when it is
audited (sampled by the beacon, or forced by a suspicion such as a duplicate), at least `accepts_required`
of its drawn verifiers signed accept verdicts and none of them rejected it. A rejection that the committed
data proves (a cheap-check finding with `cheat`, or `accepts_required` proven reject verdicts from drawn
verifiers) bans the signer for the rest of the run: no credit for that contribution or any later one, and
the records that prove it are kept as evidence.

A rejection without proof (a reject verdict that is not `PROVEN`, e.g. a trail or delta the trainer did not
serve) makes its signer a suspect from the next round on (`SuspectList`): a suspect's contribution merges only
if the beacon drew it for audit and it was accepted, so failing an audit is never a way to merge unaudited in
the rounds the beacon skips. Its next accepted audit clears the suspicion. Suspects are not drawn for audit
with certainty: drawing must give the same verifiers at every peer that recomputes it (coordinator, verifiers,
every peer checking the close), while the suspect set only becomes known as closes are settled; an extra draw
that one peer makes and another does not would make honest peers reject a valid close. Rejecting the skipped
rounds of a suspect needs agreement only among the peers that judge the merge, exactly as bans do.

Default audit policy, derived in `gpunite.proof.selection`: a cheater faking half of its segments must be
caught with probability >= 0.99 within 5 rounds. One round catches it with probability audit_fraction *
P(drawn segments include a faked one), so audit_fraction must be >= 0.61 whatever the segments; replaying s
of n segments costs about audit_fraction * s / n of training. With n = 25 segments (H = 100 inner steps,
k = 4), audit_fraction 0.85 and 2 segments per audit catch it with probability 0.996 within 5 rounds
(benchmarks/proof_of_training.py), for ~6.8% of training compute plus evaluation passes. k itself is set by
the whole proof's CPU cost, the trainer's trail work included (benchmarks/proof_cost.py): at k = 2 the
replays cost half as much, but recording twice the trail entries cost the trainers more than that.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from gpunite.identity import canonical_json
from gpunite.proof.audit import PROVEN, AuditBounds
from gpunite.proof.checks import Finding
from gpunite.proof.selection import choose_segments, is_audited, ring_verifiers
from gpunite.records import Contribution, Verdict

DEFAULT_SEGMENTS_PER_AUDIT = 2


@dataclass(frozen=True)
class MergePolicy:
    audit_fraction: float = 0.85
    segments_per_audit: int = DEFAULT_SEGMENTS_PER_AUDIT
    verifiers_per_audit: int = 1
    accepts_required: int = 1
    bounds: AuditBounds = field(default_factory=AuditBounds)


def policy_from_manifest(proof, segments_per_audit: int | None = None) -> MergePolicy:
    """The policy of a run's manifest [proof] section (gpunite.manifest.ProofSection)."""
    return MergePolicy(
        audit_fraction=proof.audit_fraction,
        segments_per_audit=segments_per_audit or getattr(proof, "segments_per_audit", DEFAULT_SEGMENTS_PER_AUDIT),
        verifiers_per_audit=proof.verifiers_per_audit,
        accepts_required=proof.accepts_required,
        bounds=AuditBounds(tolerance=proof.tolerance),
    )


@dataclass(frozen=True)
class AuditAssignment:
    """Whether a contribution is audited, by whom and on which trail segments (recomputable by anyone)."""

    audited: bool
    verifiers: tuple[str, ...] = ()
    segments: tuple[int, ...] = ()


def assign_audit(beacon: bytes, contribution: Contribution, policy: MergePolicy, candidates: Sequence[str],
                 coordinator: str, forced: bool = False) -> AuditAssignment:
    """The beacon's audit decision for one contribution; `forced` when a non-blocking finding asks for one.

    The coordinator (who knew the beacon first) never verifies, and its own contributions are always audited.
    """
    cid = contribution.record_id
    audited = forced or is_audited(beacon, cid, policy.audit_fraction,
                                   signer_is_coordinator=contribution.peer_id == coordinator)
    if not audited:
        return AuditAssignment(False)
    verifiers = ring_verifiers(beacon, cid, contribution.peer_id, [p for p in candidates if p != coordinator],
                               policy.verifiers_per_audit)
    segments = choose_segments(beacon, cid, len(contribution.trail) - 1, policy.segments_per_audit)
    return AuditAssignment(True, tuple(verifiers), tuple(segments))


@dataclass(frozen=True)
class Ban:
    peer_id: str
    round: int
    reason: str
    evidence: tuple[str, ...]  # record ids (contributions, verdicts) that prove the cheat


@dataclass
class BanList:
    """Peers proven to cheat in this run, with the proof. Every peer derives the same list from its ledger."""

    bans: dict[str, Ban] = field(default_factory=dict)

    def ban(self, peer_id: str, round_index: int, reason: str, evidence: Sequence[str]) -> None:
        if peer_id not in self.bans:
            self.bans[peer_id] = Ban(peer_id, round_index, reason, tuple(evidence))

    def is_banned(self, peer_id: str) -> bool:
        return peer_id in self.bans

    def as_of(self, round_index: int) -> BanList:
        """The bans proven in rounds before round_index: what every peer judges round_index by, however far
        it has got with settling later rounds."""
        return BanList({pid: ban for pid, ban in self.bans.items() if ban.round < round_index})

    def digest(self) -> str:
        """What a peer's heartbeat says of its bans: "" for none, else the sha256 of the sorted (peer, round)
        pairs, so a joiner can check the bans a peer sends it against what the live peers hold."""
        if not self.bans:
            return ""
        pairs = sorted([pid, ban.round] for pid, ban in self.bans.items())
        return hashlib.sha256(canonical_json(pairs)).hexdigest()


@dataclass(frozen=True)
class AuditOutcome:
    peer_id: str
    round: int
    passed: bool
    reason: str
    evidence: tuple[str, ...]  # record ids (contribution, verdicts) the outcome rests on


@dataclass
class SuspectList:
    """Trainers whose latest audit failed without proof. Every peer derives the same list from the audit outcomes
    of the closes it followed; a round judges by the outcomes of earlier rounds only (`as_of`)."""

    outcomes: dict[str, dict[int, AuditOutcome]] = field(default_factory=dict)

    def note(self, peer_id: str, round_index: int, passed: bool, reason: str, evidence: Sequence[str] = ()) -> None:
        """Record an audit outcome; within one round a failure outweighs a pass (whatever the order they come in)."""
        rounds = self.outcomes.setdefault(peer_id, {})
        known = rounds.get(round_index)
        if known is None or (known.passed and not passed):
            rounds[round_index] = AuditOutcome(peer_id, round_index, passed, reason, tuple(evidence))

    def last_failure(self, peer_id: str) -> AuditOutcome | None:
        """The failed audit that makes peer_id a suspect (its latest round's outcome), or None."""
        rounds = self.outcomes.get(peer_id)
        if not rounds:
            return None
        latest = rounds[max(rounds)]
        return None if latest.passed else latest

    def is_suspect(self, peer_id: str) -> bool:
        return self.last_failure(peer_id) is not None

    def suspects(self) -> set[str]:
        return {pid for pid in self.outcomes if self.is_suspect(pid)}

    def as_of(self, round_index: int) -> SuspectList:
        """The outcomes of rounds before round_index: what every peer judges round_index by."""
        return SuspectList({pid: {r: o for r, o in rounds.items() if r < round_index}
                            for pid, rounds in self.outcomes.items()})


def audit_outcome(contribution: Contribution, verdicts: Sequence[Verdict], assignment: AuditAssignment,
                  decision: MergeDecision) -> AuditOutcome | None:
    """What an audit says about its trainer: failed when a drawn verifier rejected the contribution, passed when
    it merged on its audit, None when it was not audited or no drawn verifier answered (nobody is blamed)."""
    if not assignment.audited:
        return None
    cid = contribution.record_id
    mine = [v for v in verdicts if v.contribution == cid and v.peer_id in assignment.verifiers]
    rejects = [v for v in mine if not v.accept]
    if rejects:
        return AuditOutcome(contribution.peer_id, contribution.round, False, rejects[0].reason,
                            (cid, *(v.record_id for v in rejects)))
    if decision.merge and mine:
        return AuditOutcome(contribution.peer_id, contribution.round, True, decision.reason,
                            (cid, *(v.record_id for v in mine)))
    return None


def note_audit(suspects: SuspectList, outcome: AuditOutcome | None) -> None:
    if outcome is not None:
        suspects.note(outcome.peer_id, outcome.round, outcome.passed, outcome.reason, outcome.evidence)


@dataclass(frozen=True)
class MergeDecision:
    merge: bool
    reason: str
    cheat: bool = False  # proven: the signer is to be banned
    evidence: tuple[str, ...] = ()  # verdict ids the decision relied on


def merge_decision(
    contribution: Contribution,
    findings: Sequence[Finding],
    verdicts: Sequence[Verdict],
    policy: MergePolicy,
    assignment: AuditAssignment,
    bans: BanList | None = None,
    suspects: SuspectList | None = None,
) -> MergeDecision:
    """Whether a contribution may merge now. `verdicts` may hold any verdicts; only the drawn verifiers'
    verdicts on this contribution count, one per verifier (a verifier that signs both ways counts as reject).
    `bans` and `suspects` are the ones this contribution's round is judged by (`as_of` its round)."""
    cid = contribution.record_id
    if bans is not None and bans.is_banned(contribution.peer_id):
        ban = bans.bans[contribution.peer_id]
        return MergeDecision(False, f"signer was banned in round {ban.round}: {ban.reason}")
    proven = [f for f in findings if f.blocking and f.cheat]
    if proven:
        return MergeDecision(False, PROVEN + proven[0].reason, cheat=True, evidence=(cid,))
    blocking_findings = [f for f in findings if f.blocking]
    if blocking_findings:
        return MergeDecision(False, blocking_findings[0].reason)
    suspicions = [f for f in findings if not f.blocking]
    if suspicions and not assignment.audited:
        return MergeDecision(False, f"{suspicions[0].reason}, but no audit was assigned")
    failure = suspects.last_failure(contribution.peer_id) if suspects is not None else None
    if failure is not None and not assignment.audited:
        return MergeDecision(False, f"not audited this round; its last audit (round {failure.round}) failed: "
                                    f"{failure.reason[:200]}")
    if not assignment.audited:
        return MergeDecision(True, "cheap checks passed; not drawn for audit")

    by_verifier: dict[str, list[Verdict]] = {}
    for verdict in verdicts:
        if verdict.contribution == cid and verdict.peer_id in assignment.verifiers:
            by_verifier.setdefault(verdict.peer_id, []).append(verdict)
    accepts = [own[0] for own in by_verifier.values() if all(verdict.accept for verdict in own)]
    rejects = [verdict for own in by_verifier.values() for verdict in own if not verdict.accept]
    proven_rejects = [v for v in rejects if v.reason.startswith(PROVEN)]
    if rejects:
        cheat = len({v.peer_id for v in proven_rejects}) >= max(1, policy.accepts_required)
        return MergeDecision(False, (proven_rejects if cheat else rejects)[0].reason, cheat=cheat,
                             evidence=(cid, *(v.record_id for v in rejects)))
    if len(accepts) < policy.accepts_required:
        return MergeDecision(False, f"audited: {len(accepts)} of {policy.accepts_required} accept verdicts so far")
    return MergeDecision(True, f"audited and accepted by {len(accepts)} verifier(s)",
                         evidence=tuple(v.record_id for v in accepts))


def apply_decision(bans: BanList, contribution: Contribution, decision: MergeDecision) -> None:
    """Ban the signer of a proven cheat (keeps the first ban's evidence)."""
    if decision.cheat:
        bans.ban(contribution.peer_id, contribution.round, decision.reason, decision.evidence)
