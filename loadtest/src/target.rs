//! The target process's CPU time and memory, read from `/proc/<pid>/stat` and
//! `/proc/<pid>/status` (`--target-pid`, Linux only).
//!
//! The conductor samples once before any connection is opened (the baseline), every
//! second while the load runs (peak RSS, the timeline), at the end of the load with every
//! connection still open (the figures the report quotes), and derives CPU seconds over
//! the load window and RSS per open connection.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// One reading of the target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcSample {
    /// utime + stime, seconds.
    pub cpu_s: f64,
    pub rss_bytes: u64,
}

/// Reads `/proc/<pid>`; `None` when the process is gone or `/proc` is unreadable.
pub fn sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(ProcSample {
        cpu_s: parse_cpu_ticks(&stat)? as f64 / clock_ticks(),
        rss_bytes: parse_rss_kib(&status)? * 1024,
    })
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime (fields 14 and 15) of `/proc/<pid>/stat`. The command name (field 2)
/// may hold spaces and parentheses, so fields are counted after the last `)`.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_ascii_whitespace();
    // After ')': field 3 (state) is index 0, so utime (14) is index 11.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `VmRSS:` of `/proc/<pid>/status`, KiB.
pub fn parse_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The target's figures in a report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TargetStats {
    pub pid: u32,
    /// CPU seconds the target used during the load window.
    pub cpu_s: f64,
    /// Average cores busy during the load window.
    pub cpu_cores: f64,
    /// CPU seconds from before the first connection to the end of the load (the ramp
    /// included: for `connect`, the cost of accepting the connections).
    #[serde(default)]
    pub cpu_run_s: f64,
    /// RSS at the end of the load, with every connection still open.
    pub rss_bytes: u64,
    /// RSS before the harness opened any connection.
    pub rss_start_bytes: u64,
    pub rss_peak_bytes: u64,
    /// (RSS at the end of the load − RSS before) / connections open then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_per_conn_bytes: Option<u64>,
    /// Unix second → RSS bytes, one sample a second.
    #[serde(default)]
    pub rss_timeline: BTreeMap<u64, u64>,
}

/// Samples the target over a run.
pub struct Sampler {
    pid: u32,
    start: Option<ProcSample>,
    load_start: Option<(ProcSample, Instant)>,
    at_end: Option<(ProcSample, Instant)>,
    peak: u64,
    timeline: BTreeMap<u64, u64>,
}

impl Sampler {
    /// Takes the baseline sample; errors when the process cannot be read.
    pub fn new(pid: u32) -> anyhow::Result<Self> {
        let start = sample(pid).ok_or_else(|| {
            anyhow::anyhow!(
                "--target-pid {pid}: cannot read /proc/{pid}/stat and /proc/{pid}/status"
            )
        })?;
        Ok(Self {
            pid,
            start: Some(start),
            load_start: None,
            at_end: None,
            peak: start.rss_bytes,
            timeline: BTreeMap::new(),
        })
    }

    /// The load (publishing) starts now.
    pub fn load_started(&mut self) {
        if let Some(s) = self.tick() {
            self.load_start = Some((s, Instant::now()));
        }
    }

    /// A periodic sample (peak and timeline).
    pub fn tick(&mut self) -> Option<ProcSample> {
        let s = sample(self.pid)?;
        self.peak = self.peak.max(s.rss_bytes);
        if self.timeline.len() < 86_400 {
            self.timeline
                .insert(crate::stamp::now_us() / 1_000_000, s.rss_bytes);
        }
        Some(s)
    }

    /// The load is over; connections are still open.
    pub fn load_ended(&mut self) {
        if let Some(s) = self.tick() {
            self.at_end = Some((s, Instant::now()));
        }
    }

    /// The figures, given how many connections were open at the end of the load.
    pub fn finish(&mut self, open_connections: u64) -> TargetStats {
        if self.at_end.is_none() {
            self.load_ended();
        }
        let start = self.start.expect("taken in new");
        let (end, end_t) = self.at_end.unwrap_or((start, Instant::now()));
        let (from, from_t) = self.load_start.unwrap_or((start, end_t));
        let secs = end_t.duration_since(from_t).as_secs_f64();
        let cpu_s = (end.cpu_s - from.cpu_s).max(0.0);
        TargetStats {
            pid: self.pid,
            cpu_s: (cpu_s * 100.0).round() / 100.0,
            cpu_cores: if secs > 0.0 {
                ((cpu_s / secs) * 100.0).round() / 100.0
            } else {
                0.0
            },
            cpu_run_s: ((end.cpu_s - start.cpu_s).max(0.0) * 100.0).round() / 100.0,
            rss_bytes: end.rss_bytes,
            rss_start_bytes: start.rss_bytes,
            rss_peak_bytes: self.peak,
            rss_per_conn_bytes: (open_connections > 0)
                .then(|| end.rss_bytes.saturating_sub(start.rss_bytes) / open_connections),
            rss_timeline: std::mem::take(&mut self.timeline),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat = "1234 (weft node) (x)) S 1 1234 1234 0 -1 4194304 500 0 0 0 250 75 0 0 20 0 8 0 100 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        let status = "Name:\tweft-node\nVmPeak:\t  10000 kB\nVmRSS:\t   5120 kB\nThreads:\t8\n";
        assert_eq!(parse_rss_kib(status), Some(5120));
        assert_eq!(parse_rss_kib("Name: x\n"), None);
    }

    #[test]
    fn samples_this_process() {
        let me = std::process::id();
        let s = sample(me).expect("/proc is readable on Linux");
        assert!(s.rss_bytes > 0);
        let mut sampler = Sampler::new(me).unwrap();
        sampler.load_started();
        // Burn a little CPU so the delta is visible.
        let mut x = 0u64;
        let t = Instant::now();
        while t.elapsed().as_millis() < 50 {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        sampler.load_ended();
        let stats = sampler.finish(10);
        assert!(x > 0);
        assert!(stats.cpu_s >= 0.0);
        assert!(stats.rss_bytes > 0 && stats.rss_peak_bytes >= stats.rss_bytes);
        assert!(stats.rss_per_conn_bytes.is_some());
        assert!(Sampler::new(u32::MAX).is_err());
    }
}
