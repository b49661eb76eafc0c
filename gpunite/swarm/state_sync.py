"""State sync: the global state a late joiner needs, as checked bytes, and content-addressed data files.

The global state at the start of round r is the flat weights W_r, the outer optimizer's momentum, the work
plan, the block of round r - 1 (whose weights_hash must equal the hash of W_r) and the round close of r - 1
(the roster of round r). It travels as one frame: a JSON header and safetensors bytes. The serving peer's
own AdamW moments ride along (`inner/...`, not part of the agreed state): a joiner that starts its inner
optimizer from them makes a first contribution of the usual size, where a fresh AdamW's first steps
(update ~ lr per coordinate) make one several times larger than its peers' and the norm bound rejects it.
Data files (the shard index, the tokenizer, shards) travel by hash and are written only after their hash
checks out. A host following the run asks for the weights alone (`state_to_frame(..., weights_only=True)`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from gpunite.identity import RecordError
from gpunite.proof.policy import Ban, BanList
from gpunite.records import Block, Heartbeat, parse_record, record_bytes
from gpunite.swarm.protocol import RoundClose, parse_swarm_message
from gpunite.train.weights import (
    TensorPayloadError,
    from_safetensors_bytes,
    to_safetensors_bytes,
    weights_hash,
)
from gpunite.util import atomic_write_bytes, sha256_bytes

log = logging.getLogger("gpunite.swarm.state_sync")


class StateSyncError(TensorPayloadError):
    """Global state or a data file from a peer that does not check out."""


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of the trainable parameters, in the order of the flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, model: torch.nn.Module) -> ParamLayout:
        from gpunite.train.weights import trainable_state

        state = trainable_state(model)
        return cls(tuple(state), tuple(tuple(t.shape) for t in state.values()))

    @property
    def numel(self) -> int:
        total = 0
        for shape in self.shapes:
            n = 1
            for dim in shape:
                n *= dim
            total += n
        return total

    def named(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of the flat vector under the parameter names (no copy)."""
        views, offset = {}, 0
        for name, shape in zip(self.names, self.shapes):
            n = 1
            for dim in shape:
                n *= dim
            views[name] = vector[offset : offset + n].view(shape)
            offset += n
        return views

    def hash(self, vector: torch.Tensor) -> str:
        """The weights hash of a flat vector: equal to gpunite.train.weights.model_hash of the model holding it."""
        return weights_hash(self.named(vector))


@dataclass
class GlobalState:
    round: int  # the round these weights start
    weights: torch.Tensor  # flat fp32
    momentum: torch.Tensor | None  # outer Nesterov buffer, None before the first outer step
    plan: dict[str, Any]  # WorkPlan.state_dict()
    tip: Block | None  # block of round - 1
    close: RoundClose | None  # close of round - 1: the roster of this round (None before the genesis close)
    weights_hash: str
    inner_optimizer: dict[str, torch.Tensor] | None = None  # the serving peer's AdamW state (a warm start)
    # With train.overlap: the global weights of round - 1, the base of round `round`'s contributions, so a
    # joiner can train, audit and own a slice of the round in flight (its hash is checked by the joiner).
    previous_weights: torch.Tensor | None = None
    # The bans proven before `round` (with their reasons and evidence): a joiner judges the round by them, as
    # every peer does; checked against the ban digests in the live peers' heartbeats (`check_bans`).
    bans: tuple[Ban, ...] = ()


INNER = "inner/"


def state_to_frame(state: GlobalState, weights_only: bool = False) -> tuple[dict[str, Any], bytes]:
    """The frame a peer serves its global state in; weights_only (what a host following the run asks for)
    leaves out the outer momentum, the previous weights and the AdamW warm start: 4 bytes per parameter of
    the 20 a joiner takes."""
    if weights_only:
        state = replace(state, momentum=None, inner_optimizer=None, previous_weights=None)
    tensors = {"weights": state.weights}
    if state.momentum is not None:
        tensors["momentum"] = state.momentum
    if state.previous_weights is not None:
        tensors["previous_weights"] = state.previous_weights
    for name, tensor in (state.inner_optimizer or {}).items():
        tensors[INNER + name] = tensor
    header = {
        "round": state.round,
        "weights_hash": state.weights_hash,
        "plan": state.plan,
        "tip": record_bytes(state.tip).decode() if state.tip else None,
        "close": record_bytes(state.close).decode() if state.close else None,
        "bans": [[ban.peer_id, ban.round, ban.reason, list(ban.evidence)] for ban in state.bans],
    }
    return header, to_safetensors_bytes(tensors)


MAX_BANS = 100_000


