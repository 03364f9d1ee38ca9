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

need() { command -v "$1" >/dev/null || { echo "tier2: '$1' is missing (Debian package $2; ./test.sh installs it)" >&2; exit 2; }; }
need qemu-system-x86_64 qemu-system-x86
need busybox busybox-static
need cpio cpio
need apt-get apt
need apparmor_parser apparmor
need ip iproute2
need passt passt
need gcc gcc
MOAT_JAIL=$(readlink -f "${MOAT_JAIL:-$(dirname "$MOAT")/moat-jail}")

# --- the Debian cloud kernel (used as both L1 and L2) -----------------------
KDIR=$(bash "$HERE/kernel.sh" "$WORK")
VMLINUZ=$(ls "$KDIR"/boot/vmlinuz-*)
KVER=${VMLINUZ##*/vmlinuz-}
MODS=$KDIR/lib/modules/$KVER/kernel

# --- L2 initramfs: busybox, reports what it sees, powers off -----------------
mk_busybox_root() {
    local root=$1
    rm -rf "$root" && mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,etc,lib,lib64}
    cp "$(command -v busybox)" "$root/bin/busybox"
    for a in ps sh mount umount cat echo grep wc ls insmod poweroff reboot sleep usleep mkdir mkfifo kill date dmesg tr cut head tail seq readlink \
             dd sha256sum nc ping taskset udhcpc rm nsenter chroot unshare pkill timeout; do
        ln -sf busybox "$root/bin/$a"
    done
}
pack() { (cd "$1" && find . | cpio -o -H newc --quiet | gzip -1) > "$2"; }
# copy_bin ROOT BINARY DEST: a dynamically linked program and its libraries.
copy_bin() {
    mkdir -p "$1$(dirname "$3")"
    cp -L "$2" "$1$3"
    for lib in $(ldd "$2" | grep -o '/[^ ]*' | sort -u); do
        mkdir -p "$1$(dirname "$lib")"
        cp -L "$lib" "$1$lib"
    done
}
# copy_mods ROOT MODULE...: kernel modules (paths under kernel/) into ROOT/modules.
copy_mods() {
    local root=$1; shift
    mkdir -p "$root/modules"
    for m in "$@"; do
        f=$(ls "$MODS/$m"* | head -1)
        case $f in
            *.xz) xz -dc "$f" > "$root/modules/$(basename "${f%.xz}")" ;;
            *.zst) zstd -qdc "$f" > "$root/modules/$(basename "${f%.zst}")" ;;
            *) cp "$f" "$root/modules/" ;;
        esac
    done
}
VIRTIO_MODS="drivers/virtio/virtio_ring.ko drivers/virtio/virtio.ko"

L2ROOT=$WORK/l2root
mk_busybox_root "$L2ROOT"
copy_mods "$L2ROOT" $VIRTIO_MODS drivers/virtio/virtio_mmio.ko drivers/block/virtio_blk.ko \
    net/core/failover.ko drivers/net/net_failover.ko drivers/net/virtio_net.ko \
    drivers/char/hw_random/virtio-rng.ko \
    net/vmw_vsock/vsock.ko net/vmw_vsock/vmw_vsock_virtio_transport_common.ko \
    net/vmw_vsock/vmw_vsock_virtio_transport.ko
# The vsock test program (both ends; see tier2/vsock.c).
gcc -static -O2 -o "$L2ROOT/bin/vsockt" "$HERE/vsock.c"
# busybox ip (the L2 side of the network scenarios) and udhcpc's script.
ln -sf busybox "$L2ROOT/bin/ip"
cat > "$L2ROOT/bin/dhcp.sh" <<'DHCP'
#!/bin/sh
case $1 in
bound|renew)
    ip addr add "$ip/${mask:-24}" dev "$interface"
    ip link set "$interface" up
    [ -n "$router" ] && ip route add default via "${router%% *}" dev "$interface"
    echo "L2: dhcp $ip/${mask:-24} router $router" > /tmp/dhcp.lease ;;
