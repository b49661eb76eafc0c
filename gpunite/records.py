"""The signed records peers exchange and keep in their ledgers: their fields, types and ids.

Every record is a JSON object signed with `gpunite.identity` (fields `signer`, `signature` added).
The swarm publishes them, the proof layer checks them, the ledger stores them and computes credits.
Parsing a record from outside goes through `parse_record`, which checks the signature and the schema.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from gpunite.identity import RecordError, canonical_json, peer_id_of, record_hash, verify_record

_R = TypeVar("_R")
HEX64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
GENESIS = "0" * 64


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    signer: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    signature: str | None = Field(None, pattern=r"^[0-9a-f]{128}$")

    @property
    def peer_id(self) -> str:
        if not self.signer:
            raise RecordError("record is not signed")
        return peer_id_of(self.signer)

    def body(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"signer", "signature"})

    @property
    def record_id(self) -> str:
        """Hash of the whole signed record: its id in the ledger."""
        return record_hash(self.model_dump(mode="json"))


class WorkUnit(BaseModel):
    """A slice of a content-addressed shard: sequences [first, first + count) of seq_len + 1 tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    shard: HEX64
    first: int = Field(ge=0)
    count: int = Field(gt=0)


class Heartbeat(_Record):
    kind: Literal["heartbeat"] = "heartbeat"
    run_id: HEX64
    round: int = Field(ge=0)
    weights_hash: HEX64 | str
    roles: list[str]
    maddrs: list[str] = Field(max_length=16)
    p2p_id: str = Field(max_length=128)
    time: float
    bans: str = Field("", max_length=64)  # digest of the bans this round is judged by ("" for none)


class HostRecord(_Record):
    """A peer's hardware, measured by `gpunite doctor`, and who runs it."""

    kind: Literal["host"] = "host"
    host_name: str = Field(max_length=128)
    user_name: str = Field("", max_length=128)
    team: str = Field("", max_length=128)
    device: str = Field(max_length=256)
    memory_gb: float = Field(ge=0)
    tflops: float = Field(ge=0)
    serves_model: str | None = None  # weights hash the peer serves, when it hosts
    api_url: str | None = Field(None, max_length=256)  # its OpenAI-compatible endpoint, when it hosts
    max_batch: int | None = Field(None, gt=0)
    time: float


class Contribution(_Record):
    """A trainer's commitment for one round, published before any verifier is chosen."""

    kind: Literal["contribution"] = "contribution"
    run_id: HEX64
    round: int = Field(ge=0)
    base_hash: HEX64
    work_units: list[WorkUnit] = Field(max_length=100_000)
    inner_steps: int = Field(ge=0)
    tokens: int = Field(ge=0)
    trail_interval: int = Field(gt=0)
    trail: list[HEX64] = Field(max_length=100_000)  # training-state hash (weights, AdamW, step) at steps 0, k, ..., inner_steps
    delta_hash: HEX64  # sha256 of the compressed pseudo-gradient bytes
    slice_hashes: list[HEX64] = Field(default_factory=list, max_length=4096)
    delta_norm: float = Field(ge=0)
    claimed_flops: float = Field(ge=0)
    time: float
    # train.overlap: the first rebase_step inner steps ran, while the merge giving the base was in flight, from
    # the global weights before the base (start_hash) less this trainer's own delta committed to the round
    # before (start_contribution, its record id; None: nothing subtracted), then were carried onto the base.
    start_hash: HEX64 | None = None
    start_contribution: HEX64 | None = None
    rebase_step: int = Field(0, ge=0)


class Verdict(_Record):
    """A verifier's signed result of auditing one contribution."""

    kind: Literal["verdict"] = "verdict"
    run_id: HEX64
    round: int = Field(ge=0)
    contribution: HEX64  # record id of the contribution
    trainer: str = Field(max_length=64)  # peer id of the contribution's signer
    accept: bool
    reason: str = Field(max_length=1024)
    segment: int = Field(ge=-1)  # trail segment replayed, -1 when no replay was needed
    distance: float | None = None  # replay distance / honest update norm
    replay_flops: float = Field(ge=0)
    time: float


class Rejection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    contribution: HEX64
    trainer: str = Field(max_length=64)
    reason: str = Field(max_length=1024)
    cheat: bool = False  # proven cheating (bans the trainer) rather than late or malformed


class Block(_Record):
    """The signed summary of a round; every honest peer signs the same content (same `block_hash`)."""

    kind: Literal["block"] = "block"
    run_id: HEX64
    round: int = Field(ge=0)
    prev: HEX64  # block_hash of the previous round, GENESIS for round 0
    accepted: list[HEX64]  # contribution record ids merged into the weights
    verdicts: list[HEX64] = Field(default_factory=list)  # verdict record ids the merge relied on
    rejected: list[Rejection] = Field(default_factory=list)
    weights_hash: HEX64  # global weights after this round
    tokens: int = Field(ge=0)
    time: float

    @property
    def block_hash(self) -> str:
        """Hash of the content every honest peer agrees on (not who signed it, nor when)."""
        content = self.model_dump(mode="json", exclude={"signer", "signature", "time"})
        return hashlib.sha256(canonical_json(content)).hexdigest()


class Usage(_Record):
    """A host's signed record of a served request (quotas and hosting credit come from these)."""

    kind: Literal["usage"] = "usage"
    run_id: str = Field(max_length=64)
    caller: str = Field(max_length=64)  # peer id of the caller, or "anonymous"
    request_id: str = Field(max_length=128)  # the caller's nonce: one usage record per request
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    flops: float = Field(ge=0)
    day: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}$")
    time: float


AnyRecord = Annotated[
    Union[Heartbeat, HostRecord, Contribution, Verdict, Block, Usage], Field(discriminator="kind")
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(AnyRecord)
KINDS = ("heartbeat", "host", "contribution", "verdict", "block", "usage")


def sign_record(identity, record: _Record) -> _Record:
    """The record, signed by identity."""
    signed = identity.sign(record.body())
    return type(record).model_validate(signed)


def parse_record(data: dict[str, Any] | bytes) -> _Record:
    """A verified, schema-checked record from untrusted JSON (bytes or an already-parsed object)."""
    if isinstance(data, (bytes, bytearray)):
        from gpunite.identity import decode_record

        raw = decode_record(bytes(data))
    else:
        raw = verify_record(data)
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        raise RecordError(f"record does not fit its schema: {where}: {err.get('msg')}") from None


def parse_record_as(data: dict[str, Any] | bytes, record_type: type[_R]) -> _R:
    """Like parse_record, and the record must be of record_type (a DHT key holds one kind only)."""
    record = parse_record(data)
    if not isinstance(record, record_type):
        raise RecordError(f"expected a {record_type.__name__} record, got a {record.kind} record")
    return record


def record_bytes(record: _Record) -> bytes:
    return canonical_json(record.model_dump(mode="json"))
