"""The pure Job builders: names, labels, task, credentials, placement, security."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fedtune_operator import manifests, network_policy, objects, volumes
from fedtune_operator.validation import parse_spec, validate_spec
from fedtune_trainer.wire.task import AggregateTask, ClientTask, parse_task

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
    name = objects.job_name(run, round_, suffix)
    assert name == objects.job_name(run, round_, suffix)
    assert len(name) <= 63
    if expected:
        assert name == expected
    else:
        assert name != objects.job_name(run, round_ + 1, suffix)


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


PUBLIC_KEY = "ed25519:" + "A" * 43 + "="


def signing_spec() -> dict[str, Any]:
    """SPEC with hospital-a signing (hospital-b does not)."""
    a, b = SPEC["clients"]
    signing = {"publicKey": PUBLIC_KEY, "secretName": "hospital-a-signing"}
    return {**SPEC, "clients": [{**a, "signing": signing}, b]}


def test_a_signing_key_reaches_its_own_client_alone() -> None:
    spec = parse_spec(signing_spec())
    job = manifests.client_job(
        run="demo", namespace="ns", uid="u", spec=spec, round_=2, attempt=0, client="hospital-a"
    )
    env = env_of(job)
    assert env["FEDTUNE_SIGNING_KEY"] == {
        "secretKeyRef": {"name": "hospital-a-signing", "key": "signing.key"}
    }
    task = parse_task(env["FEDTUNE_TASK"])
    assert isinstance(task, ClientTask)
    assert task.sign
    others = [
        manifests.client_job(
            run="demo", namespace="ns", uid="u", spec=spec, round_=2, attempt=0, client="hospital-b"
        ),
        manifests.aggregate_job(
            run="demo",
            namespace="ns",
            uid="u",
            spec=spec,
            round_=2,
            attempt=0,
            clients=["hospital-a", "hospital-b"],
        ),
    ]
    for other in others:
        assert "FEDTUNE_SIGNING_KEY" not in env_of(other)
        assert "hospital-a-signing" not in json.dumps(other)
    b_task = parse_task(env_of(others[0])["FEDTUNE_TASK"])
    assert isinstance(b_task, ClientTask)
    assert not b_task.sign
    aggregate = parse_task(env_of(others[1])["FEDTUNE_TASK"])
    assert isinstance(aggregate, AggregateTask)
    assert aggregate.client_keys == {"hospital-a": PUBLIC_KEY}


def test_the_noise_key_reaches_the_aggregator_alone() -> None:
    privacy = {"clipNorm": 1.0, "noiseMultiplier": 1.0, "noiseKeySecret": "dp-noise-key"}
    spec = parse_spec({**SPEC, "privacy": privacy})
    aggregator = manifests.aggregate_job(
        run="demo", namespace="ns", uid="u", spec=spec, round_=2, attempt=0, clients=["hospital-a"]
    )
    assert env_of(aggregator)["FEDTUNE_DP_NOISE_KEY"] == {
        "secretKeyRef": {"name": "dp-noise-key", "key": "noise.key"}
    }
    others = [
        manifests.client_job(
            run="demo", namespace="ns", uid="u", spec=spec, round_=2, attempt=0, client=c
        )
        for c in ("hospital-a", "hospital-b")
    ]
    others.append(manifests.evaluate_job(run="demo", namespace="ns", uid="u", spec=spec, round_=2))
    for other in others:
        assert "FEDTUNE_DP_NOISE_KEY" not in env_of(other)
        container = other["spec"]["template"]["spec"]["containers"][0]
        assert "dp-noise-key" not in json.dumps(container["env"][1:])  # the task names it only


def identity_spec() -> dict[str, Any]:
    """SPEC with hospital-a on its own storage identity and the evaluation on its own."""
    a, b = SPEC["clients"]
    own = {"storageCredentialsSecret": {"name": "a-fedtune"}}
    evaluation = {
        "dataUri": "s3://eval/heldout.jsonl",
        "storageCredentialsSecret": {"name": "eval-fedtune"},
    }
    return {**SPEC, "clients": [{**a, **own}, b], "evaluation": evaluation}


def jobs_of(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    parsed = parse_spec(spec)
    common = {"run": "demo", "namespace": "ns", "uid": "u", "spec": parsed}
    jobs = {
        c: manifests.client_job(**common, round_=1, attempt=0, client=c)
        for c in ("hospital-a", "hospital-b")
    }
    jobs["aggregator"] = manifests.aggregate_job(
        **common, round_=1, attempt=0, clients=["hospital-a", "hospital-b"]
    )
    jobs["evaluation"] = manifests.evaluate_job(**common, round_=1)
    jobs["cleanup"] = manifests.cleanup_job(run="demo", namespace="ns", uid="u", spec=parsed)
    return jobs


@pytest.mark.parametrize(
    ("job", "storage", "data"),
    [
        # hospital-a: its own identity; its data with its own data Secret (a-creds)
        ("hospital-a", "a-fedtune", "secret/a-creds"),
        # hospital-b: no identity of its own: the run's, and its data with that
        ("hospital-b", "s3-creds", "the storage credentials (secret/s3-creds)"),
        ("aggregator", "s3-creds", None),
        ("evaluation", "eval-fedtune", None),
        ("cleanup", "s3-creds", None),
    ],
)
def test_each_job_gets_the_identity_the_spec_names_for_it(
    job: str, storage: str, data: str | None
) -> None:
    built = jobs_of(identity_spec())[job]
    env = env_of(built)
    assert env["AWS_ACCESS_KEY_ID"] == {
        "secretKeyRef": {"name": storage, "key": "AWS_ACCESS_KEY_ID"}
    }
    others = {"a-fedtune", "eval-fedtune", "s3-creds"} - {storage}
    refs = json.dumps(built["spec"]["template"]["spec"]["containers"][0]["env"])
    assert not [o for o in others if f'"{o}"' in refs]  # no other identity reaches its pods
    annotations = built["metadata"]["annotations"]
    assert annotations["fedtune.dev/storage-credentials"] == f"secret/{storage}"
    assert annotations.get("fedtune.dev/data-credentials") == data


def test_a_client_on_its_own_identity_reads_its_data_with_it() -> None:
    spec = identity_spec()
    del spec["clients"][0]["credentialsSecret"]
    built = jobs_of(spec)["hospital-a"]
    env = env_of(built)
    assert "FEDTUNE_DATA_AWS_ACCESS_KEY_ID" not in env  # the trainer falls back to AWS_*: its own
    assert env["AWS_SECRET_ACCESS_KEY"]["secretKeyRef"]["name"] == "a-fedtune"
    expected = "the storage credentials (secret/a-fedtune)"
    assert built["metadata"]["annotations"]["fedtune.dev/data-credentials"] == expected


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
    assert task.drift_control == "none"
    assert task.total_clients == len(SPEC["clients"])  # SCAFFOLD's N: all, not the round's
    assert task.attempt == 0  # a rerun of this attempt reports it; attempt 1 computes anew
    assert not task.retain_client_deltas  # storage.clientDeltaPolicy Delete, the default
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command == ["fedtune-trainer", "aggregate"]


@pytest.mark.parametrize(
    ("attempt", "policy", "retain"), [(0, None, False), (2, "Delete", False), (1, "Retain", True)]
)
def test_the_aggregator_knows_its_attempt_and_whether_to_keep_the_deltas(
    attempt: int, policy: str | None, retain: bool
) -> None:
    storage = {**SPEC["storage"], **({"clientDeltaPolicy": policy} if policy else {})}
    job = manifests.aggregate_job(
        run="demo",
        namespace="ns",
        uid="u",
        spec=parse_spec({**SPEC, "storage": storage}),
        round_=3,
        attempt=attempt,
        clients=["hospital-a"],
    )
    task = parse_task(env_of(job)["FEDTUNE_TASK"])
    assert isinstance(task, AggregateTask)
    assert (task.attempt, task.retain_client_deltas) == (attempt, retain)
    assert job["metadata"]["labels"]["fedtune.dev/attempt"] == str(attempt)


@pytest.mark.parametrize("policy", ["Retain", "Delete"])
def test_the_aggregator_knows_the_run_it_marks_the_storage_for(policy: str) -> None:
    """Round 0 marks the storage root with the run's UID, and refuses a root it cannot mark
    when deleting the run would delete it."""
    spec = parse_spec({**SPEC, "storage": {**SPEC["storage"], "cleanupPolicy": policy}})
    job = manifests.aggregate_job(
        run="demo", namespace="ns", uid="uid-1", spec=spec, round_=0, attempt=0, clients=[]
    )
    task = parse_task(env_of(job)["FEDTUNE_TASK"])
    assert isinstance(task, AggregateTask)
    assert (task.run_uid, task.cleanup_policy) == ("uid-1", policy)


def test_scaffold_reaches_the_aggregator_from_the_training_settings() -> None:
    spec = parse_spec({**SPEC, "training": {"driftControl": "scaffold"}})
    job = manifests.aggregate_job(
        run="demo", namespace="ns", uid="uid-1", spec=spec, round_=1, attempt=0,
        clients=["hospital-a"],
    )  # fmt: skip
    task = parse_task(env_of(job)["FEDTUNE_TASK"])
    assert isinstance(task, AggregateTask)
    assert task.drift_control == "scaffold"
    assert task.total_clients == len(SPEC["clients"]) > 1


@pytest.mark.parametrize(
    ("resources", "command"),
    [
        (None, ["fedtune-trainer", "client"]),
        ({"limits": {"nvidia.com/gpu": "1"}}, ["fedtune-trainer", "client"]),
        (
            {"limits": {"nvidia.com/gpu": "4"}},
            ["fedtune-trainer", "client", "--nproc-per-node", "4"],
        ),
        ({"requests": {"amd.com/gpu": 2}}, ["fedtune-trainer", "client", "--nproc-per-node", "2"]),
    ],
    ids=["cpu", "one-gpu", "four-gpus", "requests-only"],
)
def test_a_client_runs_one_process_per_gpu_it_asks_for(
    resources: dict[str, Any] | None, command: list[str]
) -> None:
    clients = [dict(c) for c in SPEC["clients"]]
    clients[0]["resources"] = resources
    spec = parse_spec({**SPEC, "template": {"image": "trainer:1"}, "clients": clients})
    job = manifests.client_job(
        run="demo", namespace="ns", uid="u", spec=spec, round_=1, attempt=0, client="hospital-a"
    )
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == command


def test_cleanup_job_outlives_the_run_and_expires() -> None:
    job = manifests.cleanup_job(run="demo", namespace="ns", uid="uid-1", spec=parse_spec(SPEC))
    assert "ownerReferences" not in job["metadata"]
    assert job["spec"]["ttlSecondsAfterFinished"] == 60
    task = json.loads(env_of(job)["FEDTUNE_TASK"])
    assert task == {
        "kind": "cleanup",
        "run": "demo",
        "runUid": "uid-1",
        "storage": {
            "uri": "s3://bucket/runs/demo",
            "endpoint": "http://minio:9000",
            "region": "eu-west-1",
            "forcePathStyle": True,
        },
    }


# ---------------------------------------------------------------------------------------------
# Least privilege: no API token, and a NetworkPolicy around every pod of the run
# ---------------------------------------------------------------------------------------------


def every_job(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One Job of each kind the run creates, by kind."""
    parsed = parse_spec(spec)
    common = {"run": "demo", "namespace": "ns", "uid": "uid-1", "spec": parsed}
    return {
        "client": manifests.client_job(**common, round_=1, attempt=0, client="hospital-a"),
        "aggregate": manifests.aggregate_job(
            **common, round_=1, attempt=0, clients=["hospital-a", "hospital-b"]
        ),
        "evaluate": manifests.evaluate_job(**common, round_=1),
        "cleanup": manifests.cleanup_job(**common),
    }


