# shellcheck shell=bash
# Helpers for scripts/demo.sh (sourced; uses its globals LOG, TMP, CID, KEEP and fd 3,
# the terminal's stderr). Not a general library: only the demo uses it.
# Some globals set here are read only by demo.sh:
# shellcheck disable=SC2034

# Stage bookkeeping, filled by run_stage, printed by print_summary.
STAGE_NAMES=()
STAGE_SECS=()
STAGE_STATUS=()
CURRENT_STAGE=""
CHILD_PID=""
DEMO_START_US=""

# Microseconds since the epoch ($EPOCHREALTIME without its decimal point).
now_us() {
    local t="$EPOCHREALTIME"
    echo "${t//[.,]/}"
}

# "12.3" seconds between two now_us values.
seconds_between() {
    local us=$(($2 - $1))
    printf '%d.%d' $((us / 1000000)) $(((us % 1000000) / 100000))
}

banner() {
    echo "== $* =="
}

# A line in the log only (stages' output goes there).
note() {
    echo "demo: $*" >>"$LOG"
}

# Ends the demo with a message on the terminal; the EXIT trap cleans up.
fail() {
    echo "demo: $*" >>"$LOG"
    FAIL_MESSAGE="$*"
    exit 1
}

# Runs a command in its own session (so Ctrl-C reaches only the demo, which then stops
# the command's whole process group by its id), output to the log.
run_logged() {
    local rc=0
    echo "+ $*" >>"$LOG"
    setsid "$@" </dev/null >>"$LOG" 2>&1 &
    CHILD_PID=$!
    wait "$CHILD_PID" || rc=$?
    CHILD_PID=""
    [ "$rc" -eq 0 ] || fail "'$(basename "$1") ${*:2}' failed (exit $rc)"
}

# Stops the command run_logged (or the VM run) is waiting on, with its process group.
kill_child() {
    [ -n "$CHILD_PID" ] || return 0
    kill -TERM -- "-$CHILD_PID" 2>/dev/null || kill -TERM "$CHILD_PID" 2>/dev/null || true
    wait_gone "$CHILD_PID" 5 || kill -KILL -- "-$CHILD_PID" 2>/dev/null || true
    wait "$CHILD_PID" 2>/dev/null || true
    CHILD_PID=""
}

# Waits up to $2 seconds for pid $1 to exit; fails if it is still there.
wait_gone() {
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        kill -0 "$1" 2>/dev/null || return 0
        # A zombie child counts as gone.
        [ "$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null)" = Z ] && return 0
        sleep 0.1
    done
    ! kill -0 "$1" 2>/dev/null
}

# Pids (not this shell's) whose command line contains $1.
pids_mentioning() {
    local dir pid cmdline
    for dir in /proc/[0-9]*; do
        pid="${dir#/proc/}"
        [ "$pid" = "$$" ] && continue
        [ "$pid" = "$BASHPID" ] && continue
        cmdline="$(tr '\0' ' ' 2>/dev/null <"$dir/cmdline")" || continue
        case "$cmdline" in *"$1"*) echo "$pid" ;; esac
    done
}

# SIGTERM, then SIGKILL, to every process whose command line contains $1.
kill_mentioning() {
    local pids pid
    pids="$(pids_mentioning "$1")"
    [ -n "$pids" ] || return 0
    for pid in $pids; do
        echo "cleanup: stopping $pid: $(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline")" >>"$LOG"
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in $pids; do
        wait_gone "$pid" 5 || kill -KILL "$pid" 2>/dev/null || true
    done
}

# Mount points at or under any of the given dirs, deepest first.
mounts_under() {
    local dir
    for dir in "$@"; do
        # Field 5 of mountinfo is the mount point (octal escapes: paths here have none).
        awk -v d="$dir" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo
    done | awk '{ print length($0), $0 }' | sort -rn | cut -d' ' -f2-
}

unmount_under() {
    local m
    for m in $(mounts_under "$@"); do
        echo "cleanup: umount $m" >>"$LOG"
        umount "$m" 2>>"$LOG" || umount -l "$m" 2>>"$LOG" || true
    done
}

