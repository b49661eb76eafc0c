"""Audits in a running swarm: the round's beacon, verifiers replaying trail segments, signed verdicts in the
DHT, and the gate every contribution must pass before a round close may merge it.

One round, after the contributions are committed:
1. the coordinator signs the audit beacon over the ids it saw in time (`gpunite.proof.selection`) and
   publishes it as an `AuditBeacon`; from then on only those contributions can merge this round.
2. every peer polls for beacons; where the beacon draws it as a verifier, it fetches the trainer's delta
   (slices) and trail segments over P2P, replays them (`gpunite.proof.audit.verify_contribution`: the delta
   lands on the trail's end, each drawn segment replays within tolerance, the segment's own loss falls, and
   the loss on a batch of the held-out split does not blow up) and publishes a signed Verdict under
   `verdict_key(run, round, contribution)`.
3. the coordinator waits for the drawn verifiers' verdicts (at most `audit_timeout_s`), then closes:
   `check` (a `Peer.contribution_checks` hook) applies `gpunite.proof.policy.merge_decision`, so an audited
   contribution merges only with enough accept verdicts; proven cheats are rejected with cheat=True. The
   close carries the beacon and the verdict ids relied on. Every peer checking the close trusts none of it
   (`adopt_close`): each listed verdict must be signed in the DHT by a verifier the beacon drew, none may
   reject what the close accepts, every ban must re-derive from the signed records, and `check` is re-run on
   every accepted contribution. A verifier that does not answer in time keeps the contribution out of this
   round without blaming anyone.
4. every peer bans the signers of the cheats a followed close proved: their later contributions never merge.
   A trainer whose contribution the close rejected on a drawn verifier's reject verdict without proof (e.g.
   it did not serve its trail or slices) becomes a suspect: its later contributions merge only when the
   beacon draws them for audit and they are accepted, and the first one accepted that way clears it
   (`gpunite.proof.policy.SuspectList`). Round r is judged by the bans and suspicions of closes before r,
   derived only from the close and the signed verdicts it lists, so peers that settle at different moments
   agree.

With too few peers to keep the coordinator out of verifying, it verifies (a two-peer run still audits); a
contribution nobody but its own trainer could audit merges on the cheap checks alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from gpunite.errors import GpuniteError
from gpunite.proof.audit import AuditResult, held_out_loss, make_verdict, verify_contribution
from gpunite.proof.policy import (
    AuditAssignment,
    Ban,
    BanList,
    MergeDecision,
    MergePolicy,
    SuspectList,
    merge_decision,
    policy_from_manifest,
)
from gpunite.proof.selection import (
    SelectionError,
    beacon_from_signature,
    choose_segments,
    is_audited,
    ring_verifiers,
    sign_beacon,
)
from gpunite.proof.trail import FINAL_BYTES_PER_PARAM, STATE_BYTES_PER_PARAM
from gpunite.records import Contribution, Verdict, parse_record_as, record_bytes, sign_record
from gpunite.swarm.checks import ACCEPT, CheckResult, RoundContext, check_contribution, check_slice
from gpunite.swarm.node import SwarmError
from gpunite.swarm.protocol import (
    FLOAT_ENCODING,
    HANDLE_TRAIL,
    AuditBeacon,
    ProtocolError,
    RoundClose,
    pack_floats,
    parse_swarm_message,
    run_key,
    unpack_floats,
    verdict_key,
)
from gpunite.util import in_parallel

if TYPE_CHECKING:
    from gpunite.swarm.peer import Peer

log = logging.getLogger("gpunite.swarm.audits")
MAX_TRAIL_REQUEST_BYTES = 4096


def parse_beacon(data: bytes) -> AuditBeacon:
    return parse_swarm_message(data, AuditBeacon)  # type: ignore[return-value]


def parse_verdict(data: bytes) -> Verdict:
    return parse_record_as(data, Verdict)


def parse_contribution(data: bytes) -> Contribution:
    return parse_record_as(data, Contribution)


def assign(beacon: bytes, contribution: Contribution, policy: MergePolicy, candidates: Sequence[str],
           coordinator: str) -> AuditAssignment:
    """The beacon's audit decision (as `gpunite.proof.policy.assign_audit`), for swarms of any size.

    The coordinator is kept out of verifying unless that leaves too few candidates; a contribution that
    nobody but its trainer could verify is not audited.
    """
    cid = contribution.record_id
    if not is_audited(beacon, cid, policy.audit_fraction, signer_is_coordinator=contribution.peer_id == coordinator):
        return AuditAssignment(False)
    others = [p for p in candidates if p not in (contribution.peer_id, coordinator)]
    ring = [p for p in candidates if p != coordinator] if len(others) >= policy.verifiers_per_audit else candidates
    try:
        verifiers = ring_verifiers(beacon, cid, contribution.peer_id, ring, policy.verifiers_per_audit)
    except SelectionError:
        return AuditAssignment(False)
    segments = choose_segments(beacon, cid, len(contribution.trail) - 1, policy.segments_per_audit)
    return AuditAssignment(True, tuple(verifiers), tuple(segments))


PREFETCH_BYTES = 1 << 30  # trail states held in memory at once by one peer's audits, at most
AUDITS_AT_ONCE = 2


def audit_state_bytes(numel: int, segments: int) -> int:
    """Trail bytes one audit holds once its prefetch is in: the final weights and each segment's start state."""
    return numel * (FINAL_BYTES_PER_PARAM + STATE_BYTES_PER_PARAM * segments)


