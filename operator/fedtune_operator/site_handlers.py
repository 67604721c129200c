"""The kopf shell of site mode (`fedtune operator --mode site`): observe, decide, act.

A site has few Jobs (one watch or one client at a time), so each reconcile lists them by the
site's label instead of keeping an index; it runs on the site's own events and on its Jobs'
(which name it in a label), and when kopf re-lists after a watch timeout. No timer: kopf would
hold a finalizer on every site for it. The order is the run's: decide
(site_engine.decide_site), write the status (guarded by resourceVersion; on a conflict the next
wake-up decides again), create Jobs, post events. Nothing here reads a Secret or storage.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any

import kopf
from pydantic import ValidationError

from fedtune_operator.api import GROUP, VERSION
from fedtune_operator.api.site import SITE_PLURAL, FederatedSiteSpec, FederatedSiteStatus
from fedtune_operator.kube import Conflict, Kube, shared
from fedtune_operator.loops import in_thread
from fedtune_operator.site_engine import (
    CreateSiteClientJob,
    CreateWatchJob,
    Site,
    SiteAction,
    decide_site,
)
from fedtune_operator.site_manifests import observe_site_jobs, site_client_job, watch_job
from fedtune_trainer.wire.contract import LABEL_SITE

log = logging.getLogger("fedtune.site")

_locks: dict[tuple[str, str], asyncio.Lock] = {}


def kube() -> Kube:
    return shared()


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.posting.level = logging.INFO


@kopf.on.event(GROUP, VERSION, SITE_PLURAL)
async def site_changed(name: str, namespace: str | None, type: str | None, **_: Any) -> None:
    if namespace and type != "DELETED":
        await reconcile(namespace, name)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_SITE: kopf.PRESENT})
async def site_job_changed(labels: kopf.Labels, namespace: str | None, **_: Any) -> None:
    if namespace and (site := labels.get(LABEL_SITE)):
        await reconcile(namespace, str(site))


async def reconcile(namespace: str, name: str) -> None:
    """One observe-decide-act pass over a site; passes over one site never overlap."""
    lock = _locks.setdefault((namespace, name), asyncio.Lock())
    async with lock:
        await _reconcile(namespace, name)


async def _reconcile(namespace: str, name: str) -> None:
    k = kube()
    obj = await in_thread(k.get_run, namespace, name, SITE_PLURAL)
    if obj is None or obj["metadata"].get("deletionTimestamp"):
        return
    meta = obj["metadata"]
    status = FederatedSiteStatus.model_validate(obj.get("status") or {})
    try:
        spec = FederatedSiteSpec.model_validate(obj.get("spec") or {})
    except ValidationError as e:  # the CRD admits it; an older CRD might not have
        failed = status.model_copy(
            update={"phase": "Failed", "message": f"invalid spec: {e}"[:1024]}
        )
        await in_thread(k.write_status, obj, _json(failed), SITE_PLURAL)
        return
    jobs = await in_thread(k.labelled_jobs, namespace, f"{LABEL_SITE}={name}")
    finished = [
        j["metadata"]["name"]
        for j in jobs
        if (j.get("status") or {}).get("succeeded") or (j.get("status") or {}).get("failed")
    ]
    pods = await in_thread(k.job_pods, namespace, finished) if finished else []
    site = Site(name, namespace, meta["uid"], meta.get("generation", 0), spec)
    decided = decide_site(site, status, observe_site_jobs(meta["uid"], jobs, pods), _now())
    new = _json(decided.status)
    if new != _json(status):
        try:
            await in_thread(k.write_status, obj, new, SITE_PLURAL)
        except Conflict:
            return  # changed under us: its own event brings the next pass
    for action in decided.actions:
        await in_thread(k.create_job, _manifest(site, action))
    for event in decided.events:
        kopf.event(obj, type=event.type, reason=event.reason, message=event.message)


def _manifest(site: Site, action: SiteAction) -> dict[str, Any]:
    common = {"site": site.name, "namespace": site.namespace, "uid": site.uid, "spec": site.spec}
    if isinstance(action, CreateWatchJob):
        return watch_job(**common, action=action)
    if isinstance(action, CreateSiteClientJob):
        return site_client_job(**common, action=action)
    raise TypeError(f"not a site action: {action!r}")


def _json(status: FederatedSiteStatus) -> dict[str, Any]:
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
