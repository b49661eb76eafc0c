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
    weights: Path = typer.Argument(..., help="A gpunite checkpoint file or a Hugging Face model folder."),
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
    join: Optional[str] = typer.Option(None, "--join", help="Any swarm peer's multiaddr: announce this host "
                                       "there so `gpunite ask --join` finds it."),
    public_url: Optional[str] = typer.Option(None, "--public-url", help="URL others reach this host at "
                                             "(default: http://HOST:PORT)."),
) -> None:
    """Check this machine against the run's host minimum, load the weights and serve an OpenAI-compatible API."""
    import uvicorn

    from gpunite.identity import Identity
    from gpunite.ledger.store import Ledger, default_ledger_path
    from gpunite.manifest import load_manifest
    from gpunite.serve.host import Host, HostError, announce_host, check_host_hardware, load_served_model
    from gpunite.train.hardware import probe

    manifest = load_manifest(manifest_path, check_data=False) if manifest_path else None
    report = probe(device, budget_s=0.2)
    if manifest is not None:  # refuse before loading weights when the minimum is known up front
        check_host_hardware(manifest.host, report, str(manifest_path))
    served = load_served_model(weights, device=device)
    if manifest is None and served.manifest is not None:
        manifest = served.manifest
        check_host_hardware(manifest.host, report, f"the manifest inside {weights}")
    identity = Identity.load_or_create(home)
    ledger = Ledger(default_ledger_path(home))
    server = Host(served, identity, ledger=ledger, manifest=manifest, max_batch=max_batch,
                  max_tokens_cap=max_tokens_cap)
    api_url = (public_url or f"http://{bind}:{port}").rstrip("/")
    if join and public_url is None and bind in ("0.0.0.0", "::"):
        raise HostError(f"--host {bind} is no address others can reach; add --public-url http://ADDRESS:{port}")
    record = server.host_record(report, api_url=api_url if join else None)
    if as_json:
        print_json(record.model_dump(mode="json"))
    console_err.print(
        f"serving [bold]{served.name}[/] (weights {served.weights_hash[:16]}) on {report.device} at "
        f"[bold]http://{bind}:{port}/v1[/]; quotas from {ledger.path}"
    )
    node = None
    try:
        if join:
            from gpunite.swarm.node import SwarmNode

            node = SwarmNode(initial_peers=[join]).start()
            announce_host(node, record)
            console_err.print(f"announced at {api_url} in the swarm at {join}")
        uvicorn.run(server.app, host=bind, port=port, log_level="warning", access_log=False)
    finally:
        if node is not None:
            node.close()
        server.close()
        ledger.close()


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
