"""Exact LoRA aggregation: the re-factorised product against a dense float64 SVD reference, the
truncation error it reports, heterogeneous client ranks through the real aggregator and the
tiny model's real client."""

from __future__ import annotations

import math

import pytest
import torch

from fedtune_trainer import aggregate, client
from fedtune_trainer.adapter import exact
from fedtune_trainer.storage import store as st
from fedtune_trainer.wire.delta_settings import DeltaSpec
from fedtune_trainer.wire.settings import AdapterSpec, AggregationSpec
from tests.trainer.aggregation_support import SHAPES, put_delta, random_tensors, task, write_global
from tests.trainer.support import Demo
from tests.trainer.test_client import ADAPTER, client_task, global_tensors, init_task, quiet

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

EXACT = AggregationSpec(lora="exact", max_client_share=1.0, outlier_norm_factor=None)
OUT, IN, R = 24, 20, 4


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference(terms: list[tuple[float, torch.Tensor, torch.Tensor]], r: int):
    """Dense float64: T = sum c_k B_k A_k, its best rank-r approximation and relative error."""
    t = sum(c * b.double() @ a.double() for c, b, a in terms)
    u, s, vh = torch.linalg.svd(t)
    best = (u[:, :r] * s[:r]) @ vh[:r]
    return t, best, math.sqrt(float(s[r:].pow(2).sum() / s.pow(2).sum()))


