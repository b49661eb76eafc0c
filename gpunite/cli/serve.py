"""`gpunite host`, `gpunite ask` and `gpunite chat`: serve a model over HTTP, and query a host with signed requests."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from gpunite.cli._common import console, console_err, print_json

HOME_OPTION = typer.Option(None, "--home", help="Peer home folder (default: $GPUNITE_HOME or ~/.gpunite).")
URL_OPTION = typer.Option(None, "--url", help="Host URL (default: a host found with --join, else "
                          "http://127.0.0.1:8000).")
JOIN_OPTION = typer.Option(None, "--join", help="Any swarm peer's multiaddr: find a host announced in the swarm.")


def register(app: typer.Typer) -> None:
    app.command("host")(host)
    app.command("ask")(ask)
    app.command("chat")(chat)


def host(
    weights: Optional[Path] = typer.Argument(
        None, help="A gpunite checkpoint file or a Hugging Face model folder; leave out (with --join) to "
        "serve a swarm run's verified weights."),
    port: int = typer.Option(8000, "--port", help="TCP port to listen on."),
    bind: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 for every interface)."),
    manifest_path: Optional[Path] = typer.Option(
        None, "--manifest", help="Run manifest whose [host] minimum and [credit] policy apply "
        "(default: the one inside the checkpoint)."),
    home: Optional[Path] = HOME_OPTION,
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N, mps or xpu."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="Sequences decoded together "
                                            "(default: the manifest's [host] max_batch)."),
    max_tokens_cap: int = typer.Option(1024, "--max-tokens-cap", help="Largest max_tokens a request may ask."),
    as_json: bool = typer.Option(False, "--json", help="Print the host record as JSON before serving."),
    join: Optional[str] = typer.Option(
        None, "--join", help="Any swarm peer's multiaddr: announce this host there so `gpunite ask --join` "
        "finds it; without WEIGHTS, also follow the run: serve its newest verified weights, hot-swap newer."),
    run: Optional[str] = typer.Option(None, "--run", help="With --join and no WEIGHTS: the run id (or a "
                                      "prefix) to follow; default: the only run listed."),
    poll_s: float = typer.Option(2.0, "--poll-s", help="Seconds between looks for a newer verified round."),
    public_url: Optional[str] = typer.Option(None, "--public-url", help="URL others reach this host at "
                                             "(default: http://HOST:PORT)."),
    log_level: str = typer.Option("INFO", "--log-level"),
) -> None:
    """Check this machine against the run's host minimum, load the weights (or follow a swarm run's verified
    weights) and serve an OpenAI-compatible API."""
    from gpunite.serve.host import HostError

    if weights is None and join is None:
        raise HostError("nothing to serve: pass WEIGHTS (a checkpoint or model folder), or --join ADDRESS to "
                        "serve a swarm run's verified weights")
    if weights is not None and run is not None:
        raise HostError("--run picks the swarm run to follow, so it goes without WEIGHTS; drop one of them")
    api_url = (public_url or f"http://{bind}:{port}").rstrip("/")
    if join and public_url is None and bind in ("0.0.0.0", "::"):
        raise HostError(f"--host {bind} is no address others can reach; add --public-url http://ADDRESS:{port}")
    import logging

    import uvicorn

    from gpunite.identity import Identity, default_home
    from gpunite.ledger.store import Ledger, default_ledger_path
    from gpunite.manifest import load_manifest
    from gpunite.serve.host import Host, announce_host, check_host_hardware, load_served_model
    from gpunite.train.hardware import probe
    from gpunite.util import setup_logging

    setup_logging(log_level, "host")
    for noisy in ("hivemind", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    manifest = load_manifest(manifest_path, check_data=False) if manifest_path else None
    report = probe(device, budget_s=0.2)
    if manifest is not None:  # refuse before loading weights when the minimum is known up front
        check_host_hardware(manifest.host, report, str(manifest_path))
    identity = Identity.load_or_create(home)
    node = None
    follower = None
    ledger = None
    try:
        if join:
            from gpunite.swarm.node import SwarmNode

            node = SwarmNode(initial_peers=[join]).start()
        if weights is None:
            from gpunite.serve.follow import load_run_model, open_run

            manifest = open_run(node, run)
            check_host_hardware(manifest.host, report, f"run {manifest.run_id[:12]}'s manifest")
            served = load_run_model(node, manifest, (home or default_home()).expanduser(), device=device,
                                    self_id=identity.peer_id)
        else:
            served = load_served_model(weights, device=device)
            if manifest is None and served.manifest is not None:
                manifest = served.manifest
                check_host_hardware(manifest.host, report, f"the manifest inside {weights}")
        ledger = Ledger(default_ledger_path(home))
        server = Host(served, identity, ledger=ledger, manifest=manifest, max_batch=max_batch,
                      max_tokens_cap=max_tokens_cap)
        try:
            record = server.host_record(report, api_url=api_url if join else None)
            if as_json:
                print_json(record.model_dump(mode="json"))
            if node is not None:
                announcement = announce_host(node, record)
                console_err.print(f"announced at {api_url} in the swarm at {join}")
                if weights is None:
                    follower = _start_following(server, node, ledger, identity, poll_s, report, api_url,
                                                announcement)
            console_err.print(
                f"serving [bold]{served.name}[/] (weights {server.weights_hash[:16]}) on {report.device} at "
                f"[bold]http://{bind}:{port}/v1[/]; quotas from {ledger.path}"
            )
            uvicorn.run(server.app, host=bind, port=port, log_level="warning", access_log=False)
        finally:
            if follower is not None:
                follower.stop()
            server.close()
    finally:
        if node is not None:
            node.close()
        if ledger is not None:
            ledger.close()


def _start_following(server, node, ledger, identity, poll_s: float, report, api_url: str, announcement):
    """Catch up with the run's newest verified weights now, then keep following them in the background."""
    from gpunite.serve.follow import Follower, RunSource
    from gpunite.swarm.state_sync import ParamLayout

    layout = ParamLayout.of(server.engine.model)
    source = RunSource(node, server.run_id, layout, ledger, self_id=identity.peer_id)

    def reannounce(verified) -> None:
        announcement.update(server.host_record(report, api_url=api_url))

    follower = Follower(server, source, poll_s=poll_s, on_swap=reannounce)
    if not follower.poll_logged() and follower.verified is None:
        console_err.print(f"serving round 0's initial weights {server.weights_hash[:16]} (no round of "
                          "the run is verified yet)")
    return follower.start()


