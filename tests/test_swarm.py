"""Multi-process swarm tests on 127.0.0.1: real peer processes, real libp2p streams, real DHT records.

One small swarm is shared by the tests of this module, which run in order: two peers agree, a late joiner
catches up, three peers agree every round, hostile records and frames are dropped while the swarm goes on,
and the first peer is killed with SIGKILL mid-round while the others keep training. Every process is
killed at the end, whatever happens.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from _swarm_helpers import tiny_swarm_manifest

from gpunite.swarm.demo import LocalSwarm

pytestmark = pytest.mark.timeout(420)

MANIFEST = tiny_swarm_manifest("swarm-test", seed=7)


def chain(peer) -> dict[int, str]:
    """Round -> weights hash from a peer's local chain of signed blocks."""
    blocks = {}
    for path in peer.home.glob("runs/*/chain.jsonl"):
        for line in path.read_text().splitlines():
            block = json.loads(line)
            blocks[block["round"]] = block["weights_hash"]
    return blocks


def rounds_done(swarm: LocalSwarm, name: str) -> int:
    status = swarm.peers[name].status() or {}
    return status.get("rounds_done", 0) + status.get("first_round", 0)


def wait_round(swarm: LocalSwarm, names: list[str], round_index: int, timeout_s: float = 240) -> None:
    swarm.wait_for(lambda statuses: all(s.get("round", -1) >= round_index for n, s in statuses.items() if n in names)
                   and all(n in statuses for n in names), timeout_s, f"{names} to reach round {round_index}")


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    from gpunite.data.prepare import prepare_dataset
    from gpunite.manifest import load_manifest

    workdir = tmp_path_factory.mktemp("swarm")
    manifest_path = workdir / "run.toml"
    manifest_path.write_text(MANIFEST)
    prepare_dataset(load_manifest(manifest_path))
    with LocalSwarm(workdir, manifest_path, heartbeat_s=1.0) as local:
        local.start_first("peer1", wait_peers=2, extra=["--speed", "1"])
        local.join("peer2", local.address(), extra=["--speed", "1"])
        yield local


def test_two_peers_end_each_round_with_the_same_weights(swarm):
    wait_round(swarm, ["peer1", "peer2"], 2)
    first, second = chain(swarm.peers["peer1"]), chain(swarm.peers["peer2"])
    assert {0, 1} <= set(first) and {0, 1} <= set(second)
    assert first[0] == second[0] and first[1] == second[1]
    assert first[0] != first[1]  # the weights did move
    assert swarm.peers["peer2"].status()["contributed_rounds"] >= 1
    # The round log splits the peer's time: inner steps, trail recording, the rest of training, waiting.
    from gpunite.swarm.demo import round_log, time_shares

    log = round_log(swarm.peers["peer2"].home)
    last = max(log)
    entry = log[last]
    assert 0 < entry["trail_s"] and 0 < entry["compute_s"]
    assert entry["compute_s"] + entry["trail_s"] <= entry["training_s"] <= entry["wall_s"]
    shares = time_shares({-1: {key: 0.0 for key in entry}, last: entry}, -1, last)
    assert set(shares) == {"compute", "trail", "trail_waiting", "training_other", "waiting"}
    assert 0 <= shares.pop("trail_waiting") <= shares["trail"]  # a part of the trail's share
    assert abs(sum(shares.values()) - 1.0) < 1e-3 and min(shares.values()) >= 0