def trail_reply_max_bytes(numel: int) -> int:
    """The most a trainer's answer to one trail request may hold: a segment's start and end states."""
    return 2 * STATE_BYTES_PER_PARAM * numel + (1 << 20)


@dataclass
class _Fetched:
    """What one audit pulled over the network: trail bytes and the seconds spent waiting for them."""

    bytes: int = 0
    seconds: float = 0.0


class RoundAudits:
    """One peer's side of the audits: coordinator (beacon, waiting for verdicts), verifier, and merge gate.

    Safe to call from more than one thread (e.g. one training while another closes a round): every table is
    read and written under one lock, which is never held across network calls, replays or sleeps.
    """

    def __init__(self, peer: Peer, audit_timeout_s: float) -> None:
        self.peer = peer
        self.policy = policy_from_manifest(peer.manifest.proof)
        self.audit_timeout_s = audit_timeout_s
        self.bans = BanList()
        self.suspects = SuspectList()
        self._lock = threading.RLock()
        # round -> (coordinator peer id, beacon bytes) that the close being made or checked follows
        self._in_force: dict[int, tuple[str, bytes]] = {}
        self._roster: dict[int, list[str]] = {}
        self._pool: dict[int, list[Verdict]] = {}  # verdicts a close decision may rely on
        self._relied: dict[int, set[str]] = {}  # verdict ids the decisions of the current close relied on
        self._own: dict[int, tuple[AuditBeacon, dict[str, Contribution], float]] = {}  # our beacon, its set, when
        # Contributions we audited. Once each, whichever beacon drew us first: a verifier holds one verdict per
        # contribution in the DHT (its subkey), and a second audit under a backup coordinator's beacon would
        # replace the verdict a close already relied on.
        self._done: dict[int, set[str]] = {}  # round -> contribution ids
        self._emitted: set[str] = set()  # verdict ids already handed to the record hook
        self._beacon_seen: dict[tuple[int, str], float] = {}  # (round, signer) -> when we first saw its beacon
        self._held_out: dict[int, tuple[torch.Tensor, float] | None] = {}  # round -> (batch, base loss)

    # ----- every peer -----
    def start_round(self, ctx: RoundContext, roster_ids: Sequence[str]) -> None:
        """Begin auditing round ctx.round among roster_ids (replays start from `Peer.round_base`)."""
        with self._lock:
            self._roster[ctx.round] = sorted(roster_ids)
            for table in (self._in_force, self._roster, self._pool, self._relied, self._own, self._held_out,
                          self._done):
                for old in [r for r in table if r < ctx.round - 1]:
                    del table[old]
            for key in [k for k in self._beacon_seen if k[0] < ctx.round - 1]:
                del self._beacon_seen[key]

    def _bans_for(self, round_index: int) -> BanList:
        """Bans proven before round_index (every honest peer holds the same: they come from followed closes)."""
        with self._lock:
            return self.bans.as_of(round_index)

    def _suspects_for(self, round_index: int) -> SuspectList:
        """Suspicions from the closes of rounds before round_index (as bans: every honest peer holds the same)."""
        with self._lock:
            return self.suspects.as_of(round_index)

    def bans_before(self, round_index: int) -> tuple[Ban, ...]:
        """The bans round_index is judged by, for a joiner's global state."""
        return tuple(self._bans_for(round_index).bans.values())

    def bans_digest(self, round_index: int) -> str:
        """The digest of the bans round_index is judged by, for our heartbeat."""
        return self._bans_for(round_index).digest()

    def restore_bans(self, bans: Sequence[Ban]) -> None:
        """Take the bans a synced global state carries (checked against the live peers' heartbeats): a joiner
        must judge rounds by the same bans as everyone, or it draws other verifiers and coordinators."""
        added = 0
        with self._lock:
            for ban in bans:
                if not self.bans.is_banned(ban.peer_id):
                    self.bans.ban(ban.peer_id, ban.round, ban.reason, ban.evidence)
                    added += 1
        if added:
            log.info("took %d bans from the synced state (e.g. %s since round %d)", added, bans[0].peer_id[:12],
                     bans[0].round)

    def banned_in(self, round_index: int) -> set[str]:
        """The peers banned before round_index: they neither verify, coordinate nor get units in it."""
        return set(self._bans_for(round_index).bans)

    def candidates(self, round_index: int) -> list[str]:
        """Who may verify in a round: its roster, less the peers banned before it (a banned peer judges no one)."""
        bans = self._bans_for(round_index)
        with self._lock:
            roster = list(self._roster.get(round_index, []))
        return [pid for pid in roster if not bans.is_banned(pid)]

    def serve_audits(self, ctx: RoundContext, contributions: dict[str, Contribution]) -> None:
        """Audit whatever a published beacon of this round draws us for (once each)."""
        candidates = self.candidates(ctx.round)
        beacons = self.peer.node.get_records(run_key(self.peer.run_id, "beacon", ctx.round), parse_beacon)
        by_id = {c.record_id: c for c in contributions.values()}
        with self._lock:
            for signer in beacons:
                self._beacon_seen.setdefault((ctx.round, signer), time.time())
        drawn: list[tuple[Contribution, tuple[int, ...]]] = []
        for signer, record in beacons.items():
            if signer not in candidates or record.run_id != self.peer.run_id or record.round != ctx.round:
                continue
            try:
                beacon = beacon_from_signature(record.signer, record.beacon, record.run_id, record.round,
                                               record.prev_block, record.contributions)
            except SelectionError as exc:
                log.warning("ignored a beacon of round %d by %s: %s", ctx.round, signer[:12], exc)
                continue
            for cid in record.contributions:
                contribution = by_id.get(cid)
                if contribution is None:
                    continue  # not here yet: a later poll audits it if we are drawn
                if not self._worth_auditing(contribution, ctx):
                    continue
                assignment = assign(beacon, contribution, self.policy, candidates, signer)
                if self.peer.peer_id not in assignment.verifiers:
                    continue
                with self._lock:
                    done = self._done.setdefault(ctx.round, set())
                    if cid in done:
                        continue
                    done.add(cid)
                drawn.append((contribution, assignment.segments))
        # Two at once while their trail states fit in memory: one audit's transfers overlap the other's replay.
        state_bytes = audit_state_bytes(self.peer.numel, self.policy.segments_per_audit)
        workers = AUDITS_AT_ONCE if AUDITS_AT_ONCE * state_bytes <= PREFETCH_BYTES else 1
        in_parallel(lambda job: self.audit(ctx, *job), drawn, max_workers=workers)

    def _worth_auditing(self, contribution: Contribution, ctx: RoundContext) -> bool:
        """No replay for what cannot merge anyway: a banned signer's work, or work from another base than ours
        (a verifier holding other weights would misjudge it)."""
        return (not self._bans_for(ctx.round).is_banned(contribution.peer_id)
                and contribution.base_hash == ctx.base_hash and self.peer.round_base(ctx.round) is not None)

    def audit(self, ctx: RoundContext, contribution: Contribution, segments: Sequence[int]) -> Verdict | None:
        """Replay a contribution's drawn segments and publish our signed verdict on it (None: we do not hold
        the round's base weights, so we judge nothing and the coordinator's wait for us times out)."""
        started = time.perf_counter()
        base = self.peer.round_base(ctx.round)
        if base is None:
            log.warning("cannot audit %s's round %d contribution: this peer does not hold the round's base weights",
                        contribution.peer_id[:12], ctx.round)
            return None
        fetched = _Fetched()
        try:
            result = self._replay(ctx, contribution, segments, base, fetched)
        except GpuniteError as exc:  # e.g. its data cannot be loaded here: no verdict against the trainer
            result = AuditResult(False, f"could not replay: {exc}", False, -1, None, 0.0)
        verdict = make_verdict(self.peer.identity, contribution, result, time.time())
        self.peer.node.store(verdict_key(self.peer.run_id, ctx.round, contribution.record_id), self.peer.peer_id,
                             record_bytes(verdict), ttl_s=max(600.0, 4 * self.peer.train_cfg.round_deadline_s))
        with self._lock:
            self._emitted.add(verdict.record_id)
        self.peer._emit(verdict)
        log.info("audited %s's round %d contribution (segments %s) in %.1f s (%.1f MB of trail states in %.1f s): "
                 "%s, %s", contribution.peer_id[:12], ctx.round, list(segments), time.perf_counter() - started,
                 fetched.bytes / 1e6, fetched.seconds, "accept" if result.accept else "REJECT", result.reason)
        return verdict

    def _replay(self, ctx: RoundContext, contribution: Contribution, segments: Sequence[int],
                base_weights: torch.Tensor, fetched: _Fetched) -> AuditResult:
        peer = self.peer
        delta = self._fetch_delta(ctx, contribution)
        if isinstance(delta, str):
            return AuditResult(False, delta, False, -1, None, 0.0)
        base = {name: t.clone() for name, t in peer.layout.named(base_weights).items()}
        start = None
        if contribution.rebase_step:
            start = self._start_weights(ctx, contribution)
            if isinstance(start, str):
                return AuditResult(False, start, False, -1, None, 0.0)
        max_bytes = trail_reply_max_bytes(peer.numel)

        def request(what: int | str, part: str = "") -> bytes:
            header = {"round": ctx.round, "segment": what, "accept": [FLOAT_ENCODING]} | (
                {"part": part} if part else {})

            def ask() -> bytes:
                return trail_reply(*peer._request(contribution.peer_id, HANDLE_TRAIL, header, max_bytes), max_bytes)

            try:
                return ask()
            except (SwarmError, ProtocolError) as exc:  # a stream broken on a busy machine: one more try
                log.info("trail %s of %s: %s; retrying", what, contribution.peer_id[:12], exc)
                return ask()

        def timed_request(what: int | str, part: str = "") -> bytes:
            started = time.perf_counter()
            try:
                data = request(what, part)
            finally:
                fetched.seconds += time.perf_counter() - started
            fetched.bytes += len(data)
            return data

        # The final weights and every drawn segment's start state are needed whatever the replays show: ask
        # for them at once, so their transfers overlap (an end state is asked for only when a replay needs it).
        # Only while they fit in PREFETCH_BYTES: a large model's states are fetched one by one.
        wanted: list[tuple[int | str, str]] = [("final", ""), *((index, "start") for index in segments)]
        if audit_state_bytes(peer.numel, len(segments)) > PREFETCH_BYTES:
            wanted = []

        def attempt(job: tuple[int | str, str]) -> bytes | GpuniteError:
            try:
                return request(*job)
            except GpuniteError as exc:
                return exc

        prefetch_started = time.perf_counter()
        prefetched = dict(zip(wanted, in_parallel(attempt, wanted, max_workers=4)))
        fetched.seconds += time.perf_counter() - prefetch_started
        fetched.bytes += sum(len(v) for v in prefetched.values() if isinstance(v, bytes))

        def fetch(what: int | str, part: str = "") -> bytes:
            found = prefetched.pop((what, part), None)
            if found is None:
                return timed_request(what, part)
            if isinstance(found, GpuniteError):
                raise found
            return found

        return verify_contribution(
            contribution, segments, fetch, lambda: fetch("final"), base, delta, peer._load_sequences,
            peer.train_cfg.batch_size, peer.model_config, peer.train_cfg, total_steps=peer.trainer.total_steps,
            bounds=self.policy.bounds, held_out=self._held_out_batch(ctx, base), max_bytes=max_bytes, start=start)

    def _start_weights(self, ctx: RoundContext, contribution: Contribution) -> dict[str, torch.Tensor] | str:
        """Where an overlapped contribution's steps before its rebase ran, by name: the global weights before
        the round's base less the trainer's own delta committed to the round before (its signed contribution
        there, named by record id; its slices hash-checked as any owner checks them); or why it is unknown."""
        peer = self.peer
        before = peer._weights_at.get(ctx.round - 1)
        if before is None or contribution.start_hash != ctx.start_hash:
            return "this verifier does not hold the global weights the contribution started from"
        start = before
        if contribution.start_contribution is not None:
            earlier = peer.contributions(ctx.round - 1).get(contribution.peer_id)
            if earlier is None or earlier.record_id != contribution.start_contribution:
                return "the contribution started from a delta of the round before that its trainer did not commit"
            delta = self._fetch_delta(replace(ctx, round=ctx.round - 1, n_slices=len(earlier.slice_hashes)), earlier)
            if isinstance(delta, str):
                return f"the delta it started from: {delta}"
            start = torch.sub(before, delta)
        return {name: t.clone() for name, t in peer.layout.named(start).items()}

    def _held_out_batch(self, ctx: RoundContext, base: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float] | None:
        """One batch of the run's held-out split (the last 1% of every shard) and the base weights' loss on it,
        once per round: a contribution whose final weights blow that loss up is a proven cheat."""
        with self._lock:
            if ctx.round in self._held_out:
                return self._held_out[ctx.round]
        from gpunite.data.batches import heldout_units

        wanted = self.peer.train_cfg.batch_size
        rows: list[torch.Tensor] = []
        try:
            for unit in heldout_units(self.peer.index, ctx.seq_len):
                if len(rows) >= wanted:
                    break
                take = min(unit.count, wanted - len(rows))
                rows.extend(self.peer._load_sequences(unit.shard_sha256, unit.first, take))
        except GpuniteError as exc:
            log.warning("no held-out check in round %d audits: %s", ctx.round, exc)
            rows = []
        held = None
        if rows:
            batch = torch.stack(rows)
            held = (batch, held_out_loss(self.peer.model_config, self.peer.train_cfg, base, batch)[0])
        with self._lock:
            self._held_out[ctx.round] = held
        return held

    def _fetch_delta(self, ctx: RoundContext, contribution: Contribution) -> torch.Tensor | str:
        """The contribution's whole decompressed pseudo-gradient from its slices, or why it is unavailable."""
        from gpunite.swarm.aggregation import slice_bounds

        cfg = self.peer.train_cfg
        parts = []
        for index, (start, end) in enumerate(slice_bounds(self.peer.numel, ctx.n_slices, cfg.compression_chunk)):
            if start == end:
                continue
            data = self.peer.fetch_slice(ctx.round, index, contribution.peer_id)
            if data is None:
                return f"could not get slice {index} of the delta from the trainer"
            result, values = check_slice(data, contribution, index, end - start, cfg.compression_chunk,
                                         cfg.compression)
            if values is None:
                return f"slice {index} of the delta is unusable: {result.reason}"
            parts.append(values)
        return torch.cat(parts)

    # ----- the coordinator -----
    def earlier_at_work(self, ctx: RoundContext, earlier_alive: Sequence[str]) -> bool:
        """Whether a better-ranked live coordinator published its beacon and may still be waiting for verdicts
        (a backup must not close the round then: two closes would split the swarm)."""
        patience = self.audit_timeout_s + 2 * self.peer.takeover_wait_s()
        with self._lock:
            seen = {pid: self._beacon_seen.get((ctx.round, pid), -float("inf")) for pid in earlier_alive}
        return any(time.time() - when < patience for when in seen.values())

    def ready_to_close(self, ctx: RoundContext, contributions: dict[str, Contribution], rank: int,
                       prev_block: str) -> dict[str, Contribution] | None:
        """The contributions the close may decide on once their verdicts are in (or timed out); None: wait.

        The first call publishes our beacon over `contributions`; later arrivals wait for the next round.
        """
        with self._lock:
            own = self._own.get(ctx.round)
        if own is None:
            ids = sorted(c.record_id for c in contributions.values())
            beacon = sign_record(self.peer.identity, AuditBeacon(
                run_id=ctx.run_id, round=ctx.round, prev_block=prev_block, contributions=ids,
                beacon=sign_beacon(self.peer.identity, ctx.run_id, ctx.round, prev_block, ids), time=time.time()))
            self.peer.node.store(run_key(ctx.run_id, "beacon", ctx.round), self.peer.peer_id, record_bytes(beacon),
                                 ttl_s=max(600.0, 4 * self.peer.train_cfg.round_deadline_s))
            with self._lock:
                self._own[ctx.round] = (beacon, dict(contributions), time.time())
            log.info("published the audit beacon of round %d over %d contributions", ctx.round, len(ids))
            return None
        record, frozen, published = own
        beacon = beacon_from_signature(record.signer, record.beacon, ctx.run_id, ctx.round, prev_block,
                                       record.contributions)
        candidates = self.candidates(ctx.round)
        drawn = {}  # audited contribution id -> its drawn verifiers
        for contribution in frozen.values():
            if not self._worth_auditing(contribution, ctx):
                continue
            assignment = assign(beacon, contribution, self.policy, candidates, self.peer.peer_id)
            if assignment.audited:
                drawn[contribution.record_id] = assignment.verifiers
        found, _ = self._verdicts(ctx.round, list(drawn))
        pool = [v for cid in drawn for v in found[cid]]
        # the drawn verifiers whose verdicts are not in yet
        missing = [pid for cid, verifiers in drawn.items()
                   for pid in sorted(set(verifiers) - {v.peer_id for v in found[cid]})]
        if missing and time.time() - published < self.audit_timeout_s:
            return None
        if missing:
            log.warning("round %d: %d verdicts did not arrive within %.0f s (from %s); those contributions wait",
                        ctx.round, len(missing), self.audit_timeout_s, ", ".join(pid[:12] for pid in missing))
        with self._lock:
            self._in_force[ctx.round] = (self.peer.peer_id, beacon)
            self._pool[ctx.round] = pool
            self._relied[ctx.round] = set()
        return frozen

    def awaited_keys(self, round_index: int) -> list[str]:
        """The verdict keys our published beacon of this round waits on: a coordinator's poll reads them with
        the round's other records, in one traversal."""
        with self._lock:
            own = self._own.get(round_index)
        if own is None:
            return []
        return [verdict_key(self.peer.run_id, round_index, c.record_id) for c in own[1].values()]

    def close_fields(self, round_index: int) -> dict:
        """What our close carries about the audits: the beacon and the verdicts its decisions relied on."""
        with self._lock:
            record = self._own[round_index][0]
            relied = sorted(self._relied.get(round_index, set()))
        return {"beacon": record.beacon, "beacon_contributions": record.contributions, "verdicts": relied}

    # ----- a close, made or checked -----
    def adopt_close(self, close: RoundClose, ctx: RoundContext, polls: int = 20) -> CheckResult:
        """Take a close's beacon and verdicts as the ones `check` judges by; a reason if they do not hold up.

        Nothing the coordinator lists is taken on trust: every verdict it names must be in the DHT (signed),
        be by a verifier its beacon drew for that contribution, and not reject a contribution the close
        accepts; every ban (a rejection with cheat) must follow from the signed records, re-derived here.
        """
        if not set(close.accepted) <= set(close.beacon_contributions):
            return CheckResult(False, "close accepts contributions its audit beacon does not cover")
        try:
            beacon = beacon_from_signature(close.signer or "", close.beacon, ctx.run_id, ctx.round,
                                           close.prev_block, close.beacon_contributions)
        except (SelectionError, ValueError) as exc:
            return CheckResult(False, f"close's audit beacon: {exc}")
        bans = [r for r in close.rejected if r.cheat]
        decided = set(close.accepted) | {r.contribution for r in close.rejected}
        wanted = set(close.verdicts)
        contributions: dict[str, Contribution] = {}
        pool: dict[str, Verdict] = {}
        for attempt in range(polls):  # records may still be on their way through the DHT
            found, listed = self._verdicts(ctx.round, sorted(decided) if len(pool) < len(wanted) else [],
                                           with_contributions=True)
            contributions |= listed
            pool |= {v.record_id: v for verdicts in found.values() for v in verdicts if v.record_id in wanted}
            needed = {v.contribution for v in pool.values()} | {r.contribution for r in bans}
            if len(pool) == len(wanted) and needed <= set(contributions):
                break
            if attempt < polls - 1:
                time.sleep(self.peer.config.poll_s)
        missing = sorted(wanted - set(pool))
        if missing:
            return CheckResult(False, f"close relies on {len(missing)} verdict(s) not found signed in the DHT "
                                      f"(e.g. {missing[0][:12]})")
        candidates = self.candidates(ctx.round)
        for verdict in pool.values():
            contribution = contributions.get(verdict.contribution)
            if contribution is None:
                return CheckResult(False, f"close relies on a verdict on contribution {verdict.contribution[:12]}, "
                                          "which this peer cannot find")
            assignment = assign(beacon, contribution, self.policy, candidates, close.peer_id)
            if verdict.peer_id not in assignment.verifiers:
                return CheckResult(False, f"close relies on a verdict by {verdict.peer_id[:12]}, whom the beacon did "
                                          f"not draw to verify {contribution.peer_id[:12]}'s contribution")
            if verdict.contribution in close.accepted and not verdict.accept:
                return CheckResult(False, f"close accepts {contribution.peer_id[:12]}'s contribution against a "
                                          f"reject verdict: {verdict.reason[:200]}")
        with self._lock:
            self._in_force[ctx.round] = (close.peer_id, beacon)
            self._pool[ctx.round] = list(pool.values())
            self._relied[ctx.round] = set()
        for rejection in bans:
            contribution = contributions.get(rejection.contribution)
            if contribution is None or contribution.peer_id != rejection.trainer:
                return CheckResult(False, f"close bans {rejection.trainer[:12]} for a contribution this peer cannot "
                                          "find signed by it")
            proof = check_contribution(contribution, ctx, median_norm=0.0, extra_checks=[self.check])
            if not proof.cheat:
                return CheckResult(False, f"close bans {rejection.trainer[:12]} without proof in the signed records "
                                          f"(here: {proof.reason[:200]})")
        return ACCEPT

    def check(self, contribution: Contribution, ctx: RoundContext) -> CheckResult:
        """The merge gate (a `contribution_checks` hook): bans, then the audit verdicts the policy needs.
        The verdicts the decision rests on go into our close (`close_fields`)."""
        decision = self._decide(contribution, ctx)
        if decision is None:
            return CheckResult(False, f"no audit beacon in force for round {ctx.round}")
        cid = contribution.record_id
        with self._lock:
            self._relied.setdefault(ctx.round, set()).update(e for e in decision.evidence if e != cid)
        return CheckResult(decision.merge, decision.reason, decision.cheat)

    def proves_cheat(self, contribution: Contribution, ctx: RoundContext) -> bool:
        """Whether the verdicts in hand prove the contribution a cheat (nothing goes into our close)."""
        decision = self._decide(contribution, ctx)
        return decision is not None and decision.cheat

    def _decide(self, contribution: Contribution, ctx: RoundContext) -> MergeDecision | None:
        """merge_decision on the verdicts in hand; None while no beacon is in force for the round."""
        with self._lock:
            in_force = self._in_force.get(ctx.round)
            pool = list(self._pool.get(ctx.round, []))
        if in_force is None:
            return None
        coordinator, beacon = in_force
        assignment = assign(beacon, contribution, self.policy, self.candidates(ctx.round), coordinator)
        return merge_decision(contribution, [], pool, self.policy, assignment, self._bans_for(ctx.round),
                              self._suspects_for(ctx.round))

    def settle(self, close: RoundClose) -> None:
        """Ban the signers of the cheats a followed close proved (their later contributions never merge), and
        note its audit outcomes: who failed an audit without proof (a suspect) and who passed one (cleared)."""
        self._note_audit_outcomes(close)
        for rejection in close.rejected:
            with self._lock:
                if not rejection.cheat or self.bans.is_banned(rejection.trainer):
                    continue
                self.bans.ban(rejection.trainer, close.round, rejection.reason, (rejection.contribution,))
            log.warning("banned %s from the run: %s", rejection.trainer[:12], rejection.reason)

    def _note_audit_outcomes(self, close: RoundClose) -> None:
        """Audit outcomes from the close and the verdicts it relied on (checked signed and drawn when it was made
        or adopted, so every peer following it reads the same): a reject verdict on a contribution it rejected
        is a failure, an accept verdict on one it merged is a pass; a contribution without any says nothing."""
        with self._lock:
            pool = {v.record_id: v for v in self._pool.get(close.round, [])}
        relied = [pool[vid] for vid in close.verdicts if vid in pool]
        if len(relied) < len(close.verdicts):
            log.warning("round %d: %d of the close's verdicts are not held here; their audit outcomes are not "
                        "noted", close.round, len(close.verdicts) - len(relied))
        trainers = {cid: (pid, True) for cid, pid in zip(close.accepted, close.contributors)}
        trainers |= {r.contribution: (r.trainer, False) for r in close.rejected}
        for verdict in relied:
            trainer, merged = trainers.get(verdict.contribution, (None, False))
            if trainer is None or verdict.trainer != trainer or verdict.accept != merged:
                continue
            with self._lock:
                was_suspect = self.suspects.as_of(close.round + 1).is_suspect(trainer)
                self.suspects.note(trainer, close.round, merged, verdict.reason,
                                   (verdict.contribution, verdict.record_id))
                now_suspect = self.suspects.as_of(close.round + 1).is_suspect(trainer)
            if now_suspect and not was_suspect:
                log.warning("%s failed its round %d audit (%s): its contributions merge only when audited until "
                            "an audit passes", trainer[:12], close.round, verdict.reason[:200])
            elif was_suspect and not now_suspect:
                log.info("%s passed its round %d audit: no longer a suspect", trainer[:12], close.round)

    def _verdicts(self, round_index: int, contribution_ids: list[str], with_contributions: bool = False
                  ) -> tuple[dict[str, list[Verdict]], dict[str, Contribution]]:
        """The signed verdicts on each of these contributions, by contribution id, and (with_contributions) the
        round's contributions by record id: one DHT traversal for all of them (a coordinator waiting on a
        round's audits, or a peer checking a close, would otherwise pay a read's round trips per contribution)."""
        run_id = self.peer.run_id
        keys = {cid: verdict_key(run_id, round_index, cid) for cid in contribution_ids}
        parsers = dict.fromkeys(keys.values(), parse_verdict)
        contrib_key = run_key(run_id, "contrib", round_index)
        if with_contributions:
            parsers[contrib_key] = parse_contribution
        found = self.peer.node.get_many_records(parsers) if parsers else {}
        verdicts = {cid: [v for v in found[key].values() if v.contribution == cid and v.round == round_index]
                    for cid, key in keys.items()}
        contributions = {c.record_id: c for c in found.get(contrib_key, {}).values() if c.round == round_index}
        with self._lock:
            fresh = [v for listed in verdicts.values() for v in listed if v.record_id not in self._emitted]
            self._emitted.update(v.record_id for v in fresh)
        for verdict in fresh:
            self.peer._emit(verdict)
        return verdicts, contributions


