import json
import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest
from _ledger_helpers import RunBuilder, peer, small_run
from typer.testing import CliRunner

from gpunite.cli import app
from gpunite.identity import RecordError, canonical_json
from gpunite.ledger.store import Ledger, LedgerError
from gpunite.records import record_bytes


def test_add_dedups_and_queries(tmp_path):
    run, peers = small_run()
    ledger = Ledger(tmp_path / "ledger.sqlite")
    assert ledger.journal_mode == "wal"
    assert all(ledger.add(record) for record in run.records)
    assert not any(ledger.add(record) for record in run.records)
    assert len(ledger) == len(run.records)
    first = run.records[4]
    assert ledger.add(record_bytes(first)) is False  # same record from the wire is the same id
    assert first.record_id in ledger and ledger.get([first.record_id])[first.record_id] == record_bytes(first)
    contributions = ledger.records(kind="contribution", run_id=run.run_id, round=1)
    assert len(contributions) == 3 and {c.round for c in contributions} == {1}
    assert {c.peer_id for c in ledger.records(kind="contribution", signer=peers["bob"].peer_id)} == {
        peers["bob"].peer_id
    }
    blocks = ledger.blocks(run.run_id)
    assert [b.round for b in blocks] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert ledger.ids() == sorted(r.record_id for r in run.records)
    assert ledger.run_ids() == [run.run_id]
    assert ledger.conflicts() == []


def test_conflicting_records_are_all_kept_as_evidence(tmp_path):
    run = RunBuilder()
    mallory, honest = peer("mallory"), peer("honest")
    ledger = Ledger(tmp_path / "l.sqlite")
    one = run.contribution(mallory, flops=1e12)
    two = run.contribution(mallory, flops=9e12)  # a second contribution for the same round
    run.contribution(honest)
    block_a = run.block([mallory], [one])[0]
    run.round -= 1
    block_b = run.block([mallory], [two], prev=block_a.prev)[0]  # a different block for the same round
    for record in run.records:
        assert ledger.add(record)
    resigned = run.block(
        [honest], [one], prev=block_a.prev
    )  # honest signs round 1 twice with the same content
    run.round -= 1
    resigned += run.block([honest], [one], prev=block_a.prev, advance_s=5.0)
    for record in resigned:
        assert ledger.add(record)
    conflicts = ledger.conflicts()
    assert {(c.kind, c.signer) for c in conflicts} == {
        ("contribution", mallory.peer_id),
        ("block", mallory.peer_id),
    }
    assert {c.first for c in conflicts} | {c.second for c in conflicts} == {
        one.record_id,
        two.record_id,
        block_a.record_id,
        block_b.record_id,
    }
    assert len(ledger.records(kind="contribution", signer=mallory.peer_id)) == 2
    shown = CliRunner().invoke(app, ["ledger", "show", "--ledger", str(ledger.path), "--json"])
    assert shown.exit_code == 0, shown.output
    info = json.loads(shown.output)
    assert info["by_kind"] == {"block": 4, "contribution": 3} and info["runs"] == [run.run_id]
    assert sorted(c["kind"] for c in info["conflicts"]) == ["block", "contribution"]


def test_invalid_records_are_refused_and_nothing_is_lost(tmp_path):
    run, _ = small_run(rounds=2)
    ledger = Ledger(tmp_path / "l.sqlite")
    added, refused = ledger.add_many(run.records)
    assert added == len(run.records) and refused == []
    before = ledger.ids()
    good = run.records[5].model_dump(mode="json")
    with pytest.raises(RecordError, match="bad signature"):
        ledger.add({**good, "claimed_flops": 1e30})
    with pytest.raises(RecordError, match="not JSON"):
        ledger.add(b"\xff garbage")
    ident = peer("sloppy")
    # A signed record whose float field was written as an integer would get two ids: refused.
    sloppy = ident.sign({**{k: v for k, v in good.items() if k not in ("signer", "signature")}, "time": 5})
    with pytest.raises(RecordError, match="canonical form"):
        ledger.add(sloppy)
    added, refused = ledger.add_many(
        [{**good, "round": 9}, canonical_json(run.records[0].model_dump(mode="json"))]
    )
    assert added == 0 and len(refused) == 1 and "bad signature" in refused[0]
    assert ledger.ids() == before
    assert ledger.get(before).keys() == set(before)


def test_threads_share_one_ledger(tmp_path):
    run, _ = small_run(rounds=6)
    ledger = Ledger(tmp_path / "l.sqlite")
    parts = [run.records[i::4] for i in range(4)]
    threads = [threading.Thread(target=lambda p=p: [ledger.add(r) for r in p]) for p in parts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ledger) == len(run.records)


def test_corrupt_file_gives_one_line_error(tmp_path):
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(b"this is not a database at all" * 200)
    with pytest.raises(LedgerError, match="move it aside") as info:
        Ledger(path)
    assert "\n" not in str(info.value)


WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])
    from _ledger_helpers import RunBuilder, peer
    from gpunite.ledger.store import Ledger
    ledger = Ledger(sys.argv[1])
    run = RunBuilder("crash")
    who = peer("writer")
    for i in range(100000):
        record = run.contribution(who, round_=i)
        ledger.add(record)
        print(record.record_id, flush=True)
""")


def test_kill_9_mid_write_keeps_every_committed_record(tmp_path):
    path = tmp_path / "ledger.sqlite"
    tests_dir = str(__import__("pathlib").Path(__file__).parent)
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), tests_dir], stdout=subprocess.PIPE, text=True
    )
    committed = []
    try:
        for line in proc.stdout:
            committed.append(line.strip())
            if len(committed) >= 60:
                break
    finally:
        proc.kill()  # SIGKILL while it is writing the next records
        proc.wait()
    assert proc.returncode == -9
    assert sqlite3.connect(str(path)).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    ledger = Ledger(path)
    stored = set(ledger.ids())
    assert set(committed) <= stored
    assert all(r.kind == "contribution" for r in ledger.records())
