"""Getting a peer into a run: `start_run` (the first peer) and `join_run` (any later peer, through any peer).

start_run prepares the data if needed, builds round 0's weights from the manifest seed, announces the
manifest under its run id, waits for the first peers and publishes the genesis close (round 0's roster).
join_run finds the run in the DHT, checks the manifest against its run id, fetches the shard index and
tokenizer by hash, and the latest global state from a live peer (checked against the blocks peers signed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from gpunite.errors import GpuniteError
from gpunite.identity import Identity, RecordError
from gpunite.manifest import Manifest, ManifestError
from gpunite.records import GENESIS, record_bytes, sign_record
from gpunite.swarm.node import SwarmError, SwarmNode
from gpunite.swarm.peer import Peer, PeerConfig, PeerError, parse_block
from gpunite.swarm.protocol import (
    HANDLE_FILE,
    HANDLE_STATE,
    RUNS_KEY,
    ProtocolError,
    RosterEntry,
    RoundClose,
    RunAnnouncement,
    parse_announcement,
    run_key,
)
from gpunite.swarm.state_sync import StateSyncError, check_bans, fetch_file, max_state_bytes, state_from_frame

log = logging.getLogger("gpunite.swarm.bootstrap")
ANNOUNCE_TTL_S = 3600.0
T = TypeVar("T")


def manifest_from_announcement(announcement: RunAnnouncement) -> Manifest:
    """The manifest an announcement carries, only if it hashes to the announced run id."""
    try:
        manifest = Manifest.model_validate(json.loads(announcement.manifest_json))
    except (ValueError, TypeError) as exc:
        raise ManifestError(f"peer {announcement.peer_id[:12]} announced a manifest that does not parse: {exc}")
    if manifest.run_id != announcement.run_id:
        raise ManifestError(f"peer {announcement.peer_id[:12]} announced a manifest whose hash is not its run id")
    return manifest


def keep_announcing(node: SwarmNode, identity: Identity, manifest: Manifest,
                    announcement: RunAnnouncement | None = None) -> RunAnnouncement:
    """Publish (and keep republishing) the run's manifest so any peer can fetch it, the starter gone or not."""
    if announcement is None or announcement.peer_id != identity.peer_id:
        announcement = sign_record(identity, RunAnnouncement(
            run_id=manifest.run_id, name=manifest.run.name, manifest_json=manifest.canonical_bytes().decode(),
            time=time.time()))
    data = record_bytes(announcement)

    async def republish() -> None:
        from hivemind.utils import get_dht_time

        while True:
            try:
                expires = get_dht_time() + ANNOUNCE_TTL_S
                await node._dht.store(run_key(manifest.run_id, "manifest"), data, expires, subkey=identity.peer_id)
                await node._dht.store(RUNS_KEY, data, expires, subkey=manifest.run_id)
            except Exception as exc:  # retried at the next tick
                log.warning("run announcement not published: %s", exc)
            await asyncio.sleep(ANNOUNCE_TTL_S / 4)

    node.submit(republish())
    return announcement


def prepared_ok(manifest: Manifest) -> bool:
    from gpunite.data.shards import ShardIndex

    if not manifest.data.dataset_hash or not manifest.data.tokenizer_hash:
        return False
    try:
        index = ShardIndex.load(manifest.prepared_path)
    except GpuniteError:
        return False
    return index.dataset_hash == manifest.data.dataset_hash


def start_run(manifest_path: Path, config: PeerConfig, host: str = "127.0.0.1", port: int = 0,
              wait_peers: int = 1, wait_peers_s: float = 60.0, on_record: Callable[[Any], None] | None = None,
              on_ready: Callable[[Peer], None] | None = None) -> Peer:
    """Start a run as its first peer; returns the peer after the genesis close (call `peer.run()` next)."""
    from gpunite.data.prepare import prepare_dataset
    from gpunite.manifest import load_manifest

    manifest = load_manifest(manifest_path)
    if not prepared_ok(manifest):
        log.info("preparing data for %s", manifest_path)
        prepare_dataset(manifest)
        manifest = load_manifest(manifest_path)
    identity = Identity.load_or_create(config.home)
    node = SwarmNode(host=host, port=port).start()
    try:
        peer = Peer(manifest, manifest.prepared_path, identity, node, config, on_record=on_record)
        link_prepared(peer.run_dir, manifest.prepared_path)
        keep_announcing(node, identity, manifest)
        peer.serve()
        log.info("started run %s (%s) as peer %s; join with: gpunite join %s", manifest.run_id[:12],
                 manifest.run.name, identity.peer_id[:12], node.maddrs[0])
        if on_ready is not None:
            on_ready(peer)
        roster = wait_for_peers(peer, wait_peers, wait_peers_s)
        genesis = sign_record(identity, RoundClose(
            run_id=manifest.run_id, round=-1, base_hash=peer.state.weights_hash, prev_block=GENESIS, accepted=[],
            contributors=[], next_roster=roster, coordinator_rank=0, time=time.time()))
        node.store(run_key(manifest.run_id, "close", -1), identity.peer_id, record_bytes(genesis), ttl_s=ANNOUNCE_TTL_S)
        peer.state.close = genesis
        log.info("round 0 opens with %d peers", len(roster))
        return peer
    except BaseException:
        node.close()
        raise


