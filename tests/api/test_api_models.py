"""The spec models: defaults, every validation rule, and messages that name the field."""

from __future__ import annotations

import tomllib
import types
from typing import Any

import pytest

from fedtune_operator import api, manifests, pod_settings, validation
from fedtune_trainer.wire import contract, settings
from fedtune_trainer.wire.settings import StorageLocation
from tests.api.api_cases import (
    EXAMPLE_NAMES,
    INVALID,
    REPO,
    VALID_EDGES,
    Invalid,
    base,
    example,
)


def operator_problems(body: dict[str, Any]) -> list[str]:
    """What the operator reports for a manifest: shape problems, else cross-field problems."""
    try:
        spec = validation.parse_spec(body["spec"])
    except validation.SpecError as e:
        return e.problems
    return validation.validate_spec(spec, name=body["metadata"]["name"])


def spec_with(**changes: Any) -> api.FederatedFineTuneSpec:
    body = base()["spec"]
    body.update(changes)
    return validation.parse_spec(body)


def get(wire: dict[str, Any], path: str) -> Any:
    value: Any = wire
    for part in path.replace("[", ".").replace("]", "").split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


# --------------------------------------------------------------------------------------------
# Defaults
# --------------------------------------------------------------------------------------------

DEFAULTS = [
    ("rounds", 10),
    ("adapter.type", "lora"),
    ("adapter.r", 8),
    ("adapter.targetModules", ["q_proj", "v_proj"]),
    ("training.localSteps", 20),
    ("training.learningRate", 2e-4),
    ("data.format", "text"),
    ("clients[0].weight", 1.0),
    ("aggregation.algorithm", "fedavg"),
    ("aggregation.maxRoundRetries", 2),
    ("aggregation.samplingSeed", 0),
    ("delta.dtype", "bf16"),
    ("delta.topK", 1.0),
    ("delta.quantization.bits", 0),
    ("delta.quantization.blockSize", 64),
    ("delta.compression", "zstd"),
    ("privacy.noiseMultiplier", 0.0),
    ("evaluation.everyRounds", 1),
    ("storage.forcePathStyle", True),
    ("storage.cleanupPolicy", "Retain"),
    ("template.image", "ghcr.io/fedtune/trainer:0.1.0"),
    ("template.imagePullPolicy", "IfNotPresent"),
    ("backoffLimit", 2),
    ("suspend", False),
]

ABSENT_BY_DEFAULT = [
    "tokenizer",
    "aggregation.minClients",
    "aggregation.clientsPerRound",
    "aggregation.clientFraction",
    "aggregation.roundTimeoutSeconds",
    "privacy.clipNorm",
    "evaluation.dataUri",
    "storage.endpoint",
    "storage.credentialsSecret",
    "template.resources",
    "template.labels",
    "aggregator",
    "activeDeadlineSeconds",
    "ttlSecondsAfterFinished",
]


@pytest.mark.parametrize(("path", "expected"), DEFAULTS)
def test_default(path: str, expected: Any) -> None:
    assert get(validation.parse_spec(base()["spec"]).wire(), path) == expected


@pytest.mark.parametrize("path", ABSENT_BY_DEFAULT)
def test_optional_field_is_absent_by_default(path: str) -> None:
    with pytest.raises(KeyError):
        get(validation.parse_spec(base()["spec"]).wire(), path)


def test_credentials_secret_key_names_default_to_the_aws_variables() -> None:
    body = base()["spec"]
    body["storage"]["credentialsSecret"] = {"name": "s3-creds"}
    creds = validation.parse_spec(body).storage.credentials_secret
    assert creds is not None
    assert (creds.access_key_id_key, creds.secret_access_key_key) == contract.AWS_CREDENTIAL_ENV


def test_default_image_is_pinned_to_the_package_version() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["version"] == api.TRAINER_VERSION
    assert f"ghcr.io/fedtune/trainer:{project['version']}" == api.DEFAULT_IMAGE


def test_bounds_reused_from_the_job_contract() -> None:
    assert api.MAX_ROUNDS == 100_000
    assert api.MAX_CLIENTS == 1000


def test_parsing_is_idempotent() -> None:
    spec = validation.parse_spec(example("full")["spec"])
    assert validation.parse_spec(spec.wire()) == spec


