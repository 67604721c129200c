"""A site's Jobs, as pure builders, and how the site's operator reads them back (docs/sites.md).

The watch Job runs the site's own image (`spec.template.image`): what verifies the run's tasks
is the site's choice, never the run's. The client Job runs the image of the task the watch
accepted, which the site's policy allows, with the site's template (GPUs, nodes, queue), its
storage identity, its data credentials and its signing key: all from Secrets in the site's own
namespace, none of which the run ever sees.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from fedtune_operator.api import PodSettings
from fedtune_operator.api.site import SITE_KIND, FederatedSiteSpec
from fedtune_operator.credentials import secret_env, secret_name
from fedtune_operator.manifests import pod_job
from fedtune_operator.objects import owner_reference
from fedtune_operator.observe import failure_message, termination
from fedtune_operator.pod_settings import poller_resources
from fedtune_operator.rounds import job_state
from fedtune_operator.site_engine import CreateSiteClientJob, CreateWatchJob, SiteJob
from fedtune_operator.volumes import state_volume
from fedtune_trainer.wire.contract import (
    COMMAND,
    DATA_CREDENTIALS_PREFIX,
    LABEL_ATTEMPT,
    LABEL_ROLE,
    LABEL_ROUND,
    LABEL_SITE,
    ROLE_CLIENT,
    ROLE_WATCH,
    SIGNING_KEY_ENV,
)
from fedtune_trainer.wire.results import ClientSummary, WatchSummary, parse_summary
from fedtune_trainer.wire.site import SiteClientTask, WatchTask


def watch_job_name(site: str, after_round: int, attempt: int) -> str:
    return f"{site}-w{after_round}-{attempt}"


def client_job_name(site: str, round_: int) -> str:
    return f"{site}-r{round_}"


def owner(site: str, uid: str) -> dict[str, Any]:
    return owner_reference(site, uid, SITE_KIND)


def _labels(site: str, role: str, round_: int, attempt: int) -> dict[str, str]:
    return {
        LABEL_SITE: site,
        LABEL_ROLE: role,
        LABEL_ROUND: str(round_),
        LABEL_ATTEMPT: str(attempt),
    }


def watch_job(
    *, site: str, namespace: str, uid: str, spec: FederatedSiteSpec, action: CreateWatchJob
) -> dict[str, Any]:
    task = WatchTask(
        run=spec.run.name,
        client=spec.client,
        storage=spec.run.storage.location(),
        run_key=spec.run.task_public_key,
        after_round=action.after_round,
        contributed=action.contributed,
        policy=spec.policy,
    )
    settings = PodSettings(
        resources=poller_resources(spec.template.resources),
        env=spec.template.env,
        service_account_name=spec.template.service_account_name,
    )
    return pod_job(
        name=watch_job_name(site, action.after_round, action.attempt),
        namespace=namespace,
        owner=owner(site, uid),
        template=spec.template,
        storage=spec.run.storage,
        deadline=None,
        labels=_labels(site, ROLE_WATCH, action.after_round, action.attempt),
        settings=settings,
        command=[COMMAND, "watch"],
        task_json=json.dumps(task.wire(), separators=(",", ":")),
        extra_env=[],
        uris=(),
        backoff_limit=3,
        credentials=spec.run.storage.credentials_secret,
    )


def site_client_job(
    *, site: str, namespace: str, uid: str, spec: FederatedSiteSpec, action: CreateSiteClientJob
) -> dict[str, Any]:
    task = SiteClientTask(
        run=spec.run.name,
        round=action.round,
        client=spec.client,
        storage=spec.run.storage.location(),
        run_key=spec.run.task_public_key,
        task_sha256=action.task_sha256,
        data_uri=spec.data_uri,
        privacy=spec.policy.privacy,
    )
    signing = {"name": spec.signing.secret_name, "key": spec.signing.secret_key}
    data = spec.data_credentials_secret
    return pod_job(
        name=client_job_name(site, action.round),
        namespace=namespace,
        owner=owner(site, uid),
        template=spec.template,
        storage=spec.run.storage,
        deadline=None,
        labels=_labels(site, ROLE_CLIENT, action.round, 0),
        settings=PodSettings.model_validate(
            spec.template.model_dump(include=set(PodSettings.model_fields))
        ),
        command=[COMMAND, "site-client"],
        task_json=json.dumps(task.wire(), separators=(",", ":")),
        extra_env=[
            *secret_env(DATA_CREDENTIALS_PREFIX, data),
            {"name": SIGNING_KEY_ENV, "valueFrom": {"secretKeyRef": signing}},
        ],
        uris=(spec.data_uri,),
        backoff_limit=2,
        credentials=spec.run.storage.credentials_secret,
        volume=state_volume(spec.state_claim),
        data_credentials=secret_name(data) if data else None,
        image=action.image,
    )


def observe_site_jobs(
    site_uid: str, jobs: list[Mapping[str, Any]], pods: list[Mapping[str, Any]]
) -> list[SiteJob]:
    """The site's Jobs as the engine reads them: role, round, attempt, state, and a finished
    Job's summary (success) or reason (failure) from its pod's termination message."""
    pods_by_job: dict[str, list[Mapping[str, Any]]] = {}
    for pod in pods:
        for ref in pod["metadata"].get("ownerReferences") or []:
            if ref.get("kind") == "Job":
                pods_by_job.setdefault(ref["name"], []).append(pod)
    out = []
    for job in jobs:
        meta = job["metadata"]
        if not any(o.get("uid") == site_uid for o in meta.get("ownerReferences") or []):
            continue
        labels = meta.get("labels") or {}
        role = labels.get(LABEL_ROLE)
        if role not in (ROLE_WATCH, ROLE_CLIENT):
            continue
        state, condition = job_state(job.get("status"))
        mine = pods_by_job.get(meta["name"], [])
        summary: WatchSummary | ClientSummary | None = None
        message = ""
        if state == "succeeded":
            for pod in mine:
                code, text, _ = termination(pod)
                try:
                    parsed = parse_summary(text) if code == 0 and text else None
                except (ValueError, ValidationError):
                    parsed = None
                if isinstance(parsed, WatchSummary | ClientSummary):
                    summary = parsed
        elif state == "failed":
            message = _reason(condition, mine)
        out.append(
            SiteJob(
                name=meta["name"],
                role=role,
                round=int(labels.get(LABEL_ROUND, "0")),
                attempt=int(labels.get(LABEL_ATTEMPT, "0")),
                state=state,
                summary=summary,
                message=message,
            )
        )
    return out


def _reason(condition: Mapping[str, Any] | None, pods: list[Mapping[str, Any]]) -> str:
    """A failed Job's reason as the trainer wrote it (`error: Refused: round 3: ...`, without
    `error: `: the engine reads the words it begins with), else the Job's condition's."""
    for pod in reversed(pods):
        code, text, _ = termination(pod)
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if code not in (None, 0) and lines:
            return lines[-1].removeprefix("error: ")[:1024]
    return failure_message(condition, pods, limit=1024)
