"""The volumes of a run's Jobs beside /tmp: claims that `pvc://` URIs name, and the model cache.

`pvc://<claim>/<path>` URIs become a read-only volume of that claim mounted at /mnt/pvc/<claim>,
and the task sees a file:// URI. With spec.modelCache the client and evaluation Jobs mount a
cache volume (a claim per client that outlives rounds, or an ephemeral one per pod) where the
trainer keeps the base model between rounds (docs/install.md, "Model cache").
"""

from __future__ import annotations

from typing import Any

from fedtune_operator.api import FederatedFineTuneSpec, ModelCache
from fedtune_operator.objects import EVALUATE_CACHE, drop_empty, owner_reference
from fedtune_trainer.wire.contract import (
    CACHE_DIR_ENV,
    LABEL_CLIENT,
    LABEL_ROLE,
    LABEL_RUN,
    ROLE_CLIENT,
    ROLE_EVALUATOR,
    STATE_DIR_ENV,
)

PVC_ROOT = "/mnt/pvc"
CACHE_MOUNT = "/var/cache/fedtune"
"""Where a Job's model cache volume is mounted (FEDTUNE_CACHE_DIR points here)."""
HF_CACHE = f"{CACHE_MOUNT}/hf"
CLIENT_STATE = f"{CACHE_MOUNT}/state"
"""Where a client with a claim of its own (modelCache perClient) keeps its residual and control
variate (FEDTUNE_STATE_DIR): on its volume, not over the network to the run's storage."""
CACHE_VOLUME = "model-cache"
SITE_STATE_MOUNT = "/var/lib/fedtune/state"
"""Where a site's client Job mounts the site's stateClaim (FEDTUNE_STATE_DIR points here)."""
STATE_VOLUME = "client-state"

PodVolume = tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]
"""A volume a Job's pod gets beside /tmp: the pod's volumes, the container's mounts of them, and
the environment that points the trainer at them."""


# ---------------------------------------------------------------------------------------------
# URIs on persistent volume claims
# ---------------------------------------------------------------------------------------------


def pvc_claim(uri: str | None) -> str | None:
    if uri and uri.startswith("pvc://"):
        return uri.removeprefix("pvc://").split("/", 1)[0]
    return None


def local_uri(uri: str) -> str:
    """pvc://<claim>/<path> -> file:///mnt/pvc/<claim>/<path>; other URIs unchanged."""
    if not uri.startswith("pvc://"):
        return uri
    return f"file://{PVC_ROOT}/{uri.removeprefix('pvc://')}"


def pvc_volumes(*uris: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    claims = sorted({c for c in (pvc_claim(u) for u in uris) if c})
    volumes = [
        {"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": c, "readOnly": True}}
        for i, c in enumerate(claims)
    ]
    mounts = [
        {"name": f"pvc-{i}", "mountPath": f"{PVC_ROOT}/{c}", "readOnly": True}
        for i, c in enumerate(claims)
    ]
    return volumes, mounts


# ---------------------------------------------------------------------------------------------
# The model cache (spec.modelCache)
# ---------------------------------------------------------------------------------------------


def cache_claim_name(run: str, owner: str) -> str:
    """`<run>-cache-<client>`, or `<run>-cache-evaluate` for the evaluation Jobs (a DNS
    subdomain of at most 104 characters: a run name is a DNS label, a client name 40)."""
    return f"{run}-cache-{owner}"


def _cache_labels(run: str, client: str | None) -> dict[str, str]:
    if client is None:
        return {LABEL_RUN: run, LABEL_ROLE: ROLE_EVALUATOR}
    return {LABEL_RUN: run, LABEL_ROLE: ROLE_CLIENT, LABEL_CLIENT: client}


def _claim_spec(cache: ModelCache) -> dict[str, Any]:
    return drop_empty(
        {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": str(cache.size)}},
            "storageClassName": cache.storage_class_name,
        }
    )


def cache_claim(
    *, run: str, namespace: str, uid: str, spec: FederatedFineTuneSpec, client: str | None
) -> dict[str, Any] | None:
    """The PersistentVolumeClaim that caches the base model for one client (or, with `client`
    None, for the evaluation Jobs) across the run's rounds; None unless modelCache is perClient.

    Owned by the run, so the garbage collector deletes it with the run. ReadWriteOnce: one
    client's Jobs run one after another, and a superseded pod that still holds the volume only
    delays its successor's start on another node until it has gone.
    """
    if spec.model_cache.mode != "perClient":
        return None
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": drop_empty(
            {
                "name": cache_claim_name(run, client or EVALUATE_CACHE),
                "namespace": namespace,
                "labels": _cache_labels(run, client),
                "ownerReferences": [owner_reference(run, uid)] if uid else None,
            }
        ),
        "spec": _claim_spec(spec.model_cache),
    }


def cache_volume(run: str, spec: FederatedFineTuneSpec, client: str | None) -> PodVolume:
    """The cache volume, its mount and FEDTUNE_CACHE_DIR of a client's (or, with `client` None,
    an evaluation) Job's pod; nothing for mode none (the trainer then caches under /tmp). A
    client's claim (perClient) outlives its pods, so its round-to-round state goes there too
    (FEDTUNE_STATE_DIR); an ephemeral volume does not, so that state stays in the run's storage."""
    cache = spec.model_cache
    if cache.mode == "perClient":
        source: dict[str, Any] = {
            "persistentVolumeClaim": {"claimName": cache_claim_name(run, client or EVALUATE_CACHE)}
        }
    elif cache.mode == "ephemeral":
        source = {
            "ephemeral": {
                "volumeClaimTemplate": {
                    "metadata": {"labels": _cache_labels(run, client)},
                    "spec": _claim_spec(cache),
                }
            }
        }
    else:
        return [], [], []
    # The hub's own cache too, for a baseModel given as a hub id.
    env = [{"name": CACHE_DIR_ENV, "value": CACHE_MOUNT}, {"name": "HF_HOME", "value": HF_CACHE}]
    if cache.mode == "perClient" and client is not None:
        env.append({"name": STATE_DIR_ENV, "value": CLIENT_STATE})
    return (
        [{"name": CACHE_VOLUME, **source}],
        [{"name": CACHE_VOLUME, "mountPath": CACHE_MOUNT}],
        env,
    )


def state_volume(claim: str | None) -> PodVolume:
    """A site's stateClaim as its client Job's volume, mount and FEDTUNE_STATE_DIR; nothing
    without one (the client's state then goes to the run's storage)."""
    if claim is None:
        return [], [], []
    return (
        [{"name": STATE_VOLUME, "persistentVolumeClaim": {"claimName": claim}}],
        [{"name": STATE_VOLUME, "mountPath": SITE_STATE_MOUNT}],
        [{"name": STATE_DIR_ENV, "value": SITE_STATE_MOUNT}],
    )


def all_local(uris: tuple[str | None, ...]) -> bool:
    """Hub ids are the only URIs that need the network; without one, a Job stays offline."""
    return all(u is None or "://" in u for u in uris)
