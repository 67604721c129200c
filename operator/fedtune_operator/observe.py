"""Pure translation of the API's Jobs and Pods into what the engine reasons about."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from fedtune_operator.engine import ObservedJob
from fedtune_operator.manifests import (
    CONTAINER,
    LABEL_ATTEMPT,
    LABEL_CLIENT,
    LABEL_ROLE,
    LABEL_ROUND,
)
from fedtune_trainer.task import parse_summary

Obj = Mapping[str, Any]


def _terminal_condition(job: Obj) -> Mapping[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return cond
    return None


def _termination(pod: Obj) -> tuple[int | None, str]:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == CONTAINER:
            term = (cs.get("state") or {}).get("terminated")
            if term:
                return term.get("exitCode"), term.get("message") or ""
    return None, ""


def _first_line(text: str, limit: int = 200) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[:limit]


def observe_jobs(run_uid: str, jobs: list[Obj], pods: list[Obj]) -> list[ObservedJob]:
    """The run's Jobs (owned by this very object: a same-named predecessor's leftovers are not
    ours) with state, and for finished ones the summary or the failure reason from their pods."""
    pods_by_job: dict[str, list[Obj]] = {}
    for pod in pods:
        owner = (pod.get("metadata") or {}).get("labels", {}).get("job-name")
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
        if role not in ("client", "aggregator"):
            continue
        cond = _terminal_condition(job)
        state = (
            "active" if cond is None else ("succeeded" if cond["type"] == "Complete" else "failed")
        )
        summary, message = None, ""
        job_pods = sorted(
            pods_by_job.get(meta["name"], []),
            key=lambda p: p["metadata"].get("creationTimestamp", ""),
        )
        if state == "succeeded":
            for pod in job_pods:
                code, text = _termination(pod)
                if code == 0 and text:
                    try:
                        summary = parse_summary(text)
                    except (ValueError, ValidationError):
                        message = "unreadable summary"
        elif state == "failed":
            message = (cond or {}).get("message") or (cond or {}).get("reason") or ""
            for pod in reversed(job_pods):
                code, text = _termination(pod)
                if code not in (None, 0):
                    message = f"exit {code}: {_first_line(text) or message}"
                    break
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
