"""A site's Jobs: the watch runs the site's own image with the site's storage identity; the
client runs the accepted task's image with the site's template, data, key and privacy. Every
credential is a Secret reference in the site's namespace."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from fedtune_operator.api.site import FederatedSiteSpec
from fedtune_operator.site_engine import CreateSiteClientJob, CreateWatchJob
from fedtune_operator.site_manifests import observe_site_jobs, site_client_job, watch_job
from fedtune_trainer.wire.site import SiteClientTask, WatchTask
from fedtune_trainer.wire.task import parse_task
from tests.api.api_cases import EXAMPLES
from tests.operator.test_manifests import env_of

SPEC = FederatedSiteSpec.model_validate(
    yaml.safe_load((EXAMPLES / "site.yaml").read_text())["spec"]
)
RUN_IMAGE = "ghcr.io/fedtune/trainer:0.1.0"
SHA = "cd" * 32


def watch() -> dict[str, Any]:
    return watch_job(
        site="bank-d-in-bot", namespace="ml", uid="u-1", spec=SPEC, action=CreateWatchJob(3, 1, 2)
    )


def client() -> dict[str, Any]:
    action = CreateSiteClientJob(4, SHA, RUN_IMAGE)
    return site_client_job(
        site="bank-d-in-bot", namespace="ml", uid="u-1", spec=SPEC, action=action
    )


def container(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]["containers"][0]


def test_the_watch_runs_the_site_image_with_the_site_storage_identity() -> None:
    job = watch()
    assert job["metadata"]["name"] == "bank-d-in-bot-w3-1"
    assert job["metadata"]["labels"]["fedtune.dev/site"] == "bank-d-in-bot"
    assert job["metadata"]["labels"]["fedtune.dev/role"] == "watch"
    assert job["metadata"]["ownerReferences"][0]["kind"] == "FederatedSite"
    assert container(job)["image"] == SPEC.template.image
    assert container(job)["command"] == ["fedtune-trainer", "watch"]
    assert "nvidia.com/gpu" not in json.dumps(container(job)["resources"])
    env = env_of(job)
    assert env["AWS_ACCESS_KEY_ID"] == {
        "secretKeyRef": {"name": "bank-d-fedtune", "key": "AWS_ACCESS_KEY_ID"}
    }
    assert env["AWS_ENDPOINT_URL"] == "https://s3.shared.example"
    assert "FEDTUNE_SIGNING_KEY" not in env
    task = parse_task(env["FEDTUNE_TASK"])
    assert isinstance(task, WatchTask)
    assert (task.after_round, task.contributed) == (3, 2)
    assert task.run_key == SPEC.run.task_public_key
    assert task.policy == SPEC.policy


def test_the_client_runs_the_accepted_image_with_the_site_template_and_key() -> None:
    job = client()
    assert job["metadata"]["name"] == "bank-d-in-bot-r4"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert container(job)["image"] == RUN_IMAGE
    assert container(job)["command"] == ["fedtune-trainer", "site-client"]
    assert container(job)["resources"]["limits"]["nvidia.com/gpu"] == 1
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["priorityClassName"] == "batch-low"
    env = env_of(job)
    assert env["FEDTUNE_SIGNING_KEY"] == {
        "secretKeyRef": {"name": "bank-d-signing", "key": "signing.key"}
    }
    assert env["FEDTUNE_DATA_AWS_ACCESS_KEY_ID"] == {
        "secretKeyRef": {"name": "bank-d-data", "key": "AWS_ACCESS_KEY_ID"}
    }
    task = parse_task(env["FEDTUNE_TASK"])
    assert isinstance(task, SiteClientTask)
    assert (task.round, task.task_sha256, task.data_uri) == (4, SHA, SPEC.data_uri)
    assert task.privacy == SPEC.policy.privacy


@pytest.mark.parametrize(
    ("state_claim", "state_dir"), [("bank-d-fedtune-state", "/var/lib/fedtune/state"), (None, None)]
)
def test_the_client_keeps_its_state_on_the_site_claim_when_it_names_one(
    state_claim: str | None, state_dir: str | None
) -> None:
    """The residual (fp32, the adapter's size) and the control variate stay at the site; without
    a claim they go to the run's storage (FEDTUNE_STATE_DIR unset)."""
    spec = SPEC.model_copy(update={"state_claim": state_claim})
    job = site_client_job(
        site="s", namespace="ml", uid="u-1", spec=spec, action=CreateSiteClientJob(4, SHA, "i")
    )
    assert env_of(job).get("FEDTUNE_STATE_DIR") == state_dir
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in job["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims == ([state_claim] if state_claim else [])
    mounts = [m["mountPath"] for m in container(job)["volumeMounts"]]
    assert (state_dir in mounts) if state_dir else mounts == ["/tmp"]
    assert "FEDTUNE_STATE_DIR" not in env_of(watch())


def test_site_pods_are_restricted_and_carry_no_secret_value() -> None:
    for job in (watch(), client()):
        pod = job["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container(job)["securityContext"]["allowPrivilegeEscalation"] is False
        assert pod["automountServiceAccountToken"] is False
        for entry in container(job)["env"]:
            assert "value" not in entry or not entry["name"].startswith(
                ("AWS_SECRET", "FEDTUNE_SIGN")
            )


def finished(job: dict[str, Any], code: int, message: str) -> tuple[dict, dict]:
    job = {**job, "status": {"failed" if code else "succeeded": 1, "conditions": [
        {"type": "Failed" if code else "Complete", "status": "True"}]}}  # fmt: skip
    job["metadata"] = {**job["metadata"], "ownerReferences": [{"uid": "u-1"}]}
    pod = {
        "metadata": {"ownerReferences": [{"kind": "Job", "name": job["metadata"]["name"]}]},
        "status": {
            "containerStatuses": [
                {"name": "trainer", "state": {"terminated": {"exitCode": code, "message": message}}}
            ]
        },
    }
    return job, pod


def test_a_finished_watch_is_read_back_as_the_engine_needs_it() -> None:
    summary = {"kind": "watch", "client": "bank-d", "outcome": "task", "round": 4,
               "taskSha256": SHA, "image": RUN_IMAGE}  # fmt: skip
    ok_job, ok_pod = finished(watch(), 0, json.dumps(summary))
    [seen] = observe_site_jobs("u-1", [ok_job], [ok_pod])
    assert (seen.role, seen.round, seen.attempt, seen.state) == ("watch", 3, 1, "succeeded")
    assert seen.summary is not None
    assert seen.summary.round == 4
    bad_job, bad_pod = finished(watch(), 2, "error: Refused: round 4: image not allowed")
    [refused] = observe_site_jobs("u-1", [bad_job], [bad_pod])
    assert refused.message == "Refused: round 4: image not allowed"
    assert observe_site_jobs("another-uid", [ok_job], [ok_pod]) == []
