#!/usr/bin/env bash
# The Debian cloud kernel that Tier 2 boots as its test host (L1) and as the
# guest (L2), fetched once with `apt-get download` and unpacked with
# dpkg-deb into WORK (default target/tier2).
#
#   tier2/kernel.sh [WORK]     prints the unpacked package's directory
#
# Used by tier2/run.sh and by ./test.sh (which fetches it before the tests,
# so a stale or missing apt package list is mended there, as root).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${1:-${MOAT_TIER2_DIR:-$HERE/../target/tier2}}
mkdir -p "$WORK"
WORK=$(readlink -f "$WORK")

resolve() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/{print $2; exit}'
}

# download PKG DIR: the -unsigned package (what the signed one is built
# from; the same kernel), or the signed one.
download() {
    (cd "$2" && { apt-get download -q "$1-unsigned" >/dev/null 2>&1 || apt-get download -q "$1" >/dev/null 2>&1; })
}

KPKG=$(resolve)
if [ -z "$KPKG" ] && [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null
    KPKG=$(resolve)
fi
[ -n "$KPKG" ] || { echo "tier2: cannot resolve the Debian package linux-image-cloud-amd64 (run apt-get update as root, or ./test.sh)" >&2; exit 2; }

KDIR=$WORK/$KPKG
if [ ! -d "$KDIR/boot" ]; then
    rm -rf "$KDIR.tmp" && mkdir -p "$KDIR.tmp"
    if ! download "$KPKG" "$KDIR.tmp"; then
        # The package list names a version the mirror no longer has.
        [ "$(id -u)" = 0 ] && apt-get update -qq >/dev/null
        KPKG=$(resolve) && KDIR=$WORK/$KPKG
        download "$KPKG" "$KDIR.tmp" ||
            { echo "tier2: apt-get download $KPKG failed (run apt-get update as root, or ./test.sh)" >&2; exit 2; }
    fi
    if [ ! -d "$KDIR/boot" ]; then
        dpkg-deb -x "$KDIR.tmp"/*.deb "$KDIR.tmp/root"
        mv "$KDIR.tmp/root" "$KDIR"
    fi
    rm -rf "$KDIR.tmp"
fi
echo "$KDIR"
