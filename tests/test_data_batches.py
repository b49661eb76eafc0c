"""Batches: sequence windows, held-out split, trainable ranges, the shuffled stream and its exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpunite.data.batches import (
    BatchStream,
    epoch_permutation,
    heldout_sequences,
    heldout_units,
    load_sequences,
    sequences_in_shard,
    training_units,
)
from gpunite.data.errors import DataError
from gpunite.data.shards import ShardIndex, ShardWriter

SEQ_LEN = 16


def build_dataset(folder, n_tokens: int, shard_tokens: int = 1024) -> ShardIndex:
    """A prepared dir whose token i is i: every sequence is identified by its first token."""
    writer = ShardWriter(folder, shard_tokens, "uint16")
    writer.add(np.arange(n_tokens, dtype=np.int64))
    shards = writer.finish()
    index = ShardIndex(
        tokenizer_hash="0" * 64,
        vocab_size=65536,
        eos_id=0,
        dtype="uint16",
        seq_len=SEQ_LEN,
        shard_tokens=shard_tokens,
        documents=1,
        total_tokens=n_tokens,
        shards=shards,
    )
    index.save(folder)
    return ShardIndex.load(folder)


@pytest.fixture()
def dataset(tmp_path):
    # 3 full shards of 63 sequences (1 held out each), a last one of 1000 tokens (62 sequences, 1 held out).
    return tmp_path, build_dataset(tmp_path, 3 * 1024 + 1000)


def test_sequence_windows_overlap_by_one_token(dataset):
    folder, index = dataset
    assert sequences_in_shard(1024, SEQ_LEN) == 63 and sequences_in_shard(16, SEQ_LEN) == 0
    second = index.shards[1]
    rows = load_sequences(folder, index, second.sha256, 5, 3, SEQ_LEN)
    assert rows.dtype == torch.int64 and rows.shape == (3, SEQ_LEN + 1)
    expected = torch.stack(
        [torch.arange(1024 + j * SEQ_LEN, 1024 + j * SEQ_LEN + SEQ_LEN + 1) for j in (5, 6, 7)]
    )
    assert torch.equal(rows, expected)
    with pytest.raises(DataError, match="outside shard"):
        load_sequences(folder, index, second.sha256, 60, 4, SEQ_LEN)
    with pytest.raises(DataError, match="not in this dataset's index"):
        load_sequences(folder, index, "f" * 64, 0, 1, SEQ_LEN)


def test_training_units_and_heldout_split_partition_every_shard(dataset):
    _, index = dataset
    train = training_units(index, SEQ_LEN)
    held = heldout_units(index, SEQ_LEN)
    assert [(u.first, u.count) for u in train] == [(0, 62)] * 3 + [(0, 61)]
    assert [(u.first, u.count) for u in held] == [(62, 1)] * 3 + [(61, 1)]
    big = build_dataset_index_only(n_sequences=250)
    assert heldout_units(big, SEQ_LEN)[0].count == 3  # ceil(1% of 250)


def build_dataset_index_only(n_sequences: int) -> ShardIndex:
    n_tokens = n_sequences * SEQ_LEN + 1
    return ShardIndex(
        tokenizer_hash="0" * 64,
        vocab_size=65536,
        eos_id=0,
        dtype="uint16",
        seq_len=SEQ_LEN,
        shard_tokens=n_tokens,
        documents=1,
        total_tokens=n_tokens,
        shards=[{"sha256": "a" * 64, "n_tokens": n_tokens}],
    )


def test_heldout_sequences_are_never_in_the_training_stream(dataset):
    folder, index = dataset
    heldout = heldout_sequences(folder, index, SEQ_LEN, max_sequences=100)
    assert heldout.shape == (4, SEQ_LEN + 1)
    heldout_starts = set(heldout[:, 0].tolist())
    stream = BatchStream(folder, index, SEQ_LEN, batch_size=8, seed=1)
    seen = set()
    for _ in range(3 * 247 // 8 + 1):  # more than 3 epochs
        seen |= set(next(stream)[:, 0].tolist())
    assert len(seen) == 247 and not seen & heldout_starts
    assert heldout_sequences(folder, index, SEQ_LEN, max_sequences=2).shape == (2, SEQ_LEN + 1)


def test_stream_covers_each_epoch_once_in_a_seeded_order(dataset):
    folder, index = dataset
    per_epoch = 247
    stream = BatchStream(folder, index, SEQ_LEN, batch_size=13, seed=42)  # 247 = 19 batches of 13
    first_epoch = torch.cat([next(stream) for _ in range(19)])
    assert stream.epoch == 1 and stream.position == 19
    assert len(set(first_epoch[:, 0].tolist())) == per_epoch
    second_epoch = torch.cat([next(stream) for _ in range(19)])
    assert not torch.equal(first_epoch, second_epoch)  # reshuffled
    other_seed = torch.cat(
        [next(BatchStream(folder, index, SEQ_LEN, batch_size=13, seed=43)) for _ in range(1)]
    )
    assert not torch.equal(other_seed, first_epoch[:13])


def test_resume_at_any_position_equals_the_uninterrupted_stream(dataset):
    folder, index = dataset
    uninterrupted = BatchStream(folder, index, SEQ_LEN, batch_size=10, seed=7)
    batches = [
        next(uninterrupted) for _ in range(60)
    ]  # crosses two epoch boundaries mid-batch (247 % 10 != 0)
    for position in (0, 1, 24, 25, 49, 59):
        resumed = BatchStream(folder, index, SEQ_LEN, batch_size=10, seed=7, position=position)
        assert resumed.epoch == position * 10 // 247
        for expected in batches[position : position + 2]:
            assert torch.equal(next(resumed), expected)


def test_epoch_permutation_is_a_fixed_permutation():
    permutation = epoch_permutation(1000, seed=5, epoch=0)
    assert sorted(permutation.tolist()) == list(range(1000))
    assert np.array_equal(permutation, epoch_permutation(1000, seed=5, epoch=0))
    assert not np.array_equal(permutation, epoch_permutation(1000, seed=5, epoch=1))
    # The order must not change with numpy versions or platforms (peers share it): pinned, and equal to a
    # plain-integer splitmix64 written out here.
    assert epoch_permutation(8, seed=0, epoch=0).tolist() == [0, 7, 2, 5, 4, 6, 3, 1]
    assert epoch_permutation(300, seed=2**40 + 3, epoch=9).tolist() == reference_permutation(
        300, 2**40 + 3, 9
    )


def reference_permutation(n: int, seed: int, epoch: int) -> list[int]:
    mask = (1 << 64) - 1

    def splitmix64(value: int) -> int:
        value = (value + 0x9E3779B97F4A7C15) & mask
        value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & mask
        value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & mask
        return value ^ (value >> 31)

    base = splitmix64(seed ^ splitmix64(epoch))
    keys = [splitmix64((base + i * 0x9E3779B97F4A7C15) & mask) for i in range(n)]
    return sorted(range(n), key=keys.__getitem__)


def test_too_little_data_is_a_clear_error(tmp_path):
    index = build_dataset(tmp_path, 20)  # one sequence of 16: trainable, nothing held out
    with pytest.raises(DataError, match="no held-out sequences"):
        heldout_sequences(tmp_path, index, SEQ_LEN, 4)
    with pytest.raises(DataError, match="no trainable sequences"):
        BatchStream(tmp_path, index, seq_len=64, batch_size=2, seed=0)
