"""Bounded influence, finite-or-nothing and Byzantine-robust selection (issue 12, items 2-4).

Each rule is held to an independent reference (bisection for the share cap, float64 numpy for
Krum) and to the attack it exists for: a client lying about its sample count, a client sending a
huge delta, f colluding clients, and large but finite deltas that overflow a server step.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as stg

from fedtune_trainer import aggregate, cli
from fedtune_trainer.aggregation import bounds
from fedtune_trainer.aggregation.robust import pairwise_distances
from fedtune_trainer.storage import store as st
from fedtune_trainer.wire.contract import EXIT_FAILED
from fedtune_trainer.wire.errors import QuorumError
from fedtune_trainer.wire.layout import SERVER_STATE_PREFIX, global_prefix, round_prefix
from fedtune_trainer.wire.results import AggregateSummary, RoundRecord
from fedtune_trainer.wire.settings import AggregationSpec
from tests.trainer.aggregation_support import (
    SHAPES,
    as_numpy,
    put_delta,
    random_tensors,
    read_global,
    reference_capped_weights,
    reference_round,
    task,
    write_global,
)

CLIENTS = ["c0", "c1", "c2", "c3", "c4", "c5", "c6"]


def quiet(_: str) -> None:
    pass


def run(
    store: st.Store, clients: list[str], spec: AggregationSpec, **kw: object
) -> AggregateSummary:
    return aggregate.run(task(store, 1, clients, aggregation=spec, **kw), store, quiet)


def moved(store: st.Store, g0: Mapping[str, torch.Tensor]) -> float:
    """How far round 1 moved the global adapter (L2 over all tensors)."""
    g1 = read_global(store, 1)
    return bounds.l2_norm({k: g1[k] - g0[k] for k in g0})


# ------------------------------------------------------------------------------------------
# Bounded influence: weights
# ------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    weights=stg.lists(stg.floats(1e-3, 1e9), min_size=1, max_size=12),
    share=stg.floats(0.01, 1.0),
)
def test_capped_weights_match_a_bisection_reference(weights: list[float], share: float) -> None:
    got, cap = bounds.capped_weights(weights, share)
    want = reference_capped_weights(weights, share)
    assert cap == pytest.approx(min(1.0, max(share, 1 / len(weights))))
    shares, ref = np.array(got) / sum(got), np.array(want) / sum(want)
    np.testing.assert_allclose(shares, ref, rtol=1e-6, atol=1e-9)
    assert shares.max() <= cap * (1 + 1e-9)
    # Weights under the cap keep their ratios: only the ones above it were lowered.
    kept = [i for i, (g, w) in enumerate(zip(got, weights, strict=True)) if g == w]
    assert all(weights[i] <= max(weights) for i in kept)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (0, r"bad sample count 0: outside \[1, 1000000000\]"),
        (-1, r"bad sample count -1: outside"),
        (10**12, r"bad sample count 1000000000000: outside"),
        (10**309, r"bad sample count ~10\^309: outside"),
        (True, r"bad sample count 'True': not an integer"),
        ("12", r"bad sample count '12': not an integer"),
        (12.0, r"bad sample count '12.0': not an integer"),
        (None, r"bad sample count 'None': not an integer"),
    ],
)
def test_absurd_sample_counts_are_refused_before_any_float_maths(
    value: object, reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        bounds.sample_count(value)


def test_sample_counts_above_the_runs_data_limit_are_refused() -> None:
    assert bounds.sample_count(500, limit=500) == 500
    with pytest.raises(ValueError, match=r"outside \[1, 500\]"):
        bounds.sample_count(501, limit=500)


def test_a_lying_sample_count_gets_at_most_the_share_cap(file_store: st.FileStore) -> None:
    g0 = random_tensors(0)
    write_global(file_store, 0, g0)
    clients = CLIENTS[:4]
    samples = [10, 20, 30, 10**8]
    deltas = [random_tensors(i + 1, 0.1) for i in range(4)]
    for c, d, n in zip(clients, deltas, samples, strict=True):
        put_delta(file_store, 1, c, d, samples=n)
    summary = run(file_store, clients, AggregationSpec(max_client_share=0.4))
    record = summary.record
    assert record.max_client_share == pytest.approx(0.4)
    shares = [c.share for c in record.contributions]
    assert shares[3] == pytest.approx(0.4)
    assert [c.capped for c in record.contributions] == [False, False, False, True]
    # The honest clients keep their ratios 1:2:3 in the remaining 0.6.
    assert shares[:3] == pytest.approx([0.1, 0.2, 0.3])
    weights = reference_capped_weights([float(n) for n in samples], 0.4)
    x = reference_round(AggregationSpec(), as_numpy(g0), [as_numpy(d) for d in deltas], weights, {})
    got = read_global(file_store, 1)
    for name in SHAPES:
        np.testing.assert_allclose(got[name].double().numpy(), x[name], rtol=1e-5, atol=1e-6)


def test_uniform_weighting_ignores_reported_counts(file_store: st.FileStore) -> None:
    write_global(file_store, 0, random_tensors(0))
    for i, (c, n) in enumerate(zip(CLIENTS[:3], [1, 1000, 10**9], strict=True)):
        put_delta(file_store, 1, c, random_tensors(i, 0.1), samples=n)
    record = run(file_store, CLIENTS[:3], AggregationSpec(weighting="uniform")).record
    assert record.weighting == "uniform"
    assert [c.share for c in record.contributions] == pytest.approx([1 / 3] * 3)
    assert [c.samples for c in record.contributions] == [1, 1000, 10**9]


# ------------------------------------------------------------------------------------------
# A safe default against outliers
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reject", "clip", "outcome"),
    [
        (10.0, 3.0, "rejected"),  # the defaults: 1e6 medians out is an attack, not a straggler
        (None, 3.0, "clipped"),  # no rejection: clipped to 3 medians
        (None, None, "moves it"),  # both off: what one client could do before
    ],
)
def test_one_huge_delta_cannot_move_the_global_by_orders_of_magnitude(
    file_store: st.FileStore, reject: float | None, clip: float | None, outcome: str
) -> None:
    g0 = random_tensors(0)
    write_global(file_store, 0, g0)
    honest = [random_tensors(i + 1, 0.05) for i in range(4)]
    for c, d in zip(CLIENTS[:4], honest, strict=True):
        put_delta(file_store, 1, c, d)
    put_delta(file_store, 1, CLIENTS[4], random_tensors(99, 5e4))
    # The lower median of the five norms: the third smallest, an honest one.
    median = sorted(bounds.l2_norm(d) for d in honest)[2]
    spec = AggregationSpec(outlier_norm_factor=reject, outlier_clip_factor=clip)
    record = run(file_store, CLIENTS[:5], spec).record
    distance = moved(file_store, g0)
    honest_mean = bounds.l2_norm({k: sum(d[k] for d in honest) / len(honest) for k in honest[0]})
    if outcome == "moves it":
        assert distance > 1e4 * median  # the attack works without the rules
        assert not record.contributions[-1].outlier
        return
    assert record.median_norm == pytest.approx(median)
    if outcome == "rejected":
        assert [r.client for r in record.rejections] == [CLIENTS[4]]
        assert re.match(
            r"outlier: norm \S+ above 10 x the round's median", record.rejections[0].reason
        )
        assert record.accepted == 4
        assert distance == pytest.approx(honest_mean, rel=1e-5)  # exactly the honest round
        return
    attacker = record.contributions[-1]
    assert record.outlier_norm_bound == pytest.approx(3 * median)
    assert attacker.outlier
    assert attacker.norm * attacker.scale == pytest.approx(3 * median)
    # Its share is at most 2/5 under the default cap: the global moves by at most that share of 3
    # medians plus the honest mean, never by the 5e4-scale delta.
    assert distance <= (2 / 5) * 3 * median + honest_mean
    assert all(not c.outlier for c in record.contributions[:-1])


# ------------------------------------------------------------------------------------------
# One hostile client among four honest ones, under the defaults: how far it moves the global
# ------------------------------------------------------------------------------------------

HONEST = CLIENTS[:4]
HOSTILE = CLIENTS[4]
DIRECTION = random_tensors(1000, 0.05)
"""What the honest clients agree on: each sends it plus noise of its own, so that their mean is
a real update (random deltas alone would cancel out) and an attack has something to pull on."""


def honest_deltas() -> list[dict[str, torch.Tensor]]:
    noise = [random_tensors(2000 + i, 0.02) for i in range(len(HONEST))]
    return [{k: DIRECTION[k] + n[k] for k in DIRECTION} for n in noise]


def against(scale_in_medians: float) -> dict[str, torch.Tensor]:
    """A delta opposite to the honest direction, `scale_in_medians` honest norms long."""
    norm = sorted(bounds.l2_norm(d) for d in honest_deltas())[1]  # the lower median of 4
    unit = bounds.l2_norm(DIRECTION)
    return {k: -v * (scale_in_medians * norm / unit) for k, v in DIRECTION.items()}


ATTACKS: list[tuple[str, dict[str, torch.Tensor], int, dict[str, float], str]] = [
    # (attack, the hostile delta, its reported samples, aggregation settings, what happens)
    ("norm 1e8, honest sample count", random_tensors(99, 1e8), 10, {}, "rejected"),
    (
        "values 3e38, 1,000 samples, server lr 2",
        {k: torch.full_like(v, 3e38) for k, v in DIRECTION.items()},
        1000,
        {"server_learning_rate": 2.0},
        "rejected",
    ),
    ("9 medians against the honest direction", against(9), 10, {}, "clipped"),
    ("9 medians against, 10^6 samples", against(9), 10**6, {}, "clipped and capped"),
    ("2.9 medians against, 10^6 samples", against(2.9), 10**6, {}, "capped"),
    ("an honest-looking delta, 10^6 samples", random_tensors(7, 0.05), 10**6, {}, "capped"),
]


def honest_global(root: Path, settings: dict[str, float]) -> dict[str, torch.Tensor]:
    store = st.FileStore(root)
    write_global(store, 0, random_tensors(0))
    for c, d in zip(HONEST, honest_deltas(), strict=True):
        put_delta(store, 1, c, d)
    run(store, HONEST, AggregationSpec(**settings))
    return read_global(store, 1)


@pytest.mark.parametrize(
    ("attack", "delta", "samples", "settings", "outcome"), ATTACKS, ids=[a[0] for a in ATTACKS]
)
def test_one_hostile_clients_influence_under_the_defaults(
    tmp_path: Path,
    attack: str,
    delta: dict[str, torch.Tensor],
    samples: int,
    settings: dict[str, float],
    outcome: str,
    record_property: pytest.RecordProperty,
) -> None:
    """Influence: how far the hostile client moves the global from where the honest clients
    alone would put it, in units of the honest update's length. Rejected: 0. Otherwise at most
    its share (the cap, 2/5) of its clipped length (3 medians) against the honest mean."""
    g0 = random_tensors(0)
    store = st.FileStore(tmp_path / "attacked")
    write_global(store, 0, g0)
    for c, d in zip(HONEST, honest_deltas(), strict=True):
        put_delta(store, 1, c, d)
    put_delta(store, 1, HOSTILE, delta, samples=samples)
    record = run(store, [*HONEST, HOSTILE], AggregationSpec(**settings)).record
    attacked = read_global(store, 1)
    honest = honest_global(tmp_path / "honest", settings)
    update = bounds.l2_norm({k: honest[k] - g0[k] for k in g0})
    influence = bounds.l2_norm({k: attacked[k] - honest[k] for k in g0}) / update
    print(f"\n| {attack} | {outcome} | {influence:.3g} |")
    record_property("influence", influence)
    hostile = next((c for c in record.contributions if c.client == HOSTILE), None)
    if outcome == "rejected":
        assert hostile is None
        assert influence == pytest.approx(0.0, abs=1e-6)
        return
    assert hostile is not None
    assert hostile.outlier is ("clipped" in outcome)
    assert hostile.capped is ("capped" in outcome)
    median = record.median_norm
    assert median is not None
    bound = (2 / 5) * (3 * median + update) / update
    assert influence <= bound * (1 + 1e-6)


@pytest.mark.parametrize(
    ("norms", "bound"),
    [
        ([3.0], None),  # one client: nothing to compare with
        ([1.0, 1000.0], 10.0),  # two: the lower median is the smaller norm (the clip's rule)
        ([1.0, 2.0, 1000.0], 20.0),
        ([1.0, 2.0, 3.0, 1000.0], 20.0),  # the lower of the two middle values
        ([0.0, 0.0, 5.0], 0.0),  # a round whose median delta is zero moves nothing
    ],
)
def test_the_outlier_bound_with_few_clients(norms: list[float], bound: float | None) -> None:
    assert bounds.outlier_bound(norms, 10.0) == bound
    assert bounds.outlier_bound(norms, None) is None


# ------------------------------------------------------------------------------------------
# Krum and Multi-Krum
# ------------------------------------------------------------------------------------------


def numpy_krum(vectors: list[np.ndarray], f: int, m: int) -> list[int]:
    """Blanchard et al. 2017, from the paper: score(i) = sum of the n - f - 2 smallest squared
    distances to the others; Krum takes the lowest, Multi-Krum the m lowest (ties: lower i)."""
    n = len(vectors)
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((vectors[i] - vectors[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(d[: n - f - 2]))
    return sorted(sorted(range(n), key=lambda i: (scores[i], i))[:m])


def flat(d: Mapping[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([d[k].double().numpy().ravel() for k in sorted(d)])


@pytest.mark.parametrize(
    ("algorithm", "f", "m"),
    [("krum", 1, None), ("krum", 2, None), ("multiKrum", 1, None), ("multiKrum", 2, 3)],
)
def test_krum_matches_a_float64_reference(
    file_store: st.FileStore, algorithm: str, f: int, m: int | None
) -> None:
    g0 = random_tensors(0)
    write_global(file_store, 0, g0)
    deltas = [random_tensors(10 + i, 0.05 * (1 + i % 3)) for i in range(7)]
    for c, d in zip(CLIENTS, deltas, strict=True):
        put_delta(file_store, 1, c, d)
    spec = AggregationSpec(algorithm=algorithm, byzantine_clients=f, multi_krum_selected=m)
    record = run(file_store, CLIENTS, spec).record
    count = 1 if algorithm == "krum" else (m or len(CLIENTS) - f)
    chosen = numpy_krum([flat(d) for d in deltas], f, count)
    assert [i for i, c in enumerate(record.contributions) if c.selected] == chosen
    assert [c.weight for c in record.contributions] == [float(i in chosen) for i in range(7)]
    mean = {k: np.mean([as_numpy(deltas[i])[k] for i in chosen], axis=0) for k in SHAPES}
    got = read_global(file_store, 1)
    for k in SHAPES:
        want = g0[k].double().numpy() + mean[k]
        np.testing.assert_allclose(got[k].double().numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("attack", "f"),
    [("one huge delta", 1), ("two colluding clients", 2)],
)
def test_krum_picks_an_honest_client_under_attack(
    file_store: st.FileStore, attack: str, f: int
) -> None:
    g0 = random_tensors(0)
    write_global(file_store, 0, g0)
    honest = {c: random_tensors(20 + i, 0.05) for i, c in enumerate(CLIENTS[: 7 - f])}
    if attack == "one huge delta":
        evil = {CLIENTS[6]: random_tensors(99, 1e3)}
    else:  # f identical deltas, close to each other, far from the honest ones
        target = random_tensors(98, 1.0)
        evil = {c: {k: v + 1e-3 * i for k, v in target.items()} for i, c in enumerate(CLIENTS[5:])}
    for c, d in {**honest, **evil}.items():
        put_delta(file_store, 1, c, d)
    spec = AggregationSpec(algorithm="krum", byzantine_clients=f, outlier_norm_factor=None)
    record = run(file_store, CLIENTS, spec).record
    (picked,) = [c.client for c in record.contributions if c.selected]
    assert picked in honest
    assert moved(file_store, g0) == pytest.approx(bounds.l2_norm(honest[picked]), rel=1e-5)


def test_krum_needs_2f_plus_3_deltas(file_store: st.FileStore) -> None:
    write_global(file_store, 0, random_tensors(0))
    for i, c in enumerate(CLIENTS[:4]):
        put_delta(file_store, 1, c, random_tensors(i, 0.1))
    with pytest.raises(
        QuorumError,
        match=r"krum with byzantineClients 1 needs at least 2f \+ 3 = 5 valid deltas, got 4",
    ):
        run(file_store, CLIENTS[:4], AggregationSpec(algorithm="krum"))
    assert file_store.list(global_prefix(1)) == []


def test_pairwise_distances_stream_the_same_as_numpy(file_store: st.FileStore) -> None:
    write_global(file_store, 0, random_tensors(0))
    deltas = [random_tensors(30 + i, 0.1) for i in range(4)]
    for c, d in zip(CLIENTS[:4], deltas, strict=True):
        put_delta(file_store, 1, c, d)
    t = task(file_store, 1, CLIENTS[:4])
    with tempfile.TemporaryDirectory() as tmp:
        accepted, _ = aggregate.collect(t, file_store, SHAPES, Path(tmp), quiet)
        got = pairwise_distances(accepted, SHAPES).numpy()
    vectors = [flat(d) for d in deltas]
    want = np.array([[np.sum((a - b) ** 2) for b in vectors] for a in vectors])
    np.testing.assert_allclose(got, want, rtol=1e-12)


# ------------------------------------------------------------------------------------------
# Finite or nothing
# ------------------------------------------------------------------------------------------


def huge(seed: int, magnitude: float) -> dict[str, torch.Tensor]:
    """Finite fp32 values around `magnitude` (a delta that encodes and decodes fine)."""
    return {k: v.sign() * magnitude for k, v in random_tensors(seed).items()}


@pytest.mark.parametrize(
    ("spec", "magnitude", "where"),
    [
        # FedAdam: v = (1 - b2) d^2 overflows fp32 for |d| ~ 1e30 (the global itself stays finite)
        (AggregationSpec(algorithm="fedadam", server_learning_rate=2.0), 1e30, "server state"),
        # FedAvg with lr 2: x + 2 d overflows fp32 for |d| ~ 2e38
        (AggregationSpec(server_learning_rate=2.0), 2e38, "global adapter"),
    ],
    ids=["fedadam-second-moment", "fedavg-global"],
)
def test_a_non_finite_result_commits_nothing_and_the_retry_can_succeed(
    file_store: st.FileStore, spec: AggregationSpec, magnitude: float, where: str
) -> None:
    write_global(file_store, 0, random_tensors(0))
    clients = CLIENTS[:3]
    for i, c in enumerate(clients):
        put_delta(file_store, 1, c, huge(i, magnitude))
    with pytest.raises(bounds.NonFiniteError) as info:
        run(file_store, clients, spec)
    message = str(info.value)
    assert re.search(
        rf"round 1: the {spec.algorithm} step gives a {where} with \d+ non-finite", message
    )
    assert re.search(r"in (v/)?base_model\.\S+\.weight; nothing committed", message)
    assert cli.exit_code(info.value) == EXIT_FAILED  # retryable, not invalid input
    assert file_store.list(global_prefix(1)) == []
    assert file_store.list(SERVER_STATE_PREFIX) == []
    assert not file_store.exists(st.join(round_prefix(1), "metrics.json"))
    # The clients re-send sane deltas (a rerun of their Jobs): the retry of the round succeeds.
    for i, c in enumerate(clients):
        put_delta(file_store, 1, c, random_tensors(i, 0.1))
    summary = run(file_store, clients, spec)
    assert summary.record.accepted == 3
    assert all(bool(torch.isfinite(t).all()) for t in read_global(file_store, 1).values())


def test_publish_refuses_a_non_finite_adapter(file_store: st.FileStore) -> None:
    tensors = random_tensors(0)
    next(iter(tensors.values()))[0, 0] = float("inf")
    merged = aggregate.Merged(RoundRecord(run="t", round=1, algorithm="fedavg"), tensors, b"{}")
    with pytest.raises(bounds.NonFiniteError, match="global adapter to publish has 1 non-finite"):
        aggregate.publish(task(file_store, 1, []), file_store, merged, 0.0, quiet)
    assert file_store.list("") == []
