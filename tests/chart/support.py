"""Helpers of the chart tests: running helm, rendering the chart, and reading what it renders."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from devcluster.cluster import REPO_ROOT

CHART = REPO_ROOT / "charts" / "fedtune-operator"
CRD_FILE = "fedtune.dev_federatedfinetunes.yaml"
RELEASE = "fedtune"
RELEASE_NAMESPACE = "fedtune-system"
# What `helm template` assumes the cluster runs; the devcluster runs the same version.
KUBE_VERSION = "1.36.3"

Obj = dict[str, Any]
Values = dict[str, Any]


def helm(
    helm_bin: Path,
    *args: str,
    input: str | None = None,
    kubeconfig: Path | None = None,
    check: bool = True,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    argv = [str(helm_bin), *args]
    if kubeconfig is not None:
        argv += ["--kubeconfig", str(kubeconfig)]
    result = subprocess.run(
        argv, input=input, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
        )
    return result


def template(
    helm_bin: Path,
    values: Values | None = None,
    *,
    namespace: str = RELEASE_NAMESPACE,
    kube_version: str = KUBE_VERSION,
    include_crds: bool = False,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """`helm template` of the chart with these values (passed as a values file on stdin), with
    the CRD it ships (crds/) when asked."""
    return helm(
        helm_bin,
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        namespace,
        "--kube-version",
        kube_version,
        "--values",
        "-",
        *(["--include-crds"] if include_crds else []),
        input=yaml.safe_dump(values or {}),
        check=check,
    )


def render(helm_bin: Path, values: Values | None = None, *, include_crds: bool = False) -> Rendered:
    out = template(helm_bin, values, include_crds=include_crds).stdout
    return Rendered([d for d in yaml.safe_load_all(out) if d])


@dataclass
class Rendered:
    """The objects one `helm template` produced, with lookups by kind and name."""

    objects: list[Obj]

    def of_kind(self, *kinds: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] in kinds]

    def get(self, kind: str, name: str, namespace: str | None = None) -> Obj:
        found = [
            o
            for o in self.of_kind(kind)
            if o["metadata"]["name"] == name
            and (namespace is None or o["metadata"].get("namespace") == namespace)
        ]
        assert len(found) == 1, f"expected one {kind} {name} in {namespace}, found {len(found)}"
        return found[0]

    @property
    def deployment(self) -> Obj:
        (deployment,) = self.of_kind("Deployment")
        return deployment

    @property
    def container(self) -> Obj:
        (container,) = self.deployment["spec"]["template"]["spec"]["containers"]
        return container

    def bound_to(self, service_account: str, namespace: str = RELEASE_NAMESPACE) -> list[Obj]:
        """The Roles and ClusterRoles that bindings grant to this ServiceAccount."""
        roles = []
        for binding in self.of_kind("RoleBinding", "ClusterRoleBinding"):
            subjects = binding.get("subjects") or []
            if not any(
                s["kind"] == "ServiceAccount"
                and s["name"] == service_account
                and s["namespace"] == namespace
                for s in subjects
            ):
                continue
            ref = binding["roleRef"]
            role_ns = binding["metadata"].get("namespace") if ref["kind"] == "Role" else None
            roles.append(self.get(ref["kind"], ref["name"], role_ns))
        return roles


def grants(rules: Iterable[Obj]) -> set[tuple[str, str, str]]:
    """RBAC rules flattened to (apiGroup, resource, verb) triples, the unit of a permission."""
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    }


def flags(command: list[str]) -> Iterator[tuple[str, str]]:
    """`--name=value` arguments as (name, value) pairs, in order."""
    for arg in command:
        if arg.startswith("--"):
            name, _, value = arg[2:].partition("=")
            yield name, value