def ask(
    prompt: str = typer.Argument(..., help="Text to continue."),
    url: Optional[str] = URL_OPTION,
    join: Optional[str] = JOIN_OPTION,
    max_tokens: int = typer.Option(128, "--max-tokens", help="Tokens to generate."),
    temperature: float = typer.Option(0.8, "--temperature", help="0 is greedy."),
    home: Optional[Path] = HOME_OPTION,
) -> None:
    """Ask a host to continue PROMPT (signed with your identity) and stream the answer."""
    from gpunite.identity import Identity
    from gpunite.serve.client import HostClient, resolve_host_url

    identity = Identity.load_or_create(home)
    with HostClient(resolve_host_url(url, join), identity) as client:
        for piece in client.stream_completion(prompt, max_tokens=max_tokens, temperature=temperature):
            console.out(piece, end="", highlight=False)
    console.out("")


def chat(
    url: Optional[str] = URL_OPTION,
    join: Optional[str] = JOIN_OPTION,
    max_tokens: int = typer.Option(256, "--max-tokens", help="Tokens per answer at most."),
    temperature: float = typer.Option(0.8, "--temperature", help="0 is greedy."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message to start with."),
    home: Optional[Path] = HOME_OPTION,
) -> None:
    """Chat with a host, one message at a time (empty line or Ctrl-D to quit)."""
    from gpunite.identity import Identity
    from gpunite.serve.client import HostClient, resolve_host_url

    identity = Identity.load_or_create(home)
    messages = [{"role": "system", "content": system}] if system else []
    with HostClient(resolve_host_url(url, join), identity) as client:
        while True:
            try:
                line = console.input("[bold]you>[/] ")
            except EOFError:
                break
            if not line.strip():
                break
            messages.append({"role": "user", "content": line})
            answer = []
            for piece in client.stream_chat(messages, max_tokens=max_tokens, temperature=temperature):
                answer.append(piece)
                console.out(piece, end="", highlight=False)
            console.out("")
            messages.append({"role": "assistant", "content": "".join(answer)})
