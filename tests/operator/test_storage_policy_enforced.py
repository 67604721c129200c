"""The policies `fedtune storage-policy --flavor versitygw` prints, enforced by the real S3 server.

Each identity of a run gets an account: two clients on identities of their own, a site's client
(carol, whose identity the run never names: `site-carol`), an evaluation on its own, and the run's
(aggregator, relay). The generated bucket policies go on the buckets; then every row below is
tried with that account's own keys. The server answers: 403 AccessDenied for everything of
another client's (deltas, residuals, control variates, data, tasks, heartbeats), for writes
outside the identity's own prefixes, and for the evaluation on client deltas.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from botocore.exceptions import ClientError

from devcluster.s3 import S3Account
from fedtune_operator import storage_policy
from fedtune_operator.validation import parse_spec

pytestmark = pytest.mark.integration

R = "r1"


def refused(call: Callable[[], Any]) -> bool:
    """Whether the server answered 403 (False when the call went through)."""
    try:
        result = call()
    except ClientError as e:
        if e.response["ResponseMetadata"]["HTTPStatusCode"] == 403:
            return True
        raise
    return bool(isinstance(result, dict) and result.get("Errors"))


@pytest.fixture(scope="module")
def world(s3: S3Account) -> dict[str, Any]:
    """Buckets for the run, the model and each client's data; accounts for each identity; the
    generated policies in place; a round's worth of objects written by the root."""
    tag = uuid.uuid4().hex[:6]
    buckets = {
        b: s3.bucket(f"{b}-{tag}").removeprefix("s3://")
        for b in ("runs", "models", "ad", "bd", "ev")
    }
    spec = parse_spec(
        {
            "baseModel": f"s3://{buckets['models']}/tiny",
            "rounds": 2,
            "storage": {"uri": f"s3://{buckets['runs']}/{R}", "credentialsSecret": {"name": "run"}},
            "clients": [
                {
                    "name": "alice",
                    "dataUri": f"s3://{buckets['ad']}/train.jsonl",
                    "storageCredentialsSecret": {"name": "alice-fedtune"},
                },
                {
                    "name": "bob",
                    "dataUri": f"s3://{buckets['bd']}/train.jsonl",
                    "storageCredentialsSecret": {"name": "bob-fedtune"},
                },
                {"name": "carol", "site": {"publicKey": "ed25519:" + "A" * 43 + "="}},
            ],
            "taskSigning": {"secretName": "task-key"},
            "evaluation": {
                "dataUri": f"s3://{buckets['ev']}/heldout.jsonl",
                "storageCredentialsSecret": {"name": "eval-fedtune"},
            },
        }
    )
    accounts = {
        secret: s3.create_user(f"{secret.split('-')[0]}{tag}")
        for secret in ("run", "alice-fedtune", "bob-fedtune", "eval-fedtune", "site-carol")
    }
    names = {secret: a.name for secret, a in accounts.items()}
    for bucket, doc in storage_policy.policies(spec, "versitygw", names).items():
        s3.put_bucket_policy(bucket, doc["policy"])
    root = s3.client()
    objects = {
        "runs": [
            "rounds/000001/global/adapter_model.safetensors",
            "rounds/000001/metrics.json",
            "rounds/000002/clients/alice/delta.safetensors",
            "rounds/000002/clients/bob/delta.safetensors",
            "state/clients/alice/000001/residual.safetensors",
            "state/clients/bob/000001/residual.safetensors",
            "state/control/server/000001/control.safetensors",
            "rounds/000002/tasks/carol.json",
            "rounds/000002/tasks/carol.json.sig",
            "rounds/000002/tasks/alice.json",
            "rounds/000002/clients/carol/delta.safetensors",
            "sites/carol/heartbeat.json",
            "sites/bob/heartbeat.json",
            "final/manifest.json",
        ],
        "models": ["tiny/config.json"],
        "ad": ["train.jsonl"],
        "bd": ["train.jsonl"],
        "ev": ["heldout.jsonl"],
    }
    for b, keys in objects.items():
        for key in keys:
            full = f"{R}/{key}" if b == "runs" else key
            root.put_object(Bucket=buckets[b], Key=full, Body=b"x")
    clients = {secret: a.client() for secret, a in accounts.items()}
    return {"buckets": buckets, "clients": clients}


