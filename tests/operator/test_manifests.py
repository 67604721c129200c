"""The pure Job builders: names, labels, task, credentials, placement, security."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fedtune_operator import manifests
from fedtune_operator.validation import parse_spec
from fedtune_trainer.task import AggregateTask, ClientTask, parse_task

SPEC: dict[str, Any] = {
    "baseModel": "pvc://models/llama-1b",
    "rounds": 3,
    "storage": {
        "uri": "s3://bucket/runs/demo",
        "endpoint": "http://minio:9000",
        "region": "eu-west-1",
        "credentialsSecret": {"name": "s3-creds"},
    },
    "template": {
        "image": "registry.example/fedtune/trainer:1.2.3",
        "labels": {"kueue.x-k8s.io/queue-name": "gpu-queue"},
        "resources": {"limits": {"nvidia.com/gpu": "1"}},
        "priorityClassName": "batch-high",
    },
    "clients": [
        {
            "name": "hospital-a",
            "dataUri": "s3://a-data/train.jsonl",
            "weight": 2.0,
            "credentialsSecret": {
                "name": "a-creds",
                "accessKeyIdKey": "id",
                "secretAccessKeyKey": "secret",
            },
            "nodeSelector": {"site": "a"},
        },
        {
            "name": "hospital-b",
            "dataUri": "pvc://b-data/train.jsonl",
            "resources": {"limits": {"nvidia.com/gpu": "2"}},
        },
    ],
    "aggregation": {"minClients": 1},
    "activeDeadlineSeconds": 3600,
    "backoffLimit": 1,
}


def client_job(client: str = "hospital-a", **spec: Any) -> dict[str, Any]:
    return manifests.client_job(
        run="demo",
        namespace="ns",
        uid="uid-1",
        spec=parse_spec({**SPEC, **spec}),
        round_=2,
        attempt=1,
        client=client,
    )


def env_of(job: dict[str, Any]) -> dict[str, Any]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize(
    ("run", "round_", "suffix", "expected"),
    [
        ("demo", 3, "alice", "demo-r3-alice"),
        ("demo", 0, "aggregate", "demo-r0-aggregate"),
        ("a" * 40, 12, "b" * 40, None),
    ],
)
def test_job_names_are_deterministic_and_at_most_63_characters(
    run: str, round_: int, suffix: str, expected: str | None
) -> None:
    name = manifests.job_name(run, round_, suffix)
    assert name == manifests.job_name(run, round_, suffix)
    assert len(name) <= 63
    if expected:
        assert name == expected
    else:
        assert name != manifests.job_name(run, round_ + 1, suffix)


def test_client_job_labels_owner_and_queue_label() -> None:
    job = client_job()
    labels = job["metadata"]["labels"]
    assert labels == {
        "kueue.x-k8s.io/queue-name": "gpu-queue",
        "fedtune.dev/run": "demo",
        "fedtune.dev/round": "2",
        "fedtune.dev/role": "client",
        "fedtune.dev/attempt": "1",
        "fedtune.dev/client": "hospital-a",
    }
    assert job["spec"]["template"]["metadata"]["labels"] == labels
    assert job["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "fedtune.dev/v1alpha1",
            "kind": "FederatedFineTune",
            "name": "demo",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert job["metadata"]["name"] == "demo-r2-hospital-a"


def test_the_pod_meets_the_restricted_pod_security_standard() -> None:
    pod = client_job()["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = pod["containers"][0]["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False


def test_credentials_come_only_from_secret_references() -> None:
    env = env_of(client_job())
    assert env["AWS_ACCESS_KEY_ID"] == {
        "secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}
    }
    assert env["AWS_SECRET_ACCESS_KEY"] == {
        "secretKeyRef": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}
    }
    assert env["FEDTUNE_DATA_AWS_ACCESS_KEY_ID"] == {
        "secretKeyRef": {"name": "a-creds", "key": "id"}
    }
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert env["AWS_REGION"] == "eu-west-1"
    assert "FEDTUNE_DATA_AWS_ACCESS_KEY_ID" not in env_of(client_job("hospital-b"))


def test_the_task_is_the_contract_the_trainer_parses() -> None:
    task = parse_task(env_of(client_job())["FEDTUNE_TASK"])
    assert isinstance(task, ClientTask)
    assert (task.run, task.round, task.client) == ("demo", 2, "hospital-a")
    assert task.data_uri == "s3://a-data/train.jsonl"
    assert task.base_model == "file:///mnt/pvc/models/llama-1b"
    assert task.storage.uri == "s3://bucket/runs/demo"


def test_pvc_uris_become_read_only_mounts() -> None:
    pod = client_job("hospital-b")["spec"]["template"]["spec"]
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"models", "b-data"}
    mounts = {m["mountPath"]: m.get("readOnly") for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/mnt/pvc/b-data"] is True
    assert mounts["/tmp"] is None
    task = parse_task(env_of(client_job("hospital-b"))["FEDTUNE_TASK"])
    assert task.data_uri == "file:///mnt/pvc/b-data/train.jsonl"


@pytest.mark.parametrize(
    ("client", "gpus", "node_selector"),
    [("hospital-a", "1", {"site": "a"}), ("hospital-b", "2", None)],
)
def test_client_overrides_merge_over_the_template(
    client: str, gpus: str, node_selector: dict[str, str] | None
) -> None:
    pod = client_job(client)["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": gpus}
    assert pod.get("nodeSelector") == node_selector
    assert pod["priorityClassName"] == "batch-high"
    assert pod["containers"][0]["image"] == "registry.example/fedtune/trainer:1.2.3"


def test_job_retry_policy() -> None:
    spec = client_job()["spec"]
    assert spec["backoffLimit"] == 1
    assert spec["activeDeadlineSeconds"] == 3600
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    assert rules[1]["action"] == "FailJob"
    assert rules[1]["onExitCodes"]["values"] == [manifests.EXIT_INVALID_INPUT]


def test_aggregate_job_carries_clients_weights_and_quorum() -> None:
    job = manifests.aggregate_job(
        run="demo",
        namespace="ns",
        uid="uid-1",
        spec=parse_spec(SPEC),
        round_=3,
        attempt=0,
        clients=["hospital-a", "hospital-b"],
    )
    assert job["metadata"]["name"] == "demo-r3-aggregate"
    assert job["metadata"]["labels"]["fedtune.dev/role"] == "aggregator"
    assert "fedtune.dev/client" not in job["metadata"]["labels"]
    task = parse_task(env_of(job)["FEDTUNE_TASK"])
    assert isinstance(task, AggregateTask)
    assert task.clients == ["hospital-a", "hospital-b"]
    assert task.client_weights == {"hospital-a": 2.0, "hospital-b": 1.0}
    assert task.min_clients == 1
    assert task.rounds == 3
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command == ["fedtune-trainer", "aggregate"]


def test_cleanup_job_outlives_the_run_and_expires() -> None:
    job = manifests.cleanup_job(run="demo", namespace="ns", spec=parse_spec(SPEC))
    assert "ownerReferences" not in job["metadata"]
    assert job["spec"]["ttlSecondsAfterFinished"] == 60
    task = json.loads(env_of(job)["FEDTUNE_TASK"])
    assert task == {
        "kind": "cleanup",
        "run": "demo",
        "storage": {
            "uri": "s3://bucket/runs/demo",
            "endpoint": "http://minio:9000",
            "region": "eu-west-1",
            "forcePathStyle": True,
        },
    }
