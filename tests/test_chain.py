import json
import sqlite3

from _ledger_helpers import RunBuilder, peer, small_run, weights_hash
from typer.testing import CliRunner

from gpunite.cli import app
from gpunite.ledger.chain import canonical_chain, verify_chain
from gpunite.ledger.store import Ledger


def _ledger(tmp_path, records):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    added, refused = ledger.add_many(records)
    assert refused == []
    return ledger


def test_a_good_chain_verifies(tmp_path):
    run, _ = small_run(rounds=4)
    ledger = _ledger(tmp_path, run.records)
    report = verify_chain(ledger, run.run_id, initial_weights_hash=weights_hash(run.run_id, -1))
    assert report.ok, report.problem
    assert report.rounds == 4 and report.accepted == 12 and report.head == run.prev
    assert report.weights_hash == weights_hash(run.run_id, 3)
    result = CliRunner().invoke(app, ["chain", "verify", "--ledger", str(ledger.path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["runs"][0]["rounds"] == 4


def test_the_canonical_block_is_the_one_most_peers_signed():
    run = RunBuilder()
    a, b, c = peer("a"), peer("b"), peer("c")
    work = run.contribution(a)
    lonely = run.block([c], [])
    run.round -= 1
    popular = run.block([a, b], [work], prev=lonely[0].prev)
    chain = canonical_chain(run.records)
    assert [link.block_hash for link in chain] == [popular[0].block_hash]
    assert chain[0].signers == tuple(sorted((a.peer_id, b.peer_id)))
    assert lonely[0].block_hash != popular[0].block_hash


def test_tampered_block_is_named(tmp_path):
    run, _ = small_run(rounds=4)
    ledger = _ledger(tmp_path, run.records)
    block_ids = [r.record_id for r in run.records if r.kind == "block" and r.round == 2]
    db = sqlite3.connect(str(ledger.path))
    for block_id in block_ids:
        body = json.loads(db.execute("SELECT body FROM records WHERE id = ?", (block_id,)).fetchone()[0])
        body["weights_hash"] = "0" * 64
        db.execute("UPDATE records SET body = ? WHERE id = ?", (json.dumps(body).encode(), block_id))
    db.commit()
    db.close()
    report = verify_chain(ledger, run.run_id)
    assert not report.ok and "does not verify" in report.problem
    result = CliRunner().invoke(app, ["chain", "verify", "--ledger", str(ledger.path)])
    assert result.exit_code == 1 and "broken" in result.output


def test_broken_links_are_reported_with_their_round(tmp_path):
    # a contribution built on the wrong weights
    run = RunBuilder()
    a, v = peer("a"), peer("v")
    run.block([v], [run.contribution(a)])
    run.block([v], [run.contribution(a, base="e" * 64)])
    report = verify_chain(_ledger(tmp_path / "1", run.records), run.run_id)
    assert not report.ok and report.broken_round == 1 and report.rounds == 1
    assert "starts from weights eeeeeeee" in report.problem

    # a merged contribution that nobody has
    run = RunBuilder()
    missing = run.contribution(a)
    run.block([v], [missing])
    report = verify_chain(_ledger(tmp_path / "2", run.records[1:]), run.run_id)
    assert report.broken_round == 0 and "not in the ledger" in report.problem

    # round 2 points at a block that is not round 1's
    run = RunBuilder()
    for _ in range(2):
        run.block([v], [run.contribution(a)])
    run.block([v], [run.contribution(a)], prev="f" * 64)
    report = verify_chain(_ledger(tmp_path / "3", run.records), run.run_id)
    assert report.rounds == 2 and report.broken_round == 2
    assert report.problem.startswith("round 2: no block links to round 1's block")

    # a gap in the rounds
    run = RunBuilder()
    run.block([v], [run.contribution(a)])
    run.round += 1
    run.block([v], [run.contribution(a)])
    report = verify_chain(_ledger(tmp_path / "4", run.records), run.run_id)
    assert report.broken_round == 1 and "round 1 has no block" in report.problem


def test_tampered_contribution_is_named(tmp_path):
    run, _ = small_run(rounds=3)
    ledger = _ledger(tmp_path, run.records)
    target = next(r for r in run.records if r.kind == "contribution" and r.round == 1)
    db = sqlite3.connect(str(ledger.path))
    body = json.loads(db.execute("SELECT body FROM records WHERE id = ?", (target.record_id,)).fetchone()[0])
    body["claimed_flops"] = 1e30
    db.execute("UPDATE records SET body = ? WHERE id = ?", (json.dumps(body).encode(), target.record_id))
    db.commit()
    db.close()
    report = verify_chain(ledger, run.run_id)
    assert report.broken_round == 1 and report.rounds == 1
    assert f"accepted contribution {target.record_id[:16]} does not verify" in report.problem
