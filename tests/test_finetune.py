"""LoRA fine-tuning runs: the adapter-only model, fine-tuning data, local steps, export (merge and adapter),
serving the merged export, and a real two-peer swarm round over loopback.

The base is a small fresh Llama saved as a gpunite checkpoint with a BPE trained on the task's text; the task
is synthetic and deterministic (a word, then the word twice), so a few steps of LoRA learn its form.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from gpunite.data.errors import DataError
from gpunite.manifest import ManifestError, load_manifest, parse_manifest

pytestmark = pytest.mark.timeout(300)

SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "pe", "su")


def task_records(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))
        records.append({"prompt": f"word: {word}\ntwice:", "completion": f" {word} {word}"})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


SMALL_TRAINING = {"data.seq_len": 32, "data.shard_tokens": 4096, "train.batch_size": 8,
                  "train.inner_steps": 4, "train.warmup_steps": 2, "train.total_steps": 60,
                  "train.compression_chunk": 256}


def finetune_manifest(workdir: Path, base: Path, data: Path, **overrides) -> Path:
    """A finetune manifest as `gpunite run init --kind finetune --base` writes it, set to train small.

    overrides: section__key=value, e.g. lora__rank=0.
    """
    from typer.testing import CliRunner

    from gpunite.cli import app

    path = workdir / "ft.toml"
    result = CliRunner().invoke(app, ["run", "init", "--kind", "finetune", "--base", str(base), "--data",
                                      str(data), "-o", str(path), "--force", "--json"])
    assert result.exit_code == 0, result.output
    manifest = load_manifest(path)
    settings = {**SMALL_TRAINING, **{key.replace("__", "."): value for key, value in overrides.items()}}
    for dotted, value in settings.items():
        section, key = dotted.split(".")
        setattr(getattr(manifest, section), key, value)
    manifest.save(path)
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a shared, loaded machine more threads only contend (steps ran 20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A gpunite checkpoint to fine-tune: a fresh small Llama with a tokenizer trained on the task's text."""
    from gpunite.data.finetune import finetune_text
    from gpunite.data.tokenizer import train_bpe
    from gpunite.model import ModelConfig, build_model
    from gpunite.train.checkpoint import save_checkpoint

    workdir = tmp_path_factory.mktemp("base")
    tokenizer = train_bpe([finetune_text(r) for r in task_records(300, seed=1)], vocab_size=320)
    config = ModelConfig(tokenizer.vocab_size, 64, 2, 2, 2, 128, 64, True)
    path = workdir / "base.safetensors"
    save_checkpoint(path, build_model(config, seed=11), None, data_position=0,
                    tokenizer_json=tokenizer.json_bytes.decode())
    return path


def test_run_init_writes_a_finetune_manifest_with_base_hash_and_lora(base, tmp_path):
    from gpunite.model import config_from_manifest, param_count, trainable_param_count
    from gpunite.train.lora import base_weights_hash

    path = finetune_manifest(tmp_path, base, write_jsonl(tmp_path / "d.jsonl", task_records(5, 2)))
    text = path.read_text()
    assert "[lora]" in text and "rank = 8" in text and "# finetune: LoRA rank" in text
    manifest = load_manifest(path)
    assert manifest.run.kind == "finetune" and manifest.model.preset is None
    assert manifest.model.base == str(base.resolve())
    assert manifest.model.base_hash == base_weights_hash(base)
    config = config_from_manifest(manifest)
    assert config.vocab_size == manifest.data.vocab_size and config.finetune.lora_rank == 8
    assert trainable_param_count(config) * 10 < param_count(config)


