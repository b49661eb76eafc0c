"""Trainer strategies for one round: the honest one, and every way of cheating the proof layer must catch.

For testing only (`gpunite join --adversary MODE`, `gpunite demo --cheater MODE`, the proof benchmark). Each
strategy takes the same `RoundWork` an honest trainer gets and returns the submissions it would publish:
the contribution record as sent (signed JSON, possibly with a broken signature), the compressed delta bytes,
and the trail store that answers verifiers. `Submission.cheating` marks the ones that cheat (a strategy may
also publish honest ones, e.g. a Sybil's original; a replay of an old round is honest in round 0).

The cheats are the ones a rational adversary would try, each done as cheaply and as stealthily as the
protocol allows: trails that hash-match what is served, norms inside the bound, claims consistent with the
work units. What they save is the point: skipped steps, skipped data, no training at all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from gpunite.identity import Identity
from gpunite.model import ModelConfig, build_model, flops_per_token
from gpunite.proof.checks import vector_norm
from gpunite.proof.trail import (
    SequenceLoader,
    TrailRecorder,
    TrailState,
    batches_for_steps,
    capture_state,
    optimizer_hash,
    trail_steps,
    train_with_trail,
)
from gpunite.records import Contribution, WorkUnit, sign_record
from gpunite.train.compression import (
    compress,
    decompress,
    payload_from_bytes,
    payload_hash,
    payload_to_bytes,
    slice_payload,
)
from gpunite.train.weights import flatten, unflatten_into, weights_hash


@dataclass
class Submission:
    record: dict[str, Any]  # the signed contribution as published
    delta_bytes: bytes
    recorder: TrailRecorder  # serves segment_payload(round, i) and final_payload(round)
    round: int
    cheating: bool


@dataclass
class RoundWork:
    """Everything a trainer is given for one round (train_cfg: the run's TrainSection)."""

    run_id: str
    round: int
    base: dict[str, torch.Tensor]  # global weights by name, in model order
    units: list[WorkUnit]
    model_config: ModelConfig
    train_cfg: Any
    seq_len: int
    trail_interval: int
    first_step: int  # schedule step at the round's start
    total_steps: int
    loader: SequenceLoader
    identity: Identity
    recorder: TrailRecorder
    slice_bounds: list[tuple[int, int]]
    time: float = 0.0
    optimizer_state: dict[str, torch.Tensor] = field(default_factory=dict)  # AdamW state at the start
    published: list[Submission] = field(default_factory=list)  # others' submissions seen this round
    history: list[Submission] = field(default_factory=list)  # this trainer's own earlier submissions
    sybils: list[tuple[Identity, list[WorkUnit]]] = field(default_factory=list)  # extra identities, their units
    foreign_units: list[WorkUnit] = field(default_factory=list)  # data not assigned to this trainer
    autocast_dtype: torch.dtype | None = None  # e.g. bf16, as a GPU trainer would run

    @property
    def inner_steps(self) -> int:
        return sum(unit.count for unit in self.units) // self.train_cfg.batch_size

    @property
    def base_hash(self) -> str:
        return weights_hash(self.base)


Strategy = Callable[[RoundWork], list[Submission]]


def _start(work: RoundWork) -> tuple[torch.nn.Module, Any]:
    from gpunite.train.checkpoint import load_model_state
    from gpunite.train.trainer import InnerTrainer

    model = build_model(work.model_config, seed=0)
    load_model_state(model, work.base)
    trainer = InnerTrainer(model, work.train_cfg, device="cpu", total_steps=work.total_steps, step=work.first_step)
    trainer.load_optimizer_state_tensors(work.optimizer_state)
    if work.autocast_dtype is not None:
        trainer.autocast_dtype = work.autocast_dtype
    return model, trainer


def _flat(weights: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    return flatten(weights[name] for name in names)


def contribution_for(work: RoundWork, identity: Identity, units: Sequence[WorkUnit], trail: Sequence[str],
                     pseudo_gradient: torch.Tensor, inner_steps: int | None = None, start_hash: str | None = None,
                     rebase_step: int = 0) -> Submission:
    """Compress a pseudo-gradient and sign the contribution committing to it (what an honest trainer sends)."""
    cfg = work.train_cfg
    payload = compress(pseudo_gradient.contiguous(), cfg.compression, cfg.compression_chunk)
    delta_bytes = payload_to_bytes(payload)
    steps = inner_steps if inner_steps is not None else sum(u.count for u in units) // cfg.batch_size
    tokens = steps * cfg.batch_size * work.seq_len
    record = Contribution(
        run_id=work.run_id,
        round=work.round,
        base_hash=work.base_hash,
        work_units=list(units),
        inner_steps=steps,
        tokens=tokens,
        trail_interval=work.trail_interval,
        trail=list(trail),
        delta_hash=payload_hash(delta_bytes),
        slice_hashes=[payload_hash(payload_to_bytes(slice_payload(payload, lo, hi))) for lo, hi in work.slice_bounds],
        delta_norm=vector_norm(decompress(payload)),
        claimed_flops=float(flops_per_token(work.model_config, work.seq_len) * tokens),
        time=work.time,
        start_hash=start_hash,
        rebase_step=rebase_step,
    )
    signed = sign_record(identity, record)
    return Submission(signed.model_dump(mode="json"), delta_bytes, work.recorder, work.round, cheating=False)


def _pseudo_gradient(work: RoundWork, final: Mapping[str, torch.Tensor]) -> torch.Tensor:
    names = list(work.base)
    return _flat(work.base, names) - _flat(final, names)


def honest(work: RoundWork) -> list[Submission]:
    """Train the assigned units for the round's inner steps, recording the trail, and commit to the result."""
    model, trainer = _start(work)
    train_with_trail(trainer, model, work.units, work.train_cfg.batch_size, work.loader, work.inner_steps,
                     work.recorder, work.round)
    final = capture_state(model, trainer).weights
    return [contribution_for(work, work.identity, work.units, work.recorder.trail, _pseudo_gradient(work, final))]


def _cheat(submissions: list[Submission]) -> list[Submission]:
    return [replace(s, cheating=True) for s in submissions]


def _segmented(work: RoundWork, run_segment: Callable[[int, torch.nn.Module, Any, list[torch.Tensor]], None],
               units: Sequence[WorkUnit] | None = None) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Run a round segment by segment through run_segment, recording each segment's end state as the trail."""
    model, trainer = _start(work)
    steps = trail_steps(work.inner_steps, work.trail_interval)
    work.recorder.start_round(work.round, work.inner_steps)
    work.recorder.record_state(capture_state(model, trainer))
    for index in range(len(steps) - 1):
        batches = batches_for_steps(units or work.units, range(steps[index], steps[index + 1]),
                                    work.train_cfg.batch_size, work.loader)
        run_segment(index, model, trainer, batches)
        work.recorder.record_state(capture_state(model, trainer))
    return work.recorder.trail, capture_state(model, trainer).weights


def _skip_steps(trainer, n: int) -> None:
    """Advance the schedule and AdamW's step counters as if n more steps ran (a cheater hiding skipped steps)."""
    trainer.step += n
    for state in trainer.optimizer.state.values():
        if "step" in state:
            state["step"] += n


def _extrapolate(model: torch.nn.Module, before: torch.Tensor, factor: float) -> None:
    from gpunite.train.trainer import unique_named_parameters

    params = [p for _, p in unique_named_parameters(model)]
    now = flatten(params)
    with torch.no_grad():
        unflatten_into(before + (now - before) * factor, params)


def _model_vector(model: torch.nn.Module) -> torch.Tensor:
    from gpunite.train.trainer import unique_named_parameters

    return flatten(p for _, p in unique_named_parameters(model))


def fewer_steps(work: RoundWork) -> list[Submission]:
    """In every segment, train half the steps and stretch the update to look like all of them."""
    def segment(index, model, trainer, batches):
        before = _model_vector(model)
        half = max(1, len(batches) // 2)
        for batch in batches[:half]:
            trainer.train_step(batch)
        _extrapolate(model, before, len(batches) / half)
        _skip_steps(trainer, len(batches) - half)

    trail, final = _segmented(work, segment)
    return _cheat([contribution_for(work, work.identity, work.units, trail, _pseudo_gradient(work, final))])


def half_faked(work: RoundWork) -> list[Submission]:
    """The persistent half-faker: train the first half of the segments, extrapolate the rest for free."""
    n_segments = len(trail_steps(work.inner_steps, work.trail_interval)) - 1
    last_update: list[torch.Tensor] = []

    def segment(index, model, trainer, batches):
        before = _model_vector(model)
        if index < (n_segments + 1) // 2 or not last_update:
            for batch in batches:
                trainer.train_step(batch)
            last_update[:] = [_model_vector(model) - before]
            return
        from gpunite.train.trainer import unique_named_parameters

        with torch.no_grad():
            unflatten_into(before + last_update[0], [p for _, p in unique_named_parameters(model)])
        _skip_steps(trainer, len(batches))

    trail, final = _segmented(work, segment)
    return _cheat([contribution_for(work, work.identity, work.units, trail, _pseudo_gradient(work, final))])


def skipped_data(work: RoundWork) -> list[Submission]:
    """Train every step on only half of its batch (half the compute), claiming the whole batch."""
    def segment(index, model, trainer, batches):
        for batch in batches:
            trainer.train_step(batch[: max(1, batch.size(0) // 2)])

    trail, final = _segmented(work, segment)
    return _cheat([contribution_for(work, work.identity, work.units, trail, _pseudo_gradient(work, final))])


def substituted_data(work: RoundWork) -> list[Submission]:
    """Train on data of the cheater's choosing (here: sequences assigned to nobody) instead of its units."""
    def segment(index, model, trainer, batches):
        for batch in batches:
            trainer.train_step(batch)

    trail, final = _segmented(work, segment, units=work.foreign_units or work.units)
    return _cheat([contribution_for(work, work.identity, work.units, trail, _pseudo_gradient(work, final))])


def _typical_norm(work: RoundWork) -> float:
    """A norm that passes the round's bound: that of a delta already published this round, if any."""
    norms = [s.record["delta_norm"] for s in work.published if s.record.get("delta_norm")]
    return float(sorted(norms)[len(norms) // 2]) if norms else 1.0


def _generator(work: RoundWork, purpose: str) -> torch.Generator:
    digest = hashlib.sha256(f"{purpose}:{work.run_id}:{work.round}:{work.identity.peer_id}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def random_delta(work: RoundWork) -> list[Submission]:
    """No training: a random delta of a typical norm, and a trail of random hashes it cannot serve."""
    generator = _generator(work, "random-delta")
    numel = sum(t.numel() for t in work.base.values())
    noise = torch.randn(numel, generator=generator)
    delta = noise * (_typical_norm(work) / float(noise.norm()))
    n_entries = len(trail_steps(work.inner_steps, work.trail_interval))
    trail = [f"{int(torch.randint(0, 2**62, (1,), generator=generator)):064x}" for _ in range(n_entries)]
    work.recorder.start_round(work.round, work.inner_steps)
    return _cheat([contribution_for(work, work.identity, work.units, trail, delta)])


def fabricated_trail(work: RoundWork) -> list[Submission]:
    """No training: invent a delta, then a trail of states on the straight line to it that hash-match when
    served (weights interpolated, optimizer state left at the start's, schedule steps as claimed)."""
    generator = _generator(work, "fabricated-trail")
    names = list(work.base)
    base = _flat(work.base, names)
    noise = torch.randn(base.numel(), generator=generator)
    delta = noise * (_typical_norm(work) / float(noise.norm()))
    steps = trail_steps(work.inner_steps, work.trail_interval)
    work.recorder.start_round(work.round, work.inner_steps)
    template = {name: t.clone() for name, t in work.base.items()}
    for step in steps:
        weights = {name: t.clone() for name, t in template.items()}
        unflatten_into(base - delta * (step / steps[-1]), list(weights.values()))
        optimizer = {name: t.clone() for name, t in work.optimizer_state.items()}
        work.recorder.record_state(TrailState(weights, optimizer, optimizer_hash(optimizer), work.first_step + step))
    return _cheat([contribution_for(work, work.identity, work.units, work.recorder.trail, delta)])


def scaled_delta(work: RoundWork) -> list[Submission]:
    """Train honestly, then send twice the pseudo-gradient (more pull on the weights, inside the norm bound)."""
    model, trainer = _start(work)
    train_with_trail(trainer, model, work.units, work.train_cfg.batch_size, work.loader, work.inner_steps,
                     work.recorder, work.round)
    pseudo_gradient = _pseudo_gradient(work, capture_state(model, trainer).weights) * 2.0
    return _cheat([contribution_for(work, work.identity, work.units, work.recorder.trail, pseudo_gradient)])


def poisoned_delta(work: RoundWork) -> list[Submission]:
    """Train honestly, then add a large targeted change to one weight matrix (a backdoor-style push)."""
    model, trainer = _start(work)
    train_with_trail(trainer, model, work.units, work.train_cfg.batch_size, work.loader, work.inner_steps,
                     work.recorder, work.round)
    pseudo_gradient = _pseudo_gradient(work, capture_state(model, trainer).weights)
    names = list(work.base)
    target = next(i for i, name in enumerate(names) if work.base[name].ndim == 2 and "embed" not in name)
    start = sum(work.base[n].numel() for n in names[:target])
    size = work.base[names[target]].numel()
    push = torch.zeros_like(pseudo_gradient)
    push[start : start + size] = 1.0
    pseudo_gradient = pseudo_gradient + push * (5.0 * float(pseudo_gradient.norm()) / size**0.5)
    return _cheat([contribution_for(work, work.identity, work.units, work.recorder.trail, pseudo_gradient)])


def copy_delta(work: RoundWork) -> list[Submission]:
    """Copy another peer's published delta and trail under this identity, serving the victim's segments."""
    if not work.published:
        return honest(work)
    victim = work.published[0]
    record = {k: v for k, v in victim.record.items() if k not in ("signer", "signature")}
    record["work_units"] = [u.model_dump(mode="json") for u in work.units]
    signed = work.identity.sign(record)
    return [Submission(signed, victim.delta_bytes, victim.recorder, work.round, cheating=True)]


def replay_old(work: RoundWork) -> list[Submission]:
    """Resubmit this peer's own earlier delta and trail as this round's work (honest the first time)."""
    earlier = [s for s in work.history if s.round < work.round]
    if not earlier:
        return honest(work)
    old = earlier[-1]
    record = {k: v for k, v in old.record.items() if k not in ("signer", "signature")}
    # Slice hashes for this round's slicing (the roster, and so the slices, may have changed since).
    numel = sum(t.numel() for t in work.base.values())
    payload = payload_from_bytes(old.delta_bytes, numel, work.train_cfg.compression_chunk,
                                 method=work.train_cfg.compression)
    record |= {"round": work.round, "base_hash": work.base_hash, "time": work.time,
               "work_units": [u.model_dump(mode="json") for u in work.units],
               "slice_hashes": [payload_hash(payload_to_bytes(slice_payload(payload, lo, hi)))
                                for lo, hi in work.slice_bounds]}
    signed = work.identity.sign(record)
    return [Submission(signed, old.delta_bytes, old.recorder, work.round, cheating=True)]


def forged_signature(work: RoundWork) -> list[Submission]:
    """Train honestly, then inflate the claimed FLOPs after signing (the signature no longer verifies)."""
    submission = honest(work)[0]
    record = dict(submission.record)
    record["claimed_flops"] = record["claimed_flops"] * 2
    return [replace(submission, record=record, cheating=True)]


def sybil(work: RoundWork) -> list[Submission]:
    """Train once, then claim the same work under every extra identity, each with that identity's own units."""
    original = honest(work)[0]
    copies = []
    for identity, units in work.sybils:
        record = {k: v for k, v in original.record.items() if k not in ("signer", "signature")}
        record["work_units"] = [u.model_dump(mode="json") for u in units]
        copies.append(Submission(identity.sign(record), original.delta_bytes, original.recorder, work.round,
                                 cheating=True))
    return [original, *copies]


MODES: dict[str, Strategy] = {
    "honest": honest,
    "random_delta": random_delta,
    "scaled_delta": scaled_delta,
    "fewer_steps": fewer_steps,
    "half_faked": half_faked,
    "skipped_data": skipped_data,
    "substituted_data": substituted_data,
    "copy_delta": copy_delta,
    "replay_old": replay_old,
    "fabricated_trail": fabricated_trail,
    "forged_signature": forged_signature,
    "sybil": sybil,
    "poisoned_delta": poisoned_delta,
}
CHEAT_MODES = tuple(name for name in MODES if name != "honest")
