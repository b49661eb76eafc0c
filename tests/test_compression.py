import subprocess
import sys

import pytest
import torch

from gpunite.train.compression import (
    ErrorFeedback, Int8Payload, compress, compress_int8, decompress, decompress_int8, payload_from_bytes,
    payload_hash, payload_to_bytes, slice_payload,
)
from gpunite.train.weights import TensorPayloadError, to_safetensors_bytes


def test_int8_round_trip_error_is_at_most_half_a_step_per_chunk():
    torch.manual_seed(0)
    vector = torch.randn(1000) * torch.linspace(0.01, 10, 1000)
    payload = compress_int8(vector, chunk=64)
    assert payload.q.dtype == torch.int8 and payload.q.numel() == 1000
    assert payload.scales.numel() == 16  # ceil(1000 / 64)
    restored = decompress_int8(payload)
    step = payload.scales.repeat_interleave(64)[:1000]
    assert bool(((restored - vector).abs() <= step / 2 + 1e-7).all())
    # The largest value of every chunk is exact up to the scale's own rounding.
    assert int(payload.q.abs().max()) == 127


def test_zero_chunks_and_empty_vectors():
    vector = torch.zeros(300)
    vector[200] = -3.0
    payload = compress_int8(vector, chunk=100)
    assert payload.scales.tolist()[:2] == [0.0, 0.0]
    assert torch.equal(decompress_int8(payload), vector)
    empty = compress_int8(torch.zeros(0), chunk=8)
    assert decompress_int8(empty).numel() == 0


def test_bytes_are_deterministic_across_processes_and_parse_back():
    vector = torch.arange(-500, 500, dtype=torch.float32) / 7
    data = payload_to_bytes(compress_int8(vector, 64))
    code = (
        "import torch, sys; from gpunite.train.compression import *;"
        "v = torch.arange(-500, 500, dtype=torch.float32) / 7;"
        "print(payload_hash(payload_to_bytes(compress_int8(v, 64))))"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    other = other.stdout.strip()
    assert other == payload_hash(data)
    parsed = payload_from_bytes(data, expected_numel=1000, chunk=64, max_bytes=len(data))
    assert torch.equal(decompress(parsed), decompress_int8(compress_int8(vector, 64)))


def test_hostile_bytes_are_rejected_with_one_line_errors():
    good = payload_to_bytes(compress_int8(torch.randn(256), 64))
    with pytest.raises(TensorPayloadError, match="expected"):
        payload_from_bytes(good, expected_numel=257, chunk=64)
    with pytest.raises(TensorPayloadError, match="more than"):
        payload_from_bytes(good, expected_numel=256, chunk=64, max_bytes=100)
    with pytest.raises(TensorPayloadError, match="not valid"):
        payload_from_bytes(good[:50], expected_numel=256, chunk=64)
    q = torch.zeros(256, dtype=torch.int8)
    nan_scales = to_safetensors_bytes({"q": q, "scales": torch.tensor([1.0, float("inf"), 1.0, 1.0])})
    with pytest.raises(TensorPayloadError, match="non-finite"):
        payload_from_bytes(nan_scales, expected_numel=256, chunk=64)
    negative = to_safetensors_bytes({"q": q, "scales": torch.tensor([1.0, -1.0, 1.0, 1.0])})
    with pytest.raises(TensorPayloadError, match="negative"):
        payload_from_bytes(negative, expected_numel=256, chunk=64)
    wrong_dtype = to_safetensors_bytes({"q": q.to(torch.int16), "scales": torch.ones(4)})
    with pytest.raises(TensorPayloadError, match="expected"):
        payload_from_bytes(wrong_dtype, expected_numel=256, chunk=64)
    with pytest.raises(TensorPayloadError, match="unknown compression"):
        compress(torch.ones(4), "top-k", 64)


def test_slices_are_payloads_of_their_own():
    torch.manual_seed(1)
    vector = torch.randn(1000)
    for method in ("int8", "none"):
        payload = compress(vector, method, 64)
        whole = decompress(payload)
        pieces = [(0, 384), (384, 960), (960, 1000)]
        for start, end in pieces:
            piece = slice_payload(payload, start, end)
            data = payload_to_bytes(piece)
            parsed = payload_from_bytes(data, expected_numel=end - start, chunk=64, method=method)
            assert torch.equal(decompress(parsed), whole[start:end])
    assert isinstance(slice_payload(compress_int8(vector, 64), 64, 128), Int8Payload)
    with pytest.raises(TensorPayloadError, match="aligned"):
        slice_payload(compress_int8(vector, 64), 10, 128)
    with pytest.raises(TensorPayloadError, match="outside"):
        slice_payload(compress_int8(vector, 64), 0, 1064)


def test_none_compression_is_exact():
    vector = torch.randn(10_000)
    payload = compress(vector, "none", 4096)
    data = payload_to_bytes(payload)
    assert torch.equal(decompress(payload_from_bytes(data, 10_000, 4096, method="none")), vector)
    assert len(data) > 3.9 * len(payload_to_bytes(compress_int8(vector, 4096)))


def test_error_feedback_carries_the_rounding_into_the_next_round():
    torch.manual_seed(2)
    gradient = torch.randn(512) * 1e-3
    gradient[0] = 1.0  # one large value makes the other values of its chunk round coarsely
    feedback = ErrorFeedback("int8", 512)
    sent_total = torch.zeros(512)
    rounds = 20
    for _ in range(rounds):
        sent_total += decompress(feedback.compress(gradient))
    plain_error = (decompress_int8(compress_int8(gradient, 512)) * rounds - gradient * rounds).norm()
    feedback_error = (sent_total - gradient * rounds).norm()
    assert feedback_error < plain_error / 5
    feedback.reset()
    assert feedback.residual is None


def test_empty_trailing_slice_is_allowed():
    payload = compress_int8(torch.randn(10), 64)
    empty = slice_payload(payload, 10, 10)
    assert empty.numel == 0 and empty.scales.numel() == 0
    assert decompress(payload_from_bytes(payload_to_bytes(empty), 0, 64)).numel() == 0
