#!/bin/sh
# /init of the Tier 2 test host (L1): load KVM, run each scenario with moat.
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
export PATH=/bin:/usr/bin
for m in irqbypass kvm kvm-amd virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
    insmod /modules/$m.ko || echo "TIER2 setup insmod $m failed"
done
[ -c /dev/kvm ] || { echo "TIER2 setup no /dev/kvm"; poweroff -f; }
echo "TIER2 setup ok"
# As a management tool would run it as root: dropping to nobody once set up.
M="/moat/moat -run-with user=65534:65534"
L2="-kernel /l2/vmlinuz -initrd /l2/initrd.gz"
CMD="console=ttyS0 quiet loglevel=3 panic=-1"
now() { cut -d' ' -f1 /proc/uptime; }

# bench LABEL CMD...: run CMD, timestamp each console line, track peak RSS.
bench() {
    label=$1; shift
    rm -f /tmp/fifo /tmp/hwm && mkfifo /tmp/fifo
    t0=$(now)
    "$@" > /tmp/fifo 2>&1 &
    pid=$!
    ( while kill -0 $pid 2>/dev/null; do
          h=$(grep VmHWM /proc/$pid/status 2>/dev/null | tr -s ' ' | cut -d' ' -f2)
          [ -n "$h" ] && echo "$h" > /tmp/hwm
          usleep 50000
      done ) &
    first=""; user=""
    while IFS= read -r line; do
        t=$(now)
        [ -z "$first" ] && first=$t
        case $line in *"L2: userspace reached"*) user=$t ;; esac
        echo "$line"
    done < /tmp/fifo
    wait $pid; rc=$?
    t1=$(now)
    sleep 0.1
    echo "TIER2 bench $label start $t0 first ${first:-none} userspace ${user:-none} end $t1 hwm_kb $(cat /tmp/hwm 2>/dev/null) rc $rc"
}

for s in $(cat /scenarios); do
    echo "TIER2 $s begin"
    start=$(now)
    case $s in
        boot-smp2)
            $M -M microvm -m 256M -smp 2 $L2 -append "$CMD" -nographic -no-reboot ;;
        blk)
            sleep 1
            $M -M microvm -m 256M -smp 2 $L2 -append "$CMD moat.test=blk" -nographic -no-reboot \
                -drive file=/dev/vda,format=qcow2,if=virtio,serial=moat-l2-data \
                -drive file=/dev/vdb,format=raw,if=virtio,readonly=on ;;
        boot-acpi-off)
            $M -M microvm,acpi=off -m 256M -smp 2 $L2 -append "$CMD" -nographic -no-reboot ;;
        bench-moat)
            bench moat $M -M microvm -m 256M -smp 2 $L2 -append "$CMD" -nographic -no-reboot ;;
        bench-qemu)
            bench qemu qemu-system-x86_64 -M microvm,rtc=on -enable-kvm -cpu host -m 256M -smp 2 $L2 \
                -append "$CMD" -nodefaults -serial stdio -nographic -no-reboot ;;
        *) echo "unknown scenario $s" ;;
    esac
    rc=$?
    echo "TIER2 $s exit $rc start $start end $(now)"
done
echo "TIER2 done"
poweroff -f
