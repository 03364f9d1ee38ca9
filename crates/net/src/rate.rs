//! Token buckets, as Firecracker's rate limiter defines them (the semantics
//! its users know): a bucket holds up to `size` tokens and refills `size`
//! tokens every `refill_time` (spread evenly, computed exactly in integer
//! arithmetic, never by a periodic timer that would lower the real rate);
//! `one_time_burst` tokens more are there at the start and, once spent,
//! never come back. An operation of N tokens (bytes, or 1 for a packet)
//! proceeds if the bucket holds N (or, when N exceeds the whole bucket, if
//! the bucket is full: the bucket is then left in debt, so large operations
//! pass but are paid for); otherwise it waits until enough has refilled.
//!
//! Time is a parameter ([`Instant`] passed in), so the arithmetic is tested
//! on a simulated clock.

use std::time::{Duration, Instant};

/// One bucket (tokens are bytes or packets).
#[derive(Debug, Clone)]
pub struct TokenBucket {
    size: u64,
    refill: Duration,
    /// Tokens now (may go negative: a large operation left a debt).
    budget: i128,
    one_time_burst: u64,
    /// Refill computed up to here.
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `size` tokens refilled every `refill`, plus
    /// `one_time_burst` initial tokens. `None` when `size` or `refill` is
    /// zero (no limit).
    pub fn new(size: u64, one_time_burst: u64, refill: Duration, now: Instant) -> Option<Self> {
        if size == 0 || refill.is_zero() {
            return None;
        }
        Some(TokenBucket {
            size,
            refill,
            budget: i128::from(size),
            one_time_burst,
            last: now,
        })
    }

    fn refill_to(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        let refill_ns = self.refill.as_nanos();
        // Whole tokens earned, and the time they cost exactly, so that the
        // remainder carries over to the next refill.
        let tokens = elapsed.as_nanos() * u128::from(self.size) / refill_ns;
        if tokens == 0 {
            return;
        }
        let cost = Duration::from_nanos(
            u64::try_from(tokens * refill_ns / u128::from(self.size)).unwrap_or(u64::MAX),
        );
        self.last += cost;
        let t = i128::try_from(tokens).unwrap_or(i128::MAX);
        self.budget = (self.budget.saturating_add(t)).min(i128::from(self.size));
    }

    /// Take `n` tokens at `now`: `None` if done, else how long until the
    /// bucket can pay (nothing is taken then).
    pub fn take(&mut self, n: u64, now: Instant) -> Option<Duration> {
        let burst = n.min(self.one_time_burst);
        let n = n - burst;
        self.refill_to(now);
        let need = i128::from(n.min(self.size));
        if self.budget >= need {
            self.one_time_burst -= burst;
            self.budget -= i128::from(n);
            return None;
        }
        let missing = u128::try_from(need - self.budget).unwrap_or(0);
        let ns = missing * self.refill.as_nanos() / u128::from(self.size) + 1;
        Some(Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX)))
    }

    /// Put `n` tokens back (an operation that was charged but not done).
    pub fn give_back(&mut self, n: u64) {
        self.budget = (self.budget + i128::from(n)).min(i128::from(self.size));
    }
}

/// The limits of one direction of an interface (bytes and packets per
/// second, each with its one-time burst; zero: no limit).
pub use moat_config::RateLimit as Limits;

/// A bandwidth bucket and a packet bucket; an operation needs both.
#[derive(Debug, Clone, Default)]
pub struct RateLimiter {
    bytes: Option<TokenBucket>,
    packets: Option<TokenBucket>,
}

/// How much a bucket holds: a tenth of a second's worth, so that a sender
/// that was idle gets at most 0.1 s at line rate (1% of a 10-second
/// measurement) before the rate holds.
pub const BUCKET_TIME: Duration = Duration::from_millis(100);

