"""A federation on the devcluster: a run's cluster and the clusters of its sites side by side, each
with an etcd, an API server, a controller manager and a kubelet of its own, all meeting at one S3
server, the run cluster's.

The shape of fedtune's sites: a data owner's cluster joins a run that lives in another cluster
through the run's storage alone (no kubeconfig of the other, no inbound port). So a site's cluster
runs no S3 server (`Cluster.up(storage=...)`) and holds an account of its own on the run's, which
the bucket's policy confines to the site's prefix (read and write) and the shared prefixes (read):
the server refuses the rest, as a real store would, not the test.

Layout under the federation's directory: `run/` (the run's cluster and its S3 data) and
`sites/<name>/`, one state directory each, as `devcluster --dir` takes them.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devcluster.cluster import Cluster
from devcluster.s3 import S3Account
from devcluster.testing import DevCluster

SITE_ACTIONS = ["s3:PutObject", "s3:GetObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
"""What a site may do under its own prefix: write, read back and clean up (multipart included)."""


@dataclass(frozen=True)
class Site:
    """One site: its cluster (a control plane and kubelet of its own, the run's S3 server, its
    own account on it) and the prefix that account may write."""

    name: str
    prefix: str
    dc: DevCluster

    @property
    def s3(self) -> S3Account:
        """The site's own account on the run's S3 server (what `dc.cluster.env()` exports)."""
        return self.dc.s3


@dataclass
class Federation:
    """The run's cluster (its S3 root account is `run.s3`) and its sites, by name. As a context
    manager (`with start_federation(...) as fed:`, a module-scoped fixture's body), it is
    stopped on leaving."""

    run: DevCluster
    sites: dict[str, Site]
    bucket: str

    def clusters(self) -> dict[str, DevCluster]:
        """Every cluster by name, the run's as "run"."""
        return {"run": self.run, **{name: site.dc for name, site in self.sites.items()}}

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def down(self) -> None:
        """The sites first, then the run's cluster: its S3 server, which they use, goes last."""
        try:
            for site in self.sites.values():
                site.dc.cluster.down(quiet=True)
        finally:
            self.run.cluster.down(quiet=True)


def allow(
    principal: dict[str, Any], actions: list[str], resources: list[str], **extra: Any
) -> dict[str, Any]:
    """One Allow statement of a bucket policy."""
    statement = {"Effect": "Allow", "Principal": principal, "Action": actions}
    return {**statement, "Resource": resources, **extra}


def prefix_policy(bucket: str, sites: Sequence[Site], shared: Sequence[str]) -> dict[str, Any]:
    """The bucket policy: each site's account reads and writes its own prefix, reads the shared
    ones, and lists only those. Prefixes end in '/', so `runs/r1/sites/a/` does not also grant
    `runs/r1/sites/ab/`."""
    arn = f"arn:aws:s3:::{bucket}"
    statements: list[dict[str, Any]] = []
    for site in sites:
        who = {"AWS": [site.s3.name]}
        readable = [site.prefix, *shared]
        statements.append(allow(who, SITE_ACTIONS, [f"{arn}/{site.prefix}*"]))
        if shared:
            statements.append(allow(who, ["s3:GetObject"], [f"{arn}/{p}*" for p in shared]))
        listable = {"StringLike": {"s3:prefix": [f"{p}*" for p in readable]}}
        statements.append(allow(who, ["s3:ListBucket"], [arn], Condition=listable))
    return {"Version": "2012-10-17", "Statement": statements}


def remove_federation(root: Path) -> None:
    """Stop whatever an earlier federation left running under `root` (a test session that was
    killed), sites first, and remove the directory: `start_federation` wants it fresh."""
    for directory in [*sorted(root.glob("sites/*")), root / "run"]:
        if (directory / "state.json").exists():
            Cluster(directory).down(quiet=True)
    shutil.rmtree(root, ignore_errors=True)


def start_federation(
    root: Path,
    sites: Mapping[str, str],
    *,
    bucket: str,
    shared: Sequence[str] = (),
    pod_env: dict[str, str] | None = None,
) -> Federation:
    """Start the run's cluster in `root/run`, then one cluster per site (`sites`: name -> the
    prefix its account may write, ending in '/') in `root/sites/<name>`, side by side. The run's
    S3 server gets `bucket`, an account per site (named as the site) and the policy of
    `prefix_policy`. On a failure, whatever started is stopped again.

    `root` should be fresh: an account name is taken for the server's life, and a state
    directory from before would bring back its etcd's objects. The sites start concurrently:
    most of a control plane's start is waiting on its readiness."""
    for name, prefix in sites.items():
        if name == "run" or not prefix.endswith("/"):
            raise ValueError(
                f"site {name!r}, prefix {prefix!r}: 'run' is the run's cluster, and a "
                "prefix ends in '/'"
            )
    run_cluster = Cluster(root / "run")
    started: list[Cluster] = [run_cluster]
    try:
        run = DevCluster(run_cluster, run_cluster.up(pod_env=pod_env))
        run.s3.bucket(bucket)
        accounts = {name: run.s3.create_user(name) for name in sites}

        def up(name: str) -> Site:
            cluster = Cluster(root / "sites" / name)
            started.append(cluster)
            state = cluster.up(pod_env=pod_env, storage=accounts[name])
            return Site(name, sites[name], DevCluster(cluster, state))

        with ThreadPoolExecutor(max_workers=max(1, len(sites))) as pool:
            members = {site.name: site for site in pool.map(up, sites)}
        run.s3.put_bucket_policy(bucket, prefix_policy(bucket, list(members.values()), shared))
        return Federation(run, members, bucket)
    except BaseException:
        for cluster in reversed(started):
            with contextlib.suppress(Exception):
                cluster.down(quiet=True)
        raise