def test_lora_model_trains_only_adapters_and_starts_as_the_base(base, tmp_path):
    from gpunite.model import build_model, config_from_manifest, trainable_param_count
    from gpunite.swarm.state_sync import ParamLayout
    from gpunite.train.checkpoint import load_checkpoint, model_from_checkpoint
    from gpunite.train.trainer import unique_named_parameters

    data = write_jsonl(tmp_path / "d.jsonl", task_records(5, 2))
    manifest = load_manifest(finetune_manifest(tmp_path, base, data))
    config = config_from_manifest(manifest)
    model = build_model(config, seed=manifest.run.seed)
    trainable = unique_named_parameters(model)
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name, _ in trainable)
    layout = ParamLayout.of(model)
    base_model = model_from_checkpoint(load_checkpoint(base))
    full = sum(p.numel() for p in base_model.parameters())
    assert layout.numel == trainable_param_count(config) == sum(p.numel() for _, p in trainable)
    assert layout.numel * 10 < full  # the exchanged vector is the adapters: a tenth of the model or less here
    tokens = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=tokens).logits, base_model(input_ids=tokens).logits, atol=1e-6)
    # Same seed, same adapters: peers and audit replays build identical starting weights.
    again = dict(unique_named_parameters(build_model(config, seed=manifest.run.seed)))
    assert all(torch.equal(param, again[name]) for name, param in trainable)


def test_full_finetune_rank_zero_trains_every_base_weight(base, tmp_path):
    from gpunite.model import build_model, config_from_manifest, param_count, trainable_param_count
    from gpunite.swarm.state_sync import ParamLayout

    data = write_jsonl(tmp_path / "d.jsonl", task_records(5, 2))
    path = finetune_manifest(tmp_path, base, data, lora__rank=0)
    config = config_from_manifest(load_manifest(path))
    assert ParamLayout.of(build_model(config)).numel == trainable_param_count(config) == param_count(config)


def test_a_different_base_is_refused(base, tmp_path):
    from gpunite.model import build_model, config_from_manifest
    from gpunite.train.lora import FinetuneError

    path = finetune_manifest(tmp_path, base, write_jsonl(tmp_path / "d.jsonl", task_records(5, 2)))
    manifest = load_manifest(path)
    manifest.model.base_hash = "0" * 64
    with pytest.raises(FinetuneError, match="weights hash .* the run expects 0000"):
        build_model(config_from_manifest(manifest))


def test_finetune_manifest_errors_are_one_line():
    with pytest.raises(ManifestError, match=r"\[model\] a finetune run needs base"):
        parse_manifest('[run]\nkind = "finetune"\n')
    with pytest.raises(ManifestError, match=r"hidden_size does not apply to a finetune run"):
        parse_manifest('[run]\nkind = "finetune"\n[model]\nbase = "b"\nhidden_size = 64\n')
    with pytest.raises(ManifestError, match=r"\[lora\] dropout must be 0 when proof.audit_fraction > 0"):
        parse_manifest('[lora]\ndropout = 0.1\n')
    with pytest.raises(ManifestError, match=r"\[lora.target_modules\] unknown LoRA target 'lm_head'"):
        parse_manifest('[lora]\ntarget_modules = ["lm_head"]\n')
    assert parse_manifest('[lora]\ndropout = 0.1\n[proof]\naudit_fraction = 0\n').lora.dropout == 0.1


