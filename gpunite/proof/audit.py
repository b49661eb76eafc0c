"""Audit replay: re-run one trail segment's k inner steps and judge whether the trainer really did them.

A verifier holds a contribution (signed, so its trail is fixed) and the state at entry i of one segment,
served by the trainer. `audit_segment` checks it against the trail, restores the model and a deep copy of the
AdamW state, and replays the k steps on the segment's batches with the run's schedule. A replay whose whole
state hashes to entry i+1 is the committed state bit for bit (the usual case on the same device and kernels),
so the end state never travels: that halves an audit's bytes. Otherwise the verifier fetches the committed
state at entry i+1 and measures

    distance = ||replayed_{i+1} - committed_{i+1}|| / ||committed_{i+1} - committed_i||.

It also compares the replayed AdamW moments with the committed ones, rejects implausible second moments
(a forged state makes updates gradient-free), and wants the segment's own loss not to rise. `audit_delta`
ties the trail to the submitted pseudo-gradient (base - delta must land on the trail's last weights, up to
compression error) and checks that held-out loss does not blow up. Failures on data the trainer committed
to (hash-matching segments) are proven cheats: anyone can rerun the same replay on the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from gpunite.errors import GpuniteError
from gpunite.model import ModelConfig, build_model, flops_per_token
from gpunite.proof.trail import (
    Segment,
    SequenceLoader,
    TrailState,
    batches_for_steps,
    capture_state,
    entry_hash,
    final_from_bytes,
    segment_from_bytes,
    state_from_bytes,
    trail_steps,
)
from gpunite.records import Contribution, Verdict, sign_record
from gpunite.train.weights import flatten, weights_hash

# Reasons for rejections that the committed data proves start with this prefix (policy bans on them).
PROVEN = "proven: "


@dataclass(frozen=True)
class AuditBounds:
    """Thresholds of an audit. Calibrated by benchmarks/proof_of_training.py (see its JSON line)."""

    tolerance: float = 0.05  # replay distance, as a fraction of the committed segment's update norm
    # A segment that starts from a fresh AdamW state: its first step is sign-like (m / sqrt(v) = +-1 per
    # weight), so weights whose gradient is near zero flip with rounding (measured up to 0.057 between fp32
    # and bf16 autocast, against <= 0.006 on later segments; extrapolation cheats land at >= 0.19).
    fresh_tolerance: float = 0.15
    moment_ratio: float = 50.0  # start second moment / the segment's own squared gradients, at most
    own_loss_rise: float = 0.02  # relative rise of the segment's first-batch loss at its end weights
    delta_tolerance: float = 0.1  # ||(base - delta) - final|| / ||base - final||, int8 error included
    held_out_rise: float = 0.25  # relative rise of held-out loss from base to the trail's final weights


@dataclass(frozen=True)
class AuditResult:
    accept: bool
    reason: str
    cheat: bool  # proven by data the trainer committed to
    segment: int
    distance: float | None
    replay_flops: float
    details: dict[str, float] = field(default_factory=dict)


def _reject(reason: str, segment: int, cheat: bool, flops: float = 0.0, distance: float | None = None,
            details: dict[str, float] | None = None) -> AuditResult:
    return AuditResult(False, (PROVEN if cheat else "") + reason, cheat, segment, distance, flops, details or {})


def flat_weights(weights: dict[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """The flat fp32 vector of weights in the model's parameter order (the order pseudo-gradients use)."""
    return flatten(weights[name] for name in names)


