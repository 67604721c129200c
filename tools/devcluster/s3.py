"""The S3-compatible server (versitygw on a posix directory) and its buckets.

The devcluster runs one for its pods; tests that need only storage start one on its own, which
takes about a second.
"""

from __future__ import annotations

import re
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from devcluster import net

REGION = "us-east-1"


def server_argv(
    bin_dir: Path,
    port: int,
    data_dir: Path,
    host: str = "127.0.0.1",
    access_log: Path | None = None,
) -> list[str]:
    log = ["--access-log", str(access_log)] if access_log is not None else []
    return [
        str(bin_dir / "versitygw"),
        "--port",
        f"{host}:{port}",
        "--health",
        "/health",
        *log,
        "posix",
        str(data_dir),
    ]


# owner bucket [time] ip requester request-id operation key request-uri status error
# bytes-sent object-size total-ms turnaround-ms ... (S3's server access log format)
_ACCESS_LINE = re.compile(
    r"^(?P<owner>\S+) (?P<bucket>\S+) \[(?P<time>[^\]]*)\] (?P<ip>\S+) (?P<requester>\S+) "
    r"(?P<request_id>\S+) (?P<operation>\S+) (?P<key>\S+) (?P<uri>\S+) (?P<status>\S+) "
    r"(?P<error>\S+) (?P<bytes_sent>\S+) (?P<object_size>\S+) "
)


@dataclass(frozen=True)
class AccessRecord:
    """One request from the server access log."""

    bucket: str
    operation: str
    key: str
    status: int
    bytes_sent: int
    object_size: int


def parse_access_log(text: str) -> list[AccessRecord]:
    """The requests of a versitygw access log (lines that are not requests are skipped).

    versitygw 1.8 logs 0 in bytes-sent and object-size for GetObject (it streams the body after
    the log entry is made); a reader that needs the bytes a GET served takes the object's size
    from elsewhere.
    """

    def number(value: str) -> int:
        return int(value) if value.isdigit() else 0

    records = []
    for line in text.splitlines():
        m = _ACCESS_LINE.match(line)
        if m is None:
            continue
        records.append(
            AccessRecord(
                bucket=m["bucket"],
                operation=m["operation"],
                key=unquote(m["key"]) if m["key"] != "-" else "",
                status=number(m["status"]),
                bytes_sent=number(m["bytes_sent"]),
                object_size=number(m["object_size"]),
            )
        )
    return records


def server_env(access_key: str, secret_key: str) -> dict[str, str]:
    """versitygw reads its root account from the environment, which keeps it off `ps`."""
    return {"ROOT_ACCESS_KEY": access_key, "ROOT_SECRET_KEY": secret_key}


def health_status(endpoint: str) -> int | None:
    return net.http_status(f"{endpoint}/health")


@dataclass
class S3Account:
    """An endpoint and root credentials: what a client of the server needs."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str = REGION

    def client(self):
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5}),
        )

    def bucket(self, name: str) -> str:
        """Create the bucket unless it exists; returns its s3:// URI."""
        try:
            self.client().create_bucket(Bucket=name)
        except ClientError as e:
            if e.response["Error"]["Code"] not in (
                "BucketAlreadyOwnedByYou",
                "BucketAlreadyExists",
            ):
                raise
        return f"s3://{name}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables boto3 (and so the trainer) reads."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }


@dataclass
class S3Server:
    """A standalone server owned by the calling process (tests)."""

    bin_dir: Path
    data_dir: Path
    port: int
    account: S3Account = field(init=False)
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self, timeout: float = 30.0) -> S3Account:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.account = S3Account(
            f"http://127.0.0.1:{self.port}", "devcluster", secrets.token_urlsafe(24)
        )
        log = (self.data_dir.parent / "s3.log").open("ab")
        self.proc = subprocess.Popen(
            server_argv(self.bin_dir, self.port, self.data_dir),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=server_env(self.account.access_key, self.account.secret_key),
        )
        log.close()
        deadline = time.monotonic() + timeout
        while health_status(self.account.endpoint) != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.data_dir.parent / "s3.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"S3 server did not start:\n{tail}")
            time.sleep(0.1)
        return self.account

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
