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
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from devcluster import net, pki, s3
from devcluster.net import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "tools" / "build-binaries.sh"
NODE_NAME = "devnode"
SERVICE_CIDR = "10.0.0.0/24"
ISSUER = "https://kubernetes.default.svc.cluster.local"
COMPONENTS = ("s3", "etcd", "kube-apiserver", "kube-controller-manager", "kubelet")
CONTROL_PLANE = ("s3", "etcd", "kube-apiserver", "kube-controller-manager")
NODE_KINDS = ("process", "real")


class StartupError(RuntimeError):
    pass


@dataclass
class ClusterState:
    """What a running cluster is: where it listens and what its S3 root account is."""

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

    @property
    def api_url(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"


def process_exists(pid: int) -> bool:
    """True while `pid` runs; reaps it first when it is our own exited child (a zombie)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie whose parent is gone waits for PID 1 to reap it: it has exited.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


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
        self.real = None
        if node == "real":
            from devcluster.realnode import RealNode

            self.real = RealNode(self)

    @property
    def components(self) -> tuple[str, ...]:
        if self.real is None:
            return COMPONENTS
        from devcluster.realnode import NODE_COMPONENTS

        return ("forward", *CONTROL_PLANE, *NODE_COMPONENTS)

    # -- state -----------------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    def state(self) -> ClusterState:
        return ClusterState(**json.loads(self.state_file.read_text()))

    def is_running(self) -> bool:
        return self.state_file.exists() and all(self._alive(c) for c in self.components)

    def _pid(self, component: str) -> int | None:
        f = self.pid_dir / f"{component}.pid"
        return int(f.read_text()) if f.exists() else None

    def _alive(self, component: str) -> bool:
        pid = self._pid(component)
        return pid is not None and process_exists(pid)

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

    def _spawn(self, component: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        # What start_component replays: the same command, ports and data directory.
        launch = self._launch_file(component)
        launch.write_text(json.dumps({"argv": argv, "env": env or {}}))
        launch.chmod(0o600)  # the S3 server's environment holds its root secret
        if self.real is not None:
            argv = [*self.real.prefix(), *argv]
        with (self.log_dir / f"{component}.log").open("ab") as logf:
            proc = subprocess.Popen(
                argv,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **(env or {})},
                cwd=self.dir,
            )
        (self.pid_dir / f"{component}.pid").write_text(str(proc.pid))

    def _launch_file(self, component: str) -> Path:
        return self.pid_dir / f"{component}.launch.json"

    def _ready(self, component: str) -> Callable[[], bool]:
        """The readiness check of a control-plane component or the process kubelet."""
        state = self.state()
        admin = pki.CertPair(self.pki_dir / "admin.crt", self.pki_dir / "admin.key")
        checks: dict[str, Callable[[], bool]] = {
            "s3": lambda: s3.health_status(state.s3_endpoint) == 200,
            "etcd": lambda: net.http_status(f"http://127.0.0.1:{state.etcd_port}/health") == 200,
            "kube-apiserver": lambda: self._https_ok(f"{state.api_url}/readyz", admin),
            "kube-controller-manager": lambda: self._https_ok(
                f"https://127.0.0.1:{state.kcm_port}/healthz"
            ),
            "kubelet": self._node_ready,
        }
        return checks[component]

    def stop_component(self, component: str, grace: float = 10.0) -> None:
        """Stop one component as an outage would (SIGTERM, SIGKILL after `grace`), leaving the
        rest running: what the fault tests do to S3 and the API server."""
        self._restartable(component)
        self._stop(component, grace)

    def start_component(self, component: str) -> None:
        """Start a component stopped by `stop_component` again, with the command it was first
        started with (same port, same data), and wait until it is ready."""
        self._restartable(component)
        if self._alive(component):
            raise RuntimeError(f"{component} is running")
        launch = json.loads(self._launch_file(component).read_text())
        self._spawn(component, launch["argv"], launch["env"])
        self._wait(component, self._ready(component), timeout=120)

    def _restartable(self, component: str) -> None:
        if self.real is not None or component not in COMPONENTS:
            raise ValueError(
                f"only a process-node devcluster's {', '.join(COMPONENTS)} can be stopped and "
                f"started one by one, not {component!r} ({self.node} node)"
            )

    def log_tail(self, component: str, lines: int = 40) -> str:
        f = self.log_dir / f"{component}.log"
        if not f.exists():
            return "(no log)"
        return "\n".join(f.read_text(errors="replace").splitlines()[-lines:])

    def _wait(self, component: str, ready: Callable[[], bool], timeout: float = 90.0) -> None:
        """Poll a readiness check until it passes; fail early if the process died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                print(f"[devcluster] {component} ready", file=sys.stderr)
                return
            if not self._alive(component):
                raise StartupError(
                    f"{component} exited during startup; last log lines:\n"
                    f"{self.log_tail(component)}"
                )
            time.sleep(0.25)
        raise StartupError(
            f"{component} not ready after {timeout:.0f}s; last log lines:\n"
            f"{self.log_tail(component)}"
        )

    def _https_ok(self, url: str, client_cert: pki.CertPair | None = None) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.pki_dir / "ca.crt"))
        if client_cert is not None:
            ctx.load_cert_chain(str(client_cert.cert), str(client_cert.key))
        else:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(url, context=ctx, timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

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
            from devcluster.realnode import registry_port

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
            from devcluster.realnode import NODE_IP

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
        self._spawn(
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
        self._spawn(
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
        self._wait("etcd", self._ready("etcd"))
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
            from devcluster.realnode import NODE_IP

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
        self._spawn(
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
        self._wait("kube-apiserver", self._ready("kube-apiserver"), timeout=120)
        self._spawn(
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
        self._wait("kube-controller-manager", self._ready("kube-controller-manager"))
        self._wait("s3", self._ready("s3"))
        if self.real is not None:
            node_kubeconfigs["kubelet"] = kubelet_config
            self.real.start(state, b, node_kubeconfigs)
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
        self._spawn("kubelet", kubelet_argv, env={"PYTHONPATH": str(REPO_ROOT / "tools")})
        self._wait("kubelet", self._ready("kubelet"))
        return state

    def _node_ready(self) -> bool:
        kubectl = Path(self.state().bin_dir) / "kubectl"
        result = subprocess.run(
            [
                str(kubectl),
                "--kubeconfig",
                str(self.kubeconfig),
                "get",
                "node",
                NODE_NAME,
                "-o",
                "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        return result.stdout.strip() == "True"

    def down(self, *, quiet: bool = False) -> None:
        """Stop the kubelet first (it stops its pods), then the control plane, then storage.
        On the real node, everything left in its namespaces and cgroups goes too."""
        if self.real is not None and self._alive("containerd"):
            self._stop("kubelet", grace=10)
            with contextlib.suppress(subprocess.SubprocessError, OSError, AssertionError):
                self.real._clean_containers()
        for component in reversed(self.components):
            self._stop(component, grace=20 if component == "kubelet" else 10)
        if self.real is not None:
            self.real.stop()
        # Pods the kubelet could not stop (it was killed itself) are stopped here.
        for pid_file in (self.pid_dir / "pods").glob("*.pid") if self.pid_dir.exists() else []:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            pid_file.unlink(missing_ok=True)
        if not quiet:
            print(f"[devcluster] stopped ({self.dir})", file=sys.stderr)

    def _stop(self, component: str, grace: float) -> None:
        pid = self._pid(component)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while process_exists(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        (self.pid_dir / f"{component}.pid").unlink(missing_ok=True)
