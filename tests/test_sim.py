"""The simulator: repeatable, conserves bytes and work, matches closed forms, scales to 1e5 peers quickly."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from gpunite.sim.calibration import (
    SwarmMeasurement,
    _config_for,
    _figures,
    calibrate,
    compare,
    parse_peer_log,
)
from gpunite.sim.model import GPUS, LINKS, ProtocolCosts, SimConfig, SimError, parse_mix, simulate

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


def _homogeneous(overlap: bool, n: int = 16) -> tuple[SimConfig, float, float]:
    config = SimConfig(
        peers=n,
        gpu_mix={"a100": 1.0},
        link_mix={"home": 1.0},
        params=20_000_000,
        rounds=4,
        round_compute_s=100.0,
        speed_jitter=0.0,
        audit_fraction=0.0,
        overlap=overlap,
    )
    costs, home = config.costs, LINKS["home"]
    param_bytes = config.params * costs.exchange_bytes_per_param
    up, down = home.up_mbit * 1e6 / 8, home.down_mbit * 1e6 / 8
    # scatter and gather each move (n - 1)/n of the vector through the slower direction of every peer's link
    transfer_s = 2 * param_bytes * (n - 1) / n / min(up, down)
    messages = 4 * n  # send n slices, receive n, serve n, fetch n
    comm_s = (
        costs.round_overhead_s
        + transfer_s
        + costs.round_overhead_rtts * 2 * home.one_way_ms / 1e3
        + messages * costs.message_overhead_s
    )
    return config, comm_s, 2 * param_bytes * (n - 1) / n


def test_closed_form_without_overlap_compute_over_compute_plus_exchange():
    config, comm_s, bytes_per_round = _homogeneous(overlap=False)
    result = simulate(config)
    assert result.compute_utilization == pytest.approx(100.0 / (100.0 + comm_s), rel=1e-6)
    assert result.mean_round_s == pytest.approx(100.0 + comm_s, rel=1e-6)
    assert result.bytes_sent_per_peer_round == pytest.approx(bytes_per_round, rel=1e-9)
    assert result.availability == 1.0 and result.rounds_completed_ratio == 1.0


def test_closed_form_with_overlap_compute_over_max():
    config, comm_s, _ = _homogeneous(overlap=True)
    result = simulate(config)
    assert result.compute_utilization == pytest.approx(100.0 / max(100.0, comm_s), rel=1e-6)
    slow = simulate(replace(config, round_compute_s=comm_s / 2))
    assert slow.compute_utilization == pytest.approx(0.5, rel=1e-6)


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
    assert simulate(replace(config, audit_fraction=0.0)).cheaters_caught == 0


def test_adaptive_links_keep_one_slow_peer_from_stalling_the_round():
    config = SimConfig(
        peers=8,
        link_mix={"bad": 1.0},
        params=20_000_000,
        rounds=5,
        round_compute_s=100.0,
        audit_fraction=0.0,
        overlap=False,
    )
    adaptive, blocking = simulate(config), simulate(replace(config, adaptive=False))
    assert blocking.mean_round_s > 2 * adaptive.mean_round_s
    assert adaptive.mean_contributors == 7  # the 1 Mbit peer skips
    assert adaptive.useful_tflops > blocking.useful_tflops


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


def _measured_by_simulation(
    testbed: str, peers: int, compute_s: float, costs: ProtocolCosts
) -> SwarmMeasurement:
    """What measure_swarm would report for a swarm that behaves exactly like the simulator with `costs`."""
    shell = SwarmMeasurement(testbed, peers, 5, 3_000_000, 0.0, compute_s, 0.0, 0.0, 0.0, 24.0)
    run = simulate(_config_for(shell, costs))
    return replace(
        shell,
        round_s=run.mean_round_s,
        bytes_sent_per_peer_round=run.bytes_sent_per_peer_round,
        bytes_received_per_peer_round=run.bytes_received_per_peer_round,
    )


def test_calibration_recovers_the_costs_it_was_measured_with():
    truth = ProtocolCosts(exchange_bytes_per_param=1.5, round_overhead_s=2.0, background_Bps=5000.0)
    loopback = _measured_by_simulation("loopback", 8, 10.0, truth)
    # on the test bed the CPU is twice as busy: inner steps and protocol overhead both take twice as long
    testbed = _measured_by_simulation("netbed:home", 8, 20.0, replace(truth, round_overhead_s=4.0))
    assert testbed.round_s > 2 * loopback.round_s
    calibration = calibrate(loopback, testbed)
    assert calibration.costs.exchange_bytes_per_param == pytest.approx(1.5, rel=1e-6)
    assert calibration.costs.background_Bps == pytest.approx(5000.0, rel=1e-6)
    assert calibration.costs.round_overhead_s == pytest.approx(2.0, rel=1e-6)
    assert compare(testbed, calibration)["max_abs_error"] < 1e-6
    # from the loopback run alone the background traffic is folded into the bytes per parameter
    alone = calibrate(loopback)
    assert alone.costs.background_Bps == 0 and alone.costs.exchange_bytes_per_param > 1.5


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
    for round_index, (stamp, sent, received) in enumerate(
        [
            ("23:59:40", 9_000_000, 9_500_000),
            ("23:59:58", 10_000_000, 10_600_000),
            ("00:00:16", 11_000_000, 11_700_000),
        ]
    ):
        lines.append(
            f"{stamp} INFO [join] gpunite.swarm.peer: round {round_index}: trained 4 steps in 12.5 s, loss 5"
        )
        lines.append(
            f"{stamp} INFO [join] gpunite.swarm.peer: round {round_index} merged 8 contributions (8192 tokens): "
            f"new weights abc; sent {sent} B, received {received} B so far"
        )
    merges, trained = parse_peer_log("\n".join(lines))
    assert [m[0] for m in merges] == [86380.0, 86398.0, 86416.0] and trained[2] == 12.5
    measured = _figures(["\n".join(lines)] * 2, "loopback", 2, 1000, 24.0)
    assert measured.round_s == 18.0 and measured.compute_s == 12.5 and measured.rounds == 2
    assert (
        measured.bytes_sent_per_peer_round == 1_000_000
        and measured.bytes_received_per_peer_round == 1_100_000
    )
