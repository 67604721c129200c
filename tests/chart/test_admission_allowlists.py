"""The cluster admin's allowlists (admission.allowed*, allowSecretEnv) on the real API server.

The chart's admission policies are rendered with every allowlist set, for a release that watches
one namespace of its own, and applied as they are: the API server compiles their CEL on create.
The runs are created by the devcluster's own administrator, who may do anything the requester
checks ask about, so every refusal here is an allowlist's. test_admission.py covers the
requester checks and the operator's confinement with the installed chart.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from devcluster.testing import DevCluster, wait_for
from tests.chart.install import dry_run, run_manifest, set_in
from tests.chart.support import CHART, KUBE_VERSION, helm

NAMESPACE = "adm-lists"
RELEASE = "lists"
POLICY = f"ValidatingAdmissionPolicy '{RELEASE}-fedtune-operator-runs'"
DIGEST = "sha256:" + "0123456789abcdef" * 4
ADMISSION = {
    "allowedImages": ["ghcr.io/fedtune/", DIGEST, "registry.example.com/ml/trainer:2.0"],
    "allowedServiceAccounts": ["trainer"],
    "allowSecretEnv": False,
    "allowedPriorityClasses": ["fedtune-batch"],
    "allowedTolerationKeys": ["nvidia.com/gpu"],
}


@pytest.fixture(scope="module")
def policies(devcluster: DevCluster, helm_bin: Path) -> Iterator[str]:
    """The admission objects of a release `lists` that watches NAMESPACE, applied; yields the
    namespace once the runs policy is in force."""
    install_crd(devcluster)
    devcluster.kubectl("create", "namespace", NAMESPACE)
    values = {"watchNamespaces": [NAMESPACE], "admission": ADMISSION}
    rendered = helm(
        helm_bin,
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        "adm-lists-system",
        "--kube-version",
        KUBE_VERSION,
        "--show-only",
        "templates/admission.yaml",
        "--values",
        "-",
        input=yaml.safe_dump(values),
    ).stdout
    devcluster.kubectl("apply", "-f", "-", input=rendered)
    try:
        probe = run(set_in("template.image", "docker.io/library/busybox:latest"))
        wait_for(
            lambda: not dry_run(devcluster, probe)[0],
            timeout=30,
            what="the allowlists' policy to be in force",
        )
        yield NAMESPACE
    finally:
        devcluster.kubectl("delete", "-f", "-", input=rendered, check=False)
        devcluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


def install_crd(dc: DevCluster) -> None:
    """The CRD, as a chart install would have put it (the chart ships the same file). Not
    DevCluster.apply_crds: its jsonpath fails while the CRD has no conditions yet."""
    dc.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds"))
    established = "{.status.conditions[?(@.type=='Established')].status}"
    wait_for(
        lambda: (
            dc.kubectl(
                "get",
                "crd/federatedfinetunes.fedtune.dev",
                "-o",
                f"jsonpath={established}",
                check=False,
            ).stdout.strip()
            == "True"
        ),
        timeout=60,
        what="the FederatedFineTune CRD to be Established",
    )


def run(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    manifest = run_manifest(f"l-{uuid.uuid4().hex[:6]}", NAMESPACE, endpoint="http://10.0.0.1:9000")
    change(manifest["spec"])
    return manifest


SECRET_ENV = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "fedtune-s3", "key": "t"}}}]
# (what the run sets, admitted, what the refusal names)
CASES = [
    ("the default trainer image", lambda spec: None, True, ""),
    (
        "an image under an allowed prefix",
        set_in("template.image", "ghcr.io/fedtune/trainer:0.2.0"),
        True,
        "",
    ),
    ("an allowed digest", set_in("template.image", f"mirror.example.com/t@{DIGEST}"), True, ""),
    (
        "an allowed exact image",
        set_in("template.image", "registry.example.com/ml/trainer:2.0"),
        True,
        "",
    ),
    (
        "another tag of the exact image",
        set_in("template.image", "registry.example.com/ml/trainer:2.1"),
        False,
        "spec.template.image: registry.example.com/ml/trainer:2.1 is not among the images",
    ),
    (
        "a look-alike of the prefix",
        set_in("template.image", "ghcr.io/fedtune-evil/trainer:0.1.0"),
        False,
        "admission.allowedImages",
    ),
    ("an allowed ServiceAccount", set_in("clients.0.serviceAccountName", "trainer"), True, ""),
    (
        "another ServiceAccount",
        set_in("evaluation.serviceAccountName", "builder"),
        False,
        "spec.evaluation.serviceAccountName: builder: not among the ServiceAccounts",
    ),
    (
        "env from a Secret",
        set_in("aggregator.env", SECRET_ENV),
        False,
        "spec.aggregator.env[name=TOKEN].valueFrom.secretKeyRef: the cluster allows no environment",
    ),
    ("the storage Secret (not env)", set_in("storage.credentialsSecret", {"name": "s3"}), True, ""),
    ("an allowed PriorityClass", set_in("template.priorityClassName", "fedtune-batch"), True, ""),
    (
        "another PriorityClass",
        set_in("template.priorityClassName", "system-node-critical"),
        False,
        "spec.template.priorityClassName: system-node-critical is not among the PriorityClasses",
    ),
    (
        "a toleration of an allowed taint",
        set_in("template.tolerations", [{"key": "nvidia.com/gpu", "operator": "Exists"}]),
        True,
        "",
    ),
    (
        "a toleration of every taint",
        set_in("clients.1.tolerations", [{"operator": "Exists"}]),
        False,
        "spec.clients[name=client-1].tolerations: every taint: not among the taints",
    ),
    (
        "a toleration of the control plane's taint",
        set_in(
            "template.tolerations",
            [{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}],
        ),
        False,
        "spec.template.tolerations: node-role.kubernetes.io/control-plane: not among the taints",
    ),
]


@pytest.mark.parametrize(
    ("change", "admitted", "named"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_the_allowlists_hold_for_a_cluster_admin_too(
    devcluster: DevCluster,
    policies: str,
    change: Callable[[dict[str, Any]], None],
    admitted: bool,
    named: str,
) -> None:
    got, refusal = dry_run(devcluster, run(change))
    assert got is admitted, refusal
    if not admitted:
        assert POLICY in refusal, refusal
        assert named in refusal, refusal
