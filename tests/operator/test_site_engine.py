"""A site's part in a run, decided from its own Jobs alone (site_engine.decide_site).

Each case is a status and the site's Jobs as the site's operator observes them; the decision is
the next status and the Jobs to create. The site never reads storage or a Secret itself.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from fedtune_operator.api.site import FederatedSiteSpec, FederatedSiteStatus
from fedtune_operator.site_engine import (
    MAX_WATCH_ATTEMPTS,
    CreateSiteClientJob,
    CreateWatchJob,
    Site,
    SiteJob,
    decide_site,
)
from fedtune_trainer.wire.contract import refused
from fedtune_trainer.wire.results import ClientSummary, WatchSummary

NOW = dt.datetime(2026, 12, 7, 5, 0, tzinfo=dt.UTC)
IMAGE = "registry.run.example/fedtune-trainer:1.2"
SHA = "ab" * 32
KEY = "ed25519:eaLkirYtCkhKhn2akQl3xE5pOBWBYSYB0KIxSk3JAgQ="


def spec(**policy: Any) -> FederatedSiteSpec:
    return FederatedSiteSpec.model_validate(
        {
            "client": "bank-b",
            "run": {"name": "r", "storage": {"uri": "s3://fed/runs/r"}, "taskPublicKey": KEY},
            "signing": {"secretName": "bank-b-key"},
            "dataUri": "s3://bank-b-private/train.jsonl",
            "policy": {"images": ["registry.run.example/"], **policy},
        }
    )


def site(**policy: Any) -> Site:
    return Site("bank-b-in-r", "ml", "uid-1", 3, spec(**policy))


def status(**fields: Any) -> FederatedSiteStatus:
    return FederatedSiteStatus.model_validate(fields)


def watch(after: int, state: str, attempt: int = 0, **kw: Any) -> SiteJob:
    return SiteJob(f"w{after}-{attempt}", "watch", after, attempt, state, **kw)  # type: ignore[arg-type]


def client(round_: int, state: str, **kw: Any) -> SiteJob:
    return SiteJob(f"r{round_}", "client", round_, 0, state, **kw)  # type: ignore[arg-type]


def accepted(round_: int, image: str = IMAGE) -> WatchSummary:
    return WatchSummary(client="bank-b", outcome="task", round=round_, task_sha256=SHA, image=image)


def trained(round_: int, sent: int = 1000) -> ClientSummary:
    return ClientSummary(
        round=round_, client="bank-b", samples=48, steps=4, bytes_sent=sent, raw_bytes=4 * sent,
        full_model_bytes=0, sha256=SHA, seconds=1.0,
    )  # fmt: skip


CASES: list[tuple[str, FederatedSiteStatus, list[SiteJob], str, list[Any], dict[str, Any]]] = [
    (
        "a new site watches for its first task",
        status(),
        [],
        "Waiting",
        [CreateWatchJob(0, 0, 0)],
        {"after_round": 0},
    ),
    (
        "while the watch waits, nothing new",
        status(phase="Waiting"),
        [watch(0, "active")],
        "Waiting",
        [],
        {},
    ),
    (
        "an accepted task is trained with its image",
        status(),
        [watch(0, "succeeded", summary=accepted(2))],
        "Training",
        [CreateSiteClientJob(2, SHA, IMAGE)],
        {"run_round": 2},
    ),
    (
        "a training client Job holds everything",
        status(),
        [watch(0, "succeeded", summary=accepted(2)), client(2, "active")],
        "Training",
        [],
        {},
    ),
    (
        "a trained round counts, and the next watch starts after it",
        status(run_round=2),
        [
            watch(0, "succeeded", summary=accepted(2)),
            client(2, "succeeded", summary=trained(2)),
        ],
        "Waiting",
        [CreateWatchJob(2, 0, 1)],
        {"after_round": 2, "rounds_contributed": 1, "bytes_sent": 1000},
    ),
    (
        "a failed client Job is recorded and the site moves on",
        status(),
        [watch(0, "succeeded", summary=accepted(2)), client(2, "failed", message="exit 1")],
        "Waiting",
        [CreateWatchJob(2, 0, 0)],
        {"after_round": 2, "rounds_contributed": 0},
    ),
    (
        "a refusal names its round, and the site waits past it",
        status(),
        [watch(0, "failed", message=refused(4, "image 'x' is not in the site's policy"))],
        "Waiting",
        [CreateWatchJob(4, 0, 0)],
        {"after_round": 4, "run_round": 4},
    ),
    (
        "the run's end completes the site",
        status(after_round=3),
        [
            watch(
                3,
                "succeeded",
                summary=WatchSummary(client="bank-b", outcome="finished", round=5),
            )
        ],
        "Completed",
        [],
        {},
    ),
    (
        "a watch that failed otherwise is tried again",
        status(after_round=3),
        [watch(3, "failed", message="exit 1: EndpointConnectionError")],
        "Waiting",
        [CreateWatchJob(3, 1, 0)],
        {"watch_attempt": 1},
    ),
    (
        "too many failed watches fail the site",
        status(after_round=3, watch_attempt=MAX_WATCH_ATTEMPTS - 1),
        [watch(3, "failed", attempt=MAX_WATCH_ATTEMPTS - 1, message="AccessDenied")],
        "Failed",
        [],
        {},
    ),
]


@pytest.mark.parametrize(
    ("case", "before", "jobs", "phase", "actions", "after"), CASES, ids=[c[0] for c in CASES]
)
def test_a_site_decides_from_its_own_jobs(
    case: str,
    before: FederatedSiteStatus,
    jobs: list[SiteJob],
    phase: str,
    actions: list[Any],
    after: dict[str, Any],
) -> None:
    d = decide_site(site(), before, jobs, NOW)
    assert d.status.phase == phase, d.status.message
    assert d.actions == actions
    for field, value in after.items():
        assert getattr(d.status, field) == value, field
    assert d.status.observed_generation == 3


def test_refusals_are_kept_with_their_round_and_reason() -> None:
    d = decide_site(
        site(), status(), [watch(0, "failed", message=refused(4, "too many steps"))], NOW
    )
    [refusal] = d.status.refusals
    assert (refusal.round, refusal.time) == (4, NOW)
    assert "too many steps" in refusal.reason
    assert [e.reason for e in d.events] == ["Refused"]


def test_an_image_outside_the_policy_is_refused_even_when_a_watch_accepted_it() -> None:
    """The operator puts the image in a pod spec: it checks the policy itself, again."""
    d = decide_site(
        site(), status(), [watch(0, "succeeded", summary=accepted(2, "docker.io/evil/x:1"))], NOW
    )
    assert not any(isinstance(a, CreateSiteClientJob) for a in d.actions)
    assert d.status.after_round == 2
    assert "not in the site's policy" in d.status.refusals[0].reason


def test_a_paused_site_runs_nothing_until_unpaused() -> None:
    paused = watch(0, "failed", message="SitePaused: the site's policy is paused")
    d = decide_site(site(paused=True), status(), [paused], NOW)
    assert (d.status.phase, d.actions) == ("Paused", [])
    again = decide_site(site(paused=True), d.status, [paused], NOW)
    assert again.actions == []
    resumed = decide_site(site(), again.status, [paused], NOW)
    assert resumed.actions == [CreateWatchJob(0, 1, 0)]


@pytest.mark.parametrize("phase", ["Completed", "Left", "Failed"])
def test_an_ended_site_stays_ended(phase: str) -> None:
    d = decide_site(site(), status(phase=phase), [watch(0, "active")], NOW)
    assert (d.status.phase, d.actions) == (phase, [])


def test_leaving_stops_the_site_for_good() -> None:
    leaving = site()
    leaving = Site(
        leaving.name, leaving.namespace, leaving.uid, 4, spec().model_copy(update={"leave": True})
    )
    d = decide_site(leaving, status(phase="Waiting"), [watch(0, "active")], NOW)
    assert (d.status.phase, d.actions) == ("Left", [])
