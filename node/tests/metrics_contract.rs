//! What `/metrics` promises, checked with Prometheus' own tool against a live
//! `weft-node`: `promtool check metrics` accepts the page (HELP and TYPE for every
//! family, counter names, units), the process and build families are there, HTTP
//! requests are counted by route template, bytes in and out by transport; the chart's
//! PrometheusRule passes
//! `promtool check rules`; and every query of the Grafana dashboard, the alerts and
//! the prometheus-adapter rule names a metric family the node (or, for the router
//! alerts, a live `weft-router`) really exports.

mod deploy;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use weft_testkit::bin::{self, Proc, Workdir};

use deploy::{
    alert_exprs, block_scalar, document, render, root, run, run_with_input, spec_of, text, tool,
};

/// A standalone `weft-node` on 127.0.0.1:0, killed on drop (before its directory
/// goes).
struct LiveNode {
    _proc: Proc,
    http: String,
    _dir: Workdir,
}

impl LiveNode {
    fn start(name: &str) -> Self {
        let dir = Workdir::new("metrics", name);
        let mut child = bin::loopback_node(dir.root())
            .args(["--node-id", "metrics-test"])
            .stderr(Stdio::null())
            .spawn()
            .expect("start weft-node");
        let ready = bin::wait_ready_file(&mut child, &dir.join("ready.json"), "weft-node");
        Self {
            _proc: Proc(child),
            http: ready["http"].as_str().unwrap().to_owned(),
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// Traffic on a few routes (published, read, refused), then the page once the
    /// exporter has copied the counters (once a second).
    async fn exercised_metrics(&self) -> String {
        let c = reqwest::Client::new();
        // A WebSocket session and an SSE watch, so every transport has moved bytes.
        let mut ws = weft_testkit::ws::WsClient::connect(self.http.parse().unwrap()).await;
        ws.send_text(r#"{"id":1,"subscribe":{"topic":"metrics.check"}}"#)
            .await;
        let reply = ws.next_msg().await;
        assert!(reply.error.is_none(), "{reply:?}");
        let mut sse = c
            .get(self.url("/v1/topics/metrics.check/events?watch=true"))
            .send()
            .await
            .unwrap();
        assert_eq!(sse.status(), 200);
        for i in 0..3 {
            let r = c
                .post(self.url("/v1/topics/metrics.check/events"))
                .header("content-type", "application/json")
                .body(format!("{{\"i\":{i}}}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
        }
        for (path, want) in [("/v1/topics/metrics.check", 200), ("/no/such/route", 404)] {
            let status = c.get(self.url(path)).send().await.unwrap().status();
            assert_eq!(status, want, "GET {path}");
        }
        let chunk = tokio::time::timeout(Duration::from_secs(5), sse.chunk())
            .await
            .expect("the SSE watch delivers")
            .unwrap();
        assert!(chunk.is_some_and(|c| !c.is_empty()));
        assert!(
            ws.next_event().await.is_some(),
            "the WebSocket session delivers"
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        drop((ws, sse));
        let r = c.get(self.url("/metrics")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap()
    }
}

/// The `/metrics` page of a live single-voter `weft-router` (`--ops-listen`), once it
/// leads.
async fn live_router_metrics() -> String {
    let dir = Workdir::new("metrics", "router");
    let ready = dir.join("ready.json");
    let mut proc = Proc(
        bin::command(bin::path("weft-router"))
            .args(["--cluster-insecure", "--id", "1"])
            .args(["--listen", "127.0.0.1:0", "--ops-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--ready-file")
            .arg(&ready)
            .stderr(Stdio::null())
            .spawn()
            .expect("start weft-router"),
    );
    let bound = bin::await_ready_file(&mut proc.0, &ready, "weft-router").await;
    let url = format!("http://{}/metrics", bound["ops_listen"].as_str().unwrap());
    weft_testkit::wait::wait_for(Duration::from_secs(15), "the router leads", || async {
        let page = reqwest::get(&url)
            .await
            .map_err(|e| e.to_string())?
            .text()
            .await
            .map_err(|e| e.to_string())?;
        if page.contains("weft_router_is_leader{router=\"1\"} 1") {
            Ok(page)
        } else {
            Err("not leading yet".into())
        }
    })
    .await
}

/// Family names declared by `# TYPE` lines, with the sample names a histogram adds.
fn exported_names(page: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in page.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        names.insert(name.to_owned());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
    }
    names
}

/// The Weft and process metric names a PromQL expression mentions.
fn metric_names(expr: &str) -> Vec<String> {
    let bytes = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let word_start = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if word_start && (expr[i..].starts_with("weft_") || expr[i..].starts_with("process_")) {
            let end = expr[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(expr.len(), |n| i + n);
            out.push(expr[i..end].to_owned());
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

#[tokio::test]
async fn live_metrics_pass_promtool_check_metrics() {
    let Some(promtool) = tool("promtool", "PROMTOOL") else {
        return;
    };
    let node = LiveNode::start("promtool");
    let page = node.exercised_metrics().await;
    let out = run_with_input(
        Command::new(&promtool).args(["check", "metrics"]),
        page.as_bytes(),
    );
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n--- page ---\n{page}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let names = exported_names(&page);
    for family in weft_node::stats::FAMILIES
        .iter()
        .chain(weft_router::prometheus::PROCESS_FAMILIES)
        .map(|f| f.0)
    {
        assert!(
            page.contains(&format!("# HELP {family} ")),
            "{family} has no HELP line"
        );
    }
    for must in [
        "weft_build_info",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
        "weft_http_request_duration_seconds_bucket",
    ] {
        assert!(names.contains(must), "{must} missing from:\n{page}");
    }
    assert!(page.contains(
        "weft_http_requests_total{node=\"metrics-test\",route=\"/v1/topics/{topic}/events\",method=\"POST\",status=\"201\"} 3"
    ), "{page}");
    assert!(
        page.contains("route=\"unmatched\""),
        "the 404 is counted under `unmatched`"
    );
    assert!(
        page.contains("weft_published_total{node=\"metrics-test\"} 3"),
        "{page}"
    );
    // Bytes in and out, per transport: every one this test used has moved some.
    let bytes = |family: &str, transport: &str| -> f64 {
        let series = format!("{family}{{node=\"metrics-test\",transport=\"{transport}\"}} ");
        page.lines()
            .find_map(|l| l.strip_prefix(&series))
            .unwrap_or_else(|| panic!("no {series} in:\n{page}"))
            .trim()
            .parse()
            .unwrap()
    };
    for (family, transport) in [
        ("weft_bytes_received_total", "http"),
        ("weft_bytes_received_total", "ws"),
        ("weft_bytes_sent_total", "http"),
        ("weft_bytes_sent_total", "ws"),
        ("weft_bytes_sent_total", "sse"),
    ] {
        assert!(bytes(family, transport) > 0.0, "{family} {transport} is 0");
    }
    assert_eq!(bytes("weft_bytes_sent_total", "ndjson"), 0.0);
    // A standalone node has no relay links: the lag families are declared, empty.
    for family in [
        "weft_relay_link_queued_bytes",
        "weft_relay_link_queued_frames",
    ] {
        assert!(page.contains(&format!("# TYPE {family} gauge\n")), "{page}");
    }
}

#[test]
fn rendered_prometheus_rule_passes_promtool_check_rules() {
    let Some(helm) = tool("helm", "HELM") else {
        return;
    };
    let Some(promtool) = tool("promtool", "PROMTOOL") else {
        return;
    };
    let m = render(&helm, None, &["metrics.prometheusRule.enabled=true"]).unwrap();
    let groups = spec_of(document(&m, "PrometheusRule", "weft"));
    let file = std::env::temp_dir().join(format!("weft-rules-{}.yaml", std::process::id()));
    std::fs::write(&file, &groups).unwrap();
    let out = run(Command::new(&promtool).args(["check", "rules"]).arg(&file));
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "promtool check rules:\n{}{}\n{groups}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let said = text(&out.stdout);
    assert!(said.contains("SUCCESS: 10 rules found"), "{said}");
}

#[tokio::test]
async fn dashboard_alert_and_adapter_queries_name_exported_metrics() {
    let Some(helm) = tool("helm", "HELM") else {
        return;
    };
    let node = LiveNode::start("names");
    let mut exported = exported_names(&node.exercised_metrics().await);
    exported.extend(exported_names(&live_router_metrics().await));

    let mut queries: Vec<(String, String)> = Vec::new();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("helm/weft/files/dashboards/weft.json")).unwrap(),
    )
    .unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            queries.push((
                format!("panel {:?}", panel["title"]),
                target["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if var["type"] == "query" {
            queries.push((
                format!("variable {}", var["name"]),
                var["query"].as_str().unwrap().to_owned(),
            ));
        }
    }
    assert!(queries.len() > 20, "the dashboard lost its panels");
    // The panels for what the issue asked to see: HTTP by route, bytes by transport,
    // relay lag per peer link.
    for must in [
        "weft_http_requests_total",
        "weft_http_request_duration_seconds_bucket",
        "weft_bytes_received_total",
        "weft_bytes_sent_total",
        "weft_relay_link_queued_bytes",
        "weft_relay_link_queued_frames",
    ] {
        assert!(
            queries
                .iter()
                .any(|(_, q)| metric_names(q).iter().any(|n| n == must)),
            "no dashboard panel shows {must}"
        );
    }

    let m = render(
        &helm,
        None,
        &[
            "metrics.prometheusRule.enabled=true",
            "metrics.adapterRules.enabled=true",
            "metrics.dashboard.enabled=true",
        ],
    )
    .unwrap();
    for expr in alert_exprs(document(&m, "PrometheusRule", "weft")) {
        queries.push(("alert".into(), expr));
    }
    let adapter = block_scalar(document(&m, "ConfigMap", "-adapter-rules"), "rules.yaml");
    let series = adapter
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("- seriesQuery: "))
        .expect("the adapter rule has a seriesQuery");
    queries.push(("adapter rule".into(), series.to_owned()));
    // The dashboard ConfigMap carries the same JSON as the file checked above.
    let cm = document(&m, "ConfigMap", "-dashboard");
    assert!(
        cm.contains("\"uid\": \"weft-overview\""),
        "dashboard ConfigMap lost its JSON"
    );

    let mut without_metric = Vec::new();
    for (whence, expr) in &queries {
        let names = metric_names(expr);
        if names.is_empty() {
            without_metric.push(format!("{whence}: {expr}"));
        }
        for name in names {
            assert!(
                exported.contains(&name),
                "{whence} names {name}, which weft-node does not export: {expr}"
            );
        }
    }
    // Only the scrape-health alerts (nodes, routers) may use Prometheus' own `up`.
    assert_eq!(
        without_metric.len(),
        2,
        "queries naming no Weft metric: {without_metric:?}"
    );
    assert!(
        without_metric.iter().all(|q| q.starts_with("alert: up{")),
        "{without_metric:?}"
    );
}

#[test]
fn metric_names_are_found_in_promql() {
    assert_eq!(
        metric_names("sum by (le) (rate(weft_delivery_latency_seconds_bucket{a=\"weft_x\"}[5m])) / process_open_fds"),
        ["weft_delivery_latency_seconds_bucket", "weft_x", "process_open_fds"]
    );
    assert!(metric_names("up{job=\"x\"} == 0").is_empty());
}
