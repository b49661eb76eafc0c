"""The WAN test bed: N peers on this machine, each in its own network namespace behind a shaped, delayed link.

Layout (all of it inside namespaces this module creates; nothing touches the root namespace's network):

    gpunite-<tag>-hub        a namespace holding the bridge br0 (the "internet")
    gpunite-<tag>-p<i>       peer i: eth0 = 10.<net>.<i + 1>/16 (a veth whose other end is on br0)

- upload limit: tc tbf on the peer's eth0 (egress of the peer);
- download limit: tc tbf on the bridge-side end of the peer's veth (egress towards the peer);
- latency: netem is not available on this kernel, so every inbound TCP connection of a peer is redirected
  (nftables) to a delaying relay in the peer's namespace (gpunite.sim.relay): the round trip between two
  peers gains 2 x the profile's one-way latency, at the link's full rate. Only TCP is delayed (the swarm
  runs on TCP); ICMP ping shows no added latency.

`Netbed` is a context manager: everything is torn down on exit, Ctrl-C and errors included; `teardown_all`
(`gpunite netbed down`) removes leftovers by name prefix. It needs root, iproute2 (ip, tc) and nftables.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Self

from gpunite.errors import GpuniteError
from gpunite.sim.model import LINKS, LinkProfile

log = logging.getLogger("gpunite.sim.netbed")

PREFIX = "gpunite-"
RELAY_PORT = 7999
MAX_PEERS = 16
_TAG = re.compile(r"^[a-z0-9]{1,6}$")


class NetbedError(GpuniteError):
    """The test bed cannot be set up (missing root or tools, bad settings) or a command in it failed."""


@dataclass(frozen=True)
class PeerLink:
    index: int
    namespace: str
    address: str
    down_mbit: float
    up_mbit: float
    one_way_ms: float


def check_requirements() -> None:
    """Raise a NetbedError that says what to do when this machine cannot host the test bed."""
    if os.geteuid() != 0:
        raise NetbedError(
            "the network test bed needs root (it creates network namespaces): run it as root or with sudo"
        )
    missing = [tool for tool in ("ip", "tc", "nft") if shutil.which(tool) is None]
    if missing:
        raise NetbedError(
            f"missing {', '.join(missing)}: install them with `apt-get install -y iproute2 nftables`"
        )
    probe = f"{PREFIX}probe{os.getpid()}"
    result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise NetbedError(
            f"cannot create network namespaces here ({result.stderr.strip()}); the test bed needs "
            "a kernel and container that allow `ip netns add`"
        )
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)


def _run(argv: Sequence[str]) -> None:
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise NetbedError(f"`{' '.join(argv)}` failed: {result.stderr.strip() or result.stdout.strip()}")


def _tbf(namespace: str, device: str, mbit: float) -> list[str]:
    rate_bytes = mbit * 1e6 / 8
    # the bucket must hold at least one timer tick of traffic; the queue holds about 20 ms of it
    burst = max(32 * 1024, int(rate_bytes / 250))
    limit = max(64 * 1024, int(rate_bytes * 0.02)) + burst
    return [
        "ip",
        "netns",
        "exec",
        namespace,
        "tc",
        "qdisc",
        "replace",
        "dev",
        device,
        "root",
        "tbf",
        "rate",
        f"{mbit}mbit",
        "burst",
        str(burst),
        "limit",
        str(limit),
    ]


def list_namespaces(prefix: str = PREFIX) -> list[str]:
    result = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    names = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    return [name for name in names if name.startswith(prefix)]


def teardown_all(prefix: str = PREFIX) -> list[str]:
    """Remove every namespace whose name starts with `prefix`, ending the processes inside them first."""
    removed = []
    for namespace in list_namespaces(prefix):
        pids = subprocess.run(
            ["ip", "netns", "pids", namespace], capture_output=True, text=True, check=False
        ).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
        removed.append(namespace)
    return removed


class Netbed:
    """N peers in namespaces with the links of a profile; use as `with Netbed(8, "home") as bed: ...`."""

    def __init__(
        self,
        peers: int = 8,
        profile: str | LinkProfile = "home",
        tag: str = "nb",
        links: Sequence[tuple[float, float, float]] | None = None,
    ) -> None:
        if not 2 <= peers <= MAX_PEERS:
            raise NetbedError(f"the test bed runs 2 to {MAX_PEERS} peers, got {peers}")
        if not _TAG.match(tag):
            raise NetbedError(f"tag {tag!r} must be 1-6 lowercase letters or digits")
        if isinstance(profile, str):
            if profile not in LINKS:
                raise NetbedError(f"unknown link profile {profile!r}; choose one of {', '.join(LINKS)}")
            profile = LINKS[profile]
        figures = list(links) if links is not None else [profile.for_peer(i) for i in range(peers)]
        if len(figures) != peers:
            raise NetbedError(f"got {len(figures)} links for {peers} peers")
        self.tag = tag
        self.profile = profile
        self.prefix = f"{PREFIX}{tag}-"
        self.hub = f"{self.prefix}hub"
        # a /16 per tag, so two beds with different tags never share addresses
        self.net = 100 + int(hashlib.sha256(tag.encode()).hexdigest(), 16) % 100
        self.peers = [
            PeerLink(i, f"{self.prefix}p{i}", f"10.{self.net}.{i + 1}.1", down, up, one_way)
            for i, (down, up, one_way) in enumerate(figures)
        ]
        self.relays: list[subprocess.Popen] = []
        self._previous_sigterm: object = None

    # ----- set-up and teardown -----
    def __enter__(self) -> Self:
        self.up()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()

    def up(self) -> None:
        check_requirements()
        if list_namespaces(self.prefix):
            raise NetbedError(
                f"a test bed with tag {self.tag!r} is already up; remove it with "
                f"`gpunite netbed down --tag {self.tag}`"
            )
        # SIGTERM tears the bed down like Ctrl-C does
        self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            self._create()
        except BaseException:
            self.down()
            raise

    def _create(self) -> None:
        _run(["ip", "netns", "add", self.hub])
        _run(["ip", "-n", self.hub, "link", "set", "lo", "up"])
        _run(["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.hub, "link", "set", "br0", "up"])
        for peer in self.peers:
            self._add_peer(peer)
        for peer in self.peers:
            self._start_relay(peer)

    def _add_peer(self, peer: PeerLink) -> None:
        ns, hub_end, peer_end = peer.namespace, f"gnb{self.tag}h{peer.index}", f"gnb{self.tag}p{peer.index}"
        _run(["ip", "netns", "add", ns])
        _run(["ip", "link", "add", peer_end, "type", "veth", "peer", "name", hub_end])
        _run(["ip", "link", "set", peer_end, "netns", ns])
        _run(["ip", "link", "set", hub_end, "netns", self.hub])
        _run(["ip", "-n", ns, "link", "set", peer_end, "name", "eth0"])
        _run(["ip", "-n", ns, "addr", "add", f"{peer.address}/16", "dev", "eth0"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        _run(["ip", "-n", self.hub, "link", "set", hub_end, "master", "br0"])
        _run(["ip", "-n", self.hub, "link", "set", hub_end, "up"])
        _run(_tbf(ns, "eth0", peer.up_mbit))
        _run(_tbf(self.hub, hub_end, peer.down_mbit))
        nft = ["ip", "netns", "exec", ns, "nft"]
        _run([*nft, "add table ip gpunite"])
        _run([*nft, "add chain ip gpunite inbound { type nat hook prerouting priority dstnat; }"])
        _run([*nft, f"add rule ip gpunite inbound iifname eth0 meta l4proto tcp redirect to :{RELAY_PORT}"])

    def _start_relay(self, peer: PeerLink) -> None:
        relay = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                peer.namespace,
                sys.executable,
                "-m",
                "gpunite.sim.relay",
                "--port",
                str(RELAY_PORT),
                "--delay-ms",
                str(peer.one_way_ms),
            ],
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
            start_new_session=True,
        )
        self.relays.append(relay)
        line = relay.stdout.readline() if relay.stdout else ""
        if line.strip() != "ready":
            raise NetbedError(
                f"the delaying relay of peer {peer.index} did not start (exit code {relay.poll()})"
            )

    def down(self) -> None:
        for relay in self.relays:
            if relay.poll() is None:
                relay.kill()
            relay.wait()
            if relay.stdout:
                relay.stdout.close()
        self.relays.clear()
        teardown_all(self.prefix)
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)  # type: ignore[arg-type]
            self._previous_sigterm = None

    # ----- running things inside -----
    def command(self, index: int, argv: Sequence[str]) -> list[str]:
        """argv run inside peer `index`'s namespace."""
        return ["ip", "netns", "exec", self.peers[index].namespace, *argv]

    def popen(self, index: int, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(index, argv), **kwargs)

    def describe(self) -> list[dict]:
        return [
            {
                "peer": p.index,
                "namespace": p.namespace,
                "address": p.address,
                "down_mbit": p.down_mbit,
                "up_mbit": p.up_mbit,
                "one_way_ms": p.one_way_ms,
            }
            for p in self.peers
        ]


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt
