"""The download cache against the real S3 server: reuse, invalidation by ETag, atomic fills."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from devcluster.s3 import S3Account
from fedtune_trainer.storage import cache
from fedtune_trainer.storage import store as st
from fedtune_trainer.storage.s3 import S3Store

pytestmark = pytest.mark.integration

MODEL = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": bytes(range(256)) * 800,
    "tokenizer/tokenizer.json": b'{"version": "1.0"}',
}


@pytest.fixture
def bucket(s3: S3Account, monkeypatch: pytest.MonkeyPatch) -> S3Store:
    """A fresh bucket holding MODEL under models/m/, with AWS_* set as in a Job."""
    name = s3.bucket(f"cache-{uuid.uuid4().hex[:12]}").removeprefix("s3://")
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    store = S3Store(name, "", st.S3Settings())
    for key, data in MODEL.items():
        store.put_bytes(f"models/m/{key}", data)
    return store


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def uri(store: S3Store, key: str = "models/m/") -> str:
    return f"s3://{store.bucket}/{key}"


def content(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def versions(root: Path) -> list[str]:
    """Every entry under the cache's URI directories but the lock files."""
    return sorted(
        f"{d.name}/{e.name}" for d in root.iterdir() for e in d.iterdir() if e.name != cache.LOCK
    )


SIZE = sum(len(v) for v in MODEL.values())


