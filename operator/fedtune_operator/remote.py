"""The run's side of a site's client (docs/sites.md), as pure builders.

A client trained at a site is a Job here like any other, so that quorum, round timeouts,
sampling and retries treat it as they treat a local client: its *relay* Job publishes the
client's task for the round (signed with the run's task key, which only relay Jobs get) and waits
for the site's signed commit, its refusal, or its silence, then reports as a client Job does.
The relay is small (no GPU, no model, no data): it only reads and writes a few storage objects.
"""

from __future__ import annotations

import json
from typing import Any

from fedtune_operator.api import FederatedFineTuneSpec, PodSettings
from fedtune_operator.credentials import task_signing_env
from fedtune_operator.manifests import (
    base_labels,
    client_adapter,
    client_job,
    job_manifest,
)
from fedtune_operator.objects import client_job_name
from fedtune_operator.pod_settings import poller_resources
from fedtune_trainer.wire.contract import (
    COMMAND,
    LABEL_CLIENT,
    ROLE_RELAY,
)
from fedtune_trainer.wire.site import RelayTask, RemoteTask


def remote_task(
    run: str, uid: str, spec: FederatedFineTuneSpec, round_: int, client: str
) -> RemoteTask:
    """What the run asks of a site's client for `round_`: the local client's task without what
    only the site knows (its data and where it reads storage from)."""
    return RemoteTask(
        run=run,
        run_uid=uid,
        round=round_,
        client=client,
        image=spec.template.image,
        base_model=spec.base_model,
        tokenizer=spec.tokenizer,
        adapter=client_adapter(spec, client),
        data=spec.data,
        training=spec.training,
        delta=spec.delta,
    )


def relay_job(
    *,
    run: str,
    namespace: str,
    uid: str,
    spec: FederatedFineTuneSpec,
    round_: int,
    attempt: int,
    client: str,
) -> dict[str, Any]:
    entry = next(c for c in spec.clients if c.name == client)
    if entry.site is None or spec.task_signing is None:
        raise ValueError(f"{client} is not a site's client of a run that signs its tasks")
    task = RelayTask(
        storage=spec.storage.location(),
        remote=remote_task(run, uid, spec, round_, client),
        client_key=entry.site.public_key,
        silence_seconds=entry.site.silence_seconds,
    )
    # The template's placement is for training; a relay needs neither GPUs nor their nodes.
    settings = PodSettings(
        resources=poller_resources(spec.template.resources),
        env=spec.template.env,
        service_account_name=spec.template.service_account_name,
    )
    return job_manifest(
        name=client_job_name(run, round_, client),
        namespace=namespace,
        run=run,
        uid=uid,
        spec=spec,
        labels={**base_labels(run, round_, ROLE_RELAY, attempt), LABEL_CLIENT: client},
        settings=settings,
        command=[COMMAND, "relay"],
        task_json=json.dumps(task.wire(), separators=(",", ":")),
        extra_env=task_signing_env(spec.task_signing),
        uris=(),
        backoff_limit=spec.backoff_limit,
    )


def job_for_client(*, spec: FederatedFineTuneSpec, client: str, **job: Any) -> dict[str, Any]:
    """A client's Job for a round (`job`: the run, namespace, uid, round and attempt): its
    training Job, or its relay when a site trains it."""
    build = relay_job if is_remote(spec, client) else client_job
    return build(spec=spec, client=client, **job)


def is_remote(spec: FederatedFineTuneSpec, client: str) -> bool:
    return any(c.name == client and c.site is not None for c in spec.clients)
