//! The live progress line on stderr: phase, elapsed time, connections, publish and
//! delivery rates, p50/p99 of the last interval, integrity counters.
//!
//! On a terminal it is an indicatif spinner redrawn in place; otherwise (CI logs) a plain
//! line every [`PLAIN_EVERY`]; `--quiet` silences both.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::report::fmt_us;
use crate::stats::StatsSnapshot;

const PLAIN_EVERY: Duration = Duration::from_secs(5);

pub struct Progress {
    bar: Option<ProgressBar>,
    plain: bool,
    label: String,
    started: Instant,
    last_plain: Option<Instant>,
    prev: Option<(StatsSnapshot, Instant)>,
}

impl Progress {
    pub fn new(label: impl Into<String>, quiet: bool) -> Self {
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let bar = (!quiet && tty).then(|| {
            let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template("{spinner} {msg}")
                    .expect("static template")
                    .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏ "),
            );
            b
        });
        Self {
            bar,
            plain: !quiet && !tty,
            label: label.into(),
            started: Instant::now(),
            last_plain: None,
            prev: None,
        }
    }

    /// Renders one update; `window` holds the deliveries since the previous update.
    pub fn update(&mut self, phase: &str, snap: &StatsSnapshot, window: &Histogram<u64>) {
        let now = Instant::now();
        let (pub_rate, recv_rate) = match &self.prev {
            Some((p, t)) => {
                let dt = now.duration_since(*t).as_secs_f64().max(1e-3);
                (
                    snap.published.saturating_sub(p.published) as f64 / dt,
                    snap.delivered.saturating_sub(p.delivered) as f64 / dt,
                )
            }
            None => (0.0, 0.0),
        };
        self.prev = Some((*snap, now));
        let line = line(
            &self.label,
            phase,
            now.duration_since(self.started),
            snap,
            pub_rate,
            recv_rate,
            window,
        );
        if let Some(b) = &self.bar {
            b.set_message(line);
            b.tick();
        } else if self.plain
            && self
                .last_plain
                .is_none_or(|t| now.duration_since(t) >= PLAIN_EVERY)
        {
            self.last_plain = Some(now);
            eprintln!("{line}");
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// The text of one progress update.
pub fn line(
    label: &str,
    phase: &str,
    elapsed: Duration,
    s: &StatsSnapshot,
    pub_rate: f64,
    recv_rate: f64,
    window: &Histogram<u64>,
) -> String {
    let lat = if window.is_empty() {
        "p50 -  p99 -".to_string()
    } else {
        format!(
            "p50 {}  p99 {}",
            fmt_us(window.value_at_quantile(0.5)),
            fmt_us(window.value_at_quantile(0.99))
        )
    };
    format!(
        "{label} [{phase} {:>4}s] open {} subscribed {} | pub {:.0}/s recv {:.0}/s | {lat} | gaps {} dup {} reord {} resets {} | conn fail {} reconn {} pub err {}",
        elapsed.as_secs(),
        s.open,
        s.subscribed,
        pub_rate,
        recv_rate,
        s.gaps,
        s.duplicates,
        s.reordered,
        s.resets,
        s.connect_failures,
        s.reconnects,
        s.publish_errors
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hist::{new_hist, SIGFIG};

    #[test]
    fn line_shows_rates_and_percentiles() {
        let mut h = new_hist(SIGFIG);
        h.record(1_500).unwrap();
        let s = StatsSnapshot {
            open: 10,
            gaps: 2,
            ..Default::default()
        };
        let l = line(
            "fanout/ws",
            "load",
            Duration::from_secs(3),
            &s,
            1000.0,
            5000.0,
            &h,
        );
        assert!(l.contains("pub 1000/s recv 5000/s"), "{l}");
        assert!(l.contains("p50 1.50ms"), "{l}");
        assert!(l.contains("gaps 2"), "{l}");
        assert!(l.contains("open 10"), "{l}");
    }
}
