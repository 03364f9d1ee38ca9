#!/usr/bin/env bash
# The test command: install what the tests need when it is missing, then run
# every test (unit, Tier 1, monitor/pytest, sandbox, moat-jail, Tier 2).
#
#   ./test.sh [cargo test arguments...]     (as root)
#
# What it installs, only when missing (so a second run installs nothing):
#   - Debian packages (the list below, each with the reason it is needed);
#   - the Python venv target/pyvenv with tests/py/requirements.txt (the
#     qemu.qmp client and pytest, from PyPI);
#   - the Debian cloud kernel package that Tier 2 boots, unpacked under
#     target/tier2 (tier2/kernel.sh).
# Then it runs `cargo test --release --workspace "$@"`.
set -euo pipefail
cd "$(dirname "$0")"

# Debian packages the tests use, and why.
PACKAGES=(
    acpica-tools    # iasl: decompiles and checks moat's ACPI tables
    qemu-utils      # qemu-img, qemu-io: make and judge disk images
    qemu-system-x86 # the Tier 2 test host (TCG with emulated SVM), bench/
    busybox-static  # the Tier 2 guests' userspace
    cpio gzip xz-utils zstd # pack initramfs images, unpack kernel modules
    e2fsprogs       # mkfs.ext4/e2fsck: filesystems a guest writes
    openssl         # certificates for the TLS monitor tests; s_client
    apparmor        # apparmor_parser: moat's profile in the Tier 2 host
    iproute2        # ip netns, taps: moat-jail's --netns test, Tier 2 network
    passt           # the user-mode network peer of -netdev stream (Tier 2)
    util-linux      # mount, setpriv
    gcc binutils    # build the test guests (guests/build.rs)
)

say() { echo "test.sh: $*" >&2; }

installed() { dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null | grep -q '^ii'; }

# The candidate (or installed) version of a package, as apt would pick it.
candidate() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/{print $2; exit}'; }

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done
    # Debian's QEMU packages must come from one release: qemu-utils from
    # bookworm-backports (10.x, preinstalled on some machines) Breaks
    # qemu-system-common < 8.0, which bookworm's qemu-system-x86 (7.2)
    # needs. When qemu-system-x86 is to be installed, take qemu-utils at
    # the same version (a downgrade where a newer one is installed).
    local qemu_pin=()
    if [ ${#missing[@]} -eq 0 ]; then return 0; fi
    if [ "$(id -u)" != 0 ]; then
        say "missing Debian packages: ${missing[*]}; run ./test.sh as root to install them"
        exit 1
    fi
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    if printf '%s\n' "${missing[@]}" | grep -qx 'qemu-system-x86\|qemu-utils'; then
        local v
        if installed qemu-system-x86; then
            v=$(dpkg-query -W -f='${Version}' qemu-system-x86)
        else
            v=$(candidate qemu-system-x86)
        fi
        if [ -n "$v" ] && [ "$v" != "(none)" ]; then
            qemu_pin=(qemu-system-x86="$v" qemu-utils="$v")
            missing=($(printf '%s\n' "${missing[@]}" | grep -vx 'qemu-system-x86\|qemu-utils' || true))
        fi
    fi
    apt-get install -y -qq --no-install-recommends --allow-downgrades \
        "${missing[@]}" "${qemu_pin[@]}" >/dev/null
    for p in "${PACKAGES[@]}"; do
        installed "$p" || { say "Debian package $p did not install"; exit 1; }
    done
}

# The monitor tests drive moat with the qemu.qmp client from PyPI.
install_venv() {
    local venv=target/pyvenv
    if [ -x $venv/bin/python ] && $venv/bin/python -c 'import qemu.qmp, pytest' 2>/dev/null; then
        return 0
    fi
    say "making the Python venv $venv (tests/py/requirements.txt)"
    rm -rf $venv
    if ! python3 -m venv $venv 2>/dev/null; then
        # Debian's own python3 keeps venv in a separate package.
        [ "$(id -u)" = 0 ] || { say "python3 -m venv failed; install Debian's python3-venv"; exit 1; }
        apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
        python3 -m venv $venv
    fi
    $venv/bin/pip install -q --disable-pip-version-check -r tests/py/requirements.txt
}

install_packages
install_venv
kdir=$(bash tier2/kernel.sh)
say "Tier 2 kernel: ${kdir##*/}"

exec cargo test --release --workspace "$@"
