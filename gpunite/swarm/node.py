"""hivemind wiring: one libp2p daemon and one DHT node per peer, run on a background asyncio loop.

The peer's main thread (which trains) calls the blocking methods here; they hand coroutines to the loop
thread. The DHT node lives in this process (not hivemind.DHT's child process) so that a killed peer takes
its daemon with it: p2pd exits as soon as its client connection closes.

Request streams have two deadlines: a fixed one to open the stream, send the request and get the reply's
header (the other peer is there and answering), then one for the reply's body that grows with its announced
length at the slowest link speed a peer may have (`TransferBudget`), so a 1 Mbit/s peer can fetch a
global state or a shard that takes minutes, while a peer that stops answering is still given up on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from gpunite.errors import GpuniteError
from gpunite.identity import RecordError
from gpunite.swarm.protocol import ByteCounter, ProtocolError, TruncatedFrameError, read_frame, write_frame

log = logging.getLogger("gpunite.swarm.node")
T = TypeVar("T")
# A handler gets (header, body, caller's p2p id) and returns (header, body).
Handler = Callable[[dict[str, Any], bytes, str], Awaitable[tuple[dict[str, Any], bytes]]]


class SwarmError(GpuniteError):
    """The swarm could not be reached or did not answer in time."""


class StreamBrokenError(SwarmError):
    """A request stream broke after it was opened (connection reset or closed mid-frame)."""


# The slowest link a peer of a run may have ("bad" test-bed profile: one peer at 1 Mbit/s).
FLOOR_BITS_PER_S = 1e6
DHT_TIMES_KEPT = 20  # reads and stores whose durations slow_dht_s looks at


class TransferBudget:
    """Seconds a transfer of n bytes may take: its bytes at the floor link speed, with a margin, plus a start.

    The floor is the assumed one (FLOOR_BITS_PER_S) or, once this peer has seen slower big transfers, the
    slowest of its recent ones: a peer behind a link slower than assumed still gets the time it needs.
    """

    MARGIN = 2.0  # TCP slow start, a link shared with other transfers, a busy sender
    MEASURE_MIN_BYTES = 256 * 1024  # smaller transfers are dominated by latency, not bandwidth
    KEEP = 8  # recent measurements the floor is taken from

    def __init__(self, start_s: float = 5.0, floor_bits_per_s: float = FLOOR_BITS_PER_S) -> None:
        if floor_bits_per_s <= 0 or start_s < 0:
            raise ValueError("a transfer budget needs floor_bits_per_s > 0 and start_s >= 0")
        self.start_s = start_s
        self.assumed_bits_per_s = floor_bits_per_s
        self._measured: deque[float] = deque(maxlen=self.KEEP)

    @property
    def floor_bits_per_s(self) -> float:
        return min([self.assumed_bits_per_s, *self._measured])

    def typical_bits_per_s(self, unmeasured: float) -> float:
        """The median speed of the recent big transfers (`unmeasured` before any): for planning waits."""
        if not self._measured:
            return unmeasured
        ordered = sorted(self._measured)
        return ordered[len(ordered) // 2]

    def transfer_s(self, n_bytes: int) -> float:
        """Time for the bytes alone at the floor speed, with the margin."""
        return self.MARGIN * 8.0 * max(n_bytes, 0) / self.floor_bits_per_s

    def seconds_for(self, n_bytes: int) -> float:
        return self.start_s + self.transfer_s(n_bytes)

    def observe(self, n_bytes: int, seconds: float) -> None:
        """A completed transfer's size and duration (only big ones say anything about the link)."""
        if n_bytes >= self.MEASURE_MIN_BYTES and seconds > 0:
            self._measured.append(8.0 * n_bytes / seconds)


