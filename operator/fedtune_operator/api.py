"""The `FederatedFineTune` API (fedtune.dev/v1alpha1): spec and status as pydantic models.

This module is the single source of truth for the API's defaults and validation. The CRD
(`crds/fedtune.dev_federatedfinetunes.yaml`) and the field reference (`docs/api.md`) are generated
from it by `fedtune_operator.crd`, and tests hold the three in agreement. The training, data, delta,
aggregation, privacy and evaluation settings are the Job contract's own models from
`fedtune_trainer.task`, reused here as they are, so that a default or a bound is written once.

Validation happens in two layers, both pure:

* `parse_spec` checks shape: types, bounds, patterns, enums and the per-object rules of the shared
  settings models. The CRD schema enforces the same at admission.
* `validate_spec` checks the rules that span fields (quorum against the client count, a storage
  endpoint on a `file://` root, reserved names, ...). Most of them are CEL rules in the CRD too, but
  the operator checks again: Helm never upgrades a CRD, so the installed schema may be older than
  the operator, and a few rules are deliberately left to the operator (see `validate_spec`).

No I/O and no clock reads here: time comes in as an argument.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
)

from fedtune_trainer.task import (
    AdapterSpec,
    AggregateTask,
    AggregationSpec,
    ClientName,
    DataSpec,
    DeltaSpec,
    EvaluationSpec,
    Model,
    PrivacySpec,
    StorageLocation,
    TrainingSpec,
    Uri,
)

# --------------------------------------------------------------------------------------------
# Names (design.md, "Names")
# --------------------------------------------------------------------------------------------

GROUP = "fedtune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FederatedFineTune"
PLURAL = "federatedfinetunes"
SINGULAR = "federatedfinetune"
SHORT_NAMES = ("fft",)
CATEGORIES = ("fedtune",)

TRAINER_VERSION = "0.1.0"
"""The trainer image tag the operator defaults to; a test keeps it equal to the package version."""
DEFAULT_IMAGE = f"ghcr.io/fedtune/trainer:{TRAINER_VERSION}"

RESERVED_PREFIX = f"{GROUP}/"
"""Label and annotation keys under this prefix belong to the operator (run, round, role, client)."""
RESERVED_ENV_PREFIX = "FEDTUNE_"
"""Environment variables the operator sets in every Job (the task among them) start with this."""
AWS_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
"""What the storage credentials become inside a Job (the trainer's store reads them)."""

HISTORY_LIMIT = 50
"""Rounds kept in `status.history`: the oldest go first; the full record is the run report."""


def _bound(model: type[Model], field: str, attribute: str) -> Any:
    """One bound of a field of a contract model, so that the API reuses it instead of copying it."""
    for constraint in model.model_fields[field].metadata:
        if (value := getattr(constraint, attribute, None)) is not None:
            return value
    raise LookupError(f"{model.__name__}.{field} has no {attribute} bound")


MAX_ROUNDS: int = _bound(AggregateTask, "rounds", "le")
MAX_CLIENTS: int = _bound(AggregateTask, "clients", "max_length")

# --------------------------------------------------------------------------------------------
# Patterns. Each is valid for pydantic (Rust regex), for the CRD's `pattern` and for CEL
# `matches()` (both RE2), so one string serves all three.
# --------------------------------------------------------------------------------------------

DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS_SUBDOMAIN = rf"{DNS_LABEL}(\.{DNS_LABEL})*"
RUN_NAME_PATTERN = rf"^{DNS_LABEL}$"
RUN_NAME_MAX = 63
"""A run's name is the value of the `fedtune.dev/run` label on every child, so it is a DNS label."""

_BUCKET = r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"
# A key segment the operator builds keys under: S3's "safe" characters, never "." or "..".
_SAFE_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9_.()!*'-]*"
# A segment of an existing object the user points at (data, model): anything but "/" and blanks,
# still never "." or "..".
_SEGMENT = r"[A-Za-z0-9_][^/\s]*"
_CLAIM = r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?"

_S3 = rf"s3://{_BUCKET}(/{_SEGMENT})*/?"
_FILE = rf"file://(/{_SEGMENT})+/?"
_HUB_ID = r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?"

STORAGE_URI_PATTERN = rf"^(s3://{_BUCKET}(/{_SAFE_SEGMENT})*/?|file://(/{_SAFE_SEGMENT})+/?)$"
DATA_URI_PATTERN = rf"^({_S3}|{_FILE}|pvc://{_CLAIM}(/{_SEGMENT})*/?)$"
MODEL_URI_PATTERN = rf"^({_S3}|{_FILE}|pvc://{_CLAIM}(/{_SEGMENT})+/?|{_HUB_ID})$"
ENDPOINT_PATTERN = r"^https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?(/[^\s]*)?$"
QUALIFIED_NAME_PATTERN = rf"^({DNS_SUBDOMAIN}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$"
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
IMAGE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$"
_DECIMAL = r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
QUANTITY_PATTERN = rf"^{_DECIMAL}(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?{_DECIMAL}))?$"
CONDITION_TYPE_PATTERN = rf"^({DNS_SUBDOMAIN}/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"


_DNS_LABEL_HINT = (
    "must be a DNS label: lowercase letters, digits and '-', starting and ending with a letter "
    "or digit"
)
PATTERN_HINTS: dict[str, str] = {
    RUN_NAME_PATTERN: _DNS_LABEL_HINT,
    STORAGE_URI_PATTERN: "must be s3://<bucket>/<prefix> or file:///<path>, every segment made "
    "of S3-safe characters (letters, digits and _ . ( ) ! * ' -) and neither '.' nor '..'",
    DATA_URI_PATTERN: "must be s3://<bucket>/<key>, file:///<path> or pvc://<claim>/<path>",
    MODEL_URI_PATTERN: "must be s3://<bucket>/<prefix>, file:///<path>, pvc://<claim>/<path> "
    "or a hub id such as org/name",
    ENDPOINT_PATTERN: "must be an http:// or https:// URL",
    f"^{DNS_SUBDOMAIN}$": "must be a DNS subdomain: lowercase letters, digits, '-' and '.'",
    SECRET_KEY_PATTERN: "must consist of letters, digits, '-', '_' and '.'",
    QUALIFIED_NAME_PATTERN: "must be a qualified name such as example.com/name, the name at "
    "most 63 letters, digits, '-', '_' or '.'",
    LABEL_VALUE_PATTERN: "must be a label value: at most 63 letters, digits, '-', '_' or '.', "
    "starting and ending with a letter or digit",
    ENV_NAME_PATTERN: "must consist of letters, digits, '-', '_' and '.', not starting with a "
    "digit",
    IMAGE_PATTERN: "must be an image reference such as ghcr.io/org/image:tag",
}
"""What a pattern means, for messages people can act on (the CRD shows the pattern itself)."""


def _str(pattern: str | None = None, max_length: int = 253, min_length: int = 1) -> Any:
    return StringConstraints(min_length=min_length or None, max_length=max_length, pattern=pattern)


StorageUri = Annotated[str, _str(STORAGE_URI_PATTERN, 1024)]
DataUri = Annotated[str, _str(DATA_URI_PATTERN, 1024)]
ModelUri = Annotated[str, _str(MODEL_URI_PATTERN, 1024)]
EndpointUri = Annotated[str, _str(ENDPOINT_PATTERN, 1024)]
ObjectName = Annotated[str, _str(f"^{DNS_SUBDOMAIN}$", 253)]
SecretKey = Annotated[str, _str(SECRET_KEY_PATTERN, 253)]
QualifiedName = Annotated[str, _str(QUALIFIED_NAME_PATTERN, 317)]
LabelValue = Annotated[str, _str(LABEL_VALUE_PATTERN, 63, min_length=0)]
AnnotationValue = Annotated[str, _str(None, 4096, min_length=0)]
EnvName = Annotated[str, _str(ENV_NAME_PATTERN, 256)]
Image = Annotated[str, _str(IMAGE_PATTERN, 512)]


def _quantity(value: Any) -> int | str:
    """One check with one message, where `int | str` would report a failure per branch."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and len(value) <= 64 and re.match(QUANTITY_PATTERN, value):
        return value
    raise ValueError("must be a Kubernetes quantity such as 4, '500m' or '16Gi'")


Quantity = Annotated[
    int | str,
    PlainValidator(_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-int-or-string": True,
            "minimum": 0,
            "maxLength": 64,
            "pattern": QUANTITY_PATTERN,
            "description": "A Kubernetes quantity: 4, 500m, 16Gi.",
        }
    ),
]


def _utc_seconds(value: datetime) -> datetime:
    """metav1.Time semantics: UTC, whole seconds. A naive time is a bug in the caller."""
    if value.tzinfo is None:
        raise ValueError("a timestamp needs a time zone")
    return value.astimezone(UTC).replace(microsecond=0)


Timestamp = Annotated[
    datetime,
    AfterValidator(_utc_seconds),
    PlainSerializer(lambda v: v.strftime("%Y-%m-%dT%H:%M:%SZ"), return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time", "maxLength": 64}),
]


def _four_digits(value: float) -> float:
    """Losses in status are for people and printer columns; the report keeps full precision."""
    return float(f"{value:.4g}")


Loss = Annotated[float, Field(allow_inf_nan=False), AfterValidator(_four_digits)]
Count = Annotated[int, Field(ge=0)]


def cel(
    rule: str,
    message: str | None = None,
    *,
    field_path: str | None = None,
    reason: str | None = None,
) -> dict[str, str]:
    """One `x-kubernetes-validations` entry. The rules live beside the models they guard."""
    entry = {"rule": rule}
    if message is not None:
        entry["message"] = message
    if field_path is not None:
        entry["fieldPath"] = field_path
    if reason is not None:
        entry["reason"] = reason
    return entry


def _extra(*rules: dict[str, str], **keys: Any) -> dict[str, Any]:
    out: dict[str, Any] = {f"x-kubernetes-{k.replace('_', '-')}": v for k, v in keys.items()}
    if rules:
        out["x-kubernetes-validations"] = list(rules)
    return out


def _map_list(key: str, *rules: dict[str, str]) -> dict[str, Any]:
    return _extra(*rules, list_type="map", list_map_keys=[key])


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
    value: Annotated[str, _str(None, 32768, min_length=0)] | None = Field(
        None, description="Literal value."
    )
    value_from: dict[str, Any] | None = Field(
        None,
        description="A core/v1 EnvVarSource (secretKeyRef, configMapKeyRef, fieldRef, ...), "
        "checked by the API server when the Job is created.",
    )

    model_config = ConfigDict(
        json_schema_extra=_extra(
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
        json_schema_extra=_extra(list_type="atomic"),
    )
    affinity: dict[str, Any] | None = Field(
        None, description="A core/v1 Affinity (node, pod and anti-affinity)."
    )
    env: list[EnvVar] | None = Field(
        None,
        max_length=128,
        description="Extra environment variables of the trainer container.",
        json_schema_extra=_map_list("name", _ENV_RULE),
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
        json_schema_extra=_map_list("name"),
    )
    priority_class_name: ObjectName | None = Field(
        None, description="PriorityClass of the pods (preemption order on a busy cluster)."
    )
    labels: dict[QualifiedName, LabelValue] | None = Field(
        None,
        max_length=64,
        description="Copied to every Job and its pods, e.g. kueue.x-k8s.io/queue-name.",
        json_schema_extra=_extra(_RESERVED_KEYS_RULE),
    )
    annotations: dict[QualifiedName, AnnotationValue] | None = Field(
        None,
        max_length=64,
        description="Copied to every Job and its pods.",
        json_schema_extra=_extra(_RESERVED_KEYS_RULE),
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
    """Where the run keeps its artifacts (design.md, "Storage layout").

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
        json_schema_extra=_extra(
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


class Evaluation(EvaluationSpec):
    """Held-out evaluation by the aggregator after a round (none without dataUri).

    Narrows the contract's `EvaluationSpec.dataUri` to the schemes the operator can deliver.
    """

    data_uri: DataUri | None = Field(
        None, description="Held-out jsonl (s3://, file:// or pvc://), in spec.data.format."
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
        json_schema_extra=_map_list("name"),
    )
    aggregation: AggregationSpec = Field(
        default_factory=AggregationSpec,
        description="How the aggregator merges the deltas each round, which clients train in "
        "a round, and how long a round may take.",
        json_schema_extra=_extra(
            cel(
                "!(has(self.clientsPerRound) && has(self.clientFraction))",
                "set at most one of clientsPerRound and clientFraction",
            )
        ),
    )
    delta: DeltaSpec = Field(default_factory=DeltaSpec)
    privacy: PrivacySpec = Field(
        default_factory=PrivacySpec,
        json_schema_extra=_extra(
            cel(
                "!has(self.noiseMultiplier) || self.noiseMultiplier == 0.0 || has(self.clipNorm)",
                "noiseMultiplier > 0 needs clipNorm",
                field_path=".clipNorm",
                reason="FieldValueRequired",
            )
        ),
    )
    evaluation: Evaluation = Field(default_factory=Evaluation)
    storage: StorageSpec
    template: PodTemplate = Field(default_factory=PodTemplate)
    aggregator: PodSettings | None = Field(
        None, description="Overrides of spec.template for the aggregator Job."
    )
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
        json_schema_extra=_extra(
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
# Status
# --------------------------------------------------------------------------------------------


class StatusModel(Model):
    """Status is written by the operator and read back by possibly another operator version:
    unknown fields are ignored rather than fatal."""

    model_config = ConfigDict(extra="ignore")


ConditionStatus = Literal["True", "False", "Unknown"]
PROGRESSING = "Progressing"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
SUSPENDED = "Suspended"
CONDITION_TYPES = (PROGRESSING, SUCCEEDED, FAILED, SUSPENDED)
OUTCOMES = (PROGRESSING, SUCCEEDED, FAILED)
"""Mutually exclusive: exactly one is True once the operator has seen the run."""

Phase = Literal["Pending", "Running", "Aggregating", "Suspended", "Succeeded", "Failed"]
ClientPhase = Literal["Idle", "Pending", "Running", "Succeeded", "Failed", "Rejected"]


class Condition(StatusModel):
    """The standard metav1.Condition."""

    type: Annotated[str, _str(CONDITION_TYPE_PATTERN, 316)] = Field(
        description="Progressing, Succeeded, Failed or Suspended."
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    observed_generation: int | None = Field(
        None, ge=0, description="metadata.generation the condition was set for."
    )
    last_transition_time: Timestamp = Field(description="When status last changed.")
    reason: Annotated[str, _str(REASON_PATTERN, 1024)] = Field(
        description="CamelCase, for machines."
    )
    message: Annotated[str, _str(None, 32768, min_length=0)] = Field(description="For people.")


class RoundRecord(StatusModel):
    """What happened in one round (the latest attempt of it)."""

    round: int = Field(ge=0, le=MAX_ROUNDS, description="The round.")
    attempt: int = Field(0, ge=0, le=1000, description="Retries of this round before this one.")
    started_at: Timestamp | None = Field(
        None, description="When the round's first Job was created."
    )
    completed_at: Timestamp | None = Field(None, description="When its aggregation finished.")
    clients_succeeded: Count = Field(0, description="Client Jobs that uploaded a delta.")
    clients_failed: Count = Field(0, description="Client Jobs that failed for good.")
    rejected: Count = Field(0, description="Deltas the aggregator refused.")
    train_loss: Loss | None = Field(None, description="Sample-weighted mean of the clients'.")
    eval_loss: Loss | None = Field(
        None, description="Loss of the new global adapter on held-out data."
    )
    bytes_received: Count = Field(0, description="Encoded delta bytes the aggregator read.")


class ClientStatus(StatusModel):
    """One client's latest state."""

    name: ClientName = Field(description="The client's name in spec.clients.")
    phase: ClientPhase = Field(
        "Idle",
        description="Idle (not selected this round), Pending, Running, Succeeded, Failed, "
        "Rejected (the aggregator refused its delta).",
    )
    last_round: int | None = Field(
        None, ge=0, le=MAX_ROUNDS, description="The last round it trained in."
    )
    samples: Count | None = Field(None, description="Training samples it reported.")
    last_loss: Loss | None = Field(None, description="Its training loss in lastRound.")
    bytes_sent: Count = Field(0, description="Encoded delta bytes over the whole run.")
    message: Annotated[str, _str(None, 1024, min_length=0)] | None = Field(
        None, description="Why it failed or was rejected."
    )


class Communication(StatusModel):
    """What the deltas cost against full-model FedAvg (every client sending the whole model)."""

    bytes_sent: Count = Field(0, description="Encoded delta bytes all clients uploaded.")
    full_model_equivalent_bytes: Count = Field(
        0, description="What the same uploads would have been as whole fp32 models."
    )
    reduction_ratio: float | None = Field(None, ge=0, description="fullModel / sent.")
    reduction: Annotated[str, _str(None, 32)] | None = Field(None, description='e.g. "41.2x".')


class FederatedFineTuneStatus(StatusModel):
    """The observed state of a run, written by the operator through the status subresource.

    `conditions` are the source of truth; `phase` is a one-word summary for people.
    """

    observed_generation: int | None = Field(
        None, ge=0, description="metadata.generation this status reflects."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        description="Progressing, Succeeded, Failed, Suspended.",
        json_schema_extra=_map_list("type"),
    )
    phase: Phase | None = Field(None, description="A one-word summary for people.")
    current_round: int | None = Field(
        None, ge=0, le=MAX_ROUNDS, description="Round 0 writes the initial adapter."
    )
    round_attempt: int | None = Field(
        None, ge=0, le=1000, description="Retries of the current round so far."
    )
    round_progress: Annotated[str, _str(None, 32)] | None = Field(
        None, description='"<currentRound>/<rounds>", for `kubectl get`.'
    )
    selected_clients: list[ClientName] = Field(
        default_factory=list,
        max_length=MAX_CLIENTS,
        description="The clients training in the current round.",
        json_schema_extra=_extra(list_type="set"),
    )
    client_progress: Annotated[str, _str(None, 32)] | None = Field(
        None, description='"<succeeded>/<selected>" in the current round, for `kubectl get`.'
    )
    round_started_at: Timestamp | None = Field(
        None,
        description="When the current attempt of the current round started (its timeout "
        "counts from here).",
    )
    aggregating_clients: list[ClientName] = Field(
        default_factory=list,
        max_length=MAX_CLIENTS,
        description="The clients whose deltas the current round's aggregator merges; empty "
        "until the quorum is in.",
        json_schema_extra=_extra(list_type="set"),
    )
    clients: list[ClientStatus] = Field(
        default_factory=list,
        max_length=MAX_CLIENTS,
        description="Each client's latest state.",
        json_schema_extra=_map_list("name"),
    )
    history: list[RoundRecord] = Field(
        default_factory=list,
        max_length=HISTORY_LIMIT,
        description=f"The last {HISTORY_LIMIT} rounds.",
        json_schema_extra=_map_list("round"),
    )
    global_adapter_uri: Uri | None = Field(None, description="The latest global adapter.")
    final_adapter_uri: Uri | None = Field(None, description="The PEFT adapter, once finished.")
    report_uri: Uri | None = Field(None, description="The run report (report.html).")
    communication: Communication | None = None
    last_train_loss: Loss | None = Field(None, description="Training loss of the last round.")
    last_eval_loss: Loss | None = Field(None, description="Held-out loss of the last evaluation.")
    start_time: Timestamp | None = Field(
        None, description="Set before the first Job is created; marks the run as started."
    )
    completion_time: Timestamp | None = Field(None, description="When it succeeded or failed.")


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


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


ModelT = TypeVar("ModelT", bound=Model)


class SpecError(ValueError):
    """An invalid spec: `problems` lists one "<field path>: <what is wrong>" line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _plain(value: Any) -> Any:
    """Deep copy of a kopf body view (Mappings, Sequences) into dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _field_path(root: str, loc: Sequence[str | int], data: Any) -> str:
    """Render a pydantic error location as the API server would: spec.clients[1].dataUri.

    Walking the input alongside drops pydantic's own location steps (union branch names,
    '[key]'), which are not in the object.
    """
    path = root
    for i, step in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(step, int) and isinstance(data, list) and 0 <= step < len(data):
            path += f"[{step}]"
            data = data[step]
        elif isinstance(step, str) and isinstance(data, dict):
            if step in data:
                path += f".{step}" if _IDENTIFIER.match(step) else f"[{step}]"
                data = data[step]
            elif last and _IDENTIFIER.match(step):  # a missing field
                path += f".{step}"
    return path


def _problems(error: ValidationError, root: str, data: Any) -> list[str]:
    by_path: dict[str, list[str]] = {}
    for err in error.errors(include_url=False):
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "string_pattern_mismatch":
            message = PATTERN_HINTS.get(err["ctx"]["pattern"], message)
        if "[key]" in err["loc"]:
            message = f"key {err['input']!r}: {message}"
        elif err["type"] not in ("missing", "extra_forbidden") and not isinstance(
            err["input"], (dict, list)
        ):
            shown = repr(err["input"])
            message += f" (got {shown if len(shown) <= 80 else shown[:77] + '...'})"
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        by_path.setdefault(_field_path(root, err["loc"], data), []).append(message)
    return [f"{path}: {' or '.join(dict.fromkeys(msgs))}" for path, msgs in by_path.items()]


def _strict(model: type[ModelT], data: Any, root: str) -> ModelT:
    """Validate as the API server does: JSON types taken strictly, so "10" is no integer and
    "yes" no boolean (pydantic's lax mode would accept both)."""
    try:
        return model.model_validate_json(json.dumps(data), strict=True)
    except ValidationError as e:
        raise SpecError(_problems(e, root, data)) from None


def parse_spec(raw: Mapping[str, Any]) -> FederatedFineTuneSpec:
    """Parse `.spec` of a FederatedFineTune (a dict or kopf's view of one), defaults applied.

    Raises `SpecError` naming every bad field by its camelCase path, e.g.
    `spec.clients[1].name: must be a DNS label ... (got 'Bad_Name')`.
    """
    return _strict(FederatedFineTuneSpec, _plain(raw), "spec")


def parse_status(raw: Mapping[str, Any] | None) -> FederatedFineTuneStatus:
    """Parse `.status` (absent on a new object); `SpecError` (a ValueError) when it is malformed."""
    return _strict(FederatedFineTuneStatus, _plain(raw or {}), "status")


# --------------------------------------------------------------------------------------------
# Deep validation
# --------------------------------------------------------------------------------------------


def clients_per_round(spec: FederatedFineTuneSpec) -> int:
    """How many clients train in each round: clientsPerRound, or clientFraction of the clients
    rounded up (never below 1), or all of them."""
    n = len(spec.clients)
    agg = spec.aggregation
    if agg.clients_per_round is not None:
        return min(agg.clients_per_round, n)
    if agg.client_fraction is not None:
        # The epsilon keeps 0.1 * 30 (= 3.0000000000000004) at 3; the CRD rule uses the same one.
        return max(1, min(n, math.ceil(agg.client_fraction * n - 1e-9)))
    return n


def quorum(spec: FederatedFineTuneSpec) -> int:
    """Deltas needed before a round may aggregate: minClients, or every selected client."""
    agg = spec.aggregation
    return agg.min_clients if agg.min_clients is not None else clients_per_round(spec)


def select_clients(spec: FederatedFineTuneSpec, round_: int) -> list[str]:
    """The clients that train in `round_`, in spec order.

    Deterministic in (samplingSeed, round, client names), so that a restarted operator selects
    the same clients again; all of them when every client trains every round.
    """
    names = [c.name for c in spec.clients]
    k = clients_per_round(spec)
    if k >= len(names):
        return names
    rng = random.Random(f"fedtune/{spec.aggregation.sampling_seed}/{round_}")
    return [names[i] for i in sorted(rng.sample(range(len(names)), k))]


def _under(uri: str, root: str) -> bool:
    return (uri.rstrip("/") + "/").startswith(root.rstrip("/") + "/")


def _pod_problems(path: str, pod: PodSettings, credentials: bool) -> list[str]:
    problems = []
    for i, var in enumerate(pod.env or []):
        where = f"{path}.env[{i}]"
        if var.name.startswith(RESERVED_ENV_PREFIX):
            problems.append(
                f"{where}.name: {var.name} is reserved: names starting with "
                f"{RESERVED_ENV_PREFIX} are set by the operator"
            )
        if credentials and var.name in AWS_CREDENTIAL_ENV:
            problems.append(
                f"{where}.name: {var.name} comes from spec.storage.credentialsSecret; "
                "do not set it as well"
            )
        if var.value is not None and var.value_from is not None:
            problems.append(f"{where}.valueFrom: set value or valueFrom, not both")
    seen: set[str] = set()
    for i, var in enumerate(pod.env or []):
        if var.name in seen:
            problems.append(f"{path}.env[{i}].name: duplicate name {var.name!r}")
        seen.add(var.name)
    if isinstance(pod, PodTemplate):
        for field in ("labels", "annotations"):
            for key in getattr(pod, field) or {}:
                if key.startswith(RESERVED_PREFIX):
                    problems.append(
                        f"{path}.{field}[{key}]: keys under {RESERVED_PREFIX} are reserved "
                        "for the operator"
                    )
    return problems


def validate_run_name(name: str) -> list[str]:
    """The run's name must be a DNS label: it is the value of the fedtune.dev/run label."""
    if len(name) > RUN_NAME_MAX or not re.match(RUN_NAME_PATTERN, name):
        return [
            f"metadata.name: {name!r} must be a DNS label of at most {RUN_NAME_MAX} characters: "
            "it is the fedtune.dev/run label of every Job"
        ]
    return []


def validate_spec(spec: FederatedFineTuneSpec, *, name: str | None = None) -> list[str]:
    """Every rule that spans fields, as "<field path>: <problem>" lines (empty when valid).

    Mirrors the CRD's CEL rules (client names unique, quorum and clientsPerRound against the
    clients, endpoint only for s3://, reserved env names and label keys, the run name when
    given), and adds what the CRD leaves to the operator:

    * with storage.cleanupPolicy Delete, no data, model or tokenizer may lie under storage.uri,
      where deleting the run would delete it;
    * no AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in env when credentialsSecret provides them.
    """
    problems = validate_run_name(name) if name is not None else []
    first: dict[str, int] = {}
    for i, client in enumerate(spec.clients):
        if client.name in first:
            problems.append(
                f"spec.clients[{i}].name: duplicate client name {client.name!r} "
                f"(also spec.clients[{first[client.name]}])"
            )
        first.setdefault(client.name, i)

    n = len(spec.clients)
    agg = spec.aggregation
    if agg.clients_per_round is not None and agg.clients_per_round > n:
        problems.append(
            f"spec.aggregation.clientsPerRound: {agg.clients_per_round} exceeds the number of "
            f"clients ({n})"
        )
    selected = clients_per_round(spec)
    if agg.min_clients is not None and agg.min_clients > selected:
        problems.append(
            f"spec.aggregation.minClients: {agg.min_clients} exceeds the clients selected per "
            f"round ({selected})"
        )

    storage = spec.storage
    if storage.uri.startswith("file://") and storage.endpoint is not None:
        problems.append("spec.storage.endpoint: endpoint applies to s3:// storage only")

    credentials = storage.credentials_secret is not None
    problems += _pod_problems("spec.template", spec.template, credentials)
    if spec.aggregator is not None:
        problems += _pod_problems("spec.aggregator", spec.aggregator, credentials)
    for i, client in enumerate(spec.clients):
        problems += _pod_problems(f"spec.clients[{i}]", client, credentials)

    if storage.cleanup_policy == "Delete":
        inputs = [("spec.baseModel", spec.base_model), ("spec.tokenizer", spec.tokenizer)]
        inputs += [(f"spec.clients[{i}].dataUri", c.data_uri) for i, c in enumerate(spec.clients)]
        inputs.append(("spec.evaluation.dataUri", spec.evaluation.data_uri))
        for path, uri in inputs:
            if uri is not None and _under(uri, storage.uri):
                problems.append(
                    f"{path}: {uri} lies under spec.storage.uri, which cleanupPolicy Delete "
                    "removes with the run"
                )
    return problems


def is_started(status: FederatedFineTuneStatus) -> bool:
    """The run has started (see STARTED_CEL): from now on IMMUTABLE_ONCE_STARTED holds."""
    return status.start_time is not None or (status.current_round or 0) > 0


def immutable_changes(
    old: FederatedFineTuneSpec, new: FederatedFineTuneSpec, status: FederatedFineTuneStatus
) -> list[str]:
    """The changes from `old` to `new` that ROOT_RULES forbid, given the run's status."""
    problems = []
    if status.current_round is not None and new.rounds < status.current_round:
        problems.append("spec.rounds: cannot go below status.currentRound")
    if not is_started(status):
        return problems
    pairs = [
        ("spec.baseModel", old.base_model, new.base_model),
        ("spec.tokenizer", old.tokenizer, new.tokenizer),
        ("spec.adapter", old.adapter, new.adapter),
        ("spec.storage.uri", old.storage.uri, new.storage.uri),
        ("spec.clients", [c.name for c in old.clients], [c.name for c in new.clients]),
    ]
    problems += [f"{path}: immutable once the run has started" for path, a, b in pairs if a != b]
    return problems


# --------------------------------------------------------------------------------------------
# Pod settings merge
# --------------------------------------------------------------------------------------------


def _merged_map(base: dict | None, over: dict | None) -> dict | None:
    if base is None and over is None:
        return None
    return {**(base or {}), **(over or {})}


def merge_pod_settings(base: PodSettings, override: PodSettings | None) -> PodSettings:
    """The pod settings of one Job: `override` (a client or spec.aggregator) over `base`
    (spec.template), with the merge rules documented on `PodSettings`."""
    fields = set(PodSettings.model_fields)
    if override is None:
        return PodSettings.model_validate(base.model_dump(include=fields))
    resources = None
    if base.resources is not None or override.resources is not None:
        b, o = base.resources or Resources(), override.resources or Resources()
        resources = Resources(
            limits=_merged_map(b.limits, o.limits), requests=_merged_map(b.requests, o.requests)
        )
    env = None
    if base.env is not None or override.env is not None:
        by_name = {v.name: v for v in base.env or []}
        by_name.update({v.name: v for v in override.env or []})
        env = list(by_name.values())
    tolerations = None
    if base.tolerations is not None or override.tolerations is not None:
        tolerations = [*(base.tolerations or []), *(override.tolerations or [])]
    return PodSettings(
        resources=resources,
        node_selector=_merged_map(base.node_selector, override.node_selector),
        tolerations=tolerations,
        affinity=override.affinity if override.affinity is not None else base.affinity,
        env=env,
        service_account_name=override.service_account_name or base.service_account_name,
    )


# --------------------------------------------------------------------------------------------
# Status helpers
# --------------------------------------------------------------------------------------------


def get_condition(conditions: Sequence[Condition], type_: str) -> Condition | None:
    """The condition of this type, selected by type (never by position)."""
    return next((c for c in conditions if c.type == type_), None)


def set_condition(
    conditions: Sequence[Condition],
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    now: datetime,
    observed_generation: int | None = None,
) -> list[Condition]:
    """A new list with the condition of `type_` set; others untouched, order kept.

    lastTransitionTime becomes `now` only when the status flips (or the condition is new), as
    metav1.Condition requires; a reason or message change alone keeps it.
    """
    old = get_condition(conditions, type_)
    changed = old is None or old.status != status
    new = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=now if changed else old.last_transition_time,
        observed_generation=observed_generation
        if observed_generation is not None
        else (old.observed_generation if old else None),
    )
    if old is None:
        return [*conditions, new]
    return [new if c.type == type_ else c for c in conditions]


def set_outcome(
    conditions: Sequence[Condition],
    outcome: Literal["Progressing", "Succeeded", "Failed"],
    reason: str,
    message: str,
    now: datetime,
    observed_generation: int | None = None,
) -> list[Condition]:
    """Flip the mutually exclusive Progressing/Succeeded/Failed together: `outcome` True, the
    other two False with the same reason, so no reader ever sees two of them True."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {OUTCOMES}, not {outcome!r}")
    out = list(conditions)
    for type_ in OUTCOMES:
        out = set_condition(
            out,
            type_,
            "True" if type_ == outcome else "False",
            reason,
            message,
            now,
            observed_generation,
        )
    return out


def record_round(
    history: Sequence[RoundRecord], record: RoundRecord, limit: int = HISTORY_LIMIT
) -> list[RoundRecord]:
    """History with `record` in place of an earlier record of its round (a retry), else
    appended; the oldest rounds drop off beyond `limit`."""
    kept = [r for r in history if r.round != record.round]
    out = sorted([*kept, record], key=lambda r: r.round)
    return out[-limit:]


def set_client_status(clients: Sequence[ClientStatus], entry: ClientStatus) -> list[ClientStatus]:
    """Client states with `entry` in place of the one of the same name, else appended."""
    if any(c.name == entry.name for c in clients):
        return [entry if c.name == entry.name else c for c in clients]
    return [*clients, entry]


def progress(done: int, total: int) -> str:
    """Progress as "3/10", for the roundProgress and clientProgress printer columns."""
    return f"{done}/{total}"


def communication_totals(bytes_sent: int, full_model_bytes: int) -> Communication:
    """Totals with the reduction against full-model FedAvg, as a ratio and as "41.2x"."""
    if bytes_sent < 0 or full_model_bytes < 0:
        raise ValueError("byte counts cannot be negative")
    ratio = full_model_bytes / bytes_sent if bytes_sent > 0 else None
    return Communication(
        bytes_sent=bytes_sent,
        full_model_equivalent_bytes=full_model_bytes,
        reduction_ratio=round(ratio, 3) if ratio is not None else None,
        reduction=f"{ratio:.1f}x" if ratio is not None else None,
    )
