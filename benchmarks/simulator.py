"""Benchmark: the simulator against the real swarm, its speed at a million peers, and the seed's goal.

1. Calibrate: a real loopback swarm (tiny model, `gpunite run start` + `gpunite join`, their logs) gives the
   bytes per parameter on the wire and the fixed per-round overhead (gpunite.sim.calibration.calibrate);
   on the shared CPU that overhead is scaled with each run's measured compute time per round.
2. Baseline: a real swarm on the WAN test bed (8 peers, `home` profile: 100/20 Mbit, 50 ms one way) measures
   round time, compute utilization and bytes per peer per round. When the bed cannot run here (no root or no
   namespaces) a second loopback swarm is the baseline instead, and `testbed` says so.
3. The simulator predicts the baseline's figures from the calibration alone (plus the baseline's measured
   compute per round, an input): `sim_vs_testbed_error` is the largest relative error (target <= 0.10).
4. The seed's goal, with the calibrated costs: the fewest peers of GPU_MIX on home links with churn that reach
   1000 TFLOPS of verified, merged work at >= 95% availability, and what 1,000,000 such peers reach (timed).

Prints one JSON line. `--loopback FILE --testbed FILE` reuse saved measurements
(from `gpunite netbed run --save`).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

GPU_MIX = {"rtx3090": 0.5, "rtx4090": 0.3, "a100": 0.2}
GOAL_TFLOPS = 1000.0
GOAL_AVAILABILITY = 0.95


def goal_config(costs, peers: int, rounds: int):
    from gpunite.sim.model import SimConfig

    # Volunteers: 8 h online sessions and 8 h gaps (half the peers online), home links, the 1b preset,
    # one-hour rounds (H inner steps sized to an hour) that close at 1.1 h at the latest, the exchange
    # overlapped with the next round, a quarter of the contributions audited, 1% cheaters; groups of 256
    # aggregate first, then slice owners reduce across groups.
    return SimConfig(
        peers=peers,
        gpu_mix=GPU_MIX,
        link_mix={"home": 1.0},
        model="1b",
        rounds=rounds,
        round_compute_s=3600.0,
        deadline_slack=0.1,
        session_hours=8.0,
        offline_hours=8.0,
        overlap=True,
        adaptive=True,
        group_size=256,
        audit_fraction=0.25,
        cheater_fraction=0.01,
        costs=costs,
        seed=0,
    )


def meets_goal(result) -> bool:
    return result.useful_tflops >= GOAL_TFLOPS and result.availability >= GOAL_AVAILABILITY


def peers_for_goal(costs, rounds: int) -> tuple[int, dict]:
    """Smallest peer count meeting the goal: double until it is met, then bisect."""
    from gpunite.sim.model import simulate

    low, high = 1, 2
    while not meets_goal(result := simulate(goal_config(costs, high, rounds))):
        low, high = high, high * 2
    best = result
    while high - low > 1:
        middle = (low + high) // 2
        result = simulate(goal_config(costs, middle, rounds))
        if meets_goal(result):
            high, best = middle, result
        else:
            low = middle
    return high, best.to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=8, help="Test-bed peers (8-16).")
    parser.add_argument(
        "--calibration-peers", type=int, help="Loopback peers to calibrate with (default: --peers)."
    )
    parser.add_argument("--rounds", type=int, default=4, help="Measured rounds per real run.")
    parser.add_argument("--profile", default="home")
    parser.add_argument("--loopback", type=Path, help="A saved loopback measurement (skips that real run).")
    parser.add_argument("--testbed", type=Path, help="A saved test-bed measurement (skips that real run).")
    parser.add_argument("--save-dir", type=Path, help="Save the measurements made here.")
    parser.add_argument(
        "--also", type=Path, nargs="*", default=[], help="More saved test-bed runs to compare."
    )
    parser.add_argument("--sim-rounds", type=int, default=20)
    args = parser.parse_args()

    from gpunite.sim.calibration import calibrate, compare, load_measurement, measure_swarm, save_measurement
    from gpunite.sim.model import simulate
    from gpunite.sim.netbed import NetbedError, check_requirements

    def measured(saved: Path | None, peers: int, profile: str | None, name: str):
        if saved is not None:
            return load_measurement(saved)
        started = time.perf_counter()
        result = measure_swarm(peers=peers, profile=profile, rounds=args.rounds)
        print(
            f"{name}: {peers} real peers measured in {time.perf_counter() - started:.0f} s", file=sys.stderr
        )
        if args.save_dir is not None:
            args.save_dir.mkdir(parents=True, exist_ok=True)
            save_measurement(args.save_dir / f"{name}.json", result)
        return result

    loopback = measured(args.loopback, args.calibration_peers or args.peers, None, "loopback")
    calibration = calibrate(loopback)
    costs = calibration.costs
    bed_note = None
    if args.testbed is None:
        try:
            check_requirements()
            profile: str | None = args.profile
        except NetbedError as exc:
            profile, bed_note = None, f"test bed unavailable ({exc}); baseline is a real loopback swarm"
    baseline = measured(args.testbed, args.peers, profile if args.testbed is None else None, "testbed")
    comparison = compare(baseline, calibration)
    others = [compare(load_measurement(path), calibration) for path in args.also]

    started = time.perf_counter()
    million = simulate(goal_config(costs, 1_000_000, args.sim_rounds))
    seconds_for_1m = time.perf_counter() - started
    peers_needed, at_goal = peers_for_goal(costs, args.sim_rounds)

    error = comparison["max_abs_error"]
    print(
        __import__("json").dumps(
            {
                "name": "simulator",
                "value": round(error, 4),
                "unit": "max relative error, simulated vs measured",
                "sim_vs_testbed_error": round(error, 4),
                "testbed": f"{baseline.testbed}, {baseline.peers} peers"
                + (f"; {bed_note}" if bed_note else ""),
                "side_by_side": comparison["rows"],
                "other_testbeds": [
                    {
                        "testbed": f"{o['testbed']}, {o['peers']} peers",
                        "max_abs_error": o["max_abs_error"],
                        "side_by_side": o["rows"],
                    }
                    for o in others
                ],
                "baseline_measured": baseline.to_dict(),
                "calibration_measured": loopback.to_dict(),
                "calibrated_costs": asdict(costs),
                "seconds_for_1m_peers": round(seconds_for_1m, 2),
                "tflops_at_1m_peers": round(million.useful_tflops, 1),
                "at_1m_peers": {
                    k: million.to_dict()[k]
                    for k in (
                        "compute_utilization",
                        "availability",
                        "mean_online_peers",
                        "mean_round_s",
                        "bytes_sent_per_peer_round",
                        "bytes_received_per_peer_round",
                        "rounds_completed_ratio",
                        "detect_rounds_mean",
                    )
                },
                "peers_for_1000_tflops": peers_needed,
                "at_1000_tflops": {
                    k: at_goal[k]
                    for k in (
                        "useful_tflops",
                        "availability",
                        "compute_utilization",
                        "mean_online_peers",
                        "mean_round_s",
                    )
                },
                "goal_assumptions": {
                    "gpu_mix": GPU_MIX,
                    "link": "home (100/20 Mbit, 50 ms)",
                    "model": "1b",
                    "round_compute_s": 3600,
                    "round_deadline_s": 3960,
                    "mfu": 0.4,
                    "session_hours": 8,
                    "offline_hours": 8,
                    "overlap": True,
                    "group_size": 256,
                    "audit_fraction": 0.25,
                    "cheater_fraction": 0.01,
                    "sim_rounds": args.sim_rounds,
                    "tflops": "model FLOPs of merged honest work per second (peak x mfu x utilization)",
                },
            },
            default=float,
        )
    )


if __name__ == "__main__":
    main()
