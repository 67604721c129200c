"""The rules of a round, in one place: who trains, how many must finish, and what a finished Job
means. The engine (engine.py) applies them; the Job builders (manifests.py) hand the quorum to the
aggregator.

A round r >= 1 selects `clients_per_round` clients (deterministically, so a restarted operator
selects the same ones), waits for their Jobs, and aggregates once `quorum` of them have uploaded a
delta (or, after `roundTimeoutSeconds`, once the quorum holds). A round that cannot reach its
quorum, or whose aggregator fails, is retried as a new attempt up to `maxRoundRetries` times, then
the run fails. Round 0 only writes the initial adapter.
"""

from __future__ import annotations

import datetime as dt
import math
import random
from collections.abc import Mapping
from typing import Any, Literal

from fedtune_operator.api.spec import FederatedFineTuneSpec

# ---------------------------------------------------------------------------------------------
# Who trains, and how many must finish
# ---------------------------------------------------------------------------------------------


def clients_per_round(spec: FederatedFineTuneSpec) -> int:
    """How many clients train in each round: clientsPerRound, or clientFraction of the clients
    rounded up (never below 1), or all of them."""
    n = len(spec.clients)
    agg = spec.aggregation
    if agg.clients_per_round is not None:
        return min(agg.clients_per_round, n)
    if agg.client_fraction is not None:
        # The epsilon keeps 0.1 * 30 (= 3.0000000000000004) at 3; the CRD rule uses the same one.
        return max(1, min(n, math.ceil(agg.client_fraction * n - 1e-9)))
    return n


def quorum(spec: FederatedFineTuneSpec) -> int:
    """Deltas needed before a round may aggregate: minClients, or every selected client."""
    agg = spec.aggregation
    return agg.min_clients if agg.min_clients is not None else clients_per_round(spec)


def select_clients(spec: FederatedFineTuneSpec, round_: int) -> list[str]:
    """The clients that train in `round_`, in spec order.

    Deterministic in (samplingSeed, round, client names), so that a restarted operator selects
    the same clients again; all of them when every client trains every round.
    """
    names = [c.name for c in spec.clients]
    k = clients_per_round(spec)
    if k >= len(names):
        return names
    rng = random.Random(f"fedtune/{spec.aggregation.sampling_seed}/{round_}")
    return [names[i] for i in sorted(rng.sample(range(len(names)), k))]


# ---------------------------------------------------------------------------------------------
# When a round ends
# ---------------------------------------------------------------------------------------------


def may_retry(spec: FederatedFineTuneSpec, attempt: int) -> bool:
    """Whether a failed attempt `attempt` (0 for the first) of a round may be retried."""
    return attempt < spec.aggregation.max_round_retries


def timed_out(
    spec: FederatedFineTuneSpec, started_at: dt.datetime | None, now: dt.datetime
) -> bool:
    """The round's attempt has run past roundTimeoutSeconds (counted from its start)."""
    timeout = spec.aggregation.round_timeout_seconds
    return (
        timeout is not None
        and started_at is not None
        and now >= started_at + dt.timedelta(seconds=timeout)
    )


Verdict = Literal["wait", "aggregate", "quorum_lost", "timed_out"]


def verdict(spec: FederatedFineTuneSpec, done: int, pending: int, expired: bool) -> Verdict:
    """What a round with `done` uploaded deltas and `pending` clients still training does next.

    It aggregates once nobody is pending, or once the timeout passed with the quorum in; it has
    lost when the quorum is out of reach even if every pending client succeeds; past the timeout
    without the quorum it has timed out; otherwise it waits.
    """
    need = quorum(spec)
    if done + pending < need:
        return "quorum_lost"
    if not pending or (expired and done >= need):
        return "aggregate"
    return "timed_out" if expired else "wait"


def evaluation_due(spec: FederatedFineTuneSpec, round_: int) -> bool:
    """Evaluate global `round_`: with evaluation data, every `everyRounds` rounds (round 0, the
    untrained adapter, gives the baseline) and always after the last round."""
    ev = spec.evaluation
    return ev.data_uri is not None and (round_ % ev.every_rounds == 0 or round_ == spec.rounds)


# ---------------------------------------------------------------------------------------------
# What a finished Job means
# ---------------------------------------------------------------------------------------------

JobState = Literal["active", "succeeded", "failed"]


def job_state(job_status: Mapping[str, Any] | None) -> tuple[JobState, Mapping[str, Any] | None]:
    """A Job is finished when its Complete or Failed condition is True (the Job controller's
    verdict, after backoffLimit and the pod failure policy); until then it is active. Returns the
    state and the deciding condition. A succeeded Job still needs a readable summary to count as
    a client's result or a round's aggregate: the engine checks that.
    """
    for cond in (job_status or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return ("succeeded" if cond["type"] == "Complete" else "failed"), cond
    return "active", None
