#!/usr/bin/env python3
"""Boot benchmark: moat vs qemu-system-x86_64 -M microvm, side by side.

For the Tier 1 minimal guest (guests/c/bench.S: a PVH ELF that prints one
line on COM1 and triple-faults, so -no-reboot ends either VMM) it measures,
per VMM, over N runs: wall time from process start to the first serial byte,
to process exit, and the peak RSS of the VMM process. Peak RSS comes from
/usr/bin/time (Debian package `time`): rusage taken by a forking Python
would count the Python interpreter's pages too. Prints medians and ratios.

    bench/boot.py [--runs N] [--moat PATH] [--guest PATH]

Not a test: nothing here asserts on time.
"""
import argparse, os, statistics, subprocess, sys, time

from common import ROOT, bench_guest, read_output


def measure(argv):
    rss_file = f"/tmp/moat-bench-rss-{os.getpid()}"
    argv = ["/usr/bin/time", "-f", "%M", "-o", rss_file] + argv
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    first, out = read_output(p, t0)
    _, status, _ = os.wait4(p.pid, 0)
    total = time.monotonic() - t0
    with open(rss_file) as f:
        rss_kib = int(f.read().split()[-1])
    ok = os.waitstatus_to_exitcode(status) == 0 and b"hello from COM1" in out
    return first, total, rss_kib, ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--moat", default=f"{ROOT}/target/release/moat")
    ap.add_argument("--guest", default=None)
    a = ap.parse_args()
    guest = a.guest or bench_guest()
    if not os.path.exists("/usr/bin/time"):
        sys.exit("bench needs /usr/bin/time (apt-get install time)")
    common = ["-m", "128M", "-kernel", guest, "-no-reboot"]
    vmms = {
        "moat": [a.moat, "-nodefaults", "-serial", "stdio"] + common,
        # -arch-capabilities: this nested KVM refuses that MSR and QEMU aborts.
        "qemu": ["qemu-system-x86_64", "-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities",
                 "-nodefaults", "-nographic", "-serial", "stdio"] + common,
    }
    res = {}
    for i in range(a.runs):
        for name, argv in vmms.items():  # interleaved, so drift hits both
            res.setdefault(name, []).append(measure(argv))
    print(f"boot benchmark: {a.runs} runs each, guest {os.path.basename(guest)}, medians")
    print(f"{'vmm':6} {'first byte ms':>14} {'exit ms':>10} {'peak RSS MiB':>13} {'ok':>5}")
    med = {}
    for name, rows in res.items():
        good = [r for r in rows if r[3]]
        if not good:
            print(f"{name:6} all runs failed")
            continue
        fb = statistics.median(r[0] for r in good) * 1e3
        ex = statistics.median(r[1] for r in good) * 1e3
        rss = statistics.median(r[2] for r in good) / 1024
        med[name] = (fb, ex, rss)
        print(f"{name:6} {fb:14.1f} {ex:10.1f} {rss:13.1f} {len(good):>2}/{len(rows)}")
    if "moat" in med and "qemu" in med:
        m, q = med["moat"], med["qemu"]
        print(f"ratio moat/qemu: first byte {m[0]/q[0]:.2f}x, exit {m[1]/q[1]:.2f}x, peak RSS {m[2]/q[2]:.2f}x")


if __name__ == "__main__":
    main()
