"""Benchmark: what proof of training costs in CPU time, trainer and verifiers together, for each trail interval k.

A trail entry every k inner steps costs the trainer a fixed amount of work per entry, however long the steps
are: its state rounded to what the entry stores (`InnerTrainer.round_to_trail_precision`), copied, written and
hashed (the writer thread's share included here). An audit costs a verifier `proof.segments_per_audit` replays
of k steps each, plus parsing and checking the served states. So the trainer's cost falls as 1/k and the
verifiers' grows as k; this script measures both on the real code, one process, one torch thread, and reports
the k with the lowest sum beside the manifest's default k and a baseline k (`--baseline-interval`).

Per k, on the tiny preset at the manifest's defaults (batch, seq_len, H; `--seq-len` etc. to change them),
from the same trained start (AdamW state already warm):
- trainer_overhead: CPU seconds of the trail's own work in a round of H steps (the recording calls on the
  training thread, and the writer's and hasher's tasks on theirs) over the CPU seconds of the same H steps
  without a trail; `trainer_overhead_process` is the same seen from outside (the process's CPU seconds with
  the trail over those without, minus 1: it also holds what the trail's memory traffic costs the steps, and
  the noise of two long timings, up to a tenth on a shared 2-core machine);
- verifier_overhead: audit_fraction x segments_per_audit x the CPU seconds of one segment's audit (the
  trainer serving its stored bytes, the verifier parsing them, replaying k steps and checking:
  `gpunite.proof.audit.audit_segment`, averaged over segments spread through the round) over the CPU
  seconds of the H steps without a trail;
- total_overhead: their sum (what a swarm in which every peer trains and verifies pays per trained step).
The per-audit work that does not depend on k (the final weights, the delta check, the held-out loss) is left
out of all k alike. `value` is the total at the manifest's default k; the baseline, measured in the same run,
is the total at `--baseline-interval` (2, the default before). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch


def cpu_seconds(work) -> float:
    """Process CPU time (all threads) of work()."""
    started = time.process_time()
    work()
    return time.process_time() - started


class ThreadCpu:
    """CPU seconds spent inside wrapped functions, summed over the threads that run them (the trail's writer
    and hashing threads, the training thread's recording calls)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._lock = threading.Lock()

    def wrap(self, function):
        def timed(*args, **kwargs):
            started = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                with self._lock:
                    self.seconds += time.thread_time() - started
        return timed


def main() -> None:
    from gpunite.manifest import DataSection, ProofSection, TrainSection

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intervals", default="1,2,3,4,5,6,8,10", help="trail intervals k to measure")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq-len", type=int, default=DataSection().seq_len)
    parser.add_argument("--batch-size", type=int, default=TrainSection().batch_size)
    parser.add_argument("--inner-steps", type=int, default=TrainSection().inner_steps)
    parser.add_argument("--audited-segments", type=int, default=6, help="segments audited per k (averaged)")
    parser.add_argument("--baseline-interval", type=int, default=2,
                        help="the k to compare the default with (2: the default before this benchmark chose 4)")
    args = parser.parse_args()

    from gpunite.model import PRESETS, build_model
    from gpunite.proof import trail as trail_module
    from gpunite.proof.audit import audit_segment
    from gpunite.proof.trail import TrailRecorder, segment_from_bytes, trail_steps
    from gpunite.records import Contribution
    from gpunite.train.trainer import InnerTrainer
    from gpunite.train.weights import trainable_state, weights_hash

    torch.set_num_threads(1)
    proof = ProofSection()
    train_cfg = TrainSection(batch_size=args.batch_size, inner_steps=args.inner_steps)
    vocab = DataSection().vocab_size
    config = replace(PRESETS[args.preset], vocab_size=vocab)
    config = replace(config, max_seq_len=max(config.max_seq_len, args.seq_len))
    intervals = sorted({int(k) for k in args.intervals.split(",")} | {proof.trail_interval, args.baseline_interval})
    H, B = args.inner_steps, args.batch_size
    warm_steps = 3
    total_steps = warm_steps + H
    generator = torch.Generator().manual_seed(0)
    sequences = torch.randint(0, vocab, ((warm_steps + H) * B, args.seq_len + 1), generator=generator)
    batches = list(sequences.split(B))

    # The common start: a few steps taken, so AdamW's moments exist, as in every round after a run's first.
    model = build_model(config, seed=0)
    trainer = InnerTrainer(model, train_cfg, total_steps=total_steps)
    for batch in batches[:warm_steps]:
        trainer.train_step(batch)
    start_weights = {name: t.clone() for name, t in trainable_state(model).items()}
    start_optimizer = trainer.optimizer_state_tensors()

    def fresh() -> tuple[torch.nn.Module, InnerTrainer]:
        from gpunite.train.checkpoint import load_model_state

        fresh_model = build_model(config, seed=0)
        load_model_state(fresh_model, start_weights)
        fresh_trainer = InnerTrainer(fresh_model, train_cfg, total_steps=total_steps, step=warm_steps)
        fresh_trainer.load_optimizer_state_tensors(start_optimizer)
        return fresh_model, fresh_trainer

    def plain_round() -> float:
        _, plain = fresh()
        return cpu_seconds(lambda: [plain.train_step(batch) for batch in batches[warm_steps:]])

    # The trail's own work, wherever it runs: the recording calls on the training thread and the writer's
    # and hasher's tasks (module functions the recorder submits by name, so wrapping them here counts them).
    proof_cpu = ThreadCpu()
    for name in ("_store_tensors", "_write_base", "_hash_when_written"):
        setattr(trail_module, name, proof_cpu.wrap(getattr(trail_module, name)))

    def recorded_round(recorder: TrailRecorder) -> None:
        model, trainer = fresh()
        record = proof_cpu.wrap(recorder.record)
        recorder.start_round(0, H)
        record(model, trainer)
        for batch in batches[warm_steps:]:
            trainer.train_step(batch)
            record(model, trainer)
        recorder.flush()

    def audit(recorder: TrailRecorder, contribution: Contribution, index: int) -> bool:
        """One segment's audit from the trainer's stored bytes; True if it accepted bit-exactly."""
        steps = trail_steps(H, contribution.trail_interval)
        segment = segment_from_bytes(recorder.segment_payload(0, index, with_end=False), start_weights)
        result = audit_segment(contribution, segment, batches[warm_steps + steps[index]: warm_steps + steps[index + 1]],
                               config, train_cfg, total_steps=total_steps, expected_first_step=warm_steps,
                               base=start_weights)
        return result.accept and result.details.get("bit_exact") == 1.0

    baselines = [plain_round()]
    results = {}
    with tempfile.TemporaryDirectory(prefix="gpunite-bench-proof-cost-") as tmp:
        for k in intervals:
            recorder = TrailRecorder(k, Path(tmp) / f"k{k}")
            proof_cpu.seconds = 0.0
            trail_cpu = cpu_seconds(partial(recorded_round, recorder))
            direct_cpu = proof_cpu.seconds
            baselines.append(plain_round())  # interleaved: drift in the machine's speed hits both alike
            trail = recorder.trail
            contribution = Contribution(
                run_id="0" * 64, round=0, base_hash=weights_hash(start_weights), work_units=[], inner_steps=H,
                tokens=H * B * args.seq_len, trail_interval=k, trail=trail, delta_hash="0" * 64, delta_norm=0.0,
                claimed_flops=0.0, time=0.0)
            segments = len(trail) - 1
            chosen = sorted({round(i * (segments - 1) / max(1, args.audited_segments - 1))
                             for i in range(min(args.audited_segments, segments))})
            audit_cpu, exact = [], []
            for index in chosen:
                started = time.process_time()
                exact.append(audit(recorder, contribution, index))
                audit_cpu.append(time.process_time() - started)
            results[k] = {"trail_cpu_s": trail_cpu, "direct_cpu_s": direct_cpu,
                          "audit_cpu_s": statistics.mean(audit_cpu), "entries": len(trail),
                          "rejected": exact.count(False)}
            recorder.prune(1)
            print(f"k={k}: round with trail {trail_cpu:.1f} s CPU, of it in trail work {direct_cpu:.2f} s; audit of "
                  f"one segment {statistics.mean(audit_cpu):.2f} s", file=sys.stderr)

    plain_cpu = statistics.median(baselines)
    per_k = {}
    for k, r in results.items():
        trainer_overhead = r["direct_cpu_s"] / plain_cpu
        verifier_overhead = proof.audit_fraction * proof.segments_per_audit * r["audit_cpu_s"] / plain_cpu
        per_k[k] = {"trainer_overhead": round(trainer_overhead, 4), "verifier_overhead": round(verifier_overhead, 4),
                    "total_overhead": round(trainer_overhead + verifier_overhead, 4),
                    "trainer_overhead_process": round(r["trail_cpu_s"] / plain_cpu - 1, 4),
                    "entries_per_round": r["entries"], "audit_segment_cpu_s": round(r["audit_cpu_s"], 3),
                    "honest_audits_rejected_or_inexact": r["rejected"]}
    best = min(per_k, key=lambda k: per_k[k]["total_overhead"])
    default, baseline = proof.trail_interval, args.baseline_interval
    sys.stdout.write(json.dumps({
        "name": "proof_cost",
        "value": per_k[default]["total_overhead"],
        "unit": "CPU seconds of proof work per CPU second of training (trainer + verifiers)",
        "trail_interval": default,
        "total_overhead": per_k[default]["total_overhead"],
        "baseline_trail_interval": baseline,
        "baseline_total_overhead": per_k[baseline]["total_overhead"],
        "best_trail_interval": best,
        "best_total_overhead": per_k[best]["total_overhead"],
        "per_k": per_k,
        "plain_round_cpu_s": round(plain_cpu, 2),
        "plain_round_cpu_s_spread": [round(min(baselines), 2), round(max(baselines), 2)],
        "preset": args.preset, "seq_len": args.seq_len, "batch_size": B, "inner_steps": H,
        "audit_fraction": proof.audit_fraction, "segments_per_audit": proof.segments_per_audit,
        "torch_threads": 1, "cpu_cores": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
    }) + "\n")


if __name__ == "__main__":
    main()
