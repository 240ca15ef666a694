#!/usr/bin/env bash
# Installs the CNI plugins the pod-network test (shim/tests/cni.rs) and the demo use,
# idempotently: Debian's containernetworking-plugins (bridge, host-local IPAM,
# loopback, ...), fetched with `apt-get download` (nothing is installed system-wide)
# and unpacked with `dpkg -x` into $PREFIX (default /opt/gpuvm-cni).
#
#   scripts/cni-deps.sh          # as root (or with sudo available)
#   PREFIX=/somewhere scripts/cni-deps.sh
#
# The test finds the plugins through GPUVM_CNI_DIR (default /opt/gpuvm-cni/usr/lib/cni).
set -euo pipefail

PREFIX="${PREFIX:-/opt/gpuvm-cni}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
plugins="$PREFIX/usr/lib/cni"

if [ -x "$plugins/bridge" ] && [ -x "$plugins/host-local" ] && [ -x "$plugins/loopback" ]; then
    echo "cni-deps: CNI plugins already in $plugins"
else
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    chmod 755 "$work"
    echo "cni-deps: fetching containernetworking-plugins"
    if ! (cd "$work" && apt-get download containernetworking-plugins >/dev/null 2>&1); then
        $SUDO apt-get update -qq
        (cd "$work" && apt-get download containernetworking-plugins)
    fi
    $SUDO mkdir -p "$PREFIX"
    $SUDO dpkg -x "$work"/containernetworking-plugins_*.deb "$PREFIX"
fi
for plugin in bridge host-local loopback; do
    if [ ! -x "$plugins/$plugin" ]; then
        echo "cni-deps: $plugins/$plugin is missing after the install" >&2
        exit 1
    fi
done
command -v nsenter >/dev/null 2>&1 || {
    echo "cni-deps: nsenter (util-linux) is missing" >&2
    exit 1
}
echo "cni-deps: CNI plugins: $plugins"
echo "cni-deps: set GPUVM_CNI_DIR=$plugins for shim/tests/cni.rs"
