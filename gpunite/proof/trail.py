"""Trails: the hashed checkpoints a trainer keeps every k inner steps, and the segments it serves to verifiers.

A trail entry commits to the whole training state at that step, not just the weights:

    entry = sha256(canonical_json({"weights": weights_hash, "optimizer": optimizer_hash, "step": step}))

Committing only the weights would let a trainer hand a verifier a forged AdamW state: with a huge second
moment and a matching first moment the update barely depends on the gradients, so k "replayed" steps land on
weights the trainer computed without any forward or backward pass. With the optimizer state in the hash, the
state at entry i+1 is pinned by the replay of segment i, and the state at entry 0 by the round's start.

Which sequences each inner step trains on is defined once, in `batches_for_steps`: the assigned work units'
sequences in order, `batch_size` per step. Trainer and verifier both call it, so they cannot disagree.

States are stored and sent compact: each weight as its change from the round's base (entry 0's weights, which
every verifier holds) in fp16, AdamW's first moment in bf16, the second moment and step in fp32: 8 bytes per
parameter instead of 12. The final weights travel in fp32 (4 bytes per parameter): checked against the trail
without any base, they prove a trail trained from other weights than the claimed base (an old round's work
resubmitted) against the submitted delta. The trainer rounds its state to exactly
these values at every trail step (`InnerTrainer.round_to_trail_precision`), so the stored entry is the state
it trained on from, and a verifier's replay from it stays bit-exact. Hashes are taken over the fp32 state the
stored form expands to, so entry 0 is tied to the round's base weights hash as before.

Checkpoints are stored as safetensors files, each replaced in one rename (`store_dir/round-NNNNNNNN/entry-NNNN`), kept
until the round's block is final (`prune`). The trainer only copies its state at a trail step; hashing and
writing it happen on a writer thread (at most `MAX_PENDING` states queued), so the inner steps go on meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from gpunite.errors import GpuniteError
from gpunite.identity import canonical_json
from gpunite.records import WorkUnit
from gpunite.train.trainer import TRAIL_DELTA_DTYPE, TRAIL_MOMENT_DTYPE
from gpunite.train.weights import from_safetensors_bytes, to_safetensors_bytes, weights_hash

# loader(shard_sha, first, count) -> int64 tensor [count, seq_len + 1]
SequenceLoader = Callable[[str, int, int], torch.Tensor]

_WEIGHTS, _OPTIMIZER = "weights/", "optimizer/"
_START, _END = "start.", "end."
_FIRST_MOMENT = ".exp_avg"
BASE_FILE = "base.safetensors"  # a round's entry-0 weights in fp32, kept beside its entries to expand them
MAX_PENDING = 2  # trail states copied but not yet written; the trainer waits beyond this (bounded memory)
# Bytes per parameter: a stored state (fp16 weight change, bf16 first moment, fp32 second moment) and the
# final weights as served (fp32: checked against the trail without the base).
STATE_BYTES_PER_PARAM = TRAIL_DELTA_DTYPE.itemsize + TRAIL_MOMENT_DTYPE.itemsize + 4
FINAL_BYTES_PER_PARAM = 4


class TrailError(GpuniteError):
    """A trail, checkpoint or segment that is missing, malformed or does not match its commitment."""


def trail_steps(inner_steps: int, interval_k: int) -> list[int]:
    """Local steps with a trail entry: 0, k, 2k, ... and always inner_steps itself (the last may be short)."""
    if interval_k <= 0 or inner_steps < 0:
        raise TrailError(f"trail needs interval_k > 0 and inner_steps >= 0, got {interval_k}, {inner_steps}")
    steps = list(range(0, inner_steps, interval_k))
    steps.append(inner_steps)
    return steps


def trail_length(inner_steps: int, interval_k: int) -> int:
    return len(trail_steps(inner_steps, interval_k))


def optimizer_hash(optimizer_state: dict[str, torch.Tensor]) -> str:
    """Hash of AdamW's state as `InnerTrainer.optimizer_state_tensors()` gives it (empty for a fresh optimizer)."""
    return weights_hash(optimizer_state)


def entry_hash(weights_hash_hex: str, optimizer_hash_hex: str, step: int) -> str:
    """The trail entry for a training state: weights, inner optimizer state and schedule step together."""
    body = {"weights": weights_hash_hex, "optimizer": optimizer_hash_hex, "step": int(step)}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def sequences_needed(inner_steps: int, batch_size: int) -> int:
    return inner_steps * batch_size


