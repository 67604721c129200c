"""A real local Kubernetes control plane for fedtune's tests and demo.

etcd, kube-apiserver and kube-controller-manager are the upstream binaries, built from the Go module
proxy by `tools/build-binaries.sh`. Pods run as local processes under the *process kubelet*
(`devcluster.kubelet`), which is development infrastructure, never a production path.
"""
