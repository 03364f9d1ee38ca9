"""What the benchmark scripts share."""
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_guest():
    """The minimal PVH guest (guests/c/bench.S) from the release build."""
    for out in sorted(glob.glob(f"{ROOT}/target/release/build/moat-guests-*/out")):
        p = os.path.join(out, "bench-pvh.elf")
        if os.path.exists(p):
            return p
    sys.exit("build first: cargo build --release")
