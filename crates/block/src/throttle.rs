//! I/O throttling: QEMU's leaky buckets (util/throttle.c), per drive.
//!
//! Six buckets (bytes and operations; total, read, write), each with an
//! average rate and an optional burst rate allowed for a burst length.
//! Written here because the algorithm must be QEMU's to give the same
//! guest-visible rates and bursts for the same `throttling.*` values, and no
//! crate implements it: a request may start when, after leaking the buckets
//! for the time passed, no bucket it touches is over its size (average/10
//! without a burst rate; burst rate x burst length with one, plus the burst
//! bucket of burst rate/10); then its bytes and operations are added.
//! Only reads and writes are throttled, as in QEMU.
//!
//! Time is a parameter, so the arithmetic is tested without a clock; the
//! I/O thread waits the returned delay (interruptibly) and asks again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use moat_config::ThrottleLimits;

const NS: f64 = 1e9;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    avg: f64,
    max: f64,
    burst_length: f64,
    level: f64,
    burst_level: f64,
}

impl Bucket {
    fn leak(&mut self, delta_ns: f64) {
        self.level = (self.level - self.avg * delta_ns / NS).max(0.0);
        if self.burst_length > 1.0 {
            self.burst_level = (self.burst_level - self.max * delta_ns / NS).max(0.0);
        }
    }

    /// How long the next request must wait, in ns (0: it may start).
    fn wait_ns(&self) -> f64 {
        if self.avg == 0.0 {
            return 0.0;
        }
        let (bucket, burst_bucket) = if self.max == 0.0 {
            (self.avg / 10.0, 0.0)
        } else {
            (self.max * self.burst_length, self.max / 10.0)
        };
        let extra = self.level - bucket;
        if extra > 0.0 {
            return extra * NS / self.avg;
        }
        if self.burst_length > 1.0 {
            let extra = self.burst_level - burst_bucket;
            if extra > 0.0 {
                return extra * NS / self.max;
            }
        }
        0.0
    }

    fn account(&mut self, units: f64) {
        self.level += units;
        if self.burst_length > 1.0 {
            self.burst_level += units;
        }
    }
}

const BPS_TOTAL: usize = 0;
const BPS_READ: usize = 1;
const BPS_WRITE: usize = 2;
const OPS_TOTAL: usize = 3;
const OPS_READ: usize = 4;
const OPS_WRITE: usize = 5;

#[derive(Debug)]
struct State {
    limits: ThrottleLimits,
    buckets: [Bucket; 6],
    /// Time of the last leak; `None` until the first request.
    previous: Option<Instant>,
}

/// The throttle of one drive; shared by its I/O thread and the monitor.
#[derive(Debug)]
pub struct Throttle {
    state: Mutex<State>,
}

