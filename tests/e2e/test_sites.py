"""Sites on real control planes: a run's cluster and two data owners' clusters, side by side,
each with its own etcd, API server, controller manager, kubelet and operator, meeting only in the
run's S3 storage, where each site has its own account confined by the policy `fedtune
storage-policy` prints (enforced by the S3 server).

One client trains in the run's cluster, two at sites. The run succeeds with every round merged
from all three; each site's FederatedSite completes with the rounds it gave; and nothing of a
site's (its data, its Secrets, its key) is in the run cluster's API objects. A second run meets a
site whose policy refuses the run's image and a site that signs with a key the run did not pin:
both are told apart, in both clusters' status, and the run goes on with its quorum.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
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
ASSETS_DIR = REPO / "build" / "pytest-sites"
BUCKET = "fedsites"
NAMESPACE = "fed"
SITE_NAMESPACE = "ml"
SITES = ("site-a", "site-b")
LOCAL = "clinic"
ROUNDS = 2
RUN_TIMEOUT = 600


def secret(dc: DevCluster, namespace: str, name: str, **data: str) -> None:
    literals = [f"--from-literal={k}={v}" for k, v in data.items()]
    dc.kubectl("create", "secret", "generic", name, "-n", namespace, *literals)


def get(dc: DevCluster, kind: str, namespace: str, name: str) -> dict[str, Any]:
    return json.loads(dc.kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout)


def resource(kind: str, name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "fedtune.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def apply(dc: DevCluster, body: dict[str, Any]) -> None:
    dc.kubectl("apply", "-f", "-", input=yaml.safe_dump(body))


@dataclass
class Sites:
    """The federation with its operators, keys and accounts, set up once for the module."""

    fed: Federation
    data: Path
    work: Path
    task_key: tuple[bytes, str] = field(default_factory=signing.generate)
    site_keys: dict[str, tuple[bytes, str]] = field(
        default_factory=lambda: {s: signing.generate() for s in SITES}
    )
    operators: list[OperatorProcess] = field(default_factory=list)
    statements: list[dict[str, Any]] = field(default_factory=list)

    @property
    def run(self) -> DevCluster:
        return self.fed.run

    def site(self, name: str) -> DevCluster:
        return self.fed.sites[name].dc

    def data_of(self, site: str) -> Path:
        return self.data / f"client-{SITES.index(site) + 1}.jsonl"

    def prepare(self, model: Path) -> None:
        run, root = self.run, self.run.s3
        run.upload_dir(model, BUCKET, "models/tiny")
        run.s3.client().upload_file(str(self.data / "client-0.jsonl"), BUCKET, "data/clinic.jsonl")
        for dc in self.fed.clusters().values():
            dc.apply_crds()
        # The run's cluster: its own identity (the bucket's owner) and the task key, no more.
        run.kubectl("create", "namespace", NAMESPACE)
        secret(
            run,
            NAMESPACE,
            "run-s3",
            AWS_ACCESS_KEY_ID=root.access_key,
            AWS_SECRET_ACCESS_KEY=root.secret_key,
        )
        secret(run, NAMESPACE, "task-key", **{"task-signing.key": self.task_key[0].decode()})
        # Each site's cluster: its storage identity and its signing key (and a key the run never
        # pinned, for the site that signs with the wrong one).
        for s in SITES:
            dc, account = self.site(s), self.fed.sites[s].s3
            dc.kubectl("create", "namespace", SITE_NAMESPACE)
            secret(
                dc,
                SITE_NAMESPACE,
                "site-s3",
                AWS_ACCESS_KEY_ID=account.access_key,
                AWS_SECRET_ACCESS_KEY=account.secret_key,
            )
            secret(dc, SITE_NAMESPACE, "site-key", **{"signing.key": self.site_keys[s][0].decode()})
            wrong = signing.generate()[0].decode()
            secret(dc, SITE_NAMESPACE, "wrong-key", **{"signing.key": wrong})
            self.operators.append(
                OperatorProcess(dc, SITE_NAMESPACE, self.work / f"{s}.log", mode="site")
            )
        self.operators.append(OperatorProcess(run, NAMESPACE, self.work / "run.log"))
        for op in self.operators:
            op.start()

    def start(self, name: str, min_clients: int, **sites: dict[str, Any]) -> None:
        """Run `name`: its FederatedFineTune, each site's FederatedSite (`sites`: overrides of a
        site's spec), and the bucket policy that adds this run's identities to the earlier runs'."""
        root = self.run.s3
        spec = {
            "baseModel": f"s3://{BUCKET}/models/tiny",
            "rounds": ROUNDS,
            "adapter": {"r": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]},
            "training": {
                "localSteps": 3,
                "batchSize": 4,
                "maxSeqLength": 64,
                "learningRate": 0.003,
            },
            "data": {"format": "chat"},
            "storage": {
                "uri": f"s3://{BUCKET}/runs/{name}",
                "endpoint": root.endpoint,
                "credentialsSecret": {"name": "run-s3"},
            },
            "clients": [
                {"name": LOCAL, "dataUri": f"s3://{BUCKET}/data/clinic.jsonl"},
                *({"name": s, "site": {"publicKey": self.site_keys[s][1]}} for s in SITES),
            ],
            "taskSigning": {"secretName": "task-key"},
            "aggregation": {"minClients": min_clients},
            "backoffLimit": 0,
        }
        accounts = {"run-s3": root.name} | {
            storage_policy.site_identity(s): self.fed.sites[s].s3.name for s in SITES
        }
        policy = storage_policy.policies(parse_spec(spec), "versitygw", accounts)[BUCKET]
        self.statements += policy["policy"]["Statement"]
        root.put_bucket_policy(BUCKET, {"Version": "2012-10-17", "Statement": self.statements})
        for s in SITES:
            site_spec = {
                "client": s,
                "run": {
                    "name": name,
                    "storage": {
                        "uri": spec["storage"]["uri"],
                        "endpoint": root.endpoint,
                        "credentialsSecret": {"name": "site-s3"},
                    },
                    "taskPublicKey": self.task_key[1],
                },
                "signing": {"secretName": "site-key"},
                "dataUri": self.data_of(s).as_uri(),
                "policy": {"images": ["ghcr.io/fedtune/"], "maxLocalSteps": 10},
            } | sites.get(s, {})
            apply(
                self.site(s), resource("FederatedSite", f"{s}-in-{name}", SITE_NAMESPACE, site_spec)
            )
        apply(self.run, resource("FederatedFineTune", name, NAMESPACE, spec))

    def succeeded(self, name: str) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            obj = get(self.run, "fft", NAMESPACE, name)
            failed = condition(obj, "Failed")
            if failed and failed["status"] == "True":
                raise AssertionError(f"{name} failed: {failed['message']}\n{self.diagnose(name)}")
            done = condition(obj, "Succeeded")
            return obj if done and done["status"] == "True" else None

        return wait_for(
            check,
            timeout=RUN_TIMEOUT,
            what=f"{name} to succeed",
            interval=2.0,
            diagnose=lambda: self.diagnose(name),
        )

    def site_status(self, site: str, run: str, phase: str) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            obj = get(self.site(site), "fsite", SITE_NAMESPACE, f"{site}-in-{run}")
            return obj if (obj.get("status") or {}).get("phase") == phase else None

        return wait_for(
            check,
            timeout=120,
            what=f"{site} in {run} to be {phase}",
            diagnose=lambda: self.diagnose(run),
        )

    def diagnose(self, run: str) -> str:
        logs = [f"--- {o.log.name}\n{o.log_tail(40)}" for o in self.operators]
        sites = [
            json.dumps(get(self.site(s), "fsite", SITE_NAMESPACE, f"{s}-in-{run}").get("status"))
            for s in SITES
        ]
        return "\n".join([*logs, *sites, self.run.logs()])


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    remove_federation(FEDERATION_DIR)
    # Not under /tmp: a pod of the devcluster has a /tmp of its own (an emptyDir), as in a
    # cluster; the sites' data is on their machine's disk, where their pods read it (under
    # build/, ignored by git: a data URI's segments do not start with a dot).
    shutil.rmtree(ASSETS_DIR, ignore_errors=True)
    model, data = make_tiny_assets(
        ASSETS_DIR, clients=3, samples=48, hidden_size=64, eval_samples=16
    )
    prefixes = {s: f"runs/{s}-only/" for s in SITES}  # replaced by each run's policy
    with start_federation(
        FEDERATION_DIR, prefixes, bucket=BUCKET, pod_env={"OMP_NUM_THREADS": "1"}
    ) as fed:
        federated = Sites(fed, data, tmp_path_factory.mktemp("sites"))
        try:
            federated.prepare(model)
            yield federated
        finally:
            for op in federated.operators:
                op.stop()


