import json
import multiprocessing
import os
import random
import signal
import sys
import time
from dataclasses import replace

import pytest
import torch

from gpunite.manifest import parse_manifest
from gpunite.model import PRESETS, build_model
from gpunite.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    restore_training_state,
    save_checkpoint,
)
from gpunite.train.trainer import InnerTrainer
from gpunite.train.weights import model_hash, to_safetensors_bytes

CONFIG = replace(PRESETS["tiny"], vocab_size=256, n_layers=2, max_seq_len=64)
MANIFEST = parse_manifest("[train]\nlr = 0.003\nwarmup_steps = 2\ntotal_steps = 8\n")


def batches(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, 33), generator=generator) for _ in range(count)]


def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(tmp_path):
    data = batches(6)
    straight = InnerTrainer(build_model(CONFIG, seed=1), MANIFEST.train)
    for batch in data:
        straight.train_step(batch)

    first = InnerTrainer(build_model(CONFIG, seed=1), MANIFEST.train)
    for batch in data[:3]:
        first.train_step(batch)
    path = save_checkpoint(
        tmp_path / "ck.safetensors",
        first.model,
        first,
        data_position=3,
        manifest=MANIFEST,
        tokenizer_json='{"model": {}}',
        extra={"note": "half way"},
    )
    checkpoint = load_checkpoint(path)
    assert (checkpoint.step, checkpoint.data_position) == (3, 3)
    assert checkpoint.model_config == CONFIG
    assert parse_manifest(checkpoint.manifest_toml).canonical() == MANIFEST.canonical()
    assert json.loads(checkpoint.tokenizer_json) == {"model": {}}
    assert checkpoint.extra == {"note": "half way"}
    assert set(checkpoint.rng_state) == {"cpu"} and checkpoint.rng_state["cpu"].dtype == torch.uint8

    resumed_model = build_model(CONFIG, seed=77)  # different init: everything must come from the file
    resumed = InnerTrainer(resumed_model, MANIFEST.train)
    restore_training_state(checkpoint, resumed_model, resumed)
    assert resumed.step == 3
    for batch in data[checkpoint.data_position :]:
        resumed.train_step(batch)
    assert model_hash(resumed_model) == model_hash(straight.model)


def test_model_from_checkpoint_gives_the_same_logits(tmp_path):
    model = build_model(CONFIG, seed=4)
    path = save_checkpoint(tmp_path / "w.safetensors", model, None, data_position=0)
    rebuilt = model_from_checkpoint(load_checkpoint(path))
    tokens = batches(1)[0]
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, rebuilt(tokens).logits)
    assert rebuilt.lm_head.weight is rebuilt.model.embed_tokens.weight  # still tied


def test_damaged_checkpoints_raise_one_line_errors_naming_the_file(tmp_path):
    trainer = InnerTrainer(build_model(CONFIG, seed=0), MANIFEST.train)
    trainer.train_step(batches(1)[0])
    good = save_checkpoint(tmp_path / "good.safetensors", trainer.model, trainer, data_position=1)
    data = good.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    cases = {
        "truncated": data[: len(data) // 2],
        "header-only": data[:20],
        "empty": b"",
        "garbage": os.urandom(4096),
        "bit-flip": bytes(flipped),
        "foreign": to_safetensors_bytes({"w": torch.zeros(3)}),
    }
    for name, content in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(bad)
        message = str(info.value)
        assert str(bad) in message and "\n" not in message, (name, message)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.safetensors")


SMALL = replace(
    PRESETS["tiny"],
    vocab_size=256,
    hidden_size=128,
    n_layers=2,
    n_heads=2,
    n_kv_heads=2,
    intermediate_size=344,
    max_seq_len=64,
)


def save_forever(path, reports):
    """A saver process: bump a weight to the step number, save, repeat, until killed."""
    model = build_model(SMALL, seed=0)
    trainer = InnerTrainer(model, MANIFEST.train)
    trainer.train_step(torch.randint(0, 256, (2, 17)))  # so the optimizer state is saved too
    while True:
        trainer.step += 1
        with torch.no_grad():
            model.model.norm.weight.fill_(trainer.step)
        reports.send_bytes(b"s")  # one small message per save started: a pipe write under PIPE_BUF is atomic
        save_checkpoint(path, model, trainer, data_position=trainer.step)


@pytest.mark.skipif(sys.platform == "win32", reason="needs fork and SIGKILL")
def test_kill_9_during_saves_always_leaves_a_loadable_checkpoint(tmp_path):
    # Real processes killed with SIGKILL at random moments of a save loop. A fork server that has imported
    # torch and transformers (and computed nothing, so no OpenMP threads exist to break a fork) starts each
    # saver in milliseconds instead of seconds.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(
        ["torch", "transformers.models.llama.modeling_llama", "gpunite.train.checkpoint"]
    )
    rng = random.Random(1234)
    for attempt in range(4):
        path = tmp_path / f"attempt{attempt}" / "latest.safetensors"
        reports, report_writer = context.Pipe(duplex=False)
        saver = context.Process(target=save_forever, args=(path, report_writer), daemon=True)
        saver.start()
        report_writer.close()
        try:
            for _ in range(rng.randint(2, 5)):  # the second save starts after the first has landed
                assert reports.recv_bytes() == b"s"
            time.sleep(rng.uniform(0.0, 0.03))  # a save of this model takes a few tens of milliseconds
            os.kill(saver.pid, signal.SIGKILL)
            saver.join()
        finally:
            if saver.is_alive():
                os.kill(saver.pid, signal.SIGKILL)
                saver.join()
            reports.close()
        assert saver.exitcode == -signal.SIGKILL
        checkpoint = load_checkpoint(path)
        # The surviving file is one complete save: its weights agree with its own step counter.
        assert checkpoint.step >= 1
        assert torch.all(checkpoint.model_state["model.norm.weight"] == checkpoint.step)
