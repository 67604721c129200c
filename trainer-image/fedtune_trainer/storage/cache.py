"""The download cache: a model or data set named by an s3:// URI, fetched once per cache volume.

A base model is gigabytes, and every client Job of every round reads the same one. With a cache
directory that outlives the pod (`spec.modelCache.mode: perClient` mounts a PersistentVolumeClaim
there and points FEDTUNE_CACHE_DIR at it), a client downloads it in its first round and reuses it
in every later one. What makes reuse safe:

* **Keyed by content, not by name.** A version's key hashes the URI and every object's key, size
  and ETag, read from one listing of the prefix (a HEAD for a single object). Overwrite one file
  of the model in the bucket and the next fetch downloads a new version; the listing is the only
  request a valid cache costs.
* **Filled atomically.** A download goes to a private `.partial-*` directory and is renamed into
  place once complete and checked (sizes against the listing, and a second listing that must
  still match, so an object replaced mid-download is not cached under the old ETag). A version
  directory therefore exists whole or not at all, whatever kills the pod.
* **Safe when Jobs start together.** Fetches of one URI on one volume take an exclusive `flock`
  on `<uri>/.lock`, so the second Job waits and reuses instead of downloading the model again.
  Where the filesystem has no working flock, both download and the rename decides: the loser
  discards its copy and uses the winner's.
* **Bounded.** Once a version is in place, the older versions of the same URI, and (under the
  lock only, where no live download can own them) partial directories that crashed Jobs left,
  are removed.

Layout: `<FEDTUNE_CACHE_DIR>/<sha256(uri)[:16]>/{.lock, <version>/, .partial-*/}`, a version
holding `object/<name>` (one object) or `dir/...` (a prefix).

Every fetch is counted per URI (`bytes_downloaded`, `bytes_reused`), which is how a client's
summary reports what its base model cost it in this round.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fedtune_trainer.storage.s3 import S3Store, split_s3
from fedtune_trainer.storage.store import S3Settings, local_path
from fedtune_trainer.wire.contract import CACHE_DIR_ENV

PARTIAL = ".partial-"
TRASH = ".trash-"
LOCK = ".lock"
_ATTEMPTS = 3


@dataclass(frozen=True)
class RemoteObject:
    """One object of a listing: its key relative to the fetched URI, size and ETag."""

    name: str
    size: int
    etag: str


@dataclass(frozen=True)
class Listing:
    """What the URI names right now: one object, or every object under a prefix."""

    uri: str
    single: bool
    objects: tuple[RemoteObject, ...]

    @property
    def total_bytes(self) -> int:
        return sum(o.size for o in self.objects)

    def version(self) -> str:
        """The cache key of this content: the URI and each object's (key, size, ETag)."""
        payload = json.dumps(
            [self.uri, self.single, sorted((o.name, o.size, o.etag) for o in self.objects)],
            separators=(",", ":"),
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Fetched:
    """A fetch's result: the local path and what it cost."""

    path: Path
    downloaded: int
    reused: int


_ledger: dict[str, list[int]] = {}
_ledger_lock = threading.Lock()


def _normal(uri: str) -> str:
    return uri.rstrip("/")


def _count(uri: str, downloaded: int, reused: int) -> None:
    with _ledger_lock:
        entry = _ledger.setdefault(_normal(uri), [0, 0])
        entry[0] += downloaded
        entry[1] += reused


def bytes_downloaded(uri: str) -> int:
    """Bytes this process downloaded for `uri` (with or without a trailing '/') so far."""
    with _ledger_lock:
        return _ledger.get(_normal(uri), [0, 0])[0]


def bytes_reused(uri: str) -> int:
    """Bytes this process found valid in the cache for `uri` so far."""
    with _ledger_lock:
        return _ledger.get(_normal(uri), [0, 0])[1]


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path(tempfile.gettempdir()) / "fedtune-cache")


# --------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------


def _etag(value: object) -> str:
    return str(value or "").strip('"')