impl RateLimiter {
    /// Buckets for `l`: each holds [`BUCKET_TIME`] worth of its rate (at
    /// least one token) and refills at the rate; the bursts come on top,
    /// once.
    pub fn new(l: Limits, now: Instant) -> RateLimiter {
        let bucket = |per_sec: u64, burst: u64| {
            let per_tick = (u128::from(per_sec) * BUCKET_TIME.as_nanos() / 1_000_000_000) as u64;
            let size = per_tick.max(1);
            // The refill time that makes `size` tokens come at `per_sec`.
            let refill = Duration::from_nanos(
                u64::try_from(u128::from(size) * 1_000_000_000 / u128::from(per_sec.max(1)))
                    .unwrap_or(u64::MAX),
            );
            if per_sec == 0 {
                None
            } else {
                TokenBucket::new(size, burst, refill, now)
            }
        };
        RateLimiter {
            bytes: bucket(l.bytes_per_sec, l.bytes_burst),
            packets: bucket(l.packets_per_sec, l.packets_burst),
        }
    }

    /// Whether it limits anything.
    pub fn is_limited(&self) -> bool {
        self.bytes.is_some() || self.packets.is_some()
    }

    /// Let one packet of `bytes` pass at `now`: `None` if it may, else how
    /// long to wait (and nothing is taken).
    pub fn admit(&mut self, bytes: u64, now: Instant) -> Option<Duration> {
        if let Some(p) = &mut self.packets {
            if let Some(wait) = p.take(1, now) {
                return Some(wait);
            }
        }
        if let Some(b) = &mut self.bytes {
            if let Some(wait) = b.take(bytes, now) {
                if let Some(p) = &mut self.packets {
                    p.give_back(1);
                }
                return Some(wait);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Send packets of `size` as fast as admitted for `secs` simulated
    /// seconds: how many bytes went through.
    fn flat_out(l: Limits, size: u64, secs: u64) -> u64 {
        let start = Instant::now();
        let mut now = start;
        let mut r = RateLimiter::new(l, now);
        let mut sent = 0;
        while now < start + Duration::from_secs(secs) {
            match r.admit(size, now) {
                None => sent += size,
                Some(wait) => now += wait,
            }
        }
        sent
    }

    #[test]
    fn bandwidth_holds_over_time_and_bursts_are_spent_once() {
        let l = Limits {
            bytes_per_sec: 1_000_000,
            ..Default::default()
        };
        // 10 s at 1 MB/s, starting with a full bucket (0.1 s worth).
        let sent = flat_out(l, 1500, 10);
        assert!((10_000_000..=10_101_500).contains(&sent), "{sent}");
        let burst = Limits {
            bytes_burst: 5_000_000,
            ..l
        };
        let sent = flat_out(burst, 1500, 10);
        assert!((15_000_000..=15_103_000).contains(&sent), "{sent}");
    }

    #[test]
    fn packets_per_second_hold() {
        let l = Limits {
            packets_per_sec: 1000,
            ..Default::default()
        };
        let sent = flat_out(l, 64, 10) / 64;
        assert!((10_000..=10_101).contains(&sent), "{sent}");
        // A rate below ten a second still holds (a bucket of one token).
        let slow = Limits {
            packets_per_sec: 3,
            ..Default::default()
        };
        let sent = flat_out(slow, 64, 10) / 64;
        assert!((30..=31).contains(&sent), "{sent}");
    }

    #[test]
    fn a_packet_larger_than_the_bucket_passes_when_full_and_leaves_a_debt() {
        let now = Instant::now();
        let mut b = TokenBucket::new(1000, 0, Duration::from_secs(1), now).unwrap();
        assert_eq!(b.take(5000, now), None);
        // The debt of 4000 tokens is paid before the next 1000.
        let wait = b.take(1000, now).unwrap();
        assert!(
            wait >= Duration::from_secs(5) - Duration::from_millis(1),
            "{wait:?}"
        );
        assert_eq!(b.take(1000, now + wait), None);
    }

    #[test]
    fn no_limit_means_no_bucket() {
        let now = Instant::now();
        assert!(TokenBucket::new(0, 100, Duration::from_secs(1), now).is_none());
        let mut r = RateLimiter::new(Limits::default(), now);
        assert!(!r.is_limited());
        assert_eq!(r.admit(u64::MAX, now), None);
    }
}
