"""The FederatedFineTune status: what the operator observed, written through the subresource.

`conditions` are the source of truth; `phase` is a one-word summary for people. The pure edits of
a status (conditions flipping together, history kept bounded) are in `status_updates.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, create_model

from fedtune_operator.api.schema import (
    CONDITION_TYPE_PATTERN,
    HISTORY_LIMIT,
    MAX_CLIENTS,
    MAX_ROUNDS,
    REASON_PATTERN,
    Count,
    Loss,
    Timestamp,
    bounded_str,
    k8s_extensions,
    map_list,
)
from fedtune_trainer.wire import results
from fedtune_trainer.wire.settings import ClientName, Model, Uri

# --------------------------------------------------------------------------------------------
# Status
# --------------------------------------------------------------------------------------------


class StatusModel(Model):
    """Status is written by the operator and read back by possibly another operator version:
    unknown fields are ignored rather than fatal."""

    model_config = ConfigDict(extra="ignore")


ConditionStatus = Literal["True", "False", "Unknown"]
PROGRESSING = "Progressing"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
SUSPENDED = "Suspended"
NETWORK_POLICY_READY = "NetworkPolicyReady"
"""True once the run's NetworkPolicy is applied; False while a policy of its name that the run
does not own keeps its Jobs waiting."""
EGRESS_UNCONFINED = "EgressUnconfined"
"""True while the run's derived egress opens a port to any address (a host-name or AWS S3
endpoint, a hub model); Unknown when the run has no NetworkPolicy of the operator's."""
CONDITION_TYPES = (
    PROGRESSING,
    SUCCEEDED,
    FAILED,
    SUSPENDED,
    NETWORK_POLICY_READY,
    EGRESS_UNCONFINED,
)
OUTCOMES = (PROGRESSING, SUCCEEDED, FAILED)
"""Mutually exclusive: exactly one is True once the operator has seen the run."""

Phase = Literal[
    "Pending", "Running", "Aggregating", "Evaluating", "Suspended", "Succeeded", "Failed"
]
ClientPhase = Literal["Idle", "Pending", "Running", "Succeeded", "Failed", "Rejected"]


