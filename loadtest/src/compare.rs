//! `weft-loadtest compare REPORTS…`: the same loads against several systems, side by
//! side. Reports are grouped by load (scenario, subscribers, topics, rate, payload,
//! ordering, duration) and by system (`weft`, `nats`); each figure of a group is the
//! median over its runs (each figure on its own, as benchmark tables do), written as a
//! markdown table (also printed), JSON and a self-contained HTML page.
//!
//! Running the servers is not the harness's business: a script starts a fresh server
//! per run, alternating the systems, and hands the reports to this command
//! (`scripts/issue12-bench.sh`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;
use serde_json::Value;

use crate::cli::CompareArgs;
use crate::html::escape;
use crate::report::{fmt_bytes, fmt_us, Report};

/// The figures compared, in table order: (key, column heading).
pub const FIGURES: [(&str, &str); 14] = [
    ("deliveries_per_s", "deliveries/s"),
    ("delivery_bytes_per_s", "delivered bytes/s"),
    ("deliveries_per_target_cpu_s", "deliveries per server CPU-s"),
    ("target_cpu_cores", "server cores"),
    ("harness_cpu_cores", "harness cores"),
    ("publish_achieved_per_s", "publishes/s achieved"),
    ("offered_per_s", "offered/s"),
    ("latency_p50_us", "delivery p50"),
    ("latency_p99_us", "delivery p99"),
    ("publish_p50_us", "publish-ack p50"),
    ("publish_p99_us", "publish-ack p99"),
    ("lost", "lost"),
    ("connect_per_s", "connects/s"),
    ("rss_per_conn_bytes", "server RSS per connection"),
];

/// One system's runs of one load.
#[derive(Debug, Clone, Serialize)]
pub struct SystemRuns {
    pub system: String,
    pub runs: usize,
    pub reports: Vec<String>,
    /// Figure → median over the runs (figures a run lacks are left out of it).
    pub median: BTreeMap<String, f64>,
}

/// One load, every system that ran it.
#[derive(Debug, Clone, Serialize)]
pub struct LoadComparison {
    pub load: String,
    pub systems: Vec<SystemRuns>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub loads: Vec<LoadComparison>,
}

/// The figures of one report, by [`FIGURES`] key.
pub fn figures(r: &Report) -> BTreeMap<String, f64> {
    let mut f = BTreeMap::new();
    let mut put = |k: &str, v: f64| {
        f.insert(k.to_string(), v);
    };
    put("deliveries_per_s", r.deliveries_per_s);
    put("delivery_bytes_per_s", r.delivery_bytes_per_s);
    put("harness_cpu_cores", r.harness_cpu_cores);
    put("publish_achieved_per_s", r.publish_achieved_per_s);
    put("offered_per_s", r.offered_per_s);
    put("latency_p50_us", r.latency_us.p50 as f64);
    put("latency_p99_us", r.latency_us.p99 as f64);
    put("publish_p50_us", r.publish_latency_us.p50 as f64);
    put("publish_p99_us", r.publish_latency_us.p99 as f64);
    put("lost", r.lost as f64);
    put("connect_per_s", r.connect_per_s);
    if let Some(t) = &r.target {
        put("target_cpu_cores", t.cpu_cores);
        if t.cpu_s > 0.0 {
            put("deliveries_per_target_cpu_s", r.delivered as f64 / t.cpu_s);
        }
        if let Some(b) = t.rss_per_conn_bytes {
            put("rss_per_conn_bytes", b as f64);
        }
    }
    f
}

/// What makes two runs the same load.
pub fn load_key(r: &Report) -> String {
    let c = &r.config;
    let num = |k: &str| c.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let ordered =
        c.get("ordered").and_then(Value::as_bool).unwrap_or(false) || r.system_name() == "nats";
    format!(
        "{} {} subscribers × {} topic(s) at {}/s, {} B, {}{}s",
        r.scenario,
        num("subscribers"),
        num("topics"),
        num("rate"),
        num("payload_bytes"),
        if ordered { "ordered, " } else { "" },
        num("duration_s"),
    )
}

/// The median of `v` (the mean of the middle two for an even count).
pub fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

