"""The operator's Kubernetes I/O, through the official client (run in a thread by the caller).

Everything here is a thin verb over the API: no decisions. Creating what exists and deleting what
is gone both count as success, which makes every action safe to repeat.
"""

from __future__ import annotations

import json
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from fedtune_operator.api import GROUP, PLURAL, VERSION


class Conflict(Exception):
    """The run changed since it was read; re-read and decide again."""


class NamespaceTerminating(Exception):
    """The namespace is being deleted: nothing new can be created in it, and nothing needs to."""


def _terminating(e: ApiException) -> bool:
    return e.status == 403 and "NamespaceTerminating" in str(e.body or "")


def api_client() -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


class Kube:
    def __init__(self, api: client.ApiClient | None = None) -> None:
        api = api or api_client()
        self.custom = client.CustomObjectsApi(api)
        self.batch = client.BatchV1Api(api)
        self.core = client.CoreV1Api(api)

    @staticmethod
    def _json(response: Any) -> dict[str, Any]:
        return json.loads(response.data)

    def get_run(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def job_pods(self, namespace: str, jobs: list[str]) -> list[dict]:
        """The pods of the named Jobs (by the Job controller's job-name label)."""
        selector = f"job-name in ({','.join(sorted(jobs))})"
        return self._json(
            self.core.list_namespaced_pod(
                namespace, label_selector=selector, _preload_content=False
            )
        )["items"]

    def write_status(self, obj: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        """Replace the status, guarded by the resourceVersion we read (409 -> Conflict)."""
        meta = obj["metadata"]
        body = {
            "apiVersion": obj["apiVersion"],
            "kind": obj["kind"],
            "metadata": {
                "name": meta["name"],
                "namespace": meta["namespace"],
                "resourceVersion": meta["resourceVersion"],
            },
            "spec": obj["spec"],
            "status": status,
        }
        try:
            return self.custom.replace_namespaced_custom_object_status(
                GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], body
            )
        except ApiException as e:
            if e.status == 409:
                raise Conflict from e
            raise

    def create_job(self, manifest: dict[str, Any]) -> bool:
        """True when created, False when it existed already."""
        try:
            self.batch.create_namespaced_job(manifest["metadata"]["namespace"], manifest)
        except ApiException as e:
            if e.status == 409:
                return False
            if _terminating(e):
                raise NamespaceTerminating(manifest["metadata"]["namespace"]) from None
            raise
        return True

    def job_state(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._json(
                self.batch.read_namespaced_job(name, namespace, _preload_content=False)
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def delete_job(self, namespace: str, name: str) -> None:
        try:
            # Background propagation: without it the Job's pods would be orphaned.
            self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
        except ApiException as e:
            if e.status != 404:
                raise

    def suspend_job(self, namespace: str, name: str, suspend: bool) -> None:
        try:
            self.batch.patch_namespaced_job(name, namespace, {"spec": {"suspend": suspend}})
        except ApiException as e:
            if e.status != 404:
                raise

    def delete_run(self, namespace: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background"
            )
        except ApiException as e:
            if e.status != 404:
                raise
