//! `--baseline FILE`: compare a run with an earlier JSON report.
//!
//! Two figures decide: the p99 latency (delivery latency; connect latency for the
//! `connect` scenario, subscribe latency for `subscribe`) and the throughput (deliveries per second; connects per second
//! for `connect`). The run regresses when p99 grew, or throughput shrank, by more than
//! `--baseline-threshold` percent (default 10). Other figures are shown for context.

use std::fmt::Write as _;

use crate::report::{fmt_us, Report};

#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub metric: &'static str,
    pub baseline: f64,
    pub current: f64,
    /// Percent change from the baseline (positive = larger).
    pub change_pct: f64,
    /// Whether this row decides, and regressed.
    pub regressed: bool,
    pub decides: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub rows: Vec<Row>,
    pub threshold_pct: f64,
    pub warnings: Vec<String>,
}

impl Comparison {
    pub fn regressed(&self) -> bool {
        self.rows.iter().any(|r| r.regressed)
    }

    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "baseline comparison (threshold {}%):",
            self.threshold_pct
        );
        for w in &self.warnings {
            let _ = writeln!(s, "  warning: {w}");
        }
        for r in &self.rows {
            let show = |v: f64| {
                if r.metric.contains("latency") || r.metric.contains("p99") {
                    fmt_us(v as u64)
                } else {
                    format!("{v:.1}")
                }
            };
            let _ = writeln!(
                s,
                "  {:<22} {:>12} → {:>12}  {:>+8.1}%  {}",
                r.metric,
                show(r.baseline),
                show(r.current),
                r.change_pct,
                match (r.decides, r.regressed) {
                    (true, true) => "REGRESSED",
                    (true, false) => "ok",
                    (false, _) => "",
                }
            );
        }
        s
    }
}

fn change(base: f64, cur: f64) -> f64 {
    if base == 0.0 {
        if cur == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (cur - base) / base * 100.0
    }
}

/// Compares `cur` with `base`.
pub fn compare(base: &Report, cur: &Report, threshold_pct: f64) -> Comparison {
    let mut warnings = Vec::new();
    if base.scenario != cur.scenario || base.transport != cur.transport {
        warnings.push(format!(
            "baseline is {}/{}, this run is {}/{}",
            base.scenario, base.transport, cur.scenario, cur.transport
        ));
    }
    if base.config != cur.config {
        warnings.push("baseline ran with different options (see `config` in both reports)".into());
    }
    let connect = cur.scenario == "connect";
    let (p99_name, bp99, cp99) = match cur.scenario.as_str() {
        "connect" => (
            "connect p99",
            base.connect_latency_us.p99,
            cur.connect_latency_us.p99,
        ),
        "subscribe" => (
            "subscribe p99",
            base.subscribe_latency_us.p99,
            cur.subscribe_latency_us.p99,
        ),
        _ => ("latency p99", base.latency_us.p99, cur.latency_us.p99),
    };
    let (tp_name, btp, ctp) = if connect {
        ("connect_per_s", base.connect_per_s, cur.connect_per_s)
    } else {
        (
            "deliveries_per_s",
            base.deliveries_per_s,
            cur.deliveries_per_s,
        )
    };
    let p99_change = change(bp99 as f64, cp99 as f64);
    let tp_change = change(btp, ctp);
    let mut rows = vec![
        Row {
            metric: p99_name,
            baseline: bp99 as f64,
            current: cp99 as f64,
            change_pct: p99_change,
            regressed: bp99 > 0 && p99_change > threshold_pct,
            decides: true,
        },
        Row {
            metric: tp_name,
            baseline: btp,
            current: ctp,
            change_pct: tp_change,
            regressed: -tp_change > threshold_pct,
            decides: true,
        },
    ];
    let context: [(&'static str, f64, f64); 4] = [
        (
            "latency p50",
            base.latency_us.p50 as f64,
            cur.latency_us.p50 as f64,
        ),
        ("lost", base.lost as f64, cur.lost as f64),
        ("publish_per_s", base.publish_per_s, cur.publish_per_s),
        (
            "target cpu_s",
            base.target.as_ref().map(|t| t.cpu_s).unwrap_or(0.0),
            cur.target.as_ref().map(|t| t.cpu_s).unwrap_or(0.0),
        ),
    ];
    for (metric, b, c) in context {
        rows.push(Row {
            metric,
            baseline: b,
            current: c,
            change_pct: change(b, c),
            regressed: false,
            decides: false,
        });
    }
    Comparison {
        rows,
        threshold_pct,
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hist::Percentiles;

    fn report(p99: u64, dps: f64) -> Report {
        Report {
            scenario: "fanout".into(),
            transport: "ws".into(),
            deliveries_per_s: dps,
            latency_us: Percentiles {
                p99,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn within_threshold_passes() {
        let c = compare(&report(1000, 10_000.0), &report(1090, 9_200.0), 10.0);
        assert!(!c.regressed(), "{}", c.table());
        assert!(c.warnings.is_empty());
    }

    #[test]
    fn worse_p99_or_throughput_regresses() {
        let c = compare(&report(1000, 10_000.0), &report(1200, 10_000.0), 10.0);
        assert!(c.regressed());
        assert!(c.table().contains("REGRESSED"));
        let c = compare(&report(1000, 10_000.0), &report(1000, 8_000.0), 10.0);
        assert!(c.regressed());
        assert!((c.rows[1].change_pct + 20.0).abs() < 1e-9);
        // Better is never a regression.
        let c = compare(&report(1000, 10_000.0), &report(500, 20_000.0), 10.0);
        assert!(!c.regressed());
        // A looser threshold lets the 20% slip through.
        let c = compare(&report(1000, 10_000.0), &report(1200, 10_000.0), 25.0);
        assert!(!c.regressed());
    }

    #[test]
    fn connect_scenario_uses_connect_figures_and_warns_on_mismatch() {
        let mut base = report(0, 0.0);
        base.scenario = "connect".into();
        base.connect_per_s = 1000.0;
        base.connect_latency_us.p99 = 500;
        let mut cur = base.clone();
        cur.connect_per_s = 500.0;
        let c = compare(&base, &cur, 10.0);
        assert!(c.regressed());
        assert_eq!(c.rows[1].metric, "connect_per_s");
        let c = compare(&report(1, 1.0), &cur, 10.0);
        assert_eq!(c.warnings.len(), 1);
    }
}
