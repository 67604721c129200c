"""The CRD on a real API server: examples accepted with the models' defaults, invalid manifests
rejected with a message naming the field, immutability once started, the status subresource and
the printer columns."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml

from devcluster.testing import DevCluster
from fedtune_operator import api, status_updates, validation
from tests.api.api_cases import (
    EXAMPLE_NAMES,
    IMMUTABLE_CHANGES,
    INVALID,
    VALID_EDGES,
    Invalid,
    base,
    example,
)
from tests.api.test_api_status import full_status

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def namespace(devcluster: DevCluster) -> Iterator[str]:
    devcluster.apply_crds()
    name = f"api-{uuid.uuid4().hex[:8]}"
    devcluster.kubectl("create", "namespace", name)
    yield name
    devcluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def create(dc: DevCluster, ns: str, body: dict[str, Any], *, dry_run: bool = True) -> Any:
    args = ["create", "-n", ns, "-o", "json", "-f", "-"]
    if dry_run:
        args.append("--dry-run=server")
    return dc.kubectl(*args, input=json.dumps(body), check=False)


def unique(body: dict[str, Any]) -> dict[str, Any]:
    body["metadata"]["name"] = f"{body['metadata']['name'][:40]}-{uuid.uuid4().hex[:6]}"
    return body


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_example_is_accepted_and_defaulted_like_the_models(
    devcluster: DevCluster, namespace: str, name: str
) -> None:
    body = example(name)
    result = create(devcluster, namespace, body)
    assert result.returncode == 0, result.stderr
    server = json.loads(result.stdout)["spec"]
    assert server == validation.parse_spec(body["spec"]).wire()


@pytest.mark.parametrize("case", INVALID, ids=lambda c: c.id)
def test_invalid_manifest_is_rejected_naming_the_field(
    devcluster: DevCluster, namespace: str, case: Invalid
) -> None:
    result = create(devcluster, namespace, case.manifest())
    assert result.returncode != 0, f"accepted: {case.id}"
    assert case.field in result.stderr, result.stderr


@pytest.mark.parametrize("case", VALID_EDGES, ids=lambda c: c.id)
def test_manifest_at_the_edge_of_a_rule_is_accepted(
    devcluster: DevCluster, namespace: str, case: Invalid
) -> None:
    result = create(devcluster, namespace, case.manifest())
    assert result.returncode == 0, result.stderr


STARTED = {"startTime": "2025-01-01T00:00:00Z", "currentRound": 2, "phase": "Running"}


def started(dc: DevCluster, ns: str, status: dict[str, Any] = STARTED) -> str:
    """A run with this status (by default one that has started, as the operator would have
    written it)."""
    body = unique(base())
    result = create(dc, ns, body, dry_run=False)
    assert result.returncode == 0, result.stderr
    name = body["metadata"]["name"]
    dc.kubectl(
        "patch", "fft", name, "-n", ns, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}),
    )  # fmt: skip
    return name


def patch(dc: DevCluster, ns: str, name: str, kind: str, body: Any) -> Any:
    return dc.kubectl(
        "patch", "fft", name, "-n", ns, f"--type={kind}", "-p", json.dumps(body), check=False
    )


@pytest.mark.parametrize(("kind", "change", "field"), IMMUTABLE_CHANGES, ids=lambda v: str(v)[:30])
def test_immutable_once_started(
    devcluster: DevCluster, namespace: str, kind: str, change: Any, field: str
) -> None:
    name = started(devcluster, namespace)
    result = patch(devcluster, namespace, name, kind, change)
    assert result.returncode != 0, f"changed {field} of a started run"
    assert field in result.stderr, result.stderr


def test_immutable_fields_may_change_before_the_start(
    devcluster: DevCluster, namespace: str
) -> None:
    body = unique(base())
    assert create(devcluster, namespace, body, dry_run=False).returncode == 0
    name = body["metadata"]["name"]
    for kind, change, field in IMMUTABLE_CHANGES:
        if field != "spec.rounds":
            result = patch(devcluster, namespace, name, kind, change)
            assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("status", "is_started"),
    [
        ({"startTime": "2025-01-01T00:00:00Z", "currentRound": 0}, True),
        ({"startTime": "2025-01-01T00:00:00Z"}, True),
        ({"currentRound": 1}, True),
        ({"currentRound": 0, "phase": "Pending"}, False),
        ({"phase": "Pending"}, False),
    ],
)
def test_started_means_start_time_or_past_round_zero(
    devcluster: DevCluster, namespace: str, status: dict[str, Any], is_started: bool
) -> None:
    """api.STARTED_CEL: the rules bind once the operator set startTime, or past round 0."""
    name = started(devcluster, namespace, status)
    result = patch(devcluster, namespace, name, "merge", {"spec": {"baseModel": "org/other"}})
    assert (result.returncode != 0) is is_started, result.stderr


def test_a_started_run_takes_other_changes(devcluster: DevCluster, namespace: str) -> None:
    name = started(devcluster, namespace)
    change = {
        "spec": {
            "rounds": 30,
            "suspend": True,
            "training": {"learningRate": 0.0001},
            "clients": [
                {"name": "hospital-a", "dataUri": "s3://hospital-a-data/notes/v2.jsonl"},
                {"name": "hospital-b", "dataUri": "s3://hospital-b-data/notes/train.jsonl"},
            ],
        }
    }
    result = patch(devcluster, namespace, name, "merge", change)
    assert result.returncode == 0, result.stderr


def test_status_written_from_the_models_is_stored_as_is(
    devcluster: DevCluster, namespace: str
) -> None:
    body = unique(base())
    assert create(devcluster, namespace, body, dry_run=False).returncode == 0
    name = body["metadata"]["name"]
    status = full_status()
    devcluster.kubectl(
        "patch", "fft", name, "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status.wire()}),
    )  # fmt: skip
    stored = devcluster.kubectl("get", "fft", name, "-n", namespace, "-o", "json")
    assert validation.parse_status(json.loads(stored.stdout)["status"]) == status


def test_status_is_not_writable_through_the_main_resource(
    devcluster: DevCluster, namespace: str
) -> None:
    body = unique(base())
    body["status"] = {"phase": "Succeeded", "currentRound": 3}
    result = create(devcluster, namespace, body, dry_run=False)
    assert result.returncode == 0, result.stderr
    assert "currentRound" not in json.loads(result.stdout).get("status", {})


def columns(output: str) -> list[dict[str, str]]:
    """Rows of `kubectl get` output as dicts, split on the header's column starts."""
    header, *rows = output.rstrip("\n").split("\n")
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    # "EVAL LOSS" is one column: a start right after a single space continues the previous one.
    starts = [s for s in starts if s == 0 or header[s - 2] == " "]
    bounds = [*starts[1:], None]
    names = [header[a:b].strip() for a, b in zip(starts, bounds, strict=True)]
    return [
        {n: row[a:b].strip() for n, a, b in zip(names, starts, bounds, strict=True)} for row in rows
    ]


