"""`gpunite demo`: a real local swarm of peer processes on 127.0.0.1, watched live, then sampled from.

`LocalSwarm` starts `python -m gpunite run start` / `join` subprocesses, each with its own home and a JSON
status file it rewrites after every phase, and kills every process it started (SIGKILL of the process group)
on exit, error or Ctrl-C. The tests and benchmarks drive the same class.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpunite.errors import GpuniteError
from gpunite.swarm.adversary import SWARM_ADVERSARIES

DEMO_MANIFEST = """
[run]
name = "gpunite-demo"
seed = 1234

[model]
preset = "tiny"

[data]
sources = ["builtin:python-docs"]
vocab_size = 2048
seq_len = 64
shard_tokens = 65536
max_builtin_mb = 1.0

[train]
batch_size = 8
inner_steps = 16
warmup_steps = 4
total_steps = 400
lr = 0.003
round_deadline_s = 90
compression_chunk = 4096

[proof]
trail_interval = 4
audit_fraction = 1.0
segments_per_audit = 1
"""


CHEATER_MODES = ("scaled", "random", "nan", *SWARM_ADVERSARIES)  # --cheat modes, then proof adversaries


class DemoError(GpuniteError):
    """The local swarm could not be started or did not make progress."""


@dataclass
class PeerProcess:
    name: str
    home: Path
    log_path: Path
    status_path: Path
    process: subprocess.Popen
    args: list[str] = field(default_factory=list)

    def status(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return None

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


class LocalSwarm:
    """Peer processes of one run on this machine; use as a context manager so they are always cleaned up."""

    def __init__(self, workdir: Path, manifest_path: Path, threads: int = 1, heartbeat_s: float = 1.0,
                 log_level: str = "INFO") -> None:
        self.workdir = workdir
        self.manifest_path = manifest_path
        self.threads = threads
        self.heartbeat_s = heartbeat_s
        self.log_level = log_level
        self.peers: dict[str, PeerProcess] = {}
        self.retired: list[PeerProcess] = []

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def _spawn(self, name: str, verb: list[str], rounds: int | None, extra: list[str]) -> PeerProcess:
        home = self.workdir / name
        home.mkdir(parents=True, exist_ok=True)
        status_path = home / "status.json"
        status_path.unlink(missing_ok=True)
        log_path = self.workdir / f"{name}.log"
        args = [sys.executable, "-m", "gpunite", *verb, "--home", str(home), "--status", str(status_path),
                "--threads", str(self.threads), "--heartbeat", str(self.heartbeat_s), "--log-level", self.log_level,
                *extra]
        if rounds is not None:
            args += ["--rounds", str(rounds)]
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "PYTHONUNBUFFERED": "1"}
        with open(log_path, "ab") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env, start_new_session=True)
        peer = PeerProcess(name, home, log_path, status_path, process, args)
        self.peers[name] = peer
        return peer

    def start_first(self, name: str = "peer1", wait_peers: int = 1, rounds: int | None = None,
                    extra: list[str] | None = None) -> PeerProcess:
        return self._spawn(name, ["run", "start", str(self.manifest_path), "--wait-peers", str(wait_peers),
                                  "--wait-s", "300"], rounds, extra or [])

    def join(self, name: str, address: str, rounds: int | None = None, extra: list[str] | None = None
             ) -> PeerProcess:
        return self._spawn(name, ["join", address], rounds, extra or [])

    def address(self, timeout_s: float = 240.0, exclude: tuple[str, ...] = ()) -> str:
        """A live peer's multiaddr, from its status file (any peer's address works for joining)."""
        give_up = time.time() + timeout_s
        while time.time() < give_up:
            for peer in self.peers.values():
                status = peer.status() if peer.alive and peer.name not in exclude else None
                if status and status.get("maddrs"):
                    return status["maddrs"][0]
            self.check_alive()
            time.sleep(0.2)
        raise DemoError(f"no peer published its address within {timeout_s:.0f} s; see the logs in {self.workdir}")

    def check_alive(self) -> None:
        for peer in self.peers.values():
            code = peer.process.poll()
            if code not in (None, 0):
                tail = peer.log_path.read_text(errors="replace")[-1500:]
                raise DemoError(f"{peer.name} exited with code {code}:\n{tail}")

    def statuses(self) -> dict[str, dict[str, Any]]:
        return {name: s for name, peer in self.peers.items() if (s := peer.status()) is not None}

    def wait_for(self, predicate, timeout_s: float, what: str) -> None:
        give_up = time.time() + timeout_s
        while time.time() < give_up:
            if predicate(self.statuses()):
                return
            self.check_alive()
            time.sleep(0.2)
        raise DemoError(f"timed out after {timeout_s:.0f} s waiting for {what}; see the logs in {self.workdir}")

    def kill(self, name: str) -> PeerProcess:
        """SIGKILL a peer and everything it started (its libp2p daemon): a crash, not a clean stop."""
        peer = self.peers.pop(name)
        _kill_group(peer.process)
        self.retired.append(peer)
        return peer

    def wait_exit(self, timeout_s: float) -> None:
        give_up = time.time() + timeout_s
        for peer in self.peers.values():
            try:
                peer.process.wait(timeout=max(0.1, give_up - time.time()))
            except subprocess.TimeoutExpired:
                raise DemoError(f"{peer.name} did not finish within {timeout_s:.0f} s; see {peer.log_path}") from None
        self.check_alive()

    def stop_all(self) -> None:
        for peer in list(self.peers.values()) + self.retired:
            _kill_group(peer.process)


def round_log(home: Path) -> dict[int, dict]:
    """A peer's per-round figures (runs/<run>/rounds.jsonl), by round."""
    lines = {}
    for path in home.glob("runs/*/rounds.jsonl"):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            lines[entry["round"]] = entry
    return lines


