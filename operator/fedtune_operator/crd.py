"""Generate the FederatedFineTune CRD from `fedtune_operator.api` (its field reference, docs/api.md,
is crd_docs.py's).

    python -m fedtune_operator.crd > crds/fedtune.dev_federatedfinetunes.yaml
    python -m fedtune_operator.crd --site > crds/fedtune.dev_federatedsites.yaml

Both files are committed and tests compare them with a fresh generation, so the models stay the
one place where a default, a bound or a rule is written. The generator turns pydantic's JSON
schema into a Kubernetes *structural* schema: references inlined, optional fields as plain
(non-required, non-nullable) properties, `exclusiveMinimum` in its OpenAPI v3.0 boolean form,
defaults from default factories included, and every string, list and map bounded — it refuses to
emit a schema that is not.
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import core_schema

from fedtune_operator import api
from fedtune_operator.api import site

CRD_NAME = f"{api.PLURAL}.{api.GROUP}"
SITE_CRD_NAME = f"{site.SITE_PLURAL}.{api.GROUP}"
GENERATED_BY = "python -m fedtune_operator.crd"

PRINTER_COLUMNS: tuple[dict[str, Any], ...] = (
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Round", "type": "string", "jsonPath": ".status.roundProgress"},
    {"name": "Clients", "type": "string", "jsonPath": ".status.clientProgress"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.lastTrainLoss"},
    {"name": "Reduction", "type": "string", "jsonPath": ".status.communication.reduction"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {
        "name": "Algorithm",
        "type": "string",
        "jsonPath": ".spec.aggregation.algorithm",
        "priority": 1,
    },
    {"name": "Eval Loss", "type": "number", "jsonPath": ".status.lastEvalLoss", "priority": 1},
    {
        "name": "Succeeded",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Succeeded")].status',
        "priority": 1,
    },
    {"name": "Adapter", "type": "string", "jsonPath": ".status.finalAdapterUri", "priority": 1},
)
"""`kubectl get fft` columns; `priority: 1` ones show with `-o wide`. Conditions by type."""

SITE_PRINTER_COLUMNS: tuple[dict[str, Any], ...] = (
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Run", "type": "string", "jsonPath": ".spec.run.name"},
    {"name": "Client", "type": "string", "jsonPath": ".spec.client"},
    {"name": "Round", "type": "integer", "jsonPath": ".status.runRound"},
    {"name": "Contributed", "type": "integer", "jsonPath": ".status.roundsContributed"},
    {"name": "Sent", "type": "integer", "jsonPath": ".status.bytesSent"},
    {"name": "Heartbeat", "type": "date", "jsonPath": ".status.lastHeartbeat"},
    {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
)
"""`kubectl get fsite` columns, like the run's."""


class SchemaError(ValueError):
    """The models cannot be expressed as a bounded structural schema."""


class _WithFactoryDefaults(GenerateJsonSchema):
    """Pydantic leaves default factories out of a JSON schema; a CRD needs them.

    A nested settings object defaults to `{}`: the API server defaults an absent object to `{}`
    and then applies the defaults of its fields, which gives exactly the model's defaults (the
    generator checks that the factory builds the all-defaults instance).
    """

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is None or schema.get("default_factory_takes_data"):
            return super().get_default_value(schema)
        value = factory()
        if isinstance(value, BaseModel):
            if value != type(value)():
                raise SchemaError(f"{type(value).__name__} default is not its all-defaults form")
            return {}
        return value


_DROP = {"title", "additionalProperties", "propertyNames", "$defs"}
_KEEP = {
    "type",
    "description",
    "default",
    "enum",
    "format",
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "properties",
    "required",
    "items",
    "anyOf",
}


_RULE_ORDER = ("rule", "message", "messageExpression", "fieldPath", "reason")


