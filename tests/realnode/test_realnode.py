"""The built images on a real node (kubelet + containerd + runc): what the process kubelet cannot
check. The chart's operator image in a `restricted` namespace, a whole federated run on the
trainer image, and the enforcement only a real node gives: the image's numeric user under
runAsNonRoot, a root image refused, a read-only root filesystem, a memory limit ending OOMKilled.

The tests run in file order on one session cluster; the last one stops it and checks that
nothing is left on the host."""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from devcluster.containerd import BRIDGE
from devcluster.namespaces import NODE_IP
from devcluster.pauseimage import pause_archive
from devcluster.testing import wait_for
from tests.realnode.conftest import BUCKET, RealCluster, host_sysctls, wait_pod

# The first test also builds the images (on a cold cache: the base, 6 GB of trainer layers and
# their first push take several minutes), so the per-test timeout is raised here.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]

OPERATOR_NS = "fedtune-real-system"
RUNS_NS = "fedtune-real-runs"
JOBS_NS = "fedtune-real-jobs"
ROOT_IMAGE = "localhost/fedtune/root-test:1"
RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _container_state(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return statuses[0].get("state", {}) if statuses else {}


def _terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    return _container_state(pod).get("terminated")


def _waiting_reason(pod: dict[str, Any]) -> str | None:
    return (_container_state(pod).get("waiting") or {}).get("reason")


def _pod(
    name: str,
    image: str,
    command: list[str],
    *,
    container_security: dict[str, Any] | None = None,
    pod_security: dict[str, Any] | None = None,
    resources: dict[str, Any] | None = None,
    pull_policy: str = "IfNotPresent",
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": JOBS_NS},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": True, **(pod_security or {})},
            "containers": [
                {
                    "name": "c",
                    "image": image,
                    "imagePullPolicy": pull_policy,
                    "command": command,
                    "securityContext": {**RESTRICTED, **(container_security or {})},
                    "resources": resources or {},
                    "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                }
            ],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    }


def _run_manifest(
    rc: RealCluster, name: str, client_resources: dict[str, Any] | None = None
) -> dict[str, Any]:
    clients = [{"name": f"client-{i}", "dataUri": uri} for i, uri in enumerate(rc.data_uris)]
    if client_resources:
        for client in clients:
            client["resources"] = client_resources
    return {
        "apiVersion": "fedtune.dev/v1alpha1",
        "kind": "FederatedFineTune",
        "metadata": {"name": name, "namespace": RUNS_NS},
        "spec": {
            "baseModel": f"s3://{BUCKET}/models/tiny",
            "rounds": 1,
            "adapter": {"r": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]},
            "training": {"localSteps": 2, "batchSize": 2, "maxSeqLength": 32},
            "data": {"format": "chat"},
            "storage": {
                "uri": f"s3://{BUCKET}/runs/{name}",
                "endpoint": rc.pod_s3_endpoint,
                "credentialsSecret": {"name": "fedtune-s3"},
            },
            "template": {"image": rc.trainer_image},
            "clients": clients,
            "backoffLimit": 0,
        },
    }


def _wait_run(rc: RealCluster, name: str, phases: tuple[str, ...], timeout: float) -> dict:
    def check() -> dict[str, Any] | None:
        run = rc.json("get", "fft", name, "-n", RUNS_NS)
        return run if (run.get("status") or {}).get("phase") in phases else None

    return wait_for(
        check,
        timeout=timeout,
        what=f"run {name} to reach {' or '.join(phases)}",
        interval=1.0,
        diagnose=lambda: (
            rc.describe(RUNS_NS)
            + "\n==> operator log <==\n"
            + rc.dc.kubectl(
                "logs", "-n", OPERATOR_NS, "deploy/fedtune-operator", "--tail=40", check=False
            ).stdout
        ),
    )


# -- the node ---------------------------------------------------------------------------------


