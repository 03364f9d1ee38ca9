#!/usr/bin/env python3
"""What the sandbox costs, moat and qemu-system-x86_64 side by side.

1. Time from process start to the first guest serial byte (the minimal
   guest, guests/c/bench.S), -sandbox on vs -sandbox off, for both VMMs
   (QEMU's -sandbox on is its own seccomp filter).
2. vCPU exit round trips: the Tier 1 test guest writes port 0x80 N times
   (pio_loop=N); the rate is N divided by the difference between a run with
   N writes and one with none, with and without the filter. Each exit is a
   KVM_RUN return and re-entry, so the seccomp filter runs once per exit.
3. moat-jail's CPU quota (as root, on this host's cgroups): a guest that keeps
   its vCPU busy, run through moat-jail without a quota and with
   --cpu-quota-us 50000 (half a CPU); the CPU time the VM's cgroup used per
   wall-clock second, against the quota.

Ratios are on/off (1.00x: the sandbox costs nothing). Not a test: nothing
here asserts on time.

    python3 bench/sandbox.py [--runs N] [--pio N] [--no-qemu]
"""
import argparse
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from common import ROOT, bench_guest, guest_file

MOAT = f"{ROOT}/target/release/moat"
JAIL = f"{ROOT}/target/release/moat-jail"
QEMU = ["qemu-system-x86_64", "-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities",
        "-nodefaults", "-nographic"]


def first_byte(argv):
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    r, _, _ = select.select([p.stdout], [], [], 30)
    t = time.perf_counter() - t0 if r and os.read(p.stdout.fileno(), 1) else None
    p.kill()
    p.wait()
    return t


def wall(argv):
    t0 = time.perf_counter()
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=600)
    return time.perf_counter() - t0 if p.returncode == 0 else None


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "n/a"


def vmms(guest, serial, use_qemu):
    """Each VMM's command line for `guest` with COM1 on `serial`."""
    base = ["-m", "128M", "-kernel", guest, "-no-reboot", "-serial", serial]
    out = {"moat": [MOAT, "-nodefaults"] + base}
    if use_qemu:
        out["qemu"] = QEMU + base
    return out


def startup(runs, use_qemu):
    print(f"1. time to the first serial byte, median of {runs} runs")
    print(f"{'vmm':6} {'sandbox on ms':>14} {'off ms':>8} {'on/off':>8}")
    for name, argv in vmms(bench_guest(), "stdio", use_qemu).items():
        on, off = [], []
        for _ in range(runs):  # interleaved, so drift hits both
            on.append(first_byte(argv + ["-sandbox", "on"]))
            off.append(first_byte(argv + ["-sandbox", "off"]))
        a, b = med(on), med(off)
        print(f"{name:6} {a * 1e3 if a else float('nan'):14.1f} {b * 1e3 if b else float('nan'):8.1f} {ratio(a, b):>8}")


def exits(runs, n, use_qemu):
    print(f"2. vCPU exit round trips (port 0x80 writes), {n} per run, median of {runs} runs")
    print(f"{'vmm':6} {'sandbox on /s':>14} {'off /s':>10} {'on/off':>8}")
    for name, argv in vmms(guest_file("test-pvh.elf"), "null", use_qemu).items():
        rates = {}
        for mode in ("on", "off"):
            per = []
            for _ in range(runs):
                args = argv + ["-sandbox", mode, "-append"]
                t_n = wall(args + [f"pio_loop={n} action=triple"])
                t_0 = wall(args + ["pio_loop=0 action=triple"])
                per.append(n / (t_n - t_0) if t_n and t_0 and t_n > t_0 else None)
            rates[mode] = med(per)
        a, b = rates["on"], rates["off"]
        print(f"{name:6} {a or float('nan'):14.0f} {b or float('nan'):10.0f} {ratio(a, b):>8}")


def cgroup_cpu_seconds(pid):
    """CPU time used so far by the cgroup holding pid (v2 cpu.stat or v1 cpuacct)."""
    for line in open(f"/proc/{pid}/cgroup").read().splitlines():
        hid, ctrls, path = line.split(":", 2)
        if hid == "0" and os.path.exists(f"/sys/fs/cgroup/{path}/cpu.stat") and ctrls == "":
            for l in open(f"/sys/fs/cgroup/{path}/cpu.stat"):
                if l.startswith("usage_usec"):
                    return int(l.split()[1]) / 1e6
        if "cpuacct" in ctrls.split(","):
            mount = "/sys/fs/cgroup/cpuacct"
            if not os.path.exists(f"{mount}{path}/cpuacct.usage"):
                mount = "/sys/fs/cgroup/cpu,cpuacct"
            return int(open(f"{mount}{path}/cpuacct.usage").read()) / 1e9
    return None


def quota(window):
    if os.geteuid() != 0:
        print("3. moat-jail CPU quota: skipped (needs root)")
        return
    guest = guest_file("test-pvh.elf")
    print(f"3. moat-jail CPU quota: CPU seconds per second used by the VM's cgroup over {window} s")
    print(f"{'quota':>12} {'used CPUs':>10} {'used/quota':>11}")
    base = tempfile.mkdtemp(prefix="moat-bench-jail-")
    try:
        for q in (None, 50000):
            args = [JAIL, "--id", f"bench{os.getpid()}", "--uid", "65534", "--gid", "65534",
                    "--exec-file", MOAT, "--chroot-base-dir", base, "--ro", f"{guest}:/guest.elf"]
            if q:
                args += ["--cpu-quota-us", str(q), "--cpu-period-us", "100000"]
            args += ["--", "-kernel", "/guest.elf", "-append", "action=count", "-serial", "null"]
            p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)
            pid = None
            for _ in range(500):
                kids = open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()
                if kids:
                    pid = int(kids[0])
                    break
                time.sleep(0.01)
            time.sleep(1)
            c0, t0 = cgroup_cpu_seconds(pid), time.perf_counter()
            time.sleep(window)
            c1, t1 = cgroup_cpu_seconds(pid), time.perf_counter()
            p.terminate()
            p.wait()
            used = (c1 - c0) / (t1 - t0)
            limit = q / 100000 if q else None
            print(f"{(f'{limit:.2f} CPU' if limit else 'none'):>12} {used:10.2f} "
                  f"{(f'{used / limit:.2f}x' if limit else ''):>11}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--pio", type=int, default=200000)
    ap.add_argument("--window", type=float, default=5)
    ap.add_argument("--no-qemu", action="store_true")
    a = ap.parse_args()
    use_qemu = not a.no_qemu and shutil.which("qemu-system-x86_64")
    if not os.path.exists(MOAT):
        sys.exit("build first: cargo build --release")
    startup(a.runs, use_qemu)
    exits(max(3, a.runs // 3), a.pio, use_qemu)
    quota(a.window)


if __name__ == "__main__":
    main()
