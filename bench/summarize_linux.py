"""Summarize 'TIER2 bench' lines from bench/linux.sh: medians and moat/QEMU ratios."""
import math
import statistics
import sys

rows = {}
for line in sys.stdin:
    f = line.split()
    vmm = f[2]
    d = dict(zip(f[3::2], f[4::2]))
    t0 = float(d["start"])

    def since(k):
        return float(d[k]) - t0 if d.get(k, "none") != "none" else math.nan

    hwm = int(d.get("hwm_kb") or 0) / 1024
    rows.setdefault(vmm, []).append((since("first"), since("userspace"), since("end"), hwm, d.get("rc")))

med = {}
print("%-6s %13s %12s %8s %13s" % ("vmm", "first byte s", "userspace s", "exit s", "peak RSS MiB"))
for vmm, rs in rows.items():
    m = [statistics.median(r[i] for r in rs) for i in range(4)]
    med[vmm] = m
    rcs = sorted(set(r[4] for r in rs))
    print("%-6s %13.2f %12.2f %8.2f %13.1f   (%d runs, exit codes %s)" % (vmm, *m, len(rs), rcs))
for vmm in [v for v in med if v.startswith("moat")]:
    # moat-X-elf against qemu-elf, the others against qemu.
    q = "qemu-elf" if vmm.endswith("-elf") else "qemu"
    if q in med:
        a, b = med[vmm], med[q]
        print("ratio %s/%s: first byte %.2fx, userspace %.2fx, exit %.2fx, peak RSS %.2fx"
              % (vmm, q, *tuple(x / y for x, y in zip(a, b))))