def test_node_is_real_and_in_its_own_namespaces(realnode: RealCluster) -> None:
    node = realnode.json("get", "node", "devnode")
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == NODE_IP
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
    # The `kubernetes` Service points at the API server's address inside the namespace.
    endpoints = realnode.json("get", "endpoints", "kubernetes", "-n", "default")
    assert endpoints["subsets"][0]["addresses"][0]["ip"] == NODE_IP
    # The host has no address or bridge of the tier.
    host = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    assert NODE_IP not in host
    assert f" {BRIDGE}" not in host


# -- the operator image, with the chart ----------------------------------------------------------


def test_chart_operator_image_in_restricted_namespace(realnode: RealCluster) -> None:
    rc = realnode
    rc.restricted_namespace(OPERATOR_NS)
    repository, digest = rc.operator_image.split("@")
    values = {
        "image": {"repository": repository, "digest": digest},
        "operator": {"env": [{"name": "FEDTUNE_RESYNC_SECONDS", "value": "3"}]},
        "livenessProbe": {"initialDelaySeconds": 1, "periodSeconds": 2},
    }
    subprocess.run(
        [
            str(rc.dc.bin_dir / "helm"),
            "upgrade",
            "--install",
            "fedtune",
            str(Path(__file__).resolve().parents[2] / "charts" / "fedtune-operator"),
            "--namespace",
            OPERATOR_NS,
            "--kubeconfig",
            str(rc.dc.kubeconfig),
            "--values",
            "-",
        ],
        input=json.dumps(values),
        text=True,
        check=True,
        capture_output=True,
        timeout=120,
    )

    def ready_pod() -> dict[str, Any] | None:
        pods = rc.json(
            "get", "pods", "-n", OPERATOR_NS, "-l", "app.kubernetes.io/name=fedtune-operator"
        )["items"]
        for pod in pods:
            conds = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
            if conds.get("Ready") == "True":
                return pod
        return None

    pod = wait_for(
        ready_pod,
        timeout=300,
        what="the operator pod to be Ready",
        interval=0.5,
        diagnose=lambda: rc.describe(OPERATOR_NS),
    )
    name = pod["metadata"]["name"]
    assert pod["spec"]["containers"][0]["image"] == rc.operator_image
    assert pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True

    # The kubelet's prober counts successful liveness probes of the container.
    pattern = re.compile(
        r'prober_probe_total\{[^}]*pod="' + re.escape(name) + r'"[^}]*probe_type="Liveness"'
        r'[^}]*result="successful"[^}]*\} (\d+)'
    )

    def liveness_successes() -> int | None:
        metrics = rc.dc.kubectl(
            "get", "--raw", "/api/v1/nodes/devnode/proxy/metrics/probes", check=False
        ).stdout
        counts = [int(m.group(1)) for m in pattern.finditer(metrics)]
        return sum(counts) if sum(counts) >= 2 else None

    wait_for(liveness_successes, timeout=60, what="two successful liveness probes", interval=1)
    restarted = rc.json("get", "pod", name, "-n", OPERATOR_NS)["status"]["containerStatuses"][0]
    assert restarted["restartCount"] == 0

    # kubectl logs (the API server reaching the kubelet): kopf started, in-cluster credentials
    # reached the API server through the `kubernetes` Service.
    wait_for(
        lambda: (
            "Initial authentication has finished"
            in rc.dc.kubectl("logs", "-n", OPERATOR_NS, name, check=False).stdout
        ),
        timeout=60,
        what="kopf's start in `kubectl logs`",
        interval=1,
        diagnose=lambda: rc.dc.kubectl("logs", "-n", OPERATOR_NS, name, check=False).stdout,
    )


# -- a whole run on the trainer image -------------------------------------------------------------


