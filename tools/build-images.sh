#!/usr/bin/env bash
# Builds the operator and trainer images without a Docker engine: podman (Debian's package) on a
# Debian base root filesystem made here with mmdebstrap from Debian's packages. No registry base
# image is needed, and the Dockerfiles are the ones `docker build` uses (the base is a build arg).
#
#   tools/build-images.sh                   build both, tagged as the chart and the CRD expect
#   tools/build-images.sh --push HOST:PORT  build, then push both to a plain-HTTP registry (the
#                                           real-node devcluster's); prints NAME@DIGEST per image
#
# Cached outside the clone (in $FEDTUNE_CACHE, default ~/.cache/fedtune):
#   base/<key>.tar         the base root filesystem, keyed by its package list and this script
#   containers/            podman's storage: the base and every image layer (a source change
#                          rebuilds only the last layer of an image)
#   uv-cache/              the Python download cache, shared with tools/setup-python.sh, so the
#                          images install the locked wheels the test environment downloaded
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache_root=${FEDTUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fedtune}
log() { printf '[build-images] %s\n' "$*" >&2; }

push_to=
case "${1:-}" in
  --push) push_to=${2:?--push needs HOST:PORT} ;;
  "") ;;
  *) echo "usage: $0 [--push HOST:PORT]" >&2; exit 2 ;;
esac

# The names the chart (image.repository, appVersion) and the CRD's default trainer image use.
version=$(awk -F'"' '/^appVersion:/ {print $2}' "$root/charts/fedtune-operator/Chart.yaml")
OPERATOR_IMAGE=${OPERATOR_IMAGE:-ghcr.io/fedtune/operator:$version}
TRAINER_IMAGE=${TRAINER_IMAGE:-ghcr.io/fedtune/trainer:$version}

"$root/tools/apt-ensure.sh" podman runc mmdebstrap

# podman's settings and storage are the project's own (no file under /etc is changed): runc (crun
# cannot run on a hybrid cgroup v1 layout), cgroupfs (PID 1 need not be systemd), ulimits a
# process without CAP_SYS_RESOURCE may set.
conf_dir="$cache_root/containers"
mkdir -p "$conf_dir/storage" "$conf_dir/run"
# No network by default: a `podman run` by hand then creates no bridge or iptables chain on the
# host; the builds pass --network host for their downloads.
cat > "$conf_dir/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
netns = "none"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$conf_dir/events.log"
EOF
cat > "$conf_dir/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$conf_dir/storage"
runroot = "$conf_dir/run"
EOF
export CONTAINERS_CONF="$conf_dir/containers.conf" CONTAINERS_STORAGE_CONF="$conf_dir/storage.conf"
podman=(podman --cgroup-manager cgroupfs --runtime runc)

# -- the base: Debian's python3 (3.11, as the test environment), its venv module, CA certificates -
base_packages="python3 python3-venv ca-certificates"
base_suite=bookworm
base_key=$( (echo "$base_packages $base_suite"; sed -n '/^# -- the base/,/^# -- end of base/p' "$0") \
  | sha256sum | cut -c1-16)
base_tar="$cache_root/base/$base_key.tar"
base_image="localhost/fedtune/base:$base_key"
if [ ! -f "$base_tar" ]; then
  log "building the base root filesystem ($base_packages) with mmdebstrap (a minute or two)"
  mkdir -p "$cache_root/base"
  start=$SECONDS
  # Documentation and translations are left out; copyright files stay.
  mmdebstrap --quiet --variant=minbase --include="${base_packages// /,}" \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --format=tar "$base_suite" "$base_tar.tmp"
  mv "$base_tar.tmp" "$base_tar"
  log "base built in $((SECONDS - start))s ($(du -h "$base_tar" | cut -f1))"
fi
if ! "${podman[@]}" image exists "$base_image"; then
  "${podman[@]}" import --quiet "$base_tar" "$base_image" >/dev/null
fi
# -- end of base

uv=$("$root/tools/setup-python.sh" --uv)
uv_version=$("$uv" --version | awk '{print $2}')
export UV_CACHE_DIR=${UV_CACHE_DIR:-$cache_root/uv-cache}
mkdir -p "$UV_CACHE_DIR"

# The host's CA bundle (a TLS-inspecting proxy's CA may be in it), for the RUN steps only.
host_ca=${SSL_CERT_FILE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}

build() {  # build <Dockerfile> <tag>
  local start=$SECONDS
  log "$2: building from $1"
  # The uv cache is bind-mounted into the RUN steps only, so no downloaded file lands in a layer.
  "${podman[@]}" build --quiet --layers --network host \
    --build-arg BASE_IMAGE="$base_image" \
    --build-arg UV_VERSION="$uv_version" \
    --build-arg UV_CACHE_DIR=/var/cache/fedtune-uv \
    --volume "$UV_CACHE_DIR:/var/cache/fedtune-uv" \
    --volume "$host_ca:/run/fedtune-build-ca.crt:ro" \
    --build-arg PIP_CERT=/run/fedtune-build-ca.crt \
    --build-arg SSL_CERT_FILE=/run/fedtune-build-ca.crt \
    -f "$root/$1" -t "$2" "$root" >/dev/null
  log "$2: built in $((SECONDS - start))s, $("${podman[@]}" image inspect -f '{{.Size}}' "$2" \
    | awk '{printf "%.0f MB", $1 / 1e6}')"
}
build operator/Dockerfile "$OPERATOR_IMAGE"
build trainer-image/Dockerfile "$TRAINER_IMAGE"

if [ -n "$push_to" ]; then
  for image in "$OPERATOR_IMAGE" "$TRAINER_IMAGE"; do
    start=$SECONDS
    path=${image#*/}  # ghcr.io/fedtune/operator:0.1.0 -> fedtune/operator:0.1.0
    digest_file=$(mktemp)
    # Layers the registry has are not sent again: a source change pushes one small layer.
    "${podman[@]}" push --quiet --tls-verify=false --compression-format zstd \
      --digestfile "$digest_file" "$image" "docker://$push_to/$path" >&2
    log "$image: pushed to $push_to in $((SECONDS - start))s"
    echo "${image%:*}@$(cat "$digest_file")"
    rm -f "$digest_file"
  done
fi
