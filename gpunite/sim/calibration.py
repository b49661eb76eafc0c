"""Figures measured on a real swarm (loopback or the WAN test bed) that calibrate the simulator, and the
side-by-side comparison of simulated and measured round time, utilization and bytes per peer.

`measure_swarm` starts real peers with the CLI (`gpunite run start`, `gpunite join`) and reads their INFO
logs: each merge line carries the exact byte counters at that merge (timestamps to the second), each round's
"trained" line its inner-step time, each "audited" line one audit's duration. Figures are per round between
a peer's first and last merge (so the joiners' first download of data and weights is not counted as round
traffic).

Bytes are not calibrated: the simulator derives them from the wire formats (gpunite.sim.traffic, with the
fixed parts measured by serializing the run's own model). `calibrate` measures only what a formula cannot
know, from one set of runs: the audit's CPU time per replayed step (relative to the run's inner-step time)
and the per-round protocol overhead (a CPU part that grows with the peers sharing the machine, and DHT reads
whose round trips grow with the RTT and the swarm). `compare` then
simulates a different run (other peer count or link profile) with those costs and reports the errors.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from types import FrameType

from gpunite.errors import GpuniteError
from gpunite.manifest import ProofSection
from gpunite.sim.model import LINKS, ProtocolCosts, SimConfig, dht_hops, simulate, trail_segments
from gpunite.sim.traffic import WireSizes

MANIFEST = """[run]
name = "gpunite-sim-calibration"
seed = 7
[data]
sources = ["builtin:python-docs"]
vocab_size = 512
seq_len = 64
max_builtin_mb = 0.5
[model]
preset = "tiny"
hidden_size = 64
n_layers = 1
intermediate_size = 172
[train]
batch_size = 4
inner_steps = {inner_steps}
round_deadline_s = {round_deadline_s}
overlap = {overlap}
[proof]
audit_fraction = {audit_fraction}
trail_interval = {trail_interval}
"""
# Every contribution audited: a 4-round measurement then holds the same number of audits as the simulated
# expectation, instead of a binomial draw that alone would move the bytes by ~7% (the simulator's audit
# sampling is unit-tested). A 1-layer, 64-wide model (82k parameters) keeps a round's audits within the
# coordinator's verdict wait on the home profile's 20 Mbit uplink (a trail segment is 16 bytes per parameter)
# and on a shared, loaded CPU.
AUDIT_FRACTION = 1.0
# The manifest's and PeerConfig's defaults, which the calibration runs use
TRAIL_INTERVAL, SEGMENTS_PER_AUDIT = ProofSection().trail_interval, ProofSection().segments_per_audit
AUDIT_TIMEOUT_S = 30.0
CPU_CORES = os.cpu_count() or 1  # the machine every measured peer runs on
ROUND_DEADLINE_S = 600.0  # the calibration runs' train.round_deadline_s: no peer misses it
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
    inner_steps: int  # H of the run
    overlap: bool  # train.overlap: round r + 1 trained while round r's audits and exchange run
    audits_per_round: float  # audits done per round in the window (every peer's "audited" lines)
    audit_s: float  # mean wall time of one audit (fetch + replay), as the verifier logs it
    merged_fraction: float  # merged contributions / peers, per round
    wire: WireSizes  # fixed parts measured by serializing this run's model (gpunite.sim.traffic)
    audit_fraction: float = AUDIT_FRACTION  # the run's proof.audit_fraction
    host_cores: int = 0  # CPU cores of the machine it ran on (0: not recorded, taken as this machine's)
    trail_interval: int = 2  # the run's proof.trail_interval (2: the default when none was recorded)

    def __post_init__(self) -> None:
        if self.inner_steps < 1 or self.trail_interval < 1:
            raise ValueError(f"inner_steps and trail_interval must be >= 1, got {self.inner_steps} and "
                             f"{self.trail_interval}")

    @property
    def label(self) -> str:
        return f"{self.testbed}, {self.peers} peers, {self.params} parameters, audit fraction {self.audit_fraction}"

    @property
    def utilization(self) -> float:
        """Inner-step time of merged work / wall time: what the simulator's compute_utilization means."""
        return self.compute_s / self.round_s * self.merged_fraction

    def to_dict(self) -> dict:
        return {**asdict(self), "utilization": self.utilization}


