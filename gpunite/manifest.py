"""Run manifest: the TOML that defines a run, its validation with one-line errors, and its hash (the run id)."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from gpunite.errors import GpuniteError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ManifestError(GpuniteError, ValueError):
    """A manifest that cannot be used; the message names the file, key and problem in one line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(_Section):
    name: str = Field("gpunite-run", min_length=1, max_length=128, description="Human name of the run.")
    kind: Literal["pretrain", "finetune", "serve"] = Field("pretrain", description="What the swarm does.")
    seed: int = Field(1234, ge=0, lt=2**63, description="Seed for weights init, data order and work units.")


class ModelSection(_Section):
    preset: str | None = Field(
        "tiny", description="A preset name (tiny, small, 125m, 350m, 1b, 7b) or null; none for finetune runs.")
    hidden_size: int | None = Field(None, gt=0, description="Overrides the preset's width.")
    n_layers: int | None = Field(None, gt=0, description="Overrides the preset's depth.")
    n_heads: int | None = Field(None, gt=0)
    n_kv_heads: int | None = Field(None, gt=0)
    intermediate_size: int | None = Field(None, gt=0)
    max_seq_len: int | None = Field(None, gt=0)
    tie_embeddings: bool | None = None
    base: str | None = Field(
        None, description="finetune: the base model, a gpunite checkpoint file or a Hugging Face (Llama) folder; "
        "every peer needs it at this path (relative paths are from the manifest's folder). The preset and "
        "the overrides above do not apply: the base decides the architecture.")
    base_hash: str | None = Field(
        None, description="finetune: weights hash of the base, filled in by `gpunite run init`; a peer whose "
        "base differs refuses to start.")


class DataSection(_Section):
    sources: list[str] = Field(default_factory=lambda: ["builtin:python-docs"],
                               description="Files or folders (.jsonl.zst Pile, .jsonl, .txt) or builtin:python-docs.")
    text_field: str = Field("text", min_length=1, description="Field holding the text in jsonl records.")
    pile_subsets: list[str] = Field(default_factory=list, description="Keep only these meta.pile_set_name values.")
    tokenizer: str | None = Field(None, description="An existing tokenizer.json; null trains a byte-level BPE.")
    tokenizer_hash: str | None = Field(None, description="sha256 of tokenizer.json, filled in by data prepare.")
    dataset_hash: str | None = Field(None, description="sha256 of the shard index, filled in by data prepare.")
    vocab_size: int = Field(4096, ge=260, le=1_000_000)
    seq_len: int = Field(128, ge=8, le=1_048_576, description="Tokens per training sequence.")
    shard_tokens: int = Field(1 << 20, ge=1024, description="Tokens per content-addressed shard.")
    prepared_dir: str = Field("prepared", min_length=1, description="Where shards go, relative to the manifest.")
    max_builtin_mb: float = Field(8.0, gt=0, description="Cap on the built-in corpus size, in MB of text.")


