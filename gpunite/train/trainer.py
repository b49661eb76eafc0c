"""The inner-loop trainer: AdamW with warmup + cosine, grad clipping, autocast, deterministic on one machine.

Local training, swarm rounds and proof-of-training audit replays all run their steps through
`InnerTrainer`, so a replay of k steps from a checkpoint does exactly what the trainer did.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from gpunite.errors import GpuniteError

if TYPE_CHECKING:
    from gpunite.manifest import TrainSection

# Optimizer state keys AdamW keeps per parameter; `step` is a scalar tensor.
_ADAM_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")
# What a trail entry stores (InnerTrainer.round_to_trail_precision): weights as their change in the round in
# fp16, AdamW's first moment in bf16.
TRAIL_DELTA_DTYPE = torch.float16
TRAIL_MOMENT_DTYPE = torch.bfloat16


class TrainingError(GpuniteError):
    """Training that cannot go on: a non-finite loss, a batch of the wrong shape, a bad optimizer state."""


def pick_device(preference: str = "auto") -> torch.device:
    """The device to train on: the named one, or with "auto" the first of cuda, mps, xpu, cpu that works."""
    if preference != "auto":
        try:
            device = torch.device(preference)
        except RuntimeError:
            raise TrainingError(
                f"unknown device {preference!r}; use auto, cpu, cuda, cuda:N, mps or xpu"
            ) from None
        if not _device_available(device):
            raise TrainingError(
                f"device {preference!r} is not available here; run `gpunite doctor` to see devices"
            )
        return device
    for candidate in ("cuda", "mps", "xpu"):
        device = torch.device(candidate)
        if _device_available(device):
            return device
    return torch.device("cpu")


def _device_available(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.is_available() and (
            device.index is None or device.index < torch.cuda.device_count()
        )
    if device.type == "mps":
        return torch.backends.mps.is_available()
    if device.type == "xpu":
        return hasattr(torch, "xpu") and torch.xpu.is_available()
    return False


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on accelerators that support it (fp32 master weights stay), None (plain fp32) on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type in ("mps", "xpu"):
        return torch.bfloat16
    return None


def lr_at(step: int, train_cfg: TrainSection, total_steps: int) -> float:
    """Learning rate for `step` (0-based): linear warmup to lr, then cosine down to lr * min_lr_ratio."""
    peak = train_cfg.lr
    floor = peak * train_cfg.min_lr_ratio
    warmup = train_cfg.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def unique_named_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable parameters by name, each once (tied embeddings share one tensor under their first name)."""
    seen: set[int] = set()
    named = []
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            named.append((name, param))
    return named


def causal_lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a [batch, seq_len + 1] token tensor."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))


_ROUNDING_CHUNK = 1 << 16  # elements per pass on the CPU: the fp32 temporary stays in cache (2x faster)