def link_prepared(run_dir: Path, prepared_path: Path) -> None:
    """Point HOME/runs/<run>/prepared (where a joiner keeps the run's data) at the starter's prepared data.

    The first peer holds every shard; if it crashes and comes back through `gpunite join` with the same home,
    it must still serve them all, not only the ones it fetches again: other peers fetch theirs lazily.
    """
    link = run_dir / "prepared"
    if link.exists() or link.is_symlink() or link.resolve() == prepared_path.resolve():
        return
    try:
        link.symlink_to(prepared_path.resolve(), target_is_directory=True)
    except OSError as exc:  # no symlinks here: a restart then fetches the data again, as any joiner does
        log.warning("could not link %s to the prepared data %s: %s", link, prepared_path, exc)


def wait_for_peers(peer: Peer, wait_peers: int, wait_peers_s: float) -> list[RosterEntry]:
    """Trainers holding round 0's weights, once wait_peers of them are up (or the wait ran out)."""
    give_up = time.time() + wait_peers_s
    while True:
        alive = peer.membership.alive()
        ready = sorted(pid for pid, hb in alive.items()
                       if "trainer" in hb.roles and hb.round == 0 and hb.weights_hash == peer.state.weights_hash)
        if peer.peer_id not in ready and "trainer" in peer.config.roles:
            ready = sorted(set(ready) | {peer.peer_id})
        if len(ready) >= wait_peers or time.time() > give_up:
            speeds = peer.membership.speeds()
            return [RosterEntry(peer_id=pid, speed=min(max(speeds.get(pid, 1.0), 1e-6), 1e9)) for pid in ready]
        time.sleep(peer.config.poll_s)


def find_run(node: SwarmNode, run_id: str | None) -> RunAnnouncement:
    """The announcement of run_id (a prefix works), or of the only run the DHT lists when run_id is None."""
    for _ in range(20):
        runs = node.get_records(RUNS_KEY, parse_announcement, signer_subkey=False)
        runs = {rid: a for rid, a in runs.items() if a.run_id == rid}
        matching = [a for rid, a in runs.items() if run_id is None or rid.startswith(run_id)]
        if len(matching) == 1:
            return matching[0]
        if len(matching) > 1:
            names = ", ".join(f"{a.run_id[:12]} ({a.name})" for a in matching)
            raise PeerError(f"the swarm has several runs: {names}; pick one with --run RUN_ID")
        time.sleep(0.5)
    what = f"run {run_id}" if run_id else "any run"
    raise PeerError(f"the swarm does not list {what}; check the address, or start one with `gpunite run start`")


def join_run(address: str, config: PeerConfig, run_id: str | None = None, host: str = "127.0.0.1",
             port: int = 0, on_record: Callable[[Any], None] | None = None) -> Peer:
    """Join a run through any peer's address; returns a peer synced to the latest global state."""
    from gpunite.data.shards import ShardIndex

    identity = Identity.load_or_create(config.home)
    node = SwarmNode(initial_peers=[address], host=host, port=port).start()
    try:
        announcement = find_run(node, run_id)
        manifest = manifest_from_announcement(announcement)
        run_dir = config.home / "runs" / manifest.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        manifest.save(run_dir / "run.toml")
        prepared_dir = run_dir / "prepared"
        keep_announcing(node, identity, manifest)
        sources = StateSources(node, manifest.run_id, identity.peer_id)

        def get_file(kind: str, sha: str) -> Path:
            return sources.fetch_file(prepared_dir, kind, sha)

        get_file("index", manifest.data.dataset_hash or "")
        index = ShardIndex.load(prepared_dir)
        get_file("tokenizer", index.tokenizer_hash)
        if index.tokenizer_hash != manifest.data.tokenizer_hash:
            raise StateSyncError("the shard index names a different tokenizer than the manifest")
        peer = Peer(manifest, prepared_dir, identity, node, config, on_record=on_record, fetch_file=get_file)
        state = sources.fetch_state(peer)
        peer._load_state(state)
        peer.audits.restore_bans(state.bans)
        peer.membership.update(state.round, state.weights_hash, peer.audits.bans_digest(state.round))
        log.info("joined run %s (%s) as peer %s at round %d, weights %s", manifest.run_id[:12], manifest.run.name,
                 identity.peer_id[:12], state.round, state.weights_hash[:12])
        return peer
    except BaseException:
        node.close()
        raise