def _merge(outer: dict[str, Any], inner: dict[str, Any]) -> dict[str, Any]:
    """A `$ref` or an optional's branch with the keys written beside it (field-level keys win;
    CEL rules of the model and of the field both apply)."""
    merged = {**inner, **outer}
    rules = inner.get("x-kubernetes-validations", []) + outer.get("x-kubernetes-validations", [])
    if rules:
        merged["x-kubernetes-validations"] = [
            {k: rule[k] for k in _RULE_ORDER if k in rule} for rule in rules
        ]
    return merged


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    node = dict(node)
    while True:
        if "$ref" in node:
            target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
            node = _merge(node, dict(target))
        elif "anyOf" in node and {"type": "null"} in node["anyOf"]:
            branches = [b for b in node.pop("anyOf") if b != {"type": "null"}]
            if len(branches) != 1:
                raise SchemaError(f"unsupported union: {branches}")
            node = _merge(node, dict(branches[0]))
            if node.get("default", 0) is None:
                del node["default"]
        else:
            return node


def _structural(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    node = _resolve(node, defs)
    out: dict[str, Any] = {}
    if "patternProperties" in node:
        # A map with constrained keys: a CRD cannot check map keys (the operator does).
        (values,) = node.pop("patternProperties").values()
        node["additionalProperties"] = values
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if key in node:
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound], out[key] = node.pop(key), True
    unknown = set(node) - _KEEP - _DROP - {k for k in node if k.startswith("x-kubernetes-")}
    if unknown:
        raise SchemaError(f"{path}: cannot express {sorted(unknown)} in a CRD")
    for key, value in node.items():
        if key in _KEEP or key.startswith("x-kubernetes-"):
            out[key] = copy.deepcopy(value)

    kind = node.get("type")
    if node.get("x-kubernetes-int-or-string"):
        if node.get("anyOf") != [{"type": "integer"}, {"type": "string"}]:
            raise SchemaError(f"{path}: int-or-string must be anyOf integer, string")
    elif "anyOf" in node:
        raise SchemaError(f"{path}: unions other than int-or-string are not structural")
    elif kind == "object":
        if "properties" in node:
            out["properties"] = {
                name: _structural(sub, defs, f"{path}.{name}")
                for name, sub in node["properties"].items()
            }
        elif isinstance(node.get("additionalProperties"), dict):
            if "maxProperties" not in node:
                raise SchemaError(f"{path}: a map needs maxProperties")
            out["additionalProperties"] = _structural(
                node["additionalProperties"], defs, f"{path}[*]"
            )
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        if "maxItems" not in node:
            raise SchemaError(f"{path}: a list needs maxItems")
        out["items"] = _structural(node["items"], defs, f"{path}[*]")
    elif kind == "string":
        if "enum" in node and "maxLength" not in node:
            # Bounded for CEL's cost estimate, loosely: a misspelt value should read "Unsupported
            # value", not also "Too long".
            out["maxLength"] = max(64, *(len(v) for v in node["enum"]))
        if "maxLength" not in out:
            raise SchemaError(f"{path}: a string needs maxLength")
    elif kind not in ("integer", "number", "boolean"):
        raise SchemaError(f"{path}: unsupported type {kind!r}")
    return _ordered(out)


