"""The real-node tier of the devcluster (`devcluster up --node real`, `make cluster-up NODE=real`).

Where the process kubelet runs a pod's command as a local process, this tier runs the images: a
kubelet built from the pinned Kubernetes module, containerd and runc (Debian's), kube-scheduler,
kube-proxy (iptables mode), the bridge CNI plugin, a local OCI registry (the distribution module)
that `tools/build-images.sh --push` fills, and a pause image built from the pinned module's source.

Isolation. The whole cluster (control plane included, so that the API server reaches the kubelet
and pods reach the API server through the `kubernetes` Service) runs inside a network namespace
and a mount namespace created with a holder process (devcluster/namespaces.py). Inside:

- the network namespace has only `lo`, the node address NODE_IP on it, and the CNI bridge of the
  pod network; there is no route anywhere else, so nothing in the tier can reach the outside;
  the host reaches the API server, etcd, S3 and the registry through `devcluster.forward` on the
  host's 127.0.0.1, at the same port numbers;
- in the mount namespace, /run, /var/lib and /var/log are bind mounts of directories under the
  state directory (the kubelet, containerd and the CNI plugins hard-code paths there), and the
  /proc/sys files the kubelet checks (`protectKernelDefaults`) show the values it wants, so it
  writes no host sysctl; net.* sysctls written by kube-proxy belong to the namespace.

What remains on the host is only what the kernel cannot namespace on cgroup v1: the kubelet's
cgroup tree under CGROUP_PREFIX-<id> in every hierarchy (devcluster/cgroups.py), removed by
`down`, which also kills every process left in the namespaces or in those cgroups, then the
holder: the namespaces, their mounts, the bridge and the iptables chains go with it.

Cached outside the clone ($FEDTUNE_CACHE, default ~/.cache/fedtune): the registry's storage
(content-addressed, so images pushed once are not pushed again; devcluster/registry.py), and
containerd's root (pulled and unpacked images), locked by the running containerd; a second
real-node cluster on the same machine uses a root of its own under its state directory
(devcluster/containerd.py).

This module puts the pieces together: it starts the node's components in order and stops them,
with the kubelet's and kube-proxy's configuration.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from devcluster import net, registry
from devcluster.cgroups import NodeCgroups
from devcluster.containerd import POD_CIDR, Containerd
from devcluster.namespaces import NODE_IP, NodeNamespaces
from devcluster.pauseimage import PAUSE_IMAGE, pause_archive
from devcluster.processes import Processes, StartupError
from devcluster.state import NODE_NAME, REPO_ROOT, ClusterState, cache_root

NODE_COMPONENTS = ("registry", "containerd", "kube-scheduler", "kubelet", "kube-proxy")
DEBIAN_PACKAGES = ("containerd", "runc", "containernetworking-plugins", "iptables", "util-linux")


def ensure_packages() -> None:
    subprocess.run([str(REPO_ROOT / "tools" / "apt-ensure.sh"), *DEBIAN_PACKAGES], check=True)


class RealNode:
    """The namespaces and node components of one real-node cluster, whose state directory is
    `cluster_dir` (certificates in `pki_dir`, pid files in `pid_dir`, logs in `log_dir`)."""

    def __init__(self, cluster_dir: Path, *, pki_dir: Path, pid_dir: Path, log_dir: Path) -> None:
        self.cluster_dir = cluster_dir
        self.pki_dir = pki_dir
        self.dir = cluster_dir / "node"
        node_id = hashlib.sha256(str(cluster_dir).encode()).hexdigest()[:8]
        self.namespaces = NodeNamespaces(self.dir, pid_dir=pid_dir, log_dir=log_dir)
        self.cgroups = NodeCgroups(node_id)
        self.containerd = Containerd(self.dir, self.namespaces.run)

    def prefix(self) -> list[str]:
        """The argv prefix that runs a command inside the node's namespaces."""
        return self.namespaces.prefix()

    # -- up ----------------------------------------------------------------------------------------

    def isolate(self, state: ClusterState) -> None:
        """The namespaces, before any component starts; then every port the host uses is
        forwarded into them."""
        if os.geteuid() != 0:
            raise StartupError("the real-node tier needs root (namespaces, cgroups, containerd)")
        ensure_packages()
        self.namespaces.create()
        self.namespaces.forward(
            [
                state.etcd_port,
                state.api_port,
                state.kcm_port,
                state.s3_port,
                state.registry_port,
                state.sched_port,
                state.proxy_port,
            ]
        )

    def start(
        self,
        state: ClusterState,
        bin_dir: Path,
        kubeconfigs: dict[str, Path],
        processes: Processes,
    ) -> None:
        """Start the node's components as `processes` of the cluster, in its namespaces, and
        wait for them: `kubeconfigs` has the scheduler's, the kubelet's, the proxy's and the
        admin's (to see the Node Ready)."""
        self._start_runtime(state, bin_dir, processes)
        self._start_kubernetes(state, bin_dir, kubeconfigs, processes)

    def _start_runtime(self, state: ClusterState, bin_dir: Path, processes: Processes) -> None:
        """The registry and containerd, with the pause image imported."""
        lock = self.containerd.configure(state.registry_port)
        registry.write_config(self.dir / "registry.yaml", state.registry_port)
        pause_tar = self.dir / "pause.oci.tar"
        pause_archive(bin_dir / "pause", pause_tar)
        self.cgroups.create()
        processes.spawn(
            "registry", registry.argv(bin_dir, self.dir / "registry.yaml"), env=registry.ENV
        )
        processes.spawn("containerd", self.containerd.argv(lock))
        processes.wait("registry", lambda: registry.ready(state.registry_port))
        processes.wait("containerd", self.containerd.ready, timeout=60)
        self.containerd.clean_containers()
        self.containerd.import_image(PAUSE_IMAGE, pause_tar)

    def _start_kubernetes(
        self,
        state: ClusterState,
        bin_dir: Path,
        kubeconfigs: dict[str, Path],
        processes: Processes,
    ) -> None:
        """kube-scheduler, the kubelet and kube-proxy, started together and waited for."""
        d = self.dir
        # A resolver on the pod's own loopback: no DNS query leaves a pod.
        (d / "resolv.conf").write_text("nameserver 127.0.0.53\noptions ndots:1\n")
        (d / "kubelet.yaml").write_text(json.dumps(self._kubelet_config(), indent=2))
        (d / "kube-proxy.yaml").write_text(
            json.dumps(self._proxy_config(state, kubeconfigs["proxy"]), indent=2)
        )
        scheduler = str(kubeconfigs["scheduler"])
        processes.spawn(
            "kube-scheduler",
            [
                str(bin_dir / "kube-scheduler"),
                "--kubeconfig",
                scheduler,
                "--authentication-kubeconfig",
                scheduler,
                "--authorization-kubeconfig",
                scheduler,
                "--bind-address",
                "127.0.0.1",
                "--secure-port",
                str(state.sched_port),
                "--leader-elect=false",
            ],
        )
        processes.spawn(
            "kubelet",
            [
                str(bin_dir / "kubelet"),
                "--config",
                str(d / "kubelet.yaml"),
                "--kubeconfig",
                str(kubeconfigs["kubelet"]),
                "--hostname-override",
                NODE_NAME,
                "--node-ip",
                NODE_IP,
                "--root-dir",
                "/var/lib/kubelet",
                "--v",
                "1",
            ],
        )
        processes.spawn(
            "kube-proxy",
            [str(bin_dir / "kube-proxy"), "--config", str(d / "kube-proxy.yaml")],
            env={"PATH": f"/usr/sbin:/sbin:{os.environ.get('PATH', '')}"},
        )
        processes.wait(
            "kube-scheduler",
            lambda: net.https_ok(
                f"https://127.0.0.1:{state.sched_port}/healthz", self.pki_dir / "ca.crt"
            ),
        )
        processes.wait(
            "kubelet",
            lambda: net.node_ready(bin_dir / "kubectl", kubeconfigs["admin"], NODE_NAME),
            timeout=120,
        )
        processes.wait(
            "kube-proxy",
            lambda: net.http_status(f"http://127.0.0.1:{state.proxy_port}/healthz") == 200,
            timeout=60,
        )

    def _kubelet_config(self) -> dict[str, Any]:
        d = self.dir
        pki = self.pki_dir
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{self.cgroups.name}",
            "protectKernelDefaults": True,
            "failSwapOn": False,
            "podLogsDir": str(d / "pod-logs"),
            "readOnlyPort": 0,
            "port": 10250,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": 10248,
            "address": NODE_IP,
            "tlsCertFile": str(pki / "kubelet-serving.crt"),
            "tlsPrivateKeyFile": str(pki / "kubelet-serving.key"),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": False},
                "x509": {"clientCAFile": str(pki / "ca.crt")},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "containerRuntimeEndpoint": f"unix://{self.containerd.sock}",
            "resolvConf": str(d / "resolv.conf"),
            "serializeImagePulls": False,
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "rotateCertificates": False,
            "serverTLSBootstrap": False,
            "registerNode": True,
            "syncFrequency": "5s",
            "fileCheckFrequency": "5s",
            "nodeStatusUpdateFrequency": "5s",
            "enableControllerAttachDetach": True,
            "cgroupsPerQOS": True,
            "enforceNodeAllocatable": ["pods"],
        }

    def _proxy_config(self, state: ClusterState, kubeconfig: Path) -> dict[str, Any]:
        return {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "mode": "iptables",
            "clusterCIDR": POD_CIDR,
            "hostnameOverride": NODE_NAME,
            "bindAddress": "127.0.0.1",
            "healthzBindAddress": f"127.0.0.1:{state.proxy_port}",
            # 0: leave the conntrack sysctls alone (some are not per network namespace).
            "conntrack": {
                "maxPerCore": 0,
                "min": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
                "udpTimeout": "0s",
                "udpStreamTimeout": "0s",
            },
            "iptables": {"syncPeriod": "10s", "minSyncPeriod": "0s"},
        }

    # -- down --------------------------------------------------------------------------------------

    def clean_containers(self) -> None:
        """Remove every container from containerd's root (it is the cache's, kept for the next
        cluster), while containerd still runs."""
        self.containerd.clean_containers()

    def stop(self) -> None:
        """After the components are stopped: everything left in the namespaces or the cgroups,
        then the holder (the namespaces, their mounts, bridge and iptables chains go with it),
        then the cgroups."""
        self.namespaces.kill_processes()
        self.cgroups.kill_processes()
        self.namespaces.end()
        self.cgroups.remove()
        # The bind-mount sources and the node's runtime state (not the caches).
        for sub in ("private", "containerd-state", "runc", "cni", "containerd-root", "sysctl"):
            shutil.rmtree(self.dir / sub, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """What the tier would leave on the host if `down` missed it (the teardown test)."""
        found = [f"cgroup {d}" for d in self.cgroups.dirs()]
        found += self.namespaces.leftovers()
        with open("/proc/self/mountinfo") as f:
            found += [
                f"mount {line.split()[4]}"
                for line in f
                if str(self.cluster_dir) in line or str(cache_root() / "containerd") in line
            ]
        return found
