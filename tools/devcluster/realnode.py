"""The real-node tier of the devcluster (`devcluster up --node real`, `make cluster-up NODE=real`).

Where the process kubelet runs a pod's command as a local process, this tier runs the images: a
kubelet built from the pinned Kubernetes module, containerd and runc (Debian's), kube-scheduler,
kube-proxy (iptables mode), the bridge CNI plugin, a local OCI registry (the distribution module)
that `tools/build-images.sh --push` fills, and a pause image built from the pinned module's source.

Isolation. The whole cluster (control plane included, so that the API server reaches the kubelet
and pods reach the API server through the `kubernetes` Service) runs inside a network namespace
and a mount namespace that this module creates with a holder process (`unshare`). Inside:

- the network namespace has only `lo`, the node address NODE_IP on it, and the CNI bridge of the
  pod network; there is no route anywhere else, so nothing in the tier can reach the outside;
  the host reaches the API server, etcd, S3 and the registry through `devcluster.forward` on the
  host's 127.0.0.1, at the same port numbers;
- in the mount namespace, /run, /var/lib and /var/log are bind mounts of directories under the
  state directory (the kubelet, containerd and the CNI plugins hard-code paths there), and the
  /proc/sys files the kubelet checks (`protectKernelDefaults`) show the values it wants, so it
  writes no host sysctl; net.* sysctls written by kube-proxy belong to the namespace.

What remains on the host is only what the kernel cannot namespace on cgroup v1: the kubelet's
cgroup tree under CGROUP_PREFIX-<id> in every hierarchy, removed by `down`, which also kills every
process left in the namespaces or in those cgroups, then the holder: the namespaces, their
mounts, the bridge and the iptables chains go with it.

Cached outside the clone ($FEDTUNE_CACHE, default ~/.cache/fedtune): the registry's storage
(content-addressed, so images pushed once are not pushed again), and containerd's root (pulled and
unpacked images), locked by the running containerd; a second real-node cluster on the same machine
uses a root of its own under its state directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from devcluster import net
from devcluster.processes import Processes, StartupError
from devcluster.state import NODE_NAME, REPO_ROOT, ClusterState

NODE_IP = "10.254.0.2"  # only ever inside the tier's network namespace
POD_CIDR = "10.244.0.0/24"
BRIDGE = "cni0"
CGROUP_PREFIX = "fedtune-node"
CGROUP_ROOT = Path("/sys/fs/cgroup")
PAUSE_IMAGE = "localhost/fedtune/pause:1"
# The registry the images name (the chart's and the CRD's defaults); containerd resolves it to
# the local registry, never to the real host.
MIRRORED_REGISTRY = "ghcr.io"
NODE_COMPONENTS = ("registry", "containerd", "kube-scheduler", "kubelet", "kube-proxy")
# What the kubelet checks under protectKernelDefaults, shown to it inside the mount namespace.
KERNEL_DEFAULTS = {
    "vm/overcommit_memory": "1",
    "vm/panic_on_oom": "0",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
    "kernel/keys/root_maxkeys": "1000000",
    "kernel/keys/root_maxbytes": "25000000",
}
DEBIAN_PACKAGES = ("containerd", "runc", "containernetworking-plugins", "iptables", "util-linux")
# Hidden host directories: each is a bind mount of an empty directory of the state directory.
PRIVATE_DIRS = ("/run", "/var/lib", "/var/log")


def cache_root() -> Path:
    base = os.environ.get("FEDTUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fedtune"
    )
    return Path(base)


def ensure_packages() -> None:
    subprocess.run([str(REPO_ROOT / "tools" / "apt-ensure.sh"), *DEBIAN_PACKAGES], check=True)


def registry_port() -> int:
    """The registry's port: the same from one start to the next, in any clone that shares the
    cache, when it is free. podman remembers which layers a registry holds by its address, and the
    registry's storage is the cache's: at the same address a push skips the layers already there,
    where a new address (one per clone, CI's fresh clone each time) compresses and sends the
    trainer image's 6.5 GB again."""
    key = str(cache_root() / "registry").encode()
    port = 20000 + int(hashlib.sha256(key).hexdigest(), 16) % 10000
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return net.free_port()
    return port


def namespace_id(pid: int, kind: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


def pause_archive(
    pause_binary: Path, out: Path, *, name: str = PAUSE_IMAGE, user: str = "65535:65535"
) -> None:
    """An OCI image archive of the pause binary (FROM scratch) named `name` for containerd's
    import; `user` empty makes an image that runs as root (the enforcement tests use one)."""
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("pause")
        info.size = pause_binary.stat().st_size
        info.mode = 0o755
        with pause_binary.open("rb") as f:
            tar.addfile(info, f)
    layer = layer_buf.getvalue()

    def blob(data: bytes) -> tuple[str, bytes]:
        return "sha256:" + hashlib.sha256(data).hexdigest(), data

    layer_digest, _ = blob(layer)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": ["/pause"], **({"User": user} if user else {})},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }
    ).encode()
    config_digest, _ = blob(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest,
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    manifest_digest, _ = blob(manifest)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": manifest_digest,
                    "size": len(manifest),
                    "annotations": {
                        "io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1],
                    },
                    "platform": {"architecture": "amd64", "os": "linux"},
                }
            ],
        }
    ).encode()
    with tarfile.open(out, "w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        add("index.json", index)
        for digest, data in ((layer_digest, layer), (config_digest, config)):
            add(f"blobs/sha256/{digest.split(':')[1]}", data)
        add(f"blobs/sha256/{manifest_digest.split(':')[1]}", manifest)


class RealNode:
    """The namespaces and node components of one real-node cluster, whose state directory is
    `cluster_dir` (certificates in `pki_dir`, pid files in `pid_dir`, logs in `log_dir`)."""

    def __init__(self, cluster_dir: Path, *, pki_dir: Path, pid_dir: Path, log_dir: Path) -> None:
        self.cluster_dir = cluster_dir
        self.pki_dir = pki_dir
        self.pid_dir = pid_dir
        self.log_dir = log_dir
        self.dir = cluster_dir / "node"
        self.id = hashlib.sha256(str(cluster_dir).encode()).hexdigest()[:8]
        self.cgroup = f"{CGROUP_PREFIX}-{self.id}"
        self.sock = self.dir / "containerd.sock"

    # -- the namespaces ------------------------------------------------------------------------

    @property
    def holder_pid_file(self) -> Path:
        return self.pid_dir / "netns.pid"

    def holder_pid(self) -> int | None:
        f = self.holder_pid_file
        return int(f.read_text()) if f.exists() else None

    def prefix(self) -> list[str]:
        """The argv prefix that runs a command inside both namespaces."""
        pid = self.holder_pid()
        assert pid is not None, "the node's namespaces are not up"
        return ["nsenter", f"--net=/proc/{pid}/ns/net", f"--mount=/proc/{pid}/ns/mnt", "--"]

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess[str]:
        kw.setdefault("check", True)
        kw.setdefault("capture_output", True)
        return subprocess.run([*self.prefix(), *argv], text=True, **kw)

    def create_namespaces(self) -> None:
        if os.geteuid() != 0:
            raise StartupError("the real-node tier needs root (namespaces, cgroups, containerd)")
        ensure_packages()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        holder = subprocess.Popen(
            ["unshare", "--net", "--mount", "--propagation", "private", "sleep", "infinity"],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
        )
        self.holder_pid_file.write_text(str(holder.pid))
        ours = namespace_id(os.getpid(), "net")
        deadline = time.monotonic() + 10
        while namespace_id(holder.pid, "net") in (ours, None) or namespace_id(
            holder.pid, "mnt"
        ) == namespace_id(os.getpid(), "mnt"):
            if holder.poll() is not None or time.monotonic() > deadline:
                raise StartupError("could not create the node's namespaces (unshare)")
            time.sleep(0.02)
        sysctl_dir = self.dir / "sysctl"
        sysctl_dir.mkdir(exist_ok=True)
        script = [
            "set -e",
            "ip link set lo up",
            f"ip addr add {NODE_IP}/32 dev lo",
        ]
        for private in PRIVATE_DIRS:
            source = self.dir / "private" / private.strip("/").replace("/", "-")
            source.mkdir(parents=True, exist_ok=True)
            script.append(f"mount --bind {source} {private}")
        for name, value in KERNEL_DEFAULTS.items():
            f = sysctl_dir / name.replace("/", ".")
            f.write_text(value + "\n")
            script.append(f"mount --bind -o ro {f} /proc/sys/{name}")
        self.run(["sh", "-c", "\n".join(script)])

    def isolate(self, state: ClusterState) -> None:
        """The namespaces, before any component starts; then every port the host uses is
        forwarded into them."""
        self.create_namespaces()
        self.forward(
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

    def forward(self, ports: list[int]) -> None:
        """Listen on the host's 127.0.0.1 at each port; relay into the namespace's loopback."""
        listeners = []
        for port in ports:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen(128)
            listeners.append(s)
        pid = self.holder_pid()
        argv = [
            "nsenter",
            f"--net=/proc/{pid}/ns/net",
            "--",
            sys.executable,
            "-m",
            "devcluster.forward",
            *(f"{s.fileno()}:{p}" for s, p in zip(listeners, ports, strict=True)),
        ]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / "forward.log").open("ab")
        proc = subprocess.Popen(
            argv,
            pass_fds=[s.fileno() for s in listeners],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )
        log.close()
        for s in listeners:
            s.close()
        (self.pid_dir / "forward.pid").write_text(str(proc.pid))

    # -- node components ----------------------------------------------------------------------

    def containerd_root(self) -> Path:
        """The cached root when no other real-node cluster holds it, else a private one."""
        shared = cache_root() / "containerd" / "root"
        shared.mkdir(parents=True, exist_ok=True)
        lock = shared.parent / "lock"
        with lock.open("w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return self.dir / "containerd-root"
        return shared

    def write_configs(
        self, state: ClusterState, bin_dir: Path, proxy_kubeconfig: Path
    ) -> dict[str, Path]:
        pki = self.pki_dir
        d = self.dir
        (d / "cni" / "net.d").mkdir(parents=True, exist_ok=True)
        (d / "certs.d" / MIRRORED_REGISTRY).mkdir(parents=True, exist_ok=True)
        root = self.containerd_root()
        registry = f"http://127.0.0.1:{state.registry_port}"
        (d / "certs.d" / MIRRORED_REGISTRY / "hosts.toml").write_text(
            f'server = "{registry}"\n\n[host."{registry}"]\n  capabilities = ["pull", "resolve"]\n'
        )
        (d / "containerd.toml").write_text(
            f"""version = 2
root = "{root}"
state = "{d / "containerd-state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{d / "containerd.sock.ttrpc"}"
[debug]
  level = "warn"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        Root = "{d / "runc"}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d / "cni" / "net.d"}"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{d / "certs.d"}"
"""
        )
        (d / "cni" / "net.d" / "10-fedtune.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": "fedtune",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": BRIDGE,
                            "isGateway": True,
                            "ipMasq": False,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": POD_CIDR}]],
                                "routes": [{"dst": "0.0.0.0/0"}],
                                "dataDir": str(d / "cni" / "ipam"),
                            },
                        }
                    ],
                },
                indent=2,
            )
        )
        # A resolver on the pod's own loopback: no DNS query leaves a pod.
        (d / "resolv.conf").write_text("nameserver 127.0.0.53\noptions ndots:1\n")
        (d / "kubelet.yaml").write_text(
            json.dumps(
                {
                    "apiVersion": "kubelet.config.k8s.io/v1beta1",
                    "kind": "KubeletConfiguration",
                    "failCgroupV1": False,
                    "cgroupDriver": "cgroupfs",
                    "cgroupRoot": f"/{self.cgroup}",
                    "protectKernelDefaults": True,
                    "failSwapOn": False,
                    "podLogsDir": str(d / "pod-logs"),
                    "readOnlyPort": 0,
                    "port": 10250,
                    "healthzBindAddress": "127.0.0.1",
                    "healthzPort": 10248,
                    "address": NODE_IP,
                    "tlsCertFile": str(pki / "kubelet-serving.crt"),
                    "tlsPrivateKeyFile": str(pki / "kubelet-serving.key"),
                    "authentication": {
                        "anonymous": {"enabled": False},
                        "webhook": {"enabled": False},
                        "x509": {"clientCAFile": str(pki / "ca.crt")},
                    },
                    "authorization": {"mode": "AlwaysAllow"},
                    "containerRuntimeEndpoint": f"unix://{self.sock}",
                    "resolvConf": str(d / "resolv.conf"),
                    "serializeImagePulls": False,
                    "imageGCHighThresholdPercent": 100,
                    "imageGCLowThresholdPercent": 99,
                    "evictionHard": {
                        "memory.available": "100Mi",
                        "nodefs.available": "1%",
                        "imagefs.available": "1%",
                        "nodefs.inodesFree": "1%",
                    },
                    "rotateCertificates": False,
                    "serverTLSBootstrap": False,
                    "registerNode": True,
                    "syncFrequency": "5s",
                    "fileCheckFrequency": "5s",
                    "nodeStatusUpdateFrequency": "5s",
                    "enableControllerAttachDetach": True,
                    "cgroupsPerQOS": True,
                    "enforceNodeAllocatable": ["pods"],
                },
                indent=2,
            )
        )
        (d / "kube-proxy.yaml").write_text(
            json.dumps(
                {
                    "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                    "kind": "KubeProxyConfiguration",
                    "clientConnection": {"kubeconfig": str(proxy_kubeconfig)},
                    "mode": "iptables",
                    "clusterCIDR": POD_CIDR,
                    "hostnameOverride": NODE_NAME,
                    "bindAddress": "127.0.0.1",
                    "healthzBindAddress": f"127.0.0.1:{state.proxy_port}",
                    # 0: leave the conntrack sysctls alone (some are not per network namespace).
                    "conntrack": {
                        "maxPerCore": 0,
                        "min": 0,
                        "tcpEstablishedTimeout": "0s",
                        "tcpCloseWaitTimeout": "0s",
                        "udpTimeout": "0s",
                        "udpStreamTimeout": "0s",
                    },
                    "iptables": {"syncPeriod": "10s", "minSyncPeriod": "0s"},
                },
                indent=2,
            )
        )
        (d / "registry.yaml").write_text(
            json.dumps(
                {
                    "version": 0.1,
                    "log": {"level": "warn", "accesslog": {"disabled": True}},
                    "storage": {
                        "filesystem": {"rootdirectory": str(cache_root() / "registry")},
                        "delete": {"enabled": True},
                    },
                    "http": {"addr": f"127.0.0.1:{state.registry_port}"},
                }
            )
        )
        pause_tar = d / "pause.oci.tar"
        pause_archive(bin_dir / "pause", pause_tar)
        return {"root": root}

    def create_cgroups(self) -> None:
        """The kubelet's cgroup root, in every v1 hierarchy (cpuset needs its cpus and mems)."""
        for h in self.hierarchies():
            path = h / self.cgroup
            path.mkdir(exist_ok=True)
            if (h / "cpuset.cpus").exists():
                for f in ("cpuset.cpus", "cpuset.mems"):
                    with contextlib.suppress(OSError):
                        (path / f).write_text((h / f).read_text())

    @staticmethod
    def hierarchies() -> list[Path]:
        return sorted(
            p
            for p in CGROUP_ROOT.iterdir()
            if p.is_dir() and not p.is_symlink() and (p / "cgroup.procs").exists()
        )

    def start(
        self,
        state: ClusterState,
        bin_dir: Path,
        kubeconfigs: dict[str, Path],
        processes: Processes,
    ) -> None:
        """Start the node's components as `processes` of the cluster, in its namespaces, and
        wait for them: `kubeconfigs` has the scheduler's, the kubelet's, the proxy's and the
        admin's (to see the Node Ready)."""
        c = processes
        b = bin_dir
        d = self.dir
        self.write_configs(state, b, kubeconfigs["proxy"])
        self.create_cgroups()
        c.spawn(
            "registry",
            [str(b / "registry"), "serve", str(d / "registry.yaml")],
            env={"OTEL_TRACES_EXPORTER": "none", "OTEL_SDK_DISABLED": "true"},
        )
        # containerd under a lock on its cached root (see containerd_root).
        root = Path(
            next(
                line.split('"')[1]
                for line in (d / "containerd.toml").read_text().splitlines()
                if line.startswith("root =")
            )
        )
        c.spawn(
            "containerd",
            [
                "flock",
                "--nonblock",
                str(root.parent / "lock") if root != d / "containerd-root" else str(d / "lock"),
                "containerd",
                "--config",
                str(d / "containerd.toml"),
            ],
        )
        c.wait("registry", lambda: self._http_ok(state.registry_port, "/v2/"))
        c.wait("containerd", self._containerd_ok, timeout=60)
        self.clean_containers()
        imported = self.ctr("images", "ls", "-q", check=False).stdout.split()
        if PAUSE_IMAGE not in imported:
            self.ctr("images", "import", str(d / "pause.oci.tar"))
        c.spawn(
            "kube-scheduler",
            [
                str(b / "kube-scheduler"),
                "--kubeconfig",
                str(kubeconfigs["scheduler"]),
                "--authentication-kubeconfig",
                str(kubeconfigs["scheduler"]),
                "--authorization-kubeconfig",
                str(kubeconfigs["scheduler"]),
                "--bind-address",
                "127.0.0.1",
                "--secure-port",
                str(state.sched_port),
                "--leader-elect=false",
            ],
        )
        c.spawn(
            "kubelet",
            [
                str(b / "kubelet"),
                "--config",
                str(d / "kubelet.yaml"),
                "--kubeconfig",
                str(kubeconfigs["kubelet"]),
                "--hostname-override",
                NODE_NAME,
                "--node-ip",
                NODE_IP,
                "--root-dir",
                "/var/lib/kubelet",
                "--v",
                "1",
            ],
        )
        c.spawn(
            "kube-proxy",
            [str(b / "kube-proxy"), "--config", str(d / "kube-proxy.yaml")],
            env={"PATH": f"/usr/sbin:/sbin:{os.environ.get('PATH', '')}"},
        )
        c.wait(
            "kube-scheduler",
            lambda: net.https_ok(
                f"https://127.0.0.1:{state.sched_port}/healthz", self.pki_dir / "ca.crt"
            ),
        )
        c.wait(
            "kubelet",
            lambda: net.node_ready(bin_dir / "kubectl", kubeconfigs["admin"], NODE_NAME),
            timeout=120,
        )
        c.wait("kube-proxy", lambda: self._http_ok(state.proxy_port, "/healthz"), timeout=60)

    @staticmethod
    def _http_ok(port: int, path: str) -> bool:
        return net.http_status(f"http://127.0.0.1:{port}{path}") == 200

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(
            ["ctr", "--address", str(self.sock), "--namespace", "k8s.io", *args], check=check
        )

    def _containerd_ok(self) -> bool:
        return self.sock.exists() and self.ctr("version", check=False).returncode == 0

    def clean_containers(self) -> None:
        """Containers a previous cluster left in the cached root (it was killed): remove them."""
        for cid in self.ctr("containers", "ls", "-q", check=False).stdout.split():
            self.ctr("tasks", "kill", "--signal", "SIGKILL", cid, check=False)
            self.ctr("tasks", "delete", "--force", cid, check=False)
            self.ctr("containers", "delete", cid, check=False)

    # -- teardown -------------------------------------------------------------------------------

    def stop(self) -> None:
        """After the components are stopped: everything left in the namespaces or the cgroups,
        then the holder (the namespaces, their mounts, bridge and iptables chains go with it),
        then the cgroups."""
        holder = self.holder_pid()
        if holder is not None and namespace_id(holder, "net") is not None:
            ns = {namespace_id(holder, "net"), namespace_id(holder, "mnt")}
            ours = {namespace_id(os.getpid(), "net"), namespace_id(os.getpid(), "mnt")}
            ns -= ours
            self._kill_where(
                lambda pid: (
                    pid != holder
                    and bool({namespace_id(pid, "net"), namespace_id(pid, "mnt")} & ns)
                )
            )
        self._kill_cgroup_processes()
        if holder is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(holder, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(holder, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while namespace_id(holder, "net") is not None and time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(holder, os.WNOHANG)
                time.sleep(0.05)
            self.holder_pid_file.unlink(missing_ok=True)
        self._remove_cgroups()
        # The bind-mount sources and the node's runtime state (not the caches).
        for sub in ("private", "containerd-state", "runc", "cni", "containerd-root", "sysctl"):
            shutil.rmtree(self.dir / sub, ignore_errors=True)

    @staticmethod
    def _kill_where(match: Callable[[int], bool]) -> None:
        for _ in range(50):
            victims = []
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit() and int(entry.name) != os.getpid():
                    with contextlib.suppress(OSError):
                        if match(int(entry.name)):
                            victims.append(int(entry.name))
            if not victims:
                return
            for pid in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)

    def _cgroup_dirs(self) -> list[Path]:
        """Every cgroup directory of the tier, deepest first."""
        dirs: list[Path] = []
        for h in self.hierarchies():
            top = h / self.cgroup
            if top.is_dir():
                dirs += [Path(p) for p, _, _ in os.walk(top)]
        return sorted(dirs, key=lambda p: len(p.parts), reverse=True)

    def _kill_cgroup_processes(self) -> None:
        def pids() -> set[int]:
            found: set[int] = set()
            for d in self._cgroup_dirs():
                with contextlib.suppress(OSError):
                    found |= {int(x) for x in (d / "cgroup.procs").read_text().split()}
            return found

        for _ in range(50):
            left = pids()
            if not left:
                return
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)

    def _remove_cgroups(self) -> None:
        for _ in range(50):
            dirs = self._cgroup_dirs()
            if not dirs:
                return
            for d in dirs:
                with contextlib.suppress(OSError):
                    d.rmdir()
            time.sleep(0.1)

    def leftovers(self) -> list[str]:
        """What the tier would leave on the host if `down` missed it (the teardown test)."""
        found = [f"cgroup {d}" for d in self._cgroup_dirs()]
        holder = self.holder_pid()
        if holder is not None and namespace_id(holder, "net") is not None:
            found.append(f"holder process {holder}")
        with open("/proc/self/mountinfo") as f:
            found += [
                f"mount {line.split()[4]}"
                for line in f
                if str(self.cluster_dir) in line or str(cache_root() / "containerd") in line
            ]
        return found
