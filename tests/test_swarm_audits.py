"""Audits in a real swarm on 127.0.0.1, and the close re-check every honest peer applies.

The swarm: two honest peers and one peer per live adversary mode that needs other peers, every contribution
audited (the adversaries run the honest protocol otherwise: they verify, coordinate and merge):
- scaled_delta trains honestly but sends twice its pseudo-gradient (the norm is within the bound);
- copy_delta waits for another trainer's contribution, fetches its slices and trail and claims them;
- replay_old resubmits its round-0 delta and trail in later rounds;
- sybil heartbeats a second identity on its node, which the roster assigns units, and claims its one trained
  delta and trail again under that identity.
Only audits can catch them. Checked from the peers' own signed chains and the DHT: no cheating contribution
ever merges, each cheat is proven by a signed reject verdict and banned, and the honest peers agree on every
round's weights and merge each other's audited contributions.

forged_signature is checked without a swarm, on the bytes its peer would publish in a real DHT node (every
peer reads contributions through `SwarmNode.get_records`, which drops and logs it). The close re-check is
tested by forging round closes against real signed records in a real DHT node: a close must not merge on
verdicts that do not exist, are not by a drawn verifier or reject, nor ban without a proof.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from _swarm_helpers import tiny_swarm_manifest

from gpunite.swarm.demo import LocalSwarm

pytestmark = pytest.mark.timeout(600)

# Two verifiers an audit: the Sybil's host is drawn to verify its own Sybil's claim as often as anyone (it cannot
# fetch from its own node, so it rejects without a proof); with one verifier that left the claim unproven for up
# to 5 rounds in a row (1 in 32 runs), with two an honest peer verifies it too, every round.
MANIFEST = tiny_swarm_manifest("swarm-audit-test",
                               extra="audit_fraction = 1.0\nsegments_per_audit = 1\nverifiers_per_audit = 2\n")
HONEST = ["peer1", "peer2"]
ADVERSARIES = {"scaler": "scaled_delta", "copier": "copy_delta", "replayer": "replay_old", "sybil": "sybil"}
# replay_old cheats from round 1 on, the Sybil identity once a close has put it in a roster (round 1, or 2 with
# train.overlap, later if its heartbeat was late). Until its claim is proven it is also a verifier candidate
# that never answers: the audits it is drawn for time out, keeping those contributions out of that round
# without a verdict. So the swarm runs until every adversary's cheat was proven (at least ROUNDS rounds).
ROUNDS = 2
WAIT_S = 480


def proven_cheats(swarm: LocalSwarm) -> dict[str, set[str]]:
    """Each adversary's cheating contributions that peer1's chain rejected as proven so far."""
    from gpunite.swarm.adversary import read_adversary_log

    proven = {r["contribution"] for b in blocks(swarm.peers["peer1"]).values() for r in b["rejected"] if r["cheat"]}
    return {name: proven & {e["record_id"] for e in read_adversary_log(swarm.peers[name].home) if e["cheating"]}
            for name in ADVERSARIES}


def _contribution(identity, trail_entries: int = 5):
    from gpunite.records import Contribution, WorkUnit, sign_record

    return sign_record(identity, Contribution(
        run_id="a" * 64, round=0, base_hash="b" * 64, work_units=[WorkUnit(shard="c" * 64, first=0, count=8)],
        inner_steps=8, tokens=256, trail_interval=2, trail=["d" * 64] * trail_entries, delta_hash="e" * 64,
        slice_hashes=["f" * 64], delta_norm=1.0, claimed_flops=1.0, time=0.0))


def test_assignment_fits_swarms_of_any_size():
    from gpunite.identity import Identity
    from gpunite.proof.policy import MergePolicy
    from gpunite.swarm.audits import assign

    beacon = bytes(32)
    policy = MergePolicy(audit_fraction=1.0, segments_per_audit=2)
    trainer, coordinator, other = (Identity.from_seed(s.encode()) for s in ("trainer", "coordinator", "other"))
    work = _contribution(trainer)
    # Enough peers: neither the trainer nor the coordinator verifies; 2 of the 4 segments are drawn.
    many = assign(beacon, work, policy, [trainer.peer_id, coordinator.peer_id, other.peer_id], coordinator.peer_id)
    assert many.audited and many.verifiers == (other.peer_id,) and len(many.segments) == 2
    assert set(many.segments) <= {0, 1, 2, 3}
    # Two peers: the coordinator is the only one who can verify, so it does.
    two = assign(beacon, work, policy, [trainer.peer_id, coordinator.peer_id], coordinator.peer_id)
    assert two.verifiers == (coordinator.peer_id,)
    # Alone: nobody can audit it.
    assert not assign(beacon, work, policy, [trainer.peer_id], trainer.peer_id).audited
    # The coordinator's own contribution is audited even when the fraction is zero.
    own = _contribution(coordinator)
    none = MergePolicy(audit_fraction=0.0)
    assert assign(beacon, own, none, [trainer.peer_id, coordinator.peer_id], coordinator.peer_id).audited
    assert not assign(beacon, work, none, [trainer.peer_id, coordinator.peer_id], coordinator.peer_id).audited


def blocks(peer) -> dict[int, dict]:
    found = {}
    for path in peer.home.glob("runs/*/chain.jsonl"):
        for line in path.read_text().splitlines():
            block = json.loads(line)
            found[block["round"]] = block
    return found


def test_live_adversaries_are_caught_and_never_merged(tmp_path):
    from gpunite.data.prepare import prepare_dataset
    from gpunite.identity import Identity
    from gpunite.manifest import load_manifest
    from gpunite.records import parse_record
    from gpunite.swarm.adversary import read_adversary_log, sybil_identity
    from gpunite.swarm.node import SwarmNode
    from gpunite.swarm.protocol import verdict_key

    manifest_path = tmp_path / "run.toml"
    manifest_path.write_text(MANIFEST)
    prepare_dataset(load_manifest(manifest_path))
    with LocalSwarm(tmp_path, manifest_path, heartbeat_s=1.0) as swarm:
        swarm.start_first("peer1", wait_peers=len(HONEST) + len(ADVERSARIES), extra=["--speed", "1"])
        address = swarm.address()
        for name in HONEST[1:]:
            swarm.join(name, address, extra=["--speed", "1"])
        for name, mode in ADVERSARIES.items():
            swarm.join(name, address, extra=["--speed", "1", "--adversary", mode])
        swarm.wait_for(lambda s: all(s.get(n, {}).get("round", -1) >= ROUNDS for n in HONEST)
                       and all(proven_cheats(swarm).values()), WAIT_S,
                       f"the honest peers to reach round {ROUNDS} and prove every adversary's cheat")
        # A late joiner takes the bans with its state (checked against the live peers' heartbeats): without
        # them it would draw other verifiers and coordinators than everyone else and follow no close.
        swarm.join("late", address, extra=["--speed", "1"])
        swarm.wait_for(lambda s: s.get("late", {}).get("rounds_done", 0) >= 2, 240,
                       "the late joiner to follow two rounds")
        statuses = swarm.statuses()
        run_id = statuses["peer1"]["run_id"]
        ids = {name: statuses[name]["peer_id"] for name in [*HONEST, *ADVERSARIES]}
        sybil_id = sybil_identity(Identity.load_or_create(swarm.peers["sybil"].home)).peer_id
        last_round = min(statuses[n]["round"] for n in HONEST)  # rounds before it closed on both

        # The DHT holds the signed reject verdicts that proved each cheat (read as any peer reads them;
        # a fresh node may need a few tries to reach the peers storing them).
        caught = proven_cheats(swarm)
        round_of = {e["record_id"]: e["round"] for name in ADVERSARIES
                    for e in read_adversary_log(swarm.peers[name].home)}
        signed_proof: dict[str, str] = {}
        observer = SwarmNode(initial_peers=[address]).start()
        try:
            for _ in range(10):
                for name, contribution_ids in caught.items():
                    for cid in sorted(contribution_ids) if name not in signed_proof else ():
                        found = observer.get(verdict_key(run_id, round_of[cid], cid)).values()
                        if any(not v.accept and v.reason.startswith("proven: ") and v.contribution == cid
                               for v in map(parse_record, found)):
                            signed_proof[name] = cid
                if len(signed_proof) == len(ADVERSARIES):
                    break
                time.sleep(1.0)
        finally:
            observer.close()
    logs = {name: read_adversary_log(swarm.peers[name].home) for name in ADVERSARIES}

    chains = {name: blocks(swarm.peers[name]) for name in [*HONEST, "late"]}
    common = set.intersection(*(set(chains[name]) for name in HONEST))
    assert set(range(last_round)) <= common
    for round_index in common:
        assert len({chains[name][round_index]["weights_hash"] for name in HONEST}) == 1
    late_rounds = sorted(set(chains["late"]) & set(chains["peer1"]))
    assert len(late_rounds) >= 2
    assert all(chains["late"][r]["weights_hash"] == chains["peer1"][r]["weights_hash"] for r in late_rounds)
    late_log = (swarm.workdir / "late.log").read_text(errors="replace")
    assert "bans from the synced state" in late_log
    chain = chains["peer1"]
    merged_ids = {cid for b in chain.values() for cid in b["accepted"]}
    proven = {r["contribution"] for b in chain.values() for r in b["rejected"] if r["cheat"]}
    banned = {r["trainer"] for b in chain.values() for r in b["rejected"] if r["cheat"]}
    for name, mode in ADVERSARIES.items():
        cheats = [e for e in logs[name] if e["cheating"]]
        assert cheats, f"{mode} never cheated"
        assert not merged_ids & {e["record_id"] for e in cheats}, f"a {mode} contribution merged"
        assert proven & {e["record_id"] for e in cheats}, f"{mode}'s cheat was not proven"
        assert signed_proof.get(name) in proven, f"no signed proof against {mode} in the DHT"
    # A Sybil's extra identity is the one banned; the work it trained once and claimed first was honest.
    assert sybil_id in banned and all(e["peer_id"] == sybil_id for e in logs["sybil"] if e["cheating"])
    assert {ids[n] for n in ("scaler", "copier", "replayer")} <= banned
    # Merged contributions were audited: every block that merged something lists the accept verdicts it used.
    assert all(b["verdicts"] for b in chain.values() if b["accepted"])
    assert all(statuses[n]["contributed_rounds"] >= 1 for n in HONEST)
    # A banned peer coordinates no later round (verifiers ignore its beacon, so its close would merge nothing)
    # and gets no units in the rosters after its ban.
    ban_round = {r["trainer"]: b["round"] for b in sorted(chain.values(), key=lambda b: -b["round"])
                 for r in b["rejected"] if r["cheat"]}
    for name in ("scaler", "copier", "replayer"):
        log_text = (swarm.workdir / f"{name}.log").read_text(errors="replace")
        coordinated = [int(line.split("coordinated round ")[1].split()[0]) for line in log_text.splitlines()
                       if "coordinated round " in line]
        assert all(r <= ban_round[ids[name]] for r in coordinated), (name, coordinated, ban_round[ids[name]])


class _CloseChecker:
    """A peer's audit state around a real DHT node holding real signed records: trainer, coordinator,
    verifiers, one contribution, the coordinator's beacon, and the drawn verifier's accept verdict."""

    def __init__(self, node, name: str):
        import hashlib
        from types import SimpleNamespace

        from gpunite.identity import Identity
        from gpunite.manifest import ProofSection
        from gpunite.proof.selection import beacon_from_signature, sign_beacon
        from gpunite.records import Contribution, WorkUnit, record_bytes, sign_record
        from gpunite.swarm.audits import RoundAudits, assign
        from gpunite.swarm.checks import RoundContext
        from gpunite.swarm.protocol import run_key

        self.node = node
        self.run_id = hashlib.sha256(name.encode()).hexdigest()  # each test its own keys in the shared DHT
        self.prev_block, self.base_hash = "9" * 64, "b" * 64
        self.trainer, self.coordinator, self.me, self.other, self.third = (
            Identity.from_seed(s.encode()) for s in ("trainer", "coordinator", "me", "other", "third"))
        roster = [i.peer_id for i in (self.trainer, self.coordinator, self.me, self.other, self.third)]
        units = [WorkUnit(shard="c" * 64, first=0, count=32)]
        self.contribution = sign_record(self.trainer, Contribution(
            run_id=self.run_id, round=0, base_hash=self.base_hash, work_units=units, inner_steps=8, tokens=256,
            trail_interval=2, trail=["d" * 64] * 5, delta_hash="e" * 64, slice_hashes=["f" * 64], delta_norm=1.0,
            claimed_flops=1.0, time=0.0))
        self.ctx = RoundContext(run_id=self.run_id, round=0, base_hash=self.base_hash,
                                assigned={pid: units if pid == self.trainer.peer_id else [] for pid in roster},
                                inner_steps=8, batch_size=4, seq_len=8, trail_interval=2, n_slices=1, norm_bound=3.0)
        node.store(run_key(self.run_id, "contrib", 0), self.trainer.peer_id, record_bytes(self.contribution), 600)
        ids = [self.contribution.record_id]
        self.beacon_signature = sign_beacon(self.coordinator, self.run_id, 0, self.prev_block, ids)
        beacon = beacon_from_signature(self.coordinator.public_key_hex, self.beacon_signature, self.run_id, 0,
                                       self.prev_block, ids)
        proof = ProofSection(audit_fraction=1.0, segments_per_audit=1)
        peer = SimpleNamespace(
            node=node, run_id=self.run_id, identity=self.me, peer_id=self.me.peer_id,
            manifest=SimpleNamespace(proof=proof), config=SimpleNamespace(poll_s=0.05, takeover_s=1.0),
            state=SimpleNamespace(weights_hash=self.base_hash, weights=None), _emit=lambda record: None)
        self.audits = RoundAudits(peer, audit_timeout_s=1.0)
        self.audits.start_round(self.ctx, roster)
        drawn = assign(beacon, self.contribution, self.audits.policy, roster, self.coordinator.peer_id).verifiers
        by_id = {i.peer_id: i for i in (self.me, self.other, self.third)}
        self.verifier = by_id[drawn[0]]
        self.bystander = next(i for pid, i in by_id.items() if pid not in drawn)

    def verdict(self, identity, accept: bool, proven: bool = True):
        from gpunite.proof.audit import PROVEN, AuditResult, make_verdict
        from gpunite.records import record_bytes
        from gpunite.swarm.protocol import verdict_key

        reason = "segment 0 replayed within 0" if accept else "replay of segment 0 lands 0.9 away"
        if not accept and proven:
            reason = PROVEN + reason
        elif not accept:
            reason = "could not get slice 0 of the delta from the trainer"
        result = AuditResult(accept, reason, not accept and proven, 0, 0.0, 1.0)
        verdict = make_verdict(identity, self.contribution, result, time=1.0)
        self.node.store(verdict_key(self.run_id, 0, self.contribution.record_id), identity.peer_id,
                        record_bytes(verdict), 600)
        return verdict

    def close(self, accepted: bool, verdicts: list[str], ban: bool = False):
        from gpunite.records import Rejection, sign_record
        from gpunite.swarm.protocol import RoundClose

        cid, pid = self.contribution.record_id, self.trainer.peer_id
        rejected = [] if accepted else [Rejection(contribution=cid, trainer=pid, reason="proven: replay", cheat=ban)]
        return sign_record(self.coordinator, RoundClose(
            run_id=self.run_id, round=0, base_hash=self.base_hash, prev_block=self.prev_block,
            accepted=[cid] if accepted else [], contributors=[pid] if accepted else [], rejected=rejected,
            next_roster=[], coordinator_rank=0, beacon=self.beacon_signature, beacon_contributions=[cid],
            verdicts=verdicts, time=2.0))

    def adopt(self, close):
        return self.audits.adopt_close(close, self.ctx, polls=3)


@pytest.fixture(scope="module")
def dht_node():
    from gpunite.swarm.node import SwarmNode

    node = SwarmNode().start()
    yield node
    node.close()


def test_a_close_merges_only_on_signed_accepts_by_drawn_verifiers(dht_node):
    checker = _CloseChecker(dht_node, "merges")
    contribution, ctx = checker.contribution, checker.ctx
    accept = checker.verdict(checker.verifier, accept=True)
    outsider = checker.verdict(checker.bystander, accept=True)

    honest = checker.adopt(checker.close(accepted=True, verdicts=[accept.record_id]))
    assert honest.accept, honest.reason
    assert checker.audits.check(contribution, ctx).accept

    refused = checker.adopt(checker.close(accepted=True, verdicts=["ab" * 32]))
    assert not refused.accept and "not found signed in the DHT" in refused.reason
    refused = checker.adopt(checker.close(accepted=True, verdicts=[outsider.record_id]))
    assert not refused.accept and "did not draw" in refused.reason
    # Listing no verdict at all: adopted, but the merge gate then wants the drawn verifier's accept.
    assert checker.adopt(checker.close(accepted=True, verdicts=[])).accept
    assert not checker.audits.check(contribution, ctx).accept

    reject = checker.verdict(checker.verifier, accept=False)  # replaces its accept in the DHT
    refused = checker.adopt(checker.close(accepted=True, verdicts=[reject.record_id]))
    assert not refused.accept and "against a reject verdict" in refused.reason


def test_a_close_bans_only_with_a_proof_in_the_signed_records(dht_node):
    checker = _CloseChecker(dht_node, "bans")
    accept = checker.verdict(checker.verifier, accept=True)
    for verdicts in ([], [accept.record_id]):
        refused = checker.adopt(checker.close(accepted=False, verdicts=verdicts, ban=True))
        assert not refused.accept and "without proof" in refused.reason
    checker.verdict(checker.bystander, accept=False)  # a reject by someone the beacon did not draw proves nothing
    assert not checker.adopt(checker.close(accepted=False, verdicts=[], ban=True)).accept

    reject = checker.verdict(checker.verifier, accept=False)
    close = checker.close(accepted=False, verdicts=[reject.record_id], ban=True)
    adopted = checker.adopt(close)
    assert adopted.accept, adopted.reason
    # What a coordinator asks of a contribution whose slice is missing: proven, without relying on anything
    # yet; the merge gate then relies on the proof, so a close made here lists it.
    relied = checker.audits._relied.setdefault(0, set())
    relied.clear()
    assert checker.audits.proves_cheat(checker.contribution, checker.ctx) and not relied
    assert checker.audits.check(checker.contribution, checker.ctx).cheat and reject.record_id in relied
    checker.audits.settle(close)
    assert checker.audits.bans.is_banned(checker.trainer.peer_id)
    # A rejection that bans no one needs no proof (lateness, a missing verdict).
    assert checker.adopt(checker.close(accepted=False, verdicts=[], ban=False)).accept


def test_a_failed_audit_without_proof_makes_a_suspect_where_the_close_is_settled(dht_node):
    from dataclasses import replace

    checker = _CloseChecker(dht_node, "suspects")
    trainer, ctx = checker.trainer.peer_id, checker.ctx
    silent = checker.adopt(checker.close(accepted=False, verdicts=[]))  # the verifier timed out: nobody blamed
    assert silent.accept, silent.reason
    checker.audits.settle(checker.close(accepted=False, verdicts=[]))
    assert not checker.audits.suspects.as_of(1).is_suspect(trainer)

    reject = checker.verdict(checker.verifier, accept=False, proven=False)  # trail or slices not served
    close = checker.close(accepted=False, verdicts=[reject.record_id])
    adopted = checker.adopt(close)
    assert adopted.accept, adopted.reason
    checker.audits.settle(close)
    assert not checker.audits.bans.is_banned(trainer)
    assert checker.audits.suspects.as_of(1).is_suspect(trainer)
    assert not checker.audits.suspects.as_of(0).is_suspect(trainer)  # round 0 itself judged without it

    # The merge gate honours the suspicion: unaudited, a suspect's contribution does not merge.
    checker.audits.policy = replace(checker.audits.policy, audit_fraction=0.0)
    assert checker.audits.check(checker.contribution, ctx).accept  # round 0: not yet a suspect
    checker.audits.suspects.note(trainer, -1, False, "could not get slice 0")
    refused = checker.audits.check(checker.contribution, ctx)
    assert not refused.accept and "not audited this round" in refused.reason and not refused.cheat


def test_a_forged_contribution_is_dropped_where_peers_read_it(dht_node, tmp_path, caplog):
    """What a forged_signature peer publishes, stored in a real DHT node and read back as every peer reads."""
    import logging

    from gpunite.identity import Identity, RecordError
    from gpunite.manifest import TrainSection
    from gpunite.model import ModelConfig, build_model
    from gpunite.proof.adversary import MODES, RoundWork
    from gpunite.proof.trail import TrailRecorder
    from gpunite.records import WorkUnit, parse_record, record_bytes
    from gpunite.swarm.adversary import _as_published
    from gpunite.swarm.audits import parse_contribution
    from gpunite.swarm.protocol import run_key
    from gpunite.train.weights import trainable_state

    config = ModelConfig(64, 32, 1, 2, 2, 64, 32, True)
    corpus = torch.randint(0, 64, (16, 9), generator=torch.Generator().manual_seed(0))
    base = {n: t.clone() for n, t in trainable_state(build_model(config, seed=0)).items()}
    numel = sum(t.numel() for t in base.values())
    forger = Identity.from_seed(b"forger")
    work = RoundWork(
        run_id="7" * 64, round=0, base=base, units=[WorkUnit(shard="c" * 64, first=0, count=8)],
        model_config=config, train_cfg=TrainSection(batch_size=2, inner_steps=4, compression_chunk=256), seq_len=8,
        trail_interval=2, first_step=0, total_steps=20, loader=lambda shard, first, count: corpus[first:first + count],
        identity=forger, recorder=TrailRecorder(2, tmp_path / "trail"), slice_bounds=[(0, numel)])
    published = _as_published(MODES["forged_signature"](work)[0].record)
    with pytest.raises(RecordError):
        parse_record(record_bytes(published))
    key = run_key(work.run_id, "contrib", 0)
    dht_node.store(key, forger.peer_id, record_bytes(published), 600)
    assert dht_node.get(key), "the forged record did not reach the DHT"
    with caplog.at_level(logging.WARNING, logger="gpunite.swarm.node"):
        assert dht_node.get_records(key, parse_contribution) == {}
    assert any("dropped a bad record" in r.getMessage() and forger.peer_id[:16] in r.getMessage()
               for r in caplog.records)


def test_swarm_adversaries_cover_every_proof_mode():
    from gpunite.proof.adversary import CHEAT_MODES
    from gpunite.swarm.adversary import SWARM_ADVERSARIES
    from gpunite.swarm.demo import CHEATER_MODES

    assert set(SWARM_ADVERSARIES) == set(CHEAT_MODES)
    assert set(CHEAT_MODES) <= set(CHEATER_MODES)


def test_trail_replies_travel_packed_only_to_those_that_ask_and_bad_packing_is_refused():
    import asyncio
    from types import SimpleNamespace

    import zstandard

    from gpunite.swarm.audits import serve_trail, trail_reply
    from gpunite.swarm.protocol import FLOAT_ENCODING, ProtocolError, pack_floats
    from gpunite.train.weights import to_safetensors_bytes

    generator = torch.Generator().manual_seed(7)
    state = {"weights/w": (torch.randn(5001, generator=generator) * 1e-3).to(torch.float16),
             "optimizer/w.exp_avg": (torch.randn(5001, generator=generator) * 1e-4).to(torch.bfloat16),
             "optimizer/w.exp_avg_sq": torch.rand(5001, generator=generator) * 1e-8,
             "optimizer/w.step": torch.tensor(12.0)}
    raw = to_safetensors_bytes(state)
    peer = SimpleNamespace(run_id="r" * 64, state=SimpleNamespace(round=3),
                           recorder=SimpleNamespace(final_payload=lambda round_index: raw))
    ask = {"run": peer.run_id, "round": 3, "segment": "final"}

    header, body = asyncio.run(serve_trail(peer, ask | {"accept": [FLOAT_ENCODING]}, b"", "caller"))
    assert header["encoding"] == FLOAT_ENCODING and len(body) < 0.9 * len(raw)
    assert trail_reply(header, body, len(raw)) == raw  # bit-exact: replays and hashes depend on every byte
    header, body = asyncio.run(serve_trail(peer, ask, b"", "caller"))  # an older verifier: sent as stored
    assert "encoding" not in header and body == raw and trail_reply(header, body, len(raw)) == raw
    for odd in (b"", b"abc", raw[:4097]):  # lengths that are not whole 4-byte words
        assert trail_reply({"encoding": FLOAT_ENCODING}, pack_floats(odd), 10_000) == odd

    packed = pack_floats(raw)
    with pytest.raises(ProtocolError, match="over the"):  # inflating past what the reply may hold
        trail_reply({"encoding": FLOAT_ENCODING}, packed, len(raw) - 1)
    with pytest.raises(ProtocolError, match="corrupt"):
        trail_reply({"encoding": FLOAT_ENCODING}, packed[: len(packed) // 2], len(raw))
    with pytest.raises(ProtocolError):
        trail_reply({"encoding": FLOAT_ENCODING}, b"not zstd at all", len(raw))
    with pytest.raises(ProtocolError, match="unknown"):  # no content size in the frame: refused, not guessed
        stream = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
        trail_reply({"encoding": FLOAT_ENCODING}, stream, len(raw))
    with pytest.raises(ProtocolError, match="never asked for"):
        trail_reply({"encoding": "gzip"}, raw, len(raw))
