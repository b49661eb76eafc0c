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
    # peer id -> how old its new heartbeats are when this peer first reads them (moving average, seconds)
    lateness: dict[str, float] = field(default_factory=dict, repr=False)
    # peer id -> its latest heartbeat's time, but never later than when it was first read here (a clock
    # ahead, or a peer postdating its heartbeats to look alive after it left, gains nothing)
    _sent_at: dict[str, float] = field(default_factory=dict, repr=False)

    @property
    def ttl_s(self) -> float:
        # At least 8 s: on a loaded machine a heartbeat can be late by seconds, and a peer taken for gone
        # makes the others take over its coordination at once.
        return max(3 * self.interval_s, 8.0)

    @property
    def most_lateness_s(self) -> float:
        """The most a peer's heartbeats may arrive late and still count: it bounds how long a peer on a slow
        link that died is taken for alive (ttl_s + this), and how much a peer can buy by backdating."""
        return 3 * self.ttl_s

    def _deadline(self, beat: Heartbeat, contact: dict[str, float]) -> float:
        """Until when beat's peer counts as alive: ttl_s after its heartbeat (allowing for how late its
        heartbeats arrive here) or after its last request or reply on a stream, whichever is later."""
        late = min(self.lateness.get(beat.peer_id, 0.0), self.most_lateness_s)
        sent = self._sent_at.get(beat.peer_id, beat.time)
        return max(sent + late, contact.get(beat.p2p_id, 0.0)) + self.ttl_s

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

        # Kept in the DHT as long as a reader may still count it (a store that arrives late must not arrive
        # expired); readers judge freshness by its time, not by its DHT expiry.
        await self.node._dht.store(run_key(self.run_id, "heartbeat"), record_bytes(self.heartbeat()),
                                   get_dht_time() + self.ttl_s + self.most_lateness_s, subkey=self.identity.peer_id)

    async def _publish_within_ttl(self) -> None:
        started = time.monotonic()
        try:
            await asyncio.wait_for(self._publish(), self.ttl_s)
        except asyncio.TimeoutError:
            log.warning("a heartbeat did not reach the DHT within %.0f s (saturated link or busy CPU); "
                        "the next ones are already on their way", self.ttl_s)
        except Exception as exc:  # a missed heartbeat is followed by the next; the peer must not die of it
            log.warning("heartbeat not published: %s", exc)
        else:
            if time.monotonic() - started > self.interval_s:
                log.debug("a heartbeat took %.1f s to reach the DHT", time.monotonic() - started)

    async def _loop(self) -> None:
        # Each heartbeat is its own task: a store stuck behind a saturated uplink or an overloaded DHT node
        # must not hold back the ones after it (awaited one by one, heartbeats lapsed for 20 s and more on the
        # WAN test bed, and live peers, this one included, were taken for gone).
        in_flight: set[asyncio.Task] = set()
        most = int(self.ttl_s / self.interval_s) + 1
        while True:
            if len(in_flight) < most:
                task = asyncio.ensure_future(self._publish_within_ttl())
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
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

        Heard from: a heartbeat published that recently (plus how late that peer's heartbeats have been
        arriving here, up to most_lateness_s), or a request or reply that recently on a stream from the
        libp2p id its last heartbeat names. On a saturated link (a home uplink sending a model's worth of
        slices) a DHT store takes many seconds, so heartbeats arrive already old, or a read misses one, while
        the peer is alive and answering; a peer that died or was cut off sends neither, and is gone once its
        last heartbeat is that old.
        """
        now = time.time()
        beats = self.node.get_records(run_key(self.run_id, "heartbeat"), parse_heartbeat)
        for pid, beat in beats.items():
            known = self.last_seen.get(pid)
            if beat.run_id != self.run_id or (known is not None and beat.time <= known.time):
                continue
            self.last_seen[pid] = beat
            self._sent_at[pid] = min(beat.time, now)
            age = now - self._sent_at[pid]
            if known is None:  # first sight: an old record may be a peer long gone, not a late one
                self.lateness[pid] = age if age <= self.ttl_s else 0.0
            else:
                self.lateness[pid] = 0.7 * self.lateness.get(pid, 0.0) + 0.3 * age
        contact = self.node.last_contact
        live = {pid: hb for pid, hb in self.last_seen.items() if now <= self._deadline(hb, contact)}
        if self._task is not None:  # heartbeating: this peer is alive, whatever the DHT holds of it right now
            live[self.identity.peer_id] = self.heartbeat()
        for pid in sorted(set(live) - self._known):
            if pid != self.identity.peer_id:
                log.info("peer %s joined (round %d)", pid[:12], live[pid].round)
        for pid in sorted(self._known - set(live)):
            log.info("peer %s left (last heartbeat %.0f s old, its heartbeats arrive %.1f s late here)",
                     pid[:12], now - self._sent_at.get(pid, now), self.lateness.get(pid, 0.0))
        self._known = set(live)
        return live

    def speeds(self) -> dict[str, float]:
        """Measured TFLOPS from host records, by peer id (work is shared out in proportion)."""
        hosts = self.node.get_records(run_key(self.run_id, "host"), parse_host)
        return {pid: host.tflops for pid, host in hosts.items() if host.tflops > 0}
