"""The run's NetworkPolicy: its pods may reach DNS and their storage and data endpoints, and
nothing may reach them (docs/install.md, "Network policies").

A client pod holds one data owner's data; the policy is what keeps training code from sending it
anywhere else. A NetworkPolicy matches addresses, not host names, so an endpoint given by name is
confined to its port only, which the run's EgressUnconfined condition says;
spec.networkPolicy.egress replaces the derived rules when a run knows better (an in-cluster MinIO
by namespace, a proxy). The instance metadata service is closed unless the run opts in.
`settle` records in the run's status what applying the policy came to (NetworkPolicyReady).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from fedtune_operator.api import (
    EGRESS_UNCONFINED,
    NETWORK_POLICY_READY,
    ConditionStatus,
    FederatedFineTuneSpec,
)
from fedtune_operator.decision import (
    CreateAggregateJob,
    CreateClientJob,
    CreateEvaluateJob,
    Decision,
    Event,
)
from fedtune_operator.objects import drop_empty, job_name, owner_reference
from fedtune_operator.status_updates import get_condition, set_condition
from fedtune_operator.volumes import all_local
from fedtune_trainer.wire.contract import LABEL_RUN

ANY_ADDRESS: tuple[dict[str, Any], ...] = (
    {"ipBlock": {"cidr": "0.0.0.0/0"}},
    {"ipBlock": {"cidr": "::/0"}},
)
"""What a rule must say when the destination is a host name: a NetworkPolicy matches addresses."""

DEFAULT_DNS_PEERS: tuple[dict[str, Any], ...] = (
    {"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}},
)
"""CoreDNS and kube-dns carry k8s-app=kube-dns on kubeadm, EKS, GKE and AKS alike."""

POD_IDENTITY_ENDPOINTS: tuple[dict[str, Any], ...] = (
    {"ipBlock": {"cidr": "169.254.170.23/32"}},  # EKS Pod Identity agent
    {"ipBlock": {"cidr": "fd00:ec2::23/128"}},  # the same, IPv6
)
"""Where a pod without a credentials Secret gets its own cloud identity (port 80): the agent
hands out the role associated with the pod's ServiceAccount, never the node's."""

INSTANCE_METADATA: tuple[dict[str, Any], ...] = (
    {"ipBlock": {"cidr": "169.254.169.254/32"}},  # EC2/Azure IMDS, GKE metadata server
    {"ipBlock": {"cidr": "fd00:ec2::254/128"}},  # EC2 IMDS, IPv6
)
"""The instance metadata service (port 80): on most clouds the node's own role, so closed
unless spec.networkPolicy.allowInstanceMetadata opens it."""

HUB_PORT = 443


def network_policy_name(run: str) -> str:
    return job_name(run, None, "pods")


def _tcp(port: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": port}]


def storage_port(endpoint: str | None) -> int:
    """The port the S3 client connects to: the endpoint's, else its scheme's (AWS S3: 443)."""
    if endpoint is None:
        return 443
    parts = urlsplit(endpoint)
    return parts.port or (443 if parts.scheme == "https" else 80)


def storage_peers(endpoint: str | None) -> list[dict[str, Any]]:
    """An endpoint written as an IP address is that address alone; a host name could resolve to
    anything, so it can only be any address (on the storage port)."""
    host = urlsplit(endpoint).hostname if endpoint else None
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return [dict(p) for p in ANY_ADDRESS]
    return [{"ipBlock": {"cidr": f"{address}/{address.max_prefixlen}"}}]


def _uses_s3(spec: FederatedFineTuneSpec) -> bool:
    uris = [
        spec.storage.uri,
        spec.base_model,
        spec.tokenizer,
        spec.evaluation.data_uri,
        *(c.data_uri for c in spec.clients),
    ]
    return any(u and u.startswith("s3://") for u in uris)


def _uses_hub(spec: FederatedFineTuneSpec) -> bool:
    return not all_local((spec.base_model, spec.tokenizer))


def _uses_ambient_identity(spec: FederatedFineTuneSpec) -> bool:
    """A client without a data Secret falls back to the storage Secret; only when that is
    missing too does a pod need the cloud's identity endpoint."""
    return _uses_s3(spec) and spec.storage.credentials_secret is None


