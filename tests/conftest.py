"""Session fixtures shared by every test package: the devcluster, a standalone S3 server and the
real pretrained model."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster.cluster import REPO_ROOT, Cluster, build_binaries
from devcluster.net import free_port
from devcluster.pretrained import ensure_model
from devcluster.s3 import S3Account, S3Server
from devcluster.testing import DevCluster

# A separate directory per checkout (or per FEDTUNE_TEST_CLUSTER_DIR), apart from `make cluster-up`.
TEST_CLUSTER_DIR = Path(
    os.environ.get("FEDTUNE_TEST_CLUSTER_DIR") or REPO_ROOT / ".devcluster" / "pytest"
)


@pytest.fixture(scope="session")
def binaries() -> Path:
    return build_binaries()


@pytest.fixture(scope="session")
def real_model() -> Path:
    """The pretrained SmolLM2-135M-Instruct as a Hugging Face directory (read-only: it is the
    machine's shared cache). `make test` converts it beforehand; a plain pytest run converts it
    here on first use (about a minute, once per machine)."""
    return ensure_model()


@pytest.fixture(scope="session")
def s3(binaries: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Account]:
    """A real S3-compatible server (versitygw), started once per session."""
    server = S3Server(binaries, tmp_path_factory.mktemp("s3") / "data", free_port())
    account = server.start()
    yield account
    server.stop()


@pytest.fixture(scope="session")
def devcluster() -> Iterator[DevCluster]:
    """A real control plane, started once for every e2e test, stopped at the end."""
    if TEST_CLUSTER_DIR.exists():
        Cluster(TEST_CLUSTER_DIR).down(quiet=True)
        shutil.rmtree(TEST_CLUSTER_DIR)
    cluster = Cluster(TEST_CLUSTER_DIR)
    state = cluster.up(pod_env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    try:
        yield DevCluster(cluster, state)
    finally:
        cluster.down(quiet=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """On an e2e failure, attach the control plane's and the pods' log tails to the report."""
    report = yield
    if report.failed and "devcluster" in getattr(item, "fixturenames", ()):
        dc = item.funcargs.get("devcluster") if hasattr(item, "funcargs") else None
        if isinstance(dc, DevCluster):
            report.sections.append(("devcluster logs", dc.logs()))
    return report


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use the devcluster are e2e, whether or not they say so."""
    for item in items:
        if "devcluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)
