#!/bin/bash
# gpuvm-install.sh install|uninstall — puts the gpuvm runtime on a node, or takes it off.
#
# Runs in the installer DaemonSet's init container (install) and in the pre-delete cleanup
# DaemonSet (uninstall), from the node image. The host's folders are mounted under
# $GPUVM_HOST_ROOT (/host) at their own paths, and host commands (containerd, systemctl)
# run through $GPUVM_HOST_EXEC (nsenter into PID 1's namespaces; needs hostPID).
#
# install:
#   1. copy the shim, helper binaries, guest kernel and both guest images (the small
#      share/initramfs.img for Pods without GPUs, share/initramfs-gpu.img with the NVIDIA
#      driver for Pods with GPUs) from $GPUVM_DIST into $GPUVM_HOST_DIR (bin/, share/),
#      each only when it changed, by an atomic rename (a running shim or VMM keeps its
#      old inode), and record them in .installed; a missing guest file is named in a
#      warning (the shim refuses the Pods that need it, naming its config key);
#   2. write $GPUVM_SHIM_CONFIG_DIR/shim.toml (the shim reads it at each sandbox start:
#      no restart needed);
#   3. write the containerd drop-in; only when it changed: make sure containerd imports
#      it (adding an `imports` line to config.toml if allowed), check the merged config
#      with `containerd config dump` (a broken config is rolled back, never restarted
#      into), and restart containerd.
# uninstall: refuse while VMs run (unless GPUVM_CLEANUP_FORCE=true), then remove the
#   drop-in, the import line, the shim config and every recorded file, and restart
#   containerd when the drop-in was there. The shim's runtime folders under /run/gpuvm
#   (device locks, reset-failure and GPU check records) go only when nothing is lost:
#   released lock files when no VM runs, the record folders only when empty.
# Both are idempotent: running either twice changes nothing the second time.
set -euo pipefail

mode="${1:-}"
HOST_ROOT="${GPUVM_HOST_ROOT:-/host}"
HOST_DIR="${GPUVM_HOST_DIR:-/opt/gpuvm}"
SHIM_CONFIG_DIR="${GPUVM_SHIM_CONFIG_DIR:-/etc/gpuvm}"
CTRD_DIR="${GPUVM_CONTAINERD_CONFIG_DIR:-/etc/containerd}"
CTRD_FILE="${GPUVM_CONTAINERD_CONFIG_FILE:-config.toml}"
CTRD_DROP_IN="${GPUVM_CONTAINERD_DROP_IN:-conf.d/gpuvm.toml}"
ADD_IMPORT="${GPUVM_CONTAINERD_ADD_IMPORT:-true}"
RESTART="${GPUVM_CONTAINERD_RESTART:-true}"
UNIT="${GPUVM_CONTAINERD_UNIT:-containerd}"
FORCE="${GPUVM_CLEANUP_FORCE:-false}"
# The shim's folders (shim.toml [host]; the chart passes the same strings).
RUN_DIR="${GPUVM_RUN_DIR:-/run/gpuvm}"
LOCK_DIR="${GPUVM_LOCK_DIR:-$RUN_DIR/devices}"
HEALTH_DIR="${GPUVM_HEALTH_DIR:-$RUN_DIR/health}"
GPU_CHECK_DIR="${GPUVM_GPU_CHECK_DIR:-$RUN_DIR/gpu-check}"
DIST="${GPUVM_DIST:-/opt/gpuvm-dist}"
FILES="${GPUVM_INSTALLER_FILES:-/etc/gpuvm-installer}"
# Word-split on purpose: a command prefix.
read -r -a HOST_EXEC <<<"${GPUVM_HOST_EXEC:-nsenter --target 1 --mount --uts --ipc --net --pid --}"

# The marker that identifies the line this installer adds to config.toml.
IMPORT_MARKER="# added by the gpuvm installer"
drop_in_host="$CTRD_DIR/$CTRD_DROP_IN"
node="${NODE_NAME:-$(hostname)}"

log() { echo "gpuvm-install[$node]: $*" >&2; }
die() { log "error: $*"; exit 1; }
host() { "${HOST_EXEC[@]}" "$@"; }

