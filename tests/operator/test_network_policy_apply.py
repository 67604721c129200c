"""The reconcile loop applies a run's NetworkPolicy before any of its pods can exist, and fails
closed: a policy it cannot apply means no Job, a warning event, and a retry (handlers.reconcile
against a recording fake of the Kubernetes verbs)."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
import pytest
from kubernetes.client.rest import ApiException

from fedtune_operator import handlers

SPEC: dict[str, Any] = {
    "baseModel": "s3://models/llama-1b",
    "rounds": 1,
    "storage": {"uri": "s3://bucket/runs/demo", "endpoint": "http://10.0.0.9:9000"},
    "clients": [{"name": "a", "dataUri": "s3://data/a.jsonl"}],
}


class FakeKube:
    """Records the order of the verbs the reconcile calls; `refuse` makes the policy fail."""

    def __init__(self, spec: dict[str, Any], refuse: int | None = None) -> None:
        self.calls: list[str] = []
        self.policies: list[dict[str, Any]] = []
        self.refuse = refuse
        self.obj = {
            "apiVersion": "fedtune.dev/v1alpha1",
            "kind": "FederatedFineTune",
            "metadata": {
                "name": "demo",
                "namespace": "ns",
                "uid": "uid-1",
                "generation": 1,
                "resourceVersion": "1",
            },
            "spec": spec,
        }

    def get_run(self, namespace: str, name: str) -> dict[str, Any]:
        return self.obj

    def write_status(self, obj: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        self.calls.append("write_status")
        return obj

    def apply_network_policy(self, manifest: dict[str, Any]) -> None:
        self.calls.append("apply_network_policy")
        if self.refuse is not None:
            raise ApiException(status=self.refuse, reason="Forbidden")
        self.policies.append(manifest)

    def create_job(self, manifest: dict[str, Any]) -> bool:
        self.calls.append(f"create_job {manifest['metadata']['name']}")
        return True


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    posted: list[tuple[str, str]] = []
    monkeypatch.setattr(
        kopf, "warn", lambda obj, *, reason, message: posted.append((reason, message))
    )
    monkeypatch.setattr(
        kopf, "event", lambda obj, *, type, reason, message: posted.append((reason, message))
    )
    return posted


def reconcile(monkeypatch: pytest.MonkeyPatch, fake: FakeKube) -> str:
    monkeypatch.setattr(handlers, "_kube", fake)
    return asyncio.run(handlers.reconcile("ns", "demo", []))


@pytest.mark.parametrize(
    ("network_policy", "calls"),
    [
        ({}, ["write_status", "apply_network_policy", "create_job demo-r0-aggregate"]),
        (
            {"enabled": True},
            ["write_status", "apply_network_policy", "create_job demo-r0-aggregate"],
        ),
        ({"enabled": False}, ["write_status", "create_job demo-r0-aggregate"]),
    ],
    ids=["default", "enabled", "disabled"],
)
def test_the_policy_is_applied_before_the_first_job(
    monkeypatch: pytest.MonkeyPatch,
    events: list[tuple[str, str]],
    network_policy: dict[str, Any],
    calls: list[str],
) -> None:
    fake = FakeKube({**SPEC, "networkPolicy": network_policy})
    assert reconcile(monkeypatch, fake) == "wait"
    assert fake.calls == calls
    for policy in fake.policies:
        assert policy["metadata"]["name"] == "demo-pods"
        assert policy["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


@pytest.mark.parametrize("status", [403, 422, 500])
def test_a_policy_that_cannot_be_applied_creates_no_job(
    monkeypatch: pytest.MonkeyPatch, events: list[tuple[str, str]], status: int
) -> None:
    fake = FakeKube(SPEC, refuse=status)
    with pytest.raises(ApiException):
        reconcile(monkeypatch, fake)
    assert fake.calls == ["write_status", "apply_network_policy"]
    (_, message), *_ = [e for e in events if e[0] == "NetworkPolicyFailed"]
    assert f"{status} Forbidden" in message
    assert "demo-pods" in message
