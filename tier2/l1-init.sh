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
# cgroup v2 as on a systemd host: the cpu, memory and pids controllers on,
# and a cgroup with a CPU quota, made now while nothing else runs. The first
# memory cgroup and the first quota turn kernel static keys on, which
# patches kernel code on every CPU; under QEMU's TCG a CPU has been left
# spinning at a patched site when that happened in moat-jail's setup (soft
# lockups at memcg_kmem_enabled's sites in kmem_cache_alloc and
# free_pcp_prepare, the test host then hung or panicked). A real host has
# done this long before moat runs.
mount -t cgroup2 none /sys/fs/cgroup
echo "+cpu +memory +pids" > /sys/fs/cgroup/cgroup.subtree_control
mkdir /sys/fs/cgroup/system
echo "1000000 100000" > /sys/fs/cgroup/system/cpu.max
echo 1G > /sys/fs/cgroup/system/memory.max
# The same for KVM's local-APIC keys, which every L2 boot would otherwise
# turn on and off (see tier2/kvm-keeper.c).
/moat/kvm-keeper > /tmp/kvm-keeper.log 2>&1 &
for _ in $(seq 50); do grep -q holding /tmp/kvm-keeper.log && break; usleep 100000; done
grep -q holding /tmp/kvm-keeper.log || echo "TIER2 setup kvm-keeper: $(cat /tmp/kvm-keeper.log)"
echo "TIER2 setup ok"
# Nothing here types into the guests: moat's stdin is /dev/null, not the
# console tty (a CI run once saw L1's kernel spin in a tty read of moat's
# serial-in thread after the guest had powered off: a soft lockup, never
# reproduced; without a tty on stdin that path is not taken at all).
exec < /dev/null
# As a management tool would run it as root: dropping to nobody once set up.
M="/moat/moat -run-with user=65534:65534"
L2="-kernel /l2/vmlinuz -initrd /l2/initrd.gz"
CMD="console=ttyS0 quiet loglevel=3 panic=-1"
now() { cut -d' ' -f1 /proc/uptime; }
IP=/sbin/ip
QMP=/moat/qmp
# wait_line FILE TEXT [PID]: until FILE has TEXT (or PID ends; 3 minutes at most).
wait_line() {
    for _ in $(seq 1800); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        [ -n "$3" ] && ! kill -0 "$3" 2>/dev/null && return 1
        usleep 100000
    done
    return 1
}

