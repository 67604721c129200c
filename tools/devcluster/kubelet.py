"""The process kubelet: a Node whose pods are local processes.

It does the part of a scheduler and a kubelet that fedtune's Jobs need: binds pending pods to its
Node, runs each container's command in the project's Python environment inside a private mount
namespace (volumes, the service-account token and the termination log at their real paths),
reports status through the status subresource, restarts per `restartPolicy`, and honours deletion
with SIGTERM, the grace period, then SIGKILL. Images, resource limits, probes and runAsUser are
ignored: this is development infrastructure, never a production path.

This module is the node and its watch; one pod's life is devcluster/podworker.py, its volumes and
environment devcluster/podconfig.py, what is reported to the API server devcluster/statusreport.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from devcluster.podconfig import NodeSettings
from devcluster.podworker import PodWorker, delete_now
from devcluster.statusreport import node_manifest, node_status

log = logging.getLogger("devcluster.kubelet")


class ProcessKubelet:
    """The node: registers it and keeps it Ready, binds every pending pod to it, and runs a
    PodWorker for each of its pods, from a watch on every namespace's pods."""

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
        self.node = NodeSettings.of_this_process(
            node_name=node_name,
            state_dir=state_dir,
            api_port=api_port,
            workdir=workdir,
            extra_env=extra_env,
        )
        self.node.log_dir.mkdir(parents=True, exist_ok=True)
        self.node.pid_dir.mkdir(parents=True, exist_ok=True)
        self.workers: dict[str, PodWorker] = {}
        self.lock = threading.Lock()
        self.shutting_down = threading.Event()

    def register_node(self) -> None:
        try:
            self.core.create_node(node_manifest(self.node.node_name))
        except ApiException as e:
            if e.status != 409:
                raise
        self.heartbeat()

    def heartbeat(self) -> None:
        name = self.node.node_name
        self.core.patch_node_status(name, {"status": node_status(name)})

    def bind(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node.node_name},
        }
        try:
            # _preload_content=False: the generated client cannot parse the Binding reply.
            self.core.create_namespaced_binding(meta["namespace"], body, _preload_content=False)
        except ApiException as e:
            if e.status not in (404, 409):
                log.warning("binding %s failed: %s", meta["name"], e.reason)

    def sync(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        uid = meta["uid"]
        phase = (pod.get("status") or {}).get("phase")
        if not spec.get("nodeName"):
            if not meta.get("deletionTimestamp"):
                self.bind(pod)
            return
        if spec["nodeName"] != self.node.node_name:
            return
        with self.lock:
            worker = self.workers.get(uid)
            if meta.get("deletionTimestamp"):
                if worker is not None and worker.is_alive():
                    worker.grace_seconds = int(meta.get("deletionGracePeriodSeconds") or 30)
                    worker.stop_requested.set()
                elif phase in ("Succeeded", "Failed") or worker is None:
                    delete_now(self.core, pod)
                return
            if worker is None and phase not in ("Succeeded", "Failed"):
                worker = PodWorker(self.core, self.node, pod, shutting_down=self.shutting_down)
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
