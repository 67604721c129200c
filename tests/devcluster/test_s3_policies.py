"""Separate S3 accounts and bucket policies, enforced by the real server (versitygw 1.8).

Two tables. The first is a run's layout under a policy that scopes each client to its own prefix
(what issue 20's generated policies are to do): what alice may and may not do, answered by the
server itself. The second is, per S3 operation the trainer uses, which policy action versitygw
checks: each row is run once with exactly its actions granted (it must succeed) and once for each
of them with every other candidate action granted but that one (it must be refused), so a row
that names too few actions, or one too many, fails.
"""

from __future__ import annotations

import io
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from devcluster.s3 import AdminError, S3Account, server_argv
from devcluster.testing import DevCluster, refused

RUN = "runs/r1"
CLIENTS = ("alice", "bob")


def statement(principal: S3Account, actions: list[str], resources: list[str], **extra: Any):
    return {
        "Effect": "Allow",
        "Principal": {"AWS": [principal.name]},
        "Action": actions,
        "Resource": resources,
        **extra,
    }


def scoped_policy(bucket: str, accounts: dict[str, S3Account]) -> dict[str, Any]:
    """Each client reads and writes its own prefix of every round of run r1, reads the global
    model of every round, and lists only those prefixes."""
    arn = f"arn:aws:s3:::{bucket}"
    own = f"{RUN}/rounds/*/clients/{{}}/*"
    glob = f"{RUN}/rounds/*/global/*"
    statements = []
    for client, account in accounts.items():
        mine = own.format(client)
        statements += [
            statement(
                account,
                ["s3:PutObject", "s3:GetObject", "s3:DeleteObject", "s3:AbortMultipartUpload"],
                [f"{arn}/{mine}"],
            ),
            statement(account, ["s3:GetObject"], [f"{arn}/{glob}"]),
            statement(
                account,
                ["s3:ListBucket"],
                [arn],
                Condition={"StringLike": {"s3:prefix": [mine, glob]}},
            ),
        ]
    return {"Version": "2012-10-17", "Statement": statements}


@pytest.fixture(scope="module")
def accounts(s3: S3Account) -> dict[str, S3Account]:
    """alice and bob: accounts of role user (names made unique: the session's server is
    shared, and an account name is taken for the server's life)."""
    tag = secrets.token_hex(3)
    return {client: s3.create_user(f"{client}-{tag}") for client in CLIENTS}


def fresh_bucket(s3: S3Account) -> str:
    name = f"pol-{secrets.token_hex(6)}"
    s3.bucket(name)
    return name


@pytest.fixture(scope="module")
def run_bucket(s3: S3Account, accounts: dict[str, S3Account]) -> str:
    """A bucket holding round 1 of run r1 (and of another run, r2), under the scoped policy."""
    bucket = fresh_bucket(s3)
    root = s3.client()
    for key in (
        f"{RUN}/rounds/1/global/model",
        f"{RUN}/rounds/1/clients/alice/seed",
        f"{RUN}/rounds/1/clients/alice/seed-copy",
        f"{RUN}/rounds/1/clients/bob/seed",
        "runs/r2/rounds/1/clients/alice/seed",
        "runs/r2/rounds/1/global/model",
    ):
        root.put_object(Bucket=bucket, Key=key, Body=b"seeded by root")
    s3.put_bucket_policy(bucket, scoped_policy(bucket, accounts))
    return bucket


R1 = f"{RUN}/rounds/1"


def put(key: str):
    return lambda c, b: c.put_object(Bucket=b, Key=key, Body=b"written")


def get(key: str):
    return lambda c, b: c.get_object(Bucket=b, Key=key)["Body"].read()


def delete(key: str):
    return lambda c, b: c.delete_object(Bucket=b, Key=key)


def list_(prefix: str | None):
    kw = {} if prefix is None else {"Prefix": prefix}
    return lambda c, b: c.list_objects_v2(Bucket=b, **kw)


