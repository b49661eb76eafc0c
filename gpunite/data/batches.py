"""Sequences and batches from prepared shards: held-out split, trainable ranges, a resumable shuffled stream.

Rules every layer shares (trainer, swarm work units, audit replay):
- Sequence j of a shard is ``tokens[j*seq_len : j*seq_len + seq_len + 1]`` (inputs and their next-token
  targets; neighbouring sequences share one token). A shard of n tokens holds ``(n - 1) // seq_len``
  sequences; no sequence crosses a shard boundary.
- Held-out split: in every shard with at least 2 sequences, the last ``ceil(1%)`` of its sequences (at least
  one) are held out for evaluation. Per-shard tails spread the held-out data over all sources while keeping
  each shard's trainable part one contiguous range, which is what the swarm carves work units from.
- BatchStream: the trainable sequences of all shards, numbered in index order, are shuffled per epoch by
  ``epoch_permutation(seed, epoch)``; epochs follow each other without a gap, so batch p is made of stream
  entries ``[p*batch_size, (p+1)*batch_size)``. Resuming at any position computes the permutation instead of
  replaying the stream.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gpunite.data.errors import DataError
from gpunite.data.shards import ShardEntry, ShardIndex, read_shard

if TYPE_CHECKING:
    import torch

HELDOUT_FRACTION_PERCENT = 1
# Shards a stream keeps mapped at once (each a memory map of one shard file).
OPEN_SHARDS_MAX = 32

_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class SequenceRange:
    """`count` consecutive sequences of one shard from sequence `first` on (a unit of data to train on)."""

    shard_sha256: str
    first: int
    count: int


def sequences_in_shard(n_tokens: int, seq_len: int) -> int:
    return max(0, (n_tokens - 1) // seq_len)


def heldout_in_shard(n_sequences: int) -> int:
    """How many of a shard's last sequences are held out: ceil(1%), none for a shard of fewer than 2."""
    if n_sequences < 2:
        return 0
    return -(-n_sequences * HELDOUT_FRACTION_PERCENT // 100)


def training_units(index: ShardIndex, seq_len: int) -> list[SequenceRange]:
    """The trainable sequences: one range per shard, in index order (held-out tails excluded)."""
    units = []
    for entry in index.shards:
        n_sequences = sequences_in_shard(entry.n_tokens, seq_len)
        trainable = n_sequences - heldout_in_shard(n_sequences)
        if trainable > 0:
            units.append(SequenceRange(entry.sha256, 0, trainable))
    return units


def heldout_units(index: ShardIndex, seq_len: int) -> list[SequenceRange]:
    """The held-out tail of every shard, in index order."""
    units = []
    for entry in index.shards:
        n_sequences = sequences_in_shard(entry.n_tokens, seq_len)
        held = heldout_in_shard(n_sequences)
        if held:
            units.append(SequenceRange(entry.sha256, n_sequences - held, held))
    return units


def _shard_entry(index: ShardIndex, shard_sha: str) -> ShardEntry:
    for entry in index.shards:
        if entry.sha256 == shard_sha:
            return entry
    raise DataError(
        f"shard {shard_sha[:16]}... is not in this dataset's index; check the work unit or re-prepare"
    )


def _open_shard(prepared_dir: str | Path, index: ShardIndex, shard_sha: str) -> np.ndarray:
    entry = _shard_entry(index, shard_sha)
    tokens = read_shard(prepared_dir, shard_sha, verify=True, dtype=index.dtype)
    if len(tokens) != entry.n_tokens:
        raise DataError(
            f"shard {shard_sha[:16]}... holds {len(tokens)} tokens, the index says {entry.n_tokens}"
        )
    return tokens


def _windows(tokens: np.ndarray, first: int, count: int, seq_len: int) -> np.ndarray:
    """Rows [count, seq_len + 1] of int64: sequences first .. first+count-1 (a strided view, one copy)."""
    span = tokens[first * seq_len : (first + count) * seq_len + 1]
    view = np.lib.stride_tricks.as_strided(
        span,
        shape=(count, seq_len + 1),
        strides=(seq_len * span.strides[0], span.strides[0]),
        writeable=False,
    )
    return view.astype(np.int64)


def load_sequences(
    prepared_dir: str | Path, index: ShardIndex, shard_sha: str, first: int, count: int, seq_len: int
) -> torch.Tensor:
    """Sequences first .. first+count-1 of a shard, hash-checked, as a LongTensor [count, seq_len + 1]."""
    import torch

    n_sequences = sequences_in_shard(_shard_entry(index, shard_sha).n_tokens, seq_len)
    if first < 0 or count < 0 or first + count > n_sequences:
        raise DataError(
            f"sequences {first}..{first + count - 1} are outside shard {shard_sha[:16]}..., which holds "
            f"{n_sequences} sequences of {seq_len} tokens; check the work unit"
        )
    tokens = _open_shard(prepared_dir, index, shard_sha)
    return torch.from_numpy(_windows(tokens, first, count, seq_len))


def heldout_sequences(
    prepared_dir: str | Path, index: ShardIndex, seq_len: int, max_sequences: int
) -> torch.Tensor:
    """Up to max_sequences held-out sequences, spread evenly over the held-out split, as a LongTensor."""
    import torch

    units = heldout_units(index, seq_len)
    total = sum(unit.count for unit in units)
    if total == 0:
        raise DataError(
            f"no held-out sequences: no shard holds 2 or more sequences of {seq_len} tokens; "
            "add data, lower data.seq_len or raise data.shard_tokens"
        )
    take = min(max_sequences, total)
    picks = (np.arange(take, dtype=np.int64) * total) // take  # even spread, deterministic
    starts = np.cumsum([0] + [unit.count for unit in units])
    rows = []
    for pick in picks:
        unit_number = int(np.searchsorted(starts, pick, side="right") - 1)
        unit = units[unit_number]
        tokens = _open_shard(prepared_dir, index, unit.shard_sha256)
        rows.append(_windows(tokens, unit.first + int(pick - starts[unit_number]), 1, seq_len))
    return torch.from_numpy(np.concatenate(rows) if rows else np.empty((0, seq_len + 1), dtype=np.int64))


def _splitmix64(value: int) -> int:
    value = (value + _GOLDEN64) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """A shuffle of range(n) fixed by (seed, epoch), identical on every platform and library version.

    Each position gets a 64-bit key from splitmix64 (a bijection, so keys never tie) and the order is the
    argsort of the keys: plain integer arithmetic, unlike library RNG streams, which may change between
    versions.
    """
    base = _splitmix64((seed & _MASK64) ^ _splitmix64(epoch & _MASK64))
    with np.errstate(over="ignore"):
        keys = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(_GOLDEN64) + np.uint64(base)
        keys ^= keys >> np.uint64(30)
        keys *= np.uint64(0xBF58476D1CE4E5B9)
        keys ^= keys >> np.uint64(27)
        keys *= np.uint64(0x94D049BB133111EB)
        keys ^= keys >> np.uint64(31)
    return np.argsort(keys, kind="stable")


class BatchStream:
    """An endless iterator of LongTensor [batch_size, seq_len + 1] batches over the trainable sequences.

    `position` counts the batches consumed; constructing with position=p continues exactly where an
    uninterrupted stream would be after p batches.
    """

    def __init__(
        self,
        prepared_dir: str | Path,
        index: ShardIndex,
        seq_len: int,
        batch_size: int,
        seed: int,
        position: int = 0,
    ):
        if batch_size <= 0 or position < 0:
            raise DataError(f"batch_size must be > 0 and position >= 0, got {batch_size} and {position}")
        self.prepared_dir = Path(prepared_dir)
        self.index = index
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.position = position
        self.units = training_units(index, seq_len)
        self.unit_starts = np.cumsum([0] + [unit.count for unit in self.units])
        self.sequences_per_epoch = int(self.unit_starts[-1])
        if self.sequences_per_epoch == 0:
            raise DataError(
                f"no trainable sequences of {seq_len} tokens in {self.prepared_dir} "
                f"({index.total_tokens} tokens); "
                "add data, lower data.seq_len or raise data.shard_tokens"
            )
        self._permutations: dict[int, np.ndarray] = {}
        self._open: OrderedDict[str, np.ndarray] = OrderedDict()

    @property
    def epoch(self) -> int:
        """The epoch the next batch starts in."""
        return self.position * self.batch_size // self.sequences_per_epoch

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> torch.Tensor:
        import torch

        start = self.position * self.batch_size
        stream_entries = np.arange(start, start + self.batch_size, dtype=np.int64)
        epochs = stream_entries // self.sequences_per_epoch
        offsets = stream_entries % self.sequences_per_epoch
        sequence_numbers = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            sequence_numbers[in_epoch] = self._permutation(int(epoch))[offsets[in_epoch]]
        rows = [self._sequence(int(number)) for number in sequence_numbers]
        self.position += 1
        return torch.from_numpy(np.concatenate(rows))

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            # Only the current epoch and the next are ever needed together.
            self._permutations = {e: p for e, p in self._permutations.items() if e >= epoch - 1}
            self._permutations[epoch] = epoch_permutation(self.sequences_per_epoch, self.seed, epoch)
        return self._permutations[epoch]

    def _sequence(self, number: int) -> np.ndarray:
        unit_number = int(np.searchsorted(self.unit_starts, number, side="right") - 1)
        unit = self.units[unit_number]
        tokens = self._shard(unit.shard_sha256)
        return _windows(tokens, unit.first + number - int(self.unit_starts[unit_number]), 1, self.seq_len)

    def _shard(self, shard_sha: str) -> np.ndarray:
        if shard_sha in self._open:
            self._open.move_to_end(shard_sha)
            return self._open[shard_sha]
        tokens = _open_shard(self.prepared_dir, self.index, shard_sha)
        self._open[shard_sha] = tokens
        if len(self._open) > OPEN_SHARDS_MAX:
            self._open.popitem(last=False)
        return tokens