def test_a_slice_owner_that_answers_is_waited_for_even_while_its_heartbeat_lapses():
    """fetch_aggregate gives up on an owner only when it neither answers nor heartbeats."""
    from types import SimpleNamespace

    from gpunite.swarm.node import SwarmError
    from gpunite.swarm.peer import Peer

    def stand_in(replies: list) -> SimpleNamespace:
        def request(peer_id, handler, header, max_reply):
            reply = replies.pop(0)
            if isinstance(reply, Exception):
                raise reply
            return reply

        return SimpleNamespace(
            peer_id="me", aggregates={}, config=SimpleNamespace(takeover_s=5.0, poll_s=0.01),
            stopping=threading.Event(), _request=request, _max_slice_bytes=1 << 20,
            membership=SimpleNamespace(alive=lambda: {}))  # no fresh heartbeat from anyone

    ctx = SimpleNamespace(round=3)
    pending = ({"pending": True}, b"")
    answering = stand_in([pending, pending, ({}, b"merged")])
    assert Peer.fetch_aggregate(answering, ctx, 0, "owner") == b"merged"
    replies = [SwarmError("stream reset"), ({}, b"never asked")]
    assert Peer.fetch_aggregate(stand_in(replies), ctx, 0, "owner") is None
    assert len(replies) == 1  # gave up after the one failed request

    # A node that answers for another identity (a Sybil's host, say) or pruned the round: no waiting at all.
    replies = [({"missing": "this node is host, not the owner sybil"}, b""), ({}, b"never asked")]
    assert Peer.fetch_aggregate(stand_in(replies), ctx, 0, "sybil") is None
    assert len(replies) == 1


def test_an_owner_says_at_once_which_aggregates_it_will_never_have():
    """The aggregate handler: pending for its own slice of the current round, missing for a pruned round or
    for a request meant for another identity reached through this node."""
    import asyncio
    from types import SimpleNamespace

    from gpunite.swarm.peer import Peer

    node = SimpleNamespace(peer_id="host", aggregates={(4, 1): b"merged"}, state=SimpleNamespace(round=5))

    def ask(**header):
        return asyncio.run(Peer._handle_aggregate(node, header, b"", "caller"))

    assert ask(round=4, slice=1, owner="host") == ({"round": 4, "slice": 1}, b"merged")
    assert ask(round=4, slice=1) == ({"round": 4, "slice": 1}, b"merged")  # an older caller names no owner
    assert ask(round=5, slice=1, owner="host") == ({"pending": True}, b"")
    assert "not kept here" in ask(round=3, slice=1, owner="host")[0]["missing"]
    assert "not the owner sybil" in ask(round=5, slice=2, owner="sybil")[0]["missing"]


def test_a_slice_its_owner_cannot_fetch_leaves_its_contribution_out_only_if_the_coordinator_cannot_either():
    """A trainer killed right after committing: the owner's SliceMissing note, checked by the coordinator."""
    from types import SimpleNamespace

    from gpunite.identity import Identity
    from gpunite.records import sign_record
    from gpunite.swarm.peer import Peer, parse_slice_missing
    from gpunite.swarm.protocol import SliceMissing
    from gpunite.train.compression import payload_hash

    run_id = "cd" * 32
    owners = sorted((Identity.from_seed(bytes([i]) * 32) for i in range(1, 5)), key=lambda i: i.peer_id)
    gone, serving, other, reporter = [o.peer_id for o in owners]  # reporter owns slice 3
    served = {gone: None, serving: b"slice-3-of-serving"}
    contributions = {gone: SimpleNamespace(slice_hashes=[payload_hash(b"never served")] * 4),
                     serving: SimpleNamespace(slice_hashes=[payload_hash(b"slice-3-of-serving")] * 4),
                     other: SimpleNamespace(slice_hashes=[payload_hash(b"x")] * 4)}

    def note(owner: Identity, index: int, trainers: list[str]) -> SliceMissing:
        signed = sign_record(owner, SliceMissing(run_id=run_id, round=5, slice=index, trainers=sorted(trainers),
                                                 time=time.time()))
        return parse_slice_missing(json.dumps(signed.model_dump(mode="json")).encode())

    notes = {
        reporter: note(owners[3], 3, [gone, serving]),  # gone really is; serving answers the coordinator
        other: note(owners[2], 0, [serving]),  # slice 0 is not other's to merge: ignored
    }
    fetched = []

    def fetch_slice(round_index, index, pid):
        fetched.append((round_index, index, pid))
        return served.get(pid)

    stand_in = SimpleNamespace(run_id=run_id, fetch_slice=fetch_slice,
                               node=SimpleNamespace(get_records=lambda key, parse: dict(notes)))
    ctx = SimpleNamespace(round=5, assigned={o.peer_id: [] for o in owners})
    left_out = Peer.unfetchable(stand_in, ctx, contributions)
    assert sorted(left_out) == [gone] and "fetched neither" in left_out[gone]
    assert sorted(fetched) == sorted([(5, 3, gone), (5, 3, serving)])  # the misplaced note was not acted on
    # A slice that arrives but does not hash to the committed one counts as not fetched.
    served[serving] = b"tampered"
    assert sorted(Peer.unfetchable(stand_in, ctx, contributions)) == sorted([gone, serving])


