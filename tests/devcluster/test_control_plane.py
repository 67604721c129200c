"""The devcluster is a real control plane: Job controller, garbage collector, RBAC, PodSecurity
admission and in-cluster clients behave as on any cluster."""

from __future__ import annotations

import json
import uuid

import pytest

from devcluster.s3 import health_status
from devcluster.testing import DevCluster, wait_for


@pytest.fixture
def namespace(devcluster: DevCluster) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    devcluster.kubectl("create", "namespace", name)
    return name


def job(name: str, script: str, *, backoff: int = 0, **extra: object) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, **extra.pop("metadata", {})},  # type: ignore[dict-item]
        "spec": {
            "backoffLimit": backoff,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {"name": "main", "image": "python:3.11", "command": ["sh", "-c", script]}
                    ],
                    **extra,
                }
            },
        },
    }


def job_condition(dc: DevCluster, ns: str, name: str) -> str | None:
    out = dc.kubectl("get", "job", name, "-n", ns, "-o", "json").stdout
    for cond in json.loads(out).get("status", {}).get("conditions", []):
        if cond["type"] in ("Complete", "Failed") and cond["status"] == "True":
            return cond["type"]
    return None


def pods_of(dc: DevCluster, ns: str, job_name: str) -> list[dict]:
    out = dc.kubectl("get", "pods", "-n", ns, "-l", f"job-name={job_name}", "-o", "json").stdout
    return json.loads(out)["items"]


def test_node_is_ready(devcluster: DevCluster) -> None:
    out = devcluster.kubectl("get", "nodes", "-o", "json").stdout
    (node,) = json.loads(out)["items"]
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
    assert ready == "True"


def test_job_completes_and_reports_its_termination_message(
    devcluster: DevCluster, namespace: str
) -> None:
    script = "echo working; printf '{\"loss\": 0.5}' > /dev/termination-log"
    devcluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(job("ok", script)))
    outcome = wait_for(
        lambda: job_condition(devcluster, namespace, "ok"),
        timeout=60,
        what="job ok to finish",
        diagnose=devcluster.logs,
    )
    assert outcome == "Complete"
    (pod,) = pods_of(devcluster, namespace, "ok")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert pod["status"]["phase"] == "Succeeded"
    assert terminated["exitCode"] == 0
    assert json.loads(terminated["message"]) == {"loss": 0.5}


def test_failing_job_is_retried_backoff_limit_times_then_fails(
    devcluster: DevCluster, namespace: str
) -> None:
    devcluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=json.dumps(job("bad", "exit 3", backoff=1))
    )
    outcome = wait_for(
        lambda: job_condition(devcluster, namespace, "bad"),
        timeout=120,
        what="job bad to fail",
        diagnose=devcluster.logs,
    )
    assert outcome == "Failed"
    pods = pods_of(devcluster, namespace, "bad")
    codes = [p["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] for p in pods]
    assert codes == [3, 3]  # the first try plus backoffLimit=1 retry


def test_deleting_the_owner_garbage_collects_job_and_pods(
    devcluster: DevCluster, namespace: str
) -> None:
    devcluster.kubectl("create", "configmap", "owner", "-n", namespace)
    owner_uid = devcluster.kubectl(
        "get", "configmap", "owner", "-n", namespace, "-o", "jsonpath={.metadata.uid}"
    ).stdout
    owned = job("child", "sleep 300")
    owned["metadata"]["ownerReferences"] = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "name": "owner",
            "uid": owner_uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    devcluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(owned))
    wait_for(
        lambda: any(
            p["status"].get("phase") == "Running" for p in pods_of(devcluster, namespace, "child")
        ),
        timeout=60,
        what="the child pod to run",
        diagnose=devcluster.logs,
    )
    devcluster.kubectl("delete", "configmap", "owner", "-n", namespace, "--wait=false")
    wait_for(
        lambda: (
            devcluster.kubectl("get", "job", "child", "-n", namespace, check=False).returncode != 0
        ),
        timeout=60,
        what="the job to be garbage-collected",
    )
    wait_for(
        lambda: not pods_of(devcluster, namespace, "child"),
        timeout=60,
        what="the pods to be garbage-collected",
        diagnose=devcluster.logs,
    )


def test_rbac_denies_what_a_role_does_not_grant(devcluster: DevCluster, namespace: str) -> None:
    devcluster.kubectl("create", "serviceaccount", "reader", "-n", namespace)
    devcluster.kubectl(
        "create", "role", "jobs-read", "-n", namespace, "--verb=get,list,watch", "--resource=jobs"
    )
    devcluster.kubectl(
        "create",
        "rolebinding",
        "reader",
        "-n",
        namespace,
        "--role=jobs-read",
        f"--serviceaccount={namespace}:reader",
    )
    user = f"system:serviceaccount:{namespace}:reader"
    listed = devcluster.kubectl("get", "jobs", "-n", namespace, as_user=user, check=False)
    assert listed.returncode == 0, listed.stderr
    created = devcluster.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=json.dumps(job("nope", "true")),
        as_user=user,
        check=False,
    )
    assert created.returncode != 0
    assert "forbidden" in created.stderr.lower()
    assert 'cannot create resource "jobs"' in created.stderr


