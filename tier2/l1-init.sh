#!/bin/sh
# /init of the Tier 2 test host (L1): load KVM, run each scenario with moat.
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for m in irqbypass kvm kvm-amd; do insmod /modules/$m.ko || echo "TIER2 setup insmod $m failed"; done
[ -c /dev/kvm ] || { echo "TIER2 setup no /dev/kvm"; poweroff -f; }
echo "TIER2 setup ok"
M=/moat/moat
L2="-kernel /l2/vmlinuz -initrd /l2/initrd.gz"
CMD="console=ttyS0 quiet loglevel=3 panic=-1"
for s in $(cat /scenarios); do
    echo "TIER2 $s begin"
    start=$(cat /proc/uptime | cut -d' ' -f1)
    case $s in
        boot-smp2)
            $M -M microvm -m 256M -smp 2 $L2 -append "$CMD" -nographic -no-reboot ;;
        boot-acpi-off)
            $M -M microvm,acpi=off -m 256M -smp 2 $L2 -append "$CMD" -nographic -no-reboot ;;
        qemu-smp2)
            qemu-system-x86_64 -M microvm,rtc=on -enable-kvm -cpu host -m 256M -smp 2 $L2 -append "$CMD" -nographic -no-reboot ;;
        *) echo "unknown scenario $s" ;;
    esac
    rc=$?
    end=$(cat /proc/uptime | cut -d' ' -f1)
    echo "TIER2 $s exit $rc start $start end $end"
done
echo "TIER2 done"
poweroff -f
