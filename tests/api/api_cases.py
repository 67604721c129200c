"""Manifests shared by the model tests and the API-server tests.

One table of invalid manifests serves both, so the operator's own validation (`parse_spec` and
`validate_spec`) and the CRD are held to the same verdict on each.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedtune_trainer.wire.settings import krum_min_clients

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
EXAMPLE_NAMES = ("minimal", "full", "demo", "demo-smollm2")


def example(name: str) -> dict[str, Any]:
    """A fresh copy of examples/<name>.yaml."""
    return yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())


def base() -> dict[str, Any]:
    """A valid manifest with two clients, the starting point of every invalid case."""
    return example("minimal")


def deep_merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            deep_merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


@dataclass(frozen=True)
class Invalid:
    """An invalid manifest: `field` is what the API server's message must name; `model_field`
    what the first words of one of the operator's messages must be (when they differ)."""

    id: str
    change: dict[str, Any] | Callable[[dict[str, Any]], None]
    field: str
    model_field: str | None = None

    def manifest(self) -> dict[str, Any]:
        body = base()
        if callable(self.change):
            self.change(body)
        else:
            deep_merge(body, self.change)
        return body

    @property
    def model_path(self) -> str:
        return self.model_field or self.field


def _spec(**patch: Any) -> dict[str, Any]:
    return {"spec": patch}


def _quantization(id_: str, quantization: dict[str, Any], rule_field: str) -> Invalid:
    """A delta.quantization that the CEL rule on `rule_field` refuses (and the model's
    validator, which speaks of the whole quantization object)."""
    return Invalid(
        id_,
        _spec(delta={"quantization": quantization}),
        f"spec.delta.quantization.{rule_field}",
        model_field="spec.delta.quantization",
    )


def _client(index: int, **patch: Any) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        body["spec"]["clients"][index].update(patch)

    return change


def _duplicate_client(body: dict[str, Any]) -> None:
    body["spec"]["clients"][1]["name"] = body["spec"]["clients"][0]["name"]


def _no_base_model(body: dict[str, Any]) -> None:
    del body["spec"]["baseModel"]


def _rename(name: str) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        body["metadata"]["name"] = name

    return change


def _clients(n: int, **aggregation: Any) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        body["spec"]["clients"] = [
            {"name": f"client-{i}", "dataUri": f"s3://fl-data/client-{i}.jsonl"} for i in range(n)
        ]
        body["spec"]["aggregation"] = aggregation

    return change


SITE_KEY = "ed25519:eaLkirYtCkhKhn2akQl3xE5pOBWBYSYB0KIxSk3JAgQ="
TASK_SIGNING = {"secretName": "run-task-signing"}


def _site_client(
    index: int, signed: bool = True, **fields: Any
) -> Callable[[dict[str, Any]], None]:
    """Client `index` made a site's (no dataUri), the run signing its tasks unless not `signed`."""

    def change(body: dict[str, Any]) -> None:
        name = body["spec"]["clients"][index]["name"]
        body["spec"]["clients"][index] = {"name": name, "site": {"publicKey": SITE_KEY}, **fields}
        if signed:
            body["spec"]["taskSigning"] = TASK_SIGNING

    return change


def _data_and_site(body: dict[str, Any]) -> None:
    body["spec"]["clients"][0]["site"] = {"publicKey": SITE_KEY}
    body["spec"]["taskSigning"] = TASK_SIGNING


def _without_data(body: dict[str, Any]) -> None:
    del body["spec"]["clients"][0]["dataUri"]


_KRUM_F2_SHORT = (krum_min_clients(2) - 1) / 10
"""A client fraction of 10 clients that selects one client fewer than krum's quorum for f = 2.
The krum cases take the quorum from `krum_min_clients`, so that the CRD and the operator are
held to the one statement of the rule."""


