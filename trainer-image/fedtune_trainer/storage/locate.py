"""From a URI to what reads it: a Store for a run's storage (`open_store`), a local path for a
model or data set (`fetch`, through the download cache for s3://)."""

from __future__ import annotations

from pathlib import Path

from fedtune_trainer.storage.cache import fetch as cached
from fedtune_trainer.storage.s3 import S3Store, split_s3
from fedtune_trainer.storage.store import FileStore, S3Settings, Store, local_path
from fedtune_trainer.wire.settings import StorageLocation


def open_store(where: StorageLocation | str, settings: S3Settings | None = None) -> Store:
    """The store for a task's storage location or a plain URI."""
    if isinstance(where, StorageLocation):
        uri = where.uri
        settings = S3Settings(
            endpoint=where.endpoint, region=where.region, force_path_style=where.force_path_style
        )
    else:
        uri = where
    if uri.startswith("s3://"):
        bucket, prefix = split_s3(uri)
        return S3Store(bucket, prefix, settings or S3Settings())
    path = local_path(uri)
    if path is None:
        raise ValueError(f"unsupported storage URI {uri!r} (use s3:// or file://)")
    return FileStore(path)


# --------------------------------------------------------------------------------------------
# Fetching models and data sets named by URI
# --------------------------------------------------------------------------------------------


def fetch(uri: str, settings: S3Settings | None = None) -> Path:
    """A local path for a file or directory named by a local path, file:// or s3:// URI.

    s3 objects go through the download cache (`cache.py`: keyed by the objects' ETags and sizes,
    filled atomically, shared safely by concurrent Jobs); a URI ending in '/' or naming no single
    object is treated as a directory prefix.
    """
    return cached(uri, settings).path
