#!/usr/bin/env bash
# gpuvm demo: one container in its own micro-VM, through a private containerd.
#
#   sudo scripts/demo.sh            # from the repository root, on Debian 12
#   sudo scripts/demo.sh --keep     # keep the temp dir (configs, logs, image) afterwards
#   scripts/demo.sh --help
#
# See usage() below for what it does. Everything it starts runs from a temp dir
# (/tmp/gpuvm-demo.XXXXXX) and is stopped by PID or by that dir in its command line
# on success, on failure and on Ctrl-C. It never touches a system containerd.
set -Eeuo pipefail
export LC_ALL=C

usage() {
    cat <<'EOF'
Usage: scripts/demo.sh [--keep] [--help]

The gpuvm newcomer demo. Run it as root from the repository root on Debian 12; no
cluster and no GPU needed. It:

  1. deps        installs what it needs from the package registries (idempotent):
                 scripts/containerd-deps.sh (containerd 2.x into /opt/gpuvm-containerd),
                 scripts/vm-deps.sh (QEMU, vhost-device-vsock, virtiofsd),
                 busybox-static and util-linux
  2. build       builds the shim, containerd-shim-gpuvm-v1 (cargo debug profile: the
                 fastest build, and the shim's speed does not matter next to a VM boot)
  3. guest       builds the guest image: kernel + initramfs with the agent as /init
                 (guest/build.sh, into .work/guest)
  4. containerd  starts a PRIVATE containerd (own config, root, state and socket in a
                 temp dir, inside `unshare --net`) with the gpuvm runtime configured
  5. image       builds a busybox OCI image by hand and imports it
  6. pod net     a pod network namespace with a veth (10.99.0.2/24, its peer 10.99.0.1
                 in containerd's private namespace), as a CNI plugin would make it
  7. vm run      `ctr run --runtime io.containerd.gpuvm.v1 --with-ns network:<pod netns>`:
                 the container runs in a QEMU micro-VM with its own kernel, prints what it
                 sees there, including a host file bind-mounted read-only into it
                 (virtio-fs), and answers one HTTP request on the pod IP, which the demo
                 sends from containerd's namespace (the host side of the veth)
  8. kubernetes  only when KUBECONFIG points at a reachable cluster: applies crds/ and a
                 sample GpuMachine in namespace gpuvm-demo, shows `kubectl get gm` and
                 `kubectl describe gm`, runs target/debug/gpuvm-operator for ~20 s when
                 built, then deletes what it created
  9. cleanup     stops containerd, the shim and the VM it started, unmounts, removes
                 the temp dir (also on failure and Ctrl-C)

Then it prints the guest kernel next to the host's, the mounted file and the HTTP
answer from the VM, and how long each stage took.
Installed packages and build outputs (target/, .work/guest) stay for the next run,
which is much faster. Details go to a log file under .work/demo/ (path printed).

Options:
  --keep    keep the temp dir (containerd config and log, shim config, image) for
            inspection; the processes are still stopped and everything unmounted
  --help    this text

Environment:
  KUBECONFIG          a cluster for stage 7 (skipped without one)
  GPUVM_DEMO_SHIM     a prebuilt containerd-shim-gpuvm-v1 to use instead of building one
  GPUVM_DEMO_TIMEOUT  seconds allowed for the VM run (default 300)
EOF
}

KEEP=0
for arg in "$@"; do
    case "$arg" in
        --keep) KEEP=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "demo: unknown option '$arg' (see --help)" >&2; exit 2 ;;
    esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib/demo-common.sh
source "$REPO/scripts/lib/demo-common.sh"
# shellcheck source=scripts/lib/demo-k8s.sh
source "$REPO/scripts/lib/demo-k8s.sh"
# The terminal's stdout and stderr, for messages from traps that fire inside a stage
# (whose output goes to the log).
exec 3>&2 4>&1

# ---------------------------------------------------------------------------------
# Preconditions, before anything is started.

if [ "$(id -u)" -ne 0 ]; then
    echo "demo: needs root (containerd, mounts and the VM helpers run as root): sudo $0 $*" >&2
    exit 1
fi
if [ ! -r /etc/os-release ]; then
    echo "demo: cannot tell the distribution (/etc/os-release missing); this demo targets Debian 12" >&2
    exit 1
fi
os_id="$(. /etc/os-release && echo "${ID:-}")"
os_version="$(. /etc/os-release && echo "${VERSION_ID:-}")"
if [ "$os_id" != debian ]; then
    echo "demo: this is '$os_id', not Debian: the demo installs Debian packages with apt (Debian 12 bookworm)" >&2
    exit 1
fi
if [ "$os_version" != 12 ]; then
    echo "demo: warning: Debian $os_version, the demo is made for Debian 12 (bookworm); trying anyway" >&2
fi
# sudo and cron drop ~/.cargo/bin from PATH.
for dir in "${CARGO_HOME:-$HOME/.cargo}/bin" /root/.cargo/bin; do
    case ":$PATH:" in *":$dir:"*) ;; *) [ -d "$dir" ] && PATH="$PATH:$dir" ;; esac
