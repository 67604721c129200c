"""Separate S3 accounts and bucket policies, enforced by the real server (versitygw 1.8).

A run's layout under a policy that scopes each client to its own prefix (what issue 20's
generated policies are to do): what alice may and may not do, answered by the server itself.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import pytest
from botocore.exceptions import ClientError

from devcluster.s3 import AdminError, S3Account

RUN = "runs/r1"
CLIENTS = ("alice", "bob")


def refused(call: Callable[[], Any]) -> bool:
    """Whether the server answered 403 AccessDenied (False when the call went through); any
    other error propagates. A transfer (upload_fileobj) wraps the ClientError, and DeleteObjects
    reports a refused key inside a 200 answer: both count as refused."""
    try:
        result = call()
    except Exception as e:
        error: BaseException | None = e
        while error is not None and not isinstance(error, ClientError):
            error = error.__cause__ or error.__context__
        if error is None:
            raise
        status = error.response["ResponseMetadata"]["HTTPStatusCode"]
        code = error.response["Error"]["Code"]
        if status == 403 and code in ("AccessDenied", "403"):  # HEAD answers have no body
            return True
        raise
    if isinstance(result, dict) and result.get("Errors"):
        codes = {e["Code"] for e in result["Errors"]}
        assert codes == {"AccessDenied"}, result["Errors"]
        return True
    return False


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
