"""A release of the chart on the devcluster: install, the operator pod and its log, uninstall."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from devcluster.net import free_port
from devcluster.testing import DevCluster, wait_for
from tests.chart.support import CHART, RELEASE, Values, helm

BUCKET = "fedtune-chart"
OPERATOR_START_TIMEOUT = 90
RESTRICTED = "pod-security.kubernetes.io/enforce=restricted"
CONFINEMENT_POLICY = f"ValidatingAdmissionPolicy '{RELEASE}-operator-confinement'"
"""How the API server names the chart's policy on the operator's identity in a refusal."""
# What kopf or the kubernetes client logs when the API refuses a request (APIForbiddenError,
# "(403) Reason: Forbidden", "Not enough permissions to ..."). Not a bare "403": log timestamps
# have milliseconds.
PERMISSION_ERRORS = re.compile(r"forbidden|not enough permissions|status=403|'code': 403", re.I)


@dataclass
class Assets:
    """What a real run reads: a tiny model and one chat data file per client, in s3://BUCKET."""

    model_uri: str
    data_uris: list[str]


def run_manifest(
    name: str,
    namespace: str,
    *,
    endpoint: str,
    assets: Assets | None = None,
    suspend: bool = False,
    ttl_seconds_after_finished: int | None = None,
) -> dict[str, Any]:
    """A small run: two clients, one round of two steps each, on the tiny model."""
    data = assets.data_uris if assets else [f"s3://{BUCKET}/data/client-{i}.jsonl" for i in (0, 1)]
    extra = (
        {}
        if ttl_seconds_after_finished is None
        else {"ttlSecondsAfterFinished": ttl_seconds_after_finished}
    )
    return {
        "apiVersion": "fedtune.dev/v1alpha1",
        "kind": "FederatedFineTune",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "baseModel": assets.model_uri if assets else f"s3://{BUCKET}/models/tiny",
            "rounds": 1,
            "suspend": suspend,
            "adapter": {"r": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]},
            "training": {"localSteps": 2, "batchSize": 2, "maxSeqLength": 32},
            "data": {"format": "chat"},
            "storage": {
                "uri": f"s3://{BUCKET}/runs/{namespace}/{name}",
                "endpoint": endpoint,
                "credentialsSecret": {"name": "fedtune-s3"},
            },
            "clients": [{"name": f"client-{i}", "dataUri": uri} for i, uri in enumerate(data)],
            "backoffLimit": 0,
            **extra,
        },
    }


