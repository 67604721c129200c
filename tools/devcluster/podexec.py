"""Runs inside a pod's private mount namespace: bind the pod's files to their real paths, then exec.

Started by the kubelet as `unshare --mount --propagation private python -m devcluster.podexec
PLAN.json`. Because the namespace is private, each pod sees its own service-account token at
/var/run/secrets/kubernetes.io/serviceaccount and its own /dev/termination-log, so unmodified
in-cluster code (kopf, the kubernetes client, the trainer) works as it would in a container.
The host only gains empty mount points; the pods' files never appear there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _ensure_mount_point(target: Path, is_file: bool) -> None:
    if is_file:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.touch()
    else:
        target.mkdir(parents=True, exist_ok=True)


def hides(target: Path, keep: list[str]) -> bool:
    """Would a mount at `target` cover a host path the pod runs from (its Python environment,
    the repository, the kubelet's pod files)? An emptyDir at /tmp does when the checkout lives
    under /tmp. A container never sees host paths; a process does, so such a mount is skipped
    and the pod sees the host's directory there instead."""
    t = os.path.abspath(target)
    return any(os.path.commonpath([t, os.path.abspath(k)]) == t for k in keep)


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    keep = plan.get("keep", [])
    for mount in plan["mounts"]:
        source, target = Path(mount["source"]), Path(mount["target"])
        if hides(target, keep):
            print(
                f"devcluster: not mounting {mount['source']} at {target}: it would hide the "
                "host paths this pod runs from",
                file=sys.stderr,
            )
            continue
        _ensure_mount_point(target, source.is_file())
        subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
        if mount.get("readOnly"):
            subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
    os.chdir(plan["workingDir"])
    argv = plan["argv"]
    try:
        os.execvpe(argv[0], argv, plan["env"])
    except FileNotFoundError:
        print(f"exec: {argv[0]!r}: executable file not found in $PATH", file=sys.stderr)
        sys.exit(127)


if __name__ == "__main__":
    main()
