//! A real process cluster for the multi-node tests: three `weft-router` processes and
//! any number of `weft-node` processes, each bound on its own loopback address
//! (127.0.0.x), so several clusters in one test run never collide.
//!
//! Layout of one cluster with IP base `b` (a test picks a distinct `b`):
//! routers `1..=3` on `127.0.0.{b+1..b+3}`, nodes on `127.0.0.{b+11}`, `{b+12}`, … in
//! the order they were added. Every file (data dirs, ready files, logs) lives in one
//! temporary directory, removed when the test passes; when it fails, every process's log
//! is printed. Every process is killed by its own PID (`Child::kill`) on drop.
//!
//! Besides the processes this holds what the tests read the cluster with: a per-node
//! HTTP handle ([`NodeApi`]: `/v1/cluster`, owners, publishes, metrics), a WebSocket
//! subscriber that stamps each event with its topic's epoch and surfaces resets
//! ([`Watcher`]), a multi-topic SSE reader ([`MultiSse`]) and bounded polling
//! ([`wait_for`], [`wait_until`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;
use weft_proto::{grpc, PublishResult, SubscribeResult, TopicState};
use weft_router::RouterClient;

use super::{subscribe_cmd, Delivered, HttpStream, WsClient, WsIn};

/// The router's heartbeat timeout unless a test asks for another: short, so that a
/// killed node is removed (and its slots move) within seconds. Nodes heartbeat every
/// second.
pub const HEARTBEAT_TIMEOUT_MS: u64 = 2000;
/// How often [`wait_for`] probes.
const POLL: Duration = Duration::from_millis(100);
/// A process's ready file must appear within this.
const START_WITHIN: Duration = Duration::from_secs(15);
/// The routers must agree on a leader within this (start, restart).
pub const LEADER_WITHIN: Duration = Duration::from_secs(20);
/// Longest a single HTTP request of the harness may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The node copies its counters into `/metrics` once a second; two reads further apart
/// than this straddle at least one copy.
const EXPORT_PERIOD: Duration = Duration::from_millis(1200);
/// Lines of each log printed when a test fails.
const LOG_TAIL_LINES: usize = 400;

/// Polls `probe` every 100 ms until it returns `Ok`, for at most `within`; then panics
/// with `what` and the last `Err` the probe gave (what it saw instead).
pub async fn wait_for<T, F, Fut>(within: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        let last = match probe().await {
            Ok(v) => return v,
            Err(e) => e,
        };
        if start.elapsed() >= within {
            panic!("{what}: not within {within:?}; last seen: {last}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `cond` until it holds, for at most `within`; panics with `what` otherwise.
pub async fn wait_until<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(within, what, || {
        let fut = cond();
        async move {
            if fut.await {
                Ok(())
            } else {
                Err("condition false".into())
            }
        }
    })
    .await
}

/// The `weft-router` binary: the sibling of the `weft-node` binary this test was built
/// with (same target and profile directory). When it is not there (only `weft-node`'s
/// targets were built), it is built once with the cargo that built this test.
fn router_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let node = Path::new(env!("CARGO_BIN_EXE_weft-node"));
        let dir = node
            .parent()
            .expect("the weft-node binary sits in a directory");
        let bin = dir.join(format!("weft-router{}", std::env::consts::EXE_SUFFIX));
        if !bin.exists() {
            build_router(dir);
        }
        assert!(
            bin.exists(),
            "{} is missing after building weft-router",
            bin.display()
        );
        bin
    })
}

