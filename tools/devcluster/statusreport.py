"""What the process kubelet tells the API server: the Node it registers and keeps Ready, and each
pod's status, through the status subresource.

A real kubelet keeps a status until the API server takes it, so a pod's status is retried for up
to 5 minutes while the API server is away (a restart): a pod's final status lost then would leave
its Job active for ever. An answer about the request itself (404, 403, 422) is not retried.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.rest import ApiException

log = logging.getLogger("devcluster.kubelet")

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


def patch_pod_status(core: client.CoreV1Api, meta: dict[str, Any], status: dict[str, Any]) -> None:
    """Patch the status of the pod `meta` names, retried while the API server is away."""
    for _ in range(STATUS_RETRIES):
        try:
            core.patch_namespaced_pod_status(meta["name"], meta["namespace"], {"status": status})
            return
        except (ApiException, urllib3.exceptions.HTTPError) as e:
            if not api_server_away(e):
                if getattr(e, "status", None) != 404:
                    log.warning("status patch of %s failed: %s", meta["name"], e)
                return
            log.warning("status patch of %s: %s; retrying", meta["name"], e)
        time.sleep(STATUS_RETRY_SECONDS)
    log.error("status of %s not reported: the API server stayed away", meta["name"])


def node_manifest(node_name: str) -> dict[str, Any]:
    """The Node the process kubelet registers, labelled as a process node."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node_name,
            "labels": {
                "kubernetes.io/hostname": node_name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "devcluster.fedtune.dev/process-kubelet": "true",
            },
        },
    }


def node_status(node_name: str) -> dict[str, Any]:
    """The Node's status at a heartbeat: Ready, with this machine's CPUs."""
    t = now()
    return {
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
            {"type": "Hostname", "address": node_name},
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
