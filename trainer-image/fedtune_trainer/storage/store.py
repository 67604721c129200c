"""Object storage behind one small interface, and the crash-safe commit protocol on top of it.

Two backends: `s3://bucket/prefix` through boto3 (any S3-compatible server: endpoint override, path
style addressing, retries with backoff, multipart transfers for large objects, credentials from
the standard AWS environment variables) and `file:///path` (or a bare path) for local use and tests.

The commit protocol (docs/architecture.md, "Storage layout"): a *committed object* is a prefix
holding data files and a `manifest.json` that lists each file's size and SHA-256. Writers delete
the old manifest, write the data, and write the manifest last; readers trust the data only when
the manifest exists and every checksum matches. A crash at any point therefore leaves either the old
commit, no commit, or the new one, never a manifest that vouches for half-written data.

Round-versioned state (`state/server/<round>/`, `state/clients/<client>/<round>/`) is what makes a
rerun of round r idempotent: the rerun reads the state written *before* round r again and
overwrites the state of round r, so nothing is applied twice.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "fedtune.manifest/v1"
_CHUNK = 1 << 20
_TMP_MARK = ".fedtune-tmp-"


class ObjectNotFound(FileNotFoundError):
    """The key does not exist (a missing object, not a transport error)."""


class IntegrityError(RuntimeError):
    """A committed object failed verification: missing file, wrong size or wrong checksum."""


class ObjectTooLarge(IntegrityError):
    """An object is larger than its reader allows; the read stopped at the limit.

    Readers of untrusted objects (a client's delta, any manifest) pass a byte limit so that a
    hostile or broken object can cost at most that much memory, disk and bandwidth.
    """

    def __init__(self, what: str, limit: int) -> None:
        super().__init__(f"oversized: more than {limit} bytes in {what}")
        self.limit = limit


MANIFEST_MAX_BYTES = 1 << 20
"""A manifest lists a handful of files; anything larger is not one (and is never read whole)."""
SIGNATURE = "manifest.sig"
"""A signed commit's signature of its manifest (signing.py makes and checks it)."""
SIGNATURE_MAX_BYTES = 1024
"""An Ed25519 signature is 64 bytes; a reader never takes more than this."""


# --------------------------------------------------------------------------------------------
# The interface and its two backends
# --------------------------------------------------------------------------------------------


def join(*parts: str) -> str:
    """Join key parts with '/', ignoring empty parts and stray slashes."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class Store(ABC):
    """A flat key space of immutable-per-write objects, rooted at `uri`."""

    uri: str

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        """The object's content; raises ObjectNotFound, or ObjectTooLarge past `max_bytes`
        (having read at most max_bytes + 1 of them)."""

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def get_file(self, key: str, path: Path, max_bytes: int | None = None) -> None:
        """Download to `path` (streaming, never the whole object in memory); ObjectNotFound.

        With `max_bytes`, the download stops with ObjectTooLarge as soon as the object proves
        larger (its announced length, or the bytes actually received), and `path` is removed.
        """

    @abstractmethod
    def get_range(self, key: str, start: int, length: int) -> bytes:
        """At most `length` bytes of the object from offset `start` (fewer at its end).

        What lets a reader check a file's header before it downloads the file.
        """

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Every key that starts with `prefix`, sorted (S3 semantics: a string prefix)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove one key; a missing key is not an error."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Remove every key under `prefix`; returns how many were removed."""

    def exists(self, key: str) -> bool:
        try:
            self.get_bytes(key)
        except ObjectNotFound:
            return False
        return True

    def holds_any(self, prefix: str = "") -> bool:
        """Whether any key starts with `prefix` (a backend may stop at the first)."""
        return bool(self.list(prefix))

    def url(self, key: str = "") -> str:
        """The absolute URI of `key` (what summaries and logs show)."""
        return self.uri.rstrip("/") + ("/" + key.strip("/") if key else "")


class FileStore(Store):
    """Keys are paths under `root`; every write goes to a temp file and is renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        key = key.strip("/")
        if not key or any(part in ("", ".", "..") for part in key.split("/")):
            raise ValueError(f"invalid key {key!r}")
        return self.root / key

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(self._path(key), lambda f: f.write(data))

    def put_file(self, key: str, path: Path) -> None:
        with open(path, "rb") as src:
            self._atomic_write(self._path(key), lambda f: shutil.copyfileobj(src, f, _CHUNK))

    @staticmethod
    def _atomic_write(dest: Path, write: Any) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_TMP_MARK, dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _open(self, key: str) -> io.BufferedReader:
        try:
            return open(self._path(key), "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise ObjectNotFound(self.url(key)) from e

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        with self._open(key) as f:
            return read_limited(f, max_bytes, self.url(key))

    def get_file(self, key: str, path: Path, max_bytes: int | None = None) -> None:
        with self._open(key) as src:
            copy_limited(src, path, max_bytes, self.url(key))

    def get_range(self, key: str, start: int, length: int) -> bytes:
        with self._open(key) as f:
            f.seek(start)
            return f.read(length)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        prefix = prefix.lstrip("/")
        # Walk only the deepest directory the prefix names, then filter as S3 would.
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _, files in os.walk(base):
            for name in files:
                if name.startswith(_TMP_MARK):
                    continue
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for key in keys:
            self.delete(key)
        # Drop directories the deletion emptied, deepest first, never the root.
        for key in keys:
            parent = self._path(key).parent
            while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
        return len(keys)


@dataclass(frozen=True)
class S3Settings:
    """What an S3 client needs beyond credentials (which boto3 reads from AWS_* variables)."""

    endpoint: str | None = None
    region: str | None = None
    force_path_style: bool = True
    max_attempts: int = 8
    multipart_threshold: int = 64 << 20
    multipart_chunksize: int = 16 << 20
    # Explicit credentials (a client's data Secret); None: boto3's standard AWS_* chain.
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)


def read_limited(stream: Any, max_bytes: int | None, what: str) -> bytes:
    """Everything `stream` holds, reading at most max_bytes + 1 bytes (then ObjectTooLarge)."""
    if max_bytes is None:
        return stream.read()
    buf = bytearray()
    while len(buf) <= max_bytes:
        chunk = stream.read(min(_CHUNK, max_bytes + 1 - len(buf)))
        if not chunk:
            return bytes(buf)
        buf += chunk
    raise ObjectTooLarge(what, max_bytes)


def copy_limited(stream: Any, path: Path, max_bytes: int | None, what: str) -> None:
    """Stream into `path` chunk by chunk; past `max_bytes`, stop, remove it, ObjectTooLarge."""
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    try:
        with open(path, "wb") as out:
            while chunk := stream.read(_CHUNK):
                written += len(chunk)
                if max_bytes is not None and written > max_bytes:
                    raise ObjectTooLarge(what, max_bytes)
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def local_path(uri: str) -> Path | None:
    """The filesystem path of a `file://` URI or a bare path; None for anything remote."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file URIs must be local: {uri!r}")
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or re.fullmatch(r"[a-zA-Z]", parsed.scheme):  # bare or C:\ path
        return Path(uri)
    return None


