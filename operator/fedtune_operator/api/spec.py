"""The FederatedFineTune spec (fedtune.dev/v1alpha1) as pydantic models, with its CEL rules.

This is the single source of truth for the spec's defaults and validation. The CRD
(`crds/fedtune.dev_federatedfinetunes.yaml`) and the field reference (`docs/api.md`) are generated
from it by `fedtune_operator.crd`, and tests hold the three in agreement. The training, data,
delta, aggregation, privacy and evaluation settings are the Job contract's own models from
`fedtune_trainer.task`, reused here as they are, so that a default or a bound is written once.

Rules that span fields live beside the models they guard as CEL; `validation.py` checks the same
rules again in the operator (Helm never upgrades a CRD, so the installed schema may be older than
the operator).
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, model_validator

from fedtune_operator.api.schema import (
    DEFAULT_IMAGE,
    MAX_CLIENTS,
    MAX_ROUNDS,
    RESERVED_CLIENT_NAMES,
    AnnotationValue,
    DataUri,
    EndpointUri,
    EnvName,
    Image,
    LabelValue,
    ModelUri,
    ObjectName,
    QualifiedName,
    Quantity,
    SecretKey,
    StorageUri,
    bounded_str,
    cel,
    k8s_extensions,
    map_list,
)
from fedtune_trainer.contract import RESERVED_ENV_PREFIX, RESERVED_PREFIX
from fedtune_trainer.task import (
    AdapterSpec,
    AggregationSpec,
    ClientName,
    DataSpec,
    DeltaSpec,
    EvaluationSpec,
    Model,
    PrivacySpec,
    StorageLocation,
    TrainingSpec,
)

# --------------------------------------------------------------------------------------------
# Pod settings
# --------------------------------------------------------------------------------------------


class Resources(Model):
    """Compute resources of the trainer container, as in a Pod (`nvidia.com/gpu: 1` asks a GPU)."""

    limits: dict[QualifiedName, Quantity] | None = Field(
        None, max_length=32, description="Most the container may use, by resource name."
    )
    requests: dict[QualifiedName, Quantity] | None = Field(
        None, max_length=32, description="What the scheduler reserves, by resource name."
    )


class Toleration(Model):
    """A Pod toleration (core/v1 Toleration)."""

    key: QualifiedName | None = Field(None, description="Taint key; empty with Exists matches all.")
    operator: Literal["Exists", "Equal"] | None = Field(
        None, description="Equal (the Kubernetes default) or Exists."
    )
    value: LabelValue | None = Field(None, description="Taint value, for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Empty matches every effect."
    )
    toleration_seconds: int | None = Field(
        None, ge=0, le=2**31 - 1, description="How long a NoExecute taint is tolerated."
    )


class EnvVar(Model):
    """An environment variable of the trainer container (core/v1 EnvVar)."""

    name: EnvName = Field(description="Variable name.")
    value: Annotated[str, bounded_str(None, 32768, min_length=0)] | None = Field(
        None, description="Literal value."
    )
    value_from: dict[str, Any] | None = Field(
        None,
        description="A core/v1 EnvVarSource (secretKeyRef, configMapKeyRef, fieldRef, ...), "
        "checked by the API server when the Job is created.",
    )

    model_config = ConfigDict(
        json_schema_extra=k8s_extensions(
            cel(
                "!(has(self.value) && has(self.valueFrom))",
                "set value or valueFrom, not both",
                field_path=".valueFrom",
            )
        )
    )


class LocalObjectReference(Model):
    """A reference by name to an object in the run's namespace."""

    name: ObjectName = Field(description="Name of the object.")


_ENV_RULE = cel(
    f"self.all(e, !e.name.startsWith('{RESERVED_ENV_PREFIX}'))",
    f"names starting with {RESERVED_ENV_PREFIX} are reserved for the operator",
    reason="FieldValueForbidden",
)
_RESERVED_KEYS_RULE = cel(
    f"self.all(k, !k.startsWith('{RESERVED_PREFIX}'))",
    f"keys under {RESERVED_PREFIX} are reserved for the operator",
    reason="FieldValueForbidden",
)


