"""The generated CRD and docs: committed files current, structural and bounded, and in agreement
with the pydantic models (fields, defaults, bounds, enums) and with the invalid-manifest table."""

from __future__ import annotations

import copy
import io
import json
import re
from collections.abc import Iterator
from contextlib import redirect_stdout
from typing import Any, get_args

import pytest
import yaml
from pydantic import BaseModel

from fedtune_operator import api, crd, crd_docs, validation
from fedtune_trainer.wire.settings import Model
from tests.api.api_cases import EXAMPLE_NAMES, IMMUTABLE_CHANGES, INVALID, REPO, example
from tests.api.test_api_status import full_status

CRD_FILE = REPO / "crds" / "fedtune.dev_federatedfinetunes.yaml"
DOCS_FILE = REPO / "docs" / "api.md"

Path = tuple[str | int, ...]


def committed() -> dict[str, Any]:
    return yaml.safe_load(CRD_FILE.read_text())


def schema() -> dict[str, Any]:
    return committed()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


# --------------------------------------------------------------------------------------------
# The committed files are what the generator prints
# --------------------------------------------------------------------------------------------


def test_committed_crd_is_generated() -> None:
    """Run `python -m fedtune_operator.crd > crds/fedtune.dev_federatedfinetunes.yaml`."""
    out = io.StringIO()
    with redirect_stdout(out):
        assert crd.main([]) == 0
    assert CRD_FILE.read_text() == out.getvalue()


def test_committed_docs_are_generated() -> None:
    """Run `python -m fedtune_operator.crd_docs > docs/api.md`."""
    out = io.StringIO()
    with redirect_stdout(out):
        assert crd_docs.main([]) == 0
    assert DOCS_FILE.read_text() == out.getvalue()


def test_names() -> None:
    body = committed()
    assert body["metadata"]["name"] == "federatedfinetunes.fedtune.dev"
    spec = body["spec"]
    assert spec["group"] == "fedtune.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "FederatedFineTune",
        "listKind": "FederatedFineTuneList",
        "plural": "federatedfinetunes",
        "singular": "federatedfinetune",
        "shortNames": ["fft"],
        "categories": ["fedtune"],
    }
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


# --------------------------------------------------------------------------------------------
# Structural and bounded
# --------------------------------------------------------------------------------------------


def nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from nodes(sub, f"{path}.{name}")
    if "items" in node:
        yield from nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from nodes(node["additionalProperties"], f"{path}[*]")


FORBIDDEN = {"$ref", "oneOf", "allOf", "not", "nullable", "uniqueItems", "propertyNames", "title"}


def test_schema_is_structural() -> None:
    for path, node in nodes(schema()):
        assert not FORBIDDEN & set(node), path
        if node.get("x-kubernetes-int-or-string"):
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
            continue
        assert "anyOf" not in node, path
        assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, (
            path
        )
        assert not ("properties" in node and "additionalProperties" in node), path
        assert node.get("additionalProperties", {}) is not False, path


def test_every_string_list_and_map_is_bounded() -> None:
    unbounded = []
    for path, node in nodes(schema()):
        kind = node.get("type")
        if kind == "string" and "maxLength" not in node:
            unbounded.append(path)
        if kind == "array" and "maxItems" not in node:
            unbounded.append(path)
        if kind == "object" and "additionalProperties" in node and "maxProperties" not in node:
            unbounded.append(path)
    assert unbounded == []


def test_free_form_objects_are_only_the_documented_ones() -> None:
    free = sorted(p for p, n in nodes(schema()) if n.get("x-kubernetes-preserve-unknown-fields"))
    assert free == [
        ".spec.aggregator.affinity",
        ".spec.aggregator.env[].valueFrom",
        ".spec.clients[].affinity",
        ".spec.clients[].env[].valueFrom",
        ".spec.evaluation.affinity",
        ".spec.evaluation.env[].valueFrom",
        ".spec.networkPolicy.dns[].namespaceSelector",
        ".spec.networkPolicy.dns[].podSelector",
        ".spec.networkPolicy.egress[].to[].namespaceSelector",
        ".spec.networkPolicy.egress[].to[].podSelector",
        ".spec.template.affinity",
        ".spec.template.env[].valueFrom",
    ]


