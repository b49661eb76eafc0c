"""DiLoCo's quality check: 4 workers vs one trainer with the same global batch, inner steps and data.

The workers send compressed (int8 or int4) pseudo-gradients, merged by the robust sharded aggregation (each
merged slice compressed again, as its owner serves it) and the outer SGD step;
the single trainer takes the same global batch (4 x the per-worker batch) for the same number of inner
steps on the same sequences. Held-out loss of both.

Both runs see exactly the same tokens: at inner step i of round r, worker k trains on unit i of its
assignment from `gpunite.swarm.assignment.WorkPlan`, and the baseline's batch at global step r*H + i is
the four workers' batches concatenated. The workers run one after another in this process (the wire and
the swarm are benchmarks/communication.py's job); every pseudo-gradient still goes through bytes, is parsed
back as from an untrusted peer, sliced as the sharded aggregation slices it, clipped and merged.

Prints one JSON line: value = loss_ratio = diloco_loss / baseline_loss (target <= 1.03).

Outer settings measured here (tiny preset, vocab 1024, seq_len 64, 4 workers x batch 4 vs batch 16, 96 inner
steps, int8 + trimmed mean; loss_ratio, CPU, torch 2.13):
  H=12: lr 0.7 m 0.9 (DiLoCo's defaults) 1.051 (plain mean 1.048); lr 0.7 m 0.5 1.032; lr 1.0 m 0.5 1.032;
        lr 1.0 m 0 1.031; lr 1.4 m 0 1.028 (the default here).   H=6 x 16 rounds: lr 1.0 m 0.5 1.037.
Over a handful of short rounds momentum 0.9 (a 7x steady-state amplification) overshoots and lags; a plain
outer step a little above 1 makes up for the noise that averaging small-batch workers cancels. Momentum
earns its keep over long runs with large H, as in the DiLoCo paper. Data order alone moves the baseline's
loss by ~1% (5.72 vs 5.67 with H=6), so ratios closer than that are a tie.

One-round-delayed outer step (`--overlap`, the same settings, int8, before merged slices were compressed
again; loss ratio vs the single trainer / vs synchronous DiLoCo at 1.028): delayed 1.082 / 1.053;
eager (own delta / n_workers) 1.062 / 1.033; eager_full (own delta) 1.062 / 1.033 (merged slices compressed
again). Over 8 short rounds the one-round lag costs 3-5%.

Rebased overlap (`--overlap rebase`, the swarm's train.overlap: round r starts from W_{r-1} less the worker's own
int8 delta of round r-1, and after --rebase-steps steps is carried onto W_r; outer lr unscaled), vs sync:
H=12 x 8 rounds, 2 steps: 1.005x (4 steps, exact own end `rebase_exact`: 1.004x); H=100 x 8 rounds, 16 steps:
1.002x (exact own end 0.999x, 30 steps 1.004x). Starting from W_{r-1} alone (`rebase_global`) duplicates
the progress of round r-1: 1.016x (H=12, 4 steps), 1.057x (H=100, 16 steps). `extrapolated` (W_{r-1} plus the
last outer step) did not help: 1.020x at a halved lr, 1.060x at 1.4 (H=12).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpunite.data.batches import heldout_sequences, load_sequences
from gpunite.data.prepare import prepare_dataset
from gpunite.data.shards import ShardIndex
from gpunite.manifest import ProofSection, TrainSection, parse_manifest
from gpunite.model import build_model, config_from_manifest
from gpunite.proof.trail import trail_steps
from gpunite.swarm.aggregation import clip_factors, contribution_norm, robust_aggregate, slice_bounds
from gpunite.swarm.assignment import WorkPlan
from gpunite.train.compression import (
    COMPRESSIONS,
    compress,
    decompress,
    payload_from_bytes,
    payload_to_bytes,
    slice_payload,
)
from gpunite.train.diloco import OuterOptimizer, pseudo_gradient
from gpunite.train.trainer import InnerTrainer
from gpunite.train.weights import flatten, trainable_state, unflatten_into


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--inner-steps", type=int, default=12, help="H: inner steps per round")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per worker per inner step")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=3e-3, help="inner AdamW peak lr (both runs)")
    parser.add_argument("--warmup-steps", type=int, default=10)
    # Tuned at this scale (see the module docstring): DiLoCo's 0.7 / 0.9 overshoot over 8 short rounds.
    parser.add_argument("--outer-lr", type=float, default=1.4)
    parser.add_argument("--outer-momentum", type=float, default=0.0)
    parser.add_argument("--compression", choices=COMPRESSIONS, default="int8")
    parser.add_argument(
        "--overlap", choices=("none",) + OVERLAP_MODES, default="none",
        help="also run the workers overlapped (see DilocoRun; the swarm's is rebase); adds sync_loss",
    )
    parser.add_argument("--overlap-lr-scale", type=float, default=TrainSection().overlap_lr_scale,
                        help="the overlapped run's outer lr is --outer-lr times this (train.overlap_lr_scale; "
                        "the synchronous run keeps --outer-lr)")
    parser.add_argument("--extrapolation", type=float, default=1.0,
                        help="--overlap extrapolated: round r starts from W_{r-1} + this x (W_{r-1} - W_{r-2})")
    parser.add_argument("--rebase-steps", type=int, default=10,
                        help="--overlap rebase: round r's first this many steps go on from the worker's own end "
                        "of round r-1; then the steps so far are carried onto W_r")
    parser.add_argument("--trail-interval", type=int, default=ProofSection().trail_interval,
                        help="k: the workers round their state to the trail's stored precision every k inner "
                        "steps, as swarm trainers do (0: never)")
    parser.add_argument("--compare-trail-rounding", action="store_true",
                        help="also run synchronous workers that never round (adds unrounded_loss)")
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--aggregation", choices=("trimmed_mean", "median", "mean"), default="trimmed_mean")
    parser.add_argument("--trim-fraction", type=float, default=0.2)
    parser.add_argument("--clip-ratio", type=float, default=2.0)
    parser.add_argument("--corpus-mb", type=float, default=1.5, help="built-in corpus text to prepare")
    parser.add_argument("--eval-sequences", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest on a shared 2-core machine)")
    parser.add_argument("--seed", type=int, default=1234)
    return parser.parse_args()


def prepare(workdir: Path, args: argparse.Namespace):
    manifest = parse_manifest(
        f"""
