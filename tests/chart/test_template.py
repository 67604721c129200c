"""The chart, rendered without a cluster: what `helm lint` and `helm template` must produce.

Each test states one property of the chart for several value sets: the defaults (cluster mode),
namespaced mode, and everything switched on with non-default settings.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from devcluster.cluster import REPO_ROOT
from fedtune_operator import api
from tests.chart.support import (
    CHART,
    CRD_FILE,
    KUBE_VERSION,
    RELEASE,
    RELEASE_NAMESPACE,
    Obj,
    Rendered,
    Values,
    flags,
    grants,
    helm,
    render,
    template,
)

OPERATOR_GRANTS = {
    *{("fedtune.dev", "federatedfinetunes", v) for v in ("get", "list", "watch", "patch")},
    ("fedtune.dev", "federatedfinetunes", "delete"),
    ("fedtune.dev", "federatedfinetunes/status", "update"),
    *{("batch", "jobs", v) for v in ("get", "list", "watch", "create", "patch", "delete")},
    *{("", "pods", v) for v in ("list", "watch")},
    ("", "persistentvolumeclaims", "create"),
    ("", "persistentvolumeclaims", "get"),
    ("", "events", "create"),
    *{("networking.k8s.io", "networkpolicies", v) for v in ("create", "patch", "list", "watch")},
}
"""Everything the operator does in a namespace it watches (see the rules in _helpers.tpl)."""

SITE_GRANTS = {
    *{("fedtune.dev", "federatedsites", v) for v in ("get", "list", "watch", "patch")},
    ("fedtune.dev", "federatedsites/status", "update"),
    *{("batch", "jobs", v) for v in ("get", "list", "watch", "create")},
    ("", "pods", "list"),
    ("", "events", "create"),
}
"""Everything the operator does in site mode: a FederatedSite's reconcile (docs/sites.md)."""

CRD_READ = {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")}
NAMESPACE_READ = {("", "namespaces", v) for v in ("list", "watch")}

CLUSTER_SCOPED = (
    "ClusterRole",
    "ClusterRoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
)

NAMESPACED: Values = {"watchNamespaces": ["team-a", "team-b"]}
EVERYTHING: Values = {
    "watchNamespaces": ["team-a", "team-b"],
    "image": {"repository": "registry.example.com/ml/fedtune-operator", "tag": "0.1.0-rc1"},
    "imagePullSecrets": [{"name": "regcred"}],
    "operator": {
        "livenessPort": 9091,
        "verbose": True,
        "env": [{"name": "FEDTUNE_RESYNC_SECONDS", "value": "30"}],
    },
    "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
    "metrics": {
        "port": 9090,
        "service": {"enabled": True, "port": 9090},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    },
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "priorityClassName": "system-cluster-critical",
    "networkPolicy": {
        "enabled": True,
        "apiServerCidrs": ["10.0.0.10/32", "fd00::10/128"],
        "apiServerPorts": [6443],
        "metricsFrom": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ],
    },
    "admission": {
        "validationActions": ["Warn", "Audit"],
        "allowedImages": ["ghcr.io/fedtune/", "sha256:" + "0123456789abcdef" * 4],
        "allowedServiceAccounts": ["trainer"],
        "allowSecretEnv": False,
        "allowedPriorityClasses": ["fedtune-batch"],
        "allowedTolerationKeys": ["nvidia.com/gpu"],
        "protectedNamespaces": ["kube-system", "platform"],
        "protectReleaseNamespace": False,
    },
}
VALUE_SETS = {"defaults": {}, "namespaced": NAMESPACED, "everything": EVERYTHING}


@dataclass(frozen=True)
class Case:
    """One value set and what the chart renders from it."""

    values: Values
    rendered: Rendered


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def case(request: pytest.FixtureRequest, helm_bin: Path) -> Case:
    values = VALUE_SETS[request.param]
    return Case(values, render(helm_bin, values))


def watched(values: Values) -> list[str]:
    return list(values.get("watchNamespaces", []))


