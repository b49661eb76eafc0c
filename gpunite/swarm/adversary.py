"""A swarm peer playing one of the proof layer's cheats (`gpunite join --adversary MODE`, demos and tests only).

The strategy (`gpunite.proof.adversary.MODES`) gets the same round an honest peer trains and writes its
trail into the peer's own TrailRecorder, so the peer serves the cheater's trail segments to verifiers
exactly as an honest peer serves its own; the peer publishes the contribution and serves its delta slices.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from gpunite.records import Contribution, WorkUnit, parse_record

if TYPE_CHECKING:  # importing them here would load torch for the CLI's option checks
    from gpunite.swarm.checks import RoundContext
    from gpunite.swarm.peer import Peer

# The strategies that fit a running peer: one identity, its own assigned units, nothing of others' needed.
SWARM_ADVERSARIES = ("random_delta", "scaled_delta", "fewer_steps", "half_faked", "skipped_data",
                     "fabricated_trail", "poisoned_delta")


def adversary_contribution(peer: Peer, mode: str, ctx: RoundContext, units: list[WorkUnit],
                           bounds: list[tuple[int, int]]) -> tuple[Contribution, list[bytes]]:
    """Run the cheat on the peer's round: its signed contribution and the compressed delta's slices."""
    from gpunite.proof.adversary import MODES, RoundWork
    from gpunite.train.compression import payload_from_bytes, payload_to_bytes, slice_payload

    cfg = peer.train_cfg
    work = RoundWork(
        run_id=peer.run_id, round=ctx.round,
        base={name: t.clone() for name, t in peer.layout.named(peer.state.weights).items()}, units=units,
        model_config=peer.model_config, train_cfg=cfg, seq_len=ctx.seq_len, trail_interval=ctx.trail_interval,
        first_step=peer.trainer.step, total_steps=peer.trainer.total_steps, loader=peer._load_sequences,
        identity=peer.identity, recorder=peer.recorder, slice_bounds=bounds, time=time.time(),
        optimizer_state=peer.trainer.optimizer_state_tensors())
    submission = next(s for s in MODES[mode](work) if s.cheating)
    record = parse_record(submission.record)
    if not isinstance(record, Contribution):
        raise TypeError(f"adversary {mode} produced a {record.kind} record")
    method = "none" if cfg.compression == "none" else "int8"
    payload = payload_from_bytes(submission.delta_bytes, peer.numel, cfg.compression_chunk, method=method)
    return record, [payload_to_bytes(slice_payload(payload, start, end)) for start, end in bounds]
