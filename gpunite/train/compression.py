"""Pseudo-gradient compression: int8 or int4 per-chunk absmax quantization (or fp32) as checked safetensors.

A flat fp32 vector is cut into chunks of `chunk` elements; each chunk travels as integer values plus one fp32
scale (absmax / 127 for int8, absmax / 7 for int4), so a payload is ~1/4 (int8) or ~1/8 (int4) of fp32.
Chunks line up with the sharded aggregation's slices (`gpunite.swarm.aggregation.slice_bounds`), so a slice
of a payload is itself a payload (`slice_payload`).

int4 wire format: tensor "packed" (uint8, ceil(numel / 2) bytes) holds two values per byte, element 2i in the
low nibble and 2i + 1 in the high one, each stored as q + 8 with q in [-7, 7] (so nibble 0 never occurs); when
numel is odd the last high nibble is 8 (q = 0). Tensor "scales" as for int8. int4 needs an even chunk, so
every slice starts on a byte.

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
INT4_MAX = 7
INT4_OFFSET = 8  # a nibble holds q + 8, so q in [-7, 7] is 1..15
COMPRESSIONS = ("int8", "int4", "none")


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


@dataclass(frozen=True)
class Int4Payload:
    """numel values in [-7, 7] packed two per byte (see the module docstring) and one fp32 scale per chunk."""

    packed: torch.Tensor  # uint8 [ceil(numel / 2)]
    scales: torch.Tensor  # fp32 [ceil(numel / chunk)], absmax / 7 of each chunk (0 for an all-zero chunk)
    numel: int
    chunk: int


Payload = Int8Payload | Int4Payload | Fp32Payload


def payload_method(compression: str) -> str:
    """The payload method for a manifest's `train.compression`: the name itself, once known to be one."""
    if compression not in COMPRESSIONS:
        choices = ", ".join(COMPRESSIONS)
        raise TensorPayloadError(f"unknown compression {compression!r}; choose one of {choices}")
    return compression


