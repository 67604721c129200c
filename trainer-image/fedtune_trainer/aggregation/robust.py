"""Robust reductions: coordinate-wise median and trimmed mean, and Krum / Multi-Krum's selection
by pairwise distances (Blanchard et al., NeurIPS 2017), each over tensors stacked across clients
or distances streamed tensor by tensor, so that memory stays bounded by the adapter."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedtune_trainer.aggregation.intake import Accepted
from fedtune_trainer.wire.settings import AggregationSpec


def pairwise_distances(
    accepted: list[Accepted], shapes: Mapping[str, tuple[int, ...]]
) -> torch.Tensor:
    """Squared L2 distances between the (scaled) deltas, n x n, float64.

    Streams tensor by tensor: memory is one tensor of every client plus one pair's difference,
    never a whole delta per client, nor an n x n x values broadcast.
    """
    n = len(accepted)
    distances = torch.zeros(n, n, dtype=torch.float64)
    readers = [a.tensors() for a in accepted]
    for name in sorted(shapes):
        values = [tensor(name).double() for tensor in readers]
        for i in range(n):
            for j in range(i + 1, n):
                d = float((values[i] - values[j]).pow_(2).sum())
                distances[i, j] += d
                distances[j, i] += d
        del values
    return distances


def coordinate_median(stack: torch.Tensor) -> torch.Tensor:
    """Median over dim 0; the mean of the two middle values for an even count (as numpy)."""
    n = stack.size(0)
    ordered = stack.sort(dim=0).values
    if n % 2:
        return ordered[n // 2]
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def trimmed_mean(stack: torch.Tensor, trim_fraction: float) -> torch.Tensor:
    """Mean over dim 0 without the floor(trim_fraction * n) lowest and highest values."""
    n = stack.size(0)
    cut = math.floor(trim_fraction * n)
    ordered = stack.sort(dim=0).values
    return ordered[cut : n - cut].mean(dim=0)


def robust_reduce(stack: torch.Tensor, spec: AggregationSpec) -> torch.Tensor:
    """Reduce N clients' values of one tensor (stacked on dim 0) with a robust statistic."""
    stack = stack.double()
    if spec.algorithm == "median":
        return coordinate_median(stack).float()
    if spec.algorithm == "trimmedMean":
        return trimmed_mean(stack, spec.trim_fraction).float()
    raise ValueError(f"{spec.algorithm} is not a coordinate-wise algorithm")


def krum_scores(distances: torch.Tensor, f: int) -> list[float]:
    """Krum's score of each of n deltas: the sum of its squared distances to its n - f - 2
    nearest other deltas (`distances`: n x n squared distances, float64)."""
    n = distances.size(0)
    neighbours = n - f - 2
    if neighbours < 1:
        raise ValueError(f"krum needs more than f + 2 = {f + 2} deltas, got {n}")
    scores = []
    for i in range(n):
        others = torch.cat([distances[i, :i], distances[i, i + 1 :]])
        scores.append(float(others.sort().values[:neighbours].sum()))
    return scores


def krum_select(distances: torch.Tensor, f: int, m: int) -> list[int]:
    """The m deltas of lowest Krum score (m = 1: Krum; m > 1: Multi-Krum), in index order.

    Ties go to the lower index, so the choice is deterministic.
    """
    scores = krum_scores(distances, f)
    ranked = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return sorted(ranked[: max(1, min(m, len(scores)))])
