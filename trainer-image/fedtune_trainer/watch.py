"""`fedtune-trainer watch`: a site's wait for its next task (docs/sites.md).

The site's operator runs it with the site's own storage identity, which may read the run's
globals, its final adapter's manifest and this client's tasks, and write only the site's notes
and commits. It writes a heartbeat at every poll, and ends with one of:

- the first round after `after_round` whose global is not committed yet (rounds the run finished
  while the site was away are skipped: their tasks are history) and whose task for this client
  is there, signed with the pinned run key and within the site's policy: exit 0, a WatchSummary
  with the round, the SHA-256 of the task's exact bytes (the site's client Job trains only those
  bytes) and the image the task asks for;
- the run's final adapter committed: exit 0, outcome `finished`;
- a task that does not verify, is not addressed to this site, or lies outside its policy: a
  Refusal written where the run's relay reads it, and `Refused: <why>` (exit 2);
- a paused policy: a `paused` heartbeat and `SitePaused` at once (exit 2).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from fedtune_trainer.storage import signing
from fedtune_trainer.storage import store as st
from fedtune_trainer.storage.locate import open_store
from fedtune_trainer.storage.tasks import (
    Clock,
    SignedTask,
    TaskError,
    backoff,
    beat,
    read_signed_task,
    refuse,
)
from fedtune_trainer.wire.contract import SITE_PAUSED
from fedtune_trainer.wire.errors import SiteError
from fedtune_trainer.wire.layout import FINAL_PREFIX, global_prefix
from fedtune_trainer.wire.results import WatchSummary
from fedtune_trainer.wire.site import WatchTask, policy_refusals

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def next_open_round(store: st.Store, after: int) -> int:
    """The first round after `after` whose global is not committed: the one a task may still
    be waiting for."""
    round_ = after + 1
    while st.read_manifest(store, global_prefix(round_)) is not None:
        round_ += 1
    return round_


def run(
    task: WatchTask,
    store: st.Store | None = None,
    clock: Clock | None = None,
    log: Log = _stderr,
) -> WatchSummary:
    """Wait for the site's next task; the accepted task, the run's end, or SiteError."""
    clock = clock or Clock()
    start = clock.now()
    store = store or open_store(task.storage)
    if task.policy.paused:
        beat(store, task.client, "paused", task.after_round, clock)
        raise SiteError(f"{SITE_PAUSED}: the site's policy is paused")
    verify = signing.verifier(task.run_key, signing.TASK_DOMAIN)
    round_ = task.after_round + 1
    log(f"watch: {task.client} waits for a task of run {task.run} after round {task.after_round}")
    for delay in backoff(clock):
        round_ = next_open_round(store, round_ - 1)
        beat(store, task.client, "waiting", round_, clock)
        if st.read_manifest(store, FINAL_PREFIX) is not None:
            log(f"watch: run {task.run} is finished")
            return WatchSummary(
                client=task.client,
                outcome="finished",
                round=round_ - 1,
                seconds=round(clock.now() - start, 3),
            )
        try:
            found = read_signed_task(store, round_, task.client, task.run, verify)
        except (signing.SignatureError, TaskError) as e:
            raise refuse(store, task.client, round_, f"the task does not verify: {e}", clock) from e
        if found is not None:
            return accept(store, task, found, clock, start, log)
        clock.sleep(delay)
    raise AssertionError("backoff never ends")


def accept(
    store: st.Store, task: WatchTask, found: SignedTask, clock: Clock, start: float, log: Log
) -> WatchSummary:
    """The verified task's summary, unless the site's policy refuses it (then a Refusal)."""
    remote = found.task
    if problems := policy_refusals(remote, task.policy, task.client, task.run, task.contributed):
        raise refuse(store, task.client, remote.round, "; ".join(problems), clock)
    log(f"watch: round {remote.round}'s task accepted (sha256 {found.sha256[:12]}...)")
    return WatchSummary(
        client=task.client,
        outcome="task",
        round=remote.round,
        task_sha256=found.sha256,
        image=remote.image,
        seconds=round(clock.now() - start, 3),
    )
