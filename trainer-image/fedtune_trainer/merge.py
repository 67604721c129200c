"""The math of one aggregation round, pure: validation, averaging, robust statistics, server
optimizers and client-level differential privacy. No storage, no clock.

Conventions: a client delta is `local - global` (a negative pseudo-gradient), so every server
rule *adds* its step to the global weights. Server optimizers follow Reddi et al., "Adaptive
Federated Optimization" (2021) and Hsu et al. (2019) for FedAvgM, with zero-initialised moments
and no bias correction (as in the paper and in Flower):

    fedavg / median / trimmedMean / krum / multiKrum:  x += lr * d
    fedavgm:  m = momentum * m + d;                              x += lr * m
    fedadam:  m = b1 m + (1-b1) d;  v = b2 v + (1-b2) d^2;        x += lr * m / (sqrt(v) + eps)
    fedyogi:  m as fedadam;  v = v - (1-b2) d^2 sign(v - d^2);    x += lr * m / (sqrt(v) + eps)

where d is the round's aggregated delta.

Bounded influence, before any of that: a client's weight in the mean is its sample count (or 1
with uniform weighting) times its configured weight, capped at `maxClientShare` of the round's
total (`capped_weights`); a delta whose norm is more than `outlierNormFactor` times the round's
median norm is scaled down to that (`outlier_bound`); Krum and Multi-Krum (Blanchard et al.,
"Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017) pick the
deltas closest to their neighbours. And nothing non-finite leaves a round (`check_finite`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .task import AggregationSpec

MEAN_ALGORITHMS = ("fedavg", "fedavgm", "fedadam", "fedyogi")
"""Algorithms that reduce the deltas to a weighted mean and so can stream client by client."""
ROBUST_ALGORITHMS = ("median", "trimmedMean")
"""Coordinate-wise statistics that need every client's value of a tensor at once."""
KRUM_ALGORITHMS = ("krum", "multiKrum")
"""Select whole deltas by their distances to the others, then average the selected ones."""
STATELESS_ALGORITHMS = ("fedavg", *ROBUST_ALGORITHMS, *KRUM_ALGORITHMS)