def test_kubectl_get_shows_the_columns(devcluster: DevCluster, namespace: str) -> None:
    body = unique(base())
    assert create(devcluster, namespace, body, dry_run=False).returncode == 0
    name = body["metadata"]["name"]
    now = datetime(2025, 1, 1, tzinfo=UTC)
    # Succeeded is deliberately not the last condition: the column selects it by type.
    conditions = status_updates.set_outcome([], "Succeeded", "RunSucceeded", "10 rounds", now)
    conditions = status_updates.set_condition(
        conditions, api.SUSPENDED, "False", "NotSuspended", "", now
    )
    status = api.FederatedFineTuneStatus(
        phase="Succeeded",
        conditions=conditions,
        current_round=10,
        round_progress="10/10",
        client_progress="2/2",
        last_train_loss=1.2345678,
        last_eval_loss=1.5,
        communication=status_updates.communication_totals(1000, 41_200),
        final_adapter_uri="s3://my-fedtune-bucket/runs/minimal/final/",
    )
    devcluster.kubectl(
        "patch", "fft", name, "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status.wire()}),
    )  # fmt: skip

    plain = columns(devcluster.kubectl("get", "fft", name, "-n", namespace).stdout)
    assert list(plain[0]) == ["NAME", "PHASE", "ROUND", "CLIENTS", "LOSS", "REDUCTION", "AGE"]
    row = plain[0]
    assert (row["NAME"], row["PHASE"], row["ROUND"], row["CLIENTS"]) == (
        name,
        "Succeeded",
        "10/10",
        "2/2",
    )
    assert (row["LOSS"], row["REDUCTION"]) == ("1.235", "41.2x")

    [wide] = columns(devcluster.kubectl("get", "fft", name, "-n", namespace, "-o", "wide").stdout)
    assert wide["ALGORITHM"] == "fedavg"
    assert wide["EVAL LOSS"] == "1.5"
    assert wide["SUCCEEDED"] == "True"
    assert wide["ADAPTER"] == "s3://my-fedtune-bucket/runs/minimal/final/"

    by_category = devcluster.kubectl("get", "fedtune", "-n", namespace, "-o", "name").stdout
    assert f"federatedfinetune.fedtune.dev/{name}" in by_category.split()


@pytest.mark.usefixtures("namespace")  # which installs the CRD
def test_explain_shows_the_field_docs(devcluster: DevCluster) -> None:
    out = devcluster.kubectl("explain", "fft.spec.aggregation.minClients").stdout
    assert "Quorum per round" in out


def test_invalid_manifests_file_is_rejected_like_kubectl_apply(
    devcluster: DevCluster, namespace: str
) -> None:
    """The same rejection through `kubectl apply` of YAML, as a user would see it."""
    body = unique(base())
    body["spec"]["aggregation"] = {"minClients": 5}
    result = devcluster.kubectl(
        "apply", "-n", namespace, "--dry-run=server", "-f", "-", input=yaml.safe_dump(body),
        check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "spec.aggregation.minClients" in result.stderr
    assert "minClients must not exceed the clients selected per round" in result.stderr
