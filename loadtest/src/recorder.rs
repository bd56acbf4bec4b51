//! Where measurements go: HDR histograms of delivery latency, connect latency,
//! subscribe latency and publish latency, per-second delivery histograms (the latency-over-time plot), and a
//! window histogram that the progress line drains every tick.
//!
//! Many tasks record at once, so the recorder is split into shards, each behind a
//! `std::sync::Mutex`: a record is a few counter increments with no `.await` inside, so
//! a plain mutex is cheaper than any async lock, and a task always hits the same shard
//! (chosen by its id) so contention stays low.

use std::collections::BTreeMap;
use std::sync::Mutex;

use hdrhistogram::Histogram;

use crate::hist::{new_hist, SIGFIG, SIGFIG_TIMELINE};

const SHARDS: usize = 16;
/// Per-second buckets kept (a day); later seconds are still counted in the totals.
const MAX_SECONDS: usize = 86_400;

/// One second of the run.
#[derive(Debug, Clone)]
pub struct Second {
    pub latency: Histogram<u64>,
    pub published: u64,
}

impl Default for Second {
    fn default() -> Self {
        Self {
            latency: new_hist(SIGFIG_TIMELINE),
            published: 0,
        }
    }
}

struct Shard {
    latency: Histogram<u64>,
    window: Histogram<u64>,
    connect: Histogram<u64>,
    subscribe: Histogram<u64>,
    publish: Histogram<u64>,
    seconds: BTreeMap<u64, Second>,
    last_delivery_us: u64,
}

impl Default for Shard {
    fn default() -> Self {
        Self {
            latency: new_hist(SIGFIG),
            window: new_hist(SIGFIG),
            connect: new_hist(SIGFIG),
            subscribe: new_hist(SIGFIG),
            publish: new_hist(SIGFIG),
            seconds: BTreeMap::new(),
            last_delivery_us: 0,
        }
    }
}

impl Shard {
    fn second(&mut self, unix_s: u64) -> Option<&mut Second> {
        if self.seconds.len() >= MAX_SECONDS && !self.seconds.contains_key(&unix_s) {
            return None;
        }
        Some(self.seconds.entry(unix_s).or_default())
    }
}

/// Everything recorded, merged.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub latency: Histogram<u64>,
    pub connect: Histogram<u64>,
    pub subscribe: Histogram<u64>,
    pub publish: Histogram<u64>,
    /// Unix second → that second's deliveries and publishes.
    pub seconds: BTreeMap<u64, Second>,
    pub last_delivery_us: u64,
}

pub struct Recorder {
    shards: Box<[Mutex<Shard>]>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }

    fn shard(&self, hint: usize) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[hint % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// One delivery received at `recv_us` (µs since the Unix epoch) that was intended to
    /// be published at `intended_us`.
    pub fn delivery(&self, hint: usize, recv_us: u64, intended_us: u64) {
        let latency = recv_us.saturating_sub(intended_us);
        let mut s = self.shard(hint);
        s.latency.record(latency).ok();
        s.window.record(latency).ok();
        s.last_delivery_us = s.last_delivery_us.max(recv_us);
        if let Some(sec) = s.second(recv_us / 1_000_000) {
            sec.latency.record(latency).ok();
        }
    }

    /// A connection established `latency_us` after it was scheduled.
    pub fn connect(&self, hint: usize, latency_us: u64) {
        self.shard(hint).connect.record(latency_us).ok();
    }

    /// A subscription's first subscribe answered `latency_us` after it was sent.
    pub fn subscribe(&self, hint: usize, latency_us: u64) {
        self.shard(hint).subscribe.record(latency_us).ok();
    }

    /// A publish acknowledged at `ack_us`, scheduled for `intended_us`.
    pub fn publish(&self, hint: usize, ack_us: u64, intended_us: u64) {
        let mut s = self.shard(hint);
        s.publish.record(ack_us.saturating_sub(intended_us)).ok();
        if let Some(sec) = s.second(intended_us / 1_000_000) {
            sec.published += 1;
        }
    }

    /// Takes the deliveries recorded since the last call (for the progress line).
    pub fn take_window(&self) -> Histogram<u64> {
        let mut out = new_hist(SIGFIG);
        for i in 0..SHARDS {
            let mut s = self.shard(i);
            out.add(&s.window).ok();
            s.window.reset();
        }
        out
    }

    /// Everything recorded so far, merged across shards.
    pub fn snapshot(&self) -> Recorded {
        let mut r = Recorded {
            latency: new_hist(SIGFIG),
            connect: new_hist(SIGFIG),
            subscribe: new_hist(SIGFIG),
            publish: new_hist(SIGFIG),
            seconds: BTreeMap::new(),
            last_delivery_us: 0,
        };
        for i in 0..SHARDS {
            let s = self.shard(i);
            r.latency.add(&s.latency).ok();
            r.connect.add(&s.connect).ok();
            r.subscribe.add(&s.subscribe).ok();
            r.publish.add(&s.publish).ok();
            r.last_delivery_us = r.last_delivery_us.max(s.last_delivery_us);
            for (t, sec) in &s.seconds {
                let e = r.seconds.entry(*t).or_default();
                e.latency.add(&sec.latency).ok();
                e.published += sec.published;
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_is_receive_minus_intended() {
        let r = Recorder::new();
        let t0 = 1_700_000_000_000_000;
        // An injected delay of exactly 25 ms on every event, spread over shards.
        for i in 0..100u64 {
            let intended = t0 + i * 10_000;
            r.delivery(i as usize, intended + 25_000, intended);
        }
        let s = r.snapshot();
        assert_eq!(s.latency.len(), 100);
        // Within the histogram's 3 significant digits.
        assert!(
            s.latency.min() >= 24_975 && s.latency.max() <= 25_025,
            "{} {}",
            s.latency.min(),
            s.latency.max()
        );
        assert_eq!(s.last_delivery_us, t0 + 99 * 10_000 + 25_000);
        // 100 events over one second, all within the same unix second bucket or two.
        let total: u64 = s.seconds.values().map(|x| x.latency.len()).sum();
        assert_eq!(total, 100);
        assert_eq!(r.take_window().len(), 100);
        assert_eq!(r.take_window().len(), 0, "the window is drained");
    }

    #[test]
    fn receive_before_intended_is_zero_not_a_wrap() {
        let r = Recorder::new();
        r.delivery(0, 1_000, 5_000);
        assert_eq!(r.snapshot().latency.max(), 0);
    }
}