def with_template(**template: Any) -> dict[str, Any]:
    return {**SPEC, "template": {**SPEC["template"], **template}}


def with_client(index: int, **client: Any) -> dict[str, Any]:
    clients = [dict(c) for c in SPEC["clients"]]
    clients[index].update(client)
    return {**SPEC, "clients": clients}


@pytest.mark.parametrize(
    ("spec", "automount"),
    [
        (SPEC, False),
        (with_template(serviceAccountName="trainer"), False),
        (with_client(0, serviceAccountName="hospital-a-identity"), False),
        (with_template(serviceAccountName="trainer", automountServiceAccountToken=True), True),
        (with_template(automountServiceAccountToken=False), False),
    ],
    ids=["no-account", "template-account", "client-account", "asked-for", "said-no"],
)
def test_no_job_mounts_an_api_token_unless_the_run_asks(
    spec: dict[str, Any], automount: bool
) -> None:
    """The trainer never calls the API server; a service account (workload identity) is no
    reason to hand its token to the training code. Always explicit: a namespace's default
    ServiceAccount mounts its token unless the pod says false."""
    for kind, job in every_job(spec).items():
        assert job["spec"]["template"]["spec"]["automountServiceAccountToken"] is automount, kind


def policy(spec: dict[str, Any], uid: str = "uid-1") -> dict[str, Any]:
    return network_policy.network_policy(run="demo", namespace="ns", uid=uid, spec=parse_spec(spec))


