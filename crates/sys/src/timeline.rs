//! The startup timeline: with `MOAT_LOG=debug` (or `trace`), each phase of
//! moat's start prints `moat: timeline <seconds> <phase>` on stderr, the
//! seconds being CLOCK_MONOTONIC's (the same clock as Python's
//! `time.monotonic()`), so a launcher can subtract its own spawn time
//! (`bench/startup.py` does). Off, a mark costs one relaxed atomic load.

use std::sync::atomic::{AtomicBool, Ordering};

static ON: AtomicBool = AtomicBool::new(false);

/// Print the marks from now on (main does, for `MOAT_LOG=debug`).
pub fn enable() {
    ON.store(true, Ordering::Relaxed);
}

/// Whether moat runs with `MOAT_LOG=debug` (and keeps such records).
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Note that `phase` has been reached.
pub fn mark(phase: &str) {
    if enabled() {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        eprintln!(
            "moat: timeline {}.{:06} {phase}",
            t.tv_sec,
            t.tv_nsec / 1000
        );
    }
}
