"""The Helm chart's values as models; chart_schema.py generates values.schema.json from them.

The models are the one place where a value's type, bounds and meaning are written, as the API
models are for the CRD. `values.yaml` stays the commented file people read and edit, and
tests/chart/test_values_schema.py holds the three in agreement: the models' defaults equal
values.yaml, every key is documented, and the committed schema is byte for byte what
chart_schema.py prints. `make crds` regenerates it with the CRD.

Helm validates the values after merging values.yaml under the user's, so the schema mainly
catches misspelt keys and wrong types by name. Cross-field rules (a ServiceMonitor needs the
metrics Service, ...) stay in templates/validate.yaml, where they fail with a sentence.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from pydantic.alias_generators import to_camel

DnsLabel = Annotated[
    str, StringConstraints(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
]
Port = Annotated[int, Field(ge=1, le=65535)]
Duration = Annotated[str, StringConstraints(pattern=r"^([0-9]+(ms|s|m|h))+$")]
"""A Prometheus duration such as 30s or 1m30s."""
Quantity = str | int | float
"""A Kubernetes resource quantity: "100m", "512Mi", or a plain number."""
Object = dict[str, Any]
"""Passed through to the Deployment unchanged; Kubernetes validates it."""


class Values(BaseModel):
    """Base of the value models: camelCase keys as in values.yaml, unknown keys refused, and no
    coercion ("8081" is not a port), so that the models accept exactly what the schema does."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        strict=True,
        frozen=True,
    )


class Image(Values):
    # `--set image.repository=null` removes the key before Helm validates; the templates cannot do
    # without it, so the schema requires it (the model's default covers every other case).
    model_config = ConfigDict(json_schema_extra={"required": ["repository"]})

    repository: str = Field(
        "ghcr.io/fedtune/operator",
        min_length=1,
        description="The operator image (operator/Dockerfile): `fedtune operator` and its Python "
        "dependencies, no torch. The training Jobs use a different image, named in each "
        "FederatedFineTune.",
    )
    tag: str = Field("", description="Defaults to the chart's appVersion.")
    digest: str = Field(
        "",
        pattern=r"^(sha256:[a-f0-9]{64})?$",
        description="sha256:... pins the image by digest; it wins over the tag when set.",
    )
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="The container's imagePullPolicy."
    )


class LocalObjectReference(Values):
    name: str = Field(min_length=1, description="The name of a Secret in the release namespace.")


class EnvVar(Values):
    name: str = Field(min_length=1, description="The variable's name.")
    value: str | None = Field(None, description="Its value.")
    value_from: Object | None = Field(None, description="Or a source (a Secret, ConfigMap, ...).")


class OperatorSettings(Values):
    liveness_port: Port = Field(
        8081,
        description="kopf's liveness endpoint, /healthz on this port; the liveness probe "
        "targets it.",
    )
    verbose: bool = Field(False, description="Debug logging (`fedtune operator --verbose`).")
    env: list[EnvVar] = Field(
        [],
        description="Extra environment variables of the operator container, e.g. "
        "FEDTUNE_RESYNC_SECONDS (how often every run is reconciled even when nothing happened; "
        "default 15).",
    )


class LivenessProbe(Values):
    initial_delay_seconds: int = Field(
        10, ge=0, description="Seconds before the first probe after the container starts."
    )
    period_seconds: int = Field(20, ge=1, description="Seconds between probes.")
    timeout_seconds: int = Field(5, ge=1, description="Seconds one probe may take.")
    failure_threshold: int = Field(
        3, ge=1, description="Failed probes in a row before the container is restarted."
    )


class Resources(Values):
    requests: dict[str, Quantity] = Field(
        {"cpu": "100m", "memory": "192Mi"}, description="What the scheduler reserves."
    )
    limits: dict[str, Quantity] = Field(
        {"memory": "512Mi"}, description="The most the container may use."
    )
    claims: list[Object] | None = Field(None, description="Dynamic resource claims (rarely used).")