class NonFiniteError(FloatingPointError):
    """A round's result holds NaN or Inf; nothing may be committed.

    Not an input error (the CLI maps it to the retryable exit code): the same deltas can give a
    finite result once a client re-sends, or the settings change, and the retry must be free to
    try, which it is because nothing of this attempt was written.
    """


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise NonFiniteError naming the first tensor of `tensors` with a NaN or an Inf.

    `what` starts the message: "round 3: the global adapter has" reads "... has 2 non-finite".
    """
    for name in sorted(tensors):
        t = tensors[name]
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteError(
                f"{what} {bad} non-finite values (NaN or Inf) in {name}; nothing committed"
            )


def l2_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all tensors taken together, in float64."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


def checked_norm(
    tensor: Callable[[str], torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    max_norm: float | None,
    each: Callable[[str, torch.Tensor], None] | None = None,
) -> float:
    """The L2 norm of a delta read tensor by tensor through `tensor`, checked as it goes.

    One tensor is in memory at a time (the aggregator's bound is the adapter, not a client's
    delta on top of it); `each` sees every tensor that passed its own checks, so that a caller
    can use the one decode for more than the norm. Raises ValueError with the reason a delta
    must be rejected: a wrong shape, a NaN or Inf, a norm above `max_norm`. The names are the
    caller's to check (the layout check has matched them to the adapter before anything was
    decoded).
    """
    squares = 0.0
    for name in sorted(expected):
        t = tensor(name)
        if tuple(t.shape) != tuple(expected[name]):
            raise ValueError(f"shape of {name}: {tuple(t.shape)} != {tuple(expected[name])}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"non-finite values (NaN or Inf) in {name}")
        squares += float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2
        if each is not None:
            each(name, t)
        del t
    norm = math.sqrt(squares)
    if max_norm is not None and norm > max_norm:
        raise ValueError(f"delta norm {norm:.4g} exceeds maxDeltaNorm {max_norm:.4g}")
    return norm


MAX_SAMPLES = 10**9
"""More records than any client can tokenise in a round; a larger count is a lie or a bug."""


def sample_count(value: object, limit: int | None = None) -> int:
    """A reported sample count, validated as an int in [1, limit] *before* any float maths.

    JSON gives Python ints of any size (10^309 overflows float()), and true/"12" are not counts.
    """
    if type(value) is not int:
        raise ValueError(f"bad sample count {str(value)[:40]!r}: not an integer")
    top = min(MAX_SAMPLES, limit) if limit is not None else MAX_SAMPLES
    if not 1 <= value <= top:
        shown = str(value) if len(str(value)) <= 20 else f"~10^{len(str(value)) - 1}"
        raise ValueError(f"bad sample count {shown}: outside [1, {top}]")
    return value


def capped_weights(weights: Sequence[float], max_share: float) -> tuple[list[float], float]:
    """Weights in which none is more than `max_share` of the total, and the cap applied.

    Water-filling: a weight above the cap is lowered to exactly the cap's share of the new total,
    the others keep theirs, and this repeats until no weight is above (lowering one raises every
    other's share). The cap applied is max(max_share, 1/n): n clients cannot all have less than
    1/n. A share of 1 (or a single client) changes nothing.
    """
    n = len(weights)
    if n == 0:
        return [], max_share
    for w in weights:
        if not (w > 0 and math.isfinite(w)):
            raise ValueError(f"weight must be positive and finite, got {w}")
    cap = max(max_share, 1.0 / n)
    if cap >= 1.0:
        return list(weights), 1.0
    capped: set[int] = set()
    while True:
        free = sum(w for i, w in enumerate(weights) if i not in capped)
        room = 1.0 - cap * len(capped)  # the share left to the uncapped weights
        if len(capped) == n or room <= 0 or free <= 0:
            return [1.0] * n, cap  # everyone at the cap: uniform
        level = cap * free / room  # a weight with exactly `cap` of the new total
        over = {i for i, w in enumerate(weights) if i not in capped and w > level * (1 + 1e-12)}
        if not over:
            return [level if i in capped else w for i, w in enumerate(weights)], cap
        capped |= over


def lower_median(values: Sequence[float]) -> float:
    """The ceil(n/2)-th smallest value: with two clients the smaller one, never an average, so
    one huge value cannot raise the median of two."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def outlier_bound(norms: Sequence[float], factor: float | None) -> float | None:
    """The largest norm a delta may keep this round: factor times the lower median of the norms.

    None (no bound) when the rule is off or with a single client (nothing to compare with).
    """
    if factor is None or len(norms) < 2:
        return None
    return factor * lower_median(norms)


def clip_factor(norm: float, clip_norm: float | None) -> float:
    """The scale that brings a delta of L2 norm `norm` within `clip_norm` (1 when it is within)."""
    if clip_norm is None or norm <= clip_norm:
        return 1.0
    return clip_norm / norm


def check_weight(weight: float) -> None:
    """A client's weight in a mean must be positive and finite."""
    if weight <= 0 or not math.isfinite(weight):
        raise ValueError(f"weight must be positive and finite, got {weight}")


@dataclass
class WeightedMean:
    """A streaming weighted mean: memory is one float64 accumulator per tensor (2x the adapter's
    fp32 size), whatever the number of clients.

    Accumulates in float64 so that the order clients arrive in does not change the result beyond
    the final fp32 rounding.
    """

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    total_weight: float = 0.0
    count: int = 0

    def add(self, delta: Mapping[str, torch.Tensor], weight: float, scale: float = 1.0) -> None:
        """Add `weight * scale * delta`; the mean divides by the sum of the weights alone.

        `scale` is a clip: it shrinks a delta, not its client's say in the mean. `delta` may be
        lazy (each tensor decoded when it is read): it is read once, in name order, and each
        tensor is folded in place into its float64 sum, so one decoded tensor is held at a time.
        """
        check_weight(weight)
        for name in sorted(delta):
            self.add_tensor(name, delta[name], weight * scale)
        self.count_client(weight)

    def add_tensor(self, name: str, t: torch.Tensor, factor: float) -> None:
        """Fold `factor * t` into the sum of `name` (one tensor of a client's delta)."""
        acc = self.sums.get(name)
        if acc is None:
            self.sums[name] = t.to(torch.float64).mul_(factor)
        else:
            acc.add_(t, alpha=factor)

    def count_client(self, weight: float) -> None:
        """Count a client whose tensors were all folded in, with its `weight` in the divisor."""
        self.total_weight += weight
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        """The mean, fp32. Consumes the sums tensor by tensor, so that the float64 sums and the
        fp32 result are never both held whole: call it once."""
        if self.count == 0:
            raise ValueError("no deltas to average")
        return {
            name: self.sums.pop(name).div_(self.total_weight).float() for name in sorted(self.sums)
        }


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


def gaussian_noise(shape: tuple[int, ...], std: float, generator: torch.Generator) -> torch.Tensor:
    """Seeded Gaussian noise (a rerun of the round draws the same noise)."""
    return torch.randn(shape, generator=generator, dtype=torch.float64).mul_(std).float()


def dp_noise_std(noise_multiplier: float, clip_norm: float | None, n_clients: int) -> float:
    """Std of the noise added to the mean of n clipped deltas (sensitivity clip_norm / n)."""
    if noise_multiplier <= 0 or clip_norm is None:
        return 0.0
    return noise_multiplier * clip_norm / n_clients


STATE_KEYS = {"fedavgm": ("m",), "fedadam": ("m", "v"), "fedyogi": ("m", "v")}


def _moment(state: Mapping[str, torch.Tensor], key: str, like: torch.Tensor) -> torch.Tensor:
    """A moment as a float64 copy that the step may update in place (zeros the first time)."""
    if key in state:
        return state[key].to(torch.float64, copy=True)
    return torch.zeros_like(like)


def server_step_tensor(
    spec: AggregationSpec,
    x: torch.Tensor,
    d: torch.Tensor,
    state: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One tensor's server step: its global value `x`, aggregated delta `d` and its moments
    (`state` keyed "m"/"v", empty on the first round) -> its new value and moments.

    Per tensor so that the aggregator can free each input as its output is made: the server
    step then holds one tensor's float64 temporaries beyond the adapter, not a second adapter.
    """
    algorithm, lr = spec.algorithm, spec.server_learning_rate
    dd, xx = d.double(), x.to(torch.float64, copy=True)
    new_state: dict[str, torch.Tensor] = {}
    if algorithm in STATELESS_ALGORITHMS:
        xx = xx.add_(dd, alpha=lr)
    elif algorithm == "fedavgm":
        m = _moment(state, "m", dd)
        m = m.mul_(spec.server_momentum).add_(dd)
        xx = xx.add_(m, alpha=lr)
        new_state["m"] = m.float()
    elif algorithm in ("fedadam", "fedyogi"):
        m, v = _moment(state, "m", dd), _moment(state, "v", dd)
        m = m.mul_(spec.beta1).add_(dd, alpha=1 - spec.beta1)
        d2 = dd * dd
        if algorithm == "fedadam":
            v = v.mul_(spec.beta2).add_(d2, alpha=1 - spec.beta2)
        else:
            v = v - (1 - spec.beta2) * d2 * torch.sign(v - d2)
        xx = xx + lr * m / (v.sqrt() + spec.epsilon)
        new_state["m"] = m.float()
        new_state["v"] = v.float()
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}")
    return xx.to(x.dtype), new_state


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
    state = state or {}
    new_global = dict(global_)
    new_state: dict[str, torch.Tensor] = {}
    for name in sorted(update):
        own = {k: state[f"{k}/{name}"] for k in ("m", "v") if f"{k}/{name}" in state}
        new_global[name], moments = server_step_tensor(spec, global_[name], update[name], own)
        new_state.update({f"{k}/{name}": t for k, t in moments.items()})
    return new_global, new_state
