import pytest
import torch

from gpunite.train.weights import (
    TensorPayloadError, flatten, from_safetensors_bytes, to_safetensors_bytes, unflatten_into, weights_hash,
)


def test_hash_changes_with_any_bit():
    a = {"w": torch.zeros(4), "b": torch.ones(2)}
    b = {"w": torch.zeros(4), "b": torch.ones(2)}
    assert weights_hash(a) == weights_hash(b)
    b["w"][2] = 1e-30
    assert weights_hash(a) != weights_hash(b)


def test_flatten_round_trip():
    tensors = [torch.randn(3, 4), torch.randn(5)]
    vector = flatten(tensors)
    targets = [torch.zeros(3, 4), torch.zeros(5)]
    unflatten_into(vector, targets)
    assert all(torch.equal(x, y) for x, y in zip(tensors, targets))


def test_untrusted_payloads_are_checked():
    good = to_safetensors_bytes({"w": torch.ones(2, 2)})
    expected = {"w": ((2, 2), torch.float32)}
    assert torch.equal(from_safetensors_bytes(good, expected)["w"], torch.ones(2, 2))
    with pytest.raises(TensorPayloadError, match="expected"):
        from_safetensors_bytes(to_safetensors_bytes({"w": torch.ones(3)}), expected)
    with pytest.raises(TensorPayloadError, match="non-finite"):
        from_safetensors_bytes(to_safetensors_bytes({"w": torch.full((2, 2), float("nan"))}), expected)
    with pytest.raises(TensorPayloadError, match="not valid"):
        from_safetensors_bytes(b"garbage" * 10, expected)
    with pytest.raises(TensorPayloadError, match="more than"):
        from_safetensors_bytes(good, expected, max_bytes=10)


def test_hash_handles_scalars():
    assert weights_hash({"step": torch.tensor(3.0)}) != weights_hash({"step": torch.tensor(4.0)})


def test_hash_is_sha256_of_names_dtypes_shapes_and_bytes():
    """The hash peers compare is defined by the bytes, whatever the tensors' dtype or layout in memory."""
    import hashlib

    tensors = {"m": torch.arange(24, dtype=torch.float32).reshape(4, 6).t(), "h": torch.randn(5).to(torch.bfloat16),
               "empty": torch.zeros(0, 3)}
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(name.encode() + str(t.dtype).encode() + repr(tuple(t.shape)).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    assert weights_hash(tensors) == digest.hexdigest()
    same_bytes = tensors["m"].contiguous()
    assert weights_hash({"m": same_bytes}) != weights_hash({"m": same_bytes.reshape(-1)})  # the shape counts too
