"""The fault matrix, end to end on the devcluster with the real operator, trainer and S3: storage
going away mid-round, an aggregator killed mid-publish, the API server restarted mid-round and a
client pod evicted. Each run is small (two clients, one or two rounds, the tiny model, no
evaluation), each fault is struck when an observable step of the round has happened (a pod
running, an object in the bucket), and each test asserts the final status, the history (every
round once, in order) and that storage holds only whole commits."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client

from devcluster.testing import DevCluster, wait_for
from fedtune_trainer import store as st
from fedtune_trainer.task import client_prefix, global_prefix, round_prefix
from tests.e2e.support import (
    BUCKET,
    CLIENTS,
    Assets,
    Manifest,
    Operator,
    apply,
    job_keys,
    jobs_of,
    storage_keys,
    wait_condition,
    wait_running,
)

RUN_TIMEOUT = 420
PAIR = CLIENTS[:2]


def small_run(
    manifest: Callable[..., Manifest], assets: Assets, name: str, **spec: Any
) -> Manifest:
    """Two clients, one round unless asked, no evaluation Jobs: the least a fault needs."""
    m = manifest(
        name,
        **{
            "rounds": 1,
            "clients": [{"name": c, "dataUri": assets.data_uris[c]} for c in PAIR],
            **spec,
        },
    )
    del m["spec"]["evaluation"]
    return m


def run_store(dc: DevCluster, name: str) -> st.Store:
    s3 = dc.s3
    return st.open_store(
        f"s3://{BUCKET}/runs/{name}",
        st.S3Settings(
            endpoint=s3.endpoint, access_key_id=s3.access_key, secret_access_key=s3.secret_key
        ),
    )


def wait_object(dc: DevCluster, op: Operator, prefix: str) -> list[str]:
    """The keys under `prefix` once the run has written one there (polled every 0.1 s)."""
    return wait_for(
        lambda: storage_keys(dc, prefix),
        timeout=300,
        what=f"s3://{BUCKET}/{prefix} to be written",
        interval=0.1,
        diagnose=op.log_tail,
    )


def running_pod(dc: DevCluster, op: Operator, namespace: str, selector: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        out = dc.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout
        pods = [p for p in json.loads(out)["items"] if p["status"].get("phase") == "Running"]
        return pods[0] if pods else None

    return wait_for(
        check, timeout=300, what=f"a running pod of {selector}", interval=0.2, diagnose=op.log_tail
    )


def assert_finished(
    dc: DevCluster, name: str, run: dict[str, Any], rounds: int
) -> list[dict[str, Any]]:
    """Succeeded with every round in the history exactly once, in order, both clients merged in
    each, and storage holding whole commits of every global adapter and every merged delta."""
    status = run["status"]
    assert status["phase"] == "Succeeded"
    assert status["roundProgress"] == f"{rounds}/{rounds}"
    history = status["history"]
    assert [h["round"] for h in history] == list(range(1, rounds + 1))  # none lost, none doubled
    assert all(h["clientsSucceeded"] == len(PAIR) for h in history)
    assert {c["name"]: c["phase"] for c in status["clients"]} == dict.fromkeys(PAIR, "Succeeded")
    store = run_store(dc, name)
    st.read_committed(store, global_prefix(0))  # raises on a torn or unverifiable commit
    for r in range(1, rounds + 1):
        manifest, _ = st.read_committed(store, global_prefix(r))
        assert sorted(manifest["accepted"]) == sorted(PAIR)
        for c in PAIR:
            st.read_committed(store, client_prefix(r, c))
    return history


@pytest.mark.parametrize(
    "first_object",
    [
        pytest.param("clients/", id="during-client-uploads"),
        pytest.param("metrics.json", id="during-the-aggregators-publish"),
    ],
)
def test_s3_stopped_and_restarted_mid_round_the_round_completes_or_is_retried(
    devcluster: DevCluster,
    operator: Operator,
    namespace: str,
    assets: Assets,
    manifest: Callable[..., Manifest],
    run_name: str,
    first_object: str,
    record_property: Callable[[str, object], None],
) -> None:
    """S3 goes away once the first object of the step is written (a client's delta; the round
    record, which the aggregator writes before global 1) and comes back: the trainer's retries
    ride the outage, or the round is retried as a new attempt, never recorded twice."""
    apply(devcluster, small_run(manifest, assets, run_name))
    prefix = f"runs/{run_name}/{round_prefix(1)}"
    written = wait_object(devcluster, operator, f"{prefix}/{first_object}")
    devcluster.cluster.stop_component("s3")
    devcluster.cluster.start_component("s3")
    record_property("written_when_s3_stopped", written)
    run = wait_condition(devcluster, operator, namespace, run_name, "Succeeded", RUN_TIMEOUT)
    history = assert_finished(devcluster, run_name, run, rounds=1)
    record_property("attempt", history[0]["attempt"])
    assert history[0]["attempt"] <= 2  # maxRoundRetries
    keys = job_keys(jobs_of(devcluster, namespace, run_name))
    assert set(keys) == {("0", "aggregator", "-"), ("1", "aggregator", "-")} | {
        ("1", "client", c) for c in PAIR
    }


def test_an_aggregator_killed_mid_publish_leaves_no_torn_global_and_its_retry_publishes_the_same(
    devcluster: DevCluster,
    operator: Operator,
    namespace: str,
    assets: Assets,
    manifest: Callable[..., Manifest],
    run_name: str,
    record_property: Callable[[str, object], None],
) -> None:
    """SIGKILL once the round record is written, before or while global 1 is committed; the Job
    controller reruns the aggregator (backoffLimit 1), which reads the same deltas."""
    apply(devcluster, small_run(manifest, assets, run_name, backoffLimit=1))
    selector = f"fedtune.dev/run={run_name},fedtune.dev/role=aggregator,fedtune.dev/round=1"
    pod = running_pod(devcluster, operator, namespace, selector)
    record_key = f"runs/{run_name}/{round_prefix(1)}/metrics.json"
    wait_object(devcluster, operator, record_key)
    devcluster.kill_pod(namespace, pod["metadata"]["name"])
    store = run_store(devcluster, run_name)
    killed = json.loads(store.get_bytes(f"{round_prefix(1)}/metrics.json"))
    # What the kill left is no commit or the new one: never a manifest over half-written files
    # (read_committed raises on that). Which of the two is down to timing: it is recorded.
    committed = st.read_manifest(store, global_prefix(1)) is not None
    record_property("global_committed_when_killed", committed)
    if committed:
        st.read_committed(store, global_prefix(1))

    run = wait_condition(devcluster, operator, namespace, run_name, "Succeeded", RUN_TIMEOUT)
    history = assert_finished(devcluster, run_name, run, rounds=1)
    assert [(h["round"], h["attempt"]) for h in history] == [
        (1, 0)
    ]  # the Job's retry, no new attempt
    aggregator = next(
        j
        for j in jobs_of(devcluster, namespace, run_name)
        if j["metadata"]["labels"]["fedtune.dev/role"] == "aggregator"
        and j["metadata"]["labels"]["fedtune.dev/round"] == "1"
    )
    assert aggregator["status"].get("failed") == 1  # the killed pod
    assert aggregator["status"].get("succeeded") == 1  # its retry
    published = json.loads(store.get_bytes(f"{round_prefix(1)}/metrics.json"))
    assert {k: v for k, v in published.items() if k != "seconds"} == {
        k: v for k, v in killed.items() if k != "seconds"
    }
    manifest_, _ = st.read_committed(store, global_prefix(1))
    assert sorted(manifest_["accepted"]) == sorted(c["client"] for c in published["contributions"])


def test_the_api_server_restarted_mid_round_the_operator_reconnects_and_the_run_finishes(
    devcluster: DevCluster,
    operator: Operator,
    namespace: str,
    assets: Assets,
    manifest: Callable[..., Manifest],
    run_name: str,
) -> None:
    apply(devcluster, small_run(manifest, assets, run_name, rounds=2))
    wait_running(devcluster, operator, namespace, run_name, 1, "client")
    process = operator.proc
    devcluster.cluster.stop_component("kube-apiserver")
    devcluster.cluster.start_component("kube-apiserver")
    run = wait_condition(devcluster, operator, namespace, run_name, "Succeeded", RUN_TIMEOUT)
    assert operator.proc is process  # not restarted: it reconnected
    assert process is not None
    assert process.poll() is None
    history = assert_finished(devcluster, run_name, run, rounds=2)
    assert [(h["round"], h["attempt"]) for h in history] == [(1, 0), (2, 0)]
    keys = job_keys(jobs_of(devcluster, namespace, run_name))
    assert len(keys) == 1 + 2 * (len(PAIR) + 1)
    assert max(keys.values()) == 1  # no Job created twice


def test_a_client_pod_evicted_is_replaced_without_counting_against_backoff_limit(
    devcluster: DevCluster,
    operator: Operator,
    namespace: str,
    assets: Assets,
    manifest: Callable[..., Manifest],
    run_name: str,
) -> None:
    """The Eviction API marks the pod DisruptionTarget (EvictionByEvictionAPI) and deletes it; the
    Job's pod failure policy ignores it, so with backoffLimit 0 the Job still gets a new pod and
    the client's result counts in round 1's first attempt."""
    apply(devcluster, small_run(manifest, assets, run_name, backoffLimit=0))
    alice = PAIR[0]
    selector = f"fedtune.dev/run={run_name},fedtune.dev/round=1,fedtune.dev/client={alice}"
    pod = running_pod(devcluster, operator, namespace, selector)
    name, uid = pod["metadata"]["name"], pod["metadata"]["uid"]
    client.CoreV1Api(devcluster.api()).create_namespaced_pod_eviction(
        name,
        namespace,
        {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name}},
        _preload_content=False,  # the answer is a Status, not the Eviction the client expects
    )
    run = wait_condition(devcluster, operator, namespace, run_name, "Succeeded", RUN_TIMEOUT)
    history = assert_finished(devcluster, run_name, run, rounds=1)
    assert [(h["round"], h["attempt"]) for h in history] == [(1, 0)]
    job = next(
        j
        for j in jobs_of(devcluster, namespace, run_name)
        if j["metadata"]["labels"].get("fedtune.dev/client") == alice
    )
    assert job["status"].get("succeeded") == 1
    assert not job["status"].get("failed")  # the eviction was not counted
    pods = json.loads(
        devcluster.kubectl(
            "get",
            "pods",
            "-n",
            namespace,
            "-l",
            f"job-name={job['metadata']['name']}",
            "-o",
            "json",
        ).stdout
    )["items"]
    assert pods  # the replacement, whose termination message the operator read
    assert all(p["metadata"]["uid"] != uid for p in pods)