esac
DHCP
chmod +x "$L2ROOT/bin/dhcp.sh"
copy_bin "$L2ROOT" /usr/sbin/mke2fs /sbin/mke2fs
cp /etc/mke2fs.conf "$L2ROOT/etc/"
cat > "$L2ROOT/init" <<'L2INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "L2: userspace reached"
case " $(cat /proc/cmdline) " in
*" moat.test=blk "*)
    for m in virtio_ring virtio virtio_mmio virtio_blk; do insmod /modules/$m.ko || echo "L2: insmod $m failed"; done
    sleep 1
    echo "L2: disks $(ls /sys/block | grep vd | tr '\n' ' ')"
    echo "L2: vda queues $(ls /sys/block/vda/mq | tr '\n' ' ')"
    echo "L2: vdb ro $(cat /sys/block/vdb/ro) size $(cat /sys/block/vdb/size) serial $(cat /sys/block/vda/serial 2>/dev/null)"
    mkdir -p /mnt/a /mnt/b
    /sbin/mke2fs -t ext4 -q -F -L moatdata /dev/vda && echo "L2: mkfs ok"
    mount -t ext4 /dev/vda /mnt/a && echo "L2: mount vda ok"
    mount -t ext4 -o ro /dev/vdb /mnt/b && echo "L2: mount vdb ok"
    echo "L2: host file says: $(cat /mnt/b/from-host.txt)"
    echo "written by the L2 guest through moat's virtio-blk" > /mnt/a/from-guest.txt
    cat /mnt/b/from-host.txt > /mnt/a/copy-of-host-file.txt
    dd if=/dev/urandom of=/mnt/a/random.bin bs=64k count=64 2>/dev/null
    echo "L2: random sha256 $(sha256sum /mnt/a/random.bin | cut -d' ' -f1)"
    umount /mnt/a && umount /mnt/b && sync && echo "L2: unmounted"
    ;;
*" moat.test=net "*)
    # A tap in L1's network namespace "vm" (10.9.0.1) with two queues.
    for m in virtio_ring virtio virtio_mmio failover net_failover virtio_net; do insmod /modules/$m.ko || echo "L2: insmod $m failed"; done
    sleep 1
    ip link set lo up
    ip addr add 10.9.0.2/24 dev eth0 && ip link set eth0 up
    echo "L2: net queues $(ls /sys/class/net/eth0/queues | tr '\n' ' ')"
    ping -c 3 -W 10 10.9.0.1 > /dev/null && echo "L2: ping ok"
    dd if=/dev/urandom of=/tmp/up.bin bs=1M count=64 2>/dev/null
    echo "L2: up sha256 $(sha256sum /tmp/up.bin | cut -d' ' -f1)"
    # One flow from each CPU, so that both queue pairs carry traffic.
    taskset 2 nc 10.9.0.1 5001 < /tmp/up.bin && echo "L2: upload done"
    rm /tmp/up.bin
    taskset 1 nc 10.9.0.1 5002 < /dev/null > /tmp/down.bin
    echo "L2: down sha256 $(sha256sum /tmp/down.bin | cut -d' ' -f1) bytes $(wc -c < /tmp/down.bin)"
    rm /tmp/down.bin
    # L1 takes the link down and up through QMP.
    echo "L2: link wait"
    for i in $(seq 600); do [ "$(cat /sys/class/net/eth0/carrier)" = 0 ] && break; usleep 100000; done
    echo "L2: carrier $(cat /sys/class/net/eth0/carrier)"
    for i in $(seq 600); do [ "$(cat /sys/class/net/eth0/carrier)" = 1 ] && break; usleep 100000; done
    echo "L2: carrier $(cat /sys/class/net/eth0/carrier)"
    ping -c 1 -W 10 10.9.0.1 > /dev/null && echo "L2: ping after link up ok"
    ;;
