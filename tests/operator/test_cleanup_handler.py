"""The storage cleanup on deletion (handlers.cleanup_storage, against a recording fake of the
Kubernetes verbs): the Job's task names the run's UID, whose marker the trainer requires; a
refusal reaches the run's events with the trainer's reason; no cleanup Job runs without the
run's own NetworkPolicy."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import kopf
import pytest

from fedtune_operator import handlers
from fedtune_operator import kube as kube_module
from fedtune_operator.kube import NotOwned

UID = "0c0ffee0-0000-4000-8000-00000000000a"
SPEC: dict[str, Any] = {
    "baseModel": "s3://models/llama-1b",
    "rounds": 1,
    "storage": {
        "uri": "s3://bucket/runs/demo",
        "endpoint": "http://10.0.0.9:9000",
        "cleanupPolicy": "Delete",
    },
    "clients": [{"name": "a", "dataUri": "s3://data/a.jsonl"}],
}
BODY = {"metadata": {"name": "demo", "namespace": "ns", "uid": UID}, "spec": SPEC}
REFUSAL = (
    "error: SettingError: storage.uri: s3://bucket/runs/demo belongs to run other (uid u-2), "
    f"not this run (uid {UID}); nothing deleted"
)


class FakeKube:
    def __init__(self, job: dict[str, Any] | None = None, policy_taken: bool = False) -> None:
        self.job = job
        self.policy_taken = policy_taken
        self.created: list[dict[str, Any]] = []

    def job_state(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.job

    def apply_network_policy(self, manifest: dict[str, Any]) -> None:
        if self.policy_taken:
            raise NotOwned(
                f"NetworkPolicy ns/{manifest['metadata']['name']} exists and is not ours"
            )

    def create_job(self, manifest: dict[str, Any]) -> bool:
        self.created.append(manifest)
        return True

    def job_pods(self, namespace: str, jobs: list[str]) -> list[dict[str, Any]]:
        terminated = {"exitCode": 2, "reason": "Error", "message": REFUSAL}
        return [
            {
                "metadata": {"labels": {"job-name": jobs[0]}},
                "status": {
                    "containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}]
                },
            }
        ]


def cleanup(monkeypatch: pytest.MonkeyPatch, fake: FakeKube) -> None:
    monkeypatch.setattr(kube_module, "_shared", fake)
    asyncio.run(handlers.cleanup_storage(name="demo", namespace="ns", uid=UID, body=BODY))


def test_the_cleanup_job_is_told_the_runs_uid(
    monkeypatch: pytest.MonkeyPatch, events: list[tuple[str, str]]
) -> None:
    fake = FakeKube()
    with pytest.raises(kopf.TemporaryError):
        cleanup(monkeypatch, fake)
    (job,) = fake.created
    env = {
        e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    task = json.loads(env["FEDTUNE_TASK"])
    assert (task["kind"], task["run"], task["runUid"]) == ("cleanup", "demo", UID)
    assert [r for r, _ in events] == ["StorageCleanup"]


def test_a_refused_cleanup_says_why_in_the_runs_event(
    monkeypatch: pytest.MonkeyPatch, events: list[tuple[str, str]]
) -> None:
    failed = {
        "status": {
            "conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]
        }
    }
    cleanup(monkeypatch, FakeKube(job=failed))
    ((reason, message),) = events
    assert reason == "StorageCleanupFailed"
    assert message.startswith("did not delete s3://bucket/runs/demo (exit 2: error: SettingError:")
    assert f"belongs to run other (uid u-2), not this run (uid {UID}); nothing deleted" in message
    assert message.endswith("it is left in place")


def test_no_cleanup_job_runs_without_the_runs_own_policy(
    monkeypatch: pytest.MonkeyPatch, events: list[tuple[str, str]]
) -> None:
    fake = FakeKube(policy_taken=True)
    cleanup(monkeypatch, fake)
    assert fake.created == []
    ((reason, message),) = events
    assert reason == "StorageCleanupSkipped"
    assert "demo-pods exists and is not ours" in message
    assert "s3://bucket/runs/demo is left in place" in message
