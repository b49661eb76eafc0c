"""The simulator: repeatable, conserves bytes and work, matches closed forms (exchange, audits, overlap), wire
sizes match the real serializers, calibration recovers its costs, scales to 1e5 peers quickly."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from gpunite.sim.calibration import (
    SwarmMeasurement,
    _config_for,
    _figures,
    calibrate,
    compare,
    fit_overhead,
    parse_peer_log,
)
from gpunite.sim.model import (
    GPUS,
    LINKS,
    LinkProfile,
    ProtocolCosts,
    SimConfig,
    SimError,
    audit_round,
    dht_hops,
    draw_verifiers,
    exchange_round,
    parse_mix,
    simulate,
    verdict_wait_s,
)
from gpunite.sim.traffic import WireSizes, measure_wire_sizes

SMALL = SimConfig(
    peers=200,
    rounds=12,
    round_compute_s=300.0,
    params=50_000_000,
    session_hours=1.0,
    audit_fraction=0.3,
    cheater_fraction=0.05,
    group_size=32,
    link_mix={"home": 0.7, "bad": 0.3},
)


def _without_wall(result) -> dict:
    return {k: v for k, v in result.to_dict().items() if k != "wall_seconds"}


def test_same_seed_same_result_other_seed_differs():
    assert _without_wall(simulate(SMALL)) == _without_wall(simulate(SMALL))
    assert _without_wall(simulate(replace(SMALL, seed=1))) != _without_wall(simulate(SMALL))


@pytest.mark.parametrize("overlap", [True, False])
def test_bytes_and_work_are_conserved(overlap):
    result = simulate(replace(SMALL, overlap=overlap))
    assert result.bytes_sent_total == pytest.approx(result.bytes_received_total, rel=1e-9)
    assert result.work_assigned_flops == pytest.approx(
        result.work_merged_flops + result.work_cheat_merged_flops + result.work_lost_flops, rel=1e-9
    )
    assert result.work_lost_flops > 0  # churn and the bad links cost something
    assert 0 < result.compute_utilization < 1 and 0 < result.availability <= 1


def _homogeneous(overlap: bool, n: int = 16, audit_fraction: float = 0.0) -> tuple[SimConfig, float, float]:
    """A swarm of equal peers, its communication time per round and its bytes per peer per round, by hand.
    The coordinator's own contribution is always audited (as gpunite.proof.selection.is_audited does), so
    with audit_fraction 0 there is exactly one audit per round, and with 1 there are n."""
    config = SimConfig(
        peers=n,
        gpu_mix={"a100": 1.0},
        link_mix={"home": 1.0},
        params=2_000_000,
        rounds=4,
        round_compute_s=100.0,
        inner_steps=100,
        trail_interval=10,
        speed_jitter=0.0,
        audit_fraction=audit_fraction,
        audit_timeout_s=1e9,
        overlap=overlap,
    )
    costs, home, wire = config.costs, LINKS["home"], config.costs.wire
    param_bytes = config.params * wire.slice_bytes_per_param
    up, down = home.up_mbit * 1e6 / 8, home.down_mbit * 1e6 / 8
    rtt = 2 * home.one_way_ms / 1e3
    # scatter and gather each move (n - 1)/n of the vector through the slower direction of every peer's link
    transfer_s = 2 * param_bytes * (n - 1) / n / min(up, down)
    messages = 4 * n  # send n slices, receive n, serve n, fetch n
    audits = 1 if audit_fraction == 0 else n
    audit_bytes = wire.audit_bytes(config.params, n, config.segments_per_audit, rebased=overlap,
                                   trail_segments=config.trail_segments())
    # one audit: download at the trainer's uplink, one RTT per request, replay of 2 segments x 10 of 100 steps
    one_audit_s = audit_bytes / up + (n + 3) * rtt + 0.2 * costs.audit_compute_scale * 100.0
    busiest_s = one_audit_s  # exact only with one audit; with n of them the busiest verifier is a draw
    comm_s = (
        costs.round_overhead_s
        + transfer_s
        + costs.dht_reads * dht_hops(n) * rtt
        + messages * costs.message_overhead_s
        + busiest_s
    )
    # framing: n (n - 1) slice pulls and n (n - 1) aggregate fetches, each counted at both ends
    exchange_bytes = 2 * param_bytes * (n - 1) / n + 2 * (n - 1) * wire.request_bytes
    return config, comm_s, exchange_bytes + audits * audit_bytes / n


def test_closed_form_without_overlap_compute_over_compute_plus_exchange():
    config, comm_s, bytes_per_round = _homogeneous(overlap=False)
    result = simulate(config)
    assert result.compute_utilization == pytest.approx(100.0 / (100.0 + comm_s), rel=1e-6)
    assert result.mean_round_s == pytest.approx(100.0 + comm_s, rel=1e-6)
    assert result.bytes_sent_per_peer_round == pytest.approx(bytes_per_round, rel=1e-9)
    assert result.audits == config.rounds and result.late_verdicts == 0
    assert result.availability == 1.0 and result.rounds_completed_ratio == 1.0


def test_closed_form_with_overlap_compute_over_max():
    config, comm_s, _ = _homogeneous(overlap=True)
    result = simulate(config)
    # transfers hide behind the next round's steps; the audit's replay needs the same device as training
    replay_s = 0.2 * config.costs.audit_compute_scale * 100.0
    assert result.compute_utilization == pytest.approx(100.0 / max(100.0 + replay_s, comm_s), rel=1e-6)
    assert result.mean_round_s == pytest.approx(max(100.0 + replay_s, comm_s), rel=1e-6)
    # a measured run on shared cores whose steps already held the replays' share: not added again
    measured = simulate(replace(config, replays_in_compute=True))
    assert measured.mean_round_s == pytest.approx(max(100.0, comm_s), rel=1e-6)
    # a round with a short compute phase lasts as long as its communication, replay included
    slow = simulate(replace(config, round_compute_s=10.0))
    assert slow.mean_round_s < simulate(replace(config, round_compute_s=10.0, overlap=False)).mean_round_s


def test_audit_bytes_are_the_wire_formats_times_the_audits():
    config, _, _ = _homogeneous(overlap=False, audit_fraction=1.0)
    result = simulate(config)
    wire, n = config.costs.wire, config.peers
    one_audit = config.params * (wire.slice_bytes_per_param + 2 * 8.0 + 4.0) + (n + 3) * wire.request_bytes
    assert wire.audit_bytes(config.params, n, 2) == pytest.approx(one_audit)
    # the trail's first segment starts where the round did: its stored weight change (2 bytes a parameter)
    # is all zeros and packs away; 2 of the 10 segments drawn include it with probability 0.2
    assert config.trail_segments() == 10
    first_saved = 0.2 * 2.0 * config.params
    assert wire.audit_bytes(config.params, n, 2, trail_segments=10) == pytest.approx(one_audit - first_saved)
    assert wire.audit_bytes(config.params, n, 2, trail_segments=2) == pytest.approx(one_audit - 2.0 * config.params)
    assert result.audits == n * config.rounds
    assert result.audit_bytes_per_peer_round == pytest.approx(one_audit - first_saved, rel=1e-9)  # n audits, n peers
    # replays that are not bit-exact (verifiers on other devices) fetch both segments' end states too
    inexact = replace(wire, end_state_share=1.0)
    assert inexact.audit_bytes(config.params, n, 2) == pytest.approx(
        one_audit + 2 * (8.0 * config.params + wire.request_bytes + wire.segment_header_bytes))
    # one segment per audit: 8 bytes per parameter (a stored trail state) and one request fewer
    fewer = simulate(replace(config, segments_per_audit=1))
    assert result.audit_bytes_per_peer_round - fewer.audit_bytes_per_peer_round == pytest.approx(
        8.0 * config.params + wire.request_bytes - first_saved / 2, rel=1e-9
    )
    # an overlapped round's audit also fetches the trainer's delta of the round before, in as many requests
    rebased = wire.audit_bytes(config.params, n, 2, rebased=True)
    assert rebased == pytest.approx(one_audit + config.params * wire.slice_bytes_per_param + n * wire.request_bytes)
    assert simulate(replace(config, overlap=True)).audit_bytes_per_peer_round == pytest.approx(
        rebased - first_saved, rel=1e-9)
    # packed trail replies shrink the trail states and final weights only
    packed = replace(wire, packed_share=0.5)
    assert packed.audit_bytes(config.params, n, 2) == pytest.approx(
        one_audit - 0.5 * config.params * (2 * 8.0 + 4.0), rel=1e-9)
    # a sampled fraction: the coordinator's own plus f of the others, in expectation
    sampled = simulate(replace(config, audit_fraction=0.5, rounds=400))
    assert sampled.audits / 400 == pytest.approx(1 + 0.5 * (n - 1), rel=0.05)


def test_the_verdict_wait_plans_for_replays_and_downloads():
    config, _, _ = _homogeneous(overlap=False, audit_fraction=1.0)
    # 16 peers, all audited: 2 audits per verifier in expectation, each 2 segments of 10 steps of 1 s and a
    # download of 37 bytes per parameter (the planning figure: int8 delta, 2 segments x 2 states x 8, final 4)
    fetch_s = 37 * config.params / 2.5e6
    assert verdict_wait_s(config, config.peers, 2.5e6) == pytest.approx(1e9 + 3 * 2 * (2 * 10 * 1.0 + fetch_s))
    assert verdict_wait_s(replace(config, audit_timeout_s=1.0, overlap=True), 16, 2.5e6) == pytest.approx(
        1.0 + 3 * 2 * (2 * 10 * 2.0 + fetch_s))


def test_late_verdicts_keep_their_contributions_out(monkeypatch):
    """Trainers behind links 400x slower than the typical one: their audits' downloads outlast the wait."""
    monkeypatch.setitem(LINKS, "awful", LinkProfile("awful", 100.0, 20.0, 50.0, slow_mbit=0.05, slow_every=4))
    config, _, _ = _homogeneous(overlap=False, audit_fraction=1.0)
    on_time = simulate(config)
    late = simulate(replace(config, audit_timeout_s=1.0, link_mix={"awful": 1.0}, adaptive=False))
    assert on_time.late_verdicts == 0 and on_time.audits > 0
    # 4 of the 16 peers are slow: audits of their work miss the close every round, and so do the fast
    # peers' audits that drew a slow verifier (its download is as slow); the rest merge
    assert late.audits == 16 * config.rounds
    assert 4 * config.rounds <= late.late_verdicts < late.audits
    assert 0 < late.work_merged_flops <= 12 / 16 * late.work_assigned_flops * 1.001


