"""The chart's admission policies on the devcluster's real API server (templates/admission.yaml).

`fedtune-operator-runs`: the operator creates a run's pods with its own rights, so a run may make
it do only what the person who writes the run may do: the API server's authorizer is asked about
the requesting user (impersonated here with `--as`), and the cluster admin's allowlists hold for
everyone. `fedtune-operator-confinement`: what the operator's ServiceAccount writes must be a
run's objects, restricted pods, in the namespaces it manages, so that a stolen operator token
cannot start any pod anywhere.

Each mode installs the chart once, with `admission.allowedImages` set; every request is a
server-side dry run unless a test needs an object to exist. The matrices are printed (`pytest
-rP`) and recorded as properties of the test (`--junitxml`).
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devcluster.testing import DevCluster, wait_for
from fedtune_operator import manifests
from fedtune_operator.network_policy import network_policy
from fedtune_operator.validation import parse_spec
from fedtune_operator.volumes import cache_claim
from tests.chart.install import (
    CONFINEMENT_POLICY,
    Mode,
    Release,
    dry_run,
    installed,
    run_manifest,
    set_in,
)

MODES = {
    "cluster": Mode(
        name="cluster",
        system="adm-cluster-system",
        watch=(),
        runs="adm-cluster-runs",
        elsewhere="adm-cluster-other",
    ),
    "namespaced": Mode(
        name="namespaced",
        system="adm-ns-system",
        watch=("adm-ns-team",),
        runs="adm-ns-team",
        elsewhere="adm-ns-other",
    ),
}
ALLOWED_IMAGES = ["ghcr.io/fedtune/", "registry.example.com/ml/"]
RUNS_POLICY = "ValidatingAdmissionPolicy 'fedtune-operator-runs'"
SECRET = "fedtune-s3"
OTHER_SECRET = "other-team-s3"
POLICY_TIMEOUT = 30


@dataclass(frozen=True)
class User:
    name: str
    grants: str
    """What the user may do in the runs namespace, for the table."""


EDITOR = User("adm-editor", "fedtune-editor")
POD_CREATOR = User("adm-pod-creator", "editor + create pods")
SECRET_READER = User("adm-secret-reader", f"editor + get secret {SECRET}")
ADMIN = User("adm-cluster-admin", "cluster-admin")
USERS = (EDITOR, POD_CREATOR, SECRET_READER, ADMIN)


@pytest.fixture(scope="module", params=sorted(MODES))
def release(
    request: pytest.FixtureRequest, devcluster: DevCluster, helm_bin: Path
) -> Iterator[Release]:
    extra = {"admission": {"allowedImages": ALLOWED_IMAGES}}
    with installed(devcluster, helm_bin, MODES[request.param], extra) as rel:
        binding = f"{ADMIN.name}-{request.param}"
        grant_users(devcluster, rel.mode.runs, binding)
        try:
            wait_in_force(rel)
            yield rel
        finally:
            devcluster.kubectl("delete", "clusterrolebinding", binding, check=False)


def grant_users(dc: DevCluster, namespace: str, admin_binding: str) -> None:
    """The users of the matrix, by RoleBindings in the runs namespace (and one cluster admin)."""
    ns = ("-n", namespace)
    editors = [f"--user={u.name}" for u in (EDITOR, POD_CREATOR, SECRET_READER)]
    dc.kubectl("create", "rolebinding", "editors", "--clusterrole=fedtune-editor", *editors, *ns)
    dc.kubectl("create", "role", "create-pods", "--verb=create", "--resource=pods", *ns)
    dc.kubectl(
        "create",
        "rolebinding",
        "create-pods",
        "--role=create-pods",
        f"--user={POD_CREATOR.name}",
        *ns,
    )
    dc.kubectl(
        "create",
        "role",
        "get-secret",
        "--verb=get",
        "--resource=secrets",
        f"--resource-name={SECRET}",
        *ns,
    )
    dc.kubectl(
        "create",
        "rolebinding",
        "get-secret",
        "--role=get-secret",
        f"--user={SECRET_READER.name}",
        *ns,
    )
    dc.kubectl(
        "create",
        "clusterrolebinding",
        admin_binding,
        "--clusterrole=cluster-admin",
        f"--user={ADMIN.name}",
    )


def wait_in_force(release: Release) -> None:
    """The API server loads new policies asynchronously: wait until both refuse what they must
    (and RBAC has the new bindings)."""
    dc, namespace = release.dc, release.mode.runs

    def refused_by(policy: str, obj: dict[str, Any], user: str) -> bool:
        admitted, refusal = dry_run(dc, obj, user)
        return not admitted and policy in refusal

    run = plain_run(namespace)
    run["spec"]["template"] = {"image": "docker.io/library/busybox:latest"}
    wait_for(
        lambda: refused_by(RUNS_POLICY, run, ADMIN.name),
        timeout=POLICY_TIMEOUT,
        what="the runs policy to refuse an image outside admission.allowedImages",
    )
    release.wait_confined()


# -- the runs policy: who may make the operator do what ------------------------------------------


def plain_run(namespace: str) -> dict[str, Any]:
    """A run that needs nothing beyond fedtune-editor: the default image, s3:// URIs, no Secret
    (the pods' ambient identity)."""
    manifest = run_manifest(f"m-{uuid.uuid4().hex[:6]}", namespace, endpoint="http://10.0.0.1:9000")
    del manifest["spec"]["storage"]["credentialsSecret"]
    return manifest


@dataclass(frozen=True)
class Field:
    label: str
    change: Callable[[dict[str, Any]], None]
    named: str
    """What a refusal must name: the field."""
    allowed: tuple[bool, bool, bool, bool]
    """Admitted for EDITOR, POD_CREATOR, SECRET_READER, ADMIN."""
    allowlist: bool = False
    """Refused by the cluster admin's allowlist (for everyone), not for lack of a permission."""


SECRET_ENV = [{"name": "DATA_TOKEN", "valueFrom": {"secretKeyRef": {"name": SECRET, "key": "t"}}}]
FIELDS = [
    Field("nothing beyond the defaults", lambda spec: None, "", (True, True, True, True)),
    Field(
        "spec.template.image (an allowed registry)",
        set_in("template.image", "registry.example.com/ml/trainer:2.0"),
        "spec.template.image",
        (False, True, False, True),
    ),
    Field(
        "spec.template.serviceAccountName",
        set_in("template.serviceAccountName", "trainer"),
        "spec.template.serviceAccountName",
        (False, True, False, True),
    ),
    Field(
        f"spec.clients[].env secretKeyRef ({SECRET})",
        set_in("clients.0.env", SECRET_ENV),
        "spec.clients[name=client-0].env[name=DATA_TOKEN]",
        (False, False, False, True),
    ),
    Field(
        f"spec.storage.credentialsSecret ({SECRET})",
        set_in("storage.credentialsSecret", {"name": SECRET}),
        "spec.storage.credentialsSecret",
        (False, False, True, True),
    ),
    Field(
        f"spec.clients[].credentialsSecret ({OTHER_SECRET})",
        set_in("clients.1.credentialsSecret", {"name": OTHER_SECRET}),
        "spec.clients[name=client-1].credentialsSecret",
        (False, False, False, True),
    ),
    Field(
        f"spec.clients[].storageCredentialsSecret ({OTHER_SECRET})",
        set_in("clients.0.storageCredentialsSecret", {"name": OTHER_SECRET}),
        "spec.clients[name=client-0].storageCredentialsSecret",
        (False, False, False, True),
    ),
    Field(
        f"spec.evaluation.storageCredentialsSecret ({SECRET})",
        set_in("evaluation.storageCredentialsSecret", {"name": SECRET}),
        "spec.evaluation.storageCredentialsSecret",
        (False, False, True, True),
    ),
    Field(
        "spec.clients[].dataUri pvc://datasets/...",
        set_in("clients.1.dataUri", "pvc://datasets/client-1.jsonl"),
        "spec.clients[name=client-1].dataUri",
        (False, False, False, True),
    ),
    Field(
        "spec.template.priorityClassName system-node-critical",
        set_in("template.priorityClassName", "system-node-critical"),
        "spec.template.priorityClassName",
        (False, True, False, True),
    ),
    Field(
        "spec.template.tolerations [{operator: Exists}]",
        set_in("template.tolerations", [{"operator": "Exists"}]),
        "spec.template.tolerations",
        (False, True, False, True),
    ),
    Field(
        "spec.template.image outside admission.allowedImages",
        set_in("template.image", "docker.io/library/busybox:latest"),
        "spec.template.image",
        (False, False, False, False),
        allowlist=True,
    ),
]


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join
    out = [title, line(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out += [line(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def test_a_run_may_make_the_operator_do_only_what_its_author_may_do(
    release: Release, record_property: Callable[[str, object], None]
) -> None:
    """The admission matrix: user roles x spec fields, admitted or refused, every refusal by the
    runs policy, naming the field, and the user unless an allowlist refused it."""
    dc, namespace = release.dc, release.mode.runs
    rows, wrong = [], []
    for f in FIELDS:
        row = [f.label]
        for user, expected in zip(USERS, f.allowed, strict=True):
            manifest = plain_run(namespace)
            f.change(manifest["spec"])
            admitted, refusal = dry_run(dc, manifest, user.name)
            row.append("allowed" if admitted else "refused")
            if admitted is not expected:
                wrong.append(f"{f.label} as {user.grants}: admitted={admitted} {refusal}")
            elif not admitted:
                must_name = [RUNS_POLICY, f.named]
                must_name.append("admission.allowedImages" if f.allowlist else user.name)
                missing = [m for m in must_name if m not in refusal]
                if missing:
                    wrong.append(f"{f.label} as {user.grants}: {missing} not in {refusal!r}")
        rows.append(row)
    matrix = table(
        f"admission matrix ({release.mode.name} mode, namespace {namespace}; "
        f"admission.allowedImages {ALLOWED_IMAGES})",
        ["the run sets", *[u.grants for u in USERS]],
        rows,
    )
    print(matrix)
    record_property("admission_matrix", matrix)
    assert not wrong, "\n".join([matrix, *wrong])


def test_a_spec_change_is_checked_whole_and_other_writes_are_not(release: Release) -> None:
    """An update that changes the spec is checked like a create, whoever wrote the rest; one that
    leaves the spec alone (labels, kopf's finalizer and annotations) is not."""
    dc, namespace = release.dc, release.mode.runs
    manifest = plain_run(namespace)
    name = manifest["metadata"]["name"]
    manifest["spec"]["suspend"] = True
    manifest["spec"]["template"] = {"image": "registry.example.com/ml/trainer:2.0"}
    dc.kubectl("create", "-f", "-", input=json.dumps(manifest), as_user=ADMIN.name)
    try:

        def patch(user: str, body: dict[str, Any]) -> tuple[bool, str]:
            result = dc.kubectl(
                "patch",
                "fft",
                name,
                "-n",
                namespace,
                "--type=merge",
                "--dry-run=server",
                "-p",
                json.dumps(body),
                as_user=user,
                check=False,
            )
            return result.returncode == 0, result.stderr

        resume = {"spec": {"suspend": False}}
        admitted, refusal = patch(EDITOR.name, resume)
        assert not admitted
        assert RUNS_POLICY in refusal, refusal
        assert "spec.template.image" in refusal, refusal
        assert patch(POD_CREATOR.name, resume)[0]
        assert patch(EDITOR.name, {"metadata": {"labels": {"team": "a"}}})[0]
        kopf = {"metadata": {"annotations": {"kopf.zalando.org/touch": "1"}}}
        assert patch(release.service_account, kopf)[0]
    finally:
        dc.kubectl("delete", "fft", name, "-n", namespace, "--wait=true", "--timeout=60s")


@pytest.mark.parametrize("release", ["namespaced"], indirect=True)
def test_runs_outside_the_watched_namespaces_are_not_checked(release: Release) -> None:
    """Namespaced mode binds the runs policy to the watched namespaces only: elsewhere no
    operator acts on the runs, and another release's policy may apply."""
    dc, elsewhere = release.dc, release.mode.elsewhere
    dc.kubectl(
        "create",
        "rolebinding",
        "editors",
        "--clusterrole=fedtune-editor",
        f"--user={EDITOR.name}",
        "-n",
        elsewhere,
    )
    manifest = plain_run(elsewhere)
    manifest["spec"]["template"] = {"image": "docker.io/library/busybox:latest"}
    wait_for(
        lambda: dry_run(dc, manifest, EDITOR.name)[0],
        timeout=POLICY_TIMEOUT,
        what=f"{EDITOR.name} to create runs in {elsewhere}",
    )
    inside = plain_run(release.mode.runs)
    inside["spec"]["template"] = manifest["spec"]["template"]
    assert not dry_run(dc, inside, EDITOR.name)[0]


# -- the confinement policy: what the operator's ServiceAccount may write ------------------------

OWNER_UID = "0f6ad1d0-6c36-4bcb-b7a8-5bd4a0c7f0a1"


def operator_objects(namespace: str) -> dict[str, dict[str, Any]]:
    """What the operator writes for one run, from its own builders."""
    spec = parse_spec(
        {
            "baseModel": "pvc://models/tiny",
            "storage": {"uri": "s3://bucket/runs/r", "credentialsSecret": {"name": SECRET}},
            "modelCache": {"mode": "perClient", "size": "1Gi"},
            "template": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]},
            "clients": [
                {"name": "a", "dataUri": "s3://bucket/data/a.jsonl"},
                {"name": "b", "dataUri": "pvc://datasets/b.jsonl"},
            ],
        }
    )
    run = dict(run="confined", namespace=namespace, spec=spec)
    owned = dict(run, uid=OWNER_UID)
    return {
        "client Job": manifests.client_job(**owned, round_=1, attempt=0, client="b"),
        "aggregator Job": manifests.aggregate_job(**owned, round_=1, attempt=0, clients=["a"]),
        "evaluation Job": manifests.evaluate_job(**owned, round_=1),
        "cleanup Job": manifests.cleanup_job(**owned),
        "NetworkPolicy": network_policy(**owned),
        "model cache claim": cache_claim(**owned, client="a"),
    }


def unlabelled(job: dict[str, Any]) -> dict[str, Any]:
    job = copy.deepcopy(job)
    job["metadata"]["labels"] = {}
    job["spec"]["template"]["metadata"]["labels"] = {}
    return job


def privileged_job(namespace: str) -> dict[str, Any]:
    labels = {"fedtune.dev/run": "confined", "fedtune.dev/role": "client"}
    pod = {
        "restartPolicy": "Never",
        "hostNetwork": True,
        "hostPID": True,
        "containers": [
            {
                "name": "shell",
                "image": "ghcr.io/fedtune/trainer:0.1.0",
                "command": ["sh", "-c", "cat /host/etc/shadow"],
                "securityContext": {"privileged": True},
                "volumeMounts": [{"name": "host", "mountPath": "/host"}],
            }
        ],
        "volumes": [{"name": "host", "hostPath": {"path": "/"}}],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "root-shell", "namespace": namespace, "labels": labels},
        "spec": {"template": {"metadata": {"labels": labels}, "spec": pod}},
    }


def other_image(job: dict[str, Any]) -> dict[str, Any]:
    job = copy.deepcopy(job)
    job["spec"]["template"]["spec"]["containers"][0]["image"] = "docker.io/library/busybox:latest"
    return job


def every_pod_policy(namespace: str) -> dict[str, Any]:
    policy = network_policy_of(namespace)
    policy["spec"]["podSelector"] = {}
    return policy


def network_policy_of(namespace: str) -> dict[str, Any]:
    return copy.deepcopy(operator_objects(namespace)["NetworkPolicy"])


def cloning_claim(namespace: str) -> dict[str, Any]:
    claim = copy.deepcopy(operator_objects(namespace)["model cache claim"])
    claim["spec"]["dataSource"] = {"kind": "PersistentVolumeClaim", "name": "datasets"}
    return claim


ALLOWED, POLICY, RBAC = "allowed", "refused by policy", "refused by RBAC"


@dataclass(frozen=True)
class Write:
    label: str
    build: Callable[[Mode], dict[str, Any]]
    cluster: str
    """The outcome in cluster mode: ALLOWED, POLICY or RBAC."""
    namespaced: str
    named: str = ""
    """What a refusal by the policy must say."""


def _in(place: str, build: Callable[[str], dict[str, Any]]) -> Callable[[Mode], dict[str, Any]]:
    namespaces: dict[str, Callable[[Mode], str]] = {
        "runs": lambda m: m.runs,
        "system": lambda m: m.system,
        "elsewhere": lambda m: m.elsewhere,
        "kube-system": lambda m: "kube-system",
    }
    return lambda mode: build(namespaces[place](mode))


def _object(kind: str) -> Callable[[str], dict[str, Any]]:
    return lambda namespace: operator_objects(namespace)[kind]


WRITES = [
    *[
        Write(f"its {kind} in the runs namespace", _in("runs", _object(kind)), ALLOWED, ALLOWED)
        for kind in operator_objects("x")
    ],
    Write(
        "a privileged Job (hostNetwork, hostPath /) in kube-system",
        _in("kube-system", privileged_job),
        POLICY,
        RBAC,
        "namespace kube-system is protected",
    ),
    Write(
        "its client Job in kube-system",
        _in("kube-system", _object("client Job")),
        POLICY,
        RBAC,
        "namespace kube-system is protected",
    ),
    Write(
        "its client Job in the release's own namespace",
        _in("system", _object("client Job")),
        POLICY,
        RBAC,
        "the operator's own namespace",
    ),
    Write(
        "its client Job where a RoleBinding (edit) lets it, outside watchNamespaces",
        _in("elsewhere", _object("client Job")),
        ALLOWED,
        POLICY,
        "it manages only the namespaces",
    ),
    Write(
        "a privileged Job (hostNetwork, hostPath /) in the runs namespace",
        _in("runs", privileged_job),
        POLICY,
        POLICY,
        "container shell: privileged",
    ),
    Write(
        "its client Job without the fedtune.dev labels",
        _in("runs", lambda ns: unlabelled(operator_objects(ns)["client Job"])),
        POLICY,
        POLICY,
        "lacks the fedtune.dev/run label",
    ),
    Write(
        "its client Job with an image outside admission.allowedImages",
        _in("runs", lambda ns: other_image(operator_objects(ns)["client Job"])),
        POLICY,
        POLICY,
        "image docker.io/library/busybox:latest is not in admission.allowedImages",
    ),
    Write(
        "a NetworkPolicy selecting every pod of the namespace",
        _in("runs", every_pod_policy),
        POLICY,
        POLICY,
        "selects, or lets in, pods without its fedtune.dev/run label",
    ),
    Write(
        "a claim cloning another claim (dataSource)",
        _in("runs", cloning_claim),
        POLICY,
        POLICY,
        "names a volume or a data source",
    ),
]


def test_the_operator_identity_writes_only_a_runs_objects_where_it_manages_runs(
    release: Release, record_property: Callable[[str, object], None]
) -> None:
    """As the operator's ServiceAccount: its own objects are admitted in the runs namespace;
    pods it never makes, objects not of a run, and namespaces it does not manage are refused,
    even where its RBAC would allow them."""
    dc, mode = release.dc, release.mode
    # More RBAC than the chart gives, outside the watched namespaces: the policy still refuses.
    dc.kubectl(
        "create",
        "rolebinding",
        "operator-edit",
        "--clusterrole=edit",
        f"--serviceaccount={mode.system}:fedtune-operator",
        "-n",
        mode.elsewhere,
    )
    wait_for(
        lambda: (
            dc.kubectl(
                "auth",
                "can-i",
                "create",
                "jobs.batch",
                "-n",
                mode.elsewhere,
                as_user=release.service_account,
                check=False,
            ).stdout.strip()
            == "yes"
        ),
        timeout=POLICY_TIMEOUT,
        what="the extra RoleBinding to take effect",
    )
    rows, wrong = [], []
    for w in WRITES:
        expected = w.namespaced if mode.watch else w.cluster
        admitted, refusal = dry_run(dc, w.build(mode), release.service_account)
        outcome = ALLOWED if admitted else POLICY if CONFINEMENT_POLICY in refusal else RBAC
        rows.append([w.label, outcome])
        if outcome != expected:
            wrong.append(f"{w.label}: {outcome}, expected {expected}: {refusal}")
        elif outcome == POLICY and w.named not in refusal:
            wrong.append(f"{w.label}: {w.named!r} not in {refusal!r}")
        elif outcome == RBAC and "forbidden" not in refusal:
            wrong.append(f"{w.label}: not an RBAC refusal: {refusal!r}")
    results = table(
        f"the operator's ServiceAccount ({release.service_account}, {mode.name} mode)",
        ["it creates", "outcome"],
        rows,
    )
    print(results)
    record_property("operator_identity", results)
    assert not wrong, "\n".join([results, *wrong])


def test_the_operator_may_suspend_and_delete_its_jobs_and_no_others(release: Release) -> None:
    dc, namespace = release.dc, release.mode.runs
    sa = release.service_account
    ours = copy.deepcopy(operator_objects(namespace)["client Job"])
    del ours["metadata"]["ownerReferences"]  # no such run: the garbage collector would take it
    ours["spec"]["suspend"] = True
    other = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "not-a-run", "namespace": namespace},
        "spec": {"suspend": True, "template": ours["spec"]["template"]},
    }
    other["spec"]["template"] = unlabelled(ours)["spec"]["template"]
    for job in (ours, other):
        dc.kubectl("create", "-f", "-", input=json.dumps(job))
    try:

        def as_operator(*args: str) -> tuple[bool, str]:
            result = dc.kubectl(*args, "-n", namespace, "--dry-run=server", as_user=sa, check=False)
            return result.returncode == 0, result.stderr

        name = ours["metadata"]["name"]
        assert as_operator("patch", "job", name, "-p", '{"spec":{"suspend":false}}')[0]
        assert as_operator("delete", "job", name)[0]
        admitted, refusal = as_operator("delete", "job", "not-a-run")
        assert not admitted
        assert CONFINEMENT_POLICY in refusal, refusal
        assert "lacks the fedtune.dev/run label" in refusal, refusal
        admitted, refusal = as_operator(
            "patch", "job", "not-a-run", "-p", '{"spec":{"suspend":false}}'
        )
        assert not admitted
        assert CONFINEMENT_POLICY in refusal, refusal
    finally:
        for job in (ours, other):
            dc.kubectl("delete", "job", job["metadata"]["name"], "-n", namespace, check=False)
