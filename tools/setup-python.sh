#!/usr/bin/env bash
# Prepares the project's Python environment from uv.lock, fast on a fresh clone of an
# already-set-up machine.
#
# uv.lock pins every dependency of every extra, with hashes; the test environment, the demo and
# both images (operator/Dockerfile, trainer-image/Dockerfile, through requirements/*.txt) install
# exactly it. The heavy dependencies (torch, transformers, kopf, ...) go into a venv in a cache
# directory outside the clone, keyed by a hash of the lock and the interpreter, and are shared by
# every clone. The clone gets a thin .venv that sees them through a .pth file and holds only the
# editable install of fedtune itself (its console scripts: fedtune, fedtune-trainer, devcluster).
#
# uv itself is bootstrapped with pip at the version uv.lock pins (it is a `dev` dependency), into
# the cache; its download cache (UV_CACHE_DIR) is shared with the image builds.
#
#   tools/setup-python.sh          install (idempotent)
#   tools/setup-python.sh --lock   re-resolve uv.lock and re-export requirements/*.txt (make lock)
#   tools/setup-python.sh --uv     print the path of the pinned uv (installing it if needed)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
cache_root=${FEDTUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fedtune}
export UV_CACHE_DIR=${UV_CACHE_DIR:-$cache_root/uv-cache}
export UV_PYTHON_DOWNLOADS=never UV_NO_PROGRESS=1
log() { printf '[setup-python] %s\n' "$*" >&2; }

# -- uv, at the version the lock pins -------------------------------------------------------------
uv_version=$(awk '/^name = "uv"$/ {getline; gsub(/version = |"/, ""); print; exit}' "$root/uv.lock")
[ -n "$uv_version" ] || { log "uv.lock pins no uv (it is a dev dependency): run make lock"; exit 1; }
uv_home="$cache_root/uv-$uv_version"
uv="$uv_home/bin/uv"
if [ ! -x "$uv" ]; then
  log "bootstrapping uv $uv_version into $uv_home"
  rm -rf "$uv_home.tmp"
  "$python" -m venv "$uv_home.tmp"
  "$uv_home.tmp/bin/python" -m pip install -q --disable-pip-version-check "uv==$uv_version"
  rm -rf "$uv_home"
  mv "$uv_home.tmp" "$uv_home"
  # The venv's scripts name their interpreter by path: recreate it at its final place.
  "$python" -m venv --upgrade "$uv_home" >/dev/null
fi

export_requirements() {  # export_requirements <out> [uv export options]: hashed, no fedtune itself
  local out=$1
  shift
  "$uv" export --project "$root" --locked --no-emit-project --no-header --format requirements-txt \
    --quiet "$@" -o "$out"
}

case "${1:-}" in
  --uv)
    echo "$uv"
    exit 0
    ;;
  --lock)
    (cd "$root" && "$uv" lock)
    mkdir -p "$root/requirements"
    # What each image installs; tests/images checks that these match uv.lock.
    export_requirements "$root/requirements/operator.txt" --extra operator --group build
    export_requirements "$root/requirements/trainer.txt" --extra trainer --group build
    log "uv.lock and requirements/*.txt refreshed"
    exit 0
    ;;
  "") ;;
  *)
    echo "usage: $0 [--lock|--uv]" >&2
    exit 2
    ;;
esac

if ! (cd "$root" && "$uv" lock --check --quiet 2>/dev/null); then
  log "uv.lock does not match pyproject.toml's dependencies: run \`make lock\` and commit uv.lock"
  exit 1
fi

# The dependency venv is keyed by what it holds (the lock, the interpreter and how it is laid
# out), so editing other parts of pyproject.toml (tool settings, entry points) does not reinstall
# torch.
#
# It is installed with its bytecode compiled. Python would otherwise compile torch, transformers
# and peft from source in every process where PYTHONDONTWRITEBYTECODE is set (as on CI machines
# and in the images), or race to write the .pyc files where it is not: `import peft` took 19.5 s
# on 2 cores without the compiled files and 15.7 s with them, in every trainer pod.
layout="compiled-bytecode"
pyver=$("$python" -c 'import sys; print(sys.version)')
key=$( (cat "$root/uv.lock"; echo "$pyver"; echo "$layout") | sha256sum | cut -c1-16)
project_key=$( (cat "$root/pyproject.toml" "$0") | sha256sum | cut -c1-16)
deps="$cache_root/deps-$key"

if [ ! -f "$deps/.complete" ]; then
  log "installing the locked dependencies into $deps (torch is large: minutes the first time)"
  start=$SECONDS
  rm -rf "$deps"
  "$uv" venv --quiet --python "$python" "$deps"
  export_requirements "$deps/requirements.txt" --all-extras --all-groups
  "$uv" pip sync --quiet --python "$deps/bin/python" --require-hashes --compile-bytecode \
    "$deps/requirements.txt"
  touch "$deps/.complete"
  log "dependencies installed in $((SECONDS - start))s"
fi

venv="$root/.venv"
if [ ! -f "$venv/.complete-$key-$project_key" ]; then
  log "linking $venv to $deps and installing fedtune (editable)"
  rm -rf "$venv"
  "$python" -m venv --without-pip "$venv"
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  deps_site=$("$deps/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$deps_site" > "$site/_fedtune_deps.pth"
  ln -s "$deps" "$venv/deps"
  "$uv" pip install --quiet --python "$venv/bin/python" --no-deps --no-build-isolation -e "$root"
  touch "$venv/.complete-$key-$project_key"
fi
