"""Who audits what: audit sampling, verifier choice and segment choice from a beacon nobody could predict.

The beacon of a round is the round coordinator's Ed25519 signature over (run id, round, previous block hash,
sorted ids of every contribution committed by the deadline), hashed. Ed25519 signatures are deterministic
(one message, one signature, so the coordinator cannot re-roll it) and nobody without the coordinator's key
can compute it, so when a trainer commits its contribution it cannot know whether it will be audited, by
whom, or which segment. Every decision below is a pure function of (beacon, contribution id, ...): any peer
recomputes it and checks that the right verifiers judged the right segments.

Threats, and what answers them:
- Grinding by a trainer: changing its contribution (e.g. its `time`) changes its id, but the beacon is not
  known until all ids are committed, so it has nothing to grind against.
- Grinding by the coordinator: it learns the beacon first and could re-sign with one of its own
  contributions varied until that one is not audited. Hence: a contribution signed by the beacon's signer is
  always audited (`is_audited(..., signer_is_coordinator=True)`), and it may not verify anyone in that round
  (pass it in `exclude`). It could still drop or add others' ids to move the beacon for a colluding trainer;
  peers that saw a contribution in time reject a beacon that omits it, and the coordinator is itself drawn
  from the previous block hash, so a colluder is coordinator only as often as its share of peers.
- Colluding verifiers: with one verifier per audit a cheater escapes when the drawn verifier is its
  accomplice (probability = the accomplices' share of candidates). Verifiers are drawn only from peers with
  verified work in the run (candidates), so Sybil verifiers cost real training; raise
  `verifiers_per_audit`/`accepts_required` to need several independent accepts.
- A persistent cheater: see `p_caught_within` and `segments_needed`; the default policy is derived there.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from gpunite.errors import GpuniteError
from gpunite.identity import canonical_json, peer_id_of, verify_bytes


class SelectionError(GpuniteError):
    """A beacon that does not verify, or a selection that cannot be made (too few candidates)."""


def beacon_message(run_id: str, round_index: int, prev_block: str, contribution_ids: Sequence[str]) -> bytes:
    """What the coordinator signs: the round and every committed contribution id, sorted."""
    body = {
        "kind": "audit-beacon", "run_id": run_id, "round": round_index, "prev": prev_block,
        "contributions": sorted(set(contribution_ids)),
    }
    return canonical_json(body)


def sign_beacon(identity, run_id: str, round_index: int, prev_block: str, contribution_ids: Sequence[str]) -> str:
    """The coordinator's signature (hex) over the beacon message."""
    return identity.sign_bytes(beacon_message(run_id, round_index, prev_block, contribution_ids))


def beacon_from_signature(coordinator_key: str, signature: str, run_id: str, round_index: int, prev_block: str,
                          contribution_ids: Sequence[str]) -> bytes:
    """The 32-byte beacon, after checking the coordinator's signature over the committed ids."""
    message = beacon_message(run_id, round_index, prev_block, contribution_ids)
    if not verify_bytes(coordinator_key, message, signature):
        raise SelectionError(
            f"audit beacon from {peer_id_of(coordinator_key)} does not verify over round {round_index}'s "
            f"{len(set(contribution_ids))} contributions; wait for the coordinator's beacon for this set"
        )
    return hashlib.sha256(bytes.fromhex(signature)).digest()


def _draw(beacon: bytes, *parts: str) -> int:
    digest = hashlib.sha256(beacon + canonical_json(list(parts))).digest()
    return int.from_bytes(digest[:8], "big")


def _uniform(beacon: bytes, *parts: str) -> float:
    return _draw(beacon, *parts) / 2**64


def is_audited(beacon: bytes, contribution_id: str, fraction: float, signer_is_coordinator: bool = False) -> bool:
    """Whether a contribution is audited: a fraction of them, chosen by the beacon; always the coordinator's own."""
    if signer_is_coordinator:
        return True
    return _uniform(beacon, "audit", contribution_id) < fraction


