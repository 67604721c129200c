"""The kopf shell's share of a round's hand-off (handlers.py): which Job events wake a run, which
actions are applied at once, that a reconcile reads the Jobs after the run, and the line it logs
of its own time, which the `operator` benchmark parses (bench/operator_overhead.py)."""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from typing import Any

import pytest

from bench.operator_overhead import HANDOFF_LINE, JobTimes, Share, operator_shares
from fedtune_operator import actions, decision, handlers, loops, network_policy
from fedtune_operator import kube as kube_module
from fedtune_operator.loops import View
from fedtune_operator.observe import compact_job, compact_policy
from fedtune_operator.validation import parse_spec
from tests.operator.test_network_policy_apply import SPEC
from tests.operator.test_network_policy_apply import FakeKube as PolicyFakeKube

RUN: dict[str, Any] = PolicyFakeKube(SPEC).obj
"""The run `demo` of the reconcile tests next door, as the API would return it."""

# ---------------------------------------------------------------------------------------------
# Which Job events wake a run
# ---------------------------------------------------------------------------------------------


def job(status: dict[str, Any], suspend: bool = False) -> dict[str, Any]:
    return {
        "metadata": {"name": "demo-r1-a", "uid": "job-1", "labels": {"fedtune.dev/run": "demo"}},
        "spec": {"suspend": suspend, "parallelism": 1},
        "status": status,
    }


COMPLETE = {"type": "Complete", "status": "True"}


def test_only_job_changes_the_engine_sees_wake_the_run() -> None:
    """The Job controller's updates of active/ready/startTime do not; a condition, a
    suspension, the Job's deletion do. Each step is one event, in the order a Job sees them."""
    steps: list[tuple[str, dict[str, Any] | None, bool]] = [
        ("created", job({}), True),
        ("the same again (a resync)", job({}), False),
        ("pod started", job({"active": 1, "startTime": "2026-01-01T00:00:00Z"}), False),
        ("pod ready", job({"active": 1, "ready": 1}), False),
        ("suspended", job({"active": 1}, suspend=True), True),
        ("resumed", job({"active": 1}), True),
        ("complete", job({"succeeded": 1, "conditions": [COMPLETE]}), True),
        ("counted", job({"succeeded": 1, "conditions": [COMPLETE], "ready": 0}), False),
        ("deleted", None, True),
        ("deleted again", None, False),
    ]
    run_loops = loops.Loops(handlers.reconcile)
    seen = [
        (what, run_loops.job_news("job-1", None if body is None else compact_job(body)))
        for what, body, _ in steps
    ]
    assert seen == [(what, wakes) for what, _, wakes in steps]
    assert run_loops.seen == {}


# ---------------------------------------------------------------------------------------------
# Which actions are applied at once
# ---------------------------------------------------------------------------------------------

C1 = decision.CreateClientJob(round=1, attempt=0, client="a")
C2 = decision.CreateClientJob(round=1, attempt=0, client="b")
AGG = decision.CreateAggregateJob(round=1, attempt=0, clients=("a", "b"))
EVAL = decision.CreateEvaluateJob(round=1)
DEL = decision.DeleteJob(name="demo-r1-a", reason="an older attempt")
SUSPEND = decision.SuspendJob(name="demo-r1-b", suspend=True)


@pytest.mark.parametrize(
    ("given", "batches"),
    [
        ([], []),
        ([C1, C2, EVAL], [[C1, C2, EVAL]]),
        ([DEL, C1, C2], [[DEL], [C1, C2]]),
        ([C1, SUSPEND, C2], [[C1], [SUSPEND], [C2]]),
        ([DEL, SUSPEND], [[DEL], [SUSPEND]]),
        ([AGG, DEL, EVAL], [[AGG], [DEL], [EVAL]]),
    ],
    ids=["none", "creations", "delete-first", "suspend-between", "no-creations", "alternating"],
)
def test_runs_of_creations_are_one_batch_everything_else_its_own(
    given: list[decision.Action], batches: list[list[decision.Action]]
) -> None:
    assert actions.action_batches(given) == batches


