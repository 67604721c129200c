"""Start and stop the devcluster: etcd, kube-apiserver, kube-controller-manager, an S3 server and
the process kubelet, all on 127.0.0.1 with ports chosen at start and kept in `state.json`.

With `node="real"` (devcluster up --node real) the node is a real one instead: kubelet,
containerd, kube-scheduler, kube-proxy and a local registry, the whole cluster inside namespaces
of its own (devcluster/realnode.py); the host reaches it at the same 127.0.0.1 ports.

Every component runs detached (its own session), so `devcluster up` returns while the cluster
keeps running; `devcluster down` stops them all, pods included, and leaves no process behind.
Startup waits on each component's readiness endpoint and, when one does not come up, fails with
the tail of that component's log.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from devcluster import net, pki, s3
from devcluster.net import free_port
from devcluster.processes import Processes
from devcluster.realnode import NODE_COMPONENTS, NODE_IP, RealNode, registry_port
from devcluster.state import NODE_KINDS, NODE_NAME, REPO_ROOT, ClusterState

BUILD_SCRIPT = REPO_ROOT / "tools" / "build-binaries.sh"
SERVICE_CIDR = "10.0.0.0/24"
ISSUER = "https://kubernetes.default.svc.cluster.local"
COMPONENTS = ("s3", "etcd", "kube-apiserver", "kube-controller-manager", "kubelet")
CONTROL_PLANE = ("s3", "etcd", "kube-apiserver", "kube-controller-manager")


def build_binaries() -> Path:
    """Build (or find cached) binaries; the script prints progress on stderr."""
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True
    )
    return Path(result.stdout.strip().splitlines()[-1])


def kubeconfig_text(state: ClusterState, ca: Path, cert: Path, key: Path, user: str) -> str:
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
                {"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}
            ],
            "contexts": [
                {"name": "devcluster", "context": {"cluster": "devcluster", "user": user}}
            ],
            "current-context": "devcluster",
        },
        indent=2,
    )


class Cluster:
    def __init__(self, directory: Path, node: str | None = None) -> None:
        self.dir = directory.resolve()
        self.pki_dir = self.dir / "pki"
        self.log_dir = self.dir / "logs"
        self.s3_access_log = self.log_dir / "s3-access.log"
        """One line per S3 request (versitygw's server access log, S3's format)."""
        self.pid_dir = self.dir / "pids"
        self.kubeconfig = self.dir / "kubeconfig"
        if node is None:
            node = self.state().node if self.state_file.exists() else "process"
        if node not in NODE_KINDS:
            raise ValueError(f"node must be one of {NODE_KINDS}, not {node!r}")
        self.node = node
        self.real = (
            RealNode(self.dir, pki_dir=self.pki_dir, pid_dir=self.pid_dir, log_dir=self.log_dir)
            if node == "real"
            else None
        )
        self.processes = Processes(
            self.dir,
            log_dir=self.log_dir,
            pid_dir=self.pid_dir,
            enter=self.real.prefix if self.real is not None else None,
        )

    @property
    def components(self) -> tuple[str, ...]:
        if self.real is None:
            return COMPONENTS
        return ("forward", *CONTROL_PLANE, *NODE_COMPONENTS)

    # -- state -----------------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    def state(self) -> ClusterState:
        return ClusterState(**json.loads(self.state_file.read_text()))

    def is_running(self) -> bool:
        return self.state_file.exists() and all(self.processes.alive(c) for c in self.components)

    def s3_account(self) -> s3.S3Account:
        st = self.state()
        return s3.S3Account(st.s3_endpoint, st.s3_access_key, st.s3_secret_key)

    def env(self) -> dict[str, str]:
        """Variables a shell (or a test) needs to talk to this cluster and its S3 server."""
        return {
            "KUBECONFIG": str(self.kubeconfig),
            "DEVCLUSTER_BIN": self.state().bin_dir,
            **self.s3_account().env(),
        }

    # -- processes -------------------------------------------------------------------------------

    def _ready(self, component: str) -> Callable[[], bool]:
        """The readiness check of a control-plane component or the process kubelet."""
        state = self.state()
        admin = pki.CertPair(self.pki_dir / "admin.crt", self.pki_dir / "admin.key")
        ca = self.pki_dir / "ca.crt"
        checks: dict[str, Callable[[], bool]] = {
            "s3": lambda: s3.health_status(state.s3_endpoint) == 200,
            "etcd": lambda: net.http_status(f"http://127.0.0.1:{state.etcd_port}/health") == 200,
            "kube-apiserver": lambda: net.https_ok(f"{state.api_url}/readyz", ca, admin),
            "kube-controller-manager": lambda: net.https_ok(
                f"https://127.0.0.1:{state.kcm_port}/healthz", ca
            ),
            "kubelet": lambda: net.node_ready(
                Path(state.bin_dir) / "kubectl", self.kubeconfig, NODE_NAME
            ),
        }
        return checks[component]

    def stop_component(self, component: str, grace: float = 10.0) -> None:
        """Stop one component as an outage would (SIGTERM, SIGKILL after `grace`), leaving the
        rest running: what the fault tests do to S3 and the API server."""
        self._restartable(component)
        self.processes.stop(component, grace)

    def start_component(self, component: str) -> None:
        """Start a component stopped by `stop_component` again, with the command it was first
        started with (same port, same data), and wait until it is ready."""
        self._restartable(component)
        if self.processes.alive(component):
            raise RuntimeError(f"{component} is running")
        self.processes.relaunch(component)
        self.processes.wait(component, self._ready(component), timeout=120)

    def _restartable(self, component: str) -> None:
        if self.real is not None or component not in COMPONENTS:
            raise ValueError(
                f"only a process-node devcluster's {', '.join(COMPONENTS)} can be stopped and "
                f"started one by one, not {component!r} ({self.node} node)"
            )

    def log_tail(self, component: str, lines: int = 40) -> str:
        return self.processes.log_tail(component, lines)

    # -- up / down -------------------------------------------------------------------------------

    def up(self, *, pod_env: dict[str, str] | None = None) -> ClusterState:
        if self.is_running():
            print(f"[devcluster] already running ({self.dir})", file=sys.stderr)
            return self.state()
        self.down(quiet=True)
        bin_dir = build_binaries()
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "bin").unlink(missing_ok=True)
        (self.dir / "bin").symlink_to(bin_dir)
        self.pki_dir.mkdir(parents=True, exist_ok=True)

        previous = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        state = ClusterState(
            etcd_port=free_port(),
            etcd_peer_port=free_port(),
            api_port=free_port(),
            kcm_port=free_port(),
            s3_port=free_port(),
            s3_access_key=previous.get("s3_access_key", "devcluster"),
            s3_secret_key=previous.get("s3_secret_key", secrets.token_urlsafe(24)),
            bin_dir=str(bin_dir),
            node=self.node,
        )
        if self.real is not None:
            state.registry_port = registry_port()
            state.sched_port = free_port()
            state.proxy_port = free_port()
        self.state_file.write_text(json.dumps(asdict(state), indent=2))
        self.state_file.chmod(0o600)

        ca = pki.ensure_ca(self.pki_dir)
        serving = pki.ensure_cert(
            self.pki_dir,
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
        admin = pki.ensure_cert(
            self.pki_dir, "admin", ca, common_name="devcluster-admin", org="system:masters"
        )
        kcm = pki.ensure_cert(self.pki_dir, "kcm", ca, common_name="system:kube-controller-manager")
        kubelet = pki.ensure_cert(
            self.pki_dir, "kubelet", ca, common_name="devcluster-kubelet", org="system:masters"
        )
        sa = pki.ensure_service_account_keys(self.pki_dir)
        node_kubeconfigs: dict[str, Path] = {}
        if self.real is not None:
            pki.ensure_cert(
                self.pki_dir,
                "kubelet-serving",
                ca,
                common_name=f"system:node:{NODE_NAME}",
                server=True,
                dns=(NODE_NAME,),
                ips=(NODE_IP,),
            )
            for name, cn in (
                ("scheduler", "system:kube-scheduler"),
                ("proxy", "system:kube-proxy"),
            ):
                pair = pki.ensure_cert(self.pki_dir, name, ca, common_name=cn)
                node_kubeconfigs[name] = self.dir / f"{name}.kubeconfig"
                node_kubeconfigs[name].write_text(
                    kubeconfig_text(state, ca.cert, pair.cert, pair.key, name)
                )
        self.kubeconfig.write_text(kubeconfig_text(state, ca.cert, admin.cert, admin.key, "admin"))
        self.kubeconfig.chmod(0o600)
        kcm_config = self.dir / "kcm.kubeconfig"
        kcm_config.write_text(kubeconfig_text(state, ca.cert, kcm.cert, kcm.key, "kcm"))
        kubelet_config = self.dir / "kubelet.kubeconfig"
        kubelet_config.write_text(
            kubeconfig_text(state, ca.cert, kubelet.cert, kubelet.key, "kubelet")
        )

        b = Path(state.bin_dir)
        if self.real is not None:
            # The namespaces first; then every port the host uses is forwarded into them.
            self.real.create_namespaces()
            self.real.forward(
                [
                    state.etcd_port,
                    state.api_port,
                    state.kcm_port,
                    state.s3_port,
                    state.registry_port,
                    state.sched_port,
                    state.proxy_port,
                ]
            )
        s3_dir = self.dir / "s3-data"
        s3_dir.mkdir(exist_ok=True)
        self.processes.spawn(
            "s3",
            # On the real node, pods reach S3 at the node's address.
            s3.server_argv(
                b,
                state.s3_port,
                s3_dir,
                "0.0.0.0" if self.real else "127.0.0.1",
                access_log=self.s3_access_log,
            ),
            env=s3.server_env(state.s3_access_key, state.s3_secret_key),
        )
        etcd_data = self.dir / "etcd-data"
        self.processes.spawn(
            "etcd",
            [
                str(b / "etcd"),
                "--name",
                "devcluster",
                "--data-dir",
                str(etcd_data),
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
            ],
        )
        self.processes.wait("etcd", self._ready("etcd"))
        if self.real is None:
            api_network = [
                "--bind-address",
                "127.0.0.1",
                "--advertise-address",
                "127.0.0.1",
                "--endpoint-reconciler-type",
                "none",
            ]
        else:
            # Pods reach it through the `kubernetes` Service at the node's address, and it
            # reaches the kubelet there (kubectl logs).
            api_network = [
                "--bind-address",
                "0.0.0.0",
                "--advertise-address",
                NODE_IP,
                "--kubelet-preferred-address-types",
                "InternalIP,Hostname",
                "--kubelet-client-certificate",
                str(admin.cert),
                "--kubelet-client-key",
                str(admin.key),
            ]
        self.processes.spawn(
            "kube-apiserver",
            [
                str(b / "kube-apiserver"),
                "--etcd-servers",
                f"http://127.0.0.1:{state.etcd_port}",
                *api_network,
                "--secure-port",
                str(state.api_port),
                "--tls-cert-file",
                str(serving.cert),
                "--tls-private-key-file",
                str(serving.key),
                "--client-ca-file",
                str(ca.cert),
                "--authorization-mode",
                "RBAC",
                "--enable-admission-plugins",
                "NamespaceLifecycle,ServiceAccount,PodSecurity,"
                "LimitRanger,DefaultTolerationSeconds,ResourceQuota,"
                "MutatingAdmissionPolicy,ValidatingAdmissionPolicy",
                "--service-account-issuer",
                ISSUER,
                "--service-account-key-file",
                str(sa.cert),
                "--service-account-signing-key-file",
                str(sa.key),
                "--service-cluster-ip-range",
                SERVICE_CIDR,
                "--allow-privileged=true",
                "--profiling=false",
                "--cert-dir",
                str(self.pki_dir / "apiserver-generated"),
            ],
        )
        self.processes.wait("kube-apiserver", self._ready("kube-apiserver"), timeout=120)
        self.processes.spawn(
            "kube-controller-manager",
            [
                str(b / "kube-controller-manager"),
                "--kubeconfig",
                str(kcm_config),
                "--authentication-kubeconfig",
                str(kcm_config),
                "--authorization-kubeconfig",
                str(kcm_config),
                "--bind-address",
                "127.0.0.1",
                "--secure-port",
                str(state.kcm_port),
                "--cert-dir",
                str(self.pki_dir / "kcm-generated"),
                "--controllers",
                # The real node's taints are the node lifecycle controller's to lift.
                ("*," if self.real else "*,-nodelifecycle,") + "-nodeipam,-cloud-node-lifecycle,"
                "-service-lb-controller,-node-route-controller,-persistentvolume-binder",
                "--service-account-private-key-file",
                str(sa.key),
                "--root-ca-file",
                str(ca.cert),
                "--use-service-account-credentials",
                "--leader-elect=false",
                "--kube-api-qps",
                "100",
                "--kube-api-burst",
                "200",
                "--concurrent-job-syncs",
                "10",
            ],
        )
        self.processes.wait("kube-controller-manager", self._ready("kube-controller-manager"))
        self.processes.wait("s3", self._ready("s3"))
        if self.real is not None:
            node_kubeconfigs["kubelet"] = kubelet_config
            node_kubeconfigs["admin"] = self.kubeconfig
            self.real.start(state, b, node_kubeconfigs, self.processes)
            return state
        kubelet_argv = [
            sys.executable,
            "-m",
            "devcluster.kubelet",
            "--kubeconfig",
            str(kubelet_config),
            "--state-dir",
            str(self.dir),
            "--node-name",
            NODE_NAME,
            "--api-port",
            str(state.api_port),
            "--workdir",
            str(REPO_ROOT),
        ]
        for k, v in (pod_env or {}).items():
            kubelet_argv += ["--pod-env", f"{k}={v}"]
        self.processes.spawn("kubelet", kubelet_argv, env={"PYTHONPATH": str(REPO_ROOT / "tools")})
        self.processes.wait("kubelet", self._ready("kubelet"))
        return state

    def down(self, *, quiet: bool = False) -> None:
        """Stop the kubelet first (it stops its pods), then the control plane, then storage.
        On the real node, everything left in its namespaces and cgroups goes too."""
        if self.real is not None and self.processes.alive("containerd"):
            self.processes.stop("kubelet", grace=10)
            with contextlib.suppress(subprocess.SubprocessError, OSError, AssertionError):
                self.real.clean_containers()
        for component in reversed(self.components):
            self.processes.stop(component, grace=20 if component == "kubelet" else 10)
        if self.real is not None:
            self.real.stop()
        # Pods the kubelet could not stop (it was killed itself) are stopped here.
        for pid_file in (self.pid_dir / "pods").glob("*.pid") if self.pid_dir.exists() else []:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            pid_file.unlink(missing_ok=True)
        if not quiet:
            print(f"[devcluster] stopped ({self.dir})", file=sys.stderr)
