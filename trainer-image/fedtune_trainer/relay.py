"""`fedtune-trainer relay`: the run's Job for a remote client's round (docs/sites.md).

It publishes the round's task signed with the run's task key, then waits, polling the storage
with backoff, for what the site does: commit a delta signed with its pinned key (the relay ends
as a client Job ends, with a ClientSummary read from the commit's manifest), refuse the task,
pause, leave, or fall silent (the relay fails with the contract's word for it). So the run's
operator treats a remote client exactly as a local one: quorum, round timeouts and retries need
not know the difference.

Two choices, and why:

- Freshness is measured on the relay's own clock: a heartbeat counts as alive when the relay
  first sees it changed, not by the time the site wrote in it. The site is another cluster,
  maybe another organisation; its clock may be minutes off, and a skew must not read as silence.
  For the same reason "since the task" means "differs from the heartbeat there just before the
  task was published".
- A site that said `paused` before the task was published and has said nothing since is taken
  as paused after PAUSED_GRACE seconds (time for a site that has just resumed to say so), not
  after the whole silence allowance: a paused site must not stall every round.
- A commit that does not verify (unsigned, signed by another key, another round's copied here)
  is not success: the aggregator would reject it. The relay keeps waiting, since the site may be
  rewriting its commit (the commit protocol removes the old manifest, then writes the signature
  and the manifest: a reader can catch the gap). It fails `SiteUnverified` only when the
  unverifiable commit has stayed for UNVERIFIED_GRACE seconds while the site was not training
  the round: a key that differs at either end, which no retry fixes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fedtune_trainer.storage import signing
from fedtune_trainer.storage import store as st
from fedtune_trainer.storage.locate import open_store
from fedtune_trainer.storage.tasks import (
    Clock,
    backoff,
    publish_task,
    read_heartbeat,
    read_refusal,
)
from fedtune_trainer.wire.contract import (
    SITE_LEFT,
    SITE_MOVED_ON,
    SITE_PAUSED,
    SITE_SILENT,
    SITE_UNVERIFIED,
    TASK_SIGNING_KEY_ENV,
    refused,
)
from fedtune_trainer.wire.errors import SiteError
from fedtune_trainer.wire.layout import client_prefix
from fedtune_trainer.wire.results import ClientSummary
from fedtune_trainer.wire.site import Heartbeat, Refusal, RelayTask

PAUSED_GRACE = 30.0
"""Seconds a site whose heartbeat said paused (or left) before the task was published has to say
otherwise: a site that resumes starts a watch, whose first heartbeat comes within seconds."""
UNVERIFIED_GRACE = 60.0
"""Seconds an unverifiable commit may stay before the relay gives up on it (a commit is
rewritten in well under a second; a site's wrong key stays)."""

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Seen:
    """What one poll found of the site's answer to the round's task."""

    manifest: dict[str, Any] | None = None
    """The site's commit for the round, its signature verified and its fields the task's."""
    unverified: str | None = None
    """A commit is there but is not the site's for this round: why."""
    refusal: Refusal | None = None
    heartbeat: Heartbeat | None = None
    """The newest heartbeat written since the task was published (None: none since)."""
    before: Heartbeat | None = None
    """The heartbeat that was there when the task was published."""


def relay_outcome(
    seen: Seen,
    round_: int,
    alive_at: float,
    unverified_since: float | None,
    now: float,
    silence: float,
) -> dict[str, Any] | SiteError | None:
    """The relay's decision after a poll: the verified manifest (done), the failure, or None
    (keep waiting). `alive_at` is when the site was last seen alive on the relay's clock: the
    task's publication, or the first sight of its newest heartbeat since; `unverified_since`
    is when the unverifiable commit was first seen."""
    if seen.manifest is not None:
        return seen.manifest
    if seen.refusal is not None:
        return SiteError(refused(seen.refusal.round, seen.refusal.reason))
    beat = seen.heartbeat
    if beat is not None and beat.state in ("paused", "left"):
        word = SITE_PAUSED if beat.state == "paused" else SITE_LEFT
        return SiteError(f"{word}: the site's heartbeat says {beat.state} (round {beat.round})")
    # Paused (or gone) since before the task: say so once a site that resumes has had time to
    # say it has, instead of waiting out the whole silence allowance.
    old = seen.before
    if (
        beat is None
        and old is not None
        and old.state in ("paused", "left")
        and now - alive_at >= PAUSED_GRACE
    ):
        word = SITE_PAUSED if old.state == "paused" else SITE_LEFT
        return SiteError(f"{word}: the site's heartbeat has said {old.state} since before the task")
    # A site writes `waiting` for a later round only once its client's Job for this one has
    # ended (a commit comes first, and wins above): whatever is there will not change.
    moved_on = beat is not None and beat.state == "waiting" and beat.round > round_
    training = beat is not None and beat.state == "training" and beat.round == round_
    if (
        seen.unverified is not None
        and unverified_since is not None
        and (moved_on or (now - unverified_since >= UNVERIFIED_GRACE and not training))
    ):
        return SiteError(f"{SITE_UNVERIFIED}: {seen.unverified}")
    if moved_on:
        assert beat is not None
        return SiteError(
            f"{SITE_MOVED_ON}: the site waits for round {beat.round}; its client did not "
            f"commit round {round_} (the site's status says why)"
        )
    if now - alive_at > silence:
        last = f"its last ({beat.state}, round {beat.round})" if beat else "none since the task"
        return SiteError(f"{SITE_SILENT}: no heartbeat for {silence:g} s ({last})", retry=True)
    return None


def task_signer(environ: Mapping[str, str] | None = None) -> Callable[[bytes], bytes]:
    """The run's task key, from its Secret through FEDTUNE_TASK_SIGNING_KEY (relay Jobs alone get
    it); missing or unusable: a SettingError before anything is published."""
    return signing.signer_from_env(
        os.environ if environ is None else environ,
        TASK_SIGNING_KEY_ENV,
        f"{TASK_SIGNING_KEY_ENV} is empty: a relay signs its task with the run's task key",
        signing.TASK_DOMAIN,
    )


def read_commit(
    store: st.Store, task: RelayTask, verify: Callable[[bytes, bytes | None], None]
) -> tuple[dict[str, Any] | None, str | None]:
    """The site's verified commit for the round (None while there is none), or why the commit
    that is there does not count."""
    prefix = client_prefix(task.round, task.client)
    try:
        manifest = st.read_manifest(store, prefix, verify)
    except (signing.SignatureError, st.IntegrityError) as e:
        return None, f"{store.url(prefix)}: {e}"
    if manifest is None:
        return None, None
    got = (manifest.get("run"), manifest.get("round"), manifest.get("client"))
    if got != (task.run, task.round, task.client):
        return None, (
            f"{store.url(prefix)}: replayed: the manifest names run {got[0]!r} round {got[1]!r} "
            f"client {got[2]!r}"
        )
    return manifest, None


def client_summary(
    manifest: Mapping[str, Any], seconds: float, heartbeat: Heartbeat | None = None
) -> ClientSummary:
    """What a client Job would have reported, from what its signed manifest says. The base
    model's size and downloads are the site's business: 0. What was sent is every file of the
    commit (the delta, and SCAFFOLD's control change when there is one)."""
    sent = sum(int(entry["bytes"]) for entry in manifest["files"].values())
    return ClientSummary(
        round=manifest["round"],
        client=manifest["client"],
        samples=manifest["samples"],
        steps=manifest["steps"],
        train_loss=manifest.get("train_loss"),
        bytes_sent=sent,
        raw_bytes=manifest["raw_bytes"],
        control_bytes=sent - manifest["encoded_bytes"],
        full_model_bytes=0,
        truncated_records=manifest.get("truncated_records", 0),
        dropped_records=manifest.get("dropped_records", 0),
        sha256=manifest["sha256"],
        seconds=round(seconds, 3),
        last_heartbeat=heartbeat.at if heartbeat is not None else None,
    )


def run(
    task: RelayTask,
    store: st.Store | None = None,
    sign: Callable[[bytes], bytes] | None = None,
    clock: Clock | None = None,
    log: Log = _stderr,
) -> ClientSummary:
    """Publish the task, wait for the site's answer; the summary of its commit, or SiteError."""
    clock = clock or Clock()
    start = clock.now()
    sign = sign or task_signer()
    store = store or open_store(task.storage)
    verify = signing.verifier(task.client_key)
    last = before = read_heartbeat(store, task.client)  # there before the task: not "since"
    publish_task(store, task.remote, sign)
    published = alive = clock.now()
    log(f"relay: published round {task.round}'s task for {task.client} at {store.uri}")
    since: Heartbeat | None = None
    unverified_since: float | None = None
    for delay in backoff(clock):
        manifest, unverified = read_commit(store, task, verify)
        refusal = read_refusal(store, task.client, task.round)
        beat = read_heartbeat(store, task.client)
        now = clock.now()
        if beat is not None and beat != last:
            since, alive = beat, now
            log(f"relay: {task.client} {beat.state} (round {beat.round})")
        last = beat or last
        if unverified is None:
            unverified_since = None
        elif unverified_since is None:
            unverified_since = now
            log(f"relay: a commit that does not count: {unverified}")
        seen = Seen(manifest, unverified, refusal, since, before)
        outcome = relay_outcome(
            seen, task.round, alive, unverified_since, now, task.silence_seconds
        )
        if isinstance(outcome, SiteError):
            raise outcome
        if outcome is not None:
            log(f"relay: {task.client} committed round {task.round} ({now - published:.0f} s)")
            return client_summary(outcome, clock.now() - start, last)
        clock.sleep(delay)
    raise AssertionError("backoff never ends")
