#!/usr/bin/env bash
# Run every cargo-fuzz target for a bounded time: fuzz/run.sh [SECONDS_EACH]
set -euo pipefail
cd "$(dirname "$0")"
SECS=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# cargo-fuzz needs -Z flags; the stable toolchain accepts them this way.
export RUSTC_BOOTSTRAP=1
# Seed the loaders with the real test guests, when a build made them.
for out in ../target/*/build/moat-guests-*/out; do
    [ -d "$out" ] || continue
    mkdir -p corpus/elf_loader corpus/bzimage_loader
    cp "$out"/test-pvh.elf "$out"/test-elf64.elf "$out"/demo.elf corpus/elf_loader/ 2>/dev/null || true
    cp "$out"/test-bzimage "$out"/test-bzimage32 corpus/bzimage_loader/ 2>/dev/null || true
done
# Seed qcow2 with small images of several shapes, when qemu-img is here.
if command -v qemu-img >/dev/null; then
    mkdir -p corpus/qcow2
    tmp=$(mktemp -d)
    head -c 65536 /dev/urandom > "$tmp/src"
    for o in cluster_size=512 cluster_size=512,refcount_bits=1 cluster_size=1024,compat=0.10 cluster_size=512,refcount_bits=64; do
        qemu-img convert -f raw -O qcow2 -o "$o" "$tmp/src" "corpus/qcow2/seed-$o" >/dev/null
    done
    qemu-img convert -c -f raw -O qcow2 -o cluster_size=512 "$tmp/src" corpus/qcow2/seed-compressed >/dev/null
    qemu-img convert -c -f raw -O qcow2 -o cluster_size=512,compression_type=zstd "$tmp/src" corpus/qcow2/seed-zstd >/dev/null
    # A dirty image (lazy refcounts, writer killed): the repair's input.
    qemu-img create -q -f qcow2 -o cluster_size=512,lazy_refcounts=on corpus/qcow2/seed-dirty 64k
    # (In a subshell whose stderr is dropped: bash reports the kill.)
    (qemu-io -c "write -P 0x5a 0 20k" -c "sigraise 9" corpus/qcow2/seed-dirty >/dev/null 2>&1 || true) 2>/dev/null
    # Extended L2 entries (subclusters need 16 KiB clusters, so this seed is
    # larger than the other targets' inputs may grow: see max_len below).
    qemu-img create -q -f qcow2 -o cluster_size=16k,extended_l2=on corpus/qcow2/seed-extl2 256k
    qemu-io -c "write -P 0x5a 1k 1k" -c "write -z 4k 2k" -c "write -P 0x33 20k 16k" \
        -c "write -c -P 0x44 48k 16k" corpus/qcow2/seed-extl2 >/dev/null
    rm -rf "$tmp"
fi
for t in $(cargo fuzz list); do
    echo "fuzz: $t for ${SECS}s"
    mkdir -p corpus/$t
    # Committed seeds: inputs that once broke moat (see seeds/README).
    if [ -d seeds/$t ]; then cp seeds/$t/* corpus/$t/; fi
    max_len=65536
    [ "$t" = qcow2 ] && max_len=196608
    cargo fuzz run "$t" corpus/$t -- -max_total_time="$SECS" -max_len=$max_len -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 2>&1 | tail -n 12
done
echo "fuzz: all targets ran without a crash"
