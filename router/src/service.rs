//! The public `weft.v1.Router` service, the group-commit task and the heartbeat reaper.
//!
//! ```text
//! gRPC write ──validate──► Committer (bounded queue) ──one Raft entry per batch──► apply
//!                                                                                    │
//! gRPC Watch ◄── catch_up(from) ◄── Shared (state + bounded recent changes) ◄───────┘
//! ```
//!
//! - Every RPC first asks [`crate::identity::authorize`] whether the caller (from its
//!   certificate) may do it: a node writes only as itself, an admin may drain.
//! - Writes are validated here first, so bad input is refused on any router without a
//!   round trip; `apply` checks again because the log is the authority.
//! - A follower refuses writes with `UNAVAILABLE` and the leader's address in the
//!   `weft-leader` metadata; [`crate::client::RouterClient`] retries there.
//! - Many concurrent writes become few Raft entries: the [`Committer`] drains up to
//!   [`MAX_BATCH`] queued commands into one `Command::Batch` while the previous batch
//!   commits. Its queue is bounded; a full queue answers `RESOURCE_EXHAUSTED`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::Stream;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response as GrpcResponse, Status};
use weft_proto::grpc::{self, router_server::Router as RouterRpc, watch_event::Change as PChange};

use crate::identity::{authorize, caller, Action};
use crate::raft::sm_store::Catchup;
use crate::raft::{RaftNode, WriteError};
use crate::ring::SlotTable;
use crate::state::{
    Change, Command, CommandError, Member, MemberState, MetaState, Response, MAX_BATCH,
};

/// The response metadata key naming the leader's address.
pub const LEADER_HEADER: &str = "weft-leader";
/// Commands waiting for group commit.
pub const COMMIT_QUEUE: usize = 4096;
/// Concurrent Watch streams per router.
pub const MAX_WATCHERS: usize = 4096;
/// Largest request the router decodes (an UpdateInterest of 4096 max-length topics).
pub const MAX_REQUEST_BYTES: usize = 2 * 1024 * 1024;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

type Reply = oneshot::Sender<Result<Response, WriteError>>;

/// Group commit: one task owns proposing; callers queue a command and await its result.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<(Command, Reply)>,
}

impl Committer {
    /// Starts the task; it ends when every `Committer` clone is dropped.
    pub fn spawn(raft: RaftNode) -> Self {
        let (tx, mut rx) = mpsc::channel::<(Command, Reply)>(COMMIT_QUEUE);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(MAX_BATCH);
            while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
                let (cmds, replies): (Vec<Command>, Vec<Reply>) = batch.drain(..).unzip();
                let cmd = if cmds.len() == 1 {
                    cmds.into_iter().next().expect("one")
                } else {
                    Command::Batch(cmds)
                };
                let single = replies.len() == 1;
                match raft.write(cmd).await {
                    Ok(Response::Batch(rs)) if !single => {
                        for (reply, r) in replies.into_iter().zip(rs) {
                            let _ = reply.send(Ok(r));
                        }
                    }
                    Ok(r) => {
                        for reply in replies {
                            let _ = reply.send(Ok(r.clone()));
                        }
                    }
                    Err(e) => {
                        for reply in replies {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                }
            }
        });
        Self { tx }
    }

    /// Queues `cmd` and waits for it to be applied.
    pub async fn submit(&self, cmd: Command) -> Result<Response, Status> {
        let (reply, rx) = oneshot::channel();
        self.tx.try_send((cmd, reply)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                Status::resource_exhausted("router write queue is full; retry later")
            }
            mpsc::error::TrySendError::Closed(_) => Status::unavailable("router stopping"),
        })?;
        match rx.await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(write_error_status(e)),
            Err(_) => Err(Status::unavailable("router stopping")),
        }
    }
}

fn write_error_status(e: WriteError) -> Status {
    match e {
        WriteError::NotLeader(Some((id, addr))) if !addr.is_empty() => {
            let mut s = Status::unavailable(format!(
                "not the leader; the leader is router {id} at {addr}"
            ));
            if let Ok(v) = addr.parse() {
                s.metadata_mut().insert(LEADER_HEADER, v);
            }
            s
        }
        WriteError::NotLeader(_) => Status::unavailable("no leader elected yet; retry"),
        WriteError::Fatal(m) => Status::unavailable(format!("raft unavailable: {m}")),
    }
}

