#!/usr/bin/env bash
# Installs what `guest/build.sh --gpu` needs to build NVIDIA's open kernel modules and
# the probe, idempotently, from Debian's packages: make, gcc-12 (the compiler the
# bookworm kernel was built with), patch, and the libraries linux-kbuild's tools link
# (libelf1, libssl3). The kernel headers themselves are not installed: build.sh
# fetches and unpacks them into a temp dir.
#
#   scripts/guest-gpu-deps.sh          # as root (or with sudo available)
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
need=()
for pkg in make gcc-12 libc6-dev patch libelf1 libssl3 xz-utils python3; do
    dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed$' || need+=("$pkg")
done
if [ "${#need[@]}" -eq 0 ]; then
    echo "guest-gpu-deps: make, gcc-12, libc6-dev (the probe's headers), patch, libelf1, libssl3, xz-utils and python3 are installed"
    exit 0
fi
echo "guest-gpu-deps: installing ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
