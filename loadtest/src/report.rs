//! The report: what a run measured, as JSON (`--json`), a table (stdout) and the input of
//! the HTML page, the SLO check and the baseline comparison.
//!
//! A report holds raw sums and encoded HDR histograms next to the derived figures
//! (rates, percentiles). Partial reports (from workers, or from shards run on several
//! machines) [`merge`](Report::merge) by adding the raw parts, then
//! [`finalize`](Report::finalize) recomputes every derived figure, so a merged report is
//! exactly the report one process would have written.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::hist::{self, Percentiles};
use crate::target::TargetStats;
use crate::tracker::Counts;

pub const REPORT_VERSION: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub version: u32,
    pub scenario: String,
    /// `weft` or `nats` (`--system`); empty in reports older than the option: Weft.
    #[serde(default)]
    pub system: String,
    pub transport: String,
    pub target_url: String,
    /// Where publishers sent, when not `target_url` (`--publish-target`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub publish_url: String,
    pub run_id: String,
    /// Wall-clock start of the load (publishing), ms since the Unix epoch.
    pub started_at_ms: u64,
    /// Configured load duration (`connect`: how long connections were held).
    pub duration_s: f64,
    /// Seconds from the start of the load to the last delivery (at least `duration_s`).
    pub window_s: f64,
    /// Processes whose partial reports make up this one.
    pub processes: u32,
    /// The options the run was started with.
    pub config: serde_json::Value,

    pub subscribers: u64,
    pub subscriptions: u64,
    pub topics: u64,

    pub published: u64,
    pub publish_errors: u64,
    pub publish_retries: u64,
    pub publish_per_s: f64,
    /// Events the schedule offered (`rate × duration`, this run's share of it).
    #[serde(default)]
    pub offered: u64,
    /// `offered / duration_s`: what the publishers were asked to do.
    #[serde(default)]
    pub offered_per_s: f64,
    /// `--ordered`: events never sent because their topic's publisher fell more than
    /// `--publish-timeout` behind.
    #[serde(default)]
    pub publish_unsent: u64,
    /// From the start of the load to the last acknowledgement (at least `duration_s`).
    #[serde(default)]
    pub publish_window_s: f64,
    /// `published / publish_window_s`: publishes per second actually achieved, the
    /// backlog an ordered publisher worked off after the schedule ended included.
    #[serde(default)]
    pub publish_achieved_per_s: f64,
    /// Event data bytes acknowledged, and per second of `duration_s`.
    #[serde(default)]
    pub published_bytes: u64,
    #[serde(default)]
    pub publish_bytes_per_s: f64,

    /// Deliveries owed to the subscribers (each subscription × each event published to
    /// its topic while it was subscribed; signalled skips excluded).
    pub expected: u64,
    /// Distinct owed events received.
    pub delivered: u64,
    /// Owed events never received (`expected − delivered`).
    pub lost: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// History-lost signals received (`reset`, `recovered:false`, 410).
    pub resets: u64,
    /// Events the server said it skipped (conflation).
    pub skipped: u64,
    /// Subscriptions left on an epoch the topic no longer had, unsignalled.
    pub stale: u64,
    /// Events whose data the harness did not write.
    pub foreign: u64,
    /// Events received before their subscription had started (protocol anomaly).
    pub unstarted: u64,
    /// Events acknowledged to the publishers in an epoch that a reset then ended before
    /// the subscriber received them: history the server lost and said so (not in
    /// `expected`, `lost` or `delivered`).
    #[serde(default)]
    pub reset_dropped: u64,
    /// `lost / expected`.
    pub loss_ratio: f64,
    pub deliveries_per_s: f64,
    /// Event data bytes of the deliveries, and per second of `window_s`.
    #[serde(default)]
    pub delivered_bytes: u64,
    #[serde(default)]
    pub delivery_bytes_per_s: f64,
    /// With `--target-pid`: `delivered / target.cpu_s`, deliveries per CPU second of
    /// the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deliveries_per_target_cpu_s: Option<f64>,
    /// CPU seconds the harness's load processes used during the load (a parent of
    /// `--workers` only coordinates and is not counted), and the cores that is.
    #[serde(default)]
    pub harness_cpu_s: f64,
    #[serde(default)]
    pub harness_cpu_cores: f64,
    /// Delivery latency: receive time − intended (scheduled) publish time.
    pub latency_us: Percentiles,
    /// Publish latency: acknowledgement time − intended publish time.
    pub publish_latency_us: Percentiles,

    pub connects: u64,
    pub connect_failures: u64,
    /// Sessions that ended and were followed by another (churn, server request, error).
    pub reconnects: u64,
    pub sessions: u64,
    /// Connections open when the load ended.
    pub connections_open: u64,
    /// Successful connects per second, from the first attempt to the last success.
    pub connect_per_s: f64,
    /// Connect latency: session usable − scheduled connect time.
    pub connect_latency_us: Percentiles,
    /// WebSocket subscribe latency: reply − sending of each subscription's first
    /// subscribe.
    #[serde(default)]
    pub subscribe_latency_us: Percentiles,
    /// Subscribe commands answered with an error, plus subscriptions never answered
    /// by the end of the run.
    #[serde(default)]
    pub subscribe_failures: u64,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<TargetStats>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartOutcome>,
    /// `--slo`: each objective, what was measured, whether it held.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slo: Vec<SloResult>,
    /// Distinct error messages and how often they occurred.
    pub errors: BTreeMap<String, u64>,
    /// One point per second of the run.
    pub timeline: Vec<TimelinePoint>,
    /// The raw material derived figures are computed from (kept for merging).
    pub raw: Raw,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Raw {
    pub start_us: u64,
    pub last_delivery_us: u64,
    pub connect_first_us: u64,
    pub connect_last_us: u64,
    /// Wall clock of the last publish acknowledgement, µs.
    #[serde(default)]
    pub last_ack_us: u64,
    /// The longest load window over which a process's own CPU was read, seconds.
    #[serde(default)]
    pub harness_window_s: f64,
    /// HDR histograms, base64 of the V2 deflate encoding.
    pub latency_hist: String,
    pub publish_hist: String,
    pub connect_hist: String,
    #[serde(default)]
    pub subscribe_hist: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TimelinePoint {
    /// Unix second.
    pub t: u64,
    pub delivered: u64,
    pub published: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    /// That second's latency histogram (base64), for merging.
    pub hist: String,
}

/// One checked `--slo` objective.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SloResult {
    pub objective: String,
    pub actual: String,
    pub ok: bool,
}

