"""Local training on one peer (`gpunite train`): prepared shards in, checkpoints out, resumable bitwise."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from gpunite.errors import GpuniteError
from gpunite.manifest import Manifest

CHECKPOINT_NAME = "latest.safetensors"
# Held-out sequences scored at the end of training (spread evenly over the held-out split).
HELDOUT_SEQUENCES_MAX = 64
# Steps the tokens/s and MFU figures average over.
RATE_WINDOW_STEPS = 20


class LocalTrainingError(GpuniteError):
    """A local training run that cannot start or resume as asked."""


@dataclass
class TrainProgress:
    step: int
    target_step: int
    loss: float
    lr: float
    tokens_per_s: float
    mfu: float
    checkpoint_saved: bool


@dataclass
class TrainResult:
    run_id: str
    device: str
    params: int
    start_step: int
    final_step: int
    steps_run: int
    tokens: int
    final_loss: float | None
    heldout_loss: float
    tokens_per_s: float
    mfu: float
    peak_tflops: float
    elapsed_s: float
    checkpoint: str
    resumed: bool

    def to_json(self) -> dict:
        return asdict(self)


def default_checkpoint_dir(manifest: Manifest) -> Path:
    return manifest.base_dir / "checkpoints" / manifest.run.name


def train_local(
    manifest: Manifest,
    *,
    steps: int | None = None,
    resume: bool = True,
    out_dir: str | Path | None = None,
    device: str = "auto",
    progress: Callable[[TrainProgress], None] | None = None,
) -> TrainResult:
    """Train the manifest's model on its prepared data until step `steps` (default train.total_steps).

    The learning-rate schedule always spans train.total_steps, so stopping at step N and resuming later
    gives bitwise the weights of one uninterrupted run. Checkpoints land every train.checkpoint_every steps
    and at the end, in `out_dir` (default: <manifest dir>/checkpoints/<run name>/).
    """
    from gpunite.data.batches import BatchStream, heldout_sequences
    from gpunite.data.shards import TOKENIZER_NAME, ShardIndex
    from gpunite.model import build_model, config_from_manifest, flops_per_token, param_count
    from gpunite.train.checkpoint import load_checkpoint, restore_training_state, save_checkpoint
    from gpunite.train.hardware import peak_tflops
    from gpunite.train.trainer import InnerTrainer, lr_at, pick_device

    cfg = manifest.train
    target_step = steps if steps is not None else cfg.total_steps
    if target_step <= 0:
        raise LocalTrainingError(f"--steps must be > 0, got {target_step}")
    prepared_dir = manifest.prepared_path
    index = ShardIndex.load(prepared_dir)
    expected_tokenizer = manifest.data.tokenizer_hash
    if expected_tokenizer is not None and expected_tokenizer != index.tokenizer_hash:
        raise LocalTrainingError(
            f"{prepared_dir} was prepared with another tokenizer than the manifest names; "
            f"run `gpunite data prepare {manifest.path or 'RUN.toml'}` again"
        )
    config = config_from_manifest(manifest)
    if index.vocab_size > config.vocab_size:
        raise LocalTrainingError(
            f"the prepared data uses {index.vocab_size} token ids but the model has {config.vocab_size}; "
            "set data.vocab_size to match and prepare again"
        )
    tokenizer_json = (prepared_dir / TOKENIZER_NAME).read_text(encoding="utf-8")
    seq_len = manifest.data.seq_len

    torch_device = pick_device(device)
    model = build_model(config, seed=manifest.run.seed, device=torch_device)
    trainer = InnerTrainer(model, cfg, torch_device, total_steps=cfg.total_steps)
    checkpoint_path = (
        Path(out_dir) / CHECKPOINT_NAME if out_dir else default_checkpoint_dir(manifest) / CHECKPOINT_NAME
    )
    data_position = 0
    resumed = False
    if resume and checkpoint_path.exists():
        checkpoint = load_checkpoint(checkpoint_path)
        if checkpoint.model_config != config:
            raise LocalTrainingError(
                f"{checkpoint_path} holds a different model than the manifest describes; "
                "pass --no-resume to start over or --out to train into another folder"
            )
        if checkpoint.extra.get("tokenizer_hash") not in (None, index.tokenizer_hash):
            raise LocalTrainingError(
                f"{checkpoint_path} was trained on data from another tokenizer; "
                "pass --no-resume to start over or --out to train into another folder"
            )
        restore_training_state(checkpoint, model, trainer)
        data_position = checkpoint.data_position
        resumed = True
    start_step = trainer.step
    stream = BatchStream(
        prepared_dir, index, seq_len, cfg.batch_size, seed=manifest.run.seed, position=data_position
    )

    tokens_per_step = cfg.batch_size * seq_len
    model_flops_per_token = flops_per_token(config, seq_len)
    peak = peak_tflops(torch_device)
    extra = {
        "run_id": manifest.run_id,
        "tokenizer_hash": index.tokenizer_hash,
        "eos_id": index.eos_id,
        "dataset_hash": index.dataset_hash,
    }

    def save() -> None:
        save_checkpoint(
            checkpoint_path,
            model,
            trainer,
            data_position=stream.position,
            manifest=manifest,
            tokenizer_json=tokenizer_json,
            extra=extra,
        )

    loss: float | None = None
    step_times: list[float] = []
    started = time.perf_counter()
    last = started
    while trainer.step < target_step:
        lr = lr_at(trainer.step, cfg, cfg.total_steps)
        loss = trainer.train_step(next(stream))
        now = time.perf_counter()
        step_times.append(now - last)
        last = now
        saved = trainer.step % cfg.checkpoint_every == 0 or trainer.step == target_step
        if saved:
            save()
            last = time.perf_counter()  # checkpoint time is not training time
        if progress is not None:
            window = step_times[-RATE_WINDOW_STEPS:]
            rate = tokens_per_step * len(window) / sum(window)
            progress(
                TrainProgress(
                    trainer.step, target_step, loss, lr, rate, _mfu(rate, model_flops_per_token, peak), saved
                )
            )
    elapsed = time.perf_counter() - started

    # The first step pays for start-up (allocations, kernel selection); leave it out of the rate.
    timed = step_times[1:] if len(step_times) > 1 else step_times
    tokens_per_s = tokens_per_step * len(timed) / sum(timed) if timed else 0.0
    heldout = heldout_sequences(prepared_dir, index, seq_len, HELDOUT_SEQUENCES_MAX)
    heldout_loss = trainer.evaluate(heldout.split(cfg.batch_size))
    return TrainResult(
        run_id=manifest.run_id,
        device=str(torch_device),
        params=param_count(config),
        start_step=start_step,
        final_step=trainer.step,
        steps_run=trainer.step - start_step,
        tokens=(trainer.step - start_step) * tokens_per_step,
        final_loss=loss,
        heldout_loss=heldout_loss,
        tokens_per_s=tokens_per_s,
        mfu=_mfu(tokens_per_s, model_flops_per_token, peak),
        peak_tflops=peak,
        elapsed_s=elapsed,
        checkpoint=str(checkpoint_path),
        resumed=resumed,
    )


def _mfu(tokens_per_s: float, model_flops_per_token: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOPs/s over the device's measured matmul peak."""
    return tokens_per_s * model_flops_per_token / (peak_tflops * 1e12) if peak_tflops > 0 else 0.0
