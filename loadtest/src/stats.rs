//! Live counters (for the progress line; the final report is built from the trackers
//! and the recorder) and a bounded log of distinct errors.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

#[derive(Debug, Default)]
pub struct LiveStats {
    pub published: AtomicU64,
    pub publish_errors: AtomicU64,
    pub delivered: AtomicU64,
    /// Event data bytes of the deliveries counted in `delivered`.
    pub delivered_bytes: AtomicU64,
    pub duplicates: AtomicU64,
    pub reordered: AtomicU64,
    /// Offsets seen missing when a later one arrived (some may still come reordered).
    pub gaps: AtomicU64,
    pub resets: AtomicU64,
    /// Events whose data the harness did not write (no latency for them).
    pub foreign: AtomicU64,
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    /// Subscribe commands answered with an error.
    pub subscribe_failures: AtomicU64,
    pub reconnects: AtomicU64,
    /// Connections open right now.
    pub open: AtomicU64,
    /// Subscribers whose every subscription has started.
    pub subscribed: AtomicU64,
    /// First connect attempt and last successful connect, µs since the Unix epoch.
    pub connect_first_us: AtomicU64,
    pub connect_last_us: AtomicU64,
}

impl LiveStats {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }

    pub fn connect_attempt(&self, at_us: u64) {
        let _ = self
            .connect_first_us
            .fetch_update(Relaxed, Relaxed, |v| (v == 0 || at_us < v).then_some(at_us));
    }

    pub fn connected(&self, at_us: u64) {
        self.connects.fetch_add(1, Relaxed);
        self.open.fetch_add(1, Relaxed);
        self.connect_last_us.fetch_max(at_us, Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            published: self.published.load(Relaxed),
            publish_errors: self.publish_errors.load(Relaxed),
            delivered: self.delivered.load(Relaxed),
            duplicates: self.duplicates.load(Relaxed),
            reordered: self.reordered.load(Relaxed),
            gaps: self.gaps.load(Relaxed),
            resets: self.resets.load(Relaxed),
            connects: self.connects.load(Relaxed),
            connect_failures: self.connect_failures.load(Relaxed),
            subscribe_failures: self.subscribe_failures.load(Relaxed),
            reconnects: self.reconnects.load(Relaxed),
            open: self.open.load(Relaxed),
            subscribed: self.subscribed.load(Relaxed),
        }
    }
}

/// A copy of the live counters, as workers send it to their parent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    pub published: u64,
    pub publish_errors: u64,
    pub delivered: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub gaps: u64,
    pub resets: u64,
    pub connects: u64,
    pub connect_failures: u64,
    #[serde(default)]
    pub subscribe_failures: u64,
    pub reconnects: u64,
    pub open: u64,
    pub subscribed: u64,
}

impl StatsSnapshot {
    pub fn add(&mut self, o: &StatsSnapshot) {
        self.published += o.published;
        self.publish_errors += o.publish_errors;
        self.delivered += o.delivered;
        self.duplicates += o.duplicates;
        self.reordered += o.reordered;
        self.gaps += o.gaps;
        self.resets += o.resets;
        self.connects += o.connects;
        self.connect_failures += o.connect_failures;
        self.subscribe_failures += o.subscribe_failures;
        self.reconnects += o.reconnects;
        self.open += o.open;
        self.subscribed += o.subscribed;
    }
}

/// Distinct error messages with their counts; at most [`ErrorLog::MAX_KINDS`] kinds
/// (further kinds are counted under one line).
#[derive(Debug, Default)]
pub struct ErrorLog {
    kinds: Mutex<BTreeMap<String, u64>>,
}

impl ErrorLog {
    pub const MAX_KINDS: usize = 32;
    const OTHER: &'static str = "(other errors)";

    pub fn add(&self, what: impl Into<String>) {
        let mut what: String = what.into();
        if what.len() > 300 {
            let mut cut = 300;
            while !what.is_char_boundary(cut) {
                cut -= 1;
            }
            what.truncate(cut);
        }
        let mut k = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        if !k.contains_key(&what) && k.len() >= Self::MAX_KINDS {
            what = Self::OTHER.to_owned();
        }
        *k.entry(what).or_insert(0) += 1;
    }

    pub fn take(&self) -> BTreeMap<String, u64> {
        std::mem::take(&mut *self.kinds.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_log_is_bounded() {
        let log = ErrorLog::default();
        for i in 0..100 {
            log.add(format!("e{i}"));
        }
        log.add("e1");
        let k = log.take();
        assert_eq!(k.len(), ErrorLog::MAX_KINDS + 1);
        assert_eq!(k["e1"], 2);
        assert_eq!(k[ErrorLog::OTHER], 100 - ErrorLog::MAX_KINDS as u64);
    }

    #[test]
    fn connect_window() {
        let s = LiveStats::default();
        s.connect_attempt(50);
        s.connect_attempt(30);
        s.connect_attempt(40);
        s.connected(90);
        s.connected(70);
        assert_eq!(s.connect_first_us.load(Relaxed), 30);
        assert_eq!(s.connect_last_us.load(Relaxed), 90);
    }
}
