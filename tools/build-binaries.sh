#!/usr/bin/env bash
# Builds the devcluster's binaries from the Go module proxy, pinned by the go.mod/go.sum files
# under tools/go/: kube-apiserver, kube-controller-manager, kubectl, etcd, helm, versitygw, and for
# the real-node tier kubelet, kube-scheduler, kube-proxy, the distribution registry and the pause
# binary (C, from the pinned k8s.io/kubernetes module's build/pause).
#
# Each binary is cached outside the clone under a key of what decides its content (its module's
# go.mod/go.sum, the package, the flags, the Go toolchain), so changing one module rebuilds only
# its binaries; a directory per set of keys holds links to them. A second build (or a fresh clone
# on the same machine) costs nothing. Prints the directory holding the binaries on its last line
# of stdout.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache_root=${FEDTUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fedtune}
goenv=$(go env GOVERSION GOARCH GOOS)
key=$( (cat "$here"/go/*/go.mod "$here"/go/*/go.sum "$0"; echo "$goenv") | sha256sum | cut -c1-16)
out="$cache_root/bin/$key"
objects="$cache_root/bin/objects"

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
  local obj_key
  obj_key=$( (cat "$here/go/$dir/go.mod" "$here/go/$dir/go.sum"; echo "$pkg $ldflags CGO_ENABLED=0 -trimpath -s -w"; echo "$goenv") \
    | sha256sum | cut -c1-16)
  local obj="$objects/$name-$obj_key"
  if [ ! -x "$obj" ]; then
    log "$name: building $pkg (minutes on a cold cache) ..."
    local start=$SECONDS
    (cd "$here/go/$dir" && CGO_ENABLED=0 go build -mod=readonly -trimpath \
        -ldflags "-s -w $ldflags" -o "$obj.tmp" "$pkg")
    mv "$obj.tmp" "$obj"
    log "$name: built in $((SECONDS - start))s"
  fi
  ln -f "$obj" "$out/$name"
}

build_pause() {  # the pod sandbox's pause binary, static, from the pinned Kubernetes source
  if [ -x "$out/pause" ]; then
    return
  fi
  "$here/apt-ensure.sh" gcc libc6-dev
  local src
  src="$(cd "$here/go/k8s" && go list -mod=readonly -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c"
  local obj="$objects/pause-$( (cat "$src"; gcc --version | head -1) | sha256sum | cut -c1-16)"
  if [ ! -x "$obj" ]; then
    gcc -Os -static -Wall -Werror -DVERSION="$k8s_version" -o "$obj.tmp" "$src"
    strip "$obj.tmp"
    mv "$obj.tmp" "$obj"
  fi
  ln -f "$obj" "$out/pause"
}

mkdir -p "$out" "$objects"
# One build at a time per cache: a second `make install` (another clone, a parallel job) waits
# here, then finds every binary built, instead of racing the first on the same objects.
exec 9>"$cache_root/bin/.lock"
flock 9
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
# The real-node tier (devcluster up --node real).
build k8s kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler "$kv"
build k8s kubelet k8s.io/kubernetes/cmd/kubelet "$kv"
build k8s kube-proxy k8s.io/kubernetes/cmd/kube-proxy "$kv"
build registry registry github.com/distribution/distribution/v3/cmd/registry \
  "-X github.com/distribution/distribution/v3/version.version=$(module_version registry github.com/distribution/distribution/v3)"
build_pause
echo "$out"