def save_measurement(path: Path, measured: SwarmMeasurement) -> None:
    from gpunite.util import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(asdict(measured), indent=1).encode())


def load_measurement(path: Path) -> SwarmMeasurement:
    try:
        data = json.loads(Path(path).read_text())
        values = {
            f.name: data[f.name]
            for f in fields(SwarmMeasurement)
            if f.name in data or f.default is MISSING  # fields with a default may be missing in older files
        }
        values["wire"] = WireSizes(**values["wire"])
        return SwarmMeasurement(**values)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CalibrationError(
            f"cannot read calibration file {path}: {exc}; create one with "
            "`gpunite netbed run --profile loopback --save FILE`"
        ) from None


def load_costs(path: Path) -> ProtocolCosts:
    """ProtocolCosts from a calibration file (a measured run, e.g. a loopback one)."""
    return calibrate([load_measurement(path)]).costs


@dataclass(frozen=True)
class Calibration:
    """Costs measured on some runs. The CPU part of the per-round protocol overhead (hashing, signing,
    (de)serializing, robust merge, serving DHT requests) is measured where every peer shares one machine's
    cores, so another run gets it scaled by how many peers share them (`host_share`); the audit's replay
    scale is relative to the run's own inner steps, which the same sharing slows alike."""

    costs: ProtocolCosts
    reference_share: float  # host_share of the runs the CPU overhead is stated for
    runs: tuple[str, ...] = ()  # the runs it was measured on, e.g. ("loopback, 8 peers",)

    def costs_for(self, measured: SwarmMeasurement) -> ProtocolCosts:
        scale = host_share(measured) / self.reference_share
        return replace(self.costs, round_overhead_s=self.costs.round_overhead_s * scale, wire=measured.wire)


