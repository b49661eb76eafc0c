"""Pseudo-gradient compression: int8 per-chunk absmax quantization (or plain fp32) as checked safetensors.

A flat fp32 vector is cut into chunks of `chunk` elements; each chunk travels as int8 values plus one fp32
scale (absmax / 127), so a payload is ~1/4 of fp32. Chunks line up with the sharded aggregation's slices
(`gpunite.swarm.aggregation.slice_bounds`), so a slice of a payload is itself a payload (`slice_payload`).

Everything here is deterministic and bit-reproducible on any IEEE machine: quantization uses only
correctly-rounded elementwise operations (divide, round-half-to-even, multiply), never fused or reduced ones
except the absmax, which is exact. Bytes carry no metadata (safetensors orders its header deterministically),
so equal payloads give equal bytes and equal `payload_hash`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from gpunite.train.weights import TensorPayloadError, from_safetensors_bytes, to_safetensors_bytes

INT8_MAX = 127
COMPRESSIONS = ("int8", "none")


@dataclass(frozen=True)
class Int8Payload:
    """numel int8 values and one fp32 scale per chunk of `chunk` values (the last chunk may be shorter)."""

    q: torch.Tensor  # int8 [numel], values in [-127, 127]
    scales: torch.Tensor  # fp32 [ceil(numel / chunk)], absmax / 127 of each chunk (0 for an all-zero chunk)
    numel: int
    chunk: int


@dataclass(frozen=True)
class Fp32Payload:
    """The uncompressed path (`compression = "none"`), for comparison: the fp32 values themselves."""

    values: torch.Tensor  # fp32 [numel]
    numel: int
    chunk: int  # kept so slicing rules are the same as for int8


Payload = Int8Payload | Fp32Payload


def n_chunks(numel: int, chunk: int) -> int:
    return -(-numel // chunk)


def _check_vector(vector: torch.Tensor, chunk: int) -> None:
    if vector.dim() != 1 or vector.dtype != torch.float32:
        raise TensorPayloadError(f"expected a 1-D fp32 vector, got {tuple(vector.shape)} {vector.dtype}")
    if chunk <= 0:
        raise TensorPayloadError(f"compression chunk must be > 0, got {chunk}")


def compress_int8(vector: torch.Tensor, chunk: int) -> Int8Payload:
    """Quantize each chunk to round(x / scale) with scale = absmax / 127 (round half to even)."""
    _check_vector(vector, chunk)
    vector = vector.detach().to("cpu").contiguous()
    numel = vector.numel()
    chunks = n_chunks(numel, chunk)
    padded = torch.zeros(chunks * chunk, dtype=torch.float32)
    padded[:numel] = vector
    rows = padded.view(chunks, chunk)
    scales = rows.abs().amax(dim=1) / INT8_MAX if chunks else torch.zeros(0, dtype=torch.float32)
    # An all-zero chunk has scale 0: divide by 1 instead, its values are 0 anyway.
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(rows / divisor[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return Int8Payload(q=q.reshape(-1)[:numel].clone(), scales=scales, numel=numel, chunk=chunk)


def decompress_int8(payload: Int8Payload) -> torch.Tensor:
    """The fp32 vector the payload stands for: q * scale of its chunk."""
    repeated = payload.scales.repeat_interleave(payload.chunk)[: payload.numel]
    return payload.q.to(torch.float32) * repeated


def compress(vector: torch.Tensor, method: str, chunk: int) -> Payload:
    """`method` is "int8" or "none" (the manifest's `train.compression`)."""
    if method == "int8":
        return compress_int8(vector, chunk)
    if method == "none":
        _check_vector(vector, chunk)
        values = vector.detach().to("cpu").contiguous().clone()
        return Fp32Payload(values=values, numel=values.numel(), chunk=chunk)
    raise TensorPayloadError(f"unknown compression {method!r}; choose one of {', '.join(COMPRESSIONS)}")


def decompress(payload: Payload) -> torch.Tensor:
    if isinstance(payload, Int8Payload):
        return decompress_int8(payload)
    return payload.values.clone()


def slice_payload(payload: Payload, start: int, end: int) -> Payload:
    """Elements [start, end) as a payload of their own; start must be chunk-aligned, end too unless numel."""
    if not 0 <= start <= end <= payload.numel:
        raise TensorPayloadError(f"slice [{start}, {end}) is outside a payload of {payload.numel} elements")
    if (start % payload.chunk and start != payload.numel) or (end % payload.chunk and end != payload.numel):
        raise TensorPayloadError(f"slice [{start}, {end}) is not aligned to chunks of {payload.chunk}")
    if isinstance(payload, Fp32Payload):
        return Fp32Payload(values=payload.values[start:end].clone(), numel=end - start, chunk=payload.chunk)
    first, last = n_chunks(start, payload.chunk), n_chunks(end, payload.chunk)
    return Int8Payload(
        q=payload.q[start:end].clone(), scales=payload.scales[first:last].clone(), numel=end - start,
        chunk=payload.chunk,
    )


def payload_to_bytes(payload: Payload) -> bytes:
    """safetensors bytes with no metadata: the same payload always gives the same bytes."""
    if isinstance(payload, Int8Payload):
        return to_safetensors_bytes({"q": payload.q, "scales": payload.scales})
    return to_safetensors_bytes({"values": payload.values})


def payload_from_bytes(
    data: bytes, expected_numel: int, chunk: int, max_bytes: int | None = None, method: str = "int8"
) -> Payload:
    """Parse an untrusted peer's payload: exact names, shapes and dtypes, finite, in the quantizer's range."""
    if method == "none":
        tensors = from_safetensors_bytes(data, {"values": ((expected_numel,), torch.float32)}, max_bytes)
        return Fp32Payload(values=tensors["values"], numel=expected_numel, chunk=chunk)
    if method != "int8":
        raise TensorPayloadError(f"unknown compression {method!r}; choose one of {', '.join(COMPRESSIONS)}")
    expected = {
        "q": ((expected_numel,), torch.int8),
        "scales": ((n_chunks(expected_numel, chunk),), torch.float32),
    }
    tensors = from_safetensors_bytes(data, expected, max_bytes)
    q, scales = tensors["q"], tensors["scales"]
    if bool((scales < 0).any()):
        raise TensorPayloadError("int8 payload has negative scales; the sender is not gpunite's quantizer")
    if bool((q == -128).any()):
        raise TensorPayloadError("int8 payload holds -128, outside the quantizer's range [-127, 127]")
    return Int8Payload(q=q, scales=scales, numel=expected_numel, chunk=chunk)


def payload_hash(data: bytes) -> str:
    """sha256 hex of payload bytes: what a contribution commits to (`delta_hash`, `slice_hashes`)."""
    return hashlib.sha256(data).hexdigest()


@dataclass
class ErrorFeedback:
    """Carries what quantization dropped this round into the next round's pseudo-gradient.

    `compress(g)` sends g + residual and keeps residual = (g + residual) - decompress(sent). Each element of
    the residual is at most half a quantization step of its chunk, so an auditor comparing the committed
    delta with base - local weights must allow for it; that is why the swarm may leave it off. Call
    `reset()` when a contribution was not merged (its whole delta was lost, not just the rounding).
    """

    method: str
    chunk: int
    residual: torch.Tensor | None = field(default=None)

    def compress(self, pseudo_grad: torch.Tensor) -> Payload:
        corrected = pseudo_grad if self.residual is None else pseudo_grad + self.residual
        payload = compress(corrected, self.method, self.chunk)
        self.residual = corrected - decompress(payload)
        return payload

    def reset(self) -> None:
        self.residual = None
