"""Benchmark: time for a peer behind a 1 Mbit/s link to join a tiny-preset run, next to a 100 Mbit/s one.

Three peers of the WAN test bed (`gpunite.sim.netbed`, each in its own network namespace with tc rate limits
and a delaying relay): the first starts a run of the demo's manifest (tiny preset, ~3.7 M parameters: the
global state a joiner fetches is ~15 MB at round 0), then a peer on a 100 Mbit/s link and one on a
1 Mbit/s link (25 ms one way) join it at the same time. Each joiner's time is from its process start to its
"joined run" line (manifest, shard index, tokenizer and global state fetched and checked); a joiner that
gives up counts as not joined. A state transfer at 1 Mbit/s takes ~2 minutes, past the fixed 120 s that state
sync used to allow; now a reply body gets time for its size (`gpunite.swarm.node.TransferBudget`).

Needs root (network namespaces). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAST = (100.0, 100.0, 10.0)  # down Mbit/s, up Mbit/s, one-way ms
SLOW = (1.0, 1.0, 25.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit-s", type=float, default=900.0, help="longest wait for the joiners")
    args = parser.parse_args()

    from gpunite.manifest import load_manifest
    from gpunite.model import config_from_manifest, param_count
    from gpunite.sim.netbed import Netbed
    from gpunite.swarm.demo import write_demo_manifest

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="gpunite-bench-slowjoin-") as tmp:
        root = Path(tmp)
        manifest = write_demo_manifest(root)
        params = param_count(config_from_manifest(load_manifest(manifest)))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        gpunite = [sys.executable, "-m", "gpunite"]
        common = ["--threads", "1", "--speed", "1", "--heartbeat", "1", "--log-level", "INFO",
                  "--rounds", "1"]
        processes: list[subprocess.Popen] = []
        joins: dict[str, dict] = {}
        with Netbed(3, links=[FAST, FAST, SLOW], tag="slowj") as bed:

            def launch(index: int, argv: list[str]) -> subprocess.Popen:
                with open(root / f"peer{index}.log", "w") as log:
                    process = bed.popen(index, [*argv, "--home", str(root / f"peer{index}"), "--host",
                                                bed.peers[index].address, *common],
                                        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                processes.append(process)
                return process

            try:
                launch(0, [*gpunite, "run", "start", str(manifest), "--wait-peers", "3", "--wait-s", "1800",
                           "--port", "7100"])
                address = _wait_for_address(root / "peer0.log", processes[0], 900)
                joiners = {"fast": launch(1, [*gpunite, "join", address]),
                           "slow": launch(2, [*gpunite, "join", address])}
                join_started = time.time()
                logs = {"fast": root / "peer1.log", "slow": root / "peer2.log"}
                while time.time() - join_started < args.limit_s and len(joins) < 2:
                    for name, process in joiners.items():
                        if name in joins:
                            continue
                        text = logs[name].read_text(errors="replace")
                        if "joined run" in text or process.poll() is not None:
                            joins[name] = {"joined": "joined run" in text,
                                           "join_s": round(time.time() - join_started, 1),
                                           "exit_code": process.poll(), "last_error": _last_error(text)}
                    time.sleep(1)
                for name in joiners:
                    joins.setdefault(name, {"joined": False, "join_s": None, "exit_code": None,
                                            "last_error": f"still joining after {args.limit_s:.0f} s"})
            finally:
                for process in processes:
                    try:
                        os.killpg(process.pid, 9)
                    except ProcessLookupError:
                        pass
                    process.wait()
    result = {
        "name": "slow_link_join",
        "value": joins["slow"]["join_s"] if joins["slow"]["joined"] else None,
        "unit": "s to join at 1 Mbit/s",
        "slow_joined": joins["slow"]["joined"],
        "slow_link_mbit": SLOW[0],
        "fast_join_s": joins["fast"]["join_s"],
        "fast_link_mbit": FAST[0],
        "parameters": params,
        "round0_state_bytes_approx": 4 * params,
        "joiners": joins,
        "wall_s": round(time.time() - started, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    sys.stdout.write(json.dumps(result) + "\n")


def _wait_for_address(log: Path, process: subprocess.Popen, timeout_s: float) -> str:
    give_up = time.time() + timeout_s
    while time.time() < give_up:
        found = re.search(r"join with: gpunite join (\S+)", log.read_text(errors="replace"))
        if found:
            return found.group(1)
        if process.poll() is not None:
            raise SystemExit(f"the first peer exited with code {process.returncode}: "
                             f"{log.read_text()[-800:]}")
        time.sleep(1)
    raise SystemExit(f"the first peer printed no address within {timeout_s:.0f} s")


def _last_error(text: str) -> str | None:
    lines = [line for line in text.splitlines() if "error" in line.lower() or "refused" in line]
    return lines[-1][:300] if lines else None


if __name__ == "__main__":
    main()
