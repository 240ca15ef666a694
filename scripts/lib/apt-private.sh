# shellcheck shell=bash
# Fetch packages from another Debian suite without touching the system's apt sources
# (sourced by scripts/containerd-deps.sh, scripts/kube-deps.sh and guest/build.sh).
#
#   apt_private_download SUITE PACKAGE DIR        # leaves DIR/PACKAGE_*.deb (component main)
#   apt_private_download_from SUITE COMPONENTS DIR PACKAGE[=VERSION]...
#       COMPONENTS: space separated, e.g. "contrib non-free non-free-firmware".
#       VERSION may be a shell pattern ("550.163.01-*"): it is resolved to the newest
#       version of the suite that matches, and the download fails when none does.
#
# The archive is the one this machine already uses: DEBIAN_MIRROR, else the first
# `URIs:`/`deb` entry of the system's apt sources that ends in /debian (so no host is
# named here). Lists and archives live in a temp dir, removed on return.

apt_system_mirror() {
    {
        grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
        grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}'
    } | grep -m1 -E '/debian/?$' || true
}

apt_private_download() {
    apt_private_download_from "$1" main "$3" "$2"
}

# Prints PACKAGE=VERSION for a PACKAGE=PATTERN argument (PACKAGE alone stays as is),
# using the private config in the array `opts` of the caller.
apt_private_pin() {
    local spec="$1" package pattern version
    case "$spec" in
        *=*) package="${spec%%=*}" pattern="${spec#*=}" ;;
        *) echo "$spec"; return 0 ;;
    esac
    version="$(apt-cache "${opts[@]}" madison "$package" | awk -F' [|] ' '{ print $2 }' \
        | while read -r v; do
            # shellcheck disable=SC2254 # the pattern is meant to match as a pattern
            case "$v" in $pattern) echo "$v" ;; esac
        done | sort -V | tail -1)"
    if [ -z "$version" ]; then
        echo "apt_private: no version of $package matches $pattern" >&2
        return 1
    fi
    echo "$package=$version"
}

apt_private_download_from() {
    local suite="$1" components="$2" dest="$3" mirror work rc=0 spec pinned=()
    shift 3
    mirror="${DEBIAN_MIRROR:-$(apt_system_mirror)}"
    if [ -z "$mirror" ]; then
        echo "no Debian archive found in the apt sources; set DEBIAN_MIRROR" >&2
        return 1
    fi
    work="$(mktemp -d)"
    mkdir -p "$work/lists/partial" "$work/archives/partial"
    echo "deb $mirror $suite $components" > "$work/sources.list"
    local opts=(
        -o Dir::Etc::sourcelist="$work/sources.list"
        -o Dir::Etc::sourceparts=/nonexistent
        -o Dir::State::Lists="$work/lists"
        -o Dir::Cache::Archives="$work/archives"
        -o Dir::State::status=/dev/null
        -o APT::Get::List-Cleanup=0
        -o APT::Sandbox::User=root
    )
    if apt-get "${opts[@]}" update -qq >&2; then
        for spec in "$@"; do
            pinned+=("$(apt_private_pin "$spec")") || { rc=1; break; }
        done
        if [ "$rc" = 0 ]; then
            (cd "$dest" && apt-get "${opts[@]}" download "${pinned[@]}" >&2) || rc=$?
        fi
    else
        rc=1
    fi
    rm -rf "$work"
    return "$rc"
}
