//! A real process cluster for the multi-node tests: three `weft-router` processes
//! ([`RouterGroup`]) and any number of `weft-node` processes, each bound on its own
//! loopback address (127.0.0.x), so several clusters in one test run never collide.
//!
//! Layout of one cluster with IP base `b` (a test picks a distinct `b`):
//! routers `1..=3` on `127.0.0.{b+1..b+3}` (Router and, on another port, Raft
//! addresses, as the Helm chart runs them), nodes on `127.0.0.{b+11}`, `{b+12}`, … in
//! the order they were added. Every file (data dirs, ready files, logs, certificates)
//! lives in one [`Workdir`], removed when the test passes; when it fails, every
//! process's log is printed. Every process is killed by its own PID on drop.
//!
//! Every cluster connection is mutual TLS, as in production ([`Pki`] under
//! `<root>/certs`); [`ProcCluster::ca`] issues more (expired, other ids) for the
//! intrusion tests.
//!
//! For membership changes under load: nodes are stopped gracefully
//! ([`ProcCluster::sigterm_node`], [`NodeApi::drain`], then
//! [`ProcCluster::await_exit`]) and started again on the same id, addresses and data
//! dir ([`ProcCluster::restart_node`]). What reads the cluster lives beside this:
//! [`NodeApi`], [`crate::watch`], [`crate::roaming`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use weft_proto::grpc;
use weft_router::certs::DevCa;
use weft_router::identity::Peer;

use crate::api::NodeApi;
use crate::bin::{self, Proc, Workdir, START_WITHIN};
use crate::pki::{self, Pki};
use crate::routers::RouterGroup;
use crate::wait::{wait_for, wait_until};

