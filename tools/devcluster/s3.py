"""The S3-compatible server (versitygw on a posix directory), its accounts and its buckets.

The devcluster runs one for its pods; tests that need only storage start one on its own, which
takes about a second.

Accounts: the server keeps a root account (from the environment) and, in its internal IAM
(`--iam-dir`, beside the posix root), accounts that the root creates through versitygw's admin API
(`S3Account.create_user`), served on the S3 port itself. A `user` account can do nothing with the
root's buckets until a bucket policy (`S3Account.put_bucket_policy`) grants it something, and the
server itself answers 403 AccessDenied to what no statement grants. The root account (and an
`admin`) is never subject to bucket policies.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote
from xml.sax.saxutils import escape

import boto3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from devcluster import net

REGION = "us-east-1"


def iam_dir_for(data_dir: Path) -> Path:
    """Where the server keeps its accounts (`users.json`, secrets included): beside the posix
    root, never inside it, where a directory is a bucket."""
    return data_dir.parent / f"iam-{data_dir.name}"


def meta_dir_for(data_dir: Path) -> Path:
    """Where the server keeps object and bucket metadata (ETags, ACLs, bucket policies): a
    sidecar directory beside the posix root. In extended attributes, versitygw's default, a
    bucket's attributes share one 4 KiB block on ext4, which refuses (500 InternalError) a
    bucket policy over about 4 KB, a fifth of what AWS takes (20 KB). Its name does not start
    with the root's: versitygw refuses a sidecar whose path merely starts with the root's path
    as one inside it."""
    return data_dir.parent / f"sidecar-{data_dir.name}"


def server_argv(
    bin_dir: Path,
    port: int,
    data_dir: Path,
    host: str = "127.0.0.1",
    access_log: Path | None = None,
) -> list[str]:
    """The server's command line. Creates its IAM and metadata directories (owner only), which
    versitygw does not, and which it needs as absolute paths. A data directory that holds
    buckets but has no metadata directory was written by an older devcluster, which kept
    metadata in extended attributes: it is refused rather than served without its metadata."""
    data = data_dir.resolve()
    iam_dir, meta_dir = iam_dir_for(data), meta_dir_for(data)
    if not meta_dir.exists() and data.is_dir() and any(data.iterdir()):
        raise RuntimeError(
            f"{data} holds buckets whose metadata an older devcluster kept in extended "
            f"attributes, and it is now kept in {meta_dir.name}/ beside it: remove {data} "
            f"(and {iam_dir.name}/) to start the S3 server afresh"
        )
    for directory in (iam_dir, meta_dir):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    log = ["--access-log", str(access_log)] if access_log is not None else []
    return [
        str(bin_dir / "versitygw"),
        "--port",
        f"{host}:{port}",
        "--health",
        "/health",
        "--iam-dir",
        str(iam_dir),
        *log,
        "posix",
        "--sidecar",
        str(meta_dir),
        str(data),
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


# An account name is its access key id: it goes into SigV4's credential scope (no '/') and into
# bucket policies, so it is kept to what both carry unquoted.
_ACCOUNT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AdminError(RuntimeError):
    """versitygw's admin API refused a request (its S3-style error code in `code`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass
class S3Account:
    """An endpoint and one account's credentials: what a client of the server needs. The
    server's root account, or one that the root made with `create_user`."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str = REGION

    @property
    def name(self) -> str:
        """How a bucket policy names this account: versitygw's internal IAM knows an account by
        its access key id, so `"Principal": {"AWS": [account.name]}` (or the bare string, or a
        list of them: versitygw takes all four forms). Not an ARN: `arn:aws:iam::...:user/x`
        names nobody on this server."""
        return self.access_key

    def create_user(self, name: str) -> S3Account:
        """A new account of role `user`, named `name` (its access key id), with a generated
        secret. Only the root account (or an admin) may create one; a name taken already (or
        the root's) is refused with AdminError code `XAdminUserExists`. The account can reach
        nothing of the root's until a bucket policy grants it something.
        """
        if not _ACCOUNT_NAME.match(name):
            raise ValueError(
                f"account name {name!r}: 1-64 of [A-Za-z0-9._-], not starting with . - _"
            )
        secret = secrets.token_urlsafe(30)
        body = (
            f"<Account><Access>{escape(name)}</Access><Secret>{escape(secret)}</Secret>"
            "<Role>user</Role></Account>"
        )
        self._admin("create-user", body.encode())
        return S3Account(self.endpoint, name, secret, self.region)

    def put_bucket_policy(self, bucket: str, policy: dict[str, Any]) -> None:
        """Replace the bucket's policy (AWS's JSON grammar; see docs/devcluster.md for what
        versitygw honours). Every principal the policy names must exist already: the server
        refuses (MalformedPolicy, "Invalid principal in policy") a policy naming an unknown one.
        """
        self.client().put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))

    def _admin(self, operation: str, body: bytes) -> None:
        """One request to versitygw's admin API: PATCH /<operation>, signed like an S3 request
        (what `versitygw admin` does, without putting secrets on a command line)."""
        request = AWSRequest(method="PATCH", url=f"{self.endpoint}/{operation}", data=body)
        credentials = Credentials(self.access_key, self.secret_key)
        S3SigV4Auth(credentials, "s3", self.region).add_auth(request)
        prepared = request.prepare()
        http = urllib.request.Request(
            prepared.url, data=body, headers=dict(prepared.headers), method="PATCH"
        )
        try:
            with urllib.request.urlopen(http, timeout=30):
                return
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            code = re.search(r"<Code>([^<]*)</Code>", text)
            message = re.search(r"<Message>([^<]*)</Message>", text)
            raise AdminError(
                code[1] if code else str(e.code), message[1] if message else text
            ) from None

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
