//! `--html FILE`: a self-contained page with the summary, the `--slo` verdicts (✓/✗ per
//! objective) and hand-written inline SVG plots (no scripts, no external assets):
//! latency over time (p50/p99/max per second, log scale), throughput over time
//! (deliveries/s on the left axis, published/s on its own right axis — they differ by
//! the fan-out factor, so one axis would flatten the publishes), the latency percentile
//! distribution ("nines" on x, log latency on y), and the target's RSS over time when
//! it was sampled.

use std::fmt::Write as _;

use crate::hist;
use crate::report::{fmt_bytes, fmt_us, Report};

const W: f64 = 760.0;
const H: f64 = 260.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
/// Right margin when a chart has a right axis (room for its labels).
const RIGHT_AXIS: f64 = 70.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 40.0;

/// One line of a chart.
pub struct Series<'a> {
    pub name: &'a str,
    pub color: &'a str,
    pub points: Vec<(f64, f64)>,
}

/// Axis scale of a chart's y axis.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    Linear,
    /// Base-10 logarithmic; values below 1 are drawn at 1.
    Log,
}

pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub series: Vec<Series<'a>>,
    pub y_scale: Scale,
    pub y_fmt: fn(f64) -> String,
    /// Custom x ticks (value, label); `None` = five evenly spaced numeric ticks.
    pub x_ticks: Option<Vec<(f64, String)>>,
    /// Series drawn against their own linear axis on the right (dashed), from 0.
    pub y2: Vec<Series<'a>>,
    pub y2_fmt: fn(f64) -> String,
}

pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