# -- the chart as a package ---------------------------------------------------------------------


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_helm_lint_strict_passes(helm_bin: Path, values: Values) -> None:
    result = helm(
        helm_bin, "lint", "--strict", str(CHART), "--values", "-", input=yaml.dump(values)
    )
    assert "0 chart(s) failed" in result.stdout, result.stdout


def test_the_chart_ships_the_generated_crd_byte_for_byte() -> None:
    for crd in (REPO_ROOT / "crds").iterdir():
        assert (CHART / "crds" / crd.name).read_bytes() == crd.read_bytes(), crd.name
    shipped = (CHART / "crds" / CRD_FILE).read_bytes()
    generated = subprocess.run(
        [sys.executable, "-m", "fedtune_operator.crd"], check=True, capture_output=True
    ).stdout
    assert shipped == (REPO_ROOT / "crds" / CRD_FILE).read_bytes(), (
        "charts/fedtune-operator/crds/ differs from crds/: copy crds/ into the chart"
    )
    assert shipped == generated, "the CRD is stale: run `make crds` and copy it into the chart"


@pytest.mark.parametrize(
    ("version", "accepted"),
    [
        ("1.29.9", False),  # no admissionregistration.k8s.io/v1 ValidatingAdmissionPolicy
        ("1.28.9", False),
        ("1.30.0", True),
        ("1.30.5-gke.1014001", True),  # managed clusters report pre-release-style versions
        ("1.31.2-eks-7f9249a", True),
        (KUBE_VERSION, True),
    ],
)
def test_kubernetes_1_30_or_newer_is_required(helm_bin: Path, version: str, accepted: bool) -> None:
    result = template(helm_bin, kube_version=version, check=False)
    assert (result.returncode == 0) is accepted, result.stderr
    if not accepted:
        assert "chart requires kubeVersion: >=1.30.0-0" in result.stderr