class PodSettings(Model):
    """Pod settings that a client or the aggregator may override.

    A client's settings (and `spec.aggregator`'s) are merged over `spec.template`
    (see `merge_pod_settings`): `resources.limits`, `resources.requests` and `nodeSelector`
    key by key, `env` by name, `tolerations` appended; `affinity` and `serviceAccountName`
    replace the template's. Affinity and `env[].valueFrom` are kept as given
    (x-kubernetes-preserve-unknown-fields) and checked by the API server when the Job is created;
    the rest is a bounded subset of the core/v1 shapes, checked at admission.
    """

    resources: Resources | None = None
    node_selector: dict[QualifiedName, LabelValue] | None = Field(
        None, max_length=64, description="Node labels the pods must match."
    )
    tolerations: list[Toleration] | None = Field(
        None,
        max_length=32,
        description="Taints the pods tolerate.",
        json_schema_extra=k8s_extensions(list_type="atomic"),
    )
    affinity: dict[str, Any] | None = Field(
        None, description="A core/v1 Affinity (node, pod and anti-affinity)."
    )
    env: list[EnvVar] | None = Field(
        None,
        max_length=128,
        description="Extra environment variables of the trainer container.",
        json_schema_extra=map_list("name", _ENV_RULE),
    )
    service_account_name: ObjectName | None = Field(
        None, description="Service account of the Job's pods (e.g. for workload identity)."
    )


class PodTemplate(PodSettings):
    """The pod template shared by every Job of the run (clients and aggregator)."""

    image: Image = Field(DEFAULT_IMAGE, description="Trainer image; pin it by tag or digest.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="When the kubelet pulls the image."
    )
    image_pull_secrets: list[LocalObjectReference] | None = Field(
        None,
        max_length=16,
        description="Secrets for pulling the image from a private registry.",
        json_schema_extra=map_list("name"),
    )
    priority_class_name: ObjectName | None = Field(
        None, description="PriorityClass of the pods (preemption order on a busy cluster)."
    )
    labels: dict[QualifiedName, LabelValue] | None = Field(
        None,
        max_length=64,
        description="Copied to every Job and its pods, e.g. kueue.x-k8s.io/queue-name.",
        json_schema_extra=k8s_extensions(_RESERVED_KEYS_RULE),
    )
    annotations: dict[QualifiedName, AnnotationValue] | None = Field(
        None,
        max_length=64,
        description="Copied to every Job and its pods.",
        json_schema_extra=k8s_extensions(_RESERVED_KEYS_RULE),
    )
    automount_service_account_token: bool = Field(
        False,
        description="Mount the service account's API token into the pods. The trainer never "
        "talks to the Kubernetes API, so the default keeps the token out of reach of the "
        "training code. Turn it on only for a workload identity that reads that very token "
        "(e.g. a cloud SDK exchanging the standard token); EKS IRSA, GKE and Azure Workload "
        "Identity inject projected tokens of their own and need no mount.",
    )


# --------------------------------------------------------------------------------------------
# Storage, clients, evaluation
# --------------------------------------------------------------------------------------------


class S3Credentials(Model):
    """A Secret with S3 credentials, handed to Jobs as `env.valueFrom.secretKeyRef` only.

    The operator never reads it (and has no RBAC on Secrets); the Secret must live in the run's
    namespace.
    """

    name: ObjectName = Field(description="Name of the Secret.")
    access_key_id_key: SecretKey = Field(
        "AWS_ACCESS_KEY_ID", description="Key of the access key id in the Secret."
    )
    secret_access_key_key: SecretKey = Field(
        "AWS_SECRET_ACCESS_KEY", description="Key of the secret access key in the Secret."
    )


