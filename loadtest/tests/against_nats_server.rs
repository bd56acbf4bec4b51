//! `--system nats` against a real `nats-server` (WebSocket listener on a free loopback
//! port, started per test): the books add up exactly as against Weft — every
//! acknowledged publish reaches every subscriber of its topic, none lost, none twice,
//! in order — in one process, with `--workers`, and for `connect`; `compare` reads the
//! reports of both systems.
//!
//! Needs `nats-server` (`$NATS_SERVER`, `PATH`, or `/usr/sbin/nats-server`; `.ci/run`
//! installs it). Missing, the tests fail under `CI=true` and are skipped loudly
//! otherwise.

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use weft_loadtest::app;
use weft_loadtest::cli::Cli;
use weft_loadtest::report::Report;

use common::run;

fn nats_server() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NATS_SERVER").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("nats-server"))
            .find(|p| p.is_file())
    });
    let found = on_path.or_else(|| {
        let p = PathBuf::from("/usr/sbin/nats-server");
        p.is_file().then_some(p)
    });
    if found.is_none() {
        if std::env::var_os("CI").is_some() {
            panic!("nats-server is not installed (set NATS_SERVER or install it as .ci/run does)");
        }
        let _ = writeln!(
            std::io::stderr(),
            "\n!!!!!!!! SKIPPED: nats-server is not installed, so the NATS comparison test did not run.\n\
             !!!!!!!! Install it as .ci/run does (apt-get install nats-server); in CI this is a failure.\n"
        );
    }
    found
}

/// A `nats-server` with a WebSocket listener on a port it chose itself (read from its
/// log), killed by its handle when dropped; its log is printed if the test failed.
struct NatsServer {
    child: Child,
    dir: PathBuf,
    ws_port: u16,
}