class ServiceAccount(Values):
    create: bool = Field(
        True,
        description="Create the operator's ServiceAccount. With false, `name` must name an "
        "existing one (the chart's Roles are still bound to it when rbac.create is true).",
    )
    name: str = Field("", description="Defaults to the release's full name.")
    annotations: dict[str, str] = Field({}, description="Annotations of the ServiceAccount.")


class UserRoles(Values):
    create: bool = Field(
        True,
        description="The user-facing ClusterRoles fedtune-editor and fedtune-viewer. They are "
        "cluster-scoped with fixed names: when a second release of this chart runs in the same "
        "cluster, set this to false in one of them.",
    )
    aggregate_to_default_roles: bool = Field(
        True,
        description="Aggregate them into the built-in admin/edit and view ClusterRoles, so that "
        "whoever may edit (view) a namespace may edit (view) its FederatedFineTunes.",
    )


class Rbac(Values):
    create: bool = Field(
        True,
        description="The operator's own Roles/ClusterRoles and bindings (least privilege; no "
        "access to Secrets).",
    )
    user_roles: UserRoles = Field(UserRoles(), description="Roles for the people who run runs.")


class MetricsService(Values):
    enabled: bool = Field(False, description="A Service in front of the metrics port.")
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(
        "ClusterIP", description="The Service's type."
    )
    port: Port = Field(8080, description="The Service's port.")
    annotations: dict[str, str] = Field({}, description="Annotations of the Service.")


class ServiceMonitor(Values):
    enabled: bool = Field(
        False,
        description="A monitoring.coreos.com/v1 ServiceMonitor for the Prometheus Operator "
        "(needs its CRDs and metrics.service.enabled).",
    )
    interval: Duration = Field("30s", description="How often Prometheus scrapes.")
    scrape_timeout: Duration = Field("10s", description="How long one scrape may take.")
    labels: dict[str, str] = Field(
        {},
        description="Extra labels, e.g. the `release` label your Prometheus selects "
        "ServiceMonitors by.",
    )


class Metrics(Values):
    enabled: bool = Field(
        True,
        description="Prometheus metrics (fedtune_rounds_completed_total, "
        "fedtune_round_duration_seconds, ...) on :port/metrics. With false the operator serves "
        "none.",
    )
    port: Port = Field(8080, description="The container port of /metrics.")
    service: MetricsService = Field(MetricsService(), description="The metrics Service.")
    service_monitor: ServiceMonitor = Field(
        ServiceMonitor(), description="The Prometheus Operator's ServiceMonitor."
    )


Cidr = Annotated[str, StringConstraints(pattern=r"^[0-9A-Fa-f:.]+/[0-9]{1,3}$")]


class NetworkPolicy(Values):
    enabled: bool = Field(
        False,
        description="A NetworkPolicy for the operator pod: egress only to the API server, "
        "ingress only to the metrics port. Off by default because the chart cannot know the API "
        "server's addresses (apiServerCidrs is required when on), and it has effect only where "
        "the network plugin enforces NetworkPolicies.",
    )
    api_server_cidrs: list[Cidr] = Field(
        [],
        description="The API server's addresses as the pod's traffic reaches them, i.e. after "
        "the `kubernetes` Service is translated: the endpoints of `kubectl get endpointslices "
        "-n default -l kubernetes.io/service-name=kubernetes`, or the managed control plane's "
        "range.",
    )
    api_server_ports: list[Port] = Field(
        [443, 6443],
        description="The API server endpoints' ports (6443 with kubeadm, 443 on most managed "
        "clusters).",
    )
    metrics_from: list[Object] = Field(
        [{"namespaceSelector": {}}],
        description="NetworkPolicyPeers that may scrape the metrics port (default: every pod "
        "of every namespace; narrow it to your Prometheus). Empty: nobody.",
    )


ImageRule = Annotated[
    str,
    StringConstraints(
        max_length=512,
        pattern=r"^(sha256:[a-f0-9]{64}|[A-Za-z0-9][A-Za-z0-9._/:@-]*)$",
    ),
]
"""An entry of admission.allowedImages: `registry/path/` (a prefix: it ends with a slash),
`sha256:<digest>` (any image pinned by that digest), or an exact image reference."""
DnsSubdomain = Annotated[
    str,
    StringConstraints(
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
    ),
]
TolerationKey = Annotated[
    str,
    StringConstraints(
        min_length=1,
        max_length=317,
        pattern=r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
    ),
]


