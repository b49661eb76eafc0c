import math
import random
from dataclasses import asdict

import pytest
from _ledger_helpers import DAY, T0, RunBuilder, peer, small_run

from gpunite.ledger.credits import (
    FLOPS_PER_CREDIT,
    credit_table,
    decay_average,
    grants,
    run_chains,
    update_average,
)
from gpunite.ledger.quota import QuotaCheck, daily_quota, used_today, utc_day
from gpunite.ledger.store import Ledger
from gpunite.manifest import CreditSection


def _table_dict(table):
    return {
        "users": [asdict(r) for r in table.users],
        "hosts": [asdict(r) for r in table.hosts],
        "teams": [asdict(r) for r in table.teams],
        "banned": table.banned,
    }


def test_every_order_of_the_records_gives_the_same_table():
    run, peers = small_run(rounds=5)
    other, _ = small_run("other", rounds=3)
    records = run.records + other.records
    now = run.time + DAY
    expected = _table_dict(credit_table(records, now))
    rng = random.Random(7)
    for _ in range(6):
        shuffled = records[:]
        rng.shuffle(shuffled)
        assert _table_dict(credit_table(shuffled + shuffled[:10], now)) == expected
    alice = credit_table(records, now).user(peers["alice"].peer_id)
    # alice trained 5 rounds at 1e12 FLOPs each and hosts nothing; hank served her, not the reverse
    assert alice.training_credit == pytest.approx(5 * 1e12 / FLOPS_PER_CREDIT)
    assert alice.name == "alice" and alice.team == "blue"


def test_only_work_in_the_canonical_chain_earns_credit():
    run = RunBuilder()
    a, b, c, d = (peer(n) for n in "abcd")
    merged = run.contribution(a, flops=4.32e11)
    run.contribution(b, flops=4.32e12)  # published but never merged
    run.block([a, c, d], [merged])
    # a minority block for round 1 (one signer) merging c's work loses to the majority one (two signers)
    minority_work = run.contribution(c, flops=4.32e12)
    prev = run.prev
    run.block([c], [minority_work])
    run.round -= 1
    majority = run.block([a, d], [], prev=prev)
    table = credit_table(run.records, now=run.time + 10)
    assert table.user(a.peer_id).total_credit == pytest.approx(1.0)
    assert table.user(b.peer_id) is None
    assert table.user(c.peer_id) is None
    # a contribution listed under the wrong round or run earns nothing either
    later = run.contribution(b, flops=4.32e12, round_=0)
    run.block([a, d], [later], prev=majority[0].block_hash)
    assert credit_table(run.records, now=run.time + 10).user(b.peer_id) is None


def test_a_proven_cheater_gets_nothing_from_that_run_even_retroactively():
    run = RunBuilder()
    honest, cheater, verifier = peer("h"), peer("x"), peer("v")
    for _ in range(3):
        work = [run.contribution(honest), run.contribution(cheater)]
        run.block([honest, verifier], work)
    caught = run.contribution(cheater)
    run.block([honest, verifier], [run.contribution(honest)], cheats=[caught])
    elsewhere = RunBuilder("elsewhere")
    elsewhere.block([honest], [elsewhere.contribution(cheater, flops=4.32e11)])
    table = credit_table(run.records + elsewhere.records, now=run.time + 1)
    assert table.banned == {run.run_id: [cheater.peer_id]}
    assert table.user(cheater.peer_id).total_credit == pytest.approx(1.0)  # only the other run's work
    assert table.user(honest.peer_id).total_credit == pytest.approx(4 * 1e12 / FLOPS_PER_CREDIT)


