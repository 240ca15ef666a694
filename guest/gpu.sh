# shellcheck shell=bash
# shellcheck disable=SC2154,SC2034 # here, repo, cache, kernel_* come from guest/build.sh, which reads what this sets
# The GPU flavour's steps of guest/build.sh (sourced by it; uses its $here, $repo,
# $cache, $kernel_deb, $kernel_pkg):
#
#   gpu_fetch            NVIDIA's driver 550.163.01 from Debian trixie (contrib,
#                        non-free, non-free-firmware) through a private apt config, and
#                        bookworm's libc6, libc-bin and libgcc-s1, into the cache
#   gpu_modules          NVIDIA's open kernel modules for the packed kernel release,
#                        built once against bookworm's linux-headers and cached in
#                        $cache/nvidia-<driver>-<release>/
#   gpu_check_bin        the agent's gpuvm-gpu-check helper
#   gpu_probe OUT        compiles guest/probe/dlopen-probe.c
#
# Environment:
#   GPUVM_NVIDIA_SUITE     suite to take the driver from (default trixie)
#   GPUVM_GPU_CHECK_BIN    a gpuvm-gpu-check binary to pack instead of building one

# The driver version is pinned: the modules, firmware and libraries must match.
NVIDIA_VERSION=550.163.01
NVIDIA_PACKAGES=(nvidia-open-kernel-source libcuda1 libnvidia-ml1 libnvidia-ptxjitcompiler1
    firmware-nvidia-gsp nvidia-smi)
# Built from nvidia-open-kernel-source; nvidia-drm and nvidia-peermem are not needed.
NVIDIA_MODULES=(nvidia nvidia-uvm nvidia-modeset)
NVIDIA_MAKE_FLAGS=(CC=gcc-12 "NV_EXCLUDE_BUILD_MODULES=nvidia-drm nvidia-peermem" modules)

# shellcheck source=scripts/lib/apt-private.sh
. "$repo/scripts/lib/apt-private.sh"

gpu_die() {
    echo "guest/build.sh --gpu: $*" >&2
    exit 1
}

# The cached .deb of PACKAGE whose version matches the pattern VERSION, if any.
gpu_cached_deb() {
    local pkg="$1" pattern="$2" deb version
    for deb in "$cache/${pkg}_"*.deb; do
        [ -f "$deb" ] || continue
        version="$(dpkg-deb -f "$deb" Version)"
        # shellcheck disable=SC2254 # a version pattern
        case "$version" in $pattern) echo "$deb" ;; esac
    done | sort -V | tail -1
}

# Checks that DEB is PACKAGE at a version matching PATTERN, for amd64 or all.
gpu_verify_deb() {
    local deb="$1" pkg="$2" pattern="$3" name version arch
    name="$(dpkg-deb -f "$deb" Package)"
    version="$(dpkg-deb -f "$deb" Version)"
    arch="$(dpkg-deb -f "$deb" Architecture)"
    # shellcheck disable=SC2254
    case "$version" in $pattern) ;; *) gpu_die "$deb is $name $version, want $pkg $pattern" ;; esac
    [ "$name" = "$pkg" ] || gpu_die "$deb is $name, want $pkg"
    case "$arch" in amd64 | all) ;; *) gpu_die "$deb is for $arch" ;; esac
}

# Fetches PACKAGE at PATTERN from the system's (bookworm) sources unless cached;
# prints the .deb.
gpu_fetch_bookworm() {
    local pkg="$1" version="$2" deb
    deb="$(gpu_cached_deb "$pkg" "$version")"
    if [ -z "$deb" ]; then
        (cd "$cache" && apt-get -o APT::Sandbox::User=root download -q "$pkg=$version" >&2) || gpu_die "cannot download $pkg=$version"
        deb="$(gpu_cached_deb "$pkg" "$version")"
    fi
    gpu_verify_deb "$deb" "$pkg" "$version"
    echo "$deb"
}

