"""Pure builders of the Jobs a run creates: names, labels, the task, credentials, placement and
the `restricted` security context, from the spec alone.

Each Job's pod runs one container, `fedtune-trainer <kind>`, told its task through the
FEDTUNE_TASK environment variable. Storage credentials reach it only as `secretKeyRef`s to the
Secret the spec names; the operator never reads that Secret. `pvc://<claim>/<path>` URIs become a
read-only volume of that claim mounted at /mnt/pvc/<claim>, and the task sees a file:// URI.

The pods get no service-account token unless the run asks for one (the trainer never talks to the
API server), and `network_policy` builds the NetworkPolicy that confines the run's pods to DNS and
their storage (docs/install.md, "Network policy").
"""

from __future__ import annotations

import json
from typing import Any

from fedtune_operator.api import (
    FederatedFineTuneSpec,
    PodSettings,
    PodTemplate,
    S3Credentials,
)
from fedtune_operator.credentials import (
    client_credentials,
    noise_key_env,
    secret_env,
    secret_name,
    signing_env,
)
from fedtune_operator.objects import (
    aggregate_job_name,
    cleanup_job_name,
    client_job_name,
    drop_empty,
    evaluate_job_name,
    owner_reference,
)
from fedtune_operator.pod_settings import merge_pod_settings
from fedtune_operator.rounds import clients_per_round, quorum
from fedtune_operator.volumes import (
    PodVolume,
    all_local,
    cache_volume,
    local_uri,
    pvc_volumes,
)
from fedtune_trainer.wire.contract import (
    ANNOTATION_DATA_CREDENTIALS,
    ANNOTATION_STORAGE_CREDENTIALS,
    AWS_ENDPOINT_ENV,
    AWS_REGION_ENV,
    COMMAND,
    CONTAINER,
    DATA_CREDENTIALS_PREFIX,
    EXIT_INVALID_INPUT,
    LABEL_ATTEMPT,
    LABEL_CLIENT,
    LABEL_ROLE,
    LABEL_ROUND,
    LABEL_RUN,
    ROLE_AGGREGATOR,
    ROLE_CLEANUP,
    ROLE_CLIENT,
    ROLE_EVALUATOR,
    TASK_ENV,
    TERMINATION_LOG,
    USER_ID,
    client_command,
    processes_for,
)
from fedtune_trainer.wire.settings import AdapterSpec, StorageLocation
from fedtune_trainer.wire.task import AggregateTask, CleanupTask, ClientTask, EvaluateTask

# ---------------------------------------------------------------------------------------------
# Pod settings merge
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------


def client_ranks(spec: FederatedFineTuneSpec) -> dict[str, int]:
    """The clients whose LoRA rank (clients[].adapter.r) differs from the run's."""
    return {
        c.name: c.adapter.r
        for c in spec.clients
        if c.adapter is not None and c.adapter.r is not None and c.adapter.r != spec.adapter.r
    }


def client_adapter(spec: FederatedFineTuneSpec, client: str) -> AdapterSpec:
    """The run's adapter at this client's own rank, if it has one."""
    r = client_ranks(spec).get(client)
    return spec.adapter if r is None else spec.adapter.model_copy(update={"r": r})


def client_task(run: str, spec: FederatedFineTuneSpec, round_: int, client: str) -> ClientTask:
    entry = next(c for c in spec.clients if c.name == client)
    return ClientTask(
        run=run,
        round=round_,
        client=client,
        base_model=local_uri(spec.base_model),
        tokenizer=local_uri(spec.tokenizer) if spec.tokenizer else None,
        adapter=client_adapter(spec, client),
        storage=spec.storage.location(),
        data_uri=local_uri(entry.data_uri),
        data=spec.data,
        training=spec.training,
        delta=spec.delta,
        sign=entry.signing is not None,
    )


def client_keys(spec: FederatedFineTuneSpec, clients: list[str]) -> dict[str, str]:
    """The pinned public keys of the signing clients among `clients` (a site's client always
    signs: its key is pinned by site.publicKey)."""
    keys = {c.name: c.signing.public_key for c in spec.clients if c.signing}
    keys |= {c.name: c.site.public_key for c in spec.clients if c.site}
    return {name: key for name, key in keys.items() if name in clients}


