"""Benchmark: compute utilization and quality of a swarm on emulated home links, overlap on vs off.

Two real swarms of `--peers` peer processes (default 8), each peer in its own network namespace of the WAN
test bed (`gpunite.sim.netbed`: tc rate limits and a delaying relay; the `home` profile is 100 Mbit down,
20 Mbit up, 50 ms one way), train the tiny preset for the same rounds on the same data: once with
`train.overlap = true` (round r + 1's inner steps run while round r's exchange and audits are in flight)
and once with it off (the synchronous baseline: the exchange after the steps).

Figures, each over the steady-state window (after the warm-up rounds, so start-up and joining are left
out, and before the run's last round, which is run after the window: its exchange has no next round to
overlap, a shutdown cost paid once per run):
- compute_utilization: mean over peers of inner-step time / wall time (target >= 0.95, goal 0.97), and
  `no_overlap_utilization` for the synchronous run;
- loss_ratio: held-out loss of the overlapped run's final global weights / the synchronous run's (<= 1.03);
- bytes_per_peer_per_round: bytes each peer sent per round, counted by its own node (the wire, DHT included);
- false_departures: "peer X left" lines in all peers' logs over the whole run (nobody leaves, so each is a
  live peer taken for gone), and slices_merged_elsewhere: slices merged by a peer other than their owner.

Needs root (network namespaces); on a 2-core machine 8 peers share the CPU, so each inner step is slow and
the exchange is small next to it, as on a real volunteer swarm with big rounds. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

# Nobody leaves these runs: every "peer X left" a peer logs is a live peer taken for gone, and every slice
# merged by a peer other than its owner is work done twice because of it (or of a stalled owner).
DEPARTED = re.compile(r"peer \w+ left")
MERGED_HERE = re.compile(r"owner of slice \d+ of round \d+ is gone or sent a bad slice")

MANIFEST = """
[run]
name = "bench-wan-utilization"
seed = 7
[model]
preset = "tiny"
[data]
sources = ["builtin:python-docs"]
vocab_size = 2048
seq_len = 64
shard_tokens = 65536
max_builtin_mb = {corpus}
[train]
batch_size = 8
inner_steps = {inner_steps}
warmup_steps = 4
round_deadline_s = 1800
overlap = {overlap}
"""


def run_swarm(workdir: Path, peers: int, profile: str, rounds: int, inner_steps: int, overlap: bool,
              timeout_s: float) -> dict:
    """One swarm on a fresh test bed; returns per-peer round logs and the final weights' held-out loss."""
    from gpunite.data.prepare import prepare_dataset
    from gpunite.manifest import load_manifest
    from gpunite.sim.calibration import run_peers
    from gpunite.sim.netbed import Netbed
    from gpunite.swarm.demo import round_log

    workdir.mkdir(parents=True)
    manifest_path = workdir / "run.toml"
    from utilization import corpus_mb  # benchmarks/utilization.py: enough text that no round runs short

    manifest_path.write_text(MANIFEST.format(inner_steps=inner_steps, overlap=str(overlap).lower(),
                                             corpus=corpus_mb(peers, rounds, inner_steps)))
    prepare_dataset(load_manifest(manifest_path))
    with Netbed(peers, profile, tag="wanu") as bed:
        run_peers(workdir, manifest_path, peers, rounds, bed, timeout_s, extra_args=["--save-final"])
    logs = [round_log(workdir / f"peer{index}") for index in range(peers)]
    texts = [(workdir / f"peer{index}.log").read_text(errors="replace") for index in range(peers)]
    return {"logs": logs, "heldout_loss": heldout_loss(workdir / "peer0", manifest_path),
            "false_departures": sum(len(DEPARTED.findall(text)) for text in texts),
            "slices_merged_elsewhere": sum(len(MERGED_HERE.findall(text)) for text in texts)}