/// One report's path and figures.
type Run = (String, BTreeMap<String, f64>);

/// Groups and takes medians. Loads keep the order they first appear in; systems are
/// sorted by name.
pub fn compare(reports: &[(String, Report)]) -> Comparison {
    let mut order: Vec<String> = Vec::new();
    let mut groups: BTreeMap<(String, String), Vec<Run>> = BTreeMap::new();
    for (path, r) in reports {
        let key = load_key(r);
        if !order.contains(&key) {
            order.push(key.clone());
        }
        groups
            .entry((key, r.system_name().to_string()))
            .or_default()
            .push((path.clone(), figures(r)));
    }
    let loads = order
        .into_iter()
        .map(|load| {
            let systems = groups
                .iter()
                .filter(|((l, _), _)| *l == load)
                .map(|((_, system), runs)| {
                    let mut median_of = BTreeMap::new();
                    for (k, _) in FIGURES {
                        let mut v: Vec<f64> =
                            runs.iter().filter_map(|(_, f)| f.get(k).copied()).collect();
                        if let Some(m) = median(&mut v) {
                            median_of.insert(k.to_string(), m);
                        }
                    }
                    SystemRuns {
                        system: system.clone(),
                        runs: runs.len(),
                        reports: runs.iter().map(|(p, _)| p.clone()).collect(),
                        median: median_of,
                    }
                })
                .collect();
            LoadComparison { load, systems }
        })
        .collect();
    Comparison { loads }
}

/// A figure as the tables show it.
pub fn show(key: &str, v: f64) -> String {
    if key.ends_with("_us") {
        fmt_us(v as u64)
    } else if key.contains("bytes") {
        if key.ends_with("_per_s") {
            format!("{}/s", fmt_bytes(v as u64))
        } else {
            fmt_bytes(v as u64)
        }
    } else if key.ends_with("cores") {
        format!("{v:.2}")
    } else {
        format!("{v:.0}")
    }
}

/// The columns worth showing: figures at least one group has (`lost` always: a zero
/// there is a finding).
fn columns(c: &Comparison) -> Vec<(&'static str, &'static str)> {
    FIGURES
        .iter()
        .copied()
        .filter(|(k, _)| {
            *k == "lost"
                || c.loads
                    .iter()
                    .flat_map(|l| &l.systems)
                    .any(|s| s.median.get(*k).is_some_and(|v| *v != 0.0))
        })
        .collect()
}

impl Comparison {
    /// One row per load and system, the systems of a load next to each other.
    pub fn markdown(&self) -> String {
        let cols = columns(self);
        let mut s = String::from("| load | system | runs |");
        for (_, h) in &cols {
            let _ = write!(s, " {h} |");
        }
        s.push_str("\n|---|---|---|");
        for _ in &cols {
            s.push_str("---|");
        }
        s.push('\n');
        for l in &self.loads {
            for sys in &l.systems {
                let _ = write!(s, "| {} | {} | {} |", l.load, sys.system, sys.runs);
                for (k, _) in &cols {
                    let v = sys.median.get(*k).map(|v| show(k, *v)).unwrap_or_default();
                    let _ = write!(s, " {v} |");
                }
                s.push('\n');
            }
        }
        s
    }