def _audited_segments(measured: SwarmMeasurement) -> int:
    """Trail segments one audit of the run fetches and replays."""
    return min(SEGMENTS_PER_AUDIT, max(measured.inner_steps // measured.trail_interval, 1))


def _replay_share(measured: SwarmMeasurement) -> float:
    """Replayed steps of an audit / steps of the round (the simulator's rule)."""
    return min(_audited_segments(measured) * measured.trail_interval, measured.inner_steps) / measured.inner_steps


def audit_transfer_s(measured: SwarmMeasurement) -> float:
    """Mean time one audit's download takes on the run's links (trainer's uplink, verifier's downlink,
    one round trip per sequential request), from the wire sizes alone."""
    profile = LINKS.get(measured.testbed.removeprefix("netbed:"), LINKS["datacenter"])
    links = [profile.for_peer(i) for i in range(measured.peers)]
    segments = _audited_segments(measured)
    audit_bytes = measured.wire.audit_bytes(measured.params, measured.peers, segments, measured.overlap,
                                            trail_segments=trail_segments(measured.inner_steps,
                                                                          measured.trail_interval))
    pairs = [
        audit_bytes / (min(links[t][1], links[v][0]) * 1e6 / 8)
        for t in range(measured.peers)
        for v in range(measured.peers)
        if t != v
    ]
    rtts = (
        0.0
        if measured.testbed == "loopback"
        else (measured.peers + segments + 1) * 2 * profile.one_way_ms / 1e3
    )
    return sum(pairs) / max(len(pairs), 1) + rtts


def calibrate(runs: list[SwarmMeasurement], base: ProtocolCosts | None = None) -> Calibration:
    """Audit CPU scale and per-round overhead from real runs. An audit's time is its download at the links'
    rate plus replay CPU (relative to the run's inner-step time, averaged over the runs). The round time that
    is neither compute, nor audits, nor the exchange is the protocol's overhead: a CPU part that grows with
    the peers sharing the machine's cores (`host_share`) and sequential DHT reads (each waits for the
    commits, the audit beacon, the verdicts or the close to show up), whose round trips grow with the links'
    RTT and the swarm (`gpunite.sim.model.dht_hops`). Loopback runs see only the first; runs on links of
    different latency (the test bed's datacenter and home profiles) tell the two apart (`fit_overhead`).
    Without them, the reads keep `base`'s count."""
    if not runs:
        raise CalibrationError("calibrate needs at least one measured run")
    base = base or ProtocolCosts()
    scales, residuals = [], []
    for run in runs:
        replay_s = max(run.audit_s - audit_transfer_s(run), 0.0)
        scale = replay_s / (_replay_share(run) * run.compute_s) if run.audits_per_round > 0 else None
        scales.append(base.audit_compute_scale if scale is None else scale)
        probe_costs = replace(base, wire=run.wire, audit_compute_scale=scales[-1], round_overhead_s=0.0,
                              dht_reads=0.0)
        probe = simulate(_config_for(run, probe_costs))
        residuals.append(max(run.round_s - probe.mean_round_s, 0.0))
    per_share, reads = fit_overhead(residuals, [host_share(run) for run in runs], [read_s(run) for run in runs],
                                      base.dht_reads)
    reference = host_share(runs[0])
    costs = replace(
        base,
        wire=runs[0].wire,
        audit_compute_scale=sum(scales) / len(scales),
        round_overhead_s=per_share * reference,
        dht_reads=reads,
    )
    return Calibration(costs, reference, tuple(run.label for run in runs))


def rtt_s(measured: SwarmMeasurement) -> float:
    """The round trip the simulator uses for a run (twice the median one-way latency; 0 on loopback)."""
    if measured.testbed == "loopback":
        return 0.0
    profile = LINKS.get(measured.testbed.removeprefix("netbed:"), LINKS["datacenter"])
    one_way_ms = sorted(profile.for_peer(i)[2] for i in range(measured.peers))
    return 2.0 * one_way_ms[len(one_way_ms) // 2] / 1e3


def host_share(measured: SwarmMeasurement) -> float:
    """How many peers share each of the machine's cores (at least 1): the loopback swarm and the test bed run
    every peer on one machine, so a fixed amount of per-round protocol CPU work takes peers / cores times as
    long as alone (each peer process is runnable about as often: a fair share).
    Not the inner steps' time: the overlapped training thread runs at nice +10 and yields to the protocol
    threads, so it slows far more than they do as peers are added (overhead per inner-step second fell from
    11.9 to 5.7 between 4 and 12 peers in the runs of 2026-12-01)."""
    return max(measured.peers / (measured.host_cores or CPU_CORES), 1.0)


def read_s(measured: SwarmMeasurement) -> float:
    """What one DHT read costs in the simulation of a run: its round trips in a swarm of that size."""
    return dht_hops(measured.peers) * rtt_s(measured)


def fit_overhead(residuals: Sequence[float], shares: Sequence[float], reads_s: Sequence[float],
                 default_reads: float) -> tuple[float, float]:
    """(CPU overhead per unit of host share, DHT reads per round) with residual ~= a x share + b x read_s,
    where share is the run's `host_share` and read_s what one DHT read costs in it (round trips x RTT).

    Each run's equation is divided by its share, so runs weigh alike whatever their size: a least squares
    line y = a + b x through y = residual / share, x = read_s / share, neither coefficient below 0.
    Runs that all share one x (e.g. loopback only, x = 0) cannot tell a from b: b is then `default_reads`."""
    ys = [r / c for r, c in zip(residuals, shares)]
    xs = [t / c for t, c in zip(reads_s, shares)]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0.0:  # the runs cannot tell the parts apart: keep the default reads, the rest is CPU
        return max(mean_y - default_reads * mean_x, 0.0), default_reads
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread
    intercept = mean_y - slope * mean_x
    if slope < 0.0:
        return mean_y, 0.0
    if intercept < 0.0:
        return 0.0, sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
    return intercept, slope


def _config_for(measured: SwarmMeasurement, costs: ProtocolCosts) -> SimConfig:
    """The simulation of a measured run: same peers, model size, compute per round, links, audit settings
    and overlap."""
    profile = measured.testbed.removeprefix("netbed:")
    link_mix = {profile: 1.0} if profile in LINKS else {"datacenter": 1.0}
    if measured.testbed == "loopback":
        costs = replace(costs, dht_reads=0.0)
    return SimConfig(
        peers=measured.peers,
        gpu_mix={"cpu": 1.0},
        link_mix=link_mix,
        params=measured.params,
        rounds=200,  # the expectation, not one draw of a few rounds
        round_compute_s=measured.compute_s,
        inner_steps=measured.inner_steps,
        trail_interval=measured.trail_interval,
        segments_per_audit=SEGMENTS_PER_AUDIT,
        audit_timeout_s=AUDIT_TIMEOUT_S,
        speed_jitter=measured.compute_spread,
        deadline_slack=max(ROUND_DEADLINE_S / measured.compute_s - 1.0, 0.0),  # the real run's deadline
        overlap=measured.overlap,
        # the measured steps shared the machine's cores with the overlapped audits' replays: their measured
        # time holds the replays' share already
        replays_in_compute=measured.overlap,
        adaptive=False,
        audit_fraction=measured.audit_fraction,
        seed=0,
        costs=costs,
    )


FIGURES = ("round_s", "compute_utilization", "bytes_sent_per_peer_round", "bytes_received_per_peer_round")


def compare(measured: SwarmMeasurement, calibration: Calibration) -> dict:
    """Simulated vs measured round time, utilization and bytes per peer per round, with relative errors."""
    costs = calibration.costs_for(measured)
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
        "label": measured.label,
        "held_out": measured.label not in calibration.runs,
        "rows": rows,
        "max_abs_error": max(abs(r["relative_error"]) for r in rows),
        "simulated_bytes_split": {
            "exchange": simulated.exchange_bytes_per_peer_round,
            "audits": simulated.audit_bytes_per_peer_round,
        },
        "simulated_late_verdicts_per_round": simulated.late_verdicts / max(simulated.rounds_attempted, 1),
        "costs": asdict(costs),
    }


def measure_swarm(
    peers: int,
    profile: str | None,
    rounds: int = 3,
    workdir: Path | None = None,
    inner_steps: int = 4,
    timeout_s: float = 1800.0,
    overlap: bool = True,
) -> SwarmMeasurement:
    """Run a real swarm of `peers` peers (a small model) on loopback (`profile` None) or the WAN test bed."""
    from gpunite.manifest import load_manifest
    from gpunite.model import config_from_manifest, param_count
    from gpunite.sim.traffic import measure_wire_sizes

    own_dir = workdir is None
    root = Path(tempfile.mkdtemp(prefix="gpunite-calib-")) if workdir is None else Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / "run.toml"
    manifest_path.write_text(
        MANIFEST.format(inner_steps=inner_steps, audit_fraction=AUDIT_FRACTION, overlap=str(overlap).lower(),
                        round_deadline_s=int(ROUND_DEADLINE_S), trail_interval=TRAIL_INTERVAL)
    )
    model_config = config_from_manifest(load_manifest(manifest_path))
    params = param_count(model_config)
    wire, _ = measure_wire_sizes(model_config)
    bed = None
    # SIGTERM stops the peers and the bed like Ctrl-C does, instead of orphaning them
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if profile is not None:
            from gpunite.sim.netbed import Netbed

            bed = Netbed(peers, profile, tag="calib")
            bed.up()
        logs = run_peers(root, manifest_path, peers, rounds + 1, bed, timeout_s)
    finally:
        if bed is not None:
            bed.down()
        signal.signal(signal.SIGTERM, previous_sigterm)
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)
    testbed = "loopback" if profile is None else f"netbed:{profile}"
    return _figures(logs, testbed, peers, params, inner_steps, wire, overlap)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_peers(
    root: Path, manifest: Path, peers: int, rounds: int, bed, timeout_s: float, join_stagger_s: float = 5.0,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """Start the peers (homes root/peer<i>) and wait until they stop; returns each peer's log (INFO lines carry
    the figures). `bed`: a started Netbed to run them in, or None for loopback; extra_args go to every peer."""
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
        *extra_args,
    ]

    def launch(index: int, argv: list[str], mode: str = "w") -> subprocess.Popen:
        host = bed.peers[index].address if bed is not None else "127.0.0.1"
        argv = [*argv, "--home", str(root / f"peer{index}"), "--host", host, *common]
        with open(root / f"peer{index}.log", mode) as log:  # the child keeps its own copy of the handle
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
        join = [*gpunite, "join", maddr]
        for index in range(1, peers):
            processes.append(launch(index, join))
            time.sleep(join_stagger_s)  # many daemons starting at once on a small shared CPU time out
        retries = dict.fromkeys(range(1, peers), 2)
        while any(p.poll() is None for p in processes):
            if time.time() > deadline:
                raise CalibrationError(
                    f"the swarm did not finish {rounds} rounds in {timeout_s:.0f} s; see {root}"
                )
            # on an overloaded machine a joiner's daemon can time out while starting; while the first peer
            # still waits for the whole swarm, start it again (same home, same identity)
            if "round 0 started" not in (root / "peer0.log").read_text(errors="replace"):
                for index in range(1, peers):
                    if processes[index].poll() not in (None, 0) and retries[index] > 0:
                        retries[index] -= 1
                        processes[index] = launch(index, join, mode="a")
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


# What gpunite.swarm.peer and gpunite.swarm.audits log at INFO after each round's steps, each audit and each
# merge (the byte counters are exact)
_TRAINED = re.compile(r"round (\d+): trained \d+ steps in ([\d.]+) s")
_AUDITED = re.compile(r"audited \w+'s round (\d+) contribution \(segments [^)]*\) in ([\d.]+) s\b")
_MERGED = re.compile(
    r"^(\d\d):(\d\d):(\d\d) .*round (\d+) merged (\d+) contributions.* sent (\d+) B, received (\d+) B so far",
    re.MULTILINE,
)


@dataclass
class PeerLog:
    merges: list[tuple[float, int, int, int]]  # (seconds of day, round, bytes sent, bytes received)
    merged: dict[int, int]  # round -> contributions merged
    trained: dict[int, float]  # round -> seconds of inner steps
    audits: list[tuple[int, float]]  # (round audited, seconds the audit took)


def parse_peer_log(text: str) -> PeerLog:
    merges, merged, offset, previous = [], {}, 0.0, -1.0
    for match in _MERGED.finditer(text):
        hours, minutes, seconds, round_index, count, sent, received = (int(g) for g in match.groups())
        stamp = hours * 3600 + minutes * 60 + seconds + offset
        if stamp < previous:  # the log's clock passed midnight
            offset += 86400.0
            stamp += 86400.0
        previous = stamp
        merges.append((stamp, round_index, sent, received))
        merged[round_index] = count
    trained = {int(m.group(1)): float(m.group(2)) for m in _TRAINED.finditer(text)}
    audits = [(int(m.group(1)), float(m.group(2))) for m in _AUDITED.finditer(text)]
    return PeerLog(merges, merged, trained, audits)


def _figures(
    logs: list[str], testbed: str, peers: int, params: int, inner_steps: int, wire: WireSizes, overlap: bool
) -> SwarmMeasurement:
    """Per-round figures between each peer's first and last merge (the join download is before the first)."""
    import numpy as np

    per_peer, audit_times, audits_done = [], [], 0
    for text in logs:
        log = parse_peer_log(text)
        if len(log.merges) < 2:
            continue
        (t0, r0, sent0, received0), (t1, r1, sent1, received1) = log.merges[0], log.merges[-1]
        done = r1 - r0
        window = range(r0 + 1, r1 + 1)
        compute = [log.trained[r] for r in window if r in log.trained]
        if done <= 0 or not compute:
            continue
        mine = [seconds for r, seconds in log.audits if r in window]
        audit_times += mine
        audits_done += len(mine)
        per_peer.append(
            (
                done,
                (t1 - t0) / done,
                float(np.mean(compute)),
                (sent1 - sent0) / done,
                (received1 - received0) / done,
                float(np.mean([log.merged[r] / peers for r in window if r in log.merged])),
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
        inner_steps=inner_steps,
        overlap=overlap,
        audits_per_round=audits_done / float(rows[:, 0].mean()),
        audit_s=float(np.mean(audit_times)) if audit_times else 0.0,
        merged_fraction=float(rows[:, 5].mean()),
        wire=wire,
        host_cores=CPU_CORES,
        trail_interval=TRAIL_INTERVAL,
    )
