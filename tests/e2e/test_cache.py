"""The model cache measured end to end: what the S3 server served for the base model in a 2-round
run of 2 clients (the second round is the one a cache saves) with an ephemeral volume per pod,
which downloads in every round as mode none (the default, which every other tiny e2e run uses;
its Jobs' lack of a cache volume is specified in tests/operator/test_manifests.py) does. Mode
perClient, a cache claim per client that outlives the pods, is measured the same way on the real
model's run (tests/e2e/test_real_model.py), which uses it.

The bytes come from the S3 server's access log (`support.count_model_reads`). The clients' own
account of it, the baseModelBytesDownloaded of their summaries, is checked against the same
expectation.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from devcluster.testing import DevCluster
from tests.e2e.support import (
    PAIR,
    Assets,
    Manifest,
    Operator,
    apply,
    claims_of,
    count_model_reads,
    delete_run,
    downloads_by_round,
    jobs_of,
    summaries,
    unique_name,
    wait_condition,
)

RUN_TIMEOUT = 600
ROUNDS = 2


def test_an_ephemeral_cache_downloads_the_base_model_in_every_pod(
    devcluster: DevCluster,
    operator: Operator,
    namespace: str,
    assets: Assets,
    manifest: Callable[..., Manifest],
) -> None:
    name = unique_name("cache-ephemeral")
    reads = count_model_reads(devcluster, assets.model_uri)
    clients = [{"name": c, "dataUri": assets.data_uris[c]} for c in PAIR]
    apply(
        devcluster,
        manifest(name, rounds=ROUNDS, clients=clients, modelCache={"mode": "ephemeral"}),
    )
    wait_condition(devcluster, operator, namespace, name, "Succeeded", RUN_TIMEOUT)
    read = reads()
    size = read.size
    print(
        f"\nmodelCache.mode=ephemeral: the S3 server served {read.served} bytes of the base model "
        f"({read.served / size:.1f} x its {size} bytes) over {ROUNDS} rounds of {len(PAIR)} "
        f"clients; GETs per key: {dict(read.gets)}"
    )
    by_round = downloads_by_round(summaries(devcluster, namespace, name, "client"))
    assert sorted(by_round) == list(range(1, ROUNDS + 1))
    evaluations = len(
        [j for j in jobs_of(devcluster, namespace, name) if "evaluate" in j["metadata"]["name"]]
    )
    assert evaluations == 2  # round 0 (the baseline) and the last round

    # Without a volume that outlives the pod every client Job downloads it, in every round.
    for r in range(1, ROUNDS + 1):
        assert by_round[r] == [size] * len(PAIR)
    assert read.served >= (ROUNDS * len(PAIR) + 2) * size, (read.served, read.gets)
    # The ephemeral volume controller made one claim per client and evaluation pod from the
    # template (its labels), each owned by its pod.
    claims = claims_of(devcluster, namespace, name)
    assert len(claims) == ROUNDS * len(PAIR) + evaluations
    for claim in claims:
        assert claim["metadata"]["name"].endswith("-model-cache")
        assert [o["kind"] for o in claim["metadata"]["ownerReferences"]] == ["Pod"]
    delete_run(devcluster, namespace, name)


def test_a_cache_claim_is_created_once_and_never_taken_from_another_owner(
    devcluster: DevCluster, namespace: str
) -> None:
    """kube.create_claim against the real API server: created, then AlreadyExists is success for
    the run's own claim; a claim of the same name that the run does not own (left by a deleted
    run of the same name, or anyone's) is ClaimNotReady, so the Job waits instead of mounting
    it."""
    from fedtune_operator.kube import ClaimNotReady, Kube

    k = Kube(devcluster.api())
    name = f"stranger-{uuid.uuid4().hex[:6]}-cache-alice"
    claim: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    try:
        assert k.create_claim(claim) is True
        assert k.create_claim(claim) is False
        ours = json.loads(json.dumps(claim))
        ours["metadata"]["ownerReferences"] = [
            {
                "apiVersion": "fedtune.dev/v1alpha1",
                "kind": "FederatedFineTune",
                "name": "stranger",
                "uid": str(uuid.uuid4()),
            }
        ]
        with pytest.raises(ClaimNotReady, match="belongs to another object"):
            k.create_claim(ours)
    finally:
        devcluster.kubectl("delete", "pvc", name, "-n", namespace, "--ignore-not-found")