/// What `--restart-cmd` did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RestartOutcome {
    pub command: String,
    /// Seconds after the start of the load.
    pub started_after_s: f64,
    pub duration_s: f64,
    pub exit_code: Option<i32>,
    pub timed_out: bool,
}

impl Report {
    pub fn counts(&self) -> Counts {
        Counts {
            expected: self.expected,
            delivered: self.delivered,
            lost: self.lost,
            duplicates: self.duplicates,
            reordered: self.reordered,
            resets: self.resets,
            skipped: self.skipped,
            stale: self.stale,
            unstarted: self.unstarted,
            reset_dropped: self.reset_dropped,
        }
    }

    pub fn set_counts(&mut self, c: &Counts) {
        self.expected = c.expected;
        self.delivered = c.delivered;
        self.lost = c.lost;
        self.duplicates = c.duplicates;
        self.reordered = c.reordered;
        self.resets = c.resets;
        self.skipped = c.skipped;
        self.stale = c.stale;
        self.unstarted = c.unstarted;
        self.reset_dropped = c.reset_dropped;
    }

    /// Adds another partial report of the same run.
    pub fn merge(&mut self, o: &Report) -> anyhow::Result<()> {
        if self.scenario.is_empty() {
            self.scenario = o.scenario.clone();
            self.system = o.system.clone();
            self.transport = o.transport.clone();
            self.target_url = o.target_url.clone();
            self.publish_url = o.publish_url.clone();
            self.run_id = o.run_id.clone();
            self.config = o.config.clone();
            self.version = o.version;
        } else if self.scenario != o.scenario
            || self.transport != o.transport
            || self.system != o.system
        {
            anyhow::bail!(
                "cannot merge a {}/{}/{} report into a {}/{}/{} report",
                o.system_name(),
                o.scenario,
                o.transport,
                self.system_name(),
                self.scenario,
                self.transport
            );
        }
        let mut c = self.counts();
        c.add(&o.counts());
        self.set_counts(&c);
        self.duration_s = self.duration_s.max(o.duration_s);
        self.processes += o.processes;
        self.subscribers += o.subscribers;
        self.subscriptions += o.subscriptions;
        self.topics = self.topics.max(o.topics);
        self.published += o.published;
        self.publish_errors += o.publish_errors;
        self.publish_retries += o.publish_retries;
        self.offered += o.offered;
        self.publish_unsent += o.publish_unsent;
        self.published_bytes += o.published_bytes;
        self.delivered_bytes += o.delivered_bytes;
        self.harness_cpu_s = round3(self.harness_cpu_s + o.harness_cpu_s);
        self.foreign += o.foreign;
        self.connects += o.connects;
        self.connect_failures += o.connect_failures;
        self.subscribe_failures += o.subscribe_failures;
        self.reconnects += o.reconnects;
        self.sessions += o.sessions;
        self.connections_open += o.connections_open;
        if self.target.is_none() {
            self.target = o.target.clone();
        }
        if self.restart.is_none() {
            self.restart = o.restart.clone();
        }
        for (k, v) in &o.errors {
            if self.errors.len() < 64 || self.errors.contains_key(k) {
                *self.errors.entry(k.clone()).or_insert(0) += v;
            }
        }
        let r = &mut self.raw;
        r.start_us = min_nonzero(r.start_us, o.raw.start_us);
        self.started_at_ms = r.start_us / 1000;
        r.last_delivery_us = r.last_delivery_us.max(o.raw.last_delivery_us);
        r.connect_first_us = min_nonzero(r.connect_first_us, o.raw.connect_first_us);
        r.connect_last_us = r.connect_last_us.max(o.raw.connect_last_us);
        r.last_ack_us = r.last_ack_us.max(o.raw.last_ack_us);
        r.harness_window_s = r.harness_window_s.max(o.raw.harness_window_s);
        r.latency_hist = hist::merge_encoded(&r.latency_hist, &o.raw.latency_hist)?;
        r.publish_hist = hist::merge_encoded(&r.publish_hist, &o.raw.publish_hist)?;
        r.connect_hist = hist::merge_encoded(&r.connect_hist, &o.raw.connect_hist)?;
        r.subscribe_hist = hist::merge_encoded(&r.subscribe_hist, &o.raw.subscribe_hist)?;
        let mut points: BTreeMap<u64, TimelinePoint> = std::mem::take(&mut self.timeline)
            .into_iter()
            .map(|p| (p.t, p))
            .collect();
        for p in &o.timeline {
            let e = points.entry(p.t).or_insert_with(|| TimelinePoint {
                t: p.t,
                ..Default::default()
            });
            e.delivered += p.delivered;
            e.published += p.published;
            e.hist = hist::merge_encoded(&e.hist, &p.hist)?;
        }
        self.timeline = points.into_values().collect();
        Ok(())
    }

