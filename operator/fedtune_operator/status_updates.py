"""Pure edits of a FederatedFineTune status, as the engine makes them: every function returns new
values and leaves its inputs alone (the status models are frozen).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Literal

from pydantic import TypeAdapter

from fedtune_operator.api.schema import HISTORY_LIMIT, Loss
from fedtune_operator.api.status import (
    OUTCOMES,
    ClientStatus,
    Communication,
    Condition,
    ConditionStatus,
    RoundRecord,
)


def get_condition(conditions: Sequence[Condition], type_: str) -> Condition | None:
    """The condition of this type, selected by type (never by position)."""
    return next((c for c in conditions if c.type == type_), None)


def set_condition(
    conditions: Sequence[Condition],
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    now: datetime,
    observed_generation: int | None = None,
) -> list[Condition]:
    """A new list with the condition of `type_` set; others untouched, order kept.

    lastTransitionTime becomes `now` only when the status flips (or the condition is new), as
    metav1.Condition requires; a reason or message change alone keeps it.
    """
    old = get_condition(conditions, type_)
    changed = old is None or old.status != status
    new = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=now if changed else old.last_transition_time,
        observed_generation=observed_generation
        if observed_generation is not None
        else (old.observed_generation if old else None),
    )
    if old is None:
        return [*conditions, new]
    return [new if c.type == type_ else c for c in conditions]


def set_outcome(
    conditions: Sequence[Condition],
    outcome: Literal["Progressing", "Succeeded", "Failed"],
    reason: str,
    message: str,
    now: datetime,
    observed_generation: int | None = None,
) -> list[Condition]:
    """Flip the mutually exclusive Progressing/Succeeded/Failed together: `outcome` True, the
    other two False with the same reason, so no reader ever sees two of them True."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {OUTCOMES}, not {outcome!r}")
    out = list(conditions)
    for type_ in OUTCOMES:
        out = set_condition(
            out,
            type_,
            "True" if type_ == outcome else "False",
            reason,
            message,
            now,
            observed_generation,
        )
    return out


def record_round(
    history: Sequence[RoundRecord], record: RoundRecord, limit: int = HISTORY_LIMIT
) -> list[RoundRecord]:
    """History with `record` in place of an earlier record of its round (a retry), else
    appended; the oldest rounds drop off beyond `limit`."""
    kept = [r for r in history if r.round != record.round]
    out = sorted([*kept, record], key=lambda r: r.round)
    return out[-limit:]


def set_client_status(clients: Sequence[ClientStatus], entry: ClientStatus) -> list[ClientStatus]:
    """Client states with `entry` in place of the one of the same name, else appended."""
    if any(c.name == entry.name for c in clients):
        return [entry if c.name == entry.name else c for c in clients]
    return [*clients, entry]


def progress(done: int, total: int) -> str:
    """Progress as "3/10", for the roundProgress and clientProgress printer columns."""
    return f"{done}/{total}"


def communication_totals(bytes_sent: int, full_model_bytes: int) -> Communication:
    """Totals with the reduction against full-model FedAvg, as a ratio and as "41.2x"."""
    if bytes_sent < 0 or full_model_bytes < 0:
        raise ValueError("byte counts cannot be negative")
    ratio = full_model_bytes / bytes_sent if bytes_sent > 0 else None
    return Communication(
        bytes_sent=bytes_sent,
        full_model_equivalent_bytes=full_model_bytes,
        reduction_ratio=round(ratio, 3) if ratio is not None else None,
        reduction=f"{ratio:.1f}x" if ratio is not None else None,
    )


_LOSS = TypeAdapter(Loss)


def loss_value(value: float) -> float:
    """A loss as the status keeps it (finite, four significant digits)."""
    return _LOSS.validate_python(value)