# (who, what, operation, refused?): "root" is the server's root account.
SCOPED = [
    ("alice", "put under her prefix", put(f"{R1}/clients/alice/delta"), False),
    ("alice", "put under her prefix, a later round", put(f"{RUN}/rounds/7/clients/alice/d"), False),
    ("alice", "get under her prefix", get(f"{R1}/clients/alice/seed"), False),
    ("alice", "delete under her prefix", delete(f"{R1}/clients/alice/seed-copy"), False),
    ("alice", "get the global model", get(f"{R1}/global/model"), False),
    ("alice", "put on global/", put(f"{R1}/global/model"), True),
    ("alice", "get under bob's prefix", get(f"{R1}/clients/bob/seed"), True),
    ("alice", "put under bob's prefix", put(f"{R1}/clients/bob/delta"), True),
    ("alice", "delete under bob's prefix", delete(f"{R1}/clients/bob/seed"), True),
    ("alice", "get her prefix of another run", get("runs/r2/rounds/1/clients/alice/seed"), True),
    ("alice", "get another run's global", get("runs/r2/rounds/1/global/model"), True),
    ("alice", "put at the round's top", put(f"{R1}/commit"), True),
    # The server judges the key it stores: '..' is resolved before the policy is consulted.
    ("alice", "put climbing into bob's with ..", put(f"{R1}/clients/alice/../bob/delta"), True),
    # '*' in a Resource spans '/', as in AWS: a key under bob's prefix that contains
    # "/clients/alice/" matches alice's pattern (it cannot be any key bob himself writes).
    (
        "alice",
        "put under bob's .../clients/alice/",
        put(f"{R1}/clients/bob/clients/alice/x"),
        False,
    ),
    ("alice", "unscoped list", list_(None), True),
    ("alice", "list her prefix", list_(f"{R1}/clients/alice/"), False),
    ("alice", "list global/", list_(f"{R1}/global/"), False),
    ("alice", "list bob's prefix", list_(f"{R1}/clients/bob/"), True),
    ("alice", "list the run", list_(f"{RUN}/"), True),
    ("alice", "list her prefix without the slash", list_(f"{R1}/clients/alice"), True),
    (
        "alice",
        "head the bucket (ListBucket, no prefix)",
        lambda c, b: c.head_bucket(Bucket=b),
        True,
    ),
    ("alice", "create a bucket", lambda c, b: c.create_bucket(Bucket=f"{b}-x"), True),
    ("bob", "put under his prefix", put(f"{R1}/clients/bob/delta"), False),
    ("bob", "get under alice's prefix", get(f"{R1}/clients/alice/seed"), True),
    ("bob", "list alice's prefix", list_(f"{R1}/clients/alice/"), True),
    ("root", "put on global/", put(f"{R1}/global/by-root"), False),
    ("root", "get under alice's prefix", get(f"{R1}/clients/alice/seed"), False),
    ("root", "unscoped list", list_(None), False),
    ("root", "put outside any grant", put("elsewhere/x"), False),
]


@pytest.mark.parametrize(
    ("who", "operation", "expect_refused"),
    [pytest.param(who, op, r, id=f"{who}: {what}") for who, what, op, r in SCOPED],
)
def test_a_scoped_policy_is_enforced_by_the_server(
    s3: S3Account,
    accounts: dict[str, S3Account],
    run_bucket: str,
    who: str,
    operation: Callable[[Any, str], Any],
    expect_refused: bool,
) -> None:
    account = s3 if who == "root" else accounts[who]
    assert refused(lambda: operation(account.client(), run_bucket)) is expect_refused


def test_what_a_client_lists_under_its_prefix_is_its_own(
    s3: S3Account, accounts: dict[str, S3Account], run_bucket: str
) -> None:
    s3.client().put_object(Bucket=run_bucket, Key=f"{R1}/clients/alice/listed", Body=b"x")
    listing = (
        accounts["alice"].client().list_objects_v2(Bucket=run_bucket, Prefix=f"{R1}/clients/alice/")
    )
    keys = {o["Key"] for o in listing.get("Contents", [])}
    assert f"{R1}/clients/alice/listed" in keys
    assert all(k.startswith(f"{R1}/clients/alice/") for k in keys)


