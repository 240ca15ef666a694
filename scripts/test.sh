#!/usr/bin/env bash
# gpuvm's test command (README command 2; `.ci/run` calls exactly this).
#
# On a fresh Debian 12 machine, as root, it installs what the tests need from the
# package registries, builds the guest image, then runs every check CI runs:
#   - cargo fmt --check, clippy -D warnings, the CRD staleness check,
#   - the whole workspace's tests: unit, property, scripted-API-server, real sysfs,
#     real QEMU VMs with the real guest agent, and real containerd 2.x through the shim,
#   - the API-server tier: the operator's e2e suite, the node agent's publishing and the
#     chart's server-side dry-run against a real etcd + kube-apiserver +
#     kube-controller-manager, which the e2e harness starts on loopback from the binaries
#     scripts/kube-deps.sh puts in KUBEBUILDER_ASSETS (nothing is started by hand here),
#   - the GPU flavour of the guest image (NVIDIA's open modules built for the guest
#     kernel, the driver's libraries) booted under QEMU without a GPU, a container
#     seeing libcuda.so.1 and libnvidia-ml.so.1 (agent/tests/gpu_image.rs),
#   - the Helm chart tests.
# Tests that need what this machine lacks (a GPU, a KVM that boots real guests, a
# Kubernetes API server, a cloud-hypervisor binary) print `SKIPPED: <reason>`.
#
# Options (environment):
#   GPUVM_SKIP_DEPS=1    don't install anything (you did already); the control-plane and
#                        Cloud Hypervisor binaries already cached by scripts/kube-deps.sh
#                        are still used
#   GPUVM_SKIP_LINT=1    skip fmt/clippy (quicker local iterations)
#   GPUVM_REQUIRE=LIST   strict mode (crate gpuvm-testkit, and charts/tests for Python):
#                        a test whose requirement is in the comma LIST fails instead of
#                        printing SKIPPED. Names: apiserver, controller-manager, kvm, gpu,
#                        cloud-hypervisor, ch-openapi, qemu, containerd, cni, gpu-image, root, or `all`; an
#                        unknown name is an error. `.ci/run` sets it to what CI can run.
#   KUBECONFIG, KUBEBUILDER_ASSETS, KUBE_APISERVER + ETCD, CLOUD_HYPERVISOR_BIN
#                        when set, win over what scripts/kube-deps.sh finds
set -euo pipefail
cd "$(dirname "$0")/.."

started=$SECONDS
stage_started=$SECONDS
stage_name=""
stage() {
    if [ -n "$stage_name" ]; then
        printf '==> %s: %d s\n' "$stage_name" "$((SECONDS - stage_started))"
    fi
    stage_name="$*"
    stage_started=$SECONDS
    printf '\n==> %s\n' "$*"
}
# Applies `export VAR=...` lines from scripts/kube-deps.sh, keeping variables the caller
# already set.
use_env() {
    local line var
    while IFS= read -r line; do
        [ -n "$line" ] || continue
        var="${line#export }"
        var="${var%%=*}"
        if [ -z "${!var:-}" ]; then
            eval "$line"
        fi
    done <<<"$1"
}

if [ "${GPUVM_SKIP_DEPS:-0}" != 1 ]; then
    stage "installing test dependencies"
    if [ "$(id -u)" -ne 0 ]; then
        echo "scripts/test.sh installs packages and starts containerd and VMs: run it as root" >&2
        exit 1
    fi
    need=()
    command -v openssl >/dev/null 2>&1 || need+=(openssl)
    command -v unshare >/dev/null 2>&1 || need+=(util-linux)
    command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
    command -v lua5.1 >/dev/null 2>&1 || need+=(lua5.1)
    command -v xz >/dev/null 2>&1 || need+=(xz-utils)  # scripts/kube-deps.sh
    if [ "${#need[@]}" -gt 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
    fi
    # guest/build.sh fetches Debian's kernel with `apt-get download`: it needs lists.
    if ! apt-cache policy 2>/dev/null | grep -q 'release'; then
        apt-get update -qq
    fi
    scripts/vm-deps.sh
    scripts/containerd-deps.sh
    scripts/cni-deps.sh
    scripts/guest-gpu-deps.sh
    stage "building the guest image (kernel + initramfs with the agent)"
    guest/build.sh
    # NVIDIA's open modules are compiled once per driver and kernel release and cached
    # in .work/guest-cache (140–353 s cold on 2 cores in clean-clone CI runs; a repack
    # after that).
    stage "building the GPU guest image (NVIDIA 550.163.01 open modules, driver libraries)"
    guest/build.sh --gpu
fi
# With GPUVM_SKIP_DEPS=1 only what kube-deps.sh already cached is used (--cached).
stage "control-plane binaries (etcd, kube-apiserver, kube-controller-manager)"
kube_args=(--env)
[ "${GPUVM_SKIP_DEPS:-0}" = 1 ] && kube_args+=(--cached)
kube_env="$(scripts/kube-deps.sh "${kube_args[@]}")"  # an assignment, so a failure stops here
use_env "$kube_env"
echo "KUBEBUILDER_ASSETS=${KUBEBUILDER_ASSETS:-} KUBECONFIG=${KUBECONFIG:-}" \
    "CLOUD_HYPERVISOR_BIN=${CLOUD_HYPERVISOR_BIN:-} GPUVM_REQUIRE=${GPUVM_REQUIRE:-}"

if [ "${GPUVM_SKIP_LINT:-0}" != 1 ]; then
    stage "cargo fmt --check"
    cargo fmt --all --check
    stage "cargo clippy -D warnings"
    cargo clippy --workspace --all-targets --locked -- -D warnings
fi

stage "CRDs in crds/ match the Rust types"
cargo run -q --locked -p gpuvm-operator --bin crdgen -- --check crds/

# The workspace test build below also builds the operator and with-control-plane
# binaries (their crates have integration tests), with the workspace's unified
# features. Handing exactly those to the e2e tests and the chart tests saves a second
# `cargo build -p ...` of their dependencies with other features (minutes on 2 cores).
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
export GPUVM_OPERATOR_BIN="${GPUVM_OPERATOR_BIN:-$target_dir/debug/gpuvm-operator}"
export GPUVM_WITH_CONTROL_PLANE="${GPUVM_WITH_CONTROL_PLANE:-$target_dir/debug/with-control-plane}"

stage "guest image packing tests (pack.py, the GPU layout, probe-rootfs)"
python3 -m unittest discover -s guest/tests

stage "cargo test (workspace)"
cargo test --workspace --all-targets --locked --no-fail-fast

if [ -x charts/tests/run.sh ]; then
    stage "Helm chart tests (server-side dry-run under with-control-plane)"
    charts/tests/run.sh
fi

stage "all checks passed"
echo "all checks passed in $((SECONDS - started)) s"
