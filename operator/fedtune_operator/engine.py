"""The round state machine, as a pure function.

    decide(run, status, jobs, now) -> Decision(actions, status, events)

`run` is the validated spec plus the object's identity, `status` what the operator last wrote,
`jobs` the child Jobs it observes now (with their termination summaries), `now` the clock.
Nothing here does I/O or reads a clock, so every rule is unit- and property-tested without a
cluster, and the reconcile is level-triggered: whatever woke the operator, it observes, decides
and acts again.

Memory lives in the status, never in the process: which round, which attempt, which clients were
selected, and what each client reported. A client's result is copied into the status the first time
it is seen, so a Job that disappears later (TTL, manual deletion) is never started again; a Job that
should exist and does not is created, and "already exists" counts as success.

Round 0 is the initialisation round: its only Job is the aggregator, which writes the initial
adapter. Rounds 1..N each run the selected clients, then the aggregator. A round whose clients or
aggregator cannot reach the quorum is retried (same round, next attempt, after the old Jobs are
gone) up to `maxRoundRetries`, then the run fails. After every due round an evaluation Job runs
beside the next round; the run succeeds once the last round's evaluation is in. The round rules
themselves (selection, quorum, verdict, retries) are in rounds.py, the vocabulary in decision.py,
and what each transition does to the status in step.py.
"""

from __future__ import annotations

import datetime as dt

from fedtune_operator import rounds
from fedtune_operator.api import FederatedFineTuneStatus
from fedtune_operator.decision import (
    Decision,
    DeleteJob,
    DeleteRun,
    Event,
    Fact,
    ObservedJob,
    Run,
    RunFinished,
    SuspendJob,
)
from fedtune_operator.status_updates import (
    set_condition,
    set_outcome,
)
from fedtune_operator.step import Step
from fedtune_trainer.wire.results import AggregateSummary

# ---------------------------------------------------------------------------------------------
# The state machine
# ---------------------------------------------------------------------------------------------


def invalid_spec(
    status: FederatedFineTuneStatus, problems: list[str], generation: int, now: dt.datetime
) -> Decision:
    """A spec the schema let through but the operator cannot run: fail once, loudly, no Jobs."""
    now = now.replace(microsecond=0)
    message = "; ".join(problems)[:1000]
    conditions = set_outcome(status.conditions, "Failed", "InvalidSpec", message, now, generation)
    conditions = set_condition(
        conditions, "Suspended", "False", "NotSuspended", "", now, generation
    )
    new = status.model_copy(
        update={
            "observed_generation": generation,
            "phase": "Failed",
            "conditions": conditions,
            "completion_time": status.completion_time or now,
        }
    )
    already = status.phase == "Failed" and any(
        c.type == "Failed" and c.reason == "InvalidSpec" and c.message == message
        for c in status.conditions
    )
    events = [] if already else [Event("Warning", "InvalidSpec", message[:250])]
    facts: list[Fact] = [] if status.phase == "Failed" else [RunFinished("Failed")]
    return Decision(new, [], events, facts)


def decide(
    run: Run, status: FederatedFineTuneStatus, jobs: list[ObservedJob], now: dt.datetime
) -> Decision:
    step = Step(run, status, now.replace(microsecond=0))
    step.set(observed_generation=run.generation)
    s = step.status

    if s.phase in ("Succeeded", "Failed"):
        for j in jobs:
            if j.state == "active" and not j.deleting:
                step.actions.append(DeleteJob(j.name, "run finished"))
        ttl = run.spec.ttl_seconds_after_finished
        if (
            ttl is not None
            and s.completion_time is not None
            and step.now >= s.completion_time + dt.timedelta(seconds=ttl)
        ):
            step.actions.append(DeleteRun())
        return Decision(step.status, step.actions, step.events, step.facts)

    if s.start_time is None:
        step.set(start_time=step.now, phase="Pending")
        step.condition("Suspended", False, "NotSuspended", "")

    # Superseded Jobs: rounds behind us, or an older attempt of this round.
    r, a = s.current_round, s.round_attempt or 0
    for j in jobs:
        if j.role == "evaluator":
            continue  # evaluations belong to rounds already done; reconcile_evaluations keeps them
        stale = r is not None and (j.round < r or (j.round == r and j.attempt != a))
        if stale and j.state == "active" and not j.deleting:
            step.actions.append(DeleteJob(j.name, "superseded"))

    if run.spec.suspend:
        for j in jobs:
            if j.state == "active" and not j.suspended and not j.deleting:
                step.actions.append(SuspendJob(j.name, True))
        if s.phase != "Suspended":
            step.event("Suspended", "spec.suspend is true: Jobs suspended, no new ones")
            step.set(phase="Suspended")
            # Not succeeded, not failed, and not progressing either while suspended.
            step.outcome("Progressing", "Suspended", "the run is suspended")
            step.condition("Progressing", False, "Suspended", "the run is suspended")
            step.condition("Suspended", True, "Suspended", "spec.suspend is true")
        step.progress_strings()
        return Decision(step.status, step.actions, step.events, step.facts)

    if s.phase == "Suspended":
        for j in jobs:
            if j.suspended and j.state == "active":
                step.actions.append(SuspendJob(j.name, False))
        step.event("Resumed", f"resuming round {s.current_round or 0}")
        # A suspended round's timeout starts again.
        step.set(
            phase="Aggregating" if s.aggregating_clients else "Running", round_started_at=step.now
        )
        step.condition("Suspended", False, "Resumed", "spec.suspend is false")
        step.outcome("Progressing", "Resumed", "the run was resumed")

    step.reconcile_evaluations(jobs)
    if step.status.current_round is None:
        step.start_round(0)
    elif step.status.phase == "Evaluating" and step.recorded(step.status.current_round):
        _await_evaluations(step, jobs)
    else:
        _reconcile_round(step, jobs)
    step.progress_strings()
    return Decision(step.status, step.actions, step.events, step.facts)