@pytest.mark.parametrize(
    ("ranks", "server_lr"),
    [
        ([R, R, R], 1.0),  # three clients at the global rank: the sum has rank up to 12
        ([R, 2, 1], 1.0),  # heterogeneous ranks
        ([R, R], 0.5),  # the global's own product stays in the target
        ([1], 1.0),  # one rank-1 client: nothing to truncate
    ],
)
def test_factorise_matches_a_dense_float64_svd(ranks: list[int], server_lr: float) -> None:
    g = gen(0)
    gb, ga = torch.randn(OUT, R, generator=g), torch.randn(R, IN, generator=g)
    weights = torch.rand(len(ranks), generator=g) + 0.1
    weights = (weights / weights.sum()).tolist()
    clients = [
        (w, torch.randn(OUT, r, generator=g), torch.randn(r, IN, generator=g))
        for w, r in zip(weights, ranks, strict=True)
    ]
    terms = exact.layer_terms(gb, ga, clients, server_lr)
    # The target, written from the definition: each client's adapted product at its own scaling
    # s_i = alpha / r_i (alpha = 8 here), its start the top r_i directions of the global.
    alpha, s = 8.0, 8.0 / R
    target = (1 - server_lr) * s * gb.double() @ ga.double()
    for (w, db, da), r in zip(clients, ranks, strict=True):
        b_i = gb[:, :r].double() * (r / R) + db.double()
        a_i = ga[:r].double() + da.double()
        target = target + server_lr * w * (alpha / r) * b_i @ a_i
    t, best, error = reference(terms, R)
    torch.testing.assert_close(s * t, target, rtol=1e-12, atol=1e-12)

    got = exact.factorise(terms, R)
    torch.testing.assert_close(got.b @ got.a, best, rtol=1e-10, atol=1e-10)
    assert got.error == pytest.approx(error, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(got.a @ got.a.T, torch.eye(R, dtype=torch.float64))
    if sum(ranks) <= R and server_lr == 1.0:
        assert got.error < 1e-12
        torch.testing.assert_close(got.b @ got.a, t, rtol=1e-10, atol=1e-10)


def test_a_sum_of_rank_at_most_r_is_reproduced_with_zero_error() -> None:
    """Clients whose updates share one r-dimensional row space: the mean has rank r, and the
    re-factorised adapter is the mean itself."""
    g = gen(1)
    shared_a = torch.randn(R, IN, generator=g)
    clients = [(0.25, torch.randn(OUT, R, generator=g), shared_a) for _ in range(4)]
    terms = exact.layer_terms(torch.zeros(OUT, R), torch.zeros(R, IN), clients, 1.0)
    t, _, _ = reference(terms, R)
    got = exact.factorise(terms, R)
    assert got.error < 1e-7
    torch.testing.assert_close(got.b @ got.a, t, rtol=1e-10, atol=1e-10)


def test_a_truncated_global_is_the_best_approximation_at_the_clients_rank() -> None:
    g = gen(2)
    terms = [(1.0, torch.randn(OUT, 6, generator=g), torch.randn(6, IN, generator=g))]
    f = exact.factorise(terms, R)
    adapter = {"x.lora_A.weight": f.a.float(), "x.lora_B.weight": f.b.float()}
    small = exact.at_rank(adapter, 2)
    assert small["x.lora_A.weight"].shape == (2, IN)
    # alpha / 2 * B_2 A_2 == alpha / R * (rank-2 truncation of B A)
    product = (R / 2) * small["x.lora_B.weight"].double() @ small["x.lora_A.weight"].double()
    _, best2, _ = reference([(1.0, f.b, f.a)], 2)
    torch.testing.assert_close(product, best2, rtol=1e-5, atol=1e-5)
    assert exact.at_rank(adapter, R) == adapter


def test_the_aggregator_merges_products_at_heterogeneous_ranks(file_store: st.FileStore) -> None:
    """Through the real aggregator: a rank-4 and a rank-2 client; the new global is the rank-4
    truncation of their weighted mean product, and the round record has the error."""
    g0 = random_tensors(0, 0.3)
    write_global(file_store, 0, g0)
    small = exact.shapes_at_rank(SHAPES, 2)
    deltas = {"alpha": random_tensors(1, 0.1), "bravo": random_tensors(2, 0.1, shapes=small)}
    samples = {"alpha": 10, "bravo": 30}
    for c, d in deltas.items():
        put_delta(file_store, 1, c, d, samples=samples[c])
    t = task(
        file_store,
        1,
        ["alpha", "bravo"],
        aggregation=EXACT,
        client_ranks={"bravo": 2},
        retain_client_deltas=True,  # the round is aggregated again below
    )
    summary = aggregate.run(t, file_store, quiet)
    assert summary.record.accepted == 2
    new = global_tensors(file_store, 1)
    errors = []
    for a_name, b_name in exact.lora_pairs(sorted(SHAPES)):
        clients = [
            (samples[c] / 40, deltas[c][b_name], deltas[c][a_name]) for c in ("alpha", "bravo")
        ]
        terms = exact.layer_terms(g0[b_name], g0[a_name], clients, 1.0)
        _, best, error = reference(terms, 4)
        torch.testing.assert_close(
            new[b_name].double() @ new[a_name].double(), best, rtol=1e-5, atol=1e-5
        )
        errors.append(error)
    assert summary.record.truncation_error_max == pytest.approx(max(errors), rel=1e-6)
    assert 0 < summary.record.truncation_error <= summary.record.truncation_error_max

    # A rank-2 client that sends rank-4 tensors is refused, not merged.
    put_delta(file_store, 1, "bravo", random_tensors(3, 0.1))
    again = aggregate.run(t.model_copy(update={"attempt": 1}), file_store, quiet)
    assert [x.client for x in again.record.rejections] == ["bravo"]


def test_a_small_rank_client_trains_the_tiny_model_and_merges(
    demo: Demo, file_store: st.FileStore
) -> None:
    """End to end in process: round 0, a rank-4 and a rank-2 client train the tiny model from
    the global, the exact aggregator merges them, and round 2's rank-2 client starts from the
    global's top two directions."""
    lossless = DeltaSpec(dtype="fp32", compression="none")
    aggregate.run(init_task(demo, file_store), file_store, quiet)
    ranks = {"client-0": ADAPTER.r, "client-1": 2}

    def agg(r: int):
        base = init_task(demo, file_store).model_copy(
            update={
                "round": r,
                "clients": list(ranks),
                "aggregation": EXACT,
                "delta": lossless,
                "client_ranks": {"client-1": 2},
            }
        )
        return aggregate.run(type(base).model_validate(base.model_dump()), file_store, quiet)

    for r in (1, 2):
        for i, (name, rank) in enumerate(ranks.items()):
            adapter = AdapterSpec(**{**ADAPTER.model_dump(), "r": rank})
            t = client_task(
                demo, file_store, r, lossless, client=name, adapter=adapter,
                data_uri=str(demo.client_data(i)),
            )  # fmt: skip
            t = t.model_copy(update={"training": t.training.model_copy(update={"local_steps": 2})})
            assert client.run(t, file_store, quiet) is not None
        summary = agg(r)
        assert summary.record.accepted == 2
        assert summary.record.truncation_error is not None
        assert 0 <= summary.record.truncation_error < 1
    new = global_tensors(file_store, 2)
    assert {t.shape[0] for n, t in new.items() if ".lora_A." in n} == {ADAPTER.r}