def derived_egress(spec: FederatedFineTuneSpec) -> list[dict[str, Any]]:
    """The destinations a run needs, from its URIs, endpoint and credentials; spec.networkPolicy.
    egress replaces them. Every S3 URI (model, data, storage) is read through one endpoint."""
    rules: list[dict[str, Any]] = []
    if _uses_s3(spec):
        rules.append(
            {
                "to": storage_peers(spec.storage.endpoint),
                "ports": _tcp(storage_port(spec.storage.endpoint)),
            }
        )
    if _uses_hub(spec):
        rules.append({"to": [dict(p) for p in ANY_ADDRESS], "ports": _tcp(HUB_PORT)})
    if _uses_ambient_identity(spec):
        rules.append({"to": [dict(p) for p in POD_IDENTITY_ENDPOINTS], "ports": _tcp(80)})
    return rules


def unconfined_egress(spec: FederatedFineTuneSpec) -> list[str]:
    """Why the run's policy lets its pods reach any address (on one port), one line per derived
    rule that does; empty when every destination is confined (an IP-literal endpoint, explicit
    spec.networkPolicy.egress, no network needed) or the operator creates no policy.

    A NetworkPolicy cannot name a host, so an endpoint given by name (or AWS S3, or the hub) is
    open to every address on its port: an exfiltration path that the run says so about, in its
    EgressUnconfined condition, rather than silently."""
    settings = spec.network_policy
    if not settings.enabled or settings.egress is not None:
        return []
    reasons = []
    if _uses_s3(spec) and storage_peers(spec.storage.endpoint) == list(ANY_ADDRESS):
        port = storage_port(spec.storage.endpoint)
        where = (
            f"spec.storage.endpoint {urlsplit(spec.storage.endpoint).hostname} is a host name"
            if spec.storage.endpoint
            else "storage is AWS S3 (no spec.storage.endpoint)"
        )
        reasons.append(f"{where}: TCP {port} to any address")
    if _uses_hub(spec):
        reasons.append(f"a model is a hub id: TCP {HUB_PORT} to any address")
    return reasons


def network_policy(*, run: str, namespace: str, uid: str, spec: FederatedFineTuneSpec) -> dict:
    """The NetworkPolicy of every pod of the run (they all carry LABEL_RUN, which a spec cannot
    set: its labels may not use the fedtune.dev/ prefix): no ingress, and egress to DNS plus
    `derived_egress` or spec.networkPolicy.egress.

    Owned by the run, so the garbage collector deletes it with the run. The cleanup Job runs
    while the run's finalizer holds the run, so with the default (background) deletion the
    policy still covers it; the operator applies it again before creating that Job.
    """
    settings = spec.network_policy
    dns = (
        [p.model_dump(mode="json", by_alias=True, exclude_none=True) for p in settings.dns]
        if settings.dns is not None
        else [dict(p) for p in DEFAULT_DNS_PEERS]
    )
    egress = [
        {"to": dns, "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
    ]
    if settings.egress is not None:
        egress += [
            r.model_dump(mode="json", by_alias=True, exclude_none=True) for r in settings.egress
        ]
    else:
        egress += derived_egress(spec)
    if settings.allow_instance_metadata:
        egress.append({"to": [dict(p) for p in INSTANCE_METADATA], "ports": _tcp(80)})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": drop_empty(
            {
                "name": network_policy_name(run),
                "namespace": namespace,
                "labels": {LABEL_RUN: run},
                "ownerReferences": [owner_reference(run, uid)] if uid else None,
            }
        ),
        "spec": {
            "podSelector": {"matchLabels": {LABEL_RUN: run}},
            # Ingress listed with no rules: nothing may connect to the pods.
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": egress,
        },
    }


def in_place(stored: Mapping[str, Any] | None, manifest: Mapping[str, Any]) -> bool:
    """Whether the policy as the operator's watch last saw it (`compact_policy`) is already the
    manifest, owned by the run: then applying it again would change nothing, and the request
    (one of the few on the path from a finished Job to the next) is skipped. Anything else
    (none seen, another owner, being deleted, a rule changed by the spec or by someone's edit)
    means apply. Empty lists count as absent, as the API server stores them."""
    if stored is None or stored.get("deleting"):
        return False
    meta = manifest["metadata"]
    owners = [ref["uid"] for ref in meta.get("ownerReferences") or []]
    return (
        stored.get("owners") == owners
        and stored.get("labels") == (meta.get("labels") or {})
        and _without_empty_lists(stored.get("spec")) == _without_empty_lists(manifest["spec"])
    )


