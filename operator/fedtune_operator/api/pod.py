"""Pod settings of a run's Jobs: a bounded subset of the core/v1 Pod fields that a client, the
aggregator or the evaluation may set over spec.template (merged by pod_settings.merge_pod_settings).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from fedtune_operator.api.schema import (
    DEFAULT_IMAGE,
    AnnotationValue,
    EnvName,
    Image,
    LabelValue,
    ObjectName,
    QualifiedName,
    Quantity,
    bounded_str,
    cel,
    k8s_extensions,
    map_list,
)
from fedtune_trainer.wire.contract import RESERVED_ENV_PREFIX, RESERVED_PREFIX
from fedtune_trainer.wire.settings import Model

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
