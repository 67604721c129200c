"""The reconcile loop applies a run's NetworkPolicy before any of its pods can exist, and fails
closed: a policy it cannot apply means no Job, a warning event, and a retry (handlers.reconcile
against a recording fake of the Kubernetes verbs). A policy of the run's policy name that the run
does not own is never patched: the run's Jobs wait with NetworkPolicyReady False (against the
fake, and against the real API server)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes.client.rest import ApiException

from devcluster.testing import DevCluster, wait_for
from fedtune_operator import api, decision, handlers, network_policy
from fedtune_operator import kube as kube_module
from fedtune_operator.kube import Kube, NotOwned
from fedtune_operator.loops import View
from fedtune_operator.observe import compact_policy
from fedtune_operator.validation import parse_spec
from fedtune_trainer.wire.contract import LABEL_RUN

SPEC: dict[str, Any] = {
    "baseModel": "s3://models/llama-1b",
    "rounds": 1,
    "storage": {"uri": "s3://bucket/runs/demo", "endpoint": "http://10.0.0.9:9000"},
    "clients": [{"name": "a", "dataUri": "s3://data/a.jsonl"}],
}


ANY_HTTPS = {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 443}]}


class FakeKube:
    """Records the order of the verbs the reconcile calls; `refuse` makes the policy fail."""

    def __init__(self, spec: dict[str, Any], refuse: int | str | None = None) -> None:
        self.calls: list[str] = []
        self.policies: list[dict[str, Any]] = []
        self.statuses: list[dict[str, Any]] = []
        self.refuse = refuse
        self.obj = {
            "apiVersion": "fedtune.dev/v1alpha1",
            "kind": "FederatedFineTune",
            "metadata": {
                "name": "demo",
                "namespace": "ns",
                "uid": "uid-1",
                "generation": 1,
                "resourceVersion": "1",
            },
            "spec": spec,
        }

    def get_run(self, namespace: str, name: str) -> dict[str, Any]:
        return self.obj

    def write_status(self, obj: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        self.calls.append("write_status")
        self.statuses.append(status)
        self.obj = {**obj, "status": status}
        return self.obj

    def apply_network_policy(self, manifest: dict[str, Any]) -> None:
        self.calls.append("apply_network_policy")
        if isinstance(self.refuse, str):
            raise NotOwned(self.refuse)
        if self.refuse is not None:
            raise ApiException(status=self.refuse, reason="Forbidden")
        self.policies.append(manifest)

    def create_job(self, manifest: dict[str, Any]) -> bool:
        self.calls.append(f"create_job {manifest['metadata']['name']}")
        return True


def reconcile(monkeypatch: pytest.MonkeyPatch, fake: FakeKube) -> str:
    monkeypatch.setattr(kube_module, "_shared", fake)
    return asyncio.run(handlers.reconcile("ns", "demo", View(jobs=list)))


@pytest.mark.parametrize(
    ("network_policy", "calls"),
    [
        ({}, ["apply_network_policy", "write_status", "create_job demo-r0-aggregate"]),
        (
            {"enabled": True},
            ["apply_network_policy", "write_status", "create_job demo-r0-aggregate"],
        ),
        ({"enabled": False}, ["write_status", "create_job demo-r0-aggregate"]),
    ],
    ids=["default", "enabled", "disabled"],
)
def test_the_policy_is_applied_before_the_first_job(
    monkeypatch: pytest.MonkeyPatch,
    events: list[tuple[str, str]],
    network_policy: dict[str, Any],
    calls: list[str],
) -> None:
    fake = FakeKube({**SPEC, "networkPolicy": network_policy})
    assert reconcile(monkeypatch, fake) == "wait"
    assert fake.calls == calls
    for policy in fake.policies:
        assert policy["metadata"]["name"] == "demo-pods"
        assert policy["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


@pytest.mark.parametrize("status", [403, 422, 500])
def test_a_policy_that_cannot_be_applied_creates_no_job(
    monkeypatch: pytest.MonkeyPatch, events: list[tuple[str, str]], status: int
) -> None:
    fake = FakeKube(SPEC, refuse=status)
    with pytest.raises(ApiException):
        reconcile(monkeypatch, fake)
    assert fake.calls == ["apply_network_policy"]
    (_, message), *_ = [e for e in events if e[0] == "NetworkPolicyFailed"]
    assert f"{status} Forbidden" in message
    assert "demo-pods" in message


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status.get("conditions", [])}


def test_a_policy_the_run_does_not_own_holds_its_jobs_back_until_the_name_is_free(
    monkeypatch: pytest.MonkeyPatch, events: list[tuple[str, str]]
) -> None:
    taken = "NetworkPolicy ns/demo-pods exists and is not owned by this run (uid uid-1)"
    fake = FakeKube(SPEC, refuse=taken)
    assert reconcile(monkeypatch, fake) == "wait"
    assert fake.calls == ["apply_network_policy", "write_status"]
    ready = conditions(fake.statuses[-1])["NetworkPolicyReady"]
    assert (ready["status"], ready["reason"]) == ("False", "NotOwned")
    assert ready["message"].startswith(taken)
    assert [r for r, _ in events].count("NetworkPolicyNotOwned") == 1

    # Still taken: the same condition, no second event, still no Job.
    fake.calls.clear()
    assert reconcile(monkeypatch, fake) == "wait"
    assert fake.calls == ["apply_network_policy"]
    assert [r for r, _ in events].count("NetworkPolicyNotOwned") == 1

    # The name is free: the policy is the run's, then the Job.
    fake.refuse = None
    fake.calls.clear()
    assert reconcile(monkeypatch, fake) == "wait"
    assert fake.calls == ["apply_network_policy", "write_status", "create_job demo-r0-aggregate"]
    ready = conditions(fake.statuses[-1])["NetworkPolicyReady"]
    assert (ready["status"], ready["reason"]) == ("True", "Applied")
    assert "NetworkPolicyApplied" in [r for r, _ in events]


@pytest.mark.parametrize(
    ("storage", "unconfined", "warned"),
    [
        ({"endpoint": "http://10.0.0.9:9000"}, "False", False),
        ({"endpoint": "https://s3.example.com"}, "True", True),
        ({"endpoint": None}, "True", True),
    ],
    ids=["ip-endpoint", "host-name-endpoint", "aws-s3"],
)
def test_egress_open_to_any_address_is_a_condition_and_a_warning(
    monkeypatch: pytest.MonkeyPatch,
    events: list[tuple[str, str]],
    storage: dict[str, Any],
    unconfined: str,
    warned: bool,
) -> None:
    spec = {**SPEC, "storage": {k: v for k, v in {**SPEC["storage"], **storage}.items() if v}}
    fake = FakeKube(spec)
    assert reconcile(monkeypatch, fake) == "wait"
    condition = conditions(fake.statuses[-1])["EgressUnconfined"]
    assert condition["status"] == unconfined
    warnings = [m for r, m in events if r == "EgressUnconfined"]
    assert len(warnings) == int(warned)
    if warned:
        assert "to any address" in warnings[0]
        assert "spec.networkPolicy.egress" in condition["message"]
    # Said once: a later reconcile with the same spec posts nothing new.
    reconcile(monkeypatch, fake)
    assert len([r for r, _ in events if r == "EgressUnconfined"]) == int(warned)


# ---------------------------------------------------------------------------------------------
# network_policy.settle, pure
# ---------------------------------------------------------------------------------------------

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
TAKEN = "NetworkPolicy ns/demo-pods exists and is not owned by this run (uid uid-1)"
CREATE = decision.CreateAggregateJob(round=0, attempt=0, clients=())
DELETE = decision.DeleteJob(name="demo-r0-aggregate", reason="superseded")


def ready(state: str, message: str = "") -> api.Condition:
    reason = {"True": "Applied", "False": "NotOwned"}[state]
    return api.Condition(
        type="NetworkPolicyReady",
        status=state,  # type: ignore[arg-type]
        reason=reason,
        message=message or "x",
        last_transition_time=T0,
    )


NOT_OWNED_MESSAGE = (
    f"{TAKEN}: the run's Jobs wait until that name is free (it is never patched or deleted; "
    "spec.networkPolicy.enabled: false runs them without a policy)"
)


@pytest.mark.parametrize(
    ("before", "phase", "applied", "refused", "after", "actions", "events"),
    [
        (None, "Running", True, None, "True", [CREATE, DELETE], []),
        (None, "Running", False, TAKEN, "False", [DELETE], ["NetworkPolicyNotOwned"]),
        (ready("False", NOT_OWNED_MESSAGE), "Running", False, TAKEN, "False", [DELETE], []),
        (ready("False", "an older refusal"), "Running", False, TAKEN, "False", [DELETE],
         ["NetworkPolicyNotOwned"]),
        (ready("False"), "Running", True, None, "True", [CREATE, DELETE],
         ["NetworkPolicyApplied"]),
        (ready("True"), "Running", True, None, "True", [CREATE, DELETE], []),
        (ready("False"), "Running", False, None, "False", [CREATE, DELETE], []),
        (None, "Running", False, None, None, [CREATE, DELETE], []),
        (None, "Succeeded", False, TAKEN, None, [CREATE, DELETE], []),
    ],
    ids=[
        "applied",
        "refused",
        "still-refused-said-once",
        "refused-for-another-reason",
        "free-again",
        "still-applied",
        "not-tried-keeps-the-condition",
        "not-tried-sets-nothing",
        "finished-run-untouched",
    ],
)  # fmt: skip
def test_settle_records_the_policy_and_holds_back_only_the_pods(
    before: api.Condition | None,
    phase: str,
    applied: bool,
    refused: str | None,
    after: str | None,
    actions: list[decision.Action],
    events: list[str],
) -> None:
    spec = parse_spec({**SPEC, "storage": {**SPEC["storage"], "endpoint": "http://10.0.0.9"}})
    status = api.FederatedFineTuneStatus(
        phase=phase,  # type: ignore[arg-type]
        conditions=[before] if before is not None else [],
    )
    decided = decision.Decision(status, [CREATE, DELETE])
    settled = network_policy.settle(
        decided, "demo", spec, applied=applied, refused=refused, now=T0, generation=3
    )
    got = {c.type: c for c in settled.status.conditions}.get("NetworkPolicyReady")
    assert (got.status if got else None) == after
    assert settled.actions == actions
    assert [e.reason for e in settled.events] == events
    if refused is not None and after is not None:
        assert got is not None
        assert got.message == NOT_OWNED_MESSAGE
        assert [e.type for e in settled.events] == ["Warning"] * len(events)


# ---------------------------------------------------------------------------------------------
# Against the real API server
# ---------------------------------------------------------------------------------------------


class ApiServerKube(Kube):
    """The real verbs, except that Jobs are recorded rather than created (their pods are not what
    these tests are about)."""

    def __init__(self, dc: DevCluster) -> None:
        super().__init__(dc.api())
        self.jobs: list[str] = []

    def create_job(self, manifest: dict[str, Any]) -> bool:
        self.jobs.append(manifest["metadata"]["name"])
        return True


@pytest.fixture(scope="module")
def api_namespace(devcluster: DevCluster) -> Iterator[str]:
    def served() -> bool:
        # apply_crds's own wait fails at once while a new CRD has no conditions at all (its
        # jsonpath filter errors on nil): ask again until it gets past that.
        try:
            devcluster.apply_crds()
        except AssertionError:
            return False
        return True

    wait_for(served, timeout=60, what="the FederatedFineTune CRD to be served")
    name = f"netpol-{uuid.uuid4().hex[:8]}"
    devcluster.kubectl("create", "namespace", name)
    yield name
    devcluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def get_json(dc: DevCluster, *args: str) -> dict[str, Any]:
    return json.loads(dc.kubectl("get", *args, "-o", "json").stdout)


def foreign_policy(namespace: str, name: str, owners: list[dict[str, Any]]) -> dict[str, Any]:
    """Someone else's NetworkPolicy: it selects the database's pods and lets them be reached."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app": "db"},
            **({"ownerReferences": owners} if owners else {}),
        },
        "spec": {
            "podSelector": {"matchLabels": {"app": "db"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "api"}}}]}],
        },
    }