# Runs stage function $3 as stage $1, described by $2: one line on the terminal, its
# output in the log, its time recorded.
run_stage() {
    local name="$1" desc="$2" fn="$3" start
    CURRENT_STAGE="$name"
    printf '%-11s %-56s ' "$name" "$desc"
    echo "=== stage $name: $desc" >>"$LOG"
    start="$(now_us)"
    "$fn" >>"$LOG" 2>&1
    record_stage "$name" "$(seconds_between "$start" "$(now_us)")" ok
    printf 'ok %5ss\n' "${STAGE_SECS[-1]}"
    CURRENT_STAGE=""
}

record_stage() {
    STAGE_NAMES+=("$1")
    STAGE_SECS+=("$2")
    STAGE_STATUS+=("$3")
}

# A one-layer busybox OCI image (every busybox applet linked) as an oci-layout tarball
# named $2; prints the tarball's path. Built by hand: there is no image registry.
build_busybox_image() {
    local dir="$1" name="$2" rootfs applet layer_digest config_digest manifest_digest
    rootfs="$dir/rootfs"
    mkdir -p "$rootfs/bin" "$rootfs/proc" "$rootfs/sys" "$rootfs/dev" "$rootfs/tmp" \
        "$rootfs/etc" "$rootfs/run" "$dir/oci/blobs/sha256"
    cp /bin/busybox "$rootfs/bin/busybox"
    for applet in $(/bin/busybox --list); do
        [ "$applet" = busybox ] || ln -s busybox "$rootfs/bin/$applet"
    done
    tar --owner=0 --group=0 --numeric-owner --sort=name --mtime=@0 -C "$rootfs" -cf "$dir/layer.tar" .
    layer_digest="$(oci_blob "$dir" "$dir/layer.tar")"
    printf '{"architecture":"amd64","os":"linux","config":{"Cmd":["/bin/sh"],"Env":["PATH=/bin"]},"rootfs":{"type":"layers","diff_ids":["%s"]}}' \
        "${layer_digest% *}" >"$dir/config.json"
    config_digest="$(oci_blob "$dir" "$dir/config.json")"
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"%s","size":%s}]}' \
        "${config_digest% *}" "${config_digest#* }" "${layer_digest% *}" "${layer_digest#* }" >"$dir/manifest.json"
    manifest_digest="$(oci_blob "$dir" "$dir/manifest.json")"
    printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":%s,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"demo"}}]}' \
        "${manifest_digest% *}" "${manifest_digest#* }" "$name" >"$dir/oci/index.json"
    echo '{"imageLayoutVersion":"1.0.0"}' >"$dir/oci/oci-layout"
    tar -C "$dir/oci" -cf "$dir/image.tar" .
    echo "$dir/image.tar"
}

# Copies file $2 into the layout under $1 as a blob; prints "sha256:<hex> <size>".
oci_blob() {
    local hex size
    hex="$(sha256sum "$2" | awk '{ print $1 }')"
    size="$(stat -c %s "$2")"
    cp "$2" "$1/oci/blobs/sha256/$hex"
    echo "sha256:$hex $size"
}

# After cleanup: no process, mount, socket or dir of this run may remain.
check_nothing_left() {
    local found=() pid m sock
    for pid in $(pids_mentioning "$TMP/") $(pids_mentioning "/run/gpuvm/$CID/"); do
        found+=("process $pid: $(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline")")
    done
    if [ -n "$CONTAINERD_PID" ] && kill -0 "$CONTAINERD_PID" 2>/dev/null; then
        found+=("containerd $CONTAINERD_PID")
    fi
    for m in $(mounts_under "$TMP" "/run/gpuvm/$CID"); do
        found+=("mount $m")
    done
    for sock in $(shim_sockets); do
        [ -e "$sock" ] && found+=("shim socket $sock")
    done
    [ -e "/run/gpuvm/$CID" ] && found+=("VM work dir /run/gpuvm/$CID")
    [ -e "/run/netns/$POD_NETNS" ] && found+=("pod network namespace /run/netns/$POD_NETNS")
    [ "$KEEP" = 1 ] || { [ -e "$TMP" ] && found+=("temp dir $TMP"); }
    if [ "${#found[@]}" -gt 0 ]; then
        echo "left behind (a bug: please report it with $LOG):"
        printf '  %s\n' "${found[@]}"
        LEFT_BEHIND=1
        CURRENT_STAGE="leftover check"
        FAIL_MESSAGE="the run left ${#found[@]} thing(s) behind (listed above)"
    else
        echo "nothing left behind: no process, mount, socket, VM dir or pod netns of this run remains (ps, /proc/self/mountinfo checked)"
        LEFT_BEHIND=0
    fi
}

