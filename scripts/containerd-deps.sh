#!/usr/bin/env bash
# Installs what the shim's real-containerd test (shim/tests/containerd.rs) needs on a
# fresh Debian 12, idempotently:
#   - containerd 2.x from Debian sid (bookworm has 1.6, trixie 1.7; the shim speaks
#     task API v3, which needs containerd >= 2.0). The sid package is fetched with
#     `apt-get download` through a PRIVATE apt config (the system's sources are not
#     touched) and unpacked with `dpkg -x` into $PREFIX (default /opt/gpuvm-containerd).
#     It runs on bookworm's libc (it is a static-ish Go binary).
#   - runc, busybox-static, util-linux/bsdutils (unshare, script) and
#     protobuf-compiler (protoc, for the k8s-cri dev-dependency) from bookworm,
#     installed normally.
#
#   scripts/containerd-deps.sh          # as root (or with sudo available)
#   PREFIX=/somewhere scripts/containerd-deps.sh
#
# Prints where the binaries are; the test finds them through GPUVM_CONTAINERD_DIR
# (default /opt/gpuvm-containerd/usr/bin).
set -euo pipefail

PREFIX="${PREFIX:-/opt/gpuvm-containerd}"
# shellcheck source=scripts/lib/apt-private.sh
. "$(dirname "$0")/lib/apt-private.sh"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

need_apt=()
command -v runc >/dev/null 2>&1 || need_apt+=(runc)
[ -x /bin/busybox ] || need_apt+=(busybox-static)
command -v unshare >/dev/null 2>&1 || need_apt+=(util-linux)
command -v script >/dev/null 2>&1 || need_apt+=(bsdutils)
# protoc: the CRI test's client (k8s-cri, a dev-dependency of gpuvm-shim) compiles
# the CRI proto in its build script, so `cargo test -p gpuvm-shim` needs it to build.
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
if [ "${#need_apt[@]}" -gt 0 ]; then
    echo "containerd-deps: installing ${need_apt[*]} from bookworm"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

containerd_version() {
    "$PREFIX/usr/bin/containerd" --version 2>/dev/null | awk '{print $3}'
}

version="$(containerd_version || true)"
if [[ "$version" =~ ^v?2\. ]]; then
    echo "containerd-deps: containerd $version already in $PREFIX"
else
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    echo "containerd-deps: fetching containerd from sid (private apt config)"
    apt_private_download sid containerd "$work"
    deb="$(ls "$work"/containerd_*.deb)"
    $SUDO mkdir -p "$PREFIX"
    $SUDO dpkg -x "$deb" "$PREFIX"
    version="$(containerd_version)"
    if [[ ! "$version" =~ ^v?2\. ]]; then
        echo "containerd-deps: expected containerd 2.x, got '$version'" >&2
        exit 1
    fi
fi

echo "containerd-deps: containerd $version: $PREFIX/usr/bin/containerd"
echo "containerd-deps: ctr: $PREFIX/usr/bin/ctr"
echo "containerd-deps: runc: $(command -v runc)"
echo "containerd-deps: set GPUVM_CONTAINERD_DIR=$PREFIX/usr/bin for shim/tests/containerd.rs"
