"""Client-level DP accounting (dp-accounting's RDP accountant), privacy.targetEpsilon and
adaptive clipping, through the real aggregator over real storage."""

from __future__ import annotations

import json
import math

import pytest
from dp_accounting import dp_event, pld, rdp

from fedtune_trainer import aggregate
from fedtune_trainer.aggregation import privacy
from fedtune_trainer.storage import store as st
from fedtune_trainer.wire.layout import CLIP_STATE_PREFIX
from fedtune_trainer.wire.settings import AdaptiveClipping, AggregationSpec, PrivacySpec
from fedtune_trainer.wire.task import AggregateTask
from tests.trainer.aggregation_support import put_delta, random_tensors, task, write_global
from tests.trainer.support import Demo

CLIENTS = ["alpha", "bravo", "charlie", "delta"]
PLAIN = AggregationSpec(max_client_share=1.0, outlier_norm_factor=None)


def quiet(_: str) -> None:
    pass


def library_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    """The same composition, written directly against dp_accounting."""
    accountant = rdp.RdpAccountant()
    event = (
        dp_event.GaussianDpEvent(z)
        if q == 1
        else dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z))
    )
    accountant.compose(dp_event.SelfComposedDpEvent(event, rounds))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(
    ("z", "q", "rounds", "delta"),
    [
        (1.0, 1.0, 10, 1e-5),
        (1.1, 0.1, 100, 1e-5),
        (0.8, 0.02, 1000, 1e-6),
        (5.0, 0.5, 3, 1e-3),
    ],
)
def test_epsilon_is_dp_accountings_own(z: float, q: float, rounds: int, delta: float) -> None:
    got = privacy.epsilon([(z, q)] * rounds, delta)
    assert got == pytest.approx(library_epsilon(z, q, rounds, delta), rel=1e-12)
    # RDP is an upper bound: the privacy-loss-distribution accountant is tighter, not far off.
    tight = pld.PLDAccountant()
    event = dp_event.GaussianDpEvent(z)
    tight.compose(event if q == 1 else dp_event.PoissonSampledDpEvent(q, event), rounds)
    assert tight.get_epsilon(delta) <= got <= 1.6 * tight.get_epsilon(delta) + 0.05


def test_a_gaussian_of_multiplier_4_53_is_1_1e6_dp() -> None:
    """dp-accounting's reference value (its rdp_privacy_accountant_test): one Gaussian with
    noise multiplier 4.530877117 is exactly (1, 1e-6)-DP on a fine grid of orders; the default
    orders give slightly more, never less."""
    assert privacy.epsilon([(4.530877117, 1.0)], 1e-6) == pytest.approx(1.0, abs=0.02)
    assert privacy.epsilon([(4.530877117, 1.0)], 1e-6) >= 1.0 - 1e-9


def test_rounds_compose_with_their_own_noise() -> None:
    mixed = privacy.epsilon([(2.0, 0.5)] * 3 + [(1.0, 0.5)] * 2, 1e-5)
    accountant = rdp.RdpAccountant()
    for z, n in ((2.0, 3), (1.0, 2)):
        accountant.compose(dp_event.PoissonSampledDpEvent(0.5, dp_event.GaussianDpEvent(z)), n)
    assert mixed == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    assert privacy.epsilon([(1.0, 1.0), (0.0, 1.0)], 1e-5) == math.inf


def noisy(target: float | None = None, **kw: object) -> PrivacySpec:
    return PrivacySpec(clip_norm=1.0, noise_multiplier=2.0, target_epsilon=target, **kw)


def test_round_records_carry_the_epsilon_spent_so_far(file_store: st.FileStore) -> None:
    write_global(file_store, 0, random_tensors(0))
    q = 0.5
    for r in (1, 2, 3):
        for i, c in enumerate(CLIENTS[:2]):
            put_delta(file_store, r, c, random_tensors(10 * r + i, 0.1))
        t = task(file_store, r, CLIENTS[:2], aggregation=PLAIN, privacy=noisy(), sampling_rate=q)
        record = aggregate.run(t, file_store, quiet).record
        assert record.epsilon == pytest.approx(library_epsilon(2.0, q, r, 1e-5), rel=1e-12)
        assert (record.noise_multiplier, record.sampling_rate) == (2.0, q)
        page = file_store.get_bytes("report/report.html").decode()
        assert f"epsilon spent, at privacy.delta</td><td>{record.epsilon:.4g}</td>" in page
    # A rerun of round 2 counts rounds 1-2, not the round 3 already written.
    t2 = task(file_store, 2, CLIENTS[:2], aggregation=PLAIN, privacy=noisy(), sampling_rate=q)
    assert aggregate.run(t2, file_store, quiet).record.epsilon == pytest.approx(
        library_epsilon(2.0, q, 2, 1e-5), rel=1e-12
    )


