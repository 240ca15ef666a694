# shellcheck shell=bash
# The Kubernetes part of scripts/demo.sh (sourced): the GpuMachine flow on the cluster
# KUBECONFIG points at. Everything it creates is deleted again (k8s_cleanup, also
# called by the demo's cleanup on failure and Ctrl-C).

K8S_NAMESPACE="gpuvm-demo"
K8S_MACHINE="hello-vm"
K8S_REPORT=""

# The sample machine, as in an examples/ manifest: busybox in a 1-CPU, 512 MiB guest
# with one GPU of any model (the same size the local VM run uses).
k8s_sample_machine() {
    cat <<EOF
apiVersion: gpuvm.dev/v1alpha1
kind: GpuMachine
metadata:
  name: $K8S_MACHINE
  namespace: $K8S_NAMESPACE
spec:
  image: docker.io/library/busybox:1.36
  command: ["/bin/sh", "-c"]
  args: ["echo hello from a gpuvm micro-VM; uname -r; nvidia-smi -L || true"]
  gpu:
    model: any
    count: 1
  guest:
    cpus: 1
    memory: 512Mi
  restartPolicy: Never
EOF
}

kc() {
    kubectl --request-timeout=20s "$@"
}

# Appends "$ <command>" and its output to the report shown at the end.
k8s_show() {
    local out
    out="$(kc "$@" 2>&1 || true)"
    K8S_REPORT+="\$ kubectl $*"$'\n'"$out"$'\n\n'
    printf '$ kubectl %s\n%s\n' "$*" "$out" >>"$LOG"
}

k8s_say() {
    K8S_REPORT+="$*"$'\n'
    echo "$*" >>"$LOG"
}

# Runs the Kubernetes stage when KUBECONFIG names a cluster we may create CRDs in;
# otherwise records it as skipped, with the reason.
k8s_stage() {
    local reason="" context
    if [ -z "${KUBECONFIG:-}" ]; then
        reason="no KUBECONFIG"
    elif ! command -v kubectl >/dev/null 2>&1; then
        reason="no kubectl"
    elif ! kubectl version --request-timeout=5s >>"$LOG" 2>&1; then
        reason="cluster of KUBECONFIG not reachable"
    elif [ "$(kubectl auth can-i create customresourcedefinitions.apiextensions.k8s.io --request-timeout=5s 2>/dev/null)" != yes ]; then
        reason="KUBECONFIG's user may not create CRDs"
    fi
    if [ -n "$reason" ]; then
        printf '%-11s %-56s skipped\n' kubernetes "GpuMachine flow ($reason)"
        record_stage kubernetes "-" "skipped: $reason"
        return 0
    fi
    context="$(kubectl config current-context 2>/dev/null || echo '?')"
    run_stage kubernetes "GpuMachine flow on context '${context:0:24}'" stage_k8s
}

stage_k8s() {
    local op="" i scheduled=""
    if ! kc get crd gpumachines.gpuvm.dev >/dev/null 2>&1; then
        K8S_CRDS_CREATED=1
    fi
    kc apply -f "$REPO/crds/"
    kc wait --for=condition=Established --timeout=30s \
        crd/gpumachines.gpuvm.dev crd/gpunodes.gpuvm.dev
    if ! kc get namespace "$K8S_NAMESPACE" >/dev/null 2>&1; then
        K8S_NS_CREATED=1
        kc create namespace "$K8S_NAMESPACE"
    fi
    K8S_MACHINE_CREATED=1
    k8s_sample_machine | kc apply -f -
    k8s_say "Applied crds/ and GpuMachine $K8S_NAMESPACE/$K8S_MACHINE (gpu: any x1, guest: 1 CPU, 512Mi)."
    k8s_show get gm -n "$K8S_NAMESPACE" -o wide
    k8s_show describe gm -n "$K8S_NAMESPACE" "$K8S_MACHINE"
    for op in "$REPO/target/debug/gpuvm-operator" "$REPO/target/release/gpuvm-operator" ""; do
        [ -n "$op" ] && [ -x "$op" ] && break
    done
    if [ -z "$op" ]; then
        k8s_say "No operator is running (build it: cargo build -p gpuvm-operator), so the machine"
        k8s_say "stays Pending: it has no status until the operator places it on a GPU node."
    else
        k8s_say "Starting $op --leader-elect=false for up to 20 s:"
        setsid "$op" --leader-elect=false --metrics-addr 127.0.0.1:0 </dev/null >>"$LOG" 2>&1 &
        OPERATOR_PID=$!
        for ((i = 0; i < 20; i++)); do
            scheduled="$(kc get gm -n "$K8S_NAMESPACE" "$K8S_MACHINE" \
                -o 'jsonpath={.status.conditions[?(@.type=="Scheduled")].status}' 2>/dev/null || true)"
            [ -n "$scheduled" ] && break
            kill -0 "$OPERATOR_PID" 2>/dev/null || break
            sleep 1
        done
        if [ -n "$scheduled" ]; then
            k8s_say "The operator set Scheduled=$scheduled after ${i}s (False without a GPU node that fits):"
        else
            k8s_say "The operator set no Scheduled condition within 20 s (see its output in $LOG)."
        fi
        k8s_show get gm -n "$K8S_NAMESPACE" -o wide
        k8s_show get gm -n "$K8S_NAMESPACE" "$K8S_MACHINE" \
            -o 'jsonpath={range .status.conditions[*]}{.type}={.status} {.reason}: {.message}{"\n"}{end}'
    fi
    k8s_cleanup
    k8s_say "Deleted what the demo created."
}

# Deletes what stage_k8s created, in an order that lets the operator (if running)
# release the machine's finalizer first.
k8s_cleanup() {
    if [ "$K8S_MACHINE_CREATED" = 1 ]; then
        if ! kc delete gm -n "$K8S_NAMESPACE" "$K8S_MACHINE" --ignore-not-found --timeout=20s >>"$LOG" 2>&1; then
            # No operator left to remove its finalizer.
            kc patch gm -n "$K8S_NAMESPACE" "$K8S_MACHINE" --type=merge \
                -p '{"metadata":{"finalizers":null}}' >>"$LOG" 2>&1 || true
        fi
        K8S_MACHINE_CREATED=0
    fi
    if [ -n "$OPERATOR_PID" ]; then
        kill -TERM "$OPERATOR_PID" 2>/dev/null || true
        wait_gone "$OPERATOR_PID" 5 || kill -KILL "$OPERATOR_PID" 2>/dev/null || true
        wait "$OPERATOR_PID" 2>/dev/null || true
        OPERATOR_PID=""
    fi
    if [ "$K8S_NS_CREATED" = 1 ]; then
        kc delete namespace "$K8S_NAMESPACE" --ignore-not-found --wait=false >>"$LOG" 2>&1 || true
        K8S_NS_CREATED=0
    fi
    if [ "$K8S_CRDS_CREATED" = 1 ]; then
        kc delete -f "$REPO/crds/" --ignore-not-found --wait=false >>"$LOG" 2>&1 || true
        K8S_CRDS_CREATED=0
    fi
    return 0
}

print_k8s_report() {
    [ -n "$K8S_REPORT" ] || return 0
    echo
    echo "Kubernetes (GpuMachine flow):"
    printf '%s' "$K8S_REPORT" | sed 's/^/  /'
}
