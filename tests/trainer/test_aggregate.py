"""Aggregation: every algorithm against a float64 reference, validation, quorum, DP, idempotency."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pytest
import torch

from fedtune_trainer import aggregate
from fedtune_trainer.aggregation import bounds, intake
from fedtune_trainer.aggregation.reducers import WeightedMean
from fedtune_trainer.aggregation.robust import coordinate_median, trimmed_mean
from fedtune_trainer.codec import encoding as codec
from fedtune_trainer.codec.container import DELTA_FILE
from fedtune_trainer.storage import store as st
from fedtune_trainer.wire.errors import QuorumError
from fedtune_trainer.wire.layout import (
    SERVER_STATE_PREFIX,
    client_prefix,
    global_prefix,
    round_prefix,
)
from fedtune_trainer.wire.results import AggregateSummary, RoundRecord
from fedtune_trainer.wire.settings import AdapterSpec, AggregationSpec, PrivacySpec
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

CLIENTS = ["alpha", "bravo", "charlie", "delta", "echo"]
SAMPLES = {"alpha": 10, "bravo": 30, "charlie": 5, "delta": 50, "echo": 20}
CLIENT_WEIGHTS = {"bravo": 2.0, "echo": 0.5}

ALGORITHMS = [
    AggregationSpec(algorithm="fedavg"),
    AggregationSpec(algorithm="fedavg", server_learning_rate=0.5),
    AggregationSpec(algorithm="fedavgm", server_momentum=0.9),
    AggregationSpec(algorithm="fedadam", server_learning_rate=0.01, epsilon=1e-3),
    AggregationSpec(algorithm="fedyogi", server_learning_rate=0.01, epsilon=1e-3, beta2=0.9),
    AggregationSpec(algorithm="median"),
    AggregationSpec(algorithm="trimmedMean", trim_fraction=0.2),
]


def quiet(_: str) -> None:
    pass


def run_round(store: st.Store, r: int, spec: AggregationSpec, **kw: object) -> AggregateSummary:
    t = task(store, r, CLIENTS, aggregation=spec, client_weights=CLIENT_WEIGHTS, **kw)
    return aggregate.run(t, store, quiet)


def accepted(summary: AggregateSummary) -> list[str]:
    return [c.client for c in summary.record.contributions]


def read_record(store: st.Store, r: int) -> RoundRecord:
    return RoundRecord.model_validate_json(
        store.get_bytes(st.join(round_prefix(r), "metrics.json"))
    )


@pytest.mark.parametrize(
    "spec", ALGORITHMS, ids=lambda s: f"{s.algorithm}-lr{s.server_learning_rate}"
)
def test_every_algorithm_matches_a_float64_reference_over_two_rounds(
    file_store: st.FileStore, spec: AggregationSpec
) -> None:
    g0 = random_tensors(0)
    write_global(file_store, 0, g0)
    x = as_numpy(g0)
    state: dict = {}
    raw = [SAMPLES[c] * CLIENT_WEIGHTS.get(c, 1.0) for c in CLIENTS]
    weights = reference_capped_weights(raw, spec.max_client_share)
    for r in (1, 2):
        deltas = [random_tensors(100 * r + i, scale=0.1) for i in range(len(CLIENTS))]
        for c, d in zip(CLIENTS, deltas, strict=True):
            put_delta(file_store, r, c, d, samples=SAMPLES[c])
        summary = run_round(file_store, r, spec)
        assert accepted(summary) == CLIENTS
        assert summary.record.rejections == []
        x = reference_round(spec, x, [as_numpy(d) for d in deltas], weights, state)
        got = read_global(file_store, r)
        for name in SHAPES:
            np.testing.assert_allclose(got[name].double().numpy(), x[name], rtol=1e-5, atol=1e-6)
    has_state = spec.algorithm in ("fedavgm", "fedadam", "fedyogi")
    assert st.committed_versions(file_store, SERVER_STATE_PREFIX) == ([1, 2] if has_state else [])


def test_weighted_mean_streams_in_any_order() -> None:
    deltas = [random_tensors(i) for i in range(6)]
    weights = [1.0, 2.0, 3.0, 0.5, 7.0, 1.5]
    forward, backward = WeightedMean(), WeightedMean()
    for d, w in zip(deltas, weights, strict=True):
        forward.add(d, w)
    for d, w in reversed(list(zip(deltas, weights, strict=True))):
        backward.add(d, w)
    a, b = forward.result(), backward.result()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("n", "expected_median", "expected_trimmed"),
    # trimmed mean with a 0.34 cut: floor(0.34 n) = 0, 0, 1, 1, 1 values dropped at each end
    [(1, 4.0, 4.0), (2, 2.5, 2.5), (3, 1.0, 1.0), (4, 1.5, 1.5), (5, 2.0, 7 / 3)],
)
def test_robust_statistics_on_known_values(
    n: int, expected_median: float, expected_trimmed: float
) -> None:
    values = torch.tensor([4.0, 1.0, 0.0, 2.0, 100.0][:n]).view(n, 1)
    assert float(coordinate_median(values)) == pytest.approx(expected_median)
    assert float(trimmed_mean(values, 0.34)) == pytest.approx(expected_trimmed)


# ------------------------------------------------------------------------------------------
# Validation: bad deltas are dropped and recorded, the rest merged
# ------------------------------------------------------------------------------------------


def _nan(store: st.Store) -> None:
    d = random_tensors(9, 0.1)
    next(iter(d.values()))[0, 0] = float("nan")
    put_delta(store, 1, "echo", d)


def _inf(store: st.Store) -> None:
    d = random_tensors(9, 0.1)
    next(iter(d.values()))[1, 1] = float("inf")
    put_delta(store, 1, "echo", d)


def _wrong_shape(store: st.Store) -> None:
    d = random_tensors(9, 0.1)
    name = next(iter(d))
    d[name] = torch.zeros(5, 16)
    put_delta(store, 1, "echo", d)


def _missing_tensor(store: st.Store) -> None:
    d = random_tensors(9, 0.1)
    d.pop(next(iter(d)))
    put_delta(store, 1, "echo", d)


def _unknown_tensor(store: st.Store) -> None:
    put_delta(store, 1, "echo", {**random_tensors(9, 0.1), "extra.weight": torch.zeros(2)})


def _truncated(store: st.Store) -> None:
    put_delta(store, 1, "echo", random_tensors(9, 0.1))
    key = st.join(client_prefix(1, "echo"), DELTA_FILE)
    store.put_bytes(key, store.get_bytes(key)[:-50])


def _bad_checksum(store: st.Store) -> None:
    put_delta(store, 1, "echo", random_tensors(9, 0.1))
    key = st.join(client_prefix(1, "echo"), DELTA_FILE)
    data = bytearray(store.get_bytes(key))
    data[-3] ^= 0xFF
    store.put_bytes(key, bytes(data))


def _oversized_norm(store: st.Store) -> None:
    put_delta(store, 1, "echo", random_tensors(9, 100.0))


def _uncommitted(store: st.Store) -> None:
    enc = codec.encode(random_tensors(9, 0.1), codec.DeltaSpec(dtype="fp32"))
    store.put_bytes(st.join(client_prefix(1, "echo"), DELTA_FILE), enc.blob)


def _garbage(store: st.Store) -> None:
    blob = b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"not a header at all" * 3
    meta = {"run": "t", "round": 1, "client": "echo", "samples": 3}
    st.commit(store, client_prefix(1, "echo"), {DELTA_FILE: blob}, meta)


def _bad_manifest_fields(store: st.Store) -> None:
    enc = codec.encode(random_tensors(9, 0.1), codec.DeltaSpec(dtype="fp32"))
    meta = {"run": "t", "round": 1, "client": "echo", "samples": 3, "train_loss": "NaN-ish"}
    st.commit(store, client_prefix(1, "echo"), {DELTA_FILE: enc.blob}, meta)


def _wrong_round(store: st.Store) -> None:
    enc = put_delta(store, 1, "echo", random_tensors(9, 0.1))
    meta = codec.manifest_fields(
        enc, run="t", round_=0, client="echo", samples=1, steps=1, train_loss=1.0
    )
    st.commit(store, client_prefix(1, "echo"), {DELTA_FILE: enc.blob}, meta)


BAD: list[tuple[str, Callable[[st.Store], None], str]] = [
    ("nan", _nan, "non-finite"),
    ("inf", _inf, "non-finite"),
    ("wrong-shape", _wrong_shape, r"shape of .*: \(5, 16\) != \(4, 16\)"),
    ("missing-tensor", _missing_tensor, "missing tensors"),
    # An extra tensor makes the file larger than any delta of this adapter: refused unread.
    ("unknown-tensor", _unknown_tensor, "oversized, declares"),
    ("truncated", _truncated, "truncated"),
    ("bad-checksum", _bad_checksum, "checksum mismatch"),
    ("oversized-norm", _oversized_norm, "exceeds maxDeltaNorm"),
    ("uncommitted", _uncommitted, "no committed delta"),
    ("garbage", _garbage, "corrupt header"),
    ("wrong-round", _wrong_round, "replayed: the manifest names run .* round 0"),
    ("bad-manifest-fields", _bad_manifest_fields, "bad train loss"),
]


@pytest.mark.parametrize(("case", "make_bad", "reason"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_delta_is_rejected_and_the_rest_merged(
    file_store: st.FileStore, case: str, make_bad: Callable[[st.Store], None], reason: str
) -> None:
    g0 = random_tensors(0)
    write_global(file_store, 0, g0)
    good = {c: random_tensors(i, 0.1) for i, c in enumerate(CLIENTS[:4])}
    for c, d in good.items():
        put_delta(file_store, 1, c, d, samples=SAMPLES[c])
    make_bad(file_store)
    spec = AggregationSpec(max_delta_norm=50.0)
    summary = aggregate.run(
        task(file_store, 1, CLIENTS, aggregation=spec, min_clients=4), file_store, quiet
    )
    assert accepted(summary) == CLIENTS[:4]
    rejections = summary.record.rejections
    assert [r.client for r in rejections] == ["echo"]
    assert (summary.record.accepted, summary.record.rejected) == (4, 1)
    assert rejections[0].reason
    assert len(rejections[0].reason) <= 200
    assert re.search(reason, rejections[0].reason), rejections[0].reason
    weights = reference_capped_weights([SAMPLES[c] for c in good], spec.max_client_share)
    x = reference_round(spec, as_numpy(g0), [as_numpy(d) for d in good.values()], weights, {})
    got = read_global(file_store, 1)
    for name in SHAPES:
        np.testing.assert_allclose(got[name].double().numpy(), x[name], rtol=1e-5, atol=1e-6)
    record = read_record(file_store, 1)
    assert record.rejections[0].client == "echo"
    assert record.rejected == 1


def test_quorum_failure_writes_nothing_global(file_store: st.FileStore) -> None:
    write_global(file_store, 0, random_tensors(0))
    for i, c in enumerate(CLIENTS[:2]):
        put_delta(file_store, 1, c, random_tensors(i, 0.1))
    _nan(file_store)  # echo: rejected; charlie and delta: nothing committed
    t = task(
        file_store, 1, CLIENTS, aggregation=AggregationSpec(algorithm="fedadam"), min_clients=3
    )
    with pytest.raises(QuorumError, match=r"2 valid deltas of 5, quorum is 3") as info:
        aggregate.run(t, file_store, quiet)
    assert "echo: non-finite" in str(info.value)
    assert file_store.list(global_prefix(1)) == []
    assert file_store.list(SERVER_STATE_PREFIX) == []
    assert not file_store.exists(st.join(round_prefix(1), "metrics.json"))


def test_a_rerun_of_a_round_does_not_step_the_server_optimizer_twice(
    file_store: st.FileStore,
) -> None:
    spec = AggregationSpec(algorithm="fedadam", server_learning_rate=0.01)
    write_global(file_store, 0, random_tensors(0))
    for r in (1, 2):
        for i, c in enumerate(CLIENTS):
            put_delta(file_store, r, c, random_tensors(10 * r + i, 0.1), samples=SAMPLES[c])
    run_round(file_store, 1, spec)
    run_round(file_store, 2, spec)
    first = read_global(file_store, 2)
    state_keys = file_store.list(SERVER_STATE_PREFIX + "/")
    run_round(file_store, 2, spec)  # the Job of round 2 retried
    again = read_global(file_store, 2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert file_store.list(SERVER_STATE_PREFIX + "/") == state_keys
    assert st.committed_versions(file_store, SERVER_STATE_PREFIX) == [1, 2]


def test_clipping_bounds_each_client_and_noise_has_the_stated_std(file_store: st.FileStore) -> None:
    shapes = {"w.lora_A.weight": (64, 64), "w.lora_B.weight": (64, 64)}
    g0 = random_tensors(0, shapes=shapes)
    write_global(file_store, 0, g0)
    deltas = [random_tensors(i + 1, scale=0.05 * (i + 1), shapes=shapes) for i in range(4)]
    clients = CLIENTS[:4]
    for c, d in zip(clients, deltas, strict=True):
        put_delta(file_store, 1, c, d, samples=SAMPLES[c])
    clip = 5.0
    norms = [bounds.l2_norm(d) for d in deltas]
    assert min(norms) < clip < max(norms)  # some clipped, some not
    clipped = [
        {k: v * min(1.0, clip / n) for k, v in d.items()}
        for d, n in zip(deltas, norms, strict=True)
    ]
    uniform = reference_round(
        AggregationSpec(), as_numpy(g0), [as_numpy(d) for d in clipped], [1.0] * 4, {}
    )

    attempts = iter(range(100))

    def dp_round(noise: float) -> dict[str, torch.Tensor]:
        """Round 1 again, as a new attempt over the same (retained) deltas."""
        privacy = PrivacySpec(clip_norm=clip, noise_multiplier=noise)
        t = task(
            file_store,
            1,
            clients,
            privacy=privacy,
            attempt=next(attempts),
            retain_client_deltas=True,
        )
        aggregate.run(t, file_store, quiet)
        return read_global(file_store, 1)

    # Clipping only: sample weights still apply (under the default share cap).
    weighted = reference_round(
        AggregationSpec(),
        as_numpy(g0),
        [as_numpy(d) for d in clipped],
        reference_capped_weights([SAMPLES[c] for c in clients], 0.5),
        {},
    )
    got = dp_round(0.0)
    for name in shapes:
        np.testing.assert_allclose(got[name].double().numpy(), weighted[name], rtol=1e-5, atol=1e-6)
    # With noise: uniform weights, Gaussian noise of std z * C / n, drawn afresh by another
    # attempt (test_privacy.py: keyed by privacy.noiseKeySecret, the same).
    z = 0.8
    noisy = dp_round(z)
    assert not any(torch.equal(noisy[k], dp_round(z)[k]) for k in noisy)
    residual = np.concatenate([(noisy[k].double().numpy() - uniform[k]).ravel() for k in shapes])
    assert abs(residual.mean()) < 0.05 * z * clip / 4
    assert residual.std() == pytest.approx(z * clip / 4, rel=0.05)


def test_frozen_lora_a_is_neither_expected_nor_changed(file_store: st.FileStore) -> None:
    g0 = random_tensors(0)
    write_global(file_store, 0, g0)
    b_only = {n: s for n, s in SHAPES.items() if ".lora_B." in n}
    for i, c in enumerate(CLIENTS[:2]):
        put_delta(file_store, 1, c, random_tensors(i, 0.1, shapes=b_only))
    put_delta(file_store, 1, "charlie", random_tensors(7, 0.1))  # sends A too: rejected
    t = task(file_store, 1, CLIENTS[:3], adapter=AdapterSpec(freeze_a=True))
    summary = aggregate.run(t, file_store, quiet)
    assert accepted(summary) == CLIENTS[:2]
    # Sending A as well makes the file larger than any B-only delta: refused before reading it.
    assert re.search(r"oversized|unknown tensors", summary.record.rejections[0].reason)
    got = read_global(file_store, 1)
    for name in SHAPES:
        if ".lora_A." in name:
            assert torch.equal(got[name], g0[name])
        else:
            assert not torch.equal(got[name], g0[name])


def test_last_round_writes_final_and_metrics(file_store: st.FileStore) -> None:
    write_global(file_store, 2, random_tensors(0))
    losses = {"alpha": 2.0, "bravo": 4.0}
    for i, c in enumerate(losses):
        put_delta(
            file_store, 3, c, random_tensors(i, 0.1), samples=SAMPLES[c], train_loss=losses[c]
        )
    summary = aggregate.run(task(file_store, 3, list(losses), rounds=3), file_store, quiet)
    assert summary.final_uri == file_store.url("final")
    _, final = st.read_committed(file_store, "final")
    _, glob = st.read_committed(file_store, global_prefix(3))
    assert final == glob
    assert set(final) == {"adapter_config.json", "adapter_model.safetensors"}
    expected_loss = (10 * 2.0 + 30 * 4.0) / 40
    assert summary.record.train_loss == pytest.approx(expected_loss)
    record = read_record(file_store, 3)
    assert record == summary.record
    assert record.train_loss == pytest.approx(expected_loss)
    assert record.bytes_received > 0
    assert [c.client for c in record.contributions] == ["alpha", "bravo"]
    # Two clients: the default share cap, twice a fair share (2 / 2), caps nothing; the loss is
    # sample-weighted too (a report of what the clients said, not an input of the merge).
    assert [c.weight for c in record.contributions] == [10, 30]
    assert [c.share for c in record.contributions] == [0.25, 0.75]
    assert [c.capped for c in record.contributions] == [False, False]
    assert record.max_client_share == 1.0
    assert record.raw_bytes == 2 * 4 * sum(np.prod(s) for s in SHAPES.values())


def test_clients_are_discovered_when_the_task_names_none(file_store: st.FileStore) -> None:
    write_global(file_store, 0, random_tensors(0))
    for i, c in enumerate(["x1", "x2"]):
        put_delta(file_store, 1, c, random_tensors(i, 0.1))
    assert accepted(aggregate.run(task(file_store, 1, []), file_store, quiet)) == ["x1", "x2"]


def test_lossy_deltas_are_merged_as_decoded(file_store: st.FileStore) -> None:
    g0 = random_tensors(0)
    write_global(file_store, 0, g0)
    spec = codec.DeltaSpec(dtype="bf16", top_k=0.25, quantization={"bits": 4, "block_size": 16})
    sent = [
        put_delta(file_store, 1, c, random_tensors(i, 0.1), spec=spec).sent
        for i, c in enumerate(CLIENTS[:3])
    ]
    aggregate.run(task(file_store, 1, CLIENTS[:3], delta=spec), file_store, quiet)
    x = reference_round(
        AggregationSpec(), as_numpy(g0), [as_numpy(s) for s in sent], [10, 10, 10], {}
    )
    got = read_global(file_store, 1)
    for name in SHAPES:
        np.testing.assert_allclose(got[name].double().numpy(), x[name], rtol=1e-5, atol=1e-6)


FIRST = sorted(SHAPES)[0]
LAST = sorted(SHAPES)[-1]
EVEN = {c: 10 for c in CLIENTS[:4]}


def _late_nan(d: dict[str, torch.Tensor]) -> None:
    """Huge but finite in the first tensor it decodes, NaN in the last: rejected only after the
    first pass has folded the huge values in."""
    d[FIRST].fill_(1e30)
    d[LAST][0, 0] = float("nan")


def _early_nan(d: dict[str, torch.Tensor]) -> None:
    d[FIRST][0, 0] = float("nan")


def _huge(d: dict[str, torch.Tensor]) -> None:
    for t in d.values():
        t.mul_(1e4)


# (case, samples, fifth client's delta or None, maxDeltaNorm, decodes per accepted client)
ONE_DECODE = [
    ("nothing changes a factor", EVEN, None, None, 1),
    ("rejected before any tensor is folded", EVEN, _early_nan, None, 1),
    ("a share cap", {**EVEN, "alpha": 100}, None, None, 2),
    ("an outlier clip", EVEN, _huge, None, 2),
    ("rejected after its tensors were folded", EVEN, _late_nan, None, 2),
    ("over maxDeltaNorm once wholly folded", EVEN, _huge, 50.0, 2),
]


@pytest.mark.parametrize(
    ("case", "samples", "fifth", "max_norm", "decodes"), ONE_DECODE, ids=[c[0] for c in ONE_DECODE]
)
def test_the_mean_is_folded_from_the_checking_decode_unless_a_factor_changes(
    file_store: st.FileStore,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    samples: dict[str, int],
    fifth: Callable[[dict[str, torch.Tensor]], None] | None,
    max_norm: float | None,
    decodes: int,
) -> None:
    """A round decodes each delta once when the first pass's guess (raw weights, no clip) holds,
    and twice otherwise; either way the result is the float64 reference's, and a delta rejected
    after huge values of it were folded in leaves no trace (the mean is taken again, never
    corrected by subtraction)."""
    opened: list[str] = []
    real = intake.decode_file

    def counted(path, layout):  # type: ignore[no-untyped-def]
        opened.append(path.parent.name)
        return real(path, layout)

    monkeypatch.setattr(intake, "decode_file", counted)
    monkeypatch.setattr(aggregate, "decode_file", counted)
    g0 = random_tensors(0)
    write_global(file_store, 0, g0)
    deltas = {c: random_tensors(i, 0.1) for i, c in enumerate(samples)}
    for c, d in deltas.items():
        put_delta(file_store, 1, c, d, samples=samples[c])
    clients = list(samples)
    if fifth is not None:
        bad = random_tensors(9, 0.1)
        fifth(bad)
        put_delta(file_store, 1, "echo", bad)
        clients.append("echo")
        deltas["echo"] = bad
    spec = AggregationSpec(max_delta_norm=max_norm)
    summary = aggregate.run(task(file_store, 1, clients, aggregation=spec), file_store, quiet)

    merged = accepted(summary)
    assert opened.count("alpha") == decodes
    assert all(opened.count(c) == decodes for c in merged)
    norms = [float(bounds.l2_norm(deltas[c])) for c in merged]
    bound = spec.outlier_clip_factor * bounds.lower_median(norms)
    scaled = [
        as_numpy({n: t * min(1.0, bound / x) for n, t in deltas[c].items()})
        for c, x in zip(merged, norms, strict=True)
    ]
    weights = reference_capped_weights([samples.get(c, 10) for c in merged], spec.max_client_share)
    x = reference_round(spec, as_numpy(g0), scaled, weights, {})
    got = read_global(file_store, 1)
    for name in SHAPES:
        np.testing.assert_allclose(got[name].double().numpy(), x[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("value", "max_norm", "reason"),
    [
        (torch.ones(2, 2), None, None),
        (torch.ones(3, 2), None, r"shape of a: \(3, 2\) != \(2, 2\)"),
        (torch.tensor([[1.0, float("nan")], [0.0, 0.0]]), None, r"non-finite .* in a"),
        (torch.tensor([[float("inf"), 0.0], [0.0, 0.0]]), None, r"non-finite .* in a"),
        (torch.full((2, 2), 3.0), 5.0, r"delta norm 6 exceeds maxDeltaNorm 5"),
        (torch.full((2, 2), 3.0), 6.0, None),
    ],
)
def test_a_delta_is_checked_tensor_by_tensor_as_it_decodes(
    value: torch.Tensor, max_norm: float | None, reason: str | None
) -> None:
    """merge.checked_norm reads each tensor once through the decoder and returns the L2 norm of
    them all, or refuses the delta with the reason."""
    tensors = {"a": value, "b": torch.zeros(1, 2)}
    read: list[str] = []

    def decode(name: str) -> torch.Tensor:
        read.append(name)
        return tensors[name]

    shapes = {"a": (2, 2), "b": (1, 2)}
    if reason is None:
        assert bounds.checked_norm(decode, shapes, max_norm) == pytest.approx(
            float(value.double().norm())
        )
        assert read == ["a", "b"]
    else:
        with pytest.raises(ValueError, match=reason):
            bounds.checked_norm(decode, shapes, max_norm)


# ---------------------------------------------------------------------------------------------
# Individual deltas do not outlive their round; a rerun of a committed attempt reports it
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("retain", [False, True])
def test_a_rounds_client_deltas_go_once_it_is_committed(
    file_store: st.FileStore, retain: bool
) -> None:
    write_global(file_store, 0, random_tensors(0))
    sent = {c: put_delta(file_store, 1, c, random_tensors(i, 0.1)) for i, c in enumerate(CLIENTS)}
    put_delta(file_store, 1, "late", random_tensors(9, 0.1))  # committed, not in the task
    t = task(file_store, 1, CLIENTS, retain_client_deltas=retain)
    record = aggregate.run(t, file_store, quiet).record
    left = file_store.list(st.join(round_prefix(1), "clients") + "/")
    if retain:
        assert {key.split("/")[3] for key in left} == {*CLIENTS, "late"}
    else:
        assert left == []
    # What remains of each merged delta either way: its hash and its size.
    assert {c.client: (c.sha256, c.encoded_bytes) for c in record.contributions} == {
        c: (st.sha256_bytes(e.blob), len(e.blob)) for c, e in sent.items()
    }
    assert read_record(file_store, 1) == record


def test_a_rerun_of_a_committed_attempt_reports_it_and_a_new_attempt_computes_anew(
    file_store: st.FileStore,
) -> None:
    write_global(file_store, 0, random_tensors(0))
    for i, c in enumerate(CLIENTS):
        put_delta(file_store, 1, c, random_tensors(i, 0.1))
    t = task(file_store, 1, CLIENTS, min_clients=3)
    first = aggregate.run(t, file_store, quiet)
    committed = st.read_committed(file_store, global_prefix(1))
    lines: list[str] = []
    # As if the first attempt had died after its commit, before it deleted the deltas: the rerun
    # reports the committed round (it does not recompute) and deletes what was left.
    put_delta(file_store, 1, CLIENTS[0], random_tensors(99, 0.1))
    again = aggregate.run(t, file_store, lines.append)
    assert file_store.list(st.join(round_prefix(1), "clients") + "/") == []
    assert again.record == first.record
    assert again.global_uri == first.global_uri
    assert st.read_committed(file_store, global_prefix(1)) == committed
    assert any("attempt 0 is already committed" in line for line in lines)
    # The operator's next attempt computes the round anew, from what its clients send now.
    retry = t.model_copy(update={"attempt": 1})
    with pytest.raises(QuorumError, match="0 valid deltas"):
        aggregate.run(retry, file_store, quiet)
    for i, c in enumerate(CLIENTS):
        put_delta(file_store, 1, c, random_tensors(50 + i, 0.1))
    second = aggregate.run(retry, file_store, quiet)
    assert second.record.contributions != first.record.contributions
    manifest = st.read_manifest(file_store, global_prefix(1))
    assert manifest is not None
    assert manifest["attempt"] == 1