# --------------------------------------------------------------------------------------------
# Commits: data first, manifest last
# --------------------------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def commit(
    store: Store,
    prefix: str,
    files: Mapping[str, bytes | Path],
    meta: Mapping[str, Any],
    sign: Callable[[bytes], bytes] | None = None,
) -> dict[str, Any]:
    """Write `files` under `prefix`, then the manifest that vouches for them; returns it.

    With `sign`, the manifest's exact bytes are signed and the signature written just before the
    manifest (signing.py): a reader that finds the manifest finds its signature.
    """
    if MANIFEST in files or SIGNATURE in files:
        raise ValueError(f"{MANIFEST} and {SIGNATURE} are reserved")
    store.delete(join(prefix, MANIFEST))  # a reader must never pair the old manifest with new data
    store.delete(join(prefix, SIGNATURE))
    entries: dict[str, dict[str, Any]] = {}
    for name, content in files.items():
        if isinstance(content, Path):
            entries[name] = {"bytes": content.stat().st_size, "sha256": sha256_file(content)}
            store.put_file(join(prefix, name), content)
        else:
            entries[name] = {"bytes": len(content), "sha256": sha256_bytes(content)}
            store.put_bytes(join(prefix, name), content)
    manifest = {"format": MANIFEST_FORMAT, **meta, "files": entries}
    raw = json.dumps(manifest, indent=1).encode()
    if sign is not None:
        store.put_bytes(join(prefix, SIGNATURE), sign(raw))
    store.put_bytes(join(prefix, MANIFEST), raw)
    return manifest