def aggregate_task(
    run: str,
    spec: FederatedFineTuneSpec,
    round_: int,
    clients: list[str],
    uid: str | None = None,
    attempt: int = 0,
) -> AggregateTask:
    weights = {c.name: c.weight for c in spec.clients if c.name in clients}
    return AggregateTask(
        run=run,
        round=round_,
        rounds=spec.rounds,
        base_model=local_uri(spec.base_model),
        tokenizer=local_uri(spec.tokenizer) if spec.tokenizer else None,
        adapter=spec.adapter,
        storage=spec.storage.location(),
        clients=clients,
        client_weights=weights,
        min_clients=max(1, min(quorum(spec), len(clients))) if clients else 1,
        attempt=attempt,
        retain_client_deltas=spec.storage.client_delta_policy == "Retain",
        client_keys=client_keys(spec, clients),
        aggregation=spec.aggregation,
        privacy=spec.privacy,
        delta=spec.delta,
        seed=spec.training.seed,
        client_ranks={c: r for c, r in client_ranks(spec).items() if c in clients},
        sampling_rate=clients_per_round(spec) / max(1, len(spec.clients)),
        drift_control=spec.training.drift_control,
        total_clients=len(spec.clients),
        run_uid=uid or None,
        cleanup_policy=spec.storage.cleanup_policy,
    )


def evaluate_task(run: str, spec: FederatedFineTuneSpec, round_: int) -> EvaluateTask:
    evaluation = spec.evaluation.settings()
    if evaluation.data_uri:
        evaluation = evaluation.model_copy(update={"data_uri": local_uri(evaluation.data_uri)})
    return EvaluateTask(
        run=run,
        round=round_,
        base_model=local_uri(spec.base_model),
        tokenizer=local_uri(spec.tokenizer) if spec.tokenizer else None,
        adapter=spec.adapter,
        storage=spec.storage.location(),
        data=spec.data,
        evaluation=evaluation,
        max_seq_length=spec.training.max_seq_length,
    )


# ---------------------------------------------------------------------------------------------
# Pods and Jobs
# ---------------------------------------------------------------------------------------------


