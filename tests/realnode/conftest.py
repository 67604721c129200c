"""The real-node tier for the tests: the images built by `make images`, a devcluster with a real
kubelet and containerd (`devcluster up --node real`), the images pushed to its registry, and a
tiny model with two clients' data in its S3 server. Started once per session."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from devcluster.cluster import REPO_ROOT, Cluster
from devcluster.namespaces import NODE_IP
from devcluster.testing import DevCluster, make_tiny_assets, wait_for

REAL_CLUSTER_DIR = Path(
    os.environ.get("FEDTUNE_TEST_REAL_CLUSTER_DIR") or REPO_ROOT / ".devcluster" / "pytest-real"
)
BUILD_IMAGES = REPO_ROOT / "tools" / "build-images.sh"
BUCKET = "fedtune-real"
# Host sysctls the kubelet, kube-proxy or the CNI plugins would set if they ran on the host.
WATCHED_SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
)


def host_sysctls() -> dict[str, str]:
    values = {}
    for name in WATCHED_SYSCTLS:
        path = Path("/proc/sys") / name
        if path.exists():
            values[name] = path.read_text().strip()
    return values


@dataclass
class RealCluster:
    dc: DevCluster
    operator_image: str  # repository@sha256:..., as pushed to the node's registry
    trainer_image: str
    model_dir: Path  # the tiny model, also in s3://BUCKET/models/tiny
    data_uris: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    sysctls_before: dict[str, str] = field(default_factory=dict)

    @property
    def cluster(self) -> Cluster:
        return self.dc.cluster

    @property
    def pod_s3_endpoint(self) -> str:
        """S3 as pods see it: the node's address (the host's 127.0.0.1 is not theirs)."""
        return f"http://{NODE_IP}:{self.dc.state.s3_port}"

    def json(self, *args: str) -> dict[str, Any]:
        return json.loads(self.dc.kubectl(*args, "-o", "json").stdout)

    def restricted_namespace(self, name: str) -> str:
        self.dc.kubectl("create", "namespace", name, check=False)
        self.dc.kubectl(
            "label",
            "--overwrite",
            "namespace",
            name,
            "pod-security.kubernetes.io/enforce=restricted",
        )
        return name

    def s3_secret(self, namespace: str) -> None:
        s3 = self.dc.s3
        secret = self.dc.kubectl(
            "create",
            "secret",
            "generic",
            "fedtune-s3",
            "-n",
            namespace,
            f"--from-literal=AWS_ACCESS_KEY_ID={s3.access_key}",
            f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.secret_key}",
            "--dry-run=client",
            "-o",
            "json",
        ).stdout
        self.dc.kubectl("apply", "-f", "-", input=secret)

    def pod_of_job(self, namespace: str, job: str) -> dict[str, Any] | None:
        pods = self.json("get", "pods", "-n", namespace, "-l", f"job-name={job}")["items"]
        return pods[-1] if pods else None

    def describe(self, namespace: str) -> str:
        """Pods, events and the node components' complaints, for a failure message."""
        parts = [
            self.dc.kubectl("get", "pods,jobs", "-n", namespace, "-o", "wide", check=False).stdout,
            self.dc.kubectl(
                "get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False
            ).stdout[-4000:],
        ]
        for c in ("kubelet", "containerd"):
            tail = self.cluster.log_tail(c, 400).splitlines()
            parts.append(
                f"==> {c} (errors) <==\n"
                + "\n".join([ln for ln in tail if ln[:1] == "E" or "level=error" in ln][-20:])
            )
        return "\n".join(parts)


def _build_images() -> float:
    start = time.monotonic()
    subprocess.run(["bash", str(BUILD_IMAGES)], check=True, timeout=3600)
    return time.monotonic() - start


def _push(registry_port: int) -> dict[str, str]:
    out = subprocess.run(
        ["bash", str(BUILD_IMAGES), "--push", f"127.0.0.1:{registry_port}"],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        timeout=3600,
    ).stdout
    refs = [line for line in out.splitlines() if "@sha256:" in line]
    return {ref.split("@")[0].rsplit("/", 1)[1]: ref for ref in refs}


def _assets(work: Path, dc: DevCluster) -> tuple[Path, list[str]]:
    model, data = make_tiny_assets(work, clients=2, samples=16, hidden_size=32)
    dc.s3.bucket(BUCKET)
    dc.upload_dir(model, BUCKET, "models/tiny")
    dc.upload_dir(data, BUCKET, "data")
    return model, [f"s3://{BUCKET}/data/client-{i}.jsonl" for i in range(2)]


@pytest.fixture(scope="session")
def realnode(binaries: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCluster]:
    sysctls_before = host_sysctls()
    timings = {"images": _build_images()}
    if REAL_CLUSTER_DIR.exists():
        Cluster(REAL_CLUSTER_DIR).down(quiet=True)
        shutil.rmtree(REAL_CLUSTER_DIR)
    cluster = Cluster(REAL_CLUSTER_DIR, node="real")
    start = time.monotonic()
    try:
        state = cluster.up()
        timings["cluster-up"] = time.monotonic() - start
        dc = DevCluster(cluster, state)
        start = time.monotonic()
        images = _push(state.registry_port)
        timings["push"] = time.monotonic() - start
        dc.apply_crds()
        model, data_uris = _assets(tmp_path_factory.mktemp("realnode-assets"), dc)
        yield RealCluster(
            dc=dc,
            operator_image=images["operator"],
            trainer_image=images["trainer"],
            model_dir=model,
            data_uris=data_uris,
            timings=timings,
            sysctls_before=sysctls_before,
        )
    finally:
        cluster.down(quiet=True)
        print(f"\nreal-node tier timings (s): {json.dumps(timings)}", file=sys.stderr)


def wait_pod(
    rc: RealCluster, namespace: str, name: str, check, what: str, timeout: float = 300
) -> dict[str, Any]:
    """Wait until `check(pod)` holds for the pod `name`."""

    def probe() -> dict[str, Any] | None:
        pod = rc.json("get", "pod", name, "-n", namespace)
        return pod if check(pod) else None

    return wait_for(
        probe, timeout=timeout, what=what, interval=0.5, diagnose=lambda: rc.describe(namespace)
    )
