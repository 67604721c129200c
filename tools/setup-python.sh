#!/usr/bin/env bash
# Prepares the project's Python environment, fast on a fresh clone of an already-set-up machine.
#
# The heavy dependencies (torch, transformers, kopf, ...) go into a venv in a cache directory
# outside the clone, keyed by a hash of pyproject.toml and the interpreter, and are shared by every
# clone. The clone gets a thin .venv that sees them through a .pth file and holds only the editable
# install of fedtune itself (its console scripts: fedtune, fedtune-trainer, devcluster).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
cache_root=${FEDTUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fedtune}
requirements() {  # every dependency of every extra, one per line, sorted
  "$python" - "$root/pyproject.toml" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))
reqs = list(project["project"]["dependencies"])
for extra in project["project"]["optional-dependencies"].values():
    reqs += extra
reqs += project["build-system"]["requires"]
print("\n".join(sorted(set(reqs))))
PY
}
# The dependency venv is keyed by what it holds, so editing other parts of pyproject.toml
# (tool settings, entry points) does not reinstall torch.
reqs=$(requirements)
key=$( (echo "$reqs"; "$python" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-16)
project_key=$( (cat "$root/pyproject.toml" "$0") | sha256sum | cut -c1-16)
deps="$cache_root/deps-$key"
log() { printf '[setup-python] %s\n' "$*" >&2; }

if [ ! -f "$deps/.complete" ]; then
  log "installing dependencies into $deps (torch is large: minutes the first time)"
  rm -rf "$deps"
  "$python" -m venv "$deps"
  "$deps/bin/python" -m pip install -q --upgrade pip
  echo "$reqs" > "$deps/requirements.txt"
  "$deps/bin/python" -m pip install --progress-bar off -r "$deps/requirements.txt"
  touch "$deps/.complete"
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
  (cd "$root" && "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e .)
  touch "$venv/.complete-$key-$project_key"
fi