impl Chart<'_> {
    pub fn svg(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="11">"#
        );
        let _ = write!(
            s,
            r#"<text x="{LEFT}" y="18" font-size="13" font-weight="bold">{}</text>"#,
            escape(self.title)
        );
        let pts: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .collect();
        let pts2: Vec<(f64, f64)> = self
            .y2
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .collect();
        if pts.is_empty() && pts2.is_empty() {
            let _ = write!(
                s,
                r##"<text x="{}" y="{}" fill="#888">no data</text></svg>"##,
                W / 2.0 - 20.0,
                H / 2.0
            );
            return s;
        }
        let (mut x0, mut x1) = (f64::MAX, f64::MIN);
        let (mut y0, mut y1) = (f64::MAX, f64::MIN);
        for &(x, y) in &pts {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if pts.is_empty() {
            (y0, y1) = (1.0, 1.0);
        }
        let mut y2_max = 1.0f64;
        for &(x, y) in &pts2 {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y2_max = y2_max.max(y);
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        let ty = |y: f64| match self.y_scale {
            Scale::Linear => y,
            Scale::Log => y.max(1.0).log10(),
        };
        let (ly0, ly1) = match self.y_scale {
            Scale::Linear => {
                let step = nice_step(y1.max(1.0), 4);
                (0.0, ((y1.max(1.0) / step).ceil() * step).max(step))
            }
            Scale::Log => {
                let lo = ty(y0).floor();
                let hi = ty(y1).ceil().max(lo + 1.0);
                (lo, hi)
            }
        };
        let right = if self.y2.is_empty() {
            RIGHT
        } else {
            RIGHT_AXIS
        };
        let pw = W - LEFT - right;
        let ph = H - TOP - BOTTOM;
        let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * pw;
        let sy = |y: f64| TOP + ph - (ty(y) - ly0) / (ly1 - ly0) * ph;
        // Axes and grid.
        let _ = write!(
            s,
            r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#ccc"/>"##
        );
        let y_ticks: Vec<f64> = match self.y_scale {
            Scale::Linear => nice_ticks(0.0, ly1, 4).0,
            Scale::Log => (ly0 as i32..=ly1 as i32).map(|e| 10f64.powi(e)).collect(),
        };
        for v in y_ticks {
            let y = sy(v);
            let _ = write!(
                s,
                r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                W - right,
                LEFT - 6.0,
                y + 4.0,
                escape(&(self.y_fmt)(v))
            );
        }
        let x_ticks = self.x_ticks.clone().unwrap_or_else(|| {
            let (ticks, step) = nice_ticks(x0, x1, 5);
            ticks
                .into_iter()
                .map(|v| {
                    let label = if step >= 1.0 {
                        format!("{v:.0}")
                    } else {
                        format!("{v:.1}")
                    };
                    (v, label)
                })
                .collect()
        });
        for (v, label) in x_ticks {
            if v < x0 || v > x1 {
                continue;
            }
            let x = sx(v);
            let _ = write!(
                s,
                r##"<line x1="{x:.1}" x2="{x:.1}" y1="{TOP}" y2="{}" stroke="#eee"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
                TOP + ph,
                TOP + ph + 14.0,
                escape(&label)
            );
        }
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            LEFT + pw / 2.0,
            H - 6.0,
            escape(self.x_label)
        );
        // The right axis: linear from 0, its own ticks.
        let step2 = nice_step(y2_max, 4);
        let top2 = ((y2_max / step2).ceil() * step2).max(step2);
        let sy2 = |y: f64| TOP + ph - y / top2 * ph;
        if !pts2.is_empty() {
            for v in nice_ticks(0.0, top2, 4).0 {
                let _ = write!(
                    s,
                    r#"<text x="{}" y="{:.1}" text-anchor="start">{}</text>"#,
                    W - right + 6.0,
                    sy2(v) + 4.0,
                    escape(&(self.y2_fmt)(v))
                );
            }
        }
        for series in &self.y2 {
            if series.points.is_empty() {
                continue;
            }
            let path: Vec<String> = series
                .points
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy2(y)))
                .collect();
            let _ = write!(
                s,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.8" stroke-dasharray="5,3" points="{}"/>"#,
                series.color,
                path.join(" ")
            );
        }
        // Series and legend.
        let legend = self.series.len() + self.y2.len();
        for (i, series) in self.series.iter().chain(&self.y2).enumerate() {
            if series.points.is_empty() {
                continue;
            }
            let primary = i < self.series.len();
            let path: Vec<String> = series
                .points
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
                .collect();
            if primary {
                let _ = write!(
                    s,
                    r#"<polyline fill="none" stroke="{}" stroke-width="1.8" points="{}"/>"#,
                    series.color,
                    path.join(" ")
                );
            }
            if primary && series.points.len() == 1 {
                let (x, y) = series.points[0];
                let _ = write!(
                    s,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{}"/>"#,
                    sx(x),
                    sy(y),
                    series.color
                );
            }
            // Legend in the title row, right-aligned, so it never hides a line.
            let lx = W - right - (legend - i) as f64 * 100.0;
            let ly = 18.0;
            let _ = write!(
                s,
                r#"<rect x="{lx}" y="{}" width="10" height="3" fill="{}"/><text x="{}" y="{}">{}</text>"#,
                ly - 4.0,
                series.color,
                lx + 14.0,
                ly,
                escape(series.name)
            );
        }
        s.push_str("</svg>");
        s
    }
}

