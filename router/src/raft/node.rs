//! [`RaftNode`]: the small handle the rest of the crate uses instead of openraft.
//!
//! It exposes what the router needs (write a command, who leads, initialise, the
//! shared state, the peer gRPC service) and maps openraft's errors onto
//! [`WriteError`], so replacing openraft 0.9 touches only `raft/`.
//!
//! Addresses: the Raft membership holds each router's *Raft* address. Everything
//! this handle says about a leader outside `raft/` ([`RaftNode::leader`], the
//! redirect of a refused write) is its *Router* address, the one nodes dial: the same
//! when Raft shares the Router port, else learnt with `Describe`
//! ([`RaftNode::learn_leader_api`]) and empty until it is known (a node then tries
//! the next router it was given).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, Config, SnapshotPolicy};
use weft_proto::grpc::raft_server::RaftServer;

use super::log_store::{LogError, LogStore};
use super::network::{Described, Network, PeerService, MAX_RAFT_MESSAGE};
use super::sm_store::{Shared, SnapshotError, StateMachineStore};
use super::TypeConfig;
use crate::state::{Command, Response};

/// Raft timing; the defaults fail over within about two seconds.
#[derive(Debug, Clone)]
pub struct RaftTiming {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// A snapshot is taken after this many applied entries; the log before it is
    /// purged, keeping [`RaftTiming::keep_logs`] entries for slow followers.
    pub snapshot_every: u64,
    pub keep_logs: u64,
}

impl Default for RaftTiming {
    fn default() -> Self {
        Self {
            heartbeat_ms: 150,
            election_min_ms: 600,
            election_max_ms: 1200,
            snapshot_every: 1000,
            keep_logs: 200,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("raft config: {0}")]
    Config(String),
    #[error("raft: {0}")]
    Raft(String),
}

/// Why a write was not applied.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// This router is not the leader; retry at the leader (id, address) if known.
    #[error("not the leader")]
    NotLeader(Option<(u64, String)>),
    /// Raft stopped (shutdown or a storage failure).
    #[error("raft unavailable: {0}")]
    Fatal(String),
}

/// How long one `Describe` may take.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between attempts to learn the leader's Router address.
const LEARN_RETRY: Duration = Duration::from_millis(300);

/// A running Raft member.
#[derive(Clone)]
pub struct RaftNode {
    id: u64,
    raft: openraft::Raft<TypeConfig>,
    shared: Arc<Shared>,
    /// A handle on the log store openraft writes (for the committed index).
    log: LogStore,
    network: Network,
    api: Arc<ApiAddrs>,
}

/// This member's Raft figures at one moment (what `/metrics` and the probes show).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftStatus {
    pub term: u64,
    pub leader: Option<u64>,
    pub is_leader: bool,
    pub last_log_index: Option<u64>,
    pub committed_index: Option<u64>,
    pub applied_index: Option<u64>,
    /// Voters in the effective membership.
    pub voters: usize,
    /// False once Raft stopped on a fatal error (or was shut down).
    pub running: bool,
}

/// Where routers' `weft.v1.Router` services answer.
struct ApiAddrs {
    /// Raft has its own listener: Router addresses are learnt, not the Raft ones.
    separate: bool,
    /// id → Router address. std mutex: map operations only, never across an await;
    /// bounded by the routers that ever led or were asked at bootstrap.
    known: Mutex<BTreeMap<u64, String>>,
}

impl ApiAddrs {
    fn get(&self, id: u64) -> Option<String> {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    fn set(&self, id: u64, addr: String) {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, addr);
    }
}

impl RaftNode {
    /// Opens the stores under `dir` and starts Raft. It stays a silent member until
    /// [`RaftNode::initialize`] runs here or a leader contacts it. `peers` are the
    /// configured Raft addresses (dialled first); `own_api` is this router's Router
    /// address when Raft has a listener of its own (`None`: they share one).
    pub async fn start(
        id: u64,
        dir: &Path,
        timing: &RaftTiming,
        transport: crate::tls::Transport,
        peers: BTreeMap<u64, String>,
        own_api: Option<String>,
    ) -> Result<Self, StartError> {
        let config = Config {
            cluster_name: "weft-router".into(),
            heartbeat_interval: timing.heartbeat_ms,
            election_timeout_min: timing.election_min_ms,
            election_timeout_max: timing.election_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(timing.snapshot_every),
            max_in_snapshot_log_to_keep: timing.keep_logs,
            snapshot_max_chunk_size: (MAX_RAFT_MESSAGE / 8) as u64,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StartError::Config(e.to_string()))?;
        let raft_dir = dir.join("raft");
        let log = LogStore::open(&raft_dir)?;
        let sm = StateMachineStore::open(&raft_dir)?;
        let shared = sm.shared();
        let network = Network::new(transport, peers);
        let raft = openraft::Raft::new(id, Arc::new(config), network.clone(), log.clone(), sm)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        let api = Arc::new(ApiAddrs {
            separate: own_api.is_some(),
            known: Mutex::new(own_api.map(|a| (id, a)).into_iter().collect()),
        });
        Ok(Self {
            id,
            raft,
            shared,
            log,
            network,
            api,
        })
    }

