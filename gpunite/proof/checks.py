"""Cheap checks every aggregator runs on every contribution, before any audit: each returns findings.

A `Finding` is a (reason, cheat) pair plus whether it blocks the merge by itself. `cheat` is set only when
the signed record (or the bytes that match its signed hash) prove the signer lied: a claim inconsistent with
itself, garbage behind a signed hash, two different contributions for one round. Lateness, a stale base, a
different view of the assignment or bytes corrupted in transit reject without blaming anyone.

Non-blocking findings are suspicions an audit settles: the same delta or trail under two identities means
one copied the other (or one peer claims its work twice, a Sybil), but a copier must not be able to get the
original rejected by copying it, so both are audited and the replay tells which trail is real.

Signatures are checked where a record enters (`gpunite.records.parse_record`); nothing unsigned gets here.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from gpunite.proof.trail import trail_length
from gpunite.records import Contribution, WorkUnit
from gpunite.train.compression import (
    decompress,
    payload_from_bytes,
    payload_hash,
    payload_to_bytes,
    slice_payload,
)
from gpunite.train.weights import TensorPayloadError

# Relative slack between a claimed and a recomputed float (norms and FLOPs are sums in different orders).
FLOAT_SLACK = 1e-4


@dataclass(frozen=True)
class Finding:
    reason: str
    cheat: bool = False  # proven by signed data
    blocking: bool = True  # False: resolved by a forced audit instead of a rejection


@dataclass(frozen=True)
class RoundContext:
    """What an aggregator knows about the round when contributions arrive."""

    run_id: str
    round: int
    base_hash: str  # the round's global weights hash
    batch_size: int
    seq_len: int
    trail_interval: int
    flops_per_token: int  # gpunite.model.flops_per_token(config, seq_len)
    norm_bound: float  # largest norm as a multiple of the round's median (manifest proof.norm_bound)
    assigned: Mapping[str, Sequence[WorkUnit]]  # peer id -> the work units the assignment gave it
    earlier_deltas: frozenset[str] = frozenset()  # delta hashes committed in earlier rounds of the run


def check_contribution(contribution: Contribution, ctx: RoundContext) -> list[Finding]:
    """Checks on the record alone: does it belong to this round, and is it consistent with itself?"""
    c = contribution
    findings: list[Finding] = []
    if c.run_id != ctx.run_id:
        findings.append(Finding(f"contribution is for run {c.run_id[:12]}, not {ctx.run_id[:12]}"))
    if c.round != ctx.round:
        findings.append(Finding(f"contribution is for round {c.round}, this is round {ctx.round}"))
    if c.base_hash != ctx.base_hash:
        findings.append(Finding(f"trained from weights {c.base_hash[:12]}, round {ctx.round} starts from "
                                f"{ctx.base_hash[:12]}"))
    assigned = ctx.assigned.get(c.peer_id)
    if assigned is None:
        findings.append(Finding(f"peer {c.peer_id[:12]} has no work assigned in round {ctx.round}"))
    elif list(c.work_units) != list(assigned):
        findings.append(Finding("work units differ from the ones assigned to this peer"))
    if c.trail_interval != ctx.trail_interval:
        findings.append(Finding(f"trail interval {c.trail_interval}, the run uses {ctx.trail_interval}"))
    if c.inner_steps == 0:
        findings.append(Finding("contribution claims no inner steps"))
    sequences = sum(unit.count for unit in c.work_units)
    if c.inner_steps * ctx.batch_size > sequences:
        # Fewer steps than the units allow is honest (a remainder smaller than a batch is left out);
        # more steps than the units hold claims work on data nobody assigned.
        findings.append(Finding(f"{c.inner_steps} steps of {ctx.batch_size} sequences need more than the "
                                f"{sequences} sequences of its work units", cheat=True))
    expected_tokens = c.inner_steps * ctx.batch_size * ctx.seq_len
    if c.tokens != expected_tokens:
        findings.append(Finding(f"claims {c.tokens} tokens, {c.inner_steps} steps make {expected_tokens}",
                                cheat=True))
    expected_entries = trail_length(c.inner_steps, c.trail_interval)
    if len(c.trail) != expected_entries:
        findings.append(Finding(f"trail has {len(c.trail)} entries, {c.inner_steps} steps every "
                                f"{c.trail_interval} make {expected_entries}", cheat=True))
    if c.delta_hash in ctx.earlier_deltas:
        findings.append(Finding("delta was already committed in an earlier round: replayed old work", cheat=True))
    expected_flops = float(ctx.flops_per_token) * c.tokens
    if not math.isclose(c.claimed_flops, expected_flops, rel_tol=FLOAT_SLACK, abs_tol=1.0):
        findings.append(Finding(f"claims {c.claimed_flops:.4g} FLOPs, {c.tokens} tokens make {expected_flops:.4g}",
                                cheat=True))
    return findings


def vector_norm(vector: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(vector.detach().double()))


def check_delta(
    contribution: Contribution,
    delta_bytes: bytes,
    numel: int,
    chunk: int,
    method: str = "int8",
    slice_bounds: Sequence[tuple[int, int]] | None = None,
) -> tuple[list[Finding], torch.Tensor | None]:
    """Check a whole compressed delta against the record; returns findings and the decompressed vector.

    The vector is None when the bytes cannot be used. With slice_bounds, the committed per-slice hashes
    are recomputed from the same payload, so each slice an aggregator later receives can be checked alone.
    """
    c = contribution
    if payload_hash(delta_bytes) != c.delta_hash:
        return [Finding("delta bytes do not match the committed delta hash (corrupt or substituted)")], None
    try:
        payload = payload_from_bytes(delta_bytes, numel, chunk, method=method)
    except TensorPayloadError as exc:
        return [Finding(f"committed delta is unusable: {exc}", cheat=True)], None
    vector = decompress(payload)
    findings: list[Finding] = []
    if not bool(torch.isfinite(vector).all()):
        findings.append(Finding("committed delta has non-finite values", cheat=True))
        return findings, None
    norm = vector_norm(vector)
    if not math.isclose(norm, c.delta_norm, rel_tol=FLOAT_SLACK, abs_tol=1e-12):
        findings.append(Finding(f"claims delta norm {c.delta_norm:.6g}, the committed delta has {norm:.6g}",
                                cheat=True))
    if slice_bounds is not None:
        hashes = [payload_hash(payload_to_bytes(slice_payload(payload, lo, hi))) for lo, hi in slice_bounds]
        if hashes != list(c.slice_hashes):
            findings.append(Finding("slice hashes do not match the committed delta's slices", cheat=True))
    return findings, vector


def check_slice(contribution: Contribution, index: int, slice_bytes: bytes) -> list[Finding]:
    """An aggregator's check of the one slice it receives: its hash is the committed one."""
    if not 0 <= index < len(contribution.slice_hashes):
        return [Finding(f"slice {index} is not among the {len(contribution.slice_hashes)} committed slices")]
    if payload_hash(slice_bytes) != contribution.slice_hashes[index]:
        return [Finding(f"slice {index} bytes do not match the committed slice hash (corrupt or substituted)")]
    return []


