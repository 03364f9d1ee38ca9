"""What the benchmark scripts share."""
import glob
import os
import select
import sys
import time

# moat refuses to run as root without -run-with user=; the benchmarks run
# it as root, like the QEMU they compare it with.
os.environ.setdefault("MOAT_DANGEROUSLY_ALLOW_ROOT", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def guest_file(name):
    """A guest image (guests/) from the release build."""
    target = os.environ.get("CARGO_TARGET_DIR", f"{ROOT}/target")
    found = [p for p in glob.glob(f"{target}/release/build/moat-guests-*/out/{name}")]
    if not found:
        sys.exit("build first: cargo build --release")
    return max(found, key=os.path.getmtime)  # the newest build


def bench_guest():
    """The minimal PVH guest (guests/c/bench.S) from the release build."""
    return guest_file("bench-pvh.elf")


def read_output(p, t0):
    """Read process p's stdout to its end (killing p after 30 s without a
    byte): (time.monotonic() - t0 at the first byte, or None; all bytes)."""
    fd = p.stdout.fileno()
    first = None
    out = b""
    while True:
        r, _, _ = select.select([fd], [], [], 30)
        if not r:
            p.kill()
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        if first is None:
            first = time.monotonic() - t0
        out += chunk
    return first, out