done
export PATH
if ! command -v cargo >/dev/null 2>&1; then
    echo "demo: no cargo: install Rust >= 1.89 with rustup (https://rustup.rs); Debian's cargo is too old" >&2
    exit 1
fi

LOG_DIR="$REPO/.work/demo"
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/demo-$(date +%Y%m%d-%H%M%S).log"
: >"$LOG"
TMP="$(mktemp -d /tmp/gpuvm-demo.XXXXXX)"
# The container id doubles as the VM's work dir name (/run/gpuvm/<id>/).
CID="gpuvm-demo-${TMP##*.}"
CONTAINERD_DIR="${GPUVM_CONTAINERD_DIR:-/opt/gpuvm-containerd/usr/bin}"
GUEST_DIR="$REPO/.work/guest"
SHIM_BIN="${GPUVM_DEMO_SHIM:-$REPO/target/debug/containerd-shim-gpuvm-v1}"
IMAGE="docker.io/gpuvm/busybox:demo"
VM_TIMEOUT="${GPUVM_DEMO_TIMEOUT:-300}"
CTR=("$CONTAINERD_DIR/ctr" --address "$TMP/containerd.sock" --namespace default)
QEMU_BIN="" VSOCK_BIN="" VIRTIOFSD_BIN="" HOST_FILE="" BREAKDOWN="" VM_OUTPUT="" FAIL_MESSAGE="" LEFT_BEHIND=0
CONTAINERD_PID=""
# The pod's network namespace (/run/netns/<name>), its IP and the VM's HTTP answer.
POD_NETNS="gpuvm-demo-${TMP##*.}"
POD_IP="10.99.0.2"
POD_NETNS_CREATED=0
HTTP_PORT=8080
HTTP_ANSWER=""
OPERATOR_PID=""
K8S_NS_CREATED=0
K8S_CRDS_CREATED=0
K8S_MACHINE_CREATED=0
CLEANED=0

trap 'on_exit' EXIT
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap 'on_signal HUP' HUP

# ---------------------------------------------------------------------------------
# Cleanup: only what this run started (by PID, or by $TMP / the VM's work dir in the
# command line), whatever happened before.