class StorageSpec(StorageLocation):
    """Where the run keeps its artifacts (docs/architecture.md, "Storage layout").

    Narrows the contract's `StorageLocation` to what the operator can deliver: a root whose keys
    are safe S3 keys, an http(s) endpoint, and adds the credentials and the retention policy.
    """

    uri: StorageUri = Field(
        description="The run's root: s3://bucket/prefix or file:///path. Segments use S3's safe "
        "characters and are never '.' or '..'."
    )
    endpoint: EndpointUri | None = Field(
        None, description="S3 endpoint override (MinIO, versitygw, ...); s3:// only."
    )
    credentials_secret: S3Credentials | None = Field(
        None,
        description="Credentials for the storage root. Without it Jobs use the pod's ambient "
        "identity (e.g. workload identity through serviceAccountName).",
    )
    cleanup_policy: Literal["Retain", "Delete"] = Field(
        "Retain",
        description="Delete removes everything under uri when the FederatedFineTune is deleted.",
    )

    model_config = ConfigDict(
        json_schema_extra=k8s_extensions(
            cel(
                "!(self.uri.startsWith('file://') && has(self.endpoint))",
                "endpoint applies to s3:// storage only",
                field_path=".endpoint",
            )
        )
    )

    def location(self) -> StorageLocation:
        """The part of the storage settings that goes into a Job's task."""
        return StorageLocation.model_validate(
            self.model_dump(include=set(StorageLocation.model_fields))
        )


class _ClientData(Model):
    """The client's own fields; a separate base only so that they come first in the schema."""

    name: ClientName = Field(description="The client's name, unique in the run.")
    data_uri: DataUri = Field(
        description="The client's jsonl file or prefix: s3://, file:// or pvc://<claim>/<path>."
    )
    weight: float = Field(
        1.0,
        gt=0,
        le=1e6,
        description="Relative weight of this client's delta in the averaging algorithms, "
        "multiplied with its sample count; median and trimmedMean ignore it.",
    )
    credentials_secret: S3Credentials | None = Field(
        None,
        description="Credentials for this client's data, read through spec.storage.endpoint; "
        "defaults to the storage credentials.",
    )


class ClientSpec(PodSettings, _ClientData):
    """One federated client: its data and, optionally, how its Job's pod differs from the template.

    The name becomes part of the client's Job name (`<run>-r<round>-<client>`), its label value
    and its storage keys, hence a DNS label of at most 40 characters.
    """


class _EvaluationData(EvaluationSpec):
    """Narrows the contract's `EvaluationSpec.dataUri` to the schemes the operator can deliver;
    a separate base only so that these fields come first in the schema."""

    data_uri: DataUri | None = Field(
        None, description="Held-out jsonl (s3://, file:// or pvc://), in spec.data.format."
    )


class Evaluation(PodSettings, _EvaluationData):
    """Held-out evaluation of the global adapter (none without dataUri).

    After every due round an evaluation Job of its own loads the base model with that round's
    adapter and reports the loss, while the next round's clients already train; the run succeeds
    once the last round's evaluation is in. Its pod settings override spec.template like a
    client's do (e.g. `resources.limits: {nvidia.com/gpu: 1}`).
    """

    def settings(self) -> EvaluationSpec:
        """The part of the evaluation settings that goes into the evaluation Job's task."""
        return EvaluationSpec.model_validate(
            self.model_dump(include=set(EvaluationSpec.model_fields))
        )


