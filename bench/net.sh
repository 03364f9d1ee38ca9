#!/usr/bin/env bash
# Tier 2 network benchmark: the same Debian guest on a one-queue tap with
# moat's virtio-net and with QEMU's virtio-net-device (vhost=off), runs
# alternating, in one boot of the nested test host (see tier2/). Each run:
# ping round-trip time (20 pings), then TCP throughput guest->host and
# host->guest (64 MiB each, busybox nc, timed by the guest's clock).
# Prints per-run numbers and the median ratios moat/QEMU.
#
#   bench/net.sh [RUNS]      (after cargo build --release; MOAT_BIN= for another binary)
#
# (Under the nested TCG host both are far slower than on hardware; the
# ratio is what this measures. iperf3 is not used: the nested host and
# guest have busybox only, and nc's stream measures the same path.)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNS=${1:-3}
SCEN=""
for _ in $(seq "$RUNS"); do SCEN="$SCEN bench-net-moat bench-net-qemu"; done
OUT=$(MOAT_TIER2_QEMU=1 bash "$ROOT/tier2/run.sh" "${MOAT_BIN:-$ROOT/target/release/moat}" $SCEN | tr -d '\r')
echo "$OUT" | python3 -c '
import re, statistics, sys
runs = {"moat": [], "qemu": []}
cur = None
for line in sys.stdin:
    m = re.match(r"TIER2 bench-net-(moat|qemu) begin", line)
    if m:
        cur = {"who": m.group(1)}
        runs[m.group(1)].append(cur)
        continue
    if cur is None:
        continue
    m = re.match(r"L2: netbench rtt ([0-9.]+)", line)
    if m:
        cur["rtt_ms"] = float(m.group(1))
    m = re.match(r"L2: netbench (up|down) (\d+) ([0-9.]+) ([0-9.]+)", line)
    if m:
        secs = float(m.group(4)) - float(m.group(3))
        mb = int(m.group(2)) / 1e6
        # (Only a whole transfer counts: a short one stalled or broke.)
        if secs > 0 and int(m.group(2)) == 64 << 20:
            cur[m.group(1) + "_MBps"] = mb / secs
keys = ["up_MBps", "down_MBps", "rtt_ms"]
ok = True
# (A run whose transfer did not finish is reported and left out.)
for who, rs in runs.items():
    for i, r in enumerate(rs):
        print(who, "run", i + 1, " ".join("%s=%.2f" % (k, r.get(k, float("nan"))) for k in keys))
runs = {w: [r for r in rs if all(k in r for k in keys)] for w, rs in runs.items()}
if not runs["moat"] or not runs["qemu"]:
    sys.exit("bench/net.sh: no complete run of one of them (see tier2 output)")
med = {w: {k: statistics.median(r[k] for r in rs) for k in keys} for w, rs in runs.items()}
for k in keys:
    m, q = med["moat"][k], med["qemu"][k]
    print("median %s: moat %.2f qemu %.2f ratio moat/qemu %.2f" % (k, m, q, m / q))
' || { echo "$OUT" | tail -40; exit 1; }
