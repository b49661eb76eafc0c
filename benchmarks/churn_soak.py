"""Benchmark: churn soak; peers killed and restarted at random (the first one too), links cut and restored.

A real local swarm (`--peers` processes on 127.0.0.1, one torch thread each, audits on) trains a tiny model.
Once every peer has merged a round, a seeded schedule (`gpunite.swarm.churn.churn_schedule`) runs for
`--minutes`: one peer at a time is either killed with SIGKILL and restarted with the same home through
`gpunite join` after a few seconds, or frozen with SIGSTOP for a few seconds and resumed (on loopback this
stands in for a link cut: it neither sends nor answers). The first event always kills the first peer; an
event also waits (at most 5 minutes) until the previous one's peer is back in step, so on a loaded machine,
where a restart takes minutes, fewer events fit in the same minutes.
Nothing happens in the last 90 s, then the soak waits (bounded) until every peer is back in step, stops them
all and reads their records. It always kills every process it started, on errors and Ctrl-C too.

Figures (definitions in gpunite/swarm/churn.py): rounds_completed_ratio (target >= 0.99) = rounds with an
agreed block that merged work / rounds that opened and were due; verified_work_lost (target 0) = accepted
contributions that did not fully reach the agreed weights, plus verified rounds that vanished from a
restarted peer's chain; hash_agreement (true) = every peer holds the final round with the same block and no
round had two blocks. Side by side in the same run: round time with no event in progress vs during events.

Short setting (the benchmark): --minutes 5, --peers 4. Long setting (the soak the issue names):
    python benchmarks/churn_soak.py --minutes 30 --peers 4 --seed 1
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

ROUND_DEADLINE_S = 90.0


def manifest_text(seed: int) -> str:
    return "\n".join([
        "[run]", 'name = "bench-churn-soak"', f"seed = {seed}",
        "[model]", 'preset = "tiny"', "hidden_size = 64", "n_layers = 2", "n_heads = 2",
        "intermediate_size = 128",
        "[data]", 'sources = ["builtin:python-docs"]', "vocab_size = 512", "seq_len = 32",
        "shard_tokens = 16384", "max_builtin_mb = 0.3",
        "[train]", "batch_size = 4", "inner_steps = 8", "warmup_steps = 2", "total_steps = 100000",
        f"round_deadline_s = {ROUND_DEADLINE_S}", "compression_chunk = 256",
        "[proof]", "trail_interval = 4",
    ]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="churn phase length (long setting: 30)")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1, help="seeds the schedule of kills and cuts")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the peers' homes and logs here")
    args = parser.parse_args()
    if args.peers < 3:
        parser.error("--peers must be >= 3: one peer is out at a time while a majority holds the state")

    from gpunite.data.prepare import prepare_dataset
    from gpunite.manifest import load_manifest
    from gpunite.swarm.churn import ChurnDriver, analyze, churn_schedule, outcome_rows
    from gpunite.swarm.demo import LocalSwarm

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="gpunite-bench-churn-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        manifest_path = workdir / "run.toml"
        manifest_path.write_text(manifest_text(args.seed))
        prepare_dataset(load_manifest(manifest_path))
        names = [f"peer{i}" for i in range(1, args.peers + 1)]
        duration_s = args.minutes * 60.0
        schedule = churn_schedule(args.seed, names, duration_s)
        extra = ["--speed", "1"]
        with LocalSwarm(workdir, manifest_path, heartbeat_s=1.0) as swarm:
            swarm.start_first("peer1", wait_peers=args.peers, extra=extra)
            address = swarm.address()
            for name in names[1:]:
                swarm.join(name, address, extra=extra)
            swarm.wait_for(lambda s: len(s) == len(names) and all(x.get("rounds_done", 0) >= 1
                                                                    for x in s.values()),
                           600, "every peer to merge its first round")
            warmup_s = time.time() - started
            driver = ChurnDriver(swarm, schedule, peer_extra=extra)
            soak_started = time.time()
            driver.run(duration_s, started=soak_started)
            in_step = driver.wait_all_in_step(timeout_s=240)
            stopped_at = time.time()
            swarm.stop_all()
            homes = {name: peer.home for name, peer in swarm.peers.items()}
            logs = {name: peer.log_path.read_text(errors="replace") for name, peer in swarm.peers.items()}
            figures = analyze(homes, logs, driver.outcomes, ROUND_DEADLINE_S, stopped_at)
            events = outcome_rows(driver.outcomes)
            crashes = [{k: v for k, v in c.items() if k != "log_tail"} for c in driver.crashes]
            crash_tails = [c["log_tail"][-600:] for c in driver.crashes]

    result = {
        "name": "churn_soak",
        "value": figures["rounds_completed_ratio"],
        "unit": "rounds completed / rounds attempted",
        **figures,
        "all_in_step_at_end": in_step,
        "kills": sum(1 for e in events if e["kind"] == "kill"),
        "cuts": sum(1 for e in events if e["kind"] == "cut"),
        "events": events,
        "unplanned_crashes": crashes,
        "crash_log_tails": crash_tails,
        "peers": args.peers,
        "minutes": args.minutes,
        "seed": args.seed,
        "warmup_s": round(warmup_s, 1),
        "wall_s": round(time.time() - started, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "link_cut": "SIGSTOP/SIGCONT of the peer's process group (loopback stand-in for a cut link)",
    }
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