*" moat.test=dhcp "*)
    # -netdev stream to passt in L1: an address by DHCP, then L1's server.
    for m in virtio_ring virtio virtio_mmio failover net_failover virtio_net; do insmod /modules/$m.ko || echo "L2: insmod $m failed"; done
    sleep 1
    ip link set lo up
    ip link set eth0 up
    udhcpc -i eth0 -n -q -t 10 -s /bin/dhcp.sh > /dev/null 2>&1 || echo "L2: dhcp failed"
    # (udhcpc's output, the script's included, goes nowhere.)
    cat /tmp/dhcp.lease
    gw=$(ip route | grep default | cut -d' ' -f3)
    # (The request's sending side stays open until the answer is in: with
    # it shut at once, Debian 12's passt sometimes holds L1's answer for
    # half a minute or more, under QEMU as under moat; seen in 2 of 10
    # runs of each.)
    echo "L2: passt says $( (echo 'hello from L2'; sleep 5) | timeout 60 nc $gw 5003)"
    ;;
*" moat.test=netbench "*)
    # bench/net.sh: ping round trips, then 64 MiB up and 64 MiB down over
    # TCP to L1 (10.9.1.1), each timed by L2's clock.
    for m in virtio_ring virtio virtio_mmio failover net_failover virtio_net; do insmod /modules/$m.ko || echo "L2: insmod $m failed"; done
    ip link set lo up
    ip addr add 10.9.1.2/24 dev eth0 && ip link set eth0 up
    ping -c 3 -W 10 10.9.1.1 > /dev/null
    echo "L2: netbench rtt $(ping -c 20 -i 0.2 10.9.1.1 | grep round-trip | cut -d/ -f4)"
    # (Each transfer is bounded: one that stalls under the nested host is
    # reported as failed, and bench/net.sh leaves that run out.)
    t0=$(cut -d' ' -f1 /proc/uptime)
    if dd if=/dev/zero bs=64k count=1024 2>/dev/null | timeout 150 nc 10.9.1.1 5001; then
        echo "L2: netbench up $((64 << 20)) $t0 $(cut -d' ' -f1 /proc/uptime)"
    else
        echo "L2: netbench up failed"
    fi
    t0=$(cut -d' ' -f1 /proc/uptime)
    echo "L2: netbench down $(timeout 150 nc 10.9.1.1 5002 < /dev/null | wc -c) $t0 $(cut -d' ' -f1 /proc/uptime)"
    ;;
*" moat.test=rng "*)
    # Two virtio-rng devices: the kernel's hwrng core picks the first; it
    # is limited to 8 KiB per second, so 32 KiB take at least 3 s.
    for m in virtio_ring virtio virtio_mmio virtio-rng; do insmod /modules/$m.ko || echo "L2: insmod $m failed"; done
    sleep 1
    echo "L2: rng current $(cat /sys/class/misc/hw_random/rng_current) available $(cat /sys/class/misc/hw_random/rng_available)"
    t0=$(cut -d' ' -f1 /proc/uptime)
    n=$(dd if=/dev/hwrng bs=4096 count=8 iflag=fullblock 2>/dev/null | wc -c)
    echo "L2: rng read $n $t0 $(cut -d' ' -f1 /proc/uptime)"
    echo "L2: rng zeros $(dd if=/dev/hwrng bs=4096 count=1 2>/dev/null | tr -dc '\000' | wc -c)"
    ;;
*" moat.test=vsock "*)
    # 64 MiB each way on a connection from L1 (to port 1234) and on one to
    # L1 (port 5000), then SEQPACKET messages echoed by L1 (port 5001).
    for m in virtio_ring virtio virtio_mmio vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport; do
        insmod /modules/$m.ko || echo "L2: insmod $m failed"
    done
    sleep 1
    vsockt serve vsock:4294967295:1234 $((64 << 20)) > /tmp/in.log 2>&1 &
    spid=$!
    for i in $(seq 100); do grep -q listening /tmp/in.log && break; usleep 100000; done
    echo "L2: vsock listening"
    echo "L2: vsock out $(vsockt connect vsock:2:5000 $((64 << 20)) 2>&1 | tr '\n' ' ')"
    echo "L2: vsock seq $(vsockt seq vsock:2:5001 2>&1 | tr '\n' ' ')"
    wait $spid
    echo "L2: vsock in $(grep -v listening /tmp/in.log | tr '\n' ' ')"
    ;;