def batches_for_steps(
    units: Sequence[WorkUnit], steps: range, batch_size: int, loader: SequenceLoader
) -> list[torch.Tensor]:
    """The batch each local step in `steps` trains on: step s takes sequences [s*B, (s+1)*B) of the units in order.

    The units' sequences are laid end to end (unit 0's `first .. first+count`, then unit 1's, ...). Only the
    sequences the steps need are loaded, so a verifier replaying one segment reads k batches, not the round.
    """
    if steps.step != 1:
        raise TrailError("batches_for_steps needs a contiguous range of steps")
    total = sum(unit.count for unit in units)
    first_needed, end_needed = steps.start * batch_size, steps.stop * batch_size
    if first_needed < 0 or end_needed > total:
        raise TrailError(
            f"steps {steps.start}..{steps.stop} need sequences up to {end_needed}, the work units hold {total}"
        )
    pieces: list[torch.Tensor] = []
    offset = 0
    for unit in units:
        lo, hi = max(first_needed, offset), min(end_needed, offset + unit.count)
        if lo < hi:
            piece = loader(unit.shard, unit.first + lo - offset, hi - lo)
            if piece.ndim != 2 or piece.size(0) != hi - lo:
                raise TrailError(f"loader gave shape {tuple(piece.shape)} for {hi - lo} sequences of {unit.shard}")
            pieces.append(piece)
        offset += unit.count
    if not pieces:
        return []
    sequences = torch.cat(pieces)
    return list(sequences.split(batch_size))


@dataclass
class TrailState:
    """A training state at one trail entry: weights, AdamW state (possibly empty) and the schedule step."""

    weights: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor] | None  # None when only its hash travelled
    optimizer_hash: str
    step: int
    # The entry hash as the trail commits it, when `weights` are where the steps ran rather than the trail's
    # own coordinates (the steps before an overlapped round's rebase: `parse_state(..., hash_base=)`).
    committed: str | None = None

    @property
    def entry(self) -> str:
        if self.committed is not None:
            return self.committed
        return entry_hash(weights_hash(self.weights), self.optimizer_hash, self.step)


Base = Mapping[str, torch.Tensor]  # a round's start weights by name (entry 0's), fp32 on the CPU


def _state_tensors(prefix: str, state: TrailState, base: Base) -> dict[str, torch.Tensor]:
    """A state's stored form: each weight's change from `base` in fp16, the first moment in bf16."""
    tensors = {f"{prefix}{_WEIGHTS}{name}": (t - base[name]).to(TRAIL_DELTA_DTYPE)
               for name, t in state.weights.items()}
    for name, t in (state.optimizer or {}).items():
        tensors[f"{prefix}{_OPTIMIZER}{name}"] = t.to(TRAIL_MOMENT_DTYPE) if name.endswith(_FIRST_MOMENT) else t
    return tensors


def expand_state(state: TrailState, base: Base) -> TrailState:
    """The state as stored and read back: what its entry hash commits to (`state` itself when it was
    rounded with `InnerTrainer.round_to_trail_precision` against the same base)."""
    tensors = _state_tensors("", state, base)
    weights, optimizer = _expanded(tensors, base)
    return TrailState(weights, optimizer if state.optimizer is not None else None,
                      optimizer_hash(optimizer) if state.optimizer is not None else state.optimizer_hash, state.step)


def _expanded(tensors: Mapping[str, torch.Tensor], base: Base) -> tuple[dict[str, torch.Tensor],
                                                                        dict[str, torch.Tensor]]:
    weights = {name: base[name] + t.float() for name, t in _take(tensors, _WEIGHTS).items() if name in base}
    optimizer = {name: t.float() for name, t in _take(tensors, _OPTIMIZER).items()}
    return weights, optimizer


def _take(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}


@dataclass
class Segment:
    """What a verifier receives for segment i: the full state at entry i and (unless it asked for the start
    only) at entry i+1, plus the hashes that tie entry 0 to the round's base weights."""

    index: int
    start: TrailState
    end: TrailState | None  # None: served without it (a replay landing bit-exactly on entry i+1 needs none)
    first_optimizer_hash: str  # AdamW state hash at entry 0
    first_step: int  # schedule step at entry 0


