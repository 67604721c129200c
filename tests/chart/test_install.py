"""The chart installed with Helm on the devcluster, in cluster mode and in namespaced mode.

The operator pod is created by the chart's Deployment and run by the process kubelet from the
pod spec: the chart's command, the chart's ServiceAccount token, so every API call it makes is
checked against the chart's RBAC. Every namespace enforces the `restricted` Pod Security Standard.

The tests of one mode share one release and run in the order written; the last one uninstalls it.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devcluster.testing import DevCluster, wait_for
from tests.chart.install import BUCKET, Assets, Mode, Release, installed, run_manifest

MODES = {
    "cluster": Mode(
        name="cluster",
        system="chart-cluster-system",
        watch=(),
        runs="chart-cluster-runs",
        elsewhere="chart-cluster-other",
    ),
    "namespaced": Mode(
        name="namespaced",
        system="chart-ns-system",
        watch=("chart-ns-team-a", "chart-ns-team-b"),
        runs="chart-ns-team-a",
        elsewhere="chart-ns-other",
    ),
}
RECONCILE_TIMEOUT = 60
RUN_TIMEOUT = 420


@pytest.fixture(scope="module", params=sorted(MODES))
def release(
    request: pytest.FixtureRequest, devcluster: DevCluster, helm_bin: Path
) -> Iterator[Release]:
    with installed(devcluster, helm_bin, MODES[request.param]) as rel:
        yield rel


def get_run(dc: DevCluster, namespace: str, name: str) -> dict[str, Any]:
    return json.loads(dc.kubectl("get", "fft", name, "-n", namespace, "-o", "json").stdout)


def condition(run: dict[str, Any], type_: str) -> dict[str, Any] | None:
    conditions = (run.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == type_), None)


def wait_phase(release: Release, namespace: str, name: str, phase: str, timeout: float) -> dict:
    def check() -> dict[str, Any] | None:
        run = get_run(release.dc, namespace, name)
        status = run.get("status") or {}
        if phase != "Failed" and status.get("phase") == "Failed":
            raise AssertionError(f"{name} failed: {status}\n{release.diagnose()}")
        return run if status.get("phase") == phase else None

    return wait_for(
        check,
        timeout=timeout,
        what=f"run {namespace}/{name} to be {phase}",
        interval=1.0,
        diagnose=release.diagnose,
    )


def delete_run(dc: DevCluster, namespace: str, name: str) -> None:
    """Delete and wait until gone: the operator has lifted its finalizer."""
    dc.kubectl("delete", "fft", name, "-n", namespace, "--wait=true", "--timeout=60s")


def events_for(dc: DevCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    return dc.events(namespace, "FederatedFineTune", name)


def can_i(dc: DevCluster, user: str, *args: str) -> bool:
    result = dc.kubectl("auth", "can-i", *args, as_user=user, check=False)
    assert result.stdout.strip() in ("yes", "no"), result.stderr
    return result.stdout.strip() == "yes"


def no_permission_errors(release: Release) -> None:
    errors = release.permission_errors()
    assert not errors, "the operator was refused by the API:\n" + "\n".join(errors[:10])


# -- install ------------------------------------------------------------------------------------


def test_the_deployment_creates_the_operator_pod_and_the_kubelet_runs_its_command(
    release: Release,
) -> None:
    pod = release.running_pod()
    dc = release.dc
    # The pod belongs to the chart's Deployment (through its ReplicaSet) ...
    (owner,) = pod["metadata"]["ownerReferences"]
    assert owner["kind"] == "ReplicaSet"
    replica_set = json.loads(
        dc.kubectl("get", "rs", owner["name"], "-n", release.namespace, "-o", "json").stdout
    )
    assert [o["name"] for o in replica_set["metadata"]["ownerReferences"]] == ["fedtune-operator"]
    deployment = json.loads(
        dc.kubectl(
            "get", "deploy", "fedtune-operator", "-n", release.namespace, "-o", "json"
        ).stdout
    )
    template = deployment["spec"]["template"]["spec"]
    # ... runs as the chart's ServiceAccount, with the chart's command, which the kubelet ran.
    assert pod["spec"]["serviceAccountName"] == "fedtune-operator"
    (container,) = pod["spec"]["containers"]
    assert container["command"] == template["containers"][0]["command"]
    expected = ["fedtune", "operator", *[f"--namespace={ns}" for ns in release.mode.watch]]
    assert container["command"][: len(expected)] == expected
    first_line = release.log().splitlines()[0]
    assert f"starting {container['command']!r}" in first_line
    # Admitted in a namespace that enforces the restricted Pod Security Standard, which refuses
    # a pod without the chart's security settings.
    plain_pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "plain", "namespace": release.namespace},
        "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["true"]}]},
    }
    refused = dc.kubectl(
        "create", "--dry-run=server", "-f", "-", input=json.dumps(plain_pod), check=False
    )
    assert refused.returncode != 0
    assert 'violates PodSecurity "restricted:latest"' in refused.stderr


def test_kopf_starts_without_permission_errors(release: Release) -> None:
    release.running_pod()
    release.wait_healthy()
    wait_for(
        lambda: "Initial authentication has finished" in release.log(),
        timeout=30,
        what="kopf's start in the operator log",
        diagnose=release.diagnose,
    )
    assert "Activity 'configure' succeeded" in release.log()
    with urllib.request.urlopen(
        f"http://127.0.0.1:{release.metrics_port}/metrics", timeout=5
    ) as response:
        assert b"fedtune_reconcile_errors_total" in response.read()
    no_permission_errors(release)


def test_the_install_notes_tell_the_user_what_to_do_next(release: Release) -> None:
    notes = release.notes
    assert "get fft -w" in notes
    assert "apply -f examples/minimal.yaml" in notes
    assert "create secret generic fedtune-s3" in notes
    assert "kubectl apply --server-side" in notes  # the CRD upgrade path
    if release.mode.watch:
        assert f"It watches FederatedFineTunes in: {', '.join(release.mode.watch)}." in notes
    else:
        assert "It watches FederatedFineTunes in every namespace." in notes


# -- the operator's permissions -----------------------------------------------------------------

RUNS, ELSEWHERE, SYSTEM = "RUNS", "ELSEWHERE", "SYSTEM"  # namespaces of the release's mode
# (kubectl auth can-i arguments, expected in cluster mode, expected in namespaced mode)
OPERATOR_PERMISSIONS = [
    (("create", "jobs.batch", "-n", RUNS), True, True),
    (("delete", "jobs.batch", "-n", RUNS), True, True),
    (("patch", "jobs.batch", "-n", RUNS), True, True),
    (("watch", "jobs.batch", "-n", RUNS), True, True),
    (("list", "pods", "-n", RUNS), True, True),
    (("watch", "pods", "-n", RUNS), True, True),  # the pod index: how each trainer ended
    (("get", "jobs.batch", "-n", RUNS), True, True),
    (("create", "events", "-n", RUNS), True, True),
    (("create", "persistentvolumeclaims", "-n", RUNS), True, True),
    (("get", "persistentvolumeclaims", "-n", RUNS), True, True),
    (("get", "federatedfinetunes.fedtune.dev", "-n", RUNS), True, True),
    (("watch", "federatedfinetunes.fedtune.dev", "-n", RUNS), True, True),
    (("patch", "federatedfinetunes.fedtune.dev", "-n", RUNS), True, True),
    (("delete", "federatedfinetunes.fedtune.dev", "-n", RUNS), True, True),
    (("update", "federatedfinetunes.fedtune.dev", "--subresource=status", "-n", RUNS), True, True),
    (("watch", "customresourcedefinitions.apiextensions.k8s.io"), True, True),
    # The run's NetworkPolicy: created, brought up to date and watched (no patch when it is
    # already as wanted), never deleted (the garbage collector deletes it with its run).
    (("create", "networkpolicies.networking.k8s.io", "-n", RUNS), True, True),
    (("patch", "networkpolicies.networking.k8s.io", "-n", RUNS), True, True),
    (("watch", "networkpolicies.networking.k8s.io", "-n", RUNS), True, True),
    (("get", "networkpolicies.networking.k8s.io", "-n", RUNS), False, False),
    (("delete", "networkpolicies.networking.k8s.io", "-n", RUNS), False, False),
    (("create", "networkpolicies.networking.k8s.io", "-n", ELSEWHERE), True, False),
    # Never Secrets, anywhere: credentials reach Jobs through secretKeyRef.
    (("get", "secrets", "-n", RUNS), False, False),
    (("list", "secrets", "-n", SYSTEM), False, False),
    (("watch", "secrets", "--all-namespaces"), False, False),
    # Nothing it does not do.
    (("create", "pods", "-n", RUNS), False, False),
    (("get", "pods", "--subresource=log", "-n", RUNS), False, False),
    (("create", "federatedfinetunes.fedtune.dev", "-n", RUNS), False, False),
    (("update", "federatedfinetunes.fedtune.dev", "-n", RUNS), False, False),
    (("patch", "federatedfinetunes.fedtune.dev", "--subresource=status", "-n", RUNS), False, False),
    (("create", "deployments.apps", "-n", SYSTEM), False, False),
    (("get", "configmaps", "-n", RUNS), False, False),
    # Model cache claims: created, never listed, changed or deleted (the garbage collector
    # removes them with their run), and no PersistentVolumes (cluster-scoped storage).
    (("delete", "persistentvolumeclaims", "-n", RUNS), False, False),
    (("patch", "persistentvolumeclaims", "-n", RUNS), False, False),
    (("list", "persistentvolumeclaims", "-n", RUNS), False, False),
    (("create", "persistentvolumeclaims", "-n", ELSEWHERE), True, False),
    (("get", "persistentvolumes"), False, False),
    (("create", "customresourcedefinitions.apiextensions.k8s.io"), False, False),
    (("create", "clusterrolebindings.rbac.authorization.k8s.io"), False, False),
    (("impersonate", "users"), False, False),
    # Namespaced mode: nothing outside the watched namespaces, and no cluster-wide Job access.
    (("create", "jobs.batch", "-n", ELSEWHERE), True, False),
    (("list", "jobs.batch", "--all-namespaces"), True, False),
    (("list", "federatedfinetunes.fedtune.dev", "-n", ELSEWHERE), True, False),
    (("list", "namespaces"), False, True),
]


@pytest.mark.parametrize(
    ("args", "in_cluster_mode", "in_namespaced_mode"),
    OPERATOR_PERMISSIONS,
    ids=[" ".join(a) for a, _, _ in OPERATOR_PERMISSIONS],
)
def test_the_operator_may_do_what_it_needs_and_nothing_else(
    release: Release, args: tuple[str, ...], in_cluster_mode: bool, in_namespaced_mode: bool
) -> None:
    places = {RUNS: release.mode.runs, ELSEWHERE: release.mode.elsewhere, SYSTEM: release.namespace}
    argv = [places.get(a, a) for a in args]
    expected = in_namespaced_mode if release.mode.watch else in_cluster_mode
    assert can_i(release.dc, release.service_account, *argv) is expected


# -- roles for users ----------------------------------------------------------------------------

# (user, the ClusterRole a RoleBinding gives them in the runs namespace, may create, may read)
USERS = [
    ("alice", "fedtune-editor", True, True),
    ("bob", "fedtune-viewer", False, True),
    ("carol", "edit", True, True),  # fedtune-editor aggregated into the built-in edit role
    ("dave", "view", False, True),  # fedtune-viewer aggregated into the built-in view role
    ("eve", None, False, False),
]


@pytest.mark.parametrize(
    ("user", "cluster_role", "may_create", "may_read"), USERS, ids=[u for u, *_ in USERS]
)
def test_users_get_runs_through_the_editor_and_viewer_roles(
    release: Release, user: str, cluster_role: str | None, may_create: bool, may_read: bool
) -> None:
    dc, namespace = release.dc, release.mode.runs
    if cluster_role:
        dc.kubectl(
            "create",
            "rolebinding",
            f"{user}-{cluster_role}",
            f"--clusterrole={cluster_role}",
            f"--user={user}",
            "-n",
            namespace,
        )
    # Aggregation into the built-in roles is asynchronous (the clusterrole-aggregation controller).
    wait_for(
        lambda: (
            can_i(dc, user, "list", "federatedfinetunes.fedtune.dev", "-n", namespace) is may_read
        ),
        timeout=30,
        what=f"{user}'s read access to be {may_read}",
    )
    name = f"by-{user}-{uuid.uuid4().hex[:4]}"
    manifest = run_manifest(name, namespace, endpoint=dc.s3.endpoint, suspend=True)
    # No Secret: naming one takes `get` on it besides these roles (the chart's admission policy,
    # test_admission.py), which fedtune-editor alone does not give.
    del manifest["spec"]["storage"]["credentialsSecret"]
    created = dc.kubectl("create", "-f", "-", input=json.dumps(manifest), as_user=user, check=False)
    try:
        assert (created.returncode == 0) is may_create, created.stderr
        if not may_create:
            assert "forbidden" in created.stderr
        listed = dc.kubectl("get", "fft", "-n", namespace, as_user=user, check=False)
        assert (listed.returncode == 0) is may_read, listed.stderr
        assert can_i(dc, user, "delete", "federatedfinetunes.fedtune.dev", "-n", namespace) is (
            may_create
        )
        assert not can_i(
            dc,
            user,
            "update",
            "federatedfinetunes.fedtune.dev",
            "--subresource=status",
            "-n",
            namespace,
        )
    finally:
        if created.returncode == 0:
            delete_run(dc, namespace, name)


# -- the operator at work -----------------------------------------------------------------------


def test_the_operator_reconciles_runs_in_the_namespaces_it_watches(release: Release) -> None:
    dc = release.dc
    watched_run = f"watched-{uuid.uuid4().hex[:4]}"
    other_run = f"other-{uuid.uuid4().hex[:4]}"
    for name, namespace in ((other_run, release.mode.elsewhere), (watched_run, release.mode.runs)):
        manifest = run_manifest(name, namespace, endpoint=dc.s3.endpoint, suspend=True)
        dc.kubectl("create", "-f", "-", input=json.dumps(manifest))

    # Reconciled: read, status written through the subresource, an event posted; no finalizer,
    # as storage.cleanupPolicy is Retain (only Delete needs one).
    run = wait_phase(release, release.mode.runs, watched_run, "Suspended", RECONCILE_TIMEOUT)
    assert condition(run, "Suspended")["status"] == "True"
    assert run["status"]["observedGeneration"] == run["metadata"]["generation"]
    assert not run["metadata"].get("finalizers")
    wait_for(
        lambda: any(
            e["reason"] == "Suspended" for e in events_for(dc, release.mode.runs, watched_run)
        ),
        timeout=RECONCILE_TIMEOUT,
        what="the operator's Suspended event",
        diagnose=release.diagnose,
    )

    other = get_run(dc, release.mode.elsewhere, other_run)
    if release.mode.watch:
        # Created first, yet untouched: the operator does not see this namespace.
        assert "status" not in other
        assert not other["metadata"].get("finalizers")
    else:
        wait_phase(release, release.mode.elsewhere, other_run, "Suspended", RECONCILE_TIMEOUT)

    delete_run(dc, release.mode.runs, watched_run)
    delete_run(dc, release.mode.elsewhere, other_run)
    no_permission_errors(release)


@pytest.mark.parametrize("release", ["namespaced"], indirect=True)
def test_a_run_succeeds_through_the_chart_installed_operator(
    release: Release, chart_assets: Assets
) -> None:
    """The whole loop with the chart's RBAC only: Jobs created and watched, pod summaries read,
    status and events written, the finished run deleted after its TTL; the training pods are
    admitted as `restricted`, and everything the operator writes by the chart's admission
    policy on its identity."""
    dc, namespace = release.dc, release.mode.runs
    s3 = dc.s3
    dc.kubectl(
        "create",
        "secret",
        "generic",
        "fedtune-s3",
        "-n",
        namespace,
        f"--from-literal=AWS_ACCESS_KEY_ID={s3.access_key}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.secret_key}",
    )
    # Every Job, NetworkPolicy and claim below passes the chart's confinement policy.
    release.wait_confined()
    name = f"run-{uuid.uuid4().hex[:4]}"
    manifest = run_manifest(
        name, namespace, endpoint=s3.endpoint, assets=chart_assets, ttl_seconds_after_finished=15
    )
    dc.kubectl("create", "-f", "-", input=json.dumps(manifest))

    run = wait_phase(release, namespace, name, "Succeeded", RUN_TIMEOUT)
    status = run["status"]
    assert [r["round"] for r in status["history"]] == [1]
    assert {c["name"]: c["phase"] for c in status["clients"]} == {
        "client-0": "Succeeded",
        "client-1": "Succeeded",
    }
    assert status["finalAdapterUri"].startswith(f"s3://{BUCKET}/runs/{namespace}/{name}/")
    jobs = json.loads(
        dc.kubectl(
            "get", "jobs", "-n", namespace, "-l", f"fedtune.dev/run={name}", "-o", "json"
        ).stdout
    )["items"]
    roles = sorted(
        (j["metadata"]["labels"]["fedtune.dev/round"], j["metadata"]["labels"]["fedtune.dev/role"])
        for j in jobs
    )
    assert roles == [("0", "aggregator"), ("1", "aggregator"), ("1", "client"), ("1", "client")]
    # Least privilege: no pod of the run holds an API token, and all sit behind the run's
    # NetworkPolicy, which the operator created with the chart's RBAC and its run owns.
    for job in jobs:
        assert job["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    policy = json.loads(
        dc.kubectl("get", "networkpolicy", f"{name}-pods", "-n", namespace, "-o", "json").stdout
    )
    assert policy["metadata"]["ownerReferences"][0]["uid"] == run["metadata"]["uid"]
    assert policy["spec"]["podSelector"] == {"matchLabels": {"fedtune.dev/run": name}}
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert not policy["spec"].get("ingress")
    wait_for(
        lambda: events_for(dc, namespace, name),
        timeout=RECONCILE_TIMEOUT,
        what=f"the operator's events about {name}",
    )
    # ttlSecondsAfterFinished: the operator deletes the run itself (and lifts its finalizer).
    dc.kubectl("wait", "--for=delete", f"fft/{name}", "-n", namespace, "--timeout=90s")
    # ... and the garbage collector its NetworkPolicy.
    dc.kubectl(
        "wait", "--for=delete", f"networkpolicy/{name}-pods", "-n", namespace, "--timeout=60s"
    )
    no_permission_errors(release)


# -- uninstall ----------------------------------------------------------------------------------


def test_helm_uninstall_leaves_nothing_behind_but_the_crd(release: Release) -> None:
    dc = release.dc
    pods = release.operator_pods()
    assert pods, "the release's operator pod is gone before the uninstall"
    no_permission_errors(release)

    release.uninstall()

    assert not release.installed()
    selector = "app.kubernetes.io/instance=fedtune,app.kubernetes.io/name=fedtune-operator"
    for namespace in release.mode.namespaces:
        leftovers = dc.kubectl(
            "get",
            "deployments,replicasets,pods,serviceaccounts,services,roles,rolebindings",
            "-n",
            namespace,
            "-l",
            selector,
            "-o",
            "name",
        ).stdout.split()
        assert not leftovers, f"left in {namespace}: {leftovers}"
    cluster_wide = dc.kubectl(
        "get",
        "clusterroles,clusterrolebindings,validatingadmissionpolicies,"
        "validatingadmissionpolicybindings",
        "-l",
        selector,
        "-o",
        "name",
    ).stdout.split()
    assert not cluster_wide, f"left cluster-wide: {cluster_wide}"
    for role in ("fedtune-editor", "fedtune-viewer"):
        assert dc.kubectl("get", "clusterrole", role, check=False).returncode != 0, role
    # ... and their rules are gone from the built-in roles they were aggregated into.
    for builtin in ("admin", "edit", "view"):
        wait_for(
            lambda builtin=builtin: (
                "fedtune.dev" not in dc.kubectl("get", "clusterrole", builtin, "-o", "json").stdout
            ),
            timeout=30,
            what=f"the fedtune rules to leave the {builtin} ClusterRole",
        )
    # The pods' processes are gone too: the kubelet logged each exit.
    for pod in release.pods_seen:
        wait_for(
            lambda pod=pod: "exited with" in release.log_path(pod).read_text().splitlines()[-1],
            timeout=30,
            what=f"operator pod {pod}'s process to exit",
        )
    # Helm never deletes what it installed from crds/: the CRD, and so every run, stays.
    crd = dc.kubectl("get", "crd", "federatedfinetunes.fedtune.dev", "-o", "name", check=False)
    assert crd.returncode == 0, "the CRD went with the release"