def test_a_refused_write_leaves_nothing_behind(
    s3: S3Account, accounts: dict[str, S3Account], run_bucket: str
) -> None:
    key = f"{R1}/clients/bob/planted"
    assert refused(lambda: accounts["alice"].client().put_object(Bucket=run_bucket, Key=key))
    assert "Contents" not in s3.client().list_objects_v2(Bucket=run_bucket, Prefix=key)


def test_head_of_a_missing_key_is_404_where_granted_and_403_elsewhere(
    accounts: dict[str, S3Account], run_bucket: str
) -> None:
    """The trainer reads 404 as "absent": versitygw answers it to a reader the policy grants
    GetObject (it checks the policy before looking), whether or not ListBucket is granted too,
    and 403 where it grants nothing."""
    alice = accounts["alice"].client()
    with pytest.raises(ClientError) as missing:
        alice.head_object(Bucket=run_bucket, Key=f"{R1}/clients/alice/absent")
    assert missing.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert refused(lambda: alice.head_object(Bucket=run_bucket, Key=f"{R1}/clients/bob/absent"))


def test_a_user_cannot_create_accounts_and_names_are_unique(
    s3: S3Account, accounts: dict[str, S3Account]
) -> None:
    with pytest.raises(AdminError) as by_user:
        accounts["alice"].create_user(f"eve-{secrets.token_hex(3)}")
    assert by_user.value.code == "XAdminAccessDenied"
    with pytest.raises(AdminError) as taken:
        s3.create_user(accounts["alice"].name)
    assert taken.value.code == "XAdminUserExists"
    with pytest.raises(AdminError) as root_name:
        s3.create_user(s3.name)
    assert root_name.value.code == "XAdminUserExists"
    with pytest.raises(ValueError, match="account name"):
        s3.create_user("a/b")


def test_a_user_without_a_grant_is_refused_everything(s3: S3Account) -> None:
    """No bucket policy: the bucket's ACL (owner only) decides, and a new user is not its owner."""
    bucket = fresh_bucket(s3)
    s3.client().put_object(Bucket=bucket, Key="k", Body=b"x")
    carol = s3.create_user(f"carol-{secrets.token_hex(3)}").client()
    assert refused(lambda: carol.get_object(Bucket=bucket, Key="k"))
    assert refused(lambda: carol.put_object(Bucket=bucket, Key="k2", Body=b"x"))
    assert refused(lambda: carol.list_objects_v2(Bucket=bucket))


