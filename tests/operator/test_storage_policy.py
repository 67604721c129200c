"""`fedtune storage-policy`: each identity of a run gets what its roles need and nothing of
another client's. The policies are read here by IAM's matching rules (`*` any run of characters,
`?` one, `s3:prefix` conditions for listing); tests/devcluster holds the S3 server itself to them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedtune_operator import storage_policy
from fedtune_operator.validation import parse_spec

SPEC: dict[str, Any] = {
    "baseModel": "s3://models/llama",
    "rounds": 3,
    "storage": {"uri": "s3://runs/r1", "credentialsSecret": {"name": "run-identity"}},
    "clients": [
        {
            "name": "alice",
            "dataUri": "s3://alice-data/train.jsonl",
            "storageCredentialsSecret": {"name": "alice-fedtune"},
        },
        {
            "name": "bob",
            "dataUri": "s3://bob-data/train.jsonl",
            "storageCredentialsSecret": {"name": "bob-fedtune"},
            "credentialsSecret": {"name": "bob-data"},
        },
        {"name": "carol", "dataUri": "s3://carol-data/train.jsonl"},
    ],
    "evaluation": {
        "dataUri": "s3://eval/heldout.jsonl",
        "storageCredentialsSecret": {"name": "eval-fedtune"},
    },
}


def matches(pattern: str, value: str) -> bool:
    """IAM's wildcard matching: `*` any characters (slashes too), `?` exactly one."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value) is not None


def allowed(policy: dict[str, Any], action: str, bucket: str, key: str) -> bool:
    for s in policy["Statement"]:
        if action not in s["Action"]:
            continue
        if action == "s3:ListBucket":
            if f"arn:aws:s3:::{bucket}" not in s["Resource"]:
                continue
            prefixes = s.get("Condition", {}).get("StringLike", {}).get("s3:prefix")
            if prefixes is None or any(matches(p, key) for p in prefixes):
                return True
        elif any(matches(r, f"arn:aws:s3:::{bucket}/{key}") for r in s["Resource"]):
            return True
    return False


POLICIES = storage_policy.policies(parse_spec(SPEC), "aws")
GET, PUT, DELETE, LIST = "s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket"

CASES = [
    # (identity, action, bucket, key, allowed)
    ("alice-fedtune", GET, "runs", "r1/rounds/000002/global/adapter_model.safetensors", True),
    ("alice-fedtune", PUT, "runs", "r1/rounds/000003/clients/alice/delta.safetensors", True),
    ("alice-fedtune", DELETE, "runs", "r1/rounds/000003/clients/alice/manifest.json", True),
    ("alice-fedtune", PUT, "runs", "r1/state/clients/alice/000003/residual.safetensors", True),
    ("alice-fedtune", LIST, "runs", "r1/state/clients/alice/", True),
    ("alice-fedtune", GET, "runs", "r1/state/control/server/000002/control.safetensors", True),
    ("alice-fedtune", GET, "models", "llama/config.json", True),
    ("alice-fedtune", GET, "alice-data", "train.jsonl", True),
    # nothing of another client's: deltas, residuals, control variates, data
    ("alice-fedtune", GET, "runs", "r1/rounds/000003/clients/bob/delta.safetensors", False),
    ("alice-fedtune", PUT, "runs", "r1/rounds/000003/clients/bob/manifest.json", False),
    ("alice-fedtune", GET, "runs", "r1/state/clients/bob/000002/residual.safetensors", False),
    (
        "alice-fedtune",
        GET,
        "runs",
        "r1/state/control/clients/bob/000002/control.safetensors",
        False,
    ),
    ("alice-fedtune", LIST, "runs", "r1/state/clients/bob/", False),
    ("alice-fedtune", LIST, "runs", "r1/", False),
    ("alice-fedtune", GET, "bob-data", "train.jsonl", False),
    # nor a write outside its own prefixes, nor one nested into another's through a long key
    ("alice-fedtune", PUT, "runs", "r1/rounds/000003/global/adapter_model.safetensors", False),
    ("alice-fedtune", PUT, "runs", "r1/rounds/000003/metrics.json", False),
    ("alice-fedtune", PUT, "runs", "r1/rounds/000003/clients/bob/x/clients/alice/y", False),
    # bob reads its data with its own data Secret: its storage identity does not need it
    ("bob-fedtune", GET, "bob-data", "train.jsonl", False),
    # carol has no identity of its own: the run's carries its access (and warns)
    ("run-identity", GET, "carol-data", "train.jsonl", True),
    # the aggregator: every delta in, the global out, merged deltas deleted
    ("run-identity", GET, "runs", "r1/rounds/000003/clients/bob/delta.safetensors", True),
    ("run-identity", PUT, "runs", "r1/rounds/000003/global/manifest.json", True),
    ("run-identity", DELETE, "runs", "r1/rounds/000003/clients/bob/delta.safetensors", True),
    ("run-identity", PUT, "runs", "r1/final/adapter_model.safetensors", True),
    ("run-identity", LIST, "runs", "r1/", True),
    # the evaluation: the global and the records in, evaluation.json and the report out
    ("eval-fedtune", GET, "runs", "r1/rounds/000003/global/adapter_model.safetensors", True),
    ("eval-fedtune", PUT, "runs", "r1/rounds/000003/evaluation.json", True),
    ("eval-fedtune", GET, "runs", "r1/rounds/000003/clients/alice/delta.safetensors", False),
    ("eval-fedtune", PUT, "runs", "r1/rounds/000003/global/manifest.json", False),
]