def time_shares(log: dict[int, dict], first_round: int, last_round: int) -> dict[str, float]:
    """Where one peer's wall time went between the ends of two rounds of its round log: inner steps
    ("compute"), recording the trail ("trail"; "trail_waiting", part of it: waiting for the trail's writes),
    the rest of training a round (data, commit, publish: "training_other") and not training at all
    ("waiting": on the round's close, audits, slowest peer)."""
    start, end = log[first_round], log[last_round]
    wall = end["wall_s"] - start["wall_s"]
    spent = {key: end.get(key, 0.0) - start.get(key, 0.0)
             for key in ("compute_s", "trail_s", "trail_wait_s", "training_s")}
    shares = {"compute": spent["compute_s"] / wall, "trail": spent["trail_s"] / wall}
    if "trail_wait_s" in end:
        shares["trail_waiting"] = spent["trail_wait_s"] / wall
    if "training_s" in end:  # logs of peers from before this figure have only the first two
        shares["training_other"] = (spent["training_s"] - spent["compute_s"] - spent["trail_s"]) / wall
        shares["waiting"] = 1.0 - spent["training_s"] / wall
    return {key: round(value, 4) for key, value in shares.items()}


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def write_demo_manifest(workdir: Path) -> Path:
    path = workdir / "demo.toml"
    path.write_text(DEMO_MANIFEST)
    return path


def prepare_demo(manifest_path: Path) -> None:
    from gpunite.data.prepare import prepare_dataset
    from gpunite.manifest import load_manifest

    prepare_dataset(load_manifest(manifest_path))