# Writes $2 to host path $1 (seen under HOST_ROOT) when its content differs; says
# "changed" on stdout when it wrote.
put_file() {
    local dst="$HOST_ROOT$1" src="$2" mode="${3:-0644}"
    if [[ -f "$dst" ]] && cmp -s "$src" "$dst"; then
        return 0
    fi
    mkdir -p "$(dirname "$dst")"
    local tmp
    tmp="$(dirname "$dst")/.$(basename "$dst").gpuvm-tmp"
    cp "$src" "$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$dst"
    echo changed
}

containerd_major() {
    local v
    v="$(host containerd --version 2>/dev/null)" || die "cannot run containerd on the host (is it installed, and is hostPID on?)"
    # "containerd github.com/containerd/containerd/v2 v2.1.4 <sha>" -> 2
    v="$(grep -oE ' v?[0-9]+\.[0-9]+\.[0-9]+' <<<"$v" | head -n1 | tr -d ' v')"
    echo "${v%%.*}"
}

# True when containerd's merged config has the gpuvm runtime.
containerd_sees_runtime() {
    host containerd --config "$CTRD_DIR/$CTRD_FILE" config dump 2>/dev/null | grep -q 'io.containerd.gpuvm.v1'
}

restart_containerd() {
    if [[ "$RESTART" != "true" ]]; then
        log "containerd config changed; restart it yourself (installer.containerd.restart=false)"
        return 0
    fi
    log "restarting $UNIT"
    host systemctl restart "$UNIT" || die "systemctl restart $UNIT failed"
    local _
    for _ in $(seq 1 30); do
        if host systemctl is-active --quiet "$UNIT"; then
            log "$UNIT is active again"
            return 0
        fi
        sleep 1
    done
    die "$UNIT did not come back within 30 s after the restart"
}

# Adds an `imports` line naming the drop-in to config.toml; on refusal says why and
# returns 1 (the caller rolls the drop-in back).
add_import_line() {
    local cfg="$HOST_ROOT$CTRD_DIR/$CTRD_FILE"
    if [[ ! -f "$cfg" ]]; then
        log "error: containerd does not load $drop_in_host and $CTRD_DIR/$CTRD_FILE does not exist"
        return 1
    fi
    if grep -qF "$IMPORT_MARKER" "$cfg"; then
        return 0
    fi
    if grep -qE '^[[:space:]]*imports[[:space:]]*=' "$cfg"; then
        log "error: $CTRD_DIR/$CTRD_FILE has its own 'imports' that does not cover $drop_in_host: add \"$drop_in_host\" to it"
        return 1
    fi
    if [[ "$ADD_IMPORT" != "true" ]]; then
        log "error: containerd does not load $drop_in_host: add imports = [\"$drop_in_host\"] to $CTRD_DIR/$CTRD_FILE, or set installer.containerd.addImport=true"
        return 1
    fi
    # A top-level key must come before the first table: put it right after `version`
    # when there is one, else first.
    local line="imports = [\"$drop_in_host\"] $IMPORT_MARKER"
    local tmp="$cfg.gpuvm-tmp"
    if grep -qE '^version[[:space:]]*=' "$cfg"; then
        awk -v l="$line" '{print} !done && /^version[[:space:]]*=/ {print l; done=1}' "$cfg" >"$tmp"
    else
        { echo "$line"; cat "$cfg"; } >"$tmp"
    fi
    chmod --reference="$cfg" "$tmp"
    mv -f "$tmp" "$cfg"
    log "added an imports line for $drop_in_host to $CTRD_DIR/$CTRD_FILE"
}

remove_import_line() {
    local cfg="$HOST_ROOT$CTRD_DIR/$CTRD_FILE"
    [[ -f "$cfg" ]] && grep -qF "$IMPORT_MARKER" "$cfg" || return 0
    local tmp="$cfg.gpuvm-tmp"
    grep -vF "$IMPORT_MARKER" "$cfg" >"$tmp" || true
    chmod --reference="$cfg" "$tmp"
    mv -f "$tmp" "$cfg"
    log "removed the gpuvm imports line from $CTRD_DIR/$CTRD_FILE"
    echo changed
}