INVALID: tuple[Invalid, ...] = (
    Invalid("rounds-wrong-type", _spec(rounds="ten"), "spec.rounds"),
    Invalid("rounds-zero", _spec(rounds=0), "spec.rounds"),
    Invalid("top-k-zero", _spec(delta={"topK": 0}), "spec.delta.topK"),
    Invalid("top-k-above-one", _spec(delta={"topK": 1.5}), "spec.delta.topK"),
    Invalid("lora-rank-too-big", _spec(adapter={"r": 1024}), "spec.adapter.r"),
    Invalid(
        "quantization-bits",
        _spec(delta={"quantization": {"bits": 3}}),
        "spec.delta.quantization.bits",
    ),
    Invalid(
        "unknown-algorithm",
        _spec(aggregation={"algorithm": "fedprox"}),
        "spec.aggregation.algorithm",
    ),
    Invalid(
        "learning-rate-negative",
        _spec(training={"learningRate": -0.1}),
        "spec.training.learningRate",
    ),
    Invalid("no-clients", _spec(clients=[]), "spec.clients"),
    Invalid(
        "duplicate-client-names",
        _duplicate_client,
        "spec.clients[1]",
        model_field="spec.clients[1].name",
    ),
    Invalid("client-name-not-dns", _client(0, name="Hospital_A"), "spec.clients[0].name"),
    Invalid(
        "client-name-reserved", _client(1, name="evaluate"), "spec.clients", "spec.clients[1].name"
    ),
    Invalid("client-name-too-long", _client(0, name="h" * 41), "spec.clients[0].name"),
    Invalid(
        "signing-key-not-ed25519",
        _client(0, signing={"publicKey": "rsa:" + "A" * 48, "secretName": "a-signing"}),
        "spec.clients[0].signing.publicKey",
    ),
    Invalid(
        # 44 characters of base64 that decode to 32 bytes only when the last one's low bits are 0
        "signing-key-not-32-bytes",
        _client(0, signing={"publicKey": "ed25519:" + "A" * 42 + "B=", "secretName": "a-signing"}),
        "spec.clients[0].signing.publicKey",
    ),
    Invalid(
        "signing-key-without-secret",
        _client(0, signing={"publicKey": "ed25519:" + "A" * 43 + "="}),
        "spec.clients[0].signing.secretName",
    ),
    Invalid("client-name-with-slash", _client(0, name="a/b"), "spec.clients[0].name"),
    Invalid("client-without-data-or-site", _without_data, "spec.clients", "spec.clients[0]"),
    Invalid(
        "client-with-data-and-site",
        _data_and_site,
        "spec.clients",
        "spec.clients[0]",
    ),
    Invalid(
        "site-client-with-a-signing-key-here",
        _site_client(0, signing={"publicKey": SITE_KEY, "secretName": "a-signing"}),
        "spec.clients",
        "spec.clients[0]",
    ),
    Invalid(
        "site-client-with-credentials-here",
        _site_client(0, storageCredentialsSecret={"name": "a-s3"}),
        "spec.clients",
        "spec.clients[0]",
    ),
    Invalid("site-client-without-task-signing", _site_client(0, signed=False), "spec.taskSigning"),
    Invalid(
        "site-silence-too-short",
        _site_client(0, site={"publicKey": SITE_KEY, "silenceSeconds": 1}),
        "spec.clients[0].site.silenceSeconds",
    ),
    Invalid("client-weight-zero", _client(0, weight=0), "spec.clients[0].weight"),
    Invalid(
        "data-uri-http",
        _client(0, dataUri="https://example.com/a.jsonl"),
        "spec.clients[0].dataUri",
    ),
    Invalid(
        "gpu-quantity-not-a-quantity",
        _client(0, resources={"limits": {"nvidia.com/gpu": "lots"}}),
        "spec.clients[0].resources.limits",
        model_field="spec.clients[0].resources.limits[nvidia.com/gpu]",
    ),
    Invalid("run-name-with-dot", _rename("run.v1"), "metadata.name"),
    Invalid("run-name-too-long", _rename("r" * 64), "metadata.name"),
    Invalid(
        "storage-dot-dot",
        _spec(storage={"uri": "s3://my-fedtune-bucket/runs/../x"}),
        "spec.storage.uri",
    ),
    Invalid(
        "storage-bad-bucket", _spec(storage={"uri": "s3://My_Bucket/runs"}), "spec.storage.uri"
    ),
    Invalid(
        "storage-endpoint-on-file",
        _spec(storage={"uri": "file:///var/fedtune/runs", "endpoint": "http://minio:9000"}),
        "spec.storage.endpoint",
    ),
    Invalid(
        "storage-cleanup-policy",
        _spec(storage={"cleanupPolicy": "Sometimes"}),
        "spec.storage.cleanupPolicy",
    ),
    Invalid(
        "storage-delete-a-whole-bucket",
        _spec(storage={"uri": "s3://shared-bucket", "cleanupPolicy": "Delete"}),
        "spec.storage.uri",
    ),
    Invalid(
        "storage-delete-a-whole-bucket-slash",
        _spec(storage={"uri": "s3://shared-bucket/", "cleanupPolicy": "Delete"}),
        "spec.storage.uri",
    ),
    Invalid(
        "quorum-above-client-count",
        _spec(aggregation={"minClients": 3}),
        "spec.aggregation.minClients",
    ),
    Invalid(
        "quorum-above-clients-per-round",
        _spec(aggregation={"minClients": 2, "clientsPerRound": 1}),
        "spec.aggregation.minClients",
    ),
    Invalid(
        "quorum-above-client-fraction",
        _spec(aggregation={"minClients": 2, "clientFraction": 0.5}),
        "spec.aggregation.minClients",
    ),
    Invalid(
        "clients-per-round-above-client-count",
        _spec(aggregation={"clientsPerRound": 5}),
        "spec.aggregation.clientsPerRound",
    ),
    Invalid(
        "clients-per-round-and-fraction",
        _spec(aggregation={"clientsPerRound": 1, "clientFraction": 0.5}),
        "spec.aggregation",
    ),
    Invalid(
        "krum-with-fewer-than-2f-plus-3-clients",
        _clients(krum_min_clients(1) - 1, algorithm="krum"),
        "spec.aggregation.byzantineClients",
    ),
    Invalid(
        "multi-krum-with-too-small-a-client-fraction",
        # 0.6 x 10 = 6 clients per round, one short of 2 x 2 + 3.
        _clients(10, algorithm="multiKrum", byzantineClients=2, clientFraction=_KRUM_F2_SHORT),
        "spec.aggregation.byzantineClients",
    ),
    _quantization("codebook-without-4-bits", {"bits": 8, "codebook": "nf4"}, "codebook"),
    _quantization("codebook-without-quantization", {"codebook": "fp4"}, "codebook"),
    _quantization(
        "stochastic-rounding-without-quantization",
        {"stochasticRounding": True},
        "stochasticRounding",
    ),
    _quantization(
        "stochastic-rounding-with-a-codebook",
        {"bits": 4, "codebook": "nf4", "stochasticRounding": True},
        "stochasticRounding",
    ),
    Invalid(
        "noise-without-clip-norm",
        _spec(privacy={"noiseMultiplier": 1.0}),
        "spec.privacy.clipNorm",
        model_field="spec.privacy",
    ),
    Invalid(
        "reserved-env-name",
        _spec(template={"env": [{"name": "FEDTUNE_TASK", "value": "x"}]}),
        "spec.template.env",
        model_field="spec.template.env[0].name",
    ),
    Invalid(
        "env-value-and-value-from",
        _spec(
            template={
                "env": [
                    {
                        "name": "A",
                        "value": "x",
                        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                    }
                ]
            }
        ),
        "spec.template.env[0].valueFrom",
    ),
    Invalid(
        "reserved-label",
        _spec(template={"labels": {"fedtune.dev/run": "other"}}),
        "spec.template.labels",
        model_field="spec.template.labels[fedtune.dev/run]",
    ),
    Invalid(
        "image-pull-policy",
        _spec(template={"imagePullPolicy": "Sometimes"}),
        "spec.template.imagePullPolicy",
    ),
    Invalid(
        "network-peer-address-and-selector",
        _spec(networkPolicy={"dns": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}),
        "spec.networkPolicy.dns[0]",
    ),
    Invalid(
        "network-peer-empty",
        _spec(networkPolicy={"egress": [{"to": [{}], "ports": [{"port": 443}]}]}),
        "spec.networkPolicy.egress[0].to[0]",
    ),
    Invalid(
        "network-port-range-backwards",
        _spec(
            networkPolicy={
                "egress": [
                    {
                        "to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
                        "ports": [{"port": 9000, "endPort": 80}],
                    }
                ]
            }
        ),
        "spec.networkPolicy.egress[0].ports[0].endPort",
        model_field="spec.networkPolicy.egress[0].ports[0]",
    ),
    Invalid(
        "network-egress-rule-without-destination",
        _spec(networkPolicy={"egress": [{"to": [], "ports": [{"port": 443}]}]}),
        "spec.networkPolicy.egress[0].to",
    ),
    Invalid(
        "network-cidr-not-a-range",
        _spec(networkPolicy={"dns": [{"ipBlock": {"cidr": "10.0.0.300/8"}}]}),
        "spec.networkPolicy.dns[0].ipBlock.cidr",
    ),
    Invalid("backoff-limit-negative", _spec(backoffLimit=-1), "spec.backoffLimit"),
    Invalid("missing-base-model", _no_base_model, "spec.baseModel"),
    Invalid("base-model-bad-uri", _spec(baseModel="ftp://models/x"), "spec.baseModel"),
    Invalid("unknown-field", _spec(learningRate=0.1), "spec.learningRate"),
)