*" moat.test=vsockbench "*)
    # bench/vsock.sh: 64 MiB each way and 2000 round trips to L1 (CID 2).
    for m in virtio_ring virtio virtio_mmio vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport; do
        insmod /modules/$m.ko || echo "L2: insmod $m failed"
    done
    sleep 1
    echo "L2: vsockbench $(vsockt connect vsock:2:5000 $((64 << 20)) 2>&1 | tr '\n' ' ')"
    echo "L2: vsockbench $(vsockt rtt vsock:2:5002 2000 2>&1 | tr '\n' ' ')"
    ;;
*" moat.test=linger "*)
    # Stay up a while, so L1 can look at the jailed moat from outside.
    echo "L2: dmesg $(dmesg | grep -E 'Memory:|Freeing' | tr '\n' '|')"
    echo "L2: dmesg $(grep -E 'MemFree|^Cached|Slab|Percpu|VmallocUsed|PageTables|KernelStack|AnonPages|Shmem:' /proc/meminfo | tr -s ' ' | tr '\n' '|')"
    sleep 8
    ;;
esac
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
copy_mods "$L1ROOT" virt/lib/irqbypass.ko arch/x86/kvm/kvm.ko arch/x86/kvm/kvm-amd.ko $VIRTIO_MODS \
    drivers/virtio/virtio_pci_modern_dev.ko drivers/virtio/virtio_pci_legacy_dev.ko \
    drivers/virtio/virtio_pci.ko drivers/block/virtio_blk.ko drivers/net/tun.ko drivers/net/dummy.ko \
    net/vmw_vsock/vsock.ko net/vmw_vsock/vmw_vsock_virtio_transport_common.ko \
    drivers/vhost/vhost_iotlb.ko drivers/vhost/vhost.ko drivers/vhost/vhost_vsock.ko
cp "$MOAT" "$L1ROOT/moat/moat"
cp "$L2ROOT/bin/vsockt" "$L1ROOT/moat/vsockt"
# moat-jail, and AppArmor's parser with moat's profile (the jail scenario).
cp "$MOAT_JAIL" "$L1ROOT/moat/moat-jail"
copy_bin "$L1ROOT" "$(command -v apparmor_parser)" /sbin/apparmor_parser
# The network scenarios: iproute2 (namespaces, taps), passt, a QMP client.
copy_bin "$L1ROOT" "$(command -v ip)" /sbin/ip
copy_bin "$L1ROOT" "$(command -v passt)" /moat/passt
# (passt, started as root, drops to the user "nobody".)
echo "nobody:x:65534:65534:nobody:/nonexistent:/bin/false" > "$L1ROOT/etc/passwd"
echo "nogroup:x:65534:" > "$L1ROOT/etc/group"
gcc -static -O2 -o "$L1ROOT/moat/qmp" "$HERE/qmp.c"
gcc -static -O2 -o "$L1ROOT/moat/kvm-keeper" "$HERE/kvm-keeper.c"
gcc -static -O2 -o "$L1ROOT/moat/pagemap" "$HERE/pagemap.c"
mkdir -p "$L1ROOT/etc/apparmor.d/abi"
cp /etc/apparmor.d/abi/3.0 "$L1ROOT/etc/apparmor.d/abi/"
cp "$HERE/../contrib/apparmor/moat-jailed" "$L1ROOT/moat/apparmor-moat-jailed"
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
# The same kernel as an ELF vmlinux (PVH entry), for the *-elf benchmarks:
# the bzImage's LZ4 payload, unpacked (lz4 stops with an error at the
# bzImage's trailer, after the whole ELF).
case " $* " in *-elf" "*)
    need lz4 lz4
    off=$(python3 -c "import sys; print(open(sys.argv[1],'rb').read().find(bytes([2,0x21,0x4c,0x18])))" "$VMLINUZ")
    tail -c +$((off + 1)) "$VMLINUZ" | lz4 -dc > "$L1ROOT/l2/vmlinux" 2>/dev/null || true
    [ "$(head -c 4 "$L1ROOT/l2/vmlinux" | od -An -c | tr -d ' ')" = "177ELF" ] ||
        { echo "tier2: could not unpack vmlinux from $VMLINUZ" >&2; exit 2; } ;;
