"""A site's part in a run, as a pure function (docs/sites.md).

    decide_site(site, status, jobs, now) -> SiteDecision(actions, status, events)

The site's operator has no storage credential either: it learns everything from its own Jobs.
A *watch* Job waits for the run's next task addressed to this site, verifies it and checks the
site's policy; it ends with the accepted task (round, digest, image), the run's end, or a
refusal. For an accepted task a *client* Job trains the round. Memory lives in the status:
`afterRound` (the last round handled, trained or refused) and `watchAttempt` (the watches started
after it), so a restarted operator picks up where it was, and Job names are a function of them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Literal

from fedtune_operator.api.site import REFUSALS_LIMIT, FederatedSiteSpec, FederatedSiteStatus
from fedtune_operator.api.site import SiteRefusal as Refusal
from fedtune_operator.rounds import JobState
from fedtune_trainer.wire.contract import SITE_PAUSED, refused_round
from fedtune_trainer.wire.results import ClientSummary, WatchSummary
from fedtune_trainer.wire.site import image_allowed

MAX_WATCH_ATTEMPTS = 5
"""Watches in a row that fail for a reason other than a refusal (storage unreachable, the
site's credentials refused) before the site gives up: each already retried its pod."""


@dataclass(frozen=True)
class Site:
    name: str
    namespace: str
    uid: str
    generation: int
    spec: FederatedSiteSpec


@dataclass(frozen=True)
class SiteJob:
    """One of the site's Jobs as the engine sees it. `round` is a watch's afterRound, a client's
    task round."""

    name: str
    role: Literal["watch", "client"]
    round: int
    attempt: int
    state: JobState
    summary: WatchSummary | ClientSummary | None = None
    message: str = ""


@dataclass(frozen=True)
class CreateWatchJob:
    after_round: int
    attempt: int
    contributed: int


@dataclass(frozen=True)
class CreateSiteClientJob:
    round: int
    task_sha256: str
    image: str


SiteAction = CreateWatchJob | CreateSiteClientJob


@dataclass(frozen=True)
class SiteEvent:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class SiteDecision:
    status: FederatedSiteStatus
    actions: list[SiteAction] = field(default_factory=list)
    events: list[SiteEvent] = field(default_factory=list)


def decide_site(
    site: Site, status: FederatedSiteStatus, jobs: list[SiteJob], now: dt.datetime
) -> SiteDecision:
    now = now.replace(microsecond=0)
    d = SiteDecision(status.model_copy(update={"observed_generation": site.generation}))
    # Statuses are frozen models: each edit below is a copy (`_set`).
    if d.status.phase in ("Completed", "Left", "Failed"):
        return d
    if site.spec.leave:
        _phase(d, "Left", "left the run (spec.leave): it takes no more tasks")
        d.events.append(SiteEvent("Normal", "Left", "the site left the run"))
        return d
    if _record_clients(d, jobs, now):
        return d  # a client Job of this site still trains
    # A finished watch moves the site on (a round handled, a watch to retry), after which the
    # next watch starts in the same decision: at most two passes.
    for _ in range(2):
        watch = _current_watch(d.status, jobs)
        if watch is None:
            if d.status.phase == "Paused" and site.spec.policy.paused:
                return d  # paused: nothing runs until the policy says otherwise
            action = CreateWatchJob(
                d.status.after_round, d.status.watch_attempt, d.status.rounds_contributed
            )
            d.actions.append(action)
            _phase(d, "Waiting", _waiting(d.status))
            return d
        if watch.state == "active":
            _phase(d, "Waiting", _waiting(d.status))
            return d
        if watch.state == "succeeded" and isinstance(watch.summary, WatchSummary):
            _watched(site, d, watch.summary, jobs, now)
        else:
            _watch_failed(site, d, watch, now)
        if d.status.phase in ("Completed", "Failed", "Paused", "Training"):
            return d
    return d


def _current_watch(status: FederatedSiteStatus, jobs: list[SiteJob]) -> SiteJob | None:
    return next(
        (
            j
            for j in jobs
            if j.role == "watch"
            and j.round == status.after_round
            and j.attempt == status.watch_attempt
        ),
        None,
    )


def _waiting(status: FederatedSiteStatus) -> str:
    return f"waiting for the run's first task after round {status.after_round}"


def _record_clients(d: SiteDecision, jobs: list[SiteJob], now: dt.datetime) -> bool:
    """Record each finished client Job after afterRound (in round order); True while one of
    them still runs."""
    for job in sorted((j for j in jobs if j.role == "client"), key=lambda j: j.round):
        if job.round <= d.status.after_round:
            continue
        if job.state == "active":
            _phase(d, "Training", f"training round {job.round}")
            return True
        if job.state == "succeeded" and isinstance(job.summary, ClientSummary):
            _set(
                d,
                rounds_contributed=d.status.rounds_contributed + 1,
                bytes_sent=d.status.bytes_sent + job.summary.bytes_sent,
                last_heartbeat=now,
            )
            d.events.append(
                SiteEvent(
                    "Normal",
                    "Contributed",
                    f"round {job.round}: sent {job.summary.bytes_sent} bytes "
                    f"({job.summary.samples} samples, train loss {job.summary.train_loss})",
                )
            )
        else:
            why = f"the client Job failed: {job.message or 'no reason given'}"
            _refuse(d, job.round, why, now, "TrainingFailed")
        _advance(d, job.round)
    return False


def _watched(
    site: Site, d: SiteDecision, summary: WatchSummary, jobs: list[SiteJob], now: dt.datetime
) -> None:
    _set(d, last_heartbeat=now)
    if summary.outcome == "finished":
        _phase(d, "Completed", f"the run finished (its last round is {summary.round})")
        d.events.append(SiteEvent("Normal", "Completed", "the run finished"))
        return
    round_, image = summary.round, summary.image or ""
    _set(d, run_round=max(d.status.run_round or 0, round_))
    # The watch checked the policy; the operator checks the image again, since it is the one
    # that puts it in a pod spec.
    if not image_allowed(image, site.spec.policy.images) or not summary.task_sha256:
        _refuse(d, round_, f"image {image!r} is not in the site's policy", now, "Refused")
        _advance(d, round_)
        return
    if not any(j.role == "client" and j.round == round_ for j in jobs):
        d.actions.append(CreateSiteClientJob(round_, summary.task_sha256, image))
    _phase(d, "Training", f"training round {round_}")


def _watch_failed(site: Site, d: SiteDecision, watch: SiteJob, now: dt.datetime) -> None:
    message = watch.message or "no reason given"
    if message.startswith(SITE_PAUSED):
        if site.spec.policy.paused:
            _phase(d, "Paused", "paused by the site's policy; the run goes on without it")
            return
        _set(d, watch_attempt=d.status.watch_attempt + 1)  # unpaused since: watch again
        _phase(d, "Waiting", _waiting(d.status))
        return
    round_ = refused_round(message)
    if round_ is not None:
        _set(d, run_round=max(d.status.run_round or 0, round_))
        _refuse(d, round_, message, now, "Refused")
        _advance(d, round_)
        return
    _set(d, watch_attempt=d.status.watch_attempt + 1)
    if d.status.watch_attempt >= MAX_WATCH_ATTEMPTS:
        _phase(d, "Failed", f"{MAX_WATCH_ATTEMPTS} watches failed in a row; last: {message}")
        d.events.append(SiteEvent("Warning", "WatchFailed", message[:1024]))
        return
    d.events.append(SiteEvent("Warning", "WatchFailed", f"{message[:900]}; watching again"))


def _refuse(d: SiteDecision, round_: int, reason: str, now: dt.datetime, why: str) -> None:
    refusal = Refusal(round=round_, reason=reason[:1024], time=now)
    _set(d, refusals=[*d.status.refusals, refusal][-REFUSALS_LIMIT:])
    d.events.append(SiteEvent("Warning", why, f"round {round_}: {reason}"[:1024]))


def _advance(d: SiteDecision, round_: int) -> None:
    """Round `round_` is handled: the next watch waits for a later one, from attempt 0."""
    if round_ > d.status.after_round:
        _set(d, after_round=round_, watch_attempt=0)


def _phase(d: SiteDecision, phase: str, message: str) -> None:
    _set(d, phase=phase, message=message)


def _set(d: SiteDecision, **fields: object) -> None:
    d.status = d.status.model_copy(update=fields)