# -- values.schema.json -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"watchNamespace": ["team-a"]}, "additional properties 'watchNamespace' not allowed"),
        ({"image": {"tags": "1.0"}}, "at '/image': additional properties 'tags' not allowed"),
        (
            {"metrics": {"serviceMonitor": {"enable": True}}},
            "at '/metrics/serviceMonitor': additional properties 'enable' not allowed",
        ),
        ({"resources": {"request": {"cpu": "1"}}}, "additional properties 'request' not allowed"),
        ({"watchNamespaces": ["Team_A"]}, "at '/watchNamespaces/0'"),
        ({"watchNamespaces": ["a", "a"]}, "at '/watchNamespaces'"),
        ({"operator": {"livenessPort": "8081"}}, "at '/operator/livenessPort'"),
        ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy'"),
        # The allowlists are written into the policies' CEL: no quote may get in.
        ({"admission": {"allowedImages": ["x' || true || '"]}}, "at '/admission/allowedImages/0'"),
    ],
    ids=[
        "typo-top-level",
        "typo-image",
        "typo-nested",
        "typo-resources",
        "invalid-namespace",
        "duplicate-namespace",
        "port-as-string",
        "pull-policy",
        "cel-in-an-allowlist",
    ],
)
def test_schema_rejects_bad_values_naming_the_key(
    helm_bin: Path, values: Values, message: str
) -> None:
    result = template(helm_bin, values, check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"metrics": {"serviceMonitor": {"enabled": True}}},
            "metrics.serviceMonitor.enabled needs metrics.service.enabled=true",
        ),
        (
            {"metrics": {"enabled": False, "service": {"enabled": True}}},
            "need metrics.enabled=true",
        ),
        ({"metrics": {"port": 8081}}, "metrics.port and operator.livenessPort must differ"),
        (
            {"serviceAccount": {"create": False}},
            "serviceAccount.name is required when serviceAccount.create is false",
        ),
        (
            {"networkPolicy": {"enabled": True}},
            "networkPolicy.enabled needs networkPolicy.apiServerCidrs",
        ),
        (
            {"admission": {"validationActions": ["Deny", "Warn"]}},
            "admission.validationActions: Deny and Warn exclude each other",
        ),
    ],
    ids=[
        "monitor-without-service",
        "service-without-metrics",
        "same-ports",
        "no-sa-name",
        "network-policy-without-api-server",
        "deny-and-warn",
    ],
)
def test_inconsistent_values_fail_with_a_clear_message(
    helm_bin: Path, values: Values, message: str
) -> None:
    result = template(helm_bin, values, check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


# -- the Deployment -----------------------------------------------------------------------------


def test_one_replica_replaced_by_recreate(case: Case) -> None:
    rendered = case.rendered
    spec = rendered.deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    assert spec["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "fedtune-operator",
        "app.kubernetes.io/instance": RELEASE,
    }
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()


def test_the_command_is_explicit_and_carries_the_flags(case: Case) -> None:
    values, rendered = case.values, case.rendered
    command = rendered.container["command"]
    assert command[:2] == ["fedtune", "operator"]
    assert "args" not in rendered.container
    operator = values.get("operator", {})
    metrics = values.get("metrics", {})
    expected = [("namespace", ns) for ns in watched(values)]
    expected += [
        ("liveness-port", str(operator.get("livenessPort", 8081))),
        ("metrics-port", str(metrics.get("port", 8080))),
    ]
    if operator.get("verbose"):
        expected.append(("verbose", ""))
    assert list(flags(command)) == expected


def test_without_namespaces_the_operator_watches_the_whole_cluster(helm_bin: Path) -> None:
    command = render(helm_bin).container["command"]
    assert not any(name == "namespace" for name, _ in flags(command))


def test_metrics_off_means_no_metrics_port(helm_bin: Path) -> None:
    container = render(helm_bin, {"metrics": {"enabled": False}}).container
    assert ("metrics-port", "0") in list(flags(container["command"]))
    assert [p["name"] for p in container["ports"]] == ["healthz"]


def test_the_liveness_probe_targets_kopfs_health_endpoint(case: Case) -> None:
    values, rendered = case.values, case.rendered
    container = rendered.container
    probe = container["livenessProbe"]
    assert probe["httpGet"] == {"path": "/healthz", "port": "healthz"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["healthz"] == values.get("operator", {}).get("livenessPort", 8081)
    assert probe["periodSeconds"] > 0
    assert probe["failureThreshold"] >= 1
    assert "readinessProbe" not in container


def test_the_pod_meets_the_restricted_pod_security_standard(
    case: Case,
) -> None:
    rendered = case.rendered
    pod = rendered.deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "hostNetwork" not in pod
    assert "hostPID" not in pod
    security = rendered.container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["runAsNonRoot"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}


def test_a_writable_tmp_on_an_emptydir(case: Case) -> None:
    rendered = case.rendered
    pod = rendered.deployment["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in rendered.container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_the_pod_runs_as_the_charts_service_account(case: Case) -> None:
    rendered = case.rendered
    (sa,) = rendered.of_kind("ServiceAccount")
    assert sa["metadata"]["namespace"] == RELEASE_NAMESPACE
    pod = rendered.deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"] == "fedtune-operator"


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ({}, "ghcr.io/fedtune/operator:0.1.0"),
        ({"tag": "0.2.0"}, "ghcr.io/fedtune/operator:0.2.0"),
        (
            {"repository": "registry.example.com/fedtune", "digest": "sha256:" + "ab" * 32},
            "registry.example.com/fedtune@sha256:" + "ab" * 32,
        ),
    ],
    ids=["default-is-app-version", "tag", "digest"],
)
def test_the_image(helm_bin: Path, image: Values, expected: str) -> None:
    assert render(helm_bin, {"image": image}).container["image"] == expected


def test_resources_come_from_the_values(case: Case) -> None:
    values, rendered = case.values, case.rendered
    resources = rendered.container["resources"]
    expected = (
        values.get("resources") or yaml.safe_load((CHART / "values.yaml").read_text())["resources"]
    )
    assert resources == expected
    assert "memory" in resources["limits"]
    assert "cpu" in resources["requests"]


def test_extra_settings_reach_the_pod(helm_bin: Path) -> None:
    rendered = render(helm_bin, EVERYTHING)
    pod = rendered.deployment["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["priorityClassName"] == "system-cluster-critical"
    env = {e["name"]: e.get("value") for e in rendered.container["env"]}
    assert env["FEDTUNE_RESYNC_SECONDS"] == "30"


# -- RBAC ---------------------------------------------------------------------------------------


def test_no_role_grants_secrets_or_wildcards(case: Case) -> None:
    rendered = case.rendered
    roles = rendered.of_kind("Role", "ClusterRole")
    assert roles
    for role in roles:
        for group, resource, verb in grants(role["rules"]):
            where = f"{role['kind']} {role['metadata']['name']}"
            assert resource.split("/")[0] != "secrets", f"{where} grants {verb} on secrets"
            assert "*" not in (group, resource, verb), f"{where} has a wildcard"
        for rule in role["rules"]:
            assert "nonResourceURLs" not in rule
            assert "resourceNames" not in rule


def test_cluster_mode_grants_exactly_what_the_operator_does(helm_bin: Path) -> None:
    rendered = render(helm_bin)
    (role,) = rendered.bound_to("fedtune-operator")
    assert role["kind"] == "ClusterRole"
    assert grants(role["rules"]) == OPERATOR_GRANTS | CRD_READ
    assert not rendered.of_kind("Role", "RoleBinding")


def test_site_mode_runs_the_site_operator_with_the_site_rights_alone(helm_bin: Path) -> None:
    rendered = render(helm_bin, {"mode": "site"})
    assert ("mode", "site") in list(flags(rendered.container["command"]))
    (role,) = rendered.bound_to("fedtune-operator")
    assert grants(role["rules"]) == SITE_GRANTS | CRD_READ
    assert ("mode", "site") not in list(flags(render(helm_bin).container["command"]))


@pytest.mark.parametrize("values", [NAMESPACED, EVERYTHING], ids=["namespaced", "everything"])
def test_namespaced_mode_grants_roles_only_in_the_watched_namespaces(
    helm_bin: Path, values: Values
) -> None:
    rendered = render(helm_bin, values)
    roles = rendered.bound_to("fedtune-operator")
    namespaced = {r["metadata"]["namespace"]: r for r in roles if r["kind"] == "Role"}
    assert sorted(namespaced) == sorted(watched(values))
    for role in namespaced.values():
        assert grants(role["rules"]) == OPERATOR_GRANTS
    # Cluster-wide, only reads of cluster-scoped metadata: nothing about jobs, pods or runs.
    (cluster_role,) = (r for r in roles if r["kind"] == "ClusterRole")
    assert grants(cluster_role["rules"]) == CRD_READ | NAMESPACE_READ
    operator_roles = {r["metadata"]["name"] for r in roles}
    for role in rendered.of_kind("ClusterRole"):
        if role["metadata"]["name"] in operator_roles:
            resources = {resource for _, resource, _ in grants(role["rules"])}
            assert not resources & {"jobs", "pods", "federatedfinetunes", "events"}


def test_every_binding_names_the_charts_service_account(case: Case) -> None:
    rendered = case.rendered
    bindings = rendered.of_kind("RoleBinding", "ClusterRoleBinding")
    assert bindings
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "fedtune-operator", "namespace": RELEASE_NAMESPACE}
        ]


