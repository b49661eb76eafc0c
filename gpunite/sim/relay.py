"""A transparent TCP relay that adds a fixed one-way latency to every byte, in both directions, at full rate.

The kernel here has no netem, so the test bed adds latency in userspace: inside each peer's network namespace,
an nftables rule redirects every inbound TCP connection to this relay, which looks up the connection's
original destination (SO_ORIGINAL_DST), connects to it locally, and forwards each chunk `delay` seconds after
it arrived. Chunks queue while they wait, so throughput is kept (up to `buffer_bytes` in flight per
direction, then TCP flow control pushes back). A connection from peer A to peer B passes B's relay once, so
the A-B round trip gains 2 x delay. Bandwidth is limited by tc on the veth links, not here.

Run inside a namespace: `python -m gpunite.sim.relay --port 7999 --delay-ms 50`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import struct
from collections import deque

log = logging.getLogger("gpunite.sim.relay")

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
CHUNK_BYTES = 1 << 16


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where a connection redirected by nftables was going (IPv4)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed_ip = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed_ip), port


class DelayLine:
    """Forward one direction of a connection, each chunk `delay_s` after it was read."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float, buffer_bytes: int
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.delay_s = delay_s
        self.buffer_bytes = buffer_bytes
        self.queue: deque[tuple[float, bytes]] = deque()
        self.buffered = 0
        self.arrived = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()

    async def run(self) -> None:
        await asyncio.gather(self._read(), self._write())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await self.reader.read(CHUNK_BYTES)
            except OSError:  # a reset counts as the end of this direction
                data = b""
            self.queue.append((loop.time() + self.delay_s, data))
            self.arrived.set()
            if not data:
                return
            self.buffered += len(data)
            if self.buffered >= self.buffer_bytes:
                self.room.clear()
                await self.room.wait()

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.arrived.clear()
                await self.arrived.wait()
            due, data = self.queue.popleft()
            wait_s = due - loop.time()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            # an OSError here (the far side went away) ends the whole connection in _relay_connection
            if not data:
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                return
            self.writer.write(data)
            await self.writer.drain()
            self.buffered -= len(data)
            if self.buffered < self.buffer_bytes:
                self.room.set()


async def _relay_connection(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    delay_s: float,
    buffer_bytes: int,
) -> None:
    sock = client_writer.get_extra_info("socket")
    try:
        host, port = original_destination(sock)
        server_reader, server_writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        log.info("cannot relay a connection: %s", exc)  # usually a peer that has just stopped
        client_writer.close()
        return
    try:
        await asyncio.gather(
            DelayLine(client_reader, server_writer, delay_s, buffer_bytes).run(),
            DelayLine(server_reader, client_writer, delay_s, buffer_bytes).run(),
        )
    except OSError:
        pass
    finally:
        for writer in (client_writer, server_writer):
            writer.close()


async def serve(port: int, delay_s: float, buffer_bytes: int) -> None:
    server = await asyncio.start_server(
        lambda r, w: _relay_connection(r, w, delay_s, buffer_bytes),
        host="0.0.0.0",
        port=port,
        reuse_address=True,
    )
    print("ready", flush=True)  # the test bed waits for this line before it lets traffic in
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description="Delaying transparent TCP relay for the gpunite test bed.")
    parser.add_argument("--port", type=int, required=True, help="Port the nftables redirect points at.")
    parser.add_argument(
        "--delay-ms", type=float, required=True, help="One-way delay added in each direction."
    )
    parser.add_argument("--buffer-mb", type=float, default=16.0, help="Most bytes in flight per direction.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="relay: %(message)s")
    try:
        asyncio.run(serve(args.port, args.delay_ms / 1e3, int(args.buffer_mb * 1e6)))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
