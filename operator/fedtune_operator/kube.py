"""The operator's Kubernetes I/O, through the official client (run in a thread by the caller).

Everything here is a thin verb over the API: no decisions. Creating what exists and deleting what
is gone both count as success, which makes every action safe to repeat.

Verbs whose answer is not read ask for it unparsed (`_preload_content=False`): turning a Job into
the client's model classes costs milliseconds of CPU under the GIL, which every other request of
the operator, and its event loop, would wait for.
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


class NotOwned(Exception):
    """An object of the wanted name exists and is not this run's: never patched or deleted."""


class ClaimNotReady(Exception):
    """A claim of the wanted name exists but is not this run's (or is going): retry later."""


def _terminating(e: ApiException) -> bool:
    return e.status == 403 and "NamespaceTerminating" in str(e.body or "")


def _patch_test_failed(e: ApiException) -> bool:
    """A JSON patch that could not be applied: 422 with empty details (the API server keeps the
    patch library's message to itself), where a patched object that fails validation is a 422
    naming its kind and the fields. With add operations on paths that always exist, only a
    failed "test" operation gets there."""
    if e.status != 422:
        return False
    try:
        details = json.loads(e.body or "{}").get("details") or {}
    except ValueError:
        return False
    return not details.get("kind") and not details.get("causes")


API_CONCURRENCY = 32
"""Requests the operator has in flight at most: the threads the shell runs these verbs in, and
the connections kept to the API server. With many runs handing off rounds at once, fewer threads
queue one run's requests behind every other run's (the default executor has cores + 4)."""


def _drain(response: Any) -> None:
    """Read an unparsed answer to its end: only then does urllib3 give its connection back to
    the pool (an answer left unread would hold its connection, and the next request open one)."""
    response.drain_conn()
    response.release_conn()


def api_client() -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    # One connection per thread: urllib3 would otherwise open and drop one per extra request.
    configuration.connection_pool_maxsize = API_CONCURRENCY
    return client.ApiClient(configuration)


