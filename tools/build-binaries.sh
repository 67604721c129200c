#!/usr/bin/env bash
# Builds the devcluster's binaries (kube-apiserver, kube-controller-manager, kubectl, etcd, helm,
# versitygw) from the Go module proxy, pinned by the go.mod/go.sum files under tools/go/.
#
# The binaries land in a cache directory outside the clone, keyed by a hash of everything that
# decides their content, so a second build (or a fresh clone on the same machine) costs nothing.
# Prints the directory holding the binaries on its last line of stdout.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache_root=${FEDTUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fedtune}
key=$( (cat "$here"/go/*/go.mod "$here"/go/*/go.sum "$0"; go env GOVERSION GOARCH GOOS) | sha256sum | cut -c1-16)
out="$cache_root/bin/$key"

module_version() {  # module_version <module dir> <module path>
  (cd "$here/go/$1" && go list -mod=readonly -m -f '{{.Version}}' "$2")
}
k8s_version=$(module_version k8s k8s.io/kubernetes)
helm_version=$(module_version helm helm.sh/helm/v3)
k8s_minor=$(echo "$k8s_version" | cut -d. -f2)
case "$k8s_version" in v1.*) ;; *) echo "cannot read the k8s.io/kubernetes version" >&2; exit 1;; esac

log() { printf '[build-binaries] %s\n' "$*" >&2; }

build() {  # build <module dir> <binary name> <package> [ldflags]
  local dir=$1 name=$2 pkg=$3 ldflags=${4:-}
  if [ -x "$out/$name" ]; then
    log "$name: cached"
    return
  fi
  log "$name: building $pkg (minutes on a cold cache) ..."
  local start=$SECONDS
  (cd "$here/go/$dir" && CGO_ENABLED=0 go build -mod=readonly -trimpath \
      -ldflags "-s -w $ldflags" -o "$out/.$name.tmp" "$pkg")
  mv "$out/.$name.tmp" "$out/$name"
  log "$name: built in $((SECONDS - start))s"
}

mkdir -p "$out"
kv="-X k8s.io/component-base/version.gitVersion=$k8s_version \
    -X k8s.io/component-base/version.gitMajor=1 \
    -X k8s.io/component-base/version.gitMinor=$k8s_minor \
    -X k8s.io/component-base/version.gitTreeState=clean \
    -X k8s.io/client-go/pkg/version.gitVersion=$k8s_version \
    -X k8s.io/client-go/pkg/version.gitMajor=1 \
    -X k8s.io/client-go/pkg/version.gitMinor=$k8s_minor"

build etcd etcd go.etcd.io/etcd/server/v3
build k8s kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$kv"
build k8s kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$kv"
build k8s kubectl k8s.io/kubernetes/cmd/kubectl "$kv"
build helm helm helm.sh/helm/v3/cmd/helm "-X helm.sh/helm/v3/internal/version.version=$helm_version"
build s3 versitygw github.com/versity/versitygw/cmd/versitygw
echo "$out"
