"""The three programs of a remote client: the run's relay, the site's watch and its client.

Time is a fake that passes only when a program sleeps, and the site acts between two of the
relay's polls (`FakeClock.at`), so no test waits and every interleaving is the one the test says.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedtune_trainer import aggregate, cli, relay, site_client, watch
from fedtune_trainer.storage import signing, tasks
from fedtune_trainer.storage import store as st
from fedtune_trainer.storage.tasks import Clock
from fedtune_trainer.wire.contract import (
    EXIT_FAILED,
    EXIT_INVALID_INPUT,
    SIGNING_KEY_ENV,
    TASK_ENV,
    TASK_SIGNING_KEY_ENV,
    TERMINATION_LOG_ENV,
    refused_round,
)
from fedtune_trainer.wire.delta_settings import DeltaSpec
from fedtune_trainer.wire.errors import SiteError
from fedtune_trainer.wire.layout import FINAL_PREFIX, client_prefix, global_prefix, task_key
from fedtune_trainer.wire.results import ClientSummary, WatchSummary, dump_summary, parse_summary
from fedtune_trainer.wire.settings import LocalPrivacy, StorageLocation
from fedtune_trainer.wire.site import (
    Heartbeat,
    Refusal,
    RelayTask,
    SiteClientTask,
    SitePolicy,
    WatchTask,
)
from fedtune_trainer.wire.task import AggregateTask
from tests.trainer.support import Demo, Storage
from tests.trainer.test_client import ADAPTER, TRAINING, init_task, quiet
from tests.trainer.test_signing import commit_delta
from tests.trainer.test_sites import (
    IMAGE,
    OTHER_KEY,
    RUN_KEY,
    forge_other_key,
    forge_tampered,
    forge_unsigned,
    remote,
    run_signer,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

SITE_KEY = signing.generate()  # the site's own (private PEM, public text)
CLIENT = "bank-b"
START = 1_700_000_000.0  # unix time, so that an hour ago is a valid heartbeat time


class FakeClock:
    """Time that passes only when a program sleeps. `at[n]` runs after the n-th sleep: the site
    (or anyone) acting while the program waits."""

    def __init__(self, at: dict[int, Callable[[], object]] | None = None) -> None:
        self.t = START
        self.sleeps: list[float] = []
        self.at = at or {}

    def sleep(self, seconds: float) -> None:
        assert len(self.sleeps) < 1000, "the program never stopped waiting"
        self.sleeps.append(seconds)
        self.t += seconds
        if action := self.at.get(len(self.sleeps)):
            action()

    @property
    def clock(self) -> Clock:
        return Clock(now=lambda: self.t, sleep=self.sleep, random=lambda: 0.5)


def relay_task(store: st.Store, silence: int = 900, **overrides: Any) -> RelayTask:
    return RelayTask(
        storage=StorageLocation(uri=store.uri),
        remote=remote(**overrides),
        client_key=SITE_KEY[1],
        silence_seconds=silence,
    )


def run_relay(store: st.Store, fake: FakeClock, **kw: Any) -> ClientSummary:
    return relay.run(relay_task(store, **kw), store, run_signer(), fake.clock, quiet)


def heartbeat(store: st.Store, state: Any, round_: int = 3, at: float = 0.0) -> None:
    tasks.write_heartbeat(store, Heartbeat(client=CLIENT, state=state, round=round_, at=at))


def site_commit(store: st.Store, key: bytes | None = SITE_KEY[0], round_: int = 3) -> None:
    """A delta of the site's in `round_`, as its client commits it (signed with `key`)."""
    commit_delta(store, round_, CLIENT, key=key, run="r")


# --------------------------------------------------------------------------------------------
# The relay's decision, as a table
# --------------------------------------------------------------------------------------------

MANIFEST = {"run": "r", "round": 3, "client": CLIENT}
REFUSAL = Refusal(client=CLIENT, round=3, reason="image not allowed", at=0)


def beat(state: Any, round_: int = 3) -> Heartbeat:
    return Heartbeat(client=CLIENT, state=state, round=round_, at=0)