def segment_to_bytes(segment: Segment, base: Base) -> bytes:
    tensors = _state_tensors(_START, segment.start, base)
    metadata = _segment_metadata(segment.index, segment.start.step, segment.first_optimizer_hash, segment.first_step)
    if segment.end is not None:
        tensors |= _state_tensors(_END, segment.end, base)
        metadata["end_step"] = str(segment.end.step)
    return to_safetensors_bytes(tensors, metadata=metadata)


def _segment_metadata(index: int, start_step: int, first_optimizer_hash: str, first_step: int) -> dict[str, str]:
    return {"index": str(index), "start_step": str(start_step), "first_optimizer_hash": first_optimizer_hash,
            "first_step": str(first_step)}


def segment_from_bytes(data: bytes, base: Base, max_bytes: int | None = None, hash_base: Base | None = None
                       ) -> Segment:
    """Parse a segment from an untrusted trainer against the round's base weights: names, shapes and dtypes
    must fit the model, values finite (the base is only read).

    hash_base: the trail's own base, when `base` is where the segment's steps ran instead (an overlapped
    round's steps before its rebase ran from the global weights before the base): the states' weights are
    then expanded against `base` and their entry hashes against `hash_base`, as the trainer committed them."""
    tensors = from_safetensors_bytes(data, max_bytes=max_bytes)
    metadata = _metadata_of(data)
    try:
        index = int(metadata["index"])
        start_step, first_step = (int(metadata[k]) for k in ("start_step", "first_step"))
        end_step = int(metadata["end_step"]) if "end_step" in metadata else None
        first_optimizer_hash = str(metadata["first_optimizer_hash"])
    except (KeyError, ValueError) as exc:
        raise TrailError(f"segment metadata is incomplete or malformed: {exc}") from None
    parts = ((_START, start_step),) if end_step is None else ((_START, start_step), (_END, end_step))
    states = [_parse_state(_take(tensors, prefix), base, step, hash_base) for prefix, step in parts]
    unknown = [n for n in tensors if not n.startswith(tuple(prefix for prefix, _ in parts))]
    if unknown:
        raise TrailError(f"segment holds unexpected tensors {unknown[:3]}")
    return Segment(index, states[0], states[1] if len(states) > 1 else None, first_optimizer_hash, first_step)


def _parse_state(tensors: dict[str, torch.Tensor], base: Base, step: int, hash_base: Base | None = None
                 ) -> TrailState:
    """A state from its stored weights/ and optimizer/ tensors, checked against the model and expanded with
    the base; its hash is recomputed (against hash_base, when given: see `segment_from_bytes`)."""
    _check_stored_weights(_take(tensors, _WEIGHTS), base)
    _check_optimizer(_take(tensors, _OPTIMIZER), base)
    unknown = [n for n in tensors if not n.startswith((_WEIGHTS, _OPTIMIZER))]
    if unknown:
        raise TrailError(f"trail state holds unexpected tensors {unknown[:3]}")
    weights, optimizer = _expanded(tensors, base)
    state = TrailState(weights, optimizer, optimizer_hash(optimizer), step)
    if hash_base is not None:
        state.committed = entry_hash(weights_hash(_expanded(tensors, hash_base)[0]),
                                     state.optimizer_hash, step)
    return state


def state_from_bytes(data: bytes, base: Base, max_bytes: int | None = None, hash_base: Base | None = None
                     ) -> TrailState:
    """One trail entry's state as a trainer stores and serves it (`TrailRecorder.entry_payload`), from untrusted
    bytes: names, shapes and dtypes must fit the model; the optimizer hash is recomputed, never taken from the
    file."""
    tensors = from_safetensors_bytes(data, max_bytes=max_bytes)
    try:
        step = int(_metadata_of(data)["step"])
    except (KeyError, ValueError) as exc:
        raise TrailError(f"trail state metadata is incomplete or malformed: {exc}") from None
    return _parse_state(tensors, base, step, hash_base)


def final_to_bytes(state: TrailState) -> bytes:
    """The last entry's weights in fp32, with its optimizer hash and step: enough to check it against the trail
    without knowing which base the trail started from (so a trail trained from other weights is proven)."""
    tensors = {f"{_WEIGHTS}{name}": t for name, t in state.weights.items()}
    return to_safetensors_bytes(tensors, metadata={"optimizer_hash": state.optimizer_hash, "step": str(state.step)})