fn command_error_status(e: &CommandError) -> Status {
    match e {
        CommandError::UnknownNode(_) => Status::not_found(e.to_string()),
        CommandError::TooLarge { .. } | CommandError::TooManyMembers(_) => {
            Status::resource_exhausted(e.to_string())
        }
        CommandError::BadNodeId(_) | CommandError::BadTopic { .. } | CommandError::Invalid(_) => {
            Status::invalid_argument(e.to_string())
        }
    }
}

/// The `weft.v1.Router` implementation.
pub struct RouterService {
    raft: RaftNode,
    committer: Committer,
    watchers: Arc<Semaphore>,
}

impl RouterService {
    pub fn new(raft: RaftNode, committer: Committer) -> Self {
        Self {
            raft,
            committer,
            watchers: Arc::new(Semaphore::new(MAX_WATCHERS)),
        }
    }

    async fn write(&self, cmd: Command) -> Result<GrpcResponse<grpc::WriteReply>, Status> {
        cmd.validate().map_err(|e| command_error_status(&e))?;
        // Refuse early on a follower: the caller retries at the leader at once instead
        // of waiting in our queue.
        if !self.raft.is_leader() {
            return Err(write_error_status(WriteError::NotLeader(
                self.raft.leader(),
            )));
        }
        match self.committer.submit(cmd).await? {
            Response::Applied { version } => Ok(GrpcResponse::new(grpc::WriteReply { version })),
            Response::Rejected(e) => Err(command_error_status(&e)),
            Response::Batch(_) => Err(Status::internal("unexpected batch response")),
        }
    }
}

pub(crate) fn member_to_proto(m: &Member) -> grpc::Member {
    grpc::Member {
        id: m.id.clone(),
        addr: m.addr.clone(),
        zone: m.zone.clone(),
        state: match m.state {
            MemberState::Joining => grpc::MemberState::Joining,
            MemberState::Active => grpc::MemberState::Active,
            MemberState::Draining => grpc::MemberState::Draining,
        } as i32,
        last_heartbeat_ms: m.last_heartbeat_ms,
        sessions: m.sessions,
        owned_topics: m.owned_topics,
    }
}

fn slots_to_proto(t: &SlotTable) -> grpc::SlotTable {
    grpc::SlotTable {
        version: t.version,
        owners: t.owners.clone(),
    }
}

fn namespaces_to_proto(ns: &[crate::state::Namespace]) -> Vec<grpc::Namespace> {
    ns.iter()
        .map(|n| grpc::Namespace {
            pattern: n.pattern.clone(),
            policy_json: n.policy_json.clone(),
        })
        .collect()
}

/// The whole state as sent by GetState and Watch snapshots.
pub fn state_to_proto(s: &MetaState, raft: &RaftNode) -> grpc::ClusterState {
    let leader = raft.leader();
    grpc::ClusterState {
        version: s.version(),
        members: s.members().values().map(member_to_proto).collect(),
        slots: Some(slots_to_proto(s.slots())),
        interest: s
            .interest()
            .iter()
            .map(|(topic, nodes)| grpc::Interest {
                topic: topic.clone(),
                nodes: nodes.iter().cloned().collect(),
            })
            .collect(),
        namespaces: namespaces_to_proto(s.namespaces()),
        router_id: raft.id(),
        leader_id: leader.as_ref().map(|l| l.0),
        leader_addr: leader.map(|l| l.1).unwrap_or_default(),
    }
}

