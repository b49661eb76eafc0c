"""`gpunite run start`, `gpunite join`, `gpunite demo`: be a peer of a swarm run, or watch a local swarm train."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import typer

from gpunite.cli._common import console, print_json

HOME_HELP = "Peer home: identity key, synced data and state (default ~/.gpunite or $GPUNITE_HOME)."


def _config(home: Path | None, roles: list[str], rounds: int | None, until_round: int | None,
            speed: float | None, status: Path | None, heartbeat: float, device: str, cheat: str | None = None,
            adversary: str | None = None):
    from gpunite.identity import default_home
    from gpunite.swarm.adversary import SWARM_ADVERSARIES
    from gpunite.swarm.peer import CHEATS, PeerConfig, PeerError

    if cheat is not None and cheat not in CHEATS:
        raise PeerError(f"unknown --cheat {cheat!r}; choose one of {', '.join(CHEATS)}")
    if adversary is not None and adversary not in SWARM_ADVERSARIES:
        raise PeerError(f"unknown --adversary {adversary!r}; choose one of {', '.join(SWARM_ADVERSARIES)}")
    home = (home or default_home()).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return PeerConfig(home=home, roles=roles, max_rounds=rounds, until_round=until_round, speed=speed,
                      status_path=status, heartbeat_s=heartbeat, device=device, cheat=cheat, adversary=adversary)


def _setup(log_level: str, threads: int | None, name: str) -> None:
    from gpunite.util import setup_logging

    setup_logging(log_level, name)
    import logging

    for noisy in ("hivemind", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if threads:
        import torch

        torch.set_num_threads(threads)
    # SIGTERM stops the peer like Ctrl-C: cleanly, with the daemon shut down.
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _attach_ledger(peer):
    """Store the peer's verified records in HOME/ledger.sqlite and keep it synced with other peers."""
    from gpunite.ledger.bridge import attach_ledger
    from gpunite.ledger.store import Ledger, default_ledger_path

    return attach_ledger(peer, Ledger(default_ledger_path(peer.config.home)))


def _run_peer(peer, save_final: bool) -> None:
    bridge = None
    try:
        bridge = _attach_ledger(peer)
        peer.run()
        if save_final:
            path = peer.save_final()
            console.print(f"final weights (round {peer.state.round}, {peer.state.weights_hash[:12]}): {path}")
    except KeyboardInterrupt:
        peer.stopping.set()
        raise
    finally:
        if bridge is not None:
            bridge.close(final_sync=not peer.stopping.is_set())
            bridge.ledger.close()
        peer.node.close()


def start(
    manifest: Path = typer.Argument(..., help="The run manifest (TOML); its data is prepared if needed."),
    home: Path | None = typer.Option(None, "--home", help=HOME_HELP),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 for every interface)."),
    port: int = typer.Option(0, help="TCP port to listen on (0: any free port)."),
    wait_peers: int = typer.Option(1, "--wait-peers", help="Trainers to wait for before round 0 opens."),
    wait_s: float = typer.Option(60.0, "--wait-s", help="Longest wait for them, in seconds."),
    rounds: int | None = typer.Option(None, help="Stop after this many rounds (default: run until stopped)."),
    until_round: int | None = typer.Option(None, "--until-round", help="Stop once the run reaches this round."),
    speed: float | None = typer.Option(None, help="Relative speed for work sharing (default: measured)."),
    status: Path | None = typer.Option(None, help="Write a JSON status file here after every phase."),
    threads: int | None = typer.Option(None, help="torch CPU threads for this peer."),
    heartbeat: float = typer.Option(2.0, help="Seconds between heartbeats."),
    device: str = typer.Option("cpu", help="torch device to train on."),
    save_final: bool = typer.Option(False, "--save-final", help="Save the global weights when stopping."),
    log_level: str = typer.Option("INFO", "--log-level"),
) -> None:
    """Start a swarm run as its first peer and print the address others join with."""
    from gpunite.swarm.bootstrap import start_run

    _setup(log_level, threads, "start")
    config = _config(home, ["trainer"], rounds, until_round, speed, status, heartbeat, device)

    def announce(peer) -> None:
        print(f"run {peer.run_id} started; peer {peer.peer_id}")
        for maddr in peer.node.maddrs:
            print(f"join with: gpunite join {maddr}")
        sys.stdout.flush()

    peer = start_run(manifest, config, host=host, port=port, wait_peers=wait_peers, wait_peers_s=wait_s,
                     on_ready=announce)
    _run_peer(peer, save_final)


