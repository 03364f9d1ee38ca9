#!/usr/bin/env python3
"""Startup timeline: where moat's time goes from exec to the guest's first
serial byte, phase by phase.

moat prints `moat: timeline <CLOCK_MONOTONIC seconds> <phase>` on stderr
under MOAT_LOG=debug (crates/sys/src/timeline.rs). This script takes its own
CLOCK_MONOTONIC just before spawning moat, so every phase is measured from
the spawn ("main" is then exec and the dynamic loader), and adds the first
byte on stdout as the last phase. It boots the bench guest (the same as
bench/boot.py) N times and prints each phase's median time since spawn and
its median share (time since the previous phase).

    bench/startup.py [--runs N] [--moat PATH] [--guest PATH] [-m SIZE]

Not a test: nothing here asserts on time. bench/boot.py compares the
totals with QEMU.
"""
import argparse
import os
import statistics
import subprocess
import time

from common import ROOT, bench_guest, read_output


def one(argv):
    """[(phase, ms since spawn)] for one run, or None if it failed."""
    env = dict(os.environ, MOAT_LOG="debug")
    t0 = time.monotonic()
    p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    first, _ = read_output(p, t0)
    err = p.stderr.read().decode(errors="replace")
    if p.wait() != 0 or first is None:
        return None
    first *= 1000
    phases = []
    for line in err.splitlines():
        parts = line.split(" ", 3)
        if len(parts) == 4 and parts[1] == "timeline":
            phases.append((parts[3], (float(parts[2]) - t0) * 1000))
    phases.append(("first serial byte (guest)", first))
    return phases


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--moat", default=f"{ROOT}/target/release/moat")
    ap.add_argument("--guest", default=None)
    ap.add_argument("-m", default="128M")
    a = ap.parse_args()
    argv = [a.moat, "-nodefaults", "-serial", "stdio", "-m", a.m, "-kernel",
            a.guest or bench_guest(), "-no-reboot"]
    runs = [r for r in (one(argv) for _ in range(a.runs)) if r]
    if not runs:
        raise SystemExit("moat did not boot the bench guest")
    # Phases in the order of the first run (threads may swap neighbours).
    names = [n for n, _ in runs[0]]
    at = {n: statistics.median(dict(r).get(n, float("nan")) for r in runs) for n in names}
    print(f"moat startup timeline: {len(runs)}/{a.runs} runs, -m {a.m}, medians in ms since spawn")
    print(f"{'since spawn':>11} {'step':>7}  phase")
    prev = 0.0
    for n in sorted(names, key=lambda n: at[n]):
        print(f"{at[n]:11.2f} {at[n] - prev:7.2f}  {n}")
        prev = at[n]


if __name__ == "__main__":
    main()