def test_an_owner_reports_a_slice_it_failed_to_fetch_twice_and_takes_the_report_back_once_it_has_it():
    from types import SimpleNamespace

    from gpunite.identity import Identity
    from gpunite.swarm.peer import Peer, parse_slice_missing

    stored = []
    me = Identity.from_seed(b"\x07" * 32)
    stand_in = SimpleNamespace(
        peer_id=me.peer_id, identity=me, run_id="ef" * 32, _prefetched={}, _prefetch_failures={},
        _reported_missing={}, train_cfg=SimpleNamespace(round_deadline_s=60.0),
        node=SimpleNamespace(store=lambda key, subkey, data, ttl_s: stored.append((key, subkey, data))))
    ctx = SimpleNamespace(round=2)
    contributions = {"a" * 40: None, "b" * 40: None, me.peer_id: None}
    stand_in._prefetched = {(2, 1, "a" * 40): None, (2, 1, "b" * 40): None}
    stand_in._prefetch_failures = {(2, 1, "a" * 40): 1, (2, 1, "b" * 40): 2}
    Peer._report_missing(stand_in, ctx, 1, contributions)
    assert len(stored) == 1 and stored[0][1] == me.peer_id and stored[0][0].endswith("slice_missing/2")
    first = parse_slice_missing(stored[0][2])
    assert (first.slice, first.trainers, first.peer_id) == (1, ["b" * 40], me.peer_id)  # a failed only once
    Peer._report_missing(stand_in, ctx, 1, contributions)
    assert len(stored) == 1  # nothing new: not stored again
    stand_in._prefetched[(2, 1, "b" * 40)] = b"arrived after all"
    Peer._report_missing(stand_in, ctx, 1, contributions)
    assert parse_slice_missing(stored[-1][2]).trainers == []


def test_a_peer_restarted_after_committing_gets_its_own_slice_back_from_the_next_owner():
    from types import SimpleNamespace

    from gpunite.swarm.peer import Peer

    asked = []
    stand_in = SimpleNamespace(peer_id="b", payloads={}, _prefetched={}, _owners={3: ["a", "b", "c"]})
    stand_in._request_slice = lambda r, i, pid, trainer="": asked.append((r, i, pid, trainer)) or b"copy"
    assert Peer.fetch_slice(stand_in, 3, 1, "b") == b"copy"  # slice 1 is b's to merge; c keeps the copy
    assert asked == [(3, 1, "c", "b")]
    assert Peer.fetch_slice(stand_in, 3, 2, "b") is None  # not ours to merge: nobody keeps a copy of it
    stand_in.payloads = {3: [b"s0", b"s1", b"s2"]}
    assert Peer.fetch_slice(stand_in, 3, 1, "b") == b"s1" and len(asked) == 1


