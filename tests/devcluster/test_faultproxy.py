"""The fault proxy holds exactly the request it is armed for, and relays everything else."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from devcluster.faultproxy import FaultProxy
from devcluster.s3 import S3Account
from devcluster.testing import wait_for


@pytest.fixture
def proxy(s3: S3Account) -> Iterator[FaultProxy]:
    p = FaultProxy(int(s3.endpoint.rsplit(":", 1)[1]))
    yield p
    p.close()


def test_a_held_put_waits_until_released_then_its_retry_goes_through(
    s3: S3Account, proxy: FaultProxy
) -> None:
    direct = s3.client()
    direct.create_bucket(Bucket="held")
    via = S3Account(proxy.endpoint, s3.access_key, s3.secret_key).client()
    via.put_object(Bucket="held", Key="before", Body=b"relayed")  # not armed: relayed
    proxy.hold(b"PUT /held/key")
    done = threading.Event()

    def put() -> None:
        via.put_object(Bucket="held", Key="other", Body=b"not held")
        via.put_object(Bucket="held", Key="key", Body=b"after the retry")
        done.set()

    threading.Thread(target=put, daemon=True).start()
    wait_for(proxy.held.is_set, timeout=30, what="the PUT of key to be held")
    assert direct.get_object(Bucket="held", Key="other")["Body"].read() == b"not held"
    assert "Contents" not in direct.list_objects_v2(Bucket="held", Prefix="key")
    assert not done.is_set()
    proxy.release()
    wait_for(done.is_set, timeout=30, what="the retried PUT")
    assert direct.get_object(Bucket="held", Key="key")["Body"].read() == b"after the retry"
    assert direct.get_object(Bucket="held", Key="before")["Body"].read() == b"relayed"