def test_rbac_can_be_left_to_the_cluster_admin(helm_bin: Path) -> None:
    rendered = render(
        helm_bin,
        {"rbac": {"create": False, "userRoles": {"create": False}}},
    )
    assert not rendered.of_kind("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")


# -- admission policies -------------------------------------------------------------------------

RUNS_POLICY = "fedtune-operator-runs"
CONFINEMENT = "fedtune-operator-confinement"
AUTHZ_CHECK_COST, CEL_BUDGET = 350_000, 10_000_000
"""What one authorizer check costs in CEL, and what one policy may spend on a request."""


def policy_text(policy: Obj) -> str:
    spec = policy["spec"]
    return "\n".join(
        [v["expression"] for v in spec.get("variables", [])]
        + [v["expression"] for v in spec["validations"]]
    )


def test_both_admission_policies_are_installed_and_bound(case: Case) -> None:
    rendered, values = case.rendered, case.values
    actions = values.get("admission", {}).get("validationActions", ["Deny"])
    for name in (RUNS_POLICY, CONFINEMENT):
        policy = rendered.get("ValidatingAdmissionPolicy", name)
        assert policy["spec"]["failurePolicy"] == "Fail"
        binding = rendered.get("ValidatingAdmissionPolicyBinding", name)
        assert binding["spec"]["policyName"] == name
        assert binding["spec"]["validationActions"] == actions