    /// Recomputes every derived figure from the raw parts.
    pub fn finalize(&mut self) -> anyhow::Result<()> {
        let r = &self.raw;
        let since_start = if r.last_delivery_us > r.start_us && r.start_us > 0 {
            (r.last_delivery_us - r.start_us) as f64 / 1e6
        } else {
            0.0
        };
        self.window_s = round3(self.duration_s.max(since_start));
        self.publish_per_s = rate(self.published, self.duration_s);
        self.offered_per_s = rate(self.offered, self.duration_s);
        let acks = if r.last_ack_us > r.start_us && r.start_us > 0 {
            (r.last_ack_us - r.start_us) as f64 / 1e6
        } else {
            0.0
        };
        self.publish_window_s = round3(self.duration_s.max(acks));
        self.publish_achieved_per_s = rate(self.published, self.publish_window_s);
        self.publish_bytes_per_s = rate(self.published_bytes, self.duration_s);
        self.deliveries_per_s = rate(self.delivered, self.window_s);
        self.delivery_bytes_per_s = rate(self.delivered_bytes, self.window_s);
        self.harness_cpu_cores = if r.harness_window_s > 0.0 {
            round3(self.harness_cpu_s / r.harness_window_s)
        } else {
            0.0
        };
        self.loss_ratio = if self.expected > 0 {
            self.lost as f64 / self.expected as f64
        } else {
            0.0
        };
        let connect_span = if r.connect_last_us > r.connect_first_us && r.connect_first_us > 0 {
            (r.connect_last_us - r.connect_first_us) as f64 / 1e6
        } else {
            0.0
        };
        // A single connect (or all within a microsecond) has no meaningful rate span.
        self.connect_per_s = if connect_span > 0.0 {
            rate(self.connects, connect_span)
        } else {
            0.0
        };
        self.latency_us = Percentiles::of(&hist::decode(&r.latency_hist)?);
        self.publish_latency_us = Percentiles::of(&hist::decode(&r.publish_hist)?);
        self.connect_latency_us = Percentiles::of(&hist::decode(&r.connect_hist)?);
        self.subscribe_latency_us = Percentiles::of(&hist::decode(&r.subscribe_hist)?);
        for p in &mut self.timeline {
            let h = hist::decode(&p.hist)?;
            p.delivered = p.delivered.max(h.len());
            let pc = Percentiles::of(&h);
            p.p50_us = pc.p50;
            p.p99_us = pc.p99;
            p.max_us = pc.max;
        }
        self.derive_target();
        Ok(())
    }