def test_federated_run_on_trainer_image(realnode: RealCluster, tmp_path: Path) -> None:
    rc = realnode
    rc.restricted_namespace(RUNS_NS)
    rc.s3_secret(RUNS_NS)
    rc.dc.kubectl("apply", "-f", "-", input=json.dumps(_run_manifest(rc, "real-run")))
    # The first pull of the trainer image (gigabytes) into containerd is part of this wait.
    run = _wait_run(rc, "real-run", ("Succeeded", "Failed"), timeout=1200)
    assert run["status"]["phase"] == "Succeeded", json.dumps(run["status"], indent=1)

    jobs = rc.json("get", "jobs", "-n", RUNS_NS)["items"]
    roles = {j["metadata"]["labels"].get("fedtune.dev/role") for j in jobs}
    assert {"client", "aggregator"} <= roles
    for job in jobs:
        if job["metadata"]["labels"].get("fedtune.dev/role") not in ("client", "aggregator"):
            continue
        assert job["status"].get("succeeded") == 1, job["metadata"]["name"]
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == rc.trainer_image
        # The trainer wrote only to its volumes: its root filesystem was read-only.
        assert container["securityContext"]["readOnlyRootFilesystem"] is True

    # The adapter loads with PEFT onto the base model.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    uri = run["status"]["finalAdapterUri"]
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    s3 = rc.dc.s3.client()
    adapter = tmp_path / "adapter"
    for obj in s3.list_objects_v2(Bucket=bucket, Prefix=prefix.rstrip("/") + "/")["Contents"]:
        target = adapter / obj["Key"][len(prefix.rstrip("/")) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, obj["Key"], str(target))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(rc.model_dir), adapter)
    assert any("lora_" in n for n, _ in model.named_parameters())


# -- enforcement only a real node gives ----------------------------------------------------------


def test_run_as_non_root_uses_the_images_numeric_user(realnode: RealCluster) -> None:
    rc = realnode
    rc.restricted_namespace(JOBS_NS)
    pod = _pod(
        "whoami",
        rc.trainer_image,
        ["python", "-c", "import os; print('uid', os.getuid(), 'gid', os.getgid())"],
    )
    rc.dc.kubectl("apply", "-f", "-", input=json.dumps(pod))
    done = wait_pod(
        rc,
        JOBS_NS,
        "whoami",
        lambda p: p["status"].get("phase") in ("Succeeded", "Failed"),
        "the runAsNonRoot pod to finish",
    )
    assert done["status"]["phase"] == "Succeeded"
    log = rc.dc.kubectl("logs", "-n", JOBS_NS, "whoami").stdout
    print(f"runAsNonRoot with the image's user: {log.strip()}")
    assert "uid 10001 gid 10001" in log


def test_root_image_is_refused_under_run_as_non_root(realnode: RealCluster) -> None:
    rc = realnode
    rc.restricted_namespace(JOBS_NS)
    # An image whose user is root (the pause binary, no USER), imported straight into containerd.
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "root.tar"
        pause_archive(rc.dc.bin_dir / "pause", archive, name=ROOT_IMAGE, user="")
        node = rc.cluster.real
        assert node is not None
        node.containerd.ctr("images", "import", str(archive))
    rc.dc.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps(_pod("rootimage", ROOT_IMAGE, ["/pause"], pull_policy="Never")),
    )
    pod = wait_pod(
        rc,
        JOBS_NS,
        "rootimage",
        lambda p: _waiting_reason(p) == "CreateContainerConfigError",
        "CreateContainerConfigError for the root image",
        timeout=120,
    )
    message = _container_state(pod)["waiting"]["message"]
    print(f"root image under runAsNonRoot: CreateContainerConfigError: {message}")
    assert "runAsNonRoot" in message
    assert "root" in message
    rc.dc.kubectl("delete", "pod", "rootimage", "-n", JOBS_NS, "--wait=false")