# "key=value" line $1 of the VM's output.
vm_fact() {
    printf '%s\n' "$VM_OUTPUT" | sed -n "s/^$1=//p" | head -1
}

# "shim 1 / vmm 252 / boot 3180 / agent 33 / container 117 ms" from the shim's
# "sandbox start timings" log line.
breakdown_text() {
    local part value out=""
    for part in shim vmm boot agent container; do
        value="$(printf '%s' "$BREAKDOWN" | grep -o "${part}_ms=[0-9]*" | head -1 | cut -d= -f2)"
        [ -n "$value" ] && out+="${out:+ / }$part $value"
    done
    echo "${out:-?} ms"
}

print_summary() {
    local host_cpu host_mem i total
    echo
    echo "What the container printed inside the VM:"
    echo "  \$ ctr run --rm --runtime io.containerd.gpuvm.v1 --annotation gpuvm.dev/cpus=1 \\"
    echo "      --annotation gpuvm.dev/memory=512Mi \\"
    echo "      --mount type=bind,src=$HOST_FILE,dst=/mnt/from-host.txt,options=rbind:ro \\"
    echo "      --with-ns network:/run/netns/$POD_NETNS \\"
    echo "      $IMAGE $CID /bin/sh -c '<uname -r; /proc/...; cat /mnt/from-host.txt>'"
    printf '%s\n' "$VM_OUTPUT" | grep -v '=' | sed 's/^/  | /'
    echo
    host_cpu="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    host_mem="$(awk '/^MemTotal/ { printf "%d MiB", $2 / 1024 }' /proc/meminfo)"
    printf '  %-8s %-36s %s\n' "" "host" "guest (micro-VM)"
    printf '  %-8s %-36s %s\n' "kernel" "$(uname -r)" "$(vm_fact kernel)"
    printf '  %-8s %-36s %s\n' "cpu" "${host_cpu:0:36}" "$(vm_fact cpu)"
    printf '  %-8s %-36s %s\n' "cpus" "$(nproc)" "$(vm_fact cpus)"
    printf '  %-8s %-36s %s\n' "memory" "$host_mem" "$(vm_fact memory)"
    printf '  %-8s %-36s %s\n' "PID 1" "$(cat /proc/1/comm)" "$(vm_fact pid1) (the container's own pid namespace; the agent is the guest's init)"
    echo "  guest kernel command line: $(vm_fact cmdline)"
    printf '  %-8s %-36s %s\n' "file" "$HOST_FILE" "\"$(vm_fact mounted)\" (bound read-only: ro=$(vm_fact mounted_ro))"
    echo "  pod network: the VM's eth0 is $(vm_fact eth0) (the pod namespace's veth, through a tap)"
    echo "  HTTP from the host to $POD_IP:$HTTP_PORT: $HTTP_ANSWER"
    if [ -n "$BREAKDOWN" ]; then
        echo "  VM start, from the shim's log: $(breakdown_text)"
    fi
    print_k8s_report
    echo
    echo "Stage timings (seconds):"
    for i in "${!STAGE_NAMES[@]}"; do
        printf '  %-12s %8s  %s\n' "${STAGE_NAMES[$i]}" "${STAGE_SECS[$i]}" "${STAGE_STATUS[$i]}"
    done
    total="$(seconds_between "$DEMO_START_US" "$(now_us)")"
    printf '  %-12s %8s\n' "total" "$total"
    [ "$KEEP" = 1 ] && echo "temp dir kept (--keep): $TMP"
    return 0
}
