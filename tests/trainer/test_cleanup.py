"""storage.cleanupPolicy Delete deletes only a root that is the run's: round 0 marks an empty root
with the run's UID (marker.claim_root), and `fedtune-trainer cleanup` refuses, deleting nothing,
anything else: a prefix without the marker, a whole bucket, another run's marker (on the real S3
server, through the CLI as the cleanup Job runs it)."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from devcluster.s3 import S3Account
from fedtune_trainer import aggregate
from fedtune_trainer.storage import marker as run_marker
from fedtune_trainer.storage import store as st
from fedtune_trainer.storage.locate import open_store
from fedtune_trainer.wire.errors import SettingError
from fedtune_trainer.wire.layout import RUN_MARKER, global_prefix
from fedtune_trainer.wire.settings import AdapterSpec, StorageLocation
from fedtune_trainer.wire.task import AggregateTask, CleanupTask
from tests.trainer.support import Demo, Storage

OURS, THEIRS = "0c0ffee0-0000-4000-8000-00000000000a", "0c0ffee0-0000-4000-8000-00000000000b"


def marker(run: str, uid: str) -> bytes:
    return json.dumps({"kind": "fedtune.run", "run": run, "uid": uid}).encode()


# ---------------------------------------------------------------------------------------------
# The cleanup Job, on the real S3 server
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def bucket(s3: S3Account) -> str:
    """A bucket holding a run's root with its marker, another run's, a sibling whose name starts
    with the run's, data of nobody's, and a marker of our run at the bucket root itself."""
    name = f"cleanup-{uuid.uuid4().hex[:10]}"
    s3.bucket(name)
    client = s3.client()
    objects = {
        f"runs/ours/{RUN_MARKER}": marker("ours", OURS),
        "runs/ours/rounds/000000/global/manifest.json": b"{}",
        "runs/ours/final/adapter_model.safetensors": b"w",
        "runs/ours2/keep": b"a sibling whose name starts with the run's",
        f"runs/theirs/{RUN_MARKER}": marker("theirs", THEIRS),
        "runs/theirs/final/adapter_model.safetensors": b"w",
        "data/client-0.jsonl": b"{}",
        RUN_MARKER: marker("ours", OURS),
    }
    for key, body in objects.items():
        client.put_object(Bucket=name, Key=key, Body=body)
    return name


def keys(s3: S3Account, bucket: str) -> list[str]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def cleanup(s3: S3Account, uri: str, tmp_path: Path, env: dict[str, str]) -> tuple[int, str]:
    task = CleanupTask(run="ours", run_uid=OURS, storage=StorageLocation(uri=uri))
    log = tmp_path / "termination-log"
    proc = subprocess.run(
        ["fedtune-trainer", "cleanup"],
        env={**env, **s3.env(), "FEDTUNE_TASK": json.dumps(task.wire()),
             "FEDTUNE_TERMINATION_LOG": str(log)},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    return proc.returncode, log.read_text()


@pytest.mark.parametrize(
    ("root", "why"),
    [
        ("data", "holds no fedtune-run.json, so it is not known to be this run's"),
        ("", "is a whole bucket (or filesystem root); cleanup never deletes one"),
        ("runs/theirs", f"belongs to run theirs (uid {THEIRS}), not this run (uid {OURS})"),
        ("runs", "holds no fedtune-run.json"),
    ],
    ids=["foreign-prefix", "bucket-root", "another-runs-marker", "parent-of-runs"],
)
def test_cleanup_refuses_a_root_that_is_not_the_runs_and_deletes_nothing(
    s3: S3Account,
    bucket: str,
    tmp_path: Path,
    subprocess_env: dict[str, str],
    root: str,
    why: str,
) -> None:
    before = keys(s3, bucket)
    uri = f"s3://{bucket}/{root}" if root else f"s3://{bucket}"
    code, reason = cleanup(s3, uri, tmp_path, subprocess_env)
    assert code == 2  # no retry can make it the run's: the Job fails at once
    assert reason.startswith(f"error: SettingError: storage.uri: {uri} ")
    assert why in reason
    assert "nothing deleted" in reason or "never deletes" in reason
    assert keys(s3, bucket) == before


def test_cleanup_deletes_the_runs_own_root_and_nothing_else(
    s3: S3Account, bucket: str, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    before = keys(s3, bucket)
    code, summary = cleanup(s3, f"s3://{bucket}/runs/ours", tmp_path, subprocess_env)
    assert code == 0, summary
    assert json.loads(summary)["deleted"] == 3
    assert keys(s3, bucket) == [k for k in before if not k.startswith("runs/ours/")]
    assert "runs/ours2/keep" in keys(s3, bucket)


# ---------------------------------------------------------------------------------------------
# Round 0's marker (marker.claim_root), on a local root and the real S3 server
# ---------------------------------------------------------------------------------------------


def nothing(store: st.Store) -> None:
    pass


def theirs(store: st.Store) -> None:
    store.put_bytes(RUN_MARKER, marker("theirs", THEIRS))


def ours(store: st.Store) -> None:
    store.put_bytes(RUN_MARKER, marker("ours", OURS))


def data(store: st.Store) -> None:
    store.put_bytes("client-0.jsonl", b"{}")


def garbage(store: st.Store) -> None:
    store.put_bytes(RUN_MARKER, b"not json")


@pytest.mark.parametrize(
    ("before", "required", "claimed", "refusal"),
    [
        (nothing, True, True, None),
        (ours, True, True, None),
        (theirs, True, False, f"belongs to run theirs (uid {THEIRS})"),
        (theirs, False, False, None),
        (data, True, False, "already holds objects and no run's marker"),
        (data, False, False, None),
        (garbage, True, False, "belongs to run ? (uid unreadable)"),
    ],
    ids=[
        "empty",
        "already-ours",
        "another-run-delete",
        "another-run-retain",
        "unmarked-objects-delete",
        "unmarked-objects-retain",
        "unreadable-marker",
    ],
)
def test_round_zero_marks_an_empty_root_and_never_takes_one_over(
    storage: Storage,
    before: Callable[[st.Store], None],
    required: bool,
    claimed: bool,
    refusal: str | None,
) -> None:
    store = storage.open()
    before(store)
    listing = {k: store.get_bytes(k) for k in store.list()}
    said: list[str] = []
    if refusal is not None:
        with pytest.raises(SettingError, match="cleanupPolicy Delete would delete them") as e:
            run_marker.claim_root(store, "ours", OURS, required=required, log=said.append)
        assert str(e.value).startswith(f"storage.uri: {store.uri} ")
        assert refusal in str(e.value)
    else:
        assert (
            run_marker.claim_root(store, "ours", OURS, required=required, log=said.append)
            is claimed
        )
    if claimed:
        assert json.loads(store.get_bytes(RUN_MARKER)) == {
            "kind": "fedtune.run", "run": "ours", "uid": OURS
        }  # fmt: skip
        run_marker.check_owned(store, OURS)  # what cleanup then accepts
    else:
        # Nothing written over or beside what was there, and cleanup would refuse it.
        assert {k: store.get_bytes(k) for k in store.list()} == listing
        with pytest.raises(SettingError):
            run_marker.check_owned(store, OURS)
        if refusal is None:
            assert any("its storage cleanup would refuse" in line for line in said)


def test_a_run_without_a_uid_marks_nothing(file_store: st.FileStore) -> None:
    assert run_marker.claim_root(file_store, "ours", None, required=True, log=print) is False
    assert file_store.list() == []


def round_zero(demo: Demo, store: st.Store, **kw: object) -> AggregateTask:
    return AggregateTask(
        run="ours", round=0, rounds=1, base_model=str(demo.model),
        adapter=AdapterSpec(r=4, alpha=8, dropout=0.0), storage=StorageLocation(uri=store.uri),
        **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_the_round_zero_aggregator_marks_the_root_with_the_runs_uid(
    demo: Demo, file_store: st.FileStore
) -> None:
    aggregate.run(round_zero(demo, file_store, run_uid=OURS, cleanup_policy="Delete"), file_store,
                  lambda _: None)  # fmt: skip
    assert json.loads(file_store.get_bytes(RUN_MARKER))["uid"] == OURS
    run_marker.check_owned(open_store(file_store.uri), OURS)


def test_round_zero_of_a_delete_run_refuses_another_runs_root_before_writing(
    demo: Demo, file_store: st.FileStore
) -> None:
    theirs(file_store)
    task = round_zero(demo, file_store, run_uid=OURS, cleanup_policy="Delete")
    with pytest.raises(SettingError, match=f"belongs to run theirs \\(uid {THEIRS}\\)"):
        aggregate.run(task, file_store, lambda _: None)
    assert file_store.list() == [RUN_MARKER]
    assert not file_store.exists(f"{global_prefix(0)}/manifest.json")