DNS_RULE = {
    "to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
}
ANYWHERE = [{"ipBlock": {"cidr": "0.0.0.0/0"}}, {"ipBlock": {"cidr": "::/0"}}]
POD_IDENTITY = [
    {"ipBlock": {"cidr": "169.254.170.23/32"}},
    {"ipBlock": {"cidr": "fd00:ec2::23/128"}},
]
INSTANCE_METADATA = [
    {"ipBlock": {"cidr": "169.254.169.254/32"}},
    {"ipBlock": {"cidr": "fd00:ec2::254/128"}},
]
MINIO_RULE = {
    "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "storage"}}}],
    "ports": [{"protocol": "TCP", "port": 9000}],
}


def tcp(port: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": port}]


def with_storage(**storage: Any) -> dict[str, Any]:
    return {**SPEC, "storage": {**SPEC["storage"], **storage}}


def without_endpoint() -> dict[str, Any]:
    spec = with_storage()
    del spec["storage"]["endpoint"]
    return spec


def ambient_identity() -> dict[str, Any]:
    spec = with_storage()
    del spec["storage"]["credentialsSecret"]
    return spec


def all_on_volumes() -> dict[str, Any]:
    spec = {
        **SPEC,
        "storage": {"uri": "file:///mnt/runs/demo"},
        "clients": [{"name": "a", "dataUri": "pvc://a-data/train.jsonl"}],
    }
    return spec


@pytest.mark.parametrize(
    ("spec", "egress"),
    [
        (SPEC, [{"to": ANYWHERE, "ports": tcp(9000)}]),
        (
            with_storage(endpoint="https://10.1.2.3"),
            [{"to": [{"ipBlock": {"cidr": "10.1.2.3/32"}}], "ports": tcp(443)}],
        ),
        (
            with_storage(endpoint="http://[fd00::5]:9000"),
            [{"to": [{"ipBlock": {"cidr": "fd00::5/128"}}], "ports": tcp(9000)}],
        ),
        (with_storage(endpoint="http://s3.internal"), [{"to": ANYWHERE, "ports": tcp(80)}]),
        (without_endpoint(), [{"to": ANYWHERE, "ports": tcp(443)}]),
        (
            {**SPEC, "baseModel": "Qwen/Qwen2.5-0.5B"},
            [{"to": ANYWHERE, "ports": tcp(9000)}, {"to": ANYWHERE, "ports": tcp(443)}],
        ),
        (
            ambient_identity(),
            [{"to": ANYWHERE, "ports": tcp(9000)}, {"to": POD_IDENTITY, "ports": tcp(80)}],
        ),
        (
            {**ambient_identity(), "networkPolicy": {"allowInstanceMetadata": True}},
            [
                {"to": ANYWHERE, "ports": tcp(9000)},
                {"to": POD_IDENTITY, "ports": tcp(80)},
                {"to": INSTANCE_METADATA, "ports": tcp(80)},
            ],
        ),
        (
            {**SPEC, "networkPolicy": {"allowInstanceMetadata": True}},
            [{"to": ANYWHERE, "ports": tcp(9000)}, {"to": INSTANCE_METADATA, "ports": tcp(80)}],
        ),
        (all_on_volumes(), []),
        ({**SPEC, "networkPolicy": {"egress": [MINIO_RULE]}}, [MINIO_RULE]),
        (
            {**SPEC, "baseModel": "Qwen/Qwen2.5-0.5B", "networkPolicy": {"egress": [MINIO_RULE]}},
            [MINIO_RULE],
        ),
        (
            {**SPEC, "networkPolicy": {"egress": [MINIO_RULE], "allowInstanceMetadata": True}},
            [MINIO_RULE, {"to": INSTANCE_METADATA, "ports": tcp(80)}],
        ),
    ],
    ids=[
        "endpoint-host-name",
        "endpoint-ipv4",
        "endpoint-ipv6",
        "endpoint-http-default-port",
        "aws-s3",
        "hub-model",
        "ambient-identity-no-instance-metadata",
        "ambient-identity-instance-metadata-opted-in",
        "instance-metadata-with-credentials",
        "volumes-only",
        "explicit-egress",
        "explicit-egress-replaces-hub",
        "explicit-egress-instance-metadata",
    ],
)
def test_egress_is_dns_plus_what_the_run_needs(
    spec: dict[str, Any], egress: list[dict[str, Any]]
) -> None:
    """A NetworkPolicy matches addresses, not names: a host-name endpoint can only be confined
    to its port; an IP literal, or spec.networkPolicy.egress, confines it to its address."""
    assert policy(spec)["spec"]["egress"] == [DNS_RULE, *egress]


@pytest.mark.parametrize(
    ("spec", "reasons"),
    [
        (SPEC, ["spec.storage.endpoint minio is a host name: TCP 9000 to any address"]),
        (
            without_endpoint(),
            ["storage is AWS S3 (no spec.storage.endpoint): TCP 443 to any address"],
        ),
        (
            {**SPEC, "baseModel": "Qwen/Qwen2.5-0.5B"},
            [
                "spec.storage.endpoint minio is a host name: TCP 9000 to any address",
                "a model is a hub id: TCP 443 to any address",
            ],
        ),
        (with_storage(endpoint="https://10.1.2.3"), []),
        (
            {**with_storage(endpoint="https://10.1.2.3"), "baseModel": "Qwen/Qwen2.5-0.5B"},
            ["a model is a hub id: TCP 443 to any address"],
        ),
        (all_on_volumes(), []),
        ({**SPEC, "networkPolicy": {"egress": [MINIO_RULE]}}, []),
        ({**SPEC, "networkPolicy": {"enabled": False}}, []),
    ],
    ids=[
        "endpoint-host-name",
        "aws-s3",
        "host-name-and-hub",
        "endpoint-ip",
        "endpoint-ip-but-hub",
        "volumes-only",
        "explicit-egress",
        "no-policy",
    ],
)
def test_a_derived_rule_open_to_any_address_is_reported(
    spec: dict[str, Any], reasons: list[str]
) -> None:
    """What the EgressUnconfined condition says: every derived rule that opens a port to any
    address, because a NetworkPolicy cannot name the host it is for."""
    assert network_policy.unconfined_egress(parse_spec(spec)) == reasons
    if parse_spec(spec).network_policy.enabled:
        opened = [r for r in policy(spec)["spec"]["egress"] if r["to"] == ANYWHERE]
        assert len(opened) == len(reasons)


def test_dns_servers_can_be_named() -> None:
    node_local = {"ipBlock": {"cidr": "169.254.20.10/32"}}
    (dns, *_) = policy({**SPEC, "networkPolicy": {"dns": [node_local]}})["spec"]["egress"]
    assert dns["to"] == [node_local]
    assert dns["ports"] == DNS_RULE["ports"]


def test_the_policy_denies_ingress_is_owned_by_the_run_and_selects_every_pod() -> None:
    np = policy(SPEC)
    assert np["apiVersion"] == "networking.k8s.io/v1"
    assert np["metadata"]["name"] == network_policy.network_policy_name("demo") == "demo-pods"
    assert np["metadata"]["namespace"] == "ns"
    assert np["metadata"]["ownerReferences"] == [objects.owner_reference("demo", "uid-1")]
    assert np["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert np["spec"]["ingress"] == []
    selector = np["spec"]["podSelector"]["matchLabels"]
    for kind, job in every_job(SPEC).items():
        labels = job["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), kind
    # Another run's pods are not selected.
    other = manifests.client_job(
        run="other",
        namespace="ns",
        uid="u",
        spec=parse_spec(SPEC),
        round_=1,
        attempt=0,
        client="hospital-a",
    )
    assert not selector.items() <= other["spec"]["template"]["metadata"]["labels"].items()


def test_a_spec_cannot_label_its_pods_out_of_the_policy() -> None:
    """The selector label is reserved (validate_spec and the CRD refuse it), and even a spec that
    got past both cannot move a pod out of its run's policy: the operator's labels win."""
    spec = with_template(labels={"fedtune.dev/run": "other"})
    assert any("reserved" in p for p in validate_spec(parse_spec(spec)))
    selector = policy(spec)["spec"]["podSelector"]["matchLabels"]
    for kind, job in every_job(spec).items():
        assert selector.items() <= job["spec"]["template"]["metadata"]["labels"].items(), kind


# -- the model cache ------------------------------------------------------------------------------

CACHE_CASES = [
    # (modelCache, client or None for the evaluation Job, the claim the operator creates,
    #  the pod's cache volume source, FEDTUNE_CACHE_DIR, FEDTUNE_STATE_DIR: a client's residual
    #  and control variate stay on its own claim, the one volume that outlives its pods)
    ({}, "hospital-a", None, None, None, None),
    ({"mode": "none"}, None, None, None, None, None),
    (
        {"mode": "perClient"},
        "hospital-a",
        "demo-cache-hospital-a",
        {"persistentVolumeClaim": {"claimName": "demo-cache-hospital-a"}},
        "/var/cache/fedtune",
        "/var/cache/fedtune/state",
    ),
    (
        {"mode": "perClient", "size": "200Gi", "storageClassName": "fast-ssd"},
        None,
        "demo-cache-evaluate",
        {"persistentVolumeClaim": {"claimName": "demo-cache-evaluate"}},
        "/var/cache/fedtune",
        None,
    ),
    (
        {"mode": "ephemeral", "size": "100Gi"},
        "hospital-b",
        None,
        {
            "ephemeral": {
                "volumeClaimTemplate": {
                    "metadata": {
                        "labels": {
                            "fedtune.dev/run": "demo",
                            "fedtune.dev/role": "client",
                            "fedtune.dev/client": "hospital-b",
                        }
                    },
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": "100Gi"}},
                    },
                }
            }
        },
        "/var/cache/fedtune",
        None,
    ),
]


def _job_for(cache: dict[str, Any], client: str | None) -> dict[str, Any]:
    spec = parse_spec(
        {**SPEC, "modelCache": cache, "evaluation": {"dataUri": "s3://eval-data/x.jsonl"}}
    )
    if client is None:
        return manifests.evaluate_job(run="demo", namespace="ns", uid="uid-1", spec=spec, round_=2)
    return manifests.client_job(
        run="demo", namespace="ns", uid="uid-1", spec=spec, round_=2, attempt=0, client=client
    )


@pytest.mark.parametrize(
    ("cache", "client", "claim", "source", "cache_dir", "state_dir"), CACHE_CASES
)
def test_the_model_cache_volume_of_each_mode(
    cache: dict[str, Any],
    client: str | None,
    claim: str | None,
    source: dict[str, Any] | None,
    cache_dir: str | None,
    state_dir: str | None,
) -> None:
    spec = parse_spec({**SPEC, "modelCache": cache})
    built = volumes.cache_claim(run="demo", namespace="ns", uid="uid-1", spec=spec, client=client)
    assert (built and built["metadata"]["name"]) == claim
    job = _job_for(cache, client)
    pod = job["spec"]["template"]["spec"]
    pod_volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    env = env_of(job)
    names = [e["name"] for e in pod["containers"][0]["env"]]
    assert len(names) == len(set(names))  # HF_HOME moves, it is not set twice
    assert env.get("FEDTUNE_STATE_DIR") == state_dir
    if source is None:
        assert "model-cache" not in pod_volumes
        assert "model-cache" not in mounts
        assert "FEDTUNE_CACHE_DIR" not in env
        assert env["HF_HOME"] == "/tmp/hf"
        return
    assert pod_volumes["model-cache"] == {"name": "model-cache", **source}
    assert mounts["model-cache"] == {"name": "model-cache", "mountPath": cache_dir}
    assert env["FEDTUNE_CACHE_DIR"] == cache_dir
    assert env["HF_HOME"] == f"{cache_dir}/hf"


def test_a_cache_claim_is_owned_by_the_run_and_labelled() -> None:
    spec = parse_spec(
        {**SPEC, "modelCache": {"mode": "perClient", "size": "80Gi", "storageClassName": "ssd"}}
    )
    claim = volumes.cache_claim(
        run="demo", namespace="ns", uid="uid-1", spec=spec, client="hospital-a"
    )
    assert claim == {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": "demo-cache-hospital-a",
            "namespace": "ns",
            "labels": {
                "fedtune.dev/run": "demo",
                "fedtune.dev/role": "client",
                "fedtune.dev/client": "hospital-a",
            },
            "ownerReferences": [objects.owner_reference("demo", "uid-1")],
        },
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "80Gi"}},
            "storageClassName": "ssd",
        },
    }
    evaluate = volumes.cache_claim(run="demo", namespace="ns", uid="uid-1", spec=spec, client=None)
    assert evaluate is not None
    assert evaluate["metadata"]["labels"] == {
        "fedtune.dev/run": "demo",
        "fedtune.dev/role": "evaluator",
    }


def test_the_aggregator_and_cleanup_jobs_get_no_cache() -> None:
    spec = parse_spec({**SPEC, "modelCache": {"mode": "perClient"}})
    aggregate = manifests.aggregate_job(
        run="demo", namespace="ns", uid="u", spec=spec, round_=1, attempt=0, clients=["hospital-a"]
    )
    cleanup = manifests.cleanup_job(run="demo", namespace="ns", uid="uid-1", spec=spec)
    for job in (aggregate, cleanup):
        assert "FEDTUNE_CACHE_DIR" not in env_of(job)
        assert all(v["name"] != "model-cache" for v in job["spec"]["template"]["spec"]["volumes"])