def test_the_runs_policy_checks_writes_of_runs_in_the_watched_namespaces(case: Case) -> None:
    rendered, values = case.rendered, case.values
    (rule,) = rendered.get("ValidatingAdmissionPolicy", RUNS_POLICY)["spec"]["matchConstraints"][
        "resourceRules"
    ]
    assert rule["resources"] == ["federatedfinetunes"]
    assert rule["operations"] == ["CREATE", "UPDATE"]
    binding = rendered.get("ValidatingAdmissionPolicyBinding", RUNS_POLICY)
    if watched(values):
        selector = binding["spec"]["matchResources"]["namespaceSelector"]
        assert selector["matchExpressions"] == [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": watched(values)}
        ]
    else:
        assert "matchResources" not in binding["spec"]


def test_the_runs_policy_lets_the_crds_default_image_through(case: Case) -> None:
    """Only another image than the trainer's default needs `create pods`: the policy must know
    the default the CRD fills in, which follows the chart's appVersion."""
    text = policy_text(case.rendered.get("ValidatingAdmissionPolicy", RUNS_POLICY))
    assert f"variables.image != '{api.DEFAULT_IMAGE}'" in text


def test_the_runs_policy_stays_within_its_cel_budget(case: Case) -> None:
    """Each authorizer check costs a fixed 350000 of the 10000000 one policy may spend on a
    request; past it the API server refuses the run. The checks are counted so that there is
    room for the rest of the evaluation."""
    text = policy_text(case.rendered.get("ValidatingAdmissionPolicy", RUNS_POLICY))
    checks = text.count(".check(")
    assert checks == 1 + (1 + 12) + (1 + 6)  # pods; Secrets; claims (namespace-wide + by name)
    assert checks * AUTHZ_CHECK_COST <= 0.75 * CEL_BUDGET


def test_the_confinement_policy_matches_the_operator_alone(case: Case) -> None:
    rendered, values = case.rendered, case.values
    policy = rendered.get("ValidatingAdmissionPolicy", CONFINEMENT)
    (condition,) = policy["spec"]["matchConditions"]
    user = f"system:serviceaccount:{RELEASE_NAMESPACE}:fedtune-operator"
    assert condition["expression"] == f"request.userInfo.username == '{user}'"
    rules = {
        (r["apiGroups"][0], r["resources"][0]): r["operations"]
        for r in policy["spec"]["matchConstraints"]["resourceRules"]
    }
    assert rules == {
        ("batch", "jobs"): ["CREATE", "UPDATE", "DELETE"],
        ("networking.k8s.io", "networkpolicies"): ["CREATE", "UPDATE"],
        ("", "persistentvolumeclaims"): ["CREATE", "UPDATE"],
    }
    where = policy["spec"]["validations"][0]["expression"]
    admission = values.get("admission", {})
    if watched(values):
        assert where == f"request.namespace in {json.dumps(watched(values), separators=(',', ':'))}"
    else:
        protected = admission.get(
            "protectedNamespaces", ["kube-system", "kube-public", "kube-node-lease"]
        )
        if admission.get("protectReleaseNamespace", True):
            protected = [*protected, RELEASE_NAMESPACE]
        assert where == f"!(request.namespace in {json.dumps(protected, separators=(',', ':'))})"


