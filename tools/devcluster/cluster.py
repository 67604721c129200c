"""Start and stop the devcluster: etcd, kube-apiserver, kube-controller-manager, an S3 server and
the process kubelet, all on 127.0.0.1 with ports chosen at start and kept in `state.json`.

With `storage` (devcluster up --storage-of DIR), a process-node cluster runs no S3 server of its
own and uses another's, as a site's cluster meets a run only through the run's storage: several
control planes side by side, one S3 server (devcluster/federation.py).

With `node="real"` (devcluster up --node real) the node is a real one instead: kubelet,
containerd, kube-scheduler, kube-proxy and a local registry, the whole cluster inside namespaces
of its own (devcluster/realnode.py); the host reaches it at the same 127.0.0.1 ports.

Every component runs detached (devcluster/processes.py), so `devcluster up` returns while the
cluster keeps running; `devcluster down` stops them all, pods included, and leaves no process
behind. Startup waits on each component's readiness endpoint and, when one does not come up, fails
with the tail of that component's log.
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

from devcluster import controlplane, net, pki, s3
from devcluster.controlplane import ADMIN, Certificates
from devcluster.namespaces import NODE_IP
from devcluster.net import free_port
from devcluster.processes import Processes, StartupError
from devcluster.realnode import NODE_COMPONENTS, RealNode
from devcluster.registry import registry_port
from devcluster.state import NODE_KINDS, NODE_NAME, REPO_ROOT, ClusterState

BUILD_SCRIPT = REPO_ROOT / "tools" / "build-binaries.sh"
COMPONENTS = ("s3", "etcd", "kube-apiserver", "kube-controller-manager", "kubelet")
CONTROL_PLANE = ("s3", "etcd", "kube-apiserver", "kube-controller-manager")


def build_binaries() -> Path:
    """Build (or find cached) binaries; the script prints progress on stderr."""
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True
    )
    return Path(result.stdout.strip().splitlines()[-1])


class Cluster:
    """One devcluster, kept in `directory` (its state, certificates, logs and data): started by
    `up`, stopped by `down`, and found running again by a later process."""

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
        """The processes this cluster runs: never the S3 server of another whose storage it
        uses (so `down` leaves that one serving)."""
        if self.real is not None:
            return ("forward", *CONTROL_PLANE, *NODE_COMPONENTS)
        if self.shares_storage():
            return tuple(c for c in COMPONENTS if c != "s3")
        return COMPONENTS

    # -- state -----------------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    def state(self) -> ClusterState:
        return ClusterState(**json.loads(self.state_file.read_text()))

    def shares_storage(self) -> bool:
        """Whether this cluster uses another's S3 server (as its state, once up, says)."""
        return self.state_file.exists() and bool(self.state().shared_s3_endpoint)

    def is_running(self) -> bool:
        return self.state_file.exists() and all(self.processes.alive(c) for c in self.components)

    def s3_account(self) -> s3.S3Account:
        st = self.state()
        return s3.S3Account(st.s3_endpoint, st.s3_access_key, st.s3_secret_key)

    def env(self) -> dict[str, str]:
        """Variables a shell (or a test) needs to talk to this cluster and its S3 server (the
        shared one, with the account it was given, when it uses another's)."""
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
        if self.real is not None or component not in self.components:
            raise ValueError(
                f"only a process-node devcluster's own {', '.join(self.components)} can be "
                f"stopped and started one by one, not {component!r} ({self.node} node)"
            )

    def log_tail(self, component: str, lines: int = 40) -> str:
        return self.processes.log_tail(component, lines)

    # -- up --------------------------------------------------------------------------------------

    def up(
        self, *, pod_env: dict[str, str] | None = None, storage: s3.S3Account | None = None
    ) -> ClusterState:
        """Start the cluster, each component waited for before the ones that need it; a cluster
        already running is left as it is.

        `storage`: an account on another devcluster's S3 server (its endpoint and keys), which
        this cluster then uses instead of starting one of its own; it must answer already. Only
        on the process node, whose pods share the host's loopback: the real node's pods could
        not reach a server on it."""
        if self.is_running():
            print(f"[devcluster] already running ({self.dir})", file=sys.stderr)
            return self.state()
        if storage is not None:
            if self.real is not None:
                raise ValueError("a real-node devcluster runs its own S3 server (no storage=)")
            if s3.health_status(storage.endpoint) != 200:
                raise StartupError(f"no S3 server answers at {storage.endpoint}")
        self.down(quiet=True)
        state = self._new_state(self._link_binaries(), storage)
        certs = controlplane.issue_certificates(self.pki_dir, node_ip=self._node_ip)
        kubeconfigs = self._write_kubeconfigs(state, certs)
        if self.real is not None:
            self.real.isolate(state)
        if storage is None:
            self._start_s3(state)
        self._start_etcd(state)
        self._start_apiserver(state, certs)
        self._start_controller_manager(state, certs, kubeconfigs["kcm"])
        if storage is None:
            # Started first, S3 came up meanwhile; it is waited for once the control plane is.
            self.processes.wait("s3", self._ready("s3"))
        if self.real is not None:
            self.real.start(state, Path(state.bin_dir), kubeconfigs, self.processes)
        else:
            self._start_process_kubelet(state, kubeconfigs["kubelet"], pod_env or {})
        return state

    @property
    def _node_ip(self) -> str | None:
        """Where pods reach the control plane: the real node's address, None on the process
        node (they share the host's loopback)."""
        return NODE_IP if self.real is not None else None

    def _link_binaries(self) -> Path:
        """The binaries, built or found cached, linked as `bin` in the state directory."""
        bin_dir = build_binaries()
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "bin").unlink(missing_ok=True)
        (self.dir / "bin").symlink_to(bin_dir)
        return bin_dir

    def _new_state(self, bin_dir: Path, storage: s3.S3Account | None) -> ClusterState:
        """Fresh ports, written to `state.json`; the S3 account of an earlier start is kept, so
        that credentials handed out before stay valid. With `storage`, no S3 port: its endpoint
        and account instead."""
        previous = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        if storage is not None:
            keys = (storage.access_key, storage.secret_key)
        else:
            keys = (
                previous.get("s3_access_key", "devcluster"),
                previous.get("s3_secret_key", secrets.token_urlsafe(24)),
            )
        state = ClusterState(
            etcd_port=free_port(),
            etcd_peer_port=free_port(),
            api_port=free_port(),
            kcm_port=free_port(),
            s3_port=0 if storage else free_port(),
            s3_access_key=keys[0],
            s3_secret_key=keys[1],
            bin_dir=str(bin_dir),
            node=self.node,
            shared_s3_endpoint=storage.endpoint if storage else "",
        )
        if self.real is not None:
            state.registry_port = registry_port()
            state.sched_port = free_port()
            state.proxy_port = free_port()
        self.state_file.write_text(json.dumps(asdict(state), indent=2))
        self.state_file.chmod(0o600)
        return state

    def _write_kubeconfigs(self, state: ClusterState, certs: Certificates) -> dict[str, Path]:
        """One kubeconfig per client of the API server, `<user>.kubeconfig`; the admin's is the
        cluster's own (`kubeconfig`), readable by its owner only."""
        paths = {}
        for user, client in certs.clients.items():
            path = self.kubeconfig if user == ADMIN else self.dir / f"{user}.kubeconfig"
            path.write_text(controlplane.kubeconfig_text(state, certs.ca.cert, client, user))
            if user == ADMIN:
                path.chmod(0o600)
            paths[user] = path
        return paths

    def _start_s3(self, state: ClusterState) -> None:
        """Started, not waited for: it comes up while the control plane does."""
        s3_dir = self.dir / "s3-data"
        s3_dir.mkdir(exist_ok=True)
        self.processes.spawn(
            "s3",
            # On the real node, pods reach S3 at the node's address.
            s3.server_argv(
                Path(state.bin_dir),
                state.s3_port,
                s3_dir,
                "0.0.0.0" if self.real else "127.0.0.1",
                access_log=self.s3_access_log,
            ),
            env=s3.server_env(state.s3_access_key, state.s3_secret_key),
        )

    def _start_etcd(self, state: ClusterState) -> None:
        argv = controlplane.etcd_argv(Path(state.bin_dir), state, self.dir / "etcd-data")
        self.processes.spawn("etcd", argv)
        self.processes.wait("etcd", self._ready("etcd"))

    def _start_apiserver(self, state: ClusterState, certs: Certificates) -> None:
        argv = controlplane.apiserver_argv(
            Path(state.bin_dir), state, certs, self.pki_dir, self._node_ip
        )
        self.processes.spawn("kube-apiserver", argv)
        self.processes.wait("kube-apiserver", self._ready("kube-apiserver"), timeout=120)

    def _start_controller_manager(
        self, state: ClusterState, certs: Certificates, kubeconfig: Path
    ) -> None:
        argv = controlplane.controller_manager_argv(
            Path(state.bin_dir),
            state,
            certs,
            kubeconfig,
            self.pki_dir,
            # The real node's taints are the node lifecycle controller's to lift.
            node_lifecycle=self.real is not None,
        )
        self.processes.spawn("kube-controller-manager", argv)
        self.processes.wait("kube-controller-manager", self._ready("kube-controller-manager"))

    def _start_process_kubelet(
        self, state: ClusterState, kubeconfig: Path, pod_env: dict[str, str]
    ) -> None:
        """The process node: devcluster.kubelet, its pods in this repository's environment with
        `pod_env` added."""
        argv = [
            sys.executable,
            "-m",
            "devcluster.kubelet",
            "--kubeconfig",
            str(kubeconfig),
            "--state-dir",
            str(self.dir),
            "--node-name",
            NODE_NAME,
            "--api-port",
            str(state.api_port),
            "--workdir",
            str(REPO_ROOT),
        ]
        for k, v in pod_env.items():
            argv += ["--pod-env", f"{k}={v}"]
        self.processes.spawn("kubelet", argv, env={"PYTHONPATH": str(REPO_ROOT / "tools")})
        self.processes.wait("kubelet", self._ready("kubelet"))

    # -- down ------------------------------------------------------------------------------------

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