def test_time_shares_split_a_window_of_the_round_log():
    from gpunite.swarm.demo import time_shares

    log = {1: {"wall_s": 10.0, "compute_s": 5.0, "trail_s": 1.0, "trail_wait_s": 0.5, "training_s": 7.0},
           3: {"wall_s": 30.0, "compute_s": 20.0, "trail_s": 2.0, "trail_wait_s": 0.7, "training_s": 25.0}}
    assert time_shares(log, 1, 3) == {"compute": 0.75, "trail": 0.05, "trail_waiting": 0.01, "training_other": 0.1,
                                      "waiting": 0.1}
    old = {r: {"wall_s": e["wall_s"], "compute_s": e["compute_s"]} for r, e in log.items()}  # older peers
    assert time_shares(old, 1, 3) == {"compute": 0.75, "trail": 0.0}


def test_late_joiner_catches_up_within_one_round(swarm):
    swarm.join("peer3", swarm.address(), extra=["--speed", "1"])
    swarm.wait_for(lambda s: s.get("peer3", {}).get("rounds_done", 0) >= 1, 240, "peer3 to merge its first round")
    joined_at = swarm.peers["peer3"].status()["first_round"]
    # After the round it joined in, it holds the same weights as everyone; then it is in a roster and trains.
    # With train.overlap on, a close names the roster of the round after next, and round
    # joined_at's close may be out before the joiner's first heartbeat: its first merged contribution can be
    # round joined_at + 3, which the state of round joined_at + 4 includes.
    wait_round(swarm, ["peer3"], joined_at + 4)
    status = swarm.peers["peer3"].status()
    assert status["contributed_rounds"] >= 1
    third, first = chain(swarm.peers["peer3"]), chain(swarm.peers["peer1"])
    assert third[joined_at] == first[joined_at]


def test_three_peers_end_each_round_with_identical_hashes(swarm):
    start = max(s["round"] for s in swarm.statuses().values())
    wait_round(swarm, ["peer1", "peer2", "peer3"], start + 1)
    chains = [chain(swarm.peers[n]) for n in ("peer1", "peer2", "peer3")]
    common = set(chains[0]) & set(chains[1]) & set(chains[2])
    assert common
    for round_index in common:
        assert len({c[round_index] for c in chains}) == 1, f"hashes differ in round {round_index}"
    # Work assignment is deterministic: every coordinator found each contribution's units to be the assigned ones.
    for name in ("peer1", "peer2", "peer3"):
        assert "not the ones assigned" not in swarm.peers[name].log_path.read_text(errors="replace")


