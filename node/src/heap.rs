//! Giving freed heap back to the OS once connection churn settles.
//!
//! glibc's malloc returns memory to the OS only from the top of a heap. When many
//! sessions close, what they held is freed but stays scattered between the
//! allocations that remain, and stays in the node's RSS: after 15,000 idle WebSockets
//! closed, RSS stayed at 88 MB, and `malloc_trim(0)`, which releases every whole free
//! page wherever it sits, took it to 67 MB (BENCHMARKS.md, issue 12, session 6). Right
//! after a connect ramp there is little to release (0.2 MB of 72 MB measured): the
//! memory is live.
//!
//! It walks the free lists of every arena under that arena's lock (up to ~5 ms
//! measured), so a thread allocating from that arena meanwhile waits. The node calls it
//! off the runtime's worker threads (`spawn_blocking`), and only when it is worth it
//! and the moment is calm: after the number of open connections has moved by at least
//! [`MIN_CHURN`] since the last trim, in a second with little movement, or at most
//! every [`MAX_WAIT_TICKS`] seconds while the movement goes on. Other allocators (musl,
//! macOS) have no such call, and the policy then does nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// How far the number of open connections must have moved (summed per tick) since
/// the last trim before a trim is worth its walk of the heap.
pub const MIN_CHURN: u64 = 1_000;
/// Churn within one tick below which the node counts as calm.
pub const CALM_PER_TICK: u64 = 100;
/// Ticks (seconds) of continuing churn after which a trim runs anyway.
pub const MAX_WAIT_TICKS: u32 = 30;

/// When to trim, from how the number of open connections moved each tick (pure: the
/// caller measures, this decides). Churn is counted as the net change per tick, so a
/// node whose connections come and go at a steady level, reusing the same freed
/// memory, is left alone.
#[derive(Debug, Default)]
pub struct TrimPolicy {
    last_connections: Option<i64>,
    churn: u64,
    ticks_waiting: u32,
}

impl TrimPolicy {
    /// One tick: the node's open connections now. True when a trim should run now.
    pub fn tick(&mut self, connections: i64) -> bool {
        let moved = self
            .last_connections
            .map_or(0, |last| connections.abs_diff(last));
        self.last_connections = Some(connections);
        self.churn += moved;
        if self.churn < MIN_CHURN {
            return false;
        }
        self.ticks_waiting += 1;
        if moved < CALM_PER_TICK || self.ticks_waiting >= MAX_WAIT_TICKS {
            self.churn = 0;
            self.ticks_waiting = 0;
            return true;
        }
        false
    }
}

/// Runs one trim off the async workers, unless one is still running.
#[derive(Debug, Default)]
pub struct Trimmer {
    running: Arc<AtomicBool>,
}

impl Trimmer {
    pub fn start(&self) {
        if !supported() || self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let running = self.running.clone();
        tokio::task::spawn_blocking(move || {
            let before = rss_bytes();
            let started = std::time::Instant::now();
            let released = trim();
            tracing::debug!(
                released,
                took_us = started.elapsed().as_micros() as u64,
                rss_before = before,
                rss_after = rss_bytes(),
                "heap trimmed"
            );
            running.store(false, Ordering::Release);
        });
    }
}

/// Whether this build's allocator can give back free pages from the middle of its
/// heap.
pub fn supported() -> bool {
    cfg!(all(target_os = "linux", target_env = "gnu"))
}

/// Releases every whole free page of the heap to the OS; whether any was released.
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes no pointers and only walks glibc's own arenas
        // under their locks; it is safe to call from any thread at any time.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// This process's resident set, from `/proc/self/statm` (0 where there is none).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page_size())
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_trim_until_enough_churn_then_at_the_first_calm_tick() {
        let mut p = TrimPolicy::default();
        assert!(!p.tick(0));
        // A ramp of 1,500 connects over three busy seconds: no trim while it goes on.
        assert!(!p.tick(500));
        assert!(!p.tick(1_000));
        assert!(!p.tick(1_500));
        // The first calm second trims, once.
        assert!(p.tick(1_510));
        assert!(!p.tick(1_510));
        assert!(!p.tick(1_520));
    }

    #[test]
    fn closes_count_as_churn_like_opens() {
        let mut p = TrimPolicy::default();
        assert!(!p.tick(2_000));
        assert!(!p.tick(1_400), "600 closed: not enough yet");
        assert!(
            !p.tick(1_000),
            "400 more reach the threshold, in a busy second"
        );
        assert!(p.tick(1_000), "the next calm second trims");
    }

    #[test]
    fn slow_churn_adds_up_to_one_trim() {
        let mut p = TrimPolicy::default();
        p.tick(0);
        // Ten connections up or down a second: calm every tick, and a trim only once
        // the thousand moves are reached (after 100 s), then again after 100 more.
        let trims: Vec<u32> = (1..=250u32)
            .filter(|t| p.tick(if t % 2 == 0 { 0 } else { 10 }))
            .collect();
        assert_eq!(trims, vec![100, 200]);
    }

    #[test]
    fn continuing_churn_trims_every_max_wait_ticks() {
        let mut p = TrimPolicy::default();
        let mut level = 0;
        p.tick(level);
        let mut trims = vec![];
        for t in 1..=100u32 {
            level += if t % 2 == 0 { 500 } else { -500 };
            if p.tick(level) {
                trims.push(t);
            }
        }
        // Busy every tick: the threshold is reached at tick 2, then a trim after 30
        // ticks of waiting.
        assert_eq!(trims, vec![31, 62, 93]);
    }

    #[test]
    fn a_trim_gives_back_free_pages_between_live_blocks() {
        assert!(rss_bytes() > 0);
        if !supported() {
            assert!(!trim());
            return;
        }
        // 32 MiB of 4 KB blocks, every 16th kept: what is freed lies between live
        // blocks, where glibc does not return it by itself.
        let blocks: Vec<Vec<u8>> = (0..8_192).map(|i| vec![(i as u8) | 1; 4_000]).collect();
        let mut keep = Vec::new();
        for (i, b) in blocks.into_iter().enumerate() {
            if i % 16 == 0 {
                keep.push(b);
            }
        }
        let freed = rss_bytes();
        assert!(trim(), "free pages were there to release");
        let after = rss_bytes();
        assert!(
            after + 12 * 1024 * 1024 < freed,
            "RSS {freed} -> {after}: under 12 MiB of ~28 MiB released"
        );
        assert_eq!(keep.len(), 512);
    }
}
