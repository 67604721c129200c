"""The devcluster's components as detached processes.

Each component runs in a session of its own, so `devcluster up` returns while the cluster keeps
running. Its pid is in `pids/<name>.pid`, its output in `logs/<name>.log`, and the command it was
started with in `pids/<name>.launch.json`, so that an outage test can start it again with the same
port and data. Startup waits on a readiness check and, when a component does not come up, fails
with the tail of its log.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path


class StartupError(RuntimeError):
    pass


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


def kill_until_gone(find: Callable[[], Iterable[int]]) -> None:
    """SIGKILL every process `find` names until it names none (at most 50 rounds, 0.1 s apart):
    a process forked while the others die is found in the next round."""
    for _ in range(50):
        victims = list(find())
        if not victims:
            return
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


class Processes:
    """The components of one cluster: started detached in `cwd`, logged to `log_dir`, recorded in
    `pid_dir`. `enter`, when given, is the argv prefix that runs a command where the components
    live (the real node's namespaces); it is asked at each start, once the namespaces exist."""

    def __init__(
        self,
        cwd: Path,
        *,
        log_dir: Path,
        pid_dir: Path,
        enter: Callable[[], list[str]] | None = None,
    ) -> None:
        self.cwd = cwd
        self.log_dir = log_dir
        self.pid_dir = pid_dir
        self.enter = enter

    def spawn(self, component: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        # What relaunch replays: the same command, ports and data directory.
        launch = self._launch_file(component)
        launch.write_text(json.dumps({"argv": argv, "env": env or {}}))
        launch.chmod(0o600)  # the S3 server's environment holds its root secret
        if self.enter is not None:
            argv = [*self.enter(), *argv]
        with (self.log_dir / f"{component}.log").open("ab") as logf:
            proc = subprocess.Popen(
                argv,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **(env or {})},
                cwd=self.cwd,
            )
        (self.pid_dir / f"{component}.pid").write_text(str(proc.pid))

    def relaunch(self, component: str) -> None:
        """Start `component` again with the command, environment and data it was started with."""
        launch = json.loads(self._launch_file(component).read_text())
        self.spawn(component, launch["argv"], launch["env"])

    def _launch_file(self, component: str) -> Path:
        return self.pid_dir / f"{component}.launch.json"

    def pid(self, component: str) -> int | None:
        f = self.pid_dir / f"{component}.pid"
        return int(f.read_text()) if f.exists() else None

    def alive(self, component: str) -> bool:
        pid = self.pid(component)
        return pid is not None and process_exists(pid)

    def log_tail(self, component: str, lines: int = 40) -> str:
        f = self.log_dir / f"{component}.log"
        if not f.exists():
            return "(no log)"
        return "\n".join(f.read_text(errors="replace").splitlines()[-lines:])

    def wait(self, component: str, ready: Callable[[], bool], timeout: float = 90.0) -> None:
        """Poll a readiness check until it passes; fail early if the process died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                print(f"[devcluster] {component} ready", file=sys.stderr)
                return
            if not self.alive(component):
                raise StartupError(
                    f"{component} exited during startup; last log lines:\n"
                    f"{self.log_tail(component)}"
                )
            time.sleep(0.25)
        raise StartupError(
            f"{component} not ready after {timeout:.0f}s; last log lines:\n"
            f"{self.log_tail(component)}"
        )

    def stop(self, component: str, grace: float) -> None:
        """SIGTERM to the component's process group, SIGKILL after `grace` seconds."""
        pid = self.pid(component)
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