GRACE = relay.UNVERIFIED_GRACE
Seen = relay.Seen
TRAINING_HERE, TRAINING_NEXT = beat("training"), beat("training", 4)
OUTCOMES = [
    # (case, what the poll saw, alive at, unverified since, now, the outcome: None waits)
    ("a verified commit, whatever else", Seen(MANIFEST, refusal=REFUSAL), 0, None, 5e3, "done"),
    ("nothing yet", Seen(), 0, None, 900, None),
    ("a refusal", Seen(refusal=REFUSAL), 0, None, 1, "Refused: round 3: image not allowed"),
    ("paused since the task", Seen(heartbeat=beat("paused")), 0, None, 1, "SitePaused: "),
    ("left since the task", Seen(heartbeat=beat("left")), 0, None, 1, "SiteLeft: "),
    ("waiting for this round", Seen(heartbeat=beat("waiting")), 0, None, 1, None),
    ("paused before the task, briefly", Seen(before=beat("paused")), 0, None, 29, None),
    ("paused before the task, still", Seen(before=beat("paused")), 0, None, 30, "SitePaused: "),
    ("left before the task, still", Seen(before=beat("left")), 0, None, 30, "SiteLeft: "),
    (
        "paused before the task, resumed since",
        Seen(heartbeat=beat("waiting"), before=beat("paused")),
        20,
        None,
        60,
        None,
    ),
    ("waiting for a later round", Seen(heartbeat=beat("waiting", 4)), 0, None, 1, "SiteMovedOn: "),
    ("silent past the allowance", Seen(), 0, None, 900.5, "SiteSilent: "),
    ("alive lately", Seen(heartbeat=beat("waiting")), 600, None, 1400, None),
    ("silent since its last beat", Seen(heartbeat=beat("waiting")), 600, None, 1501, "SiteSilent"),
    ("unverified, briefly", Seen(unverified="bad"), 0, 10, 10 + GRACE - 1, None),
    ("unverified, staying", Seen(unverified="bad"), 0, 10, 10 + GRACE, "SiteUnverified: bad"),
    (
        "unverified, the site moved on",
        Seen(unverified="bad", heartbeat=beat("waiting", 4)),
        0,
        10,
        11,
        "SiteUnverified: bad",
    ),
    ("unverified, training it", Seen(unverified="x", heartbeat=TRAINING_HERE), 100, 10, 200, None),
    (
        "unverified, training another",
        Seen(unverified="x", heartbeat=TRAINING_NEXT),
        100,
        10,
        200,
        "SiteUnverified: x",
    ),
]


@pytest.mark.parametrize(
    ("seen", "alive", "unverified_since", "now", "want"),
    [case[1:] for case in OUTCOMES],
    ids=[case[0] for case in OUTCOMES],
)
def test_the_relay_decides_from_the_commit_then_the_refusal_then_the_heartbeat_then_the_time(
    seen: relay.Seen, alive: float, unverified_since: float | None, now: float, want: str | None
) -> None:
    got = relay.relay_outcome(seen, 3, alive, unverified_since, now, 900)
    if want is None:
        assert got is None
    elif want == "done":
        assert got == MANIFEST
    else:
        assert isinstance(got, SiteError)
        assert got.reason.startswith(want), got.reason
        assert got.retry is want.startswith("SiteSilent")  # only a silent site may be back


# --------------------------------------------------------------------------------------------
# The relay through storage
# --------------------------------------------------------------------------------------------