# bench LABEL CMD...: run CMD, timestamp each console line, track peak RSS.
bench() {
    label=$1; shift
    rm -f /tmp/fifo /tmp/hwm && mkfifo /tmp/fifo
    t0=$(now)
    "$@" > /tmp/fifo 2>&1 &
    pid=$!
    # (Shell builtins only: a grep|tr|cut every 50 ms took a fair share of
    # the emulated host's CPUs from the VMM being measured.)
    ( while kill -0 $pid 2>/dev/null; do
          while read -r k v _; do
              [ "$k" = "VmHWM:" ] && echo "$v" > /tmp/hwm
          done 2>/dev/null < /proc/$pid/status
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
                -drive file=/dev/vda,format=qcow2,if=none,id=d0 \
                -device virtio-blk-device,drive=d0,serial=moat-l2-data,num-queues=2 \
                -drive file=/dev/vdb,format=raw,if=virtio,readonly=on ;;
        rng)
            $M -M microvm -m 256M -smp 1 $L2 -append "$CMD moat.test=rng" -nographic -no-reboot \
                -object rng-random,id=r0,filename=/dev/urandom \
                -device virtio-rng-device,rng=r0,max-bytes=8192,period=1000 -device virtio-rng-device ;;
        boot-acpi-off)
            $M -M microvm,acpi=off -m 256M -smp 2 $L2 -append "$CMD" -nographic -no-reboot ;;
        jail)
            # moat-jail on a cgroup v2 host with AppArmor: the L2 kernel runs
            # under moat, jailed, while L1 looks at it from outside.
            mount -t securityfs none /sys/kernel/security
            /sbin/apparmor_parser -r /moat/apparmor-moat-jailed && echo "TIER2 jail profile loaded"
            mkdir -p /srv/jail
            /moat/moat-jail --id tier2 --uid 65534 --gid 65534 --exec-file /moat/moat \
                --chroot-base-dir /srv/jail --ro /l2/vmlinuz:/vmlinuz --ro /l2/initrd.gz:/initrd.gz \
                --apparmor-profile moat-jailed --cpu-quota-us 150000 --memory-max 1G --pids-max 64 -- \
                -M microvm -m 256M -smp 2 -kernel /vmlinuz -initrd /initrd.gz \
                -append "$CMD moat.test=linger" -nographic -no-reboot > /tmp/jail.out 2>&1 &
            jpid=$!
            pid=""
            for _ in $(seq 500); do
                pid=$(cat /proc/$jpid/task/$jpid/children 2>/dev/null | cut -d' ' -f1)
                [ -n "$pid" ] && grep -q "moat" /proc/$pid/comm 2>/dev/null && break
                usleep 20000
            done
            sleep 3
            echo "TIER2 jail comm $(cat /proc/$pid/comm)"
            echo "TIER2 jail cgroup $(cat /proc/$pid/cgroup)"
            echo "TIER2 jail cpu.max $(cat /sys/fs/cgroup/moat/tier2/cpu.max)"
            echo "TIER2 jail memory.max $(cat /sys/fs/cgroup/moat/tier2/memory.max)"
            echo "TIER2 jail pids.max $(cat /sys/fs/cgroup/moat/tier2/pids.max)"
            echo "TIER2 jail apparmor $(cat /proc/$pid/attr/current)"
            for ns in mnt pid ipc uts cgroup; do
                t=$(readlink /proc/$pid/ns/$ns)
                [ -n "$t" ] && [ "$t" != "$(readlink /proc/self/ns/$ns)" ] && echo "TIER2 jail own ns $ns"
            done
            echo "TIER2 jail $(grep -E '^(Uid|CapEff|NoNewPrivs|Seccomp):' /proc/$pid/status | tr -s '\t\n' '  ')"
            echo "TIER2 jail root $(cd /proc/$pid/root && ls -a | tr '\n' ' ')"
            # (This host's THP is "always": moat's own memory must not be in
            # huge pages, only guest RAM, which moat madvised: hg or nh.)
            echo "TIER2 jail thp $(cat /sys/kernel/mm/transparent_hugepage/enabled)"
            echo "TIER2 jail huge pages outside guest RAM $(awk '/^AnonHugePages:/ { h = $2 }
                /^VmFlags:/ { if (!/ (hg|nh)/) t += h } END { print t + 0 }' /proc/$pid/smaps) kB"
            wait $jpid
            jrc=$?
            cat /tmp/jail.out
            echo "TIER2 jail moat-jail exit $jrc"
            echo "TIER2 jail left [$(ls /srv/jail)] [$(ls /sys/fs/cgroup/moat 2>/dev/null | grep tier2)]"
            ;;
        net)
            # A two-queue tap in the namespace "vm" (10.9.0.1): ping, 64 MiB
            # each way checked by SHA-256 on both ends, both queue pairs
            # used, the link taken down and up through QMP.
            insmod /modules/tun.ko
            mkdir -p /run /var && ln -sf /run /var/run && mount -t tmpfs run /run
            $IP netns add vm
            $IP -n vm link set lo up
            # (nsenter, not "ip netns exec": that remounts /sys for each
            # command, and three of them at once once left L1 stuck in the
            # kernel for minutes.)
            VM="nsenter --net=/run/netns/vm"
            $VM $IP tuntap add dev tap0 mode tap multi_queue
            $IP -n vm addr add 10.9.0.1/24 dev tap0
            $IP -n vm link set tap0 up
            dd if=/dev/urandom of=/tmp/to-guest.bin bs=1M count=64 2>/dev/null
            echo "TIER2 net to-guest sha256 $(sha256sum /tmp/to-guest.bin | cut -d' ' -f1)"
            # (Each server's own end runs under -e: busybox nc ends a
            # connection at the first EOF of either side.)
            $VM nc -l -p 5001 -e sh -c 'cat > /tmp/from-guest.bin' &
            $VM nc -l -p 5002 -e cat /tmp/to-guest.bin &
            : > /tmp/net.out
            # (MOAT_LOG=info: a triple fault of the L2 guest, which the
            # nested TCG-SVM host causes now and then, is then logged, and
            # tests/tier2_linux.rs runs the scenario once more.)
            MOAT_LOG=info $VM $M -M microvm -m 512M -smp 2 $L2 -append "$CMD moat.test=net" -nographic -no-reboot \
                -netdev tap,id=n0,ifname=tap0,queues=2,script=no,downscript=no \
                -device virtio-net-device,netdev=n0,mq=on,id=net0 \
                -qmp unix:/tmp/qmp.sock,server=on,wait=off >> /tmp/net.out 2>&1 &
            mpid=$!
            tail -f /tmp/net.out &
            tpid=$!
            if wait_line /tmp/net.out "L2: link wait" $mpid; then
                # Sixteen new flows from here (connections the guest
                # refuses): tun spreads flows it has no steering entry for
                # by their hash, so both receive queues get frames. (The
                # transfers alone leave that to tun's flow steering, which
                # once put every frame for the guest on queue 0.)
                for p in $(seq 7001 7016); do $VM nc -w 2 10.9.0.2 $p < /dev/null > /dev/null 2>&1; done
                # (Into the guest's log, which both append to: printed
                # beside the `tail -f` of it, the line once landed inside
                # a guest line that tail had shown half of.)
                echo "TIER2 net stats $($QMP /tmp/qmp.sock '{"execute":"__dev.moat_query-net-rate-limits"}')" >> /tmp/net.out
                $QMP /tmp/qmp.sock '{"execute":"set_link","arguments":{"name":"net0","up":false}}' > /dev/null
                wait_line /tmp/net.out "L2: carrier 0" $mpid
                $QMP /tmp/qmp.sock '{"execute":"set_link","arguments":{"name":"n0","up":true}}' > /dev/null
            fi
            # (At most 5 minutes in all, so a hang shows here, not as the
            # whole run's timeout.)
            ( sleep 300; kill -0 $mpid 2>/dev/null || exit 0
              echo "TIER2 net stuck $($QMP /tmp/qmp.sock '{"execute":"__dev.moat_query-net-rate-limits"}')"
              for t in /proc/$mpid/task/*; do echo "TIER2 net stuck thread $(cat $t/comm) $(cut -d' ' -f3,14,15 $t/stat) $(cat $t/wchan)"; done
              $VM $IP -s link show tap0; $VM cat /proc/net/tcp; ps; dmesg | grep -i -E 'oom|killed' | tail -5
              echo "TIER2 net stuck $($QMP /tmp/qmp.sock '{"execute":"__dev.moat_query-net-rate-limits"}')"
              kill $mpid 2>/dev/null && echo "TIER2 net moat killed after 300 s" ) &
            dog=$!
            wait $mpid
            mrc=$?
            kill $dog
            sleep 2; kill $tpid
            dmesg | grep -q 'soft lockup' && dmesg | tail -40
            echo "TIER2 net from-guest sha256 $(sha256sum /tmp/from-guest.bin | cut -d' ' -f1)"
            rm -f /tmp/to-guest.bin /tmp/from-guest.bin
            (exit $mrc) ;;
        net-passt)
            # -netdev stream to Debian's passt: the way an unprivileged user
            # gets a network. passt takes its addresses from L1's (a dummy
            # interface with a default route) and maps the gateway to L1.
            insmod /modules/dummy.ko
            # (dummy.ko makes dummy0 itself. passt maps the gateway's
            # address to L1's loopback.)
            $IP link set lo up
            $IP addr add 10.8.0.1/24 dev dummy0
            $IP link set dummy0 up
            $IP route add default via 10.8.0.254 dev dummy0
            echo "hello from L1 through passt" > /tmp/hello
            nc -l -p 5003 < /tmp/hello > /tmp/passt-got &
            # (passt sandboxes itself with pivot_root, which the initramfs
            # root refuses, and a user namespace, which a chroot may not
            # make: it runs in its own mount namespace whose root is a
            # bind mount of L1's, moved over / as switch_root does.)
            # (Bounded waits, and one more try: passt once never bound its
            # socket here, and an unbounded wait hung the whole run.)
            for try in 1 2; do
                rm -f /tmp/passt.sock
                unshare -m sh -c 'mkdir -p /passtroot && mount -o rbind / /passtroot && cd /passtroot &&
                    mount -o move . / && exec chroot . /moat/passt -f -1 -4 -e -s /tmp/passt.sock' > /tmp/passt.log 2>&1 &
                ppid=$!
                for _ in $(seq 300); do [ -S /tmp/passt.sock ] && break; usleep 100000; done
                [ -S /tmp/passt.sock ] && break
                echo "TIER2 net-passt: passt did not bind its socket (try $try):"; cat /tmp/passt.log; ps
                kill $ppid 2>/dev/null
            done
            $M -M microvm -m 256M -smp 2 $L2 -append "$CMD moat.test=dhcp" -nographic -no-reboot \
                -netdev stream,id=p0,server=off,addr.type=unix,addr.path=/tmp/passt.sock \
                -device virtio-net-device,netdev=p0
            mrc=$?
            echo "TIER2 net-passt L1 got: $(cat /tmp/passt-got)"
            grep -v syslog /tmp/passt.log
            (exit $mrc) ;;
        bench-net-moat|bench-net-qemu)
            # bench/net.sh: the same guest with moat's virtio-net and with
            # QEMU's (vhost=off), each on a one-queue tap in the namespace
            # "bn" (10.9.1.1).
            if [ ! -e /run/netns/bn ]; then
                insmod /modules/tun.ko 2>/dev/null
                mkdir -p /run /var && ln -sf /run /var/run && mount -t tmpfs run /run
                $IP netns add bn
                $IP -n bn link set lo up
                nsenter --net=/run/netns/bn $IP tuntap add dev tapb mode tap
                $IP -n bn addr add 10.9.1.1/24 dev tapb
                $IP -n bn link set tapb up
            fi
            BN="nsenter --net=/run/netns/bn"
            # (A run whose guest never connected leaves its servers behind.)
            pkill -f "nc -l -p 500[12]" 2>/dev/null; sleep 1
            $BN nc -l -p 5001 -e sh -c 'cat > /dev/null' &
            $BN nc -l -p 5002 -e sh -c 'dd if=/dev/zero bs=64k count=1024 2>/dev/null' &
            if [ $s = bench-net-moat ]; then
                $BN $M -M microvm -m 256M -smp 2 $L2 -append "$CMD moat.test=netbench" -nographic -no-reboot \
                    -netdev tap,id=n0,ifname=tapb,script=no,downscript=no -device virtio-net-device,netdev=n0
            else
                $BN qemu-system-x86_64 -M microvm,rtc=on -enable-kvm -cpu host -m 256M -smp 2 $L2 \
                    -append "$CMD moat.test=netbench" -nodefaults -serial stdio -nographic -no-reboot \
                    -netdev tap,id=n0,ifname=tapb,script=no,downscript=no,vhost=off -device virtio-net-device,netdev=n0
            fi ;;
        vsock)
            # The host ends of tier2/vsock.c: a listener for the guest's
            # stream (port 5000) and a SEQPACKET echo (port 5001), both
            # open to moat's user (it connects after dropping to nobody);
            # then 64 MiB each way on a connection into the guest.
            ( umask 0; exec /moat/vsockt serve unix:/tmp/v.sock_5000 $((64 << 20)) ) > /tmp/vs-out.log 2>&1 &
            ( umask 0; exec /moat/vsockt seq-echo unix:/tmp/v.sock_5001 ) > /dev/null 2>&1 &
            epid=$!
            : > /tmp/vs.out
            $M -M microvm -m 256M -smp 2 $L2 -append "$CMD moat.test=vsock" -nographic -no-reboot \
                -device virtio-vsock-device,guest-cid=3,uds-path=/tmp/v.sock > /tmp/vs.out 2>&1 &
            mpid=$!
            tail -f /tmp/vs.out &
            tpid=$!
            if wait_line /tmp/vs.out "L2: vsock listening" $mpid; then
                echo "TIER2 vsock host-in $(/moat/vsockt connect unix-connect:/tmp/v.sock:1234 $((64 << 20)) 2>&1 | tr '\n' ' ')"
            fi
            ( sleep 300; kill $mpid 2>/dev/null && echo "TIER2 vsock moat killed after 300 s" ) &
            dog=$!
            wait $mpid
            mrc=$?
            kill $dog $epid
            sleep 1; kill $tpid
            echo "TIER2 vsock host-out $(tr '\n' ' ' < /tmp/vs-out.log)"
            (exit $mrc) ;;
        bench-vsock-moat|bench-vsock-qemu)
            # bench/vsock.sh: the guest sends and receives 64 MiB and makes
            # 2000 round trips, with moat's vsock (UNIX sockets here) and
            # with QEMU's vhost-vsock-device (AF_VSOCK here).
            pkill -f vsockt 2>/dev/null; sleep 1
            if [ $s = bench-vsock-moat ]; then
                A=unix:/tmp/b.sock_
            else
                for m in vsock vmw_vsock_virtio_transport_common vhost_iotlb vhost vhost_vsock; do
                    [ -c /dev/vhost-vsock ] || insmod /modules/$m.ko 2>/dev/null
                done
                A=vsock:4294967295:
            fi
            ( umask 0; exec /moat/vsockt serve ${A}5000 $((64 << 20)) ) > /tmp/vb.log 2>&1 &
            spid=$!
            ( umask 0; exec /moat/vsockt echo ${A}5002 ) > /dev/null 2>&1 &
            epid=$!
            sleep 1
            if [ $s = bench-vsock-moat ]; then
                $M -M microvm -m 256M -smp 2 $L2 -append "$CMD moat.test=vsockbench" -nographic -no-reboot \
                    -device virtio-vsock-device,guest-cid=3,uds-path=/tmp/b.sock
            else
                [ -c /dev/vhost-vsock ] || echo "TIER2 bench-vsock-qemu: no /dev/vhost-vsock in the test host"
                qemu-system-x86_64 -M microvm,rtc=on -enable-kvm -cpu host -m 256M -smp 2 $L2 \
                    -append "$CMD moat.test=vsockbench" -nodefaults -serial stdio -nographic -no-reboot \
                    -device vhost-vsock-device,guest-cid=3
            fi
            kill $spid $epid 2>/dev/null; wait $spid $epid 2>/dev/null
            echo "TIER2 $s host $(tr '\n' ' ' < /tmp/vb.log)" ;;
        bench-moat|bench-moat-nothp|bench-moat-elf|bench-moat-nothp-elf)
            # -nothp: guest RAM without huge pages; -elf: the same kernel as
            # an ELF vmlinux.
            mach=microvm k="$L2"
            case $s in *-nothp*) mach=microvm,thp=off ;; esac
            case $s in *-elf) k="-kernel /l2/vmlinux -initrd /l2/initrd.gz" ;; esac
            bench ${s#bench-} $M -M $mach -m 256M -smp 2 $k -append "$CMD" -nographic -no-reboot ;;
        rss|rss-nothp|rss-nothp-smp1|rss-elf|rss-nothp-elf)
            # Where moat's resident memory is once the guest is up (read
            # from L1 in /proc/PID/smaps; guest RAM is what moat madvised,
            # VmFlags hg or nh). -nothp: 4 KiB pages, so the breakdown
            # shows what the guest itself touched; -smp1: one vCPU; -elf:
            # the kernel as an ELF vmlinux (no decompressor).
            mach=microvm smp=2 k="$L2"
            case $s in *-nothp*) mach=microvm,thp=off ;; esac
            case $s in *-smp1) smp=1 ;; esac
            case $s in *-elf) k="-kernel /l2/vmlinux -initrd /l2/initrd.gz" ;; esac
            : > /tmp/rss.out
            $M -M $mach -m 256M -smp $smp $k -append "$CMD moat.test=linger" -nographic -no-reboot \
                > /tmp/rss.out 2>&1 &
            mpid=$!
            wait_line /tmp/rss.out "L2: userspace reached" $mpid && sleep 2
            awk '/^[0-9a-f]+-[0-9a-f]+ / { cur = ($6 == "") ? "anonymous" : ($6 ~ /\.so/) ? "libraries" : $6; range = $1; next }
                 /^Rss:/ { r = $2 }
                 /^AnonHugePages:/ { h = $2 }
                 /^VmFlags:/ { if (cur == "anonymous" && / (hg|nh)/) cur = "guest-RAM";
                               if (cur != "guest-RAM" && r > 512)
                                   printf "TIER2 rss mapping %s %s %d kB (huge pages %d kB)\n", range, cur, r, h;
                               rss[cur] += r; huge[cur] += h; total += r }
                 END { for (k in rss) if (rss[k] > 0) printf "TIER2 rss %s %d kB (huge pages %d kB)\n", k, rss[k], huge[k];
                       printf "TIER2 rss total %d kB\n", total }' /proc/$mpid/smaps
            echo "TIER2 rss $(grep -E 'VmHWM|Threads' /proc/$mpid/status | tr -s ' \t\n' '  ')"
            # Which guest-physical ranges the guest has touched (8 MiB buckets).
            # (moat's RAM is one range of VMAs: the first 2 MiB "nh", the rest "hg".)
            ram=$(awk '/^[0-9a-f]+-[0-9a-f]+ / { split($1, a, "-"); s = a[1]; e = a[2] }
                       /^VmFlags:/ && / (hg|nh)/ { if (!lo) lo = s; hi = e }
                       END { print lo, hi }' /proc/$mpid/smaps)
            set -- $ram
            [ -n "$2" ] && /moat/pagemap $mpid $1 $((0x$2 - 0x$1))
            wait $mpid
            grep "L2: dmesg" /tmp/rss.out ;;
        rss-qemu)
            # The same breakdown for QEMU (its guest RAM: the largest mapping).
            : > /tmp/rss.out
            qemu-system-x86_64 -M microvm,rtc=on -enable-kvm -cpu host -m 256M -smp 2 $L2 \
                -append "$CMD moat.test=linger" -nodefaults -serial stdio -nographic -no-reboot \
                > /tmp/rss.out 2>&1 &
            mpid=$!
            wait_line /tmp/rss.out "L2: userspace reached" $mpid && sleep 2
            echo "TIER2 rss-qemu $(grep -E 'VmHWM|VmRSS|Threads' /proc/$mpid/status | tr -s ' \t\n' '  ')"
            ram=$(awk '/^[0-9a-f]+-[0-9a-f]+ / { split($1, a, "-"); print a[1], a[2] }' /proc/$mpid/maps |
                while read a b; do echo "$((0x$b - 0x$a)) $a"; done | sort -n | tail -1)
            set -- $ram
            [ -n "$2" ] && /moat/pagemap $mpid $2 $1
            wait $mpid
            grep "L2: dmesg" /tmp/rss.out ;;
        exits)
            # The boot's timeline and each vCPU's exits by kind and address.
            # (With the time from start to userspace, so slow boots can be
            # told from fast ones.)
            t0=$(now)
            MOAT_LOG=debug $M -M microvm -m 256M -smp 2 $L2 -append "$CMD" -nographic -no-reboot 2>&1 |
                while IFS= read -r line; do
                    case $line in *"L2: userspace reached"*) echo "TIER2 exits userspace after $(echo "$(now) $t0" | awk '{print $1 - $2}') s" ;; esac
                    case $line in *timeline*|*exits*|"  "*[0-9]" "*) echo "$line" ;; esac
                done ;;
        bench-qemu|bench-qemu-elf)
            k="$L2"
            case $s in *-elf) k="-kernel /l2/vmlinux -initrd /l2/initrd.gz" ;; esac
            bench ${s#bench-} qemu-system-x86_64 -M microvm,rtc=on -enable-kvm -cpu host -m 256M -smp 2 $k \
                -append "$CMD" -nodefaults -serial stdio -nographic -no-reboot ;;
        *) echo "unknown scenario $s" ;;
    esac
    rc=$?
    echo "TIER2 $s exit $rc start $start end $(now)"
done
echo "TIER2 done"
poweroff -f