def set_in(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A change to a run's spec: `value` at the dotted `path` (`clients.0.env`: a list index)."""

    def change(spec: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        node: Any = spec
        for key in parents:
            node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
        node[int(leaf) if leaf.isdigit() else leaf] = value

    return change


def dry_run(dc: DevCluster, obj: dict[str, Any], user: str | None = None) -> tuple[bool, str]:
    """Create `obj` (as `user`, impersonated), server-side dry run: (admitted, the refusal)."""
    result = dc.kubectl(
        "create", "--dry-run=server", "-f", "-", input=json.dumps(obj), as_user=user, check=False
    )
    return result.returncode == 0, result.stderr.strip()


@dataclass(frozen=True)
class Mode:
    """How a release is installed: its namespace, the namespaces it watches (none: the whole
    cluster), where the tests start runs, and a namespace outside the watched ones."""

    name: str
    system: str
    watch: tuple[str, ...]
    runs: str
    elsewhere: str

    @property
    def namespaces(self) -> list[str]:
        return list(dict.fromkeys([self.system, *self.watch, self.runs, self.elsewhere]))


@dataclass
class Release:
    dc: DevCluster
    helm_bin: Path
    mode: Mode
    liveness_port: int
    metrics_port: int
    extra_values: Values = field(default_factory=dict)
    """Top-level values set beside the ones every release gets (admission.*, ...)."""
    notes: str = ""
    pods_seen: set[str] = field(default_factory=set)

    @property
    def namespace(self) -> str:
        return self.mode.system

    @property
    def service_account(self) -> str:
        return f"system:serviceaccount:{self.namespace}:fedtune-operator"

    def values(self) -> Values:
        return {
            "watchNamespaces": list(self.mode.watch),
            "operator": {
                "livenessPort": self.liveness_port,
                # Reconcile every run at least every 5 s, so that waits stay short.
                "env": [{"name": "FEDTUNE_RESYNC_SECONDS", "value": "5"}],
            },
            "metrics": {"port": self.metrics_port},
            **self.extra_values,
        }

    def helm(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return helm(self.helm_bin, *args, input=input, kubeconfig=self.dc.kubeconfig, check=check)

    def install(self) -> None:
        result = self.helm(
            "install",
            RELEASE,
            str(CHART),
            "--namespace",
            self.namespace,
            "--values",
            "-",
            input=yaml.safe_dump(self.values()),
        )
        self.notes = result.stdout

    def uninstall(self) -> None:
        """Returns once every object of the release is gone, the operator's pods included
        (foreground deletion: the Deployment goes after its ReplicaSet and pods)."""
        self.helm(
            "uninstall",
            RELEASE,
            "--namespace",
            self.namespace,
            "--cascade=foreground",
            "--wait",
            "--timeout=90s",
        )

    def installed(self) -> bool:
        out = self.helm("list", "--namespace", self.namespace, "--output", "json").stdout
        return any(r["name"] == RELEASE for r in json.loads(out))

    # -- the operator pod ----------------------------------------------------------------------

    def operator_pods(self) -> list[dict[str, Any]]:
        out = self.dc.kubectl(
            "get",
            "pods",
            "--namespace",
            self.namespace,
            "--selector",
            f"app.kubernetes.io/name=fedtune-operator,app.kubernetes.io/instance={RELEASE}",
            "--output",
            "json",
        ).stdout
        pods = json.loads(out)["items"]
        self.pods_seen |= {p["metadata"]["name"] for p in pods}
        return pods

    def running_pod(self) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            pods = self.operator_pods()
            running = [p for p in pods if p.get("status", {}).get("phase") == "Running"]
            return running[0] if len(pods) == 1 and running else None

        return wait_for(
            check,
            timeout=OPERATOR_START_TIMEOUT,
            what="the operator pod to be Running",
            diagnose=self.diagnose,
        )

    def log_path(self, pod: str) -> Path:
        return self.dc.cluster.log_dir / "pods" / f"{self.namespace}_{pod}_operator.log"

    def log(self) -> str:
        """Everything every operator pod of this release has written."""
        return "\n".join(
            self.log_path(p).read_text(errors="replace")
            for p in sorted(self.pods_seen)
            if self.log_path(p).exists()
        )

    def healthz(self) -> int | None:
        """kopf's liveness endpoint (pods share the host's network on the process kubelet)."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2
            ) as response:
                return response.status
        except OSError:
            return None

    def wait_healthy(self) -> None:
        wait_for(
            lambda: self.healthz() == 200,
            timeout=OPERATOR_START_TIMEOUT,
            what="kopf's /healthz to answer 200",
            diagnose=self.diagnose,
        )

    def wait_confined(self) -> None:
        """Until the chart's confinement policy is in force (the API server loads a new policy
        asynchronously): it refuses the operator's ServiceAccount a Job that is no run's."""
        probe = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "confinement-probe", "namespace": self.mode.runs},
            "spec": {
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [{"name": "probe", "image": "busybox"}],
                    }
                }
            },
        }

        def refused() -> bool:
            admitted, refusal = dry_run(self.dc, probe, self.service_account)
            return not admitted and CONFINEMENT_POLICY in refusal

        wait_for(refused, timeout=30, what="the confinement policy to be in force")

    def permission_errors(self) -> list[str]:
        """Refusals for lack of RBAC; a namespace being deleted refuses everyone alike, which
        says nothing about the chart's permissions (another test's namespace may be going)."""
        return [
            line
            for line in self.log().splitlines()
            if PERMISSION_ERRORS.search(line)
            and "being terminated" not in line
            and "NamespaceTerminating" not in line
        ]

    def diagnose(self) -> str:
        deploy = self.dc.kubectl(
            "describe", "deployment", "--namespace", self.namespace, check=False
        ).stdout
        events = self.dc.kubectl("get", "events", "--namespace", self.namespace, check=False).stdout
        tail = "\n".join(self.log().splitlines()[-40:])
        return f"{deploy}\n{events}\n==> operator log <==\n{tail}\n{self.dc.logs(20)}"


@contextmanager
def installed(
    dc: DevCluster, helm_bin: Path, mode: Mode, extra_values: Values | None = None
) -> Iterator[Release]:
    """The chart installed in `mode` (every namespace created and `restricted`); on exit the runs
    are deleted (while the operator still runs to lift its finalizer from them), the release
    uninstalled unless a test did it, and the namespaces deleted."""
    for namespace in mode.namespaces:
        dc.kubectl("create", "namespace", namespace)
        dc.kubectl("label", "namespace", namespace, RESTRICTED)
    rel = Release(
        dc,
        helm_bin,
        mode,
        liveness_port=free_port(),
        metrics_port=free_port(),
        extra_values=extra_values or {},
    )
    rel.install()
    try:
        yield rel
    finally:
        for namespace in mode.namespaces:
            dc.kubectl("delete", "fft", "--all", "-n", namespace, "--timeout=60s", check=False)
        if rel.installed():
            rel.uninstall()
        for namespace in mode.namespaces:
            dc.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
