"""Each client its own identity, on the devcluster: scoped storage accounts whose bucket policy is
what `fedtune storage-policy` prints (enforced by the S3 server), and signing keys of their own.

The run succeeds; the aggregator merged both clients' signed deltas (it refuses a pinned client's
unsigned one); the run's credential reached no client's pod; and each client's deltas were
deleted once the round was committed, their hashes and sizes kept in the round record.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest

from devcluster.testing import DevCluster
from fedtune_operator import storage_policy
from fedtune_operator.validation import parse_spec
from fedtune_trainer.storage import signing
from tests.e2e.support import (
    BUCKET,
    PAIR,
    Assets,
    Manifest,
    Operator,
    apply,
    jobs_of,
    small_run,
    storage_keys,
    wait_condition,
)

RUN_TIMEOUT = 420


def create_secret(dc: DevCluster, namespace: str, name: str, **data: str) -> None:
    literals = [f"--from-literal={k}={v}" for k, v in data.items()]
    dc.kubectl("create", "secret", "generic", name, "-n", namespace, *literals)


@pytest.fixture
def bucket_policy(devcluster: DevCluster) -> Iterator[None]:
    """The test's policy on the shared e2e bucket goes with it (the root, which every other test
    uses, is not bound by it either way)."""
    yield
    devcluster.s3.client().delete_bucket_policy(Bucket=BUCKET)


def test_a_run_on_per_client_identities_and_keys_succeeds(
    devcluster: DevCluster,
    operator: Operator,
    namespace: str,
    assets: Assets,
    manifest: Callable[..., Manifest],
    run_name: str,
    bucket_policy: None,
) -> None:
    s3 = devcluster.s3
    m = small_run(manifest, assets, run_name)
    accounts = {"fedtune-s3": s3.name}  # the run's identity: the bucket's owner
    for entry in m["spec"]["clients"]:
        client = entry["name"]
        account = s3.create_user(f"{client}{run_name.removeprefix('run-')}")
        secret = f"{run_name}-{client}-s3"
        create_secret(
            devcluster,
            namespace,
            secret,
            AWS_ACCESS_KEY_ID=account.access_key,
            AWS_SECRET_ACCESS_KEY=account.secret_key,
        )
        accounts[secret] = account.name
        private, public = signing.generate()
        create_secret(
            devcluster,
            namespace,
            f"{run_name}-{client}-signing",
            **{"signing.key": private.decode()},
        )
        entry["storageCredentialsSecret"] = {"name": secret}
        entry["signing"] = {"publicKey": public, "secretName": f"{run_name}-{client}-signing"}
    policies = storage_policy.policies(parse_spec(m["spec"]), "versitygw", accounts)
    assert set(policies) == {BUCKET}  # the run, its model and its data share the e2e bucket
    s3.put_bucket_policy(BUCKET, policies[BUCKET]["policy"])

    apply(devcluster, m)
    run = wait_condition(devcluster, operator, namespace, run_name, "Succeeded", RUN_TIMEOUT)

    # Both clients' signed deltas were merged (a pinned client's unsigned delta is refused).
    assert [h["clientsSucceeded"] for h in run["status"]["history"]] == [len(PAIR)]
    # Each client's pods held its own identity and key, never the run's credential.
    for job in jobs_of(devcluster, namespace, run_name):
        labels = job["metadata"]["labels"]
        if labels["fedtune.dev/role"] != "client":
            continue
        client = labels["fedtune.dev/client"]
        env = job["spec"]["template"]["spec"]["containers"][0]["env"]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in env if "valueFrom" in e}
        assert refs == {
            "AWS_ACCESS_KEY_ID": f"{run_name}-{client}-s3",
            "AWS_SECRET_ACCESS_KEY": f"{run_name}-{client}-s3",
            "FEDTUNE_SIGNING_KEY": f"{run_name}-{client}-signing",
        }
        assert "fedtune-s3" not in json.dumps(job["spec"])
        annotations = job["metadata"]["annotations"]
        assert annotations["fedtune.dev/storage-credentials"] == f"secret/{run_name}-{client}-s3"
    # The deltas are gone once merged; the record keeps each one's hash and size.
    assert storage_keys(devcluster, f"runs/{run_name}/rounds/000001/clients/") == []
    raw = s3.client().get_object(Bucket=BUCKET, Key=f"runs/{run_name}/rounds/000001/metrics.json")
    record = json.loads(raw["Body"].read())
    assert sorted(c["client"] for c in record["contributions"]) == sorted(PAIR)
    assert all(len(c["sha256"]) == 64 and c["encodedBytes"] > 0 for c in record["contributions"])
