#!/usr/bin/env python3
"""QMP round-trip latency of query-status over a UNIX socket: moat vs
qemu-system-x86_64, the same raw-socket client, in the same run.

    bench/qmp_latency.py [--rounds N] [--moat PATH]

Both VMMs are started with -S (prelaunch), so no guest code competes.
Prints the median and 99th percentile in microseconds and the ratio.
Not a test: nothing here asserts on time.
"""
import argparse, json, os, socket, statistics, subprocess, sys, tempfile, time

from common import ROOT, bench_guest


def measure(argv, sock, rounds):
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(3000):
            if os.path.exists(sock):
                break
            time.sleep(0.01)
        s = socket.socket(socket.AF_UNIX)
        s.connect(sock)
        f = s.makefile("rwb")
        json.loads(f.readline())
        f.write(b'{"execute": "qmp_capabilities"}\n'); f.flush(); f.readline()
        msg = b'{"execute": "query-status"}\n'
        times = []
        for i in range(rounds + 100):
            t = time.perf_counter()
            f.write(msg); f.flush()
            line = f.readline()
            dt = time.perf_counter() - t
            assert b'"return"' in line, line
            if i >= 100:  # warm-up
                times.append(dt * 1e6)
        s.close()
        return times
    finally:
        p.kill()
        p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--moat", default=f"{ROOT}/target/release/moat")
    a = ap.parse_args()
    d = tempfile.mkdtemp()
    g = bench_guest()
    runs = {
        "moat": lambda s: [a.moat, "-S", "-nodefaults", "-kernel", g, "-qmp", f"unix:{s},server=on,wait=off"],
        "qemu": lambda s: ["qemu-system-x86_64", "-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities",
                           "-S", "-nodefaults", "-display", "none", "-kernel", g,
                           "-qmp", f"unix:{s},server=on,wait=off"],
    }
    res = {}
    for name, argv in runs.items():
        sock = os.path.join(d, f"{name}.sock")
        res[name] = measure(argv(sock), sock, a.rounds)
    print(f"QMP query-status round trip over a UNIX socket, {a.rounds} rounds each")
    for name, t in res.items():
        t = sorted(t)
        print(f"{name:5} median {statistics.median(t):8.1f} us   p99 {t[int(len(t) * 0.99)]:8.1f} us")
    m, q = statistics.median(res["moat"]), statistics.median(res["qemu"])
    print(f"ratio moat/qemu (median): {m / q:.2f}x")


if __name__ == "__main__":
    main()