def choose_verifiers(beacon: bytes, contribution_id: str, candidates: Sequence[str], n: int,
                     exclude: Sequence[str] = ()) -> list[str]:
    """n distinct verifiers (peer ids) from the candidates, never one in exclude (the trainer, the coordinator)."""
    pool = sorted(set(candidates) - set(exclude))
    if len(pool) < n:
        raise SelectionError(f"need {n} verifiers for {contribution_id[:12]}, only {len(pool)} candidates; "
                             "wait for more peers with verified work, or lower proof.verifiers_per_audit")
    return sorted(pool, key=lambda peer: _draw(beacon, "verifier", contribution_id, peer))[:n]


def ring_verifiers(beacon: bytes, contribution_id: str, trainer: str, candidates: Sequence[str], n: int
                   ) -> list[str]:
    """n verifiers for `trainer`'s contribution that spread a round's audits evenly over the candidates.

    The beacon shuffles the candidates into a ring; a trainer in the ring is verified by the n peers after
    it, a trainer outside it by n consecutive peers from a place drawn for the contribution. So each
    candidate verifies n of the ring's trainers plus its share of the outsiders' work (the coordinator's own
    contribution, at most): with drawing verifiers independently per contribution, one of 3 verifiers got 3
    of a round's 4 audits a quarter of the time, and the round's close waited for its last replay. A
    colluder is still a trainer's verifier only as often as its share of the candidates.
    """
    ring = sorted(set(candidates), key=lambda peer: _draw(beacon, "ring", peer))
    if trainer in ring:
        after = ring.index(trainer) + 1
        pool = ring[after:] + ring[:after - 1]
    else:
        start = _draw(beacon, "ring-start", contribution_id) % max(1, len(ring))
        pool = ring[start:] + ring[:start]
    if len(pool) < n:
        raise SelectionError(f"need {n} verifiers for {contribution_id[:12]}, only {len(pool)} candidates; "
                             "wait for more peers with verified work, or lower proof.verifiers_per_audit")
    return sorted(pool[:n])


def choose_segments(beacon: bytes, contribution_id: str, n_segments: int, count: int) -> list[int]:
    """`count` distinct segments of the trail to replay (all of them if count >= n_segments), sorted."""
    if n_segments <= 0:
        raise SelectionError(f"a trail with {n_segments} segments cannot be audited")
    ranked = sorted(range(n_segments), key=lambda i: _draw(beacon, "segment", contribution_id, str(i)))
    return sorted(ranked[: min(count, n_segments)])


def choose_segment(beacon: bytes, contribution_id: str, n_segments: int) -> int:
    return choose_segments(beacon, contribution_id, n_segments, 1)[0]


def p_segments_catch(n_segments: int, faked_segments: int, audited_segments: int) -> float:
    """Chance that `audited_segments` segments drawn without replacement include a faked one."""
    audited = min(audited_segments, n_segments)
    honest = n_segments - faked_segments
    if audited > honest:
        return 1.0
    return 1.0 - math.comb(honest, audited) / math.comb(n_segments, audited)


def p_caught_per_round(audit_fraction: float, n_segments: int, segments_per_audit: int, faked_fraction: float,
                       p_detect_segment: float = 1.0) -> float:
    """Chance a cheater who fakes `faked_fraction` of its segments is caught in one round.

    The cheater fakes whole segments (a partly faked segment is as detectable as a wholly faked one, and
    costs more): the worst case for the auditor. `p_detect_segment` is the measured chance that a replay of a
    faked segment rejects (1.0 when every cheat lands far outside the tolerance).
    """
    faked = math.ceil(faked_fraction * n_segments)
    hit = p_segments_catch(n_segments, faked, segments_per_audit) * p_detect_segment
    return audit_fraction * hit


def p_caught_within(rounds: int, **per_round) -> float:
    """Chance a persistent cheater is caught at least once within `rounds` rounds (audits are independent)."""
    return 1.0 - (1.0 - p_caught_per_round(**per_round)) ** rounds


def segments_needed(audit_fraction: float, n_segments: int, faked_fraction: float = 0.5, rounds: int = 5,
                    target: float = 0.99) -> int | None:
    """The fewest segments per audit that catch such a cheater with `target` probability; None if none do."""
    for count in range(1, n_segments + 1):
        p = p_caught_within(rounds, audit_fraction=audit_fraction, n_segments=n_segments,
                            segments_per_audit=count, faked_fraction=faked_fraction)
        if p >= target:
            return count
    return None
