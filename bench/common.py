"""What the benchmark scripts share."""
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def guest_file(name):
    """A guest image (guests/) from the release build."""
    found = [p for p in glob.glob(f"{ROOT}/target/release/build/moat-guests-*/out/{name}")]
    if not found:
        sys.exit("build first: cargo build --release")
    return max(found, key=os.path.getmtime)  # the newest build


def bench_guest():
    """The minimal PVH guest (guests/c/bench.S) from the release build."""
    return guest_file("bench-pvh.elf")
