//! The `weft-loadtest` binary as users run it, against an in-process node: worker
//! processes and their merged report, shards merged with `merge`, the JSON and HTML
//! outputs, and the exit codes of `--slo` and `--baseline`.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use weft_loadtest::report::Report;
use weft_testkit::TestNode;

const BIN: &str = env!("CARGO_BIN_EXE_weft-loadtest");

async fn node() -> TestNode {
    TestNode::start_with(|c| c.node_id = format!("loadtest-cli-{}", std::process::id())).await
}

/// A fresh directory per test, removed when dropped.
struct TmpDir(PathBuf);

impl TmpDir {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("weft-loadtest-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn exec(args: &[&str]) -> Output {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(BIN)
            .args(args)
            .env_remove("WEFT_LOADTEST_TARGET")
            .env_remove("WEFT_LOADTEST_RUN_ID")
            .env_remove("WEFT_LOADTEST_WORKER_SLOT")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the binary finishes by itself")
    .unwrap();
    eprintln!(
        "$ weft-loadtest {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

async fn exec_owned(args: Vec<String>) -> Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    exec(&args).await
}

fn report(path: &Path) -> Report {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_merge_into_one_report_and_exit_codes_follow_slo_and_baseline() {
    let node = node().await;
    let dir = TmpDir::new("workers");
    let json = dir.file("workers.json");
    let html = dir.file("workers.html");
    let out = exec(&[
        "fanout",
        "--target",
        &node.url(""),
        "--workers",
        "2",
        "--subscribers",
        "10",
        "--topics",
        "2",
        "--rate",
        "100",
        "--duration",
        "2s",
        "--quiet",
        "--json",
        json.to_str().unwrap(),
        "--html",
        html.to_str().unwrap(),
        "--slo",
        "loss=0,duplicates=0,p99<5s",
    ])
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
    let j = json.to_str().unwrap();
    let out = exec(&["merge", j, "--slo", "p99<1us"]).await;
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAIL p99<1us"));

    // Against itself as the baseline: no regression. Against a baseline twice as fast: 4.
    let out = exec(&["merge", j, "--baseline", j]).await;
    assert_eq!(out.status.code(), Some(0));
    let mut better = r.clone();
    better.deliveries_per_s *= 2.0;
    let better_path = dir.file("better.json");
    std::fs::write(&better_path, serde_json::to_string(&better).unwrap()).unwrap();
    let out = exec(&["merge", j, "--baseline", better_path.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stdout).contains("REGRESSED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_run_apart_and_merge() {
    let node = node().await;
    let dir = TmpDir::new("shards");
    let a = dir.file("shard0.json");
    let b = dir.file("shard1.json");
    let common = |shard: &'static str, path: &Path| {
        vec![
            "chat".to_string(),
            "--target".into(),
            node.url(""),
            "--rooms".into(),
            "2".into(),
            "--members".into(),
            "3".into(),
            "--rate".into(),
            "60".into(),
            "--duration".into(),
            "2s".into(),
            "--shard".into(),
            shard.into(),
            "--run-id".into(),
            "shardtest".into(),
            "--settle".into(),
            "300ms".into(),
            "--quiet".into(),
            "--json".into(),
            path.to_str().unwrap().into(),
        ]
    };
    let args0 = common("0/2", &a);
    let args1 = common("1/2", &b);
    let a0: Vec<&str> = args0.iter().map(String::as_str).collect();
    let a1: Vec<&str> = args1.iter().map(String::as_str).collect();
    let (o0, o1) = tokio::join!(exec(&a0), exec(&a1));
    node.stop_within(Duration::from_secs(10)).await;
    assert_eq!((o0.status.code(), o1.status.code()), (Some(0), Some(0)));
    let (r0, r1) = (report(&a), report(&b));
    assert_eq!((r0.subscribers, r1.subscribers), (3, 3));

    let merged = dir.file("merged.json");
    let out = exec(&[
        "merge",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--json",
        merged.to_str().unwrap(),
    ])
    .await;
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
    let target = node.url("");
    let load = |run: &str| -> Vec<String> {
        [
            "fanout",
            "--target",
            &target,
            "--run-id",
            run,
            "--subscribers",
            "10",
            "--topics",
            "2",
            "--rate",
            "100",
            "--duration",
            "2s",
            "--quiet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let with = |mut base: Vec<String>, more: &[&str]| {
        base.extend(more.iter().map(|s| s.to_string()));
        base
    };
    let coordinator = with(
        load("coordtest"),
        &[
            "--coordinate",
            &addr,
            "--workers",
            "2",
            "--json",
            json.to_str().unwrap(),
        ],
    );
    let coordinator = with(coordinator, &["--slo", "loss=0,duplicates=0,reordered=0"]);
    let worker = |slot: &str| {
        with(
            load("coordtest"),
            &["--coordinator", &addr, "--worker-slot", slot],
        )
    };
    let (w0, w1) = (worker("0/2"), worker("1/2"));
    let (c, a, b) = tokio::join!(exec_owned(coordinator), exec_owned(w0), exec_owned(w1));
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
    let lone = with(
        load("coordtest"),
        &["--coordinate", &addr, "--workers", "1"],
    );
    let stray = with(
        load("another"),
        &["--coordinator", &addr, "--worker-slot", "0/1"],
    );
    let (c, _) = tokio::join!(exec_owned(lone), exec_owned(stray));
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
    let out = exec(&["fanout", "--slo", "p99<10"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a unit"));
    let out = exec(&["fanout", "--shard", "0/2", "--target", "http://127.0.0.1:9"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--shard needs --run-id"));
    let out = exec(&["fanout", "--target", "https://127.0.0.1:9"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("only http://"));
    let out = exec(&["merge", "/nonexistent/report.json"]).await;
    assert_eq!(out.status.code(), Some(1));
}
