"""The chart's values say one thing in three places: values.yaml (what people read and edit), the
models in fedtune_operator.chart_values (types, bounds, defaults, meanings) and values.schema.json
(generated from the models, what Helm checks). No cluster and no helm needed: the chart's
rendering with these values is tests/chart/test_template.py's business.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from fedtune_operator import chart_values
from fedtune_operator.chart_values import ChartValues
from tests.chart.support import CHART

VALUES = CHART / "values.yaml"
SCHEMA = CHART / "values.schema.json"
MISSING = object()


def values_yaml() -> dict[str, Any]:
    return yaml.safe_load(VALUES.read_text())


def schema_defaults(node: dict[str, Any]) -> Any:
    """The values the schema's defaults add up to: an object's are its properties', a leaf's is
    its own (MISSING where it has none, as for keys values.yaml leaves unset)."""
    if "properties" in node:
        out = {}
        for name, sub in node["properties"].items():
            value = schema_defaults(sub)
            if value is not MISSING:
                out[name] = value
        return out
    return node.get("default", MISSING)


def keys(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every key the schema describes, list items' keys included, with its schema."""
    for name, sub in node.get("properties", {}).items():
        yield f"{path}{name}", sub
        yield from keys(sub, f"{path}{name}.")
    if "items" in node:
        yield from keys(node["items"], f"{path}[].")


def test_the_committed_schema_is_the_generators_output() -> None:
    generated = subprocess.run(
        [sys.executable, "-m", "fedtune_operator.chart_schema"], check=True, capture_output=True
    ).stdout
    assert SCHEMA.read_bytes() == generated, "values.schema.json is stale: run `make crds`"


def test_the_models_defaults_are_values_yaml() -> None:
    assert chart_values.defaults() == values_yaml()


def test_values_yaml_is_valid_for_the_models_as_it_stands() -> None:
    parsed = ChartValues.model_validate(values_yaml())
    assert parsed == ChartValues()


def test_the_schemas_defaults_are_values_yaml() -> None:
    schema = yaml.safe_load(SCHEMA.read_text())  # JSON is YAML
    assert schema_defaults(schema) == values_yaml()


def test_every_key_is_documented_and_no_other_is_allowed() -> None:
    schema = yaml.safe_load(SCHEMA.read_text())
    described = list(keys(schema))
    assert len(described) > 50
    undocumented = [path for path, sub in described if not sub.get("description", "").strip()]
    assert not undocumented, f"keys without a description in chart_values.py: {undocumented}"
    objects = [(path, sub) for path, sub in [("", schema), *described] if "properties" in sub]
    open_objects = [path for path, sub in objects if sub.get("additionalProperties") is not False]
    assert not open_objects, f"objects that accept unknown keys: {open_objects}"


@pytest.mark.parametrize(
    "values",
    [
        {"watchNamespace": ["team-a"]},
        {"image": {"tags": "1.0"}},
        {"metrics": {"serviceMonitor": {"enable": True}}},
        {"resources": {"request": {"cpu": "1"}}},
        {"watchNamespaces": ["Team_A"]},
        {"watchNamespaces": ["a", "a"]},
        {"operator": {"livenessPort": "8081"}},
        {"operator": {"livenessPort": 70000}},
        {"image": {"pullPolicy": "Sometimes"}},
        {"image": {"digest": "sha256:short"}},
        {"metrics": {"serviceMonitor": {"interval": "soon"}}},
        {"imagePullSecrets": [{}]},
        {"admission": {"allowedImages": ["ghcr.io/x' || true || '"]}},
        {"admission": {"allowedServiceAccounts": ["Trainer"]}},
        {"admission": {"validationActions": ["Deny", "Warn"]}},
        {"admission": {"validationActions": []}},
        {"admission": {"protectedNamespaces": ["kube-system", "kube-system"]}},
    ],
    ids=[
        "typo-top-level",
        "typo-image",
        "typo-nested",
        "typo-resources",
        "invalid-namespace",
        "duplicate-namespace",
        "port-as-string",
        "port-out-of-range",
        "pull-policy",
        "digest",
        "duration",
        "pull-secret-without-name",
        "cel-in-an-image-rule",
        "service-account-name",
        "deny-and-warn",
        "no-action",
        "duplicate-protected-namespace",
    ],
)
def test_the_models_refuse_what_the_schema_refuses(values: dict[str, Any]) -> None:
    """The same bad values test_template.py shows helm refusing through the schema, and more."""
    with pytest.raises(ValidationError):
        ChartValues.model_validate(values)
