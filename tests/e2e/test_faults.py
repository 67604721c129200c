"""The fault matrix, end to end on the devcluster with the real operator, trainer and S3: storage
going away mid-round, an aggregator killed mid-publish, the API server restarted mid-round, the
operator killed mid-round and a client pod evicted. Each run is small (two clients, one or two
rounds, the tiny model, no evaluation), each fault is struck when an observable step of the round
has happened (a pod running, an object in the bucket), and each test asserts the final status, the
history (every round once, in order) and that storage holds only whole commits. The API server's
restart and the operator's kills strike one run in turn (`interrupted_run`), which the two tests
about them share."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from kubernetes import client

from devcluster.faultproxy import FaultProxy
from devcluster.testing import DevCluster, wait_for
from fedtune_trainer.storage import store as st
from fedtune_trainer.storage.locate import open_store
from fedtune_trainer.wire.layout import client_prefix, global_prefix, round_prefix
from tests.e2e.support import (
    BUCKET,
    PAIR,
    Assets,
    Manifest,
    Operator,
    apply,
    job_keys,
    jobs_of,
    labelled,
    small_run,
    unique_name,
    wait_condition,
    wait_running,
)

RUN_TIMEOUT = 420


def run_store(dc: DevCluster, name: str) -> st.Store:
    s3 = dc.s3
    return open_store(
        f"s3://{BUCKET}/runs/{name}",
        st.S3Settings(
            endpoint=s3.endpoint, access_key_id=s3.access_key, secret_access_key=s3.secret_key
        ),
    )


def running_pod(dc: DevCluster, op: Operator, namespace: str, selector: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        pods = labelled(dc, namespace, "pods", selector)
        pods = [p for p in pods if p["status"].get("phase") == "Running"]
        return pods[0] if pods else None

    return wait_for(
        check, timeout=300, what=f"a running pod of {selector}", interval=0.2, diagnose=op.log_tail
    )


def assert_finished(
    dc: DevCluster, name: str, run: dict[str, Any], rounds: int
) -> list[dict[str, Any]]:
    """Succeeded with every round in the history exactly once, in order, both clients merged in
    each, storage holding whole commits of every global adapter, and every merged delta deleted
    once its round was committed, its hash in the round's record."""
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
            assert store.list(client_prefix(r, c) + "/") == []
        record = json.loads(store.get_bytes(st.join(round_prefix(r), "metrics.json")))
        assert all(len(c["sha256"]) == 64 for c in record["contributions"])
    return history


@pytest.fixture
def proxy(devcluster: DevCluster) -> Iterator[FaultProxy]:
    """The run's storage endpoint: S3 behind a proxy that can hold one PUT."""
    p = FaultProxy(devcluster.state.s3_port)
    yield p
    p.close()


def put_of(name: str, key: str) -> bytes:
    """The request line's start of a PUT of the run's `key`, as boto3 sends it (path style)."""
    return f"PUT /{BUCKET}/runs/{name}/{key}".encode()


def wait_held(proxy: FaultProxy, op: Operator, what: str) -> None:
    wait_for(proxy.held.is_set, timeout=300, what=f"the PUT of {what}", diagnose=op.log_tail)