[run]
seed = {args.seed}
[data]
sources = ["builtin:python-docs"]
vocab_size = {args.vocab_size}
seq_len = {args.seq_len}
shard_tokens = 65536
max_builtin_mb = {args.corpus_mb}
prepared_dir = "{workdir / 'prepared'}"
[train]
batch_size = {args.batch_size}
inner_steps = {args.inner_steps}
lr = {args.lr}
warmup_steps = {args.warmup_steps}
outer_lr = {args.outer_lr}
outer_momentum = {args.outer_momentum}
compression = "{args.compression}"
compression_chunk = {args.chunk}
aggregation = "{args.aggregation}"
trim_fraction = {args.trim_fraction}
clip_norm_ratio = {args.clip_ratio}
""",
        "diloco_quality",
    )
    prepare_dataset(manifest, update_manifest=False)
    return manifest, ShardIndex.load(manifest.prepared_path)


def merge_round(pseudo_grads: list[torch.Tensor], args: argparse.Namespace) -> torch.Tensor:
    """The swarm's path for pseudo-gradients: compress, send, parse, slice, clip, merge, compress again."""
    numel = pseudo_grads[0].numel()
    received = []
    for pseudo_grad in pseudo_grads:
        data = payload_to_bytes(compress(pseudo_grad, args.compression, args.chunk))
        parsed = payload_from_bytes(data, numel, args.chunk, max_bytes=len(data), method=args.compression)
        received.append(parsed)
    merged = torch.empty(numel, dtype=torch.float32)
    for start, end in slice_bounds(numel, len(pseudo_grads), args.chunk):
        if start == end:
            continue
        slices = [decompress(slice_payload(payload, start, end)) for payload in received]
        factors = clip_factors([contribution_norm(s) for s in slices], args.clip_ratio)
        aggregate = robust_aggregate(slices, factors, args.aggregation, args.trim_fraction)
        # The slice's owner serves the merged slice compressed with the same method, as the peers do.
        merged[start:end] = decompress(compress(aggregate, args.compression, args.chunk))
    return merged


OVERLAP_MODES = ("delayed", "eager", "eager_full", "extrapolated", "rebase", "rebase_exact", "rebase_global")


