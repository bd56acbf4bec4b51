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
//! Every cluster connection is mutual TLS, as in production: at start the harness
//! makes a CA and one certificate per router and node (rcgen, through
//! [`weft_router::certs::DevCa`]) under `<root>/certs`, and reads the routers with an
//! admin certificate. [`ProcCluster::ca`] issues more (expired, other ids) for the
//! intrusion tests.
//!
//! Besides the processes this holds what the tests read the cluster with: a per-node
//! HTTP handle ([`NodeApi`]: `/v1/cluster`, owners, publishes, metrics), a WebSocket
//! subscriber that stamps each event with its topic's epoch and surfaces resets
//! ([`Watcher`]), a multi-topic SSE reader ([`MultiSse`]) and bounded polling
//! ([`wait_for`], [`wait_until`]).
//!
//! For membership changes under load: nodes are stopped gracefully
//! ([`ProcCluster::sigterm_node`], [`NodeApi::drain`], then
//! [`ProcCluster::await_exit`]) and started again on the same id, addresses and data
//! dir ([`ProcCluster::restart_node`]); [`Roaming`] subscribers (WebSocket or
//! multi-topic SSE) follow a drain or a crash to another node and resume from their
//! cursors, logging everything they saw for the test to judge.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;
use weft_proto::{grpc, PublishResult, SubscribeResult, TopicState};
use weft_router::certs::DevCa;
use weft_router::identity::Peer;
use weft_router::tls::{Certs, TlsFiles, Transport};
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
    proc: Proc,
    api: NodeApi,
}

/// How the cluster's nodes are started (the same for every node and restart).
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// `--shutdown-grace-ms`: sessions are closed over its first half on a drain.
    pub shutdown_grace_ms: u64,
    /// `--reconnect-jitter-ms`: the largest `after_ms` a drained session is told.
    pub reconnect_jitter_ms: Option<u64>,
    /// The nodes' `RUST_LOG`.
    pub log_filter: String,
    /// More flags for every node (for example a `--config` with `[auth]`).
    pub extra_args: Vec<String>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            shutdown_grace_ms: 1000,
            reconnect_jitter_ms: None,
            log_filter: "info".into(),
            extra_args: Vec::new(),
        }
    }
}

/// What a node is started with; kept after it stops so that it restarts the same.
#[derive(Debug, Clone)]
struct NodeSpec {
    dir: PathBuf,
    log: PathBuf,
    /// `ip:0` until the first start, then the bound addresses (reused on restart).
    http: String,
    cluster: String,
    quic: String,
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
    /// Every node ever added, running or not.
    specs: BTreeMap<String, NodeSpec>,
    node_options: NodeOptions,
    /// Nodes ever added: the next one gets `127.0.0.{base + 11 + added}`.
    added: u8,
    /// Every log file, printed if the test fails.
    logs: Vec<(String, PathBuf)>,
    /// The cluster CA; every member's certificate under `<root>/certs`.
    ca: DevCa,
    /// The harness's own (admin) certificate, reloaded by [`ProcCluster::reissue_all`].
    admin: Arc<Certs>,
    pub http: reqwest::Client,
}

/// Validity of the harness's certificates.
const CERT_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// Writes `<dir>/<name>.{crt,key}` for `peer`, signed by `ca`; returns the files
/// (with `<dir>/ca.crt` as the CA bundle).
pub fn issue_files(ca: &DevCa, dir: &Path, name: &str, peer: &Peer) -> TlsFiles {
    let (cert_file, key_file) =
        weft_router::certs::write_member(ca, dir, name, peer, CERT_VALIDITY)
            .unwrap_or_else(|e| panic!("issue {peer}: {e}"));
    TlsFiles {
        ca_file: dir.join("ca.crt"),
        cert_file,
        key_file,
    }
}

/// A transport presenting `files`.
pub fn tls(files: TlsFiles) -> Transport {
    Transport::MutualTls(Certs::load(files).expect("load test certificates"))
}

