"""Privacy accounting of client-level DP, with Google's maintained `dp-accounting` library.

Each round is one Gaussian mechanism on the clipped clients' mean (noise std z * clipNorm / n,
aggregate.privatise) applied to the clients sampled that round. The accountant composes, over
the rounds, a Poisson-subsampled Gaussian with noise multiplier z and sampling rate
q = clientsPerRound / clients (a plain Gaussian when every client trains every round, q = 1),
and converts the Renyi-DP curve to epsilon at privacy.delta (add/remove-one-client adjacency).

The approximation, as in DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent
Language Models", ICLR 2018): the operator samples a fixed number of clients without
replacement, and the accounting treats it as Poisson sampling at the same rate. With q = 1 there
is no sampling and the accounting is exact for the mechanism as implemented.

Torch-free; dp_accounting (and so scipy) is imported only when epsilon is computed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from .errors import SettingError

Round = tuple[float, float]
"""One round's mechanism: (noise multiplier z, sampling rate q)."""


class BudgetError(SettingError):
    """The run would spend more epsilon than privacy.targetEpsilon allows (not retryable)."""


def sampling_rate(selected: int, clients: int) -> float:
    """q = clients sampled per round / all clients (1 when every client trains every round)."""
    if not 1 <= selected <= clients:
        raise ValueError(f"cannot sample {selected} of {clients} clients")
    return selected / clients


def epsilon(rounds: Sequence[Round], delta: float) -> float:
    """Epsilon at `delta` after composing `rounds` (inf when a round had no noise)."""
    from dp_accounting import dp_event, rdp

    if not rounds:
        return 0.0
    if any(z <= 0 for z, _ in rounds):
        return math.inf
    accountant = rdp.RdpAccountant()
    for (z, q), group in itertools.groupby(rounds):
        event: dp_event.DpEvent = dp_event.GaussianDpEvent(z)
        if q < 1:
            event = dp_event.PoissonSampledDpEvent(q, event)
        accountant.compose(event, sum(1 for _ in group))
    return float(accountant.get_epsilon(delta))


def check_budget(spent: float, target: float | None, what: str) -> None:
    """Raise BudgetError when `spent` exceeds the target (None: no budget set)."""
    if target is not None and spent > target:
        raise BudgetError(
            f"privacy.targetEpsilon: {what} spends epsilon {spent:.4g} at privacy.delta, "
            f"over the target {target:g}: raise privacy.noiseMultiplier, or lower "
            "spec.rounds or aggregation.clientsPerRound"
        )


def update_noise_multiplier(z: float, count_noise: float) -> float:
    """The delta's noise multiplier when the clipped count takes part of the budget.

    Andrew et al. (2021), Theorem 1: the count of clients under the clip norm, noised with std
    sigma_b, and the delta's sum, noised with multiplier z_delta, cost together as much as one
    Gaussian of multiplier z when z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2 (the count's bits are
    centred, so its sensitivity is 1/2). The accountant then composes z per round.
    """
    if z <= 0:
        return z
    rest = z**-2 - (2 * count_noise) ** -2 if count_noise > 0 else -1.0
    if rest <= 0:
        raise ValueError(f"countNoiseMultiplier {count_noise} must exceed noiseMultiplier / 2")
    return rest**-0.5


def next_clip_norm(
    clip: float, norms: Sequence[float], quantile: float, learning_rate: float, noise: float
) -> tuple[float, float]:
    """The fraction of clients within `clip` (with `noise`, a draw of the count's noise, added
    to the count) and the next round's clip: clip * exp(-eta (fraction - quantile)).

    Geometric, so the clip stays positive and moves by the same factor whatever its scale.
    """
    if not norms:
        return math.nan, clip
    fraction = (sum(1.0 for n in norms if n <= clip) + noise) / len(norms)
    return fraction, clip * math.exp(-learning_rate * (fraction - quantile))
