"""Membership's view of who is alive: fresh heartbeats, or recent stream contact while a heartbeat is late."""

from __future__ import annotations

import time

from gpunite.identity import Identity
from gpunite.records import Heartbeat, sign_record
from gpunite.swarm.membership import Membership

RUN_ID = "ab" * 32


class FakeNode:
    """What Membership.alive reads from a SwarmNode: the heartbeats under the run's key and stream contact."""

    def __init__(self) -> None:
        self.beats: dict[str, Heartbeat] = {}
        self.last_contact: dict[str, float] = {}

    def get_records(self, key: str, parse) -> dict[str, Heartbeat]:
        assert key.endswith("heartbeat")
        return dict(self.beats)


def beat(identity: Identity, p2p_id: str, at: float, round_index: int = 0) -> Heartbeat:
    return sign_record(identity, Heartbeat(run_id=RUN_ID, round=round_index, weights_hash="0" * 64,
                                           roles=["trainer"], maddrs=[], p2p_id=p2p_id, time=at))


def membership(node: FakeNode) -> Membership:
    return Membership(node, Identity.from_seed(b"\x01" * 32), RUN_ID, ["trainer"], interval_s=1.0)


def test_a_peer_with_a_late_heartbeat_stays_alive_while_it_talks_to_us():
    node, other = FakeNode(), Identity.from_seed(b"\x02" * 32)
    watcher = membership(node)
    now = time.time()
    node.beats[other.peer_id] = beat(other, "QmOther", now - 30)  # published 30 s ago, ttl is 8 s
    assert other.peer_id not in watcher.alive()
    node.last_contact["QmOther"] = now - 2  # but it answered a request 2 s ago
    assert other.peer_id in watcher.alive()
    node.last_contact["QmOther"] = now - 20  # and that was long ago: gone, as from heartbeats alone
    assert other.peer_id not in watcher.alive()


def test_contact_from_another_libp2p_id_does_not_keep_a_peer_alive():
    node, other = FakeNode(), Identity.from_seed(b"\x02" * 32)
    watcher = membership(node)
    node.beats[other.peer_id] = beat(other, "QmOther", time.time() - 30)
    node.last_contact["QmSomeoneElse"] = time.time()
    assert watcher.alive() == {}


def test_a_dht_read_that_misses_a_fresh_heartbeat_does_not_drop_the_peer():
    node, other = FakeNode(), Identity.from_seed(b"\x02" * 32)
    watcher = membership(node)
    fresh = beat(other, "QmOther", time.time() - 1, round_index=5)
    node.beats[other.peer_id] = fresh
    assert watcher.alive()[other.peer_id].round == 5
    node.beats.clear()  # this read found nothing (a timed-out DHT query), the heartbeat is 1 s old
    assert watcher.alive()[other.peer_id] == fresh


def test_an_older_heartbeat_read_later_does_not_replace_a_newer_one():
    node, other = FakeNode(), Identity.from_seed(b"\x02" * 32)
    watcher = membership(node)
    now = time.time()
    node.beats[other.peer_id] = beat(other, "QmOther", now - 1, round_index=7)
    watcher.alive()
    node.beats[other.peer_id] = beat(other, "QmOther", now - 5, round_index=6)  # a stale replica answered
    assert watcher.alive()[other.peer_id].round == 7


def test_a_peer_whose_heartbeats_arrive_late_is_allowed_that_lateness_and_is_gone_once_they_stop():
    node, other = FakeNode(), Identity.from_seed(b"\x02" * 32)
    watcher = membership(node)  # ttl 8 s
    now = time.time()
    # Its heartbeats reach the DHT 12 s after they were signed (a store behind a saturated uplink): a new
    # one every 2 s, each read here once, at that age.
    verdicts = []
    for tick in range(12):
        node.beats[other.peer_id] = beat(other, "QmOther", now + 2 * tick - 12)
        verdicts.append(other.peer_id in alive_at(watcher, now + 2 * tick))
    assert not verdicts[0] and all(verdicts[4:])  # taken for gone at first sight, then allowed the lateness
    assert 9 < watcher.lateness[other.peer_id] < 12.5
    last = now + 2 * 11 - 12
    # It stops (killed): still counted until its last heartbeat is ttl + its lateness old, then gone.
    assert other.peer_id in alive_at(watcher, last + 8 + 8)
    assert other.peer_id not in alive_at(watcher, last + 8 + 13)


def test_lateness_is_capped_and_a_postdated_heartbeat_buys_nothing():
    node, other = FakeNode(), Identity.from_seed(b"\x02" * 32)
    watcher = membership(node)
    now = time.time()
    for tick in range(30):  # arriving 60 s late, far past the cap
        node.beats[other.peer_id] = beat(other, "QmOther", now + tick - 60)
        alive_at(watcher, now + tick)
    last = now + 29 - 60
    assert other.peer_id not in alive_at(watcher, last + watcher.ttl_s + watcher.most_lateness_s + 1)
    node.beats[other.peer_id] = beat(other, "QmOther", now + 3600)  # claims to be from an hour ahead
    assert other.peer_id in alive_at(watcher, now + 100)
    assert other.peer_id not in alive_at(watcher, now + 100 + watcher.ttl_s + watcher.most_lateness_s + 1)


def alive_at(watcher: Membership, at: float) -> dict[str, Heartbeat]:
    real = time.time
    time.time = lambda: at
    try:
        return watcher.alive()
    finally:
        time.time = real
