"""The storage access each identity of a run needs, as policy documents: `fedtune storage-policy`.

A run has up to three kinds of storage identity, each a Secret the spec names: the run's own
(`spec.storage.credentialsSecret`: the aggregator and the cleanup, and every Job that has none of
its own), each client's (`clients[].storageCredentialsSecret`) and the evaluation's
(`evaluation.storageCredentialsSecret`). What each role reads and writes follows from the storage
layout (docs/architecture.md, "Storage layout"); this module turns the spec into least-privilege
statements in AWS's policy grammar, which AWS IAM, MinIO and versitygw all read:

- a client: reads the global adapters and its own state (error-feedback residuals, SCAFFOLD
  control variates) and the server's control variate; writes and deletes its own round commits
  and state; lists only its own state prefixes; reads the base model, the tokenizer and, unless
  it has a data Secret of its own, its data. Nothing of another client.
- the aggregator: reads everything under the run's root (it verifies every delta); writes the
  global adapters, the round records, the server, clip and control state, final/ and the report;
  deletes the clients' round commits once merged; reads the base model's config at round 0.
- the evaluation: reads the global adapters and the round records; writes evaluation.json and
  the report; reads the base model, the tokenizer and the held-out data.
- the cleanup (the run's identity): lists and deletes everything under the run's root.

Keys are matched with `?` for each digit of a round (`rounds/??????/...`), so a pattern for one
client cannot reach into another's prefix through a longer key. Pure: a spec in, documents out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from fedtune_operator.api import FederatedFineTuneSpec
from fedtune_trainer.wire.layout import (
    CLIP_STATE_PREFIX,
    FINAL_PREFIX,
    REPORT_PREFIX,
    SERVER_STATE_PREFIX,
    TASK_SIGNATURE_SUFFIX,
    client_state_prefix,
    control_prefix,
    round_prefix,
    site_prefix,
    task_key,
)

Flavor = Literal["aws", "minio", "versitygw"]
ROUND = "??????"
"""A round in a key: six digits (wire.layout pads rounds to six)."""
RUN_IDENTITY = "run"
"""The name of the run's identity when spec.storage.credentialsSecret is unset (ambient)."""

READ = ("s3:GetObject",)
WRITE = ("s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload")
DELETE = ("s3:DeleteObject",)


@dataclass
class Access:
    """What one identity may do: object actions on key patterns, listing under prefixes, by
    bucket (a run's data and model may live in other buckets than its root)."""

    objects: dict[tuple[str, tuple[str, ...]], set[str]] = field(default_factory=dict)
    """(bucket, actions) -> key patterns."""
    listing: dict[str, set[str]] = field(default_factory=dict)
    """bucket -> key prefixes it may list."""
    roles: list[str] = field(default_factory=list)

    def allow(self, bucket: str, actions: tuple[str, ...], *patterns: str) -> None:
        self.objects.setdefault((bucket, actions), set()).update(patterns)

    def list(self, bucket: str, *prefixes: str) -> None:
        self.listing.setdefault(bucket, set()).update(prefixes)

    def read_uri(self, uri: str | None) -> None:
        """Read a model, tokenizer or data set named by an s3:// URI (a file or a prefix)."""
        if uri is None or not uri.startswith("s3://"):
            return
        bucket, _, key = uri[len("s3://") :].partition("/")
        self.allow(bucket, READ, key, f"{key.rstrip('/')}/*")
        self.list(bucket, key)