    /// `weft` unless the report says otherwise (older reports have no `system`).
    pub fn system_name(&self) -> &str {
        if self.system.is_empty() {
            "weft"
        } else {
            &self.system
        }
    }

    /// Figures derived from the target's sample (set after the run by the conductor).
    pub fn derive_target(&mut self) {
        self.deliveries_per_target_cpu_s = self
            .target
            .as_ref()
            .filter(|t| t.cpu_s > 0.0)
            .map(|t| (self.delivered as f64 / t.cpu_s).round());
    }

    /// The human-readable summary printed at the end of a run.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let publish = if self.publish_url.is_empty() {
            String::new()
        } else {
            format!(", publishing → {}", self.publish_url)
        };
        let _ = writeln!(
            s,
            "weft-loadtest {} over {} → {} {}{publish}  (run {}, {} process{}, {:.1}s load, {:.1}s window)",
            self.scenario,
            self.transport,
            self.system_name(),
            self.target_url,
            self.run_id,
            self.processes,
            if self.processes == 1 { "" } else { "es" },
            self.duration_s,
            self.window_s
        );
        let row = |s: &mut String, k: &str, v: String| {
            let _ = writeln!(s, "  {k:<22} {v}");
        };
        row(
            &mut s,
            "subscribers",
            format!(
                "{} ({} subscriptions over {} topics)",
                self.subscribers, self.subscriptions, self.topics
            ),
        );
        row(
            &mut s,
            "connects",
            format!(
                "{} ok, {} failed, {} reconnects, {:.0}/s, {} open at end",
                self.connects,
                self.connect_failures,
                self.reconnects,
                self.connect_per_s,
                self.connections_open
            ),
        );
        row(&mut s, "connect latency", fmt_pct(&self.connect_latency_us));
        if self.subscribe_latency_us.count > 0 || self.subscribe_failures > 0 {
            row(
                &mut s,
                "subscribe latency",
                format!(
                    "{}; {} failed",
                    fmt_pct(&self.subscribe_latency_us),
                    self.subscribe_failures
                ),
            );
        }
        row(
            &mut s,
            "published",
            format!(
                "{} ok ({:.0}/s, {}/s), {} failed, {} retries{}{}",
                self.published,
                self.publish_per_s,
                fmt_bytes(self.publish_bytes_per_s as u64),
                self.publish_errors,
                self.publish_retries,
                if self.publish_unsent > 0 {
                    format!(
                        ", {} unsent (publisher too far behind)",
                        self.publish_unsent
                    )
                } else {
                    String::new()
                },
                match self.config.get("publish_via").and_then(|v| v.as_str()) {
                    Some("stream") => ", over publish streams",
                    _ => "",
                }
            ),
        );
        if self.offered > 0 {
            row(
                &mut s,
                "publishes achieved",
                format!(
                    "{:.0}/s of {:.0}/s offered ({} of {} events, last ack at +{:.1}s)",
                    self.publish_achieved_per_s,
                    self.offered_per_s,
                    self.published,
                    self.offered,
                    self.publish_window_s
                ),
            );
        }
        row(&mut s, "publish latency", fmt_pct(&self.publish_latency_us));
        row(
            &mut s,
            "delivered",
            format!(
                "{} of {} expected ({:.0}/s, {}/s)",
                self.delivered,
                self.expected,
                self.deliveries_per_s,
                fmt_bytes(self.delivery_bytes_per_s as u64)
            ),
        );
        row(&mut s, "delivery latency", fmt_pct(&self.latency_us));
        row(
            &mut s,
            "integrity",
            format!(
                "lost {} ({:.4}%), duplicates {}, reordered {}, resets {} (dropped {}), skipped {}, stale {}",
                self.lost,
                self.loss_ratio * 100.0,
                self.duplicates,
                self.reordered,
                self.resets,
                self.reset_dropped,
                self.skipped,
                self.stale
            ),
        );
        if self.foreign > 0 || self.unstarted > 0 {
            row(
                &mut s,
                "anomalies",
                format!(
                    "{} foreign events, {} before subscribe",
                    self.foreign, self.unstarted
                ),
            );
        }
        if let Some(t) = &self.target {
            let per_conn = t
                .rss_per_conn_bytes
                .map(|b| format!(", {} per connection", fmt_bytes(b)))
                .unwrap_or_default();
            row(
                &mut s,
                "target",
                format!(
                    "pid {}: {:.2} CPU s in the load ({:.2} cores), {:.2} with the ramp; RSS {} (start {}, peak {}){}",
                    t.pid,
                    t.cpu_s,
                    t.cpu_cores,
                    t.cpu_run_s,
                    fmt_bytes(t.rss_bytes),
                    fmt_bytes(t.rss_start_bytes),
                    fmt_bytes(t.rss_peak_bytes),
                    per_conn
                ),
            );
            if let Some(d) = self.deliveries_per_target_cpu_s {
                row(
                    &mut s,
                    "deliveries per CPU s",
                    format!(
                        "{d:.0} (target), harness {:.2} cores",
                        self.harness_cpu_cores
                    ),
                );
            }
        }
        row(
            &mut s,
            "harness CPU",
            format!(
                "{:.2} CPU s in the load ({:.2} cores)",
                self.harness_cpu_s, self.harness_cpu_cores
            ),
        );
        if let Some(r) = &self.restart {
            row(
                &mut s,
                "restart",
                format!(
                    "`{}` at +{:.1}s took {:.1}s, exit {}{}",
                    r.command,
                    r.started_after_s,
                    r.duration_s,
                    r.exit_code
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "-".into()),
                    if r.timed_out {
                        " (timed out, killed)"
                    } else {
                        ""
                    }
                ),
            );
        }
        if !self.errors.is_empty() {
            let _ = writeln!(s, "  errors:");
            let mut errs: Vec<_> = self.errors.iter().collect();
            errs.sort_by(|a, b| b.1.cmp(a.1));
            for (e, n) in errs.into_iter().take(10) {
                let _ = writeln!(s, "    {n:>8} × {e}");
            }
        }
        s
    }
}