def read_manifest(
    store: Store, prefix: str, verify: Callable[[bytes, bytes | None], None] | None = None
) -> dict[str, Any] | None:
    """The manifest of a commit, or None when nothing is committed there.

    With `verify`, the manifest's bytes and its signature (None when there is none) are handed
    to it before they are parsed: a commit that is not the signer's is refused (`verify` raises)
    before anything in it is believed.
    """
    try:
        raw = store.get_bytes(join(prefix, MANIFEST), max_bytes=MANIFEST_MAX_BYTES)
    except ObjectNotFound:
        return None
    if verify is not None:
        try:
            signature = store.get_bytes(join(prefix, SIGNATURE), max_bytes=SIGNATURE_MAX_BYTES)
        except ObjectNotFound:
            signature = None
        verify(raw, signature)
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as e:
        raise IntegrityError(f"{store.url(join(prefix, MANIFEST))}: not JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise IntegrityError(f"{store.url(join(prefix, MANIFEST))}: not a {MANIFEST_FORMAT}")
    if not isinstance(manifest.get("files"), dict):
        raise IntegrityError(f"{store.url(join(prefix, MANIFEST))}: no file list")
    return manifest


def verify_entry(manifest: Mapping[str, Any], name: str, size: int, digest: str) -> None:
    """Raise IntegrityError unless `name` has the size and SHA-256 the manifest states."""
    entry = manifest["files"].get(name)
    if entry is None:
        raise IntegrityError(f"{name}: not listed in the manifest")
    if size != entry["bytes"]:
        kind = "truncated" if size < entry["bytes"] else "oversized"
        raise IntegrityError(
            f"{name}: {kind}, {size} bytes where the manifest says {entry['bytes']}"
        )
    if digest != entry["sha256"]:
        raise IntegrityError(f"{name}: checksum mismatch (sha256 {digest[:12]}...)")


def read_committed(
    store: Store, prefix: str, names: list[str] | None = None
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and the verified content of its files (all, or `names`) in memory."""
    manifest = read_manifest(store, prefix)
    if manifest is None:
        raise ObjectNotFound(f"{store.url(prefix)}: no committed {MANIFEST}")
    out: dict[str, bytes] = {}
    for name in names if names is not None else sorted(manifest["files"]):
        try:
            data = store.get_bytes(join(prefix, name))
        except ObjectNotFound as e:
            raise IntegrityError(f"{name}: listed in the manifest but missing") from e
        verify_entry(manifest, name, len(data), sha256_bytes(data))
        out[name] = data
    return manifest, out


def fetch_committed(
    store: Store, prefix: str, dest: Path, names: list[str] | None = None
) -> dict[str, Any]:
    """Download a commit's files (all, or `names`) into `dest`, verified; returns the manifest.

    Streams through the disk, so an object never has to fit in memory.
    """
    manifest = read_manifest(store, prefix)
    if manifest is None:
        raise ObjectNotFound(f"{store.url(prefix)}: no committed {MANIFEST}")
    dest.mkdir(parents=True, exist_ok=True)
    for name in names if names is not None else sorted(manifest["files"]):
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            # A manifest names files of its own prefix; anything else would write outside dest.
            raise IntegrityError(f"{store.url(prefix)}: the manifest names {str(name)[:80]!r}")
        path = dest / name
        try:
            store.get_file(join(prefix, name), path)
        except ObjectNotFound as e:
            raise IntegrityError(f"{name}: listed in the manifest but missing") from e
        verify_entry(manifest, name, path.stat().st_size, sha256_file(path))
    return manifest


# --------------------------------------------------------------------------------------------
# Round-versioned state
# --------------------------------------------------------------------------------------------


def versioned_prefix(prefix: str, round_: int) -> str:
    return join(prefix, f"{round_:06d}")


def committed_versions(store: Store, prefix: str) -> list[int]:
    """Rounds that have a committed version under `prefix`, ascending."""
    pattern = re.compile(re.escape(prefix.strip("/")) + r"/(\d{6})/" + re.escape(MANIFEST) + "$")
    rounds = []
    for key in store.list(prefix.strip("/") + "/"):
        if m := pattern.match(key):
            rounds.append(int(m.group(1)))
    return sorted(rounds)


def latest_version_before(store: Store, prefix: str, round_: int) -> int | None:
    """The newest committed version strictly older than `round_` (what round `round_` reads)."""
    older = [r for r in committed_versions(store, prefix) if r < round_]
    return older[-1] if older else None


def prune_versions_before(store: Store, prefix: str, round_: int) -> None:
    """Delete versions older than `round_`: they can no longer be read by any rerun."""
    for r in committed_versions(store, prefix):
        if r < round_:
            store.delete_prefix(versioned_prefix(prefix, r) + "/")