class TrainSection(_Section):
    batch_size: int = Field(8, gt=0, description="Sequences per inner step.")
    inner_steps: int = Field(100, gt=0, description="H: inner AdamW steps per round.")
    total_steps: int = Field(1000, gt=0, description="Steps for local training (gpunite train).")
    lr: float = Field(3e-3, gt=0, le=1.0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1.0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping.")
    compile: bool = Field(False, description="torch.compile the model.")
    checkpoint_every: int = Field(200, gt=0, description="Local training: steps between checkpoints.")
    outer_lr: float = Field(
        1.4, gt=0, le=10,
        description="Outer SGD lr. DiLoCo's 0.7 with momentum 0.9 suits long runs with large H; at tiny scale "
        "1.4 without momentum measured best (benchmarks/diloco_quality.py).")
    outer_momentum: float = Field(0.0, ge=0, lt=1, description="Outer Nesterov momentum (DiLoCo: 0.9).")
    nesterov: bool = True
    compression: Literal["int8", "int4", "none"] = Field(
        "int8", description="Pseudo-gradient payloads: int8 or int4 (packed) per-chunk absmax, or fp32.")
    compression_chunk: int = Field(4096, ge=64, description="Elements per absmax chunk (even for int4).")
    error_feedback: bool = Field(
        False, description="Carry quantization error into the next round (off: audits check base - delta "
        "against the trail).")
    aggregation: Literal["trimmed_mean", "median", "mean"] = "trimmed_mean"
    trim_fraction: float = Field(0.2, ge=0, lt=0.5)
    clip_norm_ratio: float = Field(2.0, gt=0, description="Clip each pseudo-gradient to this x median norm.")
    round_deadline_s: float = Field(600.0, gt=0, description="A round closes this long after it starts.")
    overlap: bool = Field(
        True, description="Train round r + 1 while round r's exchange runs: it starts from round r's global "
        "weights less this peer's own committed round-r delta (its own end of round r) and is carried onto the "
        "merged weights at the first trail step after they arrive, so no peer waits for the exchange. Measured "
        "within 1% of synchronous rounds (benchmarks/diloco_quality.py --overlap rebase: 1.004x at H=12, 0.999x "
        "at H=100); off: every round waits for its exchange and audits.")
    overlap_lr_scale: float = Field(
        1.0, gt=0, le=1, description="With overlap on, the outer lr is multiplied by this. 1: a rebased round "
        "builds on the merge before it, as a synchronous one does (the one-round-delayed step it replaced "
        "needed 0.5).")

    @property
    def effective_outer_lr(self) -> float:
        """The outer SGD lr the swarm steps with: outer_lr, scaled down while overlap is on."""
        return self.outer_lr * (self.overlap_lr_scale if self.overlap else 1.0)

    @field_validator("compression_chunk")
    @classmethod
    def _check_chunk(cls, chunk: int, info: ValidationInfo) -> int:
        if info.data.get("compression") == "int4" and chunk % 2:
            raise ValueError("int4 packs two values per byte, so compression_chunk must be even")
        return chunk


class ProofSection(_Section):
    trail_interval: int = Field(
        4, gt=0,
        description="k: inner steps between trail checkpoints (one audit segment). A checkpoint costs the trainer a "
        "fixed amount of work, a segment costs its verifier k replayed steps: both together cost least for k from "
        "4 to 8 (benchmarks/proof_cost.py); 4 keeps each audit short.")
    audit_fraction: float = Field(
        0.85, ge=0, le=1,
        description="Share of contributions audited; 0.85 with 2 segments catches a half-faking peer "
        "with probability >= 0.99 within 5 rounds (benchmarks/proof_of_training.py).")
    segments_per_audit: int = Field(2, gt=0, description="Trail segments a verifier replays per audit.")
    verifiers_per_audit: int = Field(1, gt=0)
    accepts_required: int = Field(1, ge=0, description="Accept verdicts needed before an audited merge.")
    tolerance: float = Field(0.05, gt=0, description="Replay distance / honest update norm that still passes.")
    norm_bound: float = Field(3.0, gt=1, description="Largest norm allowed, as a multiple of the round median.")


class CreditSection(_Section):
    anonymous_daily_queries: int = Field(5, ge=0)
    base_daily_queries: int = Field(20, ge=0, description="Queries/day for any identity with credit > 0.")
    queries_per_rac: float = Field(10.0, ge=0, description="Extra queries/day per unit of RAC.")
    max_daily_queries: int = Field(10_000, ge=0)
    host_credit_per_1k_tokens: float = Field(0.01, ge=0)


class HostSection(_Section):
    min_memory_gb: float = Field(1.0, ge=0)
    min_tflops: float = Field(0.005, ge=0)
    max_batch: int = Field(8, gt=0)


class LoraSection(_Section):
    rank: int = Field(
        8, ge=0, le=4096,
        description="finetune: LoRA rank r; only the adapters train and travel. 0 trains every base weight "
        "(full fine-tuning: the whole model travels each round).")
    alpha: float = Field(16.0, gt=0, description="finetune: LoRA scale numerator (the update is alpha / rank x B A).")
    dropout: float = Field(
        0.0, ge=0, lt=1,
        description="finetune: dropout on the adapter input; must stay 0 when proof.audit_fraction > 0, since "
        "audit replays cannot reproduce dropout's random masks.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="finetune: Llama linear layers that get adapters (q_proj, k_proj, v_proj, o_proj, "
        "gate_proj, up_proj, down_proj).")

    @field_validator("target_modules")
    @classmethod
    def _check_targets(cls, targets: list[str]) -> list[str]:
        unknown = sorted(set(targets) - set(LORA_TARGETS))
        if unknown:
            raise ValueError(f"unknown LoRA target {unknown[0]!r}; choose from {', '.join(LORA_TARGETS)}")
        if not targets or len(set(targets)) != len(targets):
            raise ValueError("target_modules must list each layer once, at least one")
        return targets


# The linear layers of a Llama decoder block, by their transformers names.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ARCHITECTURE_KEYS = ("hidden_size", "n_layers", "n_heads", "n_kv_heads", "intermediate_size", "max_seq_len",
                      "tie_embeddings")


class Manifest(_Section):
    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection = Field(default_factory=ModelSection, validate_default=True)  # finetune checks
    data: DataSection = Field(default_factory=DataSection, validate_default=True)  # finetune checks
    train: TrainSection = Field(default_factory=TrainSection)
    proof: ProofSection = Field(default_factory=ProofSection)
    credit: CreditSection = Field(default_factory=CreditSection)
    host: HostSection = Field(default_factory=HostSection)
    lora: LoraSection = Field(default_factory=LoraSection, validate_default=True)  # finetune checks

    # Where the manifest was read from; not part of the run's identity.
    _path: Path | None = None

    @field_validator("proof")
    @classmethod
    def _check_proof(cls, proof: ProofSection) -> ProofSection:
        if proof.accepts_required > proof.verifiers_per_audit:
            raise ValueError(
                f"accepts_required ({proof.accepts_required}) must be <= verifiers_per_audit "
                f"({proof.verifiers_per_audit})"
            )
        return proof

    @field_validator("model")
    @classmethod
    def _check_finetune_model(cls, model: ModelSection, info: ValidationInfo) -> ModelSection:
        run = info.data.get("run")
        kind = run.kind if run is not None else "pretrain"
        if kind == "finetune":
            if not model.base:
                raise ValueError('a finetune run needs base = a gpunite checkpoint or Hugging Face folder '
                                 '(`gpunite run init --kind finetune --base PATH` fills it in)')
            overridden = [key for key in _ARCHITECTURE_KEYS if getattr(model, key) is not None]
            if model.preset is not None and "preset" in model.model_fields_set:
                overridden.insert(0, "preset")
            if overridden:
                raise ValueError(f"{overridden[0]} does not apply to a finetune run (the base decides the "
                                 "architecture); remove it")
            model.preset = None  # the default preset names no model here
        elif model.base or model.base_hash:
            raise ValueError(f'base is for finetune runs; set run.kind = "finetune" or remove it (kind is {kind})')
        return model

    @field_validator("data")
    @classmethod
    def _check_finetune_data(cls, data: DataSection, info: ValidationInfo) -> DataSection:
        run = info.data.get("run")
        if run is not None and run.kind == "finetune" and data.tokenizer:
            raise ValueError("a finetune run uses its base's tokenizer; leave tokenizer empty")
        return data

    @field_validator("lora")
    @classmethod
    def _check_lora(cls, lora: LoraSection, info: ValidationInfo) -> LoraSection:
        proof = info.data.get("proof")
        if lora.dropout > 0 and proof is not None and proof.audit_fraction > 0:
            raise ValueError(f"dropout must be 0 when proof.audit_fraction > 0 (audit replays cannot reproduce "
                             f"dropout masks), got {lora.dropout}")
        return lora

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def base_dir(self) -> Path:
        return self._path.parent if self._path else Path.cwd()

    @property
    def prepared_path(self) -> Path:
        return (self.base_dir / self.data.prepared_dir).resolve()

    def canonical(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def canonical_bytes(self) -> bytes:
        return json.dumps(self.canonical(), sort_keys=True, separators=(",", ":")).encode()

    @property
    def run_id(self) -> str:
        """The run id: sha256 of the canonical JSON form of the manifest."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    def to_toml(self) -> str:
        return render_toml(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        from gpunite.util import atomic_write_bytes

        atomic_write_bytes(path, self.to_toml().encode())
        self._path = path.resolve()
        return path


def _locate(text: str, loc: tuple[Any, ...]) -> int | None:
    """Best-effort line number of a key like ('train', 'lr') in TOML text."""
    if not loc:
        return None
    lines = text.splitlines()
    section = str(loc[0])
    start = 0
    if len(loc) > 1:
        for i, line in enumerate(lines):
            if re.match(rf"^\s*\[\s*{re.escape(section)}\s*\]", line):
                start = i + 1
                break
        else:
            return None
        key = str(loc[1])
    else:
        key = section
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=|^\s*\[\s*{re.escape(key)}\s*\]")
    for i in range(start, len(lines)):
        if i > start and len(loc) > 1 and re.match(r"^\s*\[", lines[i]):
            break
        if pattern.match(lines[i]):
            return i + 1
    return None


def _describe(err: dict[str, Any]) -> str:
    loc = err.get("loc", ())
    kind = err.get("type", "")
    got = err.get("input")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "missing key"
    msg = err.get("msg", "invalid value")
    msg = msg.removeprefix("Value error, ")
    if got is not None and not isinstance(got, (dict, list, BaseModel)):
        return f"{msg}, got {got!r}"
    return msg


def parse_manifest(text: str, source: str = "<manifest>") -> Manifest:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"Manifest error: {source}: not valid TOML: {exc}") from None
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err.get("loc", ()))
        dotted = ".".join(str(p) for p in loc) if loc else "(top level)"
        where = _locate(text, loc)
        at = f" ({source} line {where})" if where else f" ({source})"
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ManifestError(f"Manifest error: [{dotted}] {_describe(err)}{at}{more}") from None


def load_manifest(path: str | Path, check_data: bool = True) -> Manifest:
    """Read and validate a manifest file; with check_data, every data source must exist."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"Manifest error: {path}: no such file (create one with `gpunite run init`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"Manifest error: {path}: cannot read: {exc}") from None
    manifest = parse_manifest(text, str(path))
    manifest._path = path.resolve()
    if check_data:
        for source in manifest.data.sources:
            if source.startswith("builtin:"):
                continue
            source_path = Path(source) if Path(source).is_absolute() else manifest.base_dir / source
            if not source_path.exists():
                line = _locate(text, ("data", "sources"))
                at = f" ({path} line {line})" if line else f" ({path})"
                raise ManifestError(f"Manifest error: [data.sources] no such file or folder: {source}{at}")
    return manifest


def resolve_source(manifest: Manifest, source: str) -> str:
    """A data source as an absolute path (builtin: sources pass through)."""
    if source.startswith("builtin:"):
        return source
    p = Path(source)
    return str(p if p.is_absolute() else (manifest.base_dir / p).resolve())


def _toml_value(value: Any) -> str:
    import tomli_w

    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def render_toml(manifest: Manifest) -> str:
    """A complete TOML manifest with every key and a comment saying what it does."""
    lines = ["# gpunite run manifest. Every key is listed with its documented default.",
             "# The run id is the sha256 of this manifest's canonical form: editing it makes a new run.", ""]
    for section_name, section in manifest:
        lines.append(f"[{section_name}]")
        for field_name, info in type(section).model_fields.items():
            value = getattr(section, field_name)
            if info.description:
                lines.append(f"# {info.description}")
            if value is None:
                lines.append(f"# {field_name} =")
            else:
                lines.append(f"{field_name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)
