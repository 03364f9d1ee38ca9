#!/usr/bin/env python3
"""Disk throughput, moat vs qemu-system-x86_64, same guest and images, same run.

The Tier 1 test guest (blk_bench=MODE) issues one request at a time without
end; the host reads `query-blockstats` over QMP at the start and end of a
window and divides. Modes: sequential 1 MiB and random 4 KiB reads and
writes, on raw and qcow2 images. Then throttling: the guest writes as fast as
it can against `throttling.bps-write=` and the measured rate is printed
against the limit (the goal is within +-5% over a 10 s window).

On this nested PVM host the guest's own CPL0 code is emulated slowly, so the
numbers are lower than a real host's, but both VMMs run the same guest.

    python3 bench/io.py [--window SECONDS] [--no-qemu]     (MOAT_BIN= for another binary)
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from common import ROOT, guest_file

MOAT = os.environ.get("MOAT_BIN", f"{ROOT}/target/release/moat")


def qmp_blockstats(path):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    f = s.makefile("rwb")
    f.readline()
    for cmd in ("qmp_capabilities", "query-blockstats"):
        f.write(json.dumps({"execute": cmd}).encode() + b"\n")
        f.flush()
        while True:
            msg = json.loads(f.readline())
            if "return" in msg or "error" in msg:
                break
    s.close()
    st = msg["return"][0]["stats"]
    return st["rd_bytes"] + st["wr_bytes"], st["rd_operations"] + st["wr_operations"]


def run(engine, guest, image, fmt, mode, bs, window, tmp, throttle=None):
    qmp = os.path.join(tmp, f"{engine}.qmp")
    serial = os.path.join(tmp, f"{engine}.serial")
    for p in (qmp, serial):
        if os.path.exists(p):
            os.unlink(p)
    append = f"blk=1 blk_bench={mode} blk_bs={bs}"
    drive = f"file={image},format={fmt},if=none,id=disk0,cache=writeback"
    if throttle:
        drive += f",throttling.bps-write={throttle}"
    common = ["-m", "256", "-kernel", guest, "-serial", f"file:{serial}",
              "-qmp", f"unix:{qmp},server=on,wait=off", "-drive", drive,
              "-device", "virtio-blk-device,drive=disk0"]
    if engine == "moat":
        cmd = [MOAT, "-append", append] + common
    else:
        cmd = ["qemu-system-x86_64", "-M", "microvm", "-accel", "kvm", "-cpu", "host,-arch-capabilities",
               "-nodefaults", "-no-user-config", "-display", "none",
               "-global", "virtio-mmio.force-legacy=false",
               "-append", append + " virtio_base=0xfeb00000 virtio_stride=0x200"] + common
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        end = time.monotonic() + 60
        while True:
            log = open(serial, errors="replace").read() if os.path.exists(serial) else ""
            if "bench running" in log:
                break
            if "FAIL" in log or p.poll() is not None or time.monotonic() > end:
                sys.exit(f"{engine} {mode}: the guest did not start its I/O: {log[-500:]} "
                         f"{p.stderr.read().decode() if p.poll() is not None else ''}")
            time.sleep(0.05)
        time.sleep(0.5)  # past the first requests
        b0, o0 = qmp_blockstats(qmp)
        t0 = time.monotonic()
        time.sleep(window)
        b1, o1 = qmp_blockstats(qmp)
        t1 = time.monotonic()
        return (b1 - b0) / (t1 - t0), (o1 - o0) / (t1 - t0)
    finally:
        p.kill()
        p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--window", type=float, default=5.0)
    ap.add_argument("--no-qemu", action="store_true")
    a = ap.parse_args()
    guest = guest_file("test-pvh.elf")
    engines = ["moat"] + ([] if a.no_qemu or not shutil.which("qemu-system-x86_64") else ["qemu"])
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "d.raw")
        with open(raw, "wb") as f:
            f.truncate(256 << 20)
        qcow = os.path.join(tmp, "d.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", qcow, "256M"], check=True)
        print(f"{'image':6} {'mode':10} {'bs':>8} " + " ".join(f"{e + ' MiB/s':>12} {e + ' IOPS':>10}" for e in engines)
              + ("  moat/qemu" if len(engines) == 2 else ""))
        for fmt, image in (("raw", raw), ("qcow2", qcow)):
            for mode, bs in (("seqwrite", 1 << 20), ("seqread", 1 << 20), ("randwrite", 4096), ("randread", 4096)):
                res = [run(e, guest, image, fmt, mode, bs, a.window, tmp) for e in engines]
                line = f"{fmt:6} {mode:10} {bs:>8} " + " ".join(f"{r[0] / 2**20:12.1f} {r[1]:10.0f}" for r in res)
                if len(res) == 2 and res[1][0] > 0:
                    line += f"  {res[0][0] / res[1][0]:.2f}x"
                print(line, flush=True)
        print("\nthrottling.bps-write, 4 KiB random writes, 10 s window:")
        for limit in (1 << 20, 256 << 10):
            for e in engines:
                rate, _ = run(e, guest, raw, "raw", "randwrite", 4096, 10.0, tmp, throttle=limit)
                print(f"  {e:5} limit {limit:>8} B/s  measured {rate:10.0f} B/s  = {rate / limit:.3f}x the limit",
                      flush=True)


if __name__ == "__main__":
    main()