# --------------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_example_is_valid(name: str) -> None:
    assert operator_problems(example(name)) == []


@pytest.mark.parametrize(
    ("name", "model"), [("demo", "tiny"), ("demo-smollm2", "smollm2-135m-instruct")]
)
def test_demo_example_matches_the_demo_setup(name: str, model: str) -> None:
    """devcluster.demo uploads to these paths and watches the run named demo."""
    manifest = example(name)
    spec = validation.parse_spec(manifest["spec"])
    assert manifest["metadata"]["name"] == "demo"
    assert [c.name for c in spec.clients] == ["alice", "bob", "carol"]
    assert all(c.data_uri == f"s3://fedtune-demo/data/{c.name}.jsonl" for c in spec.clients)
    assert spec.base_model == f"s3://fedtune-demo/models/{model}"
    assert spec.storage.uri == "s3://fedtune-demo/runs/demo"
    assert spec.storage.endpoint is not None
    assert spec.storage.endpoint.startswith("http://127.0.0.1:")
    assert spec.storage.credentials_secret is not None
    assert spec.storage.credentials_secret.name == "fedtune-s3"


# --------------------------------------------------------------------------------------------
# Invalid manifests: one problem each, named by its field path
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", INVALID, ids=lambda c: c.id)
def test_invalid_manifest_is_reported_at_its_field(case: Invalid) -> None:
    problems = operator_problems(case.manifest())
    assert len(problems) == 1, problems
    path, _, message = problems[0].partition(": ")
    assert path == case.model_path
    assert message


@pytest.mark.parametrize("case", VALID_EDGES, ids=lambda c: c.id)
def test_manifest_at_the_edge_of_a_rule_is_valid(case: Invalid) -> None:
    assert operator_problems(case.manifest()) == []


def test_base_of_the_invalid_cases_is_valid() -> None:
    assert operator_problems(base()) == []


def test_every_problem_is_reported_at_once() -> None:
    body = base()["spec"]
    body.update(rounds=0, delta={"topK": 2})
    body["clients"][1]["name"] = "Not_A_Label"
    with pytest.raises(validation.SpecError) as err:
        validation.parse_spec(body)
    paths = sorted(p.partition(":")[0] for p in err.value.problems)
    assert paths == ["spec.clients[1].name", "spec.delta.topK", "spec.rounds"]
    assert isinstance(err.value, ValueError)
    assert str(err.value) == "; ".join(err.value.problems)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"name": "Hospital_A"}, "spec.clients[0].name: must be a DNS label"),
        ({"name": "Hospital_A"}, "(got 'Hospital_A')"),
        ({"dataUri": "ftp://x/y"}, "must be s3://<bucket>/<key>, file:///<path> or pvc://"),
        ({"nodeSelector": {"zone": "a b"}}, "spec.clients[0].nodeSelector.zone: must be a label"),
        ({"nodeSelector": {"bad key": "a"}}, "key 'bad key': must be a qualified name"),
        ({"resources": {"limits": {"cpu": -1}}}, "must be a Kubernetes quantity"),
        ({"surprise": 1}, "spec.clients[0].surprise: unknown field"),
    ],
)
def test_message_says_what_is_wrong(change: dict[str, Any], expected: str) -> None:
    body = base()["spec"]
    body["clients"][0].update(change)
    with pytest.raises(validation.SpecError) as err:
        validation.parse_spec(body)
    assert expected in str(err.value)


@pytest.mark.parametrize(("byzantine", "quorum"), [(0, 3), (1, 5), (2, 7), (300, 603)])
def test_krum_quorum_is_2f_plus_3(byzantine: int, quorum: int) -> None:
    """The one statement of the rule (the CRD, the operator and the aggregator use it)."""
    assert settings.krum_min_clients(byzantine) == quorum
    assert settings.KRUM_QUORUM == "2f + 3"


def test_krum_message_names_the_rule_and_the_numbers() -> None:
    spec = spec_with(aggregation={"algorithm": "multiKrum", "byzantineClients": 2})
    assert validation.validate_spec(spec) == [
        "spec.aggregation.byzantineClients: multiKrum with byzantineClients 2 needs at least "
        "2f + 3 = 7 clients per round, but the run selects 2"
    ]