def test_sybils_without_standing_cannot_outvote_peers_that_did_verified_work():
    run = RunBuilder()
    honest = [peer(f"honest{i}") for i in range(3)]
    sybils = [peer(f"sybil{i}") for i in range(10)]
    for _ in range(3):
        run.block(honest, [run.contribution(p) for p in honest])
    real_work = [run.contribution(p) for p in honest]
    fake_work = run.contribution(sybils[0], flops=1e18)
    prev = run.prev
    run.block(sybils, [fake_work], cheats=real_work)  # ten signatures, but no standing
    run.round -= 1
    real = run.block(honest, real_work, prev=prev)
    table = credit_table(run.records, now=run.time + 60)
    assert table.banned == {}
    assert table.user(sybils[0].peer_id) is None
    assert table.user(honest[0].peer_id).total_credit == pytest.approx(4 * 1e12 / FLOPS_PER_CREDIT)
    assert [link.block_hash for link in run_chains(run.records)[run.run_id]][-1] == real[0].block_hash


def test_claims_are_capped_and_audits_credited_within_the_work_they_replay():
    run = RunBuilder()
    trainer, verifier = peer("t"), peer("v")
    work = run.contribution(trainer, flops=1e15, tokens=1000)
    audit = run.verdict(verifier, work, replay_flops=1e20)
    self_audit = run.verdict(trainer, work, replay_flops=1e12)
    run.time += 1
    same_audit_again = run.verdict(verifier, work, replay_flops=1e20)
    run.block([verifier], [work], [audit, self_audit, same_audit_again])
    uncapped = credit_table(run.records, now=run.time)
    assert uncapped.user(trainer.peer_id).total_credit == pytest.approx(1e15 / FLOPS_PER_CREDIT)
    assert uncapped.user(verifier.peer_id).audit_credit == pytest.approx(1e15 / FLOPS_PER_CREDIT)
    capped = credit_table(run.records, now=run.time, flops_per_token={run.run_id: 6e6})
    assert capped.user(trainer.peer_id).total_credit == pytest.approx(6e9 / FLOPS_PER_CREDIT)
    assert capped.user(verifier.peer_id).total_credit == pytest.approx(6e9 / FLOPS_PER_CREDIT)


def test_without_a_manifest_claims_are_capped_at_the_runs_median_flops_per_token():
    run = RunBuilder()
    honest = [peer(f"h{i}") for i in range(3)]
    liar = peer("liar")
    work = [run.contribution(p, flops=6e9, tokens=1000) for p in honest]
    work.append(run.contribution(liar, flops=6e15, tokens=1000))
    run.block(honest, work)
    table = credit_table(run.records, now=run.time + 10)
    assert table.user(liar.peer_id).total_credit == pytest.approx(table.user(honest[0].peer_id).total_credit)


def test_hosting_credit_is_a_small_share_per_token_served_to_verified_peers():
    run = RunBuilder()
    host, caller, sybil, witness = peer("host"), peer("caller"), peer("sybil"), peer("witness")
    run.usage(host, caller.peer_id, tokens=50_000, request_id="early")  # before the caller did verified work
    run.block([witness], [run.contribution(caller)])
    run.usage(host, caller.peer_id, tokens=20_000, request_id="a")
    run.usage(host, caller.peer_id, tokens=20_000, request_id="a", time=run.time + 1)  # same request twice
    run.usage(host, host.peer_id, tokens=10**6, request_id="self")  # serving itself earns nothing
    run.usage(host, sybil.peer_id, tokens=10**6, request_id="s")  # a caller with no verified work: nothing
    run.usage(host, "anonymous", tokens=10**6, request_id="anon")
    table = credit_table(run.records, now=run.time + 5, host_credit_per_1k_tokens=0.05)
    assert table.user(host.peer_id).hosting_credit == pytest.approx(20 * 0.05)
    assert [g.what for g in grants(run.records)] == ["training", "hosting"]