    /// The Raft figures now.
    pub fn status(&self) -> RaftStatus {
        let m = self.raft.metrics().borrow().clone();
        RaftStatus {
            term: m.current_term,
            leader: m.current_leader,
            is_leader: m.current_leader == Some(self.id),
            last_log_index: m.last_log_index,
            committed_index: self.log.committed_index(),
            applied_index: m.last_applied.map(|l| l.index),
            voters: m.membership_config.membership().voter_ids().count(),
            running: m.running_state.is_ok(),
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// The applied state and change feed.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// True once this store holds any membership (a restart never re-initialises).
    pub async fn is_initialized(&self) -> bool {
        self.raft.is_initialized().await.unwrap_or(true)
    }

    /// Makes `voters` (id → peer address) the initial membership. Harmless if the
    /// cluster was initialised meanwhile (reported as `Ok(false)`).
    pub async fn initialize(&self, voters: BTreeMap<u64, String>) -> Result<bool, WriteError> {
        let members: BTreeMap<u64, BasicNode> = voters
            .into_iter()
            .map(|(id, addr)| (id, BasicNode { addr }))
            .collect();
        match self.raft.initialize(members).await {
            Ok(()) => Ok(true),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(false),
            Err(e) => Err(WriteError::Fatal(e.to_string())),
        }
    }

    /// The Raft address of router `id`: configured, else the membership's.
    fn raft_addr(&self, id: u64) -> Option<String> {
        if let Some(a) = self.network.peer_addr(id) {
            return Some(a.to_owned());
        }
        let m = self.raft.metrics();
        let m = m.borrow();
        m.membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())
    }

    /// The Router address of router `id` as far as this member knows it (empty when
    /// not known yet).
    fn api_addr(&self, id: u64) -> String {
        if self.api.separate {
            self.api.get(id).unwrap_or_default()
        } else {
            self.raft_addr(id).unwrap_or_default()
        }
    }

    /// The leader this member knows of: (id, Router address — empty while unknown).
    pub fn leader(&self) -> Option<(u64, String)> {
        let id = self.raft.metrics().borrow().current_leader?;
        Some((id, self.api_addr(id)))
    }

    /// Asks router `id` at Raft address `addr` who it is; remembers its Router
    /// address when it answers as `id`.
    pub async fn describe(&self, id: u64, addr: &str) -> Result<Described, String> {
        let d = self.network.describe(addr, DESCRIBE_TIMEOUT).await?;
        if d.id != id {
            return Err(format!(
                "{addr} answers as router {} where router {id} was expected",
                d.id
            ));
        }
        if self.api.separate {
            self.api.set(id, d.api_addr.clone());
        }
        Ok(d)
    }

    /// With a separate Raft listener: whenever another router leads and its Router
    /// address is not known, asks it (`Describe`) until it answers or leads no more.
    /// Returns when Raft stops; does nothing when Raft shares the Router port.
    pub async fn learn_leader_api(self) {
        if !self.api.separate {
            return;
        }
        let mut rx = self.raft.metrics();
        loop {
            let leader = rx.borrow_and_update().current_leader;
            if let Some(l) = leader.filter(|l| *l != self.id && self.api.get(*l).is_none()) {
                match self.raft_addr(l) {
                    Some(addr) => match self.describe(l, &addr).await {
                        Ok(d) => {
                            tracing::debug!(leader = l, api = %d.api_addr, "learnt the leader's router address")
                        }
                        Err(e) => {
                            tracing::debug!(leader = l, error = %e, "cannot learn the leader's router address yet")
                        }
                    },
                    None => tracing::debug!(leader = l, "the leader has no known Raft address"),
                }
                if self.api.get(l).is_none() {
                    tokio::time::sleep(LEARN_RETRY).await;
                    continue;
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.id)
    }

    /// Current term, for logs and tests.
    pub fn term(&self) -> u64 {
        self.raft.metrics().borrow().current_term
    }

    /// Proposes `cmd` and waits until it is committed and applied.
    pub async fn write(&self, cmd: Command) -> Result<Response, WriteError> {
        match self.raft.client_write(cmd).await {
            Ok(r) => Ok(r.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(
                WriteError::NotLeader(f.leader_id.map(|id| (id, self.api_addr(id)))),
            ),
            Err(e) => Err(WriteError::Fatal(e.to_string())),
        }
    }

    /// The peer service for this member, telling `Describe` callers that its Router
    /// service is bound to `api_addr`. Only for trusted cluster peers.
    pub fn peer_service(&self, api_addr: SocketAddr) -> RaftServer<PeerService> {
        RaftServer::new(PeerService {
            raft: self.raft.clone(),
            api_addr,
        })
        .max_decoding_message_size(MAX_RAFT_MESSAGE)
        .max_encoding_message_size(MAX_RAFT_MESSAGE)
    }

    /// Waits until some leader is known, up to `timeout`.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Option<u64> {
        let mut rx = self.raft.metrics();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(l) = rx.borrow_and_update().current_leader {
                return Some(l);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Err(_) | Ok(Err(_)) => return None,
            }
        }
    }

    /// Stops Raft (the stores flush on every write, so nothing is pending).
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}
