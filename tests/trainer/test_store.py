"""Object storage: the same behaviour from file:// and from a real S3 server; crash-safe commits."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from fedtune_trainer.storage import s3
from fedtune_trainer.storage import store as st
from fedtune_trainer.storage.locate import fetch, open_store
from fedtune_trainer.storage.s3 import S3Store
from fedtune_trainer.wire.settings import StorageLocation
from tests.trainer.support import Storage


def test_put_get_list_delete(storage: Storage, tmp_path: Path) -> None:
    s = storage.open()
    s.put_bytes("a/b/one.bin", b"1")
    s.put_bytes("a/b/two.bin", b"22")
    s.put_bytes("a/c.bin", b"333")
    s.put_bytes("ab.bin", b"4")
    assert s.get_bytes("a/b/two.bin") == b"22"
    assert s.list("a/") == ["a/b/one.bin", "a/b/two.bin", "a/c.bin"]
    assert s.list("a") == ["a/b/one.bin", "a/b/two.bin", "a/c.bin", "ab.bin"]  # a string prefix
    assert s.list("a/b/") == ["a/b/one.bin", "a/b/two.bin"]
    assert s.list("nothing/") == []
    assert s.exists("a/c.bin")
    assert not s.exists("a/zzz")
    with pytest.raises(st.ObjectNotFound):
        s.get_bytes("a/zzz")
    with pytest.raises(st.ObjectNotFound):
        s.get_file("a/zzz", tmp_path / "x")

    src = tmp_path / "big.bin"
    src.write_bytes(bytes(range(256)) * 4096)
    s.put_file("files/big.bin", src)
    s.get_file("files/big.bin", tmp_path / "out" / "big.bin")
    assert (tmp_path / "out" / "big.bin").read_bytes() == src.read_bytes()

    s.put_bytes("a/c.bin", b"overwritten")
    assert s.get_bytes("a/c.bin") == b"overwritten"
    assert s.delete_prefix("a/") == 3
    assert s.list("") == ["ab.bin", "files/big.bin"]
    s.delete("ab.bin")
    s.delete("ab.bin")  # idempotent
    assert s.list("") == ["files/big.bin"]


def test_s3_multipart_upload_round_trips(storage: Storage, tmp_path: Path) -> None:
    """Above the threshold boto3 switches to a multipart upload (file:// just copies)."""
    if storage.uri.startswith("s3://"):
        bucket, prefix = s3.split_s3(storage.uri)
        s = s3.S3Store(
            bucket, prefix, st.S3Settings(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
        )
    else:
        s = storage.open()
    data = bytes(range(251)) * (12 << 20 // 251)  # about 12 MiB, three parts
    s.put_bytes("multi/blob", data)
    assert s.get_bytes("multi/blob") == data


def test_commit_then_read_verifies_every_file(storage: Storage, tmp_path: Path) -> None:
    s = storage.open()
    local = tmp_path / "w.bin"
    local.write_bytes(b"weights" * 1000)
    manifest = st.commit(s, "obj", {"a.json": b"{}", "w.bin": local}, {"kind": "test", "round": 3})
    assert manifest["kind"] == "test"
    assert manifest["round"] == 3
    assert manifest["files"]["w.bin"]["bytes"] == 7000
    got, files = st.read_committed(s, "obj")
    assert got == manifest
    assert files == {"a.json": b"{}", "w.bin": b"weights" * 1000}
    assert st.fetch_committed(s, "obj", tmp_path / "dl") == manifest
    assert (tmp_path / "dl" / "w.bin").read_bytes() == b"weights" * 1000
    assert s.list("obj/") == ["obj/a.json", "obj/manifest.json", "obj/w.bin"]


@pytest.mark.parametrize(
    ("tamper", "error", "message"),
    [
        (lambda s: s.put_bytes("obj/data.bin", b"0123456789"[:4]), st.IntegrityError, "truncated"),
        (lambda s: s.put_bytes("obj/data.bin", b"0123456789abc"), st.IntegrityError, "oversized"),
        (lambda s: s.put_bytes("obj/data.bin", b"0123456788"), st.IntegrityError, "checksum"),
        (lambda s: s.delete("obj/data.bin"), st.IntegrityError, "missing"),
        (lambda s: s.delete("obj/manifest.json"), st.ObjectNotFound, "no committed"),
        (lambda s: s.put_bytes("obj/manifest.json", b"{not json"), st.IntegrityError, "not JSON"),
        (lambda s: s.put_bytes("obj/manifest.json", b'{"files": {}}'), st.IntegrityError, "not a"),
    ],
)
def test_tampered_commits_are_not_trusted(
    file_store: st.FileStore, tmp_path: Path, tamper: object, error: type, message: str
) -> None:
    st.commit(file_store, "obj", {"data.bin": b"0123456789"}, {})
    tamper(file_store)  # type: ignore[operator]
    with pytest.raises(error, match=message):
        st.read_committed(file_store, "obj")
    with pytest.raises(error, match=message):
        st.fetch_committed(file_store, "obj", tmp_path / "dl")


def test_a_crashed_recommit_leaves_no_manifest_vouching_for_new_data(
    file_store: st.FileStore,
) -> None:
    """commit() removes the old manifest before writing data: a crash mid-way means 'nothing'."""
    st.commit(file_store, "obj", {"data.bin": b"old"}, {"v": 1})

    class Crash(Exception):
        pass

    real_put = file_store.put_bytes

    def crash_on_manifest(key: str, data: bytes) -> None:
        if key.endswith(st.MANIFEST):
            raise Crash
        real_put(key, data)

    file_store.put_bytes = crash_on_manifest  # type: ignore[method-assign]
    with pytest.raises(Crash):
        st.commit(file_store, "obj", {"data.bin": b"new!"}, {"v": 2})
    file_store.put_bytes = real_put  # type: ignore[method-assign]
    assert st.read_manifest(file_store, "obj") is None
    st.commit(file_store, "obj", {"data.bin": b"new!"}, {"v": 2})
    assert st.read_committed(file_store, "obj")[1] == {"data.bin": b"new!"}


def test_file_store_writes_are_atomic_renames(file_store: st.FileStore) -> None:
    file_store.put_bytes("x/y.bin", b"data")
    leftovers = [p for p in file_store.root.rglob("*") if p.name.startswith(".fedtune-tmp-")]
    assert leftovers == []
    with pytest.raises(ValueError, match="invalid key"):
        file_store.put_bytes("../escape", b"")


def test_versioned_state_reads_the_newest_before_a_round(storage: Storage) -> None:
    s = storage.open()
    for r in (1, 2, 4):
        st.commit(s, st.versioned_prefix("state/x", r), {"v": str(r).encode()}, {"round": r})
    s.put_bytes(st.join(st.versioned_prefix("state/x", 5), "v"), b"uncommitted")
    assert st.committed_versions(s, "state/x") == [1, 2, 4]
    assert st.latest_version_before(s, "state/x", 4) == 2  # a rerun of 4 reads what 4 read
    assert st.latest_version_before(s, "state/x", 5) == 4
    assert st.latest_version_before(s, "state/x", 1) is None
    st.prune_versions_before(s, "state/x", 2)
    assert st.committed_versions(s, "state/x") == [2, 4]


@pytest.mark.parametrize(
    ("uri", "kind", "expected"),
    [
        ("file:///tmp/run", st.FileStore, "file:///tmp/run"),
        ("/tmp/run", st.FileStore, "file:///tmp/run"),
        ("s3://bucket/runs/a/", s3.S3Store, "s3://bucket/runs/a"),
        ("s3://bucket", s3.S3Store, "s3://bucket"),
    ],
)
def test_open_store_picks_the_backend(uri: str, kind: type, expected: str) -> None:
    s = open_store(StorageLocation(uri=uri, endpoint="http://127.0.0.1:9"))
    assert isinstance(s, kind)
    assert s.uri == expected


@pytest.mark.parametrize("uri", ["http://example.com/x", "gs://bucket/x", "file://remote/x"])
def test_open_store_rejects_other_schemes(uri: str) -> None:
    with pytest.raises(ValueError, match=r"unsupported|local"):
        open_store(uri)


def test_s3_store_takes_endpoint_and_addressing_from_the_location(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    loc = StorageLocation(uri="s3://b/p", endpoint="http://127.0.0.1:9", region="eu-west-3")
    s = open_store(loc)
    assert isinstance(s, s3.S3Store)
    assert s.client.meta.endpoint_url == "http://127.0.0.1:9"
    assert s.client.meta.region_name == "eu-west-3"
    assert s.client.meta.config.s3["addressing_style"] == "path"
    assert s.client.meta.config.retries["mode"] == "standard"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8")
    assert open_store("s3://b/p").client.meta.endpoint_url == "http://127.0.0.1:8"


def test_fetch_downloads_an_s3_directory_once(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    s = storage.open()
    s.put_bytes("model/config.json", json.dumps({"a": 1}).encode())
    s.put_bytes("model/sub/weights.bin", b"w")
    s.put_bytes("data/train.jsonl", b'{"text": "x"}\n')
    directory = fetch(s.url("model"))
    assert (directory / "config.json").read_text() == '{"a": 1}'
    assert (directory / "sub" / "weights.bin").read_bytes() == b"w"
    single = fetch(s.url("data/train.jsonl"))
    assert single.read_bytes() == b'{"text": "x"}\n'
    assert fetch(s.url("model")) == directory  # the same version, reused (test_cache.py)
    with pytest.raises(FileNotFoundError):
        fetch(s.url("nothing-here") + "/")


def test_concurrent_fetches_share_one_cache_safely(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clients of one round start together and share a node's cache: nobody sees half a model."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("FEDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    s = storage.open()
    files = {f"model/part-{i}.bin": bytes([i]) * 200_000 for i in range(6)}
    for key, data in files.items():
        s.put_bytes(key, data)
    with ThreadPoolExecutor(4) as pool:
        dirs = list(pool.map(lambda _: fetch(s.url("model")), range(8)))
    assert len(set(dirs)) == 1
    for key, data in files.items():
        assert (dirs[0] / key.removeprefix("model/")).read_bytes() == data
    leftovers = (
        [p.name for p in (tmp_path / "cache").iterdir()] if storage.uri.startswith("s3") else []
    )
    assert len(leftovers) <= 1


# ------------------------------------------------------------------------------------------
# Bounded reads of untrusted objects
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1000, 3 << 20])
def test_bounded_reads_stop_at_the_limit(storage: Storage, tmp_path: Path, size: int) -> None:
    """Up to the limit an object reads whole; one byte past it, the read stops and no partial
    file is left behind."""
    s = storage.open()
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    s.put_bytes("obj", data)
    assert s.get_bytes("obj", max_bytes=size) == data
    s.get_file("obj", tmp_path / "ok", max_bytes=size)
    assert (tmp_path / "ok").read_bytes() == data
    if size:
        with pytest.raises(st.ObjectTooLarge, match=rf"oversized: more than {size - 1} bytes"):
            s.get_bytes("obj", max_bytes=size - 1)
        with pytest.raises(st.ObjectTooLarge, match=rf"oversized: more than {size - 1} bytes"):
            s.get_file("obj", tmp_path / "cut", max_bytes=size - 1)
        assert not (tmp_path / "cut").exists()
    with pytest.raises(st.ObjectNotFound):
        s.get_bytes("missing", max_bytes=10)
    with pytest.raises(st.ObjectNotFound):
        s.get_file("missing", tmp_path / "m", max_bytes=10)


def test_ranged_reads(storage: Storage) -> None:
    s = storage.open()
    s.put_bytes("obj", bytes(range(100)))
    assert s.get_range("obj", 0, 8) == bytes(range(8))
    assert s.get_range("obj", 90, 50) == bytes(range(90, 100))  # short at the end
    assert s.get_range("obj", 200, 8) == b""  # past the end
    assert s.get_range("obj", 5, 0) == b""
    with pytest.raises(st.ObjectNotFound):
        s.get_range("missing", 0, 8)


def test_a_huge_manifest_is_not_read_whole(storage: Storage) -> None:
    s = storage.open()
    s.put_bytes("c/manifest.json", b"{" + b" " * (st.MANIFEST_MAX_BYTES + 10) + b"}")
    with pytest.raises(st.IntegrityError, match="oversized: more than 1048576 bytes"):
        st.read_manifest(s, "c")


@pytest.mark.integration
def test_a_refused_delete_is_an_error_not_a_silent_leftover(s3) -> None:
    """DeleteObjects answers 200 and lists each refused key among its Errors: the store reads
    them, so a cleanup or a delta deletion the server refuses fails loudly."""

    bucket = s3.bucket(f"refused-{uuid.uuid4().hex[:8]}").removeprefix("s3://")
    reader = s3.create_user(f"reader{uuid.uuid4().hex[:8]}")
    s3.put_bucket_policy(
        bucket,
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": reader.name,
                    "Action": ["s3:ListBucket", "s3:GetObject"],
                    "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
                }
            ],
        },
    )

    def store(account) -> S3Store:
        keys = {"access_key_id": account.access_key, "secret_access_key": account.secret_key}
        return S3Store(bucket, "run", st.S3Settings(endpoint=s3.endpoint, **keys))

    owner, limited = store(s3), store(reader)
    owner.put_bytes("a/x", b"1")
    owner.put_bytes("a/y", b"2")
    with pytest.raises(PermissionError, match=r"AccessDenied \(2 of 2 objects not deleted\)"):
        limited.delete_prefix("a/")
    assert sorted(owner.list("a/")) == ["a/x", "a/y"]


@pytest.mark.parametrize("name", ["../escaped", "a/b", "..", "/etc/passwd"])
def test_fetching_a_commit_never_writes_outside_its_destination(tmp_path: Path, name: str) -> None:
    """fedtune-trainer report fetches report/ from a bucket that others may write to: a file
    name in a manifest is a name, never a path."""
    store = st.FileStore(tmp_path / "store")
    st.commit(store, "report", {"report.html": b"<html>"}, {})
    manifest = json.loads(store.get_bytes("report/manifest.json"))
    manifest["files"][name] = manifest["files"].pop("report.html")
    store.put_bytes("report/manifest.json", json.dumps(manifest).encode())
    with pytest.raises(st.IntegrityError, match="the manifest names"):
        st.fetch_committed(store, "report", tmp_path / "out" / "dest")
    assert not (tmp_path / "out" / "escaped").exists()