def relative_distance(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> float:
    """||a - b|| / ||scale|| in float64 (inf when scale is zero and a != b)."""
    num = float(torch.linalg.vector_norm(a.double() - b.double()))
    den = float(torch.linalg.vector_norm(scale.double()))
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def check_segment_commitment(contribution: Contribution, segment: Segment,
                             expected_first_step: int | None = None,
                             expected_first_optimizer_hash: str | None = None) -> AuditResult | None:
    """A rejection if the served segment does not belong to the contribution's trail; None if it does."""
    trail, index = contribution.trail, segment.index
    steps = trail_steps(contribution.inner_steps, contribution.trail_interval)
    if len(steps) != len(trail):
        return _reject(f"trail has {len(trail)} entries, {len(steps)} expected for {contribution.inner_steps} "
                       f"steps every {contribution.trail_interval}", index, cheat=True)
    if not 0 <= index < len(trail) - 1:
        return _reject(f"segment {index} is outside the trail's {len(trail) - 1} segments", index, cheat=False)
    if entry_hash(contribution.base_hash, segment.first_optimizer_hash, segment.first_step) != trail[0]:
        return _reject("segment's entry-0 hashes do not match the trail's first entry", index, cheat=False)
    if expected_first_step is not None and segment.first_step != expected_first_step:
        return _reject(f"trail starts at schedule step {segment.first_step}, the round starts at "
                       f"{expected_first_step}", index, cheat=True)
    if expected_first_optimizer_hash is not None and segment.first_optimizer_hash != expected_first_optimizer_hash:
        return _reject("trail starts from an optimizer state other than the round's", index, cheat=True)
    if segment.start.step != segment.first_step + steps[index]:
        return _reject(f"segment {index} starts at step {segment.start.step}, the trail's schedule says "
                       f"{segment.first_step + steps[index]}", index, cheat=False)
    if segment.start.entry != trail[index]:
        return _reject(f"segment {index}'s start checkpoint does not match the committed trail", index,
                       cheat=False)
    return None if segment.end is None else check_end_commitment(contribution, segment, segment.end)


def check_end_commitment(contribution: Contribution, segment: Segment, end: TrailState) -> AuditResult | None:
    """A rejection if `end` is not the trail's committed state at the end of the segment; None if it is."""
    index = segment.index
    step = segment.first_step + trail_steps(contribution.inner_steps, contribution.trail_interval)[index + 1]
    if end.step != step:
        return _reject(f"segment {index} ends at step {end.step}, the trail's schedule says {step}", index,
                       cheat=False)
    if end.entry != contribution.trail[index + 1]:
        return _reject(f"segment {index}'s end checkpoint does not match the committed trail", index,
                       cheat=False)
    return None


def _moments(optimizer: dict[str, torch.Tensor], names: Sequence[str], key: str) -> torch.Tensor:
    return flatten(optimizer[f"{name}.{key}"] for name in names)


def audit_segment(
    contribution: Contribution,
    segment: Segment,
    batches: Sequence[torch.Tensor],
    model_config: ModelConfig,
    train_cfg,
    *,
    total_steps: int,
    bounds: AuditBounds = AuditBounds(),
    expected_first_step: int | None = None,
    expected_first_optimizer_hash: str | None = None,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    fetch_end: Callable[[], TrailState] | None = None,
    base: dict[str, torch.Tensor],
    hash_base: dict[str, torch.Tensor] | None = None,
) -> AuditResult:
    """Replay segment i of a contribution on its batches and judge it (train_cfg: the run's TrainSection).

    base: the round's start weights by name (the segment was parsed against them); the replay's end is rounded
    against them as the trainer rounded its state at the trail step. hash_base: the trail's own base when the
    segment's steps ran from other weights (`base`: an overlapped round's steps before its rebase); the
    segment was then parsed with `segment_from_bytes(..., hash_base=)` and the replay's end is hashed as the
    trainer committed it.

    `batches` come from `gpunite.proof.trail.batches_for_steps` for the segment's local steps. The replay
    runs in fp32 unless autocast_dtype is given (a verifier may replay as the trainer's device would).

    A segment served without its end state is first judged by hash: a replay whose whole state (weights,
    AdamW moments, step) hashes to the trail's entry i+1 is the committed state, bit for bit, so its end never
    has to travel. Otherwise (another device, other kernels) fetch_end() brings the committed end state and
    the replay is measured against it.
    """
    from gpunite.train.checkpoint import load_model_state
    from gpunite.train.trainer import InnerTrainer, TrainingError, unique_named_parameters

    index = segment.index
    rejection = check_segment_commitment(contribution, segment, expected_first_step, expected_first_optimizer_hash)
    if rejection is not None:
        return rejection
    steps = trail_steps(contribution.inner_steps, contribution.trail_interval)
    n_steps = steps[index + 1] - steps[index]
    if len(batches) != n_steps:
        raise ValueError(f"segment {index} has {n_steps} steps but {len(batches)} batches were given")

    model = build_model(model_config, seed=0, device=device)
    load_model_state(model, segment.start.weights)
    trainer = InnerTrainer(model, train_cfg, device=device, total_steps=total_steps, step=segment.start.step)
    if autocast_dtype is not None:
        trainer.autocast_dtype = autocast_dtype
    trainer.load_optimizer_state_tensors(segment.start.optimizer or {})  # copies: the segment stays intact
    named = unique_named_parameters(model)
    names = [name for name, _ in named]
    tokens_per_batch = batches[0].size(0) * (batches[0].size(1) - 1) if batches else 0
    per_token = flops_per_token(model_config, batches[0].size(1) - 1) if batches else 0
    flops = float(per_token * tokens_per_batch * n_steps)
    try:
        losses = [trainer.train_step(batch) for batch in batches]
    except TrainingError as exc:
        return _reject(f"replay of segment {index} diverged: {exc}", index, cheat=True, flops=flops)

    changes, _ = trainer.round_to_trail_precision({name: t.to(device) for name, t in base.items()})
    committed = segment.end
    bit_exact = False
    if committed is None:
        replayed_state = capture_state(model, trainer)
        if hash_base is not None:  # the entry commits the replay's end carried onto the trail's base
            carried = {name: hash_base[name] + changes[name].to("cpu").float() for name in replayed_state.weights}
            replayed_state.committed = entry_hash(weights_hash(carried), replayed_state.optimizer_hash,
                                                  replayed_state.step)
        if replayed_state.entry == contribution.trail[index + 1]:
            committed, bit_exact = replayed_state, True
        elif fetch_end is None:
            return _reject(f"segment {index} came without its end state and its replay is not bit-exact",
                           index, cheat=False, flops=flops)
        else:
            try:
                committed = fetch_end()
            except GpuniteError as exc:
                return _reject(f"could not get the end state of segment {index}: {exc}", index, cheat=False,
                               flops=flops)
            rejection = check_end_commitment(contribution, segment, committed)
            if rejection is not None:
                return rejection

    # A bit-exact replay is the committed state itself: both distances are 0 without measuring them.
    distance = 0.0
    if not bit_exact:
        end = flat_weights(committed.weights, names)
        start = flat_weights(segment.start.weights, names)
        distance = relative_distance(flatten(p for _, p in named), end, end - start)
    details = {"distance": distance, "bit_exact": float(bit_exact)}

    optimizer_distance = 0.0
    replayed_opt = trainer.optimizer_state_tensors()
    committed_opt = committed.optimizer or {}
    if set(committed_opt) != set(replayed_opt):
        return _reject(f"segment {index}'s end optimizer state has the wrong tensors", index, cheat=True,
                       flops=flops, distance=distance)
    moment_ratio = 0.0
    if replayed_opt:
        start_opt = segment.start.optimizer or {}
        if not bit_exact:
            for key in ("exp_avg", "exp_avg_sq"):
                end_m = _moments(committed_opt, names, key)
                start_m = _moments(start_opt, names, key) if start_opt else torch.zeros_like(end_m)
                optimizer_distance = max(optimizer_distance, relative_distance(
                    _moments(replayed_opt, names, key), end_m, end_m - start_m))
        if start_opt:
            moment_ratio = _second_moment_ratio(start_opt, replayed_opt, names, train_cfg.beta2, n_steps)
    details |= {"optimizer_distance": optimizer_distance, "moment_ratio": moment_ratio}

    tolerance = bounds.tolerance if segment.start.optimizer else bounds.fresh_tolerance
    if distance > tolerance:
        return _reject(f"replay of segment {index} lands {distance:.3g} of an update away from the committed "
                       f"weights (tolerance {tolerance})", index, True, flops, distance, details)
    if optimizer_distance > tolerance:
        return _reject(f"replay of segment {index} lands {optimizer_distance:.3g} away from the committed "
                       f"optimizer state (tolerance {tolerance})", index, True, flops, distance, details)
    if moment_ratio > bounds.moment_ratio:
        return _reject(f"segment {index} starts from an AdamW second moment {moment_ratio:.3g}x its own squared "
                       f"gradients (at most {bounds.moment_ratio}): a forged optimizer state", index, True, flops,
                       distance, details)
    # A replay that matches the committed end exactly is the specified computation on the committed data: a
    # loss that rose on one batch is then noise of honest training (seen in a live swarm), not evidence, and
    # is not measured (a forward pass a segment: 0.12 s of a one-step audit's 0.96 s on the tiny preset).
    exact = distance == 0.0 and optimizer_distance == 0.0  # bit-exact replays included (both 0 above)
    if not exact and batches:
        # The committed end weights on the segment's first batch, against that batch's loss at the start weights.
        load_model_state(model, committed.weights)
        start_loss, end_loss = losses[0], trainer.evaluate(batches[0])
        flops += per_token / 3 * tokens_per_batch
        details |= {"start_loss": start_loss, "end_loss": end_loss}
        if end_loss > start_loss * (1 + bounds.own_loss_rise):
            return _reject(f"segment {index}'s own loss rose from {start_loss:.4f} to {end_loss:.4f}", index,
                           True, flops, distance, details)
    how = ("bit-exactly (its end state never travelled)" if bit_exact
           else f"within {distance:.3g} (tolerance {tolerance})")
    return AuditResult(True, f"segment {index} replayed {how}", False, index, distance, flops, details)


def _second_moment_ratio(start_opt: dict[str, torch.Tensor], replayed_opt: dict[str, torch.Tensor],
                         names: Sequence[str], beta2: float, n_steps: int) -> float:
    """Mean start second moment over the mean squared gradient the segment itself produced.

    AdamW keeps v = beta2 * v + (1 - beta2) * g^2 (exactly), so after n steps the replay's v minus
    beta2^n * v_start is the segment's own weighted g^2; dividing by (1 - beta2^n) makes it a mean. Honest
    training keeps v a recent average of g^2 (ratio near 1); a state forged to make updates ignore the
    gradients needs v far above it.
    """
    decay = beta2 ** n_steps
    own_sum = start_sum = 0.0
    with torch.no_grad():  # tensor by tensor, sums in fp64: no concatenated or fp64 copy of the moments
        for name in names:
            v_start, v_end = start_opt[f"{name}.exp_avg_sq"], replayed_opt[f"{name}.exp_avg_sq"]
            own_sum += float(torch.sub(v_end, v_start, alpha=decay).clamp_min_(0).sum(dtype=torch.float64))
            start_sum += float(v_start.sum(dtype=torch.float64))
    own = own_sum / (1 - decay)
    if own == 0.0:
        return 0.0 if start_sum == 0.0 else float("inf")
    return start_sum / own


def audit_delta(
    contribution: Contribution,
    final: TrailState,
    base: torch.Tensor,
    delta: torch.Tensor,
    names: Sequence[str],
    *,
    bounds: AuditBounds = AuditBounds(),
    held_out_loss: tuple[float, float] | None = None,
) -> AuditResult:
    """Check that the submitted delta is the trail's work: base - delta ~= the last trail weights.

    base and delta are flat fp32 vectors in model order (delta decompressed); `held_out_loss` is
    (loss at base, loss at final weights) on the verifier's held-out batch, when it measured them.
    """
    last = -1  # a verdict's segment is -1 when no replay was needed
    if final.entry != contribution.trail[-1]:
        return _reject("the served final weights do not match the trail's last entry", last, cheat=False)
    final_flat = flat_weights(final.weights, names)
    if delta.numel() != base.numel():
        return _reject(f"delta has {delta.numel()} values, the model {base.numel()}", last, cheat=True)
    mismatch = relative_distance(base - delta, final_flat, base - final_flat)
    details = {"delta_mismatch": mismatch}
    if mismatch > bounds.delta_tolerance:
        return _reject(f"base - delta lands {mismatch:.3g} of the trail's own update away from its final weights "
                       f"(tolerance {bounds.delta_tolerance})", last, True, details=details)
    if held_out_loss is not None:
        base_loss, final_loss = held_out_loss
        details |= {"held_out_base": base_loss, "held_out_final": final_loss}
        if final_loss > base_loss * (1 + bounds.held_out_rise):
            return _reject(f"held-out loss rose from {base_loss:.4f} to {final_loss:.4f}", last, True,
                           details=details)
    return AuditResult(True, f"delta matches the trail within {mismatch:.3g}", False, last, None, 0.0, details)


def held_out_loss(model_config: ModelConfig, train_cfg, weights: dict[str, torch.Tensor],
                  batch: torch.Tensor) -> tuple[float, float]:
    """(loss, forward FLOPs spent) of some weights on a held-out batch; compute the base's once per round."""
    from gpunite.train.checkpoint import load_model_state
    from gpunite.train.trainer import InnerTrainer

    model = build_model(model_config, seed=0)
    load_model_state(model, weights)
    loss = InnerTrainer(model, train_cfg, device="cpu", total_steps=1).evaluate(batch)
    tokens = batch.size(0) * (batch.size(1) - 1)
    return loss, flops_per_token(model_config, batch.size(1) - 1) / 3 * tokens


def combine_results(results: Sequence[AuditResult]) -> AuditResult:
    """One verifier's judgement of a contribution from its checks: the first rejection, or an accept.

    Replay FLOPs add up (the verifier's credit); the distance reported is the largest replayed.
    """
    if not results:
        raise ValueError("combine_results needs at least one audit result")
    flops = sum(r.replay_flops for r in results)
    distances = [r.distance for r in results if r.distance is not None]
    distance = max(distances) if distances else None
    details = {f"{key}[{r.segment}]": value for r in results for key, value in r.details.items()}
    for r in results:
        if not r.accept:
            return AuditResult(False, r.reason, r.cheat, r.segment, r.distance, flops, details)
    segments = [r.segment for r in results if r.segment >= 0]
    exact = [r for r in results if r.segment >= 0 and r.details.get("bit_exact")]
    how = "bit-exactly" if segments and len(exact) == len(segments) else f"within {distance:.3g}"
    reason = f"segments {segments} replayed {how}" if distance is not None else results[0].reason
    return AuditResult(True, reason + ("; delta matches the trail" if any(r.segment < 0 for r in results) else ""),
                       False, segments[0] if segments else -1, distance, flops, details)


def make_verdict(identity, contribution: Contribution, result: AuditResult, time: float) -> Verdict:
    """The verifier's signed verdict on a contribution from one audit result."""
    verdict = Verdict(
        run_id=contribution.run_id,
        round=contribution.round,
        contribution=contribution.record_id,
        trainer=contribution.peer_id,
        accept=result.accept,
        reason=result.reason[:1024],
        segment=result.segment,
        distance=result.distance if result.distance is None or result.distance < float("inf") else 1e30,
        replay_flops=result.replay_flops,
        time=time,
    )
    return sign_record(identity, verdict)


def verify_contribution(
    contribution: Contribution,
    segments: Sequence[int],
    fetch_segment: Callable[[int, str], bytes],
    fetch_final: Callable[[], bytes],
    base: dict[str, torch.Tensor],
    delta: torch.Tensor,
    loader: SequenceLoader,
    batch_size: int,
    model_config: ModelConfig,
    train_cfg,
    *,
    total_steps: int,
    bounds: AuditBounds = AuditBounds(),
    held_out: tuple[torch.Tensor, float] | None = None,
    expected_first_step: int | None = None,
    expected_first_optimizer_hash: str | None = None,
    autocast_dtype: torch.dtype | None = None,
    max_bytes: int | None = None,
    start: dict[str, torch.Tensor] | None = None,
) -> AuditResult:
    """A verifier's whole audit of one contribution: the delta against the trail's end, then each drawn segment.

    base: the round's global weights by name in model order; delta: the decompressed pseudo-gradient.
    fetch_segment(i, "start") returns segment i without its end state (`TrailRecorder.segment_payload(r, i,
    with_end=False)`), fetch_segment(i, "end") the state at entry i + 1 (`TrailRecorder.entry_payload`), asked
    for only when the replay is not bit-exact; fetch_segment and fetch_final() return the trainer's bytes
    (raise GpuniteError when it cannot serve);
    a trainer that cannot serve is rejected, not proven to cheat. held_out: (a held-out batch, the base
    weights' loss on it), when the verifier checks that held-out loss does not blow up. start: the global
    weights an overlapped round's first `contribution.rebase_step` steps ran from (`Contribution.start_hash`),
    needed when the contribution rebased.
    """
    if contribution.rebase_step and start is None:
        return _reject("the contribution rebased, and this verifier does not hold the weights it started from",
                       -1, cheat=False)
    names = list(base)
    shapes = {name: tuple(t.shape) for name, t in base.items()}
    results: list[AuditResult] = []
    try:
        final = final_from_bytes(fetch_final(), shapes, max_bytes)
    except GpuniteError as exc:
        return _reject(f"could not get the trail's final weights: {exc}", -1, cheat=False)
    losses = None
    flops = 0.0
    if held_out is not None:
        batch, base_loss = held_out
        final_loss, flops = held_out_loss(model_config, train_cfg, final.weights, batch)
        losses = (base_loss, final_loss)
    result = audit_delta(contribution, final, flat_weights(base, names), delta, names, bounds=bounds,
                         held_out_loss=losses)
    results.append(AuditResult(result.accept, result.reason, result.cheat, result.segment, result.distance,
                               flops, result.details))
    if not result.accept:
        return combine_results(results)
    steps = trail_steps(contribution.inner_steps, contribution.trail_interval)
    for index in segments:
        # Before the rebase the steps ran from `start`: replay there, hash as the trail commits (on the base).
        ran_from, hash_base = (start, base) if steps[index] < contribution.rebase_step else (base, None)
        try:
            segment = segment_from_bytes(fetch_segment(index, "start"), ran_from, max_bytes, hash_base=hash_base)
        except GpuniteError as exc:
            results.append(_reject(f"could not get segment {index}: {exc}", index, cheat=False))
            break
        if segment.index != index:
            results.append(_reject(f"asked for segment {index}, got {segment.index}", index, cheat=False))
            break
        batches = batches_for_steps(contribution.work_units, range(steps[index], steps[index + 1]), batch_size,
                                    loader)
        results.append(audit_segment(contribution, segment, batches, model_config, train_cfg,
                                     total_steps=total_steps, bounds=bounds, expected_first_step=expected_first_step,
                                     expected_first_optimizer_hash=expected_first_optimizer_hash,
                                     autocast_dtype=autocast_dtype,
                                     fetch_end=lambda i=index, b=ran_from, h=hash_base: state_from_bytes(
                                         fetch_segment(i, "end"), b, max_bytes, hash_base=h),
                                     base=ran_from, hash_base=hash_base))
        if not results[-1].accept:
            break
    return combine_results(results)
