//! The server keeps the OpenAPI document it serves: a bounded `schemathesis run
//! --checks all` against a real `weft-node` (issue 13). Schemathesis generates
//! schema-valid requests (which must be accepted) and schema-violating ones (which must
//! be refused), and checks every status, content type, header and body against
//! `/v1/openapi.json`, including the SSE events of the watches.
//!
//! `GET /v1/ws` is in the run up to its 101 (hooks.py closes an upgraded connection
//! instead of reusing it for HTTP); the node's own request counts show it answered
//! both 101 and 400 there.
//!
//! The node runs in development mode on loopback, with `limits.max_wait_s = 1` (the
//! served document then says `wait` ≤ 1, so a long-poll answers within the request
//! timeout) and presence on for every topic. The exclusions and the statuses the
//! contract gives to well-formed requests whose answer depends on state (410 for a
//! cursor of another epoch, 422 for a reused Idempotency-Key) are in
//! `tests/schemathesis/schemathesis.toml`, each with its reason.
//!
//! Bounded: `--max-examples` per operation, a 1.5 s request timeout (SSE watches are
//! read that long), one worker (hypothesis has raced itself with two), a fixed seed
//! (`WEFT_SCHEMATHESIS_SEED` to explore another), and the whole run killed after
//! [`RUN_BOUND`]. Schemathesis comes from PyPI (`.ci/run` installs it); without it the
//! test skips loudly, and fails when `CI` is set.

mod deploy;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use deploy::{root, tool};

/// The longest the schemathesis run may take (it takes well under a minute).
const RUN_BOUND: Duration = Duration::from_secs(300);
const MAX_EXAMPLES: &str = "10";
const DEFAULT_SEED: &str = "1313";

#[test]
fn schemathesis_finds_no_request_the_server_answers_against_its_document() {
    let Some(schemathesis) = tool("schemathesis", "SCHEMATHESIS") else {
        return;
    };
    let work = weft_testkit::bin::Workdir::new("schemathesis", "run");
    let dir = work.root();
    let config = work.write(
        "weft.toml",
        "[limits]\nmax_wait_s = 1\n\n[[namespaces]]\npattern = \">\"\npresence = true\n",
    );
    let log = std::fs::File::create(work.log("weft-node", "node.log")).unwrap();
    let mut node = weft_testkit::bin::loopback_node(dir)
        .arg("--config")
        .arg(&config)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start weft-node");
    let bound = weft_testkit::bin::wait_ready_file(&mut node, &dir.join("ready.json"), "weft-node");
    let base = format!("http://{}", bound["http"].as_str().unwrap());

    let here: PathBuf = root().join("node/tests/schemathesis");
    let seed = std::env::var("WEFT_SCHEMATHESIS_SEED").unwrap_or_else(|_| DEFAULT_SEED.into());
    let out_file = dir.join("schemathesis.txt");
    let out = std::fs::File::create(&out_file).unwrap();
    // In its own directory: schemathesis and hypothesis write state where they run.
    let mut run = Command::new(&schemathesis)
        .current_dir(dir)
        .env("SCHEMATHESIS_HOOKS", here.join("hooks.py"))
        .arg("--config-file")
        .arg(here.join("schemathesis.toml"))
        .args(["run", &format!("{base}/v1/openapi.json")])
        .args(["--checks", "all", "--max-examples", MAX_EXAMPLES])
        .args([
            "--request-timeout",
            "1.5",
            "--workers",
            "1",
            "--seed",
            &seed,
        ])
        .args(["--generation-database", "none", "--no-color"])
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("start schemathesis");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = run.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > RUN_BOUND {
            let _ = run.kill();
            let _ = run.wait();
            stop(&mut node);
            panic!(
                "schemathesis ran past {RUN_BOUND:?}:\n{}",
                std::fs::read_to_string(&out_file).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let said = std::fs::read_to_string(&out_file).unwrap_or_default();
    let alive = node.try_wait().unwrap().is_none();
    let ws = alive.then(|| ws_answers(bound["http"].as_str().unwrap()));
    stop(&mut node);
    assert!(
        alive,
        "weft-node died under schemathesis:\n{}",
        node_log(dir)
    );
    assert!(
        status.success(),
        "schemathesis (seed {seed}) found requests the server answers against its document \
         ({status}):\n{said}\nnode log:\n{}",
        node_log(dir)
    );
    // The run really tested the API, not just loaded the document.
    let tested = said
        .lines()
        .find_map(|l| l.trim().strip_prefix("Tested: "))
        .and_then(|n| n.trim().parse::<u32>().ok())
        .unwrap_or_else(|| panic!("no `Tested:` line in:\n{said}"));
    assert!(tested >= 14, "only {tested} operations tested:\n{said}");
    // The upgrade was really exercised both ways, by the node's own count.
    let (upgraded, refused) = ws.unwrap();
    assert!(
        upgraded > 0 && refused > 0,
        "GET /v1/ws answered 101 {upgraded} times and 400 {refused} times"
    );
    let summary: Vec<&str> = said.lines().rev().take(12).collect();
    eprintln!(
        "{}\nGET /v1/ws: {upgraded} × 101, {refused} × 400",
        summary.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
}

/// How often the node answered `GET /v1/ws` with 101 and with 400
/// (`weft_http_requests_total`, read from its `/metrics`).
fn ws_answers(addr: &str) -> (u64, u64) {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).expect("connect for /metrics");
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        conn,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut page = String::new();
    conn.read_to_string(&mut page).expect("read /metrics");
    let count = |status: &str| -> u64 {
        page.lines()
            .filter(|l| {
                l.starts_with("weft_http_requests_total{")
                    && l.contains("route=\"/v1/ws\"")
                    && l.contains(&format!("status=\"{status}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    (count("101"), count("400"))
}

fn node_log(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("node.log")).unwrap_or_default()
}

/// SIGTERM, then the node's own grace period; SIGKILL if it outlives it.
fn stop(node: &mut std::process::Child) {
    // SAFETY: signals only the process this test started.
    unsafe { libc::kill(node.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(15);
    while node.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = node.kill();
            let _ = node.wait();
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
