"""Status models and the pure helpers the engine builds status with."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune_operator import api, status_updates, validation
from fedtune_trainer.wire import results

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)


# status.history's fields that are the aggregator's round record's, and the record's names.
FROM_ROUND_RECORD = [
    ("round", "round"),
    ("clients_succeeded", "accepted"),
    ("rejected", "rejected"),
    ("train_loss", "train_loss"),
    ("eval_loss", "eval_loss"),
    ("bytes_received", "bytes_received"),
    ("truncation_error", "truncation_error"),
    ("epsilon", "epsilon"),
]


def field_schema(model: type[api.StatusModel] | type[results.RoundRecord], field: str) -> dict:
    """A field's JSON schema: its type, bounds, default and description, not its title."""
    alias = model.model_fields[field].alias or field
    schema = dict(model.model_json_schema(by_alias=True)["properties"][alias])
    schema.pop("title", None)
    return schema


@pytest.mark.parametrize(("field", "source"), FROM_ROUND_RECORD)
def test_history_fields_are_the_round_records(field: str, source: str) -> None:
    """One account of a round: status.history states what results.RoundRecord states, with the
    same type, default and description, and at most a tighter bound (round <= MAX_ROUNDS)."""
    ours = field_schema(api.RoundRecord, field)
    theirs = field_schema(results.RoundRecord, source)
    assert ours.pop("maximum", None) in (None, api.MAX_ROUNDS)
    assert ours == theirs


def test_history_has_only_the_round_records_fields_and_the_operators() -> None:
    """A field added to the history entry either comes from the round record or is the
    operator's own observation of the round's Jobs."""
    operators = {"attempt", "started_at", "completed_at", "clients_failed"}
    assert set(api.RoundRecord.model_fields) == {f for f, _ in FROM_ROUND_RECORD} | operators


def test_new_condition_is_appended_with_now() -> None:
    conditions = status_updates.set_condition(
        [], api.PROGRESSING, "True", "RoundStarted", "round 1", T0, 3
    )
    assert len(conditions) == 1
    c = conditions[0]
    assert (c.type, c.status, c.reason, c.message) == (
        "Progressing",
        "True",
        "RoundStarted",
        "round 1",
    )
    assert c.last_transition_time == T0
    assert c.observed_generation == 3


def test_transition_time_moves_only_when_status_flips() -> None:
    first = status_updates.set_condition([], api.PROGRESSING, "True", "RoundStarted", "round 1", T0)
    same = status_updates.set_condition(
        first, api.PROGRESSING, "True", "RoundStarted", "round 2", T1
    )
    assert same[0].last_transition_time == T0
    assert same[0].message == "round 2"
    flipped = status_updates.set_condition(same, api.PROGRESSING, "False", "Completed", "done", T1)
    assert flipped[0].last_transition_time == T1


def test_set_condition_keeps_order_and_does_not_mutate() -> None:
    conditions = status_updates.set_condition([], api.SUSPENDED, "False", "NotSuspended", "", T0)
    conditions = status_updates.set_condition(
        conditions, api.PROGRESSING, "True", "Running", "", T0
    )
    before = list(conditions)
    updated = status_updates.set_condition(
        conditions, api.SUSPENDED, "True", "Suspended", "by user", T1
    )
    assert conditions == before
    assert [c.type for c in updated] == ["Suspended", "Progressing"]
    assert updated[1] is conditions[1]


def test_observed_generation_is_kept_when_not_given() -> None:
    conditions = status_updates.set_condition([], api.FAILED, "False", "Running", "", T0, 4)
    assert (
        status_updates.set_condition(conditions, api.FAILED, "False", "Running", "", T1)[
            0
        ].observed_generation
        == 4
    )


@pytest.mark.parametrize("outcome", api.OUTCOMES)
def test_outcomes_flip_together(outcome: str) -> None:
    conditions = status_updates.set_outcome([], "Progressing", "RoundStarted", "round 1", T0, 1)
    conditions = status_updates.set_outcome(conditions, outcome, "Reason", "why", T1, 2)
    true = [c.type for c in conditions if c.status == "True"]
    assert true == [outcome]
    assert {c.type for c in conditions} == set(api.OUTCOMES)
    assert all(c.observed_generation == 2 for c in conditions)
    progressing = status_updates.get_condition(conditions, api.PROGRESSING)
    assert progressing is not None
    assert progressing.last_transition_time == (T0 if outcome == "Progressing" else T1)


def test_set_outcome_refuses_a_non_outcome() -> None:
    with pytest.raises(ValueError, match="outcome"):
        status_updates.set_outcome([], "Suspended", "X", "", T0)  # type: ignore[arg-type]


def test_get_condition_selects_by_type() -> None:
    conditions = status_updates.set_condition([], api.SUCCEEDED, "True", "Done", "", T0)
    conditions = status_updates.set_condition(
        conditions, api.SUSPENDED, "False", "NotSuspended", "", T0
    )
    found = status_updates.get_condition(conditions, api.SUCCEEDED)
    assert found is not None
    assert found.status == "True"
    assert status_updates.get_condition(conditions, api.FAILED) is None


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(api.CONDITION_TYPES), st.sampled_from(["True", "False", "Unknown"])
        ),
        max_size=30,
    )
)
def test_condition_invariants(updates: list[tuple[str, str]]) -> None:
    """Types stay unique, and each lastTransitionTime is the time of that type's last flip."""
    conditions: list[api.Condition] = []
    last_flip: dict[str, datetime] = {}
    last_status: dict[str, str] = {}
    for i, (type_, status) in enumerate(updates):
        now = T0 + timedelta(seconds=i)
        if last_status.get(type_) != status:
            last_flip[type_] = now
        last_status[type_] = status
        conditions = status_updates.set_condition(conditions, type_, status, "Reason", "", now)  # type: ignore[arg-type]
    assert len({c.type for c in conditions}) == len(conditions)
    for c in conditions:
        assert c.status == last_status[c.type]
        assert c.last_transition_time == last_flip[c.type]