def _split(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    return bucket, prefix.strip("/")


def _under(root: str, *keys: str) -> list[str]:
    return [f"{root}/{k}" if root else k for k in keys]


def client_access(spec: FederatedFineTuneSpec, client: str, access: Access) -> None:
    entry = next(c for c in spec.clients if c.name == client)
    bucket, root = _split(spec.storage.uri)
    state, control = client_state_prefix(client), control_prefix(client)
    server_control = control_prefix(None)
    access.roles.append(f"client {client}")
    access.allow(bucket, READ, *_under(root, f"rounds/{ROUND}/global/*", f"{server_control}/*"))
    own = _under(root, f"rounds/{ROUND}/clients/{client}/*", f"{state}/*", f"{control}/*")
    access.allow(bucket, READ + WRITE, *own)
    access.list(bucket, *_under(root, f"{state}/", f"{control}/", f"{server_control}/"))
    access.read_uri(spec.base_model)
    access.read_uri(spec.tokenizer)
    if entry.credentials_secret is None:
        access.read_uri(entry.data_uri)


def site_access(spec: FederatedFineTuneSpec, client: str, access: Access) -> None:
    """A site's client (docs/sites.md): a client's access, plus reading its own tasks and the
    run's end, and writing its heartbeats and refusals; its data is the site's own business."""
    client_access(spec, client, access)
    bucket, root = _split(spec.storage.uri)
    tasks = f"{task_key(0, client).replace(round_prefix(0), f'rounds/{ROUND}')}"
    reads = [tasks, tasks + TASK_SIGNATURE_SUFFIX, f"{FINAL_PREFIX}/*"]
    access.allow(bucket, READ, *_under(root, *reads))
    access.allow(bucket, READ + WRITE, *_under(root, f"{site_prefix(client)}/*"))


def relay_access(spec: FederatedFineTuneSpec, access: Access) -> None:
    """The run's relay Jobs: write the sites' tasks (reading their commits and notes is the
    aggregator's reading of the whole root, the same identity)."""
    bucket, root = _split(spec.storage.uri)
    access.roles.append("relay")
    access.allow(bucket, READ + WRITE, *_under(root, f"rounds/{ROUND}/tasks/*"))


def aggregator_access(spec: FederatedFineTuneSpec, access: Access) -> None:
    bucket, root = _split(spec.storage.uri)
    access.roles.append("aggregator")
    access.allow(bucket, READ, *_under(root, "*"))
    access.list(bucket, *_under(root, ""))
    writes = [
        f"rounds/{ROUND}/global/*",
        f"rounds/{ROUND}/metrics.json",
        f"{SERVER_STATE_PREFIX}/*",
        f"{CLIP_STATE_PREFIX}/*",
        f"{control_prefix(None)}/*",
        f"{FINAL_PREFIX}/*",
        f"{REPORT_PREFIX}/*",
    ]
    access.allow(bucket, READ + WRITE, *_under(root, *writes))
    access.allow(bucket, DELETE, *_under(root, f"rounds/{ROUND}/clients/*"))
    access.read_uri(spec.base_model)


def evaluation_access(spec: FederatedFineTuneSpec, access: Access) -> None:
    bucket, root = _split(spec.storage.uri)
    access.roles.append("evaluation")
    reads = [f"rounds/{ROUND}/global/*", f"rounds/{ROUND}/metrics.json"]
    access.allow(bucket, READ, *_under(root, *reads))
    writes = [f"rounds/{ROUND}/evaluation.json", f"{REPORT_PREFIX}/*"]
    access.allow(bucket, READ + WRITE, *_under(root, *writes))
    access.list(bucket, *_under(root, "rounds/", f"{REPORT_PREFIX}/"))
    access.read_uri(spec.base_model)
    access.read_uri(spec.tokenizer)
    access.read_uri(spec.evaluation.data_uri)


def cleanup_access(spec: FederatedFineTuneSpec, access: Access) -> None:
    bucket, root = _split(spec.storage.uri)
    access.roles.append("cleanup")
    access.allow(bucket, DELETE, *_under(root, "*"))
    access.list(bucket, *_under(root, ""))


def identities(spec: FederatedFineTuneSpec) -> dict[str, Access]:
    """Each identity (its Secret's name) and the access its roles need together."""
    run = spec.storage.credentials_secret.name if spec.storage.credentials_secret else RUN_IDENTITY
    found: dict[str, Access] = {}

    def of(secret: Any) -> Access:
        return found.setdefault(secret.name if secret else run, Access())

    aggregator_access(spec, of(None))
    cleanup_access(spec, of(None))
    if any(c.site is not None for c in spec.clients):
        relay_access(spec, of(None))
    for c in spec.clients:
        if c.site is not None:  # the site's own identity, which the run never names
            site_access(spec, c.name, found.setdefault(site_identity(c.name), Access()))
        else:
            client_access(spec, c.name, of(c.storage_credentials_secret))
    if spec.evaluation.data_uri:
        evaluation_access(spec, of(spec.evaluation.storage_credentials_secret))
    return found


def site_identity(client: str) -> str:
    """How the policies name a site's identity: the run does not know its Secret (`--account
    site-<client>=<account>` names the versitygw account)."""
    return f"site-{client}"


def statements(access: Access) -> list[dict[str, Any]]:
    out = []
    for (bucket, actions), patterns in sorted(access.objects.items()):
        out.append(
            {
                "Effect": "Allow",
                "Action": list(actions),
                "Resource": sorted(f"arn:aws:s3:::{bucket}/{p}" for p in patterns),
            }
        )
    for bucket, prefixes in sorted(access.listing.items()):
        statement: dict[str, Any] = {
            "Effect": "Allow",
            "Action": ["s3:ListBucket"],
            "Resource": [f"arn:aws:s3:::{bucket}"],
        }
        if "" not in prefixes:
            statement["Condition"] = {
                "StringLike": {"s3:prefix": sorted(f"{p}*" for p in prefixes)}
            }
        out.append(statement)
    return out


def policies(
    spec: FederatedFineTuneSpec, flavor: Flavor, accounts: dict[str, str] | None = None
) -> dict[str, Any]:
    """The policy documents of every identity of the run.

    aws and minio: one identity policy per Secret (attach it to the IAM user or role, or the
    MinIO user, whose keys the Secret holds). versitygw: one bucket policy per bucket, whose
    Principal names the versitygw account of each identity (`accounts`: Secret -> account; the
    Secret's name by default).
    """
    found = identities(spec)
    if flavor in ("aws", "minio"):
        return {
            name: {
                "roles": access.roles,
                "policy": {"Version": "2012-10-17", "Statement": statements(access)},
            }
            for name, access in sorted(found.items())
        }
    accounts = accounts or {}
    by_bucket: dict[str, list[dict[str, Any]]] = {}
    for name, access in sorted(found.items()):
        principal = accounts.get(name, name)
        for statement in statements(access):
            bucket = statement["Resource"][0].removeprefix("arn:aws:s3:::").split("/", 1)[0]
            by_bucket.setdefault(bucket, []).append({**statement, "Principal": principal})
    return {
        bucket: {"policy": {"Version": "2012-10-17", "Statement": stmts}}
        for bucket, stmts in sorted(by_bucket.items())
    }


def uncovered(spec: FederatedFineTuneSpec) -> Iterable[str]:
    """What the policies cannot confine, for the command to say: a client on the run's identity
    shares it with the aggregator (and every other such client)."""
    for c in spec.clients:
        if c.storage_credentials_secret is None:
            yield (
                f"clients[{c.name}] has no storageCredentialsSecret: it uses the run's identity "
                "and can read and write what the aggregator can"
            )
