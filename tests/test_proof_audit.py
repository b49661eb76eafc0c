"""Audit replay: honest segments replay bit-exactly and pass; each cheat a trainer can run is rejected."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from gpunite.errors import GpuniteError
from gpunite.identity import Identity
from gpunite.manifest import TrainSection
from gpunite.model import ModelConfig, build_model
from gpunite.proof.adversary import MODES, RoundWork
from gpunite.proof.audit import PROVEN, AuditBounds, audit_delta, audit_segment, verify_contribution
from gpunite.proof.trail import (
    TrailRecorder,
    batches_for_steps,
    final_from_bytes,
    optimizer_hash,
    segment_from_bytes,
    state_from_bytes,
    trail_steps,
)
from gpunite.records import WorkUnit, parse_record
from gpunite.train.compression import decompress, payload_from_bytes
from gpunite.train.weights import flatten, trainable_state

MICRO = ModelConfig(64, 32, 1, 2, 2, 64, 32, True)
SEQ, BATCH, STEPS, K = 8, 2, 4, 2
CFG = TrainSection(batch_size=BATCH, inner_steps=STEPS, lr=1e-2, warmup_steps=1, compression_chunk=256)
SHARD = "c" * 64
CORPUS = torch.randint(0, 64, (64, SEQ + 1), generator=torch.Generator().manual_seed(0))
BASE = {n: t.clone() for n, t in trainable_state(build_model(MICRO, seed=0)).items()}
SHAPES = {n: tuple(t.shape) for n, t in BASE.items()}
NUMEL = sum(t.numel() for t in BASE.values())


def load(shard, first, count):
    assert shard == SHARD
    return CORPUS[first : first + count]


def _work(mode: str, tmp_path, slot: int = 0) -> RoundWork:
    return RoundWork(
        run_id="1" * 64, round=0, base=BASE, units=[WorkUnit(shard=SHARD, first=slot * 8, count=8)],
        model_config=MICRO, train_cfg=CFG, seq_len=SEQ, trail_interval=K, first_step=0, total_steps=20,
        loader=load, identity=Identity.from_seed(mode.encode()), recorder=TrailRecorder(K, tmp_path / mode),
        slice_bounds=[(0, NUMEL)], foreign_units=[WorkUnit(shard=SHARD, first=48, count=8)],
    )


def _audit(submission, segment):
    contribution = parse_record(submission.record)
    steps = trail_steps(contribution.inner_steps, contribution.trail_interval)
    batches = batches_for_steps(contribution.work_units, range(steps[segment], steps[segment + 1]), BATCH, load)
    served = segment_from_bytes(submission.recorder.segment_payload(0, segment), BASE)
    return audit_segment(contribution, served, batches, MICRO, CFG, total_steps=20, expected_first_step=0,
                         expected_first_optimizer_hash=optimizer_hash({}), base=BASE)


@pytest.fixture(scope="module")
def honest_submission(tmp_path_factory):
    return MODES["honest"](_work("honest", tmp_path_factory.mktemp("honest")))[0]


def test_honest_segments_replay_bit_exactly(honest_submission):
    for segment in (0, 1):
        result = _audit(honest_submission, segment)
        assert result.accept and result.distance == 0.0, result.reason
        assert result.replay_flops > 0


@pytest.mark.parametrize("mode", ["fewer_steps", "skipped_data", "substituted_data"])
def test_cheated_segments_are_rejected_as_proven(mode, tmp_path):
    """Extrapolated half-steps, half the data, other data (the benchmark runs every other mode)."""
    submission = MODES[mode](_work(mode, tmp_path))[0]
    for segment in (0, 1):
        result = _audit(submission, segment)
        assert not result.accept and result.cheat and result.reason.startswith(PROVEN), (mode, result)
        assert result.distance > 0.1


def test_whole_verification_and_the_delta_against_the_trail(honest_submission, tmp_path):
    names = list(BASE)
    base = flatten(BASE[n] for n in names)
    final = final_from_bytes(honest_submission.recorder.final_payload(0), SHAPES)
    contribution = parse_record(honest_submission.record)
    delta = decompress(payload_from_bytes(honest_submission.delta_bytes, NUMEL, 256))
    assert audit_delta(contribution, final, base, delta, names).accept
    rejected = audit_delta(contribution, final, base, delta * 2, names)
    assert not rejected.accept and rejected.cheat

    asked = []

    def fetch(i, part):
        asked.append((i, part))
        return honest_submission.recorder.segment_part(0, i, part)

    result = verify_contribution(
        contribution, [0, 1], fetch, lambda: honest_submission.recorder.final_payload(0), BASE, delta, load, BATCH,
        MICRO, CFG, total_steps=20, held_out=(CORPUS[60:62], 4.2), expected_first_step=0)
    assert result.accept and result.distance == 0.0, result.reason
    assert result.replay_flops > 0
    # Both replays hash to the committed entries, so no end state was asked for.
    assert asked == [(0, "start"), (1, "start")]
    assert result.details["bit_exact[0]"] == result.details["bit_exact[1]"] == 1.0

    random_sub = MODES["random_delta"](_work("random_delta", tmp_path))[0]
    result = verify_contribution(
        parse_record(random_sub.record), [0], lambda i, part: random_sub.recorder.segment_part(0, i, part),
        lambda: random_sub.recorder.final_payload(0), BASE,
        decompress(payload_from_bytes(random_sub.delta_bytes, NUMEL, 256)), load, BATCH, MICRO, CFG, total_steps=20)
    assert not result.accept and not result.cheat  # it cannot serve its trail: rejected, nothing to prove


def test_a_replay_that_is_not_bit_exact_fetches_the_end_state_and_measures_the_distance(honest_submission, tmp_path):
    contribution = parse_record(honest_submission.record)
    steps = trail_steps(contribution.inner_steps, contribution.trail_interval)
    batches = batches_for_steps(contribution.work_units, range(steps[1], steps[2]), BATCH, load)
    start_only = segment_from_bytes(honest_submission.recorder.segment_part(0, 1, "start"), BASE)
    assert start_only.end is None

    def audit(**kwargs):
        return audit_segment(contribution, start_only, batches, MICRO, CFG, total_steps=20, base=BASE, **kwargs)

    ends = []

    def fetch_end():
        ends.append(1)
        return state_from_bytes(honest_submission.recorder.segment_part(0, 1, "end"), BASE)

    # bf16 autocast changes the replay's rounding: its hash differs, so the verifier fetches the committed end
    replay = audit(autocast_dtype=torch.bfloat16, fetch_end=fetch_end)
    assert ends == [1] and replay.details["bit_exact"] == 0.0, replay.reason
    assert replay.accept and 0.0 < replay.distance <= AuditBounds().tolerance, replay.reason  # measured 0.0062
    assert not audit(autocast_dtype=torch.bfloat16).accept  # no way to fetch the end: rejected, not a cheat
    # a trainer that serves another state as the end is refused (not proven: the segment is not the trail's)
    wrong = audit(autocast_dtype=torch.bfloat16,
                  fetch_end=lambda: state_from_bytes(honest_submission.recorder.entry_payload(0, 0), BASE))
    assert not wrong.accept and not wrong.cheat and "end" in wrong.reason
    with pytest.raises(GpuniteError):
        state_from_bytes(honest_submission.recorder.entry_payload(0, 2)[:-10], BASE)  # truncated


def test_a_cheat_is_proven_from_the_fetched_end_state(tmp_path):
    submission = MODES["fewer_steps"](_work("fewer_steps", tmp_path))[0]
    contribution = parse_record(submission.record)
    delta = decompress(payload_from_bytes(submission.delta_bytes, NUMEL, 256))
    asked = []

    def fetch(i, part):
        asked.append((i, part))
        return submission.recorder.segment_part(0, i, part)

    result = verify_contribution(contribution, [1], fetch, lambda: submission.recorder.final_payload(0), BASE, delta,
                                 load, BATCH, MICRO, CFG, total_steps=20, expected_first_step=0)
    assert asked == [(1, "start"), (1, "end")]
    assert not result.accept and result.cheat and result.reason.startswith(PROVEN), result.reason


def test_forged_optimizer_state_is_rejected(tmp_path):
    """Segment 1 starts from a forged AdamW state (huge moments make the update ignore the gradients)."""
    from gpunite.proof.trail import capture_state
    from gpunite.train.checkpoint import load_model_state
    from gpunite.train.trainer import InnerTrainer

    work = _work("forger", tmp_path)
    model = build_model(MICRO, seed=0)
    load_model_state(model, BASE)
    trainer = InnerTrainer(model, CFG, total_steps=20)
    work.recorder.start_round(0, STEPS)
    work.recorder.record_state(capture_state(model, trainer))
    for batch in batches_for_steps(work.units, range(2), BATCH, load):
        trainer.train_step(batch)
    state = trainer.optimizer_state_tensors()
    forged = {n: (t * 1e4 if n.endswith("exp_avg_sq") else t * 1e2 if n.endswith("exp_avg") else t)
              for n, t in state.items()}
    trainer.load_optimizer_state_tensors(forged)
    work.recorder.record_state(capture_state(model, trainer))
    for batch in batches_for_steps(work.units, range(2, 4), BATCH, load):
        trainer.train_step(batch)
    work.recorder.record_state(capture_state(model, trainer))
    final = capture_state(model, trainer).weights
    from gpunite.proof.adversary import contribution_for

    names = list(BASE)
    submission = contribution_for(work, work.identity, work.units, work.recorder.trail,
                                  flatten(BASE[n] for n in names) - flatten(final[n] for n in names))
    segment0, segment1 = _audit(submission, 0), _audit(submission, 1)
    assert not segment0.accept and "optimizer state" in segment0.reason  # the forgery breaks segment 0's end
    assert not segment1.accept and "second moment" in segment1.reason, segment1.details


def test_held_out_loss_that_blows_up_is_a_proven_rejection(honest_submission):
    contribution = parse_record(honest_submission.record)
    delta = decompress(payload_from_bytes(honest_submission.delta_bytes, NUMEL, 256))
    # A base loss far below what the final weights reach: the held-out loss "rose" past the bound.
    result = verify_contribution(
        contribution, [0], lambda i, part: honest_submission.recorder.segment_part(0, i, part),
        lambda: honest_submission.recorder.final_payload(0), BASE, delta, load, BATCH, MICRO, CFG, total_steps=20,
        held_out=(CORPUS[60:62], 0.01), expected_first_step=0)
    assert not result.accept and result.cheat and "held-out loss rose" in result.reason


def test_replayed_old_work_commits_to_this_round_and_its_slicing(honest_submission, tmp_path):
    from gpunite.train.compression import payload_hash, payload_to_bytes, slice_payload

    work = _work("replay_old", tmp_path)
    work.round, work.history = 1, [honest_submission]
    work.slice_bounds = [(0, 512), (512, NUMEL)]  # the roster grew: two slices now
    replayed = MODES["replay_old"](work)[0]
    record = parse_record(replayed.record)
    assert replayed.cheating and record.round == 1 and record.delta_hash == parse_record(
        honest_submission.record).delta_hash
    payload = payload_from_bytes(honest_submission.delta_bytes, NUMEL, 256)
    assert record.slice_hashes == [payload_hash(payload_to_bytes(slice_payload(payload, lo, hi)))
                                   for lo, hi in work.slice_bounds]


def test_a_rising_own_loss_rejects_only_replays_that_are_not_exact(honest_submission):
    """Bounds under which any loss counts as risen: an exact replay (the committed computation itself) still
    passes; a bf16 replay, within tolerance but not exact, is rejected on its own loss."""
    contribution = parse_record(honest_submission.record)
    steps = trail_steps(contribution.inner_steps, contribution.trail_interval)
    batches = batches_for_steps(contribution.work_units, range(steps[0], steps[1]), BATCH, load)
    strict = AuditBounds(own_loss_rise=-1.0)

    def audit(part, **kw):
        served = segment_from_bytes(honest_submission.recorder.segment_part(0, 0, part), BASE)
        return audit_segment(contribution, served, batches, MICRO, CFG, total_steps=20, bounds=strict,
                             expected_first_step=0, expected_first_optimizer_hash=optimizer_hash({}), base=BASE, **kw)

    exact = audit("start")
    assert exact.accept and audit("both").accept
    # The own loss is measured only where it can decide: never for an exact replay (one forward pass saved).
    assert "end_loss" not in exact.details
    inexact = audit("both", autocast_dtype=torch.bfloat16)
    assert not inexact.accept and "own loss rose" in inexact.reason, inexact.reason
    assert "end_loss" in inexact.details and inexact.replay_flops > exact.replay_flops


def test_second_moment_ratio_is_the_mean_start_moment_over_the_segments_own_squared_gradients():
    """Summed tensor by tensor in fp64 (no fp64 copy of the moments): the same figure as the formula computed
    whole in fp64, about 1 for an honest state and far above it for an inflated one."""
    from gpunite.proof.audit import _second_moment_ratio

    generator = torch.Generator().manual_seed(3)
    names, beta2, steps = ["a", "b"], 0.95, 4
    v_start = {f"{n}.exp_avg_sq": torch.rand(300 + 50 * i, generator=generator) * 1e-6 for i, n in enumerate(names)}
    grads = {key: torch.rand(v.shape, generator=generator) * 1e-6 for key, v in v_start.items()}
    v_end = {key: beta2 ** steps * v + (1 - beta2 ** steps) * grads[key] for key, v in v_start.items()}

    whole_start = torch.cat([v_start[f"{n}.exp_avg_sq"] for n in names]).double()
    whole_end = torch.cat([v_end[f"{n}.exp_avg_sq"] for n in names]).double()
    decay = beta2 ** steps
    expected = float(whole_start.mean() / ((whole_end - decay * whole_start).clamp_min(0).mean() / (1 - decay)))
    assert _second_moment_ratio(v_start, v_end, names, beta2, steps) == pytest.approx(expected, rel=1e-5)
    assert 0.5 < expected < 2.0
    inflated = {key: v * 1e4 for key, v in v_start.items()}
    inflated_end = {key: decay * v + (1 - decay) * grads[key] for key, v in inflated.items()}
    assert _second_moment_ratio(inflated, inflated_end, names, beta2, steps) > 1e3


def test_an_overlapped_round_verifies_on_both_sides_of_its_rebase(tmp_path):
    """A round that trained from the weights before its base (overlap) and was carried onto the base at step 2
    commits to a trail that reads as one from the base: every segment replays bit-exactly from what it ran on,
    and one claiming a rebase it did not make is proven by the replay before it."""
    from gpunite.proof.adversary import _start, contribution_for
    from gpunite.proof.trail import train_with_trail
    from gpunite.train.checkpoint import load_model_state

    start = {n: t.clone() for n, t in trainable_state(build_model(MICRO, seed=1)).items()}
    names = list(BASE)
    units = [WorkUnit(shard=SHARD, first=0, count=12)]  # 6 steps: entries at 0, 2, 4, 6; rebase at 2

    def submit(mode: str, rebase_step: int, trained_from: dict) -> tuple:
        work = replace(_work(mode, tmp_path), units=units)
        model, trainer = _start(work)
        load_model_state(model, trained_from)
        train_with_trail(trainer, model, units, BATCH, load, 6, work.recorder, 0, rebase=(rebase_step, BASE))
        assert work.recorder.rebase_step == rebase_step
        final = flatten(trainable_state(model)[n] for n in names)
        submission = contribution_for(work, work.identity, units, work.recorder.trail,
                                      flatten(BASE[n] for n in names) - final, start_hash="5" * 64,
                                      rebase_step=rebase_step)
        return submission, decompress(payload_from_bytes(submission.delta_bytes, NUMEL, 256))

    def verify(submission, delta, **kwargs):
        asked = []

        def fetch(i, part):
            asked.append((i, part))
            return submission.recorder.segment_part(0, i, part)

        result = verify_contribution(parse_record(submission.record), [0, 1, 2], fetch,
                                     lambda: submission.recorder.final_payload(0), BASE, delta, load, BATCH, MICRO,
                                     CFG, total_steps=20, expected_first_step=0, **kwargs)
        return result, asked

    honest, delta = submit("rebased", 2, start)
    contribution = parse_record(honest.record)
    assert contribution.rebase_step == 2 and contribution.start_hash == "5" * 64
    # entry 0 is the base itself (its change from the start is 0), as in any trail
    assert segment_from_bytes(honest.recorder.segment_payload(0, 0), BASE).start.entry == contribution.trail[0]
    result, asked = verify(honest, delta, start=start)
    assert result.accept, result.reason
    assert [result.details[f"bit_exact[{i}]"] for i in range(3)] == [1.0, 1.0, 1.0]
    assert asked == [(0, "start"), (1, "start"), (2, "start")]  # no end state needed on either side
    # a rebase while the entries before it are still being written commits to the same trail
    import gpunite.proof.trail as trail_module

    store = trail_module._store_tensors
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trail_module, "_store_tensors", lambda *a: (time.sleep(0.3), store(*a))[1])
        slow, _ = submit("slow", 2, start)
    assert slow.recorder.trail == honest.recorder.trail
    # the steps before the rebase are replayed from the start weights: a verifier without them judges nothing
    missing, _ = verify(honest, delta)
    assert not missing.accept and not missing.cheat and "started from" in missing.reason
    # a trainer that trained from the base all along but claims it started from the start weights
    claimed, claimed_delta = submit("claimed", 2, BASE)
    lying, _ = verify(claimed, claimed_delta, start=start)
    assert not lying.accept and lying.cheat and lying.segment == 0, lying.reason
    # a rebase at step 0 is an ordinary round from the base
    plain, plain_delta = submit("plain", 0, start)
    assert plain.recorder.rebase_step == 0
    assert segment_from_bytes(plain.recorder.segment_payload(0, 1), BASE).start.entry == parse_record(
        plain.record).trail[1]