def test_missing_field_is_named() -> None:
    body = base()["spec"]
    del body["clients"][1]["name"]
    with pytest.raises(validation.SpecError, match=r"^spec\.clients\[1\]\.name: Field required$"):
        validation.parse_spec(body)


@pytest.mark.parametrize(
    ("field", "value"),
    [("rounds", "10"), ("rounds", 10.0), ("rounds", True), ("suspend", "yes"), ("suspend", 1)],
)
def test_json_types_are_strict_like_the_api_server(field: str, value: Any) -> None:
    with pytest.raises(validation.SpecError, match=f"^spec.{field}: "):
        spec_with(**{field: value})


def test_parse_spec_takes_a_kopf_style_read_only_mapping() -> None:
    def frozen(value: Any) -> Any:
        if isinstance(value, dict):
            return types.MappingProxyType({k: frozen(v) for k, v in value.items()})
        if isinstance(value, list):
            return tuple(frozen(v) for v in value)
        return value

    raw = example("full")["spec"]
    assert validation.parse_spec(frozen(raw)) == validation.parse_spec(raw)


# --------------------------------------------------------------------------------------------
# Accepted and rejected values of the patterned fields
# --------------------------------------------------------------------------------------------

ACCEPTED = [
    ("baseModel", "gpt2"),
    ("baseModel", "Qwen/Qwen2.5-0.5B"),
    ("baseModel", "s3://fedtune-models/llama/"),
    ("baseModel", "pvc://models-pvc/llama-3.2-1b"),
    ("baseModel", "file:///models/tiny"),
    ("clients[0].dataUri", "s3://bucket/prefix/"),
    ("clients[0].dataUri", "s3://bucket/year=2024/part-0.jsonl"),
    ("clients[0].dataUri", "pvc://data.claim/train.jsonl"),
    ("clients[0].dataUri", "pvc://data-claim"),
    ("clients[0].dataUri", "file:///data/a.jsonl"),
    ("clients[0].name", "a"),
    ("clients[0].name", "a" * 40),
    ("clients[0].name", "hospital-1"),
    ("storage.uri", "s3://bucket"),
    ("storage.uri", "s3://my.bucket/runs/demo_1/"),
    ("storage.uri", "file:///var/lib/fedtune/runs"),
    ("storage.endpoint", "http://127.0.0.1:9000"),
    ("storage.endpoint", "https://s3.eu-west-1.amazonaws.com"),
    ("storage.endpoint", "http://[::1]:9000"),
    ("clients[0].resources.limits.nvidia.com/gpu", 1),
    ("clients[0].resources.limits.cpu", "500m"),
    ("clients[0].resources.limits.memory", "16Gi"),
    ("clients[0].resources.limits.memory", "1e9"),
    ("template.labels.kueue.x-k8s.io/queue-name", "gpu-queue"),
    ("template.labels.team", ""),
    ("template.image", "registry.example.com:5000/fedtune/trainer@sha256:0123abcd"),
    ("template.env", [{"name": "HF_HOME", "value": "/tmp/hf"}]),
]

REJECTED = [
    ("baseModel", "pvc://models-pvc"),
    ("baseModel", "s3://b/model"),
    ("baseModel", "org/name/extra"),
    ("clients[0].dataUri", "s3://bucket/../secret.jsonl"),
    ("clients[0].dataUri", "s3://bucket/a b.jsonl"),
    ("clients[0].dataUri", "file://relative/path"),
    ("clients[0].name", "-a"),
    ("clients[0].name", "a-"),
    ("clients[0].name", "a.b"),
    ("clients[0].name", ""),
    ("storage.uri", "s3://bucket/runs/./x"),
    ("storage.uri", "s3://bucket/run space"),
    ("storage.uri", "s3://bucket//double"),
    ("storage.uri", "gs://bucket/x"),
    ("storage.endpoint", "127.0.0.1:9000"),
    ("clients[0].resources.limits.cpu", "1.5 cores"),
    ("template.labels.team", "a" * 64),
    ("template.labels.-bad", "x"),
    ("template.image", "trainer image"),
    ("template.env", [{"name": "1ABC", "value": "x"}]),
]


MAP_FIELDS = {"limits", "labels"}


