"""gpunite's InnerTrainer against a minimal plain PyTorch training loop, side by side in one process.

Both train the same model (same preset, init, batch, dtype, AdamW hyperparameters and grad clipping) on the
same synthetic token batches. Steps alternate A B C C B A ... so both see the same machine state (thermal,
neighbours' load); warm-up steps are excluded, and tokens/s comes from the median step time, which a
busy shared machine disturbs far less than the mean. Prints one JSON line.

    python benchmarks/trainer_efficiency.py [--preset tiny] [--batch 8] [--seq-len 128] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from gpunite.manifest import parse_manifest
from gpunite.model import PRESETS, build_model, flops_per_token
from gpunite.train.hardware import measure_matmul_tflops
from gpunite.train.trainer import InnerTrainer, autocast_dtype, pick_device


class PlainLoop:
    """What a PyTorch user writes by hand: AdamW over all parameters, autocast, clip, step."""

    def __init__(
        self, model: torch.nn.Module, train_cfg, device: torch.device, fused: bool | None = None
    ) -> None:
        self.model = model.to(device).train()
        self.device = device
        self.dtype = autocast_dtype(device)
        self.grad_clip = train_cfg.grad_clip
        self.optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=train_cfg.lr,
            weight_decay=train_cfg.weight_decay,
            betas=(train_cfg.beta1, train_cfg.beta2),
            fused=fused,
        )

    def train_step(self, batch: torch.Tensor) -> float:
        batch = batch.to(self.device)
        with torch.autocast(
            self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None
        ):
            logits = self.model(input_ids=batch[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="Measured steps per loop.")
    parser.add_argument("--warmup", type=int, default=3, help="Unmeasured steps per loop first.")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = pick_device(args.device)
    config = replace(PRESETS[args.preset], max_seq_len=max(args.seq_len, PRESETS[args.preset].max_seq_len))
    train_cfg = parse_manifest(
        f"[train]\nbatch_size = {args.batch}\ntotal_steps = {args.steps + args.warmup}\n"
    ).train
    generator = torch.Generator().manual_seed(0)
    total = args.steps + args.warmup
    batches = [
        torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1), generator=generator)
        for _ in range(total)
    ]

    loops = {
        "gpunite": InnerTrainer(build_model(config, seed=0, device=device), train_cfg, device),
        "baseline": PlainLoop(build_model(config, seed=0, device=device), train_cfg, device),
        # The same plain loop with PyTorch's fused AdamW (which gpunite uses): what is left is the
        # trainer's own overhead.
        "baseline_fused": PlainLoop(
            build_model(config, seed=0, device=device), train_cfg, device, fused=True
        ),
    }
    matmul_dtype = autocast_dtype(device) or torch.float32
    # The peak is the best of a measurement before and one after the loops, so that a busy moment on a
    # shared machine does not shrink the denominator of MFU.
    peak_before = measure_matmul_tflops(device, matmul_dtype, budget_s=1.0)
    step_seconds: dict[str, list[float]] = {name: [] for name in loops}
    for step, batch in enumerate(batches):
        order = list(loops) if step % 2 == 0 else list(reversed(loops))  # A B C, C B A, ...
        for name in order:
            start = time.perf_counter()
            loops[name].train_step(batch)  # returns the loss as a float: the step has finished on the device
            elapsed = time.perf_counter() - start
            if step >= args.warmup:
                step_seconds[name].append(elapsed)

    tokens_per_step = args.batch * args.seq_len
    rate = {name: tokens_per_step / statistics.median(times) for name, times in step_seconds.items()}
    mean_rate = {name: tokens_per_step * len(times) / sum(times) for name, times in step_seconds.items()}
    peak_tflops = max(peak_before, measure_matmul_tflops(device, matmul_dtype, budget_s=1.0))
    model_flops = flops_per_token(config, args.seq_len)
    mfu = rate["gpunite"] * model_flops / (peak_tflops * 1e12) if peak_tflops > 0 else 0.0
    print(
        json.dumps(
            {
                "name": "trainer_efficiency",
                "value": round(rate["gpunite"], 1),
                "unit": "tokens/s",
                "gpunite_tokens_per_s": round(rate["gpunite"], 1),
                "baseline_tokens_per_s": round(rate["baseline"], 1),
                "ratio": round(rate["gpunite"] / rate["baseline"], 4),
                "ratio_of_means": round(mean_rate["gpunite"] / mean_rate["baseline"], 4),
                "baseline_fused_tokens_per_s": round(rate["baseline_fused"], 1),
                "ratio_vs_fused_baseline": round(rate["gpunite"] / rate["baseline_fused"], 4),
                "mfu": round(mfu, 4),
                "peak_tflops": round(peak_tflops, 4),
                "device": str(device),
                "dtype": str(autocast_dtype(device) or torch.float32).removeprefix("torch."),
                "preset": args.preset,
                "batch": args.batch,
                "seq_len": args.seq_len,
                "measured_steps": args.steps,
                "warmup_steps": args.warmup,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
