"""Trail recording, segment serving and the one definition of which batch each step trains on."""

from __future__ import annotations

import pytest
import torch

from gpunite.manifest import TrainSection
from gpunite.model import ModelConfig, build_model
from gpunite.proof.trail import (
    TrailError,
    TrailRecorder,
    batches_for_steps,
    final_from_bytes,
    segment_from_bytes,
    trail_length,
    trail_steps,
    train_with_trail,
    weight_shapes,
)
from gpunite.records import WorkUnit
from gpunite.train.trainer import InnerTrainer

MICRO = ModelConfig(64, 32, 1, 2, 2, 64, 32, True)
SHARD_A, SHARD_B = "a" * 64, "b" * 64


def _loader(seq_len: int = 8):
    data = {SHARD_A: torch.arange(100 * (seq_len + 1)).view(100, seq_len + 1) % 64,
            SHARD_B: (torch.arange(100 * (seq_len + 1)).view(100, seq_len + 1) * 7 + 3) % 64}
    calls = []

    def load(shard, first, count):
        calls.append((shard, first, count))
        return data[shard][first : first + count]

    return load, data, calls


def test_trail_steps_include_the_last_step():
    assert trail_steps(10, 2) == [0, 2, 4, 6, 8, 10]
    assert trail_steps(7, 3) == [0, 3, 6, 7]
    assert trail_length(100, 10) == 11
    with pytest.raises(TrailError):
        trail_steps(10, 0)


def test_batches_follow_the_units_in_order_and_load_only_what_is_needed():
    load, data, calls = _loader()
    units = [WorkUnit(shard=SHARD_A, first=10, count=6), WorkUnit(shard=SHARD_B, first=50, count=6)]
    batches = batches_for_steps(units, range(4), 3, load)
    assert [b.shape[0] for b in batches] == [3, 3, 3, 3]
    assert torch.equal(batches[1], data[SHARD_A][13:16])
    assert torch.equal(batches[2], data[SHARD_B][50:53])
    calls.clear()
    middle = batches_for_steps(units, range(1, 3), 3, load)
    assert calls == [(SHARD_A, 13, 3), (SHARD_B, 50, 3)]
    assert torch.equal(middle[0], batches[1]) and torch.equal(middle[1], batches[2])
    with pytest.raises(TrailError):
        batches_for_steps(units, range(3, 5), 3, load)


def test_recorder_serves_segments_that_match_the_trail(tmp_path):
    load, _, _ = _loader()
    units = [WorkUnit(shard=SHARD_A, first=0, count=8)]
    model = build_model(MICRO, seed=0)
    trainer = InnerTrainer(model, TrainSection(batch_size=2, warmup_steps=1), total_steps=10, step=5)
    recorder = TrailRecorder(2, tmp_path)
    losses = train_with_trail(trainer, model, units, 2, load, 4, recorder, round_index=3)
    assert len(losses) == 4 and len(recorder.trail) == 3
    # The recorder copies states unhashed and its writer hashes them: the entries are those of hashed copies.
    from gpunite.proof.trail import capture_state

    assert recorder.trail[-1] == capture_state(model, trainer).entry
    assert capture_state(model, trainer, hashed=False).optimizer_hash == ""
    shapes = weight_shapes(model)
    for index in range(2):
        segment = segment_from_bytes(recorder.segment_payload(3, index), shapes)
        assert segment.index == index
        assert segment.start.entry == recorder.trail[index] and segment.end.entry == recorder.trail[index + 1]
        assert (segment.start.step, segment.end.step, segment.first_step) == (5 + 2 * index, 7 + 2 * index, 5)
    assert segment_from_bytes(recorder.segment_payload(3, 0), shapes).start.optimizer == {}  # fresh AdamW
    final = final_from_bytes(recorder.final_payload(3), shapes)
    assert final.entry == recorder.trail[-1] and final.step == 9

    wrong = dict(shapes)
    wrong[next(iter(wrong))] = (1, 1)
    with pytest.raises(TrailError):
        segment_from_bytes(recorder.segment_payload(3, 0), wrong)
    assert recorder.prune(4) == [3]
    with pytest.raises(TrailError):
        recorder.segment_payload(3, 0)
