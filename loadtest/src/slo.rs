//! `--slo 'p99<10ms,loss=0'`: service-level objectives checked against a report.
//!
//! A spec is clauses separated by `,`; a clause is `metric op value`:
//!
//! | metric | value |
//! |---|---|
//! | `p50` `p90` `p99` `p999` `max` `mean` (delivery latency), `connect_p50` … `connect_max`, `subscribe_p50` … `subscribe_max`, `publish_p50` … `publish_max` | a duration with its unit: `800us`, `10ms`, `1.5s` |
//! | `loss` (= `lost`), `duplicates`, `reordered`, `resets`, `reset_dropped`, `skipped`, `stale`, `publish_errors`, `publish_unsent`, `connect_failures`, `subscribe_failures` | a count, or a percentage of `expected` (`loss<0.01%`) |
//! | `deliveries_per_s`, `publish_per_s`, `publish_achieved_per_s`, `connect_per_s` | a number, optionally with `k` or `M` |
//!
//! `op` is one of `<` `<=` `>` `>=` `=` (also `==`). A missed objective makes the run exit
//! with code 3.

use std::fmt;

use thiserror::Error;

use crate::hist::Percentiles;
use crate::report::Report;

#[derive(Debug, Clone, PartialEq, Error)]
pub enum SloError {
    #[error("--slo is empty; give clauses like `p99<10ms,loss=0`")]
    Empty,
    #[error(
        "--slo clause `{0}` has no comparison; write it like `p99<10ms` (operators: < <= > >= =)"
    )]
    NoOperator(String),
    #[error("--slo clause `{clause}`: unknown metric `{metric}` (known: {known})")]
    UnknownMetric {
        clause: String,
        metric: String,
        known: String,
    },
    #[error("--slo clause `{clause}`: `{value}` is not a number")]
    BadNumber { clause: String, value: String },
    #[error("--slo clause `{clause}`: latency needs a unit (us, ms or s), e.g. `{metric}<10ms`")]
    MissingUnit { clause: String, metric: String },
    #[error("--slo clause `{clause}`: unit `{unit}` does not fit metric `{metric}` ({expected})")]
    BadUnit {
        clause: String,
        metric: String,
        unit: String,
        expected: &'static str,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
}

impl Op {
    fn holds(self, actual: f64, bound: f64) -> bool {
        match self {
            Op::Lt => actual < bound,
            Op::Le => actual <= bound,
            Op::Gt => actual > bound,
            Op::Ge => actual >= bound,
            Op::Eq => (actual - bound).abs() < 1e-9,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    LatencyUs,
    Count,
    Rate,
}

/// One objective.
#[derive(Debug, Clone, PartialEq)]
pub struct Objective {
    pub clause: String,
    pub metric: String,
    pub op: Op,
    /// Microseconds for latency, a count or a rate, or a fraction when `ratio`.
    pub bound: f64,
    /// The bound is a fraction of `expected` (given as a percentage).
    pub ratio: bool,
}

/// One checked objective.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub clause: String,
    pub actual: String,
    pub ok: bool,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} (actual {})",
            if self.ok { "PASS" } else { "FAIL" },
            self.clause,
            self.actual
        )
    }
}

const LATENCY: [&str; 6] = ["p50", "p90", "p99", "p999", "max", "mean"];
const COUNTS: [&str; 12] = [
    "loss",
    "lost",
    "duplicates",
    "reordered",
    "resets",
    "reset_dropped",
    "skipped",
    "stale",
    "publish_errors",
    "publish_unsent",
    "connect_failures",
    "subscribe_failures",
];
const RATES: [&str; 4] = [
    "deliveries_per_s",
    "publish_per_s",
    "publish_achieved_per_s",
    "connect_per_s",
];

fn kind_of(metric: &str) -> Option<Kind> {
    let lat = metric
        .strip_prefix("connect_")
        .or_else(|| metric.strip_prefix("subscribe_"))
        .or_else(|| metric.strip_prefix("publish_"))
        .unwrap_or(metric);
    if LATENCY.contains(&lat) {
        Some(Kind::LatencyUs)
    } else if COUNTS.contains(&metric) {
        Some(Kind::Count)
    } else if RATES.contains(&metric) {
        Some(Kind::Rate)
    } else {
        None
    }
}

fn known() -> String {
    let mut all: Vec<String> = LATENCY.iter().map(|s| s.to_string()).collect();
    all.push("connect_p99 (etc.)".into());
    all.push("subscribe_p99 (etc.)".into());
    all.push("publish_p99 (etc.)".into());
    all.extend(COUNTS.iter().map(|s| s.to_string()));
    all.extend(RATES.iter().map(|s| s.to_string()));
    all.join(", ")
}

