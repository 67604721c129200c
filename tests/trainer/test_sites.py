"""Sites: what a run and a data owner's own cluster say to each other through storage.

A site runs only tasks the run signed, addressed to it, within its own policy; it turns them into
its own client's task with data and privacy that never leave it. Each rule below can refuse.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from fedtune_trainer.aggregation.bounds import l2_norm
from fedtune_trainer.aggregation.privacy import privatise_at_client
from fedtune_trainer.storage import signing, tasks
from fedtune_trainer.storage import store as st
from fedtune_trainer.wire.layout import TASK_SIGNATURE_SUFFIX, heartbeat_key, task_key
from fedtune_trainer.wire.settings import LocalPrivacy, StorageLocation, TrainingSpec
from fedtune_trainer.wire.site import (
    Heartbeat,
    Refusal,
    RemoteTask,
    SitePolicy,
    image_allowed,
    policy_refusals,
)
from fedtune_trainer.wire.task import ClientTask, site_client_task
from tests.trainer.support import Storage

RUN_KEY, OTHER_KEY = signing.generate(), signing.generate()  # (private PEM, public text)
IMAGE = "registry.run.example/fedtune-trainer@sha256:" + "a" * 64


def remote(**overrides: Any) -> RemoteTask:
    fields: dict[str, Any] = {
        "run": "r",
        "run_uid": "0b6c7c3e-1f1a-4c1e-9a53-2c1d6f0f0a11",
        "round": 3,
        "client": "bank-b",
        "image": IMAGE,
        "base_model": "s3://models/smollm2",
        "training": TrainingSpec(local_steps=20),
    }
    return RemoteTask.model_validate(fields | overrides)


POLICY = SitePolicy(images=["registry.run.example/"], max_rounds=10, max_local_steps=100)


@pytest.mark.parametrize(
    ("image", "allowed", "ok"),
    [
        (IMAGE, [IMAGE], True),
        (IMAGE, ["registry.run.example/fedtune-trainer@sha256:" + "b" * 64], False),
        (IMAGE, ["registry.run.example/"], True),
        (IMAGE, ["registry.run.example/fedtune-trainer:"], False),  # a tag prefix; this is a digest
        (
            "registry.run.example/fedtune-trainer:1.2",
            ["registry.run.example/fedtune-trainer:"],
            True,
        ),
        # A prefix must end at a boundary, or it admits whatever extends the name.
        ("registry.run.example.evil.com/x:1", ["registry.run.example"], False),
        ("registry.run.example.evil.com/x:1", ["registry.run.example/"], False),
        (IMAGE, [], False),
    ],
)
def test_a_site_runs_only_the_images_its_policy_names(
    image: str, allowed: list[str], ok: bool
) -> None:
    assert image_allowed(image, allowed) is ok


@pytest.mark.parametrize(
    ("task", "contributed", "reason"),
    [
        (remote(), 0, None),
        (remote(client="bank-c"), 0, "the task is for client 'bank-c'"),
        (remote(run="other"), 0, "the task is for run 'other'"),
        (remote(image="docker.io/evil/trainer:latest"), 0, "is not in the site's policy"),
        (remote(), 10, "at most 10 rounds and gave 10"),
        (remote(training=TrainingSpec(local_steps=101)), 0, "101 local steps; the site allows"),
        (remote(training=TrainingSpec(local_epochs=1)), 0, "an epoch-based round"),
    ],
)
def test_a_task_outside_the_site_policy_is_refused_with_the_reason(
    task: RemoteTask, contributed: int, reason: str | None
) -> None:
    refusals = policy_refusals(task, POLICY, "bank-b", "r", contributed)
    if reason is None:
        assert refusals == []
    else:
        assert len(refusals) == 1
        assert reason in refusals[0]


def test_the_site_client_task_adds_what_never_leaves_the_site() -> None:
    privacy = LocalPrivacy(clip_norm=1.0, noise_multiplier=0.5)
    storage = StorageLocation(uri="s3://fed/runs/r", endpoint="https://s3.site.example")
    got = site_client_task(remote(), "s3://bank-b-private/train.jsonl", storage, privacy)
    assert isinstance(got, ClientTask)
    assert (got.run, got.round, got.client) == ("r", 3, "bank-b")
    assert got.data_uri == "s3://bank-b-private/train.jsonl"
    assert got.storage == storage
    assert got.sign is True
    assert got.local_privacy == privacy
    assert got.training.local_steps == 20


def test_local_privacy_refuses_scaffold_whose_control_variates_it_would_not_cover() -> None:
    with pytest.raises(ValueError, match="SCAFFOLD"):
        site_client_task(
            remote(training=TrainingSpec(local_steps=2, drift_control="scaffold")),
            "file:///d.jsonl",
            StorageLocation(uri="file:///s"),
            LocalPrivacy(clip_norm=1.0),
        )


# --------------------------------------------------------------------------------------------
# Signed tasks in storage
# --------------------------------------------------------------------------------------------


def run_signer() -> Any:
    return signing.signer(signing.load_private(RUN_KEY[0]), signing.TASK_DOMAIN)


def read(store: st.Store, public: str = RUN_KEY[1], round_: int = 3) -> RemoteTask | None:
    verify = signing.verifier(public, signing.TASK_DOMAIN)
    return tasks.read_task(store, round_, "bank-b", "r", verify)


def test_a_task_the_run_signed_reads_back_as_written(storage: Storage) -> None:
    store = storage.open()
    assert read(store) is None  # none yet: the site keeps waiting
    tasks.publish_task(store, remote(), run_signer())
    assert read(store) == remote()


def forge_unsigned(store: st.Store) -> None:
    tasks.publish_task(store, remote(), run_signer())
    store.delete(task_key(3, "bank-b") + TASK_SIGNATURE_SUFFIX)


def forge_other_key(store: st.Store) -> None:
    other = signing.signer(signing.load_private(OTHER_KEY[0]), signing.TASK_DOMAIN)
    tasks.publish_task(store, remote(), other)


def forge_manifest_domain(store: st.Store) -> None:
    """The run's own key, but a manifest signature: another domain, never a task's."""
    tasks.publish_task(store, remote(), signing.signer(signing.load_private(RUN_KEY[0])))


def forge_tampered(store: st.Store) -> None:
    tasks.publish_task(store, remote(), run_signer())
    raw = store.get_bytes(task_key(3, "bank-b")).replace(IMAGE.encode(), b"docker.io/evil/x:1")
    store.put_bytes(task_key(3, "bank-b"), raw)


@pytest.mark.parametrize(
    "forge",
    [forge_unsigned, forge_other_key, forge_manifest_domain, forge_tampered],
    ids=["unsigned", "another-key", "manifest-domain", "tampered"],
)
def test_a_task_not_signed_by_the_run_is_refused(file_store: st.FileStore, forge: Any) -> None:
    forge(file_store)
    with pytest.raises(signing.SignatureError):
        read(file_store)


def test_a_genuine_task_copied_to_another_round_is_refused(file_store: st.FileStore) -> None:
    tasks.publish_task(file_store, remote(), run_signer())
    for suffix in ("", TASK_SIGNATURE_SUFFIX):
        file_store.put_bytes(
            task_key(4, "bank-b") + suffix, file_store.get_bytes(task_key(3, "bank-b") + suffix)
        )
    with pytest.raises(tasks.TaskError, match="round 3"):
        read(file_store, round_=4)


def test_a_task_larger_than_any_task_is_not_read(file_store: st.FileStore) -> None:
    file_store.put_bytes(task_key(3, "bank-b"), b"{" * (tasks.TASK_MAX_BYTES + 1))
    with pytest.raises(st.ObjectTooLarge):
        read(file_store)


def test_heartbeats_and_refusals_read_back_and_garbage_reads_as_silence(
    file_store: st.FileStore,
) -> None:
    beat = Heartbeat(client="bank-b", state="training", round=3, at=1.5)
    tasks.write_heartbeat(file_store, beat)
    assert tasks.read_heartbeat(file_store, "bank-b") == beat
    refusal = Refusal(client="bank-b", round=3, reason="image not allowed", at=2.0)
    tasks.write_refusal(file_store, refusal)
    assert tasks.read_refusal(file_store, "bank-b", 3) == refusal
    assert tasks.read_refusal(file_store, "bank-b", 4) is None
    file_store.put_bytes(heartbeat_key("bank-b"), b"not json")
    assert tasks.read_heartbeat(file_store, "bank-b") is None
    # Another client's heartbeat copied under this one's key does not count for it.
    file_store.put_bytes(
        heartbeat_key("bank-b"),
        beat.model_copy(update={"client": "bank-c"}).model_dump_json(by_alias=True).encode(),
    )
    assert tasks.read_heartbeat(file_store, "bank-b") is None


# --------------------------------------------------------------------------------------------
# The site's privacy, on its delta
# --------------------------------------------------------------------------------------------


def delta(scale: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {n: torch.randn(64, 32, generator=gen) * scale for n in ("a", "b")}


@pytest.mark.parametrize(("scale", "clip"), [(1.0, 2.0), (1.0, 100.0), (0.01, 2.0)])
def test_local_clipping_bounds_the_delta_norm_and_leaves_a_small_delta_alone(
    scale: float, clip: float
) -> None:
    d = delta(scale)
    before = l2_norm(d)
    norm = privatise_at_client(d, LocalPrivacy(clip_norm=clip))
    assert norm == pytest.approx(before)
    assert l2_norm(d) == pytest.approx(min(before, clip), rel=1e-6)


def test_local_noise_has_the_std_the_site_asked_for() -> None:
    d = {n: torch.zeros(256, 256) for n in ("a", "b")}
    privatise_at_client(d, LocalPrivacy(clip_norm=0.5, noise_multiplier=2.0))
    values = torch.cat([t.reshape(-1) for t in d.values()]).double()
    # 131,072 draws: the sample std is within 1% of 1.0 with overwhelming probability.
    assert float(values.std()) == pytest.approx(1.0, rel=0.01)
    assert abs(float(values.mean())) < 5 / math.sqrt(values.numel())
    again = {n: torch.zeros(256, 256) for n in ("a", "b")}
    privatise_at_client(again, LocalPrivacy(clip_norm=0.5, noise_multiplier=2.0))
    assert not torch.equal(again["a"], d["a"])  # fresh from the OS each time: nothing to replay