def _without_empty_lists(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _without_empty_lists(v) for k, v in value.items() if v != []}
    if isinstance(value, list):
        return [_without_empty_lists(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# What the status says about the policy
# ---------------------------------------------------------------------------------------------

CREATES_PODS = (CreateClientJob, CreateAggregateJob, CreateEvaluateJob)
"""The actions whose Jobs make pods: the policy must be in place before any of them."""

CONFINE_HINT = 'confine it with spec.networkPolicy.egress (docs/install.md, "Network policies")'


def creates_pods(decided: Decision) -> bool:
    return any(isinstance(a, CREATES_PODS) for a in decided.actions)


def settle(
    decided: Decision,
    run: str,
    spec: FederatedFineTuneSpec,
    *,
    applied: bool,
    refused: str | None,
    now: dt.datetime,
    generation: int,
) -> Decision:
    """The engine's decision with what the run's NetworkPolicy came to, before it is written.

    `applied`: the policy was created or brought up to date this pass (the shell applies it
    only when the decision creates pods). `refused`: a policy of the run's policy name exists
    that the run does not own; the shell never patches or deletes it, and the run creates no
    pod until the name is free: its Jobs are held back (other actions go on), the
    NetworkPolicyReady condition turns False with `refused`, and a Warning event says so once.
    A run whose policy is later applied turns it True again. This waits rather than fails: the
    usual owner of such a policy is a deleted run of the same name that the garbage collector
    has not removed yet.

    EgressUnconfined says, on every pass of an unfinished run, whether the derived egress opens
    a port to any address (`unconfined_egress`), with a Warning event when it turns True or its
    reasons change.
    """
    if decided.status.phase in ("Succeeded", "Failed"):
        return decided
    now = now.replace(microsecond=0)
    conditions = list(decided.status.conditions)
    events = list(decided.events)
    actions = list(decided.actions)

    def set_(type_: str, status: ConditionStatus, reason: str, message: str) -> None:
        nonlocal conditions
        conditions = set_condition(conditions, type_, status, reason, message, now, generation)

    ready = get_condition(conditions, NETWORK_POLICY_READY)
    name = f"NetworkPolicy {network_policy_name(run)}"
    if refused is not None:
        actions = [a for a in actions if not isinstance(a, CREATES_PODS)]
        message = (
            f"{refused}: the run's Jobs wait until that name is free (it is never patched or "
            "deleted; spec.networkPolicy.enabled: false runs them without a policy)"
        )
        if ready is None or (ready.status, ready.message) != ("False", message):
            events.append(Event("Warning", "NetworkPolicyNotOwned", message[:250]))
        set_(NETWORK_POLICY_READY, "False", "NotOwned", message)
    elif applied:
        if ready is not None and ready.status == "False":
            events.append(Event("Normal", "NetworkPolicyApplied", f"applied {name}"))
        set_(NETWORK_POLICY_READY, "True", "Applied", f"{name} confines the run's pods")

    old = get_condition(conditions, EGRESS_UNCONFINED)
    if not spec.network_policy.enabled:
        set_(
            EGRESS_UNCONFINED,
            "Unknown",
            "NetworkPolicyDisabled",
            "spec.networkPolicy.enabled is false: the operator makes no NetworkPolicy",
        )
    elif reasons := unconfined_egress(spec):
        message = f"{'; '.join(reasons)}; {CONFINE_HINT}"
        if old is None or (old.status, old.message) != ("True", message):
            events.append(Event("Warning", "EgressUnconfined", message[:250]))
        set_(EGRESS_UNCONFINED, "True", "AnyAddress", message)
    else:
        set_(EGRESS_UNCONFINED, "False", "Confined", "every egress rule names its destinations")

    status = decided.status.model_copy(update={"conditions": conditions})
    return dataclasses.replace(decided, status=status, actions=actions, events=events)