class DilocoRun:
    """The workers and global weights of one DiLoCo run; `mode` says where each round's inner steps start.

    sync:    round r starts from the weights of r merges, W_r; its merge gives W_{r+1} = outer(W_r, merged).
    delayed: the exchange of round r-1 is still in flight when round r starts, so round r starts from the
             newest weights available, W_{r-1} (merges of rounds 0..r-2); its pseudo-gradient (base - local)
             is applied to the newest weights when it arrives: W_{r+1} = outer(W_r, merged_r), as in sync.
    eager:   as delayed, but each worker starts round r from W_{r-1} - outer_lr * own_{r-1} / n_workers, its
             own share of round r-1's merge (its own committed round-(r-1) pseudo-gradient): computed only
             from global weights and the worker's own delta, so any peer can recompute the base exactly.
    eager_full: as eager with W_{r-1} - outer_lr * own_{r-1}: the worker's own delta standing in for the
             whole merge it has not seen yet.
    rebase:  round r starts from W_{r-1} less the worker's own sent (int8) delta of round r-1 (its own end of
             that round, as a verifier rebuilds it), and after --rebase-steps steps (the merge has arrived) the
             steps so far are carried onto W_r; its pseudo-gradient is relative to W_r (the swarm's train.overlap).
    rebase_exact / rebase_global: the same from the worker's exact end of round r-1 / from W_{r-1} itself.
    """

    def __init__(self, mode: str, model_cfg, train_cfg, total_steps: int, args: argparse.Namespace,
                 outer_lr: float | None = None, trail_interval: int | None = None) -> None:
        self.mode = mode
        self.args = args
        self.trail_interval = args.trail_interval if trail_interval is None else trail_interval
        self.outer_lr = args.outer_lr if outer_lr is None else outer_lr
        self.workers = [
            InnerTrainer(build_model(model_cfg, seed=args.seed), train_cfg, total_steps=total_steps)
            for _ in range(args.workers)
        ]
        # history[k] = global weights after k merges.
        self.history = [flatten(trainable_state(self.workers[0].model).values())]
        self.outer = OuterOptimizer(self.outer_lr, args.outer_momentum, nesterov=True)
        self.own_pseudo_grads: list[torch.Tensor | None] = [None] * args.workers

    def base_for(self, round_: int, worker: int) -> torch.Tensor:
        if self.mode == "sync":
            return self.history[round_]
        newest = self.history[max(round_ - 1, 0)]
        if self.mode == "extrapolated":
            if round_ < 2:
                return newest
            step = torch.sub(newest, self.history[round_ - 2])
            return torch.add(newest, torch.mul(step, torch.tensor(self.args.extrapolation, dtype=torch.float32)))
        own = self.own_pseudo_grads[worker]
        if self.mode == "delayed" or own is None or round_ == 0:
            return newest
        share = 1 if self.mode == "eager_full" else self.args.workers
        lr = torch.tensor(self.outer_lr / share, dtype=torch.float32)
        return torch.sub(newest, torch.mul(own, lr))

    def train_round(self, round_: int, batches_per_worker: list[list[torch.Tensor]]) -> None:
        pseudo_grads = []
        rebasing = self.mode.startswith("rebase")
        rebase_at = self.args.rebase_steps if rebasing and round_ > 0 else None
        for k, (worker, batches) in enumerate(zip(self.workers, batches_per_worker)):
            base = self.history[round_] if rebasing else self.base_for(round_, k)
            params = list(trainable_state(worker.model).values())
            if rebase_at is None:
                unflatten_into(base, params)
            elif self.mode == "rebase_global":  # from the newest global weights until the merge arrives
                own_end = self.history[round_ - 1]
                unflatten_into(own_end, params)
            elif self.mode == "rebase_exact":  # go on from this worker's own end of the round before
                own_end = flatten(params).clone()
            else:  # from the newest global weights less this worker's own committed delta (what a peer can
                # rebuild and verify: `Contribution.start_contribution`): its end of the round before, to int8
                own_end = torch.sub(self.history[round_ - 1], self.own_sent[k])
                unflatten_into(own_end, params)
            # At every trail step a swarm trainer rounds its state to what the trail stores (TrailRecorder.record)
            rounded_at = set(trail_steps(len(batches), self.trail_interval)) if self.trail_interval else set()
            start = {name: t.clone() for name, t in trainable_state(worker.model).items()}
            for step, batch in enumerate(batches):
                if step == rebase_at:  # the merge is here: carry the steps since onto the new global weights
                    unflatten_into(torch.add(base, torch.sub(flatten(params), own_end)), params)
                if step in rounded_at:
                    worker.round_to_trail_precision(start)
                worker.train_step(batch)
            if len(batches) in rounded_at:
                worker.round_to_trail_precision(start)
            pseudo_grads.append(pseudo_gradient(base, flatten(params)))
        self.own_pseudo_grads = pseudo_grads
        self.own_sent = [decompress(compress(g, self.args.compression, self.args.chunk)) for g in pseudo_grads]
        self.history.append(self.outer.step(self.history[round_], merge_round(pseudo_grads, self.args)))

    def evaluate(self, eval_batches: list[torch.Tensor]) -> float:
        """Held-out loss of the final global weights (every round merged, the last in-flight one included)."""
        unflatten_into(self.history[-1], list(trainable_state(self.workers[0].model).values()))
        return self.workers[0].evaluate(eval_batches)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpunite-diloco-") as tmp:
        workdir = Path(tmp)
        manifest, index = prepare(workdir, args)
        prepared = manifest.prepared_path
        model_cfg = config_from_manifest(manifest)
        train_cfg = manifest.train
        total_steps = args.rounds * args.inner_steps
        seq_len = args.seq_len

        baseline = InnerTrainer(build_model(model_cfg, seed=args.seed), train_cfg, total_steps=total_steps)
        modes = ["sync"] + ([] if args.overlap == "none" else [args.overlap])
        runs = {mode: DilocoRun(mode, model_cfg, train_cfg, total_steps, args,
                                outer_lr=args.outer_lr * args.overlap_lr_scale if mode != "sync" else None)
                for mode in modes}
        if args.compare_trail_rounding:
            runs["unrounded"] = DilocoRun("sync", model_cfg, train_cfg, total_steps, args, trail_interval=0)
        plan = WorkPlan.from_index(index, seq_len, seed=args.seed, sequences_per_unit=args.batch_size)
        roster = [(f"worker-{k}", 1.0) for k in range(args.workers)]

        for round_ in range(args.rounds):
            assigned = plan.assign(round_, roster, args.inner_steps)
            batches = {
                peer: [load_sequences(prepared, index, u.shard, u.first, u.count, seq_len) for u in units]
                for peer, units in assigned.items()
            }
            peers = sorted(batches)
            if any(len(batches[p]) != args.inner_steps for p in peers):
                sys.exit("the prepared corpus is too small for this many steps; raise --corpus-mb")
            for step in range(args.inner_steps):
                baseline.train_step(torch.cat([batches[p][step] for p in peers]))
            for run in runs.values():
                run.train_round(round_, [batches[p] for p in peers])
            plan.settle(round_, peers)

        heldout = heldout_sequences(prepared, index, seq_len, args.eval_sequences)
        eval_batches = list(heldout.split(32))
        baseline_loss = baseline.evaluate(eval_batches)
        losses = {mode: run.evaluate(eval_batches) for mode, run in runs.items()}

    diloco_loss = losses[modes[-1]]
    ratio = diloco_loss / baseline_loss
    overlap_fields = {} if args.overlap == "none" else {
        "sync_loss": round(losses["sync"], 4),
        "sync_loss_ratio": round(losses["sync"] / baseline_loss, 4),
        "loss_ratio_vs_sync": round(diloco_loss / losses["sync"], 4),
        "overlap_outer_lr": runs[modes[-1]].outer_lr,
    }
    rounding_fields = {} if "unrounded" not in losses else {
        "unrounded_loss": round(losses["unrounded"], 4),
        "rounded_vs_unrounded": round(losses["sync"] / losses["unrounded"], 4),
    }
    print(json.dumps({
        "name": "diloco_quality",
        "value": round(ratio, 4),
        "unit": "held-out loss ratio (DiLoCo / single trainer with the same global batch)",
        "diloco_loss": round(diloco_loss, 4),
        "baseline_loss": round(baseline_loss, 4),
        "loss_ratio": round(ratio, 4),
        "overlap": args.overlap,
        **overlap_fields,
        "trail_interval": args.trail_interval,
        **rounding_fields,
        "inner_steps": total_steps,
        "inner_steps_per_round": args.inner_steps,
        "rounds": args.rounds,
        "workers": args.workers,
        "per_worker_batch": args.batch_size,
        "baseline_batch": args.batch_size * args.workers,
        "seq_len": seq_len,
        "tokens_per_run": total_steps * args.batch_size * args.workers * seq_len,
        "outer_lr": args.outer_lr,
        "outer_momentum": args.outer_momentum,
        "compression": args.compression,
        "aggregation": args.aggregation,
        "model": f"tiny preset, vocab {model_cfg.vocab_size}",
        "eval_sequences": int(heldout.shape[0]),
        "seconds": round(time.perf_counter() - started, 1),
    }))


if __name__ == "__main__":
    main()