class FakeKube:
    """Records the verbs in order; create_job meets the other creations at a barrier, so that
    Jobs created one after another never get past the first (the barrier breaks: the test
    fails rather than hangs)."""

    def __init__(self, creations: int) -> None:
        self.calls: list[str] = []
        self.barrier = threading.Barrier(creations, timeout=10)
        self.lock = threading.Lock()

    def record(self, call: str) -> None:
        with self.lock:
            self.calls.append(call)

    def get_run(self, namespace: str, name: str) -> dict[str, Any]:
        self.record("get_run")
        return RUN

    def apply_network_policy(self, manifest: dict[str, Any]) -> None:
        self.record("apply_network_policy")

    def write_status(self, obj: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        self.record("write_status")
        return {**obj, "status": status}

    def delete_job(self, namespace: str, name: str) -> None:
        self.record(f"delete_job {name}")

    def create_job(self, manifest: dict[str, Any]) -> bool:
        self.barrier.wait()
        self.record(f"create_job {manifest['metadata']['name']}")
        return True


async def act(fake: FakeKube, given: list[decision.Action]) -> None:
    spec = parse_spec(
        {**SPEC, "clients": [{"name": c, "dataUri": f"s3://data/{c}.jsonl"} for c in "ab"]}
    )
    for batch in actions.action_batches(given):
        await asyncio.gather(*(loops.in_thread(actions.apply, fake, RUN, spec, a) for a in batch))  # type: ignore[arg-type]


def test_the_jobs_of_one_decision_are_created_at_once_after_what_comes_before() -> None:
    fake = FakeKube(creations=2)
    asyncio.run(act(fake, [DEL, C1, C2]))
    assert fake.calls[0] == "delete_job demo-r1-a"
    assert sorted(fake.calls[1:]) == ["create_job demo-r1-a", "create_job demo-r1-b"]


# ---------------------------------------------------------------------------------------------
# A reconcile: the Jobs after the run, and the line it logs of its own time
# ---------------------------------------------------------------------------------------------


def test_a_reconcile_reads_the_jobs_after_the_run_and_logs_its_time(
    monkeypatch: pytest.MonkeyPatch,
    events: list[tuple[str, str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeKube(creations=1)
    monkeypatch.setattr(kube_module, "_shared", fake)

    def read_jobs() -> list[dict[str, Any]]:
        fake.record("read_jobs")
        return []

    woken = time.monotonic()
    with caplog.at_level(logging.INFO, logger="fedtune.operator"):
        assert asyncio.run(handlers.reconcile("ns", "demo", View(jobs=read_jobs), woken)) == "wait"
    assert fake.calls == [
        "get_run",
        "read_jobs",
        "apply_network_policy",
        "write_status",
        "create_job demo-r0-aggregate",
    ]
    (line,) = [r.getMessage() for r in caplog.records if "created Jobs" in r.getMessage()]
    match = HANDOFF_LINE.search(line)
    assert match is not None, line
    assert (match["jobs"], match["namespace"], match["run"]) == ("demo-r0-aggregate", "ns", "demo")
    # The line rounds to the millisecond: half of one is the most it may exceed the truth by.
    assert 0 <= float(match["api"]) <= float(match["seconds"])
    assert float(match["seconds"]) <= time.monotonic() - woken + 0.0005


def test_a_reconcile_nothing_woke_logs_no_time(
    monkeypatch: pytest.MonkeyPatch,
    events: list[tuple[str, str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The periodic resync: no event, so no share of a hand-off to report."""
    monkeypatch.setattr(kube_module, "_shared", FakeKube(creations=1))
    with caplog.at_level(logging.INFO, logger="fedtune.operator"):
        assert asyncio.run(handlers.reconcile("ns", "demo", View(jobs=list), None)) == "wait"
    assert not [r for r in caplog.records if "created Jobs" in r.getMessage()]


# ---------------------------------------------------------------------------------------------
# What the watches answer, a reconcile does not ask the API server
# ---------------------------------------------------------------------------------------------


class WatchedFake(FakeKube):
    """FakeKube whose status write answers with a new resourceVersion, or a conflict."""

    def __init__(self, conflict: bool = False) -> None:
        super().__init__(creations=1)
        self.conflict = conflict
        self.written: list[dict[str, Any]] = []

    def write_status(self, obj: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        self.record("write_status")
        if self.conflict:
            raise kube_module.Conflict
        rv = str(int(obj["metadata"]["resourceVersion"]) + 1)
        self.written.append(
            {**obj, "metadata": {**obj["metadata"], "resourceVersion": rv}, "status": status}
        )
        return self.written[-1]


def run_policy() -> dict[str, Any]:
    return network_policy.network_policy(
        run="demo", namespace="ns", uid=RUN["metadata"]["uid"], spec=parse_spec(SPEC)
    )


@pytest.mark.parametrize(
    ("run_watched", "policy_watched", "calls"),
    [
        (False, None, ["get_run", "apply_network_policy", "write_status", "create_job"]),
        (True, None, ["apply_network_policy", "write_status", "create_job"]),
        (True, "as-applied", ["write_status", "create_job"]),
        (True, "edited", ["apply_network_policy", "write_status", "create_job"]),
    ],
    ids=["nothing-watched", "run-watched", "run-and-policy-watched", "policy-edited-since"],
)
def test_a_handoff_asks_the_api_server_only_what_the_watches_do_not_hold(
    monkeypatch: pytest.MonkeyPatch,
    events: list[tuple[str, str]],
    run_watched: bool,
    policy_watched: str | None,
    calls: list[str],
) -> None:
    """Starting a run (its round-0 aggregator) as a loaded hand-off does: with the run and its
    policy from the watches, the status write and the Job are the only requests. The write's
    answer goes to the view: the run is newer than the body the pass acted on."""
    fake = WatchedFake()
    monkeypatch.setattr(kube_module, "_shared", fake)
    policy = compact_policy(run_policy())
    if policy_watched == "edited":
        policy["spec"] = {**policy["spec"], "egress": []}
    forgot: list[bool] = []
    wrote: list[tuple[str, str]] = []
    view = View(
        jobs=list,
        run=(lambda: copy.deepcopy(RUN)) if run_watched else loops._none,
        policy=lambda name: policy if policy_watched and name == "demo-pods" else None,
        forget=lambda: forgot.append(True),
        wrote=lambda acted_on, answer: wrote.append(
            (acted_on["metadata"]["resourceVersion"], answer["metadata"]["resourceVersion"])
        ),
    )
    assert asyncio.run(handlers.reconcile("ns", "demo", view)) == "wait"
    assert [c.split(" ")[0] for c in fake.calls] == calls
    assert forgot == []
    rv = int(RUN["metadata"]["resourceVersion"])
    assert wrote == [(str(rv), str(rv + 1))]


def test_a_watched_run_that_is_not_the_newest_costs_a_conflict_and_a_read_not_a_job(
    monkeypatch: pytest.MonkeyPatch, events: list[tuple[str, str]]
) -> None:
    fake = WatchedFake(conflict=True)
    monkeypatch.setattr(kube_module, "_shared", fake)
    forgot: list[bool] = []
    view = View(jobs=list, run=lambda: copy.deepcopy(RUN), forget=lambda: forgot.append(True))
    assert asyncio.run(handlers.reconcile("ns", "demo", view)) == "again"
    assert fake.calls == ["apply_network_policy", "write_status"]
    assert forgot == [True]


def test_a_decision_with_nothing_to_write_acts_only_on_a_run_read_from_the_api_server(
    monkeypatch: pytest.MonkeyPatch, events: list[tuple[str, str]]
) -> None:
    """The status already says what this pass decides (the Job it creates is not in the index
    yet): nothing was checked against the newest run, so a watched run is read again first."""
    fake = WatchedFake()
    monkeypatch.setattr(kube_module, "_shared", fake)
    assert asyncio.run(handlers.reconcile("ns", "demo", View(jobs=list)))
    fake.calls.clear()
    started = fake.written[0]
    view = View(jobs=list, run=lambda: copy.deepcopy(started))
    assert asyncio.run(handlers.reconcile("ns", "demo", view)) == "again"
    assert fake.calls == ["apply_network_policy"]  # no status to write, no Job created

    fake.calls.clear()
    fake.get_run = lambda namespace, name: copy.deepcopy(started)  # type: ignore[method-assign]
    assert asyncio.run(handlers.reconcile("ns", "demo", View(jobs=list))) == "wait"
    assert fake.calls == ["apply_network_policy", "create_job demo-r0-aggregate"]


@pytest.mark.parametrize(
    "during_write",
    [0, 1, 2],
    ids=["answer-first", "write-event-first", "write-and-suspension-events-first"],
)
def test_what_the_run_s_author_changes_after_the_operator_s_write_is_what_it_acts_on(
    monkeypatch: pytest.MonkeyPatch, events: list[tuple[str, str]], during_write: int
) -> None:
    """The operator writes the status; the author suspends the run. The watch shows the write's
    event, then the suspension's: `during_write` of them reach the operator before the write's
    answer, the rest after it, and the event of the body the write replaced arrives late too.
    The next reconcile must see the suspension: a body that hid it would hide it for good
    (nothing left to write, so nothing to conflict)."""
    run_loops = loops.Loops(handlers.reconcile)
    key = ("ns", "demo")
    watch: list[dict[str, Any]] = []

    class Fake(WatchedFake):
        def write_status(self, obj: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
            answer = super().write_status(obj, status)
            suspended = copy.deepcopy(answer)
            suspended["spec"]["suspend"] = True
            suspended["metadata"]["resourceVersion"] = str(
                int(answer["metadata"]["resourceVersion"]) + 1
            )
            watch.extend([answer, suspended])
            for event in watch[:during_write]:
                run_loops.saw_run(key, copy.deepcopy(event))
            return answer

    fake = Fake()
    monkeypatch.setattr(kube_module, "_shared", fake)
    run_loops.saw_run(key, copy.deepcopy(RUN))
    assert asyncio.run(handlers.reconcile("ns", "demo", run_loops.view(key))) == "wait"
    written = fake.written[-1]
    assert fake.calls == ["apply_network_policy", "write_status", "create_job demo-r0-aggregate"]
    # The run the operator holds: its write, or what the watch showed of it and after it.
    assert run_loops.view(key).run() == watch[max(during_write - 1, 0)]

    run_loops.saw_run(key, copy.deepcopy(RUN))  # late: the body the write replaced
    for event in watch[during_write:]:  # the rest of the watch, in order
        run_loops.saw_run(key, copy.deepcopy(event))
    fake.calls.clear()
    assert asyncio.run(handlers.reconcile("ns", "demo", run_loops.view(key))) == "wait"
    assert fake.calls == ["write_status"]  # no read of the run: the watches hold the newest
    assert fake.written[-1]["status"]["phase"] == "Suspended"
    assert fake.written[-1]["metadata"]["resourceVersion"] == str(
        int(written["metadata"]["resourceVersion"]) + 2
    )


def test_a_write_s_answer_is_the_run_for_the_next_pass_with_no_read() -> None:
    """The answer to the operator's own write is the run until an event shows a newer one; an
    event of a body the write replaced, arriving late, is not taken for the run."""
    run_loops = loops.Loops(handlers.reconcile)
    key = ("ns", "demo")
    run_loops.saw_run(key, body(7))
    view = run_loops.view(key)
    view.wrote(body(7), body(8))
    assert run_loops.view(key).run() == body(8)
    run_loops.saw_run(key, body(7))  # the write replaced it
    assert run_loops.view(key).run() == body(8)
    run_loops.saw_run(key, body(8))
    run_loops.saw_run(key, body(9))
    assert run_loops.view(key).run() == body(9)
    # An event that came while a write was in flight may be newer than its answer: kept.
    view = run_loops.view(key)
    run_loops.saw_run(key, body(11))
    view.wrote(body(9), body(10))
    assert run_loops.view(key).run() == body(11)
    # The event of the very body the write was made from, come during the write (the pass read
    # the run from the API server, ahead of the watch): older than the answer, which is the run.
    view = run_loops.view(key, fresh=True)
    run_loops.saw_run(key, body(12))
    view.wrote(body(12), body(13))
    assert run_loops.view(key).run() == body(13)
    # A run that is gone leaves nothing behind, even when a write of it ends after.
    view = run_loops.view(key)
    run_loops.stop(*key)
    view.wrote(body(13), body(14))
    assert (run_loops.runs, run_loops.older, run_loops.shown) == ({}, {}, {})


def body(rv: int) -> dict[str, Any]:
    return {"metadata": {"name": "demo", "resourceVersion": str(rv)}}


def test_a_pass_that_goes_again_reads_the_run_from_the_api_server() -> None:
    """After a conflict (or a decision that needs the newest run, or an error) the loop's next
    pass gets a view without the watched run."""
    seen: list[dict[str, Any] | None] = []
    outcomes = iter(["again", "gone"])

    async def reconcile(
        namespace: str, name: str, view: View, woken: float | None
    ) -> loops.Outcome:
        seen.append(view.run())
        return next(outcomes)

    async def main() -> None:
        run_loops = loops.Loops(reconcile)
        run_loops.saw_run(("ns", "demo"), body(7))
        run_loops.wake("ns", "demo")
        await asyncio.wait_for(run_loops.tasks[("ns", "demo")], 10)

    asyncio.run(main())
    assert seen == [body(7), None]


# ---------------------------------------------------------------------------------------------
# The benchmark's reading of those lines
# ---------------------------------------------------------------------------------------------


def test_the_benchmark_takes_each_handoffs_first_line_for_its_runs() -> None:
    jobs = {
        "r-r0-aggregate": JobTimes("r", 0, "aggregator"),
        "r-r1-c0": JobTimes("r", 1, "client"),
        "r-r1-c1": JobTimes("r", 1, "client"),
        "r-r1-aggregate": JobTimes("r", 1, "aggregator"),
        "r-r1-evaluate": JobTimes("r", 1, "evaluator"),
        "other-r1-aggregate": JobTimes("other", 1, "aggregator"),
    }
    log = "\n".join(
        [
            "x INFO fedtune.operator: created Jobs r-r0-aggregate of ns/r 0.050 s after the event "
            "that woke the run",
            "x INFO fedtune.operator: created Jobs r-r1-c0, r-r1-c1 of ns/r 0.120 s after the "
            "event that woke the run",
            "x INFO fedtune.operator: created Jobs r-r1-c1 of ns/r 9.000 s after the event that "
            "woke the run",
            "x INFO kopf.objects: Handler 'job_changed' succeeded.",
            "x INFO fedtune.operator: created Jobs r-r1-aggregate, r-r1-evaluate of ns/r 0.3 s "
            "after the event that woke the run, 0.25 s of it waiting on the API server",
            "x INFO fedtune.operator: created Jobs other-r1-aggregate of ns/other 7.0 s after "
            "the event that woke the run",
        ]
    )
    # Round 0's aggregator is no hand-off of (a); the re-creation of r-r1-c1 is not its first.
    assert operator_shares(log, jobs, {"r"}) == ([Share(0.3, 0.25)], [Share(0.12, 0.0)])
    assert Share(0.3, 0.25).own_seconds == pytest.approx(0.05)
