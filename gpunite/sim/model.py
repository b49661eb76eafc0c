"""Vectorised round-by-round simulation of the swarm protocol, from a handful of peers to a million.

One simulated round follows what `gpunite.swarm.peer.Peer.run_round` does, with numpy arrays over the peers
(never one Python object per peer or message):

1. the roster is every online peer that holds the current state; work is shared by speed, so every peer's
   assigned inner steps nominally take `round_compute_s`; each round's real time varies per peer
   (log-normal jitter: thermal limits, other load);
2. a peer commits when its steps are done; the round closes when every live roster peer has committed or at
   the deadline (`round_compute_s x (1 + deadline_slack)`), whichever is first; late peers skip the round;
3. sharded aggregation: each slice owner receives its slice of every contribution and serves the merged
   slice to every peer; with `adaptive` links, slices are sized by each owner's bandwidth and a peer whose
   exchange would take far longer than the median one skips contributing instead of stalling everybody;
   with `group_size`, peers aggregate in random groups, then slice owners reduce across groups;
4. a sampled fraction of contributions is audited by a random peer (replay of k of the H inner steps, after
   downloading the trail segment); a cheat is caught with `detect_probability` and the cheater is banned;
5. with `overlap`, the exchange and audits of round r run while round r + 1 trains (one-round-delayed outer
   step), so a round lasts max(compute, communication) instead of their sum.

Churn: each peer alternates online sessions and offline gaps drawn from Weibull distributions (shape 1 is
exponential); a peer that leaves before committing loses its work, a departed slice owner costs a failover
wait, and a (re)joining peer first downloads the global state over its own link.

Costs that only a real swarm can tell (bytes per parameter on the wire, fixed per-round overhead, audit
replay cost, failover wait) come in a `ProtocolCosts`, measured by `gpunite.sim.calibration`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from gpunite.errors import GpuniteError
from gpunite.sim.traffic import TRAIL_FINAL_BYTES, TRAIL_STATE_BYTES, WireSizes


class SimError(GpuniteError, ValueError):
    """A simulation setting that cannot be used."""


# hivemind's DHT (gpunite.swarm.node reads with latest=True): a read visits every node of its beam, the
# bucket_size nodes nearest the key, num_workers requests at a time.
DHT_BUCKET, DHT_WORKERS = 20, 4


def dht_hops(peers: int) -> float:
    """Round trips one latest-value DHT read takes in a swarm of `peers`: the other nodes of the beam, visited
    DHT_WORKERS at a time (each worker asks the next node as soon as its last one answers, so the visits
    pipeline: (beam - 1) / workers round trips, at least one); past one bucket, a Kademlia lookup first narrows
    in on the key (about one hop per halving of the distance, DHT_WORKERS candidates at a time)."""
    beam = (min(peers, DHT_BUCKET) - 1) / DHT_WORKERS
    lookup = math.ceil(math.log2(peers / DHT_BUCKET) / math.log2(DHT_WORKERS)) if peers > DHT_BUCKET else 0
    return max(beam, 1.0) + lookup


@dataclass(frozen=True)
class GpuSpec:
    name: str
    peak_tflops: (
        float  # dense FP16/BF16 tensor-core TFLOPS with FP32 accumulate (what mixed-precision training uses)
    )
    source: str


# Peak dense (non-sparse) figures from the vendors' spec sheets and architecture whitepapers. GeForce cards
# run FP16 with FP32 accumulate at half their FP16-accumulate rate, which is the figure training gets.
GPUS: dict[str, GpuSpec] = {
    spec.name: spec
    for spec in (
        GpuSpec("rtx3090", 71.0, "NVIDIA GA102 whitepaper: FP16 tensor, FP32 accumulate, dense"),
        GpuSpec("rtx4090", 165.2, "NVIDIA Ada (AD102) whitepaper: FP16 tensor, FP32 accumulate, dense"),
        GpuSpec("v100", 125.0, "NVIDIA V100 SXM2 datasheet: tensor performance"),
        GpuSpec("t4", 65.0, "NVIDIA T4 datasheet: mixed precision FP16/FP32"),
        GpuSpec("a100", 312.0, "NVIDIA A100 datasheet: BF16 tensor core, dense"),
        GpuSpec("h100", 989.0, "NVIDIA H100 SXM datasheet: BF16 tensor core, dense"),
        GpuSpec(
            "cpu", 1.0, "assumption: a desktop CPU with AVX2/AVX-512 reaches about 1 TFLOPS in fp32 matmul"
        ),
    )
}


@dataclass(frozen=True)
class LinkProfile:
    """A peer's access link; the one-way latency is between two peers of the profile (RTT = 2 x latency)."""

    name: str
    down_mbit: float
    up_mbit: float
    one_way_ms: float
    slow_mbit: float | None = (
        None  # every `slow_every`-th peer (index % slow_every == slow_every - 1) has this
    )
    slow_every: int = 8

    def for_peer(self, index: int) -> tuple[float, float, float]:
        """(down Mbit/s, up Mbit/s, one-way ms) of peer number `index` on this profile."""
        if self.slow_mbit is not None and index % self.slow_every == self.slow_every - 1:
            return self.slow_mbit, self.slow_mbit, self.one_way_ms
        return self.down_mbit, self.up_mbit, self.one_way_ms