cleanup() {
    [ "$CLEANED" = 1 ] && return 0
    CLEANED=1
    kill_child
    k8s_cleanup
    if [ -n "$CONTAINERD_PID" ] && kill -0 "$CONTAINERD_PID" 2>/dev/null; then
        kill -TERM "$CONTAINERD_PID" 2>/dev/null || true
        wait_gone "$CONTAINERD_PID" 10 || kill -KILL "$CONTAINERD_PID" 2>/dev/null || true
        wait "$CONTAINERD_PID" 2>/dev/null || true
    fi
    # Shims (their -address names our socket) and any ctr left running.
    kill_mentioning "$TMP/"
    # What containerd does after a shim crash: `shim delete` in each bundle kills the
    # VM and its helpers and unmounts what the shim's state file names.
    local bundle ns id
    for bundle in "$TMP"/state/io.containerd.runtime.v2.task/*/*; do
        [ -d "$bundle" ] || continue
        ns="$(basename "$(dirname "$bundle")")"
        id="$(basename "$bundle")"
        echo "cleanup: shim delete for $ns/$id" >>"$LOG"
        (cd "$bundle" && timeout 30 "$SHIM_BIN" -namespace "$ns" -id "$id" -address /nonexistent \
            -bundle "$bundle" delete) >/dev/null 2>>"$LOG" || true
    done
    # The VM's helpers (qemu, virtiofsd, vhost-device-vsock name /run/gpuvm/<id>/).
    kill_mentioning "/run/gpuvm/$CID/"
    unmount_under "$TMP" "/run/gpuvm/$CID"
    # The pod netns (the shim removed its tap and tc redirects; the veth goes with it).
    if [ "$POD_NETNS_CREATED" = 1 ]; then
        ip netns delete "$POD_NETNS" 2>>"$LOG" || true
    fi
    [ -d "/run/gpuvm/$CID" ] && rm -rf "/run/gpuvm/$CID"
    local sock
    for sock in $(shim_sockets); do
        [ -S "$sock" ] && rm -f "$sock"
    done
    rm -f "$TMP/containerd.sock" "$TMP/containerd.sock.ttrpc"
    [ -f "$TMP/containerd.log" ] && cp "$TMP/containerd.log" "${LOG%.log}-containerd.log"
    if [ "$KEEP" = 1 ]; then
        echo "demo: kept $TMP (--keep)" >>"$LOG"
    else
        rm -rf "$TMP"
    fi
    return 0
}

# The shim sockets containerd would use for our container (/run/containerd/s/<hash>).
shim_sockets() {
    local addr
    for addr in "$TMP/containerd.sock" "$TMP/containerd.sock.ttrpc"; do
        printf '/run/containerd/s/%s\n' \
            "$(printf '%s' "$addr/default/$CID" | sha256sum | awk '{ print $1 }')"
    done
}

on_signal() {
    trap '' INT TERM HUP
    echo >&3
    echo "demo: interrupted ($1), cleaning up..." >&3
    cleanup
    echo "demo: cleaned up; log: $LOG" >&3
    trap - EXIT
    exit 130
}

on_exit() {
    local rc=$?
    trap '' INT TERM HUP
    [ "$rc" -ne 0 ] && [ -n "$CURRENT_STAGE" ] && echo "FAILED" >&4
    cleanup
    if [ "$rc" -ne 0 ]; then
        {
            echo
            echo "demo: stage '${CURRENT_STAGE:-?}' failed${FAIL_MESSAGE:+: $FAIL_MESSAGE}"
            echo "demo: last lines of the log:"
            grep -v 'loading plugin' "$LOG" | tail -15 | sed 's/^/  | /'
            echo "demo: everything this run started was stopped and unmounted"
            [ "$KEEP" = 1 ] && echo "demo: temp dir kept (--keep): $TMP"
            echo "demo: log: $LOG"
        } >&3
    fi
}

# ---------------------------------------------------------------------------------
# Stages.

stage_deps() {
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null \
        || ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
        note "no apt package lists: running apt-get update"
        run_logged apt-get update -q
    fi
    run_logged "$REPO/scripts/containerd-deps.sh"
    run_logged "$REPO/scripts/vm-deps.sh"
    local need=()
    dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
    command -v unshare >/dev/null 2>&1 || need+=(util-linux)
    command -v ip >/dev/null 2>&1 || need+=(iproute2)
    command -v cc >/dev/null 2>&1 || need+=(gcc libc6-dev)
    if [ "${#need[@]}" -gt 0 ]; then
        run_logged env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
    fi
    QEMU_BIN="$(command -v qemu-system-x86_64)"
    VSOCK_BIN="$(command -v vhost-device-vsock)"
    VIRTIOFSD_BIN="$(command -v virtiofsd)"
    if [ ! -x "$CONTAINERD_DIR/containerd" ] || [ ! -x "$CONTAINERD_DIR/ctr" ]; then
        fail "no containerd 2.x in $CONTAINERD_DIR after scripts/containerd-deps.sh"
    fi
}

stage_build() {
    if [ -n "${GPUVM_DEMO_SHIM:-}" ]; then
        [ -x "$SHIM_BIN" ] || fail "GPUVM_DEMO_SHIM=$SHIM_BIN is not an executable"
        note "using GPUVM_DEMO_SHIM=$SHIM_BIN, not building"
        return 0
    fi
    run_logged cargo build --manifest-path "$REPO/Cargo.toml" -p gpuvm-shim
    [ -x "$SHIM_BIN" ] || fail "cargo built no $SHIM_BIN"
}

stage_guest() {
    run_logged "$REPO/guest/build.sh" "$GUEST_DIR"
    if [ ! -f "$GUEST_DIR/vmlinux" ] || [ ! -f "$GUEST_DIR/initramfs.cpio.gz" ]; then
        fail "guest/build.sh made no vmlinux/initramfs.cpio.gz in $GUEST_DIR"
    fi
}

stage_containerd() {
    mkdir -p "$TMP/bin"
    ln -s "$SHIM_BIN" "$TMP/bin/containerd-shim-gpuvm-v1"
    cat >"$TMP/shim.toml" <<EOF
backend = "qemu"
log_level = "debug"
[guest]
kernel = "$GUEST_DIR/vmlinux"
initramfs = "$GUEST_DIR/initramfs.cpio.gz"
default_cpus = 1
default_memory = "512Mi"
# ctr run passes no Pod resources: trust the size annotations (outside Kubernetes only).
allow_size_without_pod_resources = true
[binaries]
qemu = "$QEMU_BIN"
vhost_device_vsock = "$VSOCK_BIN"
virtiofsd = "$VIRTIOFSD_BIN"
[timeouts]
# QEMU without KVM (TCG) boots in seconds, longer on a busy machine.
agent_connect_secs = 120
vm_shutdown_secs = 10
EOF
    # ctr only: no CRI plugin, so no CNI, no stream server, nothing listening.
    cat >"$TMP/containerd.toml" <<EOF
version = 3
root = "$TMP/root"
state = "$TMP/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime", "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "$TMP/containerd.sock"
[ttrpc]
  address = "$TMP/containerd.sock.ttrpc"
[debug]
  level = "debug"
[plugins."io.containerd.runtime.v2.task"]
  state_dir = "$TMP/state/io.containerd.runtime.v2.task"
EOF
    # unshare --net execs containerd in place, so $! is containerd's own pid. Its
    # PATH finds the shim in $TMP/bin.
    PATH="$TMP/bin:$PATH" GPUVM_SHIM_CONFIG="" setsid unshare --net -- \
        "$CONTAINERD_DIR/containerd" --config "$TMP/containerd.toml" \
        </dev/null >"$TMP/containerd.log" 2>&1 &
    CONTAINERD_PID=$!
    echo "containerd pid $CONTAINERD_PID, config $TMP/containerd.toml" >>"$LOG"
    local i
    for ((i = 0; i < 300; i++)); do
        [ -S "$TMP/containerd.sock" ] && "${CTR[@]}" version >>"$LOG" 2>&1 && return 0
        kill -0 "$CONTAINERD_PID" 2>/dev/null || {
            tail -20 "$TMP/containerd.log" >>"$LOG"
            fail "containerd exited at start (its log is kept as ${LOG%.log}-containerd.log)"
        }
        sleep 0.1
    done
    fail "containerd did not answer on $TMP/containerd.sock within 30 s"
}

stage_image() {
    local tarball
    tarball="$(build_busybox_image "$TMP/image" "$IMAGE")"
    run_logged "${CTR[@]}" images import "$tarball"
}

# A pod network namespace as a CNI bridge plugin would leave it: eth0 (a veth) with
# the pod IP and a default route; the veth's peer sits in containerd's private
# namespace, the "host" the demo fetches from. The shim carries eth0 into the VM.
stage_pod_net() {
    local host_ns="/proc/$CONTAINERD_PID/ns/net"
    run_logged ip netns add "$POD_NETNS"
    POD_NETNS_CREATED=1
    run_logged nsenter --net="$host_ns" ip link add gvdemo0 type veth peer name eth0 netns "$POD_NETNS"
    run_logged nsenter --net="$host_ns" ip addr add 10.99.0.1/24 dev gvdemo0
    run_logged nsenter --net="$host_ns" ip link set gvdemo0 up
    run_logged ip -n "$POD_NETNS" addr add "$POD_IP/24" dev eth0
    run_logged ip -n "$POD_NETNS" link set eth0 up
    run_logged ip -n "$POD_NETNS" route add default via 10.99.0.1
}

# The sample machine's command: what the container sees inside the VM (expanded there),
# then one HTTP answer on the pod IP (busybox nc runs the reply for one connection).
# shellcheck disable=SC2016
VM_SCRIPT='
echo "hello from inside a gpuvm micro-VM"
echo "kernel=$(uname -r)"
echo "cpu=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2- | sed "s/^ *//")"
echo "cpus=$(grep -c ^processor /proc/cpuinfo)"
echo "memory=$(awk "/^MemTotal/ { printf \"%d MiB\", \$2 / 1024 }" /proc/meminfo)"
echo "pid1=$(cat /proc/1/comm)"
echo "cmdline=$(cat /proc/cmdline)"
echo "mounted=$(cat /mnt/from-host.txt)"
if (echo overwritten >/mnt/from-host.txt) 2>/dev/null; then echo "mounted_ro=no"; else echo "mounted_ro=yes"; fi
addr="$(/bin/busybox ip -4 -o addr show eth0 | awk "{ print \$4 }")"
echo "eth0=$addr"
cat >/tmp/reply.sh <<EOF
#!/bin/sh
while read -r line && [ -n "\${line%?}" ]; do :; done
printf "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n"
echo "hello over HTTP from the micro-VM (kernel $(uname -r)) at $addr"
EOF
/bin/busybox chmod +x /tmp/reply.sh
/bin/busybox timeout 120 /bin/busybox nc -l -p 8080 -e /tmp/reply.sh
'

# GETs the VM's page at the pod IP from containerd's namespace while `ctr run` runs.
fetch_pod_http() {
    local i
    for ((i = 0; i < 240; i++)); do
        kill -0 "$CHILD_PID" 2>/dev/null || return 0
        # bash's /dev/tcp: no HTTP client needed (busybox-static's wget crashes
        # resolving addresses here).
        # shellcheck disable=SC2016
        if HTTP_ANSWER="$(nsenter --net="/proc/$CONTAINERD_PID/ns/net" timeout 5 bash -c \
            'exec 3<>"/dev/tcp/$0/$1" && printf "GET / HTTP/1.0\r\n\r\n" >&3 && cat <&3' \
            "$POD_IP" "$HTTP_PORT" 2>>"$LOG" | tr -d '\r' | sed '1,/^$/d')" && [ -n "$HTTP_ANSWER" ]; then
            printf 'HTTP answer from %s: %s\n' "$POD_IP" "$HTTP_ANSWER" >>"$LOG"
            return 0
        fi
        sleep 0.5
    done
}

stage_vm_run() {
    local rc=0
    # A host file the container reads in the VM: bound (not copied) into the VM's
    # virtio-fs share, read-only, as kubelet's files and volumes are.
    HOST_FILE="$TMP/from-host.txt"
    echo "written on the host $(hostname) at $(date -u +%H:%M:%S)" >"$HOST_FILE"
    echo "+ ctr run --rm --runtime io.containerd.gpuvm.v1 ... $IMAGE $CID" >>"$LOG"
    # The annotations size the guest, as the operator does for a GpuMachine's Pod.
    setsid timeout "$VM_TIMEOUT" "${CTR[@]}" run --rm \
        --runtime io.containerd.gpuvm.v1 --runtime-config-path "$TMP/shim.toml" \
        --annotation gpuvm.dev/cpus=1 --annotation gpuvm.dev/memory=512Mi \
        --mount "type=bind,src=$HOST_FILE,dst=/mnt/from-host.txt,options=rbind:ro" \
        --with-ns "network:/run/netns/$POD_NETNS" \
        "$IMAGE" "$CID" /bin/sh -c "$VM_SCRIPT" \
        </dev/null >"$TMP/vm-output.txt" 2>>"$LOG" &
    CHILD_PID=$!
    fetch_pod_http
    wait "$CHILD_PID" || rc=$?
    CHILD_PID=""
    VM_OUTPUT="$(cat "$TMP/vm-output.txt")"
    printf '%s\n' "$VM_OUTPUT" >>"$LOG"
    if [ "$rc" = 124 ]; then
        fail "the VM run took longer than ${VM_TIMEOUT}s (GPUVM_DEMO_TIMEOUT)"
    elif [ "$rc" -ne 0 ]; then
        grep -E 'level=(error|warning)' "$TMP/containerd.log" | tail -10 >>"$LOG" || true
        fail "ctr run failed (exit $rc)"
    fi
    grep -q 'hello from inside a gpuvm micro-VM' "$TMP/vm-output.txt" \
        || fail "the container ran but printed no greeting"
    [ "$(vm_fact mounted)" = "$(cat "$HOST_FILE")" ] \
        || fail "the container did not read the host file mounted at /mnt/from-host.txt"
    [ "$(vm_fact mounted_ro)" = yes ] || fail "the read-only host file was writable in the VM"
    case "$HTTP_ANSWER" in
        *"hello over HTTP"*) ;;
        *) fail "the VM did not answer HTTP on the pod IP $POD_IP:$HTTP_PORT" ;;
    esac
    # The shim logs its start breakdown (shim / vmm / boot / agent / container).
    BREAKDOWN="$(grep -m1 'sandbox start timings' "$TMP/containerd.log" || true)"
}