def test_forged_records_and_malformed_frames_are_dropped(swarm):
    from gpunite.identity import Identity
    from gpunite.records import Heartbeat, record_bytes, sign_record
    from gpunite.swarm.node import SwarmError, SwarmNode
    from gpunite.swarm.protocol import HANDLE_SLICE, HANDLE_STATE, ProtocolError, run_key
    from gpunite.swarm.state_sync import ParamLayout, StateSyncError, state_from_frame

    status = swarm.peers["peer2"].status()
    run_id, target_peer = status["run_id"], status["peer_id"]
    attacker = SwarmNode(initial_peers=[swarm.address()]).start()
    try:
        victim = Identity.from_seed(b"victim")
        forger = Identity.from_seed(b"forger")
        honest = sign_record(victim, Heartbeat(run_id=run_id, round=0, weights_hash="0" * 64, roles=["trainer"],
                                               maddrs=[], p2p_id="x", time=time.time()))
        forged = {**honest.model_dump(mode="json"), "round": 99}  # signature no longer matches
        attacker.store(run_key(run_id, "heartbeat"), victim.peer_id, json.dumps(forged).encode(), 600)
        # A valid record stored under someone else's peer id, and plain garbage.
        attacker.store(run_key(run_id, "heartbeat"), victim.peer_id + "0", record_bytes(
            sign_record(forger, Heartbeat(run_id=run_id, round=0, weights_hash="0" * 64, roles=["trainer"],
                                          maddrs=[], p2p_id="x", time=time.time()))), 600)
        attacker.store(run_key(run_id, "contrib", status["round"]), forger.peer_id, b"\x00garbage", 600)

        p2p_id = None
        for _ in range(50):
            beats = attacker.get(run_key(run_id, "heartbeat"))
            if target_peer in beats:
                p2p_id = json.loads(beats[target_peer])["p2p_id"]
                break
            time.sleep(0.2)
        assert p2p_id is not None
        # The peer refuses the oversized frame: with a reply saying so, or, when it closes the stream before
        # the attacker has finished writing, as a broken stream, or one that ends where its reply should be.
        with pytest.raises((ProtocolError, SwarmError), match="over the|stream to .* broke|in the middle of a frame"):
            attacker.request(p2p_id, HANDLE_SLICE, {"round": 0, "slice": 0}, b"x" * 100_000, max_reply_bytes=1000)
        with pytest.raises(ProtocolError):
            attacker.request(p2p_id, HANDLE_SLICE, {"round": -5, "slice": 10**9}, max_reply_bytes=1000)
        # A real state over a real stream parses; the same bytes with one weight changed are refused.
        header, body = attacker.request(p2p_id, HANDLE_STATE, {"run": run_id}, max_reply_bytes=1 << 26)
        from gpunite.manifest import load_manifest
        from gpunite.model import build_model, config_from_manifest

        manifest = load_manifest(swarm.manifest_path)
        layout = ParamLayout.of(build_model(config_from_manifest(manifest)))
        state = state_from_frame(header, body, layout, run_id)
        assert state.weights_hash == header["weights_hash"] and state.inner_optimizer
        from gpunite.train.weights import to_safetensors_bytes

        nudged = state.weights.clone()
        nudged[0] += 1e-3
        with pytest.raises(StateSyncError, match="do not match"):
            state_from_frame(header, to_safetensors_bytes({"weights": nudged}), layout, run_id)
        nudged[0] = float("nan")
        with pytest.raises(StateSyncError, match="non-finite"):
            state_from_frame(header, to_safetensors_bytes({"weights": nudged}), layout, run_id)
        with pytest.raises(StateSyncError, match="expected"):
            state_from_frame(header, to_safetensors_bytes({"weights": state.weights[:-1].clone()}), layout, run_id)
    finally:
        attacker.close()
    before = status["round"]
    wait_round(swarm, ["peer1", "peer2", "peer3"], before + 1)

    def dropped() -> bool:
        log = swarm.peers["peer2"].log_path.read_text(errors="replace")
        return "dropped a bad record" in log and "dropped a record under" in log

    give_up = time.time() + 120
    while not dropped() and time.time() < give_up:
        time.sleep(0.5)
    assert dropped()


def test_kill_first_peer_mid_round_and_the_run_goes_on(swarm):
    swarm.wait_for(lambda s: s.get("peer1", {}).get("phase") == "training", 240, "peer1 to be training")
    killed_at = swarm.peers["peer1"].status()["round"]
    swarm.kill("peer1")
    wait_round(swarm, ["peer2", "peer3"], killed_at + 2)
    second, third = chain(swarm.peers["peer2"]), chain(swarm.peers["peer3"])
    for round_index in (killed_at, killed_at + 1):
        assert second[round_index] == third[round_index]