# Shared with the network test bed (gpunite.sim.netbed), which applies the same figures with tc and the relay.
LINKS: dict[str, LinkProfile] = {
    "datacenter": LinkProfile("datacenter", 10_000.0, 10_000.0, 1.0),
    "home": LinkProfile("home", 100.0, 20.0, 50.0),
    "bad": LinkProfile("bad", 20.0, 5.0, 150.0, slow_mbit=1.0),
}


@dataclass(frozen=True)
class ProtocolCosts:
    """Per-round costs of the real protocol. Bytes follow from the wire formats (`wire`, see
    gpunite.sim.traffic); the CPU and waiting costs only a real swarm can tell are measured by
    gpunite.sim.calibration on one set of runs and checked on others."""

    wire: WireSizes = field(default_factory=WireSizes)
    # audit CPU time per replayed step / training time per step: parsing and hashing the fetched trail,
    # the replay itself and the held-out loss
    audit_compute_scale: float = 1.5
    round_overhead_s: float = 1.0  # fixed per-round time: signing, hashing, DHT polling, outer step
    # Sequential DHT reads and stores on a round's critical path (each poll for the commits, the audit
    # beacon, the verdicts or the close, and the stores behind them), each dht_hops(roster) round trips.
    # Default: calibrated on the WAN test bed's datacenter and home links (4 peers each, 2026-12-02: 32.4).
    dht_reads: float = 32.0
    message_overhead_s: float = 2e-4  # CPU time per request sent or served (stream set-up, framing)
    failover_s: float = 10.0  # time to notice a vanished slice owner or coordinator and take over
    compute_scale: float = 1.0  # measured compute time / ideal (FLOPs / (peak x mfu)) time


