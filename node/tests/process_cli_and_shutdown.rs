//! The real `weft-node` binary: the ready file, graceful drain on SIGTERM (DESIGN §3.2
//! close 4000, §3.1 readiness), and the configuration layers and their errors (§8).
//!
//! Every process is started by the test, on `127.0.0.1:0`, with its files in a fresh
//! temporary directory; only its own PID is ever signalled. A failing test prints the
//! child's stderr.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_proto::DisconnectPush;

use weft_testkit::bin::usage_error;
use weft_testkit::{subscribe_cmd, HttpStream, WsClient, WsIn};

const BIN: &str = env!("CARGO_BIN_EXE_weft-node");
const GRACE_MS: u64 = 2000;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "weft-proc-{}-{name}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }

    fn write(&self, file: &str, text: &str) -> PathBuf {
        let p = self.path(file);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The binary, with no `WEFT_*` variable inherited from the test's environment.
fn command() -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("WEFT_") {
            cmd.env_remove(k);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// A running node process; killed (by its own PID) if the test ends before it exits,
/// and its stderr printed if the test failed.
struct Proc {
    child: Child,
    stderr: PathBuf,
    ready_file: PathBuf,
}

impl Proc {
    fn spawn(dir: &TempDir, extra: &[&str]) -> Self {
        Self::spawn_with(dir, extra, &[])
    }

    /// [`Proc::spawn`] with extra environment variables.
    fn spawn_with(dir: &TempDir, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let stderr = dir.path("stderr.log");
        let ready_file = dir.path("ready.json");
        let data = dir.path("data");
        let mut args = vec![
            "--http-listen",
            "127.0.0.1:0",
            "--cluster-listen",
            "127.0.0.1:0",
            "--ready-file",
            ready_file.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let child = command()
            .args(&args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn weft-node");
        Self {
            child,
            stderr,
            ready_file,
        }
    }

    /// Waits (at most 10 s) for the ready file and returns it parsed.
    async fn ready(&mut self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(text) = std::fs::read_to_string(&self.ready_file) {
                if let Ok(v) = serde_json::from_str::<Value>(&text) {
                    return v;
                }
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("weft-node exited before it was ready: {status}");
            }
            assert!(Instant::now() < deadline, "no ready file within 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    /// Polls for the exit until `deadline`; `None` if still running then.
    async fn exit_by(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.stderr).unwrap_or_default();
            eprintln!("----- weft-node stderr -----\n{log}----- end of stderr -----");
        }
    }
}

/// How one session ended during the drain.
#[derive(Debug)]
struct Ended {
    what: &'static str,
    /// The `disconnect` push / event, if one came before the end.
    disconnect: Option<DisconnectPush>,
    /// WebSocket: the close code; SSE: none.
    close_code: Option<u16>,
    at: Instant,
}

/// Reads a WebSocket session until it is closed, noting a `disconnect` push before it.
async fn ws_until_closed(mut c: WsClient) -> Ended {
    let mut disconnect = None;
    loop {
        match c.next().await {
            WsIn::Msg(m) => {
                if let Some(d) = m.push.as_ref().and_then(|p| p.disconnect.clone()) {
                    assert!(disconnect.is_none(), "two disconnect pushes");
                    disconnect = Some(d);
                }
            }
            WsIn::Closed(code) => {
                let at = Instant::now();
                c.close().await;
                return Ended {
                    what: "ws",
                    disconnect,
                    close_code: code,
                    at,
                };
            }
        }
    }
}

/// Reads an SSE watch until its body ends, noting an `event: disconnect` before it.
async fn sse_until_end(mut s: HttpStream) -> Ended {
    let mut disconnect = None;
    while let Some(ev) = s.next_sse().await {
        if ev.event == "disconnect" {
            assert!(disconnect.is_none(), "two disconnect events");
            disconnect = Some(serde_json::from_str(&ev.data).expect("disconnect data"));
        }
    }
    Ended {
        what: "sse",
        disconnect,
        close_code: None,
        at: Instant::now(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_every_session_then_exits_0() {
    let dir = TempDir::new("drain");
    let grace = GRACE_MS.to_string();
    let mut p = Proc::spawn(
        &dir,
        &["--shutdown-grace-ms", &grace, "--node-id", "proc-test"],
    );
    let ready = p.ready().await;
    assert_eq!(ready["node_id"], "proc-test", "{ready}");
    assert_eq!(ready["pid"].as_u64(), Some(p.child.id() as u64), "{ready}");
    let addr: SocketAddr = ready["http"].as_str().unwrap().parse().unwrap();
    assert_ne!(addr.port(), 0, "the ready file names the bound port");
    let base = format!("http://{addr}");
    let http = reqwest::Client::new();
    let resp = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);

    let mut sessions = Vec::new();
    for i in 0..5 {
        let mut c = WsClient::connect(addr).await;
        let topic = format!("t{i}");
        let reply = c.request(subscribe_cmd(&topic, None)).await;
        assert!(reply.result.is_some(), "{reply:?}");
        // The session is live: an event reaches it.
        let resp = http
            .post(format!("{base}/v1/topics/{topic}/events"))
            .header("content-type", "application/json")
            .body(r#"{"hello":1}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        assert_eq!(c.next_event().await.unwrap().offset, 1);
        sessions.push(tokio::spawn(ws_until_closed(c)));
    }
    for i in 0..2 {
        let url = format!("{base}/v1/topics/s{i}/events?watch=true");
        let s = HttpStream::open(&http, &url, &[]).await;
        assert_eq!(s.status, 200);
        sessions.push(tokio::spawn(sse_until_end(s)));
    }

    let term_at = Instant::now();
    p.sigterm();

    // While draining, every new probe is told 503 (ten probes, each on a fresh
    // connection). In the first 50 ms a probe may still ride a connection accepted
    // before the signal was handled, and once the process is gone probes are refused;
    // any other unanswered probe is a failure (reported at the end, after the drain
    // itself is checked).
    let probe = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut readyz_problem = None;
    let mut answered_503 = 0;
    let mut process_gone = false;
    let probe_until = term_at + Duration::from_millis(GRACE_MS + 1000);
    while answered_503 < 10 && Instant::now() < probe_until {
        let sent_at = term_at.elapsed();
        match probe.get(format!("{base}/readyz")).send().await {
            Ok(resp) if resp.status() == 200 && answered_503 == 0 => {
                // The signal is not handled yet.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(resp) => {
                assert_eq!(resp.status(), 503, "readyz while draining");
                assert!(resp.headers().contains_key("retry-after"));
                let body: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
                assert_eq!(body["error"]["code"], 503, "{body}");
                answered_503 += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(_) if sent_at < Duration::from_millis(50) => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => {
                // The listener closes just before the process exits.
                process_gone = p
                    .exit_by(Instant::now() + Duration::from_millis(300))
                    .await
                    .is_some();
                if !process_gone {
                    readyz_problem = Some(format!(
                        "GET /readyz sent {sent_at:?} after SIGTERM (after {answered_503} \
                         answered 503) got no answer ({e:?}) while the process ran on for \
                         300+ ms; every probe during the drain must be answered 503"
                    ));
                }
                break;
            }
        }
    }
    if answered_503 == 0 && !process_gone && readyz_problem.is_none() {
        readyz_problem = Some("GET /readyz never answered 503 after SIGTERM".into());
    }

    let mut ended = Vec::new();
    for s in sessions {
        ended.push(
            tokio::time::timeout(Duration::from_secs(5), s)
                .await
                .expect("a session was not closed within the grace")
                .unwrap(),
        );
    }
    let status = p
        .exit_by(term_at + Duration::from_millis(GRACE_MS + 1000))
        .await
        .expect("process did not exit within grace + 1 s");
    assert_eq!(status.code(), Some(0), "exit status {status}");

    for e in &ended {
        let d = e
            .disconnect
            .as_ref()
            .unwrap_or_else(|| panic!("{}: ended without a disconnect first: {e:?}", e.what));
        assert_eq!(d.code, weft_proto::close::RECONNECT, "{e:?}");
        assert!(d.reconnect, "{e:?}");
        assert!(d.after_ms <= 5_000, "after_ms beyond the jitter: {e:?}");
        if e.what == "ws" {
            assert_eq!(
                e.close_code,
                Some(weft_proto::close::RECONNECT),
                "close frame code: {e:?}"
            );
        }
        let after = e.at.duration_since(term_at);
        assert!(
            after <= Duration::from_millis(GRACE_MS),
            "{} closed {after:?} after SIGTERM, beyond the grace",
            e.what
        );
    }
    let first = ended.iter().map(|e| e.at).min().unwrap();
    let last = ended.iter().map(|e| e.at).max().unwrap();
    assert!(
        last.duration_since(first) >= Duration::from_millis(50),
        "all {} sessions closed within {:?}: closes are not spread",
        ended.len(),
        last.duration_since(first)
    );
    let after_ms: Vec<u64> = ended
        .iter()
        .map(|e| e.disconnect.as_ref().unwrap().after_ms)
        .collect();
    assert!(
        after_ms.windows(2).any(|w| w[0] != w[1]),
        "every client was told the same after_ms: {after_ms:?}"
    );
    if let Some(problem) = readyz_problem {
        panic!("{problem}");
    }
}

// ---------------------------------------------------------------------------------
// Configuration

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = command();
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn weft-node");
    // Every invocation here exits by itself; a hang is a failure, not a stuck test.
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(out) => out.expect("wait for weft-node"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("weft-node {args:?} did not exit within 10 s");
        }
    }
}

#[test]
fn invalid_flag_value_exits_64_with_one_line() {
    let out = run(&["--http-listen", "nonsense", "--print-config"], &[]);
    let line = usage_error(&out);
    assert!(line.contains("nonsense"), "{line}");
    // The same through the environment.
    let out = run(&["--print-config"], &[("WEFT_HTTP_LISTEN", "nonsense")]);
    usage_error(&out);
    let out = run(&["--shutdown-grace-ms", "soon", "--print-config"], &[]);
    usage_error(&out);
    let out = run(&["--no-such-flag"], &[]);
    usage_error(&out);
}

#[test]
fn unknown_toml_key_exits_64_naming_the_file() {
    let dir = TempDir::new("badkey");
    for (name, text, mentions) in [
        ("top.toml", "node_id = \"x\"\nbogus_key = 1\n", "bogus_key"),
        (
            "nested.toml",
            "[limits]\nmax_conections = 5\n",
            "max_conections",
        ),
        ("syntax.toml", "node_id = \n", ""),
    ] {
        let path = dir.write(name, text);
        let out = run(&["--config", path.to_str().unwrap(), "--print-config"], &[]);
        let line = usage_error(&out);
        assert!(
            line.contains(path.to_str().unwrap()),
            "{name}: the line does not name the file: {line}"
        );
        assert!(line.contains(mentions), "{name}: {line}");
    }
    // A file that does not exist.
    let missing = dir.path("missing.toml");
    let out = run(
        &["--config", missing.to_str().unwrap(), "--print-config"],
        &[],
    );
    let line = usage_error(&out);
    assert!(line.contains(missing.to_str().unwrap()), "{line}");
}

#[test]
fn config_error_points_at_the_offending_line() {
    let dir = TempDir::new("line");
    // The unknown key is on line 4.
    let path = dir.write(
        "c.toml",
        "node_id = \"x\"\n\n[limits]\nmax_conections = 5\n",
    );
    let out = run(&["--config", path.to_str().unwrap(), "--print-config"], &[]);
    let line = usage_error(&out);
    assert!(
        line.contains("line 4"),
        "the error names the wrong line (the key is on line 4): {line}"
    );
}

#[test]
fn max_wait_over_60_exits_64() {
    let dir = TempDir::new("wait");
    let path = dir.write("c.toml", "[limits]\nmax_wait_s = 61\n");
    let out = run(&["--config", path.to_str().unwrap(), "--print-config"], &[]);
    let line = usage_error(&out);
    assert!(line.contains("max_wait_s"), "{line}");
    // Without --print-config too: nothing is bound with an invalid config.
    let out = run(
        &[
            "--config",
            path.to_str().unwrap(),
            "--http-listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    usage_error(&out);
    // 60 is fine.
    let ok = dir.write("ok.toml", "[limits]\nmax_wait_s = 60\n");
    let out = run(&["--config", ok.to_str().unwrap(), "--print-config"], &[]);
    assert_eq!(out.status.code(), Some(0));
}

/// Runs `--print-config` and returns the printed configuration, which must load back.
fn print_config(args: &[&str], env: &[(&str, &str)]) -> weft_node::Config {
    let mut all = vec!["--print-config"];
    all.extend_from_slice(args);
    let out = run(&all, env);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "--print-config {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    toml::from_str(&stdout)
        .unwrap_or_else(|e| panic!("printed config does not load back ({e}):\n{stdout}"))
}

#[test]
fn print_config_follows_the_layer_precedence() {
    let dir = TempDir::new("layers");
    let file = dir.write(
        "c.toml",
        "node_id = \"from-toml\"\n[limits]\nmax_message_bytes = 2048\n",
    );
    let file = file.to_str().unwrap();
    let host = [("HOSTNAME", "host-default")];

    // Built-in default: the hostname.
    let c = print_config(&[], &host);
    assert_eq!(c.node_id, "host-default");
    assert_eq!(c.limits.max_message_bytes, 64 * 1024);

    // TOML over the default, whether named by flag or by WEFT_CONFIG.
    let c = print_config(&["--config", file], &host);
    assert_eq!(c.node_id, "from-toml");
    assert_eq!(c.limits.max_message_bytes, 2048);
    let c = print_config(&[], &[host[0], ("WEFT_CONFIG", file)]);
    assert_eq!(c.node_id, "from-toml");

    // Environment over TOML; what it does not name stays from the file.
    let env = [host[0], ("WEFT_NODE_ID", "from-env")];
    let c = print_config(&["--config", file], &env);
    assert_eq!(c.node_id, "from-env");
    assert_eq!(c.limits.max_message_bytes, 2048);

    // Flag over environment over TOML.
    let c = print_config(&["--config", file, "--node-id", "from-flag"], &env);
    assert_eq!(c.node_id, "from-flag");
    assert_eq!(c.limits.max_message_bytes, 2048);
    let c = print_config(&["--node-id", "from-flag"], &host);
    assert_eq!(c.node_id, "from-flag");
}

#[test]
fn printed_config_loads_back_to_the_same_output() {
    let dir = TempDir::new("roundtrip");
    let file = dir.write(
        "c.toml",
        "node_id = \"edge-7\"\n[limits]\nmax_subscriptions_per_session = 9\n\n[[namespaces]]\npattern = \"prices.>\"\nhistory_size = 10\nslow_consumer = \"conflate\"\n",
    );
    let first = run(
        &["--print-config", "--config", file.to_str().unwrap()],
        &[("HOSTNAME", "h")],
    );
    assert_eq!(first.status.code(), Some(0));
    let printed = dir.write("printed.toml", std::str::from_utf8(&first.stdout).unwrap());
    let second = run(
        &["--print-config", "--config", printed.to_str().unwrap()],
        &[("HOSTNAME", "other-host")],
    );
    assert_eq!(second.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&first.stdout),
        String::from_utf8_lossy(&second.stdout)
    );
    let c: weft_node::Config =
        toml::from_str(std::str::from_utf8(&second.stdout).unwrap()).expect("printed config loads");
    assert_eq!(c.node_id, "edge-7");
    assert_eq!(c.limits.max_subscriptions_per_session, 9);
    assert_eq!(c.namespaces.len(), 1);
    assert_eq!(c.namespaces[0].history_size, 10);
}

/// The binary runs its embedded router: `/v1/cluster` shows this node active and owning
/// every slot, and the router's committed state survives a restart on the data dir
/// (the metadata version keeps growing; it is not initialised again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_router_membership_is_served_and_survives_restart() {
    let dir = TempDir::new("cluster");
    let http = reqwest::Client::new();
    let mut versions = Vec::new();
    for round in 0..2 {
        // The previous round's ready file names a port that is gone.
        let _ = std::fs::remove_file(dir.path("ready.json"));
        let mut node = Proc::spawn(&dir, &["--node-id", "cl-1", "--shutdown-grace-ms", "500"]);
        let ready = node.ready().await;
        assert!(
            ready["cluster"]
                .as_str()
                .is_some_and(|g| g.starts_with("127.0.0.1:")),
            "{ready}"
        );
        let url = format!("http://{}/v1/cluster", ready["http"].as_str().unwrap());
        // Joined at start; active from the first acknowledged heartbeat.
        let deadline = Instant::now() + Duration::from_secs(5);
        let view = loop {
            let view: Value = serde_json::from_slice(
                &http.get(&url).send().await.unwrap().bytes().await.unwrap(),
            )
            .unwrap();
            // Membership and the slot table arrive as separate metadata changes.
            let settled =
                view["this_node"]["state"] == "active" && view["this_node"]["slots"] == 4096;
            if settled || Instant::now() > deadline {
                break view;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(view["mode"], "embedded", "round {round}: {view}");
        assert_eq!(view["this_node"]["state"], "active", "{view}");
        assert_eq!(view["this_node"]["slots"], 4096);
        assert_eq!(view["ring"]["slots_per_node"]["cl-1"], 4096);
        assert_eq!(view["router"]["leader_id"], 1);
        assert_eq!(view["members"].as_array().unwrap().len(), 1);
        versions.push(view["version"].as_u64().unwrap());
        node.sigterm();
        let status = node.exit_by(Instant::now() + Duration::from_secs(5)).await;
        assert_eq!(status.and_then(|s| s.code()), Some(0), "round {round}");
    }
    assert!(
        versions[1] > versions[0],
        "router state restarted from scratch: {versions:?}"
    );
}

#[test]
fn development_mode_binds_loopback_and_a_reachable_address_needs_auth() {
    // No auth configured: the default listener is loopback.
    let c = print_config(&[], &[("HOSTNAME", "h")]);
    assert_eq!(c.http_listen.to_string(), "127.0.0.1:8080");
    // Asking for a reachable address without auth exits 64 naming the fix, in one line.
    let err = usage_error(&run(&["--http-listen", "0.0.0.0:0"], &[]));
    assert!(
        err.contains("without authentication") && err.contains("auth.allow_anonymous"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // Configured auth keeps the contract's wildcard default.
    let c = print_config(
        &["--auth-hmac-secret", "0123456789abcdef0123456789abcdef"],
        &[("HOSTNAME", "h")],
    );
    assert_eq!(c.http_listen.to_string(), "0.0.0.0:8080");
    let printed = String::from_utf8(
        run(
            &[
                "--print-config",
                "--auth-hmac-secret",
                "0123456789abcdef0123456789abcdef",
            ],
            &[],
        )
        .stdout,
    )
    .unwrap();
    assert!(
        !printed.contains("0123456789abcdef"),
        "the secret is masked"
    );
}

/// A JWT signed with `secret` for `sub`, valid a minute, allowed everything.
fn hs256_token(secret: &str, sub: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": sub, "exp": now + 60, "weft": {"sub": [">"], "pub": [">"]}}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn no_token_secret_or_api_key_reaches_the_log_even_at_trace_level() {
    const SECRET: &str = "log-test-secret-0123456789abcdef-xyz";
    const KEY: &str = "log-test-api-key-0123456789";
    let dir = TempDir::new("secrets-in-logs");
    let config = dir.write(
        "weft.toml",
        &format!(
            "[auth]\nhmac_secret = \"{SECRET}\"\ncookie = \"weft_token\"\n\n\
             [[auth.api_keys]]\nname = \"be\"\nsha256 = \"{}\"\npublish = [\">\"]\nsubscribe = [\">\"]\n",
            weft_node::auth::apikey::sha256_hex(KEY)
        ),
    );
    let mut p = Proc::spawn_with(
        &dir,
        &["--config", config.to_str().unwrap()],
        &[("RUST_LOG", "trace")],
    );
    let ready = p.ready().await;
    let addr: SocketAddr = ready["http"].as_str().unwrap().parse().unwrap();
    let base = format!("http://{addr}");
    let http = reqwest::Client::new();
    let good = hs256_token(SECRET, "alice");
    // Wrong signatures and garbage, each with a marker to look for.
    let forged = format!("{}FORGEDSIG", &good[..good.rfind('.').unwrap() + 1]);
    let garbage = "GARBAGETOKEN.abc.def";
    let get = |path: String, header: Option<(&'static str, String)>| {
        let mut r = http.get(format!("{base}{path}"));
        if let Some((k, v)) = header {
            r = r.header(k, v);
        }
        async move { r.send().await.unwrap().status().as_u16() }
    };
    for (path, header, want) in [
        (
            "/v1/topics/a".to_string(),
            Some(("authorization", format!("Bearer {good}"))),
            200,
        ),
        (format!("/v1/topics/a?token={good}"), None, 200),
        (
            "/v1/topics/a".to_string(),
            Some(("cookie", format!("weft_token={good}"))),
            200,
        ),
        (
            "/v1/topics/a".to_string(),
            Some(("authorization", format!("Bearer {KEY}"))),
            200,
        ),
        (
            "/v1/topics/a".to_string(),
            Some(("authorization", format!("Bearer {forged}"))),
            401,
        ),
        (format!("/v1/topics/a?token={garbage}"), None, 401),
        (
            "/v1/topics/a".to_string(),
            Some(("authorization", "Bearer WRONGAPIKEY-000".into())),
            401,
        ),
    ] {
        assert_eq!(get(path.clone(), header).await, want, "GET {path}");
    }
    let resp = http
        .post(format!("{base}/v1/topics/a/events"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    // WebSocket: the token in the query string, and in connect and refresh commands.
    let mut ws = WsClient::connect_with(addr, &format!("/v1/ws?token={good}"), &[])
        .await
        .unwrap();
    let r = ws.request(subscribe_cmd("a", None)).await;
    assert!(r.error.is_none(), "{r:?}");
    ws.send_text(&format!(r#"{{"id":7,"refresh":{{"token":"{forged}"}}}}"#))
        .await;
    let mut ws = WsClient::connect_with(addr, "/v1/ws", &[]).await.unwrap();
    ws.send_text(&format!(r#"{{"id":1,"connect":{{"token":"{garbage}"}}}}"#))
        .await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while !matches!(ws.next().await, WsIn::Closed(_)) {}
    })
    .await;

    p.sigterm();
    let status = p.exit_by(Instant::now() + Duration::from_secs(10)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let log = std::fs::read_to_string(&p.stderr).unwrap();
    assert!(
        log.lines().count() > 50,
        "the node logged at trace level:\n{log}"
    );
    let signature = &good[good.rfind('.').unwrap() + 1..];
    for (what, secret) in [
        ("the HMAC secret", SECRET),
        ("the API key", KEY),
        ("a wrong API key", "WRONGAPIKEY"),
        ("a valid token's signature", signature),
        ("a forged token's signature", "FORGEDSIG"),
        ("a garbage token", "GARBAGETOKEN"),
    ] {
        assert!(!log.contains(secret), "{what} is in the log");
    }
}
