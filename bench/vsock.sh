#!/usr/bin/env bash
# Tier 2 vsock benchmark: the same Debian guest with moat's
# virtio-vsock-device (host ends on UNIX sockets) and with QEMU's
# vhost-vsock-device (host ends on AF_VSOCK through the test host's
# vhost_vsock), runs alternating, in one boot of the nested test host (see
# tier2/). Each run: the guest connects to the host (CID 2), sends 64 MiB
# and receives 64 MiB (tier2/vsock.c, timed by the guest's clock), then
# makes 2000 one-byte round trips. Prints per-run numbers and the median
# ratios moat/QEMU. (Firecracker's published figures are for other
# hardware; QEMU's vhost-vsock in the same boot is the comparison here.)
#
#   bench/vsock.sh [RUNS]      (after cargo build --release)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNS=${1:-3}
SCEN=""
for _ in $(seq "$RUNS"); do SCEN="$SCEN bench-vsock-moat bench-vsock-qemu"; done
OUT=$(MOAT_TIER2_QEMU=1 bash "$ROOT/tier2/run.sh" "$ROOT/target/release/moat" $SCEN | tr -d '\r')
echo "$OUT" | python3 -c '
import re, statistics, sys
runs = {"moat": [], "qemu": []}
cur = None
for line in sys.stdin:
    if "no /dev/vhost-vsock" in line:
        print(line.strip())
    m = re.match(r"TIER2 bench-vsock-(moat|qemu) begin", line)
    if m:
        cur = {}
        runs[m.group(1)].append(cur)
        continue
    if cur is None or not line.startswith("L2: vsockbench"):
        continue
    m = re.search(r"sent (\d+) fnv \w+ secs ([0-9.]+)", line)
    if m and int(m.group(1)) == 64 << 20:
        cur["up_MBps"] = int(m.group(1)) / 1e6 / float(m.group(2))
    m = re.search(r"recv (\d+) fnv \w+ secs ([0-9.]+)", line)
    if m and int(m.group(1)) == 64 << 20:
        cur["down_MBps"] = int(m.group(1)) / 1e6 / float(m.group(2))
    m = re.search(r"rtt (\d+) avg_us ([0-9.]+)", line)
    if m:
        cur["rtt_us"] = float(m.group(2))
keys = ["up_MBps", "down_MBps", "rtt_us"]
for who, rs in runs.items():
    for i, r in enumerate(rs):
        print(who, "run", i + 1, " ".join("%s=%.2f" % (k, r.get(k, float("nan"))) for k in keys))
runs = {w: [r for r in rs if all(k in r for k in keys)] for w, rs in runs.items()}
if not runs["moat"] or not runs["qemu"]:
    sys.exit("bench/vsock.sh: no complete run of one of them (see tier2 output)")
med = {w: {k: statistics.median(r[k] for r in rs) for k in keys} for w, rs in runs.items()}
for k in keys:
    m, q = med["moat"][k], med["qemu"][k]
    print("median %s: moat %.2f qemu %.2f ratio moat/qemu %.2f" % (k, m, q, m / q))
' || { echo "$OUT" | tail -40; exit 1; }