esac
cp "$WORK/l2-initrd.gz" "$L1ROOT/l2/initrd.gz"
cp "$HERE/l1-init.sh" "$L1ROOT/init"
chmod +x "$L1ROOT/init"
echo "${*:-boot-smp2}" > "$L1ROOT/scenarios"
pack "$L1ROOT" "$WORK/l1-initrd.gz"

# --- disks for the blk scenario: made on the host, checked on the host ------
# The data disk is a qcow2 image (64 MiB virtual, extended L2 entries) in a
# 128 MiB container: L1 sees the container as a raw block device and runs
# moat on it with format=qcow2; the host judges the result with qemu-img check.
DATA=$WORK/blk-data.qcow2
HOSTFS=$WORK/blk-hostfs.img
rm -f "$DATA" "$HOSTFS"
qemu-img create -q -f qcow2 -o extended_l2=on "$DATA" 64M
truncate -s 128M "$DATA"
mkdir -p "$WORK/hostfs"
echo "hello from the host, via mkfs.ext4 -d" > "$WORK/hostfs/from-host.txt"
mkfs.ext4 -q -F -d "$WORK/hostfs" "$HOSTFS" 16M

# --- boot L1 under TCG with emulated SVM ------------------------------------
# (softlockup_panic: L1's kernel has soft-locked under TCG now and then, both
# CPUs stuck in the kernel for good, once in moat-jail's setup; a panic ends
# the run at once instead of at the timeout, and tests/tier2_linux.rs boots
# the test host again.)
# The console goes to a file that is echoed as it grows; when nothing new
# appears for ${MOAT_TIER2_STALL:-240} s (the longest quiet stretch of a good
# run is far shorter), the test host is stopped at once with "TIER2
# stalled", rather than at the timeout: L1 has hung under TCG with no
# soft-lockup report at all, and tests/tier2_linux.rs boots it once more.
CONSOLE=$WORK/console.log
: > "$CONSOLE"
timeout --kill-after=10 "${MOAT_TIER2_TIMEOUT:-900}" qemu-system-x86_64 \
    -machine q35 -accel tcg,thread=multi -cpu EPYC,+svm -smp 2 -m 2048 \
    -kernel "$VMLINUZ" -initrd "$WORK/l1-initrd.gz" \
    -append "console=ttyS0 quiet loglevel=3 panic=-1 softlockup_panic=1" \
    -drive file="$DATA",format=raw,if=virtio -drive file="$HOSTFS",format=raw,if=virtio,readonly=on \
    -nographic -no-reboot -nodefaults -serial stdio </dev/null >"$CONSOLE" 2>"$WORK/qemu-l1.log" &
qpid=$!
tail -n +1 -f --pid=$qpid "$CONSOLE" &
tpid=$!
STALL=${MOAT_TIER2_STALL:-240}
size=0
last=$SECONDS
quiet=0
stalled=0
while kill -0 $qpid 2>/dev/null; do
    sleep 2
    now_size=$(stat -c %s "$CONSOLE")
    if [ "$now_size" != "$size" ]; then
        size=$now_size
        last=$SECONDS
    fi
    [ $((SECONDS - last)) -gt $quiet ] && quiet=$((SECONDS - last))
    if [ $((SECONDS - last)) -ge "$STALL" ]; then
        sleep 1
        echo "TIER2 stalled: no console output for $STALL s; stopping the test host"
        kill $(cat /proc/$qpid/task/*/children 2>/dev/null) $qpid 2>/dev/null || true
        stalled=1
        break
    fi
done
rc=0
wait $qpid || rc=$?
[ $stalled = 0 ] || rc=3
wait $tpid 2>/dev/null || true
echo "tier2: longest quiet stretch of the console: $quiet s" >&2
echo "TIER2 host data image $DATA"
exit $rc
