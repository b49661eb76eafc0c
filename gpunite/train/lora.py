"""Fine-tuning models: load a run's base (gpunite checkpoint or Hugging Face folder), check it, add LoRA.

`gpunite.model.build_model` calls `build_finetune_model` for a config with a FinetuneSpec, so the peer, local
training, audit replays and checkpoint loading all build the same model: the base's weights, frozen, plus
peft LoRA adapters (lora_A from the build seed, lora_B zero, so the fresh model computes what the base does).
Only the adapters require gradients, so `unique_named_parameters`, the trainer, the exchanged flat vector and
the round's weights hash cover the adapters alone. LoRA rank 0 is full fine-tuning: the base, all trainable.
"""

from __future__ import annotations

import json
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gpunite.errors import GpuniteError
from gpunite.model import ModelConfig, build_model

if TYPE_CHECKING:
    from gpunite.manifest import Manifest

CHECKPOINT_FORMAT = "gpunite-checkpoint-1"
PEFT_ADAPTER_NAME = "default"


class FinetuneError(GpuniteError, ValueError):
    """A fine-tuning base that is missing, of the wrong kind, or not the one the run names."""


def resolve_base(manifest: Manifest) -> Path:
    """The manifest's model.base as an existing absolute path (relative: from the manifest's folder)."""
    if not manifest.model.base:
        raise FinetuneError("the manifest names no model.base; a finetune run needs one")
    path = Path(manifest.model.base).expanduser()
    path = (path if path.is_absolute() else manifest.base_dir / path).resolve()
    if not path.exists():
        raise FinetuneError(f"fine-tuning base {path} does not exist; every peer needs the base at "
                            "model.base (a gpunite checkpoint file or a Hugging Face folder)")
    return path


def _checkpoint_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for files that are not safetensors
        reason = " ".join(str(exc).split())
        raise FinetuneError(f"fine-tuning base {path} is not a gpunite checkpoint ({reason}); pass a "
                            "checkpoint written by gpunite or a Hugging Face folder") from None
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise FinetuneError(f"fine-tuning base {path} is not a gpunite checkpoint (format "
                            f"{metadata.get('format')!r})")
    return metadata


def base_model_config(path: str | Path) -> ModelConfig:
    """The architecture of a base, read without loading its weights."""
    from gpunite.model import config_from_dict

    path = Path(path)
    if path.is_file():
        metadata = _checkpoint_metadata(path)
        try:
            config = config_from_dict(json.loads(metadata["model_config"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise FinetuneError(f"fine-tuning base {path} has bad model metadata ({exc})") from None
        if config.finetune is not None:
            raise FinetuneError(f"fine-tuning base {path} is itself a fine-tune checkpoint; export it with "
                                "`gpunite export CKPT --hf OUT --merge` and use that folder as the base")
        return config
    return _hf_model_config(path)


def _hf_model_config(folder: Path) -> ModelConfig:
    from transformers import AutoConfig

    from gpunite.train.checkpoint import model_config_from_hf

    if not (folder / "config.json").is_file():
        raise FinetuneError(f"fine-tuning base {folder} is a folder without config.json; pass a Hugging Face "
                            "model folder or a gpunite checkpoint file")
    try:
        hf = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise FinetuneError(f"fine-tuning base {folder}: cannot read config.json ({reason})") from None
    if hf.model_type != "llama":
        raise FinetuneError(f"fine-tuning base {folder} is a {hf.model_type!r} model; gpunite fine-tunes "
                            "Llama-architecture models")
    return model_config_from_hf(hf)


def _stamp(path: Path) -> tuple:
    """What identifies a base's bytes on disk cheaply: name, size and mtime of its files."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


_cache_lock = threading.Lock()
# One base at a time: (stamp, weights by name, weights hash). Audits build the model again and again.
_cached: tuple[tuple, dict[str, torch.Tensor], str] | None = None


def load_base_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The base's weights (fp32, CPU, tied weights once, by transformers name) and their weights hash."""
    global _cached
    from gpunite.train.weights import trainable_state, weights_hash

    path = Path(path)
    stamp = _stamp(path)
    with _cache_lock:
        if _cached is not None and _cached[0] == stamp:
            return _cached[1], _cached[2]
        if path.is_file():
            from gpunite.train.checkpoint import load_checkpoint

            base_model_config(path)  # refuses fine-tune checkpoints with a clear message
            state = {name: t.to(torch.float32) for name, t in load_checkpoint(path).model_state.items()}
        else:
            _hf_model_config(path)
            from transformers import LlamaForCausalLM

            try:
                model = LlamaForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
            except (OSError, ValueError) as exc:
                raise FinetuneError(f"fine-tuning base {path}: cannot load the weights "
                                    f"({' '.join(str(exc).split())})") from None
            state = {name: t.clone() for name, t in trainable_state(model).items()}
        digest = weights_hash(state)
        _cached = (stamp, state, digest)
        return state, digest


def base_weights_hash(path: str | Path) -> str:
    """The weights hash a manifest records as model.base_hash."""
    return load_base_weights(path)[1]


def build_finetune_model(config: ModelConfig, seed: int = 0,
                         device: str | torch.device = "cpu") -> torch.nn.Module:
    """The run's trainable model: the base's weights, and for lora_rank > 0 frozen under LoRA adapters."""
    from dataclasses import replace

    from gpunite.train.checkpoint import CheckpointError, load_model_state

    spec = config.finetune
    if spec is None:
        raise FinetuneError("build_finetune_model needs a config with a FinetuneSpec")
    state, digest = load_base_weights(spec.base)
    if spec.base_hash is not None and digest != spec.base_hash:
        raise FinetuneError(f"fine-tuning base {spec.base} has weights hash {digest[:16]}, the run expects "
                            f"{spec.base_hash[:16]}; put the run's base at that path")
    architecture = replace(config, finetune=None)
    if base_model_config(spec.base) != architecture:
        raise FinetuneError(f"fine-tuning base {spec.base} is not the architecture this run was made for; "
                            "use the run's base")
    model = build_model(architecture, seed=seed, device=device)
    try:
        load_model_state(model, state)
    except CheckpointError as exc:
        raise FinetuneError(f"fine-tuning base {spec.base}: {exc}") from None
    if spec.lora_rank > 0:
        model = _add_adapters(model, config, seed)
    model.gpunite_config = config  # checkpoints record the base and LoRA settings (model_config_of)
    return model


def _add_adapters(model: torch.nn.Module, config: ModelConfig, seed: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    spec = config.finetune
    lora = LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                      target_modules=list(spec.lora_targets), bias="none", task_type="CAUSAL_LM")
    # lora_A is drawn from the global RNG: seed it, and leave the caller's RNG as it was.
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings():
            # peft asks transformers 5 a deprecated question about gradient checkpointing: noise in peer logs.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, lora, adapter_name=PEFT_ADAPTER_NAME)
    finally:
        torch.random.set_rng_state(generator_state)


def is_lora_model(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merged_model(model: torch.nn.Module) -> torch.nn.Module:
    """A plain Llama model whose weights are base + alpha / r x B A (the LoRA model is used up)."""
    if not is_lora_model(model):
        raise FinetuneError("this model has no LoRA adapters to merge")
    merged = model.merge_and_unload()
    if hasattr(merged, "gpunite_config"):
        del merged.gpunite_config
    return merged
