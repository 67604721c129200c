"""A site's client, from the run's side: its round is a relay Job, not a training Job.

The relay publishes the task the run signs and waits for the site's commit; it holds the run's
task key and nothing of the site's, needs no GPU, and is a client to the round like any other.
"""

from __future__ import annotations

import json
from typing import Any

from fedtune_operator import manifests, observe, remote
from fedtune_operator.validation import parse_spec
from fedtune_trainer.wire.site import RelayTask
from fedtune_trainer.wire.task import AggregateTask, ClientTask, parse_task
from tests.operator.test_manifests import SPEC, env_of

SITE_KEY = "ed25519:eaLkirYtCkhKhn2akQl3xE5pOBWBYSYB0KIxSk3JAgQ="


def site_spec() -> Any:
    """SPEC with a third client, bank-c, trained at a site."""
    site = {"name": "bank-c", "site": {"publicKey": SITE_KEY, "silenceSeconds": 120}}
    return parse_spec(
        {
            **SPEC,
            "clients": [*SPEC["clients"], site],
            "taskSigning": {"secretName": "run-task-key"},
        }
    )


def job(client: str, spec: Any = None) -> dict[str, Any]:
    return remote.job_for_client(
        run="demo",
        namespace="ns",
        uid="uid-1",
        spec=spec or site_spec(),
        round_=2,
        attempt=1,
        client=client,
    )


def test_a_site_client_gets_a_relay_job_and_a_local_client_its_training_job() -> None:
    relay, local = job("bank-c"), job("hospital-a")
    assert relay["metadata"]["labels"]["fedtune.dev/role"] == "relay"
    assert relay["metadata"]["labels"]["fedtune.dev/client"] == "bank-c"
    assert relay["metadata"]["name"] == "demo-r2-bank-c"  # the client's Job name, as local
    assert relay["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "fedtune-trainer",
        "relay",
    ]
    assert local["metadata"]["labels"]["fedtune.dev/role"] == "client"


def test_the_relay_task_is_the_remote_task_without_anything_of_the_site() -> None:
    task = parse_task(env_of(job("bank-c"))["FEDTUNE_TASK"])
    assert isinstance(task, RelayTask)
    assert (task.run, task.round, task.client) == ("demo", 2, "bank-c")
    assert task.client_key == SITE_KEY
    assert task.silence_seconds == 120
    assert task.remote.run_uid == "uid-1"
    assert task.remote.image == SPEC["template"]["image"]
    assert task.remote.training == site_spec().training
    assert "dataUri" not in json.dumps(task.wire())


def test_the_task_key_reaches_the_relay_alone() -> None:
    spec = site_spec()
    assert env_of(job("bank-c"))["FEDTUNE_TASK_SIGNING_KEY"] == {
        "secretKeyRef": {"name": "run-task-key", "key": "task-signing.key"}
    }
    others = [
        job("hospital-a", spec),
        job("hospital-b", spec),
        manifests.aggregate_job(
            run="demo", namespace="ns", uid="u", spec=spec, round_=2, attempt=0, clients=["bank-c"]
        ),
        manifests.evaluate_job(run="demo", namespace="ns", uid="u", spec=spec, round_=2),
    ]
    for other in others:
        assert "FEDTUNE_TASK_SIGNING_KEY" not in env_of(other)
        assert "run-task-key" not in json.dumps(other)


def test_a_relay_asks_for_no_gpu_and_keeps_the_restricted_pod() -> None:
    pod = job("bank-c")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    assert container["resources"]["limits"]["memory"] == "512Mi"
    assert "nodeSelector" not in pod
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_the_aggregator_pins_the_site_key_for_the_site_client() -> None:
    spec = site_spec()
    aggregator = manifests.aggregate_job(
        run="demo",
        namespace="ns",
        uid="u",
        spec=spec,
        round_=2,
        attempt=0,
        clients=["hospital-a", "bank-c"],
    )
    task = parse_task(env_of(aggregator)["FEDTUNE_TASK"])
    assert isinstance(task, AggregateTask)
    assert task.client_keys == {"bank-c": SITE_KEY}


def test_a_relay_job_counts_as_the_client_of_its_round() -> None:
    relay = job("bank-c")
    relay["metadata"]["ownerReferences"] = [{"uid": "uid-1"}]
    relay["status"] = {"active": 1}
    [seen] = observe.observe_jobs("uid-1", [relay], [])
    assert (seen.role, seen.client, seen.round) == ("client", "bank-c", 2)


def test_a_local_client_task_is_unchanged_by_the_site_beside_it() -> None:
    task = parse_task(env_of(job("hospital-a"))["FEDTUNE_TASK"])
    assert isinstance(task, ClientTask)
    assert task.data_uri == "s3://a-data/train.jsonl"