def put_anywhere(bucket: str, principal: Any) -> dict[str, Any]:
    """A policy letting `principal` (the Principal element as written) put any key."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": principal,
                "Action": "s3:PutObject",
                "Resource": f"arn:aws:s3:::{bucket}/*",
            }
        ],
    }


@pytest.mark.parametrize(
    "principal",
    [
        pytest.param(lambda name: name, id="a string"),
        pytest.param(lambda name: [name], id="a list"),
        pytest.param(lambda name: {"AWS": name}, id="AWS: a string"),
        pytest.param(lambda name: {"AWS": [name]}, id="AWS: a list"),
    ],
)
def test_principal_forms_naming_the_access_key_are_accepted(
    s3: S3Account, accounts: dict[str, S3Account], principal: Callable[[str], Any]
) -> None:
    bucket = fresh_bucket(s3)
    alice = accounts["alice"]
    policy = put_anywhere(bucket, principal(alice.name))
    s3.put_bucket_policy(bucket, policy)
    assert not refused(lambda: alice.client().put_object(Bucket=bucket, Key="k", Body=b"x"))
    assert refused(lambda: accounts["bob"].client().put_object(Bucket=bucket, Key="k", Body=b"x"))


@pytest.mark.parametrize(
    "principal",
    [
        pytest.param(lambda name: {"AWS": [f"arn:aws:iam::000000000000:user/{name}"]}, id="ARN"),
        pytest.param(lambda name: {"AWS": [f"{name}-nobody"]}, id="unknown name"),
    ],
)
def test_a_policy_naming_no_account_is_refused(
    s3: S3Account, accounts: dict[str, S3Account], principal: Callable[[str], Any]
) -> None:
    bucket = fresh_bucket(s3)
    policy = put_anywhere(bucket, principal(accounts["alice"].name))
    with pytest.raises(ClientError) as e:
        s3.put_bucket_policy(bucket, policy)
    assert e.value.response["Error"]["Code"] == "MalformedPolicy"
    assert "principal" in e.value.response["Error"]["Message"]


def test_not_principal_is_stored_but_ignored(s3: S3Account, accounts: dict[str, S3Account]) -> None:
    """versitygw parses neither NotPrincipal nor NotAction: a statement made of them is stored
    and matches nobody. So a Deny written with NotPrincipal denies nothing (here: bob still
    writes), and an Allow written with NotAction grants nothing. Policies must say Principal and
    Action."""
    bucket = fresh_bucket(s3)
    alice, bob = accounts["alice"], accounts["bob"]
    arn = f"arn:aws:s3:::{bucket}/*"
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            statement(alice, ["s3:PutObject"], [arn]),
            statement(bob, ["s3:PutObject"], [arn]),
            {
                "Effect": "Deny",
                "NotPrincipal": {"AWS": [alice.name]},
                "Action": "s3:*",
                "Resource": arn,
            },
            {
                "Effect": "Allow",
                "Principal": {"AWS": [bob.name]},
                "NotAction": "s3:PutObject",
                "Resource": arn,
            },
        ],
    }
    s3.put_bucket_policy(bucket, policy)
    assert not refused(lambda: bob.client().put_object(Bucket=bucket, Key="k", Body=b"x"))
    assert refused(lambda: bob.client().get_object(Bucket=bucket, Key="k"))


def test_policy_variables_and_identity_condition_keys_are_not_evaluated(
    s3: S3Account, accounts: dict[str, S3Account]
) -> None:
    """No single statement for every client: versitygw matches `${aws:username}` in a Resource
    literally, and never sets aws:username for a bucket policy's Condition (accepted, never
    true). A generated policy needs one set of statements per client."""
    bucket = fresh_bucket(s3)
    alice = accounts["alice"]
    arn = f"arn:aws:s3:::{bucket}"
    s3.put_bucket_policy(
        bucket,
        {
            "Version": "2012-10-17",
            "Statement": [
                statement(alice, ["s3:PutObject"], [arn + "/clients/${aws:username}/*"]),
                statement(
                    alice,
                    ["s3:PutObject"],
                    [arn + "/by-condition/*"],
                    Condition={"StringEquals": {"aws:username": alice.name}},
                ),
            ],
        },
    )
    client = alice.client()
    assert refused(lambda: client.put_object(Bucket=bucket, Key=f"clients/{alice.name}/k"))
    assert not refused(lambda: client.put_object(Bucket=bucket, Key="clients/${aws:username}/k"))
    assert refused(lambda: client.put_object(Bucket=bucket, Key="by-condition/k"))


def test_an_explicit_deny_wins_over_an_allow(s3: S3Account, accounts: dict[str, S3Account]) -> None:
    bucket = fresh_bucket(s3)
    alice = accounts["alice"]
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            statement(alice, ["s3:PutObject"], [f"arn:aws:s3:::{bucket}/*"]),
            {
                **statement(alice, ["s3:PutObject"], [f"arn:aws:s3:::{bucket}/locked/*"]),
                "Effect": "Deny",
            },
        ],
    }
    s3.put_bucket_policy(bucket, policy)
    client = alice.client()
    assert not refused(lambda: client.put_object(Bucket=bucket, Key="open/k", Body=b"x"))
    assert refused(lambda: client.put_object(Bucket=bucket, Key="locked/k", Body=b"x"))


def test_a_policy_as_large_as_aws_takes_is_stored_and_enforced(s3: S3Account) -> None:
    """AWS takes bucket policies up to 20 KB; versitygw's posix backend, its metadata in a
    sidecar directory (devcluster.s3.meta_dir_for), takes them too: the scoped policy of as
    many clients as fit (32; in extended attributes on ext4 it failed past 6)."""
    tag = secrets.token_hex(3)
    bucket = fresh_bucket(s3)

    def policy_of(n: int) -> dict[str, Any]:
        names = {f"c{i}": S3Account(s3.endpoint, f"c{i}-{tag}", "") for i in range(n)}
        return scoped_policy(bucket, names)

    n = 1
    while len(json.dumps(policy_of(n + 1))) <= 20_480:
        n += 1
    assert len(json.dumps(policy_of(n))) > 19_000
    many = {f"c{i}": s3.create_user(f"c{i}-{tag}") for i in range(n)}
    s3.put_bucket_policy(bucket, policy_of(n))
    last = many[f"c{n - 1}"].client()
    assert not refused(
        lambda: last.put_object(Bucket=bucket, Key=f"{R1}/clients/c{n - 1}/d", Body=b"x")
    )
    assert refused(lambda: last.put_object(Bucket=bucket, Key=f"{R1}/clients/c0/d", Body=b"x"))


def test_the_devclusters_server_has_accounts_and_policies(devcluster: DevCluster) -> None:
    """The server the devcluster runs for its pods is started the same way (server_argv)."""
    root = devcluster.s3
    alice = root.create_user(f"alice-{secrets.token_hex(3)}")
    bucket = fresh_bucket(root)
    root.put_bucket_policy(bucket, scoped_policy(bucket, {"alice": alice}))
    client = alice.client()
    assert not refused(lambda: client.put_object(Bucket=bucket, Key=f"{R1}/clients/alice/d"))
    assert refused(lambda: client.put_object(Bucket=bucket, Key=f"{R1}/global/model"))
    assert (devcluster.cluster.dir / "iam-s3-data" / "users.json").exists()


def test_the_server_keeps_accounts_and_metadata_beside_its_data(tmp_path: Path) -> None:
    argv = server_argv(tmp_path / "bin", 7070, tmp_path / "s3-data")
    assert argv[argv.index("--iam-dir") + 1] == str(tmp_path / "iam-s3-data")
    assert argv[argv.index("--sidecar") + 1] == str(tmp_path / "sidecar-s3-data")
    assert argv[-1] == str(tmp_path / "s3-data")
    assert (tmp_path / "iam-s3-data").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "sidecar-s3-data").is_dir()


def test_data_written_with_metadata_in_extended_attributes_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s3-data" / "old-bucket").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="older devcluster"):
        server_argv(tmp_path / "bin", 7070, tmp_path / "s3-data")
    (tmp_path / "sidecar-s3-data").mkdir()  # written with a sidecar: served
    assert server_argv(tmp_path / "bin", 7070, tmp_path / "s3-data")[-1].endswith("s3-data")


# --------------------------------------------------------------------------------------------
# Which policy action versitygw checks for each operation
# --------------------------------------------------------------------------------------------

OBJECT_ACTIONS = (
    "s3:PutObject",
    "s3:GetObject",
    "s3:DeleteObject",
    "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts",
    "s3:GetObjectAttributes",
    "s3:GetObjectTagging",
    "s3:PutObjectTagging",
)
BUCKET_ACTIONS = ("s3:ListBucket", "s3:ListBucketMultipartUploads", "s3:GetBucketLocation")
SMALL = TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20)
BIG = 11 * 2**20  # three parts of SMALL's chunk size
PREFIX = "runs/r1/rounds/1/clients/alice/"


def grant(bucket: str, who: S3Account, actions: set[str]) -> dict[str, Any]:
    """`actions` on every object of the bucket and on the bucket itself (each statement names
    the resource type its actions apply to: versitygw refuses a mismatched one)."""
    statements = []
    objects = sorted(a for a in actions if a in OBJECT_ACTIONS)
    buckets = sorted(a for a in actions if a in BUCKET_ACTIONS)
    if objects:
        statements.append(statement(who, objects, [f"arn:aws:s3:::{bucket}/*"]))
    if buckets:
        statements.append(statement(who, buckets, [f"arn:aws:s3:::{bucket}"]))
    return {"Version": "2012-10-17", "Statement": statements}


@dataclass(frozen=True)
class Op:
    """An S3 operation as alice performs it (`run(client, bucket, state)`), after the root
    account prepared what it needs (`setup(root_client, bucket) -> state`); `actions` is what
    versitygw checks for it, `trainer` what in the trainer's S3Store issues it."""

    name: str
    actions: frozenset[str]
    run: Callable[[Any, str, Any], Any]
    setup: Callable[[Any, str], Any] = lambda root, bucket: None
    trainer: str = ""


