#!/usr/bin/env bash
# Installs what the API-server tier of the tests needs, idempotently, into one folder in
# the envtest layout (KUBEBUILDER_ASSETS): kube-apiserver, kube-controller-manager, etcd.
#   - kube-apiserver and kube-controller-manager: decompressed from ../shared/kube/
#     (Kubernetes v1.36.2 built from source; see its README), checked against SHA256SUMS.
#   - etcd 3.5: Debian trixie's `etcd-server`, fetched with `apt-get download` through a
#     PRIVATE apt config (the system's sources are untouched) and unpacked with `dpkg -x`.
#   - cloud-hypervisor (v54, ../shared/vmm/) next to them, for the shim's live CH tests.
#
#   scripts/kube-deps.sh                          # installs; prints `export ...` lines
#   eval "$(scripts/kube-deps.sh --env)"          # installs; sets the variables here
#   eval "$(scripts/kube-deps.sh --env --cached)" # installs nothing: exports what the
#                                                 # cache already holds (GPUVM_SKIP_DEPS=1)
#
# Exports KUBEBUILDER_ASSETS when the cache has kube-apiserver and etcd, and
# CLOUD_HYPERVISOR_BIN when it has cloud-hypervisor. Messages go to stderr with --env.
# ASSETS (default $HOME/.cache/gpuvm-kube) is where the binaries go; SHARED (default
# ../shared next to the checkout) is where the prebuilt binaries are read from;
# DEBIAN_MIRROR overrides the Debian archive etcd is fetched from.
set -euo pipefail
cd "$(dirname "$0")/.."

ASSETS="${ASSETS:-$HOME/.cache/gpuvm-kube}"
SHARED="${SHARED:-$(cd .. && pwd)/shared}"
env_only=0
cached=0
for arg in "$@"; do
    case "$arg" in
        --env) env_only=1 ;;
        --cached) cached=1 ;;
        *) echo "kube-deps: unknown option $arg (use --env, --cached)" >&2; exit 2 ;;
    esac
done
log() { if [ "$env_only" = 1 ]; then echo "kube-deps: $*" >&2; else echo "kube-deps: $*"; fi; }

# What the cache holds, as `export` lines (paths shell-quoted).
exports() {
    if [ -x "$ASSETS/kube-apiserver" ] && [ -x "$ASSETS/etcd" ]; then
        printf 'export KUBEBUILDER_ASSETS=%q\n' "$ASSETS"
    else
        log "no kube-apiserver + etcd in $ASSETS: the API-server tests will print SKIPPED"
    fi
    if [ -x "$ASSETS/cloud-hypervisor" ]; then
        printf 'export CLOUD_HYPERVISOR_BIN=%q\n' "$ASSETS/cloud-hypervisor"
    fi
}

if [ "$cached" = 1 ]; then
    exports
    exit 0
fi

mkdir -p "$ASSETS"

# Decompresses $1 (xz) into $ASSETS/$2 unless the copy there came from the same file:
# a stamp keeps the source's sha256 (a fresh copy of shared/ has new mtimes).
unpack() {
    local src="$1" bin="$2" sum
    sum="$(sha256sum "$src" | awk '{print $1}')"
    if [ -x "$ASSETS/$bin" ] && [ "$(cat "$ASSETS/.$bin.sha256" 2>/dev/null)" = "$sum" ]; then
        return
    fi
    log "unpacking $src"
    xz -dc "$src" > "$ASSETS/$bin.tmp"
    chmod +x "$ASSETS/$bin.tmp"
    mv "$ASSETS/$bin.tmp" "$ASSETS/$bin"
    echo "$sum" > "$ASSETS/.$bin.sha256"
}

# kube-apiserver / kube-controller-manager from ../shared/kube (xz + SHA256SUMS).
for bin in kube-apiserver kube-controller-manager; do
    src="$SHARED/kube/$bin.xz"
    if [ ! -f "$src" ]; then
        log "$src is missing: the API-server tests will print SKIPPED"
        continue
    fi
    if [ -f "$SHARED/kube/SHA256SUMS" ]; then
        want="$(awk -v f="$bin.xz" '$2 == f || $2 == "*"f {print $1}' "$SHARED/kube/SHA256SUMS")"
        got="$(sha256sum "$src" | awk '{print $1}')"
        if [ -n "$want" ] && [ "$got" != "$want" ]; then
            echo "kube-deps: $src: sha256 $got, SHA256SUMS says $want" >&2
            exit 1
        fi
    fi
    unpack "$src" "$bin"
done

# cloud-hypervisor from ../shared/vmm.
if [ -f "$SHARED/vmm/cloud-hypervisor.xz" ]; then
    unpack "$SHARED/vmm/cloud-hypervisor.xz" cloud-hypervisor
fi

# etcd from trixie (private apt config, dpkg -x).
if ! "$ASSETS/etcd" --version >/dev/null 2>&1; then
    # shellcheck source=scripts/lib/apt-private.sh
    . scripts/lib/apt-private.sh
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    mkdir -p "$work/root"
    log "fetching etcd-server from trixie (private apt config)"
    apt_private_download trixie etcd-server "$work"
    dpkg -x "$work"/etcd-server_*.deb "$work/root"
    install -m 0755 "$work/root/usr/bin/etcd" "$ASSETS/etcd"
fi

log "etcd $("$ASSETS/etcd" --version | awk '/etcd Version/ {print $3}'), kube-apiserver $("$ASSETS/kube-apiserver" --version 2>/dev/null | awk '{print $2}') in $ASSETS"
exports