# The guest files the shim config names (templates/installer-configmap.yaml): each one
# missing from the node image is named, with the Pods that cannot start without it.
warn_missing_guest_files() {
    local rel who
    for rel in share/vmlinux share/initramfs.img share/initramfs-gpu.img; do
        [[ -f "$DIST/$rel" ]] && continue
        case "$rel" in
            share/initramfs-gpu.img) who="Pods with GPUs (guest.gpu_initramfs; guest/build.sh --gpu builds it)" ;;
            share/initramfs.img) who="Pods without GPUs (guest.initramfs)" ;;
            *) who="any gpuvm Pod (guest.kernel)" ;;
        esac
        log "warning: the node image has no $rel: $who will not start on this node"
    done
}

install() {
    local major
    major="$(containerd_major)"
    [[ -n "$major" && "$major" -ge 2 ]] || die "containerd ${major:-?}.x is too old: the gpuvm shim needs containerd >= 2.0 (task API v3)"

    # 1. binaries and the guest image
    local manifest="$HOST_ROOT$HOST_DIR/.installed" list rel
    list="$(mktemp)"
    while IFS= read -r -d '' f; do
        rel="${f#"$DIST"/}"
        case "$rel" in
            bin/*) mode=0755 ;;
            *) mode=0644 ;;
        esac
        if [[ "$(put_file "$HOST_DIR/$rel" "$f" "$mode")" == changed ]]; then
            log "installed $HOST_DIR/$rel"
        fi
        echo "$HOST_DIR/$rel" >>"$list"
    done < <(find "$DIST" -type f -print0 | sort -z)
    [[ -s "$list" ]] || die "$DIST is empty: the node image carries no gpuvm runtime"
    warn_missing_guest_files
    put_file "$HOST_DIR/.installed" "$list" 0644 >/dev/null
    rm -f "$list"
    [[ -f "$manifest" ]] || die "could not record $HOST_DIR/.installed"

    # 2. the shim's config
    if [[ "$(put_file "$SHIM_CONFIG_DIR/shim.toml" "$FILES/shim.toml" 0644)" == changed ]]; then
        log "wrote $SHIM_CONFIG_DIR/shim.toml"
    fi

    # 3. the containerd drop-in
    local dst="$HOST_ROOT$drop_in_host" backup=""
    if [[ -f "$dst" ]] && cmp -s "$FILES/containerd-gpuvm.toml" "$dst" && containerd_sees_runtime; then
        log "containerd already has the gpuvm runtime: no restart"
        log "done"
        return 0
    fi
    if [[ -f "$dst" ]]; then
        backup="$(mktemp)"
        cp "$dst" "$backup"
    fi
    put_file "$drop_in_host" "$FILES/containerd-gpuvm.toml" 0644 >/dev/null
    # Never leave a drop-in containerd does not load, nor restart containerd into a
    # config that lacks the runtime (or does not parse): roll back and fail.
    rollback() {
        if [[ -n "$backup" ]]; then cp "$backup" "$dst"; else rm -f "$dst"; fi
        rm -f "$backup"
        remove_import_line >/dev/null
        die "$1; rolled $drop_in_host back"
    }
    if ! containerd_sees_runtime; then
        add_import_line || rollback "containerd does not load the drop-in"
    fi
    if ! containerd_sees_runtime; then
        rollback "containerd's merged config does not show the gpuvm runtime (see: containerd config dump)"
    fi
    rm -f "$backup"
    log "wrote $drop_in_host"
    restart_containerd
    log "done"
}

# Removes the shim's runtime folders under RUN_DIR, never losing a record:
# - the device lock folder: its <bdf>.lock files are flock(2) locks, free (and empty)
#   once their shim is gone; removed only when no VM runs (with VMs left by
#   cleanup.force, deleting a held lock file would let a second sandbox take the device),
#   then the folder when empty;
# - the reset-failure records and the GPU check records: the folders only when empty.
#   A health record marks a device whose reset failed: deleting it would silently put a
#   broken GPU back into service, so it stays (and is named in the log) until an
#   administrator repairs the device and removes it, or the node reboots (/run is a
#   tmpfs). GPU check records are left to the node agent, which removes stale ones.
remove_runtime_dirs() {
    local vms_left="$1" d f
    d="$HOST_ROOT$LOCK_DIR"
    if [[ -d "$d" ]]; then
        if [[ "$vms_left" == 0 ]]; then
            for f in "$d"/*.lock; do
                [[ -f "$f" ]] && rm -f "$f"
            done
        fi
        if rmdir "$d" 2>/dev/null; then
            log "removed $LOCK_DIR"
        else
            log "kept $LOCK_DIR: not empty ($vms_left VM(s) still run, their device locks stay)"
        fi
    fi
    d="$HOST_ROOT$GPU_CHECK_DIR"
    if [[ -d "$d" ]]; then
        if rmdir "$d" 2>/dev/null; then
            log "removed $GPU_CHECK_DIR"
        else
            log "kept $GPU_CHECK_DIR: it still holds GPU check records"
        fi
    fi
    d="$HOST_ROOT$HEALTH_DIR"
    if [[ -d "$d" ]]; then
        if rmdir "$d" 2>/dev/null; then
            log "removed $HEALTH_DIR"
        else
            local records=()
            for f in "$d"/*; do
                [[ -e "$f" ]] && records+=("$(basename "$f")")
            done
            log "warning: kept $HEALTH_DIR: reset-failure records of ${records[*]:-?} (a device failed its reset; repair it, then remove the record, or reboot)"
        fi
    fi
}

uninstall() {
    # VMs still running? Each has a work dir $RUN_DIR/<sandbox-id>/; the shim's own
    # folders there (locks, health and GPU check records) are not VMs.
    local live=()
    local d name
    for d in "$HOST_ROOT$RUN_DIR"/*/; do
        [[ -d "$d" ]] || continue
        name="$(basename "$d")"
        case "$RUN_DIR/$name" in
            "$LOCK_DIR" | "$HEALTH_DIR" | "$GPU_CHECK_DIR") continue ;;
        esac
        live+=("$name")
    done
    if ((${#live[@]} > 0)); then
        if [[ "$FORCE" != "true" ]]; then
            die "${#live[@]} gpuvm VM(s) still run here (${live[*]}): delete every GpuMachine first, or set cleanup.force=true"
        fi
        log "warning: removing the runtime while ${#live[@]} VM(s) run (cleanup.force=true)"
    fi

    local changed=""
    if [[ -f "$HOST_ROOT$drop_in_host" ]]; then
        rm -f "$HOST_ROOT$drop_in_host"
        log "removed $drop_in_host"
        changed=1
    fi
    if [[ "$(remove_import_line)" == changed ]]; then changed=1; fi

    local shim_cfg="$HOST_ROOT$SHIM_CONFIG_DIR/shim.toml"
    if [[ -f "$shim_cfg" ]] && grep -q 'Written by the gpuvm installer' "$shim_cfg"; then
        rm -f "$shim_cfg"
        log "removed $SHIM_CONFIG_DIR/shim.toml"
    fi
    rmdir "$HOST_ROOT$SHIM_CONFIG_DIR" 2>/dev/null || true

    local manifest="$HOST_ROOT$HOST_DIR/.installed" f
    if [[ -f "$manifest" ]]; then
        while IFS= read -r f; do
            [[ -n "$f" && "$f" == "$HOST_DIR"/* ]] || continue
            rm -f "$HOST_ROOT$f"
        done <"$manifest"
        rm -f "$manifest"
        # Remove the folders we made, deepest first, only when empty.
        find "$HOST_ROOT$HOST_DIR" -depth -type d -empty -delete 2>/dev/null || true
        log "removed the files under $HOST_DIR"
    fi

    remove_runtime_dirs "${#live[@]}"

    if [[ -n "$changed" ]]; then
        restart_containerd
    fi
    log "done"
}

case "$mode" in
    install) install ;;
    uninstall) uninstall ;;
    *)
        echo "usage: $0 install|uninstall" >&2
        exit 2
        ;;
esac
