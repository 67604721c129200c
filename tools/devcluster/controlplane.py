"""The control plane as the devcluster runs it: its certificates, the kubeconfigs of the API
server's clients, and the command lines of etcd, kube-apiserver and kube-controller-manager.

Everything here is computed, not started: `Cluster.up` (cluster.py) starts the commands in order.
On the real node, the API server listens where pods reach it (`node_ip`) and the node's own
components get certificates of their own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from devcluster import pki
from devcluster.state import NODE_NAME, ClusterState

SERVICE_CIDR = "10.0.0.0/24"
ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN = "admin"
"""The client whose kubeconfig is the cluster's own (`.devcluster/kubeconfig`): system:masters."""


@dataclass(frozen=True)
class Certificates:
    """What the control plane's TLS rests on, and one client certificate per API client."""

    ca: pki.CertPair
    apiserver: pki.CertPair
    service_accounts: pki.CertPair
    clients: dict[str, pki.CertPair]
    """Kubeconfig user name -> its client certificate."""


def issue_certificates(pki_dir: Path, *, node_ip: str | None) -> Certificates:
    """The CA and every certificate signed by it, made once per cluster directory. `node_ip` is
    the real node's address (None on the process node): its kubelet serves TLS there, and its
    scheduler and kube-proxy are clients of their own."""
    pki_dir.mkdir(parents=True, exist_ok=True)
    ca = pki.ensure_ca(pki_dir)
    apiserver = pki.ensure_cert(
        pki_dir,
        "apiserver",
        ca,
        common_name="kube-apiserver",
        server=True,
        dns=(
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ),
        ips=("127.0.0.1", "10.0.0.1"),
    )
    clients = {
        ADMIN: pki.ensure_cert(
            pki_dir, "admin", ca, common_name="devcluster-admin", org="system:masters"
        ),
        "kcm": pki.ensure_cert(pki_dir, "kcm", ca, common_name="system:kube-controller-manager"),
        "kubelet": pki.ensure_cert(
            pki_dir, "kubelet", ca, common_name="devcluster-kubelet", org="system:masters"
        ),
    }
    service_accounts = pki.ensure_service_account_keys(pki_dir)
    if node_ip is not None:
        pki.ensure_cert(
            pki_dir,
            "kubelet-serving",
            ca,
            common_name=f"system:node:{NODE_NAME}",
            server=True,
            dns=(NODE_NAME,),
            ips=(node_ip,),
        )
        for name, cn in (("scheduler", "system:kube-scheduler"), ("proxy", "system:kube-proxy")):
            clients[name] = pki.ensure_cert(pki_dir, name, ca, common_name=cn)
    return Certificates(ca, apiserver, service_accounts, clients)


def kubeconfig_text(state: ClusterState, ca: Path, client: pki.CertPair, user: str) -> str:
    """A kubeconfig that reaches the API server as `user`, with `client`'s certificate."""
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "devcluster",
                    "cluster": {"server": state.api_url, "certificate-authority": str(ca)},
                }
            ],
            "users": [
                {
                    "name": user,
                    "user": {"client-certificate": str(client.cert), "client-key": str(client.key)},
                }
            ],
            "contexts": [
                {"name": "devcluster", "context": {"cluster": "devcluster", "user": user}}
            ],
            "current-context": "devcluster",
        },
        indent=2,
    )


def etcd_argv(bin_dir: Path, state: ClusterState, data_dir: Path) -> list[str]:
    return [
        str(bin_dir / "etcd"),
        "--name",
        "devcluster",
        "--data-dir",
        str(data_dir),
        "--listen-client-urls",
        f"http://127.0.0.1:{state.etcd_port}",
        "--advertise-client-urls",
        f"http://127.0.0.1:{state.etcd_port}",
        "--listen-peer-urls",
        f"http://127.0.0.1:{state.etcd_peer_port}",
        "--initial-advertise-peer-urls",
        f"http://127.0.0.1:{state.etcd_peer_port}",
        "--initial-cluster",
        f"devcluster=http://127.0.0.1:{state.etcd_peer_port}",
        "--unsafe-no-fsync",
        "--log-level",
        "warn",
    ]


def apiserver_network(certs: Certificates, node_ip: str | None) -> list[str]:
    """Where the API server listens and what it advertises."""
    if node_ip is None:
        return [
            "--bind-address",
            "127.0.0.1",
            "--advertise-address",
            "127.0.0.1",
            "--endpoint-reconciler-type",
            "none",
        ]
    # Pods reach it through the `kubernetes` Service at the node's address, and it reaches the
    # kubelet there (kubectl logs).
    admin = certs.clients[ADMIN]
    return [
        "--bind-address",
        "0.0.0.0",
        "--advertise-address",
        node_ip,
        "--kubelet-preferred-address-types",
        "InternalIP,Hostname",
        "--kubelet-client-certificate",
        str(admin.cert),
        "--kubelet-client-key",
        str(admin.key),
    ]


def apiserver_argv(
    bin_dir: Path, state: ClusterState, certs: Certificates, pki_dir: Path, node_ip: str | None
) -> list[str]:
    return [
        str(bin_dir / "kube-apiserver"),
        "--etcd-servers",
        f"http://127.0.0.1:{state.etcd_port}",
        *apiserver_network(certs, node_ip),
        "--secure-port",
        str(state.api_port),
        "--tls-cert-file",
        str(certs.apiserver.cert),
        "--tls-private-key-file",
        str(certs.apiserver.key),
        "--client-ca-file",
        str(certs.ca.cert),
        "--authorization-mode",
        "RBAC",
        "--enable-admission-plugins",
        "NamespaceLifecycle,ServiceAccount,PodSecurity,"
        "LimitRanger,DefaultTolerationSeconds,ResourceQuota,"
        "MutatingAdmissionPolicy,ValidatingAdmissionPolicy",
        "--service-account-issuer",
        ISSUER,
        "--service-account-key-file",
        str(certs.service_accounts.cert),
        "--service-account-signing-key-file",
        str(certs.service_accounts.key),
        "--service-cluster-ip-range",
        SERVICE_CIDR,
        "--allow-privileged=true",
        "--profiling=false",
        "--cert-dir",
        str(pki_dir / "apiserver-generated"),
    ]


def controller_manager_argv(
    bin_dir: Path,
    state: ClusterState,
    certs: Certificates,
    kubeconfig: Path,
    pki_dir: Path,
    *,
    node_lifecycle: bool,
) -> list[str]:
    """`node_lifecycle`: whether the node lifecycle controller runs (on the real node, whose
    taints are that controller's to lift)."""
    return [
        str(bin_dir / "kube-controller-manager"),
        "--kubeconfig",
        str(kubeconfig),
        "--authentication-kubeconfig",
        str(kubeconfig),
        "--authorization-kubeconfig",
        str(kubeconfig),
        "--bind-address",
        "127.0.0.1",
        "--secure-port",
        str(state.kcm_port),
        "--cert-dir",
        str(pki_dir / "kcm-generated"),
        "--controllers",
        ("*," if node_lifecycle else "*,-nodelifecycle,") + "-nodeipam,-cloud-node-lifecycle,"
        "-service-lb-controller,-node-route-controller,-persistentvolume-binder",
        "--service-account-private-key-file",
        str(certs.service_accounts.key),
        "--root-ca-file",
        str(certs.ca.cert),
        "--use-service-account-credentials",
        "--leader-elect=false",
        "--kube-api-qps",
        "100",
        "--kube-api-burst",
        "200",
        "--concurrent-job-syncs",
        "10",
    ]
