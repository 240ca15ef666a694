#!/usr/bin/env bash
# Builds the gpuvm guest image: an uncompressed `vmlinux` (PVH entry, boots fastest
# under QEMU and Cloud Hypervisor) from Debian bookworm's kernel package, and a
# reproducible `initramfs.cpio.gz` holding the static gpuvm-agent as /init plus the
# kernel modules it loads at boot. Also a busybox rootfs the VM tests run.
#
#   guest/build.sh [OUT_DIR]          # default OUT_DIR: .work/guest
#   guest/build.sh --gpu [OUT_DIR]    # the GPU flavour, default OUT_DIR: .work/guest-gpu
#
# The GPU flavour adds NVIDIA's open kernel modules (built once per kernel release and
# cached), the GSP firmware, the driver's libraries, glibc and the agent's
# gpuvm-gpu-check helper to the initramfs, and a probe-rootfs/ for the tests; see
# guest/gpu.sh and guest/README.md.
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
#   GPUVM_NVIDIA_SUITE       (--gpu) Debian suite of the driver (default trixie)
#   GPUVM_GPU_CHECK_BIN      (--gpu) gpuvm-gpu-check binary to pack instead of building it
#
# A re-run with unchanged inputs (packages, agent binary, pack.py, modules.txt, this
# script, extra modules, SOURCE_DATE_EPOCH) only rebuilds the agent incrementally,
# finds the same input digest in OUT_DIR/.inputs.sha256 and leaves the outputs alone.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
flavour=small
default_out="$repo/.work/guest"
if [ "${1:-}" = --gpu ]; then
    flavour=gpu
    default_out="$repo/.work/guest-gpu"
    shift
fi
case "$#:${1:-}" in
    [01]:-* | [2-9]:* | [1-9][0-9]*:*) echo "usage: guest/build.sh [--gpu] [OUT_DIR]" >&2; exit 2 ;;
esac
out="$(mkdir -p "${1:-$default_out}" && cd "${1:-$default_out}" && pwd)"
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
if [ "$flavour" = gpu ]; then
    # shellcheck source=guest/gpu.sh
    . "$here/gpu.sh"
    gpu_fetch
    gpu_modules
fi

# 2. The agent, statically linked (glibc static). --target keeps RUSTFLAGS away from
#    build scripts and proc macros, which must stay dynamic.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
(
    cd "$repo"
    RUSTFLAGS="-C target-feature=+crt-static --remap-path-prefix=$repo=/gpuvm --remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/cargo" \
        cargo build --release --locked -p gpuvm-agent --target x86_64-unknown-linux-gnu
)
agent="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/gpuvm-agent"
[ "$flavour" = small ] || gpu_check_bin

# 3. Nothing to do when every input is what the outputs were made from.
inputs_digest="$(
    {
        echo "epoch $SOURCE_DATE_EPOCH"
        echo "kernel $(basename "$kernel_deb")"
        sha256sum "$kernel_deb" "$busybox_deb" "$agent" "$here/pack.py" "$here/elfinfo.py" "$here/gpu.py" \
            "$here/modules.txt" "$here/build.sh" | awk '{ print $1 }'
        if [ "$flavour" = gpu ]; then
            echo "flavour gpu ${gpu_check_missing:-}"
            sha256sum "${nvidia_debs[@]}" "$libc6_deb" "$libc_bin_deb" "$libgcc_deb" "$here/gpu.sh" \
                "$here/probe/dlopen-probe.c" "$nvidia_modules_dir"/*.ko ${gpu_check:+"$gpu_check"} | awk '{ print $1 }'
            gcc-12 --version | head -1
        fi
        if [ -n "${GPUVM_EXTRA_MODULES_DIR:-}" ]; then
            (cd "$GPUVM_EXTRA_MODULES_DIR" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum)
        fi
    } | sha256sum | awk '{ print $1 }'
)"
stamp="$out/.inputs.sha256"
if [ "${GPUVM_FORCE_PACK:-0}" != 1 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs_digest" ] \
    && [ -f "$out/vmlinux" ] && [ -f "$out/initramfs.cpio.gz" ] && [ -f "$out/manifest.json" ] \
    && [ -d "$out/busybox-rootfs" ] && { [ "$flavour" = small ] || [ -d "$out/probe-rootfs" ]; }; then
    echo "guest/build.sh: $out is up to date (inputs $inputs_digest)"
    exit 0
fi
rm -f "$stamp"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
dpkg -x "$kernel_deb" "$work/kernel"
dpkg -x "$busybox_deb" "$work/busybox"
gpu_args=()
if [ "$flavour" = gpu ]; then
    # The driver's packages but the module source (nvidia_debs[0]); glibc and libgcc_s
    # together, as pack.py looks for both in lib/x86_64-linux-gnu/.
    for deb in "${nvidia_debs[@]:1}"; do dpkg -x "$deb" "$work/nvidia"; done
    dpkg -x "$libc6_deb" "$work/glibc"
    dpkg -x "$libgcc_deb" "$work/glibc"
    dpkg -x "$libc_bin_deb" "$work/libc-bin"
    gpu_probe "$work/dlopen-probe"
    gpu_args=(--gpu --nvidia-version "$NVIDIA_VERSION" --nvidia-root "$work/nvidia"
        --nvidia-modules-dir "$nvidia_modules_dir" --glibc-root "$work/glibc"
        --libc-bin-root "$work/libc-bin" --probe "$work/dlopen-probe"
        --gpu-check "$gpu_check" --gpu-check-missing "$gpu_check_missing"
        --nvidia-packages)
    for deb in "${nvidia_debs[@]}" "$libc6_deb" "$libc_bin_deb" "$libgcc_deb"; do
        gpu_args+=("$(basename "$deb")")
    done
fi

# 4. vmlinux, modules, initramfs, test rootfs.
python3 "$here/pack.py" \
    --kernel-root "$work/kernel" \
    --busybox-root "$work/busybox" \
    --agent "$agent" \
    --modules "$here/modules.txt" \
    --extra-modules-dir "${GPUVM_EXTRA_MODULES_DIR:-}" \
    --epoch "$SOURCE_DATE_EPOCH" \
    --kernel-package "$(basename "$kernel_deb")" \
    --out "$out" \
    "${gpu_args[@]}"
echo "$inputs_digest" >"$stamp"
