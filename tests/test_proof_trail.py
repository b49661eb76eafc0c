"""Trail recording, segment serving and the one definition of which batch each step trains on."""

from __future__ import annotations

import pytest
import torch

from gpunite.manifest import TrainSection
from gpunite.model import ModelConfig, build_model
from gpunite.proof.trail import (
    FINAL_BYTES_PER_PARAM,
    STATE_BYTES_PER_PARAM,
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
from gpunite.train.weights import trainable_state

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


def _trained(tmp_path, steps: int = 4):
    load, _, _ = _loader()
    units = [WorkUnit(shard=SHARD_A, first=0, count=2 * steps)]
    model = build_model(MICRO, seed=0)
    base = {name: t.clone() for name, t in trainable_state(model).items()}
    trainer = InnerTrainer(model, TrainSection(batch_size=2, warmup_steps=1), total_steps=10, step=5)
    recorder = TrailRecorder(2, tmp_path)
    losses = train_with_trail(trainer, model, units, 2, load, steps, recorder, round_index=3)
    return model, trainer, recorder, base, losses


def test_recorder_serves_segments_that_match_the_trail(tmp_path):
    model, trainer, recorder, base, losses = _trained(tmp_path)
    assert len(losses) == 4 and len(recorder.trail) == 3
    # The recorder copies states unhashed and its writer hashes them: the entries are those of hashed copies.
    from gpunite.proof.trail import capture_state

    assert recorder.trail[-1] == capture_state(model, trainer).entry
    assert capture_state(model, trainer, hashed=False).optimizer_hash == ""
    for index in range(2):
        segment = segment_from_bytes(recorder.segment_payload(3, index), base)
        assert segment.index == index
        assert segment.start.entry == recorder.trail[index] and segment.end.entry == recorder.trail[index + 1]
        assert (segment.start.step, segment.end.step, segment.first_step) == (5 + 2 * index, 7 + 2 * index, 5)
    assert segment_from_bytes(recorder.segment_payload(3, 0), base).start.optimizer == {}  # fresh AdamW
    final = final_from_bytes(recorder.final_payload(3), weight_shapes(model))
    assert final.entry == recorder.trail[-1] and final.step == 9

    wrong = dict(base)
    wrong[next(iter(wrong))] = torch.zeros(1, 1)
    with pytest.raises(TrailError):
        segment_from_bytes(recorder.segment_payload(3, 0), wrong)
    # Other base weights of the right shapes expand to other states: they no longer match the commitment.
    shifted = {name: t + 1e-3 for name, t in base.items()}
    assert segment_from_bytes(recorder.segment_payload(3, 1), shifted).start.entry != recorder.trail[1]
    assert recorder.prune(4) == [3]
    with pytest.raises(TrailError):
        recorder.segment_payload(3, 0)


def test_stored_states_are_compact_and_exactly_what_training_went_on_from(tmp_path):
    model, trainer, recorder, base, _ = _trained(tmp_path)
    numel = sum(t.numel() for t in base.values())
    last = recorder.load_state(3, 2)
    # The trainer's own state after the last trail step is the stored one, bit for bit.
    assert all(torch.equal(last.weights[name], t) for name, t in trainable_state(model).items())
    assert all(torch.equal(last.optimizer[name], t) for name, t in trainer.optimizer_state_tensors().items())
    # Rounding again changes nothing: stored values are fixed points.
    trainer.round_to_trail_precision(base)
    assert all(torch.equal(last.weights[name], t) for name, t in trainable_state(model).items())
    # 8 bytes per parameter a state (fp16 change, bf16 and fp32 moments), 4 for the final weights (fp32).
    entry = len(recorder.entry_payload(3, 2))
    assert STATE_BYTES_PER_PARAM == 8 and FINAL_BYTES_PER_PARAM == 4
    assert numel * 8 <= entry < numel * 9  # the rest: the safetensors header (tensor names)
    assert numel * 4 <= len(recorder.final_payload(3)) < numel * 5
    assert len(recorder.segment_payload(3, 1, with_end=False)) < numel * 9
    # The base is kept beside the entries: a later reader expands them without the trainer.
    again = TrailRecorder(2, tmp_path)
    assert again.load_state(3, 1).entry == recorder.trail[1]


def test_a_state_recorded_unrounded_is_committed_as_stored(tmp_path):
    """An adversary (or older code) recording its fp32 state as is: the entry commits to what is stored, so
    the served segment still matches the trail, and a replay from it judges the difference."""
    from gpunite.proof.trail import TrailState, capture_state, expand_state, optimizer_hash

    model = build_model(MICRO, seed=0)
    trainer = InnerTrainer(model, TrainSection(batch_size=2, warmup_steps=1), total_steps=10)
    base = capture_state(model, trainer)
    recorder = TrailRecorder(1, tmp_path)
    recorder.start_round(0, 1)
    recorder.record_state(base)
    moved = {name: t + 1e-4 * torch.randn_like(t) for name, t in base.weights.items()}
    state = TrailState(moved, {}, optimizer_hash({}), 1)
    recorder.record_state(state)
    stored = expand_state(state, base.weights)
    assert any(not torch.equal(stored.weights[n], moved[n]) for n in moved)  # rounded on the way in
    assert recorder.trail == [base.entry, stored.entry]
    assert segment_from_bytes(recorder.segment_payload(0, 0), base.weights).end.entry == recorder.trail[1]