class Admission(Values):
    enabled: bool = Field(
        True,
        description="The chart's two ValidatingAdmissionPolicies (admissionregistration.k8s.io/v1, "
        "Kubernetes 1.30+): `<fullname>-runs` on the FederatedFineTunes people write, and "
        "`<fullname>-confinement` on what the operator's ServiceAccount creates "
        '(docs/install.md, "Admission").',
    )
    validation_actions: list[Literal["Deny", "Warn", "Audit"]] = Field(
        ["Deny"],
        min_length=1,
        json_schema_extra={"uniqueItems": True},
        description="What the bindings do with a refusal: Deny; or Warn and/or Audit, to see "
        "what the policies would refuse before enforcing them.",
    )
    check_requester: bool = Field(
        True,
        description="Refuse a run that makes the operator do what its author may not do "
        "themselves: an image other than the trainer's default, a serviceAccountName, a "
        "mounted token, env from Secrets or ConfigMaps, imagePullSecrets, a priorityClassName or "
        "a toleration of every taint need `create pods` in the namespace; every Secret the run "
        "names needs `get` on it, every pvc:// claim `get` on the claim. With false only the "
        "allowlists below apply.",
    )
    confine_operator: bool = Field(
        True,
        description="Confine the operator's ServiceAccount: the Jobs, NetworkPolicies and "
        "PersistentVolumeClaims it writes must carry the fedtune.dev labels, the Jobs' pods the "
        "restricted settings and an allowed image, and only in the namespaces it manages.",
    )
    allowed_images: list[ImageRule] = Field(
        [],
        description="Images the runs' pods may run, for everyone: `registry/path/` (a prefix, "
        "with its trailing slash), `sha256:<digest>` (any image pinned by that digest) or an "
        "exact reference. Empty: any image. The default trainer image is not implied: list it.",
    )
    allowed_service_accounts: list[DnsSubdomain] = Field(
        [],
        description="ServiceAccounts the runs' pods may run as (serviceAccountName). Empty: any "
        "(for whoever may create pods).",
    )
    allow_secret_env: bool = Field(
        True,
        description="Allow env[].valueFrom.secretKeyRef in the runs' pod settings. The "
        "credentials a run names in its own fields (storage, clients, signing, noise key) are "
        "not affected.",
    )
    allowed_priority_classes: list[DnsSubdomain] = Field(
        [],
        description="PriorityClasses spec.template.priorityClassName may name. Empty: any "
        "(for whoever may create pods).",
    )
    allowed_toleration_keys: list[TolerationKey] = Field(
        [],
        description="Taint keys the runs' pods may tolerate (e.g. nvidia.com/gpu); a toleration "
        "without a key (every taint) is then refused too. Empty: any.",
    )
    protected_namespaces: list[DnsLabel] = Field(
        ["kube-system", "kube-public", "kube-node-lease"],
        json_schema_extra={"uniqueItems": True},
        description="Cluster mode: namespaces where the operator's ServiceAccount may create "
        "nothing, even though its ClusterRole would let it. (Namespaced mode: only the "
        "watchNamespaces.)",
    )
    protect_release_namespace: bool = Field(
        True,
        description="Cluster mode: the release's own namespace is protected too (runs belong "
        "in other namespaces).",
    )

    @field_validator("validation_actions", "protected_namespaces")
    @classmethod
    def _unique(cls, items: list[str]) -> list[str]:
        if len(set(items)) != len(items):
            raise ValueError("lists an entry twice")
        return items

    @field_validator("validation_actions")
    @classmethod
    def _deny_or_warn(cls, actions: list[str]) -> list[str]:
        if {"Deny", "Warn"} <= set(actions):
            raise ValueError("Deny and Warn exclude each other (the API server refuses both)")
        return actions