def n_chunks(numel: int, chunk: int) -> int:
    return -(-numel // chunk)


def _check_vector(vector: torch.Tensor, chunk: int) -> None:
    if vector.dim() != 1 or vector.dtype != torch.float32:
        raise TensorPayloadError(f"expected a 1-D fp32 vector, got {tuple(vector.shape)} {vector.dtype}")
    if chunk <= 0:
        raise TensorPayloadError(f"compression chunk must be > 0, got {chunk}")


def _quantize(vector: torch.Tensor, chunk: int, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """round(x / scale) clamped to [-levels, levels] with scale = absmax / levels per chunk (half to even)."""
    _check_vector(vector, chunk)
    vector = vector.detach().to("cpu").contiguous()
    numel = vector.numel()
    chunks = n_chunks(numel, chunk)
    padded = torch.zeros(chunks * chunk, dtype=torch.float32)
    padded[:numel] = vector
    rows = padded.view(chunks, chunk)
    scales = rows.abs().amax(dim=1) / levels if chunks else torch.zeros(0, dtype=torch.float32)
    # An all-zero chunk has scale 0: divide by 1 instead, its values are 0 anyway.
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(rows / divisor[:, None]).clamp_(-levels, levels)
    return q.reshape(-1)[:numel], scales


def compress_int8(vector: torch.Tensor, chunk: int) -> Int8Payload:
    """Quantize each chunk to round(x / scale) with scale = absmax / 127 (round half to even)."""
    q, scales = _quantize(vector, chunk, INT8_MAX)
    return Int8Payload(q=q.to(torch.int8), scales=scales, numel=q.numel(), chunk=chunk)


def compress_int4(vector: torch.Tensor, chunk: int) -> Int4Payload:
    """Quantize each chunk to round(x / scale) in [-7, 7] with scale = absmax / 7, packed two per byte."""
    if chunk % 2:
        raise TensorPayloadError(f"int4 needs an even chunk, so slices start on a byte; got {chunk}")
    q, scales = _quantize(vector, chunk, INT4_MAX)
    return _pack_int4(q, scales, chunk)


def _pack_int4(q: torch.Tensor, scales: torch.Tensor, chunk: int) -> Int4Payload:
    numel = q.numel()
    nibbles = torch.full((numel + numel % 2,), INT4_OFFSET, dtype=torch.uint8)
    nibbles[:numel] = (q.to(torch.int16) + INT4_OFFSET).to(torch.uint8)
    pairs = nibbles.view(-1, 2)
    return Int4Payload(packed=(pairs[:, 0] | (pairs[:, 1] << 4)).contiguous(), scales=scales, numel=numel,
                       chunk=chunk)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The values q in [-7, 7] (as int8) of packed int4 bytes, the first `numel` of them."""
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:numel]
    return nibbles.to(torch.int8) - INT4_OFFSET


def decompress_int4(payload: Int4Payload) -> torch.Tensor:
    """The fp32 vector the payload stands for: q * scale of its chunk."""
    repeated = payload.scales.repeat_interleave(payload.chunk)[: payload.numel]
    return unpack_int4(payload.packed, payload.numel).to(torch.float32) * repeated


def decompress_int8(payload: Int8Payload) -> torch.Tensor:
    """The fp32 vector the payload stands for: q * scale of its chunk."""
    repeated = payload.scales.repeat_interleave(payload.chunk)[: payload.numel]
    return payload.q.to(torch.float32) * repeated


def compress(vector: torch.Tensor, method: str, chunk: int) -> Payload:
    """`method` is "int8", "int4" or "none" (the manifest's `train.compression`)."""
    method = payload_method(method)
    if method == "int8":
        return compress_int8(vector, chunk)
    if method == "int4":
        return compress_int4(vector, chunk)
    _check_vector(vector, chunk)
    values = vector.detach().to("cpu").contiguous().clone()
    return Fp32Payload(values=values, numel=values.numel(), chunk=chunk)


def decompress(payload: Payload) -> torch.Tensor:
    if isinstance(payload, Int8Payload):
        return decompress_int8(payload)
    if isinstance(payload, Int4Payload):
        return decompress_int4(payload)
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
    if isinstance(payload, Int4Payload):
        # start is a multiple of the (even) chunk, so the slice starts on a byte; repacking fixes the padding
        # nibble when the slice ends at an odd element.
        values = unpack_int4(payload.packed[start // 2: -(-end // 2)], end - start)
        return _pack_int4(values, payload.scales[first:last].clone(), payload.chunk)
    return Int8Payload(
        q=payload.q[start:end].clone(), scales=payload.scales[first:last].clone(), numel=end - start,
        chunk=payload.chunk,
    )


def payload_to_bytes(payload: Payload) -> bytes:
    """safetensors bytes with no metadata: the same payload always gives the same bytes."""
    if isinstance(payload, Int8Payload):
        return to_safetensors_bytes({"q": payload.q, "scales": payload.scales})
    if isinstance(payload, Int4Payload):
        return to_safetensors_bytes({"packed": payload.packed, "scales": payload.scales})
    return to_safetensors_bytes({"values": payload.values})


def payload_from_bytes(
    data: bytes, expected_numel: int, chunk: int, max_bytes: int | None = None, method: str = "int8"
) -> Payload:
    """Parse an untrusted peer's payload: exact names, shapes and dtypes, finite, in the quantizer's range."""
    method = payload_method(method)
    if method == "none":
        tensors = from_safetensors_bytes(data, {"values": ((expected_numel,), torch.float32)}, max_bytes)
        return Fp32Payload(values=tensors["values"], numel=expected_numel, chunk=chunk)
    if method == "int8":
        values_name, values_shape, values_dtype = "q", expected_numel, torch.int8
    else:
        values_name, values_shape, values_dtype = "packed", -(-expected_numel // 2), torch.uint8
    expected = {
        values_name: ((values_shape,), values_dtype),
        "scales": ((n_chunks(expected_numel, chunk),), torch.float32),
    }
    tensors = from_safetensors_bytes(data, expected, max_bytes)
    scales = tensors["scales"]
    if bool((scales < 0).any()):
        raise TensorPayloadError(f"{method} payload has negative scales; the sender is not our quantizer")
    if method == "int8":
        q = tensors["q"]
        if bool((q == -128).any()):
            raise TensorPayloadError("int8 payload holds -128, outside the quantizer's range [-127, 127]")
        return Int8Payload(q=q, scales=scales, numel=expected_numel, chunk=chunk)
    if chunk % 2:
        raise TensorPayloadError(f"int4 payloads need an even chunk, got {chunk}")
    packed = tensors["packed"]
    if bool(((packed & 0x0F) == 0).any()) or bool(((packed >> 4) == 0).any()):
        raise TensorPayloadError("int4 payload holds nibble 0 (q = -8), outside the quantizer's [-7, 7]")
    if expected_numel % 2 and int(packed[-1]) >> 4 != INT4_OFFSET:
        raise TensorPayloadError("int4 payload's padding nibble is not 8 (q = 0): bytes not canonical")
    return Int4Payload(packed=packed, scales=scales, numel=expected_numel, chunk=chunk)


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
