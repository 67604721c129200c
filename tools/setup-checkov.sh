#!/usr/bin/env bash
# Installs checkov, the scanner the security tests run over the chart and the run's Jobs, into a
# venv of its own in the cache and prints the path of its executable.
#
# checkov pins a large dependency tree (boto3, networkx, pydantic, ...): installed into the
# project's dependency venv it could change the versions the operator and trainer run and are
# tested with. Its own venv, keyed by its pinned version, keeps the two apart and is shared by every
# clone. A lock serialises concurrent installs (several test sessions on one machine).
set -euo pipefail

version=${CHECKOV_VERSION:-3.3.30}
python=${PYTHON:-python3}
cache_root=${FEDTUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fedtune}
venv="$cache_root/checkov-$version"
mkdir -p "$cache_root"

if [ ! -f "$venv/.complete" ]; then
  exec 9>"$venv.lock"
  flock 9
  if [ ! -f "$venv/.complete" ]; then
    printf '[setup-checkov] installing checkov %s into %s (a minute or two)\n' "$version" "$venv" >&2
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
    "$venv/bin/python" -m pip install -q --progress-bar off "checkov==$version" >&2
    "$venv/bin/checkov" --version >/dev/null
    touch "$venv/.complete"
  fi
fi
echo "$venv/bin/checkov"