impl Throttle {
    pub fn new(limits: ThrottleLimits) -> Throttle {
        Throttle {
            state: Mutex::new(State::new(limits)),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> ThrottleLimits {
        self.lock().limits
    }

    /// Replace the limits (QMP `block_set_io_throttle`); the buckets start
    /// empty, as QEMU's throttle_config() leaves them.
    pub fn set(&self, limits: ThrottleLimits) {
        *self.lock() = State::new(limits);
    }

    /// May a request of `bytes` start at `now`? `None`: yes, and it has been
    /// counted. `Some(d)`: ask again after `d`.
    pub fn admit(&self, write: bool, bytes: u64, now: Instant) -> Option<Duration> {
        let mut s = self.lock();
        if !s.limits.enabled() {
            return None;
        }
        if let Some(prev) = s.previous {
            let delta = now.saturating_duration_since(prev).as_nanos() as f64;
            s.buckets.iter_mut().for_each(|b| b.leak(delta));
        }
        s.previous = Some(now);
        let (bps_dir, ops_dir) = if write {
            (BPS_WRITE, OPS_WRITE)
        } else {
            (BPS_READ, OPS_READ)
        };
        let touched = [BPS_TOTAL, OPS_TOTAL, bps_dir, ops_dir];
        let wait = touched
            .iter()
            .map(|&i| s.buckets[i].wait_ns())
            .fold(0.0, f64::max);
        if wait > 0.0 {
            // At least a microsecond, so a waiter never spins on rounding.
            return Some(Duration::from_nanos(wait.max(1000.0) as u64));
        }
        let size = s.limits.iops_size;
        let units = if size != 0 && bytes > size {
            bytes as f64 / size as f64
        } else {
            1.0
        };
        s.buckets[BPS_TOTAL].account(bytes as f64);
        s.buckets[bps_dir].account(bytes as f64);
        s.buckets[OPS_TOTAL].account(units);
        s.buckets[ops_dir].account(units);
        None
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    fn new(limits: ThrottleLimits) -> State {
        let mut buckets = [Bucket::default(); 6];
        for (b, (avg, max, len)) in buckets.iter_mut().zip(limits.buckets()) {
            b.avg = avg as f64;
            b.max = max as f64;
            b.burst_length = len as f64;
        }
        State {
            limits,
            buckets,
            previous: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(f: impl FnOnce(&mut ThrottleLimits)) -> ThrottleLimits {
        let mut l = ThrottleLimits::default();
        f(&mut l);
        l.validate().unwrap();
        l
    }

    /// Drive `t` as a guest that always has a request ready: admit at once
    /// or wait the returned delay. Returns (requests, bytes) admitted in `secs`.
    fn hammer(t: &Throttle, write: bool, bytes: u64, secs: f64) -> (u64, u64) {
        let start = Instant::now();
        let end = start + Duration::from_secs_f64(secs);
        let mut now = start;
        let mut n = 0;
        while now < end {
            match t.admit(write, bytes, now) {
                None => n += 1,
                Some(d) => now += d,
            }
        }
        (n, n * bytes)
    }

    fn within(got: f64, want: f64, tolerance: f64) -> bool {
        (got - want).abs() <= want * tolerance
    }

    #[test]
    fn unlimited_admits_everything() {
        let t = Throttle::new(limits(|_| {}));
        for _ in 0..1000 {
            assert_eq!(t.admit(true, 1 << 20, Instant::now()), None);
        }
    }

    #[test]
    fn bytes_per_second_hold_over_ten_seconds() {
        for (bytes, rate) in [(4096, 1_000_000u64), (1 << 20, 10_000_000), (512, 100_000)] {
            let t = Throttle::new(limits(|l| l.bps = rate));
            let (_, got) = hammer(&t, false, bytes, 10.0);
            // The initial bucket (rate/10) plus one request may pass at once.
            assert!(
                within(got as f64, rate as f64 * 10.0, 0.05),
                "{bytes}-byte requests at {rate} B/s: {got} bytes in 10 s"
            );
        }
    }

    #[test]
    fn read_and_write_limits_are_separate() {
        let t = Throttle::new(limits(|l| {
            l.bps_rd = 1_000_000;
            l.iops_wr = 100;
        }));
        let (_, rd) = hammer(&t, false, 65536, 10.0);
        assert!(within(rd as f64, 10_000_000.0, 0.05), "read {rd}");
        let t2 = Throttle::new(t.limits());
        let (wr_ops, _) = hammer(&t2, true, 65536, 10.0);
        assert!(within(wr_ops as f64, 1000.0, 0.05), "write ops {wr_ops}");
        // Writes are not held by the read limit.
        let t3 = Throttle::new(limits(|l| l.bps_rd = 1000));
        assert_eq!(t3.admit(true, 1 << 30, Instant::now()), None);
        assert_eq!(t3.admit(true, 1 << 30, Instant::now()), None);
    }

    #[test]
    fn bursts_run_at_the_burst_rate_then_the_average() {
        // 10 ops/s average, bursts of 100 ops/s for 2 s: QEMU lets the
        // bucket fill to max x length = 200 ops at up to 100 ops/s.
        let t = Throttle::new(limits(|l| {
            l.iops = 10;
            l.iops_max = 100;
            l.iops_max_length = 2;
        }));
        let (first, _) = hammer(&t, true, 4096, 2.0);
        assert!((195..=225).contains(&first), "burst: {first} ops in 2 s");
        let (next, _) = hammer(&t, true, 4096, 10.0);
        assert!(
            within(next as f64, 100.0, 0.1),
            "after the burst: {next} ops in 10 s"
        );
    }

    #[test]
    fn iops_size_counts_big_requests_as_several() {
        let t = Throttle::new(limits(|l| {
            l.iops = 100;
            l.iops_size = 4096;
        }));
        let (ops, _) = hammer(&t, false, 16384, 10.0);
        assert!(within(ops as f64, 250.0, 0.05), "{ops}");
    }

    #[test]
    fn new_limits_apply_at_once() {
        let t = Throttle::new(limits(|l| l.bps = 1000));
        let now = Instant::now();
        assert_eq!(t.admit(false, 4096, now), None);
        assert!(t.admit(false, 4096, now).is_some());
        t.set(limits(|_| {}));
        assert_eq!(t.admit(false, 4096, now), None);
        assert!(!t.limits().enabled());
    }
}
