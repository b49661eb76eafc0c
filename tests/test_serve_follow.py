"""A host that follows a swarm run: a real two-peer swarm on 127.0.0.1 and a real `gpunite host --join`
process that serves each newly verified round's weights, hot-swapped while requests stream; plus the
verification rules (majority of a round's signers, chain links, state checks) on signed records, where an
unverified hash is refused.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from _swarm_helpers import tiny_swarm_manifest

from gpunite.identity import Identity
from gpunite.records import GENESIS, Block, sign_record
from gpunite.serve.follow import (
    Follower,
    FollowError,
    VerifiedRound,
    check_state,
    verified_from_ledger,
    verify_round,
)
from gpunite.swarm.demo import LocalSwarm
from gpunite.swarm.state_sync import GlobalState, ParamLayout
from gpunite.util import free_port

RUN_ID = "ab" * 32

MANIFEST = tiny_swarm_manifest("follow-test", extra="""
[credit]
anonymous_daily_queries = 100000
max_daily_queries = 100000
[host]
min_tflops = 0.0  # a CPU shared with other test runs can measure below the default minimum
""")


def block(identity: Identity, round_index: int, weights: str, prev: str = GENESIS, run_id: str = RUN_ID
          ) -> Block:
    return sign_record(identity, Block(run_id=run_id, round=round_index, prev=prev, accepted=[],
                                       weights_hash=weights, tokens=0, time=time.time()))  # type: ignore


PEERS = [Identity.from_seed(bytes([i])) for i in range(4)]
GOOD, BAD = "1" * 64, "2" * 64


# ----- the verification rules, on signed records -----

def test_a_hash_signed_by_a_majority_of_the_round_signers_is_verified():
    blocks = [block(PEERS[0], 0, GOOD), block(PEERS[1], 0, GOOD), block(PEERS[2], 0, BAD)]
    verified = verify_round(blocks, RUN_ID, 0, GENESIS)
    assert verified.weights_hash == GOOD and (verified.signers, verified.total_signers) == (2, 3)
    assert verified.describe() == "verified by 2 of 3 signers"
    # another run's or another round's blocks do not count, for or against
    noise = [block(PEERS[3], 0, BAD, run_id="cd" * 32), block(PEERS[3], 1, BAD)]
    assert verify_round(blocks + noise, RUN_ID, 0, GENESIS) == verified
    # peers past the round whose blocks have not arrived yet count as signers: 2 of 5 is no majority
    with pytest.raises(FollowError, match="best has 2 of 5 signers"):
        verify_round(blocks, RUN_ID, 0, GENESIS,
                     expected_signers=[PEERS[3].peer_id, PEERS[0].peer_id, "late"])


def test_an_unverified_hash_is_refused():
    with pytest.raises(FollowError, match="no signed block of round 0"):
        verify_round([], RUN_ID, 0, GENESIS)
    split = [block(PEERS[0], 0, GOOD), block(PEERS[1], 0, BAD)]
    with pytest.raises(FollowError, match="signed by a majority: the best has 1 of 2 signers"):
        verify_round(split, RUN_ID, 0, GENESIS)
    # a signer that signed both contents counts for neither
    two_faced = [block(PEERS[0], 0, GOOD), block(PEERS[1], 0, BAD), block(PEERS[1], 0, GOOD)]
    with pytest.raises(FollowError, match="best has 1 of 2"):
        verify_round(two_faced, RUN_ID, 0, GENESIS)
    # one peer alone claiming a later round with a block that does not link to the verified chain
    genesis_block = verify_round([block(PEERS[0], 0, GOOD), block(PEERS[1], 0, GOOD)], RUN_ID, 0, GENESIS)
    rogue = [block(PEERS[3], 1, BAD, prev="9" * 64)]
    with pytest.raises(FollowError, match="not to the verified block"):
        verify_round(rogue, RUN_ID, 1, genesis_block.block_hash)
    # a state whose weights are not the verified block's is refused, whatever the peer says about it
    layout = ParamLayout(("w",), ((4,),))
    weights = torch.arange(4, dtype=torch.float32)
    peer_block = block(PEERS[3], 0, layout.hash(weights))
    state = GlobalState(1, weights, None, {}, peer_block, None, layout.hash(weights))
    with pytest.raises(FollowError, match="not in a verified block"):
        check_state(state, genesis_block)
    honest = VerifiedRound(0, peer_block.block_hash, layout.hash(weights), 1, 1)
    check_state(state, honest)
    with pytest.raises(FollowError, match="not round 1's"):
        check_state(GlobalState(2, weights, None, {}, peer_block, None, layout.hash(weights)), honest)


def test_the_ledger_chain_is_verified_round_by_round_from_genesis():
    first = [block(p, 0, GOOD) for p in PEERS[:3]]
    link = first[0].block_hash
    second = [block(PEERS[0], 1, BAD, prev=link), block(PEERS[1], 1, BAD, prev=link),
              block(PEERS[2], 1, GOOD, prev=link)]
    records = {b.record_id: b for b in first + second}
    tip = verified_from_ledger(records, RUN_ID)
    assert tip is not None and (tip.round, tip.weights_hash, tip.signers, tip.total_signers) == (1, BAD, 2, 3)
    # a round without a majority ends the verified chain there
    third = [block(PEERS[0], 2, GOOD, prev=tip.block_hash), block(PEERS[1], 2, BAD, prev=tip.block_hash)]
    records.update({b.record_id: b for b in third})
    assert verified_from_ledger(records, RUN_ID).round == 1
    assert verified_from_ledger({}, RUN_ID) is None


class FixedSource:
    """A run seen through fixed records (a unit stand-in for RunSource): one peer, its blocks, its state."""

    def __init__(self, layout, state, blocks, peer_round):
        from gpunite.records import Heartbeat

        self.run_id, self.layout, self.state_timeout_s = RUN_ID, layout, 1.0
        self._state, self._blocks = state, blocks
        self.beat = sign_record(PEERS[3], Heartbeat(
            run_id=RUN_ID, round=peer_round, weights_hash=state.weights_hash, roles=["trainer"], maddrs=[],
            p2p_id="x", time=time.time()))
        self.fetched = 0

    def live_peers(self):
        return [self.beat]

    def blocks(self, round_index):
        return [b for b in self._blocks if b.round == round_index]

    def ledger_records(self, beats):
        return {}

    def fetch_state(self, beat):
        self.fetched += 1
        return self._state


def test_a_peer_whose_heartbeat_lapsed_for_a_moment_still_counts_as_a_signer():
    from gpunite.records import Heartbeat, record_bytes
    from gpunite.serve.follow import RunSource

    def beat(identity, round_index, age_s):
        return sign_record(identity, Heartbeat(
            run_id=RUN_ID, round=round_index, weights_hash="c" * 64, roles=["trainer"], maddrs=[], p2p_id="x",
            time=time.time() - age_s))

    class Reads:  # the DHT as three polls read it: both peers, then only one (the other's entry lapsed)
        def __init__(self, polls):
            self.polls = polls

        def get_records(self, key, parse):
            return {b.peer_id: parse(record_bytes(b)) for b in self.polls.pop(0)}

    old = beat(PEERS[2], 0, 40)  # older than fresh_s: gone
    node = Reads([[beat(PEERS[0], 0, 1), beat(PEERS[1], 0, 1), old], [beat(PEERS[0], 1, 0)],
                  [beat(PEERS[0], 1, 0)]])
    source = RunSource(node, RUN_ID, layout=None, fresh_s=30.0)
    assert [b.peer_id for b in source.live_peers()] == sorted([PEERS[0].peer_id, PEERS[1].peer_id])
    second = source.live_peers()
    assert [(b.peer_id, b.round) for b in second] == [(PEERS[0].peer_id, 1), (PEERS[1].peer_id, 0)]
    # so round 0 has two signers: peer 0's block alone is not a majority until peer 1's arrives
    with pytest.raises(FollowError):
        verify_round([block(PEERS[0], 0, GOOD)], RUN_ID, 0, GENESIS,
                     expected_signers={b.peer_id for b in second if b.round >= 0})
    source.fresh_s = 0.5  # and a heartbeat older than fresh_s is dropped
    assert [b.peer_id for b in source.live_peers()] == [PEERS[0].peer_id]


def test_a_ledger_tip_signed_by_its_one_peer_is_no_anchor_while_other_live_peers_sign_that_round():
    from gpunite.records import Heartbeat

    def beat(identity, round_index):
        return sign_record(identity, Heartbeat(run_id=RUN_ID, round=round_index, weights_hash="c" * 64,
                                               roles=["trainer"], maddrs=[], p2p_id="x", time=time.time()))

    mine = block(PEERS[0], 0, GOOD)

    class OnePeersLedger:  # the peer the host synced with holds (or shows) only its own block of round 0
        run_id = RUN_ID

        def __init__(self):
            self.dht = []

        def ledger_records(self, beats):
            return {mine.record_id: mine}

        def blocks(self, round_index):
            return [b for b in self.dht if b.round == round_index]

    source = OnePeersLedger()
    follower = Follower(host=None, source=source, ledger_every_s=0.0)
    beats = [beat(PEERS[0], 1), beat(PEERS[1], 1)]  # both are past round 0: both sign it
    assert verified_from_ledger({mine.record_id: mine}, RUN_ID).signers == 1  # the ledger alone says 1 of 1
    assert follower._anchor(beats) is None
    source.dht = [block(PEERS[1], 0, GOOD)]  # the other peer's block of the same content, from the DHT
    anchor = follower._anchor(beats)
    assert (anchor.round, anchor.signers, anchor.total_signers) == (0, 2, 2)
    source.dht = [block(PEERS[1], 0, BAD)]  # it signed other weights: no majority
    assert follower._anchor(beats) is None


def test_a_follower_refuses_a_state_that_is_not_the_verified_one_and_keeps_serving(tmp_path, caplog):
    from test_serve_engine import make_model, make_tokenizer

    from gpunite.ledger.store import Ledger
    from gpunite.serve.engine import TextCodec
    from gpunite.serve.host import Host, ServedModel
    from gpunite.train.weights import flatten, model_hash, trainable_state

    tokenizer = make_tokenizer()
    model = make_model(tokenizer, seed=1)
    served = ServedModel(model, TextCodec.from_tokenizers(tokenizer), "t", None, model_hash(model))
    layout = ParamLayout.of(model)
    other = make_model(tokenizer, seed=2)
    new_weights = flatten(trainable_state(other).values())
    new_hash = layout.hash(new_weights)
    signed = [block(PEERS[0], 0, new_hash), block(PEERS[1], 0, new_hash)]
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        host = Host(served, Identity.from_seed(b"h"), ledger=ledger)
        try:
            # the peer's state carries its own block, but a majority signed different weights
            tampered = new_weights.clone()
            tampered[0] += 1.0
            own = block(PEERS[3], 0, layout.hash(tampered))
            liar = FixedSource(layout, GlobalState(1, tampered, None, {}, own, None, layout.hash(tampered)),
                               signed, peer_round=1)
            follower = Follower(host, liar, poll_s=0.1)
            with caplog.at_level(logging.WARNING, logger="gpunite.serve.follow"):
                assert follower.poll_logged() is False
            assert "refused the global state of peer" in caplog.text
            assert "not in a verified block" in caplog.text
            assert host.weights_hash == model_hash(model) and follower.verified is None
            # a peer past the newest verified round is not lying: nothing is swapped, nothing warned
            ahead_tip = block(PEERS[0], 1, new_hash, prev=signed[0].block_hash)
            ahead_state = GlobalState(2, new_weights, None, {}, ahead_tip, None, new_hash)
            ahead = FixedSource(layout, ahead_state, signed, peer_round=1)
            follower.source = ahead
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="gpunite.serve.follow"):
                assert follower.poll_logged() is False
            assert ahead.fetched == 1 and not caplog.text and host.weights_hash == model_hash(model)
            # the honest state of the same round is served, and /health-facing provenance names the round
            honest_state = GlobalState(1, new_weights, None, {}, signed[0], None, new_hash)
            honest = FixedSource(layout, honest_state, signed, peer_round=1)
            follower.source = honest
            assert follower.poll_logged() is True
            assert host.weights_hash == new_hash and host.provenance["signers"] == 2
            assert follower.poll_logged() is False and honest.fetched == 1  # nothing newer: no fetch
        finally:
            host.close()


# ----- a real swarm and a real following host -----

SWARM_TIMEOUT = pytest.mark.timeout(600)  # three processes start: minutes when the CPU is shared


def chain(home) -> dict[int, str]:
    blocks = {}
    for path in home.glob("runs/*/chain.jsonl"):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            blocks[entry["round"]] = entry["weights_hash"]
    return blocks


def wait_until(predicate, timeout_s: float, what: str, check=lambda: None):
    give_up = time.time() + timeout_s
    while time.time() < give_up:
        value = predicate()
        if value:
            return value
        check()
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def health(url: str) -> dict | None:
    try:
        return httpx.get(f"{url}/health", timeout=10).json()
    except httpx.HTTPError:
        return None


@SWARM_TIMEOUT
def test_a_host_follows_the_runs_verified_rounds_without_dropping_requests(tmp_path):
    from gpunite.data.prepare import prepare_dataset
    from gpunite.manifest import load_manifest
    from gpunite.records import HostRecord
    from gpunite.serve.host import HOSTS_KEY
    from gpunite.swarm.membership import parse_host
    from gpunite.swarm.node import SwarmNode

    manifest_path = tmp_path / "run.toml"
    manifest_path.write_text(MANIFEST)
    prepare_dataset(load_manifest(manifest_path))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    host_log = tmp_path / "host.log"
    host_process = None
    with LocalSwarm(tmp_path, manifest_path, heartbeat_s=1.0) as swarm:
        try:
            swarm.start_first("peer1", wait_peers=2, extra=["--speed", "1"])
            address = swarm.address()
            swarm.join("peer2", address, extra=["--speed", "1"])
            with open(host_log, "ab") as log_file:
                host_process = subprocess.Popen(
                    [sys.executable, "-m", "gpunite", "host", "--join", address, "--port", str(port),
                     "--home", str(tmp_path / "host"), "--device", "cpu", "--poll-s", "0.5",
                     "--max-batch", "4"],
                    stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})

            def host_alive():
                swarm.check_alive()
                if host_process.poll() is not None:
                    raise AssertionError(f"the host exited:\n{host_log.read_text(errors='replace')[-2000:]}")

            def served_round(at_least: int, other_than: str = ""):
                status = health(url)
                if status and status.get("round", -1) >= at_least and status["weights_hash"] != other_than:
                    return status
                return None

            first = wait_until(lambda: served_round(0), 180, "the host to serve a verified round", host_alive)
            homes = [swarm.peers[name].home for name in ("peer1", "peer2")]
            for home in homes:  # every peer signed these weights for that round
                signed = wait_until(lambda home=home: chain(home).get(first["round"]), 30, "the peer chains")
                assert signed == first["weights_hash"]
            assert (first["signers"], first["total_signers"]) == (2, 2)

            # requests stream back to back from two threads while the host swaps in the next rounds
            outcomes: list[tuple[str, str, int, str | None]] = []
            problems: list[str] = []
            stop = threading.Event()

            first_seen: dict[int, str] = {}  # the weights each thread saw before its first request

            def ask(seed: int) -> None:
                with httpx.Client(base_url=url, timeout=60) as client:
                    # each request's "before" is the previous one's "after": no gap a swap could fall into
                    after = first_seen.setdefault(seed, client.get("/health").json()["weights_hash"])
                    while not stop.is_set():
                        before = after
                        try:
                            answer = client.post("/v1/completions", json={
                                "model": "follow-test", "prompt": "def ", "max_tokens": 24,
                                "temperature": 0.8, "seed": seed})
                            body = answer.json()
                            if answer.status_code != 200:
                                problems.append(f"{answer.status_code}: {body}")
                                continue
                            after = client.get("/health").json()["weights_hash"]
                            choice = body["choices"][0]
                            outcomes.append((before, after, body["usage"]["completion_tokens"],
                                             choice["finish_reason"]))
                        except httpx.HTTPError as exc:
                            problems.append(repr(exc))

            threads = [threading.Thread(target=ask, args=(seed,), daemon=True) for seed in (1, 2)]
            for thread in threads:
                thread.start()
            try:
                # a swap after both threads started asking (the host may have swapped while the chains were read)
                def swapped_while_asking():
                    if len(first_seen) < len(threads):
                        return None
                    status = served_round(first["round"] + 1)
                    return status if status and status["weights_hash"] not in first_seen.values() else None

                later = wait_until(swapped_while_asking, 180, "a later verified round with new weights", host_alive)
            finally:
                stop.set()
                for thread in threads:
                    thread.join(timeout=60)
            assert not problems, problems[:3]
            assert outcomes and all(reason in ("length", "stop") for _, _, _, reason in outcomes)
            assert any(before != after for before, after, _, _ in outcomes), "no request spanned a swap"
            assert later["swaps"] >= 1 and (later["signers"], later["total_signers"]) == (2, 2)
            assert all(chain(home).get(later["round"]) == later["weights_hash"] for home in homes)
            log_text = host_log.read_text(errors="replace")
            line = f"serving round {later['round']} weights {later['weights_hash'][:12]} (verified by 2 of 2"
            assert line in log_text

            # its signed host record in the DHT names the weights it serves now
            node = SwarmNode(initial_peers=[address]).start()
            try:
                def announced():
                    records = node.get_records(HOSTS_KEY, parse_host)
                    current = health(url)["weights_hash"]
                    return [r for r in records.values() if isinstance(r, HostRecord)
                            and r.serves_model == current and r.api_url == url and r.max_batch == 4]
                assert wait_until(announced, 60, "the host record to name the served weights", host_alive)
            finally:
                node.close()

            # the whole swarm goes away: the host keeps serving what it has, says so once, and keeps retrying
            logged_before = len(host_log.read_text(errors="replace"))
            for name in ("peer1", "peer2"):
                swarm.kill(name)

            def gone_notice():
                text = host_log.read_text(errors="replace")[logged_before:]
                if "still serving round " not in text:
                    return None
                return text.rsplit("still serving round ", 1)[1].split()[:3]  # round N weights HASH,

            notice = wait_until(gone_notice, 120, "the host to notice the swarm is gone", host_alive)
            served = health(url)  # (it may have verified one more round between the kills)
            assert (int(notice[0]), notice[2].rstrip(",")) == (served["round"], served["weights_hash"][:12])
            with httpx.Client(base_url=url, timeout=60) as client:
                answer = client.post("/v1/completions", json={"model": "follow-test", "prompt": "def ",
                                                              "max_tokens": 4})
            assert answer.status_code == 200 and health(url)["weights_hash"] == served["weights_hash"]
        finally:
            if host_process is not None:
                try:
                    os.killpg(host_process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                host_process.wait(timeout=10)