def security_context() -> tuple[dict[str, Any], dict[str, Any]]:
    """Pod and container security contexts that meet the `restricted` Pod Security Standard."""
    pod = {
        "runAsNonRoot": True,
        "runAsUser": USER_ID,
        "runAsGroup": USER_ID,
        "fsGroup": USER_ID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    return pod, container


def dump(model: Any) -> dict[str, Any] | None:
    """A settings model as the Pod spells it (camelCase, unset fields left out)."""
    return model.model_dump(mode="json", by_alias=True, exclude_none=True) if model else None


def job_manifest(
    *,
    name: str,
    namespace: str,
    run: str,
    uid: str,
    spec: FederatedFineTuneSpec,
    labels: dict[str, str],
    settings: PodSettings,
    command: list[str],
    task_json: str,
    extra_env: list[dict[str, Any]],
    uris: tuple[str | None, ...],
    backoff_limit: int,
    volume: PodVolume | None = None,
    credentials: S3Credentials | None = None,
    data_credentials: str | None = None,
) -> dict[str, Any]:
    """One Job of a run. `credentials`: the storage identity its pods get (the run's when None);
    `data_credentials`: for a client, what the annotation says it reads its data with."""
    return pod_job(
        name=name,
        namespace=namespace,
        owner=owner_reference(run, uid) if uid else None,
        template=spec.template,
        storage=spec.storage,
        deadline=spec.active_deadline_seconds,
        labels=labels,
        settings=settings,
        command=command,
        task_json=task_json,
        extra_env=extra_env,
        uris=uris,
        backoff_limit=backoff_limit,
        volume=volume,
        credentials=credentials or spec.storage.credentials_secret,
        data_credentials=data_credentials,
    )


def pod_job(
    *,
    name: str,
    namespace: str,
    owner: dict[str, Any] | None,
    template: PodTemplate,
    storage: StorageLocation,
    deadline: int | None,
    labels: dict[str, str],
    settings: PodSettings,
    command: list[str],
    task_json: str,
    extra_env: list[dict[str, Any]],
    uris: tuple[str | None, ...],
    backoff_limit: int,
    credentials: S3Credentials | None,
    volume: PodVolume | None = None,
    data_credentials: str | None = None,
    image: str | None = None,
) -> dict[str, Any]:
    """One Job of the operator's (a run's, or a site's): the restricted pod, the task, the
    storage identity from a Secret, the retry policy. `image` overrides the template's;
    `volume` is one more volume (the model cache, a site's state claim) with its mount and env."""
    all_labels = {**(template.labels or {}), **labels}
    pod_sc, container_sc = security_context()
    pvc_vols, pvc_mounts = pvc_volumes(*uris)
    extra_vols, extra_mounts, volume_env = volume or ([], [], [])
    env: list[dict[str, Any]] = [
        {"name": TASK_ENV, "value": task_json},
        {"name": "HOME", "value": "/tmp/home"},
        {"name": "HF_HOME", "value": "/tmp/hf"},
        {"name": "HF_HUB_OFFLINE", "value": "1" if all_local(uris) else "0"},
        *secret_env("", credentials),
    ]
    who = {ANNOTATION_STORAGE_CREDENTIALS: secret_name(credentials)}
    if data_credentials is not None:
        who[ANNOTATION_DATA_CREDENTIALS] = data_credentials
    if storage.endpoint:
        env.append({"name": AWS_ENDPOINT_ENV, "value": storage.endpoint})
    if storage.region:
        env.append({"name": AWS_REGION_ENV, "value": storage.region})
    overridden = {e["name"] for e in volume_env}
    env = [e for e in env if e["name"] not in overridden] + extra_env + volume_env
    env += [e.model_dump(mode="json", by_alias=True, exclude_none=True) for e in settings.env or []]
    resources = (
        settings.resources.model_dump(mode="json", by_alias=True, exclude_none=True)
        if settings.resources
        else None
    )
    container = drop_empty(
        {
            "name": CONTAINER,
            "image": image or template.image,
            "imagePullPolicy": template.image_pull_policy,
            "command": command,
            "env": env,
            "resources": resources,
            "securityContext": container_sc,
            "terminationMessagePath": TERMINATION_LOG,
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, *pvc_mounts, *extra_mounts],
        }
    )
    pod_spec = drop_empty(
        {
            "restartPolicy": "Never",
            "serviceAccountName": settings.service_account_name,
            # Explicit even when false: a namespace's default ServiceAccount mounts its token.
            "automountServiceAccountToken": template.automount_service_account_token,
            "securityContext": pod_sc,
            "containers": [container],
            "volumes": [{"name": "tmp", "emptyDir": {}}, *pvc_vols, *extra_vols],
            "nodeSelector": settings.node_selector,
            "tolerations": [
                t.model_dump(mode="json", by_alias=True, exclude_none=True)
                for t in settings.tolerations or []
            ],
            "affinity": settings.affinity,
            "priorityClassName": template.priority_class_name,
            "imagePullSecrets": [
                s.model_dump(mode="json", by_alias=True) for s in template.image_pull_secrets or []
            ],
        }
    )
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": drop_empty(
            {
                "name": name,
                "namespace": namespace,
                "labels": all_labels,
                "annotations": {**(template.annotations or {}), **who},
                "ownerReferences": [owner] if owner else None,
            }
        ),
        "spec": drop_empty(
            {
                "backoffLimit": backoff_limit,
                "activeDeadlineSeconds": deadline,
                "completions": 1,
                "parallelism": 1,
                "podFailurePolicy": {
                    "rules": [
                        # A node drain or preemption is not the trainer's fault: retry, uncounted.
                        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                        # Bad input fails the same way every time: stop at once.
                        {
                            "action": "FailJob",
                            "onExitCodes": {
                                "containerName": CONTAINER,
                                "operator": "In",
                                "values": [EXIT_INVALID_INPUT],
                            },
                        },
                    ]
                },
                "template": {
                    "metadata": drop_empty(
                        {"labels": all_labels, "annotations": template.annotations}
                    ),
                    "spec": pod_spec,
                },
            }
        ),
    }