class Kube:
    def __init__(self, api: client.ApiClient | None = None) -> None:
        api = api or api_client()
        self.custom = client.CustomObjectsApi(api)
        self.batch = client.BatchV1Api(api)
        self.core = client.CoreV1Api(api)
        self.networking = client.NetworkingV1Api(api)

    @staticmethod
    def _json(response: Any) -> dict[str, Any]:
        return json.loads(response.data)

    def get_run(self, namespace: str, name: str, plural: str = PLURAL) -> dict[str, Any] | None:
        """The run (or, with plural federatedsites, the site), None when it is gone."""
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def labelled_jobs(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        """The Jobs of a label selector (a site's: it has few, and no index of its own)."""
        return self._json(
            self.batch.list_namespaced_job(
                namespace, label_selector=selector, _preload_content=False
            )
        )["items"]

    def job_pods(self, namespace: str, jobs: list[str]) -> list[dict]:
        """The pods of the named Jobs (by the Job controller's job-name label)."""
        selector = f"job-name in ({','.join(sorted(jobs))})"
        return self._json(
            self.core.list_namespaced_pod(
                namespace, label_selector=selector, _preload_content=False
            )
        )["items"]

    def write_status(
        self, obj: dict[str, Any], status: dict[str, Any], plural: str = PLURAL
    ) -> dict[str, Any]:
        """Replace the status, guarded by the resourceVersion we read (409 -> Conflict); the
        written object, as the API server answered (JSON, not the client's model classes): the
        run's newest body until the watch shows a newer one (loops.View)."""
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
            return self._json(
                self.custom.replace_namespaced_custom_object_status(
                    GROUP, VERSION, meta["namespace"], plural, meta["name"], body,
                    _preload_content=False,
                )
            )  # fmt: skip
        except ApiException as e:
            if e.status == 409:
                raise Conflict from e
            raise

    def create_job(self, manifest: dict[str, Any]) -> bool:
        """True when created, False when it existed already."""
        try:
            _drain(
                self.batch.create_namespaced_job(
                    manifest["metadata"]["namespace"], manifest, _preload_content=False
                )
            )
        except ApiException as e:
            if e.status == 409:
                return False
            if _terminating(e):
                raise NamespaceTerminating(manifest["metadata"]["namespace"]) from None
            raise
        return True

    def apply_network_policy(self, manifest: dict[str, Any]) -> None:
        """Bring the run's NetworkPolicy to the manifest (a run's storage endpoint or its
        spec.networkPolicy may change), or create it: patch, then create on 404 (and patch again
        should a create race with someone else's).

        Patch first because the policy exists from the run's first Job on, and it is applied
        again before every Job: one request where create-then-patch took two, on the path from
        a finished Job to the next one.

        Only a policy the run owns is patched: the patch is a JSON patch whose first operation
        tests that the policy's (first) owner reference is the manifest's, so the API server
        applies all of it or, for a policy of that name that the run does not own (anyone's, or
        a deleted run's of the same name not yet garbage-collected), nothing: NotOwned. One
        request, no read in between to race with, and the RBAC stays create and patch."""
        meta = manifest["metadata"]
        try:
            self._patch_network_policy(manifest)
            return
        except ApiException as e:
            if e.status != 404:
                raise
        try:
            _drain(
                self.networking.create_namespaced_network_policy(
                    meta["namespace"], manifest, _preload_content=False
                )
            )
            return
        except ApiException as e:
            if _terminating(e):
                raise NamespaceTerminating(meta["namespace"]) from None
            if e.status != 409:
                raise
        self._patch_network_policy(manifest)

    def _patch_network_policy(self, manifest: dict[str, Any]) -> None:
        """The owner-tested JSON patch of apply_network_policy (NotOwned when the test fails)."""
        meta = manifest["metadata"]
        (owner,) = meta["ownerReferences"]
        patch = [
            {"op": "test", "path": "/metadata/ownerReferences/0/uid", "value": owner["uid"]},
            # "add" replaces a member that exists: the lists go whole, removed rules with them.
            {"op": "add", "path": "/metadata/labels", "value": meta.get("labels") or {}},
            {"op": "add", "path": "/spec", "value": manifest["spec"]},
        ]
        try:
            _drain(
                self.networking.patch_namespaced_network_policy(
                    meta["name"],
                    meta["namespace"],
                    patch,
                    _content_type="application/json-patch+json",
                    _preload_content=False,
                )
            )
        except ApiException as e:
            if _patch_test_failed(e):
                raise NotOwned(
                    f"NetworkPolicy {meta['namespace']}/{meta['name']} exists and is not owned "
                    f"by this run (uid {owner['uid']})"
                ) from None
            raise

    def create_claim(self, manifest: dict[str, Any]) -> bool:
        """Create a PersistentVolumeClaim the operator owns: True when created, False when this
        run's claim exists already.

        A claim of the same name that another object owns (a deleted run of the same name,
        whose claim the garbage collector has yet to remove) or that is being deleted would
        leave the Job's pod Pending on it: ClaimNotReady, so that the reconcile retries (after
        a backoff) and creates the Job only once a claim of this run is in place.
        """
        meta = manifest["metadata"]
        try:
            _drain(
                self.core.create_namespaced_persistent_volume_claim(
                    meta["namespace"], manifest, _preload_content=False
                )
            )
        except ApiException as e:
            if _terminating(e):
                raise NamespaceTerminating(meta["namespace"]) from None
            if e.status != 409:
                raise
        else:
            return True
        existing = self._json(
            self.core.read_namespaced_persistent_volume_claim(
                meta["name"], meta["namespace"], _preload_content=False
            )
        )["metadata"]
        owners = {ref.get("uid") for ref in existing.get("ownerReferences") or []}
        wanted = {ref["uid"] for ref in meta.get("ownerReferences") or []}
        if existing.get("deletionTimestamp") or not wanted <= owners:
            raise ClaimNotReady(
                f"persistentvolumeclaim {meta['namespace']}/{meta['name']} belongs to another "
                "object or is being deleted; waiting for it to go"
            )
        return False

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
            _drain(
                self.batch.delete_namespaced_job(
                    name, namespace, propagation_policy="Background", _preload_content=False
                )
            )
        except ApiException as e:
            if e.status != 404:
                raise

    def suspend_job(self, namespace: str, name: str, suspend: bool) -> None:
        try:
            _drain(
                self.batch.patch_namespaced_job(
                    name, namespace, {"spec": {"suspend": suspend}}, _preload_content=False
                )
            )
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


_shared: Kube | None = None


def shared() -> Kube:
    """The operator's one client, made on first use (after kopf has started, so that a test
    process can import the handlers without a cluster)."""
    global _shared
    if _shared is None:
        _shared = Kube()
    return _shared
