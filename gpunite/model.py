"""Model presets, building a Llama-architecture decoder from a manifest, exact parameter and FLOP counts.

A fine-tuning run's ModelConfig is its base's architecture plus a `FinetuneSpec` (the base, its hash, the LoRA
settings): `build_model` then loads the base and wraps it with LoRA adapters (gpunite.train.lora), so every
place that builds the run's model from its config (the peer, local training, audit replays, checkpoint
loading) builds the same trainable model, and only its trainable parameters travel.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from gpunite.errors import GpuniteError

if TYPE_CHECKING:  # heavy imports stay lazy so the CLI starts fast
    import torch
    from transformers import LlamaForCausalLM

    from gpunite.manifest import Manifest


class ModelError(GpuniteError, ValueError):
    """A model configuration that cannot be built."""


@dataclass(frozen=True)
class FinetuneSpec:
    """What a fine-tuning run adds to its base's architecture (lora_rank 0: every base weight trains)."""

    base: str  # absolute path of a gpunite checkpoint file or a Hugging Face folder
    base_hash: str | None  # weights hash the base must have (None: not checked)
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lora_targets: tuple[str, ...]


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    max_seq_len: int
    tie_embeddings: bool
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    finetune: FinetuneSpec | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    def validate(self) -> None:
        if self.hidden_size % self.n_heads:
            raise ModelError(f"hidden_size {self.hidden_size} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ModelError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ModelError(f"head_dim {self.head_dim} must be even for rotary embeddings")


# Reference vocabulary sizes are those the presets are quoted at; a run uses its tokenizer's vocab size.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(4096, 256, 4, 4, 4, 688, 512, True),
    "small": ModelConfig(16384, 512, 6, 8, 8, 1376, 1024, True),
    "125m": ModelConfig(32000, 768, 12, 12, 12, 2048, 2048, True),
    "350m": ModelConfig(32000, 1024, 24, 16, 16, 2816, 2048, True),
    "1b": ModelConfig(32000, 2048, 22, 32, 4, 5632, 2048, False),
    "7b": ModelConfig(32000, 4096, 32, 32, 32, 11008, 4096, False),
}


def config_from_manifest(manifest: Manifest) -> ModelConfig:
    """The model a manifest describes: its preset, its explicit overrides, and the data's vocab size."""
    if manifest.run.kind == "finetune":
        return _finetune_config(manifest)
    section = manifest.model
    if section.preset is not None and section.preset not in PRESETS:
        raise ModelError(f"unknown model preset {section.preset!r}; choose one of {', '.join(PRESETS)}")
    base = PRESETS[section.preset or "tiny"]
    overrides = {
        key: getattr(section, key)
        for key in ("hidden_size", "n_layers", "n_heads", "n_kv_heads", "intermediate_size", "max_seq_len",
                    "tie_embeddings")
        if getattr(section, key) is not None
    }
    if "n_heads" in overrides and "n_kv_heads" not in overrides:
        overrides["n_kv_heads"] = overrides["n_heads"]
    config = replace(base, vocab_size=manifest.data.vocab_size, **overrides)
    if config.max_seq_len < manifest.data.seq_len:
        config = replace(config, max_seq_len=manifest.data.seq_len)
    config.validate()
    return config


def _finetune_config(manifest: Manifest) -> ModelConfig:
    from gpunite.train.lora import base_model_config, resolve_base

    base = resolve_base(manifest)
    config = base_model_config(base)
    lora = manifest.lora
    spec = FinetuneSpec(str(base), manifest.model.base_hash, lora.rank, lora.alpha, lora.dropout,
                        tuple(lora.target_modules))
    if config.max_seq_len < manifest.data.seq_len:
        raise ModelError(f"data.seq_len {manifest.data.seq_len} is longer than the base's context "
                         f"({config.max_seq_len} tokens); lower data.seq_len")
    return replace(config, finetune=spec)


def _linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer of one decoder block, by its transformers name."""
    d, kv, inner = config.hidden_size, config.n_kv_heads * config.head_dim, config.intermediate_size
    return {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
            "gate_proj": (d, inner), "up_proj": (d, inner), "down_proj": (inner, d)}


def base_param_count(config: ModelConfig) -> int:
    """Exact number of parameters of the plain decoder (a fine-tuning run's base, without adapters)."""
    d, kv = config.hidden_size, config.n_kv_heads * config.head_dim
    attention = d * d * 2 + d * kv * 2  # q, o and k, v projections (no biases)
    mlp = 3 * d * config.intermediate_size
    norms = 2 * d
    embeddings = config.vocab_size * d * (1 if config.tie_embeddings else 2)
    return config.n_layers * (attention + mlp + norms) + d + embeddings


def adapter_param_count(config: ModelConfig) -> int:
    """Parameters the LoRA adapters add: r x (in + out) per adapted linear layer (0 without adapters)."""
    spec = config.finetune
    if spec is None or spec.lora_rank == 0:
        return 0
    shapes = _linear_shapes(config)
    per_block = sum(spec.lora_rank * (shapes[name][0] + shapes[name][1]) for name in spec.lora_targets)
    return config.n_layers * per_block


def param_count(config: ModelConfig) -> int:
    """Exact number of parameters of the built model (a LoRA model counts its base and its adapters)."""
    return base_param_count(config) + adapter_param_count(config)


def trainable_param_count(config: ModelConfig) -> int:
    """Parameters that train and travel each round: the adapters of a LoRA run, else every weight."""
    if config.finetune is not None and config.finetune.lora_rank > 0:
        return adapter_param_count(config)
    return param_count(config)


def matmul_param_count(config: ModelConfig) -> int:
    """Parameters that take part in a matrix multiply per token (the input embedding lookup does not)."""
    d = config.hidden_size
    untied_input_embedding = 0 if config.tie_embeddings else config.vocab_size * d
    return base_param_count(config) - untied_input_embedding


def flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token: 6 N for the weights plus 12 L d T for attention scores and values.

    With LoRA adapters the frozen weights cost 4 N (forward, and the backward pass's activation gradients;
    they get no weight gradients) and the adapters 6 N_adapter.
    """
    attention = 12 * config.n_layers * config.hidden_size * seq_len
    adapters = adapter_param_count(config)
    if adapters:
        return 4 * matmul_param_count(config) + 6 * adapters + attention
    return 6 * matmul_param_count(config) + attention


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Inference (forward only) FLOPs per token: 2 per matmul weight (adapters included) plus attention."""
    weights = matmul_param_count(config) + adapter_param_count(config)
    return 2 * weights + 4 * config.n_layers * config.hidden_size * seq_len


def hf_config(config: ModelConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def build_model(config: ModelConfig, seed: int = 0, device: str | torch.device = "cpu") -> LlamaForCausalLM:
    """A freshly initialised model; the same config and seed give bitwise-identical weights."""
    import torch
    from transformers import LlamaForCausalLM

    config.validate()
    if config.finetune is not None:
        from gpunite.train.lora import build_finetune_model

        return build_finetune_model(config, seed=seed, device=device)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(hf_config(config))
    finally:
        torch.random.set_rng_state(generator_state)
    return model


def config_to_dict(config: ModelConfig) -> dict:
    return asdict(config)


def config_from_dict(data: dict) -> ModelConfig:
    data = dict(data)
    spec = data.pop("finetune", None)
    if spec is not None:
        spec = FinetuneSpec(**{**spec, "lora_targets": tuple(spec["lora_targets"])})
    return ModelConfig(**data, finetune=spec)
