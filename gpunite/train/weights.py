"""Weights as data: a canonical hash, one flat parameter vector, and safetensors bytes checked on the way in."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch

from gpunite.errors import GpuniteError


class TensorPayloadError(GpuniteError):
    """Tensor bytes from a peer or a file that are malformed, the wrong shape, or not finite."""


def weights_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor in name order: equal hash, equal weights."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        if tensor.device.type != "cpu":
            tensor = tensor.to("cpu")
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(repr(tuple(tensor.shape)).encode())
        if tensor.numel():  # the tensor's own memory, not a copy of it (hashlib reads any contiguous buffer)
            # as few torch calls as may be: each may wait for the GIL while other threads run Python
            digest.update((tensor if tensor.dim() else tensor.reshape(1)).view(torch.uint8).numpy())
    return digest.hexdigest()


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (tied weights appear once), detached."""
    seen: set[int] = set()
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        state[name] = param.detach()
    return state


def model_hash(model: torch.nn.Module) -> str:
    return weights_hash(trainable_state(model))


def flatten(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """One fp32 vector holding every tensor in order."""
    return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])


def unflatten_into(vector: torch.Tensor, tensors: Iterable[torch.Tensor]) -> None:
    """Copy consecutive slices of vector into tensors, in place."""
    offset = 0
    for tensor in tensors:
        n = tensor.numel()
        tensor.data.copy_(vector[offset : offset + n].view_as(tensor).to(tensor.dtype))
        offset += n
    if offset != vector.numel():
        raise TensorPayloadError(f"vector has {vector.numel()} elements, tensors need {offset}")


def to_safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata)


def from_safetensors_bytes(
    data: bytes,
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
    max_bytes: int | None = None,
    require_finite: bool = True,
) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes from an untrusted source; check names, shapes, dtypes and finiteness."""
    from safetensors.torch import load

    if max_bytes is not None and len(data) > max_bytes:
        raise TensorPayloadError(f"tensor payload is {len(data)} bytes, more than the {max_bytes} allowed")
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise TensorPayloadError(f"tensor payload is not valid safetensors: {exc}") from None
    if expected is not None:
        if set(tensors) != set(expected):
            missing, extra = set(expected) - set(tensors), set(tensors) - set(expected)
            raise TensorPayloadError(f"tensor names differ: missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]}")
        for name, (shape, dtype) in expected.items():
            tensor = tensors[name]
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise TensorPayloadError(
                    f"tensor {name} is {tuple(tensor.shape)} {tensor.dtype}, expected {tuple(shape)} {dtype}"
                )
    if require_finite:
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise TensorPayloadError(f"tensor {name} has non-finite values")
    return tensors
