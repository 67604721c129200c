"""What every object a run creates shares: deterministic names and the owner reference.

Names are a function of the run and the round alone, so a restarted operator finds the objects
it created and "already exists" means success; the owner reference hands every child to the
garbage collector when the run is deleted.
"""

from __future__ import annotations

import hashlib
from typing import Any

from fedtune_operator.api import API_VERSION, KIND, RESERVED_CLIENT_NAMES

AGGREGATE_SUFFIX, EVALUATE_SUFFIX = RESERVED_CLIENT_NAMES
EVALUATE_CACHE = EVALUATE_SUFFIX
"""The cache claim of the evaluation Jobs is `<run>-cache-evaluate`."""


def job_name(run: str, round_: int | None, suffix: str) -> str:
    """`<run>-r<round>-<suffix>`, shortened with a stable hash when over 63 characters."""
    name = f"{run}-r{round_}-{suffix}" if round_ is not None else f"{run}-{suffix}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[:54].rstrip('-')}-{digest}"


def client_job_name(run: str, round_: int, client: str) -> str:
    return job_name(run, round_, client)


def aggregate_job_name(run: str, round_: int) -> str:
    return job_name(run, round_, AGGREGATE_SUFFIX)


def evaluate_job_name(run: str, round_: int) -> str:
    return job_name(run, round_, EVALUATE_SUFFIX)


def cleanup_job_name(run: str) -> str:
    return job_name(run, None, "cleanup")


def owner_reference(name: str, uid: str, kind: str = KIND) -> dict[str, Any]:
    """The controller reference to a run (or, with kind FederatedSite, to a site)."""
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def drop_empty(d: dict[str, Any]) -> dict[str, Any]:
    """The fields that are set: a manifest shows what was asked for, not a wall of nulls."""
    return {k: v for k, v in d.items() if v is not None and v != {} and v != []}
