"""The WAN test bed: two namespaces on the `home` profile get the profile's RTT and rates via the relay."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from gpunite.sim.model import LINKS
from gpunite.sim.netbed import Netbed, NetbedError, check_requirements, list_namespaces


def _bed_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the test bed needs root (network namespaces)"
    if any(shutil.which(tool) is None for tool in ("ip", "tc", "nft")):
        return "ip, tc or nft missing (apt-get install -y iproute2 nftables)"
    try:
        check_requirements()
    except NetbedError as exc:
        return str(exc)
    return None


pytestmark = pytest.mark.skipif(_bed_unavailable() is not None, reason=str(_bed_unavailable()))

SERVER = r"""
import socket, time
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", 5001))
server.listen(4)
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    mode = conn.recv(1)
    if mode == b"e":  # echo one byte at a time
        while (data := conn.recv(1)):
            conn.sendall(data)
    elif mode == b"s":  # sink: report bytes and seconds from first to last byte
        total, first = 0, None
        while (data := conn.recv(1 << 16)):
            first = first or time.perf_counter()
            total += len(data)
        conn.sendall(f"{total} {time.perf_counter() - first}".encode())
    elif mode == b"g":  # send the number of bytes asked for
        want = int(conn.recv(32).decode())
        block = b"x" * (1 << 16)
        for _ in range(want // len(block)):
            conn.sendall(block)
    conn.close()
"""

CLIENT = r"""
import socket, sys, time
address = sys.argv[1]
conn = socket.create_connection((address, 5001))
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
conn.sendall(b"e")
rtts = []
for _ in range(8):
    start = time.perf_counter(); conn.sendall(b"x"); conn.recv(1); rtts.append(time.perf_counter() - start)
conn.close()
print("rtt_ms", sorted(rtts)[len(rtts) // 2] * 1e3)
conn = socket.create_connection((address, 5001))
conn.sendall(b"s")
for _ in range(48):
    conn.sendall(b"x" * (1 << 16))
conn.shutdown(socket.SHUT_WR)
total, seconds = conn.recv(100).decode().split()
print("up_mbit", int(total) * 8 / float(seconds) / 1e6)
conn = socket.create_connection((address, 5001))
conn.sendall(b"g" + str(8 << 20).encode().ljust(32))
total, first = 0, None
while (data := conn.recv(1 << 16)):
    first = first or time.perf_counter()
    total += len(data)
print("down_mbit", total * 8 / (time.perf_counter() - first) / 1e6)
"""


def test_home_profile_rtt_and_rates_through_the_relay():
    home = LINKS["home"]
    # peer 0 is a home peer; peer 1 uploads at the home download rate so peer 0's download limit is what binds
    links = [home.for_peer(0), (home.down_mbit, home.down_mbit, home.one_way_ms)]
    try:
        with Netbed(2, "home", tag="test", links=links) as bed:
            server = bed.popen(1, [sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
            try:
                assert server.stdout is not None and server.stdout.readline().strip() == "listening"
                result = subprocess.run(
                    bed.command(0, [sys.executable, "-c", CLIENT, bed.peers[1].address]),
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
            finally:
                server.kill()
                server.wait()
    finally:
        assert list_namespaces("gpunite-test-") == []
    assert result.returncode == 0, result.stderr
    measured = {key: float(value) for key, value in (line.split() for line in result.stdout.splitlines())}
    assert measured["rtt_ms"] == pytest.approx(2 * home.one_way_ms, rel=0.2)
    assert measured["up_mbit"] == pytest.approx(home.up_mbit, rel=0.2)
    assert measured["down_mbit"] == pytest.approx(home.down_mbit, rel=0.2)


def test_teardown_on_error_leaves_nothing():
    with pytest.raises(RuntimeError), Netbed(2, "bad", tag="test2"):
        assert len(list_namespaces("gpunite-test2-")) == 3
        raise RuntimeError("boom")
    assert list_namespaces("gpunite-test2-") == []


def test_bad_settings_are_one_line_errors():
    with pytest.raises(NetbedError, match="2 to 16 peers"):
        Netbed(1, "home")
    with pytest.raises(NetbedError, match="unknown link profile"):
        Netbed(2, "moon")
