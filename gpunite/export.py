"""Hugging Face export of a checkpoint, and text generation from a checkpoint or an exported folder.

A LoRA fine-tune checkpoint exports either as its adapter (peft's format: adapter_config.json and
adapter_model.safetensors, loadable with peft.PeftModel.from_pretrained onto the base) or, with merge, as a
full model whose weights are base + alpha / r x B A, which any transformers user or `gpunite host` loads.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpunite.errors import GpuniteError


class ExportError(GpuniteError):
    """A checkpoint or folder that cannot be exported or generated from."""


@dataclass
class LoadedModel:
    """A model ready for generation, with the tokenizer that goes with it."""

    model: Any  # transformers LlamaForCausalLM (or any causal LM from an HF folder), in eval mode
    tokenizer: Any  # tokenizers.Tokenizer
    eos_id: int | None
    max_seq_len: int


def _eos_token(tokenizer) -> tuple[str, int] | None:
    from gpunite.data.tokenizer import EOS_CANDIDATES

    for token in EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token, token_id
    return None


def export_hf(checkpoint_path: str | Path, out_dir: str | Path, merge: bool = False) -> Path:
    """Write a folder that transformers' AutoModelForCausalLM and AutoTokenizer load (safetensors weights).

    A LoRA fine-tune checkpoint gives its adapter folder (peft format, with the tokenizer), or with merge a
    full model folder with the adapters merged into the base's weights.
    """
    from tokenizers import Tokenizer
    from transformers import GenerationConfig

    from gpunite.train.checkpoint import load_checkpoint, model_from_checkpoint

    checkpoint = load_checkpoint(checkpoint_path)
    spec = checkpoint.model_config.finetune
    has_adapters = spec is not None and spec.lora_rank > 0
    if merge and not has_adapters:
        raise ExportError(f"{checkpoint_path} has no LoRA adapters to merge; export it without --merge")
    if checkpoint.tokenizer_json is None:
        raise ExportError(
            f"{checkpoint_path} holds no tokenizer; export a checkpoint written by `gpunite train`"
        )
    tokenizer = Tokenizer.from_str(checkpoint.tokenizer_json)
    eos = _eos_token(tokenizer)
    if eos is None:
        raise ExportError(
            f"the tokenizer in {checkpoint_path} has no end-of-text token to mark document ends"
        )
    eos_token, eos_id = eos
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    model = model_from_checkpoint(checkpoint)
    if has_adapters and merge:
        from gpunite.train.lora import merged_model

        model = merged_model(model)
    elif has_adapters:
        # peft records where the base lives; the adapter applies to exactly that base (its hash is checked
        # when gpunite builds it, and noted here for other tools).
        adapter_config = model.peft_config["default"]
        adapter_config.base_model_name_or_path = spec.base
        adapter_config.revision = spec.base_hash
        # The embeddings never train under LoRA: nothing of them belongs in the adapter.
        model.save_pretrained(out_dir, safe_serialization=True, save_embedding_layers=False)
        _save_tokenizer(tokenizer, eos_token, checkpoint.model_config.max_seq_len, out_dir)
        return out_dir
    # Documents are separated (not opened) by <|endoftext|>, so it serves as bos, eos and pad alike.
    model.config.bos_token_id = model.config.eos_token_id = model.config.pad_token_id = eos_id
    model.generation_config = GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    model.save_pretrained(out_dir, safe_serialization=True)
    _save_tokenizer(tokenizer, eos_token, checkpoint.model_config.max_seq_len, out_dir)
    return out_dir


def _save_tokenizer(tokenizer, eos_token: str, max_seq_len: int, out_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=eos_token,
        eos_token=eos_token,
        pad_token=eos_token,
        model_max_length=max_seq_len,
    )
    hf_tokenizer.save_pretrained(out_dir)


def load_for_generation(source: str | Path, device: str = "cpu") -> LoadedModel:
    """A gpunite checkpoint file or an exported Hugging Face folder, loaded for sampling."""
    from tokenizers import Tokenizer

    source = Path(source)
    if source.is_dir():
        return _load_hf_folder(source, device)
    from gpunite.train.checkpoint import load_checkpoint, model_from_checkpoint

    checkpoint = load_checkpoint(source)
    if checkpoint.tokenizer_json is None:
        raise ExportError(
            f"{source} holds no tokenizer; generate from a checkpoint written by `gpunite train`"
        )
    tokenizer = Tokenizer.from_str(checkpoint.tokenizer_json)
    eos = _eos_token(tokenizer)
    model = model_from_checkpoint(checkpoint, device=device).eval()
    from gpunite.train.lora import is_lora_model, merged_model

    if is_lora_model(model):
        model = merged_model(model)  # the same function, one matmul per layer fewer per token
    return LoadedModel(model, tokenizer, eos[1] if eos else None, checkpoint.model_config.max_seq_len)


def _load_hf_folder(folder: Path, device: str) -> LoadedModel:
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a per-tensor loading bar is noise for a CLI verb
    tokenizer_file = folder / "tokenizer.json"
    if not (folder / "config.json").is_file() or not tokenizer_file.is_file():
        raise ExportError(
            f"{folder} is not a Hugging Face model folder (needs config.json and tokenizer.json); "
            "make one with `gpunite export CKPT --hf OUT`"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(folder).to(device).eval()
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{folder}: cannot load the model ({' '.join(str(exc).split())})") from None
    eos_id = model.config.eos_token_id
    if isinstance(eos_id, list):
        eos_id = eos_id[0] if eos_id else None
    max_seq_len = getattr(model.config, "max_position_embeddings", 2048)
    return LoadedModel(model, tokenizer, eos_id, max_seq_len)


def sample_next(logits, temperature: float, top_p: float, generator) -> int:
    """One token id from next-token logits: greedy at temperature 0, else nucleus (top-p) sampling."""
    import torch

    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def generate_text(
    loaded: LoadedModel,
    prompt: str,
    max_tokens: int = 64,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
) -> str:
    """Continue `prompt` with up to max_tokens sampled tokens (stops at end-of-text or the context limit)."""
    import torch

    if max_tokens < 0 or temperature < 0 or not 0 < top_p <= 1:
        raise ExportError("need max_tokens >= 0, temperature >= 0 and 0 < top_p <= 1")
    prompt_ids = loaded.tokenizer.encode(prompt).ids
    if not prompt_ids:  # an empty prompt starts a fresh document
        if loaded.eos_id is None:
            raise ExportError("an empty prompt needs a tokenizer with an end-of-text token")
        prompt_ids = [loaded.eos_id]
    if len(prompt_ids) >= loaded.max_seq_len:
        raise ExportError(
            f"the prompt is {len(prompt_ids)} tokens; the model's context is {loaded.max_seq_len}"
        )
    device = next(loaded.model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    budget = min(max_tokens, loaded.max_seq_len - len(prompt_ids))
    # transformers 5 names the KV cache `cache`, 4.x `past_key_values` (argument and output alike).
    cache_name = (
        "cache" if "cache" in inspect.signature(loaded.model.forward).parameters else "past_key_values"
    )
    new_ids: list[int] = []
    with torch.no_grad():
        output = loaded.model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True)
        for _ in range(budget):
            token = sample_next(output.logits[0, -1], temperature, top_p, generator)
            if token == loaded.eos_id:
                break
            new_ids.append(token)
            if len(new_ids) == budget:
                break
            output = loaded.model(
                input_ids=torch.tensor([[token]], device=device),
                use_cache=True,
                **{cache_name: getattr(output, cache_name)},
            )
    return loaded.tokenizer.decode(new_ids)