def test_verifiers_are_never_the_trainer_nor_the_coordinator_and_spread_evenly():
    rng = np.random.default_rng(0)
    n, coordinator = 10, 3
    trainers = np.repeat(np.arange(n), 2000)
    verifiers = draw_verifiers(trainers, coordinator, n, rng)
    assert not np.any(verifiers == trainers)
    assert not np.any((verifiers == coordinator) & (trainers != coordinator))
    counts = np.bincount(verifiers[trainers == 0], minlength=n)
    assert counts[0] == counts[coordinator] == 0
    assert counts[[1, 2, 4, 5, 6, 7, 8, 9]] == pytest.approx(2000 / 8, rel=0.2)
    # the coordinator's own contribution: anyone but the coordinator
    assert set(np.unique(verifiers[trainers == coordinator])) == set(range(n)) - {coordinator}
    assert list(draw_verifiers(np.array([0, 1]), 0, 2, rng)) == [1, 0]  # two peers verify each other


def test_a_verifier_runs_its_audits_one_after_another():
    n = 4
    audited = np.array([True, True, True, False])
    up = down = np.full(n, 1e6)
    replay_flops = np.array([2.0, 4.0, 6.0, 0.0])
    audits = audit_round(
        audited, 3, 1e6, replay_flops, np.ones(n), up, down, 0.0, 0.0, np.random.default_rng(1)
    )
    duration = 1.0 + replay_flops[audits.trainer]  # 1 s download each, replay at 1 FLOP/s
    for verifier in np.unique(audits.verifier):
        mine = audits.verifier == verifier
        assert np.isclose(audits.verdict_s[mine].max(), duration[mine].sum())
    assert audits.busy_s == pytest.approx(max(duration[audits.verifier == v].sum() for v in range(n)))
    assert audits.replay_busy_s <= audits.busy_s