def test_record_round_replaces_a_retried_round_and_keeps_the_last_fifty() -> None:
    history: list[api.RoundRecord] = []
    for r in range(1, 61):
        history = status_updates.record_round(
            history, api.RoundRecord(round=r, clients_succeeded=1)
        )
    assert len(history) == api.HISTORY_LIMIT
    assert [h.round for h in history] == list(range(11, 61))
    retried = status_updates.record_round(
        history, api.RoundRecord(round=60, attempt=1, clients_failed=2)
    )
    assert len(retried) == api.HISTORY_LIMIT
    assert retried[-1].attempt == 1
    assert retried[-1].clients_failed == 2


def test_set_client_status_by_name() -> None:
    clients = status_updates.set_client_status([], api.ClientStatus(name="a", phase="Running"))
    clients = status_updates.set_client_status(clients, api.ClientStatus(name="b", phase="Pending"))
    clients = status_updates.set_client_status(
        clients, api.ClientStatus(name="a", phase="Succeeded", bytes_sent=10)
    )
    assert [(c.name, c.phase, c.bytes_sent) for c in clients] == [
        ("a", "Succeeded", 10),
        ("b", "Pending", 0),
    ]


@pytest.mark.parametrize(
    ("sent", "full", "ratio", "text"),
    [(1000, 41_200, 41.2, "41.2x"), (3, 10, 3.333, "3.3x"), (0, 100, None, None)],
)
def test_communication_totals(sent: int, full: int, ratio: float | None, text: str | None) -> None:
    totals = status_updates.communication_totals(sent, full)
    assert totals.bytes_sent == sent
    assert totals.full_model_equivalent_bytes == full
    assert totals.reduction_ratio == ratio
    assert totals.reduction == text


def test_communication_totals_refuse_negative_counts() -> None:
    with pytest.raises(ValueError, match="negative"):
        status_updates.communication_totals(-1, 10)


def test_progress() -> None:
    assert status_updates.progress(3, 10) == "3/10"


@pytest.mark.parametrize(
    ("value", "shown"), [(2.345678, 2.346), (0.000123456, 0.0001235), (12345.6, 12350.0)]
)
def test_losses_are_rounded_to_four_digits(value: float, shown: float) -> None:
    assert api.FederatedFineTuneStatus(last_train_loss=value).last_train_loss == shown


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        api.ClientStatus(name="a", last_loss=bad)


def test_timestamps_are_utc_seconds_on_the_wire() -> None:
    local = datetime(2025, 3, 1, 14, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    status = api.FederatedFineTuneStatus(start_time=local)
    assert status.wire()["startTime"] == "2025-03-01T12:00:00Z"


def test_naive_timestamp_is_refused() -> None:
    with pytest.raises(ValueError, match="time zone"):
        api.FederatedFineTuneStatus(start_time=datetime(2025, 1, 1))


def full_status() -> api.FederatedFineTuneStatus:
    """A status with every field set, built the way the engine builds one."""
    conditions = status_updates.set_outcome(
        [], "Progressing", "RoundStarted", "round 3 of 10", T0, 2
    )
    conditions = status_updates.set_condition(
        conditions, api.SUSPENDED, "False", "NotSuspended", "", T0, 2
    )
    return api.FederatedFineTuneStatus(
        observed_generation=2,
        conditions=conditions,
        phase="Aggregating",
        current_round=3,
        round_attempt=1,
        round_progress=status_updates.progress(3, 10),
        selected_clients=["a", "b"],
        client_progress=status_updates.progress(2, 2),
        round_started_at=T0,
        aggregating_clients=["a", "b"],
        evaluating_rounds=[2],
        clients=[
            api.ClientStatus(
                name="a", phase="Succeeded", last_round=3, samples=100, last_loss=1.5, bytes_sent=10
            ),
            api.ClientStatus(name="b", phase="Rejected", last_round=3, message="norm too large"),
        ],
        history=[
            api.RoundRecord(
                round=2,
                attempt=0,
                started_at=T0,
                completed_at=T1,
                clients_succeeded=2,
                clients_failed=0,
                rejected=1,
                train_loss=1.7,
                eval_loss=1.9,
                bytes_received=20,
            )
        ],
        global_adapter_uri="s3://b/run/rounds/000002/global/",
        final_adapter_uri="s3://b/run/final/",
        report_uri="s3://b/run/report/report.html",
        communication=status_updates.communication_totals(20, 824),
        last_train_loss=1.7,
        last_eval_loss=1.9,
        start_time=T0,
        completion_time=T1,
    )


def test_status_round_trips_through_its_wire_form() -> None:
    status = full_status()
    assert validation.parse_status(status.wire()) == status


def test_status_parse_ignores_unknown_fields_from_other_operator_versions() -> None:
    wire = full_status().wire() | {"fieldFromTheFuture": 1}
    assert validation.parse_status(wire) == full_status()


def test_empty_status() -> None:
    assert validation.parse_status(None) == api.FederatedFineTuneStatus()
    assert validation.parse_status({}).conditions == []


def test_malformed_status_names_the_field() -> None:
    with pytest.raises(validation.SpecError, match=r"^status\.currentRound: "):
        validation.parse_status({"currentRound": -1})
