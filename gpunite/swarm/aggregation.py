"""Robust, deterministic merging of pseudo-gradient slices: bounds, norm clipping, trimmed mean / median.

Sharded aggregation: the flat parameter vector is cut into one contiguous, chunk-aligned slice per
aggregating peer (`slice_bounds`); each peer receives that slice of every contribution, merges it here and
serves the result.

Robustness: each contribution is first scaled down to at most `clip_ratio` x the median norm (`clip_factors`),
then merged coordinate by coordinate with a trimmed mean or a median, so a single hostile contribution can
move no coordinate by more than a bounded amount.

Determinism: the result depends only on the multiset of (slice, factor) pairs, never on the order they
arrived: each coordinate's values are sorted before they are summed, and sums run in that sorted order with
separate, correctly-rounded adds. Two aggregators on different IEEE hardware give bitwise equal results.
"""

from __future__ import annotations

import math

import torch

from gpunite.errors import GpuniteError

METHODS = ("trimmed_mean", "median", "mean")


class AggregationError(GpuniteError, ValueError):
    """Inputs to an aggregation that do not fit together (a caller's bug or a bad manifest value)."""


def slice_bounds(numel: int, n_slices: int, chunk: int) -> list[tuple[int, int]]:
    """n_slices contiguous ranges covering [0, numel), each whole chunks (the last may end at numel).

    Chunks are shared out as evenly as possible, earlier slices taking one extra; when there are more slices
    than chunks the trailing slices are empty (start == end), so slice i always belongs to peer i.
    """
    if numel < 0 or n_slices <= 0 or chunk <= 0:
        raise AggregationError(
            f"slice_bounds needs numel >= 0, n_slices > 0, chunk > 0; got {numel}, {n_slices}, {chunk}"
        )
    chunks = -(-numel // chunk)
    per_slice, extra = divmod(chunks, n_slices)
    bounds: list[tuple[int, int]] = []
    start_chunk = 0
    for i in range(n_slices):
        end_chunk = start_chunk + per_slice + (1 if i < extra else 0)
        bounds.append((min(start_chunk * chunk, numel), min(end_chunk * chunk, numel)))
        start_chunk = end_chunk
    return bounds


def contribution_norm(vector: torch.Tensor) -> float:
    """L2 norm, summed in float64 and rounded to float32, so aggregators on different hardware agree on it."""
    norm64 = float(torch.linalg.vector_norm(vector.detach().to(torch.float64)))
    return float(torch.tensor(norm64, dtype=torch.float32))


def lower_median(values: list[float]) -> float:
    """The lower middle value: with two contributions, the smaller one bounds the other."""
    if not values:
        raise AggregationError("median of no values")
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def clip_factors(norms: list[float], clip_ratio: float) -> list[float]:
    """Per contribution, the factor (<= 1) bringing its norm down to at most clip_ratio x the median norm."""
    if clip_ratio <= 0:
        raise AggregationError(f"clip_ratio must be > 0, got {clip_ratio}")
    if any(not math.isfinite(n) or n < 0 for n in norms):
        raise AggregationError("norms must be finite and >= 0")
    if not norms:
        return []
    limit = clip_ratio * lower_median(norms)
    return [1.0 if norm <= limit else limit / norm for norm in norms]


def trim_count(n: int, trim_fraction: float) -> int:
    """Values dropped per side: floor(trim_fraction * n), but at least one when n >= 3 and trimming is on.

    The floor alone trims nothing below 5 contributions at 0.2; a small swarm is where a lone hostile peer
    matters most, so with 3 or 4 contributions one value per side still goes. With n < 3 nothing is trimmed.
    """
    if not 0 <= trim_fraction < 0.5:
        raise AggregationError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    if n < 3 or trim_fraction == 0:
        return 0
    return max(1, math.floor(trim_fraction * n))


def _sum_rows(rows: torch.Tensor) -> torch.Tensor:
    total = rows[0].clone()
    for row in rows[1:]:
        total = torch.add(total, row)
    return total


def robust_aggregate(
    slices: list[torch.Tensor], factors: list[float], method: str = "trimmed_mean", trim_fraction: float = 0.2
) -> torch.Tensor:
    """Coordinate-wise merge of the clipped slices (fp32, same length) into one fp32 slice.

    trimmed_mean: drop the `trim_count` largest and smallest values of each coordinate, average the rest.
    median: the middle value (mean of the two middle ones for an even count). mean: the plain average.
    """
    if method not in METHODS:
        raise AggregationError(f"unknown aggregation {method!r}; choose one of {', '.join(METHODS)}")
    if not slices:
        raise AggregationError("nothing to aggregate: no contributions")
    if len(factors) != len(slices):
        raise AggregationError(f"{len(slices)} slices but {len(factors)} clip factors")
    numel = slices[0].numel()
    for s in slices:
        if s.dim() != 1 or s.dtype != torch.float32 or s.numel() != numel:
            raise AggregationError(
                f"slices must be 1-D fp32 of {numel} elements, got {tuple(s.shape)} {s.dtype}"
            )
    scaled = [
        s.detach().to("cpu") if factor == 1.0 else torch.mul(s.detach().to("cpu"), torch.tensor(factor))
        for s, factor in zip(slices, factors)
    ]
    ordered = torch.sort(torch.stack(scaled), dim=0).values
    n = len(slices)
    if method == "median":
        middle = (n - 1) // 2
        if n % 2:
            return ordered[middle].clone()
        return torch.div(torch.add(ordered[middle], ordered[middle + 1]), torch.tensor(2.0))
    trim = trim_count(n, trim_fraction) if method == "trimmed_mean" else 0
    kept = ordered[trim : n - trim]
    return torch.div(_sum_rows(kept), torch.tensor(float(kept.shape[0])))