def seeded(size: int = 1000) -> Callable[[Any, str], Any]:
    def setup(root: Any, bucket: str) -> bytes:
        body = secrets.token_bytes(size)
        root.put_object(Bucket=bucket, Key=PREFIX + "obj", Body=body)
        return body

    return setup


def upload(root: Any, bucket: str) -> str:
    return root.create_multipart_upload(Bucket=bucket, Key=PREFIX + "mp")["UploadId"]


def upload_with_part(root: Any, bucket: str) -> tuple[str, str]:
    upload_id = upload(root, bucket)
    part = root.upload_part(
        Bucket=bucket, Key=PREFIX + "mp", UploadId=upload_id, PartNumber=1, Body=b"p" * 100
    )
    return upload_id, part["ETag"]


def get_whole(c: Any, b: str, body: bytes) -> None:
    assert c.get_object(Bucket=b, Key=PREFIX + "obj")["Body"].read() == body


def get_range(c: Any, b: str, body: bytes) -> None:
    got = c.get_object(Bucket=b, Key=PREFIX + "obj", Range="bytes=10-19")["Body"].read()
    assert got == body[10:20]


def download(c: Any, b: str, body: bytes) -> None:
    buf = io.BytesIO()
    c.download_fileobj(b, PREFIX + "obj", buf, Config=SMALL)
    assert buf.getvalue() == body