def test_restricted_namespace_rejects_a_privileged_pod(
    devcluster: DevCluster, namespace: str
) -> None:
    devcluster.kubectl(
        "label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted"
    )
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "priv"},
        "spec": {
            "containers": [
                {
                    "name": "c",
                    "image": "busybox",
                    "command": ["true"],
                    "securityContext": {"privileged": True},
                }
            ]
        },
    }
    result = devcluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=json.dumps(pod), check=False
    )
    assert result.returncode != 0
    assert 'violates PodSecurity "restricted:latest"' in result.stderr
    assert "privileged" in result.stderr


IN_CLUSTER_LISTER = """
import json
from kubernetes import client, config
config.load_incluster_config()
v1 = client.CoreV1Api()
ns = open("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read()
names = sorted(p.metadata.name for p in v1.list_namespaced_pod(ns).items)
try:
    v1.list_namespaced_secret(ns)
    secrets = "allowed"
except client.exceptions.ApiException as e:
    secrets = e.status
open("/dev/termination-log", "w").write(json.dumps({"pods": names, "secrets": secrets}))
"""


def test_in_cluster_client_uses_its_service_account(devcluster: DevCluster, namespace: str) -> None:
    devcluster.kubectl("create", "serviceaccount", "lister", "-n", namespace)
    devcluster.kubectl(
        "create", "role", "pods-read", "-n", namespace, "--verb=get,list", "--resource=pods"
    )
    devcluster.kubectl(
        "create",
        "rolebinding",
        "lister",
        "-n",
        namespace,
        "--role=pods-read",
        f"--serviceaccount={namespace}:lister",
    )
    spec = job("lister", "true", serviceAccountName="lister")
    container = spec["spec"]["template"]["spec"]["containers"][0]
    container["command"] = ["python", "-c", IN_CLUSTER_LISTER]
    devcluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(spec))
    outcome = wait_for(
        lambda: job_condition(devcluster, namespace, "lister"),
        timeout=90,
        what="the in-cluster lister",
        diagnose=devcluster.logs,
    )
    assert outcome == "Complete"
    (pod,) = pods_of(devcluster, namespace, "lister")
    message = json.loads(pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"])
    assert message == {"pods": [pod["metadata"]["name"]], "secrets": 403}


def test_a_component_stopped_and_started_again_keeps_its_port_and_data(
    devcluster: DevCluster,
) -> None:
    s3, cluster = devcluster.s3, devcluster.cluster
    s3.bucket("restarts")
    s3.client().put_object(Bucket="restarts", Key="kept", Body=b"before the outage")
    cluster.stop_component("s3")
    assert health_status(s3.endpoint) is None  # nothing listens
    cluster.start_component("s3")
    body = s3.client().get_object(Bucket="restarts", Key="kept")["Body"].read()
    assert body == b"before the outage"
    with pytest.raises(RuntimeError, match="is running"):
        cluster.start_component("s3")
    with pytest.raises(ValueError, match="not 'forward'"):
        cluster.stop_component("forward")