@pytest.mark.parametrize(
    ("admission", "expected"),
    [
        ({"enabled": False}, set()),
        ({"confineOperator": False}, {RUNS_POLICY}),
        ({"checkRequester": False}, {CONFINEMENT}),
        ({"checkRequester": False, "allowSecretEnv": False}, {RUNS_POLICY, CONFINEMENT}),
    ],
    ids=["off", "no-confinement", "no-requester-check", "allowlist-only"],
)
def test_admission_switches(helm_bin: Path, admission: Values, expected: set[str]) -> None:
    rendered = render(helm_bin, {"admission": admission})
    policies = {p["metadata"]["name"] for p in rendered.of_kind("ValidatingAdmissionPolicy")}
    bindings = {
        p["spec"]["policyName"] for p in rendered.of_kind("ValidatingAdmissionPolicyBinding")
    }
    assert policies == bindings == expected
    for policy in rendered.of_kind("ValidatingAdmissionPolicy"):
        text = policy_text(policy)
        assert ("authorizer" in text) is (
            admission.get("checkRequester", True) and policy["metadata"]["name"] == RUNS_POLICY
        )


# -- roles for users ----------------------------------------------------------------------------

RUN_EDITING = {"create", "update", "patch", "delete"}
READING = {"get", "list", "watch"}


