"""Pure translation of the API's Jobs and Pods into what the engine reasons about.

Jobs arrive from the operator's index (`compact_job` keeps what is read here); pods are read only
for `jobs_needing_pods`, the finished Jobs whose results the status does not hold yet, from the
pod index (`compact_pod`) or, when it lags behind the Job's, from the API server.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from fedtune_operator.api import FederatedFineTuneStatus
from fedtune_operator.decision import ObservedJob
from fedtune_operator.rounds import job_state
from fedtune_trainer.wire.contract import (
    CONTAINER,
    LABEL_ATTEMPT,
    LABEL_CLIENT,
    LABEL_ROLE,
    LABEL_ROUND,
    ROLE_AGGREGATOR,
    ROLE_CLIENT,
    ROLE_EVALUATOR,
    ROLE_RELAY,
)
from fedtune_trainer.wire.results import parse_summary

Obj = Mapping[str, Any]

JOB_NAME = "job-name"
"""The label the Job controller puts on a Job's pods."""


def compact_job(job: Obj) -> dict[str, Any]:
    """The parts of a Job that `observe_jobs` reads, as plain data (what the index holds)."""
    meta = job.get("metadata") or {}
    status = job.get("status") or {}
    return {
        "metadata": {
            "name": meta.get("name"),
            "uid": meta.get("uid"),
            "labels": dict(meta.get("labels") or {}),
            "ownerReferences": [dict(o) for o in meta.get("ownerReferences") or []],
            "deletionTimestamp": meta.get("deletionTimestamp"),
        },
        "spec": {"suspend": bool((job.get("spec") or {}).get("suspend"))},
        "status": {"conditions": [dict(c) for c in status.get("conditions") or []]},
    }


def compact_pod(pod: Obj) -> dict[str, Any]:
    """The parts of a Job's pod that `observe_jobs` reads (its Job, its age, how its trainer
    container ended), as plain data: what the operator's pod index holds."""
    meta = pod.get("metadata") or {}
    statuses = []
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == CONTAINER:
            terminated = (cs.get("state") or {}).get("terminated")
            state = {"terminated": dict(terminated)} if terminated else {}
            statuses.append({"name": CONTAINER, "state": state})
    return {
        "metadata": {
            "name": meta.get("name"),
            "labels": {JOB_NAME: (meta.get("labels") or {}).get(JOB_NAME)},
            "creationTimestamp": meta.get("creationTimestamp"),
        },
        "status": {"containerStatuses": statuses},
    }


def indexed_pods(
    jobs: list[Obj], needed: list[str], by_job: Callable[[str], list[Obj]]
) -> list[Obj] | None:
    """The pods of the `needed` finished Jobs from the index (`by_job`), or None when the index
    has not yet seen how one of them ended (a pod that exited 0 for a Job that succeeded, one
    that failed for a Job that failed): the Job's condition and its pod's final state come
    through different watches, in either order, and a finished Job must not be read as one
    without a result. None means: list them from the API server."""
    states = {
        (job.get("metadata") or {}).get("name"): job_state(job.get("status"))[0] for job in jobs
    }
    pods: list[Obj] = []
    for name in needed:
        ended = [p for p in by_job(name) if termination(p)[0] is not None]
        succeeded = states.get(name) == "succeeded"
        if not any((termination(p)[0] == 0) is succeeded for p in ended):
            return None
        pods += ended
    return pods


def compact_policy(policy: Obj) -> dict[str, Any]:
    """The parts of a run's NetworkPolicy that `network_policy.in_place` compares."""
    meta = policy.get("metadata") or {}
    return {
        "owners": [ref.get("uid") for ref in meta.get("ownerReferences") or []],
        "labels": dict(meta.get("labels") or {}),
        "deleting": bool(meta.get("deletionTimestamp")),
        "spec": policy.get("spec") or {},
    }