@pytest.mark.parametrize(
    ("identity", "action", "bucket", "key", "expected"),
    CASES,
    ids=[f"{c[0]}-{c[1].split(':')[1]}-{c[3]}" for c in CASES],
)
def test_each_identity_gets_its_roles_access_and_no_other_clients(
    identity: str, action: str, bucket: str, key: str, expected: bool
) -> None:
    assert allowed(POLICIES[identity]["policy"], action, bucket, key) is expected


def test_every_identity_of_the_run_has_a_policy_and_its_roles() -> None:
    assert {name: p["roles"] for name, p in POLICIES.items()} == {
        "alice-fedtune": ["client alice"],
        "bob-fedtune": ["client bob"],
        "eval-fedtune": ["evaluation"],
        "run-identity": ["aggregator", "cleanup", "client carol"],
    }


def test_versitygw_gets_one_bucket_policy_per_bucket_naming_the_accounts() -> None:
    policies = storage_policy.policies(parse_spec(SPEC), "versitygw", {"alice-fedtune": "alice"})
    run_bucket = policies["runs"]["policy"]["Statement"]
    principals = {s["Principal"] for s in run_bucket}
    assert principals == {"alice", "bob-fedtune", "eval-fedtune", "run-identity"}
    assert all(r.startswith("arn:aws:s3:::runs") for s in run_bucket for r in s["Resource"])
    assert set(policies) == {"runs", "models", "alice-data", "carol-data", "eval"}


def test_the_command_prints_the_policies_and_warns_of_shared_identities(tmp_path: Path) -> None:
    manifest = tmp_path / "run.yaml"
    manifest.write_text(json.dumps({"kind": "FederatedFineTune", "spec": SPEC}))
    fedtune = str(Path(sys.executable).parent / "fedtune")
    done = subprocess.run(
        [fedtune, "storage-policy", "-f", str(manifest)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == POLICIES
    assert "clients[carol] has no storageCredentialsSecret" in done.stderr
    manifest.write_text(json.dumps({"spec": {**SPEC, "rounds": 0}}))
    bad = subprocess.run(
        [fedtune, "storage-policy", "-f", str(manifest)], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert "spec.rounds" in bad.stderr