def test_every_field_is_described() -> None:
    missing = [
        p
        for p, n in nodes(schema())
        if p and not p.endswith(("[]", "[*]")) and not n.get("description")
    ]
    assert missing == [".metadata"]  # the API server refuses a description there


def test_lists_of_named_entries_are_maps() -> None:
    props = schema()["properties"]
    assert props["spec"]["properties"]["clients"]["x-kubernetes-list-map-keys"] == ["name"]
    status = props["status"]["properties"]
    assert status["conditions"]["x-kubernetes-list-type"] == "map"
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
    assert status["clients"]["x-kubernetes-list-map-keys"] == ["name"]
    assert status["history"]["x-kubernetes-list-map-keys"] == ["round"]
    assert status["history"]["maxItems"] == api.HISTORY_LIMIT


def test_generator_refuses_an_unbounded_list() -> None:
    class Unbounded(Model):
        names: list[str]

    with pytest.raises(crd.SchemaError, match="maxItems"):
        crd.model_schema(Unbounded)


# --------------------------------------------------------------------------------------------
# Agreement with the models: fields
# --------------------------------------------------------------------------------------------


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        if (found := _model_in(arg)) is not None:
            return found
    return None


def _object_at(node: dict[str, Any]) -> dict[str, Any]:
    while "properties" not in node:
        node = node.get("items") or node["additionalProperties"]
    return node


def model_pairs(
    model: type[BaseModel], node: dict[str, Any], path: str
) -> Iterator[tuple[str, type[BaseModel], dict[str, Any]]]:
    yield path, model, node
    for name, info in model.model_fields.items():
        sub_model = _model_in(info.annotation)
        alias = info.alias or name
        if sub_model is not None and alias in node["properties"]:
            yield from model_pairs(
                sub_model, _object_at(node["properties"][alias]), f"{path}.{alias}"
            )


def all_pairs() -> Iterator[tuple[str, type[BaseModel], dict[str, Any]]]:
    props = schema()["properties"]
    yield from model_pairs(api.FederatedFineTuneSpec, props["spec"], "spec")
    yield from model_pairs(api.FederatedFineTuneStatus, props["status"], "status")


def test_every_model_field_is_in_the_schema_and_back() -> None:
    for path, model, node in all_pairs():
        aliases = {info.alias or name for name, info in model.model_fields.items()}
        assert aliases == set(node["properties"]), path


def test_required_fields_agree() -> None:
    for path, model, node in all_pairs():
        required = {info.alias or n for n, info in model.model_fields.items() if info.is_required()}
        assert required == set(node.get("required", [])), path


# --------------------------------------------------------------------------------------------
# Agreement with the models: defaults (as the API server applies them)
# --------------------------------------------------------------------------------------------