def test_a_verifier_runs_two_audits_at_once_in_its_queue_order():
    """Two lanes per verifier: each audit starts when the earlier of its verifier's lanes frees up."""
    n = 3
    audited = np.array([True, True, True])
    replay_flops = np.array([3.0, 1.0, 5.0])
    for seed in range(6):
        # three peers: the coordinator (2) is kept out of verifying, so most audits fall on the other two
        audits = audit_round(audited, 2, 0.0, replay_flops, np.ones(n), np.ones(n), np.ones(n), 0.0, 0.0,
                             np.random.default_rng(seed), lanes=2)
        for verifier in np.unique(audits.verifier):
            mine = np.flatnonzero(audits.verifier == verifier)
            durations = replay_flops[audits.trainer[mine]]
            finishes = np.sort(audits.verdict_s[mine])
            # with at most two audits per verifier here, both start at once: each ends after its own replay
            assert mine.size <= 2 and np.allclose(finishes, np.sort(durations))
        assert audits.busy_s == pytest.approx(audits.verdict_s.max())
    # audits of 1 s each: a verifier's k-th audit ends at 1 + k // lanes seconds, whatever the queue order
    for lanes in (1, 2, 3):
        audits = audit_round(audited, 2, 0.0, np.ones(n), np.ones(n), np.ones(n), np.ones(n), 0.0, 0.0,
                             np.random.default_rng(lanes), lanes=lanes)
        for verifier in np.unique(audits.verifier):
            finishes = np.sort(audits.verdict_s[audits.verifier == verifier])
            assert list(finishes) == [1.0 + k // lanes for k in range(finishes.size)]
        assert audits.busy_s == (2.0 if lanes == 1 else 1.0)  # one verifier always holds two of the three
    with pytest.raises(SimError):
        audit_round(audited, 2, 0.0, np.ones(n), np.ones(n), np.ones(n), np.ones(n), 0.0, 0.0,
                    np.random.default_rng(0), lanes=0)


def test_wire_sizes_match_the_real_serializers():
    from gpunite.model import ModelConfig

    def config(width: int) -> ModelConfig:
        return ModelConfig(
            vocab_size=128,
            hidden_size=width,
            n_layers=1,
            n_heads=2,
            n_kv_heads=2,
            intermediate_size=2 * width,
            max_seq_len=32,
            tie_embeddings=True,
        )

    (small, small_real), (large, large_real) = measure_wire_sizes(config(32)), measure_wire_sizes(config(64))
    params = large_real["params"] - small_real["params"]
    # the per-parameter parts are the dtypes: int8 + a scale per chunk; a trail state's fp16 weight change, bf16
    # and fp32 moments; the final weights in fp32
    assert large_real["segment"] - small_real["segment"] == pytest.approx(8.0 * params, rel=1e-3)
    assert large_real["final"] - small_real["final"] == pytest.approx(4.0 * params, rel=1e-3)
    assert large_real["slice"] - small_real["slice"] == pytest.approx(
        small.slice_bytes_per_param * params, rel=1e-2
    )
    # and the fixed parts make the formula exact for the measured model
    assert large_real["segment"] == pytest.approx(
        8.0 * large_real["params"] + large.segment_header_bytes, abs=1
    )
    assert 200 < large.request_bytes < 1000  # two frame prefixes and headers, and a safetensors header
    # trained trail states pack (their exponents spread little), though not as much as constant tensors would
    assert 0.5 < large.packed_share < 0.97
    assert large.packed_share == pytest.approx(large_real["packed"] / (large_real["segment"] + large_real["final"]))


def test_useful_tflops_is_peak_times_mfu_times_utilization():
    config, _, _ = _homogeneous(overlap=False)
    result = simulate(config)
    expected = config.peers * GPUS["a100"].peak_tflops * config.mfu * result.compute_utilization
    assert result.useful_tflops == pytest.approx(expected, rel=1e-6)


def test_time_to_detect_a_cheater_is_geometric():
    config = SimConfig(
        peers=2000,
        rounds=40,
        params=1_000_000,
        round_compute_s=60.0,
        cheater_fraction=0.1,
        audit_fraction=0.25,
        detect_probability=1.0,
        link_mix={"datacenter": 1.0},
    )
    result = simulate(config)
    assert result.cheaters_caught >= 0.95 * result.cheaters > 100
    assert result.detect_rounds_expected == pytest.approx(4.0)
    assert result.detect_rounds_mean == pytest.approx(4.0, rel=0.2)
    # without sampled audits only a cheating coordinator's own contribution is audited (always)
    unsampled = simulate(replace(config, audit_fraction=0.0))
    assert unsampled.cheaters_caught < 0.05 * unsampled.cheaters


def test_adaptive_links_keep_one_slow_peer_from_stalling_the_exchange():
    config = SimConfig(peers=8, link_mix={"bad": 1.0}, params=20_000_000, audit_fraction=0.0, overlap=False)
    bad = LINKS["bad"]
    up = np.array([bad.for_peer(i)[1] for i in range(8)]) * 1e6 / 8
    down = np.array([bad.for_peer(i)[0] for i in range(8)]) * 1e6 / 8
    everyone = np.ones(8, dtype=bool)
    param_bytes = config.params * config.costs.wire.slice_bytes_per_param
    group = np.zeros(8, dtype=np.int64)
    costs = replace(config.costs, dht_reads=0.0)  # the reads' round trips are the same either way
    blocking = exchange_round(param_bytes, everyone, everyone, up, down, group, costs, 0.3, False)
    # what the round does with `adaptive`: the 1 Mbit peer (index 7) neither owns a slice nor contributes
    fast = everyone.copy()
    fast[7] = False
    adaptive = exchange_round(param_bytes, fast, fast, up, down, group, costs, 0.3, True)
    assert blocking.seconds > 4 * adaptive.seconds
    # it still fetches the 7 merged slices: only their requests' framing goes up its link
    assert adaptive.sent[7] == pytest.approx(7 * config.costs.wire.request_bytes / 2)
    assert adaptive.received[7] == pytest.approx(param_bytes + 7 * config.costs.wire.request_bytes / 2)
    result = simulate(replace(config, rounds=3))
    assert result.mean_contributors == 7  # the 1 Mbit peer skips contributing


def test_churn_with_few_peers_stalls_and_no_churn_does_not():
    config = SimConfig(
        peers=3,
        params=1_000_000,
        rounds=30,
        round_compute_s=600.0,
        session_hours=0.5,
        offline_hours=2.0,
        link_mix={"datacenter": 1.0},
        audit_fraction=0.0,
    )
    churned = simulate(config)
    assert churned.stalled_seconds > 0 and churned.availability < 0.9
    steady = simulate(replace(config, session_hours=None))
    assert steady.stalled_seconds == 0 and steady.availability == 1.0


def test_hundred_thousand_peers_completes():
    result = simulate(
        SimConfig(peers=100_000, rounds=3, session_hours=4.0, group_size=256, cheater_fraction=0.01)
    )
    assert result.rounds_attempted == 3 and result.mean_contributors > 10_000


WIRE = WireSizes(request_bytes=300.0, segment_header_bytes=4000.0, final_header_bytes=700.0)


def _measured_by_simulation(
    testbed: str, peers: int, compute_s: float, costs: ProtocolCosts
) -> SwarmMeasurement:
    """What measure_swarm would report for a swarm that behaves exactly like the simulator with `costs`."""
    from gpunite.sim.calibration import audit_transfer_s

    shell = SwarmMeasurement(
        testbed, peers, 5, 300_000, 0.0, compute_s, 0.0, 0.0, 0.0, 4, False, float(peers), 0.0, 1.0, WIRE,
        host_cores=2,
    )
    run = simulate(_config_for(shell, replace(costs, wire=WIRE)))
    # every contribution is audited (the calibration manifest's setting); replay covers all 4 steps
    audit_s = audit_transfer_s(shell) + costs.audit_compute_scale * compute_s
    return replace(
        shell,
        round_s=run.mean_round_s,
        bytes_sent_per_peer_round=run.bytes_sent_per_peer_round,
        bytes_received_per_peer_round=run.bytes_received_per_peer_round,
        audit_s=audit_s,
        merged_fraction=run.compute_utilization * run.mean_round_s / compute_s,
    )


def test_calibration_recovers_the_costs_it_was_measured_with_and_predicts_another_run():
    truth = ProtocolCosts(audit_compute_scale=0.4, round_overhead_s=2.0, dht_reads=0.0)
    loopback = _measured_by_simulation("loopback", 4, 10.0, truth)
    # twice the peers on the same 2 cores: the protocol's CPU work takes twice as long (the inner steps,
    # at a lower priority, slow down more)
    testbed = _measured_by_simulation("loopback", 8, 30.0, replace(truth, round_overhead_s=4.0))
    assert testbed.round_s > 2 * loopback.round_s
    calibration = calibrate([loopback])
    assert calibration.costs.audit_compute_scale == pytest.approx(0.4, rel=1e-6)
    assert calibration.costs.round_overhead_s == pytest.approx(2.0, rel=1e-6)
    held_out = compare(testbed, calibration)
    assert held_out["held_out"] and held_out["max_abs_error"] < 1e-6
    assert not compare(loopback, calibration)["held_out"]
    # bytes are not calibrated: they follow from the wire sizes, whatever the costs measured
    other = compare(testbed, calibrate([replace(loopback, audit_s=2 * loopback.audit_s)]))
    assert [r["simulated"] for r in other["rows"][2:]] == [r["simulated"] for r in held_out["rows"][2:]]


def test_calibration_on_the_test_bed_separates_cpu_overhead_from_round_trips():
    """Loopback shows only the CPU part of the overhead; a test-bed run adds the round trips (50 ms each way
    on `home`): from both, calibrate finds each part and predicts a larger test-bed swarm exactly."""
    truth = ProtocolCosts(audit_compute_scale=0.4, round_overhead_s=2.0, dht_reads=80.0)
    loopback = _measured_by_simulation("loopback", 4, 10.0, truth)
    home4 = _measured_by_simulation("netbed:home", 4, 20.0, truth)
    # 8 peers on 2 cores: twice the CPU overhead, and each DHT read visits 7 other nodes (1.75 round trips)
    home8 = _measured_by_simulation("netbed:home", 8, 30.0, replace(truth, round_overhead_s=4.0))
    calibration = calibrate([loopback, home4])
    assert calibration.costs.round_overhead_s == pytest.approx(2.0, rel=1e-6)
    assert calibration.costs.dht_reads == pytest.approx(80.0, rel=1e-6)
    assert compare(home8, calibration)["max_abs_error"] < 1e-6
    # loopback alone cannot see the round trips: it keeps the default count and mispredicts the test bed
    blind = calibrate([loopback])
    assert blind.costs.dht_reads == ProtocolCosts().dht_reads
    assert compare(home8, blind)["max_abs_error"] > 0.05


def test_overhead_fit_never_goes_negative():
    # round trips that seem to shrink the overhead are not believed: all of it is CPU
    assert fit_overhead([4.0, 1.0], [2.0, 2.0], [0.0, 0.2], 6.0) == (pytest.approx(1.25), 0.0)
    # a CPU part below 0 is clamped: the round trips carry it all (least squares through the origin)
    per_compute, per_rtt = fit_overhead([0.0, 10.0], [1.0, 1.0], [0.05, 0.1], 6.0)
    assert per_compute == 0.0 and per_rtt == pytest.approx(80.0)
    # runs that share one x cannot tell the parts apart: the default round trips, the rest is CPU
    assert fit_overhead([3.0, 6.0], [1.0, 2.0], [0.1, 0.2], 10.0) == (pytest.approx(2.0), 10.0)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(SimError, match="unknown GPU 'gtx9999'"):
        parse_mix("rtx3090:0.5,gtx9999:0.5", GPUS, "GPU")
    with pytest.raises(SimError, match="not a number"):
        parse_mix("rtx3090:half", GPUS, "GPU")
    with pytest.raises(SimError, match="--peers"):
        simulate(SimConfig(peers=0))
    with pytest.raises(SimError, match="unknown model preset"):
        simulate(SimConfig(model="42b"))


def test_cli_prints_json_and_one_line_errors():
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpunite",
            "sim",
            "--peers",
            "50",
            "--rounds",
            "3",
            "--churn",
            "2",
            "--gpu-mix",
            "rtx3090:0.5,rtx4090:0.3,a100:0.2",
            "--link",
            "home",
            "--overlap",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert result["peers"] == 50 and result["rounds_attempted"] == 3 and result["useful_tflops"] > 0
    # --overlap answers what it changes: the same swarm without it comes alongside, simulated on its own (which
    # is faster depends on the replay added to each round's compute against the exchange hidden behind it)
    without = result["without_overlap"]
    assert without["peers"] == 50 and 0 < without["mean_round_s"] != result["mean_round_s"]
    bad = subprocess.run(
        [sys.executable, "-m", "gpunite", "sim", "--gpu-mix", "abacus:1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2 and "unknown GPU 'abacus'" in bad.stderr and "Traceback" not in bad.stderr


def test_peer_log_figures_between_first_and_last_merge():
    lines = []
    for round_index, (stamp, sent, received, merged) in enumerate(
        [
            ("23:59:40", 9_000_000, 9_500_000, 2),
            ("23:59:58", 10_000_000, 10_600_000, 2),
            ("00:00:16", 11_000_000, 11_700_000, 1),
        ]
    ):
        lines.append(
            f"{stamp} INFO [join] gpunite.swarm.peer: round {round_index}: trained 4 steps in 12.5 s, loss 5"
        )
        lines.append(
            f"{stamp} INFO [join] gpunite.swarm.audits: audited 5102ed55d0a2's round {round_index} contribution "
            f"(segments [0, 1]) in {round_index + 1}.5 s (118.0 MB of trail states in 0.{round_index + 1} s): "
            "accept, segments [0, 1] replayed within 0"
        )
        lines.append(
            f"{stamp} INFO [join] gpunite.swarm.peer: round {round_index} merged {merged} contributions "
            f"(8192 tokens): new weights abc; sent {sent} B, received {received} B so far"
        )
    log = parse_peer_log("\n".join(lines))
    assert [m[0] for m in log.merges] == [86380.0, 86398.0, 86416.0] and log.trained[2] == 12.5
    assert log.audits == [(0, 1.5), (1, 2.5), (2, 3.5)] and log.merged == {0: 2, 1: 2, 2: 1}
    measured = _figures(["\n".join(lines)] * 2, "loopback", 2, 1000, 4, WIRE, True)
    assert measured.round_s == 18.0 and measured.compute_s == 12.5 and measured.rounds == 2
    assert (
        measured.bytes_sent_per_peer_round == 1_000_000
        and measured.bytes_received_per_peer_round == 1_100_000
    )
    # rounds 1 and 2 are in the window: two peers' audits of them, 2 per round, of 3 s on average
    assert measured.audits_per_round == 2.0 and measured.audit_s == 3.0
    assert measured.merged_fraction == 0.75 and measured.utilization == pytest.approx(12.5 / 18.0 * 0.75)


def test_a_dht_read_takes_more_round_trips_in_a_larger_swarm():
    # every other node of the beam is visited, 4 at a time (pipelined: (n - 1) / 4 round trips, at least one);
    # past one bucket (20) a lookup narrows in on the key first
    assert [dht_hops(n) for n in (1, 2, 5, 6, 9, 12, 16, 20)] == [1, 1, 1, 1.25, 2, 2.75, 3.75, 4.75]
    assert dht_hops(80) == 4.75 + 1 and dht_hops(1_000_000) == 4.75 + 8
    # the simulated round grows by those round trips when the links are slow to answer
    slow = SimConfig(peers=12, link_mix={"home": 1.0}, model="tiny", rounds=5, round_compute_s=10.0,
                     speed_jitter=0.0, audit_fraction=0.0, overlap=False, seed=0)
    fast = replace(slow, costs=replace(slow.costs, dht_reads=0.0))
    home = LINKS["home"]
    assert simulate(slow).mean_round_s - simulate(fast).mean_round_s == pytest.approx(
        slow.costs.dht_reads * 2.75 * 2 * home.one_way_ms / 1e3, rel=1e-6)


def test_measurement_files_round_trip_older_ones_load_and_bad_ones_fail_in_one_line(tmp_path):
    """A saved run loads back as it was; a file from before a field existed takes that field's default (the
    trail interval of older runs was 2); a file with an impossible value is refused with CalibrationError."""
    import json

    from gpunite.sim.calibration import CalibrationError, load_measurement, save_measurement

    measured = _measured_by_simulation("netbed:home", 4, 20.0, ProtocolCosts())
    path = tmp_path / "run.json"
    save_measurement(path, replace(measured, trail_interval=4))
    assert load_measurement(path) == replace(measured, trail_interval=4)
    data = json.loads(path.read_text())
    for optional in ("trail_interval", "host_cores", "audit_fraction"):
        del data[optional]
    path.write_text(json.dumps(data))
    older = load_measurement(path)
    assert older.trail_interval == 2 and older.host_cores == 0 and older.audit_fraction == 1.0
    path.write_text(json.dumps({**data, "trail_interval": 0}))
    with pytest.raises(CalibrationError, match="trail_interval must be >= 1"):
        load_measurement(path)
    del data["inner_steps"]  # a field without a default is still required
    path.write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match="inner_steps"):
        load_measurement(path)
