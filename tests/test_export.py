from dataclasses import replace

import pytest
import torch

from gpunite.data.tokenizer import EOS_TOKEN, train_bpe
from gpunite.export import ExportError, export_hf, generate_text, load_for_generation, sample_next
from gpunite.model import PRESETS, build_model
from gpunite.train.checkpoint import save_checkpoint

TEXTS = [f"peers train models together and check each other's work, round {i}.\n" for i in range(40)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint of a small model with a real trained BPE tokenizer inside it."""
    tokenizer = train_bpe(TEXTS, 300)
    config = replace(PRESETS["tiny"], vocab_size=300, n_layers=2, max_seq_len=64)
    model = build_model(config, seed=11)
    path = tmp_path_factory.mktemp("ck") / "latest.safetensors"
    save_checkpoint(path, model, None, data_position=0, tokenizer_json=tokenizer.json_bytes.decode())
    return path, model, tokenizer


def test_export_loads_with_auto_classes_and_gives_the_same_logits(checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, model, tokenizer = checkpoint
    out = export_hf(path, tmp_path / "hf")
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    hf_model = AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    text = "peers check each other's work"
    ids = hf_tokenizer(text)["input_ids"]
    assert ids == tokenizer.tokenizer.encode(text).ids
    assert hf_tokenizer.eos_token == hf_tokenizer.bos_token == EOS_TOKEN
    assert hf_model.config.eos_token_id == tokenizer.eos_id
    tokens = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs = model.eval()(tokens).logits, hf_model(tokens).logits
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0), (ours - theirs).abs().max()


def test_generation_is_seeded_and_the_same_from_checkpoint_and_export(checkpoint, tmp_path):
    path, _, _ = checkpoint
    from_checkpoint = load_for_generation(path)
    from_folder = load_for_generation(export_hf(path, tmp_path / "hf"))
    first = generate_text(from_checkpoint, "peers train", max_tokens=12, temperature=0.9, seed=3)
    assert first == generate_text(from_checkpoint, "peers train", max_tokens=12, temperature=0.9, seed=3)
    assert first == generate_text(from_folder, "peers train", max_tokens=12, temperature=0.9, seed=3)
    greedy = generate_text(from_checkpoint, "peers train", max_tokens=8, temperature=0)
    assert greedy == generate_text(from_checkpoint, "peers train", max_tokens=8, temperature=0, seed=99)
    # Greedy decoding with the KV cache matches recomputing the whole sequence every token.
    ids = from_checkpoint.tokenizer.encode("peers train").ids
    with torch.no_grad():
        for _ in range(8):
            next_id = int(from_checkpoint.model(torch.tensor([ids])).logits[0, -1].argmax())
            if next_id == from_checkpoint.eos_id:
                break
            ids.append(next_id)
    prompt_length = len(from_checkpoint.tokenizer.encode("peers train").ids)
    assert greedy == from_checkpoint.tokenizer.decode(ids[prompt_length:])


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.05, 0.7, 0.2, 0.05]))
    generator = torch.Generator().manual_seed(0)
    assert {sample_next(logits, 1.0, 0.5, generator) for _ in range(50)} == {1}
    assert {sample_next(logits, 1.0, 0.85, generator) for _ in range(200)} == {1, 2}
    assert sample_next(logits, 0.0, 1.0, generator) == 1


def test_export_needs_a_tokenizer_and_generate_needs_a_model(tmp_path):
    model = build_model(replace(PRESETS["tiny"], vocab_size=300, n_layers=1), seed=0)
    bare = save_checkpoint(tmp_path / "bare.safetensors", model, None, data_position=0)
    with pytest.raises(ExportError, match="holds no tokenizer"):
        export_hf(bare, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="not a Hugging Face model folder"):
        load_for_generation(tmp_path / "empty")