GET, PUT, DELETE, LIST = "get", "put", "delete", "list"
ROWS = [
    # (identity, operation, bucket, key under the run's root or the bucket, allowed)
    ("alice-fedtune", GET, "runs", "rounds/000001/global/adapter_model.safetensors", True),
    ("alice-fedtune", PUT, "runs", "rounds/000002/clients/alice/delta.safetensors", True),
    ("alice-fedtune", DELETE, "runs", "rounds/000002/clients/alice/delta.safetensors", True),
    ("alice-fedtune", PUT, "runs", "state/clients/alice/000002/residual.safetensors", True),
    ("alice-fedtune", GET, "runs", "state/control/server/000001/control.safetensors", True),
    ("alice-fedtune", LIST, "runs", "state/clients/alice/", True),
    ("alice-fedtune", GET, "models", "tiny/config.json", True),
    ("alice-fedtune", GET, "ad", "train.jsonl", True),
    # another client's delta, residual, state listing and data: refused by the server
    ("alice-fedtune", GET, "runs", "rounds/000002/clients/bob/delta.safetensors", False),
    ("alice-fedtune", PUT, "runs", "rounds/000002/clients/bob/delta.safetensors", False),
    ("alice-fedtune", DELETE, "runs", "rounds/000002/clients/bob/delta.safetensors", False),
    ("alice-fedtune", GET, "runs", "state/clients/bob/000001/residual.safetensors", False),
    ("alice-fedtune", LIST, "runs", "state/clients/bob/", False),
    ("alice-fedtune", LIST, "runs", "", False),
    ("alice-fedtune", GET, "bd", "train.jsonl", False),
    ("bob-fedtune", GET, "ad", "train.jsonl", False),
    # writes outside its own prefixes
    ("alice-fedtune", PUT, "runs", "rounds/000002/global/adapter_model.safetensors", False),
    ("alice-fedtune", PUT, "runs", "rounds/000002/metrics.json", False),
    ("alice-fedtune", PUT, "runs", "state/control/server/000002/control.safetensors", False),
    ("alice-fedtune", PUT, "models", "tiny/config.json", False),
    # the evaluation: the global and the records, never a client's delta
    ("eval-fedtune", GET, "runs", "rounds/000001/global/adapter_model.safetensors", True),
    ("eval-fedtune", PUT, "runs", "rounds/000001/evaluation.json", True),
    ("eval-fedtune", GET, "ev", "heldout.jsonl", True),
    ("eval-fedtune", GET, "runs", "rounds/000002/clients/alice/delta.safetensors", False),
    ("eval-fedtune", GET, "runs", "state/clients/alice/000001/residual.safetensors", False),
    ("eval-fedtune", PUT, "runs", "rounds/000002/global/adapter_model.safetensors", False),
    # a site's client: its tasks, the globals and the run's end in; its commits and notes out
    ("site-carol", GET, "runs", "rounds/000002/tasks/carol.json", True),
    ("site-carol", GET, "runs", "rounds/000002/tasks/carol.json.sig", True),
    ("site-carol", GET, "runs", "rounds/000001/global/adapter_model.safetensors", True),
    ("site-carol", GET, "runs", "final/manifest.json", True),
    ("site-carol", PUT, "runs", "rounds/000002/clients/carol/delta.safetensors", True),
    ("site-carol", PUT, "runs", "sites/carol/heartbeat.json", True),
    ("site-carol", PUT, "runs", "sites/carol/refusals/000002.json", True),
    ("site-carol", GET, "models", "tiny/config.json", True),
    # ... and nothing of anyone else's, nor the run's tasks for it to write
    ("site-carol", GET, "runs", "rounds/000002/tasks/alice.json", False),
    ("site-carol", PUT, "runs", "rounds/000002/tasks/carol.json", False),
    ("site-carol", GET, "runs", "rounds/000002/clients/bob/delta.safetensors", False),
    ("site-carol", PUT, "runs", "sites/bob/heartbeat.json", False),
    ("site-carol", GET, "runs", "state/clients/alice/000001/residual.safetensors", False),
    ("site-carol", PUT, "runs", "rounds/000002/global/adapter_model.safetensors", False),
    ("site-carol", GET, "ad", "train.jsonl", False),
    ("alice-fedtune", GET, "runs", "rounds/000002/tasks/carol.json", False),
    ("alice-fedtune", PUT, "runs", "sites/carol/heartbeat.json", False),
    # the aggregator: every delta in, the global out, merged deltas deleted
    ("run", GET, "runs", "rounds/000002/clients/bob/delta.safetensors", True),
    ("run", PUT, "runs", "rounds/000002/global/adapter_model.safetensors", True),
    ("run", DELETE, "runs", "rounds/000002/clients/bob/delta.safetensors", True),
    ("run", LIST, "runs", "", True),
    ("run", PUT, "models", "tiny/config.json", False),
    # ... and, for its relay Jobs, the sites' tasks out and their notes in
    ("run", PUT, "runs", "rounds/000002/tasks/carol.json", True),
    ("run", GET, "runs", "sites/carol/heartbeat.json", True),
]


@pytest.mark.parametrize(
    ("identity", "op", "bucket", "key", "allowed"),
    ROWS,
    ids=[f"{r[0]}-{r[1]}-{r[2]}-{r[3] or 'root'}" for r in ROWS],
)
def test_the_generated_policy_is_what_the_server_enforces(
    world: dict[str, Any], identity: str, op: str, bucket: str, key: str, allowed: bool
) -> None:
    client = world["clients"][identity]
    name = world["buckets"][bucket]
    full = f"{R}/{key}" if bucket == "runs" else key
    calls: dict[str, Callable[[], Any]] = {
        GET: lambda: client.get_object(Bucket=name, Key=full)["Body"].read(),
        PUT: lambda: client.put_object(Bucket=name, Key=full, Body=b"y"),
        DELETE: lambda: client.delete_objects(Bucket=name, Delete={"Objects": [{"Key": full}]}),
        LIST: lambda: client.list_objects_v2(Bucket=name, Prefix=full),
    }
    assert refused(calls[op]) is not allowed
