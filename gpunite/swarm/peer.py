"""A swarm peer: round after round it trains its assigned work, commits, agrees on the merge, aggregates its
slice and applies the outer step, so that every honest peer ends each round with the same weights hash.

One round r, as every peer runs it (`Peer.run_round`):
1. roster_r comes from the round close of r - 1; work units from the work plan (deterministic).
2. trainers run their inner steps, compress the pseudo-gradient, publish a signed Contribution.
3. the round's coordinator (the roster member with the smallest sha256(prev block hash + peer id) that is
   alive; the next one takes over if it vanishes) signs the audit beacon; the verifiers it draws replay trail
   segments and publish verdicts (`gpunite.swarm.audits`); then it publishes a signed RoundClose: accepted
   contributions (audited ones only with their accept verdicts), the roster of r + 1. Every peer checks it.
4. sharded aggregation: roster member i owns slice i; it pulls slice i of every accepted contribution,
   checks and merges it robustly, and serves the result; every peer fetches all slices (or, if an owner is
   gone, merges that slice itself) and applies the outer Nesterov step.
5. every peer signs the round's Block; a peer whose weights disagree with the majority re-syncs.

With `train.overlap` (on by default), steps 3-5 of round r run on the round loop while round r + 1's inner
steps run on a training thread, so the exchange does not stall training. Round r + 1 starts from the weights
that start round r less this peer's own delta committed to round r (its own end of round r, as any verifier
can rebuild it from public data); when round r's merge arrives, the steps so far are carried onto the merged
weights at the next trail step (`TrailRecorder.rebase`) and training goes on from there. Its contribution is
then relative to the merged weights, as a synchronous round's is, and its trail reads as one from them; a
verifier replays the steps before the rebase from where they ran (`Contribution.start_hash`,
`start_contribution`, `rebase_step`). Assignments run one round ahead: a close of round r names the roster of
round r + 2, and a late joiner syncs the state of round r with the weights before it.
Measured within 1% of synchronous rounds' held-out loss at H=12 and H=100 (benchmarks/diloco_quality.py
--overlap rebase); the one-round-delayed step used before (every round based on the weights one merge old)
cost 2-19%, growing with H.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from gpunite.errors import GpuniteError
from gpunite.identity import Identity
from gpunite.manifest import Manifest
from gpunite.records import (
    GENESIS,
    Block,
    Contribution,
    Rejection,
    WorkUnit,
    parse_record_as,
    record_bytes,
    sign_record,
)
from gpunite.swarm.audits import RoundAudits, serve_trail
from gpunite.swarm.checks import CheckResult, ContributionCheck, RoundContext, check_contribution, check_slice
from gpunite.swarm.membership import Membership
from gpunite.swarm.node import SwarmError, SwarmNode
from gpunite.swarm.protocol import (
    HANDLE_AGGREGATE,
    HANDLE_FILE,
    HANDLE_SLICE,
    HANDLE_STATE,
    HANDLE_TRAIL,
    ProtocolError,
    RosterEntry,
    RoundClose,
    SliceMissing,
    parse_announcement,
    parse_swarm_message,
    run_key,
)
from gpunite.swarm.state_sync import (
    GlobalState,
    ParamLayout,
    check_bans,
    file_handler,
    max_state_bytes,
    state_from_frame,
    state_to_frame,
)
from gpunite.util import in_parallel

log = logging.getLogger("gpunite.swarm.peer")
RecordHook = Callable[[Any], None]


class PeerError(GpuniteError):
    """The peer cannot go on (for example: no peer serves the state it needs)."""


@dataclass
class PeerConfig:
    home: Path
    roles: list[str] = field(default_factory=lambda: ["trainer"])
    heartbeat_s: float = 2.0
    poll_s: float = 0.25
    takeover_s: float = 4.0  # a backup coordinator of rank k waits k x this for the ones before it
    max_rounds: int | None = None  # stop after this many rounds (None: run until stopped)
    until_round: int | None = None  # stop once the global state reaches this round
    speed: float | None = None  # relative speed for work sharing; None measures matmul TFLOPS
    device: str = "cpu"
    status_path: Path | None = None
    cheat: str | None = None  # demos and tests only: make this peer send a hostile delta (see CHEATS)
    adversary: str | None = None  # demos and tests only: cheat with a proof.adversary mode (SWARM_ADVERSARIES)
    audit_timeout_s: float = 30.0  # how long a coordinator waits for verdicts; later ones miss the round


CHEATS = ("scaled", "random", "nan")
CLOSE_RETRY_S = 15.0  # a refused round close is checked again after this long
PREFETCH_TRIES = 3  # times a slice owner tries a trainer for its slice while the round waits to close
TAKEOVER_DHT_FACTOR = 3.0  # a backup waits this many times the slowest recent DHT read or store (store + read + margin)
HOME_UPLINK_BITS_PER_S = 20e6  # a trainer's upload speed assumed for the verdict wait until one is measured
# With overlap, the next round's steps yield the CPU to this round's exchange and audits, which every peer of
# the swarm waits on (nice +10: about a tenth of a core's share against them). Linux only (per-thread nice);
# torch's intra-op worker threads, started before, keep their priority (the benchmarks train on one thread).
TRAINING_NICE = 10


def lower_thread_priority(nice: int = TRAINING_NICE) -> bool:
    """Run the calling thread (and threads it starts later) at a lower CPU priority; False where unsupported."""
    if sys.platform != "linux" or nice <= 0:  # elsewhere a thread id is no process id: do not renice by mistake
        return False
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as exc:
        log.debug("could not lower the training thread's priority: %s", exc)
        return False
    return True


@dataclass
class _TrainingJob:
    """A round training on its own thread while the round loop runs the previous round's exchange."""

    round: int
    thread: threading.Thread | None = None
    result: bool = False
    error: BaseException | None = None
    # The round's base (weights, hash), handed over by the round loop once the merge before it is in
    base: tuple[torch.Tensor, str] | None = None
    arrived: threading.Event = field(default_factory=threading.Event)

    def deliver(self, weights: torch.Tensor, weights_hash: str) -> None:
        self.base = (weights, weights_hash)
        self.arrived.set()


@dataclass
class RoundTiming:
    """Where a peer's wall time went, for the status file and the utilization benchmark."""

    compute_s: float = 0.0  # inner steps and the pseudo-gradient's compression
    trail_s: float = 0.0  # the training thread's share of recording the trail (checkpoint copies, write backlog)
    wall_s: float = 0.0
    started: float = 0.0
    # The whole time spent training rounds (compute, trail, data, commit and publish) before the round in
    # training now, and when that one began (perf_counter; None between rounds): one tuple, swapped whole.
    training: tuple[float, float | None] = (0.0, None)

    def begin_training(self) -> None:
        self.training = (self.training[0], time.perf_counter())

    def end_training(self) -> None:
        done, since = self.training
        self.training = (done + (time.perf_counter() - since if since is not None else 0.0), None)

    def training_s(self) -> float:
        """Time spent training, the round in training now included: never behind compute_s and trail_s."""
        done, since = self.training
        return done + (time.perf_counter() - since if since is not None else 0.0)


def coordinator_order(round_seed: str, peer_ids: list[str]) -> list[str]:
    """Candidates for coordinating a round, best first: no one picks its rank, the round seed decides."""
    return sorted(peer_ids, key=lambda pid: hashlib.sha256((round_seed + pid).encode()).hexdigest())


def hostile_delta(mode: str | None, pseudo_grad: torch.Tensor) -> torch.Tensor:
    """The cheater hook (`--cheat`): a scaled-up or random delta in place of the honest one."""
    if mode == "scaled":
        return pseudo_grad * 50.0
    if mode == "random":
        noise = torch.randn(pseudo_grad.shape, generator=torch.Generator().manual_seed(0))
        return noise * (float(pseudo_grad.norm()) / max(float(noise.norm()), 1e-12))
    return pseudo_grad


def parse_contribution(data: bytes) -> Contribution:
    return parse_record_as(data, Contribution)


def parse_block(data: bytes) -> Block:
    return parse_record_as(data, Block)


def parse_slice_missing(data: bytes) -> SliceMissing:
    return parse_swarm_message(data, SliceMissing)  # type: ignore[return-value]


def parse_close(data: bytes) -> RoundClose:
    return parse_swarm_message(data, RoundClose)  # type: ignore[return-value]


