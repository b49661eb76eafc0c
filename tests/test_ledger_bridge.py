"""The ledger bridge in a real swarm: three peer processes on 127.0.0.1 train two rounds, and every peer's
ledger ends with the run's blocks and contributions, and the same credit table, with credit for each trainer.

The swarm runs with train.overlap on (round r + 1 trains beside round r's exchange and is carried onto the
merged weights when they arrive), so the overlapped round loop and its audits are exercised here;
tests/test_swarm.py runs the synchronous one."""

from __future__ import annotations

import re
import time

import pytest
from _swarm_helpers import tiny_swarm_manifest

from gpunite.ledger.credits import credit_table
from gpunite.ledger.store import Ledger, default_ledger_path
from gpunite.swarm.demo import LocalSwarm

pytestmark = pytest.mark.timeout(300)

ROUNDS = 3
# Every contribution audited, so the overlapped rounds' rebased trails are replayed by real verifiers.
MANIFEST = tiny_swarm_manifest("ledger-bridge-test", overlap=True, extra="audit_fraction = 1.0\n")


@pytest.fixture(scope="module")
def finished_swarm(tmp_path_factory):
    from gpunite.data.prepare import prepare_dataset
    from gpunite.manifest import load_manifest

    workdir = tmp_path_factory.mktemp("bridge")
    manifest_path = workdir / "demo.toml"  # the name `gpunite demo` gives it, so its credit summary reads it too
    manifest_path.write_text(MANIFEST)
    manifest = load_manifest(manifest_path)
    prepare_dataset(manifest)
    until = ["--until-round", str(ROUNDS), "--speed", "1"]
    with LocalSwarm(workdir, manifest_path, heartbeat_s=1.0) as swarm:
        swarm.start_first("peer1", wait_peers=3, extra=until)
        address = swarm.address()
        swarm.join("peer2", address, extra=until)
        swarm.join("peer3", address, extra=until)
        swarm.wait_exit(timeout_s=240)
        peer_ids = {name: (peer.status() or {}).get("peer_id") for name, peer in swarm.peers.items()}
        yield swarm, load_manifest(manifest_path), peer_ids


def test_every_ledger_holds_the_run(finished_swarm):
    swarm, manifest, _ = finished_swarm
    for name, peer in swarm.peers.items():
        with Ledger(default_ledger_path(peer.home)) as ledger:
            blocks = ledger.blocks(manifest.run_id)
            assert sorted({block.round for block in blocks}) == list(range(ROUNDS)), name
            # every peer signed every round's block, and sync brought the others' copies here
            assert len({block.peer_id for block in blocks}) == 3, name
            accepted = {record_id for block in blocks for record_id in block.accepted}
            contributions = set(ledger.ids("contribution"))
            assert accepted and accepted <= contributions, name
            relied_on = {record_id for block in blocks for record_id in block.verdicts}
            assert relied_on <= set(ledger.ids("verdict")), name
            assert ledger.conflicts() == []


def test_every_peer_computes_the_same_credit_table(finished_swarm):
    from gpunite.model import config_from_manifest, flops_per_token

    swarm, manifest, peer_ids = finished_swarm
    cost = {manifest.run_id: float(flops_per_token(config_from_manifest(manifest), manifest.data.seq_len))}
    now = time.time()
    tables = {}
    for name, peer in swarm.peers.items():
        with Ledger(default_ledger_path(peer.home)) as ledger:
            table = credit_table(ledger.records_by_id(), now, flops_per_token=cost)
        tables[name] = [(row.id, round(row.total_credit, 6), round(row.rac, 6)) for row in table.users]
    assert len({tuple(rows) for rows in tables.values()}) == 1, tables
    credit = {peer_id: total for peer_id, total, _ in tables["peer1"]}
    for name, peer_id in peer_ids.items():
        assert credit.get(peer_id, 0) > 0, f"{name} trained but earned no credit: {credit}"
    log = swarm.peers["peer1"].log_path.read_text()
    assert "credit +" in log and "for round" in log
    assert "round 1: training beside round 0's exchange (overlap)" in log


def test_demo_credit_summary_compares_every_peer(finished_swarm):
    from gpunite.cli.swarm import _demo_credits

    swarm, _, peer_ids = finished_swarm
    credits = _demo_credits(swarm.workdir)
    assert credits["agreed"] and credits["peers_compared"] == 3 and credits["differ"] == []
    assert {row["peer_id"] for row in credits["users"]} == set(peer_ids.values())


def test_overlapped_rounds_are_carried_onto_the_merge_and_pass_their_audits(finished_swarm):
    """Rounds 1 and 2 start before the merge they build on (round 2 from the trainer's own committed round-1
    delta), are carried onto it at a trail step, and every verifier that replays them accepts."""
    swarm, _, _ = finished_swarm
    logs = {name: peer.log_path.read_text(errors="replace") for name, peer in swarm.peers.items()}
    carried = {(name, int(r)): int(n) for name, log in logs.items()
               for r, n in re.findall(r"round (\d+): carried (\d+) steps onto the merged weights", log)}
    assert {r for _, r in carried} == {1, 2}, carried
    assert all(n > 0 for n in carried.values()), carried
    audits = [line for log in logs.values() for line in log.splitlines() if re.search(r"audited \S+ round [12] ", line)]
    assert audits and all(": accept, " in line for line in audits), audits
    assert not any("REJECT" in log for log in logs.values())