/// Parses a spec.
pub fn parse(spec: &str) -> Result<Vec<Objective>, SloError> {
    let clauses: Vec<&str> = spec
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    if clauses.is_empty() {
        return Err(SloError::Empty);
    }
    clauses.into_iter().map(parse_clause).collect()
}

fn parse_clause(clause: &str) -> Result<Objective, SloError> {
    let pos = clause
        .find(['<', '>', '='])
        .ok_or_else(|| SloError::NoOperator(clause.into()))?;
    let metric = clause[..pos].trim().to_ascii_lowercase();
    let rest = &clause[pos..];
    let (op, value) = [
        ("<=", Op::Le),
        (">=", Op::Ge),
        ("==", Op::Eq),
        ("<", Op::Lt),
        (">", Op::Gt),
        ("=", Op::Eq),
    ]
    .iter()
    .find_map(|(t, op)| rest.strip_prefix(t).map(|v| (*op, v.trim())))
    .expect("pos points at an operator");
    let metric = match metric.as_str() {
        "p99.9" => "p999".to_string(),
        "lost" => "loss".to_string(),
        _ => metric,
    };
    let kind = kind_of(&metric).ok_or_else(|| SloError::UnknownMetric {
        clause: clause.into(),
        metric: metric.clone(),
        known: known(),
    })?;
    let split = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+'))
        .unwrap_or(value.len());
    let (num, unit) = (value[..split].trim(), value[split..].trim());
    let n: f64 = num
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite())
        .ok_or_else(|| SloError::BadNumber {
            clause: clause.into(),
            value: value.into(),
        })?;
    let bad_unit = |expected| SloError::BadUnit {
        clause: clause.into(),
        metric: metric.clone(),
        unit: unit.into(),
        expected,
    };
    let (bound, ratio) = match kind {
        Kind::LatencyUs => match unit {
            "" => {
                return Err(SloError::MissingUnit {
                    clause: clause.into(),
                    metric,
                })
            }
            "us" | "µs" => (n, false),
            "ms" => (n * 1e3, false),
            "s" => (n * 1e6, false),
            _ => return Err(bad_unit("us, ms or s")),
        },
        Kind::Count => match unit {
            "" => (n, false),
            "%" => (n / 100.0, true),
            _ => return Err(bad_unit("a count, or a percentage like 0.1%")),
        },
        Kind::Rate => match unit {
            "" | "/s" => (n, false),
            "k" | "k/s" => (n * 1e3, false),
            "M" | "M/s" => (n * 1e6, false),
            _ => return Err(bad_unit("a number, optionally with k or M")),
        },
    };
    Ok(Objective {
        clause: clause.into(),
        metric,
        op,
        bound,
        ratio,
    })
}

fn latency_of(p: &Percentiles, which: &str) -> f64 {
    match which {
        "p50" => p.p50 as f64,
        "p90" => p.p90 as f64,
        "p99" => p.p99 as f64,
        "p999" => p.p999 as f64,
        "max" => p.max as f64,
        _ => p.mean,
    }
}

