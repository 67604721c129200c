"""One decision of the round state machine in the making (`Step`): the status so far, and the
actions, events and facts it implies, with the edits every transition is made of (start a round,
record a client, fail an attempt, advance, record an evaluation, finish).

engine.decide says *when* each edit happens; this module says *what* it does to the status, so
that each transition is written once whichever path through `decide` reaches it. Pure, as the
engine is.
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
    DeleteJob,
    Event,
    Fact,
    ObservedJob,
    RoundCompleted,
    Run,
    RunFinished,
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


class Step:
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
                    **heartbeat_of(summary),
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


def heartbeat_of(summary: ClientSummary) -> dict[str, dt.datetime]:
    """A site's client's last heartbeat, as its relay reported it (nothing for a local client)."""
    if summary.last_heartbeat is None:
        return {}
    return {"last_heartbeat": dt.datetime.fromtimestamp(summary.last_heartbeat, dt.UTC)}
