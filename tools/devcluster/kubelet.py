"""The process kubelet: a Node whose pods are local processes.

It does the part of a scheduler and a kubelet that fedtune's Jobs need: binds pending pods to its
Node, runs each container's command in the project's Python environment inside a private mount
namespace (volumes, the service-account token and the termination log at their real paths),
reports status through the status subresource, restarts per `restartPolicy`, and honours deletion
with SIGTERM, the grace period, then SIGKILL. Images, resource limits, probes and runAsUser are
ignored: this is development infrastructure, never a production path.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from devcluster import podspec
from devcluster.podspec import ContainerConfigError, ContainerState

log = logging.getLogger("devcluster.kubelet")

RESTART_BACKOFF_MAX = 10.0
CONFIG_RETRY_SECONDS = 2.0
STATUS_RETRY_SECONDS = 1.0
STATUS_RETRIES = 300
"""How long a status waits for an API server that is away (restarting): 5 minutes."""


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def api_server_away(error: Exception) -> bool:
    """Whether `error` means the API server is unreachable or not ready yet (a restart), as
    opposed to an answer about the request: the former is retried, the latter is not."""
    if isinstance(error, ApiException):
        return error.status is None or error.status >= 500 or error.status == 429
    return isinstance(error, urllib3.exceptions.HTTPError)


class PodWorker(threading.Thread):
    """Owns one pod from start to its final status; a stop request comes from a deletion."""

    def __init__(self, kubelet: ProcessKubelet, pod: dict[str, Any]) -> None:
        super().__init__(name=f"pod-{pod['metadata']['name']}", daemon=True)
        self.kubelet = kubelet
        self.pod = pod
        self.meta = pod["metadata"]
        self.uid: str = self.meta["uid"]
        self.stop_requested = threading.Event()
        self.grace_seconds = 30
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.pod_dir = kubelet.state_dir / "pods" / self.uid
        self.start_time = now()
        self.read_only_volumes: set[str] = set()

    # -- lookups handed to the pure core -------------------------------------------------------

    def _secret(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            obj = self.kubelet.core.read_namespaced_secret(name, namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return podspec.decode_secret(obj.data or {})

    def _config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            obj = self.kubelet.core.read_namespaced_config_map(name, namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return dict(obj.data or {})

    def _claim(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            response = self.kubelet.core.read_namespaced_persistent_volume_claim(
                name, namespace, _preload_content=False
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return json.loads(response.data)["metadata"]

    def _token(self, audience: str | None, seconds: int) -> str:
        spec: dict[str, Any] = {
            "expirationSeconds": seconds,
            "boundObjectRef": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": self.meta["name"],
                "uid": self.uid,
            },
        }
        if audience:
            spec["audiences"] = [audience]
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        result = self.kubelet.core.create_namespaced_service_account_token(
            sa, self.meta["namespace"], body={"spec": spec}
        )
        return result.status.token

    # -- preparing a container -----------------------------------------------------------------

    def _materialise_volumes(self) -> dict[str, Path]:
        paths: dict[str, Path] = {}
        for volume in self.pod["spec"].get("volumes", []) or []:
            files = podspec.volume_files(
                self.pod,
                volume,
                secrets=self._secret,
                config_maps=self._config_map,
                token=self._token,
                node_name=self.kubelet.node_name,
                claims=self._claim,
            )
            if files.claim is not None:
                # One directory per claim, shared by every pod that mounts it.
                root = self.kubelet.state_dir / files.claim
                root.mkdir(parents=True, exist_ok=True)
                if files.read_only:
                    self.read_only_volumes.add(volume["name"])
                paths[volume["name"]] = root
                continue
            root = self.pod_dir / "volumes" / volume["name"]
            if not files.writable and root.exists():
                shutil.rmtree(root)
            root.mkdir(parents=True, exist_ok=True)
            for rel, data in files.files.items():
                target = root / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                target.chmod(files.mode)
            paths[volume["name"]] = root
        return paths

    def _plan(self, container: dict[str, Any], volumes: dict[str, Path]) -> dict[str, Any]:
        service_port = self.kubelet.api_port
        base = {
            "PATH": self.kubelet.pod_path,
            "HOME": os.environ.get("HOME", "/root"),
            "HOSTNAME": self.meta["name"],
            "PYTHONUNBUFFERED": "1",
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(service_port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(service_port),
            "KUBERNETES_PORT": f"tcp://127.0.0.1:{service_port}",
            **self.kubelet.extra_env,
        }
        env = podspec.container_env(
            self.pod,
            container,
            base=base,
            secrets=self._secret,
            config_maps=self._config_map,
            node_name=self.kubelet.node_name,
        )
        argv = podspec.command_line(container, env)
        mounts = []
        for vm in container.get("volumeMounts", []) or []:
            if vm["name"] not in volumes:
                raise ContainerConfigError(f"volumeMount {vm['name']!r} names no volume")
            source = volumes[vm["name"]] / vm.get("subPath", "")
            mounts.append(
                {
                    "source": str(source),
                    "target": vm["mountPath"],
                    "readOnly": bool(vm.get("readOnly")) or vm["name"] in self.read_only_volumes,
                }
            )
        term_file = self.pod_dir / container["name"] / "termination-log"
        term_file.parent.mkdir(parents=True, exist_ok=True)
        term_file.write_bytes(b"")
        mounts.append(
            {
                "source": str(term_file),
                "target": container.get("terminationMessagePath", podspec.DEFAULT_TERMINATION_PATH),
            }
        )
        return {
            "argv": argv,
            "env": env,
            "mounts": mounts,
            "workingDir": container.get("workingDir") or str(self.kubelet.workdir),
            "keep": self.kubelet.host_paths,
        }

    # -- running ---------------------------------------------------------------------------------

    def _log_path(self, container: str) -> Path:
        return (
            self.kubelet.log_dir / f"{self.meta['namespace']}_{self.meta['name']}_{container}.log"
        )

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
            env={"PATH": os.environ["PATH"], "PYTHONPATH": self.kubelet.pythonpath},
        )
        logf.close()
        self.kubelet.record_pid(self.uid, container["name"], proc.pid)
        return proc

    def _patch(self, states: list[ContainerState], phase: str) -> None:
        status = podspec.pod_status(
            self.pod, states, phase=phase, now=now(), start_time=self.start_time
        )
        # A real kubelet keeps the status until the API server takes it: a pod's final status
        # lost during an API server restart would leave its Job active for ever.
        for _ in range(STATUS_RETRIES):
            try:
                self.kubelet.core.patch_namespaced_pod_status(
                    self.meta["name"], self.meta["namespace"], {"status": status}
                )
                return
            except (ApiException, urllib3.exceptions.HTTPError) as e:
                if not api_server_away(e):
                    if getattr(e, "status", None) != 404:
                        log.warning("status patch of %s failed: %s", self.meta["name"], e)
                    return
                log.warning("status patch of %s: %s; retrying", self.meta["name"], e)
            time.sleep(STATUS_RETRY_SECONDS)
        log.error("status of %s not reported: the API server stayed away", self.meta["name"])

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
            self.kubelet.forget(self.uid)

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
                volumes = self._materialise_volumes()
                plans = [self._plan(c, volumes) for c in containers]
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
                    plans[i] = self._plan(c, volumes)
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
        if self.kubelet.shutting_down.is_set():
            return  # the node goes away, not the pod: leave its API object as it is
        for s in states:
            if s.exit_code is None:
                s.exit_code, s.finished_at = 137, now()
            s.waiting_reason = None
        codes = [s.exit_code for s in states]
        self._patch(states, podspec.pod_phase("Never", codes))
        self.kubelet.delete_now(self.pod)


class ProcessKubelet:
    def __init__(
        self,
        api: client.ApiClient,
        *,
        node_name: str,
        state_dir: Path,
        api_port: int,
        workdir: Path,
        extra_env: dict[str, str],
    ) -> None:
        self.core = client.CoreV1Api(api)
        self.node_name = node_name
        self.state_dir = state_dir
        self.log_dir = state_dir / "logs" / "pods"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.pid_dir = state_dir / "pids" / "pods"
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        self.api_port = api_port
        self.workdir = workdir
        self.extra_env = extra_env
        # Pods run in the environment the kubelet runs in: its venv's bin comes first.
        venv_bin = str(Path(sys.executable).parent)
        self.pod_path = f"{venv_bin}:/usr/local/bin:/usr/bin:/bin"
        self.pythonpath = os.pathsep.join(p for p in sys.path if p and Path(p).is_dir())
        # What a pod's mounts must not cover: where its Python, the code and its files live.
        self.host_paths = sorted(
            {
                str(state_dir.resolve()),
                str(workdir.resolve()),
                sys.prefix,
                str(Path(sys.executable).resolve().parent),
            }
            | {str(Path(p).resolve()) for p in sys.path if p and Path(p).is_dir()}
        )
        self.workers: dict[str, PodWorker] = {}
        self.lock = threading.Lock()
        self.shutting_down = threading.Event()

    def record_pid(self, uid: str, container: str, pid: int) -> None:
        (self.pid_dir / f"{uid}_{container}.pid").write_text(str(pid))

    def forget(self, uid: str) -> None:
        for f in self.pid_dir.glob(f"{uid}_*.pid"):
            f.unlink(missing_ok=True)

    def register_node(self) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node_name,
                "labels": {
                    "kubernetes.io/hostname": self.node_name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "devcluster.fedtune.dev/process-kubelet": "true",
                },
            },
        }
        try:
            self.core.create_node(body)
        except ApiException as e:
            if e.status != 409:
                raise
        self.heartbeat()

    def heartbeat(self) -> None:
        t = now()
        status = {
            "capacity": {"cpu": str(os.cpu_count() or 1), "memory": "24Gi", "pods": "250"},
            "allocatable": {"cpu": str(os.cpu_count() or 1), "memory": "24Gi", "pods": "250"},
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "process kubelet is posting ready status",
                    "lastHeartbeatTime": t,
                    "lastTransitionTime": t,
                },
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.node_name},
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": "process-kubelet",
                "kubeProxyVersion": "",
                "containerRuntimeVersion": "process://",
                "kernelVersion": os.uname().release,
                "osImage": "devcluster",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }
        self.core.patch_node_status(self.node_name, {"status": status})

    def bind(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name},
        }
        try:
            # _preload_content=False: the generated client cannot parse the Binding reply.
            self.core.create_namespaced_binding(meta["namespace"], body, _preload_content=False)
        except ApiException as e:
            if e.status not in (404, 409):
                log.warning("binding %s failed: %s", meta["name"], e.reason)

    def delete_now(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        try:
            self.core.delete_namespaced_pod(
                meta["name"],
                meta["namespace"],
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}},
            )
        except ApiException as e:
            if e.status not in (404, 409):
                log.warning("final delete of %s failed: %s", meta["name"], e.reason)

    def sync(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        uid = meta["uid"]
        phase = (pod.get("status") or {}).get("phase")
        if not spec.get("nodeName"):
            if not meta.get("deletionTimestamp"):
                self.bind(pod)
            return
        if spec["nodeName"] != self.node_name:
            return
        with self.lock:
            worker = self.workers.get(uid)
            if meta.get("deletionTimestamp"):
                if worker is not None and worker.is_alive():
                    worker.grace_seconds = int(meta.get("deletionGracePeriodSeconds") or 30)
                    worker.stop_requested.set()
                elif phase in ("Succeeded", "Failed") or worker is None:
                    self.delete_now(pod)
                return
            if worker is None and phase not in ("Succeeded", "Failed"):
                worker = PodWorker(self, pod)
                self.workers[uid] = worker
                worker.start()

    def run(self, stop: threading.Event) -> None:
        self.register_node()
        threading.Thread(target=self._heartbeats, args=(stop,), daemon=True).start()
        try:
            self._watch(stop)
        finally:
            self.shutdown()

    def _watch(self, stop: threading.Event) -> None:
        while not stop.is_set():
            w = watch.Watch()
            try:
                # The list too: while the API server restarts, it refuses connections.
                listing = self.core.list_pod_for_all_namespaces(_preload_content=False)
                doc = json.loads(listing.data)
                for item in doc["items"]:
                    self.sync(item)
                rv = doc["metadata"]["resourceVersion"]
                for event in w.stream(
                    self.core.list_pod_for_all_namespaces,
                    resource_version=rv,
                    timeout_seconds=60,
                    _preload_content=False,
                ):
                    if stop.is_set():
                        break
                    obj = event["raw_object"]
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self.sync(obj)
            except ApiException as e:
                if e.status != 410:
                    log.warning("pod watch ended: %s", e.reason)
            except Exception as e:  # connection drops: relist and watch again
                log.warning("pod watch error: %s", e)
                stop.wait(1)

    def _heartbeats(self, stop: threading.Event) -> None:
        while not stop.wait(20):
            with contextlib.suppress(Exception):
                self.heartbeat()

    def shutdown(self) -> None:
        self.shutting_down.set()
        with self.lock:
            workers = list(self.workers.values())
        for w in workers:
            w.grace_seconds = 5
            w.stop_requested.set()
        for w in workers:
            w.join(timeout=15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--node-name", default="devnode")
    parser.add_argument("--api-port", required=True, type=int)
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument(
        "--pod-env",
        action="append",
        default=[],
        help="NAME=VALUE added to every container's environment (e.g. OMP_NUM_THREADS=1)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    api = config.new_client_from_config(config_file=args.kubeconfig)
    extra = dict(item.split("=", 1) for item in args.pod_env)
    kubelet = ProcessKubelet(
        api,
        node_name=args.node_name,
        state_dir=args.state_dir,
        api_port=args.api_port,
        workdir=args.workdir,
        extra_env=extra,
    )
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        # Raising interrupts the blocking watch read; run()'s finally then stops every pod.
        stop.set()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    kubelet.run(stop)


if __name__ == "__main__":
    main()
