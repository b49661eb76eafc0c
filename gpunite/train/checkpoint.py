"""Training checkpoints: one safetensors file (weights, AdamW, RNG, JSON metadata), written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gpunite.errors import GpuniteError
from gpunite.model import ModelConfig, build_model, config_from_dict, config_to_dict
from gpunite.train.weights import weights_hash
from gpunite.util import fsync_dir

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

    from gpunite.manifest import Manifest
    from gpunite.train.trainer import InnerTrainer

FORMAT = "gpunite-checkpoint-1"
_MODEL, _OPTIMIZER, _RNG = "model/", "optimizer/", "rng/"


class CheckpointError(GpuniteError):
    """A checkpoint file that is missing, truncated, corrupt or not a gpunite checkpoint."""


@dataclass
class Checkpoint:
    model_config: ModelConfig
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, torch.Tensor]
    step: int
    data_position: int
    rng_state: dict[str, torch.Tensor]
    manifest_toml: str | None = None
    tokenizer_json: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def model_config_of(model: torch.nn.Module) -> ModelConfig:
    """Our ModelConfig for a built Llama model (the inverse of gpunite.model.hf_config).

    A fine-tuning model carries the config it was built from (its base and LoRA settings are not in the
    transformers config).
    """
    built_from = getattr(model, "gpunite_config", None)
    if isinstance(built_from, ModelConfig):
        return built_from
    return model_config_from_hf(model.config)


def model_config_from_hf(hf: Any) -> ModelConfig:
    """Our ModelConfig for a transformers LlamaConfig."""
    return ModelConfig(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads,
        intermediate_size=hf.intermediate_size,
        max_seq_len=hf.max_position_embeddings,
        tie_embeddings=bool(hf.tie_word_embeddings),
        rope_theta=float(_rope_theta(hf)),
        norm_eps=float(hf.rms_norm_eps),
    )


def _rope_theta(hf_config: Any) -> float:
    # transformers 5 keeps rope_theta inside rope_parameters; 4.x keeps it on the config itself.
    parameters = getattr(hf_config, "rope_parameters", None)
    if isinstance(parameters, dict) and "rope_theta" in parameters:
        return parameters["rope_theta"]
    return hf_config.rope_theta


def rng_state_tensors(device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The torch RNG states that training can consume, as uint8 tensors."""
    states = {"cpu": torch.random.get_rng_state()}
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_state(states: dict[str, torch.Tensor], device: torch.device | None = None) -> None:
    if "cpu" in states:
        torch.random.set_rng_state(states["cpu"])
    if "cuda" in states and device is not None and device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"], device)


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    trainer: InnerTrainer | None,
    *,
    data_position: int,
    manifest: Manifest | None = None,
    tokenizer_json: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint so that a crash at any moment leaves the previous file at `path` intact."""
    from safetensors.torch import save_file

    from gpunite.train.trainer import unique_named_parameters

    path = Path(path)
    model_state = {name: param.detach() for name, param in unique_named_parameters(model)}
    tensors: dict[str, torch.Tensor] = {_MODEL + name: t for name, t in model_state.items()}
    if trainer is not None:
        tensors.update({_OPTIMIZER + name: t for name, t in trainer.optimizer_state_tensors().items()})
    device = trainer.device if trainer is not None else None
    tensors.update({_RNG + name: t for name, t in rng_state_tensors(device).items()})
    metadata = {
        "format": FORMAT,
        "step": str(trainer.step if trainer is not None else 0),
        "data_position": str(data_position),
        "model_config": json.dumps(config_to_dict(model_config_of(model)), sort_keys=True),
        "extra": json.dumps(extra or {}, sort_keys=True),
    }
    if manifest is not None:
        metadata["manifest_toml"] = manifest.to_toml()
    if tokenizer_json is not None:
        metadata["tokenizer_json"] = tokenizer_json
    cpu_tensors = {name: t.to("cpu").contiguous() for name, t in tensors.items()}
    # A hash over every tensor lets loading catch flipped bits that the safetensors header cannot see.
    metadata["tensors_hash"] = weights_hash(cpu_tensors)

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(cpu_tensors, tmp_name, metadata=metadata)
        with open(tmp_name, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
    # Temp files of saves that were killed half-way are garbage once a newer save has landed.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and check a checkpoint; any damage raises a one-line CheckpointError naming the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train first with `gpunite train` or check the path")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for short or garbled files
        reason = " ".join(str(exc).split())
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({reason}); use an earlier checkpoint"
        ) from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a gpunite checkpoint (format {metadata.get('format')!r})")
    if weights_hash(tensors) != metadata.get("tensors_hash"):
        raise CheckpointError(f"checkpoint {path} is corrupt: its tensors do not match their recorded hash")
    try:
        checkpoint = Checkpoint(
            model_config=config_from_dict(json.loads(metadata["model_config"])),
            model_state=_strip(tensors, _MODEL),
            optimizer_state=_strip(tensors, _OPTIMIZER),
            step=int(metadata["step"]),
            data_position=int(metadata["data_position"]),
            rng_state=_strip(tensors, _RNG),
            manifest_toml=metadata.get("manifest_toml"),
            tokenizer_json=metadata.get("tokenizer_json"),
            extra=json.loads(metadata.get("extra", "{}")),
            path=path,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} has bad metadata ({type(exc).__name__}: {exc})") from None
    return checkpoint


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's weights into a model of the same shape (tied weights are stored once)."""
    from gpunite.train.trainer import unique_named_parameters

    named = dict(unique_named_parameters(model))
    if set(named) != set(state):
        missing, extra = sorted(set(named) - set(state)), sorted(set(state) - set(named))
        raise CheckpointError(
            f"checkpoint weights do not fit the model: missing {missing[:2]}, extra {extra[:2]}"
        )
    with torch.no_grad():
        for name, param in named.items():
            if param.shape != state[name].shape:
                raise CheckpointError(
                    f"checkpoint weight {name} is {tuple(state[name].shape)}, "
                    f"the model has {tuple(param.shape)}"
                )
            param.copy_(state[name])


def model_from_checkpoint(checkpoint: Checkpoint, device: str | torch.device = "cpu") -> LlamaForCausalLM:
    """A model holding the checkpoint's weights."""
    model = build_model(checkpoint.model_config, seed=0, device=device)
    load_model_state(model, checkpoint.model_state)
    return model


def restore_training_state(checkpoint: Checkpoint, model: torch.nn.Module, trainer: InnerTrainer) -> None:
    """Put a model and its trainer back exactly where the checkpoint left them (weights, AdamW, step, RNG)."""
    load_model_state(model, checkpoint.model_state)
    trainer.load_optimizer_state_tensors(checkpoint.optimizer_state)
    trainer.step = checkpoint.step
    restore_rng_state(checkpoint.rng_state, trainer.device)