def test_read_only_root_filesystem_holds(realnode: RealCluster) -> None:
    rc = realnode
    rc.restricted_namespace(JOBS_NS)
    script = (
        "import errno, pathlib\n"
        "for p in ('/opt/fedtune/probe', '/etc/probe', '/probe'):\n"
        "    try:\n"
        "        pathlib.Path(p).write_text('x')\n"
        "        print('WROTE', p)\n"
        "    except OSError as e:\n"
        "        print('refused', p, errno.errorcode[e.errno])\n"
        "pathlib.Path('/tmp/probe').write_text('x')\n"
        "print('wrote /tmp/probe (emptyDir)')\n"
    )
    pod = _pod(
        "readonly",
        rc.trainer_image,
        ["python", "-c", script],
        container_security={"readOnlyRootFilesystem": True},
    )
    rc.dc.kubectl("apply", "-f", "-", input=json.dumps(pod))
    done = wait_pod(
        rc,
        JOBS_NS,
        "readonly",
        lambda p: p["status"].get("phase") in ("Succeeded", "Failed"),
        "the read-only pod to finish",
    )
    log = rc.dc.kubectl("logs", "-n", JOBS_NS, "readonly").stdout
    print(f"read-only root filesystem:\n{log.strip()}")
    assert done["status"]["phase"] == "Succeeded"
    assert "WROTE" not in log
    assert log.count("refused") == 3
    assert "EROFS" in log
    assert "wrote /tmp/probe" in log


def test_memory_limit_far_below_needs_ends_oom_killed(realnode: RealCluster) -> None:
    rc = realnode
    rc.restricted_namespace(RUNS_NS)
    rc.s3_secret(RUNS_NS)
    # The clients' limit only: torch alone needs several times this much.
    limit = {"requests": {"memory": "48Mi"}, "limits": {"memory": "48Mi"}}
    manifest = _run_manifest(rc, "oom-run", client_resources=limit)
    rc.dc.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    run = _wait_run(rc, "oom-run", ("Failed", "Succeeded"), timeout=600)
    status = run["status"]
    assert status["phase"] == "Failed", json.dumps(status, indent=1)

    jobs = [
        j["metadata"]["name"]
        for j in rc.json("get", "jobs", "-n", RUNS_NS, "-l", "fedtune.dev/role=client")["items"]
        if j["metadata"]["ownerReferences"][0]["name"] == "oom-run"
    ]
    terminated = [
        _terminated(pod)
        for pod in (rc.pod_of_job(RUNS_NS, job) for job in jobs)
        if pod is not None and _terminated(pod)
    ]
    print("OOM run: container terminations:", json.dumps(terminated, indent=1))
    print("OOM run: status:", json.dumps(status, indent=1))
    assert terminated
    assert all(t["reason"] == "OOMKilled" for t in terminated)
    assert all(t["exitCode"] == 137 for t in terminated)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True"
    failed_clients = [c for c in status["clients"] if c["phase"] == "Failed"]
    assert failed_clients
    assert all("exit 137" in c.get("message", "") for c in failed_clients)
    # The run says that the memory limit killed the clients, not only "exit 137".
    assert all("OOMKilled" in c["message"] for c in failed_clients), failed_clients


# -- teardown -----------------------------------------------------------------------------------


def test_down_leaves_nothing_behind(realnode: RealCluster) -> None:
    """Last: stop the tier and look for processes, mounts, cgroups, links and chains."""
    node = realnode.cluster.real
    assert node is not None
    holder = node.namespaces.holder_pid()
    assert holder is not None
    ns_net = Path(f"/proc/{holder}/ns/net").readlink()
    realnode.cluster.down(quiet=True)

    assert node.leftovers() == []
    in_ns = [
        p.name
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and _readlink(p / "ns" / "net") == ns_net
    ]
    assert in_ns == [], f"processes left in the node's network namespace: {in_ns}"
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f" {BRIDGE}:" not in links
    chains = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    assert "KUBE-SERVICES" not in chains
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(realnode.cluster.dir) not in mounts
    # No host sysctl changed while the tier ran.
    assert host_sysctls() == realnode.sysctls_before


def _readlink(p: Path) -> Path | None:
    try:
        return p.readlink()
    except OSError:
        return None
