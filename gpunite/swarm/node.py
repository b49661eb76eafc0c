"""hivemind wiring: one libp2p daemon and one DHT node per peer, run on a background asyncio loop.

The peer's main thread (which trains) calls the blocking methods here; they hand coroutines to the loop
thread. The DHT node lives in this process (not hivemind.DHT's child process) so that a killed peer takes
its daemon with it: p2pd exits as soon as its client connection closes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from gpunite.errors import GpuniteError
from gpunite.identity import RecordError
from gpunite.swarm.protocol import ByteCounter, ProtocolError, read_frame, write_frame

log = logging.getLogger("gpunite.swarm.node")
T = TypeVar("T")
# A handler gets (header, body, caller's p2p id) and returns (header, body).
Handler = Callable[[dict[str, Any], bytes, str], Awaitable[tuple[dict[str, Any], bytes]]]


class SwarmError(GpuniteError):
    """The swarm could not be reached or did not answer in time."""


class SwarmNode:
    """A libp2p daemon + hivemind DHT node with blocking helpers for signed records and request streams."""

    def __init__(self, initial_peers: list[str] | None = None, host: str = "127.0.0.1", port: int = 0,
                 request_timeout_s: float = 30.0) -> None:
        self.initial_peers = list(initial_peers or [])
        self.host = host
        self.port = port
        self.request_timeout_s = request_timeout_s
        self.counter = ByteCounter()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gpunite-swarm", daemon=True)
        self._p2p: Any = None
        self._dht: Any = None
        self.p2p_id = ""
        self.maddrs: list[str] = []
        self._bad_seen: set[bytes] = set()

    # ----- life cycle -----
    def start(self) -> SwarmNode:
        self._thread.start()
        try:
            self.run(self._start(), timeout=60)
        except Exception as exc:
            self.close()
            where = f" through {self.initial_peers[0]}" if self.initial_peers else ""
            raise SwarmError(f"could not start the swarm node{where}: {exc}; check the address and that a peer "
                             "is running there") from None
        return self

    async def _start(self) -> None:
        from hivemind.dht.node import DHTNode
        from hivemind.p2p import P2P

        self._p2p = await P2P.create(
            initial_peers=self.initial_peers or None,
            host_maddrs=[f"/ip4/{self.host}/tcp/{self.port}"],
            nat_port_map=False,
        )
        self._dht = await DHTNode.create(p2p=self._p2p, initial_peers=self.initial_peers or None,
                                         wait_timeout=5, blacklist_time=1.0)
        self.p2p_id = self._p2p.peer_id.to_base58()
        self.maddrs = [str(m) for m in await self._p2p.get_visible_maddrs()]

    def close(self) -> None:
        if self._loop.is_running():
            try:
                self.run(self._shutdown(), timeout=10)
            except Exception as exc:  # closing must never raise: the peer is going away anyway
                log.debug("swarm shutdown: %s", exc)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    async def _shutdown(self) -> None:
        current = asyncio.current_task()
        others = [task for task in asyncio.all_tasks() if task is not current]
        for task in others:
            task.cancel()
        if others:
            await asyncio.wait(others, timeout=2)
        if self._dht is not None:
            try:
                await asyncio.wait_for(self._dht.shutdown(), timeout=3)
            except asyncio.TimeoutError:
                log.debug("DHT node did not shut down within 3 s")
        if self._p2p is not None:
            await self._p2p.shutdown()

    def run(self, coro: Awaitable[T], timeout: float | None = None) -> T:
        """Run a coroutine on the swarm loop and wait for its result."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise SwarmError(f"swarm operation timed out after {timeout} s") from None

    def submit(self, coro: Awaitable[Any]) -> Any:
        """Start a coroutine on the swarm loop without waiting (a concurrent.futures.Future)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]

    # ----- DHT: signed records -----
    def store(self, key: str, subkey: str, value: bytes, ttl_s: float) -> bool:
        from hivemind.utils import get_dht_time

        return self.run(self._dht.store(key, value, get_dht_time() + ttl_s, subkey=subkey), timeout=30)

    def get(self, key: str) -> dict[str, bytes]:
        """The live values under key, by subkey (raw bytes; callers verify them)."""
        found = self.run(self._dht.get(key, latest=True), timeout=30)
        if found is None or not isinstance(found.value, dict):
            return {}
        return {str(sub): item.value for sub, item in found.value.items() if isinstance(item.value, bytes)}

    def get_records(self, key: str, parse: Callable[[bytes], Any], signer_subkey: bool = True) -> dict[str, Any]:
        """Values under key that parse (signature and schema checked); bad ones are logged and dropped.

        With signer_subkey, a record counts only under its own signer's peer id (no one speaks for another).
        """
        records = {}
        for subkey, raw in self.get(key).items():
            try:
                record = parse(raw)
            except (RecordError, ValueError) as exc:
                self._log_bad(raw, "dropped a bad record under %s/%s: %s", key, subkey[:16], exc)
                continue
            if signer_subkey and record.peer_id != subkey:
                self._log_bad(raw, "dropped a record under %s stored at subkey %s by peer %s", key, subkey[:16],
                              record.peer_id[:16])
                continue
            records[subkey] = record
        return records

    def _log_bad(self, raw: bytes, message: str, *args: Any) -> None:
        """Warn once per bad value (polling reads the same one again and again)."""
        digest = hashlib.sha256(raw).digest()
        if digest not in self._bad_seen:
            self._bad_seen.add(digest)
            log.warning(message, *args)

    # ----- P2P request streams -----
    def add_handler(self, name: str, handler: Handler, max_request_bytes: int) -> None:
        self.run(self._add_handler(name, handler, max_request_bytes), timeout=30)

    async def _add_handler(self, name: str, handler: Handler, max_request_bytes: int) -> None:
        async def on_stream(stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            caller = stream_info.peer_id.to_base58()
            try:
                header, body = await asyncio.wait_for(read_frame(reader, max_request_bytes, self.counter),
                                                      self.request_timeout_s)
                reply_header, reply_body = await handler(header, body, caller)
            except (ProtocolError, GpuniteError, ValueError, asyncio.TimeoutError) as exc:
                log.warning("%s request from %s refused: %s", name, caller[-8:], exc)
                reply_header, reply_body = {"error": str(exc) or type(exc).__name__}, b""
            except Exception as exc:  # a handler bug must answer (and be logged), not drop the stream silently
                log.exception("%s handler failed for %s", name, caller[-8:])
                reply_header, reply_body = {"error": f"internal error: {type(exc).__name__}"}, b""
            try:
                await write_frame(writer, reply_header, reply_body, self.counter)
            except (ConnectionError, OSError) as exc:
                log.info("%s reply to %s not delivered: %s", name, caller[-8:], exc)
            finally:
                writer.close()

        await self._p2p.add_binary_stream_handler(name, on_stream)

    def request(self, p2p_id: str, name: str, header: dict[str, Any], body: bytes = b"", *,
                max_reply_bytes: int, maddrs: list[str] | None = None,
                timeout: float | None = None) -> tuple[dict[str, Any], bytes]:
        """Send one request frame to a peer and read its one reply frame (ProtocolError/SwarmError on failure)."""
        timeout = timeout or self.request_timeout_s
        try:
            return self.run(asyncio.wait_for(
                self._request(p2p_id, name, header, body, max_reply_bytes, maddrs or []), timeout), timeout + 5)
        except asyncio.TimeoutError:
            raise SwarmError(f"{name} request to {p2p_id[-8:]} timed out after {timeout} s") from None

    async def _request(self, p2p_id: str, name: str, header: dict[str, Any], body: bytes, max_reply_bytes: int,
                       maddrs: list[str]) -> tuple[dict[str, Any], bytes]:
        from hivemind.p2p import PeerID
        from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
        from hivemind.utils.multiaddr import Multiaddr

        try:
            peer = PeerID.from_base58(p2p_id)
        except ValueError:
            raise SwarmError(f"{p2p_id[:16]!r} is not a libp2p peer id") from None
        try:
            try:
                _, reader, writer = await self._p2p.call_binary_stream_handler(peer, name)
            except P2PDaemonError:
                if not maddrs:
                    raise
                # The daemon may not know where the peer is: dial its announced addresses (without /p2p/<id>).
                await self._p2p._client.connect(peer, [Multiaddr(m.split("/p2p/")[0]) for m in maddrs])
                _, reader, writer = await self._p2p.call_binary_stream_handler(peer, name)
        except (P2PDaemonError, ConnectionError, OSError) as exc:
            raise SwarmError(f"cannot open a {name} stream to {p2p_id[-8:]}: {str(exc)[:200]}") from None
        try:
            await write_frame(writer, header, body, self.counter)
            return await read_frame(reader, max_reply_bytes, self.counter)
        except (ConnectionError, OSError) as exc:
            raise SwarmError(f"{name} stream to {p2p_id[-8:]} broke: {exc}") from None
        finally:
            writer.close()