def _round_change(param: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """param <- start + fp16(param - start), in place; returns the fp16 change. The sum is taken in fp32 (the
    fp16 operand widens exactly), so every device computes the same bits."""
    if param.device.type != "cpu" or param.numel() <= _ROUNDING_CHUNK or not param.is_contiguous():
        change = (param - start).to(TRAIL_DELTA_DTYPE)
        torch.add(start, change, out=param)
        return change
    change = torch.empty(param.shape, dtype=TRAIL_DELTA_DTYPE)
    flat, flat_start, flat_change = param.view(-1), start.reshape(-1), change.view(-1)
    scratch = torch.empty(_ROUNDING_CHUNK, dtype=param.dtype)
    for first in range(0, flat.numel(), _ROUNDING_CHUNK):
        part = slice(first, min(first + _ROUNDING_CHUNK, flat.numel()))
        n = part.stop - part.start
        flat_change[part].copy_(torch.sub(flat[part], flat_start[part], out=scratch[:n]))
        torch.add(flat_start[part], flat_change[part], out=flat[part])
    return change


class InnerTrainer:
    """AdamW steps on one model, with the run's schedule; `step` counts the optimizer steps taken.

    Weight decay applies to every matrix (attention, MLP, and the embedding, which the small presets tie to
    the output head, as nanoGPT does) and not to the RMSNorm gains: decaying a norm gain only pulls
    activations toward zero.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        train_cfg: TrainSection,
        device: torch.device | str | None = None,
        total_steps: int | None = None,
        step: int = 0,
    ) -> None:
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device)
        self.train_cfg = train_cfg
        self.total_steps = total_steps if total_steps is not None else train_cfg.total_steps
        self.step = step
        self.autocast_dtype = autocast_dtype(self.device)
        self._named_params = unique_named_parameters(self.model)
        self._params = [param for _, param in self._named_params]
        decayed = [param for param in self._params if param.ndim >= 2]
        not_decayed = [param for param in self._params if param.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decayed, "weight_decay": train_cfg.weight_decay},
                {"params": not_decayed, "weight_decay": 0.0},
            ],
            lr=lr_at(step, train_cfg, self.total_steps),
            betas=(train_cfg.beta1, train_cfg.beta2),
            # The fused kernel runs one pass per tensor (CPU and GPU alike) and is elementwise: as
            # deterministic as the loop version, and faster.
            fused=self.device.type in ("cpu", "cuda", "mps", "xpu"),
        )
        self._forward_model = torch.compile(self.model) if train_cfg.compile else self.model

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        if self.autocast_dtype is None:
            return causal_lm_loss(self._forward_model, batch)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
            return causal_lm_loss(self._forward_model, batch)

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.ndim != 2 or batch.size(1) < 2:
            raise TrainingError(
                f"a batch must be [batch, seq_len + 1] tokens, got shape {tuple(batch.shape)}"
            )
        return batch.to(self.device, non_blocking=True)

    def train_step(self, batch: torch.Tensor) -> float:
        """One optimizer step on a [batch, seq_len + 1] token tensor; returns the loss before the step."""
        batch = self._to_device(batch)
        lr = lr_at(self.step, self.train_cfg, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        loss = self._loss(batch)
        loss.backward()
        if self.train_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self._params, self.train_cfg.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        value = loss.item()  # the one host sync per step
        if not math.isfinite(value):
            raise TrainingError(
                f"loss became {value} at step {self.step - 1}; lower train.lr or raise train.warmup_steps"
            )
        return value

    @torch.no_grad()
    def evaluate(self, batch_or_batches: torch.Tensor | Iterable[torch.Tensor]) -> float:
        """Mean loss per predicted token over one batch or several, without touching weights or optimizer."""
        batches = [batch_or_batches] if isinstance(batch_or_batches, torch.Tensor) else batch_or_batches
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = 0
        try:
            for batch in batches:
                batch = self._to_device(batch)
                predicted = batch.size(0) * (batch.size(1) - 1)
                total += self._loss(batch).double() * predicted
                tokens += predicted
        finally:
            self.model.train(was_training)
        if tokens == 0:
            raise TrainingError("evaluate() was given no batches")
        return float(total.item() / tokens)

    @torch.no_grad()
    def round_to_trail_precision(self, base: Mapping[str, torch.Tensor]
                                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Round the training state, in place, to the values a trail entry stores (`gpunite.proof.trail`):
        each weight's change from `base` (the round's start weights, by name, on this device) to fp16 and
        AdamW's first moment to bf16; the second moment and the step stay fp32. Returns the stored values
        themselves, on this device: ({name: fp16 change}, {name + ".exp_avg": bf16 first moment}).

        Trainer and verifier both call this at every trail step, so a stored entry is the exact state the
        trainer went on from, and a replay from it is still bit-exact. The rounding is at most 2^-11 of
        each weight's change in the round and 2^-8 of each first moment; the second moment keeps fp32 (in
        bf16 its slow decay under beta2 near 1 rounds away).
        """
        # The weights tensor by tensor, in cache-sized chunks (under 4 processes on 2 cores that beat foreach
        # calls over whole tensors by 1.5x); the first moments in two calls (one copy back for all).
        changes = {name: _round_change(param.data, base[name]) for name, param in self._named_params}
        with torch.no_grad():
            averages = [(name, state["exp_avg"]) for name, param in self._named_params
                        if (state := self.optimizer.state.get(param))]
            first_moments = [average.to(TRAIL_MOMENT_DTYPE) for _, average in averages]
            if averages:
                torch._foreach_copy_([average for _, average in averages], first_moments)
        return changes, {f"{name}.exp_avg": moment for (name, _), moment in zip(averages, first_moments)}

    def optimizer_state_tensors(self, keys: Iterable[str] = _ADAM_STATE_KEYS) -> dict[str, torch.Tensor]:
        """AdamW's state as flat named tensors (`<param>.exp_avg` ...), detached copies on the CPU (`keys`: which
        of step, exp_avg and exp_avg_sq)."""
        keys = tuple(keys)
        named = [(f"{name}.{key}", state[key]) for name, param in self._named_params
                 if (state := self.optimizer.state.get(param)) for key in keys]
        tensors = [t for _, t in named]
        with torch.no_grad():  # one call on the CPU (fewer GIL waits), a copy each from other devices
            copies = (list(torch._foreach_clone(tensors)) if tensors and all(t.device.type == "cpu" for t in tensors)
                      else [t.detach().to("cpu", copy=True) for t in tensors])
        return {name: copy for (name, _), copy in zip(named, copies)}

    def load_optimizer_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace AdamW's state with copies of `tensors` (as returned by optimizer_state_tensors)."""
        expected = {f"{name}.{key}" for name, _ in self._named_params for key in _ADAM_STATE_KEYS}
        if tensors and set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise TrainingError(
                f"optimizer state does not fit this model: missing {missing[:2]}, unexpected {extra[:2]}"
            )
        # Optimizer.load_state_dict keeps references to the tensors it is given, so every tensor is copied
        # here: two trainers loaded from one dict must never share (and corrupt) each other's moments.
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for index, (name, param) in enumerate(self._named_params):
            if not tensors:
                break
            moments = {key: tensors[f"{name}.{key}"] for key in _ADAM_STATE_KEYS}
            for key in ("exp_avg", "exp_avg_sq"):
                if moments[key].shape != param.shape:
                    raise TrainingError(
                        f"optimizer state {name}.{key} is {tuple(moments[key].shape)}, "
                        f"the parameter is {tuple(param.shape)}"
                    )
            per_param[index] = {key: value.detach().clone() for key, value in moments.items()}
        order = {id(param): index for index, (_, param) in enumerate(self._named_params)}
        state_dict = self.optimizer.state_dict()
        group_ids = [[order[id(p)] for p in group["params"]] for group in self.optimizer.param_groups]
        for group, ids in zip(state_dict["param_groups"], group_ids):
            group["params"] = ids
        state_dict["state"] = per_param
        self.optimizer.load_state_dict(state_dict)