def trail_reply(header: dict, body: bytes, max_bytes: int) -> bytes:
    """A trail reply's bytes: unpacked when the trainer packed them (`FLOAT_ENCODING`), as sent otherwise."""
    encoding = header.get("encoding")
    if encoding is None:
        return body
    if encoding != FLOAT_ENCODING:
        raise ProtocolError(f"trail reply in an encoding never asked for: {str(encoding)[:40]!r}")
    return unpack_floats(body, max_bytes)


async def serve_trail(peer: Peer, header: dict, body: bytes, caller: str) -> tuple[dict, bytes]:
    """Stream handler: segment i (or "final") of this trainer's trail for a round it still keeps."""
    import asyncio

    from gpunite.proof.trail import TrailError

    if header.get("run") != peer.run_id:
        raise ValueError("trail request for another run")
    round_index, what, part = header.get("round"), header.get("segment"), header.get("part", "both")
    if not isinstance(round_index, int) or not (what == "final" or isinstance(what, int)):
        raise ValueError("trail request needs an integer round and segment (or \"final\")")
    # Round state.round + 1 too: a peer that trains the next round while this one closes (train.overlap).
    if not peer.state.round - 1 <= round_index <= peer.state.round + 1:
        raise ValueError(f"round {round_index}'s trail is not kept here")

    def read() -> bytes:
        if what == "final":
            return peer.recorder.final_payload(round_index)
        if not 0 <= what < len(list(peer.recorder.round_dir(round_index).glob("entry-*.safetensors"))) - 1:
            raise TrailError(f"round {round_index} has no trail segment {what} here")
        return peer.recorder.segment_part(round_index, what, part)

    accept = header.get("accept")
    packed = isinstance(accept, list) and FLOAT_ENCODING in accept

    def reply() -> bytes:
        return pack_floats(read()) if packed else read()

    try:
        data = await asyncio.get_running_loop().run_in_executor(None, reply)
    except (TrailError, OSError) as exc:
        raise ValueError(str(exc)) from None
    reply_header = {"round": round_index, "segment": what, "part": part}
    return reply_header | ({"encoding": FLOAT_ENCODING} if packed else {}), data