def jobs_needing_pods(run_uid: str, status: FederatedFineTuneStatus, jobs: list[Obj]) -> list[str]:
    """The finished Jobs whose result is not in the status yet: the current round's aggregator
    (its result ends the round), its clients not yet recorded, and the evaluations still awaited.
    Their pods' termination messages hold the summaries or the failure reasons."""
    r, a = status.current_round, status.round_attempt or 0
    if r is None:
        return []
    recorded = {
        c.name for c in status.clients if c.last_round == r and c.phase in ("Succeeded", "Failed")
    }
    names = []
    for job in observe_jobs(run_uid, jobs, []):
        if job.state == "active":
            continue
        if job.role == "evaluator":
            wanted = job.round in status.evaluating_rounds
        else:
            current = job.round == r and job.attempt == a
            wanted = current and (job.role == "aggregator" or job.client not in recorded)
        if wanted:
            names.append(job.name)
    return names


def termination(pod: Obj) -> tuple[int | None, str, str]:
    """The trainer container's exit code, termination message and the kubelet's reason
    (OOMKilled, Error, ContainerCannotRun: the one word a person needs when the message is
    empty)."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == CONTAINER:
            term = (cs.get("state") or {}).get("terminated")
            if term:
                return term.get("exitCode"), term.get("message") or "", term.get("reason") or ""
    return None, "", ""


def _first_line(text: str, limit: int = 200) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[:limit]


def failure_message(condition: Obj | None, pods: list[Obj], limit: int = 200) -> str:
    """Why a Job failed: the last failed pod's exit code and termination message (the trainer's
    one-line reason, at most `limit` characters), else the Job's Failed condition."""
    message = (condition or {}).get("message") or (condition or {}).get("reason") or ""
    for pod in reversed(pods):
        code, text, reason = termination(pod)
        if code not in (None, 0):
            # "Error" is the kubelet's word for any non-zero exit: it says nothing more.
            why = f" ({reason})" if reason and reason != "Error" else ""
            hint = " (the container's memory limit)" if reason == "OOMKilled" else ""
            return f"exit {code}{why}: {_first_line(text, limit) or message}{hint}"
    return message


def observe_jobs(run_uid: str, jobs: list[Obj], pods: list[Obj]) -> list[ObservedJob]:
    """The run's Jobs (owned by this very object: a same-named predecessor's leftovers are not
    ours) with state, and for finished ones the summary or the failure reason from their pods."""
    pods_by_job: dict[str, list[Obj]] = {}
    for pod in pods:
        owner = (pod.get("metadata") or {}).get("labels", {}).get(JOB_NAME)
        if owner:
            pods_by_job.setdefault(owner, []).append(pod)
    observed = []
    for job in jobs:
        meta = job["metadata"]
        owners = meta.get("ownerReferences") or []
        if not any(o.get("uid") == run_uid for o in owners):
            continue
        labels = meta.get("labels") or {}
        role = labels.get(LABEL_ROLE)
        # A site's client is relayed: to the round it is a client like any other.
        role = ROLE_CLIENT if role == ROLE_RELAY else role
        if role not in (ROLE_CLIENT, ROLE_AGGREGATOR, ROLE_EVALUATOR):
            continue
        state, cond = job_state(job.get("status"))
        summary, message = None, ""
        job_pods = sorted(
            pods_by_job.get(meta["name"], []),
            key=lambda p: p["metadata"].get("creationTimestamp", ""),
        )
        if state == "succeeded":
            for pod in job_pods:
                code, text, _ = termination(pod)
                if code == 0 and text:
                    try:
                        summary = parse_summary(text)
                    except (ValueError, ValidationError):
                        message = "unreadable summary"
        elif state == "failed":
            message = failure_message(cond, job_pods)
        observed.append(
            ObservedJob(
                name=meta["name"],
                role=role,
                round=int(labels.get(LABEL_ROUND, "0")),
                attempt=int(labels.get(LABEL_ATTEMPT, "0")),
                client=labels.get(LABEL_CLIENT),
                state=state,
                suspended=bool((job.get("spec") or {}).get("suspend")),
                deleting=bool(meta.get("deletionTimestamp")),
                summary=summary,
                message=message,
            )
        )
    return observed