class ModelCache(Model):
    """Where client and evaluation Jobs keep the base model (and data) they download from s3://.

    Without a cache each Job downloads the whole base model into its pod's /tmp, once per client
    per round. The trainer's cache is keyed by the objects' ETags and sizes and filled
    atomically, so a volume that outlives the pod is reused safely.
    """

    mode: Literal["none", "perClient", "ephemeral"] = Field(
        "none",
        description="none: each pod downloads into its own /tmp. perClient: one "
        "PersistentVolumeClaim per client (<run>-cache-<client>) and one for the evaluation Jobs "
        "(<run>-cache-evaluate), created by the operator, deleted with the run; each client "
        "downloads the base model once per run. ephemeral: a generic ephemeral volume per pod, "
        "for disk space outside the node's ephemeral storage; nothing is reused across rounds. "
        "perClient and ephemeral need a StorageClass (storageClassName or the cluster's default); "
        "without one the pods stay Pending.",
    )
    size: Quantity = Field(
        "64Gi",
        description="Capacity of each volume: the base model plus the client's data, with "
        "room for a second version of the model while it changes. Claims that exist keep theirs.",
    )
    storage_class_name: ObjectName | None = Field(
        None, description="StorageClass of the volumes; the cluster's default when unset."
    )


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
        "address when a model is a hub id, and the cloud identity endpoints when no "
        "credentials Secret is given. Set it to confine storage to its real addresses or "
        "selectors (e.g. in-cluster MinIO).",
        json_schema_extra=k8s_extensions(list_type="atomic"),
    )


# --------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------

_SELECTED = (
    "(has(self.aggregation.clientsPerRound) ? self.aggregation.clientsPerRound "
    ": size(self.clients))"
)


class FederatedFineTuneSpec(Model):
    """The desired federated fine-tuning run.

    Each round the operator starts one Job per selected client; each trains the global LoRA
    adapter on its own data and uploads `delta = local - global`; once the quorum of deltas is
    in, the aggregator Job merges them into the next global adapter.
    """

    base_model: ModelUri = Field(
        description="The base model, an HF-format directory: s3://, file://, "
        "pvc://<claim>/<path>, or a hub id such as Qwen/Qwen2.5-0.5B. Immutable once started."
    )
    tokenizer: ModelUri | None = Field(
        None, description="Tokenizer location; defaults to baseModel. Immutable once started."
    )
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    rounds: int = Field(
        10, ge=1, le=MAX_ROUNDS, description="Federated rounds; may grow while the run is live."
    )
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    clients: list[ClientSpec] = Field(
        min_length=1,
        max_length=MAX_CLIENTS,
        description="The clients; the set of names is immutable once started.",
        json_schema_extra=map_list(
            "name",
            cel(
                "self.all(c, !(c.name in ["
                + ", ".join(f"'{n}'" for n in RESERVED_CLIENT_NAMES)
                + "]))",
                "client names "
                + " and ".join(RESERVED_CLIENT_NAMES)
                + " are reserved for the aggregator's and the evaluation's Jobs",
                reason="FieldValueForbidden",
            ),
        ),
    )
    aggregation: AggregationSpec = Field(
        default_factory=AggregationSpec,
        description="How the aggregator merges the deltas each round, which clients train in "
        "a round, and how long a round may take.",
        json_schema_extra=k8s_extensions(
            cel(
                "!(has(self.clientsPerRound) && has(self.clientFraction))",
                "set at most one of clientsPerRound and clientFraction",
            )
        ),
    )
    delta: DeltaSpec = Field(default_factory=DeltaSpec)
    privacy: PrivacySpec = Field(
        default_factory=PrivacySpec,
        json_schema_extra=k8s_extensions(
            cel(
                "!has(self.noiseMultiplier) || self.noiseMultiplier == 0.0 || has(self.clipNorm)",
                "noiseMultiplier > 0 needs clipNorm",
                field_path=".clipNorm",
                reason="FieldValueRequired",
            )
        ),
    )
    evaluation: Evaluation = Field(default_factory=Evaluation)
    model_cache: ModelCache = Field(default_factory=ModelCache)
    storage: StorageSpec
    template: PodTemplate = Field(default_factory=PodTemplate)
    aggregator: PodSettings | None = Field(
        None, description="Overrides of spec.template for the aggregator Job."
    )
    network_policy: NetworkPolicySpec = Field(default_factory=NetworkPolicySpec)
    backoff_limit: int = Field(
        2, ge=0, le=100, description="Pod retries of each Job before it counts as failed."
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, le=30 * 24 * 3600, description="Wall-clock limit of each Job."
    )
    suspend: bool = Field(
        False,
        description="Suspends the run: running Jobs are suspended and no new round starts "
        "until it is false again (condition Suspended).",
    )
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        le=365 * 24 * 3600,
        description="Job-like: delete the FederatedFineTune (and so its Jobs) this long after it "
        "succeeds or fails. Stored artifacts follow storage.cleanupPolicy.",
    )

    model_config = ConfigDict(
        json_schema_extra=k8s_extensions(
            cel(
                "!has(self.aggregation.clientsPerRound) "
                "|| self.aggregation.clientsPerRound <= size(self.clients)",
                "clientsPerRound must not exceed the number of clients",
                field_path=".aggregation.clientsPerRound",
            ),
            cel(
                f"!has(self.aggregation.minClients) || self.aggregation.minClients <= {_SELECTED}",
                "minClients must not exceed the clients selected per round",
                field_path=".aggregation.minClients",
            ),
            cel(
                "!has(self.aggregation.minClients) || !has(self.aggregation.clientFraction) "
                "|| self.aggregation.minClients == 1 || double(self.aggregation.minClients - 1) "
                "< self.aggregation.clientFraction * double(size(self.clients)) - 1e-9",
                "minClients must not exceed the clients selected per round (clientFraction x "
                "clients, rounded up)",
                field_path=".aggregation.minClients",
            ),
        )
    )


