"""The S3 backend of the Store interface: any S3-compatible server through boto3 (endpoint
override, path-style addressing, retries with backoff, multipart transfers for large objects,
bounded and ranged reads, credentials from the standard AWS environment variables or a client's
own data Secret).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from fedtune_trainer.storage.store import (
    ObjectNotFound,
    ObjectTooLarge,
    S3Settings,
    Store,
    copy_limited,
    join,
    read_limited,
)


class S3Store(Store):
    """`s3://bucket/prefix` through boto3."""

    def __init__(self, bucket: str, prefix: str, settings: S3Settings) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        endpoint = settings.endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
        region = (
            settings.region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1"
        )
        config = Config(
            s3={"addressing_style": "path" if settings.force_path_style else "auto"},
            # "standard" mode: exponential backoff with jitter on throttling and 5xx.
            retries={"max_attempts": settings.max_attempts, "mode": "standard"},
            connect_timeout=10,
            read_timeout=120,
            # Many S3-compatible servers reject the newer default CRC trailers.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=region,
            config=config,
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_access_key,
        )
        self.transfer = TransferConfig(
            multipart_threshold=settings.multipart_threshold,
            multipart_chunksize=settings.multipart_chunksize,
            max_concurrency=4,
        )

    def _key(self, key: str) -> str:
        key = key.strip("/")
        if not key:
            raise ValueError("empty key")
        return join(self.prefix, key)

    def _not_found(self, error: Exception) -> bool:
        from botocore.exceptions import ClientError

        if not isinstance(error, ClientError):
            return False
        code = str(error.response.get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchKey", "NotFound")

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.upload_fileobj(
            io.BytesIO(data), self.bucket, self._key(key), Config=self.transfer
        )

    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key), Config=self.transfer)

    def _get_object(self, key: str, **kw: Any) -> Any:
        """A GetObject response (its Body streams); ObjectNotFound for a missing key."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key), **kw)
        except Exception as e:
            if self._not_found(e):
                raise ObjectNotFound(self.url(key)) from e
            raise

    def _limited(self, key: str, max_bytes: int, read: Callable[[Any], Any]) -> Any:
        """Run `read` over a GetObject body, refusing an announced length over `max_bytes`.

        One GET streamed (not a multipart transfer, whose parts are sized from a HEAD the object
        may no longer match); a transfer error mid-body restarts it, like botocore's retries.
        """
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import IncompleteReadError, ReadTimeoutError

        for attempt in range(3):
            response = self._get_object(key)
            body = response["Body"]
            try:
                if int(response.get("ContentLength") or 0) > max_bytes:
                    raise ObjectTooLarge(self.url(key), max_bytes)
                return read(body)
            except (BotoConnectionError, IncompleteReadError, ReadTimeoutError):
                if attempt == 2:
                    raise
            finally:
                body.close()
        raise AssertionError("unreachable")

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None:
            return self._limited(
                key, max_bytes, lambda body: read_limited(body, max_bytes, self.url(key))
            )
        buf = io.BytesIO()
        try:
            self.client.download_fileobj(self.bucket, self._key(key), buf, Config=self.transfer)
        except Exception as e:
            if self._not_found(e):
                raise ObjectNotFound(self.url(key)) from e
            raise
        return buf.getvalue()

    def get_file(self, key: str, path: Path, max_bytes: int | None = None) -> None:
        if max_bytes is not None:
            self._limited(
                key, max_bytes, lambda body: copy_limited(body, path, max_bytes, self.url(key))
            )
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(self.bucket, self._key(key), str(path), Config=self.transfer)
        except Exception as e:
            if self._not_found(e):
                raise ObjectNotFound(self.url(key)) from e
            raise

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        try:
            response = self._get_object(key, Range=f"bytes={start}-{start + length - 1}")
        except Exception as e:
            # A range that starts past the end: the object is shorter, so there is nothing.
            if "InvalidRange" in str(e) or "416" in str(e):
                return b""
            raise
        with response["Body"] as body:
            return read_limited(body, length, self.url(key))

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:
            if self._not_found(e):
                return False
            raise
        return True

    def _full(self, prefix: str) -> str:
        """A key prefix under the root, as S3 lists it (a string prefix)."""
        return (self.prefix + "/" if self.prefix else "") + prefix.lstrip("/")

    def _iter_keys(self, prefix: str) -> Iterator[str]:
        full = self._full(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                yield obj["Key"][strip:]

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self._iter_keys(prefix))

    def holds_any(self, prefix: str = "") -> bool:
        listing = self.client.list_objects_v2(
            Bucket=self.bucket, Prefix=self._full(prefix), MaxKeys=1
        )
        return bool(listing.get("Contents"))

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix`; raises PermissionError when the server refuses
        any (DeleteObjects answers 200 and lists a refused key among its Errors: a refusal that
        is not read would leave objects behind while saying they are gone)."""
        keys = self.list(prefix)
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self._key(k)} for k in keys[i : i + 1000]]
            answer = self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
            )
            if errors := answer.get("Errors"):
                first = errors[0]
                raise PermissionError(
                    f"s3://{self.bucket}/{first.get('Key')}: {first.get('Code')} "
                    f"({len(errors)} of {len(batch)} objects not deleted)"
                )
        return len(keys)


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b")."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3 URI: {uri!r}")
    return parsed.netloc, parsed.path.strip("/")