class Condition(StatusModel):
    """The standard metav1.Condition."""

    type: Annotated[str, bounded_str(CONDITION_TYPE_PATTERN, 316)] = Field(
        description="Progressing, Succeeded, Failed, Suspended, NetworkPolicyReady or "
        "EgressUnconfined."
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    observed_generation: int | None = Field(
        None, ge=0, description="metadata.generation the condition was set for."
    )
    last_transition_time: Timestamp = Field(description="When status last changed.")
    reason: Annotated[str, bounded_str(REASON_PATTERN, 1024)] = Field(
        description="CamelCase, for machines."
    )
    message: Annotated[str, bounded_str(None, 32768, min_length=0)] = Field(
        description="For people."
    )


def _recorded(name: str, narrower: Any = None, *bounds: Any) -> tuple[Any, Any]:
    """A `status.history` field taken from the aggregator's round record
    (`results.RoundRecord.<name>`): its type, bounds, default and description, so that the
    operator's account of a round cannot drift from the aggregator's. `narrower` replaces the type
    by a narrower one, `bounds` add bounds (both what status and the CRD need, never a change of
    meaning)."""
    source = results.RoundRecord.model_fields[name]
    metadata = (*source.metadata, *bounds)
    kind = narrower or source.annotation
    return (
        Annotated[(kind, *metadata)] if metadata else kind,
        Field(source.default, description=source.description),
    )


_RecordedRound = create_model(
    "_RecordedRound",
    __base__=StatusModel,
    round=_recorded("round", None, Field(le=MAX_ROUNDS)),
    clients_succeeded=_recorded("accepted"),
    rejected=_recorded("rejected"),
    train_loss=_recorded("train_loss", Loss | None),
    eval_loss=_recorded("eval_loss", Loss | None),
    bytes_received=_recorded("bytes_received"),
    truncation_error=_recorded("truncation_error"),
    epsilon=_recorded("epsilon"),
)
"""The part of a history entry that is the aggregator's round record, derived from it field by
field (the operator copies the values in `engine.record_aggregate`; the evaluation Job's loss
fills evalLoss later). clientsSucceeded is the record's `accepted`: the clients whose delta was
merged."""


class RoundRecord(_RecordedRound):
    """What happened in one round (the latest attempt of it)."""

    attempt: int = Field(0, ge=0, le=1000, description="Retries of this round before this one.")
    started_at: Timestamp | None = Field(
        None, description="When the round's first Job was created."
    )
    completed_at: Timestamp | None = Field(None, description="When its aggregation finished.")
    clients_failed: Count = Field(0, description="Client Jobs that failed for good.")


class ClientStatus(StatusModel):
    """One client's latest state."""

    name: ClientName = Field(description="The client's name in spec.clients.")
    phase: ClientPhase = Field(
        "Idle",
        description="Idle (not selected this round), Pending, Running, Succeeded, Failed, "
        "Rejected (the aggregator refused its delta).",
    )
    last_round: int | None = Field(
        None, ge=0, le=MAX_ROUNDS, description="The last round it trained in."
    )
    samples: Count | None = Field(None, description="Training samples it reported.")
    last_loss: Loss | None = Field(None, description="Its training loss in lastRound.")
    bytes_sent: Count = Field(0, description="Encoded delta bytes over the whole run.")
    last_heartbeat: Timestamp | None = Field(
        None,
        description="A site's client: the site's last heartbeat its relay saw (the site's clock).",
    )
    message: Annotated[str, bounded_str(None, 1024, min_length=0)] | None = Field(
        None, description="Why it failed or was rejected."
    )


class Communication(StatusModel):
    """What the deltas cost against full-model FedAvg (every client sending the whole model)."""

    bytes_sent: Count = Field(0, description="Encoded delta bytes all clients uploaded.")
    full_model_equivalent_bytes: Count = Field(
        0, description="What the same uploads would have been as whole fp32 models."
    )
    reduction_ratio: float | None = Field(None, ge=0, description="fullModel / sent.")
    reduction: Annotated[str, bounded_str(None, 32)] | None = Field(
        None, description='e.g. "41.2x".'
    )


class FederatedFineTuneStatus(StatusModel):
    """The observed state of a run, written by the operator through the status subresource.

    `conditions` are the source of truth; `phase` is a one-word summary for people.
    """

    observed_generation: int | None = Field(
        None, ge=0, description="metadata.generation this status reflects."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        description="Progressing, Succeeded, Failed, Suspended, NetworkPolicyReady, "
        "EgressUnconfined.",
        json_schema_extra=map_list("type"),
    )
    phase: Phase | None = Field(None, description="A one-word summary for people.")
    current_round: int | None = Field(
        None, ge=0, le=MAX_ROUNDS, description="Round 0 writes the initial adapter."
    )
    round_attempt: int | None = Field(
        None, ge=0, le=1000, description="Retries of the current round so far."
    )
    round_progress: Annotated[str, bounded_str(None, 32)] | None = Field(
        None, description='"<currentRound>/<rounds>", for `kubectl get`.'
    )
    selected_clients: list[ClientName] = Field(
        default_factory=list,
        max_length=MAX_CLIENTS,
        description="The clients training in the current round.",
        json_schema_extra=k8s_extensions(list_type="set"),
    )
    client_progress: Annotated[str, bounded_str(None, 32)] | None = Field(
        None, description='"<succeeded>/<selected>" in the current round, for `kubectl get`.'
    )
    round_started_at: Timestamp | None = Field(
        None,
        description="When the current attempt of the current round started (its timeout "
        "counts from here).",
    )
    aggregating_clients: list[ClientName] = Field(
        default_factory=list,
        max_length=MAX_CLIENTS,
        description="The clients whose deltas the current round's aggregator merges; empty "
        "until the quorum is in.",
        json_schema_extra=k8s_extensions(list_type="set"),
    )
    evaluating_rounds: list[Annotated[int, Field(ge=0, le=MAX_ROUNDS)]] = Field(
        default_factory=list,
        max_length=HISTORY_LIMIT,
        description="Rounds whose evaluation Job has not reported yet.",
        json_schema_extra=k8s_extensions(list_type="set"),
    )
    clients: list[ClientStatus] = Field(
        default_factory=list,
        max_length=MAX_CLIENTS,
        description="Each client's latest state.",
        json_schema_extra=map_list("name"),
    )
    history: list[RoundRecord] = Field(
        default_factory=list,
        max_length=HISTORY_LIMIT,
        description=f"The last {HISTORY_LIMIT} rounds.",
        json_schema_extra=map_list("round"),
    )
    global_adapter_uri: Uri | None = Field(None, description="The latest global adapter.")
    final_adapter_uri: Uri | None = Field(None, description="The PEFT adapter, once finished.")
    report_uri: Uri | None = Field(None, description="The run report (report.html).")
    communication: Communication | None = None
    last_train_loss: Loss | None = Field(None, description="Training loss of the last round.")
    last_eval_loss: Loss | None = Field(None, description="Held-out loss of the last evaluation.")
    initial_eval_loss: Loss | None = Field(
        None,
        description="Held-out loss before any training (round 0: the base model with the "
        "initial adapter, a no-op), the baseline every later evaluation compares with.",
    )
    epsilon: float | None = Field(
        None,
        ge=0,
        description="Client-level DP: the epsilon spent so far at spec.privacy.delta "
        "(dp-accounting's RDP accountant).",
    )
    start_time: Timestamp | None = Field(
        None, description="Set before the first Job is created; marks the run as started."
    )
    completion_time: Timestamp | None = Field(None, description="When it succeeded or failed.")