def create_run(dc: DevCluster, namespace: str, name: str) -> dict[str, Any]:
    body = {
        "apiVersion": "fedtune.dev/v1alpha1",
        "kind": "FederatedFineTune",
        "metadata": {"name": name, "namespace": namespace},
        "spec": SPEC,
    }
    dc.kubectl("create", "-f", "-", input=json.dumps(body))
    return get_json(dc, "fft", name, "-n", namespace)


@pytest.mark.parametrize("owner", ["none", "another-object"])
def test_the_api_server_never_patches_a_policy_the_run_does_not_own(
    devcluster: DevCluster, api_namespace: str, owner: str
) -> None:
    """kube.apply_network_policy: a policy of the run's policy name that has no owner, or
    another one (a ConfigMap standing in for a deleted run of the same name), is NotOwned and
    left exactly as it was; the run's own is brought up to date."""
    k = ApiServerKube(devcluster)
    run = create_run(devcluster, api_namespace, f"db-{owner}")
    name = network_policy.network_policy_name(run["metadata"]["name"])
    owners: list[dict[str, Any]] = []
    if owner == "another-object":
        devcluster.kubectl("create", "configmap", f"{name}-owner", "-n", api_namespace)
        cm = get_json(devcluster, "configmap", f"{name}-owner", "-n", api_namespace)
        owners = [
            {"apiVersion": "v1", "kind": "ConfigMap", "name": cm["metadata"]["name"],
             "uid": cm["metadata"]["uid"]}
        ]  # fmt: skip
    devcluster.kubectl(
        "create", "-f", "-", input=json.dumps(foreign_policy(api_namespace, name, owners))
    )
    before = get_json(devcluster, "networkpolicy", name, "-n", api_namespace)
    manifest = network_policy.network_policy(
        run=run["metadata"]["name"],
        namespace=api_namespace,
        uid=run["metadata"]["uid"],
        spec=parse_spec(SPEC),
    )
    with pytest.raises(NotOwned, match=f"{name} exists and is not owned by this run"):
        k.apply_network_policy(manifest)
    after = get_json(devcluster, "networkpolicy", name, "-n", api_namespace)
    assert after["spec"] == before["spec"]
    assert after["metadata"]["labels"] == {"app": "db"}
    assert after["metadata"].get("ownerReferences") == before["metadata"].get("ownerReferences")
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]

    # Once the name is free the run's own policy is created, and later patched in place.
    devcluster.kubectl("delete", "networkpolicy", name, "-n", api_namespace, "--wait=true")
    k.apply_network_policy(manifest)
    changed = network_policy.network_policy(
        run=run["metadata"]["name"],
        namespace=api_namespace,
        uid=run["metadata"]["uid"],
        spec=parse_spec({**SPEC, "networkPolicy": {"egress": [ANY_HTTPS]}}),
    )
    k.apply_network_policy(changed)
    ours = get_json(devcluster, "networkpolicy", name, "-n", api_namespace)
    assert [o["uid"] for o in ours["metadata"]["ownerReferences"]] == [run["metadata"]["uid"]]
    assert ours["spec"]["egress"] == changed["spec"]["egress"]
    assert ours["spec"]["podSelector"] == {"matchLabels": {LABEL_RUN: run["metadata"]["name"]}}


