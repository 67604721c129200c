"""Reading Jobs and their pods into what the engine reasons about."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fedtune_operator.observe import compact_pod, indexed_pods, observe_jobs
from fedtune_trainer.wire.results import ClientSummary

SUMMARY = ClientSummary(
    round=1,
    client="alice",
    samples=8,
    steps=4,
    train_loss=1.25,
    bytes_sent=100,
    raw_bytes=400,
    full_model_bytes=9000,
    sha256="ab",
    seconds=2.0,
)


def job(
    name: str,
    *,
    owner: str = "uid-1",
    condition: str | None = None,
    role: str = "client",
    suspend: bool = False,
    deleting: bool = False,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "labels": {
            "fedtune.dev/run": "demo",
            "fedtune.dev/round": "1",
            "fedtune.dev/role": role,
            "fedtune.dev/attempt": "0",
            **({"fedtune.dev/client": "alice"} if role == "client" else {}),
        },
        "ownerReferences": [{"uid": owner}],
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-11-24T12:00:00Z"
    conditions = (
        [{"type": condition, "status": "True", "message": "BackoffLimitExceeded"}]
        if condition
        else []
    )
    return {"metadata": meta, "spec": {"suspend": suspend}, "status": {"conditions": conditions}}


def pod(
    job_name: str, exit_code: int, message: str, created: str = "t1", reason: str | None = None
) -> dict[str, Any]:
    terminated = {"exitCode": exit_code, "message": message}
    if reason is not None:
        terminated["reason"] = reason
    return {
        "metadata": {"labels": {"job-name": job_name}, "creationTimestamp": created},
        "status": {"containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}]},
    }


def test_jobs_of_another_owner_are_ignored() -> None:
    assert observe_jobs("uid-1", [job("a", owner="uid-0")], []) == []


@pytest.mark.parametrize(
    ("condition", "state"), [(None, "active"), ("Complete", "succeeded"), ("Failed", "failed")]
)
def test_state_comes_from_the_terminal_condition(condition: str | None, state: str) -> None:
    (observed,) = observe_jobs("uid-1", [job("a", condition=condition)], [])
    assert observed.state == state


def test_a_succeeded_job_carries_its_pod_summary() -> None:
    text = json.dumps(SUMMARY.wire())
    (observed,) = observe_jobs("uid-1", [job("a", condition="Complete")], [pod("a", 0, text)])
    assert observed.summary == SUMMARY
    assert (observed.round, observed.client, observed.attempt) == (1, "alice", 0)


def test_a_failed_job_carries_its_last_pod_reason() -> None:
    pods = [
        pod("a", 1, "error: first try", "t1"),
        pod("a", 2, "trace\nerror: ValueError: data.jsonl line 6: bad JSON", "t2"),
    ]
    (observed,) = observe_jobs("uid-1", [job("a", condition="Failed")], pods)
    assert observed.message == "exit 2: error: ValueError: data.jsonl line 6: bad JSON"


@pytest.mark.parametrize(
    ("exit_code", "message", "reason", "expected"),
    [
        (
            137,
            "",
            "OOMKilled",
            "exit 137 (OOMKilled): BackoffLimitExceeded (the container's memory limit)",
        ),
        (2, "error: bad task", "Error", "exit 2: error: bad task"),
        (1, "", None, "exit 1: BackoffLimitExceeded"),
        (128, "", "ContainerCannotRun", "exit 128 (ContainerCannotRun): BackoffLimitExceeded"),
    ],
    ids=["oom-killed", "error-says-nothing-more", "no-reason", "cannot-run"],
)
def test_a_failure_names_the_kubelets_reason(
    exit_code: int, message: str, reason: str | None, expected: str
) -> None:
    """An OOM kill leaves no termination message: the kubelet's reason is the only clue."""
    pods = [pod("a", exit_code, message, reason=reason)]
    (observed,) = observe_jobs("uid-1", [job("a", condition="Failed")], pods)
    assert observed.message == expected


def test_an_unreadable_summary_is_not_trusted() -> None:
    (observed,) = observe_jobs("uid-1", [job("a", condition="Complete")], [pod("a", 0, "not json")])
    assert observed.summary is None
    assert observed.message == "unreadable summary"


def test_suspended_and_deleting_flags() -> None:
    (observed,) = observe_jobs("uid-1", [job("a", suspend=True, deleting=True)], [])
    assert observed.suspended
    assert observed.deleting


def test_a_summary_without_a_train_loss_round_trips() -> None:
    summary = SUMMARY.model_copy(update={"train_loss": None})
    text = json.dumps(summary.wire())
    (observed,) = observe_jobs("uid-1", [job("a", condition="Complete")], [pod("a", 0, text)])
    assert observed.summary == summary


# ---------------------------------------------------------------------------------------------
# The pod index: what it keeps, and when a reconcile must list the pods instead
# ---------------------------------------------------------------------------------------------


def running(job_name: str) -> dict[str, Any]:
    return {
        "metadata": {"labels": {"job-name": job_name}, "creationTimestamp": "t0"},
        "status": {"containerStatuses": [{"name": "trainer", "state": {"running": {}}}]},
    }


def test_an_indexed_pod_reads_as_the_pod_it_was_made_from() -> None:
    text = json.dumps(SUMMARY.wire())
    full = pod("a", 0, text)
    full["metadata"].update(name="a-x7k2p", uid="p-1", annotations={"big": "x" * 4096})
    full["spec"] = {"containers": [{"name": "trainer", "env": [{"name": "A", "value": "1"}]}]}
    full["status"]["containerStatuses"].append({"name": "sidecar", "state": {"running": {}}})
    small = compact_pod(full)
    assert "spec" not in small
    assert "annotations" not in small["metadata"]
    assert len(json.dumps(small)) < len(text) + 300
    for jobs in ([job("a", condition="Complete")], [job("a", condition="Failed")]):
        assert observe_jobs("uid-1", jobs, [small]) == observe_jobs("uid-1", jobs, [full])


TEXT = json.dumps(SUMMARY.wire())


@pytest.mark.parametrize(
    ("condition", "indexed", "listed"),
    [
        ("Complete", [pod("a", 0, TEXT)], False),
        ("Complete", [], True),
        ("Complete", [running("a")], True),
        # An earlier attempt's failure is in the index, the pod that succeeded not yet.
        ("Complete", [pod("a", 1, "error: first try")], True),
        ("Complete", [pod("a", 1, "error: first try"), pod("a", 0, TEXT, "t2")], False),
        ("Failed", [pod("a", 2, "error: bad data")], False),
        ("Failed", [running("a")], True),
    ],
    ids=[
        "succeeded-and-seen",
        "no-pod-seen",
        "pod-still-running",
        "only-an-earlier-failure-seen",
        "failure-then-success-seen",
        "failed-and-seen",
        "failed-but-its-pod-not-seen-ending",
    ],
)
def test_a_finished_job_is_read_from_the_index_only_when_it_shows_how_it_ended(
    condition: str, indexed: list[dict[str, Any]], listed: bool
) -> None:
    """A Job's condition and its pod's final state arrive through different watches, in either
    order: a Job read as finished without its result would be a client without a summary."""
    jobs = [job("a", condition=condition)]
    pods = indexed_pods(jobs, ["a"], lambda name: indexed if name == "a" else [])
    assert (pods is None) is listed
    if pods is not None:
        (observed,) = observe_jobs("uid-1", jobs, pods)
        assert (observed.summary is not None) is (condition == "Complete")
