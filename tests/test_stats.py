import gzip
import json
import xml.etree.ElementTree as ET

import pytest
from _ledger_helpers import DAY, RunBuilder, peer, small_run
from typer.testing import CliRunner

from gpunite.cli import app
from gpunite.ledger.boinc_export import cpid, export_boinc_stats, numeric_id
from gpunite.ledger.credits import FLOPS_PER_CREDIT, credit_table
from gpunite.ledger.stats import stats_from_table
from gpunite.ledger.store import Ledger


def _two_day_run():
    """Day 1: old and new train; day 2 (the last 24 h): only new trains. A separate host serves old."""
    run = RunBuilder()
    old, new, witness, host = peer("old"), peer("new"), peer("witness"), peer("host")
    run.host(old, user_name="Old Timer", team="Pioneers & Co")
    run.host(new, user_name="new\x07bie</name>", team="Pioneers & Co")
    run.block(
        [witness], [run.contribution(old, flops=4.32e13), run.contribution(new, flops=4.32e13)], advance_s=DAY
    )
    run.block([witness], [run.contribution(new, flops=8.64e13, tokens=2000)], advance_s=DAY)
    run.usage(host, old.peer_id, tokens=10_000, request_id="q", time=run.time - 100)
    return run, old, new, host


def test_status_page_numbers():
    run, old, new, host = _two_day_run()
    table = credit_table(run.records, now=run.time + 60)
    stats = stats_from_table(table)
    assert (stats.users_total, stats.users_active) == (3, 2)  # new trained and host served in the last 24 h
    assert (stats.hosts_total, stats.hosts_active) == (3, 2)
    assert stats.teams_total == 1
    assert stats.credit_24h == pytest.approx(200.0 + 0.1)
    assert stats.total_credit == pytest.approx(100 + 300 + 0.1)
    assert stats.teraflops == pytest.approx(sum(row.rac for row in table.users) / 200_000)
    assert [row["name"] for row in stats.top_users][:2] == ["new\x07bie</name>", "Old Timer"]
    assert stats.top_teams[0]["members"] == 2


def test_boinc_export_files_parse_and_carry_boinc_fields(tmp_path):
    run, old, new, host = _two_day_run()
    table = credit_table(run.records, now=run.time + 60)
    written = export_boinc_stats(table, tmp_path / "stats", update_time=1234567890)
    assert sorted(path.name for path in written) == ["host.gz", "tables.xml", "team.gz", "user.gz"]

    users = ET.fromstring(gzip.decompress((tmp_path / "stats" / "user.gz").read_bytes()))
    assert users.tag == "users" and len(users) == 3
    by_name = {u.findtext("name"): u for u in users}
    old_user = by_name["Old Timer"]
    for field in (
        "id",
        "name",
        "create_time",
        "total_credit",
        "expavg_credit",
        "expavg_time",
        "cpid",
        "teamid",
    ):
        assert old_user.find(field) is not None, field
    assert float(old_user.findtext("total_credit")) == pytest.approx(100.0, abs=1e-5)
    assert old_user.findtext("cpid") == cpid(old.public_key_hex) and len(old_user.findtext("cpid")) == 32
    assert int(old_user.findtext("teamid")) == numeric_id("Pioneers & Co")
    assert by_name[host.peer_id[:12]].find("teamid") is None
    assert "newbie</name>" in by_name  # control characters dropped, markup escaped

    hosts = ET.fromstring(gzip.decompress((tmp_path / "stats" / "host.gz").read_bytes()))
    assert hosts.tag == "hosts" and {h.findtext("userid") for h in hosts} == {u.findtext("id") for u in users}
    assert all(len(h.findtext("host_cpid")) == 32 and h.find("expavg_credit") is not None for h in hosts)

    teams = ET.fromstring(gzip.decompress((tmp_path / "stats" / "team.gz").read_bytes()))
    (team,) = list(teams)
    assert team.findtext("name") == "Pioneers & Co" and team.findtext("founder_name") == "Old Timer"
    assert float(team.findtext("total_credit")) == pytest.approx(400.0, abs=1e-5)

    tables = ET.parse(tmp_path / "stats" / "tables.xml").getroot()
    assert tables.findtext("update_time") == "1234567890"
    assert (
        tables.findtext("nusers_total"),
        tables.findtext("nhosts_total"),
        tables.findtext("nteams_total"),
    ) == ("3", "3", "1")
    assert float(tables.findtext("total_credit")) == pytest.approx(400.1, abs=1e-5)

    again = export_boinc_stats(table, tmp_path / "stats", update_time=1234567890)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in written]
    assert not [
        p for p in (tmp_path / "stats").iterdir() if p.name.startswith(".")
    ]  # no temporary files left


def test_stats_cli_json_and_export(tmp_path):
    run, _ = small_run(rounds=3)
    ledger = Ledger(tmp_path / "home" / "ledger.sqlite")
    ledger.add_many(run.records)
    ledger.close()
    runner = CliRunner()
    result = runner.invoke(app, ["stats", "--home", str(tmp_path / "home"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["users_total"] == 5 and data["records"] == len(run.records)
    assert data["total_credit"] == pytest.approx((3 * 6e12 + 3 * 1e10) / FLOPS_PER_CREDIT + 0.05)
    human = runner.invoke(app, ["stats", "--home", str(tmp_path / "home")])
    assert human.exit_code == 0 and "Top users" in human.output and "alice" in human.output
    exported = runner.invoke(
        app, ["stats", "export", str(tmp_path / "out"), "--home", str(tmp_path / "home")]
    )
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "out" / "user.gz").exists()
    missing = runner.invoke(app, ["stats", "--ledger", str(tmp_path / "nope.sqlite")])
    assert missing.exit_code != 0 and "no ledger at" in str(missing.exception)