@dataclass
class Finished:
    run: dict[str, Any]
    sites: dict[str, dict[str, Any]]
    seconds: float


@pytest.fixture(scope="module")
def chatbot(sites: Sites) -> Finished:
    start = time.monotonic()
    sites.start("chatbot", min_clients=3)
    run = sites.succeeded("chatbot")
    seconds = time.monotonic() - start
    return Finished(run, {s: sites.site_status(s, "chatbot", "Completed") for s in SITES}, seconds)


@pytest.fixture(scope="module")
def guarded(sites: Sites, chatbot: Finished) -> Finished:
    """site-a signs with a key the run did not pin; site-b's policy refuses the run's image."""
    start = time.monotonic()
    sites.start(
        "guarded",
        min_clients=1,
        **{
            "site-a": {"signing": {"secretName": "wrong-key"}},
            "site-b": {"policy": {"images": ["registry.site-b.example/"]}},
        },
    )
    run = sites.succeeded("guarded")
    seconds = time.monotonic() - start
    return Finished(run, {s: sites.site_status(s, "guarded", "Completed") for s in SITES}, seconds)


def test_a_run_with_two_site_clients_succeeds_with_every_round_from_all_three(
    chatbot: Finished,
) -> None:
    history = chatbot.run["status"]["history"]
    assert [h["round"] for h in history] == list(range(1, ROUNDS + 1))
    assert [h["clientsSucceeded"] for h in history] == [3] * ROUNDS
    clients = {c["name"] for c in chatbot.run["status"]["clients"]}
    assert clients == {LOCAL, *SITES}