/// `cargo build -p weft-router --bin weft-router` into the profile directory `dir`
/// (`<target>/debug`, `<target>/release` or `<target>/<profile>`).
fn build_router(dir: &Path) {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "-p", "weft-router", "--bin", "weft-router"])
        .stdin(Stdio::null());
    match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(profile) => {
            cmd.args(["--profile", profile]);
        }
    }
    if let Some(target_dir) = dir.parent() {
        cmd.arg("--target-dir").arg(target_dir);
    }
    let out = cmd.output().expect("run cargo to build weft-router");
    assert!(
        out.status.success(),
        "building weft-router failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A command for `bin` with no `WEFT_*` variable inherited from the test's environment.
fn command(bin: &Path) -> Command {
    let mut cmd = Command::new(bin);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("WEFT_") {
            cmd.env_remove(k);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// An address on `ip` that was free a moment ago (routers need their peers' addresses
/// before they start, so they cannot bind port 0).
fn free_addr(ip: &str) -> String {
    let l = std::net::TcpListener::bind(format!("{ip}:0")).expect("bind a free port");
    l.local_addr().expect("bound address").to_string()
}

fn log_file(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Waits for a process's ready file and returns it parsed; panics if the process exits
/// first or the file never appears.
async fn await_ready_file(child: &mut Child, path: &Path, what: &str) -> Value {
    let deadline = Instant::now() + START_WITHIN;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(v) = serde_json::from_str::<Value>(&text) {
                return v;
            }
        }
        if let Some(status) = child.try_wait().expect("poll the child") {
            panic!("{what} exited before it was ready: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "{what} wrote no ready file within {START_WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A child process, SIGKILLed by its own PID and reaped when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct NodeProc {
    _proc: Proc,
    api: NodeApi,
}

/// Three routers and the nodes added so far.
pub struct ProcCluster {
    name: String,
    root: PathBuf,
    base: u8,
    heartbeat_timeout_ms: u64,
    router_addrs: BTreeMap<u64, String>,
    routers: BTreeMap<u64, Proc>,
    /// One client per router, kept across its restarts (the address does not change).
    router_clients: BTreeMap<u64, RouterClient>,
    nodes: BTreeMap<String, NodeProc>,
    /// Nodes ever added: the next one gets `127.0.0.{base + 11 + added}`.
    added: u8,
    /// Every log file, printed if the test fails.
    logs: Vec<(String, PathBuf)>,
    pub http: reqwest::Client,
}

impl ProcCluster {
    /// Three routers on `127.0.0.{base+1..base+3}` (heartbeat timeout
    /// [`HEARTBEAT_TIMEOUT_MS`]) and one node per name, each ready (`/readyz` 200).
    pub async fn start(name: &str, base: u8, nodes: &[&str]) -> Self {
        Self::start_with(name, base, nodes, HEARTBEAT_TIMEOUT_MS).await
    }

    /// [`ProcCluster::start`] with the routers' heartbeat timeout set.
    pub async fn start_with(
        name: &str,
        base: u8,
        nodes: &[&str],
        heartbeat_timeout_ms: u64,
    ) -> Self {
        assert!(
            (2..=230).contains(&base),
            "IP base {base} leaves no room for routers and nodes"
        );
        let root = std::env::temp_dir().join(format!("weft-relay-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("create the cluster's directory");
        let router_addrs = (1..=3u64)
            .map(|id| (id, free_addr(&format!("127.0.0.{}", base + id as u8))))
            .collect::<BTreeMap<_, _>>();
        let router_clients = router_addrs
            .iter()
            .map(|(id, a)| (*id, RouterClient::new(vec![a.clone()])))
            .collect();
        let mut c = Self {
            name: name.into(),
            root,
            base,
            heartbeat_timeout_ms,
            router_addrs,
            routers: BTreeMap::new(),
            router_clients,
            nodes: BTreeMap::new(),
            added: 0,
            logs: Vec::new(),
            http: reqwest::Client::new(),
        };
        for id in 1..=3 {
            c.spawn_router(id).await;
        }
        // A node joins at start and gives up after a few retries: let the routers
        // elect first.
        c.router_leader(LEADER_WITHIN).await;
        for n in nodes {
            c.add_node(n).await;
        }
        c
    }

    fn peers(&self) -> String {
        self.router_addrs
            .iter()
            .map(|(id, a)| format!("{id}={a}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    async fn spawn_router(&mut self, id: u64) {
        assert!(!self.routers.contains_key(&id), "router {id} is running");
        let ready = self.root.join(format!("router-{id}.ready.json"));
        let _ = std::fs::remove_file(&ready);
        let log = self.root.join(format!("router-{id}.log"));
        if !self.logs.iter().any(|(_, p)| *p == log) {
            self.logs.push((format!("router {id}"), log.clone()));
        }
        let out = log_file(&log);
        let child = command(router_bin())
            .args(["--id", &id.to_string()])
            .args(["--listen", &self.router_addrs[&id]])
            .args(["--peers", &self.peers()])
            .arg("--data-dir")
            .arg(self.root.join(format!("router-{id}")))
            .arg("--ready-file")
            .arg(&ready)
            .args([
                "--heartbeat-timeout-ms",
                &self.heartbeat_timeout_ms.to_string(),
            ])
            .env("RUST_LOG", "info,openraft=warn")
            .stdout(out.try_clone().expect("clone the log handle"))
            .stderr(out)
            .spawn()
            .expect("spawn weft-router");
        let mut proc = Proc(child);
        let bound = await_ready_file(&mut proc.0, &ready, &format!("router {id}")).await;
        assert_eq!(
            bound["listen"], self.router_addrs[&id],
            "router {id} address"
        );
        self.routers.insert(id, proc);
    }

    /// Ids of the routers running now.
    pub fn router_ids(&self) -> Vec<u64> {
        self.routers.keys().copied().collect()
    }

    /// SIGKILLs router `id`.
    pub fn kill_router(&mut self, id: u64) {
        let p = self.routers.remove(&id);
        assert!(p.is_some(), "router {id} is not running");
    }

    /// Starts router `id` again on its address and data dir.
    pub async fn restart_router(&mut self, id: u64) {
        self.spawn_router(id).await;
    }

    /// Waits until every running router names the same leader, itself running; its id.
    pub async fn router_leader(&self, within: Duration) -> u64 {
        wait_for(within, "the routers agree on a leader", || async move {
            let mut seen = BTreeMap::new();
            for id in self.routers.keys() {
                let leader = self.router_clients[id]
                    .get_state()
                    .await
                    .map_err(|e| format!("router {id}: {}", e.message()))?
                    .leader_id;
                seen.insert(*id, leader);
            }
            let leaders: BTreeSet<_> = seen.values().collect();
            match leaders.into_iter().collect::<Vec<_>>()[..] {
                [Some(l)] if self.routers.contains_key(l) => Ok(*l),
                _ => Err(format!("leader per router: {seen:?}")),
            }
        })
        .await
    }

    /// The metadata as the current leader has applied it.
    pub async fn router_state(&self) -> grpc::ClusterState {
        let leader = self.router_leader(LEADER_WITHIN).await;
        self.router_clients[&leader]
            .get_state()
            .await
            .unwrap_or_else(|e| panic!("GetState on leader {leader}: {e}"))
    }

    /// Starts node `name` (also its node id) on the next loopback address, pointed at the
    /// three routers, and waits for its ready file and `/readyz`.
    pub async fn add_node(&mut self, name: &str) -> NodeApi {
        assert!(!self.nodes.contains_key(name), "node {name} exists");
        let ip = format!("127.0.0.{}", self.base + 11 + self.added);
        self.added += 1;
        let dir = self.root.join(format!("node-{name}"));
        std::fs::create_dir_all(&dir).expect("create the node's directory");
        let ready = dir.join("ready.json");
        let log = self.root.join(format!("node-{name}.log"));
        self.logs.push((format!("node {name}"), log.clone()));
        let out = log_file(&log);
        let routers = self
            .router_addrs
            .values()
            .cloned()
            .collect::<Vec<_>>()
            .join(",");
        let child = command(Path::new(env!("CARGO_BIN_EXE_weft-node")))
            .args(["--node-id", name])
            .args(["--http-listen", &format!("{ip}:0")])
            .args(["--grpc-listen", &format!("{ip}:0")])
            .args(["--quic-listen", &format!("{ip}:0")])
            .args(["--router", &routers])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--ready-file")
            .arg(&ready)
            .args(["--shutdown-grace-ms", "1000"])
            .env("RUST_LOG", "info")
            .stdout(out.try_clone().expect("clone the log handle"))
            .stderr(out)
            .spawn()
            .expect("spawn weft-node");
        let mut proc = Proc(child);
        let bound = await_ready_file(&mut proc.0, &ready, &format!("node {name}")).await;
        assert_eq!(bound["node_id"], name, "node {name}: ready file node_id");
        let addr: SocketAddr = bound["http"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("node {name}: ready file without an http address: {bound}"));
        let api = NodeApi {
            name: name.into(),
            addr,
            http: self.http.clone(),
        };
        {
            let api = &api;
            wait_until(
                START_WITHIN,
                &format!("node {name} is ready"),
                || async move { api.try_get_json("/readyz").await.is_ok() },
            )
            .await;
        }
        self.nodes.insert(
            name.into(),
            NodeProc {
                _proc: proc,
                api: api.clone(),
            },
        );
        api
    }

    /// SIGKILLs node `name`.
    pub fn sigkill_node(&mut self, name: &str) {
        let n = self.nodes.remove(name);
        assert!(n.is_some(), "node {name} is not running");
    }

    /// Names of the nodes running now.
    pub fn node_names(&self) -> Vec<String> {
        self.nodes.keys().cloned().collect()
    }

    /// The HTTP handle of a running node.
    pub fn node(&self, name: &str) -> NodeApi {
        self.nodes
            .get(name)
            .unwrap_or_else(|| panic!("node {name} is not running"))
            .api
            .clone()
    }

    /// `GET /v1/cluster` on `node`.
    pub async fn cluster(&self, node: &str) -> Value {
        self.node(node).cluster().await
    }

    /// Waits until every running node's `/v1/cluster` lists exactly the running nodes as
    /// members, all `active`, a slot table that gives each of them slots and nobody
    /// else, and the same ring version everywhere; returns that version.
    pub async fn converged(&self, within: Duration) -> u64 {
        let apis: Vec<NodeApi> = self.nodes.values().map(|n| n.api.clone()).collect();
        let want: BTreeSet<String> = self.nodes.keys().cloned().collect();
        let (apis, want) = (&apis, &want);
        wait_for(
            within,
            &format!("every node agrees on members and ring {want:?}"),
            || async move {
                let mut versions = BTreeMap::new();
                for api in apis {
                    let v = api.try_get_json("/v1/cluster").await?;
                    let members: BTreeMap<String, String> = v["members"]
                        .as_array()
                        .map(|ms| {
                            ms.iter()
                                .map(|m| {
                                    (
                                        m["id"].as_str().unwrap_or("").to_owned(),
                                        m["state"].as_str().unwrap_or("").to_owned(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    let ids: BTreeSet<String> = members.keys().cloned().collect();
                    if ids != *want || members.values().any(|s| s != "active") {
                        return Err(format!("{} sees members {members:?}", api.name));
                    }
                    let owners: BTreeSet<String> = v["ring"]["slots_per_node"]
                        .as_object()
                        .map(|m| {
                            m.iter()
                                .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
                                .map(|(k, _)| k.clone())
                                .collect()
                        })
                        .unwrap_or_default();
                    if owners != *want {
                        return Err(format!("{} sees slot owners {owners:?}", api.name));
                    }
                    let version = v["ring"]["version"].as_u64().unwrap_or(0);
                    versions.insert(api.name.clone(), version);
                }
                let distinct: BTreeSet<u64> = versions.values().copied().collect();
                match distinct.into_iter().collect::<Vec<_>>()[..] {
                    [v] => Ok(v),
                    _ => Err(format!("ring versions differ: {versions:?}")),
                }
            },
        )
        .await
    }
}

impl Drop for ProcCluster {
    fn drop(&mut self) {
        self.nodes.clear();
        self.routers.clear();
        if std::thread::panicking() {
            for (what, path) in &self.logs {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let from = lines.len().saturating_sub(LOG_TAIL_LINES);
                eprintln!(
                    "===== cluster {}: {what} ({} lines, last {}) =====",
                    self.name,
                    lines.len(),
                    lines.len() - from
                );
                for line in &lines[from..] {
                    eprintln!("{line}");
                }
            }
            eprintln!(
                "===== cluster {}: files kept in {} =====",
                self.name,
                self.root.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// `GET /v1/cluster/owner/{topic}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Owner {
    pub topic: String,
    pub slot: u64,
    pub owner: String,
    pub ring_version: u64,
}

/// One node's HTTP side; cheap to clone into tasks.
#[derive(Clone)]
pub struct NodeApi {
    pub name: String,
    pub addr: SocketAddr,
    pub http: reqwest::Client,
}

impl NodeApi {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The JSON body of a GET answered 200, or why not.
    pub async fn try_get_json(&self, path: &str) -> Result<Value, String> {
        let resp = self
            .http
            .get(self.url(path))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(|e| format!("{} GET {path}: {e}", self.name))?;
        let status = resp.status().as_u16();
        let body = resp
            .bytes()
            .await
            .map_err(|e| format!("{} GET {path}: {e}", self.name))?;
        if status != 200 {
            return Err(format!(
                "{} GET {path}: {status} {}",
                self.name,
                String::from_utf8_lossy(&body)
            ));
        }
        serde_json::from_slice(&body).map_err(|e| format!("{} GET {path}: {e}", self.name))
    }

    pub async fn get_json(&self, path: &str) -> Value {
        self.try_get_json(path)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `GET /v1/cluster`.
    pub async fn cluster(&self) -> Value {
        self.get_json("/v1/cluster").await
    }

    /// `GET /v1/cluster/owner/{topic}`.
    pub async fn owner(&self, topic: &str) -> Owner {
        let v = self.get_json(&format!("/v1/cluster/owner/{topic}")).await;
        serde_json::from_value(v.clone())
            .unwrap_or_else(|e| panic!("{}: owner of {topic}: {e}: {v}", self.name))
    }

    /// The owner of each topic as this node answers it (a few requests in flight).
    pub async fn owners(&self, topics: &[String]) -> Vec<Owner> {
        futures_util::stream::iter(topics.iter().map(|t| self.owner(t)))
            .buffered(8)
            .collect()
            .await
    }

    /// `GET /v1/topics/{topic}`.
    pub async fn state(&self, topic: &str) -> TopicState {
        let v = self.get_json(&format!("/v1/topics/{topic}")).await;
        serde_json::from_value(v.clone())
            .unwrap_or_else(|e| panic!("{}: state of {topic}: {e}: {v}", self.name))
    }

    /// One publish attempt: the result, or the status and body it was refused with.
    pub async fn try_publish(
        &self,
        topic: &str,
        data: &Value,
        idempotency_key: Option<&str>,
    ) -> Result<PublishResult, (u16, String)> {
        let mut req = self
            .http
            .post(self.url(&format!("/v1/topics/{topic}/events")))
            .header("content-type", "application/json")
            .timeout(REQUEST_TIMEOUT)
            .body(data.to_string());
        if let Some(key) = idempotency_key {
            req = req.header("idempotency-key", key);
        }
        let resp = req.send().await.map_err(|e| (0, e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(|e| (status, e.to_string()))?;
        if status != 201 {
            return Err((status, String::from_utf8_lossy(&body).into_owned()));
        }
        serde_json::from_slice(&body).map_err(|e| (status, e.to_string()))
    }

    /// Publishes and expects `201`.
    pub async fn publish(&self, topic: &str, data: &Value) -> PublishResult {
        self.try_publish(topic, data, None)
            .await
            .unwrap_or_else(|(status, body)| {
                panic!("publish to {topic} on {}: {status} {body}", self.name)
            })
    }

    /// Publishes with an `Idempotency-Key`, retrying while the node answers `503`
    /// (owner unreachable, DESIGN §3.1) or cannot be reached, for at most `within`. Any
    /// other refusal fails the test. The key makes a retry of an applied publish a no-op.
    pub async fn publish_retrying(
        &self,
        topic: &str,
        data: &Value,
        key: &str,
        within: Duration,
    ) -> PublishResult {
        wait_for(
            within,
            &format!("publish to {topic} on {}", self.name),
            || async move {
                match self.try_publish(topic, data, Some(key)).await {
                    Ok(r) => Ok(r),
                    Err((status @ (0 | 503), body)) => Err(format!("{status} {body}")),
                    Err((status, body)) => {
                        panic!("publish to {topic} on {}: {status} {body}", self.name)
                    }
                }
            },
        )
        .await
    }

    /// The value of a Prometheus series `name{node="<this node>",…}` (summed over its
    /// other labels), or `None` when the node exports no such series.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let resp = self
            .http
            .get(self.url("/metrics"))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{} GET /metrics: {e}", self.name));
        assert_eq!(resp.status(), 200, "{} GET /metrics", self.name);
        let text = resp.bytes().await.expect("read /metrics");
        parse_metric(&String::from_utf8_lossy(&text), name, &self.name)
    }

    /// [`NodeApi::metric`] once it has stopped moving: two reads an export period apart
    /// agree. Call it after the activity it counts is over.
    pub async fn settled_metric(&self, name: &str, within: Duration) -> Option<f64> {
        let start = Instant::now();
        let mut last = self.metric(name).await;
        loop {
            tokio::time::sleep(EXPORT_PERIOD).await;
            let now = self.metric(name).await;
            if now == last {
                return now;
            }
            assert!(
                start.elapsed() < within,
                "{name} on {} still moving after {within:?}: {last:?} then {now:?}",
                self.name
            );
            last = now;
        }
    }

    /// A WebSocket session on this node.
    pub async fn watcher(&self) -> Watcher {
        Watcher {
            node: self.name.clone(),
            ws: WsClient::connect(self.addr).await,
            epochs: HashMap::new(),
        }
    }

    /// A multi-topic SSE watch (`GET /v1/events?topic=…&watch=true`) from now on.
    pub async fn multi_sse(&self, topics: &[String]) -> MultiSse {
        let query = topics
            .iter()
            .map(|t| format!("topic={t}"))
            .collect::<Vec<_>>()
            .join("&");
        let url = self.url(&format!("/v1/events?{query}&watch=true"));
        let stream = HttpStream::open(&self.http, &url, &[]).await;
        assert_eq!(stream.status, 200, "{}: multi-topic watch", self.name);
        MultiSse {
            node: self.name.clone(),
            stream,
        }
    }
}

/// Sums the samples of `name` carrying `node="<node>"` in a Prometheus text page.
pub fn parse_metric(text: &str, name: &str, node: &str) -> Option<f64> {
    let label = format!("node=\"{node}\"");
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, rest) = match line.find('{') {
            Some(open) => {
                let Some(close) = line[open..].find('}') else {
                    continue;
                };
                (&line[..open + close + 1], &line[open + close + 1..])
            }
            None => match line.split_once(' ') {
                Some((s, r)) => (s, r),
                None => continue,
            },
        };
        let metric = series.split('{').next().unwrap_or("");
        if metric != name || !series.contains(&label) {
            continue;
        }
        if let Some(v) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// What a subscriber saw next.
#[derive(Debug, Clone)]
pub enum Seen {
    Event(Delivered),
    /// History lost: the topic continues from `epoch:offset`.
    Reset {
        topic: String,
        epoch: String,
        offset: u64,
    },
    Closed(Option<u16>),
}

/// Events gathered per topic until each topic has as many as wanted; a reset, a close
/// or an event of another topic fails the test.
struct Tally {
    source: String,
    want: BTreeMap<String, usize>,
    got: BTreeMap<String, Vec<Delivered>>,
}

impl Tally {
    fn new(source: String, want: &BTreeMap<String, usize>) -> Self {
        Self {
            source,
            want: want.clone(),
            got: want.keys().map(|t| (t.clone(), Vec::new())).collect(),
        }
    }

    fn done(&self) -> bool {
        self.want.iter().all(|(t, n)| self.got[t].len() >= *n)
    }

    fn progress(&self) -> String {
        self.want
            .iter()
            .filter(|(t, n)| self.got[*t].len() < **n)
            .map(|(t, n)| format!("{t}: {}/{n}", self.got[t].len()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn take(&mut self, seen: Seen) {
        match seen {
            Seen::Event(d) => match self.got.get_mut(&d.topic) {
                Some(list) => list.push(d),
                None => panic!("{}: event of a topic not watched: {d:?}", self.source),
            },
            Seen::Reset {
                topic,
                epoch,
                offset,
            } => panic!(
                "{}: unexpected reset of {topic} to {epoch}:{offset}; missing {}",
                self.source,
                self.progress()
            ),
            Seen::Closed(code) => panic!(
                "{}: closed ({code:?}); missing {}",
                self.source,
                self.progress()
            ),
        }
    }
}

/// A WebSocket session that subscribes to topics from now on and reads their pushes.
/// Event pushes carry no epoch, so each event is stamped with its topic's epoch as the
/// subscribe reply or the latest `reset` gave it.
pub struct Watcher {
    pub node: String,
    ws: WsClient,
    epochs: HashMap<String, String>,
}

impl Watcher {
    /// Subscribes without a cursor; returns the reply's cursor `(epoch, offset)`.
    pub async fn subscribe(&mut self, topic: &str) -> (String, u64) {
        let reply = self.ws.request(subscribe_cmd(topic, None)).await;
        if let Some(e) = &reply.error {
            panic!(
                "{}: subscribe to {topic} refused: {} {}",
                self.node, e.code, e.message
            );
        }
        let raw = reply
            .result
            .as_ref()
            .unwrap_or_else(|| panic!("{}: subscribe to {topic}: no result", self.node));
        let r: SubscribeResult = serde_json::from_str(raw.get())
            .unwrap_or_else(|e| panic!("{}: subscribe reply {}: {e}", self.node, raw.get()));
        assert!(
            r.events.is_empty(),
            "{}: a subscribe without a cursor replied with events",
            self.node
        );
        self.epochs.insert(topic.into(), r.epoch.clone());
        (r.epoch, r.offset)
    }

    /// The next event, reset or close (other pushes skipped). A read waits at most the
    /// support module's `WAIT`.
    pub async fn next(&mut self) -> Seen {
        loop {
            let m = match self.ws.next().await {
                WsIn::Closed(code) => return Seen::Closed(code),
                WsIn::Msg(m) => m,
            };
            let Some(push) = m.push else { continue };
            if let Some(d) = &push.disconnect {
                panic!("{}: disconnect push {d:?}", self.node);
            }
            let Some(topic) = push.topic else { continue };
            if let Some(ev) = push.event {
                let epoch = self.epochs.get(&topic).cloned().unwrap_or_default();
                let data = serde_json::from_str(ev.data.get()).expect("event data is JSON");
                return Seen::Event(Delivered {
                    topic,
                    epoch,
                    offset: ev.offset,
                    data,
                });
            }
            if let Some(r) = push.reset {
                self.epochs.insert(topic.clone(), r.epoch.clone());
                return Seen::Reset {
                    topic,
                    epoch: r.epoch,
                    offset: r.offset,
                };
            }
            if let Some(s) = push.skipped {
                panic!("{}: {topic}: skipped push {s:?}", self.node);
            }
        }
    }

    /// Reads until each topic of `want` has that many events; fails on a reset or close,
    /// or when `within` passes first.
    pub async fn collect(
        &mut self,
        want: &BTreeMap<String, usize>,
        within: Duration,
    ) -> BTreeMap<String, Vec<Delivered>> {
        let mut tally = Tally::new(format!("WebSocket on {}", self.node), want);
        let deadline = tokio::time::Instant::now() + within;
        while !tally.done() {
            match tokio::time::timeout_at(deadline, self.next()).await {
                Ok(seen) => tally.take(seen),
                Err(_) => panic!(
                    "{}: not every event within {within:?}; missing {}",
                    tally.source,
                    tally.progress()
                ),
            }
        }
        tally.got
    }
}

/// A multi-topic SSE watch read as events and resets (`bookmark`s skipped).
pub struct MultiSse {
    pub node: String,
    stream: HttpStream,
}

impl MultiSse {
    pub async fn next(&mut self) -> Seen {
        loop {
            let Some(ev) = self.stream.next_sse().await else {
                return Seen::Closed(None);
            };
            let v: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
            match ev.event.as_str() {
                "bookmark" => continue,
                "reset" => {
                    return Seen::Reset {
                        topic: v["topic"].as_str().unwrap_or_default().into(),
                        epoch: v["epoch"].as_str().unwrap_or_default().into(),
                        offset: v["offset"].as_u64().unwrap_or_default(),
                    }
                }
                "disconnect" => return Seen::Closed(v["code"].as_u64().map(|c| c as u16)),
                "message" => {
                    return Seen::Event(Delivered {
                        topic: v["topic"].as_str().expect("envelope topic").into(),
                        epoch: v["epoch"].as_str().expect("envelope epoch").into(),
                        offset: v["offset"].as_u64().expect("envelope offset"),
                        data: v["data"].clone(),
                    })
                }
                other => panic!("{}: unexpected SSE event {other}: {}", self.node, ev.data),
            }
        }
    }

    /// As [`Watcher::collect`].
    pub async fn collect(
        &mut self,
        want: &BTreeMap<String, usize>,
        within: Duration,
    ) -> BTreeMap<String, Vec<Delivered>> {
        let mut tally = Tally::new(format!("SSE on {}", self.node), want);
        let deadline = tokio::time::Instant::now() + within;
        while !tally.done() {
            match tokio::time::timeout_at(deadline, self.next()).await {
                Ok(seen) => tally.take(seen),
                Err(_) => panic!(
                    "{}: not every event within {within:?}; missing {}",
                    tally.source,
                    tally.progress()
                ),
            }
        }
        tally.got
    }
}
