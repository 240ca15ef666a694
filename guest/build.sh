#!/usr/bin/env bash
# Builds the gpuvm guest image: an uncompressed `vmlinux` (PVH entry, boots fastest
# under QEMU and Cloud Hypervisor) from Debian bookworm's kernel package, and a
# reproducible `initramfs.cpio.gz` holding the static gpuvm-agent as /init plus the
# kernel modules it loads at boot. Also a busybox rootfs the VM tests run.
#
#   guest/build.sh [OUT_DIR]          # default OUT_DIR: .work/guest
#
# Environment:
#   GPUVM_KERNEL_PACKAGE     Debian package to take the kernel from
#                            (default: what linux-image-amd64 depends on now)
#   GPUVM_GUEST_CACHE        download cache (default: .work/guest-cache)
#   GPUVM_EXTRA_MODULES_DIR  extra .ko files (e.g. NVIDIA's) plus their own
#                            modules.list; see guest/README.md
#   SOURCE_DATE_EPOCH        timestamp of every initramfs entry
#                            (default: time of the last commit touching
#                            guest/, agent/, protocol/ or Cargo.lock)
#   CARGO_TARGET_DIR         where cargo builds the agent
#   GPUVM_FORCE_PACK=1       repack even when the inputs are unchanged
#
# A re-run with unchanged inputs (packages, agent binary, pack.py, modules.txt, this
# script, extra modules, SOURCE_DATE_EPOCH) only rebuilds the agent incrementally,
# finds the same input digest in OUT_DIR/.inputs.sha256 and leaves the outputs alone.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
out="$(mkdir -p "${1:-$repo/.work/guest}" && cd "${1:-$repo/.work/guest}" && pwd)"
cache="${GPUVM_GUEST_CACHE:-$repo/.work/guest-cache}"
mkdir -p "$cache"

if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    # The last commit that changed what goes into the image, so unrelated commits
    # elsewhere in the repository do not change the bytes.
    SOURCE_DATE_EPOCH="$(git -C "$repo" log -1 --format=%ct -- guest agent protocol Cargo.lock 2>/dev/null || true)"
    SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-0}"
fi
export SOURCE_DATE_EPOCH

# 1. Debian packages: the kernel and busybox-static (for the test rootfs).
kernel_pkg="${GPUVM_KERNEL_PACKAGE:-}"
if [ -z "$kernel_pkg" ]; then
    kernel_pkg="$(apt-cache depends linux-image-amd64 2>/dev/null \
        | awk '/Depends: linux-image-6\.1\.0-[0-9]+-amd64$/ { print $2; exit }')"
fi
if [ -z "$kernel_pkg" ]; then
    kernel_pkg="$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' \
        | awk '{ print $1 }' | sort -V | tail -1)"
fi
if [ -z "$kernel_pkg" ]; then
    echo "guest/build.sh: no linux-image-6.1.0-*-amd64 package known to apt (run apt-get update)" >&2
    exit 1
fi

fetch() {
    local pkg="$1" deb
    deb="$(ls "$cache/${pkg}_"*.deb 2>/dev/null | sort -V | tail -1 || true)"
    if [ -z "$deb" ]; then
        (cd "$cache" && apt-get download -q "$pkg" >&2)
        deb="$(ls "$cache/${pkg}_"*.deb | sort -V | tail -1)"
    fi
    echo "$deb"
}
kernel_deb="$(fetch "$kernel_pkg")"
busybox_deb="$(fetch busybox-static)"

# 2. The agent, statically linked (glibc static). --target keeps RUSTFLAGS away from
#    build scripts and proc macros, which must stay dynamic.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
(
    cd "$repo"
    RUSTFLAGS="-C target-feature=+crt-static --remap-path-prefix=$repo=/gpuvm --remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/cargo" \
        cargo build --release --locked -p gpuvm-agent --target x86_64-unknown-linux-gnu
)
agent="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/gpuvm-agent"

# 3. Nothing to do when every input is what the outputs were made from.
inputs_digest="$(
    {
        echo "epoch $SOURCE_DATE_EPOCH"
        echo "kernel $(basename "$kernel_deb")"
        sha256sum "$kernel_deb" "$busybox_deb" "$agent" "$here/pack.py" "$here/modules.txt" "$here/build.sh" \
            | awk '{ print $1 }'
        if [ -n "${GPUVM_EXTRA_MODULES_DIR:-}" ]; then
            (cd "$GPUVM_EXTRA_MODULES_DIR" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum)
        fi
    } | sha256sum | awk '{ print $1 }'
)"
stamp="$out/.inputs.sha256"
if [ "${GPUVM_FORCE_PACK:-0}" != 1 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs_digest" ] \
    && [ -f "$out/vmlinux" ] && [ -f "$out/initramfs.cpio.gz" ] && [ -f "$out/manifest.json" ] \
    && [ -d "$out/busybox-rootfs" ]; then
    echo "guest/build.sh: $out is up to date (inputs $inputs_digest)"
    exit 0
fi
rm -f "$stamp"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
dpkg -x "$kernel_deb" "$work/kernel"
dpkg -x "$busybox_deb" "$work/busybox"

# 4. vmlinux, modules, initramfs, test rootfs.
python3 "$here/pack.py" \
    --kernel-root "$work/kernel" \
    --busybox-root "$work/busybox" \
    --agent "$agent" \
    --modules "$here/modules.txt" \
    --extra-modules-dir "${GPUVM_EXTRA_MODULES_DIR:-}" \
    --epoch "$SOURCE_DATE_EPOCH" \
    --kernel-package "$(basename "$kernel_deb")" \
    --out "$out"
echo "$inputs_digest" >"$stamp"
