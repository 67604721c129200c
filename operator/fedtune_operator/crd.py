"""Generate the FederatedFineTune CRD and its field reference from `fedtune_operator.api`.

    python -m fedtune_operator.crd          > crds/fedtune.dev_federatedfinetunes.yaml
    python -m fedtune_operator.crd --docs   > docs/api.md

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
import json
import sys
from collections.abc import Iterator
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import core_schema

from fedtune_operator import api

CRD_NAME = f"{api.PLURAL}.{api.GROUP}"
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


def openapi_schema() -> dict[str, Any]:
    """The CRD's openAPIV3Schema: the object, its spec and status, and the whole-object rules."""
    return _ordered(
        {
            "description": f"{api.KIND}: {api.FederatedFineTuneSpec.__doc__.splitlines()[0]}",
            "type": "object",
            "required": ["spec"],
            "properties": {
                "apiVersion": {
                    "description": "APIVersion of the object: fedtune.dev/v1alpha1.",
                    "type": "string",
                    "maxLength": 253,
                },
                "kind": {
                    "description": "Kind of the object: FederatedFineTune.",
                    "type": "string",
                    "maxLength": 63,
                },
                # The API server allows nothing on metadata but name and generateName rules.
                "metadata": {
                    "type": "object",
                    "properties": {
                        "name": {
                            "description": "The run's name: a DNS label, because it is the "
                            "fedtune.dev/run label value of every Job.",
                            "type": "string",
                            "maxLength": api.RUN_NAME_MAX,
                            "pattern": api.RUN_NAME_PATTERN,
                        }
                    },
                },
                "spec": model_schema(api.FederatedFineTuneSpec),
                "status": model_schema(api.FederatedFineTuneStatus),
            },
            "x-kubernetes-validations": [dict(r) for r in api.ROOT_RULES],
        }
    )


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition (apiextensions.k8s.io/v1)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/part-of": "fedtune"}},
        "spec": {
            "group": api.GROUP,
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": list(api.CATEGORIES),
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [dict(c) for c in PRINTER_COLUMNS],
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


class _Dumper(yaml.SafeDumper):
    """Block style, multi-line strings as literal blocks, no aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def render_crd() -> str:
    """The text of crds/fedtune.dev_federatedfinetunes.yaml."""
    body = yaml.dump(crd(), Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)
    header = f"# Generated by `{GENERATED_BY}` from fedtune_operator/api/. Do not edit."
    return f"{header}\n---\n{body}"


# --------------------------------------------------------------------------------------------
# The field reference (docs/api.md)
# --------------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _type(node: dict[str, Any]) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "int-or-string"
    kind = node.get("type", "")
    if kind == "array":
        return f"[]{_type(node['items'])}"
    if kind == "object" and "additionalProperties" in node:
        return f"map[string]{_type(node['additionalProperties'])}"
    if kind == "object" and node.get("x-kubernetes-preserve-unknown-fields"):
        return "object (free-form)"
    return f"{kind} ({node['format']})" if "format" in node else kind


_BOUNDS = (
    ("minLength", "length >="),
    ("maxLength", "length <="),
    ("minItems", "items >="),
    ("maxItems", "items <="),
    ("minProperties", "keys >="),
    ("maxProperties", "keys <="),
)


def _constraints(node: dict[str, Any], required: bool = False) -> str:
    parts = ["required"] if required else []
    if "enum" in node:
        parts.append("one of " + ", ".join(f"`{json.dumps(v)}`" for v in node["enum"]))
    if "minimum" in node:
        parts.append(f"{'>' if node.get('exclusiveMinimum') else '>='} {node['minimum']}")
    if "maximum" in node:
        parts.append(f"{'<' if node.get('exclusiveMaximum') else '<='} {node['maximum']}")
    for key, label in _BOUNDS:
        if node.get(key) and not (key == "maxLength" and "enum" in node):
            parts.append(f"{label} {node[key]}")
    if "pattern" in node:
        parts.append(f"pattern `{node['pattern']}`")
    if node.get("x-kubernetes-list-type") == "map":
        parts.append(f"unique by `{', '.join(node['x-kubernetes-list-map-keys'])}`")
    elif node.get("x-kubernetes-list-type") == "set":
        parts.append("unique")
    inner = node.get("items") or node.get("additionalProperties")
    if isinstance(inner, dict) and "properties" not in inner and (text := _constraints(inner)):
        parts.append(f"{'each item' if 'items' in node else 'each value'}: {text}")
    return "; ".join(parts)


def _rules(node: dict[str, Any]) -> list[str]:
    out = []
    for rule in node.get("x-kubernetes-validations", []):
        where = f" (reported at `{rule['fieldPath'].lstrip('.')}`)" if "fieldPath" in rule else ""
        message = rule.get("message", "see the rule")
        out.append(f"- {message}{where}: `{rule['rule']}`")
    return out


def _sections(node: dict[str, Any], path: str, seen: dict[str, str]) -> Iterator[str]:
    """One section per object: its description, a table of its fields, its CEL rules. An object
    already documented under another path (pod settings recur) points there instead."""
    yield f"### `{path}`\n"
    key = json.dumps(node, sort_keys=True)
    if key in seen:
        yield f"Same fields as [`{seen[key]}`](#{_anchor(seen[key])}).\n"
        return
    seen[key] = path
    if node.get("description"):
        yield node["description"].strip() + "\n"
    rows = ["| Field | Type | Default | Validation | Description |", "|---|---|---|---|---|"]
    children: list[tuple[str, dict[str, Any]]] = []
    rules = _rules(node)
    required = set(node.get("required", []))
    for name, sub in node.get("properties", {}).items():
        default = f"`{json.dumps(sub['default'])}`" if "default" in sub else ""
        summary = (sub.get("description") or "").strip().split("\n\n")[0]
        rows.append(
            f"| `{name}` | {_cell(_type(sub))} | {_cell(default)} | "
            f"{_cell(_constraints(sub, name in required))} | {_cell(summary)} |"
        )
        item = sub["items"] if sub.get("type") == "array" else sub
        if item.get("properties"):
            children.append((f"{path}.{name}{'[]' if item is not sub else ''}", item))
        if item is not sub or not item.get("properties"):
            # Rules on a list or a map itself (not on an object with its own section).
            rules += [r.replace("- ", f"- `{name}`: ", 1) for r in _rules(sub)]
    yield "\n".join(rows) + "\n"
    if rules:
        yield "Rules checked at admission (CEL):\n\n" + "\n".join(rules) + "\n"
    for child_path, child in children:
        yield from _sections(child, child_path, seen)


def _anchor(path: str) -> str:
    """GitHub's heading anchor for a heading that is just `path` in backticks."""
    return "".join(ch for ch in path.lower() if ch.isalnum() or ch in "-_")


DOCS_INTRO = f"""\
# The FederatedFineTune API ({api.API_VERSION})

<!-- Generated by `{GENERATED_BY} --docs` from fedtune_operator/api/. Do not edit. -->

A `FederatedFineTune` (short name `fft`, category `fedtune`) describes one federated LoRA
fine-tuning run: the base model, the adapter, the clients with their data, the rounds and the
storage bucket. The operator runs one Job per selected client per round and one aggregator Job
per round, and reports progress in `status`.

Every default and bound below is generated from `operator/fedtune_operator/api/` (the training,
data, delta, aggregation, privacy and evaluation settings come from the Job contract,
`trainer-image/fedtune_trainer/task.py`). The CRD in `crds/` is generated from the same models, so
the API server applies the same defaults: `kubectl get fft NAME -o yaml` shows every setting a run
uses.

## Validation

The API server rejects a manifest that breaks the schema below (types, bounds, patterns, enums),
a CEL rule (listed under each object), or one of these rules on the whole object:

{{root_rules}}

The operator parses the spec with the same models and, because Helm never upgrades an installed
CRD, checks the cross-field rules again (`fedtune_operator.validation.validate_spec`). It also
checks what the CRD leaves to it:

- with `storage.cleanupPolicy: Delete`, no data, model or tokenizer may lie under `storage.uri`,
  which deleting the run removes;
- `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` may not be set in `env` when
  `storage.credentialsSecret` provides them;
- map keys (labels, annotations, `nodeSelector`, resource names) must be qualified names: a CRD
  schema cannot constrain map keys.

A spec that fails these checks is not retried: the run gets `Failed=True` with reason
`InvalidSpec` and an event naming the field.

A run *has started* once the operator has set `status.startTime` (it does so before creating the
first Job) or `status.currentRound` is above 0. From then on `baseModel`, `tokenizer`, `adapter`,
`storage.uri` and the client names (in order) cannot change; `rounds` may grow but not fall below
`status.currentRound`. Everything else may change between rounds and applies from the next round.

Pod-level objects are a bounded subset of their core/v1 shapes (`resources`, `tolerations`,
`env`, `imagePullSecrets`); `affinity` and `env[].valueFrom` are kept as given
(`x-kubernetes-preserve-unknown-fields`) and checked by the API server when a Job is created. A
client's (or `aggregator`'s) pod settings are merged over `template`: `resources.limits`,
`resources.requests` and `nodeSelector` key by key, `env` by name, `tolerations` appended,
`affinity` and `serviceAccountName` replaced.

## Status

`status.conditions` is the source of truth: `Progressing`, `Succeeded` and `Failed` are mutually
exclusive (exactly one is `True` once the operator has seen the run) and flip together;
`Suspended` is `True` while `spec.suspend` holds the run. `reason` is CamelCase;
`lastTransitionTime` changes only when `status` flips. `status.phase` (Pending, Running,
Aggregating, Suspended, Succeeded, Failed) is a one-word summary for people.

## Columns

`kubectl get fft` shows the columns below; `-o wide` adds those of priority 1.

{{columns}}

## Fields
"""


def render_docs() -> str:
    """The text of docs/api.md."""
    schema = openapi_schema()
    root_rules = "\n".join(_rules(schema))
    columns = ["| Column | JSONPath | Priority |", "|---|---|---|"]
    columns += [
        f"| {c['name']} | `{_cell(c['jsonPath'])}` | {c.get('priority', 0)} |"
        for c in PRINTER_COLUMNS
    ]
    text = DOCS_INTRO.format(root_rules=root_rules, columns="\n".join(columns))
    seen: dict[str, str] = {}
    for part in ("spec", "status"):
        text += "\n" + "\n".join(_sections(schema["properties"][part], part, seen))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedtune_operator.crd", description=__doc__)
    parser.add_argument("--docs", action="store_true", help="print docs/api.md instead")
    args = parser.parse_args(argv)
    sys.stdout.write(render_docs() if args.docs else render_crd())
    return 0


if __name__ == "__main__":
    sys.exit(main())
