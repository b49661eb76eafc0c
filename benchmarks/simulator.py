"""Benchmark: the simulator against real swarms it was not calibrated on, its speed at a million peers, and the
seed's goal.

1. Calibration set: real swarms (by default two swarms of 4 peers on the WAN test bed, one on `datacenter`
   links (1 ms) and one on `home` links (50 ms), or one on loopback where the test bed cannot run:
   `gpunite run start` + `gpunite join`, a 1-layer 64-wide model, every contribution audited) give the
   costs a formula cannot know: the audit's CPU time per replayed step, and the per-round protocol overhead,
   a CPU part that grows with the peers sharing the machine's cores plus sequential DHT reads whose round
   trips grow with the RTT and the swarm (the two latencies tell them apart:
   gpunite.sim.calibration.calibrate).
   Loopback runs are not mixed with test-bed ones by default: on the test bed the delaying relays and
   network namespaces add CPU work of their own, so a loopback run's overhead per inner-step second is
   several times lower. Bytes are not calibrated at all: they follow from the wire formats
   (gpunite.sim.traffic), with fixed parts measured by serializing the run's model.
2. Held-out set: real swarms on the WAN test bed with other peer counts (by default 8 and 12 peers, `home`:
   100/20 Mbit, 50 ms one way). The simulator predicts their round time, compute
   utilization (inner-step time of merged work / wall time) and bytes per peer per round from the
   calibration plus each run's measured inner-step time (an input). `sim_vs_testbed_error` is the largest
   relative error over every held-out run and figure (target <= 0.10); `calibration_error` is the same on
   the calibration set (in-sample, for comparison).
3. The seed's goal: the fewest peers of GPU_MIX on home links with churn whose verified, merged work reaches
   1000 TFLOPS at >= 95% availability, and what 1,000,000 such peers reach (timed), for the stated protocol
   settings; and the same question with the protocol's default audit settings.

Prints one JSON line. `--calibration FILE... --held-out FILE...` reuse saved measurements (from
`gpunite netbed run --save` or `--save-dir`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

GPU_MIX = {"rtx3090": 0.5, "rtx4090": 0.3, "a100": 0.2}
GOAL_TFLOPS = 1000.0
GOAL_AVAILABILITY = 0.95
MAX_PEERS = 1_000_000


def goal_config(costs, peers: int, rounds: int, **protocol):
    from gpunite.sim.model import SimConfig

    # Volunteers: 8 h online sessions and 8 h gaps (half the peers online), home links, the 125m preset,
    # one-hour rounds that close at 1.1 h at the latest, the exchange and audits overlapped with the next
    # round, a quarter of the contributions audited on one trail segment each, a verdict wait as long as
    # the round (a segment of 125m is 3 GB: 20 min on a 20 Mbit uplink), 1% cheaters; groups of 256
    # aggregate first, then slice owners reduce across groups.
    settings = {
        "peers": peers,
        "gpu_mix": GPU_MIX,
        "link_mix": {"home": 1.0},
        "model": "125m",
        "rounds": rounds,
        "round_compute_s": 3600.0,
        "deadline_slack": 0.1,
        "session_hours": 8.0,
        "offline_hours": 8.0,
        "overlap": True,
        "adaptive": True,
        "group_size": 256,
        "audit_fraction": 0.25,
        "segments_per_audit": 1,
        "audit_timeout_s": 3960.0,
        "cheater_fraction": 0.01,
        "costs": costs,
        "seed": 0,
    }
    return SimConfig(**{**settings, **protocol})


# What the manifest and PeerConfig default to today (proof.audit_fraction, proof.segments_per_audit,
# PeerConfig.audit_timeout_s) and the 1b preset the earlier answer used.
PROTOCOL_DEFAULTS = {"model": "1b", "audit_fraction": 0.85, "segments_per_audit": 2, "audit_timeout_s": 30.0}


def meets_goal(result) -> bool:
    return result.useful_tflops >= GOAL_TFLOPS and result.availability >= GOAL_AVAILABILITY


def peers_for_goal(costs, rounds: int, **protocol) -> tuple[int | None, dict]:
    """Smallest peer count meeting the goal: double until it is met (None past MAX_PEERS), then bisect."""
    from gpunite.sim.model import simulate

    low, high = 1, 2
    while not meets_goal(result := simulate(goal_config(costs, high, rounds, **protocol))):
        if high >= MAX_PEERS:
            return None, result.to_dict()
        low, high = high, min(high * 2, MAX_PEERS)
    best = result
    while high - low > 1:
        middle = (low + high) // 2
        result = simulate(goal_config(costs, middle, rounds, **protocol))
        if meets_goal(result):
            high, best = middle, result
        else:
            low = middle
    return high, best.to_dict()


GOAL_FIELDS = (
    "useful_tflops",
    "availability",
    "compute_utilization",
    "mean_online_peers",
    "mean_round_s",
    "late_verdicts",
    "audits",
)
MILLION_FIELDS = (
    "compute_utilization",
    "availability",
    "mean_online_peers",
    "mean_round_s",
    "bytes_sent_per_peer_round",
    "audit_bytes_per_peer_round",
    "exchange_bytes_per_peer_round",
    "rounds_completed_ratio",
    "detect_rounds_mean",
    "late_verdicts",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=Path, nargs="*", default=[], help="Saved calibration runs.")
    parser.add_argument("--held-out", type=Path, nargs="*", default=[], help="Saved held-out runs.")
    parser.add_argument("--calibration-peers", type=int, default=4,
                        help="Peers of each calibration run (on the test bed, else one run on loopback).")
    parser.add_argument("--calibration-profiles", nargs="+", default=["datacenter", "home"],
                        help="Link profiles of the calibration runs (one run each; latencies should differ).")
    parser.add_argument("--peers", type=int, nargs="+", default=[8, 12],
                        help="Test-bed peers of each held-out run (2-16; several values: one run each).")
    parser.add_argument("--profile", default="home", help="Link profile of the test-bed runs.")
    parser.add_argument("--rounds", type=int, default=4, help="Measured rounds per real run.")
    parser.add_argument("--save-dir", type=Path, help="Save the measurements made here.")
    parser.add_argument("--sim-rounds", type=int, default=20)
    args = parser.parse_args()

    from gpunite.sim.calibration import calibrate, compare, load_measurement, measure_swarm, save_measurement
    from gpunite.sim.model import simulate
    from gpunite.sim.netbed import NetbedError, check_requirements

    def measured(peers: int, profile: str | None, name: str):
        started = time.perf_counter()
        result = measure_swarm(peers=peers, profile=profile, rounds=args.rounds)
        print(
            f"{name}: {peers} real peers measured in {time.perf_counter() - started:.0f} s", file=sys.stderr
        )
        if args.save_dir is not None:
            args.save_dir.mkdir(parents=True, exist_ok=True)
            save_measurement(args.save_dir / f"{name}.json", result)
        return result

    calibration_runs = [load_measurement(path) for path in args.calibration]
    held_out_runs = [load_measurement(path) for path in args.held_out]
    bed_note = None
    if not calibration_runs or not held_out_runs:  # some runs are measured here
        try:
            check_requirements()
        except NetbedError as exc:
            bed_note = f"test bed unavailable ({exc}); the runs measured here are loopback swarms"

    def measured_here(peers: int, profile: str):
        """A run on the test bed's `profile`, or on loopback where the bed cannot run."""
        on_bed = None if bed_note else profile
        return measured(peers, on_bed, f"{on_bed or 'loopback'}{peers}")

    if not calibration_runs:
        profiles = args.calibration_profiles[:1] if bed_note else args.calibration_profiles
        calibration_runs = [measured_here(args.calibration_peers, profile) for profile in profiles]
    if not held_out_runs:
        held_out_runs = [measured_here(peers, args.profile) for peers in args.peers]
    calibration = calibrate(calibration_runs)
    in_sample = [compare(run, calibration) for run in calibration_runs]
    held_out = [compare(run, calibration) for run in held_out_runs]
    held_out_error = max(c["max_abs_error"] for c in held_out)
    costs = calibration.costs

    started = time.perf_counter()
    million = simulate(goal_config(costs, MAX_PEERS, args.sim_rounds))
    seconds_for_1m = time.perf_counter() - started
    peers_needed, at_goal = peers_for_goal(costs, args.sim_rounds)
    peers_needed_defaults, searched = peers_for_goal(costs, args.sim_rounds, **PROTOCOL_DEFAULTS)
    # a search that failed ended with the MAX_PEERS run: reuse it
    million_defaults = (
        searched
        if peers_needed_defaults is None
        else simulate(goal_config(costs, MAX_PEERS, args.sim_rounds, **PROTOCOL_DEFAULTS)).to_dict()
    )

    def side_by_side(comparison: dict) -> dict:
        return {
            "testbed": comparison["label"],
            "max_abs_error": round(comparison["max_abs_error"], 4),
            "rows": comparison["rows"],
            "simulated_bytes_split": comparison["simulated_bytes_split"],
            "simulated_late_verdicts_per_round": comparison["simulated_late_verdicts_per_round"],
        }

    print(
        json.dumps(
            {
                "name": "simulator",
                "value": round(held_out_error, 4),
                "unit": "max relative error, simulated vs measured, on runs the calibration did not see",
                "sim_vs_testbed_error": round(held_out_error, 4),
                "calibration_error": round(max(c["max_abs_error"] for c in in_sample), 4),
                "calibrated_on": list(calibration.runs),
                "held_out": [side_by_side(c) for c in held_out],
                "in_sample": [side_by_side(c) for c in in_sample],
                "testbed_note": bed_note,
                "measured": {
                    "calibration": [run.to_dict() for run in calibration_runs],
                    "held_out": [run.to_dict() for run in held_out_runs],
                },
                "calibrated_costs": asdict(costs),
                "seconds_for_1m_peers": round(seconds_for_1m, 2),
                "tflops_at_1m_peers": round(million.useful_tflops, 1),
                "at_1m_peers": {k: million.to_dict()[k] for k in MILLION_FIELDS},
                "peers_for_1000_tflops": peers_needed,
                "at_1000_tflops": {k: at_goal[k] for k in GOAL_FIELDS},
                "goal_assumptions": {
                    **{
                        k: v
                        for k, v in asdict(replace(goal_config(costs, 0, args.sim_rounds))).items()
                        if k not in ("costs", "peers", "seed")
                    },
                    "mfu": 0.4,
                    "tflops": "model FLOPs of merged honest work per second (peak x mfu x utilization)",
                },
                "with_protocol_default_audits": {
                    "settings": PROTOCOL_DEFAULTS,
                    "peers_for_1000_tflops": peers_needed_defaults,
                    "tflops_at_1m_peers": round(million_defaults["useful_tflops"], 1),
                    "at_1m_peers": {k: million_defaults[k] for k in MILLION_FIELDS},
                },
                "load_average": os.getloadavg(),
            },
            default=float,
        )
    )


if __name__ == "__main__":
    main()
