//! Token-bucket rate limiting: [`TokenBucket`] for one limit held in one place (a
//! node's admission, an API key), [`Buckets`] for the several limits every session
//! carries.

use std::sync::LazyLock;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate_per_s: u32, burst: u32) -> Self {
        Self {
            tokens: burst as f64,
            rate: rate_per_s as f64,
            burst: burst as f64,
            last: Instant::now(),
        }
    }

    pub fn allow_at(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket would be full at `now` (nothing spent recently).
    pub fn is_full_at(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * self.rate >= self.burst
    }

    pub fn allow(&mut self) -> bool {
        self.allow_at(Instant::now())
    }
}

/// A limit's rate and burst, as [`Buckets`] is given them on every call.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    per_s: f32,
    burst: f32,
}

impl Rate {
    pub fn new(per_s: u32, burst: u32) -> Self {
        Self {
            per_s: per_s as f32,
            burst: burst as f32,
        }
    }
}

/// The moment every [`Buckets`] measures its time from.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// `N` token buckets that share one clock and keep neither rate nor burst: the caller
/// passes those (they are the node's config, the same for every session). A session
/// holds three limits, and as three [`TokenBucket`]s they were 120 bytes of every idle
/// session; this is 8 bytes of time and 4 per bucket.
///
/// Every bucket is refilled whenever any is used. That gives each the tokens a lazy
/// refill of its own would: a bucket's tokens grow linearly with time up to its burst,
/// and `min(b, min(b, x + r·d₁) + r·d₂) = min(b, x + r·(d₁ + d₂))`.
#[derive(Debug, Clone)]
pub struct Buckets<const N: usize> {
    /// Microseconds from [`EPOCH`] to the last refill.
    at_us: u64,
    tokens: [f32; N],
}

impl<const N: usize> Buckets<N> {
    /// Every bucket full.
    pub fn new(rates: &[Rate; N]) -> Self {
        Self::new_at(rates, Instant::now())
    }

    fn new_at(rates: &[Rate; N], now: Instant) -> Self {
        Self {
            at_us: micros(now),
            tokens: rates.map(|r| r.burst),
        }
    }

    /// Takes a token from bucket `i`; false if it has none.
    pub fn allow(&mut self, i: usize, rates: &[Rate; N]) -> bool {
        self.allow_at(i, rates, Instant::now())
    }

    pub fn allow_at(&mut self, i: usize, rates: &[Rate; N], now: Instant) -> bool {
        let now_us = micros(now).max(self.at_us);
        let elapsed = (now_us - self.at_us) as f32 / 1e6;
        self.at_us = now_us;
        for (tokens, r) in self.tokens.iter_mut().zip(rates) {
            *tokens = (*tokens + elapsed * r.per_s).min(r.burst);
        }
        if self.tokens[i] >= 1.0 {
            self.tokens[i] -= 1.0;
            true
        } else {
            false
        }
    }
}

fn micros(at: Instant) -> u64 {
    at.saturating_duration_since(*EPOCH).as_micros() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 5);
        b.last = t0;
        assert_eq!((0..8).filter(|_| b.allow_at(t0)).count(), 5);
        // 10/s refills one token per 100 ms.
        assert!(b.allow_at(t0 + Duration::from_millis(100)));
        assert!(!b.allow_at(t0 + Duration::from_millis(100)));
        // Never more than the burst, however long idle.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..8).filter(|_| b.allow_at(later)).count(), 5);
    }

    #[test]
    fn buckets_refill_each_at_its_own_rate_and_never_past_its_burst() {
        let rates = [Rate::new(10, 5), Rate::new(1, 2)];
        let t0 = Instant::now();
        let mut b = Buckets::new_at(&rates, t0);
        assert_eq!((0..8).filter(|_| b.allow_at(0, &rates, t0)).count(), 5);
        assert_eq!((0..8).filter(|_| b.allow_at(1, &rates, t0)).count(), 2);
        // 100 ms: one token for the 10/s bucket, a tenth for the 1/s one.
        let t1 = t0 + Duration::from_millis(100);
        assert!(b.allow_at(0, &rates, t1));
        assert!(!b.allow_at(0, &rates, t1));
        assert!(!b.allow_at(1, &rates, t1));
        // Using one bucket often does not lose the other's refill: at 1 s the 1/s
        // bucket has its token, though bucket 0 was refilled every 50 ms meanwhile.
        for k in 3..20u64 {
            b.allow_at(0, &rates, t0 + Duration::from_millis(50 * k));
        }
        let t2 = t0 + Duration::from_millis(1_000);
        assert!(b.allow_at(1, &rates, t2));
        assert!(!b.allow_at(1, &rates, t2));
        // Idle for a minute: each is full to its own burst, no more.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..8).filter(|_| b.allow_at(0, &rates, later)).count(), 5);
        assert_eq!((0..8).filter(|_| b.allow_at(1, &rates, later)).count(), 2);
    }

    #[test]
    fn buckets_ignore_a_clock_read_earlier_than_their_last() {
        let rates = [Rate::new(10, 1)];
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut b = Buckets::new_at(&rates, t0);
        assert!(b.allow_at(0, &rates, t0));
        // An earlier instant (read on another thread before this one) refills nothing
        // and does not move the clock back.
        assert!(!b.allow_at(0, &rates, t0 - Duration::from_millis(500)));
        assert!(!b.allow_at(0, &rates, t0 + Duration::from_millis(50)));
        assert!(b.allow_at(0, &rates, t0 + Duration::from_millis(100)));
    }
}
