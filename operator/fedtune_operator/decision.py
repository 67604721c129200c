"""What the engine decides about, and what it decides: its inputs and outputs as plain data.

`engine.decide(run, status, jobs, now)` takes a `Run` and `ObservedJob`s and returns a `Decision`:
the new status, the actions (Jobs to create, delete or suspend), the events to post, and the facts
the metrics count. Kept apart from the state machine so that the shell (handlers.py) and the
observation (observe.py) see the vocabulary without the rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fedtune_operator.api import FederatedFineTuneSpec, FederatedFineTuneStatus, RoundRecord
from fedtune_operator.rounds import JobState
from fedtune_trainer.wire.results import AggregateSummary, ClientSummary, EvaluationSummary

Role = Literal["client", "aggregator", "evaluator"]


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """The object being reconciled: identity plus the validated spec."""

    name: str
    namespace: str
    uid: str
    generation: int
    spec: FederatedFineTuneSpec


@dataclass(frozen=True)
class ObservedJob:
    """A child Job as the engine needs to see it (built from labels, conditions and the pod)."""

    name: str
    role: Role
    round: int
    attempt: int
    client: str | None
    state: JobState
    suspended: bool = False
    deleting: bool = False
    summary: ClientSummary | AggregateSummary | EvaluationSummary | None = None
    message: str = ""


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateClientJob:
    round: int
    attempt: int
    client: str


@dataclass(frozen=True)
class CreateAggregateJob:
    round: int
    attempt: int
    clients: tuple[str, ...]


@dataclass(frozen=True)
class CreateEvaluateJob:
    round: int


@dataclass(frozen=True)
class DeleteJob:
    name: str
    reason: str


@dataclass(frozen=True)
class SuspendJob:
    name: str
    suspend: bool


@dataclass(frozen=True)
class DeleteRun:
    """ttlSecondsAfterFinished has passed."""


Action = (
    CreateClientJob | CreateAggregateJob | CreateEvaluateJob | DeleteJob | SuspendJob | DeleteRun
)


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class RoundCompleted:
    """A round's aggregate was recorded in the status for the first time."""

    record: RoundRecord
    deltas_rejected: int


@dataclass(frozen=True)
class ClientFailed:
    round: int
    client: str


@dataclass(frozen=True)
class RunFinished:
    outcome: Literal["Succeeded", "Failed"]


Fact = RoundCompleted | ClientFailed | RunFinished
"""What a decision newly records, for the metrics: each fact is reported by exactly the decision
whose status write records it, so counting facts after a successful write counts each once."""


@dataclass
class Decision:
    status: FederatedFineTuneStatus
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    facts: list[Fact] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