# Sets nvidia_debs (the driver's .debs, in NVIDIA_PACKAGES order), libc6_deb,
# libc_bin_deb and libgcc_deb.
gpu_fetch() {
    local pkg missing=() deb libc_version
    for pkg in "${NVIDIA_PACKAGES[@]}"; do
        [ -n "$(gpu_cached_deb "$pkg" "$NVIDIA_VERSION-*")" ] || missing+=("$pkg=$NVIDIA_VERSION-*")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        apt_private_download_from "${GPUVM_NVIDIA_SUITE:-trixie}" "contrib non-free non-free-firmware" \
            "$cache" "${missing[@]}" || gpu_die "cannot download ${missing[*]}"
    fi
    nvidia_debs=()
    for pkg in "${NVIDIA_PACKAGES[@]}"; do
        deb="$(gpu_cached_deb "$pkg" "$NVIDIA_VERSION-*")"
        [ -n "$deb" ] || gpu_die "no $pkg $NVIDIA_VERSION-* in $cache"
        gpu_verify_deb "$deb" "$pkg" "$NVIDIA_VERSION-*"
        nvidia_debs+=("$deb")
    done
    # glibc for the dynamic programs: the newest bookworm libc6 cached, else the
    # candidate; libc-bin (ldconfig) of the same version.
    libc6_deb="$(gpu_cached_deb libc6 '*')"
    if [ -z "$libc6_deb" ]; then
        libc_version="$(apt-cache policy libc6 | awk '/Candidate:/ { print $2 }')"
        if [ -z "$libc_version" ] || [ "$libc_version" = "(none)" ]; then
            gpu_die "apt knows no libc6"
        fi
        libc6_deb="$(gpu_fetch_bookworm libc6 "$libc_version")"
    fi
    libc_version="$(dpkg-deb -f "$libc6_deb" Version)"
    libc_bin_deb="$(gpu_fetch_bookworm libc-bin "$libc_version")"
    libgcc_deb="$(gpu_cached_deb libgcc-s1 '*')"
    if [ -z "$libgcc_deb" ]; then
        libgcc_deb="$(gpu_fetch_bookworm libgcc-s1 "$(apt-cache policy libgcc-s1 | awk '/Candidate:/ { print $2 }')")"
    fi
}

# Unpacks the kernel's headers into DIR (not installed): linux-headers-<release>,
# its -common and linux-kbuild, all of the kernel package's version. Prints the
# package names and versions.
gpu_unpack_headers() {
    local dir="$1" release="$2" version="$3" abi pkg deb kbuild dangling
    abi="${release%-amd64}"
    kbuild="linux-kbuild-$(echo "$release" | cut -d. -f1-2)"
    for pkg in "linux-headers-$release" "linux-headers-$abi-common" "$kbuild"; do
        deb="$(gpu_fetch_bookworm "$pkg" "$version")"
        dpkg -x "$deb" "$dir"
        basename "$deb"
    done
    # The flavour's Makefile includes the common tree by absolute path.
    sed -i "s#^include /usr/src/#include $dir/usr/src/#" "$dir/usr/src/linux-headers-$release/Makefile"
    # Every relative link (scripts, tools -> linux-kbuild) must resolve in DIR;
    # lib/modules/*/{build,source} are absolute and unused here.
    dangling="$(cd "$dir" && find usr -xtype l)"
    [ -z "$dangling" ] || gpu_die "unresolved links in the kernel headers: $dangling"
    [ -f "$dir/usr/src/linux-headers-$release/include/config/auto.conf" ] \
        || gpu_die "linux-headers-$release has no include/config/auto.conf"
}

# Builds NVIDIA's open modules for RELEASE into DEST (nvidia*.ko, stripped of debug
# info, plus build.json). The build runs in a fixed path under the cache and maps it
# away (-ffile-prefix-map), so the objects do not depend on where the cache is.
gpu_build_modules() {
    local release="$1" dest="$2" version tmp src headers start seconds m vermagic header_debs=() unpacked patch
    version="$(dpkg-deb -f "$kernel_deb" Version)"
    tmp="$cache/.nvidia-build"
    rm -rf "$tmp" "$dest.tmp"
    mkdir -p "$tmp/root" "$tmp/deb" "$dest.tmp"
    unpacked="$(gpu_unpack_headers "$tmp/root" "$release" "$version")"
    mapfile -t header_debs <<<"$unpacked"
    dpkg -x "${nvidia_debs[0]}" "$tmp/deb"
    tar -C "$tmp" -xJf "$tmp/deb/usr/src/nvidia-open-kernel.tar.xz"
    src="$tmp/modules/nvidia-open-kernel"
    for patch in "$here"/patches/nvidia-*.patch; do
        patch -d "$src" -p1 -s <"$patch" || gpu_die "$patch does not apply"
    done
    headers="$tmp/root/usr/src"
    echo "guest/build.sh --gpu: building NVIDIA $NVIDIA_VERSION modules for $release ($(nproc) jobs)" >&2
    start="$(date +%s)"
    if ! make -C "$src" -j"$(nproc)" \
        SYSSRC="$headers/linux-headers-${release%-amd64}-common" SYSOUT="$headers/linux-headers-$release" \
        KCFLAGS="-ffile-prefix-map=$tmp=/nvidia-build" "${NVIDIA_MAKE_FLAGS[@]}" >"$tmp/build.log" 2>&1; then
        tail -40 "$tmp/build.log" >&2
        gpu_die "the NVIDIA module build failed (log: $tmp/build.log)"
    fi
    seconds=$(($(date +%s) - start))
    # modpost only warns about symbols neither the kernel nor nvidia.ko exports.
    if grep -E "^(WARNING|ERROR): modpost: .*undefined!" "$tmp/build.log" >&2; then
        gpu_die "the NVIDIA modules use symbols the kernel does not export (log: $tmp/build.log)"
    fi
    xz -9 <"$tmp/build.log" >"$dest.tmp/build.log.xz"
    for m in "${NVIDIA_MODULES[@]}"; do
        strip --strip-debug -o "$dest.tmp/$m.ko" "$src/$m.ko"
        vermagic="$(python3 "$here/elfinfo.py" modinfo "$dest.tmp/$m.ko" vermagic)"
        [ "${vermagic%% *}" = "$release" ] || gpu_die "$m.ko has vermagic '$vermagic', not $release"
    done
    python3 - "$dest.tmp/build.json" "$NVIDIA_VERSION" "$release" "$seconds" "$(nproc)" \
        "$(gcc-12 --version | head -1)" "$(basename "${nvidia_debs[0]}")" "${header_debs[@]}" <<'EOF'
import json, sys
path, driver, release, seconds, jobs, gcc, source, *headers = sys.argv[1:]
with open(path, "w") as f:
    json.dump({"driver": driver, "kernel_release": release, "build_seconds": int(seconds),
               "jobs": int(jobs), "compiler": gcc, "source": source, "headers": headers},
              f, indent=2, sort_keys=True)
    f.write("\n")
EOF
    gpu_modules_key >"$dest.tmp/key"
    rm -rf "$tmp"
    mv "$dest.tmp" "$dest"
    echo "guest/build.sh --gpu: built the NVIDIA modules in ${seconds}s (cached in $dest)" >&2
}

