"""Audits in a real swarm on 127.0.0.1: three honest peers and one cheater, every contribution audited.

The cheater (`gpunite join --adversary scaled_delta`) trains honestly but sends twice its pseudo-gradient:
cheap checks pass (the norm is within the bound), so only the audit can catch it. Checked from the peers'
own signed chains and the DHT: its contributions never merge, a signed reject verdict on one exists, the
close that rejected it proved the cheat (ban), and the honest peers agree on every round's weights and
merge each other's audited contributions.
"""

from __future__ import annotations

import json

import pytest

from gpunite.swarm.demo import LocalSwarm

pytestmark = pytest.mark.timeout(300)

MANIFEST = """
[run]
name = "swarm-audit-test"
seed = 11
[model]
preset = "tiny"
hidden_size = 64
n_layers = 2
n_heads = 2
intermediate_size = 128
[data]
sources = ["builtin:python-docs"]
vocab_size = 512
seq_len = 32
shard_tokens = 16384
max_builtin_mb = 0.3
[train]
batch_size = 4
inner_steps = 4
warmup_steps = 2
total_steps = 400
round_deadline_s = 120
compression_chunk = 256
[proof]
trail_interval = 2
audit_fraction = 1.0
segments_per_audit = 1
"""
HONEST = ["peer1", "peer2", "peer3"]
ROUNDS = 2


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


def test_cheater_is_caught_by_audits_and_never_merged(tmp_path):
    from gpunite.data.prepare import prepare_dataset
    from gpunite.manifest import load_manifest
    from gpunite.records import parse_record
    from gpunite.swarm.node import SwarmNode
    from gpunite.swarm.protocol import run_key, verdict_key

    manifest_path = tmp_path / "run.toml"
    manifest_path.write_text(MANIFEST)
    prepare_dataset(load_manifest(manifest_path))
    with LocalSwarm(tmp_path, manifest_path, heartbeat_s=1.0) as swarm:
        swarm.start_first("peer1", wait_peers=4, extra=["--speed", "1"])
        address = swarm.address()
        for name in HONEST[1:]:
            swarm.join(name, address, extra=["--speed", "1"])
        swarm.join("cheater", address, extra=["--speed", "1", "--adversary", "scaled_delta"])
        swarm.wait_for(lambda s: all(s.get(n, {}).get("round", -1) >= ROUNDS for n in HONEST), 240,
                       f"the honest peers to reach round {ROUNDS}")
        statuses = swarm.statuses()
        run_id, cheater_id = statuses["cheater"]["run_id"], statuses["cheater"]["peer_id"]

        # The DHT holds the cheater's contributions and the signed verdicts on them.
        observer = SwarmNode(initial_peers=[address]).start()
        try:
            verdicts = []
            for round_index in range(ROUNDS):
                raw = observer.get(run_key(run_id, "contrib", round_index)).get(cheater_id)
                if raw is None:
                    continue
                contribution = parse_record(raw)
                for value in observer.get(verdict_key(run_id, round_index, contribution.record_id)).values():
                    verdicts.append(parse_record(value))
        finally:
            observer.close()

    assert verdicts, "nobody audited the cheater"
    assert any(not v.accept and v.trainer == cheater_id and v.reason.startswith("proven: ") for v in verdicts)
    assert all(not v.accept for v in verdicts)

    chains = {name: blocks(swarm.peers[name]) for name in HONEST}
    common = set.intersection(*(set(c) for c in chains.values()))
    assert set(range(ROUNDS)) <= common
    for round_index in common:
        assert len({chains[name][round_index]["weights_hash"] for name in HONEST}) == 1
    chain = chains["peer1"]
    rejected = [r for b in chain.values() for r in b["rejected"] if r["trainer"] == cheater_id]
    assert any(r["cheat"] for r in rejected), "the cheat was not proven"
    # Merged contributions were audited: every block that merged something lists the accept verdicts it used.
    assert all(b["verdicts"] for b in chain.values() if b["accepted"])
    honest_ids = {statuses[n]["peer_id"] for n in HONEST}
    honest_merged = sum(len(b["accepted"]) for b in chain.values())
    assert honest_merged >= len(honest_ids)
    assert statuses["cheater"]["contributed_rounds"] == 0
    assert all(statuses[n]["contributed_rounds"] >= 1 for n in HONEST)
    merged_ids = {cid for b in chain.values() for cid in b["accepted"]}
    assert not merged_ids & {r["contribution"] for r in rejected}