def test_the_relay_publishes_the_signed_task_and_reports_the_sites_signed_commit(
    storage: Storage,
) -> None:
    store = storage.open()
    fake = FakeClock(
        at={1: lambda: heartbeat(store, "training", at=1234.5), 2: lambda: site_commit(store)}
    )
    summary = run_relay(store, fake)
    assert summary.last_heartbeat == 1234.5  # the site's clock, as the site wrote it
    verify = signing.verifier(RUN_KEY[1], signing.TASK_DOMAIN)
    assert tasks.read_task(store, 3, CLIENT, "r", verify) == remote()
    manifest = st.read_manifest(store, client_prefix(3, CLIENT))
    assert manifest is not None
    assert (summary.round, summary.client) == (3, CLIENT)
    assert (summary.samples, summary.steps, summary.train_loss) == (10, 1, 1.0)
    assert (
        summary.bytes_sent
        == manifest["encoded_bytes"]
        == manifest["files"]["delta.safetensors"]["bytes"]
    )
    assert (summary.raw_bytes, summary.sha256) == (manifest["raw_bytes"], manifest["sha256"])
    assert (
        summary.control_bytes,
        summary.full_model_bytes,
        summary.base_model_bytes_downloaded,
    ) == (0, 0, 0)
    # Polled three times, backing off: 1 s, then 2 s (the fake's jitter is the mean).
    assert fake.sleeps == [1.0, 2.0]  # fmt: skip


def test_the_relay_backs_off_to_fifteen_seconds_with_jitter() -> None:
    draws = iter([0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    clock = Clock(random=lambda: next(draws))
    delays = list(itertools.islice(tasks.backoff(clock), 6))
    assert delays == [0.75, 2.5, 4.0, 8.0, 15.0, 15.0]


@pytest.mark.parametrize(
    ("case", "wrong", "reason"),
    [
        ("unsigned", lambda s: site_commit(s, key=None), "unsigned"),
        ("another key's", lambda s: site_commit(s, key=OTHER_KEY[0]), "mis-signed"),
        ("another round's", lambda s: (site_commit(s, round_=2), copy(s, 2, 3)), "replayed"),
    ],
)
def test_the_relay_does_not_take_a_commit_its_key_does_not_verify(
    file_store: st.FileStore, case: str, wrong: Callable[[st.Store], object], reason: str
) -> None:
    """Not success: the relay gives up with the reason, at once when the site has moved on to
    the next round (its commit is final then), else once it has stayed unverifiable past the
    grace with the site not training it (the table above)."""
    fake = FakeClock(at={1: lambda: (wrong(file_store), heartbeat(file_store, "waiting", 4))})
    with pytest.raises(SiteError, match=rf"^SiteUnverified: .*{reason}") as failed:
        run_relay(file_store, fake)
    assert failed.value.retry is False
    assert fake.t - START < GRACE


def copy(store: st.Store, source: int, target: int) -> None:
    for key in store.list(client_prefix(source, CLIENT) + "/"):
        moved = key.replace(client_prefix(source, CLIENT), client_prefix(target, CLIENT))
        store.put_bytes(moved, store.get_bytes(key))


def test_the_relay_waits_out_a_bad_commit_while_the_site_trains_and_takes_the_good_one(
    file_store: st.FileStore,
) -> None:
    good = FakeClock()
    good.at = {
        1: lambda: (site_commit(file_store, key=OTHER_KEY[0]), heartbeat(file_store, "training")),
        12: lambda: site_commit(file_store),
    }
    summary = run_relay(file_store, good)
    assert summary.round == 3
    assert good.t - START > GRACE  # it stayed unverified past the grace: the site was training


@pytest.mark.parametrize(
    ("note", "reason", "code"),
    [
        (lambda s: tasks.write_refusal(s, REFUSAL), "Refused: round 3: image not allowed", 2),
        (lambda s: heartbeat(s, "paused"), "SitePaused: ", 2),
        (lambda s: heartbeat(s, "left"), "SiteLeft: ", 2),
    ],
    ids=["refused", "paused", "left"],
)
def test_the_relay_fails_with_what_the_site_said(
    storage: Storage, note: Callable[[st.Store], object], reason: str, code: int
) -> None:
    store = storage.open()
    fake = FakeClock(at={3: lambda: note(store)})
    with pytest.raises(SiteError) as failed:
        run_relay(store, fake)
    assert failed.value.reason.startswith(reason)
    assert cli.exit_code(failed.value) == code
    assert cli.failure_reason(failed.value) == "error: " + failed.value.reason
    assert len(fake.sleeps) == 3  # it read the note at the poll after it was written


def test_a_silent_site_fails_its_relay_and_a_retry_may_help(file_store: st.FileStore) -> None:
    heartbeat(file_store, "waiting", round_=2, at=START - 10_000)  # before the task: not "since"
    fake = FakeClock()
    with pytest.raises(SiteError, match=r"^SiteSilent: no heartbeat for 60 s") as failed:
        run_relay(file_store, fake, silence=60)
    assert cli.exit_code(failed.value) == EXIT_FAILED
    assert 60 < fake.t - START <= 60 + tasks.MOST_DELAY * 1.25


def test_a_site_paused_before_the_task_is_taken_as_paused_after_a_grace(
    file_store: st.FileStore,
) -> None:
    """Not after the whole silence allowance: a paused site must not stall every round."""
    heartbeat(file_store, "paused", round_=2, at=START - 10_000)
    fake = FakeClock()
    with pytest.raises(SiteError, match=r"^SitePaused: .*since before the task") as failed:
        run_relay(file_store, fake, silence=900)
    assert cli.exit_code(failed.value) == EXIT_INVALID_INPUT
    assert relay.PAUSED_GRACE <= fake.t - START <= relay.PAUSED_GRACE + tasks.MOST_DELAY * 1.25


def test_heartbeats_keep_the_relay_waiting_past_the_silence_allowance(
    file_store: st.FileStore,
) -> None:
    fake = FakeClock()
    # The site's clock is an hour behind the run's: only the heartbeat's change counts.
    fake.at = {
        n: (lambda: heartbeat(file_store, "training", at=fake.t - 3600)) for n in range(1, 40)
    }
    fake.at[40] = lambda: site_commit(file_store)
    assert run_relay(file_store, fake, silence=30).round == 3
    assert fake.t - START > 30 * 10


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("", f"{TASK_SIGNING_KEY_ENV} is empty"),
        ("not a key", f"{TASK_SIGNING_KEY_ENV}: not an unencrypted PEM"),
        (SITE_KEY[1], f"{TASK_SIGNING_KEY_ENV}: not an unencrypted PEM"),
    ],
    ids=["missing", "garbage", "a public key"],
)
def test_a_relay_without_the_run_task_key_publishes_nothing_and_exits_2(
    file_store: st.FileStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    key: str,
    reason: str,
) -> None:
    log = tmp_path / "termination"
    monkeypatch.setenv(TERMINATION_LOG_ENV, str(log))
    monkeypatch.setenv(TASK_ENV, relay_task(file_store).model_dump_json(by_alias=True))
    monkeypatch.setenv(TASK_SIGNING_KEY_ENV, key)
    assert cli.main(["relay"]) == EXIT_INVALID_INPUT
    assert log.read_text().startswith(f"error: SettingError: {reason}")
    assert not file_store.holds_any()


