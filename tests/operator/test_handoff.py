"""The kopf shell's share of a round's hand-off (handlers.py): which Job events wake a run, which
actions are applied at once, that a reconcile reads the Jobs after the run, and the line it logs
of its own time, which the `operator` benchmark parses (bench/operator_overhead.py)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest

from bench.operator_overhead import HANDOFF_LINE, JobTimes, operator_shares
from fedtune_operator import decision, handlers, loops
from fedtune_operator import kube as kube_module
from fedtune_operator.observe import compact_job
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
    ("actions", "batches"),
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
    actions: list[decision.Action], batches: list[list[decision.Action]]
) -> None:
    assert handlers.action_batches(actions) == batches


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


async def act(fake: FakeKube, actions: list[decision.Action]) -> None:
    spec = parse_spec(
        {**SPEC, "clients": [{"name": c, "dataUri": f"s3://data/{c}.jsonl"} for c in "ab"]}
    )
    for batch in handlers.action_batches(actions):
        await asyncio.gather(*(loops.in_thread(handlers._apply, fake, RUN, spec, a) for a in batch))  # type: ignore[arg-type]


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
        assert asyncio.run(handlers.reconcile("ns", "demo", read_jobs, woken)) == "wait"
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
    assert 0 <= float(match["seconds"]) <= time.monotonic() - woken


def test_a_reconcile_nothing_woke_logs_no_time(
    monkeypatch: pytest.MonkeyPatch,
    events: list[tuple[str, str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The periodic resync: no event, so no share of a hand-off to report."""
    monkeypatch.setattr(kube_module, "_shared", FakeKube(creations=1))
    with caplog.at_level(logging.INFO, logger="fedtune.operator"):
        assert asyncio.run(handlers.reconcile("ns", "demo", list, None)) == "wait"
    assert not [r for r in caplog.records if "created Jobs" in r.getMessage()]


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
            "after the event that woke the run",
            "x INFO fedtune.operator: created Jobs other-r1-aggregate of ns/other 7.0 s after "
            "the event that woke the run",
        ]
    )
    # Round 0's aggregator is no hand-off of (a); the re-creation of r-r1-c1 is not its first.
    assert operator_shares(log, jobs, {"r"}) == ([0.3], [0.12])
