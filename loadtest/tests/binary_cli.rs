//! The `weft-loadtest` binary as users run it, against an in-process node: worker
//! processes and their merged report, shards merged with `merge`, the JSON and HTML
//! outputs, and the exit codes of `--slo` and `--baseline`.

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use weft_loadtest::report::Report;
use weft_testkit::TestNode;

mod common;

async fn node() -> TestNode {
    TestNode::start_with(|c| c.node_id = format!("loadtest-cli-{}", std::process::id())).await
}

/// A fresh directory per test, removed when dropped.
struct TmpDir(PathBuf);

impl TmpDir {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("weft-loadtest-{test}-{}", std::process::id()));
        assert!(
            !dir.to_string_lossy().contains(char::is_whitespace),
            "the tests put paths into command lines"
        );
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// `name` in the directory, as a string for a command line.
    fn file(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The binary with `args` (the paths in it are [`TmpDir`] files, which hold no white
/// space).
async fn exec(args: impl AsRef<str>) -> Output {
    common::exec(args.as_ref(), &[]).await
}

fn report(path: &str) -> Report {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_merge_into_one_report_and_exit_codes_follow_slo_and_baseline() {
    let node = node().await;
    let dir = TmpDir::new("workers");
    let json = dir.file("workers.json");
    let html = dir.file("workers.html");
    let out = exec(&format!(
        "fanout --target {} --workers 2 --subscribers 10 --topics 2 --rate 100 --duration 2s \
         --quiet --json {json} --html {html} --slo loss=0,duplicates=0,p99<5s",
        node.url("")
    ))
    .await;
    node.stop_within(Duration::from_secs(10)).await;
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("PASS loss=0"), "{stdout}");

    let r = report(&json);
    assert_eq!(r.processes, 2);
    assert_eq!(r.subscribers, 10);
    assert_eq!(r.published, 200);
    assert_eq!(r.expected, 200 * 5);
    assert_eq!(
        (r.delivered, r.lost, r.duplicates, r.reordered),
        (1000, 0, 0, 0)
    );
    assert_eq!(r.latency_us.count, 1000, "the workers' histograms merged");
    for key in [
        "scenario",
        "transport",
        "published",
        "expected",
        "delivered",
        "lost",
        "duplicates",
        "reordered",
        "resets",
        "deliveries_per_s",
        "latency_us",
        "connect_per_s",
    ] {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert!(v.get(key).is_some(), "JSON report lacks `{key}`");
    }
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg") && page.contains("fanout over ws"));

    // The same report against objectives it misses: exit 3.
    let j = &json;
    let out = exec(&format!("merge {j} --slo p99<1us")).await;
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAIL p99<1us"));

    // Against itself as the baseline: no regression. Against a baseline twice as fast: 4.
    let out = exec(&format!("merge {j} --baseline {j}")).await;
    assert_eq!(out.status.code(), Some(0));
    let mut better = r.clone();
    better.deliveries_per_s *= 2.0;
    let better_path = dir.file("better.json");
    std::fs::write(&better_path, serde_json::to_string(&better).unwrap()).unwrap();
    let out = exec(&format!("merge {j} --baseline {better_path}")).await;
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stdout).contains("REGRESSED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_run_apart_and_merge() {
    let node = node().await;
    let dir = TmpDir::new("shards");
    let a = dir.file("shard0.json");
    let b = dir.file("shard1.json");
    let shard = |shard: &str, json: &str| {
        format!(
            "chat --target {} --rooms 2 --members 3 --rate 60 --duration 2s --shard {shard} \
             --run-id shardtest --settle 300ms --quiet --json {json}",
            node.url("")
        )
    };
    let (o0, o1) = tokio::join!(exec(shard("0/2", &a)), exec(shard("1/2", &b)));
    node.stop_within(Duration::from_secs(10)).await;
    assert_eq!((o0.status.code(), o1.status.code()), (Some(0), Some(0)));
    let (r0, r1) = (report(&a), report(&b));
    assert_eq!((r0.subscribers, r1.subscribers), (3, 3));

    let merged = dir.file("merged.json");
    let out = exec(&format!("merge {a} {b} --json {merged}")).await;
    assert_eq!(out.status.code(), Some(0));
    let m = report(&merged);
    assert_eq!(m.processes, 2);
    assert_eq!(m.published, 120);
    // Every message reaches the 3 members of its room.
    assert_eq!((m.expected, m.delivered, m.lost), (360, 360, 0));
}

/// A distributed run as the Helm chart's load Job runs it: a coordinator
/// (`--coordinate ADDR --workers 2`) and two remote workers (`--coordinator ADDR
/// --worker-slot i/2`, separate processes) start together and make one report,
/// gated once; a worker of another run is turned away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_and_remote_workers_make_one_run() {
    let node = node().await;
    let dir = TmpDir::new("coordinated");
    let json = dir.file("run.json");
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let load = |run: &str| {
        format!(
            "fanout --target {} --run-id {run} --subscribers 10 --topics 2 --rate 100 \
             --duration 2s --quiet",
            node.url("")
        )
    };
    let coordinator = format!(
        "{} --coordinate {addr} --workers 2 --json {json} --slo loss=0,duplicates=0,reordered=0",
        load("coordtest")
    );
    let worker = |slot: &str| {
        format!(
            "{} --coordinator {addr} --worker-slot {slot}",
            load("coordtest")
        )
    };
    let (c, a, b) = tokio::join!(exec(&coordinator), exec(worker("0/2")), exec(worker("1/2")));
    assert_eq!(
        (c.status.code(), a.status.code(), b.status.code()),
        (Some(0), Some(0), Some(0))
    );
    assert!(String::from_utf8_lossy(&c.stdout).contains("PASS loss=0"));
    let r = report(&json);
    assert_eq!(r.processes, 2, "both workers' reports merged");
    assert_eq!(r.published, 200);
    assert_eq!(
        (r.delivered, r.lost, r.duplicates, r.reordered),
        (1000, 0, 0, 0)
    );

    // A worker of another run is refused, and the coordinator says why.
    let lone = format!("{} --coordinate {addr} --workers 1", load("coordtest"));
    let stray = format!("{} --coordinator {addr} --worker-slot 0/1", load("another"));
    let (c, _) = tokio::join!(exec(&lone), exec(&stray));
    node.stop_within(Duration::from_secs(10)).await;
    assert_ne!(c.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&c.stderr).contains("runs another"),
        "{}",
        String::from_utf8_lossy(&c.stderr)
    );
}

#[tokio::test]
async fn usage_errors_are_clear() {
    let out = exec("fanout --slo p99<10").await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a unit"));
    let out = exec("fanout --shard 0/2 --target http://127.0.0.1:9").await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--shard needs --run-id"));
    let out = exec("fanout --target ftp://127.0.0.1:9").await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("use an http:// or https:// URL"));
    let out = exec("fanout --target https://127.0.0.1:9 --ca-file /nonexistent/ca.crt").await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--ca-file /nonexistent/ca.crt: cannot read it")
            && stderr.lines().count() == 1,
        "{stderr}"
    );
    let out = exec("merge /nonexistent/report.json").await;
    assert_eq!(out.status.code(), Some(1));
}