# What the cached modules were built from: the source package, the kernel package,
# the patches and the make flags. A cache whose key differs is rebuilt.
gpu_modules_key() {
    {
        basename "${nvidia_debs[0]}"
        basename "$kernel_deb"
        echo "${NVIDIA_MAKE_FLAGS[*]} ${NVIDIA_MODULES[*]}"
        cat "$here"/patches/nvidia-*.patch
    } | sha256sum | awk '{ print $1 }'
}

# True when nvidia_modules_dir holds every module, built from the current inputs.
gpu_modules_cached() {
    local m
    for m in "${NVIDIA_MODULES[@]}"; do
        [ -f "$nvidia_modules_dir/$m.ko" ] || return 1
    done
    [ "$(cat "$nvidia_modules_dir/key" 2>/dev/null)" = "$(gpu_modules_key)" ]
}

# Sets nvidia_modules_dir: the cached modules for the packed kernel, built if missing.
gpu_modules() {
    nvidia_modules_dir="$cache/nvidia-$NVIDIA_VERSION-${kernel_pkg#linux-image-}"
    if ! gpu_modules_cached; then
        rm -rf "$nvidia_modules_dir"
        gpu_build_modules "${kernel_pkg#linux-image-}" "$nvidia_modules_dir"
    fi
}

# Sets gpu_check (path, or empty) and gpu_check_missing (why it is empty).
gpu_check_bin() {
    gpu_check="" gpu_check_missing=""
    if [ -n "${GPUVM_GPU_CHECK_BIN:-}" ]; then
        [ -x "$GPUVM_GPU_CHECK_BIN" ] || gpu_die "GPUVM_GPU_CHECK_BIN=$GPUVM_GPU_CHECK_BIN is not an executable"
        gpu_check="$GPUVM_GPU_CHECK_BIN"
        return
    fi
    if ! (cd "$repo" && cargo metadata --no-deps --format-version 1 --locked) \
        | python3 -c 'import json, sys
targets = [t["name"] for p in json.load(sys.stdin)["packages"] if p["name"] == "gpuvm-agent" for t in p["targets"]]
sys.exit(0 if "gpuvm-gpu-check" in targets else 1)'; then
        gpu_check_missing="MISSING: the gpuvm-agent crate has no gpuvm-gpu-check bin target in this checkout"
        echo "guest/build.sh --gpu: WARNING: $gpu_check_missing; the image has no /usr/bin/gpuvm-gpu-check" >&2
        return
    fi
    (cd "$repo" && cargo build --release --locked -p gpuvm-agent --bin gpuvm-gpu-check)
    gpu_check="$CARGO_TARGET_DIR/release/gpuvm-gpu-check"
}

# Compiles the probe into OUT (dynamically linked against the build host's glibc,
# bookworm's, like the probe rootfs).
gpu_probe() {
    gcc-12 -O2 -Wall -Wextra -Werror -ffile-prefix-map="$here=/gpuvm/guest" \
        -o "$1" "$here/probe/dlopen-probe.c"
}
