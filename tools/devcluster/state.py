"""What every part of the devcluster agrees on: the repository it runs from, the cache every clone
shares, the node's name, and `ClusterState`, what a running cluster is (kept in `state.json`).

It imports nothing of the devcluster, so the cluster, the real node and the tools all share it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
NODE_NAME = "devnode"
NODE_KINDS = ("process", "real")


def cache_root() -> Path:
    """The cache every clone shares, as tools/setup-python.sh and build-binaries.sh compute it."""
    explicit = os.environ.get("FEDTUNE_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fedtune"


@dataclass
class ClusterState:
    """What a running cluster is: where it listens and what its S3 account is. A cluster that
    uses another's S3 server (`Cluster.up(storage=...)`) has no port of its own (`s3_port` 0):
    `shared_s3_endpoint` says where its storage is, and the keys are the account it was given."""

    etcd_port: int
    etcd_peer_port: int
    api_port: int
    kcm_port: int
    s3_port: int
    s3_access_key: str
    s3_secret_key: str
    bin_dir: str
    node: str = "process"
    registry_port: int = 0
    sched_port: int = 0
    proxy_port: int = 0
    shared_s3_endpoint: str = ""

    @property
    def api_url(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def s3_endpoint(self) -> str:
        return self.shared_s3_endpoint or f"http://127.0.0.1:{self.s3_port}"