def base_labels(run: str, round_: int, role: str, attempt: int) -> dict[str, str]:
    return {LABEL_RUN: run, LABEL_ROUND: str(round_), LABEL_ROLE: role, LABEL_ATTEMPT: str(attempt)}


def client_job(
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
    task = client_task(run, spec, round_, client)
    storage_creds, data_creds, data_with = client_credentials(spec, client)
    settings = merge_pod_settings(spec.template, entry)
    return job_manifest(
        name=client_job_name(run, round_, client),
        namespace=namespace,
        run=run,
        uid=uid,
        spec=spec,
        labels={**base_labels(run, round_, ROLE_CLIENT, attempt), LABEL_CLIENT: client},
        settings=settings,
        # One process per GPU the client's container asks for (torch's elastic agent inside).
        command=client_command(processes_for(dump(settings.resources))),
        task_json=json.dumps(task.wire(), separators=(",", ":")),
        extra_env=[
            *secret_env(DATA_CREDENTIALS_PREFIX, data_creds),
            *signing_env(entry.signing),
        ],
        uris=(spec.base_model, spec.tokenizer, entry.data_uri),
        backoff_limit=spec.backoff_limit,
        volume=cache_volume(run, spec, client),
        credentials=storage_creds,
        data_credentials=data_with,
    )


def aggregate_job(
    *,
    run: str,
    namespace: str,
    uid: str,
    spec: FederatedFineTuneSpec,
    round_: int,
    attempt: int,
    clients: list[str],
) -> dict[str, Any]:
    task = aggregate_task(run, spec, round_, clients, uid, attempt)
    return job_manifest(
        name=aggregate_job_name(run, round_),
        namespace=namespace,
        run=run,
        uid=uid,
        spec=spec,
        labels=base_labels(run, round_, ROLE_AGGREGATOR, attempt),
        settings=merge_pod_settings(spec.template, spec.aggregator),
        command=[COMMAND, "aggregate"],
        task_json=json.dumps(task.wire(), separators=(",", ":")),
        extra_env=noise_key_env(spec.privacy.noise_key_secret),
        uris=(spec.base_model, spec.tokenizer),
        backoff_limit=spec.backoff_limit,
    )


def evaluate_job(
    *, run: str, namespace: str, uid: str, spec: FederatedFineTuneSpec, round_: int
) -> dict[str, Any]:
    """Evaluates global adapter `round_`; one per due round, whatever the round's attempts."""
    task = evaluate_task(run, spec, round_)
    return job_manifest(
        name=evaluate_job_name(run, round_),
        namespace=namespace,
        run=run,
        uid=uid,
        spec=spec,
        labels=base_labels(run, round_, ROLE_EVALUATOR, 0),
        settings=merge_pod_settings(spec.template, spec.evaluation),
        command=[COMMAND, "evaluate"],
        task_json=json.dumps(task.wire(), separators=(",", ":")),
        extra_env=[],
        uris=(spec.base_model, spec.tokenizer, spec.evaluation.data_uri),
        backoff_limit=spec.backoff_limit,
        volume=cache_volume(run, spec, None),
        credentials=spec.evaluation.storage_credentials_secret,
    )


def cleanup_job(
    *, run: str, namespace: str, uid: str, spec: FederatedFineTuneSpec
) -> dict[str, Any]:
    """Deletes the run's storage prefix, provided its marker holds the run's `uid` (the trainer
    refuses anything else). No owner reference: it must outlive the run's deletion, which waits
    on it through the finalizer; it removes itself after a minute."""
    task = CleanupTask(run=run, run_uid=uid, storage=spec.storage.location())
    job = job_manifest(
        name=cleanup_job_name(run),
        namespace=namespace,
        run=run,
        uid="",
        spec=spec,
        labels={LABEL_RUN: run, LABEL_ROLE: ROLE_CLEANUP},
        settings=merge_pod_settings(spec.template, spec.aggregator),
        command=[COMMAND, "cleanup"],
        task_json=json.dumps(task.wire(), separators=(",", ":")),
        extra_env=[],
        uris=(),
        backoff_limit=3,
    )
    job["spec"]["ttlSecondsAfterFinished"] = 60
    return job