class SwarmNode:
    """A libp2p daemon + hivemind DHT node with blocking helpers for signed records and request streams."""

    def __init__(self, initial_peers: list[str] | None = None, host: str = "127.0.0.1", port: int = 0,
                 request_timeout_s: float = 30.0, floor_bits_per_s: float = FLOOR_BITS_PER_S) -> None:
        self.initial_peers = list(initial_peers or [])
        self.host = host
        self.port = port
        self.request_timeout_s = request_timeout_s  # open a stream, send a request, get the reply header
        self.budget = TransferBudget(floor_bits_per_s=floor_bits_per_s)
        self.counter = ByteCounter()
        # libp2p id -> time.time() of the last request frame it sent us or reply header it sent back: proof
        # of life that needs no DHT round trip (read by Membership when a heartbeat is late).
        self.last_contact: dict[str, float] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gpunite-swarm", daemon=True)
        self._p2p: Any = None
        self._dht: Any = None
        self.p2p_id = ""
        self.maddrs: list[str] = []
        self._bad_seen: set[bytes] = set()
        self._prefetched = threading.local()  # per thread: key -> values read ahead (`read_ahead`)
        self._dht_times: deque[float] = deque(maxlen=DHT_TIMES_KEPT)  # seconds the last reads and stores took
        self._dht_times_lock = threading.Lock()

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

        return self._timed(self._dht.store(key, value, get_dht_time() + ttl_s, subkey=subkey), timeout=30)

    def _timed(self, coro: Awaitable[T], timeout: float) -> T:
        """`run` a DHT read or store, keeping how long it took (`slow_dht_s`)."""
        started = time.monotonic()
        try:
            return self.run(coro, timeout=timeout)
        finally:
            with self._dht_times_lock:
                self._dht_times.append(time.monotonic() - started)

    @property
    def slow_dht_s(self) -> float:
        """The slowest of the last DHT_TIMES_KEPT reads and stores made here: about how long a record takes to
        get through the DHT now (seconds on a saturated link or a busy CPU, where it is milliseconds at rest)."""
        with self._dht_times_lock:
            return max(self._dht_times, default=0.0)

    def get(self, key: str) -> dict[str, bytes]:
        """The live values under key, by subkey (raw bytes; callers verify them)."""
        return self.get_many([key])[key]

    @contextlib.contextmanager
    def read_ahead(self, keys: Sequence[str]) -> Iterator[None]:
        """Read these keys in one traversal now; inside the block, this thread's first read of each is answered
        from it (later reads of a key go to the network again, so a loop waiting for records still sees them
        arrive). A polling loop that reads several keys an iteration pays one read's round trips, not one per key."""
        ahead = self.get_many(keys)
        self._prefetched.values = ahead
        try:
            yield
        finally:
            self._prefetched.values = {}

    def get_many(self, keys: Sequence[str]) -> dict[str, dict[str, bytes]]:
        """The live values under each key, by subkey, found in one DHT traversal: each node visited is asked
        for every key in one request, so reading n keys costs the round trips of one read, not n."""
        keys = list(dict.fromkeys(keys))
        ahead: dict[str, dict[str, bytes]] = getattr(self._prefetched, "values", {})
        values = {key: ahead.pop(key) for key in keys if key in ahead}
        wanted = [key for key in keys if key not in values]
        if not wanted:
            return values
        found = self._timed(self._dht.get_many(wanted, sufficient_expiration_time=float("inf")), timeout=30)
        for key in wanted:
            item = found.get(key)
            values[key] = (
                {str(sub): v.value for sub, v in item.value.items() if isinstance(v.value, bytes)}
                if item is not None and isinstance(item.value, dict) else {}
            )
        return values

    def get_records(self, key: str, parse: Callable[[bytes], Any], signer_subkey: bool = True) -> dict[str, Any]:
        """Values under key that parse (signature and schema checked); bad ones are logged and dropped.

        With signer_subkey, a record counts only under its own signer's peer id (no one speaks for another).
        """
        return self.get_many_records({key: parse}, signer_subkey)[key]

    def get_many_records(self, parsers: Mapping[str, Callable[[bytes], Any]], signer_subkey: bool = True
                         ) -> dict[str, dict[str, Any]]:
        """`get_records` of several keys (each with its parser) in one DHT traversal (`get_many`), by key."""
        found = {}
        for key, values in self.get_many(list(parsers)).items():
            records = found[key] = {}
            for subkey, raw in values.items():
                try:
                    record = parsers[key](raw)
                except (RecordError, ValueError) as exc:
                    self._log_bad(raw, "dropped a bad record under %s/%s: %s", key, subkey[:16], exc)
                    continue
                if signer_subkey and record.peer_id != subkey:
                    self._log_bad(raw, "dropped a record under %s stored at subkey %s by peer %s", key, subkey[:16],
                                  record.peer_id[:16])
                    continue
                records[subkey] = record
        return found

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
                self.last_contact[caller] = time.time()
                reply_header, reply_body = await handler(header, body, caller)
            except (ProtocolError, GpuniteError, ValueError, asyncio.TimeoutError) as exc:
                log.warning("%s request from %s refused: %s", name, caller[-8:], exc)
                reply_header, reply_body = {"error": str(exc) or type(exc).__name__}, b""
            except Exception as exc:  # a handler bug must answer (and be logged), not drop the stream silently
                log.exception("%s handler failed for %s", name, caller[-8:])
                reply_header, reply_body = {"error": f"internal error: {type(exc).__name__}"}, b""
            try:
                # A caller that stops reading (cut off, frozen) must not pin this reply forever.
                await asyncio.wait_for(write_frame(writer, reply_header, reply_body, self.counter),
                                       self.budget.seconds_for(len(reply_body)))
            except (ConnectionError, OSError, asyncio.TimeoutError) as exc:
                log.info("%s reply to %s not delivered: %s", name, caller[-8:],
                         str(exc) or type(exc).__name__)
            finally:
                writer.close()

        await self._p2p.add_binary_stream_handler(name, on_stream)

    def request(self, p2p_id: str, name: str, header: dict[str, Any], body: bytes = b"", *,
                max_reply_bytes: int, maddrs: list[str] | None = None,
                timeout: float | None = None) -> tuple[dict[str, Any], bytes]:
        """Send one request frame to a peer and read its one reply frame (ProtocolError/SwarmError if not).

        timeout bounds opening the stream, sending the request and the reply's header (default
        request_timeout_s); the reply's body then gets the time its announced size needs (`self.budget`).
        """
        timeout = timeout or self.request_timeout_s
        # The loop thread applies the real deadlines; this one only guards against a wedged loop.
        wedged_s = timeout + self.budget.seconds_for(len(body) + max_reply_bytes) + 5
        try:
            return self.run(self._request(p2p_id, name, header, body, max_reply_bytes, maddrs or [], timeout),
                            wedged_s)
        except (StreamBrokenError, TruncatedFrameError) as exc:
            # Every request is a read (handlers serve data and change nothing), so a stream that broke after
            # it opened, as libp2p streams now and then do on a busy machine, is tried once more.
            log.info("%s stream to %s broke (%s); retrying once", name, p2p_id[-8:], exc)
        return self.run(self._request(p2p_id, name, header, body, max_reply_bytes, maddrs or [], timeout),
                        wedged_s)

    async def _request(self, p2p_id: str, name: str, header: dict[str, Any], body: bytes,
                       max_reply_bytes: int, maddrs: list[str], timeout: float
                       ) -> tuple[dict[str, Any], bytes]:
        reply_started: list[tuple[int, float]] = []  # (announced body length, when it was announced)
        header_arrived = asyncio.Event()

        def body_timeout(body_len: int) -> float:
            self.last_contact[p2p_id] = time.time()
            reply_started.append((body_len, time.monotonic()))
            header_arrived.set()
            return self.budget.seconds_for(body_len)

        exchange = asyncio.ensure_future(
            self._exchange(p2p_id, name, header, body, max_reply_bytes, maddrs, body_timeout))
        waiter = asyncio.ensure_future(header_arrived.wait())
        try:
            # First deadline: the stream opens, our request goes out, the reply's header comes back.
            done, _ = await asyncio.wait({exchange, waiter}, return_when=asyncio.FIRST_COMPLETED,
                                         timeout=timeout + self.budget.transfer_s(len(body)))
        finally:
            waiter.cancel()
        if not done:
            exchange.cancel()
            raise SwarmError(f"{name} request to {p2p_id[-8:]} got no reply within {timeout:.0f} s")
        try:
            # Second deadline, inside read_frame: the body's bytes at the floor link speed.
            reply_header, reply_body = await exchange
        except asyncio.TimeoutError:
            size = reply_started[0][0] if reply_started else 0
            raise SwarmError(
                f"{name} reply from {p2p_id[-8:]} ({size} bytes) did not arrive within "
                f"{self.budget.seconds_for(size):.0f} s (allowing {self.budget.floor_bits_per_s / 1e6:.2g} "
                "Mbit/s); the peer or its link stalled") from None
        if reply_started:
            size, since = reply_started[0]
            self.budget.observe(size, time.monotonic() - since)
        return reply_header, reply_body

    async def _exchange(self, p2p_id: str, name: str, header: dict[str, Any], body: bytes,
                        max_reply_bytes: int, maddrs: list[str], body_timeout: Callable[[int], float]
                        ) -> tuple[dict[str, Any], bytes]:
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
            return await read_frame(reader, max_reply_bytes, self.counter, body_timeout=body_timeout)
        except (ConnectionError, OSError) as exc:
            raise StreamBrokenError(f"{name} stream to {p2p_id[-8:]} broke: {exc}") from None
        finally:
            writer.close()
