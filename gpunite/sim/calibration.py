"""Figures measured on a real swarm (loopback or the WAN test bed) that calibrate the simulator, and the
side-by-side comparison of simulated and measured round time, utilization and bytes per peer.

`measure_swarm` starts real peers with the CLI (`gpunite run start`, `gpunite join`) and reads their INFO
logs: each merge line carries the exact byte counters at that merge (timestamps to the second), each round's
"trained" line its inner-step time. Figures are per round between a peer's first and last merge (so the
joiners' first download of data and weights is not counted as round traffic). `calibrate` turns a loopback
run (and optionally a test-bed run) into `ProtocolCosts` (wire bytes per parameter, background traffic,
per-round overhead); `compare` simulates another measured run with them and reports the relative errors.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from types import FrameType

from gpunite.errors import GpuniteError
from gpunite.sim.model import LINKS, ProtocolCosts, SimConfig, simulate

MANIFEST = """[run]
name = "gpunite-sim-calibration"
seed = 7
[model]
preset = "tiny"
[data]
sources = ["builtin:python-docs"]
vocab_size = 512
seq_len = 64
max_builtin_mb = 0.5
[train]
batch_size = 4
inner_steps = {inner_steps}
round_deadline_s = 600
"""
_MADDR = re.compile(r"(/ip4/\S+/tcp/\d+/p2p/\w+)")


class CalibrationError(GpuniteError):
    """A calibration file or a measured run that cannot be used."""


@dataclass(frozen=True)
class SwarmMeasurement:
    testbed: str  # "loopback" or "netbed:<profile>"
    peers: int
    rounds: int  # rounds in the measured window (after the first merge)
    params: int
    round_s: float  # mean wall time of a round
    compute_s: float  # mean inner-step compute time per peer per round
    compute_spread: float  # standard deviation of log(compute per round) across peers
    bytes_sent_per_peer_round: float
    bytes_received_per_peer_round: float
    audit_bytes_per_param: float  # size of a real trail segment (gpunite.proof.trail) per parameter

    @property
    def utilization(self) -> float:
        return self.compute_s / self.round_s

    def to_dict(self) -> dict:
        return {**asdict(self), "utilization": self.utilization}


def save_measurement(path: Path, measured: SwarmMeasurement) -> None:
    from gpunite.util import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(asdict(measured), indent=1).encode())


def load_measurement(path: Path) -> SwarmMeasurement:
    try:
        data = json.loads(Path(path).read_text())
        return SwarmMeasurement(**{f.name: data[f.name] for f in fields(SwarmMeasurement)})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CalibrationError(
            f"cannot read calibration file {path}: {exc}; create one with "
            "`gpunite netbed run --profile loopback --save FILE`"
        ) from None


def load_costs(path: Path) -> ProtocolCosts:
    """ProtocolCosts from a calibration file (a loopback measurement)."""
    return calibrate(load_measurement(path)).costs


@dataclass(frozen=True)
class Calibration:
    costs: ProtocolCosts
    # The per-round protocol overhead is CPU work (hashing, signing, (de)compression, robust merge, outer
    # step, DHT polling); on a shared CPU it slows by the same factor as the inner steps, so a run with a
    # different compute time per round gets the overhead scaled by compute_s / reference_compute_s.
    reference_compute_s: float

    def costs_for(self, measured: SwarmMeasurement) -> ProtocolCosts:
        scale = measured.compute_s / self.reference_compute_s
        return replace(self.costs, round_overhead_s=self.costs.round_overhead_s * scale)


def _wire_factor(peers: int) -> float:
    # each peer sends (n - 1)/n of its pseudo-gradient and serves its merged slice to n - 1 peers
    return 2.0 * (peers - 1) / peers


def _bytes_per_round(measured: SwarmMeasurement) -> float:
    return (measured.bytes_sent_per_peer_round + measured.bytes_received_per_peer_round) / 2.0


def calibrate(
    loopback: SwarmMeasurement, wan: SwarmMeasurement | None = None, base: ProtocolCosts | None = None
) -> Calibration:
    """Protocol costs from real runs. Loopback moves bytes about as fast as memory, so its round time that is
    neither compute nor transfer is the protocol's overhead. Bytes per round = exchange + background traffic
    (heartbeats, DHT polling) x round time: one run gives the exchange's bytes per parameter; a second run
    with longer rounds (`wan`, e.g. the test bed) separates the two."""
    base = replace(base or ProtocolCosts(), audit_bytes_per_param=loopback.audit_bytes_per_param)
    bytes_per_param = _bytes_per_round(loopback) / (_wire_factor(loopback.peers) * loopback.params)
    background_Bps = 0.0
    if wan is not None:
        import numpy as np

        system = np.array([[_wire_factor(run.peers) * run.params, run.round_s] for run in (loopback, wan)])
        fitted = np.linalg.solve(system, [_bytes_per_round(loopback), _bytes_per_round(wan)])
        if fitted.min() > 0:  # otherwise the two runs disagree beyond this model: keep the one-run figure
            bytes_per_param, background_Bps = float(fitted[0]), float(fitted[1])
    costs = replace(base, exchange_bytes_per_param=bytes_per_param, background_Bps=background_Bps)
    probe = simulate(_config_for(loopback, replace(costs, round_overhead_s=0.0)))
    overhead_s = max(loopback.round_s - probe.mean_round_s, 0.0)
    return Calibration(replace(costs, round_overhead_s=overhead_s), loopback.compute_s)


def _config_for(measured: SwarmMeasurement, costs: ProtocolCosts) -> SimConfig:
    """The simulation of a measured run: same peers, model size, compute per round and links; the real peer
    runs its exchange after its steps and (so far) audits nothing inline, so no overlap and no audits."""
    profile = measured.testbed.removeprefix("netbed:")
    link_mix = {profile: 1.0} if profile in LINKS else {"datacenter": 1.0}
    if measured.testbed == "loopback":
        costs = replace(costs, round_overhead_rtts=0.0)
    return SimConfig(
        peers=measured.peers,
        gpu_mix={"cpu": 1.0},
        link_mix=link_mix,
        params=measured.params,
        rounds=max(measured.rounds, 5),
        round_compute_s=measured.compute_s,
        speed_jitter=measured.compute_spread,
        deadline_slack=10.0,
        overlap=False,
        adaptive=False,
        audit_fraction=0.0,
        seed=0,
        costs=costs,
    )


def compare(measured: SwarmMeasurement, calibration: Calibration | None = None) -> dict:
    """Simulated vs measured round time, utilization and bytes per peer per round, with relative errors."""
    costs = (calibration or calibrate(measured)).costs_for(measured)
    simulated = simulate(_config_for(measured, costs))
    rows = []
    for figure, real, model in (
        ("round_s", measured.round_s, simulated.mean_round_s),
        ("compute_utilization", measured.utilization, simulated.compute_utilization),
        (
            "bytes_sent_per_peer_round",
            measured.bytes_sent_per_peer_round,
            simulated.bytes_sent_per_peer_round,
        ),
        (
            "bytes_received_per_peer_round",
            measured.bytes_received_per_peer_round,
            simulated.bytes_received_per_peer_round,
        ),
    ):
        rows.append(
            {
                "figure": figure,
                "measured": real,
                "simulated": model,
                "relative_error": (model - real) / real if real else math.inf,
            }
        )
    return {
        "testbed": measured.testbed,
        "peers": measured.peers,
        "rows": rows,
        "max_abs_error": max(abs(r["relative_error"]) for r in rows),
        "costs": asdict(costs),
    }


def measure_swarm(
    peers: int,
    profile: str | None,
    rounds: int = 3,
    workdir: Path | None = None,
    inner_steps: int = 4,
    timeout_s: float = 1800.0,
) -> SwarmMeasurement:
    """Run a real swarm of `peers` peers (tiny model) on loopback (`profile` None) or the WAN test bed."""
    from gpunite.manifest import load_manifest
    from gpunite.model import config_from_manifest, param_count

    own_dir = workdir is None
    root = Path(tempfile.mkdtemp(prefix="gpunite-calib-")) if workdir is None else Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / "run.toml"
    manifest_path.write_text(MANIFEST.format(inner_steps=inner_steps))
    params = param_count(config_from_manifest(load_manifest(manifest_path)))
    bed = None
    # SIGTERM stops the peers and the bed like Ctrl-C does, instead of orphaning them
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if profile is not None:
            from gpunite.sim.netbed import Netbed

            bed = Netbed(peers, profile, tag="calib")
            bed.up()
        logs = _run_peers(root, manifest_path, peers, rounds + 1, bed, timeout_s)
    finally:
        if bed is not None:
            bed.down()
        signal.signal(signal.SIGTERM, previous_sigterm)
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)
    return _figures(
        logs,
        "loopback" if profile is None else f"netbed:{profile}",
        peers,
        params,
        measure_audit_bytes_per_param(),
    )


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def measure_audit_bytes_per_param(preset: str = "tiny") -> float:
    """Serialize a real audit segment (the full training state at two trail entries) after one real AdamW
    step of the preset, and divide its size by the parameter count."""
    import torch

    from gpunite.manifest import TrainSection
    from gpunite.model import PRESETS, build_model, param_count
    from gpunite.proof.trail import Segment, capture_state, segment_to_bytes
    from gpunite.train.trainer import InnerTrainer

    config = PRESETS[preset]
    model = build_model(config, seed=0)
    trainer = InnerTrainer(model, TrainSection(), device="cpu")
    tokens = torch.randint(0, config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    trainer.train_step(tokens)
    start = capture_state(model, trainer)
    trainer.train_step(tokens)
    end = capture_state(model, trainer)
    segment = Segment(index=0, start=start, end=end, first_optimizer_hash=start.optimizer_hash, first_step=1)
    return len(segment_to_bytes(segment)) / param_count(config)


def _run_peers(
    root: Path, manifest: Path, peers: int, rounds: int, bed, timeout_s: float, join_stagger_s: float = 5.0
) -> list[str]:
    """Start the peers and wait until they stop; returns each peer's log (INFO lines carry the figures)."""
    gpunite = [sys.executable, "-m", "gpunite"]
    common = [
        "--rounds",
        str(rounds),
        "--threads",
        "1",
        "--speed",
        "1",
        "--heartbeat",
        "1",
        "--log-level",
        "INFO",
    ]

    def launch(index: int, argv: list[str]) -> subprocess.Popen:
        host = bed.peers[index].address if bed is not None else "127.0.0.1"
        argv = [*argv, "--home", str(root / f"peer{index}"), "--host", host, *common]
        with open(root / f"peer{index}.log", "w") as log:  # the child keeps its own copy of the handle
            if bed is not None:
                return bed.popen(index, argv, stdout=log, stderr=subprocess.STDOUT)
            return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    first = [*gpunite, "run", "start", str(manifest), "--wait-peers", str(peers), "--wait-s", str(timeout_s)]
    processes = [launch(0, first)]
    deadline = time.time() + timeout_s
    try:
        maddr = None
        while maddr is None:
            if time.time() > deadline or processes[0].poll() is not None:
                raise CalibrationError(f"the first peer did not start; see {root / 'peer0.log'}")
            found = _MADDR.search((root / "peer0.log").read_text(errors="replace"))
            maddr = found.group(1) if found else None
            time.sleep(0.2)
        for index in range(1, peers):
            processes.append(launch(index, [*gpunite, "join", maddr]))
            time.sleep(join_stagger_s)  # many daemons starting at once on a small shared CPU time out
        while any(p.poll() is None for p in processes):
            if time.time() > deadline:
                raise CalibrationError(
                    f"the swarm did not finish {rounds} rounds in {timeout_s:.0f} s; see {root}"
                )
            time.sleep(0.5)
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        stop_by = time.time() + 20.0
        for process in processes:
            try:
                process.wait(timeout=max(stop_by - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    failed = [i for i, p in enumerate(processes) if p.returncode != 0]
    if failed:
        raise CalibrationError(f"peers {failed} exited with an error; see {root}/peer*.log")
    return [(root / f"peer{index}.log").read_text(errors="replace") for index in range(peers)]


# What gpunite.swarm.peer logs at INFO after each round's steps and after each merge (counters are exact)
_TRAINED = re.compile(r"round (\d+): trained \d+ steps in ([\d.]+) s")
_MERGED = re.compile(
    r"^(\d\d):(\d\d):(\d\d) .*round (\d+) merged .* sent (\d+) B, received (\d+) B so far", re.MULTILINE
)


def parse_peer_log(text: str) -> tuple[list[tuple[float, int, int, int]], dict[int, float]]:
    """(merges as (seconds of day, round, bytes sent, bytes received), {round: seconds of inner steps})."""
    merges, offset, previous = [], 0.0, -1.0
    for match in _MERGED.finditer(text):
        hours, minutes, seconds, round_index, sent, received = (int(g) for g in match.groups())
        stamp = hours * 3600 + minutes * 60 + seconds + offset
        if stamp < previous:  # the log's clock passed midnight
            offset += 86400.0
            stamp += 86400.0
        previous = stamp
        merges.append((stamp, round_index, sent, received))
    trained = {int(m.group(1)): float(m.group(2)) for m in _TRAINED.finditer(text)}
    return merges, trained


def _figures(
    logs: list[str], testbed: str, peers: int, params: int, audit_bytes_per_param: float
) -> SwarmMeasurement:
    """Per-round figures between each peer's first and last merge (the join download is before the first)."""
    import numpy as np

    per_peer = []
    for text in logs:
        merges, trained = parse_peer_log(text)
        if len(merges) < 2:
            continue
        (t0, r0, sent0, received0), (t1, r1, sent1, received1) = merges[0], merges[-1]
        done = r1 - r0
        compute = [trained[r] for r in range(r0 + 1, r1 + 1) if r in trained]
        if done <= 0 or not compute:
            continue
        per_peer.append(
            (
                done,
                (t1 - t0) / done,
                float(np.mean(compute)),
                (sent1 - sent0) / done,
                (received1 - received0) / done,
            )
        )
    if len(per_peer) < max(2, peers // 2):
        raise CalibrationError(
            f"only {len(per_peer)} of {peers} peers finished two merged rounds; run more rounds"
        )
    rows = np.array(per_peer)
    return SwarmMeasurement(
        testbed=testbed,
        peers=peers,
        rounds=int(rows[:, 0].min()),
        params=params,
        round_s=float(rows[:, 1].mean()),
        compute_s=float(rows[:, 2].mean()),
        compute_spread=float(np.std(np.log(rows[:, 2]))),
        bytes_sent_per_peer_round=float(rows[:, 3].mean()),
        bytes_received_per_peer_round=float(rows[:, 4].mean()),
        audit_bytes_per_param=audit_bytes_per_param,
    )