impl NatsServer {
    fn start(bin: &Path) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "weft-lt-nats-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("nats.conf");
        std::fs::write(
            &conf,
            "listen: \"127.0.0.1:-1\"\nwebsocket {\n  listen: \"127.0.0.1:-1\"\n  no_tls: true\n}\n",
        )
        .unwrap();
        let log = dir.join("nats.log");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .arg("-l")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        let mut server = Self {
            child,
            dir,
            ws_port: 0,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(port) = text
                .lines()
                .find_map(|l| l.split("websocket clients on ws://127.0.0.1:").nth(1))
                .and_then(|p| p.trim().parse().ok())
            {
                server.ws_port = port;
                return server;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "nats-server did not report its WebSocket port: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    fn target(&self) -> String {
        format!("ws://127.0.0.1:{}", self.ws_port)
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("nats.log")).unwrap_or_default();
            eprintln!("--- nats-server log ---\n{log}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every publish acknowledged, each delivered once to each of its topic's
/// subscribers, in order.
fn assert_books(r: &Report, per_topic: u64, payload: u64) {
    assert_eq!(r.system, "nats");
    assert!(r.published > 0, "nothing published: {:?}", r.errors);
    assert_eq!(r.published, r.offered, "{:?}", r.errors);
    assert_eq!(
        (r.publish_errors, r.publish_unsent),
        (0, 0),
        "{:?}",
        r.errors
    );
    assert_eq!(
        r.expected,
        r.published * per_topic,
        "owed = acked × subscribers"
    );
    assert_eq!(r.delivered, r.expected);
    assert_eq!(r.lost, 0, "{:?}", r.errors);
    assert_eq!((r.duplicates, r.reordered, r.foreign), (0, 0, 0));
    assert_eq!(r.unstarted, 0);
    assert_eq!(r.latency_us.count, r.delivered);
    assert_eq!(r.publish_latency_us.count, r.published, "every PONG timed");
    assert_eq!(
        r.delivered_bytes,
        r.delivered * payload,
        "bytes beside messages"
    );
    assert_eq!(r.subscribe_failures, 0);
    assert_eq!(r.subscribe_latency_us.count, r.subscriptions);
    assert_eq!(r.connect_failures, 0, "{:?}", r.errors);
}

#[tokio::test]
async fn fanout_against_nats_server_adds_up() {
    let Some(bin) = nats_server() else { return };
    let server = NatsServer::start(&bin);
    let (target, pid) = (server.target(), server.pid());
    let r = run(&format!(
        "fanout --system nats --target {target} --target-pid {pid} --subscribers \
         40 --topics 2 --rate 200 --payload-bytes 100 --duration 2s"
    ))
    .await;
    assert_eq!(r.published, 400);
    assert_books(&r, 20, 100);
    assert_eq!(
        r.config["ordered"], true,
        "NATS publishes are always ordered"
    );
    let t = r.target.as_ref().expect("the server was sampled");
    assert!(t.rss_bytes > 0);
    assert!(r.harness_cpu_s > 0.0);
}

#[tokio::test]
async fn connect_against_nats_server() {
    let Some(bin) = nats_server() else { return };
    let server = NatsServer::start(&bin);
    let target = server.target();
    let r = run(&format!(
        "connect --system nats --target {target} --connections 200 --rate 1000 --duration 1s"
    ))
    .await;
    assert_eq!(r.connects, 200, "{:?}", r.errors);
    assert_eq!(r.connections_open, 200);
    assert_eq!(r.connect_failures, 0);
    assert_eq!(r.connect_latency_us.count, 200);
    assert_eq!(
        r.subscribe_latency_us.count, 200,
        "each SUB's PONG is timed"
    );
}

#[test]
fn nats_is_refused_where_it_cannot_be_accounted() {
    for args in [
        &["chat", "--system", "nats"][..],
        &["fanout", "--system", "nats", "--transport", "sse"][..],
    ] {
        let mut argv = vec!["weft-loadtest"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(&argv).unwrap();
        let e = app::build(&cli.command).unwrap_err();
        assert!(e.to_string().contains("--system nats"), "{e}");
    }
}

/// The binary with two worker processes (subscribers spread over source addresses),
/// then `compare` over its report and a Weft-shaped one.
#[test]
fn workers_against_nats_server_and_compare() {
    let Some(bin) = nats_server() else { return };
    let server = NatsServer::start(&bin);
    let dir = server.dir.clone();
    let json = dir.join("nats.json");
    let out = Command::new(env!("CARGO_BIN_EXE_weft-loadtest"))
        .args(["fanout", "--system", "nats", "--target", &server.target()])
        .args(["--target-pid", &server.pid(), "--workers", "2", "--quiet"])
        .args(["--subscribers", "60", "--topics", "3", "--rate", "300"])
        .args(["--payload-bytes", "100", "--duration", "2s"])
        .arg("--json")
        .arg(&json)
        .args(["--slo", "loss=0,publish_p99<2s"])
        .output()
        .expect("the harness runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("JSON report: {}", json.display())),
        "the path written is printed: {stdout}"
    );
    let r: Report = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r.processes, 2);
    assert_books(&r, 20, 100);
    assert_eq!(r.slo.len(), 2, "SLO verdicts are in the JSON");
    assert!(r.slo.iter().all(|v| v.ok), "{:?}", r.slo);

    // A Weft report of the same load, as `--system weft` would write it.
    let mut weft = r.clone();
    weft.system = "weft".into();
    weft.deliveries_per_s = 1.0;
    let weft_json = dir.join("weft.json");
    std::fs::write(&weft_json, serde_json::to_string(&weft).unwrap()).unwrap();
    let md = dir.join("summary.md");
    let out = Command::new(env!("CARGO_BIN_EXE_weft-loadtest"))
        .arg("compare")
        .arg(&json)
        .arg(&weft_json)
        .arg("--markdown")
        .arg(&md)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = std::fs::read_to_string(&md).unwrap();
    assert!(
        table.contains("| nats | 1 |") && table.contains("| weft | 1 |"),
        "{table}"
    );
    assert_eq!(table.lines().count(), 4, "one load, two systems: {table}");
}
