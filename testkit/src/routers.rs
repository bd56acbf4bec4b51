//! The one spawner of a `weft-router` group: three real router processes, each on its
//! own loopback address `127.0.0.{base+1..base+3}` (so several groups in one test run
//! never collide), with data dirs, ready files and logs in the harness's [`Workdir`].
//! A group runs mutual TLS with the certificates of a [`Pki`], as in production and as
//! the process cluster does; a test speaks to it as the harness (an admin certificate)
//! or as any node id it names
//! ([`RouterGroup::client_as`], a node certificate for that id). Its routers
//! serve Raft on a `--raft-listen` address of their own, as every group of routers
//! must, which `--peers` names.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use weft_proto::grpc;
use weft_router::identity::Peer;
use weft_router::tls::{Expect, Transport};
use weft_router::RouterClient;

use crate::bin::{self, Proc, Workdir};
use crate::pki::{self, Pki};
use crate::wait::wait_for;

/// A raw `Join` of node `id` at `addr` (no zone, no load), as a test sends it to a
/// router directly.
pub fn join_request(id: &str, addr: &str) -> grpc::JoinRequest {
    grpc::JoinRequest {
        id: id.into(),
        addr: addr.into(),
        zone: String::new(),
        load: 0,
    }
}

/// Three routers, running or not; each keeps its address and data dir across restarts.
pub struct RouterGroup {
    workdir: Workdir,
    base: u8,
    heartbeat_timeout_ms: u64,
    addrs: BTreeMap<u64, String>,
    /// Each router's `--raft-listen` address.
    raft_addrs: BTreeMap<u64, String>,
    procs: BTreeMap<u64, Proc>,
    /// One client per router, kept across its restarts (the address does not change).
    clients: BTreeMap<u64, RouterClient>,
    /// What the harness's clients speak: plaintext, or the admin certificate.
    transport: Transport,
    /// The group's CA and member certificates.
    pki: Arc<Pki>,
}

impl RouterGroup {
    /// Starts routers `1..=3` on `127.0.0.{base+1..base+3}` with the given heartbeat
    /// timeout, each ready (its ready file names the addresses it was given), each
    /// serving Raft on a `--raft-listen` address of its own (on its IP, another port)
    /// that `--peers` names. Whether they agree on a leader yet is
    /// [`RouterGroup::leader`]'s question.
    pub async fn start(
        workdir: &Workdir,
        base: u8,
        heartbeat_timeout_ms: u64,
        pki: Arc<Pki>,
    ) -> Self {
        let ip = |id: u64| format!("127.0.0.{}", base + id as u8);
        // Each router's API and Raft addresses, picked together so they differ.
        let pairs: BTreeMap<u64, Vec<String>> = (1..=3u64)
            .map(|id| (id, bin::free_addrs(&ip(id), 2)))
            .collect();
        let addrs: BTreeMap<u64, String> =
            pairs.iter().map(|(id, p)| (*id, p[0].clone())).collect();
        let raft_addrs: BTreeMap<u64, String> =
            pairs.iter().map(|(id, p)| (*id, p[1].clone())).collect();
        let transport = pki.admin_transport();
        let clients = addrs
            .iter()
            .map(|(id, a)| {
                (
                    *id,
                    RouterClient::with_transport(vec![a.clone()], transport.clone()),
                )
            })
            .collect();
        let mut g = Self {
            workdir: workdir.clone(),
            base,
            heartbeat_timeout_ms,
            addrs,
            raft_addrs,
            procs: BTreeMap::new(),
            clients,
            transport,
            pki,
        };
        for id in 1..=3 {
            g.spawn(id).await;
        }
        g
    }

    /// The IP base the group was started on.
    pub fn base(&self) -> u8 {
        self.base
    }

