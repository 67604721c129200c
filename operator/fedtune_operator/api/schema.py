"""The building blocks of the FederatedFineTune schema: names, patterns, bounded types, CEL.

Each pattern is valid for pydantic (Rust regex), for the CRD's `pattern` and for CEL `matches()`
(both RE2), so one string serves all three. The models in spec.py and status.py are built from
these; nothing here knows about a run.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    Field,
    PlainSerializer,
    PlainValidator,
    StringConstraints,
    WithJsonSchema,
)

from fedtune_trainer.wire.contract import GROUP
from fedtune_trainer.wire.settings import Model
from fedtune_trainer.wire.task import AggregateTask

# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------

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

RESERVED_CLIENT_NAMES = ("aggregate", "evaluate")
"""The suffixes of the aggregator's and the evaluation's Job names (`<run>-r<round>-aggregate`)
and of the evaluation's cache claim (`<run>-cache-evaluate`): a client of either name would
collide with them (its Job is `<run>-r<round>-<client>`)."""

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
# Patterns
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


def bounded_str(pattern: str | None = None, max_length: int = 253, min_length: int = 1) -> Any:
    return StringConstraints(min_length=min_length or None, max_length=max_length, pattern=pattern)


StorageUri = Annotated[str, bounded_str(STORAGE_URI_PATTERN, 1024)]
DataUri = Annotated[str, bounded_str(DATA_URI_PATTERN, 1024)]
ModelUri = Annotated[str, bounded_str(MODEL_URI_PATTERN, 1024)]
EndpointUri = Annotated[str, bounded_str(ENDPOINT_PATTERN, 1024)]
ObjectName = Annotated[str, bounded_str(f"^{DNS_SUBDOMAIN}$", 253)]
SecretKey = Annotated[str, bounded_str(SECRET_KEY_PATTERN, 253)]
QualifiedName = Annotated[str, bounded_str(QUALIFIED_NAME_PATTERN, 317)]
LabelValue = Annotated[str, bounded_str(LABEL_VALUE_PATTERN, 63, min_length=0)]
AnnotationValue = Annotated[str, bounded_str(None, 4096, min_length=0)]
EnvName = Annotated[str, bounded_str(ENV_NAME_PATTERN, 256)]
Image = Annotated[str, bounded_str(IMAGE_PATTERN, 512)]


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


def cel_strings(values: Iterable[str]) -> str:
    """A CEL list literal of strings, so that a rule tests membership in the Python tuple the
    operator uses rather than in a copy of it."""
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


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


def k8s_extensions(*rules: dict[str, str], **keys: Any) -> dict[str, Any]:
    out: dict[str, Any] = {f"x-kubernetes-{k.replace('_', '-')}": v for k, v in keys.items()}
    if rules:
        out["x-kubernetes-validations"] = list(rules)
    return out


def map_list(key: str, *rules: dict[str, str]) -> dict[str, Any]:
    return k8s_extensions(*rules, list_type="map", list_map_keys=[key])
