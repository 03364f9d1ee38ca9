#!/usr/bin/env bash
# Tier 2: boot a real Debian Linux guest (L2) with moat, inside a nested
# test host (L1) that QEMU/TCG emulates with AMD SVM so L1 has a real
# /dev/kvm. Everything comes from Debian packages.
#
#   tier2/run.sh MOAT_BINARY [SCENARIO...]
#
# Prints the L1 console; the last lines are "TIER2 <scenario> ..." results
# parsed by tests/tier2_linux.rs. Work files are cached in
# ${MOAT_TIER2_DIR:-target/tier2}.
set -euo pipefail

MOAT=$(readlink -f "${1:?usage: tier2/run.sh MOAT_BINARY}")
shift
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${MOAT_TIER2_DIR:-$HERE/../target/tier2}
mkdir -p "$WORK"
WORK=$(readlink -f "$WORK")

need() { command -v "$1" >/dev/null || { echo "tier2: '$1' is missing (Debian package $2; .ci/run installs it)" >&2; exit 2; }; }
need qemu-system-x86_64 qemu-system-x86
need busybox busybox-static
need cpio cpio
need apt-get apt

# --- the Debian cloud kernel (used as both L1 and L2) -----------------------
KPKG=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[ -n "$KPKG" ] || { echo "tier2: cannot resolve linux-image-cloud-amd64 (run apt-get update)" >&2; exit 2; }
KDIR=$WORK/$KPKG
if [ ! -d "$KDIR/boot" ]; then
    rm -rf "$KDIR.tmp" && mkdir -p "$KDIR.tmp"
    (cd "$KDIR.tmp" && apt-get download -q "$KPKG-unsigned" >/dev/null 2>&1 || apt-get download -q "$KPKG" >/dev/null)
    dpkg-deb -x "$KDIR.tmp"/*.deb "$KDIR.tmp/root"
    mv "$KDIR.tmp/root" "$KDIR" && rm -rf "$KDIR.tmp"
fi
VMLINUZ=$(ls "$KDIR"/boot/vmlinuz-*)
KVER=${VMLINUZ##*/vmlinuz-}
MODS=$KDIR/lib/modules/$KVER/kernel

# --- L2 initramfs: busybox, reports what it sees, powers off -----------------
mk_busybox_root() {
    local root=$1
    rm -rf "$root" && mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,etc,lib,lib64}
    cp "$(command -v busybox)" "$root/bin/busybox"
    for a in sh mount umount cat echo grep wc ls insmod poweroff reboot sleep usleep mkdir mkfifo kill date dmesg tr cut head tail seq; do
        ln -sf busybox "$root/bin/$a"
    done
}
pack() { (cd "$1" && find . | cpio -o -H newc --quiet | gzip -1) > "$2"; }

L2ROOT=$WORK/l2root
mk_busybox_root "$L2ROOT"
cat > "$L2ROOT/init" <<'L2INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
echo "L2: userspace reached"
echo "L2: cpus online $(cat /sys/devices/system/cpu/online) count $(grep -c ^processor /proc/cpuinfo)"
echo "L2: mem $(grep MemTotal /proc/meminfo | tr -s ' ')"
echo "L2: cmdline $(cat /proc/cmdline)"
echo "L2: acpi $(ls /sys/firmware/acpi/tables 2>/dev/null | tr '\n' ' ')"
echo "L2: rtc $(cat /sys/class/rtc/rtc0/date 2>/dev/null)"
if [ -d /sys/firmware/acpi/tables ]; then
    echo "L2: powering off"
    poweroff -f
else
    echo "L2: no ACPI, rebooting"
    reboot -f
fi
L2INIT
chmod +x "$L2ROOT/init"
pack "$L2ROOT" "$WORK/l2-initrd.gz"

# --- L1 initramfs: KVM modules, moat and its libraries, the L2 files ---------
L1ROOT=$WORK/l1root
mk_busybox_root "$L1ROOT"
mkdir -p "$L1ROOT/modules" "$L1ROOT/l2" "$L1ROOT/moat"
for m in virt/lib/irqbypass.ko arch/x86/kvm/kvm.ko arch/x86/kvm/kvm-amd.ko; do
    f=$(ls "$MODS/$m"* | head -1)
    case $f in
        *.xz) xz -dc "$f" > "$L1ROOT/modules/$(basename "${f%.xz}")" ;;
        *.zst) zstd -qdc "$f" > "$L1ROOT/modules/$(basename "${f%.zst}")" ;;
        *) cp "$f" "$L1ROOT/modules/" ;;
    esac
done
cp "$MOAT" "$L1ROOT/moat/moat"
for lib in $(ldd "$MOAT" | grep -o '/[^ ]*' | sort -u); do
    mkdir -p "$L1ROOT$(dirname "$lib")"
    cp -L "$lib" "$L1ROOT$lib"
done
# QEMU itself, for side-by-side benchmarks (MOAT_TIER2_QEMU=1).
if [ "${MOAT_TIER2_QEMU:-0}" = 1 ]; then
    Q=$(command -v qemu-system-x86_64)
    mkdir -p "$L1ROOT/usr/bin" "$L1ROOT/usr/share/qemu"
    cp "$Q" "$L1ROOT/usr/bin/"
    for lib in $(ldd "$Q" | grep -o '/[^ ]*' | sort -u); do
        mkdir -p "$L1ROOT$(dirname "$lib")"
        cp -L "$lib" "$L1ROOT$lib"
    done
    for f in bios-microvm.bin linuxboot_dma.bin pvh.bin kvmvapic.bin; do
        cp -L "/usr/share/qemu/$f" "$L1ROOT/usr/share/qemu/"
    done
fi
cp "$VMLINUZ" "$L1ROOT/l2/vmlinuz"
cp "$WORK/l2-initrd.gz" "$L1ROOT/l2/initrd.gz"
cp "$HERE/l1-init.sh" "$L1ROOT/init"
chmod +x "$L1ROOT/init"
echo "${*:-boot-smp2}" > "$L1ROOT/scenarios"
pack "$L1ROOT" "$WORK/l1-initrd.gz"

# --- boot L1 under TCG with emulated SVM ------------------------------------
exec timeout --kill-after=10 "${MOAT_TIER2_TIMEOUT:-900}" qemu-system-x86_64 \
    -machine q35 -accel tcg,thread=multi -cpu EPYC,+svm -smp 2 -m 2048 \
    -kernel "$VMLINUZ" -initrd "$WORK/l1-initrd.gz" \
    -append "console=ttyS0 quiet loglevel=3 panic=-1" \
    -nographic -no-reboot -nodefaults -serial stdio 2>"$WORK/qemu-l1.log"
