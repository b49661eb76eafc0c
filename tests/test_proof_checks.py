"""Each cheap check fires on its cheat, blames only what the signed data proves, and passes honest work."""

from __future__ import annotations

import hashlib

import pytest
import torch

from gpunite.identity import Identity
from gpunite.proof.checks import (
    RoundContext,
    check_contribution,
    check_delta,
    check_round,
    check_slice,
)
from gpunite.records import Contribution, WorkUnit, sign_record
from gpunite.train.compression import compress_int8, payload_hash, payload_to_bytes, slice_payload
from gpunite.train.weights import to_safetensors_bytes

NUMEL, CHUNK, BATCH, SEQ, K, FPT = 1000, 256, 2, 8, 2, 1234
SLICES = [(0, 512), (512, 1000)]
RUN, BASE = "1" * 64, "2" * 64
SHARD = "3" * 64


def _units(slot: int) -> list[WorkUnit]:
    return [WorkUnit(shard=SHARD, first=slot * 8, count=8)]


PEERS = [Identity.from_seed(f"peer-{i}".encode()) for i in range(4)]
CTX = RoundContext(run_id=RUN, round=5, base_hash=BASE, batch_size=BATCH, seq_len=SEQ, trail_interval=K,
                   flops_per_token=FPT, norm_bound=3.0,
                   assigned={p.peer_id: _units(i) for i, p in enumerate(PEERS)})


def _delta(seed: int, scale: float = 1.0) -> tuple[bytes, float]:
    vector = torch.randn(NUMEL, generator=torch.Generator().manual_seed(seed)) * scale
    payload = compress_int8(vector, CHUNK)
    data = payload_to_bytes(payload)
    from gpunite.train.compression import decompress_int8

    return data, float(torch.linalg.vector_norm(decompress_int8(payload).double()))


def _contribution(peer: int, seed: int | None = None, **changes) -> tuple[Contribution, bytes]:
    seed = peer if seed is None else seed
    data, norm = _delta(seed, changes.pop("scale", 1.0))
    from gpunite.train.compression import payload_from_bytes

    payload = payload_from_bytes(data, NUMEL, CHUNK)
    trail = [hashlib.sha256(f"{seed}-{i}".encode()).hexdigest() for i in range(3)]
    fields = {
        "run_id": RUN, "round": 5, "base_hash": BASE, "work_units": _units(peer), "inner_steps": 4,
        "tokens": 4 * BATCH * SEQ, "trail_interval": K, "trail": trail, "delta_hash": payload_hash(data),
        "slice_hashes": [payload_hash(payload_to_bytes(slice_payload(payload, lo, hi))) for lo, hi in SLICES],
        "delta_norm": norm, "claimed_flops": float(FPT * 4 * BATCH * SEQ), "time": 1.0,
    }
    fields.update(changes)
    return sign_record(PEERS[peer], Contribution(**fields)), data


def _reasons(findings):
    return [(f.reason, f.cheat, f.blocking) for f in findings]


def test_honest_contribution_passes_every_check():
    contribution, data = _contribution(0)
    assert check_contribution(contribution, CTX) == []
    findings, vector = check_delta(contribution, data, NUMEL, CHUNK, "int8", SLICES)
    assert findings == [] and vector is not None
    assert check_slice(contribution, 1, payload_to_bytes(slice_payload(compress_int8(
        torch.randn(NUMEL, generator=torch.Generator().manual_seed(0)), CHUNK), 512, 1000))) == []
    honest = [_contribution(i)[0] for i in range(4)]
    assert all(v == [] for v in check_round(honest, CTX).values())
    # Fewer steps than the units allow (a remainder smaller than a batch) is honest partial work.
    partial, _ = _contribution(0, inner_steps=3, tokens=3 * BATCH * SEQ, claimed_flops=float(FPT * 3 * BATCH * SEQ))
    assert check_contribution(partial, CTX) == []


@pytest.mark.parametrize("changes, cheat", [
    ({"run_id": "9" * 64}, False),
    ({"round": 4}, False),
    ({"base_hash": "8" * 64}, False),
    ({"work_units": _units(2)}, False),
    ({"trail_interval": 3}, False),
    ({"tokens": 4 * BATCH * SEQ * 2}, True),
    ({"inner_steps": 8, "tokens": 8 * BATCH * SEQ, "claimed_flops": float(FPT * 8 * BATCH * SEQ)}, True),
    ({"claimed_flops": float(FPT * 4 * BATCH * SEQ) * 1.5}, True),
    ({"trail": ["7" * 64] * 2}, True),
])
def test_each_record_check_fires(changes, cheat):
    contribution, _ = _contribution(0, **changes)
    findings = check_contribution(contribution, CTX)
    assert findings, changes
    assert any(f.cheat == cheat and f.blocking for f in findings), _reasons(findings)
    if not cheat:
        assert not any(f.cheat for f in findings)


def test_replayed_old_delta_is_a_proven_cheat():
    contribution, _ = _contribution(0)
    ctx = RoundContext(**{**CTX.__dict__, "earlier_deltas": frozenset({contribution.delta_hash})})
    assert any(f.cheat and "earlier round" in f.reason for f in check_contribution(contribution, ctx))


def test_delta_checks():
    contribution, data = _contribution(0)
    other, _ = _delta(99)
    findings, vector = check_delta(contribution, other, NUMEL, CHUNK)
    assert vector is None and not findings[0].cheat  # bytes that are not the committed ones: transport, not proof

    lying_norm, data = _contribution(0, delta_norm=123.0)
    assert any(f.cheat for f in check_delta(lying_norm, data, NUMEL, CHUNK)[0])

    bad_slices, data = _contribution(0, slice_hashes=["6" * 64, "5" * 64])
    assert any(f.cheat and "slice" in f.reason for f in check_delta(bad_slices, data, NUMEL, CHUNK, "int8", SLICES)[0])
    assert check_slice(bad_slices, 0, b"junk")[0].cheat is False

    nan_bytes = to_safetensors_bytes({"q": torch.zeros(NUMEL, dtype=torch.int8),
                                      "scales": torch.full((4,), float("nan"))})
    signed_nan, _ = _contribution(0, delta_hash=payload_hash(nan_bytes))
    findings, vector = check_delta(signed_nan, nan_bytes, NUMEL, CHUNK)
    assert vector is None and findings[0].cheat  # garbage behind a signed hash is the signer's


def test_round_checks_norm_bound_copies_and_equivocation():
    honest = [_contribution(i)[0] for i in range(3)]
    poisoned, _ = _contribution(3, scale=10.0)
    findings = check_round([*honest, poisoned], CTX)
    assert any("median" in f.reason and f.blocking and not f.cheat for f in findings[poisoned.record_id])

    copy = sign_record(PEERS[3], Contribution(**{**honest[0].body(), "work_units": _units(3)}))
    findings = check_round([*honest, copy], CTX)
    for contribution in (honest[0], copy):
        assert [(f.cheat, f.blocking) for f in findings[contribution.record_id]] == [(False, False)]
    assert findings[honest[1].record_id] == []

    second, _ = _contribution(1, seed=42)
    findings = check_round([*honest, second], CTX)
    assert all(any(f.cheat and "signed 2" in f.reason for f in findings[c.record_id]) for c in (honest[1], second))