def complete(c: Any, b: str, state: tuple[str, str]) -> None:
    upload_id, etag = state
    parts = {"Parts": [{"PartNumber": 1, "ETag": etag}]}
    c.complete_multipart_upload(
        Bucket=b, Key=PREFIX + "mp", UploadId=upload_id, MultipartUpload=parts
    )


OPS = [
    Op(
        "PutObject",
        frozenset({"s3:PutObject"}),
        lambda c, b, _: c.put_object(Bucket=b, Key=PREFIX + "new", Body=b"x"),
        trainer="put_bytes/put_file below the multipart threshold",
    ),
    Op(
        "upload_fileobj of 11 MiB (CreateMultipartUpload, UploadPart x3, Complete)",
        frozenset({"s3:PutObject"}),
        lambda c, b, _: c.upload_fileobj(io.BytesIO(b"u" * BIG), b, PREFIX + "big", Config=SMALL),
        trainer="put_bytes/put_file above the multipart threshold",
    ),
    Op(
        "CreateMultipartUpload",
        frozenset({"s3:PutObject"}),
        lambda c, b, _: c.create_multipart_upload(Bucket=b, Key=PREFIX + "mp"),
    ),
    Op(
        "UploadPart (of an upload the root began)",
        frozenset({"s3:PutObject"}),
        lambda c, b, upload_id: c.upload_part(
            Bucket=b, Key=PREFIX + "mp", UploadId=upload_id, PartNumber=1, Body=b"p"
        ),
        setup=upload,
    ),
    Op(
        "CompleteMultipartUpload",
        frozenset({"s3:PutObject"}),
        complete,
        setup=upload_with_part,
    ),
    Op(
        "AbortMultipartUpload",
        frozenset({"s3:AbortMultipartUpload"}),
        lambda c, b, upload_id: c.abort_multipart_upload(
            Bucket=b, Key=PREFIX + "mp", UploadId=upload_id
        ),
        setup=upload,
        trainer="s3transfer, when a multipart upload fails",
    ),
    Op(
        "ListParts",
        frozenset({"s3:ListMultipartUploadParts"}),
        lambda c, b, upload_id: c.list_parts(Bucket=b, Key=PREFIX + "mp", UploadId=upload_id),
        setup=upload,
    ),
    Op(
        "ListMultipartUploads",
        frozenset({"s3:ListBucketMultipartUploads"}),
        lambda c, b, _: c.list_multipart_uploads(Bucket=b, Prefix=PREFIX),
        setup=upload,
    ),
    Op(
        "GetObject",
        frozenset({"s3:GetObject"}),
        get_whole,
        setup=seeded(),
        trainer="get_bytes/get_file with max_bytes",
    ),
    Op(
        "GetObject with Range",
        frozenset({"s3:GetObject"}),
        get_range,
        setup=seeded(),
        trainer="get_range",
    ),
    Op(
        "HeadObject",
        frozenset({"s3:GetObject"}),
        lambda c, b, _: c.head_object(Bucket=b, Key=PREFIX + "obj"),
        setup=seeded(),
        trainer="exists, the model cache's listing of one object",
    ),
    Op(
        "download_fileobj of 11 MiB (HeadObject, ranged GetObject x3)",
        frozenset({"s3:GetObject"}),
        download,
        setup=seeded(BIG),
        trainer="get_bytes/get_file without max_bytes",
    ),
    Op(
        "DeleteObject",
        frozenset({"s3:DeleteObject"}),
        lambda c, b, _: c.delete_object(Bucket=b, Key=PREFIX + "obj"),
        setup=seeded(),
        trainer="delete",
    ),
    Op(
        "DeleteObjects (refused keys come back in Errors, with HTTP 200)",
        frozenset({"s3:DeleteObject"}),
        lambda c, b, _: c.delete_objects(
            Bucket=b, Delete={"Objects": [{"Key": PREFIX + "obj"}], "Quiet": True}
        ),
        setup=seeded(),
        trainer="delete_prefix",
    ),
    Op(
        "ListObjectsV2 with a prefix",
        frozenset({"s3:ListBucket"}),
        lambda c, b, _: c.list_objects_v2(Bucket=b, Prefix=PREFIX),
        setup=seeded(),
        trainer="list, delete_prefix, the model cache's listing of a prefix",
    ),
    Op(
        "HeadBucket",
        frozenset({"s3:ListBucket"}),
        lambda c, b, _: c.head_bucket(Bucket=b),
    ),
    Op(
        "CopyObject (GetObject on the source, PutObject on the target)",
        frozenset({"s3:GetObject", "s3:PutObject"}),
        lambda c, b, _: c.copy_object(
            Bucket=b, Key=PREFIX + "copy", CopySource={"Bucket": b, "Key": PREFIX + "obj"}
        ),
        setup=seeded(),
    ),
]


