"""Pure pieces of the process kubelet: what a pod's containers see, and what its status says.

The kubelet shell (`devcluster.podconfig`) fetches Secrets, ConfigMaps and tokens and hands them in
through small lookup callables, so everything here is a function of its arguments and is tested
without a cluster. Pods are plain dicts in the API's camelCase JSON form.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Pod = Mapping[str, Any]
Lookup = Callable[[str, str], Mapping[str, str] | None]
"""(namespace, name) -> the object's data (already decoded), or None when it does not exist."""
ObjectLookup = Callable[[str, str], Mapping[str, Any] | None]
"""(namespace, name) -> the object's metadata (a PersistentVolumeClaim's), or None."""


def _no_claims(namespace: str, name: str) -> None:
    return None


TERMINATION_MESSAGE_LIMIT = 4096
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
SA_MOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


class ContainerConfigError(Exception):
    """The pod references something missing; the real kubelet reports CreateContainerConfigError
    and keeps retrying, and so do we."""


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------

_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: unknown references stay as written, $$ escapes a dollar."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR_REF.sub(sub, text)


def field_ref(pod: Pod, path: str, node_name: str) -> str:
    meta = pod.get("metadata", {})
    spec = pod.get("spec", {})
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName") or node_name,
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.podIP": "127.0.0.1",
        "status.hostIP": "127.0.0.1",
        "status.podIPs": "127.0.0.1",
        "status.hostIPs": "127.0.0.1",
    }
    if path in simple:
        return simple[path]
    if m := re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path):
        return meta.get(m.group(1), {}).get(m.group(2), "")
    raise ContainerConfigError(f"unsupported fieldRef {path!r}")


def _key(source: Mapping[str, Any], kind: str, namespace: str, lookup: Lookup) -> str | None:
    data = lookup(namespace, source["name"])
    optional = bool(source.get("optional", False))
    if data is None:
        if optional:
            return None
        raise ContainerConfigError(f'{kind} "{source["name"]}" not found')
    if source["key"] not in data:
        if optional:
            return None
        raise ContainerConfigError(f"couldn't find key {source['key']} in {kind} {source['name']}")
    return data[source["key"]]


def container_env(
    pod: Pod,
    container: Mapping[str, Any],
    *,
    base: Mapping[str, str],
    secrets: Lookup,
    config_maps: Lookup,
    node_name: str,
) -> dict[str, str]:
    """The environment a container starts with: base (PATH, service host...), envFrom, then env."""
    namespace = pod["metadata"]["namespace"]
    env = dict(base)
    for source in container.get("envFrom", []) or []:
        prefix = source.get("prefix", "")
        for kind, lookup, ref in (
            ("secret", secrets, source.get("secretRef")),
            ("configmap", config_maps, source.get("configMapRef")),
        ):
            if ref is None:
                continue
            data = lookup(namespace, ref["name"])
            if data is None:
                if ref.get("optional"):
                    continue
                raise ContainerConfigError(f'{kind} "{ref["name"]}" not found')
            env.update({prefix + k: v for k, v in data.items()})
    for var in container.get("env", []) or []:
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = expand(var.get("value", ""), env)
            continue
        source = var["valueFrom"]
        value: str | None
        if "secretKeyRef" in source:
            value = _key(source["secretKeyRef"], "secret", namespace, secrets)
        elif "configMapKeyRef" in source:
            value = _key(source["configMapKeyRef"], "configmap", namespace, config_maps)
        elif "fieldRef" in source:
            value = field_ref(pod, source["fieldRef"]["fieldPath"], node_name)
        else:
            raise ContainerConfigError(f"env {name}: unsupported valueFrom {sorted(source)}")
        if value is not None:
            env[name] = value
    return env


