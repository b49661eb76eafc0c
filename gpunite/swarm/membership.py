"""Membership: signed heartbeats and host records in the DHT, and who is alive right now.

A peer republishes its heartbeat (run, round, global weights hash, roles, libp2p id and addresses) every
`interval_s` with an expiry of three intervals (at least 8 s); a peer neither heartbeating nor talking to us
on a stream for that long is gone.
The heartbeat is also what binds a gpunite peer id (Ed25519 key) to the libp2p id its streams come from.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from gpunite.identity import Identity
from gpunite.records import Heartbeat, HostRecord, parse_record_as, record_bytes, sign_record
from gpunite.swarm.node import SwarmNode
from gpunite.swarm.protocol import run_key

log = logging.getLogger("gpunite.swarm.membership")


def parse_heartbeat(data: bytes) -> Heartbeat:
    return parse_record_as(data, Heartbeat)


def parse_host(data: bytes) -> HostRecord:
    return parse_record_as(data, HostRecord)


@dataclass
class Membership:
    """Publishes this peer's heartbeat on the swarm loop and reads everyone else's."""

    node: SwarmNode
    identity: Identity
    run_id: str
    roles: list[str]
    interval_s: float = 2.0
    round: int = 0
    weights_hash: str = "0" * 64
    bans: str = ""  # BanList.digest() of the bans the current round is judged by
    _task: object = field(default=None, repr=False)
    _known: set[str] = field(default_factory=set, repr=False)
    last_seen: dict[str, Heartbeat] = field(default_factory=dict, repr=False)  # every peer's latest heartbeat

    @property
    def ttl_s(self) -> float:
        # At least 8 s: on a loaded machine a heartbeat can be late by seconds, and a peer taken for gone
        # makes the others take over its coordination at once.
        return max(3 * self.interval_s, 8.0)

    def heartbeat(self) -> Heartbeat:
        return sign_record(self.identity, Heartbeat(
            run_id=self.run_id, round=self.round, weights_hash=self.weights_hash, roles=self.roles,
            maddrs=self.node.maddrs[:16], p2p_id=self.node.p2p_id, time=time.time(), bans=self.bans))

    def update(self, round_index: int, weights_hash: str, bans: str = "") -> None:
        """New round or weights (and the digest of the bans that round is judged by): publish at once."""
        self.round, self.weights_hash, self.bans = round_index, weights_hash, bans
        self.node.submit(self._publish())

    async def _publish(self) -> None:
        from hivemind.utils import get_dht_time

        await self.node._dht.store(run_key(self.run_id, "heartbeat"), record_bytes(self.heartbeat()),
                                   get_dht_time() + self.ttl_s, subkey=self.identity.peer_id)

    async def _loop(self) -> None:
        while True:
            try:
                await self._publish()
            except Exception as exc:  # a missed heartbeat is retried next tick; the peer must not die of it
                log.warning("heartbeat not published: %s", exc)
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._task = self.node.submit(self._loop())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def publish_host(self, host: HostRecord) -> None:
        self.node.store(run_key(self.run_id, "host"), self.identity.peer_id,
                        record_bytes(sign_record(self.identity, host)), ttl_s=3600)

    def alive(self) -> dict[str, Heartbeat]:
        """Peers of this run heard from within ttl_s, by peer id; logs arrivals and departures.

        Heard from: a heartbeat published that recently, or a request or reply that recently on a stream
        from the libp2p id its last heartbeat names. On a saturated link (a home uplink sending a model's
        worth of slices) a heartbeat can reach the DHT tens of seconds late, or a read can miss it, while
        the peer keeps answering; a peer that died or was cut off sends neither, so it is gone as soon as it
        would be from heartbeats alone.
        """
        now = time.time()
        beats = self.node.get_records(run_key(self.run_id, "heartbeat"), parse_heartbeat)
        for pid, beat in beats.items():
            known = self.last_seen.get(pid)
            if beat.run_id == self.run_id and (known is None or beat.time >= known.time):
                self.last_seen[pid] = beat
        contact = getattr(self.node, "last_contact", {})
        live = {pid: hb for pid, hb in self.last_seen.items()
                if now - max(hb.time, contact.get(hb.p2p_id, 0.0)) <= self.ttl_s}
        for pid in sorted(set(live) - self._known):
            if pid != self.identity.peer_id:
                log.info("peer %s joined (round %d)", pid[:12], live[pid].round)
        for pid in sorted(self._known - set(live)):
            log.info("peer %s left", pid[:12])
        self._known = set(live)
        return live

    def speeds(self) -> dict[str, float]:
        """Measured TFLOPS from host records, by peer id (work is shared out in proportion)."""
        hosts = self.node.get_records(run_key(self.run_id, "host"), parse_host)
        return {pid: host.tflops for pid, host in hosts.items() if host.tflops > 0}