class Peer:
    """One peer of one run. Build it with `gpunite.swarm.bootstrap.start_run` / `join_run`, then call `run()`."""

    def __init__(self, manifest: Manifest, prepared_dir: Path, identity: Identity, node: SwarmNode,
                 config: PeerConfig, state: GlobalState | None = None, on_record: RecordHook | None = None,
                 fetch_file: Callable[[str, str], Path] | None = None) -> None:
        from gpunite.data.batches import training_units
        from gpunite.data.shards import ShardIndex
        from gpunite.model import build_model, config_from_manifest
        from gpunite.proof.trail import TrailRecorder
        from gpunite.swarm.assignment import WorkPlan
        from gpunite.train.compression import ErrorFeedback
        from gpunite.train.diloco import OuterOptimizer
        from gpunite.train.trainer import InnerTrainer, unique_named_parameters
        from gpunite.train.weights import flatten

        self.manifest = manifest
        self.run_id = manifest.run_id
        self.train_cfg = manifest.train
        self.prepared_dir = prepared_dir
        self.identity = identity
        self.peer_id = identity.peer_id
        self.node = node
        self.config = config
        self.on_record = on_record
        self._fetch_file = fetch_file
        self.run_dir = config.home / "runs" / self.run_id
        self.run_dir.mkdir(parents=True, exist_ok=True)

        self.index = ShardIndex.load(prepared_dir)
        self.model_config = config_from_manifest(manifest)
        self.model = build_model(self.model_config, seed=manifest.run.seed)
        self.params = [param for _, param in unique_named_parameters(self.model)]
        self.layout = ParamLayout.of(self.model)
        self.numel = self.layout.numel
        ranges = [WorkUnit(shard=r.shard_sha256, first=r.first, count=r.count)
                  for r in training_units(self.index, manifest.data.seq_len)]
        self.plan = WorkPlan(ranges, manifest.run.seed, sequences_per_unit=self.train_cfg.batch_size)
        self._ranges = ranges
        self.outer = OuterOptimizer(self.train_cfg.effective_outer_lr, self.train_cfg.outer_momentum,
                                    self.train_cfg.nesterov)
        self.error_feedback = ErrorFeedback(self.train_cfg.compression, self.train_cfg.compression_chunk)
        self.recorder = TrailRecorder(manifest.proof.trail_interval, self.run_dir / "trail")
        self.trainer = InnerTrainer(self.model, self.train_cfg, device=config.device)

        self._lock = threading.Lock()  # guards self.state against the stream handlers
        self._weights_at: dict[int, torch.Tensor] = {}  # round -> global weights that start it (2 kept)
        self._hashes: dict[int, str] = {}  # round -> hash of the global weights that start it
        self._trained: dict[int, bool] = {}  # round -> whether this peer committed a contribution to it
        self._job: _TrainingJob | None = None  # with overlap: the next round training on its own thread
        self._abort_training = threading.Event()
        self._prefetched: dict[tuple[int, int, str], bytes] = {}  # (round, slice, trainer) -> its bytes
        self._prefetch_failures: dict[tuple[int, int, str], int] = {}  # failed tries of the same key
        self._reported_missing: dict[int, list[str]] = {}  # round -> trainers our SliceMissing names
        self._owners: dict[int, list[str]] = {}  # round -> its slice owners, in slice order
        # Our contributions' DHT stores, one at a time on their own thread: a store takes a few round trips
        # (a second or more on a home link), which the training thread spends on the next steps instead.
        self._publisher: ThreadPoolExecutor | None = ThreadPoolExecutor(max_workers=1, thread_name_prefix="publisher")
        if state is None:
            weights = flatten(self.params)
            state = GlobalState(0, weights, None, self.plan.state_dict(), None, None, self.layout.hash(weights))
        self.state = state
        self._load_state(state)

        self.membership = Membership(node, identity, self.run_id, config.roles, config.heartbeat_s,
                                     state.round, state.weights_hash)
        self.payloads: dict[int, list[bytes]] = {}  # round -> this peer's compressed slices (served to owners)
        self._own_contributions: dict[int, str] = {}  # round -> record id of this peer's contribution
        self.aggregates: dict[tuple[int, int], bytes] = {}  # (round, slice) -> merged slice this peer owns
        self.last_loss: float | None = None
        self.tokens_trained = 0
        self.rounds_done = 0
        self.contributed_rounds = 0  # rounds whose merge included this peer's contribution
        self.first_round = state.round
        self.timing = RoundTiming()
        self.step_s = 0.0  # moving average of this peer's inner step time (sizes the audit wait)
        self.speed = config.speed or 1.0  # matmul TFLOPS (or --speed), measured when the peer starts serving
        self.stopping = threading.Event()
        self.last_close: RoundClose | None = state.close
        # Checks a contribution must pass before it may merge, beyond the cheap ones: each takes
        # (contribution, RoundContext) and returns a CheckResult. The audits' merge gate is the first.
        self.audits = RoundAudits(self, config.audit_timeout_s)
        self.contribution_checks: list[ContributionCheck] = [self.audits.check]
        self._serving = False
        self._max_slice_bytes = self.numel * 4 + (1 << 20)

    # ----- set-up -----
    def _load_state(self, state: GlobalState) -> None:
        from gpunite.swarm.assignment import WorkPlan
        from gpunite.train.weights import unflatten_into

        self.plan = WorkPlan.from_state_dict(self._ranges, state.plan)
        self.outer.load_state_tensors({} if state.momentum is None else {"outer.momentum_buffer": state.momentum},
                                      numel=self.numel)
        unflatten_into(state.weights, self.params)
        self.trainer.step = state.round * self.train_cfg.inner_steps
        if state.inner_optimizer:
            try:
                self.trainer.load_optimizer_state_tensors(state.inner_optimizer)
            except GpuniteError as exc:
                log.warning("inner optimizer state from the peer is unusable (%s): starting AdamW fresh", exc)
        with self._lock:
            self.state = state
        self.last_close = state.close
        self._trained.clear()
        self._weights_at.clear()  # what we held before a re-sync may be the minority's history
        self._hashes.clear()
        self._remember_global(state.round, state.weights, state.weights_hash)
        previous = state.previous_weights
        if self.lag and previous is not None and state.round > 0:
            expected = self._global_hash(state.round - 1)
            if expected is not None and self.layout.hash(previous) == expected:
                self._weights_at[state.round - 1] = previous
                self._hashes[state.round - 1] = expected
            else:
                log.warning("the previous round's weights sent with the state are not the agreed ones: ignored")

    def serve(self) -> None:
        """Register the stream handlers and start heartbeating (once)."""
        if self._serving:
            return
        self._serving = True
        self.node.add_handler(HANDLE_STATE, self._handle_state, max_request_bytes=4096)
        self.node.add_handler(HANDLE_FILE, file_handler(self.prepared_dir), max_request_bytes=4096)
        self.node.add_handler(HANDLE_SLICE, self._handle_slice, max_request_bytes=4096)
        self.node.add_handler(HANDLE_AGGREGATE, self._handle_aggregate, max_request_bytes=4096)
        self.node.add_handler(HANDLE_TRAIL, functools.partial(serve_trail, self), max_request_bytes=4096)
        self.membership.start()
        self.publish_host()
        self.write_status("ready")

    def publish_host(self) -> None:
        """The signed host record: device, its memory and matmul TFLOPS (measured, or --speed if given)."""
        import platform

        from gpunite.records import HostRecord
        from gpunite.train.hardware import list_devices, peak_tflops

        device = torch.device(self.config.device)
        speed = self.config.speed
        if speed is None:
            speed = peak_tflops(device, cache_dir=self.config.home)
        self.speed = max(speed, 1e-6)
        info = next((d for d in list_devices() if d.device == str(device)), None)
        self.membership.publish_host(HostRecord(
            host_name=platform.node()[:128], device=(info.name if info else str(device))[:256],
            memory_gb=round(info.memory_gb, 2) if info else 0.0, tflops=self.speed, time=time.time()))

    # ----- stream handlers (run on the swarm loop thread) -----
    async def _handle_state(self, header: dict, body: bytes, caller: str) -> tuple[dict, bytes]:
        from dataclasses import replace

        with self._lock:
            state = self.state
        weights_only = header.get("weights_only") is True  # a host following the run: no optimizer states
        log.info("serving global state of round %d to %s%s", state.round, caller[-8:],
                 " (weights only)" if weights_only else "")

        previous = self._weights_at.get(state.round - 1) if self.lag else None

        def build() -> tuple[dict, bytes]:
            bans = self.audits.bans_before(state.round)
            if weights_only:
                return state_to_frame(replace(state, bans=bans), weights_only=True)
            # Our AdamW moments as a warm start for the joiner (copies; a read racing a step only blurs advice).
            return state_to_frame(replace(state, inner_optimizer=self.trainer.optimizer_state_tensors(),
                                          previous_weights=previous, bans=bans))

        # Serialising a model's worth of tensors must not stall the loop that answers heartbeats and the DHT.
        return await asyncio.get_running_loop().run_in_executor(None, build)

    async def _handle_slice(self, header: dict, body: bytes, caller: str) -> tuple[dict, bytes]:
        round_index, index = int(header.get("round", -1)), int(header.get("slice", -1))
        trainer = header.get("trainer")
        if isinstance(trainer, str) and trainer != self.peer_id:  # the copy we keep of an owner's own slice
            data = self._prefetched.get((round_index, index, trainer))
            if data is None:
                raise ValueError(f"no copy of {trainer[:12]}'s slice {index} of round {round_index} here")
            return {"round": round_index, "slice": index}, data
        slices = self.payloads.get(round_index)
        if slices is None or not 0 <= index < len(slices):
            raise ValueError(f"no slice {index} of round {round_index} here")
        return {"round": round_index, "slice": index}, slices[index]

    async def _handle_aggregate(self, header: dict, body: bytes, caller: str) -> tuple[dict, bytes]:
        round_index, index = int(header.get("round", -1)), int(header.get("slice", -1))
        owner = header.get("owner")
        if isinstance(owner, str) and owner != self.peer_id:
            # Asked for another identity's slice (this node is not who the caller takes it for): a definite
            # answer, so the caller merges that slice itself now instead of waiting on "pending".
            return {"missing": f"this node is {self.peer_id[:12]}, not the owner {owner[:12]}"}, b""
        current = self.state.round  # read before the aggregates: a merge stores its slice, then moves on
        data = self.aggregates.get((round_index, index))
        if data is None:
            if round_index >= current:
                return {"pending": True}, b""
            return {"missing": f"aggregate {index} of round {round_index} is not kept here"}, b""
        return {"round": round_index, "slice": index}, data

    # ----- the round loop -----
    def run(self) -> None:
        self.serve()
        log.info("peer %s in run %s at round %d (%d parameters)", self.peer_id[:12], self.run_id[:12],
                 self.state.round, self.numel)
        self.timing.started = time.time()
        self.first_round = self.state.round
        try:
            while not self.stopping.is_set():
                if self.config.max_rounds is not None and self.rounds_done >= self.config.max_rounds:
                    break
                if self.config.until_round is not None and self.state.round >= self.config.until_round:
                    break
                self.run_round()
            self.linger()
        finally:
            self._finish_publishing()
            self.write_status("stopped")
            self.membership.stop()

    def linger(self, longest_s: float = 20.0) -> None:
        """Before leaving, keep serving slices until the last roster signed the last round (or longest_s)."""
        if self.state.tip is None or self.last_close is None:
            return
        roster = {e.peer_id for e in self.last_close.next_roster} | set(self.last_close.contributors)
        give_up = time.time() + longest_s
        while time.time() < give_up and not self.stopping.is_set():
            blocks = self.node.get_records(run_key(self.run_id, "block", self.state.tip.round), parse_block)
            alive = self.membership.alive()
            if all(pid in blocks or pid not in alive for pid in roster):
                return
            time.sleep(self.config.poll_s)

    @property
    def lag(self) -> int:
        """Rounds between a round's base weights and the state its delta lands on: 1 with train.overlap."""
        return 1 if self.train_cfg.overlap else 0

    def run_round(self) -> None:
        """Close round r = state.round: train it first (no overlap), or train r + 1 meanwhile (overlap)."""
        if self.state.close is None:
            self.wait_for_genesis()
        self._assign_ahead()
        r = self.state.round
        ctx = self.round_context(r)
        if ctx is None:  # e.g. we followed a close the others did not: take the state most peers went on from
            log.warning("round %d's assignment or base weights are unknown here: re-syncing", r)
            self.resync_from_live()
            return
        roster_ids = sorted(ctx.assigned)
        prev_block = self.state.tip.block_hash if self.state.tip else GENESIS
        deadline = self.state.close.time + self.train_cfg.round_deadline_s
        log.info("round %d started: %d peers in the roster, weights %s", r, len(roster_ids),
                 self.state.weights_hash[:12])
        self.audits.start_round(ctx, roster_ids)
        bounds = self.slice_bounds(ctx)
        if r not in self._trained and self.round_base(r) is not None:
            # No overlap, round 0, or a peer that just joined or re-synced: train now, close after.
            self._trained[r] = self.train_round(ctx)
        job = self._start_training(r + 1) if self.lag and not self._last_round(r) else None
        try:
            if not self.agrees_with_majority(r - 1):
                return
            self.audits.audit_timeout_s = self.audit_timeout_s(len(roster_ids))  # with this round's step times
            close, accepted = self.await_close(ctx, roster_ids, prev_block, deadline)
            self.audits.settle(close)
            self.merge(ctx, close, accepted, roster_ids, bounds, prev_block, self._trained.pop(r, False))
        finally:
            self._finish_training(job)

    def takeover_wait_s(self) -> float:
        """How long a backup coordinator waits per better-ranked live candidate before it publishes a beacon
        itself: takeover_s, or longer while DHT records take long to get through (a better-ranked beacon
        still on its way would otherwise draw a second set of audits; 16 peers on 2 cores saw 27 audits a
        round instead of 16)."""
        return max(self.config.takeover_s, TAKEOVER_DHT_FACTOR * self.node.slow_dht_s)

    def audit_timeout_s(self, roster_size: int) -> float:
        """How long a coordinator waits for verdicts: the configured floor plus the replays its verifiers owe.

        A verifier replays segments_per_audit x trail_interval steps per audit, about as fast as this peer
        trains (same model), on a CPU or GPU it shares with its own next round when overlapping.
        """
        from gpunite.model import flops_per_token
        from gpunite.proof.trail import FINAL_BYTES_PER_PARAM, STATE_BYTES_PER_PARAM

        proof = self.manifest.proof
        audits = proof.audit_fraction * roster_size * proof.verifiers_per_audit
        per_verifier = math.ceil(audits / max(1, roster_size - 1))
        step_s = self.step_s
        if not step_s:  # nothing trained here yet: a step's FLOPs at a tenth of the measured matmul peak
            tokens = self.train_cfg.batch_size * self.manifest.data.seq_len
            step_s = flops_per_token(self.model_config, self.manifest.data.seq_len) * tokens / (
                0.1 * self.speed * 1e12)
        replay_s = proof.segments_per_audit * proof.trail_interval * step_s * (1 + self.lag)
        # and fetches, per audit, the delta (int8), each segment's two states and the final weights
        audit_bytes = self.numel * (1 + 2 * STATE_BYTES_PER_PARAM * proof.segments_per_audit + FINAL_BYTES_PER_PARAM)
        fetch_s = 8.0 * audit_bytes / self.node.budget.typical_bits_per_s(unmeasured=HOME_UPLINK_BITS_PER_S)
        return self.config.audit_timeout_s + 3.0 * per_verifier * (replay_s + fetch_s)

    def _last_round(self, round_index: int) -> bool:
        """Whether this peer stops after closing round_index (--rounds, --until-round): train nothing beyond."""
        cfg = self.config
        return ((cfg.max_rounds is not None and self.rounds_done + 1 >= cfg.max_rounds)
                or (cfg.until_round is not None and round_index + 1 >= cfg.until_round))

    # ----- rounds, bases and assignments -----
    def _base_round(self, round_index: int) -> int:
        """The round whose starting global weights are round_index's base: itself (with train.overlap too: an
        overlapped round starts early and is carried onto its base when that arrives)."""
        return max(0, round_index)

    def round_base(self, round_index: int) -> torch.Tensor | None:
        """The global weights round_index's contributions start from, if this peer holds them."""
        return self._weights_at.get(self._base_round(round_index))

    def _remember_global(self, round_index: int, weights: torch.Tensor, weights_hash: str) -> None:
        """Keep the global weights of this round and the one before (the bases of rounds in flight)."""
        if round_index - 1 not in self._weights_at:
            self._weights_at.clear()
        self._weights_at[round_index] = weights
        self._hashes[round_index] = weights_hash
        for old in [r for r in self._weights_at if r < round_index - 1]:
            del self._weights_at[old]
        for old in [r for r in self._hashes if r < round_index - 8]:
            del self._hashes[old]

    def _global_hash(self, round_index: int) -> str | None:
        """Weights hash of the global state that starts round_index: known here, or most peers' signed blocks."""
        known = self._hashes.get(round_index)
        if known is not None or round_index < 0:
            return known
        close = self.state.close
        if round_index == 0:  # round 0's (and, with overlap, round 1's) base, named by the closes before them
            return close.base_hash if close is not None and close.round in (-1, 0) else None
        votes = self.block_votes(round_index - 1)
        if not votes:
            return None
        best = max(votes, key=lambda h: (len(votes[h]), h))
        self._hashes[round_index] = best
        return best

    def _assign_ahead(self) -> None:
        """Assign rounds state.round .. state.round + lag from the last close's roster, where not done yet.

        Every peer does this at the same point of the plan's history (right after settling the round before),
        so all derive the same units; the close of round r thereby names the roster of round r + 1 + lag.
        """
        close = self.state.close
        if close is None:
            return
        roster = [(e.peer_id, e.speed) for e in close.next_roster]
        for round_index in range(self.state.round, self.state.round + self.lag + 1):
            # The genesis close names the roster of rounds 0 .. lag, every later close that of one round.
            if round_index not in self.plan.outstanding and (
                    close.round == -1 or round_index == close.round + 1 + self.lag):
                self.plan.assign(round_index, roster, self.train_cfg.inner_steps)

    def round_context(self, round_index: int, base_hash: str | None = None) -> RoundContext | None:
        """What every honest peer knows about a round before it closes (None: its assignment or base is unknown).

        base_hash: given by an overlapped round that starts before its base is known (replaced at its rebase).
        """
        if round_index not in self.plan.outstanding:
            return None
        base_hash = base_hash or self._global_hash(self._base_round(round_index))
        if base_hash is None:
            return None
        assigned = self.plan.assign(round_index, [], self.train_cfg.inner_steps)
        return RoundContext(
            run_id=self.run_id, round=round_index, base_hash=base_hash, assigned=assigned,
            inner_steps=self.train_cfg.inner_steps, batch_size=self.train_cfg.batch_size,
            seq_len=self.manifest.data.seq_len, trail_interval=self.manifest.proof.trail_interval,
            n_slices=max(1, len(assigned)), norm_bound=self.manifest.proof.norm_bound,
            start_hash=self._global_hash(round_index - 1) if self.lag and round_index > 0 else None)

    def slice_bounds(self, ctx: RoundContext) -> list[tuple[int, int]]:
        from gpunite.swarm.aggregation import slice_bounds

        return slice_bounds(self.numel, ctx.n_slices, self.train_cfg.compression_chunk)

    # ----- training, in line or beside the exchange -----
    def train_round(self, ctx: RoundContext, job: _TrainingJob | None = None) -> bool:
        """Train this peer's units of a round from its base weights and commit; False if it had none or gave up.

        job: an overlapped round, started before its base is known: it starts from the global weights before
        it and is carried onto its base when the round loop delivers it (`train_and_commit`)."""
        mine = ctx.assigned.get(self.peer_id, [])
        base = self.round_base(ctx.round) if job is None else self._weights_at.get(ctx.round - 1)
        if "trainer" not in self.config.roles or not mine or base is None:
            return False
        log.info("assigned %d units (%d sequences) in round %d", len(mine), sum(u.count for u in mine), ctx.round)
        # The round may close this long after the close before it; with overlap it starts one round early.
        deadline = self.state.close.time + (1 + self.lag) * self.train_cfg.round_deadline_s
        self.timing.begin_training()
        try:
            return self.train_and_commit(ctx, mine, self.slice_bounds(ctx), deadline, base, job)
        except PeerError as exc:  # e.g. no live peer serves a shard we need: sit this round out, not die
            log.warning("round %d: no contribution: %s", ctx.round, exc)
            return False
        finally:
            self.timing.end_training()

    def _start_training(self, round_index: int) -> _TrainingJob | None:
        """Train round_index on a thread while this one runs the exchange of the round before."""
        start_hash = self._hashes.get(round_index - 1)
        ctx = self.round_context(round_index, base_hash=start_hash) if start_hash else None
        if ctx is None or round_index in self._trained or not ctx.assigned.get(self.peer_id):
            return None
        self._abort_training.clear()
        job = _TrainingJob(round_index)

        def work() -> None:
            try:
                lower_thread_priority()
                job.result = self.train_round(ctx, job)
            except BaseException as exc:  # handed to the round loop, which raises it there
                job.error = exc

        job.thread = threading.Thread(target=work, name=f"train-round-{round_index}", daemon=True)
        self._job = job
        log.info("round %d: training beside round %d's exchange (overlap)", round_index, round_index - 1)
        job.thread.start()
        return job

    def _finish_training(self, job: _TrainingJob | None) -> None:
        """Wait for a training thread; keep its result only if the state it trained from still holds."""
        if job is None or job.thread is None:
            return
        if self.state.round == job.round and self.state.weights_hash:  # the merge it waits for is in
            job.deliver(self.state.weights.clone(), self.state.weights_hash)
        elif not job.arrived.is_set():  # this round did not merge here: its base will never come
            self._abort_training.set()
        job.thread.join()
        self._job = None
        aborted = self._abort_training.is_set()
        self._abort_training.clear()
        if aborted:
            return
        if job.error is not None:
            raise job.error
        if job.round == self.state.round:
            self._trained[job.round] = job.result

    def _stop_training(self) -> None:
        """Abandon a running training thread (its base is no longer the majority's) before the state changes."""
        job = self._job
        if job is not None and job.thread is not None and job.thread is not threading.current_thread():
            self._abort_training.set()
            job.thread.join()

    def wait_for_genesis(self) -> RoundClose:
        """Before round 0: the run's starter publishes the first roster (the genesis close)."""
        log.info("waiting for the run's first round to open")
        while not self.stopping.is_set():
            closes = self.node.get_records(run_key(self.run_id, "close", -1), parse_close)
            starter = self._starter()
            for close in closes.values():
                if close.peer_id == starter and close.run_id == self.run_id and close.round == -1:
                    with self._lock:
                        self.state.close = close
                    return close
            time.sleep(self.config.poll_s)
        raise PeerError("stopped before the run's first round opened")

    def _starter(self) -> str | None:
        """The peer that announced the run first: the only one whose genesis close counts."""
        announcements = self.node.get_records(run_key(self.run_id, "manifest"), parse_announcement)
        first = min(announcements.values(), key=lambda a: (a.time, a.peer_id), default=None)
        return first.peer_id if first else None

    # ----- 2. train and commit -----
    def train_and_commit(self, ctx: RoundContext, units: list[WorkUnit], bounds: list[tuple[int, int]],
                         deadline: float, base: torch.Tensor, job: _TrainingJob | None = None) -> bool:
        """Train the units from base and commit the contribution; with job (an overlapped round), base is the
        global weights before the round's: training starts there, less this peer's own committed delta of the
        round before (its own end of that round, as anyone can rebuild it), and is carried onto the round's
        base at the first trail step after the round loop delivers it (at the end at the latest)."""
        from gpunite.model import flops_per_token
        from gpunite.proof.trail import iter_batches
        from gpunite.swarm.aggregation import contribution_norm
        from gpunite.train.compression import decompress, payload_hash, payload_to_bytes, slice_payload
        from gpunite.train.diloco import pseudo_gradient
        from gpunite.train.weights import flatten

        batch_size = self.train_cfg.batch_size
        steps = sum(u.count for u in units) // batch_size
        if steps == 0:
            return False
        if self._contributed_before_restart(ctx.round):
            return False
        self.write_status("training")
        from gpunite.train.weights import unflatten_into

        start_contribution = None
        if job is not None and not self.config.adversary:
            own = self._own_delta(ctx.round - 1)
            if own is not None:
                start_contribution, delta = own
                base = torch.sub(base, delta)
        elif job is not None:  # adversaries build their states from the base: wait for it
            if not self._await_base(job, deadline):
                return False
            base, ctx = job.base[0], replace(ctx, base_hash=job.base[1])
            job = None
        unflatten_into(base, self.params)
        if self.config.adversary:
            from gpunite.swarm.adversary import adversary_contribution

            contribution, slices = adversary_contribution(self, self.config.adversary, ctx, units, bounds)
            self._publish_contribution(ctx, contribution, slices)
            log.info("round %d: committed a %s contribution (adversary)", ctx.round, self.config.adversary)
            return True
        def rebase(wait: bool) -> bool:
            """Carry the round onto its base if it came (wait: until it comes); False if it never will."""
            nonlocal base, ctx
            if job is None or not self.recorder.deferred or not (wait or job.arrived.is_set()):
                return True
            if not self._await_base(job, deadline):
                return False
            base, ctx = job.base[0], replace(ctx, base_hash=job.base[1])
            step = self._record_trail(lambda: self.recorder.rebase(self.trainer, {
                name: t.clone() for name, t in self.layout.named(base).items()}))
            log.info("round %d: carried %d steps onto the merged weights %s", ctx.round, step, ctx.base_hash[:12])
            return True

        trail_before, waited_before = self.timing.trail_s, self.recorder.waited_s
        self._record_trail(lambda: self.recorder.start_round(ctx.round, steps, deferred=job is not None))
        self._record_trail(lambda: self.recorder.record(self.model, self.trainer))
        rebase(wait=False)
        losses = []
        started = time.perf_counter()
        for batch in iter_batches(units, steps, batch_size, self._load_sequences, self.recorder.interval_k):
            if time.time() > deadline or self.stopping.is_set() or self._abort_training.is_set():
                log.warning("round %d: stopped after %d of %d steps (deadline, stop or re-sync): no contribution",
                            ctx.round, len(losses), steps)
                return False
            step_start = time.perf_counter()
            losses.append(self.trainer.train_step(batch))
            step_s = time.perf_counter() - step_start
            self.timing.compute_s += step_s
            self.step_s = step_s if not self.step_s else 0.8 * self.step_s + 0.2 * step_s
            if self._record_trail(lambda: self.recorder.record(self.model, self.trainer)):
                rebase(wait=False)
            self.last_loss = losses[-1]
            if len(losses) % max(1, steps // 4) == 0:
                self.write_status("training")
        if not rebase(wait=True):
            log.warning("round %d: its base never came (the round before did not merge here): no contribution",
                        ctx.round)
            return False
        rebase_step = self.recorder.rebase_step
        compress_start = time.perf_counter()
        pseudo_grad = pseudo_gradient(base, flatten(self.params))
        payload = self.error_feedback.compress(hostile_delta(self.config.cheat, pseudo_grad))
        if self.config.cheat == "nan":
            payload = type(payload)(q=payload.q, scales=torch.full_like(payload.scales, float("nan")),
                                    numel=payload.numel, chunk=payload.chunk)
        slices = [payload_to_bytes(slice_payload(payload, start, end)) for start, end in bounds]
        norm = contribution_norm(pseudo_grad if self.config.cheat == "nan" else decompress(payload))
        self.timing.compute_s += time.perf_counter() - compress_start
        tokens = steps * batch_size * ctx.seq_len
        trail = self._record_trail(lambda: self.recorder.trail)  # waits for the last checkpoint writes
        contribution = sign_record(self.identity, Contribution(
            run_id=self.run_id, round=ctx.round, base_hash=ctx.base_hash, work_units=units, inner_steps=steps,
            tokens=tokens, trail_interval=ctx.trail_interval, trail=trail,
            delta_hash=payload_hash(payload_to_bytes(payload)), slice_hashes=[payload_hash(s) for s in slices],
            delta_norm=norm,
            claimed_flops=float(flops_per_token(self.model_config, ctx.seq_len)) * tokens, time=time.time(),
            start_hash=ctx.start_hash if rebase_step else None,
            start_contribution=start_contribution if rebase_step else None, rebase_step=rebase_step))
        self._publish_contribution(ctx, contribution, slices, background=True)
        log.info("round %d: trained %d steps in %.1f s (trail %.1f s, %.1f s of it waiting for writes), "
                 "loss %.3f -> %.3f, committed delta norm %.4g", ctx.round, steps, time.perf_counter() - started,
                 self.timing.trail_s - trail_before, self.recorder.waited_s - waited_before, losses[0], losses[-1],
                 norm)
        return True

    def _await_base(self, job: _TrainingJob, deadline: float) -> bool:
        """Wait for the round loop to deliver an overlapped round's base; False on stop, abort or deadline."""
        while not job.arrived.wait(0.05):
            if time.time() > deadline or self.stopping.is_set() or self._abort_training.is_set():
                return False
        return job.base is not None

    def _own_delta(self, round_index: int) -> tuple[str, torch.Tensor] | None:
        """(record id, decompressed delta) of this peer's own contribution to a round, from the slices it
        served, decompressed as a verifier does; None if it made none here."""
        from gpunite.train.compression import decompress, payload_from_bytes

        with self._lock:
            slices, record_id = self.payloads.get(round_index), self._own_contributions.get(round_index)
        if not slices or record_id is None:
            return None
        from gpunite.swarm.aggregation import slice_bounds

        cfg = self.train_cfg
        parts = [decompress(payload_from_bytes(data, end - start, cfg.compression_chunk, max_bytes=len(data),
                                               method=cfg.compression))
                 for data, (start, end) in zip(slices, slice_bounds(self.numel, len(slices), cfg.compression_chunk))
                 if start != end]
        return record_id, torch.cat(parts)

    def _record_trail(self, work: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        try:
            return work()
        finally:
            self.timing.trail_s += time.perf_counter() - started

    def _contributed_before_restart(self, round_index: int) -> bool:
        """Whether the DHT holds a contribution of ours to this round that this process did not make
        (asked only before this process's first commit: the DHT is not read every round).

        A peer killed after committing and restarted in the same round must not commit again: the new record
        would replace the old one under our subkey, while a close may already rely on a verdict on the old one,
        which the peers checking that close could then no longer find.
        """
        with self._lock:
            if self.payloads:  # this process has committed before: it commits each round once, from memory
                return False
        earlier = self.contributions(round_index).get(self.peer_id)
        if earlier is None or earlier.round != round_index:
            return False
        log.info("round %d: this peer committed to it before a restart; it trains again from round %d",
                 round_index, round_index + 1)
        return True

    def _publish_contribution(self, ctx: RoundContext, contribution: Contribution, slices: list[bytes],
                              background: bool = False) -> None:
        """Serve the contribution's slices from now on and store its record in the DHT; background: the store
        runs on the publisher thread (the slices are served at once either way)."""
        with self._lock:
            self.payloads[ctx.round] = slices
            self._own_contributions[ctx.round] = contribution.record_id
            for old in [r for r in self.payloads if r < ctx.round - 2]:
                del self.payloads[old]
                self._own_contributions.pop(old, None)
        key, value = run_key(self.run_id, "contrib", ctx.round), record_bytes(contribution)
        ttl_s = max(600.0, 4 * self.train_cfg.round_deadline_s)
        if not background:
            self.node.store(key, self.peer_id, value, ttl_s=ttl_s)
            return

        def store() -> None:
            started = time.perf_counter()
            try:
                self.node.store(key, self.peer_id, value, ttl_s=ttl_s)
            except Exception as exc:  # logged here: no caller waits for this thread
                log.warning("round %d: could not store our contribution in the DHT: %s", ctx.round,
                            str(exc) or type(exc).__name__)
                return
            log.debug("round %d: contribution stored in %.2f s", ctx.round, time.perf_counter() - started)

        with self._lock:
            if self._publisher is not None:  # None once the peer stops: then it stores right here
                self._publisher.submit(store)
                return
        store()

    def _finish_publishing(self) -> None:
        """Wait for the contributions still being stored (each store gives up within its own timeout)."""
        with self._lock:
            publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.shutdown(wait=True)

    def _restore_global_weights(self) -> None:
        from gpunite.train.weights import unflatten_into

        unflatten_into(self.state.weights, self.params)

    def _load_sequences(self, shard: str, first: int, count: int) -> torch.Tensor:
        from gpunite.data.batches import load_sequences
        from gpunite.data.shards import shard_path

        if not shard_path(self.prepared_dir, shard).is_file():
            if self._fetch_file is None:
                raise PeerError(f"shard {shard[:12]} is missing from {self.prepared_dir}; re-prepare the data")
            self._fetch_file("shard", shard)
        return load_sequences(self.prepared_dir, self.index, shard, first, count, self.manifest.data.seq_len)

    # ----- 3. agree on the round close -----
    def contributions(self, round_index: int) -> dict[str, Contribution]:
        found = self.node.get_records(run_key(self.run_id, "contrib", round_index), parse_contribution)
        for contribution in found.values():
            self._emit(contribution)
        return found

    def await_close(self, ctx: RoundContext, roster_ids: list[str], prev_block: str, deadline: float
                    ) -> tuple[RoundClose, dict[str, Contribution]]:
        """The round's close and the contributions it accepts, by peer id.

        Waits for the close; publishes it ourselves when we are the live coordinator of best rank.
        """
        # Seeded by what every honest peer agrees on, the round and its global weights, not by our previous
        # block: two closes that merged the same contributions (a backup racing a slow coordinator) give the
        # same weights but blocks with other verdict lists, and the next order must not split on that.
        # Peers banned before this round (every honest peer holds the same bans) never coordinate: verifiers
        # ignore a banned peer's beacon, so its close could only merge nothing.
        banned = self.audits.banned_in(ctx.round)
        order = coordinator_order(f"{ctx.round}:{self.state.weights_hash}",
                                  [pid for pid in roster_ids if pid not in banned])
        ready_since: float | None = None
        # close id -> when we last refused it: looked at again after CLOSE_RETRY_S, since a refusal may only
        # mean that records it relies on had not reached us yet (a loaded machine, a slow DHT)
        rejected_closes: dict[str, float] = {}
        seen_at: dict[str, float] = {}
        self.write_status("waiting")
        # the records each poll reads, in one DHT traversal (each read costs its round trips on a slow link)
        polled = [run_key(self.run_id, kind, ctx.round) for kind in ("close", "contrib", "beacon")]
        polled.append(run_key(self.run_id, "heartbeat"))
        while True:
            with self.node.read_ahead(polled + self.audits.awaited_keys(ctx.round)):
                closes = self.node.get_records(run_key(self.run_id, "close", ctx.round), parse_close)
                alive = self.membership.alive()
                for close in sorted(closes.values(), key=lambda c: c.coordinator_rank):
                    if time.time() - rejected_closes.get(close.record_id, -math.inf) < CLOSE_RETRY_S:
                        continue
                    # A backup's close counts once the candidates before it are gone or had their chance.
                    first_seen = seen_at.setdefault(close.record_id, time.time())
                    earlier_alive = [pid for pid in order[: close.coordinator_rank] if pid in alive]
                    if earlier_alive and time.time() - first_seen < close.coordinator_rank * self.config.takeover_s:
                        continue
                    verdict, accepted = self.verify_close(close, ctx, order)
                    if verdict.accept:
                        return close, accepted
                    if close.record_id not in rejected_closes:
                        log.warning("ignored round %d close by %s: %s", ctx.round, close.peer_id[:12], verdict.reason)
                    rejected_closes[close.record_id] = time.time()
                contributions = {pid: c for pid, c in self.contributions(ctx.round).items() if pid in roster_ids}
                self._prefetch_owned_slices(ctx, roster_ids, contributions)
                self.audits.serve_audits(ctx, contributions)
                missing_alive = [pid for pid in roster_ids
                                 if ctx.assigned.get(pid) and pid not in contributions and pid in alive]
                if ready_since is None and (not missing_alive or time.time() > deadline):
                    ready_since = time.time()
                candidates = order + sorted(pid for pid in alive if pid not in order and pid not in banned
                                            and "trainer" in alive[pid].roles)
                if ready_since is not None and self.peer_id in candidates:
                    rank = candidates.index(self.peer_id)
                    before_alive = [pid for pid in candidates[:rank] if pid in alive]
                    decided = None
                    if not before_alive or (time.time() - ready_since >= rank * self.takeover_wait_s()
                                            and not self.audits.earlier_at_work(ctx, before_alive)):
                        # Publishes the audit beacon first, then waits (polling here) for the drawn verifiers.
                        decided = self.audits.ready_to_close(ctx, contributions, rank, prev_block)
                    if decided is not None:
                        close = self.make_close(ctx, decided, alive, rank, prev_block)
                        self.node.store(run_key(self.run_id, "close", ctx.round), self.peer_id, record_bytes(close),
                                        ttl_s=max(600.0, 4 * self.train_cfg.round_deadline_s))
                        log.info("coordinated round %d (rank %d): %d accepted, %d rejected, next roster %d peers",
                                 ctx.round, rank, len(close.accepted), len(close.rejected), len(close.next_roster))
                        return close, {pid: decided[pid] for pid in close.contributors}
            if self.stopping.is_set():
                raise PeerError("stopped while waiting for the round to close")
            time.sleep(self.config.poll_s)

    def _prefetch_owned_slices(self, ctx: RoundContext, roster_ids: list[str],
                               contributions: dict[str, Contribution]) -> None:
        """Pull the slice this peer will merge from each contribution as soon as it is published.

        A trainer that dies after committing (its work may already be audited and accepted) then still
        has its slice merged, and the merge after the close does not wait on the network.
        """
        owners = sorted(roster_ids)
        if self.peer_id not in owners:
            return
        self._owners[ctx.round] = owners
        index = owners.index(self.peer_id)
        todo = [(index, pid) for pid in sorted(contributions) if pid != self.peer_id]
        # An owner's slice of its own contribution lives nowhere else: the next owner keeps a copy, so if
        # that owner dies after the close, the peers merging its slice in its place still get it.
        before = (index - 1) % len(owners)
        if owners[before] in contributions and owners[before] != self.peer_id:
            todo.append((before, owners[before]))
        # A slice that failed is tried again on the next polls, up to PREFETCH_TRIES times in all.
        todo = [(i, pid) for i, pid in todo if self._prefetched.get((ctx.round, i, pid)) is None
                and self._prefetch_failures.get((ctx.round, i, pid), 0) < PREFETCH_TRIES]
        for (i, pid), data in zip(todo, in_parallel(lambda job: self._request_slice(ctx.round, *job), todo)):
            if data is not None:
                self._prefetched[(ctx.round, i, pid)] = data
            else:  # counted; fetch_slice tries again at the merge
                self._prefetch_failures[(ctx.round, i, pid)] = self._prefetch_failures.get((ctx.round, i, pid), 0) + 1
        self._report_missing(ctx, index, contributions)

    def _report_missing(self, ctx: RoundContext, index: int, contributions: dict[str, Contribution]) -> None:
        """Tell the coordinator which contributions' slice `index` (ours to merge) we could not fetch, twice."""
        missing = sorted(pid for pid in contributions if pid != self.peer_id
                         and self._prefetched.get((ctx.round, index, pid)) is None
                         and self._prefetch_failures.get((ctx.round, index, pid), 0) >= 2)
        if missing == self._reported_missing.get(ctx.round, []):
            return
        self._reported_missing[ctx.round] = missing
        note = sign_record(self.identity, SliceMissing(run_id=self.run_id, round=ctx.round, slice=index,
                                                       trainers=missing, time=time.time()))
        self.node.store(run_key(self.run_id, "slice_missing", ctx.round), self.peer_id, record_bytes(note),
                        ttl_s=max(600.0, 4 * self.train_cfg.round_deadline_s))
        if missing:
            log.warning("round %d: could not fetch slice %d of %s's contribution: told the coordinator", ctx.round,
                        index, ", ".join(pid[:12] for pid in missing))

    def unfetchable(self, ctx: RoundContext, contributions: dict[str, Contribution]) -> dict[str, str]:
        """Contributions whose slice its owner reported it cannot fetch and this peer (coordinating) cannot
        fetch either, with the reason. Such a contribution merged would be merged short of a slice (its
        verified work lost), so the close leaves it out: its units go back to the pool. A note is checked, not
        believed, so an owner cannot drop someone's work by claiming its slice is missing."""
        from gpunite.train.compression import payload_hash

        owners = sorted(ctx.assigned)
        notes = self.node.get_records(run_key(self.run_id, "slice_missing", ctx.round), parse_slice_missing)
        found: dict[str, str] = {}
        for owner_id, note in sorted(notes.items()):
            if (note.run_id != self.run_id or note.round != ctx.round or owner_id not in owners
                    or owners.index(owner_id) != note.slice):
                continue
            for pid in note.trainers:
                contribution = contributions.get(pid)
                if contribution is None or pid in found or pid == owner_id:
                    continue
                if note.slice < len(contribution.slice_hashes):
                    data = self.fetch_slice(ctx.round, note.slice, pid)
                    if data is not None and payload_hash(data) == contribution.slice_hashes[note.slice]:
                        continue  # it serves: the owner's fetch failed for its own reasons
                found[pid] = (f"its slice {note.slice} could be fetched neither by that slice's owner "
                              f"{owner_id[:12]} nor by the coordinator (trainer gone after committing?)")
        return found

    def make_close(self, ctx: RoundContext, contributions: dict[str, Contribution], alive: dict, rank: int,
                   prev_block: str) -> RoundClose:
        from gpunite.swarm.aggregation import lower_median

        norms = [c.delta_norm for c in contributions.values() if math.isfinite(c.delta_norm) and c.delta_norm > 0]
        median = lower_median(norms) if norms else 0.0
        accepted, rejected = [], []
        unfetchable = self.unfetchable(ctx, contributions)
        for pid in sorted(contributions):
            contribution = contributions[pid]
            # A proven cheat is rejected as one (and banned) even when its slice is missing too: otherwise a
            # cheater that stops serving a slice once audited would only ever be left out, never banned.
            if pid in unfetchable and not self.audits.proves_cheat(contribution, ctx):
                log.warning("left %s's round %d contribution out: %s", pid[:12], ctx.round, unfetchable[pid])
                rejected.append(Rejection(contribution=contribution.record_id, trainer=pid,
                                          reason=unfetchable[pid][:1024]))
                continue
            result = check_contribution(contribution, ctx, median, self.contribution_checks)
            if result.accept:
                accepted.append(contribution)
            else:
                log.warning("rejected %s's round %d contribution: %s", pid[:12], ctx.round, result.reason)
                rejected.append(Rejection(contribution=contribution.record_id, trainer=pid, reason=result.reason,
                                          cheat=result.cheat))
        speeds = self.membership.speeds()
        next_ids = {c.peer_id for c in accepted}
        next_ids |= {pid for pid, hb in alive.items()
                     if "trainer" in hb.roles and hb.round == self.state.round
                     and hb.weights_hash == self.state.weights_hash}
        # No units for banned peers, nor for those this close proves cheated: their work never merges.
        next_ids -= self.audits.banned_in(ctx.round) | {r.trainer for r in rejected if r.cheat}
        next_roster = [RosterEntry(peer_id=pid, speed=min(max(speeds.get(pid, 1.0), 1e-6), 1e9))
                       for pid in sorted(next_ids)]
        return sign_record(self.identity, RoundClose(
            run_id=self.run_id, round=ctx.round, base_hash=ctx.base_hash, prev_block=prev_block,
            accepted=[c.record_id for c in accepted], contributors=[c.peer_id for c in accepted],
            rejected=rejected, next_roster=next_roster, coordinator_rank=rank, time=time.time(),
            **self.audits.close_fields(ctx.round)))

    def verify_close(self, close: RoundClose, ctx: RoundContext, order: list[str]
                     ) -> tuple[CheckResult, dict[str, Contribution]]:
        """A close is followed only if it is for this round and base, and every contribution it merges is valid."""
        result = self._check_close(close, ctx, order)
        if not result.accept:
            return result, {}
        contributions: dict[str, Contribution] = {}
        for attempt in range(20):
            contributions = {c.record_id: c for c in self.contributions(ctx.round).values()}
            if all(cid in contributions for cid in close.accepted):
                break
            time.sleep(self.config.poll_s)
        else:
            return CheckResult(False, "close accepts contributions this peer cannot find"), {}
        adopted = self.audits.adopt_close(close, ctx)
        if not adopted.accept:
            return adopted, {}
        for cid, pid in zip(close.accepted, close.contributors):
            contribution = contributions[cid]
            if contribution.peer_id != pid:
                return CheckResult(False, f"contribution {cid[:12]} is not by {pid[:12]}"), {}
            result = check_contribution(contribution, ctx, median_norm=0.0, extra_checks=self.contribution_checks)
            if not result.accept:
                return CheckResult(False, f"close accepts an invalid contribution: {result.reason}"), {}
        return CheckResult(True), {pid: contributions[cid] for cid, pid in zip(close.accepted, close.contributors)}

    def _check_close(self, close: RoundClose, ctx: RoundContext, order: list[str]) -> CheckResult:
        if close.run_id != self.run_id or close.round != ctx.round or close.base_hash != ctx.base_hash:
            return CheckResult(False, "close is for another run, round or base weights")
        if close.coordinator_rank < len(order) and order[close.coordinator_rank] != close.peer_id:
            return CheckResult(False, f"close claims rank {close.coordinator_rank}, which is not its signer's")
        if close.coordinator_rank >= len(order) and close.peer_id in order:
            return CheckResult(False, "close by a roster member claims a rank outside the roster")
        if close.peer_id in self.audits.banned_in(ctx.round):
            return CheckResult(False, "close by a peer banned from the run")
        if len(close.accepted) != len(close.contributors) or close.contributors != sorted(close.contributors):
            return CheckResult(False, "close lists contributors out of order")
        return CheckResult(True)

    # ----- 4. sharded aggregation and the outer step -----
    def merge(self, ctx: RoundContext, close: RoundClose, accepted: dict[str, Contribution], roster_ids: list[str],
              bounds: list[tuple[int, int]], prev_block: str, contributed: bool) -> None:
        from gpunite.swarm.aggregation import clip_factors

        self.write_status("aggregating")
        factors = dict(zip(sorted(accepted), clip_factors([accepted[p].delta_norm for p in sorted(accepted)],
                                                          self.train_cfg.clip_norm_ratio)))
        owners = sorted(roster_ids)
        if self.peer_id in owners and accepted:
            index = owners.index(self.peer_id)
            self.aggregates[(ctx.round, index)] = self.aggregate_slice(ctx, index, bounds, accepted, factors)
        new_weights = self.state.weights
        new_momentum = self.state.momentum
        if accepted:
            pseudo_grad = torch.zeros(self.numel, dtype=torch.float32)
            # A robust merge of vectors clipped to norm <= c has norm <= sqrt(n) * c: an owner serving more is lying.
            clipped = max(factors[p] * accepted[p].delta_norm for p in accepted)
            bound = math.sqrt(len(accepted)) * clipped * 1.01 + 1e-6
            # Every owner's merged slice at once: on slow or distant links the fetches overlap, not add up.
            wanted = [(index, owners[index] if index < len(owners) else None)
                      for index, (start, end) in enumerate(bounds) if start != end]
            fetched = dict(zip(wanted, in_parallel(lambda job: self.fetch_aggregate(ctx, *job), wanted)))
            for index, (start, end) in enumerate(bounds):
                if start == end:
                    continue
                owner = owners[index] if index < len(owners) else None
                merged = self._checked_aggregate(fetched[(index, owner)], end - start, bound)
                if merged is None:
                    log.info("owner of slice %d of round %d is gone or sent a bad slice: merging it here", index,
                             ctx.round)
                    merged = self._checked_aggregate(
                        self.aggregate_slice(ctx, index, bounds, accepted, factors), end - start, float("inf"))
                pseudo_grad[start:end] = merged
            new_weights = self.outer.step(self.state.weights, pseudo_grad)
            new_momentum = self.outer.momentum_buffer
        if contributed and self.peer_id not in accepted:
            self.error_feedback.reset()
        self.plan.settle(ctx.round, sorted(accepted))
        weights_hash = self.layout.hash(new_weights)
        tokens = sum(c.tokens for c in accepted.values())
        block = sign_record(self.identity, Block(
            run_id=self.run_id, round=ctx.round, prev=prev_block, accepted=close.accepted, verdicts=close.verdicts,
            rejected=close.rejected,
            weights_hash=weights_hash, tokens=tokens, time=time.time()))
        self.node.store(run_key(self.run_id, "block", ctx.round), self.peer_id, record_bytes(block),
                        ttl_s=max(600.0, 4 * self.train_cfg.round_deadline_s))
        self._append_chain(block)
        self._emit(block)
        with self._lock:
            self.state = GlobalState(ctx.round + 1, new_weights, new_momentum, self.plan.state_dict(), block, close,
                                     weights_hash)
        self._remember_global(ctx.round + 1, new_weights, weights_hash)
        self._assign_ahead()
        with self._lock:  # the state joiners get carries the plan with the rounds ahead already assigned
            self.state.plan = self.plan.state_dict()
        self.last_close = close
        for key in [k for k in self.aggregates if k[0] < ctx.round - 1]:
            del self.aggregates[key]
        # Kept one round more: peers merging a dead owner's slice in its place may ask for our copies.
        for key in [k for k in self._prefetched if k[0] < ctx.round]:
            del self._prefetched[key]
        for key in [k for k in self._prefetch_failures if k[0] < ctx.round]:
            del self._prefetch_failures[key]
        for old in [r for r in self._reported_missing if r < ctx.round]:
            del self._reported_missing[old]
        for old in [r for r in self._owners if r < ctx.round]:
            del self._owners[old]
        # Round ctx.round's trail stays one round more (a backup coordinator's beacon may still draw audits of
        # it); older ones go: a trail is H / k states (weights and both moments), 8 bytes per parameter each.
        self.recorder.prune(ctx.round)
        self.tokens_trained += tokens
        self.rounds_done += 1
        if self.peer_id in accepted:
            self.contributed_rounds += 1
        self.membership.update(ctx.round + 1, weights_hash, self.audits.bans_digest(ctx.round + 1))
        log.info("round %d merged %d contributions (%d tokens): new weights %s; sent %d B, received %d B so far",
                 ctx.round, len(accepted), tokens, weights_hash[:12], self.node.counter.sent,
                 self.node.counter.received)
        self.write_status("merged")
        self._append_round_log(ctx.round, len(accepted), tokens)

    def _checked_aggregate(self, data: bytes | None, numel: int, norm_bound: float) -> torch.Tensor | None:
        """A merged slice's values if the bytes parse (shape, finite, quantizer range) and its norm is in bounds."""
        from gpunite.train.compression import decompress, payload_from_bytes, payload_method

        if data is None:
            return None
        method = payload_method(self.train_cfg.compression)
        try:
            values = decompress(payload_from_bytes(data, numel, self.train_cfg.compression_chunk,
                                                   max_bytes=self._max_slice_bytes, method=method))
        except GpuniteError as exc:
            log.warning("refused a merged slice: %s", exc)
            return None
        norm = float(torch.linalg.vector_norm(values.double()))
        if norm > norm_bound:
            log.warning("refused a merged slice of norm %.4g, over the bound %.4g", norm, norm_bound)
            return None
        return values

    def aggregate_slice(self, ctx: RoundContext, index: int, bounds: list[tuple[int, int]],
                        accepted: dict[str, Contribution], factors: dict[str, float]) -> bytes:
        """Pull slice `index` of every accepted contribution, check it, merge robustly, compress the result."""
        from gpunite.swarm.aggregation import robust_aggregate
        from gpunite.train.compression import compress, payload_method, payload_to_bytes

        start, end = bounds[index]
        method = payload_method(self.train_cfg.compression)
        values, used = [], []
        trainers = sorted(accepted)
        for pid, data in zip(trainers, in_parallel(lambda pid: self.fetch_slice(ctx.round, index, pid), trainers)):
            if data is None:
                continue
            result, vector = check_slice(data, accepted[pid], index, end - start, self.train_cfg.compression_chunk,
                                         method)
            if not result.accept:
                log.warning("dropped %s's slice %d of round %d: %s", pid[:12], index, ctx.round, result.reason)
                continue
            values.append(vector)
            used.append(factors[pid])
        if values:
            merged = robust_aggregate(values, used, self.train_cfg.aggregation, self.train_cfg.trim_fraction)
        else:
            merged = torch.zeros(end - start, dtype=torch.float32)
        log.info("aggregated slice %d of round %d from %d contributions", index, ctx.round, len(values))
        return payload_to_bytes(compress(merged, method, self.train_cfg.compression_chunk))

    def fetch_slice(self, round_index: int, index: int, peer_id: str) -> bytes | None:
        if peer_id == self.peer_id:
            slices = self.payloads.get(round_index)
            if slices and index < len(slices):
                return slices[index]
            data = None  # restarted after committing: our slices went with the old process
        else:
            cached = self._prefetched.get((round_index, index, peer_id))
            if cached is not None:
                return cached
            data = self._request_slice(round_index, index, peer_id)
        owners = self._owners.get(round_index, [])
        if data is None and len(owners) > 1 and index < len(owners) and owners[index] == peer_id:
            keeper = owners[(index + 1) % len(owners)]  # the owner's own slice: the next owner keeps a copy
            if keeper != self.peer_id:
                data = self._request_slice(round_index, index, keeper, trainer=peer_id)
        return data

    def _request_slice(self, round_index: int, index: int, peer_id: str, trainer: str = "") -> bytes | None:
        """Slice `index` of a contribution from its trainer (or, with trainer, the copy peer_id keeps of it)."""
        header = {"round": round_index, "slice": index} | ({"trainer": trainer} if trainer else {})
        try:
            _, data = self._request(peer_id, HANDLE_SLICE, header, self._max_slice_bytes)
            return data
        except (SwarmError, ProtocolError, PeerError) as exc:
            log.warning("no slice %d of round %d from %s: %s", index, round_index, peer_id[:12], exc)
            return None

    def fetch_aggregate(self, ctx: RoundContext, index: int, owner: str | None) -> bytes | None:
        """The owner's merged slice; None if the owner is gone or does not answer in time."""
        if owner is None:
            return None
        if owner == self.peer_id:
            return self.aggregates.get((ctx.round, index))
        give_up = time.time() + max(30.0, self.config.takeover_s * 4)
        while time.time() < give_up and not self.stopping.is_set():
            try:
                header, data = self._request(owner, HANDLE_AGGREGATE,
                                             {"round": ctx.round, "slice": index, "owner": owner},
                                             self._max_slice_bytes)
                if "missing" in header:  # it will never have it: no use waiting
                    log.info("slice %d owner %s: %s", index, owner[:12], str(header["missing"])[:200])
                    return None
                if not header.get("pending"):
                    return data
                answered = True
            except (SwarmError, ProtocolError, PeerError) as exc:
                log.info("slice %d owner %s: %s", index, owner[:12], exc)
                answered = False
            # An owner that just answered "pending" is alive, whatever its heartbeat says: on loaded machines
            # and saturated uplinks heartbeats lapse for seconds (seen on the WAN test bed), and taking the
            # owner for gone then makes every peer fetch and merge that slice itself.
            if not answered and owner not in self.membership.alive():
                return None
            time.sleep(self.config.poll_s)
        return None

    def _request(self, peer_id: str, handler: str, header: dict, max_reply: int) -> tuple[dict, bytes]:
        beat = self.membership.last_seen.get(peer_id) or self.membership.alive().get(peer_id)
        if beat is None:
            raise PeerError(f"peer {peer_id[:12]} has never sent a heartbeat")
        return self.node.request(beat.p2p_id, handler, {"run": self.run_id, **header}, max_reply_bytes=max_reply,
                                 maddrs=list(beat.maddrs))

    # ----- 5. agreement on the weights -----
    def block_votes(self, round_index: int) -> dict[str, list[str]]:
        """Weights hash -> the peers whose signed block of round_index names it (this run's blocks only)."""
        blocks = self.node.get_records(run_key(self.run_id, "block", round_index), parse_block)
        votes: dict[str, list[str]] = {}
        for pid, block in blocks.items():
            if block.run_id == self.run_id and block.round == round_index:
                votes.setdefault(block.weights_hash, []).append(pid)
        return votes

    def agrees_with_majority(self, round_index: int) -> bool:
        """Compare our block of round_index with the others'; re-sync from the majority if we are outvoted."""
        if round_index < 0:
            return True
        votes = self.block_votes(round_index)
        if not votes:
            return True
        best = max(votes, key=lambda h: (len(votes[h]), h))
        mine = self.state.tip.weights_hash if self.state.tip else None
        if mine == best or len(votes.get(mine, [])) >= len(votes[best]):
            return True
        log.warning("our weights after round %d (%s) disagree with %d peers (%s): re-syncing", round_index,
                    (mine or "?")[:12], len(votes[best]), best[:12])
        for pid in votes[best]:
            try:
                self.sync_from(pid)
                return False
            except (SwarmError, ProtocolError, PeerError, GpuniteError) as exc:
                log.warning("re-sync from %s failed: %s", pid[:12], exc)
        return True

    def resync_from_live(self) -> None:
        """Sync from the live peer furthest ahead that serves a valid state (waits a poll if none does)."""
        alive = self.membership.alive()
        ahead = sorted((hb for pid, hb in alive.items() if pid != self.peer_id and hb.round >= self.state.round),
                       key=lambda hb: (-hb.round, hb.peer_id))
        for beat in ahead:
            try:
                self.sync_from(beat.peer_id)
                return
            except (SwarmError, ProtocolError, PeerError, GpuniteError) as exc:
                log.warning("re-sync from %s failed: %s", beat.peer_id[:12], exc)
        time.sleep(self.config.poll_s)

    def sync_from(self, peer_id: str) -> None:
        header, body = self._request(peer_id, HANDLE_STATE, {}, max_reply=max_state_bytes(self.numel))
        state = state_from_frame(header, body, self.layout, self.run_id)
        check_bans(state, self.membership.alive().values())
        self._stop_training()
        self._load_state(state)
        self.audits.restore_bans(state.bans)
        self.membership.update(state.round, state.weights_hash, self.audits.bans_digest(state.round))
        log.info("synced global state of round %d (weights %s) from %s", state.round, state.weights_hash[:12],
                 peer_id[:12])

    # ----- records, chain, status -----
    def _emit(self, record: Any) -> None:
        if self.on_record is not None:
            try:
                self.on_record(record)
            except Exception as exc:  # a broken hook must not stop training
                log.warning("record hook failed: %s", exc)

    def _append_chain(self, block: Block) -> None:
        with open(self.run_dir / "chain.jsonl", "ab") as handle:
            handle.write(record_bytes(block) + b"\n")

    def _append_round_log(self, round_index: int, merged: int, tokens: int) -> None:
        """One line per merged round: the figures the benchmarks and the simulator calibrate from."""
        line = {"round": round_index, "merged": merged, "tokens": tokens, "time": time.time(),
                "wall_s": time.time() - self.timing.started, "compute_s": self.timing.compute_s,
                "trail_s": self.timing.trail_s, "trail_wait_s": self.recorder.waited_s,
                "training_s": self.timing.training_s(), "bytes_sent": self.node.counter.sent,
                "bytes_received": self.node.counter.received}
        with open(self.run_dir / "rounds.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")

    def write_status(self, phase: str) -> None:
        if self.config.status_path is None:
            return
        from gpunite.util import atomic_write_bytes

        now = time.time()
        wall = now - self.timing.started if self.timing.started else 0.0
        status = {
            "peer_id": self.peer_id, "run_id": self.run_id, "phase": phase, "round": self.state.round,
            "rounds_done": self.rounds_done, "contributed_rounds": self.contributed_rounds,
            "first_round": self.first_round, "loss": self.last_loss, "tokens": self.tokens_trained,
            "weights_hash": self.state.weights_hash, "bytes_sent": self.node.counter.sent,
            "bytes_received": self.node.counter.received, "compute_s": self.timing.compute_s, "wall_s": wall,
            "peers": len(self.membership._known), "maddrs": self.node.maddrs, "time": now, "pid": _pid(),
        }
        atomic_write_bytes(self.config.status_path, json.dumps(status).encode())

    def save_final(self) -> Path:
        """The current global weights as a gpunite checkpoint (for `gpunite generate` and the demo)."""
        from gpunite.data.shards import TOKENIZER_NAME
        from gpunite.train.checkpoint import save_checkpoint

        self._restore_global_weights()
        tokenizer = (self.prepared_dir / TOKENIZER_NAME).read_text(encoding="utf-8")
        path = self.run_dir / "final.safetensors"
        save_checkpoint(path, self.model, None, data_position=0, manifest=self.manifest, tokenizer_json=tokenizer,
                        extra={"round": self.state.round, "weights_hash": self.state.weights_hash})
        return path


def _pid() -> int:
    import os

    return os.getpid()
