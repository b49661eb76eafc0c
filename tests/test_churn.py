"""Churn: the seeded schedule, the figures read from peers' records, a real swarm through a crash and a cut.

In the real swarm the first peer is killed with SIGKILL and restarted from its home, and another peer is
frozen (a cut link) and resumed.

tests/test_swarm.py kills the first peer for good; here it comes back: it must rejoin, train in step, and
leave no verified work lost and every peer on the same blocks.
"""

from __future__ import annotations

import json
import time
from itertools import pairwise
from pathlib import Path

import pytest
from _swarm_helpers import tiny_swarm_manifest

from gpunite.records import GENESIS, Block
from gpunite.swarm.churn import ChurnDriver, ChurnEvent, EventOutcome, analyze, chain_blocks, churn_schedule
from gpunite.swarm.demo import LocalSwarm

pytestmark = pytest.mark.timeout(420)

PEERS = ["peer1", "peer2", "peer3", "peer4"]


def test_a_peer_restarted_in_a_round_it_committed_to_does_not_commit_again():
    """Its second record would replace the first under its DHT subkey, under a close relying on a verdict on it."""
    import threading
    from types import SimpleNamespace

    from gpunite.swarm.peer import Peer

    earlier = SimpleNamespace(round=3, record_id="a" * 64)
    dht = {"me": earlier}
    peer = SimpleNamespace(_lock=threading.Lock(), payloads={}, peer_id="me",
                           contributions=lambda round_index: dict(dht) if round_index == 3 else {})
    assert Peer._contributed_before_restart(peer, 3)  # restarted: the record in the DHT is not this process's
    assert not Peer._contributed_before_restart(peer, 4)  # a round it has not committed to
    peer.payloads[3] = [b"slices"]  # this process committed it itself
    assert not Peer._contributed_before_restart(peer, 3)


def test_schedule_is_seeded_bounded_one_at_a_time_and_kills_the_first_peer_first():
    schedule = churn_schedule(3, PEERS, 600.0, quiet_tail_s=90.0)
    assert schedule == churn_schedule(3, PEERS, 600.0, quiet_tail_s=90.0)
    assert schedule != churn_schedule(4, PEERS, 600.0, quiet_tail_s=90.0)
    assert schedule[0].kind == "kill" and schedule[0].peer == "peer1"
    assert {e.kind for e in schedule} == {"kill", "cut"} and len(schedule) >= 5
    for before, after in pairwise(schedule):
        assert after.at_s >= before.at_s + before.down_s + 25.0  # one peer out at a time, then a gap
    last = schedule[-1]
    assert last.at_s + last.down_s <= 600.0 - 90.0  # the quiet tail
    assert churn_schedule(3, PEERS, 60.0, quiet_tail_s=90.0) == []
    with pytest.raises(ValueError):
        churn_schedule(3, ["peer1"], 600.0)


def _cid(n: int) -> str:
    return f"{n:064x}"


def _write_chain(home: Path, blocks: list[tuple[int, list[int], str]], start: float = 1000.0) -> None:
    run_dir = home / "runs" / ("a" * 64)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "chain.jsonl", "a") as handle:
        for round_index, accepted, weights in blocks:
            block = Block(run_id="a" * 64, round=round_index, prev=GENESIS,
                          accepted=[_cid(a) for a in accepted], weights_hash=weights * 64, tokens=10,
                          time=start + 10 * round_index)
            handle.write(json.dumps(block.model_dump(mode="json")) + "\n")