def test_a_second_fetch_downloads_nothing(
    bucket: S3Store, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = cache.fetch_s3(uri(bucket), root=root)
    assert (first.downloaded, first.reused) == (SIZE, 0)
    assert content(first.path) == MODEL

    def no_download(*_: object, **__: object) -> None:
        raise AssertionError("a valid cache must not download")

    monkeypatch.setattr(S3Store, "get_file", no_download)
    second = cache.fetch_s3(uri(bucket), root=root)
    assert (second.path, second.downloaded, second.reused) == (first.path, 0, SIZE)
    assert len(versions(root)) == 1


def _overwrite_same_size(s: S3Store) -> None:
    data = MODEL["model.safetensors"]
    s.put_bytes("models/m/model.safetensors", bytes(reversed(data)))


CHANGES: list[tuple[str, Callable[[S3Store], None], Callable[[dict[str, bytes]], None]]] = [
    (
        "same size, new content (only the ETag tells)",
        _overwrite_same_size,
        lambda m: m.update({"model.safetensors": bytes(reversed(MODEL["model.safetensors"]))}),
    ),
    (
        "a file grows",
        lambda s: s.put_bytes("models/m/config.json", b'{"model_type": "llama", "x": 1}'),
        lambda m: m.update({"config.json": b'{"model_type": "llama", "x": 1}'}),
    ),
    (
        "a file is added",
        lambda s: s.put_bytes("models/m/extra.txt", b"new"),
        lambda m: m.update({"extra.txt": b"new"}),
    ),
    (
        "a file is removed",
        lambda s: s.delete("models/m/tokenizer/tokenizer.json"),
        lambda m: m.pop("tokenizer/tokenizer.json"),
    ),
]


@pytest.mark.parametrize(
    ("change", "expect"), [c[1:] for c in CHANGES], ids=[c[0] for c in CHANGES]
)
def test_a_changed_model_is_downloaded_again_and_the_old_version_removed(
    bucket: S3Store,
    root: Path,
    change: Callable[[S3Store], None],
    expect: Callable[[dict[str, bytes]], None],
) -> None:
    old = cache.fetch_s3(uri(bucket), root=root)
    change(bucket)
    new = cache.fetch_s3(uri(bucket), root=root)
    wanted = dict(MODEL)
    expect(wanted)
    assert new.path != old.path
    assert new.downloaded == sum(len(v) for v in wanted.values())
    assert content(new.path) == wanted
    assert not old.path.exists()
    assert len(versions(root)) == 1


def test_a_damaged_copy_is_replaced(bucket: S3Store, root: Path) -> None:
    first = cache.fetch_s3(uri(bucket), root=root)
    (first.path / "model.safetensors").write_bytes(b"truncated")
    second = cache.fetch_s3(uri(bucket), root=root)
    assert second.downloaded == SIZE
    assert content(second.path) == MODEL


def test_a_single_object_is_cached_by_its_own_etag(bucket: S3Store, root: Path) -> None:
    key = "models/m/config.json"
    first = cache.fetch_s3(uri(bucket, key), root=root)
    assert first.path.name == "config.json"
    assert first.path.read_bytes() == MODEL["config.json"]
    assert cache.fetch_s3(uri(bucket, key), root=root).downloaded == 0
    bucket.put_bytes(key, b"{}")
    third = cache.fetch_s3(uri(bucket, key), root=root)
    assert (third.downloaded, third.path.read_bytes()) == (2, b"{}")


def test_an_object_replaced_mid_download_is_not_cached_under_the_old_etag(
    bucket: S3Store, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = S3Store.get_file
    replaced = threading.Event()

    def get_then_replace(self: S3Store, key: str, path: Path, *a: object, **kw: object) -> None:
        real(self, key, path, *a, **kw)
        if not replaced.is_set():
            replaced.set()
            self.put_bytes("models/m/config.json", b'{"replaced": true}')

    monkeypatch.setattr(S3Store, "get_file", get_then_replace)
    got = cache.fetch_s3(uri(bucket), root=root)
    assert content(got.path)["config.json"] == b'{"replaced": true}'
    assert len(versions(root)) == 1


@pytest.mark.parametrize("flock", [True, False], ids=["with flock", "without flock"])
def test_concurrent_fetches_end_with_one_valid_copy(
    bucket: S3Store, root: Path, monkeypatch: pytest.MonkeyPatch, flock: bool
) -> None:
    """Jobs sharing a volume start together. With flock one downloads and the others wait and
    reuse; without it (a filesystem that has none) each may download, the rename picks one copy
    and the losers discard theirs. Either way every caller gets the same complete copy."""
    if not flock:

        @contextlib.contextmanager
        def no_lock(_: Path) -> Iterator[bool]:
            yield False

        monkeypatch.setattr(cache, "_locked", no_lock)
    start = threading.Barrier(6)

    def fetch(_: int) -> cache.Fetched:
        start.wait()
        return cache.fetch_s3(uri(bucket), root=root)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(fetch, range(6)))
    assert len({r.path for r in results}) == 1
    assert content(results[0].path) == MODEL
    downloaded = sum(r.downloaded for r in results)
    if flock:
        assert downloaded == SIZE
        assert sum(r.reused for r in results) == 5 * SIZE
    else:
        assert SIZE <= downloaded <= 6 * SIZE
    assert len(versions(root)) == 1  # no partial or losing copy left behind


def test_partials_of_crashed_jobs_are_removed_under_the_lock(bucket: S3Store, root: Path) -> None:
    first = cache.fetch_s3(uri(bucket), root=root)
    crashed = first.path.parent.parent / f"{cache.PARTIAL}dead"
    (crashed / "dir").mkdir(parents=True)
    (crashed / "dir" / "model.safetensors").write_bytes(b"half")
    cache.fetch_s3(uri(bucket), root=root)
    assert not crashed.exists()


def test_the_ledger_counts_per_uri(bucket: S3Store, root: Path) -> None:
    u = uri(bucket)
    before = cache.bytes_downloaded(u), cache.bytes_reused(u)
    cache.fetch_s3(u, root=root)
    cache.fetch_s3(u.rstrip("/"), root=root)  # the same prefix, named without its '/'
    assert cache.bytes_downloaded(u) - before[0] == SIZE
    assert cache.bytes_reused(u.rstrip("/")) - before[1] == SIZE


def test_missing_objects_are_an_error(bucket: S3Store, root: Path) -> None:
    with pytest.raises(FileNotFoundError):
        cache.fetch_s3(uri(bucket, "models/none/"), root=root)
