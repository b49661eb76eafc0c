import math
from dataclasses import replace

import pytest
import torch

from gpunite.manifest import parse_manifest
from gpunite.model import PRESETS, build_model
from gpunite.train.trainer import InnerTrainer, TrainingError, lr_at, pick_device
from gpunite.train.weights import model_hash

VOCAB = 256
CONFIG = replace(PRESETS["tiny"], vocab_size=VOCAB, n_layers=2, max_seq_len=64)


def train_section(**overrides):
    text = "\n".join(f"{key} = {value!r}" for key, value in overrides.items())
    return parse_manifest(f"[train]\n{text}\n".replace("True", "true").replace("False", "false")).train


def token_batches(count, seed=0, batch=2, seq_len=32):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq_len + 1), generator=generator) for _ in range(count)]


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    cfg = train_section(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    total = 110
    assert lr_at(0, cfg, total) == pytest.approx(1e-4)
    assert lr_at(4, cfg, total) == pytest.approx(5e-4)
    assert lr_at(9, cfg, total) == pytest.approx(1e-3)
    assert lr_at(10, cfg, total) == pytest.approx(1e-3)
    assert lr_at(60, cfg, total) == pytest.approx(1e-4 + 0.5 * 9e-4)  # halfway through the cosine
    assert lr_at(110, cfg, total) == pytest.approx(1e-4)
    assert lr_at(500, cfg, total) == pytest.approx(1e-4)  # past the end it stays at the floor
    decay = [lr_at(step, cfg, total) for step in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    no_warmup = train_section(lr=2e-3, warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(0, no_warmup, 50) == pytest.approx(2e-3)
    assert lr_at(25, no_warmup, 50) == pytest.approx(1e-3)
    assert lr_at(50, no_warmup, 50) == pytest.approx(0.0)


def test_training_is_bitwise_deterministic_and_depends_on_the_data():
    cfg = train_section(lr=3e-3, warmup_steps=2, total_steps=6)
    batches = token_batches(4)
    hashes = []
    for data in (batches, batches, token_batches(4, seed=1)):
        model = build_model(CONFIG, seed=5)
        trainer = InnerTrainer(model, cfg)
        losses = [trainer.train_step(batch) for batch in data]
        assert trainer.step == 4
        assert all(math.isfinite(loss) for loss in losses)
        hashes.append(model_hash(model))
    assert hashes[0] == hashes[1]
    assert hashes[0] != hashes[2]


def test_loss_falls_on_data_the_model_sees_again():
    cfg = train_section(lr=3e-3, warmup_steps=0, total_steps=30)
    trainer = InnerTrainer(build_model(CONFIG, seed=0), cfg)
    batch = token_batches(1)[0]
    before = trainer.evaluate(batch)
    for _ in range(12):
        trainer.train_step(batch)
    assert trainer.evaluate(batch) < before - 1.0


def test_weight_decay_skips_norm_gains():
    trainer = InnerTrainer(build_model(CONFIG, seed=0), train_section(weight_decay=0.1))
    decayed, not_decayed = trainer.optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and not_decayed["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decayed["params"])
    assert all(p.ndim == 1 for p in not_decayed["params"])
    assert len(decayed["params"]) + len(not_decayed["params"]) == len(list(trainer.model.parameters()))


def test_evaluate_averages_over_tokens_and_leaves_weights_alone():
    trainer = InnerTrainer(build_model(CONFIG, seed=0), train_section())
    batches = token_batches(3)
    before = model_hash(trainer.model)
    each = [trainer.evaluate(batch) for batch in batches]
    assert trainer.evaluate(batches) == pytest.approx(sum(each) / 3, rel=1e-6)
    assert model_hash(trainer.model) == before and trainer.step == 0
    assert trainer.optimizer_state_tensors() == {}


def test_optimizer_state_round_trip_continues_identically_and_is_never_shared():
    cfg = train_section(lr=3e-3, warmup_steps=1, total_steps=8)
    first, rest = token_batches(2), token_batches(3, seed=9)
    original = InnerTrainer(build_model(CONFIG, seed=3), cfg)
    for batch in first:
        original.train_step(batch)
    weights = {k: v.clone() for k, v in original.model.state_dict().items()}
    state = original.optimizer_state_tensors()
    assert {name.rsplit(".", 1)[1] for name in state} == {"step", "exp_avg", "exp_avg_sq"}

    replicas = []
    for _ in range(2):  # two replays loaded from one dict: each must own its moments
        model = build_model(CONFIG, seed=99)
        model.load_state_dict(weights)
        replica = InnerTrainer(model, cfg, step=original.step)
        replica.load_optimizer_state_tensors(state)
        replicas.append(replica)
    saved = {k: v.clone() for k, v in state.items()}
    for batch in rest:
        original.train_step(batch)
        replicas[0].train_step(batch)
    for batch in rest:
        replicas[1].train_step(batch)
    assert all(torch.equal(state[k], saved[k]) for k in state)
    assert model_hash(replicas[0].model) == model_hash(original.model) == model_hash(replicas[1].model)
    for name, tensor in replicas[0].optimizer_state_tensors().items():
        assert torch.equal(tensor, original.optimizer_state_tensors()[name]), name


def test_optimizer_state_for_another_model_is_refused():
    trainer = InnerTrainer(build_model(CONFIG, seed=0), train_section())
    trainer.train_step(token_batches(1)[0])
    state = trainer.optimizer_state_tensors()
    other = InnerTrainer(build_model(replace(CONFIG, n_layers=1), seed=0), train_section())
    with pytest.raises(TrainingError, match="does not fit"):
        other.load_optimizer_state_tensors(state)


def test_non_finite_loss_and_bad_batches_raise_training_errors():
    model = build_model(CONFIG, seed=0)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    trainer = InnerTrainer(model, train_section())
    with pytest.raises(TrainingError, match="loss became nan at step 0"):
        trainer.train_step(token_batches(1)[0])
    with pytest.raises(TrainingError, match="batch must be"):
        trainer.train_step(torch.zeros(5, dtype=torch.long))


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "cuda", "mps", "xpu")
    with pytest.raises(TrainingError, match="unknown device"):
        pick_device("quantum")
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="not available"):
            pick_device("cuda")


# Local training (`gpunite train`) on a real prepared dataset.

WORDS = "peers train a model together and every step they take is checked by another peer".split()


@pytest.fixture(scope="module")
def prepared_run(tmp_path_factory):
    """A tiny Pile-format corpus, a manifest for it, and its prepared shards."""
    import json
    import random

    import zstandard

    from gpunite.data.prepare import prepare_dataset
    from gpunite.manifest import load_manifest

    folder = tmp_path_factory.mktemp("run")
    rng = random.Random(0)
    lines = b"".join(
        json.dumps(
            {
                "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))),
                "meta": {"pile_set_name": "Pile-CC"},
            }
        ).encode()
        + b"\n"
        for _ in range(120)
    )
    (folder / "corpus.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    manifest = parse_manifest(
        "[run]\nname = 'tiny-local'\n[model]\nn_layers = 2\n"
        "[data]\nsources = ['corpus.jsonl.zst']\nvocab_size = 300\nseq_len = 16\nshard_tokens = 1024\n"
        "[train]\nbatch_size = 2\ntotal_steps = 6\nwarmup_steps = 2\ncheckpoint_every = 2\nlr = 0.003\n"
    )
    manifest.save(folder / "run.toml")
    prepare_dataset(load_manifest(folder / "run.toml"))
    return folder / "run.toml"


def test_local_resume_gives_bitwise_the_weights_of_an_uninterrupted_run(prepared_run, tmp_path):
    from gpunite.manifest import load_manifest
    from gpunite.train.checkpoint import load_checkpoint
    from gpunite.train.local import train_local

    manifest = load_manifest(prepared_run)
    straight = train_local(manifest, out_dir=tmp_path / "straight", device="cpu")
    assert (straight.start_step, straight.final_step, straight.resumed) == (0, 6, False)
    assert math.isfinite(straight.heldout_loss) and straight.tokens == 6 * 2 * 16

    first = train_local(manifest, steps=3, out_dir=tmp_path / "split", device="cpu")
    assert first.final_step == 3
    second = train_local(manifest, out_dir=tmp_path / "split", device="cpu")
    assert (second.start_step, second.final_step, second.resumed) == (3, 6, True)

    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(second.checkpoint)
    assert (a.step, a.data_position) == (b.step, b.data_position) == (6, 6)
    for name, tensor in a.model_state.items():
        assert torch.equal(tensor, b.model_state[name]), name
    for name, tensor in a.optimizer_state.items():
        assert torch.equal(tensor, b.optimizer_state[name]), name
    assert second.heldout_loss == straight.heldout_loss
    assert a.extra["tokenizer_hash"] == manifest.data.tokenizer_hash and a.tokenizer_json

    fresh = train_local(manifest, steps=2, resume=False, out_dir=tmp_path / "split", device="cpu")
    assert (fresh.start_step, fresh.final_step, fresh.resumed) == (0, 2, False)


def test_training_without_prepared_data_says_to_prepare(tmp_path):
    from gpunite.data.errors import DataError
    from gpunite.manifest import load_manifest
    from gpunite.train.local import train_local

    (tmp_path / "run.toml").write_text("[data]\nsources = []\n")
    with pytest.raises(DataError, match="gpunite data prepare"):
        train_local(load_manifest(tmp_path / "run.toml"), device="cpu")


def test_cli_train_export_generate_end_to_end(prepared_run, tmp_path):
    import json
    import subprocess
    import sys

    def gpunite(*args):
        done = subprocess.run(
            [sys.executable, "-m", "gpunite", *args],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
            env={"GPUNITE_HOME": str(tmp_path), "PATH": ""},
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    trained = gpunite("train", str(prepared_run), "--steps", "2", "--out", str(tmp_path / "ck"), "--json")
    assert trained["final_step"] == 2 and trained["tokens_per_s"] > 0 and trained["mfu"] > 0
    exported = gpunite("export", trained["checkpoint"], "--hf", str(tmp_path / "hf"), "--json")
    assert "model.safetensors" in exported["files"] and "tokenizer.json" in exported["files"]
    sample = gpunite("generate", str(tmp_path / "hf"), "peers train", "--max-tokens", "5", "--json")
    assert sample["prompt"] == "peers train" and isinstance(sample["completion"], str)

    done = subprocess.run(
        [sys.executable, "-m", "gpunite", "generate", str(tmp_path / "missing.safetensors")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "no checkpoint at" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_rounding_to_trail_precision_is_the_same_in_chunks_and_idempotent():
    """The CPU rounds large tensors chunk by chunk; the bits must be those of the one-pass formula."""
    from gpunite.train.trainer import _ROUNDING_CHUNK, TRAIL_DELTA_DTYPE, _round_change

    generator = torch.Generator().manual_seed(3)
    start = torch.randn(3 * _ROUNDING_CHUNK + 17, generator=generator) * 0.02
    param = start + torch.randn(start.shape, generator=generator) * 1e-3
    expected_change = (param - start).to(TRAIL_DELTA_DTYPE)
    expected = start + expected_change.float()
    change = _round_change(param, start)
    assert change.dtype == TRAIL_DELTA_DTYPE and torch.equal(change, expected_change)
    assert torch.equal(param, expected)
    assert torch.equal(_round_change(param, start), change) and torch.equal(param, expected)