/// The router's heartbeat timeout unless a test asks for another: short, so that a
/// killed node is removed (and its slots move) within seconds. Nodes heartbeat every
/// second.
pub const HEARTBEAT_TIMEOUT_MS: u64 = 2000;
/// The routers must agree on a leader within this (start, restart).
pub const LEADER_WITHIN: Duration = Duration::from_secs(20);

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
    routers: RouterGroup,
    nodes: BTreeMap<String, NodeProc>,
    /// Every node ever added, running or not.
    specs: BTreeMap<String, NodeSpec>,
    node_options: NodeOptions,
    /// Nodes ever added: the next one gets `127.0.0.{base + 11 + added}`.
    added: u8,
    pki: Arc<Pki>,
    pub http: reqwest::Client,
    /// Last: dropped after every process, so a failing test prints complete logs.
    workdir: Workdir,
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
        let workdir = Workdir::new("relay", name);
        let pki = Arc::new(Pki::create(workdir.join("certs")));
        // Raft on addresses of its own, as the Helm chart runs routers.
        let routers = RouterGroup::start(&workdir, base, heartbeat_timeout_ms, pki.clone()).await;
        let mut c = Self {
            routers,
            nodes: BTreeMap::new(),
            specs: BTreeMap::new(),
            node_options,
            added: 0,
            pki,
            http: reqwest::Client::new(),
            workdir,
        };
        // A node joins at start and gives up after a few retries: let the routers
        // elect first.
        c.router_leader(LEADER_WITHIN).await;
        for n in nodes {
            c.add_node(n).await;
        }
        c
    }

    /// The cluster CA (to issue certificates for intrusion and rotation tests).
    pub fn ca(&self) -> &DevCa {
        self.pki.ca()
    }

    /// Replaces the CA bundle every member reads (`certs/ca.crt`) with `pems`.
    pub fn write_ca_bundle(&self, pems: &[&str]) {
        self.pki.write_ca_bundle(pems)
    }

    /// Issues a new certificate and key from `ca` for every router, every node ever
    /// added and the harness itself, replacing the files the members read (each
    /// member reloads them by itself).
    pub fn reissue_all(&self, ca: &DevCa) {
        let mut members: Vec<(String, Peer)> = self
            .routers
            .addrs()
            .keys()
            .map(|id| (format!("router-{id}"), Peer::Router(id.to_string())))
            .collect();
        members.extend(
            self.specs
                .keys()
                .map(|n| (format!("node-{n}"), Peer::Node(n.clone()))),
        );
        self.pki.reissue(ca, &members);
    }

    /// Where the members' certificates live (`ca.crt`, `<member>.{crt,key}`).
    pub fn certs_dir(&self) -> PathBuf {
        self.pki.dir().to_path_buf()
    }

    /// The router group's Router addresses (id → `host:port`), the ones nodes dial.
    pub fn router_addrs(&self) -> BTreeMap<u64, String> {
        self.routers.addrs()
    }

    /// The Raft address of router `id` (only routers may call it).
    pub fn router_raft_addr(&self, id: u64) -> String {
        self.routers.raft_addr(id).to_owned()
    }

    /// The cluster listener (relay) address of node `name` once it started.
    pub fn cluster_addr(&self, name: &str) -> String {
        self.specs
            .get(name)
            .unwrap_or_else(|| panic!("node {name} was never added"))
            .cluster
            .clone()
    }

    /// The process id of router `id` (running).
    pub fn router_pid(&self, id: u64) -> u32 {
        self.routers
            .pid(id)
            .unwrap_or_else(|| panic!("router {id} is not running"))
    }

    /// The process id of node `name` (running).
    pub fn node_pid(&self, name: &str) -> u32 {
        self.nodes
            .get(name)
            .unwrap_or_else(|| panic!("node {name} is not running"))
            .proc
            .pid()
    }

    /// Sends SIGHUP to router `id`: it reloads its certificates.
    pub fn sighup_router(&self, id: u64) {
        self.routers.sighup(id);
    }

    /// Sends SIGHUP to node `name`: it reloads its certificates.
    pub fn sighup_node(&self, name: &str) {
        self.nodes
            .get(name)
            .unwrap_or_else(|| panic!("node {name} is not running"))
            .proc
            .sighup();
    }

    /// The certificate files of member `name` (`router-1`, `node-a`).
    pub fn member_files(&self, name: &str) -> weft_router::tls::TlsFiles {
        weft_router::tls::TlsFiles {
            ca_file: self.pki.dir().join("ca.crt"),
            cert_file: self.pki.dir().join(format!("{name}.crt")),
            key_file: self.pki.dir().join(format!("{name}.key")),
        }
    }

    /// Waits (at most `within`) until every running router (its Router address) and
    /// node (its cluster listener) answers `transport`'s handshake as `want`
    /// ([`crate::probe::handshake_ok`]); panics naming `what` otherwise.
    pub async fn members_accept(
        &self,
        transport: &weft_router::tls::Transport,
        want: bool,
        what: &str,
        within: Duration,
    ) {
        let members: Vec<(String, Option<String>)> = self
            .routers
            .ids()
            .into_iter()
            .map(|id| (self.routers.addr(id).to_owned(), None))
            .chain(
                self.nodes
                    .keys()
                    .map(|n| (self.cluster_addr(n), Some(n.clone()))),
            )
            .collect();
        let members = &members;
        wait_for(within, what, || async move {
            for (addr, node) in members {
                if crate::probe::handshake_ok(transport, addr, node.as_deref()).await != want {
                    return Err(format!("{addr} ({node:?}) does not yet"));
                }
            }
            Ok(())
        })
        .await;
    }

    /// Ids of the routers running now.
    pub fn router_ids(&self) -> Vec<u64> {
        self.routers.ids()
    }

    /// SIGKILLs router `id`.
    pub fn kill_router(&mut self, id: u64) {
        self.routers.kill(id)
    }

    /// Starts router `id` again on its address and data dir.
    pub async fn restart_router(&mut self, id: u64) {
        self.routers.spawn(id).await;
    }

    /// Waits until every running router names the same leader, itself running; its id.
    pub async fn router_leader(&self, within: Duration) -> u64 {
        self.routers.leader(within).await
    }

    /// The metadata as the current leader has applied it.
    pub async fn router_state(&self) -> grpc::ClusterState {
        self.routers.state(LEADER_WITHIN).await
    }

    /// Starts node `name` (also its node id) on the next loopback address, pointed at the
    /// three routers, and waits for its ready file and `/readyz`.
    pub async fn add_node(&mut self, name: &str) -> NodeApi {
        assert!(!self.specs.contains_key(name), "node {name} exists");
        let ip = format!("127.0.0.{}", self.routers.base() + 11 + self.added);
        self.added += 1;
        let dir = self.workdir.join(format!("node-{name}"));
        std::fs::create_dir_all(&dir).expect("create the node's directory");
        let log = self
            .workdir
            .log(&format!("node {name}"), &format!("node-{name}.log"));
        let spec = NodeSpec {
            dir,
            log,
            http: format!("{ip}:0"),
            cluster: format!("{ip}:0"),
            quic: format!("{ip}:0"),
        };
        self.specs.insert(name.into(), spec);
        self.spawn_node(name, true).await
    }

    /// Starts node `name` again after it stopped: the same node id, HTTP and gRPC
    /// addresses, data dir and options. Waits for its ready file and `/readyz`.
    pub async fn restart_node(&mut self, name: &str) -> NodeApi {
        assert!(self.specs.contains_key(name), "node {name} was never added");
        self.spawn_node(name, true).await
    }

    /// [`Self::restart_node`], returning once the node has bound its listeners (its
    /// ready file), without waiting for `/readyz`: for tests of what a node does
    /// before it is ready.
    pub async fn restart_node_unready(&mut self, name: &str) -> NodeApi {
        assert!(self.specs.contains_key(name), "node {name} was never added");
        self.spawn_node(name, false).await
    }

    async fn spawn_node(&mut self, name: &str, wait_ready: bool) -> NodeApi {
        assert!(!self.nodes.contains_key(name), "node {name} is running");
        let spec = self.specs[name].clone();
        let ready = spec.dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let out = bin::log_file(&spec.log);
        let routers = self
            .routers
            .addrs()
            .into_values()
            .collect::<Vec<_>>()
            .join(",");
        let opts = &self.node_options;
        let files = self
            .pki
            .member_files(&format!("node-{name}"), &Peer::Node(name.into()));
        let mut cmd = bin::command(bin::path("weft-node"));
        pki::tls_args(&mut cmd, &files);
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
        let bound = bin::await_ready_file(&mut proc.0, &ready, &format!("node {name}")).await;
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
        if wait_ready {
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
        self.nodes
            .get(name)
            .unwrap_or_else(|| panic!("node {name} is not running"))
            .proc
            .sigterm();
    }

    /// Waits for node `name` to exit on its own (after a SIGTERM or a drain), for at
    /// most `within`; then it is no longer running. Panics if it is still up.
    pub async fn await_exit(&mut self, name: &str, within: Duration) -> std::process::ExitStatus {
        let n = self
            .nodes
            .get_mut(name)
            .unwrap_or_else(|| panic!("node {name} is not running"));
        let status = n.proc.await_exit(&format!("node {name}"), within).await;
        self.nodes.remove(name);
        status
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
        // Nodes first, then (as fields drop) the routers, then the workdir.
        self.nodes.clear();
    }
}