fn min_nonzero(a: u64, b: u64) -> u64 {
    match (a, b) {
        (0, x) | (x, 0) => x,
        (x, y) => x.min(y),
    }
}

fn rate(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        round3(n as f64 / secs)
    } else {
        0.0
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `1.23ms`-style rendering of microseconds.
pub fn fmt_us(us: u64) -> String {
    if us >= 10_000_000 {
        format!("{:.1}s", us as f64 / 1e6)
    } else if us >= 1_000_000 {
        format!("{:.2}s", us as f64 / 1e6)
    } else if us >= 1_000 {
        format!("{:.2}ms", us as f64 / 1e3)
    } else {
        format!("{us}µs")
    }
}

pub fn fmt_bytes(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    } else if b >= 1 << 10 {
        format!("{:.1} KiB", b as f64 / 1024.0)
    } else {
        format!("{b} B")
    }
}

fn fmt_pct(p: &Percentiles) -> String {
    if p.count == 0 {
        return "-".into();
    }
    format!(
        "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (n={})",
        fmt_us(p.p50),
        fmt_us(p.p90),
        fmt_us(p.p99),
        fmt_us(p.p999),
        fmt_us(p.max),
        p.count
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hist::{encode, new_hist, SIGFIG, SIGFIG_TIMELINE};

    fn partial(latencies: &[u64], start_us: u64, delivered: u64) -> Report {
        let mut h = new_hist(SIGFIG);
        let mut sec = new_hist(SIGFIG_TIMELINE);
        for &l in latencies {
            h.record(l).unwrap();
            sec.record(l).unwrap();
        }
        let mut r = Report {
            version: REPORT_VERSION,
            scenario: "fanout".into(),
            transport: "ws".into(),
            run_id: "r".into(),
            processes: 1,
            duration_s: 10.0,
            subscribers: 5,
            subscriptions: 5,
            topics: 2,
            published: 100,
            expected: delivered + 1,
            delivered,
            lost: 1,
            connects: 5,
            errors: BTreeMap::from([("boom".to_string(), 2)]),
            timeline: vec![TimelinePoint {
                t: 1000,
                delivered: latencies.len() as u64,
                published: 10,
                hist: encode(&sec),
                ..Default::default()
            }],
            raw: Raw {
                start_us,
                last_delivery_us: start_us + 10_500_000,
                connect_first_us: start_us - 1_000_000,
                connect_last_us: start_us - 500_000,
                latency_hist: encode(&h),
                ..Default::default()
            },
            ..Default::default()
        };
        r.finalize().unwrap();
        r
    }

    #[test]
    fn merging_worker_reports_adds_up() {
        let a = partial(&[1_000; 99], 1_000_000_000, 99);
        let b = partial(&[100_000], 1_000_200_000, 1);
        let mut m = Report::default();
        m.merge(&a).unwrap();
        m.merge(&b).unwrap();
        m.finalize().unwrap();
        assert_eq!(m.processes, 2);
        assert_eq!(
            (m.published, m.delivered, m.expected, m.lost),
            (200, 100, 102, 2)
        );
        assert_eq!(m.subscribers, 10);
        assert_eq!(m.topics, 2, "topics are the plan's, not summed");
        assert_eq!(m.errors["boom"], 4);
        assert_eq!(m.latency_us.count, 100);
        assert!(m.latency_us.p50 >= 999 && m.latency_us.p50 <= 1001);
        assert!(m.latency_us.max >= 99_000, "{:?}", m.latency_us);
        assert_eq!(m.raw.start_us, 1_000_000_000);
        assert_eq!(m.raw.last_delivery_us, 1_000_200_000 + 10_500_000);
        // Window: from the earliest start to the latest delivery.
        assert!((m.window_s - 10.7).abs() < 1e-9, "{}", m.window_s);
        assert_eq!(m.timeline.len(), 1);
        assert_eq!(m.timeline[0].delivered, 100);
        assert_eq!(m.timeline[0].published, 20);
        assert!(m.timeline[0].max_us >= 99_000);
        assert_eq!(m.connects, 10);
        // 10 connects between the first attempt and the last success (0.7 s).
        assert!(
            (m.connect_per_s - 10.0 / 0.7).abs() < 0.01,
            "{}",
            m.connect_per_s
        );
        let json = serde_json::to_string(&m).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn merge_refuses_other_scenarios() {
        let a = partial(&[1], 1_000_000_000, 1);
        let mut b = partial(&[1], 1_000_000_000, 1);
        b.scenario = "chat".into();
        let mut m = a.clone();
        assert!(m.merge(&b).is_err());
    }

    #[test]
    fn table_mentions_the_essentials() {
        let r = partial(&[2_000; 10], 1_000_000_000, 10);
        let t = r.table();
        for needle in ["fanout over ws", "delivered", "lost 1", "p99", "boom"] {
            assert!(t.contains(needle), "{needle} missing in\n{t}");
        }
        assert_eq!(fmt_us(1_500), "1.50ms");
        assert_eq!(fmt_us(999), "999µs");
        assert_eq!(fmt_bytes(6 * 1024), "6.0 KiB");
    }
}
