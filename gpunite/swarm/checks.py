"""Cheap checks of a contribution before it may merge: the hook where the proof layer's audits plug in.

`check_contribution` runs on the record alone (every coordinator, and every peer that verifies a round
close); `check_slice` runs on the bytes of one slice of the pseudo-gradient (every aggregator). Both return
a `CheckResult` (accept + reason) instead of raising, so a hostile contribution is logged and dropped and
never stops a round. Audits (replaying trail segments) are added to `check_contribution`'s callers by
passing `extra_checks`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gpunite.records import Contribution, WorkUnit
from gpunite.train.compression import decompress, payload_from_bytes, payload_hash
from gpunite.train.weights import TensorPayloadError


@dataclass(frozen=True)
class CheckResult:
    accept: bool
    reason: str = "ok"
    cheat: bool = False  # proven cheating (a ban), not just late or malformed


ACCEPT = CheckResult(True)


@dataclass(frozen=True)
class RoundContext:
    """What every honest peer knows about a round before it closes."""

    run_id: str
    round: int
    base_hash: str
    assigned: dict[str, list[WorkUnit]]  # peer id -> units from the work plan
    inner_steps: int
    batch_size: int
    seq_len: int
    trail_interval: int
    n_slices: int
    norm_bound: float  # largest norm allowed, as a multiple of the round's median
    start_hash: str | None = None  # train.overlap: the global weights before the base, where a round may start


ContributionCheck = Callable[[Contribution, RoundContext], CheckResult]


def check_contribution(c: Contribution, ctx: RoundContext, median_norm: float,
                       extra_checks: Sequence[ContributionCheck] = ()) -> CheckResult:
    """Record-level checks: run, round, base weights, assigned units, steps, tokens, trail, norm bound."""
    from gpunite.proof.trail import trail_length, trail_steps

    if c.run_id != ctx.run_id or c.round != ctx.round:
        return CheckResult(False, f"for run {c.run_id[:12]} round {c.round}, not this round {ctx.round}")
    if c.base_hash != ctx.base_hash:
        return CheckResult(False, f"trained from weights {c.base_hash[:12]}, not the round's {ctx.base_hash[:12]}")
    if c.rebase_step or c.start_hash is not None:
        if not c.rebase_step or c.start_hash is None or c.start_hash != ctx.start_hash:
            return CheckResult(False, f"started from weights {str(c.start_hash)[:12]} at rebase step {c.rebase_step}: "
                                      f"a round starts from {str(ctx.start_hash)[:12]} and rebases after a step > 0")
        if c.rebase_step not in trail_steps(c.inner_steps, ctx.trail_interval):
            return CheckResult(False, f"rebase step {c.rebase_step} is not a trail step")
    if c.peer_id not in ctx.assigned or list(c.work_units) != ctx.assigned[c.peer_id]:
        # Not a proven cheat: a peer that followed another close of the last round sees another assignment.
        return CheckResult(False, "work units are not the ones assigned to this peer")
    if not 0 < c.inner_steps <= ctx.inner_steps:
        return CheckResult(False, f"claims {c.inner_steps} inner steps, the round allows 1..{ctx.inner_steps}")
    sequences = sum(u.count for u in c.work_units)
    if c.inner_steps * ctx.batch_size > sequences:
        return CheckResult(False, f"{c.inner_steps} steps need more sequences than the {sequences} assigned")
    if c.tokens != c.inner_steps * ctx.batch_size * ctx.seq_len:
        return CheckResult(False, f"claims {c.tokens} tokens for {c.inner_steps} steps", cheat=True)
    if c.trail_interval != ctx.trail_interval or len(c.trail) != trail_length(c.inner_steps, ctx.trail_interval):
        return CheckResult(False, "trail does not have one entry per trail interval")
    if len(c.slice_hashes) != ctx.n_slices:
        return CheckResult(False, f"commits {len(c.slice_hashes)} slice hashes, the round has {ctx.n_slices} slices")
    if not math.isfinite(c.delta_norm) or c.delta_norm <= 0:
        return CheckResult(False, f"delta norm {c.delta_norm} is not a positive finite number")
    if median_norm > 0 and c.delta_norm > ctx.norm_bound * median_norm:
        return CheckResult(False, f"delta norm {c.delta_norm:.4g} is over {ctx.norm_bound} x the median "
                                  f"{median_norm:.4g}")
    for check in extra_checks:
        result = check(c, ctx)
        if not result.accept:
            return result
    return ACCEPT


def check_slice(data: bytes, c: Contribution, index: int, numel: int, chunk: int, method: str
                ) -> tuple[CheckResult, torch.Tensor | None]:
    """Payload-level checks of slice `index`: committed hash, size, shape, finite, norm within the claim."""
    if index >= len(c.slice_hashes) or payload_hash(data) != c.slice_hashes[index]:
        return CheckResult(False, f"slice {index} does not match its committed hash", cheat=True), None
    max_bytes = numel * 4 + (numel // max(chunk, 1) + 1) * 4 + 4096
    try:
        values = decompress(payload_from_bytes(data, numel, chunk, max_bytes=max_bytes, method=method))
    except TensorPayloadError as exc:
        return CheckResult(False, f"slice {index} is malformed: {exc}", cheat=True), None
    slice_norm = float(torch.linalg.vector_norm(values.double()))
    if slice_norm > c.delta_norm * (1 + 1e-4) + 1e-12:
        return CheckResult(False, f"slice {index} norm {slice_norm:.4g} exceeds the claimed total "
                                  f"{c.delta_norm:.4g}", cheat=True), None
    return ACCEPT, values