VALID_EDGES: tuple[Invalid, ...] = (
    Invalid("quorum-equals-client-count", _clients(3, minClients=3), ""),
    Invalid("quorum-equals-clients-per-round", _clients(5, minClients=2, clientsPerRound=2), ""),
    Invalid("quorum-equals-fraction-rounded-up", _clients(3, minClients=2, clientFraction=0.5), ""),
    Invalid("fraction-float-error", _clients(30, minClients=3, clientFraction=0.1), ""),
    Invalid("quorum-one-with-tiny-fraction", _clients(3, minClients=1, clientFraction=0.01), ""),
    Invalid("clients-per-round-equals-count", _clients(4, clientsPerRound=4), ""),
    Invalid("krum-with-2f-plus-3-clients", _clients(krum_min_clients(1), algorithm="krum"), ""),
    Invalid(
        "krum-tolerating-none-with-3",
        _clients(krum_min_clients(0), algorithm="krum", byzantineClients=0),
        "",
    ),
    Invalid(
        "multi-krum-with-2f-plus-3-per-round",
        _clients(
            krum_min_clients(2) + 1,
            algorithm="multiKrum",
            byzantineClients=2,
            clientsPerRound=krum_min_clients(2),
        ),
        "",
    ),
    Invalid(
        "multi-krum-fraction-rounded-up-to-2f-plus-3",
        # 0.61 x 10 = 6.1 is 7 clients per round.
        _clients(
            10, algorithm="multiKrum", byzantineClients=2, clientFraction=_KRUM_F2_SHORT + 0.01
        ),
        "",
    ),
    Invalid("forty-character-client-name", _client(0, name="c" * 40), ""),
    Invalid("sixty-three-character-run-name", _rename("r" * 63), ""),
    Invalid("noise-with-clip-norm", _spec(privacy={"noiseMultiplier": 1.0, "clipNorm": 0.5}), ""),
    Invalid("storage-retain-a-whole-bucket", _spec(storage={"uri": "s3://shared-bucket"}), ""),
    Invalid(
        "storage-delete-a-one-segment-prefix",
        _spec(storage={"uri": "s3://shared-bucket/run", "cleanupPolicy": "Delete"}),
        "",
    ),
)
"""Valid manifests at the edge of a rule (reusing the case shape, with no field to name)."""


IMMUTABLE_CHANGES: tuple[tuple[str, Any, str], ...] = (
    ("merge", {"spec": {"baseModel": "org/other-model"}}, "spec.baseModel"),
    ("merge", {"spec": {"tokenizer": "org/other-tokenizer"}}, "spec.tokenizer"),
    ("merge", {"spec": {"adapter": {"r": 16}}}, "spec.adapter"),
    ("merge", {"spec": {"storage": {"uri": "s3://elsewhere/run"}}}, "spec.storage.uri"),
    ("json", [{"op": "replace", "path": "/spec/clients/1/name", "value": "c"}], "spec.clients"),
    ("json", [{"op": "remove", "path": "/spec/clients/1"}], "spec.clients"),
    ("merge", {"spec": {"rounds": 1}}, "spec.rounds"),
)
"""Changes to a started run (`kubectl patch --type`, the patch) that the API server refuses,
each with the field its message must name: at least one for every row of
api.IMMUTABLE_ONCE_STARTED, and spec.rounds below status.currentRound."""
