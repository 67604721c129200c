"""One pod's configuration, resolved through the API as a kubelet resolves it before it starts
containers: Secrets, ConfigMaps, claims and service-account tokens are fetched, volumes written
under the pod's directory, and each container's plan (command, environment, mounts) made for
`devcluster.podexec`. What to make of them is podspec's (the pure core); this module does the I/O.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from devcluster import podspec
from devcluster.podspec import ContainerConfigError


@dataclass(frozen=True)
class NodeSettings:
    """What the node gives every pod: its name, where its files go, the API server's port, the
    working directory and environment of a container, and the host paths a mount must not cover."""

    node_name: str
    state_dir: Path
    api_port: int
    workdir: Path
    extra_env: dict[str, str]
    pod_path: str
    pythonpath: str
    host_paths: list[str]

    @classmethod
    def of_this_process(
        cls,
        *,
        node_name: str,
        state_dir: Path,
        api_port: int,
        workdir: Path,
        extra_env: dict[str, str],
    ) -> NodeSettings:
        """Pods run in the environment the kubelet runs in: its venv's bin comes first."""
        venv_bin = str(Path(sys.executable).parent)
        return cls(
            node_name=node_name,
            state_dir=state_dir,
            api_port=api_port,
            workdir=workdir,
            extra_env=extra_env,
            pod_path=f"{venv_bin}:/usr/local/bin:/usr/bin:/bin",
            pythonpath=os.pathsep.join(p for p in sys.path if p and Path(p).is_dir()),
            # What a pod's mounts must not cover: where its Python, the code and its files live.
            host_paths=sorted(
                {
                    str(state_dir.resolve()),
                    str(workdir.resolve()),
                    sys.prefix,
                    str(Path(sys.executable).resolve().parent),
                }
                | {str(Path(p).resolve()) for p in sys.path if p and Path(p).is_dir()}
            ),
        )

    @property
    def log_dir(self) -> Path:
        """Each container's output: `<namespace>_<pod>_<container>.log`."""
        return self.state_dir / "logs" / "pods"

    @property
    def pid_dir(self) -> Path:
        """Each container's process: `<uid>_<container>.pid`, for `down` after a killed kubelet."""
        return self.state_dir / "pids" / "pods"


class PodConfig:
    """The configuration of the pod `pod`, its files in `pod_dir`, looked up through `core`."""

    def __init__(
        self, core: client.CoreV1Api, node: NodeSettings, pod: dict[str, Any], pod_dir: Path
    ) -> None:
        self.core = core
        self.node = node
        self.pod = pod
        self.meta = pod["metadata"]
        self.uid: str = self.meta["uid"]
        self.pod_dir = pod_dir
        self.read_only_volumes: set[str] = set()

    # -- lookups handed to the pure core -------------------------------------------------------

    def _secret(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            obj = self.core.read_namespaced_secret(name, namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return podspec.decode_secret(obj.data or {})

    def _config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            obj = self.core.read_namespaced_config_map(name, namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return dict(obj.data or {})

    def _claim(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            response = self.core.read_namespaced_persistent_volume_claim(
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
        result = self.core.create_namespaced_service_account_token(
            sa, self.meta["namespace"], body={"spec": spec}
        )
        return result.status.token

    # -- preparing a container -----------------------------------------------------------------

    def volumes(self) -> dict[str, Path]:
        """Each volume as a directory: written under the pod's directory (Secret, ConfigMap,
        downwardAPI, projected, emptyDir), or a claim's directory shared by every pod."""
        paths: dict[str, Path] = {}
        for volume in self.pod["spec"].get("volumes", []) or []:
            files = podspec.volume_files(
                self.pod,
                volume,
                secrets=self._secret,
                config_maps=self._config_map,
                token=self._token,
                node_name=self.node.node_name,
                claims=self._claim,
            )
            if files.claim is not None:
                # One directory per claim, shared by every pod that mounts it.
                root = self.node.state_dir / files.claim
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

    def plan(self, container: dict[str, Any], volumes: dict[str, Path]) -> dict[str, Any]:
        """What devcluster.podexec runs: the command line, its environment, the bind mounts
        (volumes and the termination log) and the working directory."""
        service_port = self.node.api_port
        base = {
            "PATH": self.node.pod_path,
            "HOME": os.environ.get("HOME", "/root"),
            "HOSTNAME": self.meta["name"],
            "PYTHONUNBUFFERED": "1",
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(service_port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(service_port),
            "KUBERNETES_PORT": f"tcp://127.0.0.1:{service_port}",
            **self.node.extra_env,
        }
        env = podspec.container_env(
            self.pod,
            container,
            base=base,
            secrets=self._secret,
            config_maps=self._config_map,
            node_name=self.node.node_name,
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
            "workingDir": container.get("workingDir") or str(self.node.workdir),
            "keep": self.node.host_paths,
        }