def test_analysis_finds_forks_short_merges_vanished_rounds_and_stalled_rounds(tmp_path: Path):
    homes = {name: tmp_path / name for name in ("peer1", "peer2", "peer3")}
    _write_chain(homes["peer1"], [(0, [1, 2], "a"), (1, [3, 4], "b"), (2, [5], "c")])
    _write_chain(homes["peer2"], [(0, [1, 2], "a"), (1, [3, 4], "b"), (2, [5], "c")])
    # peer3 followed another close in round 1 (a fork that merged contribution 9) and skipped rounds 2.
    _write_chain(homes["peer3"], [(0, [1, 2], "a"), (1, [3, 9], "d")])
    logs = {
        "peer1": "aggregated slice 0 of round 0 from 2 contributions\n"
                 "aggregated slice 1 of round 2 from 0 contributions",
        "peer2": "aggregated slice 1 of round 0 from 2 contributions",
        "peer3": "aggregated slice 0 of round 1 from 1 contributions",  # forked: not in the agreed weights
    }
    figures = analyze(homes, logs, [], round_deadline_s=30.0, stopped_at=1000.0 + 20 + 31)
    detail = figures["verified_work_lost_detail"]
    assert detail["forked_out"] == [(1, _cid(9))]
    assert detail["slices_missing"] == 1  # round 2's slice 1 merged none of its one accepted contribution
    assert figures["verified_work_lost"] == 2
    assert figures["rounds_with_disagreeing_blocks"] == [1] and not figures["hash_agreement"]
    # Round 3 opened at round 2's block and was due (over 30 s) without closing: attempted, not completed.
    assert figures["rounds_attempted"] == 4 and figures["rounds_completed"] == 3
    assert figures["final_round"] == 1  # the last round every peer closed

    # A round that vanished from a restarted peer's chain is lost verified work too.
    before = chain_blocks(homes["peer2"])
    (next(homes["peer2"].glob("runs/*/chain.jsonl"))).write_text("")
    _write_chain(homes["peer2"], [(2, [5], "c")])
    outcome = EventOutcome(ChurnEvent(0.0, "kill", "peer2", 1.0), started=0.0, chain_before=before)
    figures = analyze(homes, logs, [outcome], 30.0, 1000.0 + 20 + 31)
    assert figures["verified_work_lost_detail"]["vanished_rounds"] == [("peer2", 0), ("peer2", 1)]


MANIFEST = tiny_swarm_manifest("churn-test", total_steps=100000, round_deadline_s=60)


def test_first_peer_killed_and_restarted_and_a_frozen_peer_rejoin_with_no_verified_work_lost(tmp_path: Path):
    from gpunite.data.prepare import prepare_dataset
    from gpunite.manifest import load_manifest

    manifest_path = tmp_path / "run.toml"
    manifest_path.write_text(MANIFEST)
    prepare_dataset(load_manifest(manifest_path))
    extra = ["--speed", "1"]
    with LocalSwarm(tmp_path, manifest_path, heartbeat_s=1.0) as swarm:
        swarm.start_first("peer1", wait_peers=3, extra=extra)
        address = swarm.address()
        for name in ("peer2", "peer3"):
            swarm.join(name, address, extra=extra)
        swarm.wait_for(lambda s: len(s) == 3 and all(x.get("rounds_done", 0) >= 1 for x in s.values()), 240,
                       "every peer to merge a round")
        first_id = swarm.peers["peer1"].status()["peer_id"]
        schedule = [ChurnEvent(0.0, "kill", "peer1", 2.0), ChurnEvent(1.0, "cut", "peer3", 6.0)]
        driver = ChurnDriver(swarm, schedule, peer_extra=extra)
        started = time.time()
        driver.run(duration_s=400.0, started=started, until_done=True)  # the cut once peer1 is back
        assert driver.wait_all_in_step(timeout_s=240), [o.recovery_s for o in driver.outcomes]
        stopped_at = time.time()
        swarm.stop_all()
        assert swarm.peers["peer1"].args[3] == "join"  # the first peer came back as an ordinary joiner...
        assert swarm.peers["peer1"].status()["peer_id"] == first_id  # ...with its own identity, and its data
        run_dir = next(swarm.peers["peer1"].home.glob("runs/*"))
        assert (run_dir / "prepared").resolve() == load_manifest(manifest_path).prepared_path
        homes = {name: peer.home for name, peer in swarm.peers.items()}
        logs = {name: peer.log_path.read_text(errors="replace") for name, peer in swarm.peers.items()}
        figures = analyze(homes, logs, driver.outcomes, 60.0, stopped_at)
    assert not driver.crashes
    assert all(o.recovery_s is not None for o in driver.outcomes)
    assert figures["verified_work_lost"] == 0, figures["verified_work_lost_detail"]
    assert figures["hash_agreement"], figures
    assert figures["final_round"] > max(driver.outcomes[0].chain_before)  # the first peer trained on after it
