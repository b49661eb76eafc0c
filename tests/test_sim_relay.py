"""The delay line of the test bed's relay, on loopback (no root needed): latency added, bytes and order kept."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

from gpunite.sim.relay import DelayLine


async def _relayed_pair(delay_s: float):
    """An echo server behind a listener whose connections pass through two DelayLines (one per direction)."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", echo_port)
        await asyncio.gather(
            DelayLine(reader, upstream_writer, delay_s, 1 << 20).run(),
            DelayLine(upstream_reader, writer, delay_s, 1 << 20).run(),
        )
        writer.close()

    echo_server = await asyncio.start_server(echo, "127.0.0.1", 0)
    echo_port = echo_server.sockets[0].getsockname()[1]
    relay_server = await asyncio.start_server(relay, "127.0.0.1", 0)
    return echo_server, relay_server, relay_server.sockets[0].getsockname()[1]


def test_delay_line_adds_latency_and_keeps_every_byte_in_order():
    async def scenario() -> tuple[float, bytes, bytes]:
        echo_server, relay_server, port = await _relayed_pair(delay_s=0.05)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        rtts = []
        for _ in range(5):
            start = time.perf_counter()
            writer.write(b"x")
            await writer.drain()
            await reader.readexactly(1)
            rtts.append(time.perf_counter() - start)
        payload = os.urandom(3 << 20)  # more than the 1 MB buffer: flow control must hold, nothing may drop
        writer.write(payload)
        writer.write_eof()
        echoed = await reader.read(-1)
        writer.close()
        echo_server.close()
        relay_server.close()
        return sorted(rtts)[2], hashlib.sha256(payload).digest(), hashlib.sha256(echoed).digest()

    rtt, sent, received = asyncio.run(scenario())
    assert 0.095 <= rtt <= 0.2
    assert sent == received