def trail_segments(inner_steps: int, trail_interval: int) -> int:
    """Segments of a round's trail: entries at steps 0, k, 2k, ... and H (gpunite.proof.trail.trail_steps)."""
    return -(-inner_steps // trail_interval)


@dataclass(frozen=True)
class SimConfig:
    peers: int = 100
    gpu_mix: dict[str, float] = field(default_factory=lambda: {"rtx3090": 0.5, "rtx4090": 0.3, "a100": 0.2})
    link_mix: dict[str, float] = field(default_factory=lambda: {"home": 1.0})
    model: str = "1b"
    params: int | None = None  # overrides the preset's parameter count (calibration against a tiny model)
    mfu: float = 0.4  # model FLOPs utilization of a training step on a GPU (assumption, typical 0.3-0.5)
    rounds: int = 30
    round_compute_s: float = (
        600.0  # nominal wall time of a round's inner steps on every peer (speed-weighted work)
    )
    inner_steps: int = 500  # H
    trail_interval: int = 10  # k: inner steps per trail segment
    segments_per_audit: int = 2  # an audit fetches and replays this many segments (proof.segments_per_audit)
    audit_timeout_s: float = 30.0  # the floor of the coordinator's wait for verdicts (see verdict_wait_s)
    audits_at_once: int = 2  # a verifier's audits run this many at a time (gpunite.swarm.audits.AUDITS_AT_ONCE)
    deadline_slack: float = 0.25
    speed_jitter: float = 0.05  # sigma of the log-normal per-round speed noise
    overlap: bool = True
    # round_compute_s already holds the device time the overlapped audits' replays take: a run measured on
    # shared cores, where the replays ran beside the steps and slowed them (calibration); not added again
    replays_in_compute: bool = False
    adaptive: bool = True
    group_size: int = 0  # 0: one flat sharded aggregation over the whole roster (the implemented protocol)
    audit_fraction: float = 0.25
    detect_probability: float = 0.99
    cheater_fraction: float = 0.0
    session_hours: float | None = None  # mean online session length; None: no churn
    offline_hours: float | None = None  # mean offline gap; default: same as the session
    session_shape: float = 1.0  # Weibull shape of sessions and gaps (1: exponential, < 1: heavy-tailed)
    seed: int = 0
    costs: ProtocolCosts = field(default_factory=ProtocolCosts)

    def validate(self) -> None:
        if self.peers < 1:
            raise SimError(f"--peers must be >= 1, got {self.peers}")
        if self.rounds < 1:
            raise SimError(f"rounds must be >= 1, got {self.rounds}")
        for mix, known, what in ((self.gpu_mix, GPUS, "GPU"), (self.link_mix, LINKS, "link profile")):
            unknown = sorted(set(mix) - set(known))
            if unknown:
                raise SimError(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(known)}")
            if not mix or any(share < 0 for share in mix.values()) or sum(mix.values()) <= 0:
                raise SimError(f"the {what} mix needs positive shares, got {mix}")
        if self.params is None:
            from gpunite.model import PRESETS

            if self.model not in PRESETS:
                raise SimError(f"unknown model preset {self.model!r}; choose one of {', '.join(PRESETS)}")
        if not 0 < self.mfu <= 1:
            raise SimError(f"mfu must be in (0, 1], got {self.mfu}")
        if self.session_hours is not None and self.session_hours <= 0:
            raise SimError(f"--churn (mean session hours) must be > 0, got {self.session_hours}")
        if not 0 <= self.audit_fraction <= 1 or not 0 <= self.cheater_fraction <= 1:
            raise SimError("audit_fraction and cheater_fraction must be between 0 and 1")
        if min(self.inner_steps, self.trail_interval, self.segments_per_audit, self.audits_at_once) < 1:
            raise SimError("inner_steps, trail_interval, segments_per_audit and audits_at_once must be >= 1")

    def trail_segments(self) -> int:
        return trail_segments(self.inner_steps, self.trail_interval)

    def param_count(self) -> int:
        if self.params is not None:
            return self.params
        from gpunite.model import PRESETS, param_count

        return param_count(PRESETS[self.model])


@dataclass
class SimResult:
    peers: int
    rounds_attempted: int
    rounds_completed: int
    sim_seconds: float
    useful_tflops: float  # model FLOPs of merged honest contributions per second of run time / 1e12
    online_peak_tflops: float  # mean sum of the online peers' peak TFLOPS
    compute_utilization: float  # merged honest work / compute capacity of the online peers
    availability: float  # share of run time spent in rounds that merged work
    rounds_completed_ratio: float
    mean_round_s: float
    mean_online_peers: float
    mean_contributors: float
    bytes_sent_per_peer_round: float
    bytes_received_per_peer_round: float
    work_assigned_flops: float
    work_merged_flops: float
    work_lost_flops: float  # late, departed, rejected or banned
    work_cheat_merged_flops: float
    bytes_sent_total: float
    bytes_received_total: float
    # where the bytes per peer per round go (each counted once, as sent)
    exchange_bytes_per_peer_round: float  # slices to their owners, merged slices back, framing
    audit_bytes_per_peer_round: float  # deltas, trail segments and final weights fetched by verifiers
    state_bytes_per_peer_round: float  # global state downloaded by (re)joining peers
    audits: int
    late_verdicts: int  # audits whose verdict missed the close (their contributions did not merge)
    cheaters: int
    cheaters_caught: int
    detect_rounds_mean: float | None  # rounds from a cheater's first contribution to its ban
    detect_rounds_expected: float | None  # 1 / (audit_fraction x detect_probability)
    stalled_seconds: float
    wall_seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def parse_mix(text: str, known: dict, what: str) -> dict[str, float]:
    """'rtx3090:0.5,a100:0.5' (a bare name means share 1) -> {'rtx3090': 0.5, 'a100': 0.5}."""
    mix: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, share = item.partition(":")
        name = name.strip().lower()
        if name not in known:
            raise SimError(f"unknown {what} {name!r} in {text!r}; choose from {', '.join(known)}")
        try:
            mix[name] = mix.get(name, 0.0) + (float(share) if share else 1.0)
        except ValueError:
            raise SimError(f"share of {name!r} in {text!r} is not a number; write NAME:SHARE") from None
    if not mix or sum(mix.values()) <= 0:
        raise SimError(f"{what} mix {text!r} is empty; write NAME:SHARE,NAME:SHARE")
    return mix


def _apportion(mix: dict[str, float], total: int) -> list[tuple[str, int]]:
    """Whole counts per name that sum to `total`, by largest remainder (deterministic)."""
    names = sorted(mix)
    weights = np.array([mix[n] for n in names], dtype=float)
    exact = weights / weights.sum() * total
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return list(zip(names, counts.tolist()))


@dataclass
class _Peers:
    """Per-peer arrays; peer i is row i of every array."""

    peak_flops: np.ndarray  # FLOP/s at peak
    train_flops: np.ndarray  # FLOP/s a training step really gets (peak x mfu / compute_scale)
    up_Bps: np.ndarray
    down_Bps: np.ndarray
    one_way_s: np.ndarray
    cheater: np.ndarray
    online: np.ndarray
    next_toggle: np.ndarray  # time of the next session start or end
    online_since: np.ndarray
    ready_at: np.ndarray  # when a (re)joined peer holds the global state
    lag_s: np.ndarray  # how late a peer starts this round's steps (it fetched the last merge slowly)
    banned: np.ndarray
    first_cheat_round: np.ndarray


def _build_peers(cfg: SimConfig, rng: np.random.Generator) -> _Peers:
    n = cfg.peers
    peak = np.empty(n)
    start = 0
    for name, count in _apportion(cfg.gpu_mix, n):
        peak[start : start + count] = GPUS[name].peak_tflops * 1e12
        start += count
    rng.shuffle(peak)
    down, up, one_way = np.empty(n), np.empty(n), np.empty(n)
    start = 0
    for name, count in _apportion(cfg.link_mix, n):
        profile = LINKS[name]
        figures = np.array([profile.for_peer(i) for i in range(min(count, profile.slow_every))])
        reps = figures[np.arange(count) % len(figures)] if count else figures[:0]
        down[start : start + count], up[start : start + count], one_way[start : start + count] = reps.T
        start += count
    order = rng.permutation(n)
    down, up, one_way = down[order], up[order], one_way[order]
    cheater = rng.random(n) < cfg.cheater_fraction
    if cfg.session_hours is None:
        online = np.ones(n, dtype=bool)
        next_toggle = np.full(n, np.inf)
    else:
        on_mean, off_mean = _churn_means(cfg)
        online = rng.random(n) < on_mean / (on_mean + off_mean)
        next_toggle = np.where(
            online,
            _weibull(rng, on_mean, cfg.session_shape, n),
            _weibull(rng, off_mean, cfg.session_shape, n),
        )
    return _Peers(
        peak_flops=peak,
        train_flops=peak * cfg.mfu / cfg.costs.compute_scale,
        up_Bps=up * 1e6 / 8,
        down_Bps=down * 1e6 / 8,
        one_way_s=one_way / 1e3,
        cheater=cheater,
        online=online,
        next_toggle=next_toggle,
        online_since=np.zeros(n),
        ready_at=np.zeros(n),
        lag_s=np.zeros(n),
        banned=np.zeros(n, dtype=bool),
        first_cheat_round=np.full(n, -1),
    )


def _churn_means(cfg: SimConfig) -> tuple[float, float]:
    on = float(cfg.session_hours) * 3600.0
    off = (cfg.offline_hours if cfg.offline_hours is not None else cfg.session_hours) * 3600.0
    return on, off


def _weibull(rng: np.random.Generator, mean: float, shape: float, size: int) -> np.ndarray:
    scale = mean / math.gamma(1.0 + 1.0 / shape)
    return scale * rng.weibull(shape, size)


@dataclass
class _Exchange:
    seconds: float
    sent: np.ndarray  # bytes per roster peer
    received: np.ndarray
    ready_s: np.ndarray  # per roster peer: seconds after the close at which it holds the merged update


def exchange_round(
    param_bytes: float,
    contributor: np.ndarray,
    owner: np.ndarray,
    up_Bps: np.ndarray,
    down_Bps: np.ndarray,
    group: np.ndarray,
    costs: ProtocolCosts,
    rtt_s: float,
    adaptive: bool,
) -> _Exchange:
    """Bytes and time of one round's sharded aggregation over the roster (arrays over roster peers).

    `contributor` marks the accepted contributions. Inside each group, owner j holds a share f_j of the
    parameter vector: it pulls f_j of every other contributor's pseudo-gradient (one request each) and
    serves the merged f_j to every other group member, who each fetch it (one request each); so each
    contributor sends all the slices it does not own and every member receives all of them. Across groups
    (if there are several), owners of the same share reduce their merged slices: about 2 f_j each way.
    Every request and its reply add `costs.wire.request_bytes` of framing, shared by both ends."""
    n = len(contributor)
    n_groups = int(group.max()) + 1 if n else 0
    bandwidth = np.minimum(up_Bps, down_Bps) if adaptive else np.ones(n)
    owner_weight = np.where(owner, bandwidth, 0.0)
    group_weight = np.bincount(group, weights=owner_weight, minlength=n_groups)
    share = np.divide(owner_weight, group_weight[group], out=np.zeros(n), where=group_weight[group] > 0)
    members = np.bincount(group, minlength=n_groups)[group]
    contributors = np.bincount(group, weights=contributor.astype(float), minlength=n_groups)[group]
    owners = np.bincount(group, weights=owner.astype(float), minlength=n_groups)[group]
    vector = param_bytes
    # scatter: contributors send the slices they do not own; owners receive from the other contributors
    scatter_sent = np.where(contributor, vector * (1.0 - share), 0.0)
    scatter_received = share * vector * (contributors - contributor)
    # gather: owners serve their merged slice to the other members; everyone fetches the slices it lacks
    any_contribution = contributors > 0
    gather_sent = np.where(any_contribution, share * vector * (members - 1), 0.0)
    gather_received = np.where(any_contribution, vector * (1.0 - share), 0.0)
    cross_sent = cross_received = np.zeros(n)
    cross_s = 0.0
    if n_groups > 1:
        cross_sent = cross_received = np.where(owner & any_contribution, 2.0 * share * vector, 0.0)
        cross_s = float(np.max(cross_sent / np.minimum(up_Bps, down_Bps), initial=0.0))
    # requests each peer makes or serves: slice pulls (owner -> other contributors), aggregate fetches
    # (member -> other owners)
    pulls_made = np.where(owner, contributors - contributor, 0.0)
    pulls_served = np.where(contributor, owners - owner, 0.0)
    fetches_made = np.where(any_contribution, owners - owner, 0.0)
    fetches_served = np.where(owner & any_contribution, members - 1.0, 0.0)
    framing = 0.5 * costs.wire.request_bytes * (pulls_made + pulls_served + fetches_made + fetches_served)
    messages = np.where(contributor, owners, 0) + np.where(owner, contributors + members, 0) + owners
    if n_groups > 1:
        messages = messages + np.where(owner, 2 * (n_groups - 1), 0)
    cpu_s = messages * costs.message_overhead_s
    scatter_s = float(
        np.max(np.maximum(scatter_sent / up_Bps, scatter_received / down_Bps) + cpu_s, initial=0.0)
    )
    serve_s = float(np.max(gather_sent / up_Bps, initial=0.0))
    merged_at = scatter_s + cross_s + costs.dht_reads * dht_hops(n) * rtt_s
    ready_s = merged_at + np.maximum(gather_received / down_Bps, serve_s)
    return _Exchange(
        seconds=merged_at + serve_s,
        sent=scatter_sent + gather_sent + cross_sent + framing,
        received=scatter_received + gather_received + cross_received + framing,
        ready_s=ready_s,
    )


def draw_verifiers(trainer: np.ndarray, coordinator: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """One verifier per audited contribution, uniform over the roster without its trainer and (with three
    peers or more) without the coordinator, as gpunite.swarm.audits.assign draws them from the beacon."""
    if n < 2:
        raise SimError("an audit needs a verifier other than the trainer: at least 2 peers")
    if n == 2:
        return 1 - trainer
    same = trainer == coordinator
    low, high = np.minimum(trainer, coordinator), np.maximum(trainer, coordinator)
    pick = np.floor(rng.random(trainer.size) * np.where(same, n - 1, n - 2)).astype(np.int64)
    pick = pick + (pick >= low)
    return pick + ((pick >= high) & ~same)


def verdict_wait_s(cfg: SimConfig, roster: int, typical_Bps: float) -> float:
    """How long a coordinator waits for verdicts after its beacon, as gpunite.swarm.peer.Peer.audit_timeout_s
    plans it: the floor plus 3 x what the busiest verifier owes in expectation, each audit a replay at the
    trainer's step time (doubled with overlap, when the verifier's next round shares its device) and a download
    of the peer's planning figure for an audit's bytes (the delta, both states of every segment and the final
    weights) at `typical_Bps`, the speed the peer measured on its recent big transfers."""
    per_verifier = math.ceil(cfg.audit_fraction * roster / max(1, roster - 1))
    step_s = cfg.round_compute_s / cfg.inner_steps
    replay_s = cfg.segments_per_audit * cfg.trail_interval * step_s * (2 if cfg.overlap else 1)
    fetch_s = cfg.param_count() * (1 + 2 * TRAIL_STATE_BYTES * cfg.segments_per_audit + TRAIL_FINAL_BYTES) / typical_Bps
    return cfg.audit_timeout_s + 3.0 * per_verifier * (replay_s + fetch_s)


@dataclass
class _Audits:
    trainer: np.ndarray  # roster indices of the audited contributions' trainers
    verifier: np.ndarray
    verdict_s: np.ndarray  # seconds after the beacon at which each verdict is published
    busy_s: float  # the longest any verifier is busy auditing (it serves its slice only after that)
    replay_busy_s: float  # the longest any verifier spends on replay compute (the device, not the link)


def audit_round(
    audited: np.ndarray,
    coordinator: int,
    audit_bytes: float,
    replay_flops: np.ndarray,
    train_flops: np.ndarray,
    up_Bps: np.ndarray,
    down_Bps: np.ndarray,
    request_rtts: float,
    rtt_s: float,
    rng: np.random.Generator,
    lanes: int = 1,
) -> _Audits:
    """When the verdicts of a round's audits come in (arrays over roster peers; `audited` marks trainers).

    A verifier runs its audits `lanes` at a time (gpunite.swarm.audits.AUDITS_AT_ONCE), in the beacon's
    (random) order, each starting as soon as one of its lanes is free: each downloads `audit_bytes` from the
    trainer at the slower of the two links, in `request_rtts` sequential requests, then replays
    `replay_flops[trainer]` at its own `train_flops`."""
    if lanes < 1:
        raise SimError(f"a verifier needs at least one audit lane, got {lanes}")
    n = audited.size
    trainer = np.flatnonzero(audited)
    if trainer.size == 0:
        empty = np.zeros(0)
        return _Audits(trainer, trainer.copy(), empty, 0.0, 0.0)
    verifier = draw_verifiers(trainer, coordinator, n, rng)
    transfer_s = audit_bytes / np.minimum(up_Bps[trainer], down_Bps[verifier]) + request_rtts * rtt_s
    replay = replay_flops[trainer] / train_flops[verifier]
    duration = transfer_s + replay
    order = np.lexsort((rng.random(trainer.size), verifier))
    sorted_verifier = verifier[order]
    first = np.r_[True, sorted_verifier[1:] != sorted_verifier[:-1]]
    group_start = np.flatnonzero(first)[np.cumsum(first) - 1]
    position = np.arange(trainer.size) - group_start  # place of each audit in its verifier's queue
    # list scheduling, one queue place at a time over every verifier at once: the earliest free lane
    free_at = np.zeros((n, lanes))
    verdict_s = np.empty(trainer.size)
    for place in range(int(position.max()) + 1):
        at = order[position == place]
        who = verifier[at]
        lane = np.argmin(free_at[who], axis=1)
        free_at[who, lane] += duration[at]
        verdict_s[at] = free_at[who, lane]
    replay_busy = np.bincount(verifier, weights=replay, minlength=n)
    return _Audits(trainer, verifier, verdict_s, float(free_at.max()), float(replay_busy.max()))


class _Run:
    """The mutable state of one simulation: peers, clock, random stream and running totals."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.peers = _build_peers(cfg, self.rng)
        self.n_params = n_params = cfg.param_count()
        wire = cfg.costs.wire
        self.param_bytes = n_params * wire.slice_bytes_per_param
        self.state_bytes = n_params * wire.state_bytes_per_param
        # an audit replays min(segments_per_audit, H / k) segments of k steps each
        self.audit_segments = min(cfg.segments_per_audit, max(cfg.inner_steps // cfg.trail_interval, 1))
        self.audit_ratio = (
            min(self.audit_segments * cfg.trail_interval, cfg.inner_steps) / cfg.inner_steps
        ) * cfg.costs.audit_compute_scale
        self.deadline_s = cfg.round_compute_s * (1.0 + cfg.deadline_slack)
        self.churn_means = _churn_means(cfg) if cfg.session_hours is not None else (math.inf, math.inf)
        self.t = 0.0
        self.rounds_attempted = 0
        self.rounds_completed = 0
        self.detect_rounds: list[np.ndarray] = []
        self.totals = dict.fromkeys(
            (
                "assigned",
                "merged",
                "lost",
                "cheat",
                "capacity",
                "progress_s",
                "stalled_s",
                "sent",
                "received",
                "peer_rounds",
                "contributors",
                "online",
                "peak",
                "audits",
                "late_verdicts",
                "exchange_bytes",
                "audit_bytes",
                "state_bytes",
            ),
            0.0,
        )

    def advance(self, until: float) -> None:
        """Apply every session start and end up to `until` and count the online peers' capacity till then."""
        peers, totals = self.peers, self.totals
        on_mean, off_mean = self.churn_means
        while True:
            due = np.flatnonzero(peers.next_toggle <= until)
            if due.size == 0:
                break
            leaving = due[peers.online[due]]
            coming = due[~peers.online[due]]
            counted = leaving[~peers.banned[leaving]]  # a banned cheater's compute is no capacity of the run
            totals["capacity"] += float(
                np.sum(
                    peers.train_flops[counted] * (peers.next_toggle[counted] - peers.online_since[counted])
                )
            )
            peers.online[due] = ~peers.online[due]
            peers.online_since[coming] = peers.next_toggle[coming]
            # a (re)joining peer downloads the global state from a peer that has it before it can train
            peers.ready_at[coming] = peers.next_toggle[coming] + self.state_bytes / peers.down_Bps[coming]
            peers.lag_s[coming] = 0.0
            totals["received"] += self.state_bytes * coming.size
            totals["sent"] += self.state_bytes * coming.size
            totals["state_bytes"] += self.state_bytes * coming.size
            durations = np.where(
                peers.online[due],
                _weibull(self.rng, on_mean, self.cfg.session_shape, due.size),
                _weibull(self.rng, off_mean, self.cfg.session_shape, due.size),
            )
            peers.next_toggle[due] += durations
        online = peers.online
        counted = online & ~peers.banned
        totals["capacity"] += float(
            np.sum(peers.train_flops[counted] * (until - peers.online_since[counted]))
        )
        peers.online_since[online] = until
        self.t = until

    def stall(self) -> bool:
        """No peer can train: wait for the next join (or state download). False when nobody will ever come."""
        peers = self.peers
        waiting = peers.online & ~peers.banned
        pending = np.concatenate([peers.ready_at[waiting], peers.next_toggle[~peers.online & ~peers.banned]])
        pending = pending[pending > self.t]
        if pending.size == 0 or not np.isfinite(pending.min()):
            return False
        next_t = float(pending.min())
        self.totals["stalled_s"] += next_t - self.t
        self.advance(next_t)
        return True

    def round(self, roster: np.ndarray) -> None:
        cfg, peers, totals, rng = self.cfg, self.peers, self.totals, self.rng
        costs = cfg.costs
        n = roster.size
        train_flops = peers.train_flops[roster]
        up, down = peers.up_Bps[roster], peers.down_Bps[roster]
        cheater = peers.cheater[roster]
        jitter = rng.lognormal(0.0, cfg.speed_jitter, n) if cfg.speed_jitter > 0 else np.ones(n)
        finish_s = peers.lag_s[roster] + cfg.round_compute_s * jitter
        # speed-weighted shares: every peer's work nominally takes the same time
        work = train_flops * cfg.round_compute_s
        # an online peer's next toggle is its departure (inf: never)
        leave_s = peers.next_toggle[roster] - self.t
        # the round closes once every live roster peer has committed, or at the deadline
        close_s = min(self.deadline_s, float(np.max(np.minimum(finish_s, leave_s))))
        # a contributor must still be there after the close: owners pull its slices then
        owner = leave_s > close_s
        if cfg.adaptive:
            # a peer whose exchange would take far longer than the median one skips instead of stalling all
            alone_s = self.param_bytes / np.minimum(up, down)
            owner &= alone_s <= 3.0 * float(np.median(alone_s))
        committed = (finish_s <= close_s) & owner
        group = rng.permutation(n) // cfg.group_size if cfg.group_size > 0 else np.zeros(n, dtype=np.int64)
        rtt_s = 2.0 * float(np.median(peers.one_way_s[roster]))

        # audits: the coordinator's own contribution and a sampled fraction of the others; a random verifier
        # per audit fetches the delta, the drawn trail segments and the final weights, then replays
        coordinator = int(rng.integers(n))
        audited = committed & (rng.random(n) < cfg.audit_fraction)
        audited[coordinator] = committed[coordinator]
        if n < 2:
            audited[:] = False  # nobody but its trainer could verify it: it merges on the cheap checks
        # the delta comes in one request per slice of the trainer's aggregation group
        slices = min(cfg.group_size, n) if cfg.group_size > 0 else n
        # with overlap a round is carried onto the merge that arrives during it: its audit also fetches the
        # trainer's delta of the round before (where its steps started)
        audit_bytes = cfg.costs.wire.audit_bytes(self.n_params, slices, self.audit_segments, cfg.overlap,
                                                 trail_segments=cfg.trail_segments())
        audits = audit_round(
            audited,
            coordinator,
            audit_bytes,
            self.audit_ratio * work,
            train_flops,
            up,
            down,
            slices + self.audit_segments + 1,
            rtt_s,
            rng,
            cfg.audits_at_once,
        )
        on_time = audits.verdict_s <= verdict_wait_s(cfg, n, float(np.median(np.minimum(up, down))))
        detected = cheater[audits.trainer] & (rng.random(audits.trainer.size) < cfg.detect_probability)
        # a verdict that misses the close keeps its contribution out without blaming anyone (its work is lost)
        caught = audits.trainer[detected & on_time]
        accepted = committed.copy()
        accepted[audits.trainer[~on_time]] = False
        accepted[caught] = False
        audit_bytes_round = audit_bytes * audits.trainer.size

        exchange = exchange_round(
            self.param_bytes, accepted, owner, up, down, group, costs, rtt_s, cfg.adaptive
        )
        comm_s = costs.round_overhead_s + audits.busy_s + exchange.seconds
        # a slice owner (the coordinator is one) that vanishes before the merge is in costs a failover wait
        if np.any(owner & (leave_s <= close_s + comm_s)):
            comm_s += costs.failover_s
        # with overlap the exchange of round r runs during round r + 1's steps (one-round-delayed outer step);
        # replaying audits needs the same device as training, so that part of the audits cannot hide
        unhidden_s = 0.0 if cfg.replays_in_compute else audits.replay_busy_s
        round_s = max(close_s + unhidden_s, comm_s) if cfg.overlap else close_s + comm_s

        merged = accepted
        totals["assigned"] += float(work.sum())
        totals["merged"] += float(work[merged & ~cheater].sum())
        totals["cheat"] += float(work[merged & cheater].sum())
        totals["lost"] += float(work[~merged].sum())
        totals["sent"] += float(exchange.sent.sum()) + audit_bytes_round
        totals["received"] += float(exchange.received.sum()) + audit_bytes_round
        totals["exchange_bytes"] += float(exchange.sent.sum())
        totals["audit_bytes"] += audit_bytes_round
        totals["audits"] += audits.trainer.size
        totals["late_verdicts"] += float(np.sum(~on_time))
        totals["peer_rounds"] += n
        totals["contributors"] += float(committed.sum())
        totals["online"] += float(peers.online.sum())
        totals["peak"] += float(peers.peak_flops[peers.online].sum())
        self.rounds_attempted += 1
        if merged.any():
            self.rounds_completed += 1
            totals["progress_s"] += round_s

        # a cheater's first contribution starts its detection clock; a caught cheater is banned
        first = roster[committed & cheater & (peers.first_cheat_round[roster] < 0)]
        peers.first_cheat_round[first] = self.rounds_attempted
        banned = roster[caught]
        self.detect_rounds.append(self.rounds_attempted - peers.first_cheat_round[banned] + 1)
        peers.banned[banned] = True

        # a peer that receives the merged update after it needs it starts the next round's steps late
        needed_by = round_s + (cfg.round_compute_s if cfg.overlap else 0.0)
        lag = np.maximum(close_s + costs.round_overhead_s + audits.busy_s + exchange.ready_s - needed_by, 0.0)
        self.advance(self.t + round_s)
        peers.lag_s[roster] = np.where(peers.online[roster], lag, 0.0)

    def result(self, wall_s: float) -> SimResult:
        cfg, totals = self.cfg, self.totals
        sim_s = self.t
        n_rounds = max(self.rounds_attempted, 1)
        peer_rounds = max(totals["peer_rounds"], 1.0)
        detect = np.concatenate(self.detect_rounds) if self.detect_rounds else np.zeros(0)
        expected = (
            1.0 / (cfg.audit_fraction * cfg.detect_probability)
            if cfg.audit_fraction > 0 and cfg.detect_probability > 0
            else None
        )
        return SimResult(
            peers=cfg.peers,
            rounds_attempted=self.rounds_attempted,
            rounds_completed=self.rounds_completed,
            sim_seconds=sim_s,
            useful_tflops=totals["merged"] / sim_s / 1e12 if sim_s > 0 else 0.0,
            online_peak_tflops=totals["peak"] / n_rounds / 1e12,
            compute_utilization=totals["merged"] / totals["capacity"] if totals["capacity"] > 0 else 0.0,
            availability=totals["progress_s"] / sim_s if sim_s > 0 else 0.0,
            rounds_completed_ratio=self.rounds_completed / n_rounds,
            mean_round_s=(sim_s - totals["stalled_s"]) / n_rounds,
            mean_online_peers=totals["online"] / n_rounds,
            mean_contributors=totals["contributors"] / n_rounds,
            bytes_sent_per_peer_round=totals["sent"] / peer_rounds,
            bytes_received_per_peer_round=totals["received"] / peer_rounds,
            work_assigned_flops=totals["assigned"],
            work_merged_flops=totals["merged"],
            work_lost_flops=totals["lost"],
            work_cheat_merged_flops=totals["cheat"],
            bytes_sent_total=totals["sent"],
            bytes_received_total=totals["received"],
            exchange_bytes_per_peer_round=totals["exchange_bytes"] / peer_rounds,
            audit_bytes_per_peer_round=totals["audit_bytes"] / peer_rounds,
            state_bytes_per_peer_round=totals["state_bytes"] / peer_rounds,
            audits=int(totals["audits"]),
            late_verdicts=int(totals["late_verdicts"]),
            cheaters=int(self.peers.cheater.sum()),
            cheaters_caught=int(detect.size),
            detect_rounds_mean=float(detect.mean()) if detect.size else None,
            detect_rounds_expected=expected,
            stalled_seconds=totals["stalled_s"],
            wall_seconds=wall_s,
        )


def simulate(cfg: SimConfig) -> SimResult:
    """Run `cfg.rounds` rounds (time with no trainer online is counted as a stall); seeded, so repeatable."""
    import time

    cfg.validate()
    started = time.perf_counter()
    run = _Run(cfg)
    while run.rounds_attempted < cfg.rounds:
        peers = run.peers
        roster = np.flatnonzero(peers.online & (peers.ready_at <= run.t) & ~peers.banned)
        if roster.size:
            run.round(roster)
        elif not run.stall():
            break
    return run.result(time.perf_counter() - started)
