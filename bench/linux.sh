#!/usr/bin/env bash
# Tier 2 boot benchmark: a Debian kernel + busybox initramfs booted by moat
# and by qemu-system-x86_64 -M microvm,rtc=on, alternately, in one boot of the
# nested test host (see tier2/). Prints per-run times (from process start:
# first console byte, userspace reached, exit), peak RSS, and median ratios.
#
#   bench/linux.sh [RUNS]      (default 5; after cargo build --release; MOAT_BIN= for another binary)
#
# The test host is emulated (TCG on a nested host): its runs drift by 10-20%,
# so the ratio of each alternating pair is printed too, and a run whose L2
# guest never reached userspace (a triple fault the test host causes now and
# then) is left out of the medians and counted.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNS=${1:-5}
SCEN=""
# (bzImage as Debian ships it, then the same kernel as an ELF vmlinux.)
for _ in $(seq "$RUNS"); do
    SCEN="$SCEN bench-moat bench-moat-nothp bench-qemu bench-moat-elf bench-moat-nothp-elf bench-qemu-elf"
done
# Once more under MOAT_LOG=debug: the start's timeline and the exit counts;
# and where moat's resident memory is once the guest is up: by mapping, and
# guest RAM by guest-physical address (8 MiB buckets), with 2 MiB pages, with
# 4 KiB pages (what the guest itself touched), and the same for QEMU.
SCEN="$SCEN exits rss rss-nothp rss-qemu"
OUT=$(MOAT_TIER2_QEMU=1 bash "$ROOT/tier2/run.sh" "${MOAT_BIN:-$ROOT/target/release/moat}" $SCEN | tr -d '\r')
echo "$OUT" | sed -n '/TIER2 exits begin/,/TIER2 exits exit/p'
echo "$OUT" | grep -E "TIER2 (rss|pagemap)|L2: dmesg" | tr '|' '\n'
echo "$OUT" | grep "TIER2 bench " || { echo "$OUT" | tail -40; exit 1; }
echo "$OUT" | grep "TIER2 bench " | python3 "$ROOT/bench/summarize_linux.py"
