"""One reconcile loop per run, what the operator's watches hold of each run, and the thread pool
its Kubernetes calls run in.

The shell's machinery, apart from what a reconcile does (handlers.py): when a run's loop runs,
how failures back off, why the API calls have a pool of their own, and the `View` that spares a
reconcile the reads its watches have already answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, ParamSpec, TypeVar

from fedtune_operator import metrics
from fedtune_operator.kube import API_CONCURRENCY

log = logging.getLogger("fedtune.operator")

RESYNC_SECONDS = float(os.environ.get("FEDTUNE_RESYNC_SECONDS", "15"))
MAX_BACKOFF_SECONDS = 300.0
OLDER_KEPT = 32
"""resourceVersions a run keeps of the bodies its writes replaced: events of older ones than
these have long arrived."""

Outcome = Literal["wait", "again", "gone"]
Obj = dict[str, Any]


def _none(*_: Any) -> None:
    return None


@dataclass(frozen=True)
class View:
    """What the operator's watches hold of one run, for its reconcile: the run's Jobs (always
    from the index); and, when the watches have them, the run itself, its finished Jobs' pods
    and its NetworkPolicy. A reconcile reads from the API server only what the view lacks
    (None): without these, a round's hand-off was five requests one after another (the run, the
    pods, the policy, the status, the Jobs), each waiting its turn on a loaded API server.

    The run is the newest body the operator knows: its latest watch event's, or the answer to
    its own status write. Events arrive in order and each one wakes the run's loop, so the last
    to arrive is the newest the watch has shown. The operator's own write is newer than anything
    the watch has shown when its answer comes back, unless an event came in the meantime; so
    the answer becomes the run (`wrote`) only when none did, and the resourceVersions it
    replaced are remembered as older: their events, still on their way, are not taken for the
    run (`Loops.saw_run`). Without the answer, the next pass read the run from the API server
    whenever a Job event (its own creations') woke it before the watch showed the write: about
    every other hand-off from a client's completion to the aggregator, under load.

    Why a watched run is safe to act on: the status write that records a decision is guarded by
    the resourceVersion of the run it was made from (409 -> `forget`, and read again); a
    decision with no status to write comes from a run read from the API server (handlers.py).
    """

    jobs: Callable[[], list[Obj]]
    run: Callable[[], Obj | None] = _none
    pods: Callable[[str], list[Obj]] = lambda _job: []
    policy: Callable[[str], Obj | None] = _none
    forget: Callable[[], None] = _none
    """Drops the run: until its next event, it is read from the API server."""
    wrote: Callable[[Obj, Obj], None] = lambda _acted_on, _answer: None
    """(the run a status write was made from, the write's answer): the run is now newer."""


Reconcile = Callable[[str, str, View, float | None], Awaitable[Outcome]]
"""(namespace, name, view, woken) -> what the loop does next."""


_P = ParamSpec("_P")
_T = TypeVar("_T")
_api_threads = ThreadPoolExecutor(API_CONCURRENCY, thread_name_prefix="fedtune-api")


async def in_thread(fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """asyncio.to_thread on the operator's own pool: the default one (cores + 4 threads) queued
    each run's API calls behind every other run's when many hand off rounds at once."""
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_api_threads, call)


class Loops:
    """One reconcile loop per run, owned here rather than by kopf.

    A kopf daemon would do the same, but kopf puts a finalizer on every object that has a
    daemon; the operator keeps finalizers for storage cleanup only. Watch events (the run's own,
    and its Jobs') start a run's loop when it has none and wake it; the initial listing after a
    restart starts one for every existing run, which is how a restarted operator resumes.
    """

    def __init__(self, reconcile: Reconcile) -> None:
        self.reconcile = reconcile
        """One observe-decide-act pass (handlers.reconcile)."""
        self.tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.pokes: dict[tuple[str, str], asyncio.Event] = {}
        self.woken: dict[tuple[str, str], float] = {}
        """When (monotonic) the first wake-up that no reconcile has started on yet came."""
        self.jobs: Mapping[tuple[str, str], Any] = {}
        """kopf's live index of Jobs by (namespace, run), handed over by the first event."""
        self.pods: Mapping[tuple[str, str], Any] = {}
        """kopf's live index of the runs' pods by (namespace, Job), handed over likewise."""
        self.policies: Mapping[tuple[str, str], Any] = {}
        """kopf's live index of the runs' NetworkPolicies by (namespace, name), likewise."""
        self.runs: dict[tuple[str, str], Obj] = {}
        """Each run's newest known body (View)."""
        self.older: dict[tuple[str, str], deque[str]] = {}
        """resourceVersions of each run known to be older than its body in `runs` (View)."""
        self.shown: dict[tuple[str, str], int] = {}
        """How many of each run's watch events became its body: whether one came during a
        status write."""
        self.seen: dict[str, dict[str, Any]] = {}
        """compact_job of every Job by uid, as its last event had it: what job_news compares."""

    def job_news(self, uid: str, job: dict[str, Any] | None) -> bool:
        """Whether a Job's event changes what the engine sees of it (None: it is gone)."""
        if job is None:
            return self.seen.pop(uid, None) is not None
        if self.seen.get(uid) == job:
            return False
        self.seen[uid] = job
        return True

    def wake(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        self.woken.setdefault(key, time.monotonic())
        self.pokes.setdefault(key, asyncio.Event()).set()
        task = self.tasks.get(key)
        if task is None or task.done():
            self.tasks[key] = asyncio.create_task(self._loop(key), name=f"reconcile {key}")

    def stop(self, namespace: str, name: str) -> None:
        if task := self.tasks.pop((namespace, name), None):
            task.cancel()
        self.pokes.pop((namespace, name), None)
        self.woken.pop((namespace, name), None)
        self.drop_run((namespace, name))

    def saw_run(self, key: tuple[str, str], body: Obj) -> None:
        """A watch event's body of the run: the newest the watch has shown, and the run, unless
        it is one the operator's own write has already replaced (View)."""
        if _version(body) in self.older.get(key, ()):
            return
        self.runs[key] = body
        self.shown[key] = self.shown.get(key, 0) + 1

    def wrote(self, key: tuple[str, str], acted_on: Obj, answer: Obj, shown: int) -> None:
        """The run's status was written from `acted_on` and the API server answered `answer`;
        `shown` is what `self.shown` held when the pass began. The answer is the run unless an
        event came since that may be newer than it (View): one that is not `acted_on` itself
        (whose event can come during the write when the pass read the run from the API
        server) or an older body the operator has written over."""
        if key not in self.shown:  # gone (drop_run) while it was written
            return
        older = self.older.setdefault(key, deque(maxlen=OLDER_KEPT))
        older.append(_version(acted_on))
        held = self.runs.get(key)
        if self.shown[key] == shown or held is None or _version(held) in older:
            self.runs[key] = answer

    def forget_run(self, key: tuple[str, str]) -> None:
        self.runs.pop(key, None)

    def drop_run(self, key: tuple[str, str]) -> None:
        """All the loops hold of a run that is gone."""
        self.forget_run(key)
        self.older.pop(key, None)
        self.shown.pop(key, None)

    def view(self, key: tuple[str, str], fresh: bool = False) -> View:
        """The watches' view of a run; `fresh`: without the run they hold (read it)."""
        namespace = key[0]
        shown = self.shown.get(key, 0)
        return View(
            jobs=lambda: list(self.jobs.get(key, ())),
            run=_none if fresh else lambda: self.runs.get(key),
            pods=lambda job: list(self.pods.get((namespace, job), ())),
            policy=lambda name: _first(self.policies.get((namespace, name), ())),
            forget=lambda: self.forget_run(key),
            wrote=lambda acted_on, answer: self.wrote(key, acted_on, answer, shown),
        )

    async def stop_all(self) -> None:
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.tasks.clear()

    async def _loop(self, key: tuple[str, str]) -> None:
        namespace, name = key
        poke = self.pokes.setdefault(key, asyncio.Event())
        failures = 0
        woken: float | None = None
        fresh = False
        while True:
            poke.clear()
            pending = self.woken.pop(key, None)
            if woken is None:  # a retry (conflict, error) still serves the first try's event
                woken = pending
            try:
                # A retry reads the run from the API server: whatever made the pass go again
                # (a conflict, a decision that needs the newest run, an error) may be the
                # watched run being older than the run.
                outcome = await self.reconcile(namespace, name, self.view(key, fresh), woken)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception:
                fresh = True
                failures += 1
                delay = backoff_seconds(failures)
                metrics.RECONCILE_ERRORS.inc()
                log.exception(
                    "reconcile of %s/%s failed (%d in a row); retrying in %.0fs",
                    namespace,
                    name,
                    failures,
                    delay,
                )
                # Wake-ups do not cut a backoff short: a failing API or a bug would otherwise be
                # hammered at the rate the run's Jobs change.
                await asyncio.sleep(delay)
                continue
            if outcome == "gone":
                self.pokes.pop(key, None)
                self.tasks.pop(key, None)
                self.woken.pop(key, None)
                self.drop_run(key)
                return
            fresh = outcome == "again"
            if fresh:
                continue
            woken = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(poke.wait(), RESYNC_SECONDS)


def _version(body: Obj) -> str | None:
    return (body.get("metadata") or {}).get("resourceVersion")


def _first(values: Iterable[Obj]) -> Obj | None:
    return next(iter(values), None)


def backoff_seconds(failures: int) -> float:
    """1, 2, 4, ... seconds after 1, 2, 3, ... failures in a row, at most MAX_BACKOFF_SECONDS."""
    return min(MAX_BACKOFF_SECONDS, 2.0 ** min(failures - 1, 16))
