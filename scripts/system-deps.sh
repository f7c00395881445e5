#!/usr/bin/env bash
# Runs before `npm install` builds the addon: makes sure the Debian packages
# the native build links against are present (faiss for `ivf` and k-means,
# OpenBLAS under it, a C++ toolchain). Installs them with apt-get when run as
# root; otherwise says what to install.
# (Test-only packages are not here: .ci/run installs python3-numpy,
# python3-msgpack and redis-server for the test suite.)
set -euo pipefail
needed=(build-essential python3 libfaiss-dev libopenblas-dev)
missing=()
for p in "${needed[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "kvrecall: installing ${missing[*]} (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
else
  echo "kvrecall: the native build needs these Debian packages: ${missing[*]}" >&2
  echo "  sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