/// A round step (1, 2 or 5 × 10^k) splitting `span` into about `n` parts.
fn nice_step(span: f64, n: usize) -> f64 {
    let raw = span / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let m = if norm < 1.5 {
        1.0
    } else if norm < 3.0 {
        2.0
    } else if norm < 7.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

/// Round tick values within `lo..=hi`, and their step.
fn nice_ticks(lo: f64, hi: f64, n: usize) -> (Vec<f64>, f64) {
    if hi <= lo {
        return (vec![lo], 1.0);
    }
    let step = nice_step(hi - lo, n);
    let mut v = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while v <= hi + step * 1e-9 && out.len() < 50 {
        out.push(v);
        v += step;
    }
    (out, step)
}

fn fmt_latency(v: f64) -> String {
    fmt_us(v as u64)
}

fn fmt_rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn fmt_rss(v: f64) -> String {
    fmt_bytes(v as u64)
}

/// The quantiles of the distribution plot, with their labels.
const QUANTILES: [(f64, &str); 8] = [
    (0.0, "0%"),
    (0.5, "50%"),
    (0.9, "90%"),
    (0.99, "99%"),
    (0.999, "99.9%"),
    (0.9999, "99.99%"),
    (0.99999, "99.999%"),
    (1.0, "max"),
];

/// x position of quantile `q` on the "nines" axis: −log10(1 − q), max drawn one step
/// past 99.999%.
fn nines(q: f64) -> f64 {
    if q >= 1.0 {
        6.0
    } else {
        -(1.0 - q).log10()
    }
}

/// Renders the whole page.
pub fn render(r: &Report) -> String {
    let t0 = r
        .timeline
        .first()
        .map(|p| p.t)
        .unwrap_or(r.raw.start_us / 1_000_000);
    let start_s = (r.raw.start_us / 1_000_000) as f64;
    let rel = |t: u64| t as f64 - if start_s > 0.0 { start_s } else { t0 as f64 };
    let with_latency: Vec<_> = r.timeline.iter().filter(|p| p.delivered > 0).collect();
    let latency = Chart {
        title: "Delivery latency over time (per second)",
        x_label: "seconds since the load started",
        series: vec![
            Series {
                name: "p50",
                color: "#2b8a3e",
                points: with_latency
                    .iter()
                    .map(|p| (rel(p.t), p.p50_us as f64))
                    .collect(),
            },
            Series {
                name: "p99",
                color: "#e67700",
                points: with_latency
                    .iter()
                    .map(|p| (rel(p.t), p.p99_us as f64))
                    .collect(),
            },
            Series {
                name: "max",
                color: "#c92a2a",
                points: with_latency
                    .iter()
                    .map(|p| (rel(p.t), p.max_us as f64))
                    .collect(),
            },
        ],
        y_scale: Scale::Log,
        y_fmt: fmt_latency,
        x_ticks: None,
        y2: vec![],
        y2_fmt: fmt_rate,
    };
    let throughput = Chart {
        title: "Throughput over time (deliveries/s left, published/s right)",
        x_label: "seconds since the load started",
        series: vec![Series {
            name: "deliveries/s",
            color: "#1971c2",
            points: r
                .timeline
                .iter()
                .map(|p| (rel(p.t), p.delivered as f64))
                .collect(),
        }],
        y_scale: Scale::Linear,
        y_fmt: fmt_rate,
        x_ticks: None,
        y2: vec![Series {
            name: "published/s (right)",
            color: "#862e9c",
            points: r
                .timeline
                .iter()
                .map(|p| (rel(p.t), p.published as f64))
                .collect(),
        }],
        y2_fmt: fmt_rate,
    };
    let dist_points = hist::decode(&r.raw.latency_hist)
        .ok()
        .filter(|h| !h.is_empty())
        .map(|h| {
            QUANTILES
                .iter()
                .map(|&(q, _)| {
                    (
                        nines(q),
                        if q >= 1.0 {
                            h.max()
                        } else {
                            h.value_at_quantile(q)
                        } as f64,
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let distribution = Chart {
        title: "Delivery latency by percentile",
        x_label: "percentile",
        series: vec![Series {
            name: "latency",
            color: "#e67700",
            points: dist_points,
        }],
        y_scale: Scale::Log,
        y_fmt: fmt_latency,
        x_ticks: Some(
            QUANTILES
                .iter()
                .map(|&(q, l)| (nines(q), l.to_string()))
                .collect(),
        ),
        y2: vec![],
        y2_fmt: fmt_rate,
    };

    let mut page = String::new();
    let _ = write!(
        page,
        r#"<!doctype html><html><head><meta charset="utf-8"><title>weft-loadtest {sc} {tr}</title>
<style>body{{font-family:sans-serif;margin:24px;color:#222}}table{{border-collapse:collapse}}td,th{{padding:3px 10px;border-bottom:1px solid #eee;text-align:left}}td.n{{text-align:right;font-variant-numeric:tabular-nums}}.bad{{color:#c92a2a;font-weight:bold}}.ok{{color:#2b8a3e;font-weight:bold}}svg{{display:block;margin:18px 0}}</style>
</head><body><h1>weft-loadtest: {sc} over {tr} → {sys}</h1><p>target {url} · run {run} · {procs} process(es) · {dur:.1}s load, {win:.1}s window</p>"#,
        sc = escape(&r.scenario),
        tr = escape(&r.transport),
        sys = escape(r.system_name()),
        url = escape(&r.target_url),
        run = escape(&r.run_id),
        procs = r.processes,
        dur = r.duration_s,
        win = r.window_s,
    );
    if !r.slo.is_empty() {
        page.push_str(
            "<h2>Objectives</h2><table><tr><th></th><th>objective</th><th>actual</th></tr>",
        );
        for v in &r.slo {
            let _ = write!(
                page,
                r#"<tr><td class="{}">{}</td><td>{}</td><td class="n">{}</td></tr>"#,
                if v.ok { "ok" } else { "bad" },
                if v.ok { "✓" } else { "✗" },
                escape(&v.objective),
                escape(&v.actual)
            );
        }
        page.push_str("</table><h2>Summary</h2>");
    }
    page.push_str("<table>");
    let mut row = |k: &str, v: String, bad: bool| {
        let _ = write!(
            page,
            r#"<tr><th>{}</th><td class="n{}">{}</td></tr>"#,
            escape(k),
            if bad { " bad" } else { "" },
            escape(&v)
        );
    };
    row(
        "published",
        format!(
            "{} ({:.0}/s, {}/s), {} failed, {} unsent",
            r.published,
            r.publish_per_s,
            fmt_bytes(r.publish_bytes_per_s as u64),
            r.publish_errors,
            r.publish_unsent
        ),
        r.publish_errors > 0 || r.publish_unsent > 0,
    );
    row(
        "publishes achieved",
        format!(
            "{:.0}/s of {:.0}/s offered",
            r.publish_achieved_per_s, r.offered_per_s
        ),
        r.publish_achieved_per_s + 0.5 < r.offered_per_s * 0.99,
    );
    let q = &r.publish_latency_us;
    row(
        "publish ack latency",
        format!(
            "p50 {} · p99 {} · max {}",
            fmt_us(q.p50),
            fmt_us(q.p99),
            fmt_us(q.max)
        ),
        false,
    );
    row("expected", r.expected.to_string(), false);
    row(
        "delivered",
        format!(
            "{} ({:.0}/s, {}/s)",
            r.delivered,
            r.deliveries_per_s,
            fmt_bytes(r.delivery_bytes_per_s as u64)
        ),
        false,
    );
    row(
        "lost",
        format!("{} ({:.4}%)", r.lost, r.loss_ratio * 100.0),
        r.lost > 0,
    );
    row("duplicates", r.duplicates.to_string(), r.duplicates > 0);
    row("reordered", r.reordered.to_string(), r.reordered > 0);
    row(
        "resets",
        format!(
            "{} ({} events dropped with history)",
            r.resets, r.reset_dropped
        ),
        r.resets > 0,
    );
    row("skipped", r.skipped.to_string(), false);
    let p = &r.latency_us;
    row(
        "delivery latency",
        format!(
            "p50 {} · p90 {} · p99 {} · p99.9 {} · max {}",
            fmt_us(p.p50),
            fmt_us(p.p90),
            fmt_us(p.p99),
            fmt_us(p.p999),
            fmt_us(p.max)
        ),
        false,
    );
    let c = &r.connect_latency_us;
    row(
        "connects",
        format!(
            "{} ok, {} failed, {:.0}/s; latency p50 {} · p99 {}",
            r.connects,
            r.connect_failures,
            r.connect_per_s,
            fmt_us(c.p50),
            fmt_us(c.p99)
        ),
        r.connect_failures > 0,
    );
    if let Some(t) = &r.target {
        row(
            "target",
            format!(
                "{:.2} CPU s ({:.2} cores), RSS {} (peak {}){}",
                t.cpu_s,
                t.cpu_cores,
                fmt_bytes(t.rss_bytes),
                fmt_bytes(t.rss_peak_bytes),
                t.rss_per_conn_bytes
                    .map(|b| format!(", {} per connection", fmt_bytes(b)))
                    .unwrap_or_default()
            ),
            false,
        );
        if let Some(d) = r.deliveries_per_target_cpu_s {
            row("deliveries per target CPU s", format!("{d:.0}"), false);
        }
    }
    row(
        "harness CPU",
        format!(
            "{:.2} CPU s ({:.2} cores)",
            r.harness_cpu_s, r.harness_cpu_cores
        ),
        false,
    );
    if let Some(rs) = &r.restart {
        row(
            "restart",
            format!(
                "`{}` at +{:.1}s, {:.1}s, exit {}",
                rs.command,
                rs.started_after_s,
                rs.duration_s,
                rs.exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into())
            ),
            rs.exit_code != Some(0),
        );
    }
    page.push_str("</table>");
    page.push_str(&latency.svg());
    page.push_str(&distribution.svg());
    page.push_str(&throughput.svg());
    if let Some(t) = r.target.as_ref().filter(|t| !t.rss_timeline.is_empty()) {
        let rss = Chart {
            title: "Target RSS",
            x_label: "seconds since the load started",
            series: vec![Series {
                name: "RSS",
                color: "#495057",
                points: t
                    .rss_timeline
                    .iter()
                    .map(|(&s, &b)| (rel(s), b as f64))
                    .collect(),
            }],
            y_scale: Scale::Linear,
            y_fmt: fmt_rss,
            x_ticks: None,
            y2: vec![],
            y2_fmt: fmt_rate,
        };
        page.push_str(&rss.svg());
    }
    if !r.errors.is_empty() {
        page.push_str("<h2>Errors</h2><table>");
        for (e, n) in &r.errors {
            let _ = write!(
                page,
                r#"<tr><td class="n">{n}</td><td>{}</td></tr>"#,
                escape(e)
            );
        }
        page.push_str("</table>");
    }
    page.push_str("</body></html>\n");
    page
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hist::{encode, new_hist, SIGFIG};
    use crate::report::TimelinePoint;

    #[test]
    fn page_has_the_plots_and_escapes_text() {
        let mut h = new_hist(SIGFIG);
        for v in 1..=10_000u64 {
            h.record(v * 10).unwrap();
        }
        let mut r = Report {
            scenario: "fanout".into(),
            transport: "ws".into(),
            lost: 2,
            errors: [("<script>alert(1)</script>".to_string(), 1)].into(),
            timeline: (0..5)
                .map(|i| TimelinePoint {
                    t: 1000 + i,
                    delivered: 100,
                    published: 10,
                    p50_us: 500,
                    p99_us: 2000 + i * 100,
                    max_us: 9000,
                    hist: String::new(),
                })
                .collect(),
            ..Default::default()
        };
        r.raw.start_us = 1_000_000_000;
        r.raw.latency_hist = encode(&h);
        r.slo = vec![
            crate::report::SloResult {
                objective: "p99<10ms".into(),
                actual: "2.4ms".into(),
                ok: true,
            },
            crate::report::SloResult {
                objective: "loss=0".into(),
                actual: "2".into(),
                ok: false,
            },
        ];
        let page = render(&r);
        assert!(
            page.contains("✓</td><td>p99&lt;10ms"),
            "objectives with verdicts"
        );
        assert!(page.contains("✗</td><td>loss=0"));
        // published/s has its own (dashed, right-hand) axis.
        assert!(page.contains("stroke-dasharray"));
        assert_eq!(page.matches("<svg").count(), 3);
        assert!(page.contains("<polyline"));
        assert!(page.contains("99.9%"));
        assert!(!page.contains("<script>"));
        assert!(page.contains("&lt;script&gt;"));
        assert!(page.contains(r#"class="n bad""#), "lost > 0 is flagged");
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(
            nice_ticks(0.0, 2.0, 5),
            (vec![0.0, 0.5, 1.0, 1.5, 2.0], 0.5)
        );
        assert_eq!(nice_ticks(0.0, 550.0, 4).1, 100.0);
        assert_eq!(nice_ticks(0.3, 9.0, 4).0, vec![2.0, 4.0, 6.0, 8.0]);
        assert_eq!(nice_ticks(3.0, 3.0, 4).0, vec![3.0]);
    }

    #[test]
    fn empty_chart_says_so() {
        let c = Chart {
            title: "t",
            x_label: "x",
            series: vec![],
            y_scale: Scale::Log,
            y_fmt: fmt_latency,
            x_ticks: None,
            y2: vec![],
            y2_fmt: fmt_rate,
        };
        assert!(c.svg().contains("no data"));
    }
}