def test_rac_follows_boinc_update_rule_by_hand():
    avg, at = update_average(0.0, 0.0, 100.0, now=T0 + DAY, work_start=T0)
    assert (avg, at) == (100.0, T0 + DAY)  # first grant: credit / days of work
    avg, at = update_average(avg, at, 50.0, now=T0 + 8 * DAY, work_start=T0 + 7 * DAY)
    assert avg == pytest.approx(100 * 0.5 + 0.5 * 50 / 7)
    assert decay_average(avg, at, T0 + 15 * DAY) == pytest.approx((100 * 0.5 + 0.5 * 50 / 7) / 2)
    tiny, _ = update_average(10.0, T0, 7.0, now=T0 + 1e-3, work_start=T0)
    assert tiny == pytest.approx(10.0 + math.log(2) * 7.0 / 7.0, rel=1e-6)  # small-dt limit


def test_a_steady_1_gflops_machine_reaches_rac_200_and_20000_credits_in_100_days():
    run = RunBuilder(start=T0)
    machine, witness = peer("machine"), peer("witness")
    for _ in range(100):
        run.block([witness], [run.contribution(machine, flops=1e9 * DAY)], advance_s=DAY)
    row = credit_table(run.records, now=run.time).user(machine.peer_id)
    assert row.total_credit == pytest.approx(20000.0)
    assert row.rac == pytest.approx(200.0, abs=0.05)
    week_later = credit_table(run.records, now=run.time + 7 * DAY).user(machine.peer_id)
    assert week_later.rac == pytest.approx(row.rac / 2)
    assert week_later.credit_24h == 0 and row.credit_24h == pytest.approx(200.0)


def test_team_and_host_rows():
    run, peers = small_run(rounds=3)
    table = credit_table(run.records, now=run.time)
    blue = table.team("blue")
    members = [table.user(peers[n].peer_id) for n in ("alice", "bob")]
    assert blue.members == 2
    assert blue.total_credit == pytest.approx(sum(m.total_credit for m in members))
    assert {h.device for h in table.hosts} == {"cpu", ""}  # hank has no host record


def test_daily_quota_policy():
    policy = CreditSection(
        anonymous_daily_queries=5, base_daily_queries=20, queries_per_rac=10, max_daily_queries=1000
    )
    assert daily_quota(0.0, policy) == 5
    assert daily_quota(0.05, policy) == 20
    assert daily_quota(3.2, policy) == 52
    assert daily_quota(1e6, policy) == 1000


def test_quota_check_counts_todays_signed_usage(tmp_path):
    run = RunBuilder(start=T0)
    worker, verifier, host, stranger = peer("w"), peer("v"), peer("host"), peer("s")
    run.block(
        [verifier], [run.contribution(worker, flops=2e9 * DAY)], advance_s=DAY
    )  # RAC about 2 * ln2/7... > 0
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.add_many(run.records)
    policy = CreditSection(
        anonymous_daily_queries=2, base_daily_queries=3, queries_per_rac=0, max_daily_queries=100
    )
    gate = QuotaCheck(ledger, run.run_id, policy, host=host.peer_id)
    now = run.time + 60
    day = utc_day(now)
    for i in range(3):
        allowed, remaining, reset = gate.check(worker.peer_id, now)
        assert allowed and remaining == 2 - i
        ledger.add(run.usage(host, worker.peer_id, request_id=f"q{i}", time=now))
    assert gate.check(worker.peer_id, now)[0] is False
    assert used_today(ledger, worker.peer_id, day, run.run_id) == used_today(ledger, worker.peer_id, day) == 3
    assert used_today(ledger, worker.peer_id, day, "f" * 64) == 0
    for i in range(2):  # anonymous callers share one allowance per host
        assert gate.check("anonymous", now)[0]
        ledger.add(run.usage(host, "anonymous", request_id=f"anon{i}", time=now))
    assert gate.check("anonymous", now)[0] is False
    assert QuotaCheck(ledger, run.run_id, policy, host=stranger.peer_id).check("anonymous", now)[0] is True
    assert gate.check(stranger.peer_id, now) == (True, 1, reset)  # no credit: anonymous allowance
    assert reset > now and (reset - now) <= DAY and reset % DAY == 0
    tomorrow = reset + 1
    assert gate.check(worker.peer_id, tomorrow)[0] is True
