//! [`RaftNode`]: the small handle the rest of the crate uses instead of openraft.
//!
//! It exposes what the router needs (write a command, who leads, initialise, the
//! shared state, the peer gRPC service) and maps openraft's errors onto
//! [`WriteError`], so replacing openraft 0.9 touches only `raft/`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, Config, SnapshotPolicy};
use weft_proto::grpc::raft_server::RaftServer;

use super::log_store::{LogError, LogStore};
use super::network::{Network, PeerService, MAX_RAFT_MESSAGE};
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

/// A running Raft member.
#[derive(Clone)]
pub struct RaftNode {
    id: u64,
    raft: openraft::Raft<TypeConfig>,
    shared: Arc<Shared>,
}

impl RaftNode {
    /// Opens the stores under `dir` and starts Raft. It stays a silent member until
    /// [`RaftNode::initialize`] runs here or a leader contacts it.
    pub async fn start(
        id: u64,
        dir: &Path,
        timing: &RaftTiming,
        transport: crate::tls::Transport,
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
        let raft = openraft::Raft::new(id, Arc::new(config), Network::new(transport), log, sm)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        Ok(Self { id, raft, shared })
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

    /// The leader this member knows of: (id, peer address).
    pub fn leader(&self) -> Option<(u64, String)> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let addr = m
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())
            .unwrap_or_default();
        Some((id, addr))
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
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(WriteError::NotLeader(f.leader_id.map(|id| {
                    (id, f.leader_node.map(|n| n.addr).unwrap_or_default())
                })))
            }
            Err(e) => Err(WriteError::Fatal(e.to_string())),
        }
    }

    /// The peer service for this member. Only for trusted cluster peers.
    pub fn peer_service(&self) -> RaftServer<PeerService> {
        RaftServer::new(PeerService {
            raft: self.raft.clone(),
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
