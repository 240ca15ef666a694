#!/usr/bin/env bash
# Runs the allocation race and the kill/restart e2e tests against a real loopback
# kube-apiserver N times each (default 20), each round on a fresh control plane, and
# prints how many rounds passed. Needs KUBEBUILDER_ASSETS (or KUBE_APISERVER + ETCD).
#   scripts/e2e-repeat.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
export GPUVM_E2E_REPEAT="${1:-20}"
export KUBEBUILDER_ASSETS="${KUBEBUILDER_ASSETS:-/root/.cache/gpuvm-kube}"
status=0
for test in two_unelected_operators_racing_never_double_allocate \
            operator_killed_mid_placement_converges_without_double_allocation; do
    log="$(mktemp)"
    cargo test -q -p gpuvm-e2e --test operator -- "$test" --exact --test-threads=1 >"$log" 2>&1 \
        || status=1
    grep -E '^(REPEAT|test result|Error)' "$log" || tail -40 "$log"
    rm -f "$log"
done
exit "$status"
