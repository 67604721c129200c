"""The round state machine: each rule as a case, then properties over random histories."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune_operator import decision, engine
from fedtune_operator.api import FederatedFineTuneStatus
from fedtune_operator.decision import (
    CreateAggregateJob,
    CreateClientJob,
    DeleteJob,
    DeleteRun,
    ObservedJob,
    SuspendJob,
)
from fedtune_operator.status_updates import get_condition
from fedtune_operator.validation import parse_spec
from fedtune_trainer.wire.results import (
    AggregateSummary,
    ClientSummary,
    Contribution,
    EvaluationSummary,
    Rejection,
    RoundRecord,
    dump_summary,
    parse_summary,
)

T0 = dt.datetime(2026, 11, 24, 12, 0, 0, tzinfo=dt.UTC)
CLIENTS = ("alice", "bob", "carol")


def make_run(clients: tuple[str, ...] = CLIENTS, **spec: Any) -> decision.Run:
    raw: dict[str, Any] = {
        "baseModel": "s3://models/tiny",
        "rounds": 2,
        "storage": {"uri": "s3://bucket/runs/demo"},
        "clients": [{"name": c, "dataUri": f"s3://data/{c}.jsonl"} for c in clients],
    }
    raw.update(spec)
    return decision.Run(
        name="demo", namespace="ns", uid="uid-1", generation=1, spec=parse_spec(raw)
    )


def client_summary(round_: int, client: str) -> ClientSummary:
    return ClientSummary(
        round=round_,
        client=client,
        samples=10,
        steps=4,
        train_loss=1.5,
        bytes_sent=1000,
        raw_bytes=4000,
        full_model_bytes=100_000,
        sha256="0" * 64,
        seconds=1.0,
    )


def aggregate_summary(
    round_: int, accepted: list[str], rejected: list[Rejection] | None = None
) -> AggregateSummary:
    rejected = rejected or []
    record = RoundRecord(
        run="demo",
        round=round_,
        algorithm="fedavg",
        accepted=len(accepted),
        rejected=len(rejected),
        train_loss=1.2,
        eval_loss=1.1,
        bytes_received=3000,
        contributions=[
            Contribution(
                client=c, samples=10, weight=10, encoded_bytes=1000, raw_bytes=4000, norm=1.0
            )
            for c in accepted
        ],
        rejections=rejected,
    )
    return AggregateSummary(
        record=record,
        global_uri=f"s3://bucket/runs/demo/rounds/{round_:06d}/global",
        final_uri="s3://bucket/runs/demo/final" if round_ == 2 else None,
    )


def job(
    role: str,
    round_: int,
    client: str | None = None,
    state: str = "active",
    attempt: int = 0,
    **kw: Any,
) -> ObservedJob:
    name = f"demo-r{round_}-{client or 'aggregate'}"
    summary = kw.pop("summary", None)
    if summary is None and state == "succeeded":
        summary = (
            client_summary(round_, client) if client else aggregate_summary(round_, list(CLIENTS))
        )
    return ObservedJob(
        name=name,
        role=role,
        round=round_,
        attempt=attempt,  # type: ignore[arg-type]
        client=client,
        state=state,
        summary=summary,
        **kw,
    )  # type: ignore[arg-type]


def cond(status: FederatedFineTuneStatus, type_: str) -> tuple[str, str]:
    c = get_condition(status.conditions, type_)
    assert c is not None, type_
    return c.status, c.reason


def step(
    run: decision.Run, status: FederatedFineTuneStatus, jobs: list[ObservedJob], seconds: float = 0
) -> decision.Decision:
    return engine.decide(run, status, jobs, T0 + dt.timedelta(seconds=seconds))


def in_round_1(run: decision.Run) -> FederatedFineTuneStatus:
    """The status right after round 1 started."""
    first = step(run, FederatedFineTuneStatus(), [])
    return step(run, first.status, [job("aggregator", 0, state="succeeded")]).status


# ---------------------------------------------------------------------------------------------
# Rules, one case each
# ---------------------------------------------------------------------------------------------


def test_a_new_run_starts_with_the_initialising_round() -> None:
    d = step(make_run(), FederatedFineTuneStatus(), [])
    assert d.actions == [CreateAggregateJob(0, 0, ())]
    assert d.status.current_round == 0
    assert d.status.phase == "Running"
    assert d.status.start_time == T0
    assert cond(d.status, "Progressing") == ("True", "RoundStarted")
    assert cond(d.status, "Succeeded")[0] == "False"
    assert cond(d.status, "Suspended")[0] == "False"
    assert d.status.round_progress == "0/2"


def test_the_initial_adapter_starts_round_one_with_every_client() -> None:
    run = make_run()
    first = step(run, FederatedFineTuneStatus(), [])
    d = step(run, first.status, [job("aggregator", 0, state="succeeded")])
    assert d.actions == [CreateClientJob(1, 0, c) for c in CLIENTS]
    assert d.status.current_round == 1
    assert d.status.selected_clients == list(CLIENTS)
    assert d.status.global_adapter_uri.endswith("rounds/000000/global")
    assert d.status.client_progress == "0/3"
    assert [e.reason for e in d.events] == ["RoundStarted"]


def test_clients_that_all_succeed_start_the_aggregator() -> None:
    run = make_run()
    status = in_round_1(run)
    d = step(run, status, [job("client", 1, c, "succeeded") for c in CLIENTS])
    assert d.actions == [CreateAggregateJob(1, 0, CLIENTS)]
    assert d.status.phase == "Aggregating"
    assert d.status.client_progress == "3/3"
    assert d.status.communication.bytes_sent == 3000
    assert d.status.communication.reduction == "100.0x"


def test_a_sites_last_heartbeat_from_its_relay_reaches_the_clients_status() -> None:
    run = make_run()
    status = in_round_1(run)
    relayed = client_summary(1, CLIENTS[0]).model_copy(update={"last_heartbeat": 1_800_000_000.0})
    jobs = [job("client", 1, CLIENTS[0], "succeeded", summary=relayed)]
    jobs += [job("client", 1, c, "succeeded") for c in CLIENTS[1:]]
    clients = {c.name: c for c in step(run, status, jobs).status.clients}
    assert clients[CLIENTS[0]].last_heartbeat == dt.datetime.fromtimestamp(1_800_000_000, dt.UTC)
    assert clients[CLIENTS[1]].last_heartbeat is None


def test_the_last_aggregate_finishes_the_run() -> None:
    run = make_run(rounds=1)
    status = in_round_1(run)
    clients_done = [job("client", 1, c, "succeeded") for c in CLIENTS]
    status = step(run, status, clients_done).status
    d = step(
        run,
        status,
        [
            *clients_done,
            job("aggregator", 1, state="succeeded", summary=aggregate_summary(1, list(CLIENTS))),
        ],
        seconds=60,
    )
    assert d.status.phase == "Succeeded"
    assert cond(d.status, "Succeeded") == ("True", "Completed")
    assert cond(d.status, "Progressing")[0] == "False"
    assert d.status.history[0].round == 1
    assert d.status.history[0].clients_succeeded == 3
    assert d.status.last_train_loss == 1.2
    assert d.status.last_eval_loss is None  # no evaluation data: no evaluation Job
    assert d.status.final_adapter_uri.endswith("rounds/000001/global")
    assert "RunSucceeded" in [e.reason for e in d.events]
    assert d.actions == []


# ---------------------------------------------------------------------------------------------
# Evaluation: a Job of its own per due round, beside the next round's clients
# ---------------------------------------------------------------------------------------------

EVALUATED = {"evaluation": {"dataUri": "s3://data/eval.jsonl", "everyRounds": 1}}


def evaluator(round_: int, state: str = "active", loss: float = 2.5, **kw: Any) -> ObservedJob:
    summary = (
        EvaluationSummary(round=round_, eval_loss=loss, examples=8, tokens=800)
        if state == "succeeded"
        else None
    )
    return ObservedJob(
        name=f"demo-r{round_}-evaluate",
        role="evaluator",
        round=round_,
        attempt=0,
        client=None,
        state=state,  # type: ignore[arg-type]
        summary=summary,
        **kw,
    )


def test_the_round_records_truncation_error_and_epsilon_reach_the_status() -> None:
    run = make_run(rounds=1)
    status = in_round_1(run)
    clients_done = [job("client", 1, c, "succeeded") for c in CLIENTS]
    status = step(run, status, clients_done).status
    summary = aggregate_summary(1, list(CLIENTS))
    record = summary.record.model_copy(update={"truncation_error": 0.125, "epsilon": 3.5})
    summary = summary.model_copy(update={"record": record})
    aggregator = job("aggregator", 1, state="succeeded", summary=summary)
    d = step(run, status, [*clients_done, aggregator], seconds=60)
    assert (d.status.history[0].truncation_error, d.status.history[0].epsilon) == (0.125, 3.5)
    assert d.status.epsilon == 3.5


def test_evaluation_of_a_round_runs_beside_the_next_rounds_clients() -> None:
    run = make_run(rounds=2, **EVALUATED)
    first = step(run, FederatedFineTuneStatus(), [])
    d = step(run, first.status, [job("aggregator", 0, state="succeeded")])
    assert decision.CreateEvaluateJob(0) in d.actions
    assert [a.client for a in d.actions if isinstance(a, decision.CreateClientJob)] == list(CLIENTS)
    assert d.status.evaluating_rounds == [0]
    assert d.status.phase == "Running"
    # The evaluator of round 0 is neither superseded nor re-created while it runs ...
    d = step(run, d.status, [job("aggregator", 0, state="succeeded"), evaluator(0)])
    assert not any(
        isinstance(a, decision.DeleteJob | decision.CreateEvaluateJob) for a in d.actions
    )
    # ... and a missing one is created again (a lost create, a deleted Job).
    assert decision.CreateEvaluateJob(0) in step(run, d.status, []).actions
    # Its loss lands in the status once, with an event.
    d = step(run, d.status, [evaluator(0, "succeeded", loss=6.2512)])
    assert d.status.evaluating_rounds == []
    assert d.status.last_eval_loss == 6.251
    assert [e.reason for e in d.events] == ["Evaluated"]
    # Round 0's loss is the run's baseline: it stays after later evaluations replace the last.
    assert d.status.initial_eval_loss == 6.251


def test_an_evaluation_fills_its_rounds_history_record() -> None:
    run = make_run(rounds=3, **EVALUATED)
    status = in_round_1(run).model_copy(update={"evaluating_rounds": []})
    clients_done = [job("client", 1, c, "succeeded") for c in CLIENTS]
    status = step(run, status, clients_done).status
    d = step(run, status, [*clients_done, job("aggregator", 1, state="succeeded")])
    assert d.status.current_round == 2
    assert d.status.evaluating_rounds == [1]
    assert d.status.history[0].eval_loss is None
    d = step(run, d.status, [evaluator(1, "succeeded", loss=3.0)])
    assert d.status.history[0].eval_loss == 3.0
    assert d.status.last_eval_loss == 3.0
    # An older round's evaluation reporting late does not hide the newer loss.
    late = d.status.model_copy(update={"evaluating_rounds": [0]})
    d = step(run, late, [evaluator(0, "succeeded", loss=9.0)])
    assert d.status.last_eval_loss == 3.0
    assert d.status.initial_eval_loss == 9.0


def test_the_run_succeeds_once_the_last_rounds_evaluation_is_in() -> None:
    run = make_run(rounds=1, **EVALUATED)
    status = in_round_1(run).model_copy(update={"evaluating_rounds": []})
    clients_done = [job("client", 1, c, "succeeded") for c in CLIENTS]
    status = step(run, status, clients_done).status
    aggregated = [*clients_done, job("aggregator", 1, state="succeeded")]
    d = step(run, status, aggregated)
    assert d.status.phase == "Evaluating"
    assert cond(d.status, "Progressing") == ("True", "Evaluating")
    assert decision.CreateEvaluateJob(1) in d.actions
    assert [type(f) for f in d.facts] == [decision.RoundCompleted]
    # Reconciled again while the evaluation runs: nothing recorded or counted twice.
    again = step(run, d.status, [*aggregated, evaluator(1)])
    assert again.status.phase == "Evaluating"
    assert (again.facts, again.events, again.actions) == ([], [], [])
    done = step(run, again.status, [*aggregated, evaluator(1, "succeeded", loss=1.5)])
    assert done.status.phase == "Succeeded"
    assert done.status.last_eval_loss == 1.5
    assert done.status.history[-1].eval_loss == 1.5
    assert done.status.final_adapter_uri == "s3://bucket/runs/demo/rounds/000001/global"
    assert [type(f) for f in done.facts] == [decision.RunFinished]


def test_a_failed_evaluation_is_reported_and_does_not_fail_the_run() -> None:
    run = make_run(rounds=1, **EVALUATED)
    status = in_round_1(run).model_copy(update={"evaluating_rounds": []})
    clients_done = [job("client", 1, c, "succeeded") for c in CLIENTS]
    status = step(run, status, clients_done).status
    aggregated = [*clients_done, job("aggregator", 1, state="succeeded")]
    d = step(run, status, aggregated)
    failed = evaluator(1, "failed", message="exit 1: CUDA out of memory")
    d = step(run, d.status, [*aggregated, failed])
    assert d.status.phase == "Succeeded"
    assert d.status.last_eval_loss is None
    warning = next(e for e in d.events if e.reason == "EvaluationFailed")
    assert "CUDA out of memory" in warning.message


def test_a_failed_client_is_recorded_and_the_quorum_aggregates_without_it() -> None:
    run = make_run(aggregation={"minClients": 2})
    status = in_round_1(run)
    jobs = [
        job("client", 1, "alice", "succeeded"),
        job("client", 1, "bob", "failed", message="exit 2: bad line 6"),
        job("client", 1, "carol", "succeeded"),
    ]
    d = step(run, status, jobs)
    assert d.actions == [CreateAggregateJob(1, 0, ("alice", "carol"))]
    bob = next(c for c in d.status.clients if c.name == "bob")
    assert (bob.phase, bob.message) == ("Failed", "exit 2: bad line 6")
    assert any(e.reason == "ClientFailed" and e.type == "Warning" for e in d.events)


def test_a_lost_quorum_retries_the_round_after_the_old_jobs_are_gone() -> None:
    run = make_run()
    status = in_round_1(run)
    jobs = [
        job("client", 1, "alice", "failed", message="exit 137 (OOMKilled)"),
        job("client", 1, "bob"),
        job("client", 1, "carol", "succeeded"),
    ]
    d = step(run, status, jobs, seconds=5)
    assert d.status.round_attempt == 1
    # Every client starts the new attempt afresh: no failure message left on a Pending client.
    assert {(c.phase, c.message) for c in d.status.clients} == {("Pending", None)}
    assert {a.name for a in d.actions if isinstance(a, DeleteJob)} == {j.name for j in jobs}
    assert not [a for a in d.actions if isinstance(a, CreateClientJob)]
    # While the old Jobs are still terminating, nothing new is created ...
    terminating = [replace(j, deleting=True) for j in jobs]
    assert step(run, d.status, terminating, seconds=6).actions == []
    # ... and once they are gone, the whole round starts again as attempt 1.
    again = step(run, d.status, [], seconds=7)
    assert again.actions == [CreateClientJob(1, 1, c) for c in CLIENTS]


def test_retries_exhausted_fail_the_run_with_a_reason() -> None:
    run = make_run(aggregation={"maxRoundRetries": 0})
    status = in_round_1(run)
    d = step(run, status, [job("client", 1, "alice", "failed")])
    assert d.status.phase == "Failed"
    assert cond(d.status, "Failed") == ("True", "QuorumNotReached")
    assert cond(d.status, "Progressing")[0] == "False"
    assert "quorum 3" in get_condition(d.status.conditions, "Failed").message
    assert d.status.completion_time == T0


def test_a_timed_out_round_aggregates_with_the_quorum_and_stops_stragglers() -> None:
    run = make_run(aggregation={"minClients": 2, "roundTimeoutSeconds": 600})
    status = in_round_1(run)
    jobs = [
        job("client", 1, "alice", "succeeded"),
        job("client", 1, "bob", "succeeded"),
        job("client", 1, "carol"),
    ]
    assert step(run, status, jobs, seconds=599).actions == []
    d = step(run, status, jobs, seconds=601)
    assert DeleteJob("demo-r1-carol", "round timed out; aggregating without it") in d.actions
    assert CreateAggregateJob(1, 0, ("alice", "bob")) in d.actions


def test_a_timed_out_round_without_the_quorum_is_retried() -> None:
    run = make_run(aggregation={"roundTimeoutSeconds": 60})
    status = in_round_1(run)
    d = step(run, status, [job("client", 1, c) for c in CLIENTS], seconds=61)
    assert d.status.round_attempt == 1
    assert cond(d.status, "Progressing") == ("True", "RoundRetried")


def test_a_failed_aggregator_retries_the_round() -> None:
    run = make_run()
    status = in_round_1(run)
    clients_done = [job("client", 1, c, "succeeded") for c in CLIENTS]
    status = step(run, status, clients_done).status
    d = step(
        run, status, [*clients_done, job("aggregator", 1, state="failed", message="exit 1: quorum")]
    )
    assert d.status.round_attempt == 1
    assert d.status.aggregating_clients == []
    assert "RoundRetried" in [e.reason for e in d.events]


def test_a_vanished_job_of_a_recorded_client_is_not_created_again() -> None:
    run = make_run()
    status = in_round_1(run)
    status = step(
        run,
        status,
        [
            job("client", 1, "alice", "succeeded"),
            job("client", 1, "bob"),
            job("client", 1, "carol"),
        ],
    ).status
    d = step(run, status, [job("client", 1, "bob"), job("client", 1, "carol")])
    assert d.actions == []


def test_suspend_suspends_active_jobs_and_resume_releases_them() -> None:
    run = make_run()
    status = in_round_1(run)
    jobs = [job("client", 1, c) for c in CLIENTS]
    suspended_run = replace(run, spec=run.spec.model_copy(update={"suspend": True}))
    d = step(suspended_run, status, jobs)
    assert d.actions == [SuspendJob(j.name, True) for j in jobs]
    assert d.status.phase == "Suspended"
    assert cond(d.status, "Suspended") == ("True", "Suspended")
    assert cond(d.status, "Progressing") == ("False", "Suspended")
    paused = [replace(j, suspended=True) for j in jobs]
    assert step(suspended_run, d.status, paused).actions == []
    resumed = step(run, d.status, paused, seconds=30)
    assert resumed.actions == [SuspendJob(j.name, False) for j in jobs]
    assert resumed.status.phase == "Running"
    assert cond(resumed.status, "Suspended") == ("False", "Resumed")
    assert resumed.status.round_started_at == T0 + dt.timedelta(seconds=30)


def test_a_suspended_run_creates_nothing() -> None:
    run = make_run(suspend=True)
    d = step(run, FederatedFineTuneStatus(), [])
    assert d.actions == []
    assert d.status.phase == "Suspended"


def test_rejected_deltas_are_reported() -> None:
    run = make_run(rounds=1)
    status = in_round_1(run)
    clients_done = [job("client", 1, c, "succeeded") for c in CLIENTS]
    status = step(run, status, clients_done).status
    summary = aggregate_summary(
        1, ["alice", "bob"], rejected=[Rejection(client="carol", reason="norm 1e9 > clip")]
    )
    d = step(run, status, [*clients_done, job("aggregator", 1, state="succeeded", summary=summary)])
    carol = next(c for c in d.status.clients if c.name == "carol")
    assert carol.phase == "Rejected"
    assert d.status.history[0].rejected == 1
    assert any(e.reason == "DeltaRejected" and "carol" in e.message for e in d.events)


def test_rejected_count_survives_a_cut_termination_message() -> None:
    """40 rejections with long reasons do not fit 4 KiB: the message drops some of them, and the
    status and the metrics still count all 40."""
    names = [f"client-{i:02d}" for i in range(42)]
    run = make_run(clients=tuple(names), rounds=1, aggregation={"minClients": 2})
    status = in_round_1(run)
    clients_done = [job("client", 1, c, "succeeded") for c in names]
    status = step(run, status, clients_done).status
    rejected = [
        Rejection(client=c, reason="delta norm 1e9 exceeds " + "x" * 150) for c in names[2:]
    ]
    text = dump_summary(aggregate_summary(1, names[:2], rejected))
    summary = parse_summary(text)
    assert isinstance(summary, AggregateSummary)
    assert len(summary.record.rejections) < 40  # the message was cut ...
    d = step(run, status, [*clients_done, job("aggregator", 1, state="succeeded", summary=summary)])
    assert d.status.history[0].rejected == 40  # ... the count was not
    assert d.status.history[0].clients_succeeded == 2
    completed = [f for f in d.facts if isinstance(f, decision.RoundCompleted)]
    assert [f.deltas_rejected for f in completed] == [40]


def test_ttl_after_finished_deletes_the_run() -> None:
    run = make_run(ttlSecondsAfterFinished=100)
    done = FederatedFineTuneStatus(phase="Succeeded", completion_time=T0)
    assert step(run, done, [], seconds=99).actions == []
    assert step(run, done, [], seconds=100).actions == [DeleteRun()]


def test_sampled_clients_are_reproducible() -> None:
    run = make_run(clients=("a", "b", "c", "d", "e"), aggregation={"clientsPerRound": 2})
    first = step(run, FederatedFineTuneStatus(), [])
    d1 = step(run, first.status, [job("aggregator", 0, state="succeeded")])
    d2 = step(run, first.status, [job("aggregator", 0, state="succeeded")])
    assert len(d1.status.selected_clients) == 2
    assert d1.actions == d2.actions
    assert d1.status == d2.status


def test_an_invalid_spec_fails_once_with_an_event() -> None:
    d = engine.invalid_spec(FederatedFineTuneStatus(), ["spec.x: bad"], 3, T0)
    assert d.status.phase == "Failed"
    assert cond(d.status, "Failed") == ("True", "InvalidSpec")
    assert d.status.observed_generation == 3
    assert [e.reason for e in d.events] == ["InvalidSpec"]
    again = engine.invalid_spec(d.status, ["spec.x: bad"], 3, T0)
    assert again.events == []
    assert again.status == d.status


# ---------------------------------------------------------------------------------------------
# Properties: random outcomes, crashes between the status write and the actions, time passing
# ---------------------------------------------------------------------------------------------


@dataclass
class World:
    """The Jobs that exist, as the Job controller would keep them."""

    run: decision.Run
    status: FederatedFineTuneStatus = field(default_factory=FederatedFineTuneStatus)
    jobs: dict[str, ObservedJob] = field(default_factory=dict)
    created: list[tuple[int, int, str, str | None]] = field(default_factory=list)
    clock: float = 0.0
    rounds_seen: list[int] = field(default_factory=list)

    def reconcile(self, crash: bool = False) -> None:
        observed = list(self.jobs.values())
        d = step(self.run, self.status, observed, self.clock)
        # Deciding again on the same observation is a fixed point: same status, no new action.
        again = step(self.run, d.status, observed, self.clock)
        assert again.status == d.status
        creates = (CreateClientJob, CreateAggregateJob)
        assert {a for a in again.actions if isinstance(a, creates)} <= set(d.actions)
        self.status = d.status  # the status is written first ...
        self.rounds_seen.append(-1 if d.status.current_round is None else d.status.current_round)
        if crash:
            return  # ... and the operator dies before acting
        for action in d.actions:
            self.apply(action)

    def apply(self, action: decision.Action) -> None:
        match action:
            case CreateClientJob(round=r, attempt=a, client=c):
                self._create(ObservedJob(f"demo-r{r}-{c}", "client", r, a, c, "active"))
            case CreateAggregateJob(round=r, attempt=a, clients=cs):
                self._create(
                    ObservedJob(
                        f"demo-r{r}-aggregate",
                        "aggregator",
                        r,
                        a,
                        None,
                        "active",
                        summary=aggregate_summary(r, list(cs)),
                    )
                )
            case DeleteJob(name=n):
                self.jobs.pop(n, None)
            case SuspendJob(name=n, suspend=s):
                if n in self.jobs:
                    self.jobs[n] = replace(self.jobs[n], suspended=s)

    def _create(self, new: ObservedJob) -> None:
        if new.name in self.jobs:
            return  # AlreadyExists counts as success
        key = (new.round, new.attempt, new.role, new.client)
        assert key not in self.created, f"Job {key} created twice"
        self.created.append(key)
        self.jobs[new.name] = new

    def finish(self, index: int, ok: bool) -> None:
        active = sorted(n for n, j in self.jobs.items() if j.state == "active")
        if not active:
            return
        name = active[index % len(active)]
        j = self.jobs[name]
        if not ok:
            self.jobs[name] = replace(j, state="failed", summary=None, message="boom")
        elif j.role == "client":
            self.jobs[name] = replace(
                j, state="succeeded", summary=client_summary(j.round, j.client or "")
            )
        else:
            self.jobs[name] = replace(j, state="succeeded")

    def vanish(self, index: int) -> None:
        done = sorted(n for n, j in self.jobs.items() if j.state != "active")
        if done:
            del self.jobs[done[index % len(done)]]


moves = st.lists(
    st.one_of(
        st.tuples(st.just("finish"), st.integers(0, 10), st.booleans()),
        st.tuples(st.just("crash"), st.just(0), st.just(False)),
        st.tuples(st.just("tick"), st.integers(1, 400), st.just(False)),
        st.tuples(st.just("vanish"), st.integers(0, 10), st.just(False)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(
    moves=moves,
    min_clients=st.sampled_from([None, 1, 2]),
    timeout=st.sampled_from([None, 300]),
    retries=st.integers(0, 2),
)
def test_random_histories_never_go_back_never_duplicate_and_always_end(
    moves: list[tuple[str, int, bool]],
    min_clients: int | None,
    timeout: int | None,
    retries: int,
) -> None:
    aggregation: dict[str, Any] = {"maxRoundRetries": retries}
    if min_clients is not None:
        aggregation["minClients"] = min_clients
    if timeout is not None:
        aggregation["roundTimeoutSeconds"] = timeout
    world = World(make_run(rounds=3, aggregation=aggregation))
    world.reconcile()
    for kind, n, ok in moves:
        if world.status.phase in ("Succeeded", "Failed"):
            break
        if kind == "finish":
            world.finish(n, ok)
        elif kind == "tick":
            world.clock += n
        elif kind == "vanish":
            world.vanish(n)
        world.reconcile(crash=kind == "crash")
    # From here every Job succeeds: the run must end.
    for _ in range(200):
        if world.status.phase in ("Succeeded", "Failed"):
            break
        world.finish(0, True)
        world.reconcile()
    assert world.status.phase in ("Succeeded", "Failed")
    assert world.rounds_seen == sorted(world.rounds_seen), "the round went backwards"
    if world.status.phase == "Succeeded":
        assert world.status.final_adapter_uri
        assert [r.round for r in world.status.history] == [1, 2, 3]
