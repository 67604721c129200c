"""The math of one aggregation round, pure: validation, averaging, robust statistics, server
optimizers and client-level differential privacy. No storage, no clock.

Conventions: a client delta is `local - global` (a negative pseudo-gradient), so every server
rule *adds* its step to the global weights. Server optimizers follow Reddi et al., "Adaptive
Federated Optimization" (2021) and Hsu et al. (2019) for FedAvgM, with zero-initialised moments
and no bias correction (as in the paper and in Flower):

    fedavg / median / trimmedMean:  x += lr * d
    fedavgm:  m = momentum * m + d;                              x += lr * m
    fedadam:  m = b1 m + (1-b1) d;  v = b2 v + (1-b2) d^2;        x += lr * m / (sqrt(v) + eps)
    fedyogi:  m as fedadam;  v = v - (1-b2) d^2 sign(v - d^2);    x += lr * m / (sqrt(v) + eps)

where d is the round's aggregated delta.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .task import AggregationSpec

MEAN_ALGORITHMS = ("fedavg", "fedavgm", "fedadam", "fedyogi")
"""Algorithms that reduce the deltas to a weighted mean and so can stream client by client."""
ROBUST_ALGORITHMS = ("median", "trimmedMean")
"""Coordinate-wise statistics that need every client's value of a tensor at once."""


def l2_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all tensors taken together, in float64."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


def check_delta(
    delta: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    max_norm: float | None,
) -> str | None:
    """Why this delta must be rejected, or None when it is fit to merge."""
    missing = sorted(set(expected) - set(delta))
    extra = sorted(set(delta) - set(expected))
    if missing:
        return f"missing tensors: {', '.join(missing[:2])}" + (" ..." if len(missing) > 2 else "")
    if extra:
        return f"unknown tensors: {', '.join(extra[:2])}" + (" ..." if len(extra) > 2 else "")
    for name in sorted(expected):
        if tuple(delta[name].shape) != tuple(expected[name]):
            return f"shape of {name}: {tuple(delta[name].shape)} != {tuple(expected[name])}"
    for name in sorted(expected):
        if not bool(torch.isfinite(delta[name]).all()):
            return f"non-finite values (NaN or Inf) in {name}"
    if max_norm is not None:
        norm = l2_norm(delta)
        if norm > max_norm:
            return f"delta norm {norm:.4g} exceeds maxDeltaNorm {max_norm:.4g}"
    return None


def clip_factor(norm: float, clip_norm: float | None) -> float:
    """The scale that brings a delta of L2 norm `norm` within `clip_norm` (1 when it is within)."""
    if clip_norm is None or norm <= clip_norm:
        return 1.0
    return clip_norm / norm


@dataclass
class WeightedMean:
    """A streaming weighted mean: memory is one accumulator per tensor, whatever the client count.

    Accumulates in float64 so that the order clients arrive in does not change the result beyond
    the final fp32 rounding.
    """

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    total_weight: float = 0.0
    count: int = 0

    def add(self, delta: Mapping[str, torch.Tensor], weight: float) -> None:
        if weight <= 0 or not math.isfinite(weight):
            raise ValueError(f"weight must be positive and finite, got {weight}")
        for name, t in delta.items():
            acc = self.sums.get(name)
            if acc is None:
                self.sums[name] = t.double() * weight
            else:
                acc.add_(t.double(), alpha=weight)
        self.total_weight += weight
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        if self.count == 0:
            raise ValueError("no deltas to average")
        return {name: (s / self.total_weight).float() for name, s in self.sums.items()}


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


def gaussian_noise(shape: tuple[int, ...], std: float, generator: torch.Generator) -> torch.Tensor:
    """Seeded Gaussian noise (a rerun of the round draws the same noise)."""
    return torch.randn(shape, generator=generator, dtype=torch.float64).mul_(std).float()


def dp_noise_std(noise_multiplier: float, clip_norm: float | None, n_clients: int) -> float:
    """Std of the noise added to the mean of n clipped deltas (sensitivity clip_norm / n)."""
    if noise_multiplier <= 0 or clip_norm is None:
        return 0.0
    return noise_multiplier * clip_norm / n_clients


STATE_KEYS = {"fedavgm": ("m",), "fedadam": ("m", "v"), "fedyogi": ("m", "v")}


def server_step(
    spec: AggregationSpec,
    global_: Mapping[str, torch.Tensor],
    update: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor] | None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Apply the aggregated delta to the global tensors with the configured server rule.

    `state` holds tensors keyed `<m|v>/<tensor name>` (absent or None on the first round) and the
    new state is returned in the same form (empty for stateless rules). Tensors of `global_` that
    `update` does not name (e.g. frozen LoRA A) pass through unchanged.
    """
    algorithm, lr = spec.algorithm, spec.server_learning_rate
    state = state or {}
    new_global = {name: t.clone() for name, t in global_.items()}
    new_state: dict[str, torch.Tensor] = {}
    for name in sorted(update):
        d = update[name].double()
        x = global_[name].double()
        if algorithm in ("fedavg", *ROBUST_ALGORITHMS):
            x = x + lr * d
        elif algorithm == "fedavgm":
            m = state.get(f"m/{name}", torch.zeros_like(d)).double()
            m = spec.server_momentum * m + d
            x = x + lr * m
            new_state[f"m/{name}"] = m.float()
        elif algorithm in ("fedadam", "fedyogi"):
            m = state.get(f"m/{name}", torch.zeros_like(d)).double()
            v = state.get(f"v/{name}", torch.zeros_like(d)).double()
            m = spec.beta1 * m + (1 - spec.beta1) * d
            d2 = d * d
            if algorithm == "fedadam":
                v = spec.beta2 * v + (1 - spec.beta2) * d2
            else:
                v = v - (1 - spec.beta2) * d2 * torch.sign(v - d2)
            x = x + lr * m / (v.sqrt() + spec.epsilon)
            new_state[f"m/{name}"] = m.float()
            new_state[f"v/{name}"] = v.float()
        else:
            raise ValueError(f"unknown algorithm {algorithm!r}")
        new_global[name] = x.to(global_[name].dtype)
    return new_global, new_state