def apply_defaults(value: Any, node: dict[str, Any]) -> Any:
    """Structural defaulting as the API server does it: absent fields get their default, then
    defaults apply inside that default."""
    if isinstance(value, dict) and "properties" in node:
        for name, sub in node["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                apply_defaults(value[name], sub)
    elif isinstance(value, dict) and isinstance(node.get("additionalProperties"), dict):
        for item in value.values():
            apply_defaults(item, node["additionalProperties"])
    elif isinstance(value, list) and "items" in node:
        for item in value:
            apply_defaults(item, node["items"])
    return value


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_schema_defaults_equal_model_defaults(name: str) -> None:
    raw = example(name)["spec"]
    defaulted = apply_defaults(copy.deepcopy(raw), schema()["properties"]["spec"])
    assert defaulted == validation.parse_spec(raw).wire()


def test_schema_defaults_equal_model_defaults_for_status() -> None:
    raw: dict[str, Any] = {"conditions": [], "clients": [{"name": "a"}], "history": [{"round": 1}]}
    raw["communication"] = {}
    defaulted = apply_defaults(copy.deepcopy(raw), schema()["properties"]["status"])
    assert defaulted == validation.parse_status(raw).wire()


# --------------------------------------------------------------------------------------------
# Agreement with the models: bounds, enums, types, lengths (probing the models with values
# taken from the schema)
# --------------------------------------------------------------------------------------------


def leaves(node: dict[str, Any], path: Path, doc: Any) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every scalar (and int-or-string) field of the schema, located in `doc` (a full object):
    the first item of a list, an existing key (or a new one) of a map."""
    if node.get("x-kubernetes-int-or-string") or node.get("type") not in ("object", "array"):
        yield path, node
    elif "properties" in node:
        for name, sub in node["properties"].items():
            value = doc.get(name) if isinstance(doc, dict) else None
            yield from leaves(sub, (*path, name), value)
    elif "items" in node:
        assert doc, f"the full object needs an item at {path}"
        yield from leaves(node["items"], (*path, 0), doc[0])
    elif isinstance(node.get("additionalProperties"), dict):
        key = next(iter(doc)) if doc else "example.com/probe"
        yield from leaves(node["additionalProperties"], (*path, key), (doc or {}).get(key))


def put(doc: Any, path: Path, value: Any) -> Any:
    doc = copy.deepcopy(doc)
    target = doc
    for step in path[:-1]:
        target = target[step] if isinstance(step, int) else target.setdefault(step, {})
    target[path[-1]] = value
    return doc


def probes(node: dict[str, Any]) -> Iterator[tuple[Any, bool]]:
    """(value, accepted?) pairs that the schema node decides."""
    kind = node.get("type")
    if node.get("x-kubernetes-int-or-string"):
        yield from [(0, True), (-1, False), ("500m", True), ("lots", False), (True, False)]
        return
    if "enum" in node:
        yield from ((v, True) for v in node["enum"])
        yield ("no-such-value" if kind == "string" else 123457, False)
    if kind in ("integer", "number"):
        step = 1 if kind == "integer" else 1e-6
        if "minimum" in node:
            low, exclusive = node["minimum"], node.get("exclusiveMinimum", False)
            yield low, not exclusive
            yield low - step, False
            if exclusive:
                yield low + step, True
        if "maximum" in node:
            high, exclusive = node["maximum"], node.get("exclusiveMaximum", False)
            yield high, not exclusive
            yield high + step, False
            if exclusive:
                yield high - step, True
        yield "1", False
    if kind == "integer":
        yield 1.5, False
    if kind == "boolean":
        yield from [(True, True), (False, True), ("true", False)]
    if kind == "string":
        yield 7, False
        if node.get("format") == "date-time":
            yield from [("2025-01-01T00:00:00Z", True), ("yesterday", False)]
        elif "pattern" in node:
            yield "has space !", False
        elif "enum" not in node:
            yield "a" * node["maxLength"], True
            yield "a" * (node["maxLength"] + 1), False
            if node.get("minLength"):
                yield "", False


def _probe_cases() -> Iterator[Any]:
    props = crd.openapi_schema()["properties"]
    full_spec = example("full")["spec"]
    full = full_status().wire()
    for root, doc in (("spec", full_spec), ("status", full)):
        for path, node in leaves(props[root], (), doc):
            for value, accepted in probes(node):
                label = ".".join(map(str, (root, *path)))
                yield pytest.param(root, doc, path, value, accepted, id=f"{label}={value!r:.20}")


def render(root: str, path: Path) -> str:
    """A field path as the models' messages write it: map keys that are not identifiers in []."""
    out = root
    for step in path:
        if isinstance(step, int) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", step):
            out += f"[{step}]"
        else:
            out += f".{step}"
    return out


def _field_problems(root: str, doc: Any, path: Path, value: Any) -> list[str]:
    """The problems the models report at `path` (other fields' complaints don't count: an
    at-the-bound value may trip a cross-field rule, which is not what is probed)."""
    parse = validation.parse_spec if root == "spec" else validation.parse_status
    try:
        parse(put(doc, path, value))
    except validation.SpecError as e:
        return [p for p in e.problems if p.split(": ")[0] == render(root, path)]
    return []


@pytest.mark.parametrize(("root", "doc", "path", "value", "accepted"), list(_probe_cases()))
def test_models_enforce_the_schema_bounds(
    root: str, doc: Any, path: Path, value: Any, accepted: bool
) -> None:
    problems = _field_problems(root, doc, path, value)
    assert (problems == []) is accepted, problems


POD_FIELDS = {info.alias or name for name, info in api.PodSettings.model_fields.items()}
ALTERNATIVES = {".spec.aggregation.clientFraction", ".spec.training.localEpochs"}
"""Fields full.yaml leaves out: each replaces one it sets (clientsPerRound, localSteps)."""


def _pod_normalized(path: str) -> str:
    """Pod settings recur in template, aggregator, evaluation and clients; showing each once is
    enough."""
    for prefix in (".spec.template.", ".spec.aggregator.", ".spec.evaluation.", ".spec.clients[]."):
        rest = path.removeprefix(prefix)
        if rest != path and re.split(r"[.\[]", rest)[0] in POD_FIELDS:
            return f"pod.{rest}"
    return path


def test_full_example_sets_every_spec_field() -> None:
    def paths(value: Any, prefix: str) -> set[str]:
        out = {prefix}
        if isinstance(value, dict):
            for k, v in value.items():
                out |= paths(v, f"{prefix}.{k}")
        elif isinstance(value, list):
            for v in value:
                out |= paths(v, f"{prefix}[]")
        return out

    spec = schema()["properties"]["spec"]
    wanted = {_pod_normalized(p) for p, _ in nodes(spec, ".spec") if "[*]" not in p}
    have = {_pod_normalized(p) for p in paths(example("full")["spec"], ".spec")}
    assert wanted - have == ALTERNATIVES


# --------------------------------------------------------------------------------------------
# CEL rules: each one is exercised by the invalid-manifest table (or the immutability test)
# --------------------------------------------------------------------------------------------


def cel_rules(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, str]]]:
    for rule in node.get("x-kubernetes-validations", []):
        yield path + rule.get("fieldPath", ""), rule
    for name, sub in node.get("properties", {}).items():
        yield from cel_rules(sub, f"{path}.{name}" if path else name)
    if "items" in node:
        yield from cel_rules(node["items"], f"{path}[0]")