def test_cheap_checks_reject_malformed_slices():
    from gpunite.identity import Identity
    from gpunite.records import Contribution, WorkUnit, sign_record
    from gpunite.swarm.checks import check_slice
    from gpunite.train.compression import Int8Payload, compress_int8, payload_hash, payload_to_bytes
    from gpunite.train.weights import to_safetensors_bytes

    good = payload_to_bytes(compress_int8(torch.linspace(-1, 1, 512), 256))
    nan = payload_to_bytes(Int8Payload(q=torch.zeros(512, dtype=torch.int8), scales=torch.tensor([float("nan"), 1.0]),
                                       numel=512, chunk=256))
    wrong_shape = payload_to_bytes(compress_int8(torch.ones(256), 256))
    garbage = b"\x00" * 64
    big = to_safetensors_bytes({"q": torch.zeros(10**6, dtype=torch.int8), "scales": torch.ones(2)})

    def contribution(data: bytes, norm: float = 20.0) -> Contribution:
        return sign_record(Identity.from_seed(b"t"), Contribution(
            run_id="a" * 64, round=0, base_hash="b" * 64, work_units=[WorkUnit(shard="c" * 64, first=0, count=4)],
            inner_steps=1, tokens=128, trail_interval=1, trail=["d" * 64] * 2, delta_hash="e" * 64,
            slice_hashes=[payload_hash(data)], delta_norm=norm, claimed_flops=1.0, time=1.0))

    assert check_slice(good, contribution(good), 0, 512, 256, "int8")[0].accept
    for bad in (nan, wrong_shape, garbage, big):
        result, values = check_slice(bad, contribution(bad), 0, 512, 256, "int8")
        assert not result.accept and values is None
    assert not check_slice(good, contribution(garbage), 0, 512, 256, "int8")[0].accept  # hash mismatch
    assert "exceeds" in check_slice(good, contribution(good, norm=0.5), 0, 512, 256, "int8")[0].reason


def test_coordinator_order_is_deterministic_and_depends_on_the_round_seed():
    from gpunite.swarm.peer import coordinator_order

    peers = [f"{i:040x}" for i in range(6)]
    assert coordinator_order("a" * 64, peers) == coordinator_order("a" * 64, list(reversed(peers)))
    assert coordinator_order("a" * 64, peers) != coordinator_order("b" * 64, peers)


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are a Linux feature")
def test_an_overlapped_training_thread_yields_the_cpu_to_the_exchange(tmp_path):
    """The training thread (and the trail writer it starts) runs at a lower priority; the caller's is unchanged."""
    from gpunite.proof.trail import TrailRecorder, TrailState
    from gpunite.swarm.peer import TRAINING_NICE, lower_thread_priority

    def nice(native_id: int | None = None) -> int:
        return os.getpriority(os.PRIO_PROCESS, native_id or threading.get_native_id())

    def writers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("trail-writer")]

    before = nice()
    others = set(writers())  # idle writers of recorders other tests left behind in this process
    recorder = TrailRecorder(1, tmp_path)
    state = TrailState({"w": torch.zeros(4)}, {}, "", 0)
    seen: dict[str, object] = {}

    def train(round_index: int, lower: bool) -> None:
        if lower:
            seen["lowered"] = lower_thread_priority()
        seen["trainer"] = nice()
        recorder.start_round(round_index, 1)  # ends the previous round's writer; the next starts from here
        recorder.record_state(state)
        seen["writers"] = [nice(t.native_id) for t in writers() if t not in others]
        recorder.flush()

    for round_index, lower in ((0, False), (1, True)):  # an inline round, then an overlapped one
        thread = threading.Thread(target=train, args=(round_index, lower))
        thread.start()
        thread.join()
        expected = min(19, before + TRAINING_NICE) if lower else before
        assert seen["trainer"] == expected and seen["writers"] == [expected]
    assert seen["lowered"] is True
    assert nice() == before
    assert len(recorder.trail) == 1


def test_demo_manifest_is_valid(tmp_path: Path):
    from gpunite.manifest import load_manifest
    from gpunite.swarm.demo import write_demo_manifest

    manifest = load_manifest(write_demo_manifest(tmp_path))
    assert manifest.model.preset == "tiny" and manifest.train.inner_steps > 0