# --------------------------------------------------------------------------------------------
# The watch
# --------------------------------------------------------------------------------------------


POLICY = SitePolicy(images=["registry.run.example/"], max_local_steps=100)


def watch_task(store: st.Store, after: int = 2, policy: SitePolicy = POLICY) -> WatchTask:
    return WatchTask(
        run="r",
        client=CLIENT,
        storage=StorageLocation(uri=store.uri),
        run_key=RUN_KEY[1],
        after_round=after,
        policy=policy,
    )


def run_watch(store: st.Store, fake: FakeClock, **kw: Any) -> WatchSummary:
    return watch.run(watch_task(store, **kw), store, fake.clock, quiet)


def commit_global(store: st.Store, round_: int) -> None:
    st.commit(store, global_prefix(round_), {"x": b"x"}, {"round": round_})


def test_the_watch_accepts_the_runs_task_and_reports_its_digest(storage: Storage) -> None:
    store = storage.open()
    fake = FakeClock(at={2: lambda: tasks.publish_task(store, remote(), run_signer())})
    summary = run_watch(store, fake)
    raw = store.get_bytes(task_key(3, CLIENT))
    assert summary == WatchSummary(
        client=CLIENT, outcome="task", round=3, task_sha256=hashlib.sha256(raw).hexdigest(),
        image=IMAGE, seconds=3.0,
    )  # fmt: skip
    assert parse_summary(dump_summary(summary)) == summary  # what the site's operator reads
    assert tasks.read_heartbeat(store, CLIENT) == Heartbeat(
        client=CLIENT, state="waiting", round=3, at=START + 3.0
    )  # fresh at every poll


