"""The operator end to end on the devcluster: real API server and controllers, the real trainer in
the Job pods, the real S3 server. Every wait has a timeout and names what it waited for.

A whole successful run (its status, Jobs, kubectl's view, Events, adapter and deletion) is
asserted on the real model's run (tests/e2e/test_real_model.py), and an operator killed mid-round
on the fault tests' interrupted run (tests/e2e/test_faults.py): here are the other outcomes a run
can have, a client failing, a spec the operator refuses, a suspension, the cleanup policy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from devcluster.testing import DevCluster, wait_for
from tests.e2e.support import (
    CLIENTS,
    Assets,
    Manifest,
    Operator,
    apply,
    condition,
    delete_run,
    events_of,
    jobs_of,
    patch_spec,
    small_run,
    storage_keys,
    unique_name,
    wait_condition,
    wait_running,
)

RUN_TIMEOUT = 420


def test_a_failed_client_is_reported_and_the_round_goes_on_with_the_quorum(
    devcluster: DevCluster,
    operator: Operator,
    namespace: str,
    assets: Assets,
    manifest: Callable[..., Manifest],
    run_name: str,
) -> None:
    clients = [{"name": c, "dataUri": assets.data_uris[c]} for c in CLIENTS]
    clients[1]["dataUri"] = assets.broken_data_uri
    m = small_run(manifest, assets, run_name, clients=clients, aggregation={"minClients": 2})
    apply(devcluster, m)
    run = wait_condition(devcluster, operator, namespace, run_name, "Succeeded", RUN_TIMEOUT)
    bob = next(c for c in run["status"]["clients"] if c["name"] == "bob")
    assert bob["phase"] == "Failed"
    assert "line 6" in bob["message"]
    assert run["status"]["history"][0]["clientsSucceeded"] == 2
    warnings = [e for e in events_of(devcluster, namespace, run_name) if e["type"] == "Warning"]
    assert any(e["reason"] == "ClientFailed" and "bob" in e["message"] for e in warnings)


def test_without_the_quorum_the_run_fails_with_a_reason(
    devcluster: DevCluster,
    operator: Operator,
    namespace: str,
    assets: Assets,
    manifest: Callable[..., Manifest],
    run_name: str,
) -> None:
    m = small_run(manifest, assets, run_name, rounds=2, aggregation={"maxRoundRetries": 0})
    m["spec"]["clients"][0]["dataUri"] = assets.broken_data_uri
    apply(devcluster, m)
    run = wait_condition(devcluster, operator, namespace, run_name, "Failed", RUN_TIMEOUT)
    failed = condition(run, "Failed")
    assert failed["reason"] == "QuorumNotReached"
    assert "quorum 2" in failed["message"]
    assert run["status"]["phase"] == "Failed"
    assert condition(run, "Succeeded")["status"] == "False"
    assert not [
        j
        for j in jobs_of(devcluster, namespace, run_name)
        if j["metadata"]["labels"]["fedtune.dev/role"] == "aggregator"
        and j["metadata"]["labels"]["fedtune.dev/round"] == "1"
    ]


@dataclass(frozen=True)
class SuspendedRun:
    name: str
    suspended: dict[str, Any]
    """The run once Suspended."""
    finished: dict[str, Any]
    """The run at Succeeded, after the resume."""
    events: list[dict[str, Any]]


@pytest.fixture(scope="module")
def suspended_run(
    devcluster: DevCluster,
    operator: Operator,
    namespace: str,
    assets: Assets,
    manifest: Callable[..., Manifest],
) -> SuspendedRun:
    """One small run with cleanupPolicy Delete, suspended while round 1's clients run (until its
    unfinished Jobs are suspended), then resumed to Succeeded: the suspension's tests and the
    cleanup policy's share it."""
    name = unique_name()
    apply(devcluster, small_run(manifest, assets, name, storage={"cleanupPolicy": "Delete"}))
    wait_running(devcluster, operator, namespace, name, 1, "client")
    patch_spec(devcluster, namespace, name, suspend=True)
    suspended = wait_condition(devcluster, operator, namespace, name, "Suspended", 60)
    wait_for(
        lambda: all(
            j["spec"].get("suspend") or j.get("status", {}).get("succeeded")
            for j in jobs_of(devcluster, namespace, name)
            if j["metadata"]["labels"]["fedtune.dev/round"] == "1"
        ),
        timeout=60,
        what="round 1's unfinished Jobs to be suspended",
    )
    patch_spec(devcluster, namespace, name, suspend=False)
    finished = wait_condition(devcluster, operator, namespace, name, "Succeeded", RUN_TIMEOUT)
    return SuspendedRun(name, suspended, finished, events_of(devcluster, namespace, name))


def test_suspend_suspends_the_jobs_and_resume_finishes_the_run(suspended_run: SuspendedRun) -> None:
    assert suspended_run.suspended["status"]["phase"] == "Suspended"
    assert condition(suspended_run.finished, "Suspended")["status"] == "False"
    reasons = [e["reason"] for e in suspended_run.events]
    assert "Suspended" in reasons
    assert "Resumed" in reasons


def test_cleanup_policy_delete_removes_the_storage_prefix(
    devcluster: DevCluster, namespace: str, suspended_run: SuspendedRun
) -> None:
    name = suspended_run.name
    assert suspended_run.finished["metadata"]["finalizers"] == ["fedtune.dev/cleanup"]
    assert storage_keys(devcluster, f"runs/{name}/")
    delete_run(devcluster, namespace, name, timeout=120)
    assert storage_keys(devcluster, f"runs/{name}/") == []


def test_a_spec_the_schema_accepts_but_the_operator_cannot_run_fails_as_invalid(
    devcluster: DevCluster,
    operator: Operator,
    namespace: str,
    manifest: Callable[..., Manifest],
    run_name: str,
) -> None:
    m = manifest(run_name)
    # Passes the CRD schema, but deleting the run's storage would delete a client's data.
    m["spec"]["storage"]["cleanupPolicy"] = "Delete"
    m["spec"]["clients"][0]["dataUri"] = m["spec"]["storage"]["uri"] + "/data.jsonl"
    apply(devcluster, m)
    run = wait_condition(devcluster, operator, namespace, run_name, "Failed", 60)
    failed = condition(run, "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "spec.clients[0].dataUri" in failed["message"]
    assert jobs_of(devcluster, namespace, run_name) == []
    warnings = [e for e in events_of(devcluster, namespace, run_name) if e["type"] == "Warning"]
    assert any(e["reason"] == "InvalidSpec" for e in warnings)
