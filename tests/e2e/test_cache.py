"""The model cache measured end to end: what the S3 server served for the base model in a 2-round
run of 2 clients (the second round is the one a cache saves), with a cache claim per client
(spec.modelCache.mode perClient) and with an ephemeral volume per pod, which downloads in every
round as mode none (the default, which every other e2e run uses; its Jobs' lack of a cache volume
is specified in tests/operator/test_manifests.py) does.

The bytes come from versitygw's server access log (.devcluster/logs/s3-access.log), which the
trainer cannot influence: every GetObject of a key under the base model's prefix counts that
object's size (versitygw 1.8 logs 0 bytes sent for a GetObject; a ranged read would be counted
whole, so the figure is an upper bound). The clients' own account of it, the
baseModelBytesDownloaded of their summaries, is checked against the same expectation.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from devcluster.s3 import parse_access_log
from devcluster.testing import DevCluster, wait_for
from tests.e2e.support import (
    BUCKET,
    PAIR,
    Assets,
    Manifest,
    Operator,
    apply,
    delete_run,
    get_run,
    jobs_of,
    labelled,
    wait_condition,
)

RUN_TIMEOUT = 600
ROUNDS = 2


def model_objects(dc: DevCluster, model_uri: str) -> dict[str, int]:
    """Key -> size of every object of the base model."""
    prefix = model_uri.removeprefix(f"s3://{BUCKET}/").rstrip("/") + "/"
    listing = dc.s3.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: o["Size"] for o in listing["Contents"]}


def access_log_until_marker(dc: DevCluster) -> str:
    """The access log up to a request made now: the server writes its log asynchronously, and
    once the marker is in, every earlier request is too."""
    marker = f"marker-{uuid.uuid4().hex}"
    s3 = dc.s3.client()
    s3.put_object(Bucket=BUCKET, Key=marker, Body=b"")
    path = dc.cluster.s3_access_log

    def logged() -> str | None:
        text = path.read_text()
        return text if marker in text else None

    return wait_for(logged, timeout=30, what="the S3 access log to record the marker request")


def served_for(log: str, objects: dict[str, int]) -> tuple[int, Counter[str]]:
    """Bytes served for the model's keys by successful GetObjects, and the GETs per key."""
    gets: Counter[str] = Counter()
    served = 0
    for r in parse_access_log(log):
        ok = 200 <= r.status < 300
        if ok and r.bucket == BUCKET and r.operation == "s3_GetObject" and r.key in objects:
            gets[r.key] += 1
            served += r.bytes_sent or objects[r.key]
    return served, gets


def summaries(dc: DevCluster, namespace: str, run: str, role: str) -> list[dict[str, Any]]:
    result = []
    for pod in labelled(dc, namespace, "pods", f"fedtune.dev/run={run},fedtune.dev/role={role}"):
        for status in pod["status"].get("containerStatuses") or []:
            terminated = status["state"].get("terminated") or {}
            if terminated.get("exitCode") == 0:
                result.append(json.loads(terminated["message"]))
    return result


def claims_of(dc: DevCluster, namespace: str, run: str) -> list[dict[str, Any]]:
    return labelled(dc, namespace, "pvc", f"fedtune.dev/run={run}")


def run_and_measure(
    dc: DevCluster,
    operator: Operator,
    namespace: str,
    assets: Assets,
    manifest: Callable[..., Manifest],
    mode: str,
) -> tuple[str, int, Counter[str], int]:
    """Run 3 rounds with `mode`; (run name, bytes served for the model, GETs per key, model
    size). Only this run reads the model while it runs: the e2e tests run one at a time."""
    objects = model_objects(dc, assets.model_uri)
    before = len(access_log_until_marker(dc))
    name = f"cache-{mode.lower()}-{uuid.uuid4().hex[:4]}"
    clients = [{"name": c, "dataUri": assets.data_uris[c]} for c in PAIR]
    body = manifest(name, rounds=ROUNDS, clients=clients, modelCache={"mode": mode})
    apply(dc, body)
    wait_condition(dc, operator, namespace, name, "Succeeded", RUN_TIMEOUT)
    served, gets = served_for(access_log_until_marker(dc)[before:], objects)
    size = sum(objects.values())
    print(
        f"\nmodelCache.mode={mode}: the S3 server served {served} bytes of the base model "
        f"({served / size:.1f} x its {size} bytes) over {ROUNDS} rounds of {len(PAIR)} "
        f"clients; GETs per key: {dict(gets)}"
    )
    return name, served, gets, size


@pytest.mark.parametrize("mode", ["perClient", "ephemeral"])
def test_the_base_model_is_downloaded_once_per_client_per_run(
    devcluster: DevCluster,
    operator: Operator,
    namespace: str,
    assets: Assets,
    manifest: Callable[..., Manifest],
    mode: str,
) -> None:
    name, served, gets, size = run_and_measure(
        devcluster, operator, namespace, assets, manifest, mode
    )
    clients = summaries(devcluster, namespace, name, "client")
    by_round: dict[int, list[int]] = {}
    for s in clients:
        by_round.setdefault(s["round"], []).append(s["baseModelBytesDownloaded"])
    assert sorted(by_round) == list(range(1, ROUNDS + 1))
    evaluations = len(
        [j for j in jobs_of(devcluster, namespace, name) if "evaluate" in j["metadata"]["name"]]
    )
    assert evaluations == 2  # round 0 (the baseline) and the last round

    if mode == "perClient":
        # Each client downloads the model in its first round and reuses it afterwards.
        assert by_round[1] == [size] * len(PAIR)
        for r in range(2, ROUNDS + 1):
            assert by_round[r] == [0] * len(PAIR), f"round {r} downloaded again"
        # One copy per client and one for the evaluation claim; the aggregator's round 0 reads
        # the model too where it still loads it (it has no cache volume): at most one more.
        lower, upper = (len(PAIR) + 1) * size, (len(PAIR) + 2) * size
        assert lower <= served <= upper, (served, gets)
        claims = {c["metadata"]["name"]: c for c in claims_of(devcluster, namespace, name)}
        assert set(claims) == {f"{name}-cache-{c}" for c in (*PAIR, "evaluate")}
        uid = get_run(devcluster, namespace, name)["metadata"]["uid"]
        for claim in claims.values():
            assert [o["uid"] for o in claim["metadata"]["ownerReferences"]] == [uid]
            assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
        # The garbage collector removes the claims with the run.
        delete_run(devcluster, namespace, name)
        wait_for(
            lambda: not claims_of(devcluster, namespace, name),
            timeout=120,
            what="the run's cache claims to be garbage-collected",
        )
    else:  # ephemeral
        # Without a volume that outlives the pod every client Job downloads it, in every round.
        for r in range(1, ROUNDS + 1):
            assert by_round[r] == [size] * len(PAIR)
        assert served >= (ROUNDS * len(PAIR) + 2) * size, (served, gets)
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