def run_op(s3: S3Account, alice: S3Account, op: Op, actions: set[str]) -> bool:
    """Whether alice was refused `op` with exactly `actions` granted."""
    bucket = fresh_bucket(s3)
    state = op.setup(s3.client(), bucket)
    s3.put_bucket_policy(bucket, grant(bucket, alice, actions))
    return refused(lambda: op.run(alice.client(), bucket, state))


@pytest.mark.parametrize("op", [pytest.param(op, id=op.name) for op in OPS])
def test_an_operation_goes_through_with_exactly_its_actions(
    s3: S3Account, accounts: dict[str, S3Account], op: Op
) -> None:
    assert not run_op(s3, accounts["alice"], op, set(op.actions))


@pytest.mark.parametrize(
    ("op", "withheld"),
    [
        pytest.param(op, action, id=f"{op.name} without {action}")
        for op in OPS
        for action in sorted(op.actions)
    ],
)
def test_an_operation_is_refused_without_each_of_its_actions(
    s3: S3Account, accounts: dict[str, S3Account], op: Op, withheld: str
) -> None:
    everything_else = set(OBJECT_ACTIONS + BUCKET_ACTIONS) - {withheld}
    assert run_op(s3, accounts["alice"], op, everything_else)


def test_the_table_names_only_actions_versitygw_knows(
    s3: S3Account, accounts: dict[str, S3Account]
) -> None:
    """Every candidate action is accepted in a policy (a typo would be MalformedPolicy)."""
    bucket = fresh_bucket(s3)
    s3.put_bucket_policy(
        bucket, grant(bucket, accounts["alice"], set(OBJECT_ACTIONS + BUCKET_ACTIONS))
    )
    stored = json.loads(s3.client().get_bucket_policy(Bucket=bucket)["Policy"])
    granted = {a for st in stored["Statement"] for a in st["Action"]}
    assert granted == set(OBJECT_ACTIONS + BUCKET_ACTIONS)