def test_the_watch_skips_the_rounds_the_run_finished_while_the_site_was_away(
    file_store: st.FileStore,
) -> None:
    for round_ in (3, 4):
        tasks.publish_task(file_store, remote(round=round_), run_signer())
    commit_global(file_store, 3)  # round 3 is over: its task is history
    summary = run_watch(file_store, FakeClock())
    assert (summary.outcome, summary.round) == ("task", 4)


def test_the_watch_reports_the_runs_end(file_store: st.FileStore) -> None:
    def the_run_ends() -> None:
        commit_global(file_store, 3)
        st.commit(file_store, FINAL_PREFIX, {"x": b""}, {})

    fake = FakeClock(at={1: the_run_ends})
    summary = run_watch(file_store, fake)
    assert (summary.outcome, summary.round, summary.task_sha256) == ("finished", 3, None)


def copy_task_of(other: str) -> Callable[[st.Store], None]:
    """A genuine task of another client, copied with its signature to this one's key."""

    def publish(store: st.Store) -> None:
        tasks.publish_task(store, remote(client=other), run_signer())
        for suffix in ("", ".sig"):
            store.put_bytes(
                task_key(3, CLIENT) + suffix, store.get_bytes(task_key(3, other) + suffix)
            )

    return publish


@pytest.mark.parametrize(
    ("publish", "reason"),
    [
        (forge_unsigned, "the task does not verify: unsigned"),
        (forge_other_key, "the task does not verify: mis-signed"),
        (forge_tampered, "the task does not verify: mis-signed"),
        (
            lambda s: tasks.publish_task(s, remote(image="docker.io/evil/x:1"), run_signer()),
            "image 'docker.io/evil/x:1' is not in the site's policy",
        ),
        (
            copy_task_of("bank-c"),
            "the task does not verify: .*: a task for run 'r', round 3, client 'bank-c', found",
        ),
    ],
    ids=["unsigned", "another-key", "tampered", "outside-policy", "another-client's"],
)
def test_the_watch_refuses_a_task_and_the_relay_reads_why(
    storage: Storage, publish: Callable[[st.Store], object], reason: str
) -> None:
    store = storage.open()
    publish(store)
    with pytest.raises(SiteError, match=f"^Refused: round 3: {reason}") as refused:
        run_watch(store, FakeClock())
    assert cli.exit_code(refused.value) == EXIT_INVALID_INPUT
    refusal = tasks.read_refusal(store, CLIENT, 3)
    assert refusal is not None
    assert refused_round(refused.value.reason) == 3
    assert refusal.reason == refused.value.reason.removeprefix("Refused: round 3: ")
    fake = FakeClock()
    with pytest.raises(SiteError) as relayed:
        run_relay(store, fake)
    assert relayed.value.reason == refused.value.reason
    assert fake.sleeps == []  # the run learns it at its first poll


def test_a_paused_site_says_so_and_takes_no_task(file_store: st.FileStore) -> None:
    tasks.publish_task(file_store, remote(), run_signer())
    fake = FakeClock()
    with pytest.raises(SiteError, match=r"^SitePaused: ") as paused:
        run_watch(file_store, fake, policy=POLICY.model_copy(update={"paused": True}))
    assert cli.exit_code(paused.value) == EXIT_INVALID_INPUT
    beat_ = tasks.read_heartbeat(file_store, CLIENT)
    assert beat_ is not None
    assert beat_.state == "paused"
    assert fake.sleeps == []


# --------------------------------------------------------------------------------------------
# The site's client, and a whole remote round
# --------------------------------------------------------------------------------------------