def initial(store: st.Store, spec: PrivacySpec, rounds: int) -> AggregateTask:
    return task(store, 0, [], privacy=spec, rounds=rounds, sampling_rate=0.25)


def test_a_run_over_its_target_epsilon_refuses_to_start(
    file_store: st.FileStore, demo: Demo
) -> None:
    budget = library_epsilon(2.0, 0.25, 20, 1e-5)
    over = initial(file_store, noisy(target=budget * 0.99), 20)
    over = over.model_copy(update={"base_model": str(demo.model)})
    with pytest.raises(privacy.BudgetError, match=r"privacy.targetEpsilon: the configured run"):
        aggregate.run(over, file_store, quiet)
    assert not file_store.list("rounds/")  # nothing written, no client ever trains
    within = initial(file_store, noisy(target=budget * 1.01), 20)
    within = within.model_copy(update={"base_model": str(demo.model)})
    assert aggregate.run(within, file_store, quiet).round == 0


def test_a_round_over_the_target_fails_before_publishing(file_store: st.FileStore) -> None:
    """E.g. the noise was lowered mid-run: the round that would exceed the budget stops."""
    write_global(file_store, 0, random_tensors(0))
    target = library_epsilon(2.0, 1.0, 1, 1e-5) * 1.5
    for i, c in enumerate(CLIENTS[:2]):
        put_delta(file_store, 1, c, random_tensors(i, 0.1))
    t = task(file_store, 1, CLIENTS[:2], aggregation=PLAIN, privacy=noisy(target=target))
    aggregate.run(t, file_store, quiet)
    for i, c in enumerate(CLIENTS[:2]):
        put_delta(file_store, 2, c, random_tensors(5 + i, 0.1))
    lowered = PrivacySpec(clip_norm=1.0, noise_multiplier=0.7, target_epsilon=target)
    t = task(file_store, 2, CLIENTS[:2], aggregation=PLAIN, privacy=lowered)
    with pytest.raises(privacy.BudgetError, match=r"round 2 spends epsilon"):
        aggregate.run(t, file_store, quiet)
    assert not file_store.exists("rounds/000002/global/manifest.json")


ADAPTIVE = AdaptiveClipping(target_quantile=0.5, learning_rate=0.5, count_noise_multiplier=2.0)


def clip_state(store: st.Store, r: int) -> bytes:
    prefix = st.versioned_prefix(CLIP_STATE_PREFIX, r)
    return st.read_committed(store, prefix, [privacy.CLIP_FILE])[1][privacy.CLIP_FILE]


def test_adaptive_clipping_moves_the_clip_geometrically_and_reruns_alike(
    file_store: st.FileStore,
) -> None:
    """Four clients of norms far above the initial clip: none is within it, so the noised
    fraction is the count's noise alone, and the next clip is clip * exp(-eta (fraction - q)).
    A rerun of round 1 reads the same clip state (version 0: the initial clipNorm) and draws the
    same count noise: it writes the same state and the same global."""
    write_global(file_store, 0, random_tensors(0))
    spec = PrivacySpec(clip_norm=0.05, noise_multiplier=1.0, adaptive_clipping=ADAPTIVE)
    clip = 0.05
    for r in (1, 2):
        for i, c in enumerate(CLIENTS):
            put_delta(file_store, r, c, random_tensors(10 * r + i, 1.0))
        t = task(file_store, r, CLIENTS, aggregation=PLAIN, privacy=spec)
        record = aggregate.run(t, file_store, quiet).record
        assert record.clip_norm == pytest.approx(clip, rel=1e-12)
        assert all(c.scale == pytest.approx(clip / c.norm) for c in record.contributions)
        assert abs(record.clip_fraction * 4) < 4 * ADAPTIVE.count_noise_multiplier  # 4 sigma
        clip = clip * math.exp(-0.5 * (record.clip_fraction - 0.5))
        assert json.loads(clip_state(file_store, r))["clipNorm"] == pytest.approx(clip)
    round_1 = (clip_state(file_store, 1), file_store.get_bytes("rounds/000001/metrics.json"))
    t = task(file_store, 1, CLIENTS, aggregation=PLAIN, privacy=spec)
    again = aggregate.run(t, file_store, quiet).record
    assert again.clip_norm == 0.05
    assert clip_state(file_store, 1) == round_1[0]
    first = json.loads(round_1[1])
    assert (again.clip_fraction, again.epsilon) == (first["clipFraction"], first["epsilon"])


def test_the_count_takes_its_share_of_the_noise() -> None:
    """Andrew et al., Theorem 1: z_delta^-2 + (2 sigma_b)^-2 = z^-2."""
    z_delta = privacy.update_noise_multiplier(1.0, 2.0)
    assert z_delta**-2 + 4.0**-2 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="exceed"):
        privacy.update_noise_multiplier(1.0, 0.4)