# --------------------------------------------------------------------------------------------
# Rules on the whole object: the run's name, and what may not change once a run has started.
# --------------------------------------------------------------------------------------------

STARTED_CEL = (
    "has(oldSelf.status) && (has(oldSelf.status.startTime) "
    "|| (has(oldSelf.status.currentRound) && oldSelf.status.currentRound > 0))"
)
"""A run has started once the operator set status.startTime (or is past round 0)."""


def _immutable(expr_new: str, expr_old: str, path: str) -> dict[str, str]:
    return cel(
        f"!({STARTED_CEL}) || {expr_new} == {expr_old}",
        f"{path} is immutable once the run has started",
        field_path=f".{path}",
        reason="FieldValueForbidden",
    )


IMMUTABLE_ONCE_STARTED = (
    "spec.baseModel",
    "spec.tokenizer",
    "spec.adapter",
    "spec.storage.uri",
    "spec.clients[*].name",
)

ROOT_RULES: tuple[dict[str, str], ...] = (
    _immutable("self.spec.baseModel", "oldSelf.spec.baseModel", "spec.baseModel"),
    _immutable(
        "(has(self.spec.tokenizer) ? self.spec.tokenizer : '')",
        "(has(oldSelf.spec.tokenizer) ? oldSelf.spec.tokenizer : '')",
        "spec.tokenizer",
    ),
    _immutable("self.spec.adapter", "oldSelf.spec.adapter", "spec.adapter"),
    _immutable("self.spec.storage.uri", "oldSelf.spec.storage.uri", "spec.storage.uri"),
    cel(
        f"!({STARTED_CEL}) || "
        "self.spec.clients.map(c, c.name) == oldSelf.spec.clients.map(c, c.name)",
        "the client names (in order) are immutable once the run has started",
        field_path=".spec.clients",
        reason="FieldValueForbidden",
    ),
    cel(
        "!has(oldSelf.status) || !has(oldSelf.status.currentRound) "
        "|| self.spec.rounds >= oldSelf.status.currentRound",
        "spec.rounds cannot go below status.currentRound",
        field_path=".spec.rounds",
    ),
)
"""CEL rules on the whole object (the CRD's root schema). `immutable_changes` mirrors them."""
