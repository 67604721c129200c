"""The run's NetworkPolicy: its pods may reach DNS and their storage and data endpoints, and
nothing may reach them (docs/install.md, "Network policy").

A client pod holds one data owner's data; the policy is what keeps training code from sending it
anywhere else. A NetworkPolicy matches addresses, not host names, so an endpoint given by name is
confined to its port only; spec.networkPolicy.egress replaces the derived rules when a run knows
better (an in-cluster MinIO by namespace, a proxy).
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

from fedtune_operator.api import FederatedFineTuneSpec
from fedtune_operator.objects import drop_empty, job_name, owner_reference
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

IDENTITY_ENDPOINTS: tuple[dict[str, Any], ...] = (
    {"ipBlock": {"cidr": "169.254.169.254/32"}},  # GKE metadata server, EC2/Azure IMDS
    {"ipBlock": {"cidr": "169.254.170.23/32"}},  # EKS Pod Identity agent
    {"ipBlock": {"cidr": "fd00:ec2::23/128"}},  # the same, IPv6
)
"""Where a pod without a credentials Secret gets its ambient cloud identity (port 80)."""

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
        rules.append({"to": [dict(p) for p in IDENTITY_ENDPOINTS], "ports": _tcp(80)})
    return rules


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
