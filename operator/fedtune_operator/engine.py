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
themselves (selection, quorum, verdict, retries) are in rounds.py; the vocabulary in decision.py.
"""

from __future__ import annotations

import datetime as dt

from fedtune_operator import rounds
from fedtune_operator.api import ClientStatus, FederatedFineTuneStatus, RoundRecord
from fedtune_operator.decision import (
    Action,
    ClientFailed,
    CreateAggregateJob,
    CreateClientJob,
    CreateEvaluateJob,
    Decision,
    DeleteJob,
    DeleteRun,
    Event,
    Fact,
    ObservedJob,
    RoundCompleted,
    Run,
    RunFinished,
    SuspendJob,
    human_bytes,
)
from fedtune_operator.status_updates import (
    communication_totals,
    loss_value,
    progress,
    record_round,
    set_client_status,
    set_condition,
    set_outcome,
)
from fedtune_trainer.wire import results
from fedtune_trainer.wire.results import AggregateSummary, ClientSummary, EvaluationSummary

# ---------------------------------------------------------------------------------------------
# The state machine
# ---------------------------------------------------------------------------------------------


class _Step:
    """One decision in the making: the status so far (models are immutable, so every change
    replaces it), plus the actions and events it implies."""

    def __init__(self, run: Run, status: FederatedFineTuneStatus, now: dt.datetime) -> None:
        self.run = run
        self.spec = run.spec
        self.now = now
        self.status = status
        self.actions: list[Action] = []
        self.events: list[Event] = []
        self.facts: list[Fact] = []

    def set(self, **changes: object) -> None:
        self.status = self.status.model_copy(update=changes)

    def outcome(self, outcome: str, reason: str, message: str) -> None:
        """Progressing/Succeeded/Failed flip together; Suspended is set apart."""
        conditions = set_outcome(
            self.status.conditions, outcome, reason, message, self.now, self.run.generation
        )  # type: ignore[arg-type]
        self.set(conditions=conditions)

    def condition(self, type_: str, on: bool, reason: str, message: str) -> None:
        conditions = set_condition(
            self.status.conditions,
            type_,
            "True" if on else "False",
            reason,
            message,
            self.now,
            self.run.generation,
        )
        self.set(conditions=conditions)

    def event(self, reason: str, message: str, warning: bool = False) -> None:
        self.events.append(Event("Warning" if warning else "Normal", reason, message[:250]))

    # -- clients ---------------------------------------------------------------------------------

    def client(self, name: str) -> ClientStatus:
        return next((c for c in self.status.clients if c.name == name), ClientStatus(name=name))

    def put_client(self, name: str, **changes: object) -> None:
        entry = self.client(name).model_copy(update=changes)
        self.set(clients=set_client_status(self.status.clients, entry))

    def finished(self, name: str, round_: int) -> str | None:
        """ "Succeeded"/"Failed" once the client's result for this round is recorded."""
        c = self.client(name)
        if c.last_round == round_ and c.phase in ("Succeeded", "Failed"):
            return c.phase
        return None

    def progress_strings(self) -> None:
        s = self.status
        r = s.current_round or 0
        done = [n for n in s.selected_clients if self.finished(n, r) == "Succeeded"]
        self.set(
            round_progress=progress(r, self.spec.rounds),
            client_progress=progress(len(done), len(s.selected_clients)) if r else None,
        )

    # -- transitions -----------------------------------------------------------------------------

    def start_round(self, round_: int) -> None:
        selected = rounds.select_clients(self.spec, round_) if round_ > 0 else []
        self.set(
            current_round=round_,
            round_attempt=0,
            round_started_at=self.now,
            aggregating_clients=[],
            selected_clients=selected,
            phase="Running",
        )
        for name in selected:
            self.put_client(name, phase="Pending", message=None)
        if round_ == 0:
            self.event("Initializing", "writing the initial adapter (round 0)")
        else:
            self.event(
                "RoundStarted", f"round {round_}/{self.spec.rounds}: {len(selected)} clients"
            )
        self.outcome("Progressing", "RoundStarted", f"round {round_} started")
        self.create_missing([])

    def create_missing(self, jobs: list[ObservedJob]) -> None:
        """Create the current attempt's Jobs that do not exist yet, once older ones are gone."""
        s = self.status
        r, a = s.current_round or 0, s.round_attempt or 0
        blocking = {(j.role, j.client) for j in jobs if j.round == r and j.attempt != a}
        present = {(j.role, j.client) for j in jobs if j.round == r and j.attempt == a}
        if s.aggregating_clients or r == 0:
            if ("aggregator", None) not in present | blocking:
                self.actions.append(CreateAggregateJob(r, a, tuple(s.aggregating_clients)))
            return
        for name in s.selected_clients:
            if self.finished(name, r) is None and ("client", name) not in present | blocking:
                self.actions.append(CreateClientJob(r, a, name))

    def round_failed(self, reason: str, message: str, jobs: list[ObservedJob]) -> None:
        s = self.status
        r, a = s.current_round or 0, s.round_attempt or 0
        for j in jobs:
            if j.round == r and not j.deleting and j.state == "active":
                self.actions.append(DeleteJob(j.name, "round failed"))
        if rounds.may_retry(self.spec, a):
            for j in jobs:
                if j.round == r and not j.deleting and j.state != "active":
                    self.actions.append(DeleteJob(j.name, "round retried"))
            self.set(
                round_attempt=a + 1,
                round_started_at=self.now,
                aggregating_clients=[],
                phase="Running",
            )
            for name in s.selected_clients:  # the old attempt's failure is in its event
                self.put_client(name, phase="Pending", message=None)
            self.event("RoundRetried", f"attempt {a + 2}: {message}", warning=True)
            self.outcome("Progressing", "RoundRetried", message)
            self.create_missing(jobs)  # at once, unless the old attempt's Jobs still exist
            return
        self.finish_failed(reason, message)

    def finish_failed(self, reason: str, message: str) -> None:
        self.set(phase="Failed", completion_time=self.now)
        self.outcome("Failed", reason, message)
        self.event("RunFailed", message, warning=True)
        self.facts.append(RunFinished("Failed"))

    def record_clients(self, jobs: list[ObservedJob]) -> None:
        """Copy each finished client's result into the status, once."""
        s = self.status
        r, a = s.current_round or 0, s.round_attempt or 0
        for j in jobs:
            if j.role != "client" or j.round != r or j.attempt != a or j.client is None:
                continue
            if self.finished(j.client, r) is not None:
                continue
            if j.state == "active":
                if self.client(j.client).phase == "Pending":
                    self.put_client(j.client, phase="Running", last_round=r)
                continue
            if j.state == "succeeded" and isinstance(j.summary, ClientSummary):
                summary = j.summary
                self.put_client(
                    j.client,
                    phase="Succeeded",
                    last_round=r,
                    samples=summary.samples,
                    last_loss=summary.train_loss,
                    bytes_sent=self.client(j.client).bytes_sent + summary.bytes_sent,
                    message=None,
                )
                comm = s.communication
                sent = (comm.bytes_sent if comm else 0) + summary.bytes_sent
                full = (comm.full_model_equivalent_bytes if comm else 0) + summary.full_model_bytes
                self.set(communication=communication_totals(sent, full))
                s = self.status
                continue
            why = j.message or "the Job failed"
            if j.state == "succeeded":
                why = "finished without a readable summary"
            self.put_client(j.client, phase="Failed", last_round=r, message=why[:1000])
            self.event("ClientFailed", f"round {r}: client {j.client}: {why}", warning=True)
            self.facts.append(ClientFailed(r, j.client))
            s = self.status

    def recorded(self, round_: int) -> bool:
        """Round `round_`'s aggregate is in the history already (a later reconcile of it must not
        count it again)."""
        return any(h.round == round_ for h in self.status.history)

    def advance(self, summary: AggregateSummary) -> None:
        s = self.status
        r = s.current_round or 0
        result = summary.record
        self.set(
            global_adapter_uri=summary.global_uri, report_uri=summary.report_uri or s.report_uri
        )
        if r > 0 and not self.recorded(r):
            self.record_aggregate(r, result)
        if rounds.evaluation_due(self.spec, r) and r not in self.status.evaluating_rounds:
            self.set(evaluating_rounds=sorted({*self.status.evaluating_rounds, r}))
            self.actions.append(CreateEvaluateJob(r))
        if r >= self.spec.rounds:
            final = summary.final_uri or summary.global_uri
            if self.status.evaluating_rounds:
                self.set(phase="Evaluating", aggregating_clients=[])
                self.outcome("Progressing", "Evaluating", f"round {r} aggregated; evaluating")
                return
            self.finish_succeeded(final)
            return
        self.start_round(r + 1)

    def record_aggregate(self, r: int, result: results.RoundRecord) -> None:
        """Round r's aggregate into the history, the events and the facts, once."""
        s = self.status
        # The counts are the record's own; the list of rejections may have been cut to fit the
        # termination message, so it only names whom to mark.
        for rejection in result.rejections:
            self.put_client(rejection.client, phase="Rejected", message=rejection.reason[:1000])
            self.event(
                "DeltaRejected", f"round {r}: {rejection.client}: {rejection.reason}", warning=True
            )
        unnamed = result.rejected - len(result.rejections)
        if unnamed > 0:
            self.event(
                "DeltaRejected",
                f"round {r}: {unnamed} more deltas rejected (see the run report)",
                warning=True,
            )
        record = RoundRecord(
            round=r,
            attempt=s.round_attempt or 0,
            started_at=s.round_started_at,
            completed_at=self.now,
            clients_succeeded=result.accepted,
            clients_failed=sum(1 for n in s.selected_clients if self.finished(n, r) == "Failed"),
            rejected=result.rejected,
            train_loss=result.train_loss,
            bytes_received=result.bytes_received,
            truncation_error=result.truncation_error,
            epsilon=result.epsilon,
        )
        self.facts.append(RoundCompleted(record, result.rejected))
        self.set(
            history=record_round(s.history, record),
            last_train_loss=record.train_loss
            if record.train_loss is not None
            else s.last_train_loss,
            epsilon=record.epsilon if record.epsilon is not None else s.epsilon,
        )
        self.event(
            "RoundAggregated",
            f"round {r}/{self.spec.rounds}: merged "
            f"{result.accepted} deltas ({human_bytes(result.bytes_received)})",
        )

    def finish_succeeded(self, final: str | None) -> None:
        self.set(
            phase="Succeeded",
            final_adapter_uri=final,
            completion_time=self.now,
            aggregating_clients=[],
        )
        self.outcome("Succeeded", "Completed", f"{self.spec.rounds} rounds aggregated")
        self.event("RunSucceeded", f"{self.spec.rounds} rounds done; adapter at {final}")
        self.facts.append(RunFinished("Succeeded"))

    # -- evaluations -----------------------------------------------------------------------------

    def reconcile_evaluations(self, jobs: list[ObservedJob]) -> None:
        """Each due round's evaluation Job: created while missing, its loss recorded once it
        reports, a failure reported (evaluation informs; it never fails the run)."""
        for r in list(self.status.evaluating_rounds):
            job = next(
                (j for j in jobs if j.role == "evaluator" and j.round == r and not j.deleting),
                None,
            )
            if job is None:
                self.actions.append(CreateEvaluateJob(r))
                continue
            if job.state == "active":
                continue
            if job.state == "succeeded" and isinstance(job.summary, EvaluationSummary):
                self.record_evaluation(r, job.summary.eval_loss)
            else:
                why = job.message or "finished without a readable summary"
                self.event("EvaluationFailed", f"round {r}: {why}", warning=True)
            self.set(evaluating_rounds=[x for x in self.status.evaluating_rounds if x != r])

    def record_evaluation(self, r: int, loss: float) -> None:
        s = self.status
        loss = loss_value(loss)
        newest = max((h.round for h in s.history if h.eval_loss is not None), default=-1)
        history = [
            h.model_copy(update={"eval_loss": loss}) if h.round == r else h for h in s.history
        ]
        self.set(history=history)
        if r == 0:
            self.set(initial_eval_loss=loss)
        if r >= newest:
            self.set(last_eval_loss=loss)
        self.event("Evaluated", f"round {r}: eval loss {loss:.4f}")


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
    step = _Step(run, status, now.replace(microsecond=0))
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


def _await_evaluations(step: _Step, jobs: list[ObservedJob]) -> None:
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


def _reconcile_round(step: _Step, jobs: list[ObservedJob]) -> None:
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
