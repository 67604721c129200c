"""The real node's container runtime: containerd (Debian's 1.6) with runc, its CNI network (the
bridge and host-local plugins), and `ctr` to look inside it.

containerd resolves the registry the images name (MIRRORED_REGISTRY, the chart's and the CRD's
default) to the local registry only, never to the real host. Its root (pulled and unpacked
images) is the shared cache's, locked by the containerd that uses it; a second real-node cluster
on the machine gets a private root under its state directory.
"""

from __future__ import annotations

import fcntl
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from devcluster.pauseimage import PAUSE_IMAGE
from devcluster.state import cache_root

POD_CIDR = "10.244.0.0/24"
BRIDGE = "cni0"
# The registry the images name (the chart's and the CRD's defaults); containerd resolves it to
# the local registry, never to the real host.
MIRRORED_REGISTRY = "ghcr.io"


class Containerd:
    """The containerd of one real node, its state and configuration in `node_dir`; `run` runs a
    command where containerd runs (inside the node's namespaces)."""

    def __init__(
        self, node_dir: Path, run: Callable[..., subprocess.CompletedProcess[str]]
    ) -> None:
        self.dir = node_dir
        self.sock = node_dir / "containerd.sock"
        self.config = node_dir / "containerd.toml"
        self._run = run

    def _root(self) -> tuple[Path, Path]:
        """The cached root when no other real-node cluster holds it, else a private one; and the
        lock that the running containerd holds on it."""
        shared = cache_root() / "containerd" / "root"
        shared.mkdir(parents=True, exist_ok=True)
        lock = shared.parent / "lock"
        with lock.open("w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return self.dir / "containerd-root", self.dir / "lock"
        return shared, lock

    def configure(self, registry_port: int) -> Path:
        """Write containerd.toml, the registry mirror and the CNI network; the lock file its root
        needs (see `argv`)."""
        d = self.dir
        (d / "cni" / "net.d").mkdir(parents=True, exist_ok=True)
        (d / "certs.d" / MIRRORED_REGISTRY).mkdir(parents=True, exist_ok=True)
        root, lock = self._root()
        registry = f"http://127.0.0.1:{registry_port}"
        (d / "certs.d" / MIRRORED_REGISTRY / "hosts.toml").write_text(
            f'server = "{registry}"\n\n[host."{registry}"]\n  capabilities = ["pull", "resolve"]\n'
        )
        self.config.write_text(
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
        return lock

    def argv(self, lock: Path) -> list[str]:
        """containerd under a lock on its root, so that no other node uses it meanwhile."""
        return ["flock", "--nonblock", str(lock), "containerd", "--config", str(self.config)]

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run(
            ["ctr", "--address", str(self.sock), "--namespace", "k8s.io", *args], check=check
        )

    def ready(self) -> bool:
        return self.sock.exists() and self.ctr("version", check=False).returncode == 0

    def clean_containers(self) -> None:
        """Containers a previous cluster left in the cached root (it was killed): remove them."""
        for cid in self.ctr("containers", "ls", "-q", check=False).stdout.split():
            self.ctr("tasks", "kill", "--signal", "SIGKILL", cid, check=False)
            self.ctr("tasks", "delete", "--force", cid, check=False)
            self.ctr("containers", "delete", cid, check=False)

    def import_image(self, name: str, archive: Path) -> None:
        """Import `archive` as `name`, unless the root has it already."""
        imported = self.ctr("images", "ls", "-q", check=False).stdout.split()
        if name not in imported:
            self.ctr("images", "import", str(archive))