def _await_evaluations(step: Step, jobs: list[ObservedJob]) -> None:
    """The last round is aggregated; the run succeeds once its evaluations are in. (spec.rounds
    may have grown meanwhile: then the next round starts instead.)"""
    s = step.status
    r = s.current_round or 0
    if r < step.spec.rounds:
        step.start_round(r + 1)
        return
    if s.evaluating_rounds:
        return
    aggregator = next(
        (j for j in jobs if j.role == "aggregator" and j.round == r and j.state == "succeeded"),
        None,
    )
    summary = aggregator.summary if aggregator is not None else None
    final = summary.final_uri if isinstance(summary, AggregateSummary) else None
    step.finish_succeeded(final or s.global_adapter_uri)


def _reconcile_round(step: Step, jobs: list[ObservedJob]) -> None:
    s = step.status
    r, a = s.current_round or 0, s.round_attempt or 0
    current = [j for j in jobs if j.round == r and j.attempt == a]
    aggregator = next((j for j in current if j.role == "aggregator"), None)

    if aggregator is not None and aggregator.state == "succeeded":
        if isinstance(aggregator.summary, AggregateSummary):
            step.advance(aggregator.summary)
        else:
            step.round_failed(
                "AggregationFailed",
                f"round {r}: the aggregator finished without a readable summary",
                jobs,
            )
        return
    if aggregator is not None and aggregator.state == "failed":
        why = aggregator.message or "the aggregator Job failed"
        step.round_failed("AggregationFailed", f"round {r}: {why}", jobs)
        return
    if aggregator is not None or s.aggregating_clients or r == 0:
        step.set(phase="Aggregating" if r > 0 else "Running")
        step.create_missing(jobs)
        return

    step.record_clients(jobs)
    s = step.status
    selected = s.selected_clients
    done = [n for n in selected if step.finished(n, r) == "Succeeded"]
    failed = [n for n in selected if step.finished(n, r) == "Failed"]
    pending = [n for n in selected if n not in done and n not in failed]
    need = rounds.quorum(step.spec)
    expired = rounds.timed_out(step.spec, s.round_started_at, step.now)
    match rounds.verdict(step.spec, len(done), len(pending), expired):
        case "quorum_lost":
            step.round_failed(
                "QuorumNotReached",
                f"round {r}: {len(failed)} of {len(selected)} "
                f"clients failed, quorum {need} is out of reach",
                jobs,
            )
        case "timed_out":
            step.round_failed(
                "RoundTimedOut",
                f"round {r}: timed out after {step.spec.aggregation.round_timeout_seconds}s "
                f"with {len(done)} of the {need} clients needed",
                jobs,
            )
        case "wait":
            step.set(phase="Running")
            step.create_missing(jobs)
        case "aggregate":
            # Every client finished, or the timeout passed with the quorum in.
            for j in current:
                if j.role == "client" and j.state == "active" and not j.deleting:
                    step.actions.append(
                        DeleteJob(j.name, "round timed out; aggregating without it")
                    )
            step.set(aggregating_clients=done, phase="Aggregating")
            step.event(
                "Aggregating", f"round {r}: aggregating {len(done)} of {len(selected)} clients"
            )
            step.create_missing(jobs)