/// Checks each objective against the report.
pub fn check(objectives: &[Objective], r: &Report) -> Vec<Verdict> {
    objectives
        .iter()
        .map(|o| {
            let m = o.metric.as_str();
            let (actual, shown) = if let Some(w) =
                m.strip_prefix("connect_").filter(|w| LATENCY.contains(w))
            {
                let v = latency_of(&r.connect_latency_us, w);
                (v, crate::report::fmt_us(v as u64))
            } else if let Some(w) = m.strip_prefix("subscribe_").filter(|w| LATENCY.contains(w)) {
                let v = latency_of(&r.subscribe_latency_us, w);
                (v, crate::report::fmt_us(v as u64))
            } else if let Some(w) = m.strip_prefix("publish_").filter(|w| LATENCY.contains(w)) {
                let v = latency_of(&r.publish_latency_us, w);
                (v, crate::report::fmt_us(v as u64))
            } else if LATENCY.contains(&m) {
                let v = latency_of(&r.latency_us, m);
                (v, crate::report::fmt_us(v as u64))
            } else {
                let v = match m {
                    "loss" => r.lost as f64,
                    "duplicates" => r.duplicates as f64,
                    "reordered" => r.reordered as f64,
                    "resets" => r.resets as f64,
                    "reset_dropped" => r.reset_dropped as f64,
                    "skipped" => r.skipped as f64,
                    "stale" => r.stale as f64,
                    "publish_errors" => r.publish_errors as f64,
                    "publish_unsent" => r.publish_unsent as f64,
                    "connect_failures" => r.connect_failures as f64,
                    "subscribe_failures" => r.subscribe_failures as f64,
                    "deliveries_per_s" => r.deliveries_per_s,
                    "publish_per_s" => r.publish_per_s,
                    "publish_achieved_per_s" => r.publish_achieved_per_s,
                    _ => r.connect_per_s,
                };
                if o.ratio {
                    let frac = if r.expected > 0 {
                        v / r.expected as f64
                    } else {
                        0.0
                    };
                    (frac, format!("{:.4}%", frac * 100.0))
                } else {
                    (v, format!("{v}"))
                }
            };
            Verdict {
                clause: o.clause.clone(),
                actual: shown,
                ok: o.op.holds(actual, o.bound),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            expected: 10_000,
            lost: 3,
            deliveries_per_s: 50_000.0,
            latency_us: Percentiles {
                count: 10,
                p50: 800,
                p99: 9_000,
                max: 20_000,
                ..Default::default()
            },
            connect_latency_us: Percentiles {
                p99: 2_000,
                ..Default::default()
            },
            subscribe_latency_us: Percentiles {
                p99: 4_000,
                ..Default::default()
            },
            subscribe_failures: 2,
            ..Default::default()
        }
    }

    #[test]
    fn parses_the_documented_example() {
        let o = parse("p99<10ms,loss=0").unwrap();
        assert_eq!(o.len(), 2);
        assert_eq!(
            (o[0].metric.as_str(), o[0].op, o[0].bound),
            ("p99", Op::Lt, 10_000.0)
        );
        assert_eq!(
            (o[1].metric.as_str(), o[1].op, o[1].bound),
            ("loss", Op::Eq, 0.0)
        );
        let o = parse(" p99.9 <= 1.5s , lost<0.1% , deliveries_per_s>=40k ").unwrap();
        assert_eq!(
            (o[0].metric.as_str(), o[0].op, o[0].bound),
            ("p999", Op::Le, 1_500_000.0)
        );
        assert!(o[1].ratio && (o[1].bound - 0.001).abs() < 1e-12);
        assert_eq!(o[2].bound, 40_000.0);
    }

    #[test]
    fn checks_against_a_report() {
        let r = report();
        let v = check(
            &parse("p99<10ms,loss=0,loss<0.1%,connect_p99<=2ms,max<10ms,deliveries_per_s>40k")
                .unwrap(),
            &r,
        );
        let oks: Vec<bool> = v.iter().map(|v| v.ok).collect();
        assert_eq!(oks, vec![true, false, true, true, false, true]);
        assert!(v[1].to_string().starts_with("FAIL loss=0"), "{}", v[1]);
        assert_eq!(v[2].actual, "0.0300%");
        let mut slow = report();
        slow.publish_achieved_per_s = 900.0;
        slow.publish_unsent = 4;
        let v = check(
            &parse("publish_achieved_per_s>=1k,publish_unsent=0,publish_achieved_per_s>800")
                .unwrap(),
            &slow,
        );
        let oks: Vec<bool> = v.iter().map(|v| v.ok).collect();
        assert_eq!(oks, vec![false, false, true]);
        let v = check(
            &parse("subscribe_p99<5ms,subscribe_p99<3ms,subscribe_failures=0").unwrap(),
            &r,
        );
        let oks: Vec<bool> = v.iter().map(|v| v.ok).collect();
        assert_eq!(oks, vec![true, false, false]);
        assert_eq!(v[0].actual, "4.00ms");
    }

    #[test]
    fn parse_errors_are_clear() {
        assert_eq!(parse(" , "), Err(SloError::Empty));
        let e = parse("p99 10ms").unwrap_err();
        assert!(e.to_string().contains("no comparison"), "{e}");
        let e = parse("p98<10ms").unwrap_err();
        assert!(
            e.to_string().contains("unknown metric `p98`") && e.to_string().contains("p99"),
            "{e}"
        );
        let e = parse("p99<10").unwrap_err();
        assert!(e.to_string().contains("needs a unit"), "{e}");
        let e = parse("p99<10kg").unwrap_err();
        assert!(e.to_string().contains("unit `kg`"), "{e}");
        let e = parse("loss<abc").unwrap_err();
        assert!(e.to_string().contains("not a number"), "{e}");
        let e = parse("loss<5ms").unwrap_err();
        assert!(matches!(e, SloError::BadUnit { .. }), "{e}");
    }
}