def _set(body: dict[str, Any], path: str, value: Any) -> None:
    """Set `path` in a spec; after a map field the rest of the path is one key (keys hold dots)."""
    parts = path.replace("[", ".[").split(".")
    target: Any = body
    for i, part in enumerate(parts[:-1]):
        if part.startswith("["):
            target = target[int(part[1:-1])]
            continue
        target = target.setdefault(part, {})
        if part in MAP_FIELDS:
            target[".".join(parts[i + 1 :])] = value
            return
    target[parts[-1]] = value


@pytest.mark.parametrize(("path", "value"), ACCEPTED)
def test_value_accepted(path: str, value: Any) -> None:
    body = base()
    _set(body["spec"], path, value)
    assert operator_problems(body) == []


@pytest.mark.parametrize(("path", "value"), REJECTED)
def test_value_rejected(path: str, value: Any) -> None:
    body = base()
    _set(body["spec"], path, value)
    problems = operator_problems(body)
    assert len(problems) == 1, problems
    assert problems[0].startswith("spec." + path.split(".")[0].split("[")[0])


# --------------------------------------------------------------------------------------------
# Deep validation
# --------------------------------------------------------------------------------------------


def test_cleanup_delete_refuses_data_under_the_storage_root() -> None:
    body = base()["spec"]
    body["storage"] = {"uri": "s3://bucket/runs/a", "cleanupPolicy": "Delete"}
    body["clients"][1]["dataUri"] = "s3://bucket/runs/a/data/b.jsonl"
    body["baseModel"] = "s3://bucket/runs/a/model"
    problems = validation.validate_spec(validation.parse_spec(body))
    assert [p.partition(":")[0] for p in problems] == ["spec.baseModel", "spec.clients[1].dataUri"]
    assert "cleanupPolicy Delete" in problems[0]


@pytest.mark.parametrize(
    ("policy", "data_uri"),
    [("Retain", "s3://bucket/runs/a/data.jsonl"), ("Delete", "s3://bucket/runs/ab/data.jsonl")],
)
def test_cleanup_check_only_for_delete_and_only_under_the_root(policy: str, data_uri: str) -> None:
    body = base()["spec"]
    body["storage"] = {"uri": "s3://bucket/runs/a", "cleanupPolicy": policy}
    body["clients"][0]["dataUri"] = data_uri
    assert validation.validate_spec(validation.parse_spec(body)) == []


@pytest.mark.parametrize(
    ("training", "aggregation", "privacy", "problems"),
    [
        ({"driftControl": "scaffold"}, {}, {}, 0),
        ({"driftControl": "scaffold"}, {"algorithm": "fedadam"}, {}, 0),
        ({"driftControl": "scaffold", "proximalMu": 0.1}, {}, {"clipNorm": 1.0}, 0),
        ({"proximalMu": 0.1}, {"algorithm": "median"}, {"noiseMultiplier": 1, "clipNorm": 1}, 0),
        ({"driftControl": "scaffold"}, {"algorithm": "median"}, {}, 1),
        ({"driftControl": "scaffold"}, {"algorithm": "trimmedMean"}, {}, 1),
        ({"driftControl": "scaffold"}, {"algorithm": "krum", "byzantineClients": 0}, {}, 1),
        ({"driftControl": "scaffold"}, {"algorithm": "multiKrum"}, {}, 1),
        ({"driftControl": "scaffold"}, {}, {"noiseMultiplier": 1.0, "clipNorm": 1.0}, 1),
        ({"driftControl": "scaffold"}, {"lora": "exact"}, {}, 1),
        (
            {"driftControl": "scaffold"},
            {"algorithm": "krum"},
            {"noiseMultiplier": 1.0, "clipNorm": 1.0},
            2,
        ),
    ],
)
def test_scaffold_needs_a_mean_and_no_dp_noise(
    training: dict, aggregation: dict, privacy: dict, problems: int
) -> None:
    body = base()["spec"]
    body["training"] = {**body.get("training", {}), **training}
    body["aggregation"] = {**body.get("aggregation", {}), **aggregation}
    body["privacy"] = {**body.get("privacy", {}), **privacy}
    found = validation.validate_spec(validation.parse_spec(body))
    # (The Krum rows also break Krum's own quorum with base()'s clients: not this test's rule.)
    scaffold = [p for p in found if p.startswith("spec.training.driftControl: scaffold")]
    assert len(scaffold) == problems, found
    assert all(p.startswith(("spec.training", "spec.aggregation.byzantineClients")) for p in found)