def command_line(container: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """command + args with $(VAR) expanded; the image's entrypoint is unknown here, so a
    container without `command` is a configuration error."""
    command = list(container.get("command") or [])
    if not command:
        raise ContainerConfigError(
            f"container {container['name']}: the process kubelet needs an explicit command "
            "(it cannot read an image's entrypoint)"
        )
    return [expand(a, env) for a in command + list(container.get("args") or [])]


# ---------------------------------------------------------------------------------------------
# Volumes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VolumeFiles:
    """What a volume holds: relative path -> bytes (empty for emptyDir), plus its file mode."""

    files: dict[str, bytes] = field(default_factory=dict)
    mode: int = 0o644
    writable: bool = False
    claim: str | None = None
    """For a claim's volume: its directory under the kubelet's state dir, shared by every pod
    that mounts the claim (`claims/<namespace>/<name>/<uid>`: a claim deleted and made again is
    a new, empty volume, as a dynamically provisioned one would be)."""
    read_only: bool = False
    """The volume source says readOnly: every mount of it is read-only."""


def _items(data: Mapping[str, bytes], items: list[Mapping[str, Any]] | None) -> dict[str, bytes]:
    if not items:
        return dict(data)
    return {item["path"]: data[item["key"]] for item in items if item["key"] in data}


def volume_files(
    pod: Pod,
    volume: Mapping[str, Any],
    *,
    secrets: Lookup,
    config_maps: Lookup,
    token: Callable[[str | None, int], str],
    node_name: str,
    claims: ObjectLookup = _no_claims,
) -> VolumeFiles:
    """Materialise one pod volume as files. `token(audience, seconds)` asks for a bound SA token;
    `claims` looks up PersistentVolumeClaims (persistentVolumeClaim and ephemeral volumes)."""
    namespace = pod["metadata"]["namespace"]

    def raw(kind: str, lookup: Lookup, name: str, optional: bool) -> dict[str, bytes] | None:
        data = lookup(namespace, name)
        if data is None:
            if optional:
                return {}
            raise ContainerConfigError(f'{kind} "{name}" not found')
        return {k: v.encode() for k, v in data.items()}

    if "emptyDir" in volume:
        return VolumeFiles(writable=True)
    if "secret" in volume:
        src = volume["secret"]
        data = raw("secret", secrets, src["secretName"], bool(src.get("optional")))
        return VolumeFiles(_items(data or {}, src.get("items")), src.get("defaultMode", 0o644))
    if "configMap" in volume:
        src = volume["configMap"]
        data = raw("configmap", config_maps, src["name"], bool(src.get("optional")))
        return VolumeFiles(_items(data or {}, src.get("items")), src.get("defaultMode", 0o644))
    if "downwardAPI" in volume:
        src = volume["downwardAPI"]
        files = {
            i["path"]: field_ref(pod, i["fieldRef"]["fieldPath"], node_name).encode()
            for i in src.get("items", [])
        }
        return VolumeFiles(files, src.get("defaultMode", 0o644))
    if "projected" in volume:
        src = volume["projected"]
        files: dict[str, bytes] = {}
        for source in src.get("sources", []):
            if "serviceAccountToken" in source:
                sat = source["serviceAccountToken"]
                seconds = int(sat.get("expirationSeconds", 3607))
                files[sat["path"]] = token(sat.get("audience"), seconds).encode()
            elif "configMap" in source:
                s = source["configMap"]
                data = raw("configmap", config_maps, s["name"], bool(s.get("optional")))
                files.update(_items(data or {}, s.get("items")))
            elif "secret" in source:
                s = source["secret"]
                data = raw("secret", secrets, s["name"], bool(s.get("optional")))
                files.update(_items(data or {}, s.get("items")))
            elif "downwardAPI" in source:
                for i in source["downwardAPI"].get("items", []):
                    value = field_ref(pod, i["fieldRef"]["fieldPath"], node_name)
                    files[i["path"]] = value.encode()
            else:
                raise ContainerConfigError(f"unsupported projected source {sorted(source)}")
        return VolumeFiles(files, src.get("defaultMode", 0o644))
    if "persistentVolumeClaim" in volume:
        src = volume["persistentVolumeClaim"]
        claim = _claim(namespace, src["claimName"], claims(namespace, src["claimName"]))
        return VolumeFiles(writable=True, claim=claim, read_only=bool(src.get("readOnly")))
    if "ephemeral" in volume:
        return VolumeFiles(writable=True, claim=_ephemeral_claim(pod, volume, claims))
    kinds = sorted(k for k in volume if k != "name")
    raise ContainerConfigError(f"volume {volume['name']}: unsupported type {kinds}")


def _claim(namespace: str, name: str, meta: Mapping[str, Any] | None) -> str:
    """The claim's directory; a missing claim, or one being deleted, is what keeps a real pod
    from starting (the scheduler refuses it), here a configuration error retried until the
    claim exists. Binding is not modelled: the claim may stay Pending in the API."""
    if meta is None:
        raise ContainerConfigError(f'persistentvolumeclaim "{name}" not found')
    if meta.get("deletionTimestamp"):
        raise ContainerConfigError(f'persistentvolumeclaim "{name}" is being deleted')
    return f"claims/{namespace}/{name}/{meta['uid']}"


def _ephemeral_claim(pod: Pod, volume: Mapping[str, Any], claims: ObjectLookup) -> str:
    """A generic ephemeral volume is the claim `<pod>-<volume>` that kube-controller-manager's
    ephemeral volume controller creates from the template, owned by the pod; until it exists,
    and if another object owns it, the pod waits (the kubelet's checks)."""
    meta = pod["metadata"]
    name = f"{meta['name']}-{volume['name']}"
    claim = claims(meta["namespace"], name)
    if claim is None:
        raise ContainerConfigError(
            f'waiting for the ephemeral volume controller to create persistentvolumeclaim "{name}"'
        )
    if not any(ref.get("uid") == meta["uid"] for ref in claim.get("ownerReferences") or []):
        raise ContainerConfigError(
            f"persistentvolumeclaim {meta['namespace']}/{name} was not created for the pod"
        )
    return _claim(meta["namespace"], name, claim)


def decode_secret(data: Mapping[str, str] | None) -> dict[str, str] | None:
    """Secret data arrives base64-encoded from the API."""
    if data is None:
        return None
    return {k: base64.b64decode(v).decode() for k, v in data.items()}


# ---------------------------------------------------------------------------------------------
# Status
# ---------------------------------------------------------------------------------------------


def termination_message(written: str, log_tail: str, *, policy: str, failed: bool) -> str:
    """The kubelet's rule: the file's content, else (FallbackToLogsOnError, on failure) the log."""
    message = written
    if not message.strip() and failed and policy == "FallbackToLogsOnError":
        lines = log_tail.splitlines()[-80:]
        message = "\n".join(lines)
    encoded = message.encode()
    if len(encoded) > TERMINATION_MESSAGE_LIMIT:
        message = encoded[-TERMINATION_MESSAGE_LIMIT:].decode(errors="ignore")
    return message


def pod_phase(restart_policy: str, exit_codes: list[int | None]) -> str:
    """Phase from the containers' last exit codes (None: still running)."""
    if any(code is None for code in exit_codes):
        return "Running"
    if all(code == 0 for code in exit_codes):
        return "Succeeded"
    return "Failed"


def condition(kind: str, status: bool, now: str) -> dict[str, Any]:
    return {
        "type": kind,
        "status": "True" if status else "False",
        "lastProbeTime": None,
        "lastTransitionTime": now,
    }


@dataclass
class ContainerState:
    name: str
    started_at: str | None = None
    exit_code: int | None = None
    finished_at: str | None = None
    message: str = ""
    restart_count: int = 0
    waiting_reason: str | None = None
    waiting_message: str | None = None

    def status(self, image: str) -> dict[str, Any]:
        if self.waiting_reason:
            state: dict[str, Any] = {
                "waiting": {"reason": self.waiting_reason, "message": self.waiting_message}
            }
        elif self.exit_code is not None:
            state = {
                "terminated": {
                    "exitCode": self.exit_code,
                    "reason": "Completed" if self.exit_code == 0 else "Error",
                    "message": self.message or None,
                    "startedAt": self.started_at,
                    "finishedAt": self.finished_at,
                }
            }
        else:
            state = {"running": {"startedAt": self.started_at}}
        return {
            "name": self.name,
            "image": image,
            "imageID": "",
            "containerID": f"process://{self.name}",
            "ready": self.exit_code is None and self.waiting_reason is None,
            "started": self.exit_code is None and self.waiting_reason is None,
            "restartCount": self.restart_count,
            "state": state,
        }


def pod_status(
    pod: Pod, containers: list[ContainerState], *, phase: str, now: str, start_time: str
) -> dict[str, Any]:
    images = {c["name"]: c.get("image", "") for c in pod["spec"]["containers"]}
    running = phase == "Running" and all(c.exit_code is None for c in containers)
    ready = running and all(c.waiting_reason is None for c in containers)
    return {
        "phase": phase,
        "hostIP": "127.0.0.1",
        "hostIPs": [{"ip": "127.0.0.1"}],
        "podIP": "127.0.0.1",
        "podIPs": [{"ip": "127.0.0.1"}],
        "startTime": start_time,
        "conditions": [
            condition("PodScheduled", True, start_time),
            condition("Initialized", True, start_time),
            condition("ContainersReady", ready, now),
            condition("Ready", ready, now),
        ],
        "containerStatuses": [c.status(images.get(c.name, "")) for c in containers],
    }
