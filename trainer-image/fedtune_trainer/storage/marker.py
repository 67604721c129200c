"""The run's marker: which run a storage root belongs to, so that deleting a run deletes only
what is its own (`fedtune-trainer cleanup` requires it). Round 0 writes it, and only to an empty
root or one already marked for the run; a root of another run's, or a bucket's whole, is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

from fedtune_trainer.storage.store import ObjectNotFound, ObjectTooLarge, Store
from fedtune_trainer.wire.errors import SettingError
from fedtune_trainer.wire.layout import RUN_MARKER, RUN_MARKER_KIND

RUN_MARKER_MAX_BYTES = 4096


@dataclass(frozen=True)
class RunMarker:
    run: str
    uid: str


def read_marker(store: Store) -> RunMarker | None:
    """The root's marker (layout.RUN_MARKER); None when it has none. One that is not a marker
    (unreadable, another kind, no uid) names nobody: the run of uid "" that never exists."""
    try:
        raw = store.get_bytes(RUN_MARKER, max_bytes=RUN_MARKER_MAX_BYTES)
    except ObjectNotFound:
        return None
    except ObjectTooLarge:
        return RunMarker(run="?", uid="")
    try:
        doc = json.loads(raw)
    except ValueError:
        return RunMarker(run="?", uid="")
    if not isinstance(doc, dict) or doc.get("kind") != RUN_MARKER_KIND:
        return RunMarker(run="?", uid="")
    return RunMarker(run=str(doc.get("run") or "?"), uid=str(doc.get("uid") or ""))


def claim_root(
    store: Store, run: str, uid: str | None, *, required: bool, log: Callable[[str], None]
) -> bool:
    """Mark the storage root as run `uid`'s (round 0, before it writes anything), so that its
    storage cleanup may later delete it; True when the root is the run's.

    Only a root that is empty, or already holds this run's marker (a rerun of round 0), is
    marked: a marker of another run is never overwritten, and a root holding objects but no
    marker (someone's data, a run from before markers) is never claimed, since the marker is
    what cleanup takes as licence to delete everything under it. Such a root is refused with
    `required` (cleanupPolicy Delete: SettingError, so the run fails at once rather than at
    deletion); otherwise the run goes on unmarked and its cleanup would refuse. A run without a
    uid (a task from an older operator, or tests) marks nothing.
    """
    if uid is None:
        return False
    owner = read_marker(store)
    if owner is not None and owner.uid == uid:
        return True
    if owner is not None:
        problem = f"{store.uri} belongs to run {owner.run} (uid {owner.uid or 'unreadable'})"
    elif store.holds_any():
        problem = f"{store.uri} already holds objects and no run's marker ({RUN_MARKER})"
    else:
        marker = {"kind": RUN_MARKER_KIND, "run": run, "uid": uid}
        store.put_bytes(RUN_MARKER, json.dumps(marker).encode())
        log(f"marked {store.url(RUN_MARKER)} as run {run}'s (uid {uid})")
        return True
    if required:
        raise SettingError(
            f"storage.uri: {problem}; cleanupPolicy Delete would delete them with this run: "
            "give it a prefix of its own"
        )
    log(f"warning: {problem}: not marked as this run's, so its storage cleanup would refuse")
    return False


def check_owned(store: Store, uid: str) -> None:
    """Refuse (SettingError) to let anything delete a root that is not run `uid`'s: a bucket or
    filesystem root, a root without a marker, or one whose marker names another run."""
    if not urlparse(store.uri).path.strip("/"):
        raise SettingError(
            f"storage.uri: {store.uri} is a whole bucket (or filesystem root); cleanup never "
            "deletes one"
        )
    owner = read_marker(store)
    if owner is None:
        raise SettingError(
            f"storage.uri: {store.uri} holds no {RUN_MARKER}, so it is not known to be this "
            "run's (its round 0 marks an empty root only); nothing deleted"
        )
    if owner.uid != uid:
        raise SettingError(
            f"storage.uri: {store.uri} belongs to run {owner.run} (uid "
            f"{owner.uid or 'unreadable'}), not this run (uid {uid}); nothing deleted"
        )