class StateSources:
    """Live peers of a run to fetch files and global state from, best (latest round) first."""

    def __init__(self, node: SwarmNode, run_id: str, self_id: str, patience_s: float = 90.0) -> None:
        from gpunite.swarm.membership import parse_heartbeat

        self.node, self.run_id, self.self_id = node, run_id, self_id
        self.patience_s = patience_s
        self._parse = parse_heartbeat
        self._cached: tuple[float, list[Any]] = (0.0, [])

    def peers(self) -> list[Any]:
        now = time.time()
        if now - self._cached[0] < 10 and self._cached[1]:
            return self._cached[1]
        for _ in range(20):
            beats = self.node.get_records(run_key(self.run_id, "heartbeat"), self._parse)
            live = [hb for pid, hb in beats.items()
                    if pid != self.self_id and hb.run_id == self.run_id and now - hb.time < 30]
            if live:
                # Latest round first; among equals the one heard from most recently (a peer that just
                # froze or lost its link still has a live heartbeat for a few seconds).
                self._cached = (now, sorted(live, key=lambda hb: (-hb.round, -hb.time, hb.peer_id)))
                return self._cached[1]
            time.sleep(0.5)
            now = time.time()
        raise PeerError(f"no live peer of run {self.run_id[:12]} answers; is the run still going?")

    def fetch_file(self, prepared_dir: Path, kind: str, sha: str) -> Path:
        if len(sha) != 64:
            raise StateSyncError(f"the manifest has no {kind} hash; the run's starter must prepare its data first")

        def attempt(beat: Any) -> Path:
            def request(header: dict, max_bytes: int) -> tuple[dict, bytes]:
                return self.node.request(beat.p2p_id, HANDLE_FILE, header, max_reply_bytes=max_bytes,
                                         maddrs=list(beat.maddrs))
            return fetch_file(request, prepared_dir, kind, sha, max_bytes=1 << 31)

        return self._first_served(f"{kind} {sha[:12]}", attempt)

    def fetch_state(self, peer: Peer):
        """The latest global state from a live peer, cross-checked with the blocks other peers signed."""

        def attempt(beat: Any):
            try:
                header, body = self.node.request(
                    beat.p2p_id, HANDLE_STATE, {"run": self.run_id}, max_reply_bytes=max_state_bytes(peer.numel),
                    maddrs=list(beat.maddrs), timeout=120)
                state = state_from_frame(header, body, peer.layout, self.run_id)
                if state.round > 0:
                    self._check_against_blocks(state)
                    check_bans(state, self.peers())
            except (SwarmError, ProtocolError, StateSyncError, RecordError) as exc:
                log.warning("state from %s refused: %s", beat.peer_id[:12], exc)
                raise
            log.info("fetched global state of round %d from %s", state.round, beat.peer_id[:12])
            return state

        return self._first_served("a valid global state", attempt)

    def _first_served(self, what: str, attempt: Callable[[Any], T]) -> T:
        """attempt(heartbeat) on each live peer in turn until one serves; when none does, look again.

        Peers that were there a moment ago may have crashed or lost their link, and others come back or
        join: the list of live peers is read afresh and tried again, for up to `patience_s`.
        """
        errors: list[str] = []
        give_up = time.time() + self.patience_s
        while True:
            try:
                sources = self.peers()
            except PeerError as exc:
                sources, errors = [], [*errors, str(exc)]
            for beat in sources:
                try:
                    return attempt(beat)
                except (SwarmError, ProtocolError, StateSyncError, RecordError) as exc:
                    errors.append(f"{beat.peer_id[:12]}: {exc}")
            if time.time() >= give_up:
                raise PeerError(f"no peer served {what} within {self.patience_s:.0f} s: "
                                f"{'; '.join(errors[-4:])[:500]}")
            self._cached = (0.0, [])
            time.sleep(2.0)

    def _check_against_blocks(self, state) -> None:
        blocks = self.node.get_records(run_key(self.run_id, "block", state.round - 1), parse_block)
        votes: dict[str, int] = {}
        for block in blocks.values():
            votes[block.weights_hash] = votes.get(block.weights_hash, 0) + 1
        if votes and votes.get(state.weights_hash, 0) < max(votes.values()):
            raise StateSyncError(f"weights of round {state.round} disagree with most peers' signed blocks")
