"""DiLoCo's outer loop math: the pseudo-gradient of a round and the outer SGD step with Nesterov momentum.

All of it works on one flat fp32 CPU vector (`gpunite.train.weights.flatten`). Every honest peer must end a
round with the same weights hash, even on different hardware, so the outer step uses only separate,
correctly-rounded elementwise operations (no `alpha=` adds or addcmul, which may fuse into FMAs on some
CPUs and round differently): the same inputs give bitwise the same outputs everywhere.
"""

from __future__ import annotations

import torch

from gpunite.train.weights import TensorPayloadError


def _check_vector(name: str, vector: torch.Tensor, numel: int | None = None) -> None:
    if vector.dim() != 1 or vector.dtype != torch.float32 or vector.device.type != "cpu":
        raise TensorPayloadError(
            f"{name} must be a 1-D fp32 CPU vector, got {tuple(vector.shape)} {vector.dtype} "
            f"on {vector.device}"
        )
    if numel is not None and vector.numel() != numel:
        raise TensorPayloadError(f"{name} has {vector.numel()} elements, expected {numel}")


def pseudo_gradient(base: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """base - local: the direction the outer step moves against, as a gradient would be."""
    _check_vector("base weights", base)
    _check_vector("local weights", local, base.numel())
    return base - local


class OuterOptimizer:
    """SGD with (Nesterov) momentum over the flat weights, the pseudo-gradient standing in for the gradient.

    buf = momentum * buf + g;  update = g + momentum * buf (Nesterov) or buf;  w = w - lr * update.
    The first step starts from buf = 0 (so buf = g), as torch.optim.SGD does.
    """

    def __init__(self, lr: float = 0.7, momentum: float = 0.9, nesterov: bool = True) -> None:
        if lr <= 0 or not 0 <= momentum < 1:
            raise TensorPayloadError(f"outer optimizer needs lr > 0, 0 <= momentum < 1; got {lr}, {momentum}")
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self.momentum_buffer: torch.Tensor | None = None

    def step(self, weights: torch.Tensor, pseudo_grad: torch.Tensor) -> torch.Tensor:
        """New weights (a new tensor; `weights` is left as it is). Updates the momentum buffer."""
        _check_vector("weights", weights)
        _check_vector("pseudo-gradient", pseudo_grad, weights.numel())
        momentum = torch.tensor(self.momentum, dtype=torch.float32)
        lr = torch.tensor(self.lr, dtype=torch.float32)
        if self.momentum_buffer is None:
            buf = pseudo_grad.clone()
        else:
            _check_vector("momentum buffer", self.momentum_buffer, weights.numel())
            buf = torch.add(torch.mul(self.momentum_buffer, momentum), pseudo_grad)
        update = torch.add(pseudo_grad, torch.mul(buf, momentum)) if self.nesterov else buf
        self.momentum_buffer = buf
        return torch.sub(weights, torch.mul(update, lr))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The state a late joiner needs (ship it as safetensors); empty before the first step."""
        return {} if self.momentum_buffer is None else {"outer.momentum_buffer": self.momentum_buffer.clone()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], numel: int | None = None) -> None:
        """Restore `state_tensors()`; give numel (the flat weights' size) so a wrong-shape state fails."""
        extra = set(tensors) - {"outer.momentum_buffer"}
        if extra:
            raise TensorPayloadError(f"outer optimizer state has unknown tensors {sorted(extra)[:3]}")
        buf = tensors.get("outer.momentum_buffer")
        if buf is None:
            self.momentum_buffer = None
            return
        _check_vector("momentum buffer", buf, numel)
        if not bool(torch.isfinite(buf).all()):
            raise TensorPayloadError("outer optimizer momentum buffer has non-finite values")
        self.momentum_buffer = buf.clone()