_RESTRICTED_SECCOMP = {"type": "RuntimeDefault"}


class ChartValues(Values):
    """Every value of the fedtune-operator chart, with its default."""

    image: Image = Field(Image(), description="The operator's container image.")
    image_pull_secrets: list[LocalObjectReference] = Field(
        [], description="Secrets for pulling the operator image from a private registry."
    )
    name_override: str = Field(
        "", max_length=63, description="Replaces the chart's name in resource names."
    )
    fullname_override: str = Field(
        "", max_length=63, description="Replaces the release's full name in resource names."
    )
    mode: Literal["run", "site"] = Field(
        "run",
        description="run: the operator reconciles FederatedFineTunes (runs and their Jobs). "
        "site: it reconciles FederatedSites, this cluster's part in runs that live elsewhere, "
        "and needs no rights on FederatedFineTunes, NetworkPolicies or claims (docs/sites.md).",
    )
    watch_namespaces: list[DnsLabel] = Field(
        [],
        json_schema_extra={"uniqueItems": True},
        description="Namespaces the operator watches. Empty: the whole cluster (a ClusterRole "
        "and a ClusterRoleBinding). One or more: only those namespaces (a Role and a RoleBinding "
        "in each, the operator started with one `--namespace` per entry); the namespaces must "
        "exist before the install.",
    )
    operator: OperatorSettings = Field(
        OperatorSettings(), description="Settings of the operator process."
    )
    liveness_probe: LivenessProbe = Field(
        LivenessProbe(), description="The timing of the liveness probe."
    )
    resources: Resources = Field(Resources(), description="The operator container's resources.")
    pod_security_context: Object = Field(
        {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "seccompProfile": _RESTRICTED_SECCOMP,
        },
        description="Pod-level security context. The defaults satisfy the `restricted` Pod "
        "Security Standard; the image's user is 10001 (operator/Dockerfile).",
    )
    security_context: Object = Field(
        {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": _RESTRICTED_SECCOMP,
        },
        description="Container-level security context, also `restricted`-compliant. The root "
        "filesystem is read-only; /tmp is an emptyDir.",
    )
    tmp_size_limit: str = Field(
        "64Mi",
        pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|k|M|G)?$",
        description="Size limit of the emptyDir mounted at /tmp.",
    )
    service_account: ServiceAccount = Field(
        ServiceAccount(), description="The operator's ServiceAccount."
    )
    rbac: Rbac = Field(Rbac(), description="Roles and bindings the chart creates.")
    metrics: Metrics = Field(Metrics(), description="Prometheus metrics.")
    network_policy: NetworkPolicy = Field(
        NetworkPolicy(), description="The operator pod's own NetworkPolicy."
    )
    admission: Admission = Field(
        Admission(), description="Admission policies: who may make the operator do what."
    )
    pod_annotations: dict[str, str] = Field({}, description="Annotations of the operator pod.")
    pod_labels: dict[str, str] = Field({}, description="Extra labels of the operator pod.")
    priority_class_name: str = Field("", description="The operator pod's PriorityClass.")
    node_selector: dict[str, str] = Field({}, description="The operator pod's nodeSelector.")
    tolerations: list[Object] = Field([], description="The operator pod's tolerations.")
    affinity: Object = Field({}, description="The operator pod's affinity.")
    termination_grace_period_seconds: int = Field(
        30,
        ge=0,
        description="Time for kopf to stop its daemons and finish what it is writing on shutdown.",
    )
    global_: Object | None = Field(
        None, alias="global", description="Set by Helm for parent charts; unused here."
    )

    @field_validator("watch_namespaces")
    @classmethod
    def _distinct(cls, namespaces: list[str]) -> list[str]:
        if len(set(namespaces)) != len(namespaces):
            raise ValueError("watchNamespaces lists a namespace twice")
        return namespaces


def defaults() -> dict[str, Any]:
    """The defaults as values.yaml spells them (camelCase, unset optional keys left out)."""
    return ChartValues().model_dump(mode="json", by_alias=True, exclude_none=True)
