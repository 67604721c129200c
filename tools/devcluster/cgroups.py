"""The real node's cgroups: what remains on the host, because the kernel cannot put cgroup v1 in
a namespace.

The kubelet's cgroup root is CGROUP_PREFIX-<id> in every hierarchy; `down` kills every process left
in it and removes it, deepest directory first.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from devcluster.processes import kill_until_gone

CGROUP_PREFIX = "fedtune-node"
CGROUP_ROOT = Path("/sys/fs/cgroup")


def hierarchies() -> list[Path]:
    return sorted(
        p
        for p in CGROUP_ROOT.iterdir()
        if p.is_dir() and not p.is_symlink() and (p / "cgroup.procs").exists()
    )


class NodeCgroups:
    """The cgroup tree `/<CGROUP_PREFIX>-<node_id>` in every hierarchy: the kubelet's root."""

    def __init__(self, node_id: str) -> None:
        self.name = f"{CGROUP_PREFIX}-{node_id}"

    def create(self) -> None:
        """The kubelet's cgroup root, in every v1 hierarchy (cpuset needs its cpus and mems)."""
        for h in hierarchies():
            path = h / self.name
            path.mkdir(exist_ok=True)
            if (h / "cpuset.cpus").exists():
                for f in ("cpuset.cpus", "cpuset.mems"):
                    with contextlib.suppress(OSError):
                        (path / f).write_text((h / f).read_text())

    def dirs(self) -> list[Path]:
        """Every cgroup directory of the tier, deepest first."""
        dirs: list[Path] = []
        for h in hierarchies():
            top = h / self.name
            if top.is_dir():
                dirs += [Path(p) for p, _, _ in os.walk(top)]
        return sorted(dirs, key=lambda p: len(p.parts), reverse=True)

    def kill_processes(self) -> None:
        """SIGKILL every process in the tree."""

        def pids() -> set[int]:
            found: set[int] = set()
            for d in self.dirs():
                with contextlib.suppress(OSError):
                    found |= {int(x) for x in (d / "cgroup.procs").read_text().split()}
            return found

        kill_until_gone(pids)

    def remove(self) -> None:
        """Remove the tree (once its processes are gone), retrying while the kernel lets go."""
        for _ in range(50):
            dirs = self.dirs()
            if not dirs:
                return
            for d in dirs:
                with contextlib.suppress(OSError):
                    d.rmdir()
            time.sleep(0.1)