fn change_to_proto(version: u64, c: Change) -> grpc::WatchEvent {
    let change = match c {
        Change::Member(m) => PChange::Member(member_to_proto(&m)),
        Change::MemberRemoved(id) => PChange::MemberRemoved(id),
        Change::Slots(t) => PChange::Slots(slots_to_proto(&t)),
        Change::Interest { node, add, remove } => {
            PChange::Interest(grpc::InterestDelta { node, add, remove })
        }
        Change::Namespaces(ns) => PChange::Namespaces(grpc::NamespaceList {
            namespaces: namespaces_to_proto(&ns),
        }),
    };
    grpc::WatchEvent {
        version,
        change: Some(change),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<grpc::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl RouterRpc for RouterService {
    async fn join(
        &self,
        req: Request<grpc::JoinRequest>,
    ) -> Result<GrpcResponse<grpc::WriteReply>, Status> {
        let peer = caller(&req)?;
        let r = req.into_inner();
        authorize(&peer, &Action::Join(&r.id))?;
        self.write(Command::Join {
            id: r.id,
            addr: r.addr,
            zone: r.zone,
            load: r.load,
            at_ms: now_ms(),
        })
        .await
    }

    async fn heartbeat(
        &self,
        req: Request<grpc::HeartbeatRequest>,
    ) -> Result<GrpcResponse<grpc::WriteReply>, Status> {
        let peer = caller(&req)?;
        let r = req.into_inner();
        authorize(&peer, &Action::Heartbeat(&r.id))?;
        self.write(Command::Heartbeat {
            id: r.id,
            at_ms: now_ms(),
            sessions: r.sessions,
            owned_topics: r.owned_topics,
        })
        .await
    }

    async fn leave(
        &self,
        req: Request<grpc::LeaveRequest>,
    ) -> Result<GrpcResponse<grpc::WriteReply>, Status> {
        let peer = caller(&req)?;
        let id = req.into_inner().id;
        authorize(&peer, &Action::Leave(&id))?;
        self.write(Command::Leave { id }).await
    }

    async fn drain(
        &self,
        req: Request<grpc::DrainRequest>,
    ) -> Result<GrpcResponse<grpc::WriteReply>, Status> {
        let peer = caller(&req)?;
        let id = req.into_inner().id;
        authorize(&peer, &Action::Drain(&id))?;
        self.write(Command::MarkDraining { id }).await
    }

    async fn update_interest(
        &self,
        req: Request<grpc::UpdateInterestRequest>,
    ) -> Result<GrpcResponse<grpc::WriteReply>, Status> {
        let peer = caller(&req)?;
        let r = req.into_inner();
        authorize(&peer, &Action::UpdateInterest(&r.node))?;
        self.write(Command::UpdateInterest {
            node: r.node,
            add: r.add,
            remove: r.remove,
        })
        .await
    }

    async fn get_state(
        &self,
        req: Request<grpc::GetStateRequest>,
    ) -> Result<GrpcResponse<grpc::ClusterState>, Status> {
        authorize(&caller(&req)?, &Action::ReadMetadata)?;
        let state = self
            .raft
            .shared()
            .with_state(|s| state_to_proto(s, &self.raft));
        Ok(GrpcResponse::new(state))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<grpc::WatchRequest>,
    ) -> Result<GrpcResponse<WatchStream>, Status> {
        authorize(&caller(&req)?, &Action::ReadMetadata)?;
        let permit = self
            .watchers
            .clone()
            .try_acquire_owned()
            .map_err(|_| Status::resource_exhausted("too many watchers"))?;
        let mut from = req.into_inner().from_version;
        let shared = self.raft.shared().clone();
        let raft = self.raft.clone();
        // Small per-watcher queue: a slow watcher waits here (and falls behind the
        // change buffer, then gets a snapshot); it never slows `apply`.
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let _permit = permit;
            let mut versions = shared.subscribe();
            let mut first = true;
            loop {
                versions.borrow_and_update();
                let catchup = if first && from == 0 {
                    Catchup::Snapshot(shared.state())
                } else {
                    shared.catch_up(from)
                };
                first = false;
                let events = match catchup {
                    Catchup::Snapshot(s) => {
                        from = s.version();
                        vec![grpc::WatchEvent {
                            version: s.version(),
                            change: Some(PChange::Snapshot(state_to_proto(&s, &raft))),
                        }]
                    }
                    Catchup::Changes(cs) => {
                        if let Some((v, _)) = cs.last() {
                            from = *v;
                        }
                        cs.into_iter().map(|(v, c)| change_to_proto(v, c)).collect()
                    }
                };
                for e in events {
                    if tx.send(Ok(e)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    r = versions.changed() => if r.is_err() { return },
                    () = tx.closed() => return,
                }
            }
        });
        Ok(GrpcResponse::new(
            Box::pin(ReceiverStream::new(rx)) as WatchStream
        ))
    }
}

/// Removes members whose heartbeats stopped, in one `RemoveDead` entry per sweep. Runs
/// on every router but acts only while leader, and only after having led for a full
/// timeout (a new leader first gives members time to find it).
pub async fn reap_dead(raft: RaftNode, committer: Committer, timeout: Duration) {
    let mut tick = tokio::time::interval((timeout / 4).max(Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leading_since: Option<tokio::time::Instant> = None;
    loop {
        tick.tick().await;
        if !raft.is_leader() {
            leading_since = None;
            continue;
        }
        let since = *leading_since.get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() < timeout {
            continue;
        }
        let before_ms = now_ms().saturating_sub(timeout.as_millis() as u64);
        let ids = raft.shared().with_state(|s| s.silent_since(before_ms));
        if ids.is_empty() {
            continue;
        }
        tracing::info!(?ids, "removing members whose heartbeats stopped");
        if let Err(e) = committer
            .submit(Command::RemoveDead { ids, before_ms })
            .await
        {
            tracing::warn!(error = %e, "RemoveDead failed; will retry");
        }
    }
}