def _missing(error: Exception) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(error, ClientError):
        return False
    return str(error.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound")


def list_remote(store: S3Store, uri: str) -> Listing:
    """One object (a URI not ending in '/' that names an object) or every object under the
    prefix; FileNotFoundError when there is nothing."""
    _, key = split_s3(uri)
    if key and not uri.endswith("/"):
        try:
            head = store.client.head_object(Bucket=store.bucket, Key=key)
        except Exception as e:
            if not _missing(e):
                raise
        else:
            obj = RemoteObject(Path(key).name, int(head["ContentLength"]), _etag(head.get("ETag")))
            return Listing(_normal(uri), True, (obj,))
    prefix = key.rstrip("/") + "/" if key else ""
    objects = []
    paginator = store.client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=store.bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            name = item["Key"][len(prefix) :]
            if name and not name.endswith("/"):  # skip "directory marker" objects
                objects.append(RemoteObject(name, int(item["Size"]), _etag(item.get("ETag"))))
    if not objects:
        raise FileNotFoundError(f"{uri}: no objects")
    return Listing(_normal(uri), False, tuple(sorted(objects, key=lambda o: o.name)))


# --------------------------------------------------------------------------------------------
# Versions on disk
# --------------------------------------------------------------------------------------------


def _content(version_dir: Path, listing: Listing) -> Path:
    if listing.single:
        return version_dir / "object" / listing.objects[0].name
    return version_dir / "dir"


def _valid(version_dir: Path, listing: Listing) -> bool:
    """Every object is there with its listed size (the rename makes a version whole; this
    catches a volume someone else tampered with, or a disk that lost files)."""
    base = version_dir / ("object" if listing.single else "dir")
    for obj in listing.objects:
        try:
            if (base / obj.name).stat().st_size != obj.size:
                return False
        except OSError:
            return False
    return True


def _remove(path: Path) -> None:
    """Rename aside first (atomic), then delete: nobody ever sees half a removed version."""
    trash = path.with_name(f"{TRASH}{path.name}-{os.getpid()}-{threading.get_ident()}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[bool]:
    """An exclusive flock on `directory/.lock`; yields False where the filesystem has none."""
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _prune(uri_dir: Path, keep: str, partials: bool) -> None:
    for entry in uri_dir.iterdir():
        if entry.name == keep or entry.name == LOCK or not entry.is_dir():
            continue
        if entry.name.startswith(PARTIAL) and not partials:
            continue  # perhaps a live download of another Job that has no lock to share
        if entry.name.startswith(TRASH):
            shutil.rmtree(entry, ignore_errors=True)
        else:
            _remove(entry)


# --------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------


def _download(store: S3Store, listing: Listing, uri: str, into: Path) -> None:
    _, key = split_s3(uri)
    if listing.single:
        store.get_file(key, into / "object" / listing.objects[0].name)
        return
    prefix = key.rstrip("/") + "/" if key else ""
    for obj in listing.objects:
        store.get_file(prefix + obj.name, into / "dir" / obj.name)


def fetch_s3(uri: str, settings: S3Settings | None = None, root: Path | None = None) -> Fetched:
    """The cached copy of an s3:// object or prefix, downloading it if no valid one exists."""
    bucket, _ = split_s3(uri)
    store = S3Store(bucket, "", settings or S3Settings())
    uri_dir = (root or cache_root()) / hashlib.sha256(_normal(uri).encode()).hexdigest()[:16]
    uri_dir.mkdir(parents=True, exist_ok=True)
    with _locked(uri_dir) as exclusive:
        for _ in range(_ATTEMPTS):
            listing = list_remote(store, uri)
            version = listing.version()
            dest = uri_dir / version
            if dest.is_dir():
                if _valid(dest, listing):
                    _prune(uri_dir, version, partials=exclusive)
                    _count(uri, 0, listing.total_bytes)
                    _say(f"cache: reused {listing.total_bytes} bytes of {uri} ({dest})")
                    return Fetched(_content(dest, listing), 0, listing.total_bytes)
                _say(f"cache: {dest} does not match {uri}; downloading it again")
                _remove(dest)
            tmp = Path(tempfile.mkdtemp(prefix=PARTIAL, dir=uri_dir))
            try:
                _download(store, listing, uri, tmp)
                if not _valid(tmp, listing) or list_remote(store, uri) != listing:
                    _say(f"cache: {uri} changed while it downloaded; again")
                    continue
                try:
                    os.rename(tmp, dest)
                except OSError:
                    if not (dest.is_dir() and _valid(dest, listing)):
                        raise  # not a lost race: a real failure
                    _say(f"cache: another Job filled {dest} first; discarding this copy")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            _prune(uri_dir, version, partials=exclusive)
            _count(uri, listing.total_bytes, 0)
            _say(f"cache: downloaded {listing.total_bytes} bytes of {uri} into {dest}")
            return Fetched(_content(dest, listing), listing.total_bytes, 0)
    raise RuntimeError(f"{uri}: changed during each of {_ATTEMPTS} downloads")


def fetch(uri: str, settings: S3Settings | None = None) -> Fetched:
    """A local path for a local path, file:// or s3:// URI (s3 through the cache)."""
    path = local_path(uri)
    if path is not None:
        if not path.exists():
            raise FileNotFoundError(f"{uri}: no such file or directory")
        return Fetched(path, 0, 0)
    if not uri.startswith("s3://"):
        raise ValueError(f"unsupported URI {uri!r} (use a path, file:// or s3://)")
    return fetch_s3(uri, settings)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
