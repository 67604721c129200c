"""Sites on real control planes: a run's cluster and two data owners' clusters, side by side,
each with its own etcd, API server, controller manager, kubelet and operator, meeting only in the
run's S3 storage, where each site has its own account confined by the policy `fedtune
storage-policy` prints (enforced by the S3 server).

One client trains in the run's cluster, two at sites. The run succeeds with every round merged
from all three; each site's FederatedSite completes with the rounds it gave; and nothing of a
site's (its data, its Secrets, its key) is in the run cluster's API objects.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from devcluster.federation import Federation, remove_federation, start_federation
from devcluster.testing import DevCluster, OperatorProcess, make_tiny_assets, wait_for
from fedtune_operator import storage_policy
from fedtune_operator.validation import parse_spec
from fedtune_trainer.storage import signing
from tests.e2e.support import condition

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
FEDERATION_DIR = REPO / ".devcluster" / "pytest-sites"
BUCKET = "fedsites"
RUN = "chatbot"
NAMESPACE = "fed"
SITE_NAMESPACE = "ml"
SITES = ("site-a", "site-b")
LOCAL = "clinic"
ROUNDS = 2
RUN_TIMEOUT = 600


@dataclass
class Outcome:
    fed: Federation
    run: dict[str, Any]
    sites: dict[str, dict[str, Any]]
    site_data: dict[str, Path]
    seconds: float


def secret(dc: DevCluster, namespace: str, name: str, **data: str) -> None:
    literals = [f"--from-literal={k}={v}" for k, v in data.items()]
    dc.kubectl("create", "secret", "generic", name, "-n", namespace, *literals)


def get(dc: DevCluster, kind: str, namespace: str, name: str) -> dict[str, Any]:
    return json.loads(dc.kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout)


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outcome]:
    work = tmp_path_factory.mktemp("sites")
    remove_federation(FEDERATION_DIR)
    # Not under /tmp: a pod of the devcluster has a /tmp of its own (an emptyDir), as in a
    # cluster; the sites' data is on their machine's disk, where their pods read it.
    model, data = make_tiny_assets(
        FEDERATION_DIR / "assets", clients=3, samples=48, hidden_size=64, eval_samples=16
    )
    prefixes = {s: f"runs/{RUN}/sites/{s}/" for s in SITES}
    operators: list[OperatorProcess] = []
    with start_federation(
        FEDERATION_DIR, prefixes, bucket=BUCKET, pod_env={"OMP_NUM_THREADS": "1"}
    ) as fed:
        try:
            yield run_federation(fed, model, data, work, operators)
        finally:
            for op in operators:
                op.stop()


def run_federation(
    fed: Federation, model: Path, data: Path, work: Path, operators: list[OperatorProcess]
) -> Outcome:
    run = fed.run
    run.upload_dir(model, BUCKET, "models/tiny")
    run.s3.client().upload_file(str(data / "client-0.jsonl"), BUCKET, "data/clinic.jsonl")
    task_private, task_public = signing.generate()
    site_keys = {s: signing.generate() for s in SITES}
    for dc in fed.clusters().values():
        dc.apply_crds()

    # The run's cluster: its own identity (the bucket's owner) and the task key, nothing else.
    run.kubectl("create", "namespace", NAMESPACE)
    root = run.s3
    secret(run, NAMESPACE, "run-s3", AWS_ACCESS_KEY_ID=root.access_key,
           AWS_SECRET_ACCESS_KEY=root.secret_key)  # fmt: skip
    secret(run, NAMESPACE, "task-key", **{"task-signing.key": task_private.decode()})
    spec = {
        "baseModel": f"s3://{BUCKET}/models/tiny",
        "rounds": ROUNDS,
        "adapter": {"r": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]},
        "training": {"localSteps": 3, "batchSize": 4, "maxSeqLength": 64, "learningRate": 0.003},
        "data": {"format": "chat"},
        "storage": {
            "uri": f"s3://{BUCKET}/runs/{RUN}",
            "endpoint": root.endpoint,
            "credentialsSecret": {"name": "run-s3"},
        },
        "clients": [
            {"name": LOCAL, "dataUri": f"s3://{BUCKET}/data/clinic.jsonl"},
            *({"name": s, "site": {"publicKey": site_keys[s][1]}} for s in SITES),
        ],
        "taskSigning": {"secretName": "task-key"},
        "aggregation": {"minClients": 3},
        "backoffLimit": 0,
    }
    accounts = {"run-s3": root.name} | {
        storage_policy.site_identity(s): fed.sites[s].s3.name for s in SITES
    }
    policy = storage_policy.policies(parse_spec(spec), "versitygw", accounts)[BUCKET]["policy"]
    root.put_bucket_policy(BUCKET, policy)

    # Each site's cluster: its storage identity, its signing key, its data on its own disk.
    site_data = {}
    for i, s in enumerate(SITES, start=1):
        dc, account = fed.sites[s].dc, fed.sites[s].s3
        dc.kubectl("create", "namespace", SITE_NAMESPACE)
        secret(dc, SITE_NAMESPACE, "site-s3", AWS_ACCESS_KEY_ID=account.access_key,
               AWS_SECRET_ACCESS_KEY=account.secret_key)  # fmt: skip
        secret(dc, SITE_NAMESPACE, "site-key", **{"signing.key": site_keys[s][0].decode()})
        site_data[s] = data / f"client-{i}.jsonl"
        apply(dc, {
            "apiVersion": "fedtune.dev/v1alpha1",
            "kind": "FederatedSite",
            "metadata": {"name": f"{s}-in-{RUN}", "namespace": SITE_NAMESPACE},
            "spec": {
                "client": s,
                "run": {
                    "name": RUN,
                    "storage": {"uri": spec["storage"]["uri"], "endpoint": root.endpoint,
                                "credentialsSecret": {"name": "site-s3"}},
                    "taskPublicKey": task_public,
                },
                "signing": {"secretName": "site-key"},
                "dataUri": site_data[s].as_uri(),
                "policy": {"images": ["ghcr.io/fedtune/"], "maxLocalSteps": 10},
            },
        })  # fmt: skip
        op = OperatorProcess(dc, SITE_NAMESPACE, work / f"{s}.log", mode="site")
        operators.append(op)
        op.start()
    op = OperatorProcess(run, NAMESPACE, work / "run.log")
    operators.append(op)
    op.start()
    start = time.monotonic()
    apply(run, {"apiVersion": "fedtune.dev/v1alpha1", "kind": "FederatedFineTune",
                "metadata": {"name": RUN, "namespace": NAMESPACE}, "spec": spec})  # fmt: skip

    def succeeded() -> dict[str, Any] | None:
        obj = get(run, "fft", NAMESPACE, RUN)
        failed = condition(obj, "Failed")
        if failed and failed["status"] == "True":
            raise AssertionError(f"run failed: {failed['message']}\n{diagnose()}")
        done = condition(obj, "Succeeded")
        return obj if done and done["status"] == "True" else None

    def diagnose() -> str:
        logs = [f"--- {o.log.name}\n{o.log_tail(40)}" for o in operators]
        sites = [
            json.dumps(get(fed.sites[s].dc, "fsite", SITE_NAMESPACE, f"{s}-in-{RUN}").get("status"))
            for s in SITES
        ]
        return "\n".join([*logs, *sites, run.logs()])

    obj = wait_for(succeeded, timeout=RUN_TIMEOUT, what=f"{RUN} to succeed", interval=2.0,
                   diagnose=diagnose)  # fmt: skip
    seconds = time.monotonic() - start

    def completed(s: str) -> dict[str, Any] | None:
        site = get(fed.sites[s].dc, "fsite", SITE_NAMESPACE, f"{s}-in-{RUN}")
        return site if (site.get("status") or {}).get("phase") == "Completed" else None

    sites = {s: wait_for(lambda s=s: completed(s), timeout=120, what=f"{s} to complete",
                         diagnose=diagnose) for s in SITES}  # fmt: skip
    return Outcome(fed, obj, sites, site_data, seconds)


def apply(dc: DevCluster, body: dict[str, Any]) -> None:
    dc.kubectl("apply", "-f", "-", input=yaml.safe_dump(body))


def test_a_run_with_two_site_clients_succeeds_with_every_round_from_all_three(
    outcome: Outcome,
) -> None:
    history = outcome.run["status"]["history"]
    assert [h["round"] for h in history] == list(range(1, ROUNDS + 1))
    assert [h["clientsSucceeded"] for h in history] == [3] * ROUNDS
    clients = {c["name"]: c for c in outcome.run["status"]["clients"]}
    assert set(clients) == {LOCAL, *SITES}


def test_each_site_completes_with_the_rounds_it_gave(outcome: Outcome) -> None:
    for site in outcome.sites.values():
        status = site["status"]
        assert status["roundsContributed"] == ROUNDS
        assert status["bytesSent"] > 0
        assert status.get("refusals", []) == []


def test_the_run_cluster_holds_nothing_of_the_sites(outcome: Outcome) -> None:
    """Every object of the run's cluster a user could read, against what only the sites hold."""
    dump = outcome.fed.run.kubectl(
        "get", "all,secrets,configmaps,events,federatedfinetunes", "-A", "-o", "json"
    ).stdout
    for s, path in outcome.site_data.items():
        assert str(path) not in dump, f"{s}'s data URI is in the run's cluster"
    assert "site-s3" not in dump  # the sites' Secrets, by name
    assert "site-key" not in dump
    for s in SITES:
        assert outcome.fed.sites[s].s3.secret_key not in dump
