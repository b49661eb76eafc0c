"""`gpunite stats`, `gpunite chain verify`, `gpunite ledger ...`: credits, BOINC export, chain check, sync."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from gpunite.cli._common import console, print_json

stats_app = typer.Typer(
    help="Credit statistics, as a BOINC server status page shows them.", no_args_is_help=False
)
chain_app = typer.Typer(help="Check a run's chain of blocks.", no_args_is_help=True)
ledger_app = typer.Typer(
    help="Inspect this peer's ledger and sync it with other peers.", no_args_is_help=True
)

LEDGER_OPTION = typer.Option(None, "--ledger", help="Ledger file (default: HOME/ledger.sqlite).")
HOME_OPTION = typer.Option(None, "--home", help="Peer home folder (default: $GPUNITE_HOME or ~/.gpunite).")
MANIFEST_OPTION = typer.Option(
    None,
    "--manifest",
    help="Run manifest(s): caps claimed FLOPs at the model's cost and sets the hosting rate.",
)


def _open_ledger(ledger_path: Optional[Path], home: Optional[Path], must_exist: bool = True):
    from gpunite.ledger.store import Ledger, LedgerError, default_ledger_path

    path = ledger_path or default_ledger_path(home)
    if must_exist and not path.exists():
        raise LedgerError(f"no ledger at {path}; join a swarm, run `gpunite ledger sync`, or pass --ledger")
    return Ledger(path)


def _policies(manifests: Optional[list[Path]]):
    from gpunite.ledger.credits import DEFAULT_HOST_CREDIT_PER_1K_TOKENS
    from gpunite.ledger.stats import run_policies

    if not manifests:
        return None, DEFAULT_HOST_CREDIT_PER_1K_TOKENS
    return run_policies(manifests)


@stats_app.callback(invoke_without_command=True)
def stats(
    ctx: typer.Context,
    ledger_path: Optional[Path] = LEDGER_OPTION,
    home: Optional[Path] = HOME_OPTION,
    manifests: Optional[list[Path]] = MANIFEST_OPTION,
    top: int = typer.Option(10, help="Rows in each top list."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Users and hosts (total, active in 24 h), credit, TeraFLOPS estimate, top users, hosts and teams."""
    if ctx.invoked_subcommand is not None:
        return
    from gpunite.ledger.stats import stats_from_ledger

    caps, rates = _policies(manifests)
    with _open_ledger(ledger_path, home) as ledger:
        result, _ = stats_from_ledger(ledger, time.time(), top, caps, rates)
    if as_json:
        print_json(result.as_dict())
        return
    _print_stats(result)


def _print_stats(result) -> None:
    from rich.table import Table

    summary = Table(show_header=False, title="gpunite statistics", title_justify="left")
    summary.add_row("users (active / total)", f"{result.users_active} / {result.users_total}")
    summary.add_row("hosts (active / total)", f"{result.hosts_active} / {result.hosts_total}")
    summary.add_row("teams", str(result.teams_total))
    summary.add_row("credit in the last 24 h", f"{result.credit_24h:,.2f}")
    summary.add_row("total credit", f"{result.total_credit:,.2f}")
    summary.add_row("TeraFLOPS (sum of RAC / 200,000)", f"{result.teraflops:.6f}")
    summary.add_row("records / conflicts", f"{result.records} / {result.conflicts}")
    banned = sum(len(peers) for peers in result.banned.values())
    summary.add_row("banned (peer, run) pairs", str(banned))
    console.print(summary)
    for title, rows, extra in (
        ("Top users", result.top_users, "team"),
        ("Top hosts", result.top_hosts, "device"),
        ("Top teams", result.top_teams, "members"),
    ):
        if not rows:
            continue
        table = Table(title=title, title_justify="left")
        for column in ("#", "name", extra, "RAC", "total credit", "24 h", "training", "audits", "hosting"):
            table.add_column(column, justify="left" if column in ("name", extra) else "right")
        for rank, row in enumerate(rows, 1):
            table.add_row(
                str(rank),
                row["name"],
                str(row[extra]),
                f"{row['rac']:,.2f}",
                f"{row['total_credit']:,.2f}",
                f"{row['credit_24h']:,.2f}",
                f"{row['training_credit']:,.2f}",
                f"{row['audit_credit']:,.2f}",
                f"{row['hosting_credit']:,.2f}",
            )
        console.print(table)


