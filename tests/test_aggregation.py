import random

import pytest
import torch

from gpunite.swarm.aggregation import (
    AggregationError, clip_factors, contribution_norm, robust_aggregate, slice_bounds, trim_count,
)


def test_slice_bounds_cover_contiguously_on_chunk_boundaries():
    for numel, n, chunk in [(1000, 3, 64), (64, 1, 64), (10, 4, 64), (4096 * 7 + 5, 5, 4096), (0, 2, 8)]:
        bounds = slice_bounds(numel, n, chunk)
        assert len(bounds) == n
        assert bounds[0][0] == 0 and bounds[-1][1] == numel
        for (s0, e0), (s1, _) in zip(bounds, bounds[1:]):
            assert e0 == s1
        for start, end in bounds:
            assert start <= end and all(x % chunk == 0 or x == numel for x in (start, end))
    assert slice_bounds(1000, 3, 64) == [(0, 384), (384, 704), (704, 1000)]
    assert slice_bounds(10, 3, 64) == [(0, 10), (10, 10), (10, 10)]
    with pytest.raises(AggregationError):
        slice_bounds(10, 0, 64)


def test_clip_factors_bound_norms_to_ratio_times_median():
    assert clip_factors([1.0, 1.0, 1.0, 100.0], 2.0) == [1.0, 1.0, 1.0, 0.02]
    assert clip_factors([3.0, 0.0], 2.0) == [0.0, 1.0]  # the lower median bounds the larger of two
    assert clip_factors([], 2.0) == []
    with pytest.raises(AggregationError):
        clip_factors([float("nan")], 2.0)


def test_trim_count():
    assert [trim_count(n, 0.2) for n in (1, 2, 3, 4, 5, 10, 11)] == [0, 0, 1, 1, 1, 2, 2]
    assert trim_count(10, 0.0) == 0


def test_methods_by_hand():
    slices = [torch.tensor([1.0, 10.0]), torch.tensor([2.0, 20.0]), torch.tensor([3.0, -30.0]),
              torch.tensor([100.0, 0.0])]
    ones = [1.0] * 4
    assert robust_aggregate(slices, ones, "mean").tolist() == [26.5, 0.0]
    assert robust_aggregate(slices, ones, "median").tolist() == [2.5, 5.0]
    assert robust_aggregate(slices, ones, "trimmed_mean", 0.2).tolist() == [2.5, 5.0]
    assert robust_aggregate(slices[:1], [0.5], "trimmed_mean").tolist() == [0.5, 5.0]
    with pytest.raises(AggregationError, match="unknown"):
        robust_aggregate(slices, ones, "max")
    with pytest.raises(AggregationError, match="clip factors"):
        robust_aggregate(slices, [1.0], "mean")


def test_result_does_not_depend_on_arrival_order():
    torch.manual_seed(0)
    slices = [torch.randn(5000) * (i + 1) for i in range(7)]
    factors = clip_factors([contribution_norm(s) for s in slices], 2.0)
    for method in ("trimmed_mean", "median", "mean"):
        expected = robust_aggregate(slices, factors, method)
        order = list(range(7))
        for seed in range(3):
            random.Random(seed).shuffle(order)
            got = robust_aggregate([slices[i] for i in order], [factors[i] for i in order], method)
            assert torch.equal(got, expected)


@pytest.mark.parametrize("attack", ["huge", "sign_flip_x100"])
@pytest.mark.parametrize("method", ["trimmed_mean", "median"])
def test_one_hostile_contribution_moves_the_result_a_bounded_amount(attack, method):
    torch.manual_seed(1)
    direction = torch.randn(4096)
    honest = [direction + 0.3 * torch.randn(4096) for _ in range(4)]
    hostile = direction * 1e6 if attack == "huge" else -100 * honest[0]

    def merge(contribs):
        factors = clip_factors([contribution_norm(c) for c in contribs], 2.0)
        return robust_aggregate(contribs, factors, method, 0.2)

    clean = merge(honest)
    attacked = merge(honest + [hostile])
    honest_norm = contribution_norm(clean)
    # The attacker moves the merged update by less than the size of an honest update...
    assert contribution_norm(attacked - clean) < 0.5 * honest_norm
    # ...and the merge still points the honest way.
    assert float(torch.nn.functional.cosine_similarity(attacked, clean, dim=0)) > 0.9
    # Without robustness the same attack wrecks the plain mean.
    plain = robust_aggregate(honest + [hostile], [1.0] * 5, "mean")
    assert contribution_norm(plain - clean) > 10 * honest_norm
