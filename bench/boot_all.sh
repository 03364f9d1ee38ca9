#!/usr/bin/env bash
# Start, boot and memory in one run, as ratios to QEMU (the README's "Start,
# boot and memory" table): the minimal guest on this host's KVM
# (bench/boot.py, bench/startup.py), then the Debian kernel in the nested
# Tier 2 host (bench/linux.sh).
#
#   bench/boot_all.sh [RUNS]      (after cargo build --release; MOAT_BIN= for another binary)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNS=${1:-3}
MOAT=${MOAT_BIN:-$ROOT/target/release/moat}
echo "== minimal PVH guest, this host's KVM"
python3 "$ROOT/bench/boot.py" --runs 20 --moat "$MOAT"
python3 "$ROOT/bench/startup.py" --runs 20 --moat "$MOAT"
echo "== Debian kernel, nested test host ($RUNS runs)"
MOAT_BIN=$MOAT bash "$ROOT/bench/linux.sh" "$RUNS"