def test_heartbeats_go_on_while_the_work_does_and_survive_a_failed_write() -> None:
    waits = iter([False, False, False, True])  # two periods pass, a third, then the work ends
    writes: list[int] = []

    def write() -> None:
        writes.append(1)
        if len(writes) == 2:
            raise OSError("storage hiccup")

    assert tasks.keep_beating(lambda _: next(waits), write, 30.0) == 2
    assert len(writes) == 3


def site_client_task(store: st.Store, sha: str, demo: Demo, round_: int = 3) -> SiteClientTask:
    return SiteClientTask(
        run="r", round=round_, client=CLIENT, storage=StorageLocation(uri=store.uri),
        run_key=RUN_KEY[1], task_sha256=sha, data_uri=str(demo.client_data(0)),
        privacy=LocalPrivacy(clip_norm=10.0),
    )  # fmt: skip


def test_the_site_client_refuses_a_task_other_than_the_one_its_watch_accepted(
    file_store: st.FileStore, demo: Demo
) -> None:
    tasks.publish_task(file_store, remote(), run_signer())
    accepted = run_watch(file_store, FakeClock())
    tasks.publish_task(file_store, remote(image=IMAGE[:-1] + "b"), run_signer())  # rewritten
    task = site_client_task(file_store, accepted.task_sha256 or "", demo)
    with pytest.raises(SiteError, match=r"^Refused: round 3: the task changed after the site"):
        site_client.run(task, file_store, FakeClock().clock, quiet)
    refusal = tasks.read_refusal(file_store, CLIENT, 3)
    assert refusal is not None
    assert "changed" in refusal.reason
    assert not file_store.holds_any(client_prefix(3, CLIENT))  # nothing trained


def test_a_remote_round_end_to_end_with_real_keys(
    demo: Demo, file_store: st.FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's relay publishes round 1's task; while it waits, the site's watch accepts it and
    the site's client trains it on the tiny model and commits it signed; the relay reports the
    commit, the run's aggregator merges it under the pinned key, and the site's next watch sees
    the run finished."""
    monkeypatch.setenv(SIGNING_KEY_ENV, SITE_KEY[0].decode())
    aggregate.run(init_task(demo, file_store).model_copy(update={"run": "r"}), file_store, quiet)
    task = relay_task(
        file_store, round=1, base_model=str(demo.model), adapter=ADAPTER, training=TRAINING,
        data={"format": "chat"}, delta=DeltaSpec(dtype="fp32"),
    )  # fmt: skip
    site: dict[str, Any] = {}

    def the_site() -> None:
        site["watch"] = run_watch(file_store, FakeClock(), after=0)
        sha = site["watch"].task_sha256
        site_task = site_client_task(file_store, sha, demo, round_=1)
        site["client"] = site_client.run(site_task, file_store, FakeClock().clock, quiet)

    fake = FakeClock(at={1: the_site})
    relayed = relay.run(task, file_store, run_signer(), fake.clock, quiet)

    assert site["watch"].outcome == "task"
    trained: ClientSummary = site["client"]
    same = (
        "round",
        "client",
        "samples",
        "steps",
        "train_loss",
        "bytes_sent",
        "raw_bytes",
        "sha256",
    )
    assert {f: getattr(relayed, f) for f in same} == {f: getattr(trained, f) for f in same}
    assert tasks.read_heartbeat(file_store, CLIENT).state == "waiting"  # type: ignore[union-attr]

    merge = AggregateTask(
        run="r", round=1, base_model=str(demo.model), adapter=ADAPTER,
        storage=StorageLocation(uri=file_store.uri), rounds=1, clients=[CLIENT],
        delta=DeltaSpec(dtype="fp32"), client_keys={CLIENT: SITE_KEY[1]},
    )  # fmt: skip
    record = aggregate.run(merge, file_store, quiet).record
    assert (record.accepted, record.rejected) == (1, 0)
    assert record.contributions[0].sha256 == relayed.sha256
    finished = run_watch(file_store, FakeClock(), after=1)
    assert (finished.outcome, finished.round) == ("finished", 1)