@stats_app.command("export")
def stats_export(
    directory: Path = typer.Argument(
        ..., help="Folder to write user.gz, host.gz, team.gz and tables.xml into."
    ),
    ledger_path: Optional[Path] = LEDGER_OPTION,
    home: Optional[Path] = HOME_OPTION,
    manifests: Optional[list[Path]] = MANIFEST_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Write BOINC's statistics export files, which existing BOINC stats sites can read."""
    from gpunite.ledger.boinc_export import export_boinc_stats
    from gpunite.ledger.credits import credit_table

    caps, rates = _policies(manifests)
    now = time.time()
    with _open_ledger(ledger_path, home) as ledger:
        table = credit_table(ledger.records_by_id(), now, caps, rates)
    written = export_boinc_stats(table, directory, update_time=now)
    if as_json:
        print_json(
            {
                "files": [str(path) for path in written],
                "users": len(table.users),
                "hosts": len(table.hosts),
                "teams": len(table.teams),
            }
        )
        return
    console.print(
        f"wrote {', '.join(path.name for path in written)} to [bold]{directory}[/] "
        f"({len(table.users)} users, {len(table.hosts)} hosts, {len(table.teams)} teams)"
    )


@chain_app.command("verify")
def chain_verify(
    ledger_path: Optional[Path] = LEDGER_OPTION,
    home: Optional[Path] = HOME_OPTION,
    run_id: Optional[str] = typer.Option(None, "--run", help="Run id (default: every run in the ledger)."),
    initial_weights: Optional[str] = typer.Option(
        None, "--initial-weights", help="Weights hash round 0 must start from (default: not checked)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Check every block from genesis: signatures, links, rounds, and the contributions each block merged."""
    from gpunite.ledger.chain import verify_chain

    with _open_ledger(ledger_path, home) as ledger:
        runs = [run_id] if run_id else ledger.run_ids()
        if not runs:
            from gpunite.ledger.store import LedgerError

            raise LedgerError(f"no blocks in ledger {ledger.path}; nothing to verify")
        reports = [verify_chain(ledger, run, initial_weights) for run in runs]
    if as_json:
        print_json({"ok": all(r.ok for r in reports), "runs": [r.as_dict() for r in reports]})
    else:
        for report in reports:
            if report.ok:
                console.print(
                    f"[green]ok[/] run {report.run_id[:16]}: {report.rounds} rounds, "
                    f"{report.accepted} contributions, head {report.head[:16]}"
                )
            else:
                console.print(
                    f"[bold red]broken[/] run {report.run_id[:16]}: {report.problem}", soft_wrap=True
                )
    if not all(report.ok for report in reports):
        raise typer.Exit(1)


@ledger_app.command("show")
def ledger_show(
    ledger_path: Optional[Path] = LEDGER_OPTION,
    home: Optional[Path] = HOME_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Count the records by kind, list runs and conflicting records (evidence of equivocation)."""
    with _open_ledger(ledger_path, home) as ledger:
        conflicts = ledger.conflicts()
        info = {
            "path": str(ledger.path),
            "records": len(ledger),
            "by_kind": ledger.count_by_kind(),
            "runs": ledger.run_ids(),
            "conflicts": [
                {"kind": c.kind, "signer": c.signer, "slot": c.slot, "records": [c.first, c.second]}
                for c in conflicts
            ],
        }
    if as_json:
        print_json(info)
        return
    console.print(
        f"[bold]{info['path']}[/]: {info['records']} records: "
        + ", ".join(f"{n} {k}" for k, n in info["by_kind"].items())
    )
    for run in info["runs"]:
        console.print(f"run {run}")
    for c in conflicts:
        console.print(
            f"[yellow]conflict[/] {c.kind} by {c.signer[:16]} at {c.slot}: {c.first[:16]} vs {c.second[:16]}"
        )


@ledger_app.command("sync")
def ledger_sync(
    peers: list[str] = typer.Argument(..., help="Multiaddrs of peers to sync with (ending in /p2p/<id>)."),
    ledger_path: Optional[Path] = LEDGER_OPTION,
    home: Optional[Path] = HOME_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Exchange missing records with each peer (anti-entropy); each record is verified before it is stored."""
    import asyncio

    from gpunite.ledger.sync import SyncError, sync_with

    async def run(ledger) -> list[dict]:
        from hivemind.p2p import P2P, PeerID

        peer_ids = []
        for maddr in peers:
            try:
                peer_ids.append(PeerID.from_base58(maddr.rsplit("/p2p/", 1)[1]))
            except (IndexError, ValueError):
                raise SyncError(
                    f"{maddr} is not a peer address ending in /p2p/<peer id>; "
                    "copy the full address the peer prints"
                ) from None
        try:
            p2p = await P2P.create(initial_peers=peers)
        except Exception as exc:  # hivemind reports bad addresses and daemon failures alike
            raise SyncError(f"cannot start a libp2p node for {' '.join(peers)}: {exc}") from None
        results = []
        try:
            for maddr, peer_id in zip(peers, peer_ids):
                received, sent = await sync_with(p2p, peer_id, ledger)
                results.append({"peer": maddr, "received": received, "sent": sent})
        finally:
            await p2p.shutdown()
        return results

    with _open_ledger(ledger_path, home, must_exist=False) as ledger:
        results = asyncio.run(run(ledger))
    if as_json:
        print_json({"results": results})
        return
    for result in results:
        console.print(f"{result['peer']}: received {result['received']}, sent {result['sent']}")


@ledger_app.command("serve")
def ledger_serve(
    ledger_path: Optional[Path] = LEDGER_OPTION,
    home: Optional[Path] = HOME_OPTION,
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(0, help="TCP port (0: any free port)."),
) -> None:
    """Serve this ledger to `gpunite ledger sync` until interrupted (swarm peers do this on their own)."""
    import asyncio

    from gpunite.ledger.sync import serve_sync

    async def run(ledger) -> None:
        from hivemind.p2p import P2P

        p2p = await P2P.create(host_maddrs=[f"/ip4/{host}/tcp/{port}"])
        try:
            await serve_sync(p2p, ledger)
            for maddr in await p2p.get_visible_maddrs():
                console.print(f"serving {ledger.path} at [bold]{maddr}[/]", soft_wrap=True)
            await asyncio.Event().wait()
        finally:
            await p2p.shutdown()

    with _open_ledger(ledger_path, home, must_exist=False) as ledger:
        asyncio.run(run(ledger))


def register(app: typer.Typer) -> None:
    app.add_typer(stats_app, name="stats")
    app.add_typer(chain_app, name="chain")
    app.add_typer(ledger_app, name="ledger")
