"""spec.networkPolicy: the egress a run's pods are allowed, as NetworkPolicy peers and ports
(the policy itself is built by fedtune_operator.network_policy).
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, model_validator

from fedtune_operator.api.schema import (
    bounded_str,
    cel,
    k8s_extensions,
)
from fedtune_trainer.wire.settings import Model

# --------------------------------------------------------------------------------------------
# Network policy
# --------------------------------------------------------------------------------------------


def _cidr(value: str) -> str:
    ipaddress.ip_network(value, strict=False)
    return value


_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
CIDR_PATTERN = (
    rf"^({_OCTET}\.){{3}}{_OCTET}/(3[0-2]|[12]?[0-9])$"
    r"|^[0-9A-Fa-f:]*:[0-9A-Fa-f:.]*/(12[0-8]|1[01][0-9]|[1-9]?[0-9])$"
)
"""An IPv4 CIDR exactly; an IPv6 one roughly (the operator parses it fully, since Kubernetes 1.29
CEL has no isCIDR)."""
Cidr = Annotated[str, bounded_str(CIDR_PATTERN, 64), AfterValidator(_cidr)]


class IPBlock(Model):
    """A range of addresses (networking/v1 IPBlock)."""

    cidr: Cidr = Field(description="The range, e.g. 10.20.0.0/16 or 2001:db8::/64.")


class NetworkPolicyPeer(Model):
    """Where pods may connect to (networking/v1 NetworkPolicyPeer): an address range, or pods
    chosen by namespace and pod labels. A NetworkPolicy cannot name a host: an S3 endpoint
    outside the cluster is an ipBlock, an in-cluster one (MinIO) is best given by selectors."""

    ip_block: IPBlock | None = Field(None, description="An address range.")
    namespace_selector: dict[str, Any] | None = Field(
        None,
        description="A metav1 LabelSelector over namespaces ({} matches all); checked by the "
        "API server when the NetworkPolicy is created.",
    )
    pod_selector: dict[str, Any] | None = Field(
        None,
        description="A metav1 LabelSelector over pods (in the run's namespace unless "
        "namespaceSelector is set).",
    )

    model_config = ConfigDict(
        json_schema_extra=k8s_extensions(
            cel(
                "has(self.ipBlock) != (has(self.namespaceSelector) || has(self.podSelector))",
                "set ipBlock, or namespaceSelector and/or podSelector",
            )
        )
    )

    @model_validator(mode="after")
    def _one_kind(self) -> NetworkPolicyPeer:
        """The CEL rule again, for a CRD older than the operator."""
        if (self.ip_block is not None) == (
            self.namespace_selector is not None or self.pod_selector is not None
        ):
            raise ValueError("set ipBlock, or namespaceSelector and/or podSelector")
        return self


class NetworkPolicyPort(Model):
    """A port, or a range of ports, of one protocol (networking/v1 NetworkPolicyPort)."""

    protocol: Literal["TCP", "UDP", "SCTP"] = Field("TCP", description="The protocol.")
    port: int = Field(ge=1, le=65535, description="The port (the pod's port, not a Service's).")
    end_port: int | None = Field(
        None, ge=1, le=65535, description="Last port of a range starting at port."
    )

    model_config = ConfigDict(
        json_schema_extra=k8s_extensions(
            cel(
                "!has(self.endPort) || self.endPort >= self.port",
                "endPort must not be below port",
                field_path=".endPort",
            )
        )
    )

    @model_validator(mode="after")
    def _range(self) -> NetworkPolicyPort:
        """The CEL rule again, for a CRD older than the operator."""
        if self.end_port is not None and self.end_port < self.port:
            raise ValueError("endPort must not be below port")
        return self


class EgressRule(Model):
    """Connections the run's pods may open: to any of `to`, on any of `ports`."""

    to: list[NetworkPolicyPeer] = Field(
        min_length=1,
        max_length=32,
        description="Destinations; required, so that a rule never opens every address by "
        "omission (write ipBlock 0.0.0.0/0 to mean anywhere).",
        json_schema_extra=k8s_extensions(list_type="atomic"),
    )
    ports: list[NetworkPolicyPort] = Field(
        min_length=1,
        max_length=32,
        description="Destination ports; required for the same reason.",
        json_schema_extra=k8s_extensions(list_type="atomic"),
    )


class NetworkPolicySpec(Model):
    """The NetworkPolicy the operator creates for the run's pods (docs/install.md, "Network
    policy"): no ingress at all, and egress only to DNS and to where the run's data and
    artifacts live, so that training code cannot send a data owner's data anywhere else. It is
    enforced only where the cluster's network plugin enforces NetworkPolicies; elsewhere it is
    created and has no effect.
    """

    enabled: bool = Field(
        True,
        description="Create the NetworkPolicy (owned by the run, deleted with it). Turning it "
        "off after the run started leaves the existing one in place.",
    )
    allow_instance_metadata: bool = Field(
        False,
        description="Also allow TCP 80 to the instance metadata service (169.254.169.254, "
        "fd00:ec2::254), which on most clouds hands out the node's own role; only for pods "
        "whose ambient identity comes from there (GKE Workload Identity's metadata server, "
        "EC2 instance roles). Off: a pod without a credentials Secret reaches only the EKS Pod "
        "Identity agent.",
    )
    dns: list[NetworkPolicyPeer] | None = Field(
        None,
        max_length=32,
        description="Where the DNS servers are (port 53, UDP and TCP); default: pods labelled "
        "k8s-app=kube-dns in any namespace (CoreDNS and kube-dns). NodeLocal DNSCache needs its "
        "link-local address here as an ipBlock.",
        json_schema_extra=k8s_extensions(list_type="atomic"),
    )
    egress: list[EgressRule] | None = Field(
        None,
        max_length=32,
        description="Every other destination of the run's pods, replacing the derived ones: by "
        "default the storage endpoint's port (an IP literal endpoint: that address only; a host "
        "name or AWS S3: any address, since a NetworkPolicy cannot name a host), TCP 443 to any "
        "address when a model is a hub id, and the EKS Pod Identity agent when no credentials "
        "Secret is given. Set it to confine storage to its real addresses or selectors (e.g. "
        "in-cluster MinIO); a run left open to any address says so in its EgressUnconfined "
        "condition.",
        json_schema_extra=k8s_extensions(list_type="atomic"),
    )