def run_demo(peers: int = 4, rounds: int = 4, churn: bool = False, cheater: str | None = None,
             workdir: Path | None = None, live: bool = True) -> dict[str, Any]:
    """Run the demo; returns its summary (also shown live on the terminal unless live is False)."""
    if peers < 1 or rounds < 1:
        raise DemoError("the demo needs --peers >= 1 and --rounds >= 1")
    if churn and peers < 2:
        raise DemoError("--churn needs --peers >= 2: one peer is killed while the others go on")
    if cheater is not None and cheater not in CHEATER_MODES:
        raise DemoError(f"unknown --cheater {cheater!r}; choose one of {', '.join(CHEATER_MODES)}")
    temp = None
    if workdir is None:
        temp = tempfile.TemporaryDirectory(prefix="gpunite-demo-")
        workdir = Path(temp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        manifest_path = write_demo_manifest(workdir)
        prepare_demo(manifest_path)
        with LocalSwarm(workdir, manifest_path) as swarm:
            summary = _drive(swarm, peers, rounds, churn, cheater, live, started)
        summary["sample"] = _sample(workdir)
        summary["wall_s"] = round(time.time() - started, 1)
        if live:
            _print_summary(summary)
        return summary
    finally:
        if temp is not None:
            temp.cleanup()


def _drive(swarm: LocalSwarm, peers: int, rounds: int, churn: bool, cheater: str | None, live: bool,
           started: float) -> dict[str, Any]:
    from rich.live import Live

    until = ["--until-round", str(rounds), "--speed", "1"]
    swarm.start_first("peer1", wait_peers=peers, extra=["--save-final", *until])
    address = swarm.address()
    for k in range(2, peers + 1):
        flag = "--adversary" if cheater in SWARM_ADVERSARIES else "--cheat"
        extra = [flag, cheater] if cheater and k == peers else []
        swarm.join(f"peer{k}", address, extra=[*until, *extra])
    victim = f"peer{peers}" if not cheater else f"peer{max(2, peers - 1)}"
    churned = False
    events: list[str] = []
    with Live(_view(swarm, rounds, events, started), refresh_per_second=2, transient=False,
              auto_refresh=False) if live else nullcontext() as view:
        while any(p.alive for p in swarm.peers.values()):
            statuses = swarm.statuses()
            if churn and not churned and _round_of(statuses) >= max(1, rounds // 2):
                swarm.kill(victim)
                events.append(f"killed {victim} (SIGKILL) at round {_round_of(statuses)}")
                churned = True
                swarm.join(victim, swarm.address(exclude=(victim,)), extra=until)
                events.append(f"restarted {victim} with the same home: it rejoins and syncs")
            swarm.check_alive()
            if live:
                view.update(_view(swarm, rounds, events, started), refresh=True)
            if time.time() - started > 900:
                raise DemoError("the demo made no progress for 15 minutes; see the logs")
            time.sleep(0.5)
    statuses = {**{p.name: p.status() or {} for p in swarm.retired}, **swarm.statuses()}
    hashes = {name: s.get("weights_hash") for name, s in statuses.items() if name in swarm.peers}
    return {
        "peers": peers,
        "rounds": rounds,
        "churn": churn,
        "cheater": cheater,
        "events": events,
        "refused": _refusals(swarm),
        # The cheater is caught when none of its cheating contributions merged (audits or cheap checks refused
        # them); a proof adversary logs which of its contributions cheat (a Sybil's original, say, does not).
        "cheater_merged_rounds": statuses.get(f"peer{peers}", {}).get("contributed_rounds") if cheater else None,
        **(_adversary_outcome(swarm, f"peer{peers}") if cheater in SWARM_ADVERSARIES else {}),
        "weights_hash": sorted(set(hashes.values())),
        "agreed": len(set(hashes.values())) == 1,
        "per_peer": {name: {k: s.get(k) for k in ("round", "loss", "tokens", "bytes_sent", "bytes_received",
                                                  "weights_hash", "compute_s", "wall_s")}
                     for name, s in statuses.items()},
    }


def _adversary_outcome(swarm: LocalSwarm, name: str) -> dict[str, Any]:
    """How many cheating contributions a proof adversary published, and how many of them the chain merged."""
    from gpunite.swarm.adversary import read_adversary_log

    peer = swarm.peers.get(name) or next(p for p in swarm.retired if p.name == name)
    cheats = {entry["record_id"] for entry in read_adversary_log(peer.home) if entry["cheating"]}
    merged: set[str] = set()
    for other in swarm.peers.values():
        if other.name != name:
            for path in other.home.glob("runs/*/chain.jsonl"):
                for line in path.read_text().splitlines():
                    merged |= set(json.loads(line)["accepted"])
    return {"cheats_published": len(cheats), "cheats_merged": len(cheats & merged)}


def _refusals(swarm: LocalSwarm) -> list[str]:
    """What the honest peers refused (hostile contributions and slices), from their logs, once each."""
    seen: list[str] = []
    for peer in [*swarm.peers.values(), *swarm.retired]:
        for line in peer.log_path.read_text(errors="replace").splitlines():
            if (("rejected " in line and "contribution" in line) or ("dropped " in line and "slice" in line)
                    or "banned " in line or ": REJECT, " in line):
                message = line.split(": ", 1)[-1]
                if message not in seen:
                    seen.append(message)
    return seen[:20]


def _round_of(statuses: dict[str, dict[str, Any]]) -> int:
    return max((s.get("round", 0) for s in statuses.values()), default=0)


def _view(swarm: LocalSwarm, rounds: int, events: list[str], started: float):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"gpunite demo: {len(swarm.peers)} peers on 127.0.0.1, {rounds} rounds "
                        f"({time.time() - started:.0f} s)")
    for column in ("peer", "phase", "round", "loss", "tokens", "tokens/s", "sent", "received", "weights"):
        table.add_column(column, justify="right" if column not in ("peer", "phase", "weights") else "left")
    for name, peer in swarm.peers.items():
        s = peer.status() or {}
        wall = s.get("wall_s") or 0
        rate = (s.get("tokens", 0) / wall) if wall else 0
        loss = s.get("loss")
        table.add_row(name, s.get("phase", "starting") if peer.alive else "exited", str(s.get("round", "-")),
                      f"{loss:.3f}" if loss is not None else "-", str(s.get("tokens", 0)), f"{rate:.0f}",
                      _bytes(s.get("bytes_sent", 0)), _bytes(s.get("bytes_received", 0)),
                      (s.get("weights_hash") or "-")[:12])
    return Group(table, *[Text(f"* {e}") for e in events])


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _sample(workdir: Path) -> str | None:
    """A completion from the trained model (peer1 saves the final global weights when it stops)."""
    finals = sorted(workdir.glob("peer1/runs/*/final.safetensors"))
    if not finals:
        return None
    from gpunite.export import generate_text, load_for_generation

    loaded = load_for_generation(finals[0], device="cpu")
    return generate_text(loaded, "def ", max_tokens=48, temperature=0.8, top_p=0.95, seed=0)


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console()
    verdict = "[green]all peers agree[/]" if summary["agreed"] else "[red]peers disagree[/]"
    console.print(f"\n{summary['rounds']} rounds with {summary['peers']} peers in {summary['wall_s']} s: {verdict} "
                  f"on weights {', '.join(h[:12] for h in summary['weights_hash'] if h)}")
    for refusal in summary.get("refused", []):
        console.print(f"refused: {refusal}", markup=False, highlight=False)
    if summary.get("cheater") and "cheats_merged" in summary:
        published, merged = summary["cheats_published"], summary["cheats_merged"]
        caught = f"[green]caught: none of its {published} cheating contributions merged[/]" if merged == 0 else (
            f"[red]NOT caught: {merged} of its {published} cheating contributions merged[/]")
        if not published:
            caught = "[yellow]it published no cheating contribution (too few rounds?)[/]"
        console.print(f"cheater peer{summary['peers']} ({summary['cheater']}): {caught}")
    elif summary.get("cheater"):
        merged = summary.get("cheater_merged_rounds")
        caught = "[green]caught: none of its contributions merged[/]" if merged == 0 else (
            f"[red]NOT caught: its contributions merged in {merged} rounds[/]")
        console.print(f"cheater peer{summary['peers']} ({summary['cheater']}): {caught}")
    if summary.get("sample") is not None:
        console.print("[bold]sample from the trained model:[/]")
        console.print("def " + summary["sample"], markup=False, highlight=False)