def join(
    address: str = typer.Argument(..., help="Multiaddr of any peer of the run (printed by `run start`)."),
    run: str | None = typer.Option(None, "--run", help="Run id (or a prefix); default: the only run listed."),
    role: list[str] = typer.Option(["trainer"], "--role", help="trainer (default), verifier, host, seed."),
    home: Path | None = typer.Option(None, "--home", help=HOME_HELP),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(0, help="TCP port to listen on (0: any free port)."),
    rounds: int | None = typer.Option(None, help="Stop after this many rounds."),
    until_round: int | None = typer.Option(None, "--until-round", help="Stop once the run reaches this round."),
    speed: float | None = typer.Option(None, help="Relative speed for work sharing (default: measured)."),
    status: Path | None = typer.Option(None, help="Write a JSON status file here after every phase."),
    threads: int | None = typer.Option(None, help="torch CPU threads for this peer."),
    heartbeat: float = typer.Option(2.0, help="Seconds between heartbeats."),
    device: str = typer.Option("cpu", help="torch device to train on."),
    save_final: bool = typer.Option(False, "--save-final", help="Save the global weights when stopping."),
    cheat: str | None = typer.Option(None, "--cheat", hidden=True,
                                        help="Tests and demos: send a hostile delta (scaled, random, nan)."),
    adversary: str | None = typer.Option(None, "--adversary", hidden=True,
                                         help="Tests and demos: cheat like a proof adversary mode "
                                              "(fewer_steps, copy_delta, replay_old, sybil, forged_signature, ...)."),
    log_level: str = typer.Option("INFO", "--log-level"),
) -> None:
    """Join a swarm run through any peer: fetch its manifest, data and latest weights, then train."""
    from gpunite.swarm.bootstrap import join_run

    _setup(log_level, threads, "join")
    config = _config(home, list(role), rounds, until_round, speed, status, heartbeat, device, cheat, adversary)
    peer = join_run(address, config, run_id=run, host=host, port=port)
    print(f"joined run {peer.run_id} as peer {peer.peer_id} at round {peer.state.round}")
    sys.stdout.flush()
    _run_peer(peer, save_final)


def demo(
    peers: int = typer.Option(4, help="Peer processes to start on 127.0.0.1."),
    rounds: int = typer.Option(4, help="Rounds to train."),
    churn: bool = typer.Option(False, "--churn", help="Kill one peer (SIGKILL) midway and restart it."),
    cheater: str | None = typer.Option(None, help="Make one peer cheat: scaled, random, nan, or any proof "
                                                  "adversary mode (scaled_delta, copy_delta, sybil, ...)."),
    workdir: Path | None = typer.Option(None, help="Keep the run's files here (default: a temp dir)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Start a real local swarm, train the tiny model for a few rounds with a live view, then sample from it."""
    import tempfile

    from gpunite.swarm.demo import run_demo

    # The peers' ledgers are read after the run, so the temp dir is ours to clean up, not run_demo's.
    with tempfile.TemporaryDirectory(prefix="gpunite-demo-") as temp:
        run_dir = workdir or Path(temp)
        summary = run_demo(peers=peers, rounds=rounds, churn=churn, cheater=cheater, workdir=run_dir,
                           live=not as_json)
        summary["credits"] = _demo_credits(run_dir)
    if as_json:
        print_json(summary)
    else:
        _print_credits(summary["credits"])


def _demo_credits(workdir: Path) -> dict:
    """The credit table each demo peer computes from its own ledger (at one common time), and if they agree."""
    import time

    from gpunite.ledger.credits import credit_table
    from gpunite.ledger.stats import run_policies
    from gpunite.ledger.store import Ledger, default_ledger_path

    caps, rates = run_policies([workdir / "demo.toml"])  # the manifest run_demo writes
    now = time.time()
    tables: dict[str, list[dict]] = {}
    for home in sorted(path for path in workdir.glob("peer*") if default_ledger_path(path).is_file()):
        with Ledger(default_ledger_path(home)) as ledger:
            table = credit_table(ledger.records_by_id(), now, flops_per_token=caps, host_credit_per_1k_tokens=rates)
        tables[home.name] = [{"user": row.name, "peer_id": row.id, "total_credit": row.total_credit,
                              "rac": row.rac} for row in table.users]
    source = next(iter(tables), None)
    users = tables[source] if source else []
    return {"from": source, "users": users, "peers_compared": len(tables),
            "agreed": bool(tables) and all(rows == users for rows in tables.values()),
            "differ": sorted(name for name, rows in tables.items() if rows != users)}


def _print_credits(credits: dict) -> None:
    from rich.table import Table

    if credits["from"] is None:
        console.print("[red]no peer kept a ledger[/]")
        return
    table = Table(title=f"credits, from {credits['from']}'s ledger")
    for column in ("user", "peer id", "total credit", "RAC"):
        table.add_column(column, justify="right" if column in ("total credit", "RAC") else "left")
    for row in credits["users"]:
        table.add_row(row["user"], row["peer_id"][:12], f"{row['total_credit']:.4g}", f"{row['rac']:.4g}")
    console.print(table)
    if credits["agreed"]:
        console.print(f"[green]all {credits['peers_compared']} peers computed the same credit table[/]")
    else:
        console.print(f"[red]these peers computed a different credit table: {', '.join(credits['differ'])}[/]")


def register(app: typer.Typer) -> None:
    from gpunite.cli.runs import run_app

    run_app.command("start")(start)
    app.command("join")(join)
    app.command("demo")(demo)
