"""Several devclusters side by side on one storage: a run's cluster and two sites' clusters, what
fedtune's sites need (a data owner's cluster meets a run's only through the run's S3 storage).

Each cluster is a control plane of its own (its etcd, API server and CA; what one holds, the
others do not) and runs its Jobs on its own kubelet. The sites run no S3 server: they use the
run's, each with an account that the server itself (versitygw, not the test) confines to the
site's prefix plus reads of the shared one. Stopping a site leaves the run and its storage
serving. The federation starts once for the module; the test that stops a site comes last.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from devcluster import pki
from devcluster.cluster import REPO_ROOT
from devcluster.federation import Federation, Site, remove_federation, start_federation
from devcluster.net import https_ok
from devcluster.s3 import health_status
from devcluster.testing import DevCluster, refused, wait_for

pytestmark = pytest.mark.e2e

FEDERATION_DIR = REPO_ROOT / ".devcluster" / "pytest-federation"
BUCKET = "federation"
RUN = "runs/r1"
SITES = {name: f"{RUN}/sites/{name}/" for name in ("site-a", "site-b")}
SHARED = f"{RUN}/shared/"
PRIVATE = f"{RUN}/private/"
"""The run's own prefix: no site's account is granted anything there."""
CLUSTERS = ("run", *SITES)


@pytest.fixture(scope="module")
def fed() -> Iterator[Federation]:
    """The run's cluster and both sites, with an object seeded by the run's root account under
    each site's prefix, the shared prefix and the run's private one."""
    remove_federation(FEDERATION_DIR)
    with start_federation(
        FEDERATION_DIR, SITES, bucket=BUCKET, shared=[SHARED], pod_env={"OMP_NUM_THREADS": "1"}
    ) as f:
        root = f.run.s3.client()
        for key in [*(f"{p}seed" for p in SITES.values()), f"{SHARED}seed", f"{PRIVATE}seed"]:
            root.put_object(Bucket=BUCKET, Key=key, Body=b"seeded by the run")
        yield f


def reaches(dc: DevCluster, credentials_of: DevCluster) -> bool:
    """Whether `dc`'s API server answers /readyz to another cluster's admin, verified against
    that cluster's CA: what its kubeconfig holds."""
    pki_dir = credentials_of.cluster.pki_dir
    admin = pki.CertPair(pki_dir / "admin.crt", pki_dir / "admin.key")
    return https_ok(f"{dc.state.api_url}/readyz", pki_dir / "ca.crt", admin)


# -- (a) three control planes -------------------------------------------------------------------


def test_each_cluster_has_its_own_control_plane_and_the_run_s_storage(fed: Federation) -> None:
    clusters = fed.clusters()
    states = {name: dc.state for name, dc in clusters.items()}
    for port in ("api_port", "etcd_port", "etcd_peer_port", "kcm_port"):
        assert len({getattr(s, port) for s in states.values()}) == len(CLUSTERS), port
    cas = {(dc.cluster.pki_dir / "ca.crt").read_bytes() for dc in clusters.values()}
    assert len(cas) == len(CLUSTERS)
    # One S3 server, the run's: the sites have none, and say where theirs is.
    assert "s3" in fed.run.cluster.components
    assert states["run"].s3_port
    for name in SITES:
        site = clusters[name]
        assert "s3" not in site.cluster.components
        assert states[name].s3_port == 0
        assert site.cluster.env()["AWS_ENDPOINT_URL"] == fed.run.s3.endpoint
        assert site.cluster.env()["AWS_ACCESS_KEY_ID"] == name


@pytest.mark.parametrize("server", CLUSTERS)
@pytest.mark.parametrize("client", CLUSTERS)
def test_an_api_server_answers_only_its_own_cluster_s_credentials(
    fed: Federation, server: str, client: str
) -> None:
    """Each API server's certificate is signed by its cluster's CA alone: another cluster's
    kubeconfig (CA and admin certificate) does not get through."""
    clusters = fed.clusters()
    assert reaches(clusters[server], credentials_of=clusters[client]) is (server == client)


@pytest.mark.parametrize("creator", CLUSTERS)
def test_what_one_cluster_holds_the_others_do_not(fed: Federation, creator: str) -> None:
    clusters = fed.clusters()
    ns = f"made-in-{creator}"
    clusters[creator].kubectl("create", "namespace", ns)
    clusters[creator].kubectl(
        "create", "configmap", "mark", "-n", ns, f"--from-literal=by={creator}"
    )
    for name, dc in clusters.items():
        got = dc.kubectl("get", "configmap", "mark", "-n", ns, "-o", "json", check=False)
        if name == creator:
            assert json.loads(got.stdout)["data"] == {"by": creator}
        else:
            assert "NotFound" in got.stderr, (name, got.stderr)


POD_SCRIPT = """
import os, boto3
port = os.environ["KUBERNETES_SERVICE_PORT"]
boto3.client("s3").put_object(Bucket=os.environ["BUCKET"], Key=os.environ["KEY"], Body=port)
open("/dev/termination-log", "w").write(port)
"""