    pub fn html(&self) -> String {
        let cols = columns(self);
        let mut p = String::from(
            r#"<!doctype html><html><head><meta charset="utf-8"><title>weft-loadtest compare</title>
<style>body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse}td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}tr.first td{border-top:2px solid #999}</style>
</head><body><h1>weft-loadtest: side by side</h1><p>Each figure is the median of the runs of its group.</p><table><tr><th>load</th><th>system</th><th>runs</th>"#,
        );
        for (_, h) in &cols {
            let _ = write!(p, "<th>{}</th>", escape(h));
        }
        p.push_str("</tr>");
        for l in &self.loads {
            for (i, sys) in l.systems.iter().enumerate() {
                let _ = write!(
                    p,
                    r#"<tr{}><td>{}</td><td>{}</td><td class="n">{}</td>"#,
                    if i == 0 { r#" class="first""# } else { "" },
                    if i == 0 {
                        escape(&l.load)
                    } else {
                        String::new()
                    },
                    escape(&sys.system),
                    sys.runs
                );
                for (k, _) in &cols {
                    let v = sys.median.get(*k).map(|v| show(k, *v)).unwrap_or_default();
                    let _ = write!(p, r#"<td class="n">{}</td>"#, escape(&v));
                }
                p.push_str("</tr>");
            }
        }
        p.push_str("</table></body></html>\n");
        p
    }
}

/// `compare`: reads the reports, prints the markdown table, writes the outputs.
pub fn run(args: &CompareArgs) -> anyhow::Result<u8> {
    let mut reports = Vec::with_capacity(args.reports.len());
    for path in &args.reports {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let r: Report = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a weft-loadtest JSON report", path.display()))?;
        reports.push((path.display().to_string(), r));
    }
    let c = compare(&reports);
    let md = c.markdown();
    print!("{md}");
    let write = |path: &Path, text: String, what: &str| -> anyhow::Result<()> {
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        println!("{what}: {}", path.display());
        Ok(())
    };
    if let Some(p) = &args.markdown {
        write(p, md, "markdown")?;
    }
    if let Some(p) = &args.json {
        write(p, serde_json::to_string_pretty(&c)? + "\n", "JSON")?;
    }
    if let Some(p) = &args.html {
        write(p, c.html(), "HTML")?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hist::Percentiles;
    use crate::target::TargetStats;

    fn run(system: &str, dps: f64, p99: u64, cpu_s: f64) -> Report {
        Report {
            scenario: "fanout".into(),
            system: system.into(),
            config: serde_json::json!({"subscribers": 500, "topics": 1, "rate": 2000.0,
                "payload_bytes": 100, "duration_s": 10.0, "ordered": true}),
            delivered: 1000,
            deliveries_per_s: dps,
            latency_us: Percentiles {
                p99,
                ..Default::default()
            },
            target: Some(TargetStats {
                cpu_s,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn medians_per_load_and_system() {
        let reports = vec![
            ("w1".to_string(), run("weft", 100.0, 900, 1.0)),
            ("n1".to_string(), run("nats", 300.0, 100, 0.5)),
            ("w2".to_string(), run("weft", 120.0, 1000, 2.0)),
            ("n2".to_string(), run("nats", 200.0, 300, 0.25)),
            ("w3".to_string(), run("weft", 110.0, 5000, 4.0)),
            ("n3".to_string(), run("nats", 250.0, 200, 1.0)),
        ];
        let c = compare(&reports);
        assert_eq!(c.loads.len(), 1);
        let l = &c.loads[0];
        assert!(l.load.contains("500 subscribers") && l.load.contains("ordered"));
        let names: Vec<&str> = l.systems.iter().map(|s| s.system.as_str()).collect();
        assert_eq!(names, ["nats", "weft"]);
        let weft = &l.systems[1];
        assert_eq!(weft.runs, 3);
        assert_eq!(weft.median["deliveries_per_s"], 110.0);
        assert_eq!(weft.median["latency_p99_us"], 1000.0);
        // 1000 deliveries over 1, 2, 4 CPU seconds: median 500 per CPU second.
        assert_eq!(weft.median["deliveries_per_target_cpu_s"], 500.0);
        let nats = &l.systems[0];
        assert_eq!(nats.median["deliveries_per_s"], 250.0);
        let md = c.markdown();
        assert!(md.contains("| weft | 3 |"), "{md}");
        assert!(md.contains("deliveries per server CPU-s"), "{md}");
        assert!(md.contains("| lost |"), "lost is shown even when 0: {md}");
        assert!(c.html().contains("<td>nats</td>"));
        // Older reports have no system: Weft.
        let mut old = run("", 1.0, 1, 1.0);
        old.config["subscribers"] = 7.into();
        let c = compare(&[("o".into(), old)]);
        assert_eq!(c.loads[0].systems[0].system, "weft");
    }

    #[test]
    fn median_of_even_and_empty() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0, 1.0]), Some(2.0));
        assert_eq!(median(&mut [5.0, 1.0, 3.0]), Some(3.0));
    }
}