def test_finetune_records_become_documents_and_bad_lines_name_file_and_line(tmp_path):
    from gpunite.data.finetune import chat_text
    from gpunite.data.readers import ReadStats, iter_documents
    from gpunite.serve.api import ChatMessage, chat_prompt

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}]
    good = tmp_path / "good.jsonl"
    write_jsonl(good, [{"prompt": "2+2=", "completion": " 4"}, {"messages": messages}, {"text": "plain"}])
    docs = list(iter_documents(good, finetune=True))
    assert docs[0] == "2+2= 4" and docs[2] == "plain"
    assert docs[1] == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello.\n"
    # The template is the host's chat template: a tuned model sees chats as the host will prompt it.
    asked = messages[:2]
    assert chat_text(asked) + "<|assistant|>\n" == chat_prompt([ChatMessage(**m) for m in asked])

    bad_lines = {
        '{"prompt": "x"}': r'"completion" must be a string, got missing',
        '{"prompt": "x", "completion": 3}': r'"completion" must be a string, got a int',
        '{"messages": [{"role": "bot", "content": "x"}]}': r"messages\[0\].role must be one of",
        '{"messages": []}': r'"messages" must be a non-empty list',
        '{"question": "x"}': r'expected \{"prompt", "completion"\}',
        '{"prompt": "x", "completion": ""}': r'"completion" is empty',
        'not json': r"bad JSON",
    }
    for line, message in bad_lines.items():
        path = tmp_path / "bad.jsonl"
        path.write_text('{"prompt": "ok", "completion": " ok"}\n' + line + "\n")
        with pytest.raises(DataError, match=rf"bad.jsonl:2: {message}.*--skip-bad-lines"):
            list(iter_documents(path, finetune=True))
        stats = ReadStats()
        assert list(iter_documents(path, finetune=True, skip_bad_lines=True, stats=stats)) == ["ok ok"]
        assert stats.skipped_lines == 1 and "bad.jsonl:2" in stats.first_skip
    # A pretraining run reads the same file as before: the text field only.
    with pytest.raises(DataError, match="no 'text' field"):
        list(iter_documents(good))


def test_local_finetune_lowers_heldout_loss_then_exports_merged_and_adapter(base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from gpunite.data.batches import heldout_sequences
    from gpunite.data.prepare import build_tokenizer, prepare_dataset
    from gpunite.data.shards import ShardIndex
    from gpunite.export import ExportError, export_hf, generate_text, load_for_generation
    from gpunite.model import build_model, config_from_manifest
    from gpunite.serve.host import load_served_model
    from gpunite.train.checkpoint import load_checkpoint, load_model_state, model_from_checkpoint
    from gpunite.train.local import train_local
    from gpunite.train.trainer import InnerTrainer

    every_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    path = finetune_manifest(tmp_path, base, write_jsonl(tmp_path / "train.jsonl", task_records(400, 3)),
                             train__lr=0.01, lora__target_modules=every_linear)
    manifest = load_manifest(path)
    result = prepare_dataset(manifest)
    assert result.documents == 400
    manifest = load_manifest(path)
    index = ShardIndex.load(manifest.prepared_path)
    assert index.tokenizer_hash == load_manifest(path).data.tokenizer_hash  # the base's own tokenizer

    heldout = heldout_sequences(manifest.prepared_path, index, manifest.data.seq_len, 64)
    base_model = model_from_checkpoint(load_checkpoint(base))
    base_loss = InnerTrainer(base_model, manifest.train).evaluate(heldout.split(8))
    trained = train_local(manifest, steps=30, out_dir=tmp_path / "ckpt", device="cpu")
    # The fresh LoRA model computes exactly what the base does; 30 steps on the task move it well below.
    assert trained.heldout_loss < base_loss - 0.3, (base_loss, trained.heldout_loss)

    checkpoint = load_checkpoint(trained.checkpoint)
    assert checkpoint.model_state and all(".lora_" in name for name in checkpoint.model_state)
    assert checkpoint.model_config.finetune.base_hash == manifest.model.base_hash
    tuned = model_from_checkpoint(checkpoint).eval()
    tokens = heldout[:2, :-1]
    with torch.no_grad():
        expected = tuned(input_ids=tokens).logits

    merged_dir = export_hf(trained.checkpoint, tmp_path / "merged", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=tokens).logits, expected, atol=1e-4)
    served = load_served_model(merged_dir, device="cpu")  # what `gpunite host FOLDER` loads
    with torch.no_grad():
        assert torch.allclose(served.model(input_ids=tokens).logits, expected, atol=1e-4)
    assert "twice:" in served.codec.decode(served.codec.encode("word: kalo\ntwice:"))
    # `gpunite generate` on the checkpoint (merged on load) and on the merged folder: the same greedy text.
    prompt = "word: kalo\ntwice:"
    texts = [generate_text(load_for_generation(source), prompt, max_tokens=6, temperature=0)
             for source in (trained.checkpoint, merged_dir)]
    assert texts[0] == texts[1]

    adapter_dir = export_hf(trained.checkpoint, tmp_path / "adapter")
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8 and set(adapter_config["target_modules"]) == set(every_linear)
    base_export = export_hf(base, tmp_path / "base-hf")
    base_hf = AutoModelForCausalLM.from_pretrained(base_export)
    onto_base = PeftModel.from_pretrained(base_hf, adapter_dir).eval()
    with torch.no_grad():
        assert torch.allclose(onto_base(input_ids=tokens).logits, expected, atol=1e-4)

    with pytest.raises(ExportError, match="no LoRA adapters to merge"):
        export_hf(base, tmp_path / "nothing", merge=True)

    # The same base as a Hugging Face folder: same weights hash, same tokens, and the adapter fits it.
    hf_dir = tmp_path / "from-hf"
    hf_dir.mkdir()
    hf_manifest = load_manifest(finetune_manifest(hf_dir, base_export, tmp_path / "train.jsonl",
                                                  lora__target_modules=every_linear))
    assert hf_manifest.model.base == str(base_export.resolve())
    assert hf_manifest.model.base_hash == manifest.model.base_hash
    text = "word: kalo\ntwice: kalo kalo"
    assert (build_tokenizer(hf_manifest).tokenizer.encode(text).ids
            == build_tokenizer(manifest).tokenizer.encode(text).ids)
    on_hf_base = build_model(config_from_manifest(hf_manifest))
    load_model_state(on_hf_base, checkpoint.model_state)
    with torch.no_grad():
        assert torch.allclose(on_hf_base.eval()(input_ids=tokens).logits, expected, atol=1e-5)