/// `--cluster-ca-file … --cluster-cert-file … --cluster-key-file …`.
fn tls_args(cmd: &mut Command, files: &TlsFiles) {
    cmd.arg("--cluster-ca-file")
        .arg(&files.ca_file)
        .arg("--cluster-cert-file")
        .arg(&files.cert_file)
        .arg("--cluster-key-file")
        .arg(&files.key_file);
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
        Self::start_with_options(
            name,
            base,
            nodes,
            heartbeat_timeout_ms,
            NodeOptions::default(),
        )
        .await
    }

    /// [`ProcCluster::start_with`], the nodes started with `node_options`.
    pub async fn start_with_options(
        name: &str,
        base: u8,
        nodes: &[&str],
        heartbeat_timeout_ms: u64,
        node_options: NodeOptions,
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
        let certs = root.join("certs");
        std::fs::create_dir_all(&certs).expect("create the certificates' directory");
        let ca = DevCa::generate("weft test CA", CERT_VALIDITY).expect("generate a CA");
        std::fs::write(certs.join("ca.crt"), ca.cert_pem()).expect("write the CA");
        let admin_certs = Certs::load(issue_files(
            &ca,
            &certs,
            "admin",
            &Peer::Admin("harness".into()),
        ))
        .expect("load the harness's certificate");
        let admin = Transport::MutualTls(admin_certs.clone());
        let router_clients = router_addrs
            .iter()
            .map(|(id, a)| {
                (
                    *id,
                    RouterClient::with_transport(vec![a.clone()], admin.clone()),
                )
            })
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
            specs: BTreeMap::new(),
            node_options,
            added: 0,
            logs: Vec::new(),
            ca,
            admin: admin_certs,
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
        let files = self.member_files(&format!("router-{id}"), &Peer::Router(id.to_string()));
        let mut cmd = command(router_bin());
        tls_args(&mut cmd, &files);
        let child = cmd
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

    /// The cluster CA (to issue certificates for intrusion and rotation tests).
    pub fn ca(&self) -> &DevCa {
        &self.ca
    }

    /// Replaces the CA bundle every member reads (`certs/ca.crt`) with `pems`.
    pub fn write_ca_bundle(&self, pems: &[&str]) {
        let path = self.certs_dir().join("ca.crt");
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, pems.concat()).expect("write the CA bundle");
        std::fs::rename(&tmp, &path).expect("replace the CA bundle");
        self.admin
            .reload(true)
            .expect("the harness reloads its CA bundle");
    }

    /// Issues a new certificate and key from `ca` for every router, every node ever
    /// added and the harness itself, replacing the files the members read (each
    /// member reloads them by itself).
    pub fn reissue_all(&self, ca: &DevCa) {
        let dir = self.certs_dir();
        let mut members: Vec<(String, Peer)> = self
            .router_addrs
            .keys()
            .map(|id| (format!("router-{id}"), Peer::Router(id.to_string())))
            .collect();
        members.extend(
            self.specs
                .keys()
                .map(|n| (format!("node-{n}"), Peer::Node(n.clone()))),
        );
        members.push(("admin".into(), Peer::Admin("harness".into())));
        for (name, peer) in &members {
            weft_router::certs::write_member(ca, &dir, name, peer, CERT_VALIDITY)
                .unwrap_or_else(|e| panic!("reissue {name}: {e}"));
        }
        self.admin
            .reload(true)
            .expect("the harness reloads its certificate");
    }

    /// Where the members' certificates live (`ca.crt`, `<member>.{crt,key}`).
    pub fn certs_dir(&self) -> PathBuf {
        self.root.join("certs")
    }

    /// The certificate files of member `name` (`router-1`, `node-a`, …), issued for
    /// `peer` on first use and kept across restarts.
    fn member_files(&self, name: &str, peer: &Peer) -> TlsFiles {
        let dir = self.certs_dir();
        let files = TlsFiles {
            ca_file: dir.join("ca.crt"),
            cert_file: dir.join(format!("{name}.crt")),
            key_file: dir.join(format!("{name}.key")),
        };
        if files.cert_file.exists() {
            files
        } else {
            issue_files(&self.ca, &dir, name, peer)
        }
    }

    /// The router group's addresses (id → `host:port`).
    pub fn router_addrs(&self) -> BTreeMap<u64, String> {
        self.router_addrs.clone()
    }

    /// The cluster listener (relay) address of node `name` once it started.
    pub fn cluster_addr(&self, name: &str) -> String {
        self.specs
            .get(name)
            .unwrap_or_else(|| panic!("node {name} was never added"))
            .cluster
            .clone()
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
        assert!(!self.specs.contains_key(name), "node {name} exists");
        let ip = format!("127.0.0.{}", self.base + 11 + self.added);
        self.added += 1;
        let dir = self.root.join(format!("node-{name}"));
        std::fs::create_dir_all(&dir).expect("create the node's directory");
        let log = self.root.join(format!("node-{name}.log"));
        self.logs.push((format!("node {name}"), log.clone()));
        let spec = NodeSpec {
            dir,
            log,
            http: format!("{ip}:0"),
            cluster: format!("{ip}:0"),
            quic: format!("{ip}:0"),
        };
        self.specs.insert(name.into(), spec);
        self.spawn_node(name).await
    }

    /// Starts node `name` again after it stopped: the same node id, HTTP and gRPC
    /// addresses, data dir and options. Waits for its ready file and `/readyz`.
    pub async fn restart_node(&mut self, name: &str) -> NodeApi {
        assert!(self.specs.contains_key(name), "node {name} was never added");
        self.spawn_node(name).await
    }

    async fn spawn_node(&mut self, name: &str) -> NodeApi {
        assert!(!self.nodes.contains_key(name), "node {name} is running");
        let spec = self.specs[name].clone();
        let ready = spec.dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let out = log_file(&spec.log);
        let routers = self
            .router_addrs
            .values()
            .cloned()
            .collect::<Vec<_>>()
            .join(",");
        let opts = &self.node_options;
        let files = self.member_files(&format!("node-{name}"), &Peer::Node(name.into()));
        let mut cmd = command(Path::new(env!("CARGO_BIN_EXE_weft-node")));
        tls_args(&mut cmd, &files);
        cmd.args(["--node-id", name])
            .args(["--http-listen", &spec.http])
            .args(["--cluster-listen", &spec.cluster])
            .args(["--quic-listen", &spec.quic])
            .args(["--router", &routers])
            .arg("--data-dir")
            .arg(spec.dir.join("data"))
            .arg("--ready-file")
            .arg(&ready)
            .args(["--shutdown-grace-ms", &opts.shutdown_grace_ms.to_string()]);
        if let Some(jitter) = opts.reconnect_jitter_ms {
            cmd.args(["--reconnect-jitter-ms", &jitter.to_string()]);
        }
        cmd.args(&opts.extra_args);
        let child = cmd
            .env("RUST_LOG", &opts.log_filter)
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
        let cluster = bound["cluster"].as_str().unwrap_or_else(|| {
            panic!("node {name}: ready file without a cluster address: {bound}")
        });
        {
            let spec = self.specs.get_mut(name).expect("spec");
            spec.http = addr.to_string();
            spec.cluster = cluster.to_owned();
        }
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
                proc,
                api: api.clone(),
            },
        );
        api
    }

    /// Sends SIGTERM to node `name` (by its PID): it drains and exits; see
    /// [`ProcCluster::await_exit`].
    pub fn sigterm_node(&self, name: &str) {
        let pid = self
            .nodes
            .get(name)
            .unwrap_or_else(|| panic!("node {name} is not running"))
            .proc
            .0
            .id();
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .stdin(Stdio::null())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid} (node {name}): {status}");
    }

    /// Waits for node `name` to exit on its own (after a SIGTERM or a drain), for at
    /// most `within`; then it is no longer running. Panics if it is still up.
    pub async fn await_exit(&mut self, name: &str, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            let n = self
                .nodes
                .get_mut(name)
                .unwrap_or_else(|| panic!("node {name} is not running"));
            if let Some(status) = n.proc.0.try_wait().expect("poll the node") {
                self.nodes.remove(name);
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "node {name} did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
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

    /// `POST /v1/admin/drain`; the node answers `202` and drains as on SIGTERM.
    pub async fn drain(&self) {
        let resp = self
            .http
            .post(self.url("/v1/admin/drain"))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{} POST /v1/admin/drain: {e}", self.name));
        assert_eq!(resp.status(), 202, "{} POST /v1/admin/drain", self.name);
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
        let source = format!("WebSocket on {}", self.node);
        collect(source, want, within, self).await
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
        let source = format!("SSE on {}", self.node);
        collect(source, want, within, self).await
    }
}

/// How long a roaming client keeps trying to find a node that takes its session back.
const RECONNECT_WITHIN: Duration = Duration::from_secs(60);
/// The longest `after_ms` a roaming client honours before reconnecting.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(5);
/// A roaming WebSocket client told `disconnect` waits this long for the close frame.
const CLOSE_AFTER_PUSH: Duration = Duration::from_secs(2);
/// Times a roaming client asks again for a subscription refused as retryable (503, 429).
const SUBSCRIBE_ATTEMPTS: u32 = 40;
const SUBSCRIBE_RETRY: Duration = Duration::from_millis(500);

/// The nodes roaming clients may (re)connect to, in order, shared with the test (which
/// adds a node once it has joined). A restarted node keeps its address.
#[derive(Clone, Default)]
pub struct Targets(Arc<Mutex<Vec<NodeApi>>>);

impl Targets {
    pub fn new(apis: Vec<NodeApi>) -> Self {
        Self(Arc::new(Mutex::new(apis)))
    }

    pub fn add(&self, api: NodeApi) {
        lock_log(&self.0).push(api);
    }

    pub fn all(&self) -> Vec<NodeApi> {
        lock_log(&self.0).clone()
    }

    /// Every target, starting with the one after `name`: a client leaving `name` tries
    /// the others first and `name` last.
    pub fn after(&self, name: &str) -> Vec<NodeApi> {
        let all = self.all();
        let i = all.iter().position(|a| a.name == name).map_or(0, |i| i + 1);
        all[i..].iter().chain(&all[..i]).cloned().collect()
    }
}

fn lock_log<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One thing a roaming subscriber saw on a topic.
#[derive(Debug, Clone, PartialEq)]
pub enum Obs {
    /// An event. Its epoch is the envelope's (SSE) or, as WebSocket pushes carry none,
    /// the topic's epoch as the latest subscribe reply or `reset` gave it.
    Event {
        epoch: String,
        offset: u64,
        data: Value,
    },
    /// A `reset` push / `event: reset`, or a resume answered `recovered:false`: the
    /// topic goes on from `epoch:offset`.
    Reset { epoch: String, offset: u64 },
}

/// Everything a roaming subscriber saw, for the test to judge afterwards.
#[derive(Debug, Clone, Default)]
pub struct SubLog {
    /// WebSocket: per topic, the cursor of the first subscribe reply (without a cursor:
    /// from now). SSE watches opened "from now" record none.
    pub start: BTreeMap<String, (String, u64)>,
    /// Per topic, in arrival order.
    pub seen: BTreeMap<String, Vec<Obs>>,
    /// Each session held, in order: its node and how it ended.
    pub sessions: Vec<String>,
    /// Every `disconnect` push / `event: disconnect` and the node that sent it.
    pub disconnects: Vec<(String, weft_proto::DisconnectPush)>,
    /// What the protocol should never produce (a `skipped` push, an unparsable line, a
    /// subscribe refused for good, no node taking the session back…).
    pub anomalies: Vec<String>,
}

impl SubLog {
    /// The cursor after the last thing seen on `topic` (an event or a reset).
    pub fn position(&self, topic: &str) -> Option<(String, u64)> {
        self.seen
            .get(topic)
            .and_then(|obs| obs.last())
            .map(|o| match o {
                Obs::Event { epoch, offset, .. } | Obs::Reset { epoch, offset } => {
                    (epoch.clone(), *offset)
                }
            })
    }

    fn record(&mut self, topic: &str, obs: Obs) {
        self.seen.entry(topic.to_owned()).or_default().push(obs);
    }
}

/// A subscriber that survives its node: told `disconnect` (or cut off), it waits the
/// `after_ms` it was told (capped), connects to another node of its [`Targets`] and
/// resumes every topic from its cursor — WebSocket `subscribe` with `since`, SSE with
/// the last `id:` as `Last-Event-ID` — as a well-behaved client does. It logs all it
/// sees ([`SubLog`]); it judges nothing.
pub struct Roaming {
    pub name: String,
    log: Arc<Mutex<SubLog>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// How a roaming client's session ended.
enum Ended {
    Stop,
    Gone {
        why: String,
        /// The `after_ms` of a `disconnect` it was told first.
        told: Option<u64>,
    },
}

impl Roaming {
    /// A WebSocket client on `first`, subscribed (without cursors: from now) to every
    /// topic when this returns.
    pub async fn websocket(
        name: &str,
        targets: &Targets,
        first: &NodeApi,
        topics: &[String],
    ) -> Self {
        let ws = ws_open(first)
            .await
            .unwrap_or_else(|e| panic!("{name}: connect: {e}"));
        let log = Arc::new(Mutex::new(SubLog::default()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let roamer = WsRoamer {
            name: name.into(),
            topics: topics.to_vec(),
            targets: targets.clone(),
            cursors: topics.iter().map(|t| (t.clone(), None)).collect(),
            log: log.clone(),
            stop: stopped,
            ready: Some(ready_tx),
        };
        let task = tokio::spawn(roamer.run(first.clone(), ws));
        let ready = tokio::time::timeout(Duration::from_secs(30), ready_rx).await;
        if !matches!(ready, Ok(Ok(()))) {
            panic!(
                "{name}: not subscribed to every topic on {} within 30 s: {:?}",
                first.name,
                lock_log(&log).anomalies
            );
        }
        Self {
            name: name.into(),
            log,
            stop,
            task,
        }
    }

    /// A multi-topic SSE watch (`GET /v1/events?topic=…&watch=true`) on `first`, from
    /// now, open when this returns.
    pub async fn sse(name: &str, targets: &Targets, first: &NodeApi, topics: &[String]) -> Self {
        let resp = sse_open(first, topics, None)
            .await
            .unwrap_or_else(|e| panic!("{name}: open the watch: {e}"));
        let log = Arc::new(Mutex::new(SubLog::default()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let roamer = SseRoamer {
            topics: topics.to_vec(),
            targets: targets.clone(),
            last_id: None,
            log: log.clone(),
            stop: stopped,
        };
        let task = tokio::spawn(roamer.run(first.clone(), resp));
        Self {
            name: name.into(),
            log,
            stop,
            task,
        }
    }

    /// Where this subscriber is on `topic` ([`SubLog::position`]).
    pub fn position(&self, topic: &str) -> Option<(String, u64)> {
        lock_log(&self.log).position(topic)
    }

    /// Stops the client and returns its log.
    pub async fn finish(self) -> SubLog {
        self.stop.send_replace(true);
        let abort = self.task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .is_err()
        {
            abort.abort();
            lock_log(&self.log)
                .anomalies
                .push("the client did not stop within 10 s".into());
        }
        std::mem::take(&mut *lock_log(&self.log))
    }
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A `weft.v1.json` WebSocket to `api`, or why not (refused, 503 while draining…).
async fn ws_open(api: &NodeApi) -> Result<WsStream, String> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{}/v1/ws", api.addr)
        .into_client_request()
        .map_err(|e| e.to_string())?;
    req.headers_mut().insert(
        "sec-websocket-protocol",
        weft_proto::SUBPROTOCOL_JSON
            .parse()
            .expect("a valid header value"),
    );
    match tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(req),
    )
    .await
    {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(e)) => Err(format!("{}: {e}", api.name)),
        Err(_) => Err(format!("{}: connect timed out", api.name)),
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Waits `d`; false if the client was stopped meanwhile.
async fn pause(stop: &mut tokio::sync::watch::Receiver<bool>, d: Duration) -> bool {
    if *stop.borrow() {
        return false;
    }
    let stopped = tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.wait_for(|s| *s) => true,
    };
    !stopped && !*stop.borrow()
}

struct WsRoamer {
    name: String,
    topics: Vec<String>,
    targets: Targets,
    /// Per topic, the cursor to resume from: `None` until the first subscribe reply.
    cursors: BTreeMap<String, Option<(String, u64)>>,
    log: Arc<Mutex<SubLog>>,
    stop: tokio::sync::watch::Receiver<bool>,
    /// Told once every first subscribe is answered.
    ready: Option<tokio::sync::oneshot::Sender<()>>,
}

/// One WebSocket session's bookkeeping.
#[derive(Default)]
struct WsSession {
    next_id: u64,
    /// Subscribe commands awaiting their reply: id → topic.
    pending: HashMap<u64, String>,
    /// Subscribes to send again (refused as retryable): when, topic.
    again: Vec<(tokio::time::Instant, String)>,
    attempts: HashMap<String, u32>,
    /// A `disconnect` push arrived: its `after_ms`, and when.
    told: Option<(u64, tokio::time::Instant)>,
}

impl WsRoamer {
    async fn run(mut self, first: NodeApi, ws: WsStream) {
        let (mut node, mut ws) = (first, ws);
        loop {
            let ended = self.session(&node.name, &mut ws).await;
            let (why, told) = match ended {
                Ended::Stop => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                    return;
                }
                Ended::Gone { why, told } => (why, told),
            };
            lock_log(&self.log)
                .sessions
                .push(format!("{}: {why}", node.name));
            drop(ws);
            let delay = Duration::from_millis(told.unwrap_or(50)).min(MAX_RECONNECT_DELAY);
            if !pause(&mut self.stop, delay).await {
                return;
            }
            match self.reconnect(&node.name).await {
                Some((api, socket)) => (node, ws) = (api, socket),
                None => return,
            }
        }
    }

    /// Connects to the next target that takes a session; `None` if stopped or none did
    /// within [`RECONNECT_WITHIN`] (an anomaly).
    async fn reconnect(&mut self, left: &str) -> Option<(NodeApi, WsStream)> {
        let deadline = Instant::now() + RECONNECT_WITHIN;
        let mut last = String::new();
        loop {
            for api in self.targets.after(left) {
                if *self.stop.borrow() {
                    return None;
                }
                match ws_open(&api).await {
                    Ok(ws) => return Some((api, ws)),
                    Err(e) => last = e,
                }
            }
            if Instant::now() >= deadline {
                lock_log(&self.log).anomalies.push(format!(
                    "{}: no node took the session back within {RECONNECT_WITHIN:?}; last: {last}",
                    self.name
                ));
                return None;
            }
            if !pause(&mut self.stop, Duration::from_millis(200)).await {
                return None;
            }
        }
    }

    async fn subscribe(
        &self,
        ws: &mut WsStream,
        s: &mut WsSession,
        topic: &str,
    ) -> Result<(), String> {
        use futures_util::SinkExt;
        s.next_id += 1;
        let id = s.next_id;
        let since = self.cursors[topic]
            .as_ref()
            .map(|(e, o)| format!("{e}:{o}"));
        let line = subscribe_cmd(topic, since.as_deref()).to_line(Some(id));
        s.pending.insert(id, topic.to_owned());
        ws.send(tokio_tungstenite::tungstenite::Message::text(line))
            .await
            .map_err(|e| format!("send subscribe: {e}"))
    }

    async fn session(&mut self, node: &str, ws: &mut WsStream) -> Ended {
        use tokio_tungstenite::tungstenite::Message;
        let mut s = WsSession::default();
        for t in self.topics.clone() {
            if let Err(why) = self.subscribe(ws, &mut s, &t).await {
                return Ended::Gone { why, told: None };
            }
        }
        loop {
            let again_at = s.again.iter().map(|(at, _)| *at).min();
            let give_up_at = s.told.map(|(_, at)| at + CLOSE_AFTER_PUSH);
            let gone = |why: String, s: &WsSession| Ended::Gone {
                why,
                told: s.told.map(|(after, _)| after),
            };
            tokio::select! {
                r = self.stop.changed() => {
                    if r.is_err() || *self.stop.borrow() {
                        return Ended::Stop;
                    }
                }
                _ = sleep_until_opt(again_at) => {
                    let now = tokio::time::Instant::now();
                    let (due, later): (Vec<_>, Vec<_>) =
                        std::mem::take(&mut s.again).into_iter().partition(|(at, _)| *at <= now);
                    s.again = later;
                    for (_, t) in due {
                        if let Err(why) = self.subscribe(ws, &mut s, &t).await {
                            return gone(why, &s);
                        }
                    }
                }
                _ = sleep_until_opt(give_up_at) => {
                    return gone(format!("no close within {CLOSE_AFTER_PUSH:?} of the disconnect push"), &s);
                }
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(text))) => {
                        for line in text.as_str().split('\n').filter(|l| !l.trim().is_empty()) {
                            match serde_json::from_str::<weft_proto::ServerMessage>(line) {
                                Ok(m) => self.on_message(node, m, &mut s),
                                Err(e) => lock_log(&self.log)
                                    .anomalies
                                    .push(format!("{node}: unparsable line {line}: {e}")),
                            }
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        let code = frame.map(|f| u16::from(f.code));
                        let after = if s.told.is_some() { " after the disconnect push" } else { "" };
                        return gone(format!("closed {code:?}{after}"), &s);
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return gone(format!("read error: {e}"), &s),
                    None => return gone("connection ended".into(), &s),
                }
            }
        }
    }

    fn on_message(&mut self, node: &str, m: weft_proto::ServerMessage, s: &mut WsSession) {
        if let Some(id) = m.id {
            self.on_reply(node, id, m, s);
            return;
        }
        let Some(push) = m.push else { return };
        let mut log = lock_log(&self.log);
        if let Some(d) = push.disconnect {
            s.told = Some((d.after_ms, tokio::time::Instant::now()));
            log.disconnects.push((node.to_owned(), d));
            return;
        }
        let Some(topic) = push.topic else { return };
        let Some(Some(cursor)) = self.cursors.get_mut(&topic) else {
            log.anomalies.push(format!(
                "{node}: a push for {topic} before its subscribe reply"
            ));
            return;
        };
        if let Some(ev) = push.event {
            let data = serde_json::from_str(ev.data.get()).unwrap_or(Value::Null);
            cursor.1 = ev.offset;
            let epoch = cursor.0.clone();
            log.record(
                &topic,
                Obs::Event {
                    epoch,
                    offset: ev.offset,
                    data,
                },
            );
        } else if let Some(r) = push.reset {
            *cursor = (r.epoch.clone(), r.offset);
            log.record(
                &topic,
                Obs::Reset {
                    epoch: r.epoch,
                    offset: r.offset,
                },
            );
        } else if let Some(sk) = push.skipped {
            log.anomalies
                .push(format!("{node}: {topic}: skipped {}..={}", sk.from, sk.to));
        }
    }

    fn on_reply(&mut self, node: &str, id: u64, m: weft_proto::ServerMessage, s: &mut WsSession) {
        let mut log = lock_log(&self.log);
        let Some(topic) = s.pending.remove(&id) else {
            log.anomalies
                .push(format!("{node}: a reply to unknown command {id}"));
            return;
        };
        if let Some(e) = m.error {
            let n = s.attempts.entry(topic.clone()).or_insert(0);
            *n += 1;
            if matches!(e.code, 429 | 503) && *n < SUBSCRIBE_ATTEMPTS {
                s.again
                    .push((tokio::time::Instant::now() + SUBSCRIBE_RETRY, topic));
            } else {
                log.anomalies.push(format!(
                    "{node}: subscribe to {topic} refused (attempt {n}): {} {}",
                    e.code, e.message
                ));
            }
            return;
        }
        let parsed = m.result.as_ref().map(|raw| {
            serde_json::from_str::<weft_proto::SubscribeResult>(raw.get())
                .map_err(|e| format!("{e}: {}", raw.get()))
        });
        let r = match parsed {
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                log.anomalies
                    .push(format!("{node}: subscribe reply for {topic}: {e}"));
                return;
            }
            None => {
                log.anomalies.push(format!(
                    "{node}: subscribe reply for {topic} without result"
                ));
                return;
            }
        };
        let since = self.cursors[&topic].clone();
        let cursor = match (since, r.recovered) {
            (None, _) => {
                if !r.events.is_empty() {
                    log.anomalies.push(format!(
                        "{node}: a subscribe to {topic} without a cursor replied with events"
                    ));
                }
                log.start.insert(topic.clone(), (r.epoch.clone(), r.offset));
                (r.epoch, r.offset)
            }
            (Some((_, from)), Some(true)) => {
                let mut last = from;
                for ev in &r.events {
                    let data = serde_json::from_str(ev.data.get()).unwrap_or(Value::Null);
                    last = ev.offset;
                    log.record(
                        &topic,
                        Obs::Event {
                            epoch: r.epoch.clone(),
                            offset: ev.offset,
                            data,
                        },
                    );
                }
                (r.epoch, last)
            }
            (Some(_), _) => {
                log.record(
                    &topic,
                    Obs::Reset {
                        epoch: r.epoch.clone(),
                        offset: r.offset,
                    },
                );
                (r.epoch, r.offset)
            }
        };
        self.cursors.insert(topic, Some(cursor));
        if s.pending.is_empty() && s.again.is_empty() {
            if let Some(tx) = self.ready.take() {
                let _ = tx.send(());
            }
        }
    }
}

/// `GET /v1/events?topic=…&watch=true` on `api`, resuming from `last_id` if given:
/// the response once it is `200`, or why not.
async fn sse_open(
    api: &NodeApi,
    topics: &[String],
    last_id: Option<&str>,
) -> Result<reqwest::Response, String> {
    let query = topics
        .iter()
        .map(|t| format!("topic={t}"))
        .collect::<Vec<_>>()
        .join("&");
    let mut req = api
        .http
        .get(api.url(&format!("/v1/events?{query}&watch=true")));
    if let Some(id) = last_id {
        req = req.header("last-event-id", id);
    }
    // Subscribing on a node waits (bounded) for each topic's owner: allow for that.
    let resp = match tokio::time::timeout(Duration::from_secs(20), req.send()).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(format!("{}: {e}", api.name)),
        Err(_) => return Err(format!("{}: no answer within 20 s", api.name)),
    };
    let status = resp.status().as_u16();
    if status == 200 {
        return Ok(resp);
    }
    let body = tokio::time::timeout(Duration::from_secs(2), resp.bytes())
        .await
        .ok()
        .and_then(|b| b.ok())
        .unwrap_or_default();
    Err(format!(
        "{}: {status} {}",
        api.name,
        String::from_utf8_lossy(&body)
    ))
}

struct SseRoamer {
    topics: Vec<String>,
    targets: Targets,
    /// The last `id:` received: what a browser sends as `Last-Event-ID`.
    last_id: Option<String>,
    log: Arc<Mutex<SubLog>>,
    stop: tokio::sync::watch::Receiver<bool>,
}

/// The fields of one SSE event being read.
#[derive(Default)]
struct SseBlock {
    id: Option<String>,
    event: Option<String>,
    data: Option<String>,
}

impl SseRoamer {
    async fn run(mut self, first: NodeApi, resp: reqwest::Response) {
        let (mut node, mut resp) = (first, resp);
        loop {
            let (why, told) = match self.session(&node.name, resp).await {
                Ended::Stop => return,
                Ended::Gone { why, told } => (why, told),
            };
            lock_log(&self.log)
                .sessions
                .push(format!("{}: {why}", node.name));
            let delay = Duration::from_millis(told.unwrap_or(50)).min(MAX_RECONNECT_DELAY);
            if !pause(&mut self.stop, delay).await {
                return;
            }
            match self.reconnect(&node.name).await {
                Some((api, r)) => (node, resp) = (api, r),
                None => return,
            }
        }
    }

    async fn reconnect(&mut self, left: &str) -> Option<(NodeApi, reqwest::Response)> {
        let deadline = Instant::now() + RECONNECT_WITHIN;
        let mut last = String::new();
        loop {
            for api in self.targets.after(left) {
                if *self.stop.borrow() {
                    return None;
                }
                match sse_open(&api, &self.topics, self.last_id.as_deref()).await {
                    Ok(r) => return Some((api, r)),
                    Err(e) => last = e,
                }
            }
            if Instant::now() >= deadline {
                lock_log(&self.log).anomalies.push(format!(
                    "no node took the watch back within {RECONNECT_WITHIN:?}; last: {last}"
                ));
                return None;
            }
            if !pause(&mut self.stop, Duration::from_millis(200)).await {
                return None;
            }
        }
    }

    async fn session(&mut self, node: &str, resp: reqwest::Response) -> Ended {
        let mut body = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut block = SseBlock::default();
        let mut told = None;
        loop {
            let chunk = tokio::select! {
                r = self.stop.changed() => {
                    if r.is_err() || *self.stop.borrow() {
                        return Ended::Stop;
                    }
                    continue;
                }
                c = body.next() => c,
            };
            match chunk {
                Some(Ok(bytes)) => buf.extend_from_slice(&bytes),
                Some(Err(e)) => {
                    return Ended::Gone {
                        why: format!("stream error: {e}"),
                        told,
                    }
                }
                None => {
                    return Ended::Gone {
                        why: "stream ended".into(),
                        told,
                    }
                }
            }
            while let Some(i) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                if line.is_empty() {
                    let b = std::mem::take(&mut block);
                    if let Some(after) = self.dispatch(node, b) {
                        told = Some(after);
                    }
                    continue;
                }
                if line.starts_with(':') {
                    continue;
                }
                let (field, value) = match line.split_once(':') {
                    Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                    None => (line.as_str(), ""),
                };
                match field {
                    "id" => block.id = Some(value.to_owned()),
                    "event" => block.event = Some(value.to_owned()),
                    "data" => {
                        let d = block.data.get_or_insert_with(String::new);
                        if !d.is_empty() {
                            d.push('\n');
                        }
                        d.push_str(value);
                    }
                    _ => {}
                }
            }
        }
    }

    /// Handles one SSE event; the `after_ms` of a `disconnect`.
    fn dispatch(&mut self, node: &str, b: SseBlock) -> Option<u64> {
        if let Some(id) = b.id {
            self.last_id = Some(id);
        }
        let data = b.data?;
        let v: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
        let mut log = lock_log(&self.log);
        let topic = v["topic"].as_str().unwrap_or_default().to_owned();
        match b.event.as_deref().unwrap_or("message") {
            "message" => match (v["epoch"].as_str(), v["offset"].as_u64()) {
                (Some(epoch), Some(offset)) => log.record(
                    &topic,
                    Obs::Event {
                        epoch: epoch.into(),
                        offset,
                        data: v["data"].clone(),
                    },
                ),
                _ => log
                    .anomalies
                    .push(format!("{node}: an SSE message without a cursor: {data}")),
            },
            "reset" => match (v["epoch"].as_str(), v["offset"].as_u64()) {
                (Some(epoch), Some(offset)) => log.record(
                    &topic,
                    Obs::Reset {
                        epoch: epoch.into(),
                        offset,
                    },
                ),
                _ => log
                    .anomalies
                    .push(format!("{node}: a reset without a cursor: {data}")),
            },
            "bookmark" => {}
            "disconnect" => match serde_json::from_value::<weft_proto::DisconnectPush>(v) {
                Ok(d) => {
                    let after = d.after_ms;
                    log.disconnects.push((node.to_owned(), d));
                    return Some(after);
                }
                Err(e) => log
                    .anomalies
                    .push(format!("{node}: a bad disconnect event {data}: {e}")),
            },
            other => log
                .anomalies
                .push(format!("{node}: SSE event {other}: {data}")),
        }
        None
    }
}

/// A subscriber whose observations [`collect`] can tally.
trait Observer {
    fn observe(&mut self) -> impl std::future::Future<Output = Seen> + '_;
}

impl Observer for Watcher {
    fn observe(&mut self) -> impl std::future::Future<Output = Seen> + '_ {
        self.next()
    }
}

impl Observer for MultiSse {
    fn observe(&mut self) -> impl std::future::Future<Output = Seen> + '_ {
        self.next()
    }
}

/// Reads from `sub` until each topic of `want` has that many events; fails on a reset
/// or close, or when `within` passes first.
async fn collect(
    source: String,
    want: &BTreeMap<String, usize>,
    within: Duration,
    sub: &mut impl Observer,
) -> BTreeMap<String, Vec<Delivered>> {
    let mut tally = Tally::new(source, want);
    let deadline = tokio::time::Instant::now() + within;
    while !tally.done() {
        match tokio::time::timeout_at(deadline, sub.observe()).await {
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
