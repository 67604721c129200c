"""Client-level DP accounting (dp-accounting's RDP accountant), privacy.targetEpsilon and
adaptive clipping, through the real aggregator over real storage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from dp_accounting import dp_event, pld, rdp

from fedtune_trainer import aggregate
from fedtune_trainer.aggregation import bounds, privacy
from fedtune_trainer.learning.runtime import derive_seed
from fedtune_trainer.storage import store as st
from fedtune_trainer.wire.contract import NOISE_KEY_ENV
from fedtune_trainer.wire.errors import SettingError
from fedtune_trainer.wire.layout import CLIP_STATE_PREFIX
from fedtune_trainer.wire.settings import AdaptiveClipping, AggregationSpec, PrivacySpec
from fedtune_trainer.wire.task import AggregateTask
from tests.trainer.aggregation_support import put_delta, random_tensors, task, write_global
from tests.trainer.aggregation_support import read_global as read_global_tensors
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
    file_store: st.FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four clients of norms far above the initial clip: none is within it, so the noised
    fraction is the count's noise alone, and the next clip is clip * exp(-eta (fraction - q)).
    A rerun of round 1 reads the same clip state (version 0: the initial clipNorm) and, with the
    noise keyed by the aggregator's secret, draws the same count noise: it writes the same state
    and the same global."""
    write_global(file_store, 0, random_tensors(0))
    monkeypatch.setenv(NOISE_KEY_ENV, NOISE_KEY)
    spec = PrivacySpec(
        clip_norm=0.05, noise_multiplier=1.0, adaptive_clipping=ADAPTIVE, noise_key_secret="k"
    )
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


# ---------------------------------------------------------------------------------------------
# The noise: never derivable from what the run makes public
# ---------------------------------------------------------------------------------------------

NOISE_KEY = "k" * 48
"""A stand-in for the aggregator's noise key (privacy.noiseKeySecret)."""


def noisy_round(store: st.Store, spec: PrivacySpec) -> tuple[dict, dict]:
    """Round 1 of four clients under `spec`: (the published global, the exact clipped mean
    the noise must hide, as global 0 plus the uniform mean of the clipped deltas)."""
    g0 = random_tensors(0)
    write_global(store, 0, g0)
    deltas = [random_tensors(10 + i, 1.0) for i in range(len(CLIENTS))]
    for c, d in zip(CLIENTS, deltas, strict=True):
        put_delta(store, 1, c, d)
    aggregate.run(task(store, 1, CLIENTS, aggregation=PLAIN, privacy=spec), store, quiet)
    clip = spec.clip_norm
    assert clip is not None
    exact = {
        k: g0[k].double()
        + sum(d[k].double() * min(1.0, clip / bounds.l2_norm(d)) for d in deltas) / len(deltas)
        for k in g0
    }
    published = {k: v.double() for k, v in read_global_tensors(store, 1).items()}
    return published, exact


DP = PrivacySpec(clip_norm=1.0, noise_multiplier=2.0)


def test_the_noise_cannot_be_recomputed_from_what_the_run_publishes(tmp_path: Path) -> None:
    """What the aggregator once did (noise seeded by the spec's seed, the run and the round) let
    anyone who reads the run subtract the noise and see the exact clipped mean to 1e-7. Every
    input of that recomputation is public; the noise now depends on none of them."""
    store = st.FileStore(tmp_path / "run")
    published, exact = noisy_round(store, DP)
    t = task(store, 1, CLIENTS, aggregation=PLAIN, privacy=DP)
    std = DP.noise_multiplier * 1.0 / len(CLIENTS)
    gen = torch.Generator().manual_seed(derive_seed(t.seed, t.run, t.round, "dp-noise"))
    for k in sorted(published):
        recomputed = torch.randn(published[k].shape, generator=gen, dtype=torch.float64) * std
        left = published[k] - recomputed - exact[k]
        # What is left is two independent noises (std about sqrt(2) std), not rounding error.
        assert float(left.std()) > std / 2
        assert float((published[k] - exact[k]).std()) == pytest.approx(std, rel=0.5)


@pytest.mark.parametrize(
    ("key_a", "key_b", "same"),
    [
        (None, None, False),  # the OS's CSPRNG: two identical runs publish different noise
        (NOISE_KEY, NOISE_KEY, True),  # the aggregator's key: a rerun publishes the same noise
        (NOISE_KEY, "j" * 48, False),  # another key, other noise
    ],
)
def test_identical_runs_share_noise_only_through_the_aggregators_key(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    key_a: str | None,
    key_b: str | None,
    same: bool,
) -> None:
    published = []
    for i, key in enumerate((key_a, key_b)):
        spec = DP
        if key is not None:
            monkeypatch.setenv(NOISE_KEY_ENV, key)
            spec = DP.model_copy(update={"noise_key_secret": "dp-noise-key"})
        published.append(noisy_round(st.FileStore(tmp_path / f"run-{i}"), spec)[0])
    first, second = published
    assert all(torch.equal(first[k], second[k]) for k in first) is same


def test_a_run_that_names_a_noise_key_needs_a_real_one(tmp_path: Path) -> None:
    t = task(
        st.FileStore(tmp_path), 1, CLIENTS, privacy=DP.model_copy(update={"noise_key_secret": "x"})
    )
    with pytest.raises(SettingError, match="32 or more"):
        privacy.noise_source(t, {NOISE_KEY_ENV: "short"})
    with pytest.raises(SettingError, match="holds 0 bytes"):
        privacy.noise_source(t, {})
    assert privacy.noise_source(t, {NOISE_KEY_ENV: NOISE_KEY}).key == NOISE_KEY.encode()