def test_every_cel_rule_has_an_invalid_manifest() -> None:
    fields = {case.field for case in INVALID}
    by_rule: dict[str, set[str]] = {}
    for where, rule in cel_rules(schema()["properties"]["spec"], "spec"):
        by_rule.setdefault(rule["rule"], set()).add(where)
    uncovered = {rule: where for rule, where in by_rule.items() if not where & fields}
    assert uncovered == {}


def test_root_rules_are_the_immutability_rules() -> None:
    """Each row of IMMUTABLE_ONCE_STARTED is a rule of the root schema, and each is exercised on
    a real API server by a change in IMMUTABLE_CHANGES (test_crd_apiserver.py)."""
    rules = schema()["x-kubernetes-validations"]
    assert rules == [dict(r) for r in api.ROOT_RULES]
    immutable = [
        r["fieldPath"].lstrip(".") for r in rules if r.get("reason") == "FieldValueForbidden"
    ]
    assert immutable == [row.path for row in api.IMMUTABLE_ONCE_STARTED]
    assert {field for _, _, field in IMMUTABLE_CHANGES} == {*immutable, "spec.rounds"}


def test_run_name_is_a_dns_label_in_the_schema() -> None:
    name = schema()["properties"]["metadata"]["properties"]["name"]
    assert (name["maxLength"], name["pattern"]) == (api.RUN_NAME_MAX, api.RUN_NAME_PATTERN)


# --------------------------------------------------------------------------------------------
# Printer columns
# --------------------------------------------------------------------------------------------


def test_printer_columns() -> None:
    columns = committed()["spec"]["versions"][0]["additionalPrinterColumns"]
    default = [c["name"] for c in columns if not c.get("priority")]
    wide = [c["name"] for c in columns if c.get("priority") == 1]
    assert default == ["Phase", "Round", "Clients", "Loss", "Reduction", "Age"]
    assert wide == ["Algorithm", "Eval Loss", "Succeeded", "Adapter"]
    for column in columns:
        path = column["jsonPath"]
        assert "[-1]" not in path, "select conditions by type"
        assert "[0]" not in path, "select conditions by type"
        if path.startswith(".metadata"):
            continue
        node = schema()
        for part in re.sub(r"\[\?\(.*\)\]", "[]", path).strip(".").split("."):
            array = part.endswith("[]")
            node = node["properties"][part.removesuffix("[]")]
            if array:
                node = node["items"]
        expected = {"string": "string", "number": "number", "integer": "integer"}[node["type"]]
        assert column["type"] == expected, path


def test_generated_yaml_round_trips_the_crd() -> None:
    assert yaml.safe_load(crd.render_crd()) == json.loads(json.dumps(crd.crd()))
