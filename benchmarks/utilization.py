"""Benchmark: share of each peer's wall time spent computing (inner steps) rather than waiting, 4 peers.

A real local swarm (peer processes on 127.0.0.1, one torch thread each) trains the tiny preset for several
rounds. Each peer times its own inner steps and pseudo-gradient compression (`compute_s` in its status
file) against its wall time; the window is steady state, from the end of round `--warmup-rounds` to the end
of the last round, so process start-up and joining are excluded. compute_utilization is the mean over
peers of compute_s / wall_s in that window; the worst peer is reported too.

Baseline in the same run: the same peers' utilization if the exchange cost nothing, which is 1.0 by
definition; what is measured below it is time spent committing, waiting for the round close, aggregating
and fetching slices, and waiting for the slowest peer of the round.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def manifest_text(inner_steps: int) -> str:
    return "\n".join([
        "[run]", 'name = "bench-utilization"', "[model]", 'preset = "tiny"', "[data]",
        'sources = ["builtin:python-docs"]', "max_builtin_mb = 1.0", "seq_len = 64", "[train]",
        f"inner_steps = {inner_steps}", "batch_size = 8", "warmup_steps = 4", "round_deadline_s = 1800",
        "[proof]", f"trail_interval = {inner_steps}",
    ]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds after the warm-up")
    parser.add_argument("--warmup-rounds", type=int, default=1, help="rounds left out of the window (>= 1)")
    parser.add_argument("--inner-steps", type=int, default=30)
    args = parser.parse_args()

    from gpunite.data.prepare import prepare_dataset
    from gpunite.manifest import load_manifest
    from gpunite.swarm.demo import LocalSwarm, round_log

    with tempfile.TemporaryDirectory(prefix="gpunite-bench-util-") as tmp:
        workdir = Path(tmp)
        manifest_path = workdir / "run.toml"
        manifest_path.write_text(manifest_text(args.inner_steps))
        prepare_dataset(load_manifest(manifest_path))
        names = [f"peer{i}" for i in range(1, args.peers + 1)]
        total_rounds = args.warmup_rounds + args.rounds
        started = time.time()
        with LocalSwarm(workdir, manifest_path) as swarm:
            swarm.start_first("peer1", wait_peers=args.peers, rounds=total_rounds, extra=["--speed", "1"])
            address = swarm.address()
            for name in names[1:]:
                swarm.join(name, address, rounds=total_rounds, extra=["--speed", "1"])
            swarm.wait_exit(7200)
            logs = {name: round_log(swarm.peers[name].home) for name in names}
        first_round, last_round = args.warmup_rounds - 1, total_rounds - 1
        per_peer = {}
        for name in names:
            compute = logs[name][last_round]["compute_s"] - logs[name][first_round]["compute_s"]
            wall = logs[name][last_round]["wall_s"] - logs[name][first_round]["wall_s"]
            per_peer[name] = round(compute / wall, 4)
        values = list(per_peer.values())
        result = {
            "name": "utilization",
            "value": round(sum(values) / len(values), 4),
            "unit": "fraction of wall time in inner steps",
            "compute_utilization": round(sum(values) / len(values), 4),
            "worst_peer_utilization": min(values),
            "baseline_utilization": 1.0,
            "per_peer": per_peer,
            "peers": args.peers,
            "rounds": args.rounds,
            "inner_steps": args.inner_steps,
            "cpu_cores": os.cpu_count(),
            "torch_threads_per_peer": 1,
            "overlap": False,
            "wall_s": round(time.time() - started, 1),
        }
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
