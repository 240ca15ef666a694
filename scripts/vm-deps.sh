#!/usr/bin/env bash
# Installs what the VM tests (agent/tests/vm_boot.rs, e2e) need on Debian 12, idempotently:
# QEMU (TCG), cpio, vhost-device-vsock (hybrid vsock for QEMU) and virtiofsd.
# Anything already present is skipped, so CI can call it on every run.
#
#   scripts/vm-deps.sh            # as root (or with sudo available)
#
# Binaries from `cargo install` land in ${CARGO_HOME:-~/.cargo}/bin.
set -euo pipefail

VHOST_DEVICE_VSOCK_VERSION=0.3.0
VIRTIOFSD_VERSION=1.14.0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

need_apt=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need_apt+=(qemu-system-x86)
command -v cpio >/dev/null 2>&1 || need_apt+=(cpio)
# Link libraries virtiofsd needs when it is built from source.
dpkg -s libseccomp-dev >/dev/null 2>&1 || need_apt+=(libseccomp-dev)
dpkg -s libcap-ng-dev >/dev/null 2>&1 || need_apt+=(libcap-ng-dev)
# Source of the test rootfs (busybox-static) and module handling in guest/build.sh.
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)

if [ "${#need_apt[@]}" -gt 0 ]; then
    echo "vm-deps: installing ${need_apt[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
else
    echo "vm-deps: apt packages already present"
fi

cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"

# installed_version <binary> prints the version `cargo install` recorded, if any.
installed_version() {
    cargo install --list 2>/dev/null | awk -v name="$1" '$1 == name { gsub(/[v:]/, "", $2); print $2 }'
}

install_crate() {
    local crate="$1" version="$2"
    if [ "$(installed_version "$crate")" = "$version" ] && [ -x "$cargo_bin/$crate" ]; then
        echo "vm-deps: $crate $version already installed"
        return
    fi
    echo "vm-deps: cargo install $crate $version"
    cargo install --locked --quiet "$crate" --version "$version"
}

install_crate vhost-device-vsock "$VHOST_DEVICE_VSOCK_VERSION"
install_crate virtiofsd "$VIRTIOFSD_VERSION"

echo "vm-deps: ready ($(qemu-system-x86_64 --version | head -1); $cargo_bin/vhost-device-vsock; $cargo_bin/virtiofsd)"
