"""One reconcile loop per run, and the thread pool its Kubernetes calls run in.

The shell's machinery, apart from what a reconcile does (handlers.py): when a run's loop runs,
how failures back off, and why the API calls have a pool of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, ParamSpec, TypeVar

from fedtune_operator import metrics
from fedtune_operator.kube import API_CONCURRENCY

log = logging.getLogger("fedtune.operator")

RESYNC_SECONDS = float(os.environ.get("FEDTUNE_RESYNC_SECONDS", "15"))
MAX_BACKOFF_SECONDS = 300.0

Outcome = Literal["wait", "again", "gone"]
Reconcile = Callable[
    [str, str, Callable[[], list[dict[str, Any]]], float | None], Awaitable[Outcome]
]
"""(namespace, name, read_jobs, woken) -> what the loop does next."""

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
        while True:
            poke.clear()
            pending = self.woken.pop(key, None)
            if woken is None:  # a retry (conflict, error) still serves the first try's event
                woken = pending
            try:
                outcome = await self.reconcile(
                    namespace, name, lambda: list(self.jobs.get(key, ())), woken
                )
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception:
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
                return
            if outcome == "again":
                continue
            woken = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(poke.wait(), RESYNC_SECONDS)


def backoff_seconds(failures: int) -> float:
    """1, 2, 4, ... seconds after 1, 2, 3, ... failures in a row, at most MAX_BACKOFF_SECONDS."""
    return min(MAX_BACKOFF_SECONDS, 2.0 ** min(failures - 1, 16))