    /// `1=host:port,2=…`, as `--peers` takes it (the Raft addresses).
    pub fn peers(&self) -> String {
        self.raft_addrs
            .iter()
            .map(|(id, a)| format!("{id}={a}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts router `id` (again) on its address and data dir; waits for its ready file.
    pub async fn spawn(&mut self, id: u64) {
        assert!(!self.procs.contains_key(&id), "router {id} is running");
        let ready = self.workdir.join(format!("router-{id}.ready.json"));
        let _ = std::fs::remove_file(&ready);
        let log = self
            .workdir
            .log(&format!("router {id}"), &format!("router-{id}.log"));
        let out = bin::log_file(&log);
        let mut cmd = bin::command(bin::path("weft-router"));
        let files = self
            .pki
            .member_files(&format!("router-{id}"), &Peer::Router(id.to_string()));
        pki::tls_args(&mut cmd, &files);
        let child = cmd
            .args(["--id", &id.to_string()])
            .args(["--listen", &self.addrs[&id]])
            .args(["--raft-listen", &self.raft_addrs[&id]])
            .args(["--peers", &self.peers()])
            .arg("--data-dir")
            .arg(self.workdir.join(format!("router-{id}")))
            .arg("--ready-file")
            .arg(&ready)
            .args([
                "--heartbeat-timeout-ms",
                &self.heartbeat_timeout_ms.to_string(),
            ])
            .env("RUST_LOG", "info,openraft=warn")
            .stdout(out.try_clone().expect("clone the log handle"))
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn weft-router");
        let mut proc = Proc(child);
        let bound = bin::await_ready_file(&mut proc.0, &ready, &format!("router {id}")).await;
        assert_eq!(bound["listen"], self.addrs[&id], "router {id} address");
        assert_eq!(
            bound["raft_listen"], self.raft_addrs[&id],
            "router {id} Raft address"
        );
        self.procs.insert(id, proc);
    }

    /// SIGKILLs router `id`.
    pub fn kill(&mut self, id: u64) {
        let p = self.procs.remove(&id);
        assert!(p.is_some(), "router {id} is not running");
    }

    /// SIGTERMs router `id` and waits at most `within` for it to exit; its status.
    pub async fn sigterm(&mut self, id: u64, within: Duration) -> ExitStatus {
        let mut p = self
            .procs
            .remove(&id)
            .unwrap_or_else(|| panic!("router {id} is not running"));
        p.sigterm();
        p.await_exit(&format!("router {id}"), within).await
    }

    /// The group's addresses (id → `host:port`), running or not.
    pub fn addrs(&self) -> BTreeMap<u64, String> {
        self.addrs.clone()
    }

    /// The Router address of router `id`.
    pub fn addr(&self, id: u64) -> &str {
        &self.addrs[&id]
    }

    /// The Raft address of router `id`.
    pub fn raft_addr(&self, id: u64) -> &str {
        &self.raft_addrs[&id]
    }

    /// The process id of router `id`, if it runs.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.procs.get(&id).map(Proc::pid)
    }

    /// Sends SIGHUP to router `id`.
    pub fn sighup(&self, id: u64) {
        self.procs
            .get(&id)
            .unwrap_or_else(|| panic!("router {id} is not running"))
            .sighup();
    }

    /// Ids of the routers running now.
    pub fn ids(&self) -> Vec<u64> {
        self.procs.keys().copied().collect()
    }

    /// A client of the routers running now.
    pub fn client(&self) -> RouterClient {
        RouterClient::with_transport(
            self.procs.keys().map(|id| self.addrs[id].clone()).collect(),
            self.transport.clone(),
        )
    }

    /// The client of router `id` alone.
    pub fn client_for(&self, id: u64) -> RouterClient {
        self.clients[&id].clone()
    }

    /// A client of the routers running now that speaks as node `node`: with TLS it
    /// presents a node certificate for that id (issued on first use), as a real node
    /// does, so the routers accept its Join, Heartbeat, Leave and UpdateInterest for
    /// `node` alone.
    pub fn client_as(&self, node: &str) -> RouterClient {
        RouterClient::with_transport(
            self.procs.keys().map(|id| self.addrs[id].clone()).collect(),
            self.node_transport(node),
        )
    }

    /// [`RouterGroup::client_as`] for router `id` alone (no redirects followed).
    pub fn client_of(&self, id: u64, node: &str) -> RouterClient {
        RouterClient::with_transport(vec![self.addrs[&id].clone()], self.node_transport(node))
    }

    /// A raw gRPC channel to router `id` speaking as node `node`, for requests the
    /// [`RouterClient`] would not send as they are.
    pub fn channel_as(&self, id: u64, node: &str) -> tonic::transport::Channel {
        self.node_transport(node)
            .channel(&self.addrs[&id], Expect::Member, Duration::from_secs(5))
            .expect("a channel to the router")
    }

    fn node_transport(&self, node: &str) -> Transport {
        pki::tls(
            self.pki
                .member_files(&format!("node-{node}"), &Peer::Node(node.into())),
        )
    }

    /// Waits until every running router names the same leader, itself running; its id.
    pub async fn leader(&self, within: Duration) -> u64 {
        wait_for(within, "the routers agree on a leader", || async move {
            let mut seen = BTreeMap::new();
            for id in self.procs.keys() {
                let leader = self.clients[id]
                    .get_state()
                    .await
                    .map_err(|e| format!("router {id}: {}", e.message()))?
                    .leader_id;
                seen.insert(*id, leader);
            }
            let leaders: BTreeSet<_> = seen.values().collect();
            match leaders.into_iter().collect::<Vec<_>>()[..] {
                [Some(l)] if self.procs.contains_key(l) => Ok(*l),
                _ => Err(format!("leader per router: {seen:?}")),
            }
        })
        .await
    }

    /// The metadata as the current leader has applied it (a leader within `within`).
    pub async fn state(&self, within: Duration) -> grpc::ClusterState {
        let leader = self.leader(within).await;
        self.clients[&leader]
            .get_state()
            .await
            .unwrap_or_else(|e| panic!("GetState on leader {leader}: {e}"))
    }
}

impl Drop for RouterGroup {
    fn drop(&mut self) {
        // Before the workdir handle goes: a failing test prints complete logs.
        self.procs.clear();
    }
}