def final_from_bytes(data: bytes, weight_shapes: Mapping[str, tuple[int, ...]],
                     max_bytes: int | None = None) -> TrailState:
    tensors = from_safetensors_bytes(data, max_bytes=max_bytes)
    metadata = _metadata_of(data)
    try:
        state = TrailState(_take(tensors, _WEIGHTS), None, str(metadata["optimizer_hash"]), int(metadata["step"]))
    except (KeyError, ValueError) as exc:
        raise TrailError(f"final weights metadata is incomplete or malformed: {exc}") from None
    if len(state.weights) != len(tensors):
        raise TrailError("final weights hold tensors other than weights")
    _check_weights(state.weights, weight_shapes)
    return state


def _metadata_of(data: bytes) -> dict[str, str]:
    # safetensors layout: 8-byte little-endian header length, then the JSON header with "__metadata__".
    try:
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
    except (ValueError, UnicodeDecodeError) as exc:
        raise TrailError(f"segment header is not valid safetensors JSON: {exc}") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise TrailError("segment metadata is not an object")
    return metadata


def _check_weights(weights: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> None:
    if set(weights) != set(shapes):
        missing, extra = sorted(set(shapes) - set(weights)), sorted(set(weights) - set(shapes))
        raise TrailError(f"checkpoint weights do not fit the model: missing {missing[:2]}, extra {extra[:2]}")
    for name, shape in shapes.items():
        t = weights[name]
        if tuple(t.shape) != tuple(shape) or t.dtype != torch.float32:
            raise TrailError(f"checkpoint weight {name} is {tuple(t.shape)} {t.dtype}, expected {shape} float32")


def _check_stored_weights(stored: Mapping[str, torch.Tensor], base: Base) -> None:
    if set(stored) != set(base):
        missing, extra = sorted(set(base) - set(stored)), sorted(set(stored) - set(base))
        raise TrailError(f"checkpoint weights do not fit the model: missing {missing[:2]}, extra {extra[:2]}")
    for name, start in base.items():
        t = stored[name]
        if tuple(t.shape) != tuple(start.shape) or t.dtype != TRAIL_DELTA_DTYPE:
            raise TrailError(f"checkpoint weight {name} is {tuple(t.shape)} {t.dtype}, expected "
                             f"{tuple(start.shape)} {TRAIL_DELTA_DTYPE} (its change from the round's base)")


def _check_optimizer(optimizer: Mapping[str, torch.Tensor], base: Base) -> None:
    if not optimizer:
        return
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, start in base.items():
        shape = tuple(start.shape)
        expected |= {f"{name}{_FIRST_MOMENT}": (shape, TRAIL_MOMENT_DTYPE),
                     f"{name}.exp_avg_sq": (shape, torch.float32), f"{name}.step": ((), torch.float32)}
    if set(optimizer) != set(expected):
        raise TrailError("checkpoint optimizer state does not fit the model's parameters")
    for name, (shape, dtype) in expected.items():
        if tuple(optimizer[name].shape) != shape or optimizer[name].dtype != dtype:
            raise TrailError(f"optimizer tensor {name} is {tuple(optimizer[name].shape)} {optimizer[name].dtype}, "
                             f"expected {shape} {dtype}")


def capture_state(model: torch.nn.Module, trainer, hashed: bool = True) -> TrailState:
    """Copies of the trainer's weights and AdamW state now (trainer: gpunite.train.trainer.InnerTrainer).

    hashed=False leaves optimizer_hash empty, for the trail writer to fill in: hashing the moments costs the
    training thread several times the copies (27 ms vs 9 ms per state of the tiny preset on one core).
    """
    from gpunite.train.weights import trainable_state

    weights = {name: t.detach().to("cpu", copy=True) for name, t in trainable_state(model).items()}
    optimizer = trainer.optimizer_state_tensors()
    return TrailState(weights, optimizer, optimizer_hash(optimizer) if hashed else "", trainer.step)


def _store_tensors(path: Path, stored: dict[str, torch.Tensor], step: int, base: Base | None) -> str:
    """Write one trail entry's stored tensors (on the writer thread) and return its entry hash: the hash of
    the state they expand to, which a verifier recomputes ("" while the base is not known: `_hash_stored`
    hashes the entry once it is)."""
    stored_hash = optimizer_hash({name: t.float() for name, t in _take(stored, _OPTIMIZER).items()})
    _replace_file(path, stored, metadata={"step": str(step), "optimizer_hash": stored_hash})
    return "" if base is None else entry_hash(weights_hash(_expanded(stored, base)[0]), stored_hash, step)


def _hash_stored(path: Path, base: Base) -> str:
    """The entry hash of a stored entry, its weights expanded against `base` (read back from disk: an
    overlapped round's entries before its rebase, written before their base was known)."""
    from safetensors import safe_open

    # Only the weight changes are read (a quarter of the entry): the optimizer's hash was taken when it was
    # written, and it does not depend on the base. The file is this trainer's own, written by _store_tensors.
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        weights = {name: base[name] + handle.get_tensor(key).float()
                   for key in handle.keys() if key.startswith(_WEIGHTS)
                   for name in (key[len(_WEIGHTS):],) if name in base}
    return entry_hash(weights_hash(weights), metadata["optimizer_hash"], int(metadata["step"]))


def _hash_when_written(write: Future[str] | None, path: Path, base: Base) -> str:
    """`_hash_stored` of an entry once its write (None: done already) is done; a failed write raises here."""
    if write is not None:
        write.result()
    return _hash_stored(path, base)


def _write_base(path: Path, base: Base) -> None:
    _replace_file(path, base)


def _replace_file(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors via a temporary file and rename: readers never see half a checkpoint.
    The file is written straight from the tensors' memory (3-4x faster than building its bytes first).

    No fsync, unlike gpunite.util.atomic_write_bytes: a trainer that crashes mid-round loses that round's
    contribution anyway, and 50 fsyncs per round would cost more than the training on small models.
    """
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


class TrailRecorder:
    """Records a round's trail while its inner steps run, and serves segments from the stored checkpoints.

    Usage by a trainer: `start_round(r, H)`, then `record(model, trainer)` once before the first step and once
    after each step (it keeps a checkpoint only at the trail's steps), then `trail` is what the contribution
    commits to. `segment_payload(r, i)` and `final_payload(r)` answer verifiers until `prune`.
    """

    def __init__(self, interval_k: int, store_dir: str | Path) -> None:
        if interval_k <= 0:
            raise TrailError(f"trail interval must be > 0, got {interval_k}")
        self.interval_k = interval_k
        self.store_dir = Path(store_dir)
        self._round: int | None = None
        self._steps: list[int] = []
        self._local_step = 0
        self._trail: list[str] = []
        self._trails: dict[int, list[str]] = {}
        self._recorded = 0  # entries of the current round handed to the writer
        self._pending: list[Future[str]] = []  # their writes, in entry order, not yet in self._trail
        self._lock = threading.Lock()
        self._writer: ThreadPoolExecutor | None = None
        self._base: dict[str, torch.Tensor] = {}  # the current round's entry-0 weights, on the CPU
        self._device_base: dict[str, torch.Tensor] | None = None  # the same on the trainer's device
        self._pending_base: Future[None] | None = None
        self._bases: dict[int, dict[str, torch.Tensor]] = {}  # the last round read back by load_state
        self._deferred = False  # the round's base is not known yet: entries are hashed at `rebase`
        self._rehashing: set[Future[str]] = set()  # those hashes, once the base came
        self._last_changes: dict[str, torch.Tensor] | None = None  # the last entry's stored weight changes
        self.rebase_step = 0  # the current round's local step at its rebase (0: none)
        self.waited_s = 0.0  # time callers spent waiting for the writes (backlog and flushes), all rounds

    def round_dir(self, round_index: int) -> Path:
        return self.store_dir / f"round-{round_index:08d}"

    def start_round(self, round_index: int, inner_steps: int, deferred: bool = False) -> None:
        """Begin a round's trail; anything stored earlier for this round is discarded.

        deferred: the round starts before its base is known (train.overlap: from the global weights before it,
        while the merge that gives the base is in flight); `rebase` brings the base at a later trail step."""
        self.flush()
        with self._lock:
            # A fresh writer thread each round, started by the first record_state: it inherits the recording
            # thread's CPU priority (an overlapped round's training yields the CPU, and so does its writer).
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.shutdown(wait=True)
        shutil.rmtree(self.round_dir(round_index), ignore_errors=True)
        self._round = round_index
        self._steps = trail_steps(inner_steps, self.interval_k)
        self._local_step = 0
        self._recorded = 0
        self._base, self._device_base = {}, None
        self._deferred, self._last_changes, self.rebase_step = deferred, None, 0
        self._rehashing = set()
        self._trail = []
        self._trails[round_index] = self._trail

    def record(self, model: torch.nn.Module, trainer) -> bool:
        """Call before the first inner step and after every step; True when this step is a trail entry.

        At a trail step the trainer's state is first rounded to what the entry stores
        (`InnerTrainer.round_to_trail_precision`, against the round's start weights), so training goes on from
        exactly the committed state.
        """
        if self._round is None:
            raise TrailError("TrailRecorder.record called before start_round")
        local = self._local_step
        self._local_step += 1
        if local not in self._steps:
            return False
        from gpunite.train.weights import trainable_state

        if local == 0:
            self._device_base = {name: t.clone() for name, t in trainable_state(model).items()}
            trainer.round_to_trail_precision(self._device_base)  # the weights are the base; AdamW's state may
            self.record_state(capture_state(model, trainer, hashed=False))  # come unrounded (a joiner's)
            return True
        if self._device_base is None:
            raise TrailError("TrailRecorder.record missed the round's first step (its base weights)")
        # The rounding computes the stored values anyway: copy those, not the fp32 state (8 bytes a parameter)
        changes, moments = trainer.round_to_trail_precision(self._device_base)
        self._last_changes = changes
        on_cpu = trainer.device.type == "cpu"  # fresh tensors: no copy (and no call: they may wait for the GIL)
        tensors = {f"{_WEIGHTS}{name}": t if on_cpu else t.to("cpu") for name, t in changes.items()}
        tensors |= {f"{_OPTIMIZER}{name}": t if on_cpu else t.to("cpu") for name, t in moments.items()}
        for name, t in trainer.optimizer_state_tensors(keys=("step", "exp_avg_sq")).items():
            tensors[f"{_OPTIMIZER}{name}"] = t
        self._queue(None, tensors, trainer.step)
        return True

    def record_state(self, state: TrailState) -> None:
        """Queue a state (copied, never changed afterwards) as the round's next trail entry.

        Entry 0's weights are the round's base, the other entries' weights are stored as their change from it.
        Adversary strategies build states by other means and record them here too (stored as `expand_state`
        gives them back).
        """
        if self._round is None:
            raise TrailError("TrailRecorder.record_state called before start_round")
        self._queue(state)

    def _queue(self, state: TrailState | None, stored: dict[str, torch.Tensor] | None = None, step: int = 0) -> None:
        """Hand the writer the next entry: a state to store, or (state None) its stored tensors at `step`."""
        with self._lock:
            index = self._recorded
            if index >= len(self._steps):
                raise TrailError(f"round {self._round} already has its {len(self._steps)} trail entries")
            if index == 0 and state is None:
                raise TrailError("a round's first trail entry must be a whole state (its weights are the base)")
            self._recorded += 1
            if self._writer is None:
                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trail-writer")
            round_dir = self.round_dir(self._round)
            if index == 0:
                self._base = dict(state.weights)  # a copy already, never changed
                if not self._deferred:
                    self._pending_base = self._writer.submit(_write_base, round_dir / BASE_FILE, self._base)
            path = round_dir / f"entry-{index:04d}.safetensors"
            if state is not None:
                stored, step = _state_tensors("", state, self._base), state.step
            self._pending.append(self._writer.submit(_store_tensors, path, stored, step,
                                                     None if self._deferred else self._base))
            writes = [f for f in self._pending if f not in self._rehashing]  # a rebase's hashes do not hold
            backlog = writes[: max(0, len(writes) - MAX_PENDING)]  # training up: they run on their own thread
        if backlog:
            waited = time.perf_counter()
            for future in backlog:
                future.result()
            self.waited_s += time.perf_counter() - waited

    def rebase(self, trainer, new_base: Base) -> int:
        """Carry the steps so far onto the round's base, which just arrived (a deferred round); call it right
        after a trail step. The weights become new_base + the last entry's stored change, exactly as a verifier
        expands that entry; later entries round against new_base; the entries so far, stored as their change
        from where the round started, are hashed against new_base, so the trail reads as one from the base.
        Returns the local step of the rebase (0: before any step, the round is then an ordinary one)."""
        if not self._deferred:
            raise TrailError("rebase of a round whose base was known when it started")
        step = self._local_step - 1
        if self._recorded == 0 or self._steps[self._recorded - 1] != step:
            raise TrailError(f"rebase at local step {step}, which is not a trail step just recorded")
        device_base = {}
        with torch.no_grad():
            for name, param in trainer._named_params:
                device_base[name] = base = new_base[name].to(param.device)
                change = None if self._last_changes is None else self._last_changes.get(name)
                if change is None:
                    param.data.copy_(base)
                else:
                    torch.add(base, change.to(param.device), out=param.data)
        with self._lock:
            self._device_base, self._base, self._deferred = device_base, dict(new_base), False
            self.rebase_step = step
            round_dir = self.round_dir(self._round)
            self._pending_base = self._writer.submit(_write_base, round_dir / BASE_FILE, self._base)
            # The entries so far, stored as their change from where the round started ("" for their hashes),
            # some of them still being written. They are hashed on a thread of their own (started here: at the
            # training thread's priority), each once written, so training waits neither for those writes nor
            # for these hashes, and the entries after the rebase are written meanwhile.
            writes: list[Future[str] | None] = [None] * len(self._trail) + self._pending
            del self._trail[:]
            hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trail-hasher")
            self._pending = [hasher.submit(_hash_when_written, write, round_dir / f"entry-{i:04d}.safetensors",
                                           self._base) for i, write in enumerate(writes)]
            self._rehashing = set(self._pending)
            hasher.shutdown(wait=False)  # it exits once the queued hashes are done
        return step

    @property
    def deferred(self) -> bool:
        """Whether the round still waits for its base (`rebase`)."""
        return self._deferred

    def flush(self) -> None:
        """Wait for the queued writes; their entries join the trail (a failed write raises here)."""
        waited = time.perf_counter()
        with self._lock:
            try:
                if self._pending_base is not None:
                    self._pending_base.result()
                    self._pending_base = None
                for future in self._pending:
                    self._trail.append(future.result())
            finally:
                self._pending = []
                self.waited_s += time.perf_counter() - waited

    @property
    def trail(self) -> list[str]:
        """The current round's entries so far (complete once the round's last step is recorded)."""
        self.flush()
        return list(self._trail)

    def base(self, round_index: int) -> dict[str, torch.Tensor]:
        """A stored round's entry-0 weights (fp32, CPU): what its entries' stored changes are relative to."""
        if round_index == self._round and self._base:
            return self._base
        if round_index not in self._bases:
            path = self.round_dir(round_index) / BASE_FILE
            try:
                tensors = from_safetensors_bytes(path.read_bytes())
            except (OSError, GpuniteError) as exc:
                raise TrailError(f"no base weights stored for round {round_index} ({exc})") from None
            self._bases = {round_index: tensors}
        return self._bases[round_index]

    def load_state(self, round_index: int, index: int) -> TrailState:
        data = self.entry_payload(round_index, index)
        tensors = from_safetensors_bytes(data)
        metadata = _metadata_of(data)
        weights, optimizer = _expanded(tensors, self.base(round_index))
        return TrailState(weights, optimizer, metadata["optimizer_hash"], int(metadata["step"]))

    def segment_payload(self, round_index: int, index: int, with_end: bool = True) -> bytes:
        """Bytes a verifier needs to replay segment `index` of a round: states at entries index and (with_end)
        index+1, as stored (`segment_from_bytes` parses them against the round's base)."""
        first = self._entry_metadata(round_index, 0)  # only entry 0's hashes: no need to load its tensors
        start = self.entry_payload(round_index, index)
        tensors = {_START + name: t for name, t in from_safetensors_bytes(start).items()}
        metadata = _segment_metadata(index, int(_metadata_of(start)["step"]), first["optimizer_hash"],
                                     int(first["step"]))
        if with_end:
            end = self.entry_payload(round_index, index + 1)
            tensors |= {_END + name: t for name, t in from_safetensors_bytes(end).items()}
            metadata["end_step"] = _metadata_of(end)["step"]
        return to_safetensors_bytes(tensors, metadata=metadata)

    def _entry_metadata(self, round_index: int, index: int) -> dict[str, str]:
        """A stored entry's safetensors metadata, read from the file's header alone."""
        if round_index == self._round:
            self.flush()
        path = self.round_dir(round_index) / f"entry-{index:04d}.safetensors"
        try:
            with open(path, "rb") as file:
                head = file.read(8)
                head += file.read(int.from_bytes(head, "little"))
        except OSError:
            raise TrailError(f"no trail checkpoint {index} for round {round_index} (pruned, or never "
                             "recorded)") from None
        return _metadata_of(head)

    def segment_part(self, round_index: int, index: int, part: str = "both") -> bytes:
        """What a verifier asks for about segment `index`: "start" (the segment without its end state), "end"
        (the state at entry index+1) or "both"."""
        if part == "end":
            return self.entry_payload(round_index, index + 1)
        if part not in ("start", "both"):
            raise TrailError(f"a segment's part is \"start\", \"end\" or \"both\", not {part!r}")
        return self.segment_payload(round_index, index, with_end=part == "both")

    def entry_payload(self, round_index: int, index: int) -> bytes:
        """One entry's stored state, as is (a verifier parses it with `state_from_bytes`)."""
        if round_index == self._round:
            self.flush()
        path = self.round_dir(round_index) / f"entry-{index:04d}.safetensors"
        if not path.is_file():
            raise TrailError(f"no trail checkpoint {index} for round {round_index} (pruned, or never recorded)")
        return path.read_bytes()

    def final_payload(self, round_index: int) -> bytes:
        """The round's last entry (weights, optimizer hash, step): checked against the submitted delta."""
        if round_index == self._round:
            self.flush()
        last = len(self._trails.get(round_index) or []) - 1
        if last < 0:
            existing = sorted(self.round_dir(round_index).glob("entry-*.safetensors"))
            last = len(existing) - 1
        if last < 0:
            raise TrailError(f"no trail stored for round {round_index}")
        return final_to_bytes(self.load_state(round_index, last))

    def prune(self, keep_from_round: int) -> list[int]:
        """Delete the checkpoints of rounds before keep_from_round (their blocks are final); returns them."""
        removed = []
        if not self.store_dir.is_dir():
            return removed
        for path in sorted(self.store_dir.glob("round-*")):
            try:
                round_index = int(path.name.split("-", 1)[1])
            except ValueError:
                continue
            if round_index < keep_from_round:
                shutil.rmtree(path, ignore_errors=True)
                self._trails.pop(round_index, None)
                self._bases.pop(round_index, None)
                removed.append(round_index)
        return removed


def train_with_trail(
    trainer,
    model: torch.nn.Module,
    units: Sequence[WorkUnit],
    batch_size: int,
    loader: SequenceLoader,
    inner_steps: int,
    recorder: TrailRecorder,
    round_index: int,
    rebase: tuple[int, Base] | None = None,
) -> list[float]:
    """Run a round's inner steps on the assigned units, recording the trail; returns each step's loss.

    rebase: (local trail step, the round's base): the round starts from the weights the model holds and is
    carried onto the base at that step, as an overlapped round is when the merge it waited for arrives."""
    recorder.start_round(round_index, inner_steps, deferred=rebase is not None)
    recorder.record(model, trainer)
    if rebase is not None and rebase[0] == 0:
        recorder.rebase(trainer, rebase[1])
    losses = []
    for step, batch in enumerate(iter_batches(units, inner_steps, batch_size, loader, recorder.interval_k), 1):
        losses.append(trainer.train_step(batch))
        if recorder.record(model, trainer) and rebase is not None and step == rebase[0]:
            recorder.rebase(trainer, rebase[1])
    return losses


def iter_batches(
    units: Sequence[WorkUnit], inner_steps: int, batch_size: int, loader: SequenceLoader, group: int
) -> Iterable[torch.Tensor]:
    """All of a round's batches in step order, loaded `group` steps at a time (bounded memory)."""
    for start in range(0, inner_steps, group):
        yield from batches_for_steps(units, range(start, min(inner_steps, start + group)), batch_size, loader)


def weight_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    from gpunite.train.weights import trainable_state

    return {name: tuple(t.shape) for name, t in trainable_state(model).items()}