# Stops containerd and everything it started; counted as the cleanup stage.
stage_cleanup() {
    cleanup
}

# ---------------------------------------------------------------------------------

main() {
    DEMO_START_US="$(now_us)"
    banner "gpuvm demo: a container in its own micro-VM, through a private containerd"
    echo "log: $LOG"
    echo "temp dir: $TMP"
    if [ ! -x "$CONTAINERD_DIR/containerd" ] || [ ! -x "$SHIM_BIN" ] || [ ! -f "$GUEST_DIR/vmlinux" ]; then
        echo "first run: installing and building takes several minutes (follow along: tail -f $LOG)"
    fi
    echo
    run_stage deps "containerd 2.x, QEMU, vhost-device-vsock, virtiofsd" stage_deps
    run_stage build "cargo build -p gpuvm-shim (debug)" stage_build
    run_stage guest "guest/build.sh: kernel + initramfs with the agent" stage_guest
    run_stage containerd "private containerd in the temp dir, unshare --net" stage_containerd
    run_stage image "busybox OCI image, built by hand, imported" stage_image
    run_stage "pod net" "pod netns + veth ($POD_IP), peer in containerd's netns" stage_pod_net
    run_stage "vm run" "ctr run --runtime io.containerd.gpuvm.v1 (QEMU VM)" stage_vm_run
    k8s_stage
    run_stage cleanup "stop containerd, shim, VM; unmount; remove temp dir" stage_cleanup
    print_summary
    echo
    check_nothing_left
    echo "log: $LOG"
    [ "$LEFT_BEHIND" = 0 ]
}

main
