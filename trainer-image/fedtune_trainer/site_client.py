"""`fedtune-trainer site-client`: a site's client Job, the round its watch Job accepted.

It reads the task again and trusts it only if it verifies with the pinned run key and its bytes
are the very ones the watch accepted (`task_sha256`): the run could have rewritten the task in
between, and the site's policy was checked on the watch's bytes. Then it trains it as any client
(client.py) with what never leaves the site: its data, its storage identity, its privacy, its
signing key. While it trains it keeps a `training` heartbeat fresh, so that a long round does not
look silent to the run's relay; once committed it says `waiting` for the next round.

A task that fails either check is refused (a Refusal the relay reads, `Refused: ...`, exit 2).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from fedtune_trainer import client
from fedtune_trainer.storage import signing
from fedtune_trainer.storage import store as st
from fedtune_trainer.storage.locate import open_store
from fedtune_trainer.storage.tasks import (
    HEARTBEAT_SECONDS,
    Clock,
    TaskError,
    beat,
    beating,
    read_signed_task,
    refuse,
)
from fedtune_trainer.wire.errors import SettingError
from fedtune_trainer.wire.layout import task_key
from fedtune_trainer.wire.results import ClientSummary
from fedtune_trainer.wire.site import RemoteTask, SiteClientTask
from fedtune_trainer.wire.task import ClientTask, site_client_task

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def accepted_task(store: st.Store, task: SiteClientTask, clock: Clock) -> RemoteTask:
    """The round's task, verified with the run key and byte for byte the one the watch
    accepted; otherwise refused (SiteError)."""
    verify = signing.verifier(task.run_key, signing.TASK_DOMAIN)
    try:
        found = read_signed_task(store, task.round, task.client, task.run, verify)
    except (signing.SignatureError, TaskError) as e:
        raise refuse(store, task.client, task.round, f"the task does not verify: {e}", clock) from e
    if found is None:
        raise SettingError(f"no task at {store.url(task_key(task.round, task.client))}")
    if found.sha256 != task.task_sha256:
        raise refuse(
            store,
            task.client,
            task.round,
            f"the task changed after the site accepted it (sha256 {found.sha256[:12]}..., "
            f"accepted {task.task_sha256[:12]}...)",
            clock,
        )
    return found.task


def client_task(store: st.Store, task: SiteClientTask, clock: Clock) -> ClientTask:
    """The ClientTask this site trains for the round (signed, with the site's privacy)."""
    remote = accepted_task(store, task, clock)
    return site_client_task(remote, task.data_uri, task.storage, task.privacy)


def run(
    task: SiteClientTask,
    store: st.Store | None = None,
    clock: Clock | None = None,
    log: Log = _stderr,
    every: float = HEARTBEAT_SECONDS,
) -> ClientSummary:
    """Check the task, train and commit it signed, with heartbeats; the client's summary."""
    clock = clock or Clock()
    store = store or open_store(task.storage)
    train = client_task(store, task, clock)
    client.commit_signer(train)  # no usable key: fail before the heartbeat says "training"
    with beating(store, task.client, "training", task.round, clock, every):
        summary = client.run(train, store, log)
    if summary is None:
        raise RuntimeError("a site's client runs in one process; a worker has no summary")
    beat(store, task.client, "waiting", task.round + 1, clock)
    return summary