def heldout_loss(home: Path, manifest_path: Path) -> float:
    """Held-out loss of the final global weights a peer saved (`--save-final`)."""
    import torch

    from gpunite.data.batches import heldout_sequences
    from gpunite.data.shards import ShardIndex
    from gpunite.manifest import load_manifest
    from gpunite.train.checkpoint import load_checkpoint, model_from_checkpoint
    from gpunite.train.trainer import InnerTrainer

    manifest = load_manifest(manifest_path)
    finals = sorted(home.glob("runs/*/final.safetensors"))
    if not finals:
        raise SystemExit(f"no final weights under {home}")
    model = model_from_checkpoint(load_checkpoint(finals[0]))
    index = ShardIndex.load(manifest.prepared_path)
    sequences = heldout_sequences(manifest.prepared_path, index, manifest.data.seq_len, 256)
    with torch.no_grad():
        return InnerTrainer(model, manifest.train, device="cpu").evaluate(sequences.split(manifest.train.batch_size))


def window_figures(logs: list[dict[int, dict]], first_round: int, last_round: int) -> dict:
    from gpunite.swarm.demo import time_shares

    shares = [time_shares(log, first_round, last_round) for log in logs]
    utilization = [share["compute"] for share in shares]
    sent = [(log[last_round]["bytes_sent"] - log[first_round]["bytes_sent"]) / (last_round - first_round)
            for log in logs]
    round_s = (logs[0][last_round]["time"] - logs[0][first_round]["time"]) / (last_round - first_round)
    merged = [logs[0][r]["merged"] for r in range(first_round + 1, last_round + 1)]
    return {"utilization": round(sum(utilization) / len(utilization), 4), "worst": round(min(utilization), 4),
            "bytes_per_peer_per_round": round(sum(sent) / len(sent)), "round_s": round(round_s, 2),
            "merged_per_round": merged,
            "time_shares": {key: round(sum(share[key] for share in shares) / len(shares), 4) for key in shares[0]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--profile", default="home", help="test-bed link profile (datacenter, home, bad)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds after the warm-up")
    parser.add_argument("--warmup-rounds", type=int, default=1)
    parser.add_argument("--inner-steps", type=int, default=30)
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="per swarm")
    parser.add_argument("--keep", type=Path, default=None,
                        help="run the swarms in this new folder and keep it (peers' logs), not in a temporary one")
    args = parser.parse_args()

    from gpunite.sim.netbed import check_requirements

    check_requirements()
    total = args.warmup_rounds + args.rounds + 1  # the last round runs after the window
    figures, losses, flaps = {}, {}, {}
    started = time.time()
    if args.keep is not None:
        args.keep.mkdir(parents=True)
    place = contextlib.nullcontext(str(args.keep)) if args.keep else tempfile.TemporaryDirectory(
        prefix="gpunite-bench-wan-")
    with place as tmp:
        for overlap in (True, False):
            run = run_swarm(Path(tmp) / ("overlap" if overlap else "sync"), args.peers, args.profile, total,
                            args.inner_steps, overlap, args.timeout_s)
            figures[overlap] = window_figures(run["logs"], args.warmup_rounds - 1, total - 2)
            losses[overlap] = run["heldout_loss"]
            flaps[overlap] = {"false_departures": run["false_departures"],
                              "slices_merged_elsewhere": run["slices_merged_elsewhere"]}
    on, off = figures[True], figures[False]
    result = {
        "name": "wan_utilization",
        "value": on["utilization"],
        "unit": "fraction of wall time in inner steps",
        "compute_utilization": on["utilization"],
        "worst_peer_utilization": on["worst"],
        "no_overlap_utilization": off["utilization"],
        "no_overlap_worst_peer": off["worst"],
        "loss_ratio": round(losses[True] / losses[False], 4),
        "overlap_loss": round(losses[True], 4),
        "sync_loss": round(losses[False], 4),
        "bytes_per_peer_per_round": on["bytes_per_peer_per_round"],
        "no_overlap_bytes_per_peer_per_round": off["bytes_per_peer_per_round"],
        "round_s": on["round_s"],
        "no_overlap_round_s": off["round_s"],
        "merged_per_round": on["merged_per_round"],
        "no_overlap_merged_per_round": off["merged_per_round"],
        "time_shares": on["time_shares"],
        "no_overlap_time_shares": off["time_shares"],
        **flaps[True],
        **{f"no_overlap_{key}": value for key, value in flaps[False].items()},
        "peers": args.peers, "profile": args.profile, "rounds": args.rounds, "inner_steps": args.inner_steps,
        "cpu_cores": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
        "wall_s": round(time.time() - started, 1),
    }
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
