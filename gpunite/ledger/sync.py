"""Anti-entropy of two peers' ledgers over a hivemind P2P stream: find the difference, swap missing records.

Record ids are sha256 hashes, so they spread evenly over hex prefixes. The client walks a trie of id
prefixes: it asks the server for the digest of a prefix, and the server answers either with the ids
under it (when there are at most `leaf_ids`) or with (count, hash of sorted ids) of its 16 children.
Children whose digests match are skipped, so two ledgers that differ by d records cost about
d * log16(n) digest entries, not n ids. Then the client fetches the records it lacks and pushes the
ones the server lacks, each as canonical JSON that the receiver verifies and parses before storing.

Messages are a 4-byte big-endian length and a JSON object; every size is bounded (bytes per message,
ids and records per message, requests per stream) and each read has a timeout. A peer that sends
garbage gets its stream closed and a log line; a record that fails verification is dropped and
counted, never stored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

from gpunite.errors import GpuniteError
from gpunite.identity import MAX_RECORD_BYTES
from gpunite.util import sha256_bytes

log = logging.getLogger(__name__)

HANDLER_NAME = "gpunite.ledger.sync.v1"
MAX_MESSAGE_BYTES = 8 << 20
MAX_IDS_PER_MESSAGE = 2048
MAX_RECORDS_PER_MESSAGE = 512
MAX_REQUESTS_PER_STREAM = 100_000
LEAF_IDS = 256
READ_TIMEOUT_S = 60.0
_ID = re.compile(r"^[0-9a-f]{64}$")
_PREFIX = re.compile(r"^[0-9a-f]{0,63}$")


class SyncError(GpuniteError):
    """A sync that could not finish: the peer is unreachable or broke the protocol."""


class _ProtocolError(Exception):
    pass


async def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    # ensure_ascii=False keeps non-ASCII text as UTF-8, so quoting a record at most doubles its size
    data = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()
    if len(data) > MAX_MESSAGE_BYTES:
        raise _ProtocolError(f"message of {len(data)} bytes is over the limit")
    writer.write(len(data).to_bytes(4, "big") + data)
    await writer.drain()


async def _receive(reader: asyncio.StreamReader, timeout: float) -> dict[str, Any] | None:
    """The next message, or None when the other side closed the stream cleanly."""
    try:
        header = await asyncio.wait_for(reader.readexactly(4), timeout)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise _ProtocolError("stream ended inside a message header") from None
    size = int.from_bytes(header, "big")
    if size > MAX_MESSAGE_BYTES:
        raise _ProtocolError(f"peer announced a {size}-byte message, over the {MAX_MESSAGE_BYTES}-byte limit")
    try:
        data = await asyncio.wait_for(reader.readexactly(size), timeout)
    except asyncio.IncompleteReadError:
        raise _ProtocolError("stream ended inside a message") from None
    try:
        message = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _ProtocolError("message is not JSON") from None
    if not isinstance(message, dict):
        raise _ProtocolError("message is not a JSON object")
    return message


def _digest_reply(ledger, prefix: str, leaf_ids: int) -> dict[str, Any]:
    if ledger.count_prefix(prefix) <= leaf_ids:
        return {"ids": ledger.ids(prefix=prefix)}
    return {"children": {child: list(value) for child, value in ledger.prefix_counts(prefix).items()}}


def _records_reply(ledger, ids: list[str]) -> dict[str, Any]:
    bodies = ledger.get(ids)
    records: list[str] = []
    budget = MAX_MESSAGE_BYTES // 2  # JSON string escaping at most doubles the size of JSON text
    for record_id in ids:
        body = bodies.get(record_id)
        if body is None:
            continue
        if len(body) > budget and records:
            break
        budget -= len(body)
        records.append(body.decode())
    return {"records": records}


def _decode_records(items: Any, expected: set[str] | None = None) -> tuple[list[bytes], int]:
    """Record bytes from a wire list (only expected ids when given), and how many items were dropped."""
    if not isinstance(items, list) or len(items) > MAX_RECORDS_PER_MESSAGE:
        raise _ProtocolError(f"records field is not a list of at most {MAX_RECORDS_PER_MESSAGE} items")
    out, dropped = [], 0
    for item in items:
        if not isinstance(item, str) or len(item) > MAX_RECORD_BYTES:
            dropped += 1
            continue
        data = item.encode()
        if expected is not None and sha256_bytes(data) not in expected:
            dropped += 1
            continue
        out.append(data)
    return out, dropped


def _valid_ids(items: Any, limit: int) -> list[str]:
    if (
        not isinstance(items, list)
        or len(items) > limit
        or not all(isinstance(item, str) and _ID.match(item) for item in items)
    ):
        raise _ProtocolError(f"ids field is not a list of at most {limit} record ids")
    return items


async def serve_sync(p2p, ledger, leaf_ids: int = LEAF_IDS, timeout: float = READ_TIMEOUT_S) -> None:
    """Answer sync requests from other peers on this hivemind P2P object (until it shuts down)."""

    async def handle(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str(stream_info.peer_id)[-12:]
        added = refused = 0
        try:
            for _ in range(MAX_REQUESTS_PER_STREAM):
                request = await _receive(reader, timeout)
                if request is None or request.get("op") == "bye":
                    break
                op = request.get("op")
                if op == "digest":
                    prefix = request.get("prefix")
                    if not isinstance(prefix, str) or not _PREFIX.match(prefix):
                        raise _ProtocolError("digest prefix is not a hex string shorter than an id")
                    reply = await asyncio.to_thread(_digest_reply, ledger, prefix, leaf_ids)
                elif op == "get":
                    ids = _valid_ids(request.get("ids"), MAX_IDS_PER_MESSAGE)
                    reply = await asyncio.to_thread(_records_reply, ledger, ids)
                elif op == "put":
                    records, dropped = _decode_records(request.get("records"))
                    new, reasons = await asyncio.to_thread(ledger.add_many, records)
                    added += new
                    refused += dropped + len(reasons)
                    for reason in reasons[:3]:
                        log.info("sync from %s: refused a record: %s", peer, reason)
                    reply = {"added": new, "refused": dropped + len(reasons)}
                else:
                    raise _ProtocolError(f"unknown op {op!r}")
                await _send(writer, reply)
        except (_ProtocolError, asyncio.TimeoutError, ConnectionError, OSError) as exc:
            log.warning("sync from %s: closing the stream: %s", peer, exc or type(exc).__name__)
        finally:
            if added or refused:
                log.info("sync from %s: stored %d new records, refused %d", peer, added, refused)
            writer.close()

    await p2p.add_binary_stream_handler(HANDLER_NAME, handle)


async def sync_with(p2p, peer_id, ledger, timeout: float = READ_TIMEOUT_S) -> tuple[int, int]:
    """One anti-entropy exchange with a peer serving `serve_sync`.

    Returns (records received and stored here, records sent and stored there).
    """
    try:
        _, reader, writer = await asyncio.wait_for(
            p2p.call_binary_stream_handler(peer_id, HANDLER_NAME), timeout
        )
    except Exception as exc:  # the daemon reports unreachable peers with several exception types
        raise SyncError(
            f"cannot open a sync stream to {peer_id}: {exc}; check that the peer is online"
        ) from None
    requests = 0

    async def call(message: dict[str, Any]) -> dict[str, Any]:
        nonlocal requests
        requests += 1
        if requests > MAX_REQUESTS_PER_STREAM:
            raise _ProtocolError("too many requests in one sync")
        await _send(writer, message)
        reply = await _receive(reader, timeout)
        if reply is None:
            raise _ProtocolError("peer closed the stream")
        return reply

    try:
        want, give = await _difference(call, ledger)
        received = await _fetch(call, ledger, want)
        sent = await _push(call, ledger, give)
        await _send(writer, {"op": "bye"})
        return received, sent
    except (_ProtocolError, asyncio.TimeoutError, ConnectionError, OSError) as exc:
        raise SyncError(f"sync with {peer_id} failed: {exc or type(exc).__name__}") from None
    finally:
        writer.close()


async def _difference(call, ledger) -> tuple[list[str], list[str]]:
    """(ids the peer has and we lack, ids we have and the peer lacks), by walking the prefix trie."""
    want: list[str] = []
    give: list[str] = []
    pending = [""]
    while pending:
        prefix = pending.pop()
        reply = await call({"op": "digest", "prefix": prefix})
        if "ids" in reply:
            theirs = set(_valid_ids(reply["ids"], max(LEAF_IDS, 1 << 16)))
            if any(not record_id.startswith(prefix) for record_id in theirs):
                raise _ProtocolError("digest reply has ids outside the asked prefix")
            mine = set(await asyncio.to_thread(ledger.ids, None, prefix))
            want += sorted(theirs - mine)
            give += sorted(mine - theirs)
            continue
        children = reply.get("children")
        if not isinstance(children, dict) or len(prefix) >= 63:
            raise _ProtocolError("digest reply has neither ids nor children")
        mine_children = await asyncio.to_thread(ledger.prefix_counts, prefix)
        for digit in "0123456789abcdef":
            child = prefix + digit
            theirs_entry = children.get(child)
            if theirs_entry is not None and (not isinstance(theirs_entry, list) or len(theirs_entry) != 2):
                raise _ProtocolError("malformed digest entry")
            mine_entry = mine_children.get(child)
            if theirs_entry is None:
                if mine_entry is not None:
                    give += await asyncio.to_thread(ledger.ids, None, child)
            elif mine_entry is None or list(mine_entry) != theirs_entry:
                pending.append(child)
    return want, give


async def _fetch(call, ledger, want: list[str]) -> int:
    received = 0
    queue = list(want)
    while queue:
        batch = queue[:MAX_IDS_PER_MESSAGE]
        reply = await call({"op": "get", "ids": batch})
        records, dropped = _decode_records(reply.get("records"), expected=set(batch))
        if dropped:
            log.warning("sync: peer sent %d records that were not asked for or too large; dropped", dropped)
        if not records:
            break  # the peer does not serve these; stop rather than loop
        added, reasons = await asyncio.to_thread(ledger.add_many, records)
        received += added
        for reason in reasons[:3]:
            log.warning("sync: dropped a record from the peer: %s", reason)
        got = {sha256_bytes(data) for data in records}  # what did not fit in this reply is asked for again
        queue = [record_id for record_id in queue if record_id not in got]
    return received


async def _push(call, ledger, give: list[str]) -> int:
    sent = 0
    for start in range(0, len(give), MAX_IDS_PER_MESSAGE):
        bodies = await asyncio.to_thread(ledger.get, give[start : start + MAX_IDS_PER_MESSAGE])
        batch: list[str] = []
        size = 0
        for body in bodies.values():
            if batch and (len(batch) >= MAX_RECORDS_PER_MESSAGE or size + len(body) > MAX_MESSAGE_BYTES // 2):
                sent += await _put(call, batch)
                batch, size = [], 0
            batch.append(body.decode())
            size += len(body)
        if batch:
            sent += await _put(call, batch)
    return sent


async def _put(call, batch: list[str]) -> int:
    reply = await call({"op": "put", "records": batch})
    added = reply.get("added")
    return added if isinstance(added, int) else 0
