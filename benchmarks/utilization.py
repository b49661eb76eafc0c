"""Benchmark: share of each peer's wall time spent computing (inner steps) rather than waiting, 4 peers.

A real local swarm (peer processes on 127.0.0.1, one torch thread each) trains the tiny preset for several
rounds of H inner steps (the manifest default, train.inner_steps, unless `--inner-steps`). Each peer times
its own inner steps and pseudo-gradient compression (`compute_s` in its status file) against its wall time;
the window is steady state: from the end of round `--warmup-rounds` - 1 to the
end of the last measured round, so process start-up and joining are left out, and so is one more round run
after the window, the run's last: with overlap, every round's exchange runs beside the next round's inner
steps, except the last one's, which has no next round (a shutdown cost, paid once per run, like start-up).
compute_utilization is the mean over peers of compute_s / wall_s in that window; the worst peer is reported
too.

Baselines in the same run: 1.0 (the exchange costing nothing), and by default the same swarm with
train.overlap off (each round's exchange after its steps), so the overlap's gain is measured side by side.
What is missing below 1.0 is time spent recording the trail, committing, auditing, waiting for the round
close, aggregating and fetching slices, and waiting for the slowest peer of the round; `time_shares` splits
it (mean over peers, `gpunite.swarm.demo.time_shares`): inner steps, trail recording on the training thread,
the rest of training a round (data, commit, publish) and waiting (not training at all).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

BATCH, SEQ_LEN = 8, 64
TOKENS_PER_MB = 250_000  # the built-in corpus under the tiny preset's 4096-token vocabulary (~254k per MB)


def corpus_mb(peers: int, rounds: int, inner_steps: int) -> float:
    """Enough built-in text that no round of the run runs out of data (half again for the held-out split and
    the uneven ends of shards): a round that trains fewer steps would leave its peers idle in the window."""
    tokens = peers * rounds * inner_steps * BATCH * (SEQ_LEN + 1)
    return round(max(1.0, 1.5 * tokens / TOKENS_PER_MB), 1)


def manifest_text(inner_steps: int, overlap: bool, trail_interval: int | None, corpus: float = 1.0) -> str:
    lines = [
        "[run]", 'name = "bench-utilization"', "[model]", 'preset = "tiny"', "[data]",
        'sources = ["builtin:python-docs"]', f"max_builtin_mb = {corpus}", f"seq_len = {SEQ_LEN}", "[train]",
        f"inner_steps = {inner_steps}", f"batch_size = {BATCH}", "warmup_steps = 4", "round_deadline_s = 1800",
        f"overlap = {'true' if overlap else 'false'}", "[proof]",
    ]
    if trail_interval is not None:
        lines.append(f"trail_interval = {trail_interval}")
    return "\n".join(lines) + "\n"


def measure(workdir: Path, peers: int, rounds: int, warmup_rounds: int, inner_steps: int, overlap: bool,
            trail_interval: int | None) -> dict:
    """One real local swarm; per-peer compute_s / wall_s over the steady-state window."""
    from gpunite.data.prepare import prepare_dataset
    from gpunite.manifest import load_manifest
    from gpunite.swarm.demo import LocalSwarm, round_log, time_shares

    workdir.mkdir(parents=True)
    manifest_path = workdir / "run.toml"
    names = [f"peer{i}" for i in range(1, peers + 1)]
    total_rounds = warmup_rounds + rounds + 1  # the last one is run after the window (see the docstring)
    manifest_path.write_text(manifest_text(inner_steps, overlap, trail_interval,
                                           corpus_mb(peers, total_rounds, inner_steps)))
    prepare_dataset(load_manifest(manifest_path))
    started = time.time()
    with LocalSwarm(workdir, manifest_path) as swarm:
        swarm.start_first("peer1", wait_peers=peers, rounds=total_rounds, extra=["--speed", "1"])
        address = swarm.address()
        for name in names[1:]:
            swarm.join(name, address, rounds=total_rounds, extra=["--speed", "1"])
        swarm.wait_exit(7200)
        logs = {name: round_log(swarm.peers[name].home) for name in names}
    first_round, last_round = warmup_rounds - 1, total_rounds - 2
    shares = {name: time_shares(logs[name], first_round, last_round) for name in names}
    per_peer = {name: shares[name]["compute"] for name in names}
    values = list(per_peer.values())
    round_s = (logs["peer1"][last_round]["time"] - logs["peer1"][first_round]["time"]) / rounds
    merged = [logs["peer1"][r]["merged"] for r in range(first_round + 1, last_round + 1)]
    mean_shares = {key: round(sum(shares[n][key] for n in names) / len(names), 4) for key in shares[names[0]]}
    return {"mean": round(sum(values) / len(values), 4), "worst": min(values), "per_peer": per_peer,
            "time_shares": mean_shares,
            "round_s": round(round_s, 2), "merged_per_round": merged, "wall_s": round(time.time() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds after the warm-up")
    parser.add_argument("--warmup-rounds", type=int, default=1, help="rounds left out of the window (>= 1)")
    parser.add_argument("--inner-steps", type=int, default=None,
                        help="H (default: the manifest default, train.inner_steps); a smaller H is a harder test: "
                        "the round's close, which overlap hides behind the next round's steps, stays as long")
    parser.add_argument("--trail-interval", type=int, default=None,
                        help="proof.trail_interval (default: the manifest's default)")
    parser.add_argument("--overlap", choices=["on", "off", "both"], default="both",
                        help="measure with train.overlap on, off, or both side by side (default)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="run the swarms in this new folder and keep it (peers' logs), not in a temporary one")
    args = parser.parse_args()

    if args.inner_steps is None:
        from gpunite.manifest import TrainSection

        args.inner_steps = TrainSection().inner_steps
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.overlap]
    results = {}
    if args.keep is not None:
        args.keep.mkdir(parents=True)
    place = contextlib.nullcontext(str(args.keep)) if args.keep else tempfile.TemporaryDirectory(
        prefix="gpunite-bench-util-")
    with place as tmp:
        for overlap in modes:
            results[overlap] = measure(Path(tmp) / ("overlap" if overlap else "sync"), args.peers, args.rounds,
                                       args.warmup_rounds, args.inner_steps, overlap, args.trail_interval)
    main_result = results[modes[0]]
    result = {
        "name": "utilization",
        "value": main_result["mean"],
        "unit": "fraction of wall time in inner steps",
        "compute_utilization": main_result["mean"],
        "worst_peer_utilization": main_result["worst"],
        "per_peer": main_result["per_peer"],
        "overlap": modes[0],
        "round_s": main_result["round_s"],
        "merged_per_round": main_result["merged_per_round"],
        "time_shares": main_result["time_shares"],
        "baseline_utilization": 1.0,
        "peers": args.peers,
        "rounds": args.rounds,
        "inner_steps": args.inner_steps,
        "trail_interval": args.trail_interval,
        "cpu_cores": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "torch_threads_per_peer": 1,
        "wall_s": round(sum(r["wall_s"] for r in results.values()), 1),
    }
    if False in results and modes[0] is True:
        result["no_overlap_utilization"] = results[False]["mean"]
        result["no_overlap_worst_peer"] = results[False]["worst"]
        result["no_overlap_round_s"] = results[False]["round_s"]
        result["no_overlap_merged_per_round"] = results[False]["merged_per_round"]
        result["no_overlap_time_shares"] = results[False]["time_shares"]
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