def site_job(site: Site, name: str) -> dict[str, Any]:
    """A Job whose pod reports which API server its kubelet gave it and writes that to the
    site's prefix with the site's own account (from a Secret, as a site's pods would get it)."""
    env = [{"name": "BUCKET", "value": BUCKET}, {"name": "KEY", "value": f"{site.prefix}{name}"}]
    container = {
        "name": "main",
        "image": "python:3.11",
        "command": ["python", "-c", POD_SCRIPT],
        "env": env,
        "envFrom": [{"secretRef": {"name": "storage"}}],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {"spec": {"restartPolicy": "Never", "containers": [container]}},
        },
    }


def job_outcome(dc: DevCluster, ns: str, name: str) -> str | None:
    job = json.loads(dc.kubectl("get", "job", name, "-n", ns, "-o", "json").stdout)
    done = [c["type"] for c in job.get("status", {}).get("conditions", [])]
    return next((c for c in done if c in ("Complete", "Failed")), None)


@pytest.mark.parametrize("name", SITES)
def test_a_site_s_job_runs_on_its_own_kubelet_and_writes_to_the_run_s_storage(
    fed: Federation, name: str
) -> None:
    site = fed.sites[name]
    dc = site.dc
    ns = "site-jobs"
    dc.kubectl("create", "namespace", ns)
    secret = [f"--from-literal={k}={v}" for k, v in site.s3.env().items()]
    dc.kubectl("create", "secret", "generic", "storage", "-n", ns, *secret)
    dc.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(site_job(site, "report")))
    outcome = wait_for(
        lambda: job_outcome(dc, ns, "report"), timeout=90, what="the job", diagnose=dc.logs
    )
    assert outcome == "Complete", dc.logs()
    pods = json.loads(dc.kubectl("get", "pods", "-n", ns, "-o", "json").stdout)["items"]
    (pod,) = pods
    message = pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"]
    assert message == str(dc.state.api_port)
    # Its own kubelet ran it: the pod's log is in this site's state directory, no other's.
    log = f"{ns}_{pod['metadata']['name']}_main.log"
    ran = [n for n, c in fed.clusters().items() if (c.cluster.log_dir / "pods" / log).exists()]
    assert ran == [name]
    body = fed.run.s3.client().get_object(Bucket=BUCKET, Key=f"{site.prefix}report")["Body"]
    assert body.read().decode() == message


# -- (b) storage: one server, each site confined to its prefix ----------------------------------


def put(key: str) -> Callable[[Any], Any]:
    return lambda c: c.put_object(Bucket=BUCKET, Key=key, Body=b"written by a site")


def get(key: str) -> Callable[[Any], Any]:
    return lambda c: c.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def list_(prefix: str) -> Callable[[Any], Any]:
    return lambda c: c.list_objects_v2(Bucket=BUCKET, Prefix=prefix)


OTHER = {"site-a": "site-b", "site-b": "site-a"}

# (what, the operation given the site's own prefix and the other site's, refused?)
STORAGE = [
    ("put under its own prefix", lambda own, other: put(f"{own}object"), False),
    ("get under its own prefix", lambda own, other: get(f"{own}seed"), False),
    ("list its own prefix", lambda own, other: list_(own), False),
    ("get under the shared prefix", lambda own, other: get(f"{SHARED}seed"), False),
    ("list the shared prefix", lambda own, other: list_(SHARED), False),
    ("put under the shared prefix", lambda own, other: put(f"{SHARED}object"), True),
    ("put under the other site's prefix", lambda own, other: put(f"{other}object"), True),
    ("get under the other site's prefix", lambda own, other: get(f"{other}seed"), True),
    ("list the other site's prefix", lambda own, other: list_(other), True),
    ("put under the run's private prefix", lambda own, other: put(f"{PRIVATE}object"), True),
    ("get under the run's private prefix", lambda own, other: get(f"{PRIVATE}seed"), True),
    ("list the whole run", lambda own, other: list_(f"{RUN}/"), True),
]


@pytest.mark.parametrize(
    ("operation", "expect_refused"),
    [pytest.param(op, r, id=what) for what, op, r in STORAGE],
)
@pytest.mark.parametrize("name", SITES)
def test_a_site_s_account_is_confined_to_its_prefix_by_the_server(
    fed: Federation,
    name: str,
    operation: Callable[[str, str], Callable[[Any], Any]],
    expect_refused: bool,
) -> None:
    """`refused` is True only on the server's own 403 AccessDenied; any other error fails."""
    call = operation(SITES[name], SITES[OTHER[name]])
    client = fed.sites[name].s3.client()
    assert refused(lambda: call(client)) is expect_refused


# -- (c) a site goes away -----------------------------------------------------------------------


def test_stopping_a_site_leaves_the_run_and_its_storage_serving(fed: Federation) -> None:
    """Last in the module: site-b stays stopped."""
    gone, kept = fed.sites["site-b"].dc, fed.sites["site-a"]
    gone.cluster.down(quiet=True)
    assert not any(gone.cluster.processes.alive(c) for c in gone.cluster.components)
    assert not reaches(gone, credentials_of=gone)
    assert fed.run.cluster.is_running()  # its S3 server included
    assert health_status(fed.run.s3.endpoint) == 200
    assert fed.run.kubectl("get", "nodes").returncode == 0
    assert kept.dc.cluster.is_running()
    client = kept.s3.client()
    client.put_object(Bucket=BUCKET, Key=f"{kept.prefix}after", Body=b"still here")
    assert get(f"{kept.prefix}after")(client) == b"still here"
