#!/usr/bin/env bash
# apt-ensure.sh PACKAGE...: installs the Debian packages that are missing (idempotent, quiet when
# all are there). The image builds and the real-node tier of the devcluster use it, so a fresh
# machine needs nothing installed by hand. Needs root when something is missing.
set -euo pipefail

missing=()
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "apt-ensure: missing Debian packages ${missing[*]}: install them as root" >&2
  exit 1
fi
echo "[apt-ensure] installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# Wait for apt's lock rather than fail when another install runs.
apt=(apt-get -q -o DPkg::Lock::Timeout=600)
if ! "${apt[@]}" install -y --no-install-recommends "${missing[@]}" >/dev/null; then
  "${apt[@]}" update >/dev/null
  "${apt[@]}" install -y --no-install-recommends "${missing[@]}" >/dev/null
fi
