"""The round rules (fedtune_operator.rounds), one table per rule."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from fedtune_operator import rounds, validation
from fedtune_operator.api import FederatedFineTuneSpec

T0 = dt.datetime(2026, 11, 24, 12, 0, 0, tzinfo=dt.UTC)


# --------------------------------------------------------------------------------------------
# Client selection and quorum
# --------------------------------------------------------------------------------------------


def _spec_with_clients(n: int, **aggregation: Any) -> FederatedFineTuneSpec:
    body: dict[str, Any] = {
        "baseModel": "s3://models/tiny",
        "storage": {"uri": "s3://bucket/runs/x"},
    }
    body["clients"] = [{"name": f"c{i}", "dataUri": f"s3://data/c{i}.jsonl"} for i in range(n)]
    body["aggregation"] = aggregation
    return validation.parse_spec(body)


@pytest.mark.parametrize(
    ("n", "aggregation", "selected", "quorum"),
    [
        (10, {}, 10, 10),
        (10, {"clientsPerRound": 3}, 3, 3),
        (10, {"clientsPerRound": 3, "minClients": 2}, 3, 2),
        (10, {"clientFraction": 0.25}, 3, 3),
        (30, {"clientFraction": 0.1}, 3, 3),
        (3, {"clientFraction": 0.01}, 1, 1),
        (10, {"clientFraction": 1.0, "minClients": 7}, 10, 7),
    ],
)
def test_clients_per_round_and_quorum(
    n: int, aggregation: dict[str, Any], selected: int, quorum: int
) -> None:
    spec = _spec_with_clients(n, **aggregation)
    assert rounds.clients_per_round(spec) == selected
    assert rounds.quorum(spec) == quorum
    assert validation.validate_spec(spec) == []


def test_selection_is_deterministic_sized_and_in_spec_order() -> None:
    spec = _spec_with_clients(10, clientsPerRound=4, samplingSeed=3)
    names = [c.name for c in spec.clients]
    chosen_per_round = [rounds.select_clients(spec, r) for r in range(1, 21)]
    assert chosen_per_round == [rounds.select_clients(spec, r) for r in range(1, 21)]
    for chosen in chosen_per_round:
        assert len(chosen) == 4
        assert chosen == sorted(chosen, key=names.index)
    assert len({tuple(c) for c in chosen_per_round}) > 5
    other_seed = _spec_with_clients(10, clientsPerRound=4, samplingSeed=4)
    assert [rounds.select_clients(other_seed, r) for r in range(1, 21)] != chosen_per_round


def test_every_client_trains_when_no_sampling_is_asked() -> None:
    spec = _spec_with_clients(5)
    assert rounds.select_clients(spec, 7) == ["c0", "c1", "c2", "c3", "c4"]


# --------------------------------------------------------------------------------------------
# When a round ends
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quorum", "done", "pending", "expired", "verdict"),
    [
        (3, 0, 3, False, "wait"),
        (3, 2, 1, False, "wait"),
        (3, 3, 0, False, "aggregate"),
        (2, 2, 1, False, "wait"),  # the quorum is in, but nobody said stop waiting
        (2, 2, 1, True, "aggregate"),  # ... until the timeout
        (2, 1, 1, True, "timed_out"),
        (3, 1, 1, False, "quorum_lost"),  # even if both pending succeed, 2 < 3
        (3, 1, 1, True, "quorum_lost"),
        (1, 0, 0, False, "quorum_lost"),
    ],
)
def test_verdict(quorum: int, done: int, pending: int, expired: bool, verdict: str) -> None:
    spec = _spec_with_clients(3, minClients=quorum)
    assert rounds.verdict(spec, done, pending, expired) == verdict


@pytest.mark.parametrize(
    ("timeout", "elapsed", "expired"),
    [(None, 10**6, False), (60, 59, False), (60, 60, True), (60, 61, True)],
)
def test_timed_out(timeout: int | None, elapsed: int, expired: bool) -> None:
    spec = _spec_with_clients(3, roundTimeoutSeconds=timeout)
    now = T0 + dt.timedelta(seconds=elapsed)
    assert rounds.timed_out(spec, T0, now) is expired
    assert rounds.timed_out(spec, None, now) is False


@pytest.mark.parametrize(
    ("retries", "attempt", "may"), [(0, 0, False), (2, 0, True), (2, 1, True), (2, 2, False)]
)
def test_may_retry(retries: int, attempt: int, may: bool) -> None:
    spec = _spec_with_clients(3, maxRoundRetries=retries)
    assert rounds.may_retry(spec, attempt) is may


@pytest.mark.parametrize(
    ("conditions", "state"),
    [
        ([], "active"),
        ([{"type": "Suspended", "status": "True"}], "active"),
        ([{"type": "Complete", "status": "False"}], "active"),
        ([{"type": "Complete", "status": "True"}], "succeeded"),
        ([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}], "failed"),
        (
            [{"type": "FailureTarget", "status": "True"}, {"type": "Failed", "status": "True"}],
            "failed",
        ),
    ],
)
def test_job_state(conditions: list[dict[str, str]], state: str) -> None:
    got, cond = rounds.job_state({"conditions": conditions})
    assert got == state
    assert (cond is None) is (state == "active")