def test_aws_env_conflicts_with_the_credentials_secret() -> None:
    body = base()["spec"]
    body["clients"][0]["env"] = [{"name": "AWS_ACCESS_KEY_ID", "value": "x"}]
    assert validation.validate_spec(validation.parse_spec(body)) == []
    body["storage"]["credentialsSecret"] = {"name": "s3"}
    problems = validation.validate_spec(validation.parse_spec(body))
    assert len(problems) == 1
    assert problems[0].startswith("spec.clients[0].env[0].name: AWS_ACCESS_KEY_ID comes from")


@pytest.mark.parametrize("where", ["template", "aggregator"])
def test_env_rules_hold_for_template_and_aggregator(where: str) -> None:
    body = base()["spec"]
    body[where] = {"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}
    problems = validation.validate_spec(validation.parse_spec(body))
    assert problems == [f"spec.{where}.env[1].name: duplicate name 'A'"]


def test_reserved_annotation_prefix() -> None:
    body = base()["spec"]
    body["template"] = {"annotations": {"fedtune.dev/round": "3"}}
    problems = validation.validate_spec(validation.parse_spec(body))
    assert problems == [
        "spec.template.annotations[fedtune.dev/round]: keys under fedtune.dev/ are reserved "
        "for the operator"
    ]


@pytest.mark.parametrize(
    ("name", "ok"),
    [("demo", True), ("a" * 63, True), ("a" * 64, False), ("Demo", False), ("a.b", False)],
)
def test_run_name(name: str, ok: bool) -> None:
    assert (validation.validate_run_name(name) == []) is ok


# --------------------------------------------------------------------------------------------
# Pod settings merge and the storage location of a task
# --------------------------------------------------------------------------------------------


def test_client_pod_settings_merge_over_the_template() -> None:
    spec = validation.parse_spec(example("full")["spec"])
    merged = pod_settings.merge_pod_settings(spec.template, spec.clients[0])
    assert merged.resources is not None
    assert merged.resources.limits == {"memory": "64Gi", "nvidia.com/gpu": 1}
    assert merged.resources.requests == {"cpu": "8", "memory": "48Gi"}
    assert merged.node_selector == {
        "nvidia.com/gpu.present": "true",
        "topology.kubernetes.io/zone": "eu-west-1a",
    }
    assert [t.key for t in merged.tolerations or []] == [
        "nvidia.com/gpu",
        "dedicated",
        "node.kubernetes.io/unreachable",
    ]
    assert [e.name for e in merged.env or []] == [
        "HF_HUB_OFFLINE",
        "NODE_NAME",
        "HF_DATASETS_OFFLINE",
    ]
    assert merged.affinity == spec.clients[0].affinity
    assert merged.service_account_name == "hospital-a-trainer"


def test_client_without_overrides_gets_the_template() -> None:
    spec = validation.parse_spec(example("full")["spec"])
    merged = pod_settings.merge_pod_settings(spec.template, spec.clients[2])
    expected = pod_settings.merge_pod_settings(spec.template, None)
    assert merged == expected
    assert expected.affinity == spec.template.affinity
    assert isinstance(expected, api.PodSettings)
    assert not isinstance(expected, api.PodTemplate)


def test_env_override_by_name_keeps_the_template_order() -> None:
    template = api.PodTemplate(
        env=[api.EnvVar(name="A", value="1"), api.EnvVar(name="B", value="2")]
    )
    client = api.PodSettings(env=[api.EnvVar(name="A", value="9")])
    merged = pod_settings.merge_pod_settings(template, client)
    assert [(e.name, e.value) for e in merged.env or []] == [("A", "9"), ("B", "2")]


def test_storage_location_for_a_task() -> None:
    spec = validation.parse_spec(example("full")["spec"])
    location = spec.storage.location()
    assert type(location) is StorageLocation
    assert location.wire() == {
        "uri": "s3://fedtune-runs/clinical-notes",
        "endpoint": "https://minio.storage.svc.cluster.local:9000",
        "region": "eu-west-1",
        "forcePathStyle": True,
    }


def _exact(body: dict[str, Any], **aggregation: Any) -> None:
    body["aggregation"] = {"lora": "exact", **aggregation}


def _rank(r: int, lora: str = "exact") -> Any:
    def change(body: dict[str, Any]) -> None:
        body["aggregation"] = {"lora": lora}
        body["adapter"] = {"r": 8}
        body["clients"][1]["adapter"] = {"r": r}

    return change


LORA_AND_PRIVACY_RULES = [
    # (id, change of .spec, the problem reported, or None when valid)
    ("exact-with-fedavg", lambda b: _exact(b), None),
    (
        "exact-with-fedadam",
        lambda b: _exact(b, algorithm="fedadam"),
        "spec.aggregation.lora: exact needs algorithm fedavg, not fedadam",
    ),
    (
        "exact-with-median",
        lambda b: _exact(b, algorithm="median"),
        "spec.aggregation.lora: exact needs algorithm fedavg, not median",
    ),
    (
        "exact-with-freeze-a",
        lambda b: (_exact(b), b.update(adapter={"freezeA": True})),
        "spec.aggregation.lora: exact re-factorises A",
    ),
    (
        "exact-with-dp-noise",
        lambda b: (_exact(b), b.update(privacy={"clipNorm": 1.0, "noiseMultiplier": 1.0})),
        "spec.aggregation.lora: exact cannot add DP noise",
    ),
    ("exact-with-dp-clip-only", lambda b: (_exact(b), b.update(privacy={"clipNorm": 1.0})), None),
    ("smaller-client-rank-exact", _rank(4), None),
    ("same-client-rank-separate", _rank(8, "separate"), None),
    (
        "smaller-client-rank-separate",
        _rank(4, "separate"),
        "spec.clients[1].adapter.r: a rank (4) other than the run's needs spec.aggregation.lora "
        "exact",
    ),
    (
        "client-rank-above-the-run",
        _rank(16),
        "spec.clients[1].adapter.r: 16 exceeds the run's spec.adapter.r (8)",
    ),
    (
        "target-epsilon-without-noise",
        lambda b: b.update(privacy={"clipNorm": 1.0, "targetEpsilon": 8}),
        "spec.privacy: targetEpsilon needs noiseMultiplier > 0",
    ),
    (
        "adaptive-clipping-without-clip",
        lambda b: b.update(privacy={"adaptiveClipping": {}}),
        "spec.privacy: adaptiveClipping needs clipNorm",
    ),
    (
        "adaptive-clipping-count-noise-too-small",
        lambda b: b.update(
            privacy={
                "clipNorm": 1.0,
                "noiseMultiplier": 1.0,
                "adaptiveClipping": {"countNoiseMultiplier": 0.5},
            }
        ),
        "spec.privacy: adaptiveClipping.countNoiseMultiplier must exceed noiseMultiplier / 2",
    ),
    (
        "adaptive-clipping-with-noise",
        lambda b: b.update(
            privacy={
                "clipNorm": 1.0,
                "noiseMultiplier": 1.0,
                "adaptiveClipping": {"countNoiseMultiplier": 0.6},
                "targetEpsilon": 50,
            }
        ),
        None,
    ),
]


@pytest.mark.parametrize(
    ("change", "problem"),
    [c[1:] for c in LORA_AND_PRIVACY_RULES],
    ids=[c[0] for c in LORA_AND_PRIVACY_RULES],
)
def test_lora_modes_ranks_and_privacy_budget_rules(change: Any, problem: str | None) -> None:
    body = base()
    change(body["spec"])
    problems = operator_problems(body)
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1, problems
        assert problems[0].startswith(problem), problems


def test_client_ranks_reach_the_client_and_aggregator_tasks() -> None:
    body = base()["spec"]
    _rank(4)(body)
    spec = validation.parse_spec(body)
    names = [c.name for c in spec.clients]
    assert manifests.client_task("r", spec, 1, names[1]).adapter.r == 4
    assert manifests.client_task("r", spec, 1, names[0]).adapter.r == 8
    task = manifests.aggregate_task("r", spec, 1, names)
    assert task.client_ranks == {names[1]: 4}
    assert task.sampling_rate == 1.0
    body["aggregation"]["clientsPerRound"] = 1
    assert (
        manifests.aggregate_task("r", validation.parse_spec(body), 1, names[:1]).sampling_rate
        == 0.5
    )
