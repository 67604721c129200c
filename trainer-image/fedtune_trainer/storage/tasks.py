"""A run and its sites, through storage: signed tasks one way; heartbeats and refusals the other.

The run signs each remote task with its task key; a site verifies the signature against the
public key it pinned before it parses a byte of the task, then checks that the task is addressed
to it, for the round it asked for. Everything read here is small and read with a limit, so a
hostile object under the prefix costs at most that limit. docs/sites.md has the protocol.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, NamedTuple, TypeVar

from pydantic import ValidationError

from fedtune_trainer.storage import store as st
from fedtune_trainer.wire.contract import refused
from fedtune_trainer.wire.errors import SiteError
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


class SignedTask(NamedTuple):
    """A task as read: the model, and the SHA-256 of its exact bytes (what a site's watch Job
    hands its client Job, which reads the task again and trains it only if the bytes match)."""

    task: RemoteTask
    sha256: str


def read_task(
    store: st.Store,
    round_: int,
    client: str,
    run: str,
    verify: Callable[[bytes, bytes | None], None],
) -> RemoteTask | None:
    """The run's task for `client` in `round_`, verified and checked; None while there is none
    (read_signed_task, without the digest)."""
    found = read_signed_task(store, round_, client, run, verify)
    return None if found is None else found.task


def read_signed_task(
    store: st.Store,
    round_: int,
    client: str,
    run: str,
    verify: Callable[[bytes, bytes | None], None],
) -> SignedTask | None:
    """The run's task for `client` in `round_`, verified and checked, with its bytes' digest;
    None while there is none.

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
    return SignedTask(task, st.sha256_bytes(raw))


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


# --------------------------------------------------------------------------------------------
# Waiting and working: the clock, the backoff, heartbeats kept fresh, refusals
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clock:
    """Time as the relay and the site's Jobs see it; tests pass their own, so none waits."""

    now: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    random: Callable[[], float] = random.random


FIRST_DELAY = 1.0
MOST_DELAY = 15.0
HEARTBEAT_SECONDS = 30.0
"""How often a site's client Job rewrites its heartbeat while it trains: well inside the relay's
silence allowance (at least 10 s, by default 900 s)."""


def backoff(clock: Clock, first: float = FIRST_DELAY, most: float = MOST_DELAY) -> Iterator[float]:
    """Poll delays: from `first`, doubling up to `most`, each jittered by +-25% so that the many
    relay and watch Jobs a round starts together do not poll the storage in step. A quick answer
    (a site already waiting) is seen in seconds; a long wait costs a few reads a minute."""
    delay = first
    while True:
        yield delay * (0.75 + 0.5 * clock.random())
        delay = min(most, 2 * delay)


State = Literal["waiting", "training", "paused", "left"]


def beat(store: st.Store, client: str, state: State, round_: int, clock: Clock) -> None:
    write_heartbeat(store, Heartbeat(client=client, state=state, round=round_, at=clock.now()))


def refuse(store: st.Store, client: str, round_: int, reason: str, clock: Clock) -> SiteError:
    """Write the site's refusal of `round_`, which the run's relay Job reads (so the run learns
    it at its next poll, not after the site's silence), and return the Job's own failure."""
    write_refusal(store, Refusal(client=client, round=round_, reason=reason[:1024], at=clock.now()))
    return SiteError(refused(round_, reason))


def keep_beating(wait: Callable[[float], bool], write: Callable[[], None], every: float) -> int:
    """Call `write` each time `wait(every)` runs out (returns False) until it is stopped
    (returns True); returns the beats written. A write that fails is told and tried again at the
    next beat: a storage hiccup must not end the work the heartbeat reports on."""
    beats = 0
    while not wait(every):
        try:
            write()
            beats += 1
        except Exception as e:  # any failure: the next beat tries again
            print(f"warning: heartbeat not written: {e}", file=sys.stderr, flush=True)
    return beats


@contextmanager
def beating(
    store: st.Store,
    client: str,
    state: State,
    round_: int,
    clock: Clock,
    every: float = HEARTBEAT_SECONDS,
) -> Iterator[None]:
    """A heartbeat now and every `every` seconds (from a thread) until the block ends: what keeps
    a site that trains for an hour from looking silent to the run's relay."""
    beat(store, client, state, round_, clock)
    stop = threading.Event()
    thread = threading.Thread(
        target=keep_beating,
        args=(stop.wait, lambda: beat(store, client, state, round_, clock), every),
        name="heartbeat",
        daemon=True,
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