def check_round(contributions: Sequence[Contribution], ctx: RoundContext) -> dict[str, list[Finding]]:
    """Checks across the round's contributions: norms against the median, copies, and equivocation.

    Returns findings by contribution record id (every id present, possibly with an empty list).
    """
    findings: dict[str, list[Finding]] = {c.record_id: [] for c in contributions}
    norms = [c.delta_norm for c in contributions if c.delta_norm > 0]
    median = statistics.median(norms) if norms else 0.0
    for c in contributions:
        if median > 0 and c.delta_norm > ctx.norm_bound * median:
            findings[c.record_id].append(Finding(
                f"delta norm {c.delta_norm:.4g} is {c.delta_norm / median:.3g}x the round median {median:.4g} "
                f"(bound {ctx.norm_bound}x)"))
        if c.delta_norm == 0:
            findings[c.record_id].append(Finding("delta is zero"))

    by_signer: dict[str, list[Contribution]] = defaultdict(list)
    for c in contributions:
        if c.round == ctx.round:
            by_signer[c.peer_id].append(c)
    for signer, own in by_signer.items():
        if len({c.record_id for c in own}) > 1:
            for c in own:
                findings[c.record_id].append(Finding(
                    f"peer {signer[:12]} signed {len(own)} different contributions for round {ctx.round}",
                    cheat=True))

    delta_owners: dict[str, set[str]] = defaultdict(set)
    trail_owners: dict[str, set[str]] = defaultdict(set)
    for c in contributions:
        delta_owners[c.delta_hash].add(c.peer_id)
        for entry in c.trail[1:]:  # entry 0 is shared by every honest peer starting from the same state
            trail_owners[entry].add(c.peer_id)
    for c in contributions:
        shared = []
        if len(delta_owners[c.delta_hash]) > 1:
            shared.append("delta")
        if any(len(trail_owners[entry]) > 1 for entry in c.trail[1:]):
            shared.append("trail")
        if shared:
            findings[c.record_id].append(Finding(
                f"same {' and '.join(shared)} as another identity's contribution: copy or Sybil, audited",
                blocking=False))
    return findings


def cheap_checks(
    contribution: Contribution,
    ctx: RoundContext,
    round_findings: Mapping[str, list[Finding]],
    delta_findings: Sequence[Finding] = (),
) -> list[Finding]:
    """Every finding on one contribution: its record, the round-wide checks and its delta's checks."""
    return check_contribution(contribution, ctx) + list(round_findings.get(contribution.record_id, [])) + list(
        delta_findings)


def blocking(findings: Sequence[Finding]) -> list[Finding]:
    return [f for f in findings if f.blocking]
