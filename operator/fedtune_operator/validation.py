"""Parsing and validation of a FederatedFineTune, in two pure layers.

* `parse_spec` checks shape: types, bounds, patterns, enums and the per-object rules of the shared
  settings models, strictly as the API server would (JSON types, camelCase), and names every bad
  field by its path. The CRD schema enforces the same at admission.
* `validate_spec` checks the rules that span fields (quorum against the client count, a storage
  endpoint on a `file://` root, reserved names, ...). Most of them are CEL rules in the CRD too,
  but the operator checks again: Helm never upgrades a CRD, so the installed schema may be older
  than the operator, and a few rules are deliberately left to the operator (see `validate_spec`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from pydantic import ValidationError

from fedtune_operator.api.schema import (
    PATTERN_HINTS,
    RESERVED_CLIENT_NAMES,
    RUN_NAME_MAX,
    RUN_NAME_PATTERN,
)
from fedtune_operator.api.spec import (
    BUCKET_ROOT_MESSAGE,
    BUCKET_ROOT_PATTERN,
    FederatedFineTuneSpec,
    PodSettings,
    PodTemplate,
)
from fedtune_operator.api.status import FederatedFineTuneStatus
from fedtune_operator.rounds import clients_per_round
from fedtune_trainer.wire.contract import AWS_CREDENTIAL_ENV, RESERVED_ENV_PREFIX, RESERVED_PREFIX
from fedtune_trainer.wire.settings import (
    KRUM_ALGORITHMS,
    KRUM_QUORUM,
    SCAFFOLD_ALGORITHMS,
    Model,
    krum_min_clients,
    lora_mode_problems,
)

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


def _drift_problems(spec: FederatedFineTuneSpec) -> list[str]:
    """SCAFFOLD needs every accepted client in a mean (its control update averages all their
    control changes) and no DP noise (the control changes are neither clipped nor noised, so
    they would leak what the noise hides)."""
    if spec.training.drift_control != "scaffold":
        return []
    problems = []
    if spec.aggregation.algorithm not in SCAFFOLD_ALGORITHMS:
        problems.append(
            f"spec.training.driftControl: scaffold needs a mean-based aggregation "
            f"({', '.join(SCAFFOLD_ALGORITHMS)}), not {spec.aggregation.algorithm}"
        )
    if spec.privacy.noise_multiplier > 0:
        problems.append(
            "spec.training.driftControl: scaffold's control uploads are not privatised; it "
            "cannot run with privacy.noiseMultiplier > 0"
        )
    if spec.aggregation.lora == "exact":
        problems.append(
            "spec.training.driftControl: scaffold corrects each LoRA factor's gradient, while "
            "aggregation.lora exact re-factorises their product; use separate"
        )
    return problems


def _site_problems(spec: FederatedFineTuneSpec) -> list[str]:
    """A client is trained here (dataUri) or at a site (site), never both; a site's keys and
    credentials stay at the site; a run with a site's client signs its tasks."""
    problems = []
    for i, c in enumerate(spec.clients):
        path = f"spec.clients[{i}]"
        if (c.data_uri is None) == (c.site is None):
            problems.append(
                f"{path}: exactly one of dataUri (trained here) and site (trained at a site)"
            )
        held = [
            n
            for n, v in (
                ("signing", c.signing),
                ("credentialsSecret", c.credentials_secret),
                ("storageCredentialsSecret", c.storage_credentials_secret),
            )
            if v
        ]
        if c.site is not None and held:
            problems.append(
                f"{path}: a site's client has no {', '.join(held)} here: its keys and "
                "credentials stay at the site (site.publicKey pins its key)"
            )
    if spec.task_signing is None and any(c.site is not None for c in spec.clients):
        problems.append(
            "spec.taskSigning: a run with a site's client needs taskSigning (the key its tasks "
            "are signed with)"
        )
    return problems


def validate_spec(spec: FederatedFineTuneSpec, *, name: str | None = None) -> list[str]:
    """Every rule that spans fields, as "<field path>: <problem>" lines (empty when valid).

    Mirrors the CRD's CEL rules (client names unique, quorum and clientsPerRound against the
    clients, krum's quorum (`krum_min_clients`), endpoint only for s3://, reserved env names and
    label keys, the run name when given), and adds what the CRD leaves to the operator:

    * with storage.cleanupPolicy Delete, storage.uri is no whole bucket (also a CEL rule), and
      no data, model or tokenizer may lie under it, where deleting the run would delete it;
    * no AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in env when credentialsSecret provides them;
    * aggregation.lora exact only with fedavg, without freezeA and DP noise, and per-client
      ranks (clients[].adapter.r) only in exact mode and at most adapter.r
      (`fedtune_trainer.wire.settings.lora_mode_problems`, which the aggregator's task checks too).
    * training.driftControl scaffold only with a mean-based aggregation, without DP noise and
      with aggregation.lora separate;
    * a site's client (clients[].site) has no dataUri, keys or credentials here, and the run
      then has taskSigning (also CEL rules).
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
        if client.name in RESERVED_CLIENT_NAMES:
            problems.append(
                f"spec.clients[{i}].name: {client.name!r} is reserved for the "
                f"{'aggregator' if client.name == 'aggregate' else 'evaluation'} Jobs"
            )

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

    ranks = {
        f"spec.clients[{i}].adapter.r": c.adapter.r
        for i, c in enumerate(spec.clients)
        if c.adapter is not None and c.adapter.r is not None and c.adapter.r != spec.adapter.r
    }
    problems += lora_mode_problems(spec.aggregation, spec.adapter, spec.privacy, ranks, "spec.")
    # A run that can never select krum's quorum is refused here, before it spends a round of
    # training to have the aggregator refuse it.
    krum_needs = krum_min_clients(agg.byzantine_clients)
    if agg.algorithm in KRUM_ALGORITHMS and selected < krum_needs:
        problems.append(
            f"spec.aggregation.byzantineClients: {agg.algorithm} with byzantineClients "
            f"{agg.byzantine_clients} needs at least {KRUM_QUORUM} = {krum_needs} clients per "
            f"round, but the run selects {selected}"
        )
    problems += _drift_problems(spec)
    problems += _site_problems(spec)

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
        if re.match(BUCKET_ROOT_PATTERN, storage.uri):
            problems.append(f"spec.storage.uri: {storage.uri}: {BUCKET_ROOT_MESSAGE}")
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