_ORDER = (
    "description",
    "type",
    "x-kubernetes-int-or-string",
    "anyOf",
    "format",
    "enum",
    "default",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-preserve-unknown-fields",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "x-kubernetes-validations",
)


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    """A stable, readable key order, so that the committed YAML diffs well."""
    return {k: node[k] for k in _ORDER if k in node} | {
        k: v for k, v in node.items() if k not in _ORDER
    }


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural schema of one model, as the CRD embeds it."""
    raw = model.model_json_schema(by_alias=True, schema_generator=_WithFactoryDefaults)
    return _structural(raw, raw.get("$defs", {}), model.__name__)


def _object_schema(
    kind: str, description: str, name: dict[str, Any], spec: dict[str, Any], status: dict[str, Any]
) -> dict[str, Any]:
    return {
        "description": f"{kind}: {description}",
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {
                "description": f"APIVersion of the object: {api.API_VERSION}.",
                "type": "string",
                "maxLength": 253,
            },
            "kind": {
                "description": f"Kind of the object: {kind}.",
                "type": "string",
                "maxLength": 63,
            },
            # The API server allows nothing on metadata but name and generateName rules.
            "metadata": {"type": "object", "properties": {"name": name}},
            "spec": spec,
            "status": status,
        },
    }


def openapi_schema() -> dict[str, Any]:
    """The CRD's openAPIV3Schema: the object, its spec and status, and the whole-object rules."""
    schema = _object_schema(
        api.KIND,
        api.FederatedFineTuneSpec.__doc__.splitlines()[0],
        {
            "description": "The run's name: a DNS label, because it is the fedtune.dev/run "
            "label value of every Job.",
            "type": "string",
            "maxLength": api.RUN_NAME_MAX,
            "pattern": api.RUN_NAME_PATTERN,
        },
        model_schema(api.FederatedFineTuneSpec),
        model_schema(api.FederatedFineTuneStatus),
    )
    schema["x-kubernetes-validations"] = [dict(r) for r in api.ROOT_RULES]
    return _ordered(schema)


def site_openapi_schema() -> dict[str, Any]:
    """The FederatedSite's openAPIV3Schema."""
    return _ordered(
        _object_schema(
            site.SITE_KIND,
            site.FederatedSiteSpec.__doc__.splitlines()[0],
            {
                "description": "The site's name: a DNS label, because it names the site's Jobs.",
                "type": "string",
                "maxLength": api.RUN_NAME_MAX,
                "pattern": api.RUN_NAME_PATTERN,
            },
            model_schema(site.FederatedSiteSpec),
            model_schema(site.FederatedSiteStatus),
        )
    )


def _definition(
    plural: str,
    names: dict[str, Any],
    columns: tuple[dict[str, Any], ...],
    schema: dict[str, Any],
) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{api.GROUP}",
            "labels": {"app.kubernetes.io/part-of": "fedtune"},
        },
        "spec": {
            "group": api.GROUP,
            "names": {**names, "categories": list(api.CATEGORIES)},
            "scope": "Namespaced",
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [dict(c) for c in columns],
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def crd() -> dict[str, Any]:
    """The FederatedFineTune CustomResourceDefinition (apiextensions.k8s.io/v1)."""
    names = {
        "kind": api.KIND,
        "listKind": f"{api.KIND}List",
        "plural": api.PLURAL,
        "singular": api.SINGULAR,
        "shortNames": list(api.SHORT_NAMES),
    }
    return _definition(api.PLURAL, names, PRINTER_COLUMNS, openapi_schema())


def site_crd() -> dict[str, Any]:
    """The FederatedSite CustomResourceDefinition, for the clusters of sites (docs/sites.md)."""
    names = {
        "kind": site.SITE_KIND,
        "listKind": f"{site.SITE_KIND}List",
        "plural": site.SITE_PLURAL,
        "singular": site.SITE_SINGULAR,
        "shortNames": list(site.SITE_SHORT_NAMES),
    }
    return _definition(site.SITE_PLURAL, names, SITE_PRINTER_COLUMNS, site_openapi_schema())


class _Dumper(yaml.SafeDumper):
    """Block style, multi-line strings as literal blocks, no aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def render_crd(definition: dict[str, Any] | None = None) -> str:
    """The text of crds/fedtune.dev_federatedfinetunes.yaml (or of another definition)."""
    body = yaml.dump(
        definition or crd(), Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True
    )
    header = f"# Generated by `{GENERATED_BY}` from fedtune_operator/api/. Do not edit."
    return f"{header}\n---\n{body}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedtune_operator.crd", description=__doc__)
    parser.add_argument("--site", action="store_true", help="the FederatedSite CRD instead")
    args = parser.parse_args(argv)
    sys.stdout.write(render_crd(site_crd() if args.site else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