def test_editor_and_viewer_roles_aggregate_into_the_default_roles(
    case: Case,
) -> None:
    rendered = case.rendered
    editor = rendered.get("ClusterRole", "fedtune-editor")
    viewer = rendered.get("ClusterRole", "fedtune-viewer")
    editor_grants = grants(editor["rules"])
    assert {("fedtune.dev", "federatedfinetunes", v) for v in RUN_EDITING | READING} <= (
        editor_grants
    )
    assert {g for g in editor_grants if g[1] != "federatedfinetunes"} == {
        ("fedtune.dev", "federatedfinetunes/status", "get")
    }
    assert {verb for _, _, verb in grants(viewer["rules"])} == READING
    assert {resource for _, resource, _ in grants(viewer["rules"])} == {
        "federatedfinetunes",
        "federatedfinetunes/status",
    }
    labels = editor["metadata"]["labels"]
    assert labels["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert labels["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert "rbac.authorization.k8s.io/aggregate-to-view" not in labels
    assert viewer["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert "rbac.authorization.k8s.io/aggregate-to-edit" not in viewer["metadata"]["labels"]


@pytest.mark.parametrize(
    ("user_roles", "expected"),
    [
        ({"aggregateToDefaultRoles": False}, {"fedtune-editor": False, "fedtune-viewer": False}),
        ({"create": False}, {}),
    ],
    ids=["not-aggregated", "not-created"],
)
def test_user_roles_switches(helm_bin: Path, user_roles: Values, expected: dict) -> None:
    rendered = render(helm_bin, {"rbac": {"userRoles": user_roles}})
    user_roles_found = {
        r["metadata"]["name"]: any(
            k.startswith("rbac.authorization.k8s.io/aggregate-to-") for k in r["metadata"]["labels"]
        )
        for r in rendered.of_kind("ClusterRole")
        if r["metadata"]["name"] in ("fedtune-editor", "fedtune-viewer")
    }
    assert user_roles_found == expected


# -- metrics ------------------------------------------------------------------------------------


def test_metrics_service_and_monitor_are_off_by_default(helm_bin: Path) -> None:
    assert not render(helm_bin).of_kind("Service", "ServiceMonitor")


def test_the_service_monitor_scrapes_the_metrics_service(helm_bin: Path) -> None:
    rendered = render(helm_bin, EVERYTHING)
    (service,) = rendered.of_kind("Service")
    (monitor,) = rendered.of_kind("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [RELEASE_NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    (port,) = service["spec"]["ports"]
    assert endpoint["port"] == port["name"] == "metrics"
    assert endpoint["path"] == "/metrics"
    # The Service reaches the container's metrics port, and the pods by their selector labels.
    container_ports = {p["name"]: p["containerPort"] for p in rendered.container["ports"]}
    assert port["targetPort"] == "metrics"
    assert container_ports["metrics"] == 9090
    pod_labels = rendered.deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


# -- the operator's NetworkPolicy ----------------------------------------------------------------

API_SERVER: Values = {"enabled": True, "apiServerCidrs": ["192.0.2.10/32"]}


def test_the_operators_network_policy_is_off_by_default(helm_bin: Path) -> None:
    assert not render(helm_bin).of_kind("NetworkPolicy")
    assert not render(helm_bin, NAMESPACED).of_kind("NetworkPolicy")


@pytest.mark.parametrize(
    ("values", "egress", "ingress"),
    [
        (
            {"networkPolicy": API_SERVER},
            [
                {
                    "to": [{"ipBlock": {"cidr": "192.0.2.10/32"}}],
                    "ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 6443}],
                }
            ],
            [{"from": [{"namespaceSelector": {}}], "ports": [{"protocol": "TCP", "port": 8080}]}],
        ),
        (
            EVERYTHING,
            [
                {
                    "to": [
                        {"ipBlock": {"cidr": "10.0.0.10/32"}},
                        {"ipBlock": {"cidr": "fd00::10/128"}},
                    ],
                    "ports": [{"protocol": "TCP", "port": 6443}],
                }
            ],
            [
                {
                    "from": EVERYTHING["networkPolicy"]["metricsFrom"],
                    "ports": [{"protocol": "TCP", "port": 9090}],
                }
            ],
        ),
        ({"networkPolicy": API_SERVER, "metrics": {"enabled": False}}, None, []),
        ({"networkPolicy": {**API_SERVER, "metricsFrom": []}}, None, []),
    ],
    ids=["defaults", "everything", "metrics-off", "nobody-scrapes"],
)
def test_the_operators_network_policy_confines_its_pod(
    helm_bin: Path, values: Values, egress: list | None, ingress: list
) -> None:
    """Egress to the API server's addresses and ports only (no DNS: in-cluster config reaches
    the API server by IP); ingress to the metrics port only, from the peers named, or none."""
    rendered = render(helm_bin, values)
    (policy,) = rendered.of_kind("NetworkPolicy")
    spec = policy["spec"]
    pod_labels = rendered.deployment["spec"]["template"]["metadata"]["labels"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert spec["ingress"] == ingress
    if egress is not None:
        assert spec["egress"] == egress
    (rule,) = spec["egress"]
    assert all(set(peer) == {"ipBlock"} for peer in rule["to"])


# -- conventions --------------------------------------------------------------------------------


def test_every_object_carries_the_standard_labels(case: Case) -> None:
    rendered = case.rendered
    for obj in rendered.objects:
        labels = obj["metadata"]["labels"]
        where = f"{obj['kind']} {obj['metadata']['name']}"
        assert labels["app.kubernetes.io/name"] == "fedtune-operator", where
        assert labels["app.kubernetes.io/instance"] == RELEASE, where
        assert labels["app.kubernetes.io/managed-by"] == "Helm", where
        assert labels["app.kubernetes.io/version"] == "0.1.0", where
        assert labels["helm.sh/chart"] == "fedtune-operator-0.1.0", where


def test_namespaced_objects_live_in_the_release_namespace(case: Case) -> None:
    values, rendered = case.values, case.rendered
    for obj in rendered.objects:
        namespace = obj["metadata"].get("namespace")
        if obj["kind"] in ("Role", "RoleBinding"):
            assert namespace in watched(values)
        elif obj["kind"] in CLUSTER_SCOPED:
            assert namespace is None
        else:
            assert namespace == RELEASE_NAMESPACE, obj["kind"]


@pytest.mark.parametrize(
    ("release", "values", "expected"),
    [
        ("fedtune", {}, "fedtune-operator"),
        ("ml", {}, "ml-fedtune-operator"),
        ("fedtune-operator-prod", {}, "fedtune-operator-prod"),
        ("fedtune", {"fullnameOverride": "fft"}, "fft"),
    ],
)
def test_object_names_follow_the_release(
    helm_bin: Path, release: str, values: Values, expected: str
) -> None:
    out = helm(
        helm_bin,
        "template",
        release,
        str(CHART),
        "--kube-version",
        KUBE_VERSION,
        "--values",
        "-",
        "--show-only",
        "templates/deployment.yaml",
        input=yaml.dump(values),
    ).stdout
    assert yaml.safe_load(out)["metadata"]["name"] == expected