def test_a_proven_cheat_is_banned_even_when_its_slice_is_also_missing():
    """A cheater that stops serving a slice once audited is still rejected as a cheat (a ban), not only left
    out as unfetchable; an honest trainer that is gone after committing is only left out."""
    from types import SimpleNamespace

    from gpunite.identity import Identity
    from gpunite.records import Contribution, WorkUnit, sign_record
    from gpunite.swarm.checks import ACCEPT, CheckResult, RoundContext
    from gpunite.swarm.peer import Peer

    run_id, base = "ab" * 32, "cd" * 32
    cheater, gone, honest, me = (Identity.from_seed(bytes([i]) * 32) for i in range(1, 5))
    trainers = (cheater, gone, honest)
    units = {i.peer_id: [WorkUnit(shard="ef" * 32, first=8 * n, count=8)] for n, i in enumerate(trainers)}
    ctx = RoundContext(run_id=run_id, round=3, base_hash=base, assigned=units, inner_steps=4, batch_size=2,
                       seq_len=16, trail_interval=2, n_slices=4, norm_bound=10.0)

    def contribution(identity: Identity) -> Contribution:
        return sign_record(identity, Contribution(
            run_id=run_id, round=3, base_hash=base, work_units=units[identity.peer_id], inner_steps=4, tokens=128,
            trail_interval=2, trail=["0" * 64] * 3, delta_hash="1" * 64, slice_hashes=["2" * 64] * 4,
            delta_norm=1.0, claimed_flops=1.0, time=0.0))

    contributions = {i.peer_id: contribution(i) for i in trainers}
    missing = "its slice 2 could be fetched neither by that slice's owner nor by the coordinator"
    proof = CheckResult(False, "proven: replay of segment 1 lands 0.9 of an update away", cheat=True)
    stand_in = SimpleNamespace(
        identity=me, run_id=run_id, state=SimpleNamespace(round=3, weights_hash=base),
        unfetchable=lambda ctx, found: {cheater.peer_id: missing, gone.peer_id: missing},
        contribution_checks=[lambda c, ctx: proof if c.peer_id == cheater.peer_id else ACCEPT],
        membership=SimpleNamespace(speeds=dict),
        audits=SimpleNamespace(banned_in=lambda round_index: set(),
                               proves_cheat=lambda c, ctx: c.peer_id == cheater.peer_id,
                               close_fields=lambda round_index: {"verdicts": []}))
    close = Peer.make_close(stand_in, ctx, contributions, alive={}, rank=0, prev_block="3" * 64)
    rejected = {r.trainer: r for r in close.rejected}
    assert close.contributors == [honest.peer_id]
    assert rejected[cheater.peer_id].cheat and rejected[cheater.peer_id].reason == proof.reason
    assert not rejected[gone.peer_id].cheat and rejected[gone.peer_id].reason == missing
    assert [e.peer_id for e in close.next_roster] == [honest.peer_id]  # no units for the proven cheater


def test_a_contribution_is_served_at_once_and_stored_off_the_training_thread(monkeypatch):
    """The DHT store of our contribution runs on the publisher thread (the training thread goes on); a
    stopping peer waits for it, and stores later ones itself."""
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from gpunite.swarm import peer as peer_module
    from gpunite.swarm.peer import Peer

    release, stored = threading.Event(), []

    def store(key, subkey, value, ttl_s):
        assert release.wait(10)
        stored.append((key, subkey))
        return True

    monkeypatch.setattr(peer_module, "record_bytes", lambda record: b"{}")
    stand_in = SimpleNamespace(
        _lock=threading.Lock(), payloads={}, _own_contributions={}, run_id="ab" * 32, peer_id="me",
        train_cfg=SimpleNamespace(round_deadline_s=60.0), node=SimpleNamespace(store=store),
        _publisher=ThreadPoolExecutor(max_workers=1))
    contribution = SimpleNamespace(record_id="cd" * 32)
    Peer._publish_contribution(stand_in, SimpleNamespace(round=7), contribution, [b"slice"], background=True)
    assert stand_in.payloads[7] == [b"slice"] and not stored  # served now, stored when the DHT answers
    release.set()
    Peer._finish_publishing(stand_in)
    assert len(stored) == 1 and stand_in._publisher is None
    Peer._publish_contribution(stand_in, SimpleNamespace(round=8), contribution, [b"s"], background=True)
    assert len(stored) == 2  # after the stop: stored right away, on the caller's thread
