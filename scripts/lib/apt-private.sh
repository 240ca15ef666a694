# shellcheck shell=bash
# Fetch one package from another Debian suite without touching the system's apt sources
# (sourced by scripts/containerd-deps.sh and scripts/kube-deps.sh).
#
#   apt_private_download SUITE PACKAGE DIR   # leaves DIR/PACKAGE_*.deb
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
    local suite="$1" package="$2" dest="$3" mirror work rc=0
    mirror="${DEBIAN_MIRROR:-$(apt_system_mirror)}"
    if [ -z "$mirror" ]; then
        echo "no Debian archive found in the apt sources; set DEBIAN_MIRROR" >&2
        return 1
    fi
    work="$(mktemp -d)"
    mkdir -p "$work/lists/partial" "$work/archives/partial"
    echo "deb $mirror $suite main" > "$work/sources.list"
    local opts=(
        -o Dir::Etc::sourcelist="$work/sources.list"
        -o Dir::Etc::sourceparts=/nonexistent
        -o Dir::State::Lists="$work/lists"
        -o Dir::Cache::Archives="$work/archives"
        -o APT::Get::List-Cleanup=0
        -o APT::Sandbox::User=root
    )
    apt-get "${opts[@]}" update -qq >&2 &&
        (cd "$dest" && apt-get "${opts[@]}" download "$package" >&2) || rc=$?
    rm -rf "$work"
    return "$rc"
}
