"""Client-level differential privacy in the aggregator: the noise, the accountant, adaptive
clipping, and their state in storage. One module, so that one reading shows what is guaranteed.

The mechanism (`privatise`): Gaussian noise of std z * clipNorm / n on the mean of the clipped
deltas, with uniform weights, so that one client's influence (the sensitivity) is clipNorm / n.

The accountant (`epsilon`), Google's maintained `dp-accounting` library: each round is one
Gaussian mechanism applied to the clients sampled that round, composed over the rounds as a
Poisson-subsampled Gaussian with noise multiplier z and sampling rate q = clientsPerRound /
clients (a plain Gaussian when every client trains every round), the Renyi-DP curve converted to
epsilon at privacy.delta (add/remove-one-client adjacency). The approximation is DP-FedAvg's
(McMahan et al., ICLR 2018): the operator samples a fixed number of clients without replacement
and the accounting treats it as Poisson sampling at the same rate; with q = 1 it is exact.
dp_accounting (and so scipy) is imported only when epsilon is computed.

Adaptive clipping (Andrew et al., NeurIPS 2021): the clip norm moves each round geometrically
toward a quantile of the clients' norms; the round's norm and its update are versioned state
(`round_clip`, `adapt_clip`), and epsilon is checked against privacy.targetEpsilon before round 0
for the whole configured run and after every round for the rounds so far (`account`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence

import torch

from fedtune_trainer.aggregation.bounds import clip_factor, l2_norm
from fedtune_trainer.aggregation.intake import (
    Accepted,
)
from fedtune_trainer.report import read_records
from fedtune_trainer.storage import store as st
from fedtune_trainer.wire.contract import NOISE_KEY_ENV
from fedtune_trainer.wire.errors import SettingError
from fedtune_trainer.wire.layout import (
    CLIP_STATE_PREFIX,
)
from fedtune_trainer.wire.results import RoundRecord
from fedtune_trainer.wire.settings import LocalPrivacy
from fedtune_trainer.wire.task import AggregateTask


def privatise(task: AggregateTask, update: dict[str, torch.Tensor], n_clients: int) -> None:
    """Step 4: Gaussian noise added in place to the reduced delta, from the round's secret
    randomness (`noise_source`)."""
    std = dp_noise_std(task.privacy.noise_multiplier, task.privacy.clip_norm, n_clients)
    if std <= 0:
        return
    source = noise_source(task)
    for name in sorted(update):
        noise = source.gaussian(tuple(update[name].shape), f"dp-noise/{name}")
        update[name].add_(noise.mul_(std).float())


def privatise_at_client(
    delta: dict[str, torch.Tensor], privacy: LocalPrivacy, source: NoiseSource | None = None
) -> float:
    """A site's own guarantee, on its delta before it is encoded: clip the whole delta's L2 norm
    to clipNorm, then add Gaussian noise of std noiseMultiplier * clipNorm to every value (in
    place). The noise comes from the OS's CSPRNG: nothing the run or the site publishes derives
    it. Returns the delta's norm before clipping (for the client's log only)."""
    norm = l2_norm(delta)
    factor = clip_factor(norm, privacy.clip_norm)
    std = privacy.noise_multiplier * privacy.clip_norm
    source = source or NoiseSource(None, "client")
    for name in sorted(delta):
        t = delta[name]
        if factor < 1.0:
            t.mul_(factor)
        if std > 0:
            t.add_(source.gaussian(tuple(t.shape), f"local-noise/{name}").mul_(std).to(t.dtype))
    return norm


class NoiseSource:
    """The randomness of the DP noise: never derivable from anything the run makes public.

    The noise is the privacy: anyone who could recompute it could subtract it from the published
    adapter and read the exact clipped mean. So no seed from the spec, the run's name or the round
    (all public): the bytes come from the operating system's CSPRNG, or, with
    privacy.noiseKeySecret, from SHAKE-256 keyed by a secret only the aggregator holds and by the
    run, round and tensor (a rerun then draws the same noise, so a round published twice is still
    one release). Gaussians by Box-Muller over 53-bit uniforms from those bytes.
    """

    def __init__(self, key: bytes | None, context: str) -> None:
        self.key = key
        self.context = context

    def bytes(self, n: int, label: str) -> bytes:
        if self.key is None:
            return os.urandom(n)
        message = b"\x00".join([self.key, self.context.encode(), label.encode()])
        return hashlib.shake_256(message).digest(n)

    def uniform(self, n: int, label: str) -> torch.Tensor:
        """n float64 values uniform in (0, 1), never 0."""
        raw = torch.frombuffer(bytearray(self.bytes(8 * n, label)), dtype=torch.int64)
        bits = raw.bitwise_and((1 << 63) - 1).bitwise_right_shift(10)  # 53 random bits
        return (bits.double() + 0.5) * 2.0**-53

    def gaussian(self, shape: tuple[int, ...], label: str) -> torch.Tensor:
        """Standard normal float64 values of `shape`."""
        n = math.prod(shape)
        u = self.uniform(2 * n, label)
        radius = torch.sqrt(-2.0 * torch.log(u[:n]))
        return (radius * torch.cos(2.0 * math.pi * u[n:])).view(shape)


def noise_source(task: AggregateTask, environ: Mapping[str, str] | None = None) -> NoiseSource:
    """The round's noise source: keyed by privacy.noiseKeySecret's key (from the environment, where
    only the aggregator's pods have it) when the run names one, else the OS's CSPRNG. A run that
    names a key the Job lacks fails before anything is published (exit 2)."""
    context = f"{task.run}\x00{task.round}"
    if task.privacy.noise_key_secret is None:
        return NoiseSource(None, context)
    key = (os.environ if environ is None else environ).get(NOISE_KEY_ENV, "").encode()
    if len(key) < 32:
        raise SettingError(
            f"privacy.noiseKeySecret: {NOISE_KEY_ENV} holds {len(key)} bytes; the noise key needs "
            "32 or more (e.g. head -c 48 /dev/urandom | base64)"
        )
    return NoiseSource(key, context)


def dp_noise_std(noise_multiplier: float, clip_norm: float | None, n_clients: int) -> float:
    """Std of the noise added to the mean of n clipped deltas (sensitivity clip_norm / n)."""
    if noise_multiplier <= 0 or clip_norm is None:
        return 0.0
    return noise_multiplier * clip_norm / n_clients


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


Log = Callable[[str], None]


def check_run_budget(task: AggregateTask, log: Log) -> None:
    """Round 0: refuse (BudgetError, not retryable) a run whose configured rounds would spend
    more than privacy.targetEpsilon, before any client trains."""
    if task.privacy.target_epsilon is None:
        return
    z, q, rounds = task.privacy.noise_multiplier, task.sampling_rate, task.rounds
    planned = epsilon([(z, q)] * rounds, task.privacy.delta)
    what = f"the configured run ({rounds} rounds, noiseMultiplier {z:g}, sampling rate {q:.3g})"
    check_budget(planned, task.privacy.target_epsilon, what)
    log(f"privacy: the configured run spends epsilon {planned:.4g} of the target")


CLIP_FILE = "clip.json"


def round_clip(
    store: st.Store, task: AggregateTask, log: Log
) -> tuple[AggregateTask, float | None]:
    """Under adaptive clipping, the task this round merges with: clipNorm the state's (version
    r - 1 or older, so a rerun of round r reads the same), the delta's noise multiplier lowered
    by what the noisy count takes (privacy.update_noise_multiplier). Unchanged without it."""
    adaptive = task.privacy.adaptive_clipping
    if adaptive is None:
        return task, None
    clip = task.privacy.clip_norm
    version = st.latest_version_before(store, CLIP_STATE_PREFIX, task.round)
    if version is not None:
        prefix = st.versioned_prefix(CLIP_STATE_PREFIX, version)
        _, files = st.read_committed(store, prefix, [CLIP_FILE])
        clip = float(json.loads(files[CLIP_FILE])["clipNorm"])
    assert clip is not None  # PrivacySpec: adaptiveClipping needs clipNorm
    z = update_noise_multiplier(task.privacy.noise_multiplier, adaptive.count_noise_multiplier)
    log(f"adaptive clipping: clip norm {clip:.4g} (of round {version or 0})")
    spec = task.privacy.model_copy(update={"clip_norm": clip, "noise_multiplier": z})
    return task.model_copy(update={"privacy": spec}), clip


def adapt_clip(
    store: st.Store, task: AggregateTask, accepted: list[Accepted], clip: float, log: Log
) -> float:
    """Andrew et al.'s step: next round's clip from the fraction of clients within this one's
    (the count noised from the round's secret randomness), committed as version r; returns the
    fraction."""
    adaptive = task.privacy.adaptive_clipping
    assert adaptive is not None
    noise = float(noise_source(task).gaussian((), "clip-count"))
    noise *= adaptive.count_noise_multiplier
    fraction, new_clip = next_clip_norm(
        clip, [a.norm for a in accepted], adaptive.target_quantile, adaptive.learning_rate, noise
    )
    st.commit(
        store,
        st.versioned_prefix(CLIP_STATE_PREFIX, task.round),
        {CLIP_FILE: json.dumps({"clipNorm": new_clip}).encode()},
        {"kind": "clip-state", "round": task.round},
    )
    log(f"adaptive clipping: {fraction:.3g} of clients within {clip:.4g}; next {new_clip:.4g}")
    return fraction


def account(task: AggregateTask, store: st.Store, record: RoundRecord, log: Log) -> RoundRecord:
    """The epsilon spent through this round, composed over every round's own mechanism (its
    noise multiplier and sampling rate, from the records in storage), checked against
    privacy.targetEpsilon before anything of the round is published."""
    z, q = task.privacy.noise_multiplier, task.sampling_rate
    if z <= 0:
        return record
    past = [
        (r.noise_multiplier or 0.0, r.sampling_rate or 1.0)
        for r in read_records(store, task.round - 1, log)
        if r.round >= 1
    ]
    spent = epsilon([*past, (z, q)], task.privacy.delta)
    check_budget(spent, task.privacy.target_epsilon, f"round {task.round}")
    log(
        f"privacy: epsilon {spent:.4g} at delta {task.privacy.delta:g} after {len(past) + 1} rounds"
    )
    return record.model_copy(
        update={
            "noise_multiplier": z,
            "sampling_rate": q,
            "epsilon": spent if math.isfinite(spent) else None,
        }
    )
