"""The swarm's wire vocabulary: DHT keys, the swarm's own signed messages, and size-limited stream frames.

Everything a peer publishes in the DHT is a signed record as canonical JSON bytes (`gpunite.records` kinds
plus the two below); everything that travels over a P2P stream is one frame each way: a JSON header and
a binary body, each with a length prefix that the reader checks against a limit before reading, so a
hostile peer cannot make us allocate more than we agreed to receive.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gpunite.errors import GpuniteError
from gpunite.identity import RecordError, decode_record
from gpunite.records import HEX64, Rejection, _Record

PROTOCOL = "gpunite/1"
# Stream handler names (libp2p protocol ids).
HANDLE_STATE = "gpunite.state"  # latest global state (weights, outer momentum, plan, chain tip)
HANDLE_FILE = "gpunite.file"  # content-addressed data files: tokenizer, shard index, shards
HANDLE_SLICE = "gpunite.slice"  # slice i of a contributor's compressed pseudo-gradient
HANDLE_AGGREGATE = "gpunite.aggregate"  # aggregated slice i of a round, from its owner
HANDLE_TRAIL = "gpunite.trail"  # a trail segment (or the final entry) of a trainer's contribution, for audits

MAX_HEADER_BYTES = 64 * 1024
RUNS_KEY = "gpunite/runs"


class ProtocolError(GpuniteError):
    """A peer broke the wire protocol: an oversized or malformed frame, or an error reply."""


class TruncatedFrameError(ProtocolError):
    """The stream ended in the middle of a frame (the peer went away, or its stream was reset)."""


def run_key(run_id: str, what: str, round_index: int | None = None) -> str:
    """The DHT key for one kind of record of a run (per round where round_index is given)."""
    return f"gpunite/{run_id}/{what}" if round_index is None else f"gpunite/{run_id}/{what}/{round_index}"


def verdict_key(run_id: str, round_index: int, contribution_id: str) -> str:
    """Verdicts on one contribution, one per verifier (subkey: the verifier's peer id)."""
    return f"{run_key(run_id, 'verdict', round_index)}/{contribution_id}"


class RunAnnouncement(_Record):
    """A run's manifest as published by a peer that holds it; its sha256 must equal run_id."""

    kind: Literal["run"] = "run"
    run_id: HEX64
    name: str = Field(max_length=128)
    manifest_json: str = Field(max_length=256 * 1024)  # Manifest.canonical_bytes(), what run_id hashes
    time: float


class RosterEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    peer_id: str = Field(pattern=r"^[0-9a-f]{40}$")
    speed: float = Field(gt=0, le=1e9)  # relative speed for weighted work assignment


class RoundClose(_Record):
    """The round coordinator's decision: which contributions of `round` merge, and who trains the next round.

    round = -1 is the genesis close: no contributions, only the roster of round 0.
    """

    kind: Literal["close"] = "close"
    run_id: HEX64
    round: int = Field(ge=-1)
    base_hash: HEX64  # global weights the round's contributions started from
    prev_block: HEX64  # block hash of round - 1 (GENESIS before round 0)
    accepted: list[HEX64] = Field(max_length=4096)  # contribution record ids, in peer id order
    contributors: list[str] = Field(max_length=4096)  # their peer ids, same order
    rejected: list[Rejection] = Field(default_factory=list, max_length=4096)
    next_roster: list[RosterEntry] = Field(max_length=4096)
    coordinator_rank: int = Field(ge=0)
    # The audit beacon the merge followed (gpunite.proof.selection): the signer's signature over these ids.
    beacon: str = Field("", pattern=r"^([0-9a-f]{128})?$")
    beacon_contributions: list[HEX64] = Field(default_factory=list, max_length=4096)
    verdicts: list[HEX64] = Field(default_factory=list, max_length=16384)  # verdict ids the decisions relied on
    time: float


class AuditBeacon(_Record):
    """A round coordinator's audit beacon, published before it waits for verdicts: which contributions were
    committed in time, and its deterministic signature over them that decides audits (who, which segments)."""

    kind: Literal["beacon"] = "beacon"
    run_id: HEX64
    round: int = Field(ge=0)
    prev_block: HEX64
    contributions: list[HEX64] = Field(max_length=4096)
    beacon: str = Field(pattern=r"^[0-9a-f]{128}$")  # gpunite.proof.selection.sign_beacon over the above
    time: float


class SliceMissing(_Record):
    """A slice owner's note that it could not fetch its slice of some contributions from their trainers (a
    trainer killed right after committing). The coordinator tries those slices itself and leaves out of the
    close the contributions it cannot fetch either, so nothing accepted is merged short of a slice."""

    kind: Literal["slice_missing"] = "slice_missing"
    run_id: HEX64
    round: int = Field(ge=0)
    slice: int = Field(ge=0)
    trainers: list[str] = Field(max_length=4096)  # peer ids, sorted
    time: float


SWARM_KINDS: dict[str, type[_Record]] = {"run": RunAnnouncement, "close": RoundClose, "beacon": AuditBeacon,
                                         "slice_missing": SliceMissing}


def parse_swarm_message(data: bytes, expected: type[_Record]) -> _Record:
    """A verified swarm message of the expected type from untrusted bytes; RecordError otherwise."""
    raw = decode_record(data)
    if raw.get("kind") != expected.model_fields["kind"].default:
        raise RecordError(f"expected a {expected.__name__} record, got kind {raw.get('kind')!r}")
    try:
        return expected.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        raise RecordError(f"record does not fit its schema: {where}: {err.get('msg')}") from None


def parse_announcement(data: bytes) -> RunAnnouncement:
    return parse_swarm_message(data, RunAnnouncement)  # type: ignore[return-value]


# Trail states and final weights (floats) travel with bytes regrouped by their place in 4-byte words, then zstd:
# a float's sign and exponent bytes repeat, its low mantissa bytes do not (0.80 of the raw size on a tiny
# preset's trail state, 50 ms to pack on one core; zstd alone: 0.89). Only to a requester that asks for it.
FLOAT_ENCODING = "zstd-shuffle4"
_WORD = 4


def pack_floats(data: bytes) -> bytes:
    """Tensor bytes for the wire: byte k of every 4-byte word together (k = 0..3), then zstd (level 1)."""
    import numpy as np
    import zstandard

    whole = len(data) // _WORD * _WORD
    grouped = np.frombuffer(data, dtype=np.uint8, count=whole).reshape(-1, _WORD).T.tobytes() + data[whole:]
    return zstandard.ZstdCompressor(level=1, write_content_size=True).compress(grouped)


def unpack_floats(data: bytes, max_bytes: int) -> bytes:
    """The bytes `pack_floats` packed; ProtocolError for a corrupt frame or one inflating past max_bytes."""
    import numpy as np
    import zstandard

    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise ProtocolError(f"packed reply is not a zstd frame ({exc})") from None
    if size < 0 or size > max_bytes:
        raise ProtocolError(f"packed reply would inflate to {size} bytes (unknown or over the {max_bytes} limit)")
    try:
        grouped = zstandard.ZstdDecompressor().decompress(data, max_output_size=max_bytes)
    except zstandard.ZstdError as exc:
        raise ProtocolError(f"packed reply is corrupt ({exc})") from None
    if len(grouped) != size:
        raise ProtocolError(f"packed reply inflated to {len(grouped)} bytes, its frame says {size}")
    whole = size // _WORD * _WORD
    return np.frombuffer(grouped, dtype=np.uint8, count=whole).reshape(_WORD, -1).T.tobytes() + grouped[whole:]


class ByteCounter:
    """Bytes this peer wrote to and read from P2P streams (payloads and frame headers, as on the wire)."""

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0

    def snapshot(self) -> dict[str, int]:
        return {"bytes_sent": self.sent, "bytes_received": self.received}


async def write_frame(writer: asyncio.StreamWriter, header: dict[str, Any], body: bytes = b"",
                      counter: ByteCounter | None = None) -> None:
    """One frame: 4-byte header length, header JSON, 8-byte body length, body."""
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    if len(head) > MAX_HEADER_BYTES:
        raise ProtocolError(f"frame header of {len(head)} bytes is over the {MAX_HEADER_BYTES} limit")
    writer.write(len(head).to_bytes(4, "big") + head + len(body).to_bytes(8, "big"))
    view = memoryview(body)
    for offset in range(0, len(view), 1 << 16):
        writer.write(view[offset : offset + (1 << 16)])
    await writer.drain()
    if counter is not None:
        counter.sent += 12 + len(head) + len(body)


async def read_frame(reader: asyncio.StreamReader, max_body: int, counter: ByteCounter | None = None,
                     body_timeout: Callable[[int], float] | None = None) -> tuple[dict[str, Any], bytes]:
    """Read one frame, refusing a header or body longer than allowed before reading it.

    body_timeout, given the announced body length, returns the seconds its bytes may take to arrive
    (asyncio.TimeoutError past that): big bodies on slow links get the time their size needs.
    """
    try:
        head_len = int.from_bytes(await reader.readexactly(4), "big")
        if head_len > MAX_HEADER_BYTES:
            raise ProtocolError(f"peer sent a {head_len}-byte frame header, over the {MAX_HEADER_BYTES} limit")
        head = await reader.readexactly(head_len)
        body_len = int.from_bytes(await reader.readexactly(8), "big")
        if body_len > max_body:
            raise ProtocolError(f"peer sent a {body_len}-byte body, over the {max_body} limit for this message")
        if body_timeout is None:
            body = await reader.readexactly(body_len)
        else:
            body = await asyncio.wait_for(reader.readexactly(body_len), body_timeout(body_len))
    except asyncio.IncompleteReadError:
        raise TruncatedFrameError("peer closed the stream in the middle of a frame") from None
    if counter is not None:
        counter.received += 12 + head_len + body_len
    try:
        header = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ProtocolError("peer sent a frame header that is not JSON") from None
    if not isinstance(header, dict):
        raise ProtocolError("peer sent a frame header that is not a JSON object")
    if "error" in header:
        raise ProtocolError(f"peer replied with an error: {str(header['error'])[:300]}")
    return header, body
