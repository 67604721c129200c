"""The pod settings of one Job, from the run's template and a client's (or the aggregator's, or
the evaluation's) own; and the small, fixed settings of the Jobs that only poll storage.

Pure: settings models in, settings models out (manifests.py turns them into a pod spec).
"""

from __future__ import annotations

from fedtune_operator.api import PodSettings, Resources


def _merged_map(base: dict | None, over: dict | None) -> dict | None:
    if base is None and over is None:
        return None
    return {**(base or {}), **(over or {})}


POLLER_RESOURCES = Resources(requests={"cpu": "50m", "memory": "192Mi"}, limits={"memory": "512Mi"})
"""A relay (or a site's watch) polls storage: a Python process with boto3, never a model."""


def poller_resources(template: Resources | None) -> Resources:
    """POLLER_RESOURCES, with the template's CPU limit where it sets one (a namespace quota that
    demands CPU limits demands them of every pod)."""
    cpu = ((template.limits or {}) if template else {}).get("cpu")
    if cpu is None:
        return POLLER_RESOURCES
    limits = {**(POLLER_RESOURCES.limits or {}), "cpu": cpu}
    return POLLER_RESOURCES.model_copy(update={"limits": limits})


def merge_pod_settings(base: PodSettings, override: PodSettings | None) -> PodSettings:
    """The pod settings of one Job: `override` (a client or spec.aggregator) over `base`
    (spec.template), with the merge rules documented on `PodSettings`."""
    fields = set(PodSettings.model_fields)
    if override is None:
        return PodSettings.model_validate(base.model_dump(include=fields))
    resources = None
    if base.resources is not None or override.resources is not None:
        b, o = base.resources or Resources(), override.resources or Resources()
        resources = Resources(
            limits=_merged_map(b.limits, o.limits), requests=_merged_map(b.requests, o.requests)
        )
    env = None
    if base.env is not None or override.env is not None:
        by_name = {v.name: v for v in base.env or []}
        by_name.update({v.name: v for v in override.env or []})
        env = list(by_name.values())
    tolerations = None
    if base.tolerations is not None or override.tolerations is not None:
        tolerations = [*(base.tolerations or []), *(override.tolerations or [])]
    return PodSettings(
        resources=resources,
        node_selector=_merged_map(base.node_selector, override.node_selector),
        tolerations=tolerations,
        affinity=override.affinity if override.affinity is not None else base.affinity,
        env=env,
        service_account_name=override.service_account_name or base.service_account_name,
    )