def _parse_bans(raw: Any) -> tuple[Ban, ...]:
    """Bans from an untrusted header: [peer id, round, reason, [record ids]] each, bounded in size."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_BANS:
        raise StateSyncError("global state's bans are not a list (or too many)")
    bans = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 4 and isinstance(item[0], str) and len(item[0]) <= 64
                and isinstance(item[1], int) and item[1] >= 0 and isinstance(item[2], str) and len(item[2]) <= 2000
                and isinstance(item[3], list) and len(item[3]) <= 16
                and all(isinstance(e, str) and len(e) <= 64 for e in item[3])):
            raise StateSyncError("global state holds a malformed ban")
        bans.append(Ban(item[0], item[1], item[2], tuple(item[3])))
    if len({ban.peer_id for ban in bans}) != len(bans):
        raise StateSyncError("global state bans a peer twice")
    return tuple(bans)


def check_bans(state: GlobalState, beats: Iterable[Heartbeat]) -> None:
    """Refuse (StateSyncError) bans that most live peers contradict.

    A heartbeat carries the digest of the bans its round is judged by. Each live peer at or before the state's
    round votes on the bans the state carries as of its own round (a peer further on may hold newer bans, so
    it does not vote); the bans are refused when more voters disagree than agree.
    """
    bans = BanList({ban.peer_id: ban for ban in state.bans})
    agree = disagree = 0
    for beat in beats:
        if beat.round <= state.round:
            if beat.bans == bans.as_of(beat.round).digest():
                agree += 1
            else:
                disagree += 1
    if disagree > agree:
        raise StateSyncError(f"its {len(state.bans)} bans disagree with what {disagree} of {agree + disagree} "
                             f"live peers hold")


def state_from_frame(header: dict[str, Any], body: bytes, layout: ParamLayout, run_id: str) -> GlobalState:
    """Parse a peer's global state; every tensor shape, the weights hash and both records are checked."""
    numel = layout.numel
    try:
        tensors = from_safetensors_bytes(body, max_bytes=max_state_bytes(numel))
    except TensorPayloadError as exc:
        raise StateSyncError(f"global state: {exc}") from None
    inner = {name[len(INNER):]: tensors.pop(name) for name in list(tensors) if name.startswith(INNER)}
    if set(tensors) - {"weights", "momentum", "previous_weights"} or "weights" not in tensors:
        raise StateSyncError(f"global state holds tensors {sorted(tensors)[:4]}, expected weights (+ momentum)")
    for name, tensor in tensors.items():
        if tensor.dtype != torch.float32 or tuple(tensor.shape) != (numel,):
            raise StateSyncError(f"global state {name} is {tuple(tensor.shape)} {tensor.dtype}, expected ({numel},)")
    try:
        round_index = int(header["round"])
        tip = parse_record(header["tip"].encode()) if header.get("tip") else None
        close = parse_swarm_message(header["close"].encode(), RoundClose) if header.get("close") else None
        plan = header["plan"]
        bans = _parse_bans(header.get("bans"))
    except (KeyError, TypeError, ValueError, AttributeError, RecordError) as exc:
        raise StateSyncError(f"global state header is malformed: {exc}") from None
    weights = tensors["weights"]
    computed = layout.hash(weights)
    if computed != header.get("weights_hash"):
        raise StateSyncError("global state weights do not match the hash the peer sent")
    if tip is not None:
        if not isinstance(tip, Block) or tip.run_id != run_id or tip.round != round_index - 1:
            raise StateSyncError("global state's block is not this run's block of the previous round")
        if tip.weights_hash != computed:
            raise StateSyncError("global state weights do not match its block's weights_hash")
    if close is not None and (close.run_id != run_id or close.round != round_index - 1):
        raise StateSyncError("global state's round close is not this run's close of the previous round")
    if not isinstance(plan, dict):
        raise StateSyncError("global state's work plan is not a JSON object")
    return GlobalState(round_index, weights, tensors.get("momentum"), plan, tip, close, computed, inner or None,
                       tensors.get("previous_weights"), bans)


def max_state_bytes(numel: int) -> int:
    """Weights, previous weights, momentum and two AdamW moments in fp32, plus headers."""
    return 20 * numel + (1 << 22)


# ----- data files -----
FILE_KINDS = ("index", "tokenizer", "shard")


def local_file(prepared_dir: Path, kind: str, sha256: str) -> Path:
    from gpunite.data.shards import INDEX_NAME, TOKENIZER_NAME, shard_path

    if kind == "index":
        return prepared_dir / INDEX_NAME
    if kind == "tokenizer":
        return prepared_dir / TOKENIZER_NAME
    return shard_path(prepared_dir, sha256)


def file_handler(prepared_dir: Path) -> Callable:
    """A stream handler serving this peer's prepared data files by (kind, sha256)."""

    async def handle(header: dict[str, Any], body: bytes, caller: str) -> tuple[dict[str, Any], bytes]:
        kind, sha = header.get("kind"), header.get("sha256")
        if kind not in FILE_KINDS or not isinstance(sha, str) or len(sha) != 64:
            raise ValueError("file request needs kind in index/tokenizer/shard and a sha256")
        path = local_file(prepared_dir, kind, sha)
        if not path.is_file():
            raise ValueError(f"no {kind} {sha[:12]} here")
        data = path.read_bytes()
        if sha256_bytes(data) != sha:
            raise ValueError(f"local {kind} {sha[:12]} does not match its hash")
        return {"sha256": sha}, data

    return handle


def fetch_file(request: Callable[..., tuple[dict, bytes]], prepared_dir: Path, kind: str, sha256: str,
               max_bytes: int) -> Path:
    """Fetch a data file through `request(header, max_reply_bytes)`; write it only if its hash matches."""
    path = local_file(prepared_dir, kind, sha256)
    if path.is_file() and sha256_bytes(path.read_bytes()) == sha256:
        return path
    _, data = request({"kind": kind, "sha256": sha256}, max_bytes)
    if sha256_bytes(data) != sha256:
        raise StateSyncError(f"peer sent a {kind} whose sha256 is not {sha256[:12]}")
    atomic_write_bytes(path, data)
    log.info("fetched %s %s (%d bytes)", kind, sha256[:12], len(data))
    return path

