"""Sites on real control planes: a run's cluster and two data owners' clusters, side by side,
each with its own etcd, API server, controller manager, kubelet and operator, meeting only in the
run's S3 storage, where each site has its own account confined by the policy `fedtune
storage-policy` prints (enforced by the S3 server).

One client trains in the run's cluster, two at sites. The run succeeds with every round merged
from all three; each site's FederatedSite completes with the rounds it gave; and nothing of a
site's (its data, its Secrets, its key) is in the run cluster's API objects. A second run meets a
site whose policy refuses the run's image and a site that signs with a key the run did not pin;
a third, a site that pinned a task key that is not the run's (to it every task is forged) and a
site paused at the start that resumes after round 1. Each is told apart, in both clusters'
status, and the run goes on with its quorum.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devcluster.federation import remove_federation, start_federation
from devcluster.sites import LOCAL, ROUNDS, SITE_NAMESPACE, Sites
from devcluster.testing import make_tiny_assets, wait_for

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
FEDERATION_DIR = REPO / ".devcluster" / "pytest-sites"
ASSETS_DIR = REPO / "build" / "pytest-sites"
BUCKET = "fedsites"
SITES = ("site-a", "site-b")


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
        federated = Sites(fed, BUCKET, data, tmp_path_factory.mktemp("sites"))
        try:
            federated.prepare(model)
            yield federated
        finally:
            federated.stop()


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


@pytest.fixture(scope="module")
def resumed(sites: Sites, guarded: Finished) -> Finished:
    """site-a pins a task key that is not the run's (every task looks forged to it); site-b is
    paused when the run starts and resumes once round 1 is merged."""
    start = time.monotonic()
    sites.start(
        "resumed",
        min_clients=1,
        **{
            "site-a": {
                "run": {**sites.site_run("resumed"), "taskPublicKey": sites.keys["wrong"][1]}
            },
            "site-b": {"policy": {"images": ["ghcr.io/fedtune/"], "paused": True}},
        },
    )

    def round_one_merged() -> bool:
        run = sites.get_run("resumed")
        return len((run.get("status") or {}).get("history") or []) >= 1

    wait_for(
        round_one_merged,
        timeout=300,
        what="round 1 of resumed to be merged",
        diagnose=lambda: sites.diagnose("resumed"),
    )
    sites.site("site-b").kubectl(
        "patch",
        "fsite",
        "site-b-in-resumed",
        "-n",
        SITE_NAMESPACE,
        "--type=merge",
        "-p",
        '{"spec": {"policy": {"paused": false}}}',
    )
    run = sites.succeeded("resumed")
    seconds = time.monotonic() - start
    return Finished(run, {s: sites.site_status(s, "resumed", "Completed") for s in SITES}, seconds)


def test_a_run_with_two_site_clients_succeeds_with_every_round_from_all_three(
    chatbot: Finished,
) -> None:
    history = chatbot.run["status"]["history"]
    assert [h["round"] for h in history] == list(range(1, ROUNDS + 1))
    assert [h["clientsSucceeded"] for h in history] == [3] * ROUNDS
    clients = {c["name"]: c for c in chatbot.run["status"]["clients"]}
    assert set(clients) == {LOCAL, *SITES}
    # The site's last heartbeat, as its relay saw it; a local client has none.
    assert all(clients[s]["lastHeartbeat"] for s in SITES)
    assert "lastHeartbeat" not in clients[LOCAL]


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


def test_a_task_not_signed_with_the_key_a_site_pinned_is_refused_by_the_site(
    resumed: Finished,
) -> None:
    refusals = resumed.sites["site-a"]["status"]["refusals"]
    assert [r["round"] for r in refusals] == list(range(1, ROUNDS + 1))
    assert all("does not verify" in r["reason"] for r in refusals)
    clients = {c["name"]: c for c in resumed.run["status"]["clients"]}
    assert "Refused: round" in clients["site-a"]["message"]


def test_a_paused_site_is_left_out_and_rejoins_when_it_resumes(resumed: Finished) -> None:
    # Round 1 without site-b (paused) and without site-a (refusing); round 2 with site-b back.
    assert [h["clientsSucceeded"] for h in resumed.run["status"]["history"]] == [1, 2]
    assert resumed.sites["site-b"]["status"]["roundsContributed"] == 1
