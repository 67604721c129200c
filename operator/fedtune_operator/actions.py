"""A decision's actions applied through the API: which of them go at once (`action_batches`),
what each one does (`apply`: a create also makes the cache claim its Job mounts), and the name
of the Job a create makes, for the hand-off line.

Run in the shell's threads (loops.in_thread); every verb is safe to repeat (kube.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from fedtune_operator import decision, manifests, objects, remote, volumes
from fedtune_operator.api import FederatedFineTuneSpec
from fedtune_operator.kube import Kube

log = logging.getLogger("fedtune.operator")

CREATES = (decision.CreateClientJob, decision.CreateAggregateJob, decision.CreateEvaluateJob)


def action_batches(actions: Iterable[decision.Action]) -> list[list[decision.Action]]:
    """The actions in their order, each run of Job creations one batch applied at once (they
    do not depend on each other), every other action a batch of its own (a deletion or a
    suspension may be what a later action waits for)."""
    batches: list[list[decision.Action]] = []
    for action in actions:
        if batches and isinstance(action, CREATES) and isinstance(batches[-1][-1], CREATES):
            batches[-1].append(action)
        else:
            batches.append([action])
    return batches


def created_job_name(run: str, action: decision.Action) -> str:
    """The name of the Job a create action makes (for the log line)."""
    match action:
        case decision.CreateClientJob(round=r, client=c):
            return objects.client_job_name(run, r, c)
        case decision.CreateAggregateJob(round=r):
            return objects.aggregate_job_name(run, r)
        case decision.CreateEvaluateJob(round=r):
            return objects.evaluate_job_name(run, r)
    raise AssertionError(f"{action!r} creates no Job")


def apply(
    k: Kube, obj: dict[str, Any], spec: FederatedFineTuneSpec | None, action: decision.Action
) -> None:
    meta = obj["metadata"]
    ns, run, uid = meta["namespace"], meta["name"], meta["uid"]
    match action:
        case decision.CreateClientJob(round=r, attempt=a, client=c) if spec is not None:
            if not remote.is_remote(spec, c):
                create_cache_claim(k, obj, spec, c)
            k.create_job(
                remote.job_for_client(
                    run=run, namespace=ns, uid=uid, spec=spec, round_=r, attempt=a, client=c
                )
            )
        case decision.CreateAggregateJob(round=r, attempt=a, clients=clients) if spec is not None:
            k.create_job(
                manifests.aggregate_job(
                    run=run,
                    namespace=ns,
                    uid=uid,
                    spec=spec,
                    round_=r,
                    attempt=a,
                    clients=list(clients),
                )
            )
        case decision.CreateEvaluateJob(round=r) if spec is not None:
            create_cache_claim(k, obj, spec, None)
            k.create_job(
                manifests.evaluate_job(run=run, namespace=ns, uid=uid, spec=spec, round_=r)
            )
        case decision.DeleteJob(name=job):
            k.delete_job(ns, job)
        case decision.SuspendJob(name=job, suspend=suspend):
            k.suspend_job(ns, job, suspend)
        case decision.DeleteRun():
            k.delete_run(ns, run)
        case _:
            raise AssertionError(f"cannot apply {action!r}")


def create_cache_claim(
    k: Kube, obj: dict[str, Any], spec: FederatedFineTuneSpec, client: str | None
) -> None:
    """The model cache claim a client's (or the evaluation) Job mounts, before the Job: a pod
    whose claim does not exist yet would wait Pending for it. Not an engine action: the claim
    holds no state the engine reads, outlives rounds and attempts, and creating one that
    exists is a no-op, so it is part of creating the Job, like the Job's manifest."""
    meta = obj["metadata"]
    claim = volumes.cache_claim(
        run=meta["name"], namespace=meta["namespace"], uid=meta["uid"], spec=spec, client=client
    )
    if claim is not None and k.create_claim(claim):
        log.info("created model cache claim %s/%s", meta["namespace"], claim["metadata"]["name"])
