"""A run and its sites, through storage: signed tasks one way; heartbeats and refusals the other.

The run signs each remote task with its task key; a site verifies the signature against the
public key it pinned before it parses a byte of the task, then checks that the task is addressed
to it, for the round it asked for. Everything read here is small and read with a limit, so a
hostile object under the prefix costs at most that limit. docs/sites.md has the protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from pydantic import ValidationError

from fedtune_trainer.storage import store as st
from fedtune_trainer.wire.layout import TASK_SIGNATURE_SUFFIX, heartbeat_key, refusal_key, task_key
from fedtune_trainer.wire.site import Heartbeat, Refusal, RemoteTask

TASK_MAX_BYTES = 64 * 1024
"""A task is a few KB of settings; a reader never takes more than this."""
SIGNATURE_MAX_BYTES = 64
NOTE_MAX_BYTES = 4096
"""Heartbeats and refusals."""


class TaskError(ValueError):
    """A task that verifies but is not what the reader asked for, or not a task at all."""


def publish_task(store: st.Store, task: RemoteTask, sign: Callable[[bytes], bytes]) -> str:
    """Write `task` and its signature (the signature first: a reader that finds the task finds
    its signature). A rerun writes the same bytes: the task and Ed25519 are deterministic.
    Returns the task's key."""
    key = task_key(task.round, task.client)
    raw = task.model_dump_json(by_alias=True, exclude_none=True).encode()
    store.put_bytes(key + TASK_SIGNATURE_SUFFIX, sign(raw))
    store.put_bytes(key, raw)
    return key


def read_task(
    store: st.Store,
    round_: int,
    client: str,
    run: str,
    verify: Callable[[bytes, bytes | None], None],
) -> RemoteTask | None:
    """The run's task for `client` in `round_`, verified and checked; None while there is none.

    Raises signing.SignatureError when it is unsigned or not signed by the pinned key, and
    TaskError when it verifies but is malformed or addressed to another run, round or client (a
    genuine task copied to the wrong place is refused as well as a forged one)."""
    key = task_key(round_, client)
    try:
        raw = store.get_bytes(key, max_bytes=TASK_MAX_BYTES)
    except st.ObjectNotFound:
        return None
    try:
        signature = store.get_bytes(key + TASK_SIGNATURE_SUFFIX, max_bytes=SIGNATURE_MAX_BYTES)
    except st.ObjectNotFound:
        signature = None
    verify(raw, signature)
    try:
        task = RemoteTask.model_validate_json(raw)
    except ValidationError as e:
        raise TaskError(f"{store.url(key)}: not a remote task: {e.error_count()} problems") from e
    want = (run, round_, client)
    if (task.run, task.round, task.client) != want:
        raise TaskError(
            f"{store.url(key)}: a task for run {task.run!r}, round {task.round}, client "
            f"{task.client!r}, found where run {run!r} keeps round {round_} of {client!r}"
        )
    return task


def write_heartbeat(store: st.Store, beat: Heartbeat) -> None:
    store.put_bytes(heartbeat_key(beat.client), beat.model_dump_json(by_alias=True).encode())


def read_heartbeat(store: st.Store, client: str) -> Heartbeat | None:
    """The site's last heartbeat; None when it has written none (or none that parses: a site
    that writes garbage is as good as silent)."""
    return _read_note(store, heartbeat_key(client), Heartbeat, client)


def write_refusal(store: st.Store, refusal: Refusal) -> None:
    key = refusal_key(refusal.client, refusal.round)
    store.put_bytes(key, refusal.model_dump_json(by_alias=True).encode())


def read_refusal(store: st.Store, client: str, round_: int) -> Refusal | None:
    refusal = _read_note(store, refusal_key(client, round_), Refusal, client)
    return refusal if refusal is not None and refusal.round == round_ else None


Note = TypeVar("Note", Heartbeat, Refusal)


def _read_note(store: st.Store, key: str, model: type[Note], client: str) -> Note | None:
    try:
        raw = store.get_bytes(key, max_bytes=NOTE_MAX_BYTES)
        note = model.model_validate_json(raw)
    except (st.ObjectNotFound, st.ObjectTooLarge, ValidationError):
        return None
    return note if note.client == client else None
