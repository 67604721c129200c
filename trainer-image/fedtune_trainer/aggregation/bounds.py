"""What a delta must pass, and how much one client may weigh, in an aggregation round. Pure.

Checks: a reported sample count is an integer in range before any float maths (`sample_count`);
a delta's tensors have the adapter's shapes, are finite and stay under maxDeltaNorm
(`checked_norm`, one tensor in memory at a time); nothing non-finite leaves a round
(`check_finite`).

Bounded influence: a client's weight in the mean is its sample count (or 1 with uniform
weighting) times its configured weight, capped at `maxClientShare` of the round's total, twice
a fair share by default (`share_cap`, `capped_weights`); a delta whose norm is more than
`outlierNormFactor` times the round's median norm is rejected, and one more than
`outlierClipFactor` times it is scaled down to that (`outlier_bound`, `clip_factor`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch


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


def share_cap(max_share: float | None, clients: int) -> float:
    """The most of a round's weight one client may have: `max_share`, or by default twice a fair
    share of the round's `clients` (so a lie about samples buys at most double; no cap with two
    or fewer)."""
    if max_share is not None:
        return max_share
    return min(1.0, 2.0 / max(1, clients))


def lower_median(values: Sequence[float]) -> float:
    """The ceil(n/2)-th smallest value: with two clients the smaller one, never an average, so
    one huge value cannot raise the median of two."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def outlier_bound(
    norms: Sequence[float], factor: float | None, min_clients: int = 2
) -> float | None:
    """`factor` times the lower median of the round's norms: the largest norm a delta may keep
    (the clip, from 2 clients) or have at all (the rejection, from 3, so that the median is not
    the suspect's own).

    None (no bound) when the rule is off or with fewer clients than it needs.
    """
    if factor is None or len(norms) < min_clients:
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