def test_each_site_completes_with_the_rounds_it_gave(chatbot: Finished) -> None:
    for site in chatbot.sites.values():
        status = site["status"]
        assert status["roundsContributed"] == ROUNDS
        assert status["bytesSent"] > 0
        assert status.get("refusals", []) == []


def test_the_run_cluster_holds_nothing_of_the_sites(sites: Sites, chatbot: Finished) -> None:
    """Every object of the run's cluster a user could read, against what only the sites hold."""
    dump = sites.run.kubectl(
        "get", "all,secrets,configmaps,events,federatedfinetunes", "-A", "-o", "json"
    ).stdout
    for s in SITES:
        assert str(sites.data_of(s)) not in dump, f"{s}'s data URI is in the run's cluster"
        assert sites.fed.sites[s].s3.secret_key not in dump
    assert "site-s3" not in dump  # the sites' Secrets, by name
    assert "site-key" not in dump


def test_a_site_refusing_the_image_says_why_in_both_clusters(guarded: Finished) -> None:
    clients = {c["name"]: c for c in guarded.run["status"]["clients"]}
    assert "Refused: round" in clients["site-b"]["message"]
    assert "not in the site's policy" in clients["site-b"]["message"]
    refusals = guarded.sites["site-b"]["status"]["refusals"]
    assert [r["round"] for r in refusals] == list(range(1, ROUNDS + 1))
    assert all("not in the site's policy" in r["reason"] for r in refusals)


def test_a_delta_signed_with_a_key_the_run_did_not_pin_is_not_merged(guarded: Finished) -> None:
    clients = {c["name"]: c for c in guarded.run["status"]["clients"]}
    assert "SiteUnverified" in clients["site-a"]["message"]
    # The run went on with its quorum: the local client's delta alone, every round.
    assert [h["clientsSucceeded"] for h in guarded.run["status"]["history"]] == [1] * ROUNDS
