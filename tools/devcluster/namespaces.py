"""The real node's network and mount namespaces, and the forwarder that lets the host in.

A holder process (`unshare ... sleep infinity`) keeps both namespaces alive; every component of a
real-node cluster runs inside them (`prefix`). The network namespace has only `lo`, with the node's
address NODE_IP on it, and the CNI bridge of the pod network: there is no route anywhere else.
The host reaches the components through `devcluster.forward`, which listens on the host's
127.0.0.1 and connects inside, at the same port numbers.

In the mount namespace /run, /var/lib and /var/log are bind mounts of directories of the node's
state directory (the kubelet, containerd and the CNI plugins hard-code paths there), and the
/proc/sys files the kubelet checks under `protectKernelDefaults` show the values it wants, so it
writes no host sysctl. Ending the holder ends the namespaces, with their mounts, the bridge and
the iptables chains.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from devcluster.processes import StartupError, kill_until_gone

NODE_IP = "10.254.0.2"  # only ever inside the tier's network namespace
# What the kubelet checks under protectKernelDefaults, shown to it inside the mount namespace.
KERNEL_DEFAULTS = {
    "vm/overcommit_memory": "1",
    "vm/panic_on_oom": "0",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
    "kernel/keys/root_maxkeys": "1000000",
    "kernel/keys/root_maxbytes": "25000000",
}
# Hidden host directories: each is a bind mount of an empty directory of the state directory.
PRIVATE_DIRS = ("/run", "/var/lib", "/var/log")


def namespace_id(pid: int, kind: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


class NodeNamespaces:
    """The namespaces of one real node: its state in `node_dir`, the holder's and the
    forwarder's pids in `pid_dir`, the forwarder's log in `log_dir`."""

    def __init__(self, node_dir: Path, *, pid_dir: Path, log_dir: Path) -> None:
        self.dir = node_dir
        self.pid_dir = pid_dir
        self.log_dir = log_dir

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
        """Run a command inside both namespaces (checked, output captured, unless told)."""
        kw.setdefault("check", True)
        kw.setdefault("capture_output", True)
        return subprocess.run([*self.prefix(), *argv], text=True, **kw)

    def create(self) -> None:
        """Start the holder, wait until its namespaces are new, then set them up: the node's
        address on `lo`, the private directories and the kernel defaults."""
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

    def kill_processes(self) -> None:
        """SIGKILL every process left in either namespace but the holder."""
        holder = self.holder_pid()
        if holder is None or namespace_id(holder, "net") is None:
            return
        ns = {namespace_id(holder, "net"), namespace_id(holder, "mnt")}
        ns -= {namespace_id(os.getpid(), "net"), namespace_id(os.getpid(), "mnt")}

        def inside() -> list[int]:
            found = []
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit() and int(entry.name) not in (os.getpid(), holder):
                    pid = int(entry.name)
                    with contextlib.suppress(OSError):
                        if {namespace_id(pid, "net"), namespace_id(pid, "mnt")} & ns:
                            found.append(pid)
            return found

        kill_until_gone(inside)

    def end(self) -> None:
        """Kill the holder and wait (10 s at most) until its namespaces are gone."""
        holder = self.holder_pid()
        if holder is None:
            return
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

    def leftovers(self) -> list[str]:
        """The holder, if it still holds namespaces."""
        holder = self.holder_pid()
        if holder is not None and namespace_id(holder, "net") is not None:
            return [f"holder process {holder}"]
        return []