@pytest.mark.parametrize(
    "storage",
    [{"endpoint": "http://10.0.0.9:9000"}, {"endpoint": "https://s3.example.com"}, {}],
    ids=["ip-endpoint", "host-name-endpoint", "aws-s3"],
)
def test_a_policy_as_the_api_server_stores_it_is_in_place_until_someone_changes_it(
    devcluster: DevCluster, api_namespace: str, storage: dict[str, Any]
) -> None:
    """network_policy.in_place against what the API server really stores (its defaults, the
    empty lists it drops): the operator's own policy, read back, needs no second apply; edited
    by someone, owned by another object, or made for another spec, it does."""
    k = ApiServerKube(devcluster)
    run = create_run(devcluster, api_namespace, f"watch-{len(storage)}-{uuid.uuid4().hex[:4]}")
    spec = {**SPEC, "storage": {**SPEC["storage"], **storage}}
    if not storage:
        spec["storage"] = {k: v for k, v in spec["storage"].items() if k != "endpoint"}

    def manifest(s: dict[str, Any]) -> dict[str, Any]:
        return network_policy.network_policy(
            run=run["metadata"]["name"],
            namespace=api_namespace,
            uid=run["metadata"]["uid"],
            spec=parse_spec(s),
        )

    wanted = manifest(spec)
    k.apply_network_policy(wanted)
    name = wanted["metadata"]["name"]
    stored = compact_policy(get_json(devcluster, "networkpolicy", name, "-n", api_namespace))
    assert network_policy.in_place(stored, wanted)
    other_spec = {**spec, "networkPolicy": {"egress": [ANY_HTTPS]}}
    assert not network_policy.in_place(stored, manifest(other_spec))
    another_owner = {**stored, "owners": ["uid-of-another-run"]}
    assert not network_policy.in_place(another_owner, wanted)

    devcluster.kubectl(
        "patch", "networkpolicy", name, "-n", api_namespace, "--type=json", "-p",
        json.dumps([{"op": "add", "path": "/spec/egress/-", "value": ANY_HTTPS}]),
    )  # fmt: skip
    edited = compact_policy(get_json(devcluster, "networkpolicy", name, "-n", api_namespace))
    assert not network_policy.in_place(edited, wanted)
    k.apply_network_policy(wanted)
    restored = compact_policy(get_json(devcluster, "networkpolicy", name, "-n", api_namespace))
    assert network_policy.in_place(restored, wanted)