@pytest.mark.parametrize(
    "held",
    [
        # A client's upload: its old manifest deleted, its delta on the wire.
        pytest.param(client_prefix(1, PAIR[0]) + "/delta.safetensors", id="client-upload"),
        # The aggregator's publish: round record written, global 1's weights on the wire.
        pytest.param(global_prefix(1) + "/adapter_model.safetensors", id="aggregator-publish"),
    ],
)
def test_s3_stopped_mid_write_and_restarted_the_round_completes_uncommitted_till_then(
    devcluster: DevCluster,
    operator: Operator,
    namespace: str,
    assets: Assets,
    manifest: Callable[..., Manifest],
    run_name: str,
    proxy: FaultProxy,
    held: str,
) -> None:
    """The writer is held on the PUT, S3 stops, the held connection drops, S3 starts again: the
    trainer's retries ride the outage (or the round is retried as a new attempt), the prefix it
    was writing is never committed before its manifest, and no round is recorded twice."""
    proxy.hold(put_of(run_name, held))
    apply(devcluster, small_run(manifest, assets, run_name, storage={"endpoint": proxy.endpoint}))
    wait_held(proxy, operator, held)
    store = run_store(devcluster, run_name)
    assert st.read_manifest(store, held.rpartition("/")[0]) is None  # half-written: no commit
    devcluster.cluster.stop_component("s3")
    proxy.release()
    devcluster.cluster.start_component("s3")
    run = wait_condition(devcluster, operator, namespace, run_name, "Succeeded", RUN_TIMEOUT)
    history = assert_finished(devcluster, run_name, run, rounds=1)
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
    proxy: FaultProxy,
) -> None:
    """SIGKILL while global 1's manifest is on the wire (its data files written, the old
    manifest deleted); the Job controller reruns the aggregator (backoffLimit 1), which reads
    the same deltas and publishes the same bytes."""
    manifest_key = global_prefix(1) + "/" + st.MANIFEST
    proxy.hold(put_of(run_name, manifest_key))
    apply(
        devcluster,
        small_run(manifest, assets, run_name, backoffLimit=1, storage={"endpoint": proxy.endpoint}),
    )
    wait_held(proxy, operator, manifest_key)
    store = run_store(devcluster, run_name)
    assert st.read_manifest(store, global_prefix(1)) is None  # the torn global is no commit
    torn = store.get_bytes(global_prefix(1) + "/adapter_model.safetensors")
    killed = json.loads(store.get_bytes(f"{round_prefix(1)}/metrics.json"))
    selector = f"fedtune.dev/run={run_name},fedtune.dev/role=aggregator,fedtune.dev/round=1"
    devcluster.kill_pod(
        namespace, running_pod(devcluster, operator, namespace, selector)["metadata"]["name"]
    )
    proxy.release()

    run = wait_condition(devcluster, operator, namespace, run_name, "Succeeded", RUN_TIMEOUT)
    history = assert_finished(devcluster, run_name, run, rounds=1)
    assert [(h["round"], h["attempt"]) for h in history] == [(1, 0)]  # the Job's retry
    aggregator = next(
        j
        for j in jobs_of(devcluster, namespace, run_name)
        if j["metadata"]["labels"]["fedtune.dev/role"] == "aggregator"
        and j["metadata"]["labels"]["fedtune.dev/round"] == "1"
    )
    assert aggregator["status"].get("failed") == 1  # the killed pod
    assert aggregator["status"].get("succeeded") == 1  # its retry
    published, files = st.read_committed(store, global_prefix(1))
    assert files["adapter_model.safetensors"] == torn  # the same result, bit for bit
    record = json.loads(store.get_bytes(f"{round_prefix(1)}/metrics.json"))
    assert {k: v for k, v in record.items() if k != "seconds"} == {
        k: v for k, v in killed.items() if k != "seconds"
    }
    assert sorted(published["accepted"]) == sorted(c["client"] for c in record["contributions"])


@dataclass(frozen=True)
class InterruptedRun:
    name: str
    run: dict[str, Any]
    """The run at Succeeded."""
    jobs: list[dict[str, Any]]
    reconnected: bool
    """Whether the operator process that lived through the API server's restart was still the
    one running, and running, when round 1's aggregator ran (a Job it created after the
    restart)."""


@pytest.fixture(scope="module")
def interrupted_run(
    devcluster: DevCluster,
    operator: Operator,
    namespace: str,
    assets: Assets,
    manifest: Callable[..., Manifest],
) -> InterruptedRun:
    """Two rounds, the control plane's processes taken away three times: the API server
    restarted while round 1's clients run, then the operator SIGKILLed and started again while
    round 1's aggregator runs and again while round 2's clients run."""
    name = unique_name()
    apply(devcluster, small_run(manifest, assets, name, rounds=2))
    wait_running(devcluster, operator, namespace, name, 1, "client")
    process = operator.proc
    devcluster.cluster.stop_component("kube-apiserver")
    devcluster.cluster.start_component("kube-apiserver")
    wait_running(devcluster, operator, namespace, name, 1, "aggregator", timeout=300)
    reconnected = operator.proc is process and process is not None and process.poll() is None
    operator.kill()
    operator.start()
    wait_running(devcluster, operator, namespace, name, 2, "client", timeout=300)
    operator.kill()
    operator.start()
    run = wait_condition(devcluster, operator, namespace, name, "Succeeded", RUN_TIMEOUT)
    return InterruptedRun(name, run, jobs_of(devcluster, namespace, name), reconnected)


def test_the_api_server_restarted_mid_round_the_operator_reconnects_and_the_run_finishes(
    devcluster: DevCluster, interrupted_run: InterruptedRun
) -> None:
    assert interrupted_run.reconnected, "the operator did not live through the API server restart"
    history = assert_finished(devcluster, interrupted_run.name, interrupted_run.run, rounds=2)
    assert [(h["round"], h["attempt"]) for h in history] == [(1, 0), (2, 0)]


def test_an_operator_killed_mid_round_resumes_without_duplicates(
    interrupted_run: InterruptedRun,
) -> None:
    """Killed once while an aggregator ran and once while clients ran: it picks the round up
    where it was, creating no Job twice and starting no new attempt."""
    history = interrupted_run.run["status"]["history"]
    assert [(r["round"], r["attempt"]) for r in history] == [(1, 0), (2, 0)]
    keys = job_keys(interrupted_run.jobs)
    assert len(keys) == 1 + 2 * (len(PAIR) + 1)  # round 0's aggregator, then clients and aggregator
    assert max(keys.values()) == 1


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
    pods = labelled(devcluster, namespace, "pods", f"job-name={job['metadata']['name']}")
    assert pods  # the replacement, whose termination message the operator read
    assert all(p["metadata"]["uid"] != uid for p in pods)
