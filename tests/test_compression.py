import subprocess
import sys

import pytest
import torch

from gpunite.train.compression import (
    COMPRESSIONS, ErrorFeedback, Int4Payload, Int8Payload, compress, compress_int4, compress_int8, decompress,
    decompress_int4, decompress_int8, payload_from_bytes, payload_hash, payload_method, payload_to_bytes,
    slice_payload,
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
    for method in COMPRESSIONS:
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


def test_int4_round_trip_error_is_at_most_half_a_step_per_chunk():
    torch.manual_seed(3)
    vector = torch.randn(1001) * torch.linspace(0.01, 10, 1001)  # odd: the last byte holds one value
    payload = compress_int4(vector, chunk=64)
    assert payload.packed.dtype == torch.uint8 and payload.packed.numel() == 501
    assert payload.scales.numel() == 16
    restored = decompress_int4(payload)
    step = payload.scales.repeat_interleave(64)[:1001]
    assert bool(((restored - vector).abs() <= step / 2 + 1e-6).all())
    # Each chunk's largest value maps to +-7, so its step is absmax / 7.
    assert torch.equal(payload.scales * 7, torch.stack([c.abs().max() for c in vector.split(64)]))
    # int4 is coarser than int8 and about half its size on the wire.
    int8_error = (decompress_int8(compress_int8(vector, 64)) - vector).norm()
    assert int8_error < (restored - vector).norm()
    assert len(payload_to_bytes(payload)) < 0.6 * len(payload_to_bytes(compress_int8(vector, 64)))


def test_int4_packing_is_the_documented_format():
    vector = torch.tensor([7.0, -7.0, 0.0, 1.0, -3.0], dtype=torch.float32)
    payload = compress_int4(vector, chunk=6)
    assert float(payload.scales[0]) == 1.0
    # q + 8: (15, 1), (8, 9), (5, padding 8); element 2i in the low nibble.
    assert payload.packed.tolist() == [15 | 1 << 4, 8 | 9 << 4, 5 | 8 << 4]
    assert torch.equal(decompress_int4(payload), vector)
    zeros = compress_int4(torch.zeros(4), 4)
    assert zeros.scales.tolist() == [0.0] and torch.equal(decompress_int4(zeros), torch.zeros(4))


def test_int4_bytes_are_deterministic_across_processes_and_parse_back():
    vector = torch.arange(-500, 501, dtype=torch.float32) / 7
    data = payload_to_bytes(compress_int4(vector, 64))
    code = (
        "import torch; from gpunite.train.compression import *;"
        "v = torch.arange(-500, 501, dtype=torch.float32) / 7;"
        "print(payload_hash(payload_to_bytes(compress_int4(v, 64))))"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == payload_hash(data)
    parsed = payload_from_bytes(data, expected_numel=1001, chunk=64, max_bytes=len(data), method="int4")
    assert isinstance(parsed, Int4Payload)
    assert torch.equal(decompress(parsed), decompress_int4(compress_int4(vector, 64)))
    assert payload_hash(payload_to_bytes(parsed)) == payload_hash(data)


def test_hostile_int4_bytes_are_rejected_with_one_line_errors():
    good = payload_to_bytes(compress_int4(torch.randn(255), 64))  # 128 bytes, 4 scales
    with pytest.raises(TensorPayloadError, match="expected"):
        payload_from_bytes(good, expected_numel=257, chunk=64, method="int4")
    with pytest.raises(TensorPayloadError, match="names differ"):  # an int4 payload is not an int8 one
        payload_from_bytes(good, expected_numel=255, chunk=64, method="int8")
    with pytest.raises(TensorPayloadError, match="more than"):
        payload_from_bytes(good, expected_numel=255, chunk=64, max_bytes=100, method="int4")
    with pytest.raises(TensorPayloadError, match="not valid"):
        payload_from_bytes(good[:60], expected_numel=255, chunk=64, method="int4")
    packed = torch.full((128,), 8 | 8 << 4, dtype=torch.uint8)
    ones = torch.ones(4)

    def parse(packed: torch.Tensor, scales: torch.Tensor, numel: int = 255, chunk: int = 64):
        data = to_safetensors_bytes({"packed": packed, "scales": scales})
        return payload_from_bytes(data, expected_numel=numel, chunk=chunk, method="int4")

    assert torch.equal(decompress(parse(packed, ones)), torch.zeros(255))
    for bad in (float("inf"), float("nan")):
        with pytest.raises(TensorPayloadError, match="non-finite"):
            parse(packed, torch.tensor([1.0, bad, 1.0, 1.0]))
    with pytest.raises(TensorPayloadError, match="negative"):
        parse(packed, torch.tensor([1.0, -1.0, 1.0, 1.0]))
    for low_or_high in (0x80, 0x08):  # a nibble 0 stands for -8, which the quantizer never writes
        hostile = packed.clone()
        hostile[5] = low_or_high
        with pytest.raises(TensorPayloadError, match="nibble 0"):
            parse(hostile, ones)
    padding = packed.clone()
    padding[-1] = 8 | 9 << 4
    with pytest.raises(TensorPayloadError, match="padding"):
        parse(padding, ones)
    assert parse(padding, ones, numel=256).numel == 256  # with an even numel that nibble is a value
    with pytest.raises(TensorPayloadError, match="expected"):
        parse(packed.to(torch.int16), ones)
    with pytest.raises(TensorPayloadError, match="expected"):
        parse(packed[:127], ones)
    with pytest.raises(TensorPayloadError, match="even chunk"):
        compress_int4(torch.ones(10), 5)
    with pytest.raises(TensorPayloadError, match="even chunk"):
        parse(packed, torch.ones(3), chunk=85)


def test_int4_slices_repack_their_last_byte():
    torch.manual_seed(4)
    vector = torch.randn(1000)
    payload = compress_int4(vector, 64)
    whole = decompress_int4(payload)
    # A slice ending on an odd element gets a canonical padding nibble, so it parses back.
    piece = slice_payload(compress_int4(vector[:999], 64), 64, 999)
    assert piece.packed.numel() == 468 and int(piece.packed[-1]) >> 4 == 8
    parsed = payload_from_bytes(payload_to_bytes(piece), 935, 64, method="int4")
    assert torch.equal(decompress(parsed), decompress_int4(compress_int4(vector[:999], 64))[64:])
    assert torch.equal(decompress(slice_payload(payload, 128, 256)), whole[128:256])


def test_payload_method_names_every_compression_and_refuses_others():
    assert [payload_method(name) for name in COMPRESSIONS] == ["int8", "int4", "none"]
    with pytest.raises(TensorPayloadError, match="unknown compression 'int2'"):
        payload_method("int2")
    with pytest.raises(TensorPayloadError, match="unknown compression"):
        payload_from_bytes(b"", 0, 64, method="top-k")