def test_a_run_whose_policy_name_is_taken_waits_with_a_condition(
    devcluster: DevCluster,
    api_namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    events: list[tuple[str, str]],
) -> None:
    """handlers.reconcile on a real run and API server: a run named `db` next to someone's
    `db-pods` creates no Job, says why in NetworkPolicyReady and a Warning event, and leaves the
    policy alone; once the name is free it applies its own and starts."""
    k = ApiServerKube(devcluster)
    monkeypatch.setattr(kube_module, "_shared", k)
    run = create_run(devcluster, api_namespace, "db")
    devcluster.kubectl(
        "create", "-f", "-", input=json.dumps(foreign_policy(api_namespace, "db-pods", []))
    )
    before = get_json(devcluster, "networkpolicy", "db-pods", "-n", api_namespace)

    assert asyncio.run(handlers.reconcile(api_namespace, "db", View(jobs=list))) == "wait"
    assert k.jobs == []
    status = get_json(devcluster, "fft", "db", "-n", api_namespace)["status"]
    ready = conditions(status)["NetworkPolicyReady"]
    assert (ready["status"], ready["reason"]) == ("False", "NotOwned")
    assert f"{api_namespace}/db-pods exists and is not owned by this run" in ready["message"]
    assert "wait until that name is free" in ready["message"]
    assert [r for r, _ in events].count("NetworkPolicyNotOwned") == 1
    after = get_json(devcluster, "networkpolicy", "db-pods", "-n", api_namespace)
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]

    devcluster.kubectl("delete", "networkpolicy", "db-pods", "-n", api_namespace, "--wait=true")
    assert asyncio.run(handlers.reconcile(api_namespace, "db", View(jobs=list))) == "wait"
    assert k.jobs == ["db-r0-aggregate"]
    status = get_json(devcluster, "fft", "db", "-n", api_namespace)["status"]
    assert conditions(status)["NetworkPolicyReady"]["status"] == "True"
    ours = get_json(devcluster, "networkpolicy", "db-pods", "-n", api_namespace)
    assert [o["uid"] for o in ours["metadata"]["ownerReferences"]] == [run["metadata"]["uid"]]
