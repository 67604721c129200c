"""One pod on the process node, from its start to its final status: a thread per pod.

Its containers run as `unshare --mount ... python -m devcluster.podexec PLAN`, each in a session
of its own, with the output in a log file per container. The worker restarts them per
`restartPolicy` (with a backoff), reports every change through the status subresource, and on a
deletion sends SIGTERM, waits the grace period, sends SIGKILL and completes the deletion.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.rest import ApiException

from devcluster import podspec
from devcluster.podconfig import NodeSettings, PodConfig
from devcluster.podspec import ContainerConfigError, ContainerState
from devcluster.statusreport import api_server_away, now, patch_pod_status

log = logging.getLogger("devcluster.kubelet")

RESTART_BACKOFF_MAX = 10.0
CONFIG_RETRY_SECONDS = 2.0


def delete_now(core: client.CoreV1Api, pod: dict[str, Any]) -> None:
    """Complete a pod's deletion (grace 0) once its containers are gone, as a kubelet does; only
    this pod, not one created again under its name."""
    meta = pod["metadata"]
    try:
        core.delete_namespaced_pod(
            meta["name"],
            meta["namespace"],
            body={"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}},
        )
    except ApiException as e:
        if e.status not in (404, 409):
            log.warning("final delete of %s failed: %s", meta["name"], e.reason)


class PodWorker(threading.Thread):
    """Owns one pod from start to its final status; a stop request comes from a deletion.
    `shutting_down` is set when the node goes away rather than the pod."""

    def __init__(
        self,
        core: client.CoreV1Api,
        node: NodeSettings,
        pod: dict[str, Any],
        *,
        shutting_down: threading.Event,
    ) -> None:
        super().__init__(name=f"pod-{pod['metadata']['name']}", daemon=True)
        self.core = core
        self.node = node
        self.pod = pod
        self.meta = pod["metadata"]
        self.uid: str = self.meta["uid"]
        self.shutting_down = shutting_down
        self.stop_requested = threading.Event()
        self.grace_seconds = 30
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.pod_dir = node.state_dir / "pods" / self.uid
        self.start_time = now()
        self.config = PodConfig(core, node, pod, self.pod_dir)

    def _log_path(self, container: str) -> Path:
        return self.node.log_dir / f"{self.meta['namespace']}_{self.meta['name']}_{container}.log"

    def _start(self, container: dict[str, Any], plan: dict[str, Any]) -> subprocess.Popen[bytes]:
        plan_file = self.pod_dir / container["name"] / "plan.json"
        plan_file.write_text(json.dumps(plan))
        plan_file.chmod(0o600)
        logf = self._log_path(container["name"]).open("ab")
        logf.write(f"--- {now()} starting {plan['argv']}\n".encode())
        logf.flush()
        proc = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                sys.executable,
                "-m",
                "devcluster.podexec",
                str(plan_file),
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={"PATH": os.environ["PATH"], "PYTHONPATH": self.node.pythonpath},
        )
        logf.close()
        (self.node.pid_dir / f"{self.uid}_{container['name']}.pid").write_text(str(proc.pid))
        return proc

    def _patch(self, states: list[ContainerState], phase: str) -> None:
        status = podspec.pod_status(
            self.pod, states, phase=phase, now=now(), start_time=self.start_time
        )
        patch_pod_status(self.core, self.meta, status)

    def _kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = self.grace_seconds
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(deadline, 0.1))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # Children that left the process group are still in the session; sweep them too.
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("pod %s/%s worker crashed", self.meta["namespace"], self.meta["name"])
        finally:
            for f in self.node.pid_dir.glob(f"{self.uid}_*.pid"):
                f.unlink(missing_ok=True)

    def _run(self) -> None:
        spec = self.pod["spec"]
        containers = spec["containers"]
        policy = spec.get("restartPolicy", "Always")
        states = [ContainerState(c["name"]) for c in containers]
        if spec.get("initContainers"):
            for s in states:
                s.waiting_reason, s.waiting_message = (
                    "CreateContainerConfigError",
                    "initContainers are not supported by the process kubelet",
                )
            self._patch(states, "Pending")
            return

        # Resolve configuration, retrying like the kubelet does while a Secret is missing or the
        # API server is away (a restart mid-round must not strand the pod unstarted).
        while True:
            try:
                volumes = self.config.volumes()
                plans = [self.config.plan(c, volumes) for c in containers]
                break
            except ContainerConfigError as e:
                for s in states:
                    s.waiting_reason, s.waiting_message = "CreateContainerConfigError", str(e)
                self._patch(states, "Pending")
            except (ApiException, urllib3.exceptions.HTTPError) as e:
                if not api_server_away(e):
                    raise
                log.warning("config of %s: %s; retrying", self.meta["name"], e)
            if self.stop_requested.wait(CONFIG_RETRY_SECONDS):
                self._finish_deleted(states)
                return
        for s in states:
            s.waiting_reason = s.waiting_message = None

        backoff = [1.0] * len(containers)
        for i, c in enumerate(containers):
            self.procs[c["name"]] = self._start(c, plans[i])
            states[i].started_at = now()
        self._patch(states, "Running")

        while True:
            if self.stop_requested.is_set():
                self._kill_all()
                self._collect(containers, states)
                self._finish_deleted(states)
                return
            changed = self._collect(containers, states)
            codes = [s.exit_code for s in states]
            if changed:
                restart = [
                    i
                    for i, s in enumerate(states)
                    if s.exit_code is not None
                    and (policy == "Always" or (policy == "OnFailure" and s.exit_code != 0))
                ]
                if not restart:
                    phase = podspec.pod_phase(policy, codes)
                    self._patch(states, phase)
                    if phase != "Running":
                        return
                for i in restart:
                    self._patch(states, "Running")
                    if self.stop_requested.wait(backoff[i]):
                        break
                    backoff[i] = min(backoff[i] * 2, RESTART_BACKOFF_MAX)
                    c = containers[i]
                    plans[i] = self.config.plan(c, volumes)
                    self.procs[c["name"]] = self._start(c, plans[i])
                    states[i] = ContainerState(
                        c["name"], started_at=now(), restart_count=states[i].restart_count + 1
                    )
                    self._patch(states, "Running")
            self.stop_requested.wait(0.2)

    def _collect(self, containers: list[dict[str, Any]], states: list[ContainerState]) -> bool:
        """Record exits; True when a container finished since the last call."""
        changed = False
        for i, c in enumerate(containers):
            proc = self.procs.get(c["name"])
            if proc is None or states[i].exit_code is not None:
                continue
            code = proc.poll()
            if code is None:
                continue
            code = 128 - code if code < 0 else code  # signal n -> 128 + n, as runtimes report
            term_file = self.pod_dir / c["name"] / "termination-log"
            written = term_file.read_text(errors="replace") if term_file.exists() else ""
            log_tail = ""
            with contextlib.suppress(OSError):
                data = self._log_path(c["name"]).read_bytes()[-8192:]
                log_tail = data.decode(errors="replace")
            states[i].exit_code = code
            states[i].finished_at = now()
            states[i].message = podspec.termination_message(
                written,
                log_tail,
                policy=c.get("terminationMessagePolicy", "File"),
                failed=code != 0,
            )
            with self._log_path(c["name"]).open("ab") as f:
                f.write(f"--- {now()} exited with {code}\n".encode())
            changed = True
        return changed

    def _finish_deleted(self, states: list[ContainerState]) -> None:
        if self.shutting_down.is_set():
            return  # the node goes away, not the pod: leave its API object as it is
        for s in states:
            if s.exit_code is None:
                s.exit_code, s.finished_at = 137, now()
            s.waiting_reason = None
        codes = [s.exit_code for s in states]
        self._patch(states, podspec.pod_phase("Never", codes))
        delete_now(self.core, self.pod)
