"""The field reference, docs/api.md, generated from the same schema as the CRD.

    python -m fedtune_operator.crd_docs > docs/api.md

Every field with its type, default, bounds and description, the CEL rules where they apply, and
the printer columns: what `kubectl explain` would say, in one page a person can read.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import Any

from fedtune_operator import api
from fedtune_operator.crd import (
    PRINTER_COLUMNS,
    SITE_PRINTER_COLUMNS,
    openapi_schema,
    site_openapi_schema,
)

DOCS_GENERATED_BY = "python -m fedtune_operator.crd_docs"


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

<!-- Generated by `{DOCS_GENERATED_BY}` from fedtune_operator/api/. Do not edit. -->

A `FederatedFineTune` (short name `fft`, category `fedtune`) describes one federated LoRA
fine-tuning run: the base model, the adapter, the clients with their data, the rounds and the
storage bucket. The operator runs one Job per selected client per round and one aggregator Job
per round, and reports progress in `status`.

Every default and bound below is generated from `operator/fedtune_operator/api/` (the training,
data, delta, aggregation, privacy and evaluation settings come from the Job contract,
`trainer-image/fedtune_trainer/wire/settings.py` and `wire/delta_settings.py`). The CRD in
`crds/` is generated from the same models, so the API server applies the same defaults:
`kubectl get fft NAME -o yaml` shows every setting a run uses.

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
`Suspended` is `True` while `spec.suspend` holds the run. `NetworkPolicyReady` is `True` once
the run's NetworkPolicy is applied, and `False` (reason `NotOwned`) while a NetworkPolicy of its
name that the run does not own holds its Jobs back; `EgressUnconfined` is `True` (reason
`AnyAddress`) while the derived egress opens a port to any address, `Unknown` without the
operator's policy (docs/install.md, "Network policies"). `reason` is CamelCase;
`lastTransitionTime` changes only when `status` flips. `status.phase` (Pending, Running,
Aggregating, Suspended, Succeeded, Failed) is a one-word summary for people.

## Columns

`kubectl get fft` shows the columns below; `-o wide` adds those of priority 1.

{{columns}}

## Fields
"""


SITE_INTRO = """
# FederatedSite

`fedtune.dev/v1alpha1`, kind `FederatedSite` (short name `fsite`): a data owner's part in a run
that lives in another organization's cluster, created in the data owner's own cluster, where the
operator runs in site mode (docs/sites.md). Its storage identity, signing key, data, data
credentials, Job template and policy never leave that cluster.

## Columns

`kubectl get fsite` shows the columns below; `-o wide` adds those of priority 1.

{columns}

## Fields
"""


def _columns(columns: tuple[dict[str, Any], ...]) -> str:
    rows = ["| Column | JSONPath | Priority |", "|---|---|---|"]
    rows += [
        f"| {c['name']} | `{_cell(c['jsonPath'])}` | {c.get('priority', 0)} |" for c in columns
    ]
    return "\n".join(rows)


def render_docs() -> str:
    """The text of docs/api.md."""
    schema = openapi_schema()
    root_rules = "\n".join(_rules(schema))
    text = DOCS_INTRO.format(root_rules=root_rules, columns=_columns(PRINTER_COLUMNS))
    seen: dict[str, str] = {}
    for part in ("spec", "status"):
        text += "\n" + "\n".join(_sections(schema["properties"][part], part, seen))
    site = site_openapi_schema()
    text += SITE_INTRO.format(columns=_columns(SITE_PRINTER_COLUMNS))
    for part in ("spec", "status"):
        name = f"fsite.{part}"
        text += "\n" + "\n".join(_sections(site["properties"][part], name, seen))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=DOCS_GENERATED_BY, description=__doc__)
    parser.parse_args(argv)
    sys.stdout.write(render_docs())
    return 0


if __name__ == "__main__":
    sys.exit(main())
