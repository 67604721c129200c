"""Helpers of the operator end-to-end tests: the operator process and reads of run state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devcluster.testing import DevCluster, wait_for

BUCKET = "fedtune-e2e"
CLIENTS = ("alice", "bob", "carol")
Manifest = dict[str, Any]


@dataclass
class Assets:
    """What the runs read: the model and one data file per client, all under s3://BUCKET."""

    model_uri: str
    data_uris: dict[str, str]
    eval_uri: str
    broken_data_uri: str
    local_model: Path


class Operator:
    """`fedtune operator` as a local process, killable like a pod on a failing node."""

    def __init__(self, dc: DevCluster, namespace: str, log: Path) -> None:
        self.dc, self.namespace, self.log = dc, namespace, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "KUBECONFIG": str(self.dc.kubeconfig), "FEDTUNE_RESYNC_SECONDS": "5"}
        with self.log.open("ab") as f:
            self.proc = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "fedtune"),
                    "operator",
                    "--namespace",
                    self.namespace,
                    "--liveness-port",
                    "0",
                    "--metrics-port",
                    "0",
                ],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as when a node dies under it."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 80) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def get_run(dc: DevCluster, namespace: str, name: str) -> dict[str, Any]:
    return json.loads(dc.kubectl("get", "fft", name, "-n", namespace, "-o", "json").stdout)


def condition(run: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for c in (run.get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c
    return None


def wait_condition(
    dc: DevCluster, op: Operator, namespace: str, name: str, type_: str, timeout: float
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        run = get_run(dc, namespace, name)
        c = condition(run, type_)
        failed = condition(run, "Failed")
        if type_ != "Failed" and failed and failed["status"] == "True":
            raise AssertionError(
                f"run failed: {failed['reason']}: {failed['message']}\n{op.log_tail()}\n{dc.logs()}"
            )
        return run if c and c["status"] == "True" else None

    return wait_for(
        check,
        timeout=timeout,
        what=f"{name} to be {type_}",
        interval=1.0,
        diagnose=lambda: f"{op.log_tail()}\n{dc.logs()}",
    )


def jobs_of(dc: DevCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    out = dc.kubectl(
        "get", "jobs", "-n", namespace, "-l", f"fedtune.dev/run={name}", "-o", "json"
    ).stdout
    return json.loads(out)["items"]


def events_of(dc: DevCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    out = dc.kubectl(
        "get",
        "events",
        "-n",
        namespace,
        "--field-selector",
        f"involvedObject.name={name},involvedObject.kind=FederatedFineTune",
        "-o",
        "json",
    ).stdout
    return json.loads(out)["items"]
