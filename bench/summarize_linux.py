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
    # A run whose guest never reached userspace (the nested test host makes
    # an L2 guest triple-fault now and then) is left out, and said.
    ok = [r for r in rs if not math.isnan(r[1])]
    if not ok:
        print("%-6s no run reached userspace (%d runs)" % (vmm, len(rs)))
        continue
    m = [statistics.median(r[i] for r in ok) for i in range(4)]
    med[vmm] = m
    rcs = sorted(set(r[4] for r in rs))
    lost = "" if len(ok) == len(rs) else ", %d left out: no userspace" % (len(rs) - len(ok))
    print("%-6s %13.2f %12.2f %8.2f %13.1f   (%d runs, exit codes %s%s)" % (vmm, *m, len(rs), rcs, lost))
for vmm in [v for v in med if v.startswith("moat")]:
    # moat-X-elf against qemu-elf, the others against qemu.
    q = "qemu-elf" if vmm.endswith("-elf") else "qemu"
    if q in med:
        a, b = med[vmm], med[q]
        # The runs alternate, so the i-th of each is a pair from the same
        # stretch of the test host's life: the spread of the pairs' ratios.
        pairs = [x[1] / y[1] for x, y in zip(rows[vmm], rows[q]) if not math.isnan(x[1] + y[1])]
        spread = " (pairs %.2f-%.2fx)" % (min(pairs), max(pairs)) if pairs else ""
        print("ratio %s/%s: first byte %.2fx, userspace %.2fx%s, exit %.2fx, peak RSS %.2fx"
              % (vmm, q, a[0] / b[0], a[1] / b[1], spread, a[2] / b[2], a[3] / b[3]))
