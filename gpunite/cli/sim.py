"""`gpunite sim` (simulate 1 .. 1,000,000 peers) and `gpunite netbed up/down/run` (the WAN test bed)."""

from __future__ import annotations

from pathlib import Path

import typer

from gpunite.cli._common import console, print_json

netbed_app = typer.Typer(
    help="The WAN test bed: peers in network namespaces behind shaped, delayed links (root).",
    no_args_is_help=True,
)


def sim(
    peers: int = typer.Option(100, help="Peers in the swarm (1 to millions)."),
    gpu_mix: str = typer.Option(
        "rtx3090:0.5,rtx4090:0.3,a100:0.2", "--gpu-mix", help="GPU:SHARE,... (see --list)."
    ),
    churn: float | None = typer.Option(None, help="Mean online session in hours (default: no churn)."),
    offline: float | None = typer.Option(None, help="Mean offline gap in hours (default: same as --churn)."),
    link: str = typer.Option("home", help="Link profile or PROFILE:SHARE,... (datacenter, home, bad)."),
    model: str = typer.Option("1b", help="Model preset whose size and FLOPs are simulated."),
    rounds: int = typer.Option(30, help="Rounds to simulate."),
    round_compute: float = typer.Option(600.0, "--round-compute", help="Seconds of inner steps per round."),
    overlap: bool = typer.Option(
        False,
        "--overlap/--no-overlap",
        help="Exchange and audit during the next round's steps (one-round-delayed outer step); shows the "
        "run without overlap beside it.",
    ),
    adaptive: bool = typer.Option(
        True, "--adaptive/--no-adaptive", help="Skip peers whose link would stall all."
    ),
    group_size: int = typer.Option(
        0, "--group-size", help="Aggregate in groups of this size (0: one flat group)."
    ),
    audit_fraction: float = typer.Option(0.25, "--audit-fraction", help="Share of contributions audited."),
    segments_per_audit: int = typer.Option(
        2, "--segments-per-audit", help="Trail segments an audit fetches and replays (24 bytes/param each)."
    ),
    audit_timeout: float = typer.Option(
        30.0, "--audit-timeout", help="Seconds after the beacon a verdict may take before its work waits."
    ),
    cheaters: float = typer.Option(0.0, help="Share of peers that cheat."),
    mfu: float = typer.Option(0.4, help="Model FLOPs utilization of a training step (assumption)."),
    calibration: Path | None = typer.Option(
        None, help="Measured protocol costs (gpunite netbed run --save)."
    ),
    seed: int = typer.Option(0, help="Random seed: the same seed gives the same result."),
    list_tables: bool = typer.Option(False, "--list", help="Print the GPU and link tables and exit."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Simulate the swarm: useful TFLOPS, utilization, availability, bytes per peer, cheat detection."""
    from dataclasses import replace

    from gpunite.sim.calibration import load_costs
    from gpunite.sim.model import GPUS, LINKS, SimConfig, parse_mix, simulate

    if list_tables:
        _print_tables(as_json)
        return
    config = SimConfig(
        peers=peers,
        gpu_mix=parse_mix(gpu_mix, GPUS, "GPU"),
        link_mix=parse_mix(link, LINKS, "link profile"),
        model=model,
        mfu=mfu,
        rounds=rounds,
        round_compute_s=round_compute,
        overlap=overlap,
        adaptive=adaptive,
        group_size=group_size,
        audit_fraction=audit_fraction,
        segments_per_audit=segments_per_audit,
        audit_timeout_s=audit_timeout,
        cheater_fraction=cheaters,
        session_hours=churn,
        offline_hours=offline,
        seed=seed,
        **({"costs": load_costs(calibration)} if calibration else {}),
    )
    result = simulate(config)
    # with --overlap, the same swarm without it, so the answer says what overlapping changes
    baseline = simulate(replace(config, overlap=False)) if overlap else None
    if as_json:
        print_json({**result.to_dict(), **({"without_overlap": baseline.to_dict()} if baseline else {})})
        return
    from rich.table import Table

    table = Table(
        title=f"{peers:,} peers, {gpu_mix}, link {link}, churn {churn or 'none'} h",
        show_header=baseline is not None,
    )
    table.add_column("")
    if baseline is not None:
        table.add_column("without overlap")
    table.add_column("with overlap" if overlap else "")
    for (name, value), (_, before) in zip(_rows(result), _rows(baseline) if baseline else _rows(result)):
        table.add_row(name, *((before, value) if baseline is not None else (value,)))
    console.print(table)


def _rows(result) -> list[tuple[str, str]]:
    return [
        ("useful (verified, merged) TFLOPS", f"{result.useful_tflops:,.1f}"),
        ("peak TFLOPS online", f"{result.online_peak_tflops:,.1f}"),
        ("compute utilization", f"{result.compute_utilization:.3f}"),
        ("availability", f"{result.availability:.3f}"),
        ("rounds completed / attempted", f"{result.rounds_completed}/{result.rounds_attempted}"),
        ("mean round", f"{result.mean_round_s:,.1f} s"),
        (
            "peers online / contributing (mean)",
            f"{result.mean_online_peers:,.0f} / {result.mean_contributors:,.0f}",
        ),
        (
            "bytes per peer per round (sent / received)",
            f"{result.bytes_sent_per_peer_round / 1e6:,.1f} / {result.bytes_received_per_peer_round / 1e6:,.1f} MB",
        ),
        (
            "  of which audits / exchange",
            f"{result.audit_bytes_per_peer_round / 1e6:,.1f} / {result.exchange_bytes_per_peer_round / 1e6:,.1f} MB",
        ),
        ("audits / verdicts too late", f"{result.audits:,} / {result.late_verdicts:,}"),
        ("cheaters caught", f"{result.cheaters_caught}/{result.cheaters}"),
        (
            "rounds to detect a cheater (simulated / expected)",
            f"{_fmt(result.detect_rounds_mean)} / {_fmt(result.detect_rounds_expected)}",
        ),
        ("simulation wall time", f"{result.wall_seconds:.2f} s"),
    ]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _print_tables(as_json: bool) -> None:
    from dataclasses import asdict

    from gpunite.sim.model import GPUS, LINKS

    if as_json:
        print_json(
            {
                "gpus": {k: asdict(v) for k, v in GPUS.items()},
                "links": {k: asdict(v) for k, v in LINKS.items()},
            }
        )
        return
    for spec in GPUS.values():
        console.print(f"{spec.name:9} {spec.peak_tflops:7.1f} TFLOPS  ({spec.source})", highlight=False)
    for profile in LINKS.values():
        slow = f", every {profile.slow_every}th peer at {profile.slow_mbit} Mbit" if profile.slow_mbit else ""
        console.print(
            f"{profile.name:10} {profile.down_mbit:g}/{profile.up_mbit:g} Mbit down/up, "
            f"{profile.one_way_ms:g} ms one way{slow}",
            highlight=False,
        )


@netbed_app.command("up")
def netbed_up(
    peers: int = typer.Option(8, help="Peers (namespaces), 2 to 16."),
    profile: str = typer.Option("home", help="datacenter, home or bad."),
    tag: str = typer.Option("nb", help="Name tag of this bed (1-6 letters/digits)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Create the bed and leave it up; run things in it with `ip netns exec gpunite-TAG-pI ...`."""
    from gpunite.sim.netbed import Netbed

    bed = Netbed(peers, profile, tag=tag)
    bed.up()
    if as_json:
        print_json(bed.describe())
        return
    for row in bed.describe():
        console.print(
            f"peer {row['peer']}: ip netns exec {row['namespace']} ...  address {row['address']}, "
            f"{row['down_mbit']:g}/{row['up_mbit']:g} Mbit, {row['one_way_ms']:g} ms",
            highlight=False,
        )
    console.print(f"remove it with: gpunite netbed down --tag {tag}")


@netbed_app.command("down")
def netbed_down(
    tag: str | None = typer.Option(None, help="Remove only this bed (default: every gpunite bed)."),
) -> None:
    """Remove test-bed namespaces (and the processes in them) left by `up` or by a crash."""
    from gpunite.sim.netbed import PREFIX, check_requirements, teardown_all

    check_requirements()
    removed = teardown_all(f"{PREFIX}{tag}-" if tag else PREFIX)
    console.print(f"removed {len(removed)} namespaces" + (f": {', '.join(removed)}" if removed else ""))


@netbed_app.command("run")
def netbed_run(
    peers: int = typer.Option(8, help="Peers, 2 to 16."),
    profile: str = typer.Option("home", help="datacenter, home, bad, or 'loopback' for no test bed."),
    rounds: int = typer.Option(4, help="Rounds measured (the swarm trains one more)."),
    workdir: Path | None = typer.Option(None, help="Keep the run's files here (default: a temp dir)."),
    save: Path | None = typer.Option(None, help="Save the measured figures (a calibration file) here."),
    overlap: bool = typer.Option(True, "--overlap/--no-overlap", help="The run's train.overlap."),
    calibration: Path | None = typer.Option(
        None, help="A saved loopback run: simulate this run with its costs and show both side by side."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Run a real swarm (tiny model) on the bed and measure round time, compute and bytes per round."""
    from gpunite.sim.calibration import calibrate, compare, load_measurement, measure_swarm, save_measurement

    reference = calibrate([load_measurement(calibration)]) if calibration else None
    measured = measure_swarm(
        peers=peers,
        profile=None if profile == "loopback" else profile,
        rounds=rounds,
        workdir=workdir,
        overlap=overlap,
    )
    if save:
        save_measurement(save, measured)
    comparison = compare(measured, reference) if reference else None
    if as_json:
        print_json({"measured": measured.to_dict(), "comparison": comparison})
        return
    for name, value in measured.to_dict().items():
        console.print(f"{name:30} {value}", highlight=False)
    for row in comparison["rows"] if comparison else []:
        console.print(
            f"{row['figure']:30} measured {row['measured']:12.4g}  simulated {row['simulated']:12.4g}  "
            f"error {row['relative_error']:+.3f}",
            highlight=False,
        )


def register(app: typer.Typer) -> None:
    app.command("sim")(sim)
    app.add_typer(netbed_app, name="netbed")