@pytest.mark.timeout(480)  # peer start-up alone takes minutes on a loaded 2-core machine
def test_two_peer_swarm_finetune_agrees_on_adapter_weights(base, tmp_path):
    from gpunite.data.prepare import prepare_dataset
    from gpunite.swarm.demo import LocalSwarm, round_log
    from gpunite.train.checkpoint import load_checkpoint

    path = finetune_manifest(tmp_path, base, write_jsonl(tmp_path / "train.jsonl", task_records(300, 4)),
                             train__round_deadline_s=120.0, proof__audit_fraction=1.0)
    prepare_dataset(load_manifest(path))
    rounds = 2
    with LocalSwarm(tmp_path, path, heartbeat_s=1.0) as swarm:
        swarm.start_first("peer1", wait_peers=2, rounds=rounds, extra=["--speed", "1", "--save-final"])
        swarm.join("peer2", swarm.address(), rounds=rounds, extra=["--speed", "1", "--save-final"])
        swarm.wait_exit(420)
        homes = [swarm.peers[name].home for name in ("peer1", "peer2")]
    chains = [chain_hashes(home) for home in homes]
    assert set(chains[0]) >= {0, 1} and chains[0] == chains[1]
    assert chains[0][0] != chains[0][1]  # the adapters moved
    assert all(entry["merged"] >= 1 for home in homes for entry in round_log(home).values())
    finals = [load_checkpoint(next(home.glob("runs/*/final.safetensors"))) for home in homes]
    for final in finals:
        assert final.model_state and all(".lora_" in name for name in final.model_state)
    assert all(torch.equal(t, finals[1].model_state[name]) for name, t in finals[0].model_state.items())


def chain_hashes(home: Path) -> dict[int, str]:
    """Round -> weights hash from a peer's chain of signed blocks."""
    blocks = {}
    for path in home.glob("runs/*/chain.jsonl"):
        for line in path.read_text().splitlines():
            block = json.loads(line)
            blocks[block["round"]] = block["weights_hash"]
    return blocks
