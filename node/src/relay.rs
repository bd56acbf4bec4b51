//! The relay between nodes (DESIGN §5, `docs/cluster-node.md`).
//!
//! # Links
//! One long-lived bidirectional gRPC stream (`weft.v1.Relay/Link`) per pair of nodes,
//! dialled by the node whose id sorts first over one cached tonic `Channel` per peer;
//! both directions carry the same [`RelayBatch`]es. Each side writes through a
//! [`LinkQueue`]: events are bounded by a byte budget and a full queue never blocks
//! the owner — the peer is dropped from that topic's followers and told `Lagged`, and
//! it catches up by following again (history fills the gap, or its sessions get
//! `reset`). Control frames (acks, snapshots) have a larger hard cap; past it the link
//! is closed and both sides start over.
//!
//! # Who may link
//! Links run over the cluster transport: with mutual TLS the dialler checks that the
//! peer's certificate names `weft://node/<peer id>`, and the accepting side takes a
//! link only when the `Hello` names the id in the caller's certificate
//! ([`weft_router::identity`]); anything else is `PERMISSION_DENIED`.
//!
//! # What goes over a link
//! - `Publish` → the owner sequences it and answers `PublishAck` or `RelayError`
//!   (421: not the owner under its ring version; the sender waits for that version and
//!   asks the owner it then names).
//! - `Follow` → the owner registers the link as a follower of the topic and answers
//!   with a `Followed` snapshot *under the topic's lock*; every later event of the
//!   topic goes out after it on the same ordered link, once per interested node
//!   however many subscribers that node has. `Unfollow` ends it.
//! - `Event` → a mirror applies it if it continues its offsets, else re-follows.
//! - `Lagged` → the mirror's link fell behind: re-follow.
//!
//! # Ownership
//! The topic's [`Placement`] on this node is the truth the data path uses; a
//! maintenance task ([`Relay::run`]) brings placements in line with the committed ring
//! whenever it changes (and once a second): a topic the ring gives here becomes owned
//! (new epoch: without a handoff its old state is gone, so its mirrors see `reset`), a
//! topic it gives away becomes a mirror of the new owner, and detached mirrors follow
//! again. A new owner also loads the registry's interest for what it gained and sends
//! `Followed` to those nodes at once, so nobody has to re-subscribe.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};
use weft_proto::grpc::relay_client::RelayClient;
use weft_proto::grpc::relay_frame::Kind;
use weft_proto::grpc::{self, RelayBatch, RelayFrame};

use crate::cluster::Cluster;
use crate::error::ApiError;
use crate::node::Node;
use crate::topic::{
    Applied, Elsewhere, FollowOutcome, Handover, Held, HeldReply, Hold, MirrorSync, Placement,
    Published, Relayed, Topic,
};

/// Bytes of events a link may hold before its peer counts as lagging.
pub const LINK_EVENT_BUDGET: usize = 16 << 20;
/// Bytes of anything a link may hold; past it the link is closed.
const LINK_HARD_CAP: usize = 64 << 20;
/// Largest batch handed to gRPC at once.
const BATCH_FRAMES: usize = 1024;
const BATCH_BYTES: usize = 1 << 20;
/// The history a `Followed` snapshot carries at most.
pub const SNAPSHOT_BYTES: usize = 4 << 20;
/// The history a `Handoff` carries at most (all of it, for any sane namespace).
const HANDOFF_BYTES: usize = 6 << 20;
/// Largest relay message accepted from a peer (a snapshot plus framing).
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;
/// Forwarded publishes waiting for their ack, per peer.
const MAX_PENDING: usize = 65_536;
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a subscribe or read on a mirror waits for the owner's snapshot: longer
/// than an owner can hold a follow while its topic's handoff is on the way.
const SYNC_TIMEOUT: Duration = Duration::from_secs(8);
/// A `Follow` unanswered this long is sent again.
const FOLLOW_RETRY: Duration = Duration::from_secs(2);
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a new owner waits for the old owner's handoff before starting afresh.
pub const HANDOFF_TIMEOUT: Duration = Duration::from_secs(5);

/// What happened to an event pushed onto a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkPush {
    Queued,
    /// Over the event budget: the peer is lagging.
    Full,
    Closed,
}

/// One side's outgoing queue on a link: encoded frames, bounded in bytes.
#[derive(Debug, Default)]
pub struct LinkQueue {
    inner: Mutex<LinkInner>,
    /// Wakes the pump (one waiter: `notify_one` keeps a permit).
    notify: Notify,
    /// Wakes everything watching for the link's end.
    ended: Notify,
}

#[derive(Debug, Default)]
struct LinkInner {
    frames: VecDeque<Bytes>,
    bytes: usize,
    closed: bool,
}

impl LinkQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, LinkInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an event frame unless the link holds its event budget already.
    pub fn push_event(&self, frame: Bytes) -> LinkPush {
        let mut q = self.lock();
        if q.closed {
            return LinkPush::Closed;
        }
        if q.bytes + frame.len() > LINK_EVENT_BUDGET {
            return LinkPush::Full;
        }
        q.bytes += frame.len();
        q.frames.push_back(frame);
        drop(q);
        self.notify.notify_one();
        LinkPush::Queued
    }

    /// Queues a control frame; false if the link is closed or this pushed it past its
    /// hard cap (then it is closed: the peer reconnects and re-follows).
    pub fn push_control(&self, frame: Bytes) -> bool {
        let mut q = self.lock();
        if q.closed {
            return false;
        }
        if q.bytes + frame.len() > LINK_HARD_CAP {
            q.closed = true;
            q.frames.clear();
            drop(q);
            self.notify.notify_one();
            self.ended.notify_waiters();
            warn!("relay link over its hard cap; closing it");
            return false;
        }
        q.bytes += frame.len();
        q.frames.push_back(frame);
        drop(q);
        self.notify.notify_one();
        true
    }

    /// Tells the peer it no longer receives `topic`'s events on this link.
    pub fn push_lagged(&self, topic: &str) {
        self.push_control(encode(Kind::Lagged(grpc::Lagged {
            topic: topic.to_owned(),
        })));
    }

    pub fn close(&self) {
        let mut q = self.lock();
        q.closed = true;
        q.frames.clear();
        q.bytes = 0;
        drop(q);
        self.notify.notify_one();
        self.ended.notify_waiters();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// The oldest queued frame (unit tests look at what a topic queued).
    #[cfg(test)]
    pub fn take_for_test(&self) -> Option<Bytes> {
        let mut q = self.lock();
        let f = q.frames.pop_front()?;
        q.bytes -= f.len();
        Some(f)
    }

    /// Resolves once everything queued has been handed to gRPC (or the link closed).
    async fn flushed(&self) {
        loop {
            let notified = self.ended.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let q = self.lock();
                if q.closed || q.frames.is_empty() {
                    return;
                }
            }
            let _ = tokio::time::timeout(Duration::from_millis(10), notified).await;
        }
    }

    /// The next frames to send (at least one), or `None` once closed.
    async fn next_batch(&self) -> Option<Vec<Bytes>> {
        loop {
            let notified = self.notify.notified();
            {
                let mut q = self.lock();
                if q.closed {
                    return None;
                }
                if !q.frames.is_empty() {
                    let mut out = Vec::with_capacity(q.frames.len().min(BATCH_FRAMES));
                    let mut bytes = 0;
                    while let Some(f) = q.frames.front() {
                        if !out.is_empty()
                            && (out.len() >= BATCH_FRAMES || bytes + f.len() > BATCH_BYTES)
                        {
                            break;
                        }
                        bytes += f.len();
                        out.extend(q.frames.pop_front());
                    }
                    q.bytes -= bytes;
                    return Some(out);
                }
            }
            notified.await;
        }
    }
}

pub fn encode(kind: Kind) -> Bytes {
    Bytes::from(RelayFrame { kind: Some(kind) }.encode_to_vec())
}

pub fn followed_frame(f: grpc::Followed) -> Bytes {
    encode(Kind::Followed(f))
}

pub fn ack_frame(req_id: u64, p: &Published) -> Bytes {
    encode(Kind::PublishAck(grpc::PublishAck {
        req_id,
        epoch: p.epoch.to_string(),
        offset: p.offset,
        duplicate: p.duplicate,
        conflict: p.conflict,
    }))
}

/// A held publish whose topic moved on before its handoff landed: the sender asks
/// the owner its ring names next.
pub fn moved_frame(req_id: u64, topic: &str) -> Bytes {
    encode(Kind::Error(grpc::RelayError {
        req_id,
        topic: topic.to_owned(),
        status: 421,
        message: "the topic moved before its handoff landed".into(),
        ring_version: 0,
    }))
}

/// A slot this node waits to receive by handoff.
#[derive(Debug, Clone)]
struct Awaited {
    from: Arc<str>,
    /// Past this, topics of the slot start afresh.
    until: Instant,
    /// The ring version the wait began at.
    ring: u64,
}

/// A publish could not be forwarded.
#[derive(Debug)]
enum Forward {
    /// The peer does not own the topic under its ring version.
    NotOwner(u64),
    Failed(ApiError),
}

type Pending = oneshot::Sender<Result<Published, Forward>>;

/// A publish sent to its owner, awaiting the ack.
struct Sent {
    peer: Arc<Peer>,
    req_id: u64,
    rx: oneshot::Receiver<Result<Published, Forward>>,
}

/// A started publish ([`Relay::start_publish`]).
pub struct Ticket {
    state: TicketState,
    topic: String,
    data: Bytes,
    kind: Option<Arc<str>>,
    key: Option<String>,
}

enum TicketState {
    Done(Result<Published, ApiError>),
    Sent(Sent),
    /// Waiting behind the topic's incoming handoff.
    Held(oneshot::Receiver<Published>),
    /// Not sent (no link yet): the slow path waits for one.
    Retry,
}

impl Ticket {
    /// Whether the outcome is known without waiting (published here, or refused).
    pub fn is_done(&self) -> bool {
        matches!(self.state, TicketState::Done(_))
    }

    /// The outcome of a done ticket (a standalone node's publishes are all done).
    pub fn into_done(self) -> Result<Published, ApiError> {
        match self.state {
            TicketState::Done(r) => r,
            _ => Err(ApiError::Unavailable {
                message: "this node has no relay to the topic's owner".into(),
                retry_after_s: 1,
            }),
        }
    }

    /// A ticket for a publish that needed no relay.
    pub fn done(result: Result<Published, ApiError>) -> Self {
        Self {
            state: TicketState::Done(result),
            topic: String::new(),
            data: Bytes::new(),
            kind: None,
            key: None,
        }
    }
}

fn unavailable(message: String) -> Forward {
    Forward::Failed(ApiError::Unavailable {
        message,
        retry_after_s: 1,
    })
}

/// Waits (bounded) for a link to `peer` to be up.
async fn wait_for_link(peer: &Peer, timeout: Duration) {
    let mut gen = peer.generation.subscribe();
    let _ = tokio::time::timeout(timeout, async {
        while peer.link().is_none() {
            if gen.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
}

/// A peer node as this node knows it.
struct Peer {
    id: Arc<str>,
    addr: Mutex<String>,
    /// The cached channel to its gRPC address (dialling side only).
    channel: Mutex<Option<(String, Channel)>>,
    link: Mutex<Option<Arc<LinkQueue>>>,
    /// Bumped whenever a link comes up or goes down.
    generation: watch::Sender<u64>,
    pending: Mutex<HashMap<u64, Pending>>,
    dialer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Peer {
    fn link(&self) -> Option<Arc<LinkQueue>> {
        lock(&self.link).clone().filter(|l| !l.is_closed())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct Relay {
    me: Arc<str>,
    cluster: Arc<Cluster>,
    peers: Mutex<HashMap<Arc<str>, Arc<Peer>>>,
    next_req: AtomicU64,
    /// Topics this node owned at the last reconcile (reported in heartbeats).
    owned: AtomicU64,
    reconciling: Mutex<()>,
    /// The slot table the last reconcile acted on.
    prev_slots: Mutex<Arc<weft_router::ring::SlotTable>>,
    ring_moved_at: Mutex<Instant>,
    /// Slots the ring moved here from a live node: slot → (old owner, give up at).
    incoming: Mutex<HashMap<u32, Awaited>>,
    /// The ring version each old owner last said it had handed everything over at.
    done_from: Mutex<HashMap<Arc<str>, u64>>,
    /// The ring version each peer was last told `HandoffDone` for (per link).
    done_sent: Mutex<HashMap<Arc<str>, u64>>,
    /// The newest ring version a peer's handoff frames named: while this node's own
    /// view is older, it moves no topic (it would hand back what it was just given).
    newest_ring_heard: AtomicU64,
    ring_heard_at: Mutex<Instant>,
    /// Wakes the maintenance loop (a link came up).
    kick: Notify,
    /// A mirror waits for a follow: the next tick runs a pass.
    repair: std::sync::atomic::AtomicBool,
    stop: watch::Sender<bool>,
}

impl Relay {
    pub fn new(cluster: Arc<Cluster>) -> Arc<Self> {
        Arc::new(Self {
            me: cluster.node_id.as_str().into(),
            cluster,
            peers: Mutex::default(),
            next_req: AtomicU64::new(1),
            owned: AtomicU64::new(0),
            reconciling: Mutex::default(),
            prev_slots: Mutex::default(),
            ring_moved_at: Mutex::new(Instant::now()),
            incoming: Mutex::default(),
            done_sent: Mutex::default(),
            newest_ring_heard: AtomicU64::new(0),
            ring_heard_at: Mutex::new(Instant::now()),
            done_from: Mutex::default(),
            kick: Notify::new(),
            repair: std::sync::atomic::AtomicBool::new(false),
            stop: watch::channel(false).0,
        })
    }

    /// Topics owned here, as of the last reconcile pass (at most a second old).
    pub fn owned_topics(&self) -> u64 {
        self.owned.load(Ordering::Relaxed)
    }

    fn peer(&self, id: &str) -> Option<Arc<Peer>> {
        lock(&self.peers).get(id).cloned()
    }

    /// Sends a client-token revocation to every linked peer (control frames: never
    /// dropped for lag). A peer that is down misses it; revoke again after it rejoins.
    pub fn broadcast_revoke(&self, target: &crate::auth::revoke::Target, until_s: u64) -> usize {
        let (sub, jti) = match target {
            crate::auth::revoke::Target::Sub(s) => (s.clone(), String::new()),
            crate::auth::revoke::Target::Jti(j) => (String::new(), j.clone()),
        };
        let frame = encode(Kind::Revoke(grpc::Revoke {
            sub,
            jti,
            until: until_s,
        }));
        let peers: Vec<Arc<Peer>> = lock(&self.peers).values().cloned().collect();
        peers
            .iter()
            .filter_map(|p| p.link())
            .filter(|link| link.push_control(frame.clone()))
            .count()
    }

    /// Peers with a live link, for `/v1/cluster`.
    pub fn linked_peers(&self) -> Vec<String> {
        let mut v: Vec<String> = lock(&self.peers)
            .values()
            .filter(|p| p.link().is_some())
            .map(|p| p.id.to_string())
            .collect();
        v.sort();
        v
    }

    /// Keeps peers in line with the membership: new members get a record (and a
    /// dialler, if this node dials them), departed ones are closed.
    fn sync_members(self: &Arc<Self>, node: &Arc<Node>) {
        let members = self.cluster.members();
        let mut peers = lock(&self.peers);
        peers.retain(|id, peer| {
            let keep = members.iter().any(|(m, _)| **m == **id);
            if !keep {
                info!(peer = %id, "peer left the cluster; its link ends when it stops sending");
                if let Some(d) = lock(&peer.dialer).take() {
                    d.abort();
                }
                // What it sent before leaving (a drained node's last handoffs) may
                // still be on the wire: the link is read to its end, or closed after
                // a grace if the peer went silent.
                if let Some(l) = lock(&peer.link).take() {
                    tokio::spawn(async move {
                        tokio::time::sleep(HANDOFF_TIMEOUT).await;
                        l.close();
                    });
                }
                fail_pending(peer, "the owner left the cluster");
            }
            keep
        });
        for (id, addr) in members {
            if *id == *self.me {
                continue;
            }
            let peer = peers
                .entry(id.as_str().into())
                .or_insert_with(|| {
                    Arc::new(Peer {
                        id: id.as_str().into(),
                        addr: Mutex::new(addr.clone()),
                        channel: Mutex::default(),
                        link: Mutex::default(),
                        generation: watch::channel(0).0,
                        pending: Mutex::default(),
                        dialer: Mutex::default(),
                    })
                })
                .clone();
            *lock(&peer.addr) = addr;
            if *self.me < *peer.id {
                let mut dialer = lock(&peer.dialer);
                if dialer.as_ref().is_none_or(|d| d.is_finished()) {
                    *dialer = Some(tokio::spawn(self.clone().dial(node.clone(), peer.clone())));
                }
            }
        }
    }

    /// Keeps a link to `peer` up: dial, run, back off, again.
    async fn dial(self: Arc<Self>, node: Arc<Node>, peer: Arc<Peer>) {
        let mut backoff = Duration::from_millis(50);
        let mut stop = self.stop.subscribe();
        loop {
            if *stop.borrow() {
                return;
            }
            let started = Instant::now();
            match self.connect(&node, &peer).await {
                Ok((queue, inbound)) => {
                    self.run_link(&node, &peer, queue, inbound).await;
                    if started.elapsed() > Duration::from_secs(5) {
                        backoff = Duration::from_millis(50);
                    }
                }
                Err(e) => debug!(peer = %peer.id, error = %e, "relay dial failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    fn channel(&self, peer: &Peer) -> Result<Channel, Status> {
        let addr = lock(&peer.addr).clone();
        let mut cached = lock(&peer.channel);
        if let Some((a, ch)) = cached.as_ref() {
            if *a == addr {
                return Ok(ch.clone());
            }
        }
        let ch = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Status::invalid_argument(format!("peer address {addr}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        // Mutual TLS: the peer must present `weft://node/<its id>`.
        let ch = self
            .cluster
            .transport
            .lazy(ch, weft_router::tls::Expect::Node(peer.id.to_string()));
        *cached = Some((addr, ch.clone()));
        Ok(ch)
    }

    async fn connect(
        &self,
        node: &Node,
        peer: &Peer,
    ) -> Result<(Arc<LinkQueue>, Streaming<RelayBatch>), Status> {
        let channel = self.channel(peer)?;
        let queue = Arc::new(LinkQueue::default());
        queue.push_control(self.hello());
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(pump(queue.clone(), tx, |b| b));
        let mut client = RelayClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let resp = tokio::time::timeout(HELLO_TIMEOUT, client.link(ReceiverStream::new(rx)))
            .await
            .map_err(|_| Status::deadline_exceeded("relay link handshake"));
        let mut inbound = match resp {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(e)) | Err(e) => {
                queue.close();
                return Err(e);
            }
        };
        match read_hello(&mut inbound).await {
            Ok(id) if id == *peer.id => Ok((queue, inbound)),
            Ok(id) => {
                queue.close();
                node.stats.relay.bad_frames.inc();
                Err(Status::failed_precondition(format!(
                    "dialled {} but {id} answered",
                    peer.id
                )))
            }
            Err(e) => {
                queue.close();
                Err(e)
            }
        }
    }

    fn hello(&self) -> Bytes {
        encode(Kind::Hello(grpc::Hello {
            node: self.me.to_string(),
            ring_version: self.cluster.ring_version(),
        }))
    }

    /// Serves one link until either side ends it.
    async fn run_link(
        self: &Arc<Self>,
        node: &Arc<Node>,
        peer: &Arc<Peer>,
        queue: Arc<LinkQueue>,
        mut inbound: Streaming<RelayBatch>,
    ) {
        self.link_up(node, peer, &queue);
        let mut stop = self.stop.subscribe();
        loop {
            let msg = tokio::select! {
                m = inbound.message() => m,
                _ = stop.wait_for(|s| *s) => break,
                _ = closed(&queue) => break,
            };
            match msg {
                Ok(Some(batch)) => {
                    if let Err(e) = self.handle_batch(node, peer, &queue, batch) {
                        node.stats.relay.bad_frames.inc();
                        warn!(peer = %peer.id, error = %e, "bad relay frame; closing the link");
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    if matches!(
                        e.code(),
                        tonic::Code::ResourceExhausted
                            | tonic::Code::OutOfRange
                            | tonic::Code::Internal
                    ) {
                        // Oversized or undecodable at the gRPC layer.
                        node.stats.relay.bad_frames.inc();
                        warn!(peer = %peer.id, error = %e, "bad relay message; link closed");
                    } else {
                        debug!(peer = %peer.id, error = %e, "relay link ended");
                    }
                    break;
                }
            }
        }
        queue.close();
        self.link_down(node, peer, &queue);
    }

    fn link_up(&self, node: &Node, peer: &Arc<Peer>, queue: &Arc<LinkQueue>) {
        if let Some(old) = lock(&peer.link).replace(queue.clone()) {
            old.close();
        }
        node.stats.relay.links.up();
        peer.generation.send_modify(|g| *g += 1);
        // A new link hears `HandoffDone` again.
        lock(&self.done_sent).remove(&peer.id);
        info!(peer = %peer.id, "relay link up");
        self.kick.notify_one();
        // Mirrors of this peer's topics follow it again on the new link.
        for t in node.registry.all_topics() {
            if let Placement::Mirror { owner, sync, .. } = t.placement() {
                if owner == peer.id && sync != MirrorSync::Following {
                    self.refollow(&t, &owner);
                }
            }
        }
    }

    fn link_down(&self, node: &Node, peer: &Arc<Peer>, queue: &Arc<LinkQueue>) {
        {
            let mut link = lock(&peer.link);
            if link.as_ref().is_some_and(|l| Arc::ptr_eq(l, queue)) {
                *link = None;
            }
        }
        node.stats.relay.links.down();
        peer.generation.send_modify(|g| *g += 1);
        fail_pending(
            peer,
            "the link to the topic's owner was lost; the publish may not have been applied",
        );
        self.repair.store(true, Ordering::Relaxed);
        // What this link delivered can no longer be trusted to continue: detach.
        for t in node.registry.all_topics() {
            if let Placement::Mirror { owner, .. } = t.placement() {
                if owner == peer.id {
                    t.set_mirror_sync(MirrorSync::Detached);
                }
            }
        }
        info!(peer = %peer.id, "relay link down");
    }

    fn handle_batch(
        &self,
        node: &Node,
        peer: &Arc<Peer>,
        queue: &Arc<LinkQueue>,
        batch: RelayBatch,
    ) -> Result<(), String> {
        for raw in batch.frames {
            let frame = RelayFrame::decode(raw).map_err(|e| format!("undecodable frame: {e}"))?;
            let kind = frame.kind.ok_or("empty frame")?;
            self.handle_frame(node, peer, queue, kind)?;
        }
        Ok(())
    }

    fn handle_frame(
        &self,
        node: &Node,
        peer: &Arc<Peer>,
        queue: &Arc<LinkQueue>,
        kind: Kind,
    ) -> Result<(), String> {
        match kind {
            Kind::Hello(_) => Ok(()),
            Kind::Publish(p) => {
                self.serve_publish(node, queue, p);
                Ok(())
            }
            Kind::PublishAck(a) => {
                let epoch = a.epoch.as_str();
                if !weft_proto::cursor::valid_epoch(epoch) {
                    return Err(format!("ack with invalid epoch {epoch:?}"));
                }
                self.resolve(
                    peer,
                    a.req_id,
                    Ok(Published {
                        epoch: epoch.into(),
                        offset: a.offset,
                        duplicate: a.duplicate,
                        conflict: a.conflict,
                    }),
                );
                Ok(())
            }
            Kind::Error(e) => {
                if e.req_id != 0 {
                    let err = if e.status == 421 {
                        Forward::NotOwner(e.ring_version)
                    } else {
                        Forward::Failed(api_error(e.status, e.message))
                    };
                    self.resolve(peer, e.req_id, Err(err));
                } else if let Some(t) = node.registry.get(&e.topic) {
                    // A refused follow: the repair pass asks again (the owner's ring
                    // may be behind or ahead of ours).
                    debug!(topic = %e.topic, status = e.status, "follow refused");
                    if matches!(t.placement(), Placement::Mirror { owner, .. } if owner == peer.id)
                    {
                        t.set_mirror_sync(MirrorSync::Detached);
                    }
                }
                Ok(())
            }
            Kind::Follow(f) => {
                weft_proto::validate_topic(&f.topic).map_err(|e| format!("follow: {e}"))?;
                self.serve_follow(node, peer, queue, &f.topic);
                Ok(())
            }
            Kind::Unfollow(u) => {
                if let Some(t) = node.registry.get(&u.topic) {
                    t.unfollow(&peer.id);
                }
                Ok(())
            }
            Kind::Followed(f) => self.apply_followed(node, peer, queue, f),
            Kind::Event(ev) => {
                weft_proto::validate_topic(&ev.topic).map_err(|e| format!("event: {e}"))?;
                let topic = ev.topic.clone();
                let relayed = relayed(node, ev)?;
                let Some(t) = node.registry.get(&topic) else {
                    queue.push_control(encode(Kind::Unfollow(grpc::Unfollow { topic })));
                    return Ok(());
                };
                match t.apply_relayed(&peer.id, relayed, &node.stats) {
                    Applied::Delivered | Applied::Stale | Applied::NotFollowing => {}
                    Applied::Gap => {
                        debug!(topic = %topic, "relay gap; following again");
                        self.refollow(&t, &peer.id);
                    }
                }
                Ok(())
            }
            Kind::Handoff(h) => self.apply_handoff(node, peer, h),
            Kind::HandoffDone(d) => {
                self.handoff_done(node, &peer.id, d.ring_version);
                Ok(())
            }
            Kind::Revoke(r) => {
                // Peers are members (mutual TLS, identity checked at Hello).
                let target = match (r.sub.is_empty(), r.jti.is_empty()) {
                    (false, true) if r.sub.len() <= 256 => crate::auth::revoke::Target::Sub(r.sub),
                    (true, false) if r.jti.len() <= 256 => crate::auth::revoke::Target::Jti(r.jti),
                    _ => return Err("revoke needs exactly one of sub or jti".into()),
                };
                let until = std::time::UNIX_EPOCH
                    .checked_add(std::time::Duration::from_secs(r.until))
                    .ok_or("revoke: `until` out of range")?;
                // An `until` already past is a no-op, not a broken link.
                let _ = node.auth.revoke(target, until);
                Ok(())
            }
            Kind::Lagged(l) => {
                if let Some(t) = node.registry.get(&l.topic) {
                    if matches!(t.placement(), Placement::Mirror { owner, .. } if owner == peer.id)
                    {
                        t.set_mirror_sync(MirrorSync::Detached);
                        self.refollow(&t, &peer.id);
                    }
                }
                Ok(())
            }
        }
    }

    fn resolve(&self, peer: &Peer, req_id: u64, result: Result<Published, Forward>) {
        if let Some(tx) = lock(&peer.pending).remove(&req_id) {
            let _ = tx.send(result);
        }
    }

    /// Owner side of a forwarded publish: answered now, or (topic arriving by
    /// handoff) held and answered when it lands.
    fn serve_publish(&self, node: &Node, queue: &Arc<LinkQueue>, p: grpc::RelayPublish) {
        let req_id = p.req_id;
        let topic = p.topic.clone();
        let reply = match self.publish_here(node, queue, p) {
            Ok(None) => return,
            Ok(Some(published)) => {
                return {
                    queue.push_control(ack_frame(req_id, &published));
                }
            }
            Err(Forward::NotOwner(v)) => grpc::RelayError {
                req_id,
                topic,
                status: 421,
                message: "not the owner of this topic".into(),
                ring_version: v,
            },
            Err(Forward::Failed(e)) => {
                if e.code() == 400 || e.code() == 413 {
                    node.stats.relay.bad_frames.inc();
                }
                grpc::RelayError {
                    req_id,
                    topic,
                    status: e.code().into(),
                    message: e.to_string(),
                    ring_version: self.cluster.ring_version(),
                }
            }
        };
        queue.push_control(encode(Kind::Error(reply)));
    }

    fn publish_here(
        &self,
        node: &Node,
        queue: &Arc<LinkQueue>,
        p: grpc::RelayPublish,
    ) -> Result<Option<Published>, Forward> {
        weft_proto::validate_topic(&p.topic)
            .map_err(|e| Forward::Failed(ApiError::bad(format!("invalid topic: {e}"))))?;
        let kind = crate::http::event_kind(p.r#type.as_deref()).map_err(Forward::Failed)?;
        let data =
            crate::http::event_data(&p.data, &node.config.limits).map_err(Forward::Failed)?;
        let key = match p.idempotency_key.as_deref() {
            Some(k) if k.is_empty() || k.len() > 255 => {
                return Err(Forward::Failed(ApiError::bad(
                    "Idempotency-Key must be 1-255 characters",
                )))
            }
            k => k,
        };
        let version = self.cluster.ring_version();
        if self.cluster.owner_of(&p.topic).as_deref() != Some(&*self.me) {
            return Err(Forward::NotOwner(version));
        }
        let window = node.idempotency_window();
        let mut held = None;
        let r = node.registry.with_topic(&p.topic, |t| {
            let r = t.publish(data.clone(), kind.clone(), key, window, &node.stats)?;
            if matches!(r, Err(Elsewhere::Moving)) {
                let h = Held::Publish {
                    data: data.clone(),
                    kind: kind.clone(),
                    key: key.map(Into::into),
                    reply: HeldReply::Link {
                        link: queue.clone(),
                        req_id: p.req_id,
                    },
                };
                held = Some(t.hold(h));
            }
            Ok(r)
        });
        match (r, held) {
            (Ok(Ok(published)), _) => Ok(Some(published)),
            (Ok(Err(_)), Some(Hold::Held)) => Ok(None),
            (Ok(Err(_)), Some(Hold::Full(_))) => Err(unavailable(
                "too many publishes wait for this topic's handoff".into(),
            )),
            // Not converted yet, or the handoff landed meanwhile: the sender retries.
            (Ok(Err(_)), _) => Err(Forward::NotOwner(version)),
            (Err(e), _) => Err(Forward::Failed(e)),
        }
    }

    /// Owner side of `Follow`: register and snapshot, or say who owns it.
    fn serve_follow(&self, node: &Node, peer: &Arc<Peer>, queue: &Arc<LinkQueue>, topic: &str) {
        let version = self.cluster.ring_version();
        let refuse = |status: u32, message: String| {
            queue.push_control(encode(Kind::Error(grpc::RelayError {
                req_id: 0,
                topic: topic.to_owned(),
                status,
                message,
                ring_version: version,
            })));
        };
        if self.cluster.owner_of(topic).as_deref() != Some(&*self.me) {
            return refuse(421, "not the owner of this topic".into());
        }
        match node
            .registry
            .with_topic(topic, |t| t.follow(&peer.id, queue, SNAPSHOT_BYTES))
        {
            Ok(Ok(())) => {}
            Ok(Err(_)) => refuse(421, "ownership of this topic is moving here".into()),
            Err(e) => refuse(e.code().into(), e.to_string()),
        }
    }

    /// Mirror side of `Followed`.
    fn apply_followed(
        &self,
        node: &Node,
        peer: &Arc<Peer>,
        queue: &LinkQueue,
        f: grpc::Followed,
    ) -> Result<(), String> {
        let history = checked_history(node, &f.topic, &f.epoch, f.last_offset, f.history)?;
        let unfollow = || {
            queue.push_control(encode(Kind::Unfollow(grpc::Unfollow {
                topic: f.topic.clone(),
            })));
        };
        let Some(t) = node.registry.get(&f.topic) else {
            unfollow();
            return Ok(());
        };
        let switch = self.cluster.owner_of(&f.topic).as_deref() == Some(&*peer.id);
        match t.apply_followed(
            &peer.id,
            switch,
            &f.epoch,
            f.last_offset,
            history,
            &node.stats,
        ) {
            FollowOutcome::NotMine => unfollow(),
            FollowOutcome::Reset => {
                info!(topic = %f.topic, owner = %peer.id, "mirror could not continue its history; sessions told reset")
            }
            FollowOutcome::Adopted | FollowOutcome::CaughtUp(_) => {}
        }
        Ok(())
    }

    /// New owner side of `Handoff`.
    fn apply_handoff(&self, node: &Node, peer: &Arc<Peer>, h: grpc::Handoff) -> Result<(), String> {
        let topic = h.topic.clone();
        self.heard_of_ring(h.ring_version);
        let history = checked_history(node, &h.topic, &h.epoch, h.last_offset, h.history)?;
        let mut idempotency = Vec::with_capacity(h.idempotency.len());
        for e in h.idempotency {
            if e.key.is_empty() || e.key.len() > 255 || e.offset == 0 || e.offset > h.last_offset {
                return Err("handoff: invalid idempotency entry".into());
            }
            idempotency.push((e.key, e.offset, Duration::from_millis(e.age_ms)));
        }
        let handover = Handover {
            epoch: h.epoch,
            last_offset: h.last_offset,
            history,
            idempotency,
        };
        let window = node.idempotency_window();
        // The topic is created if this node has none (no local interest yet): as a
        // mirror of the sender or waiting for it, either of which takes the handoff.
        let t = node
            .registry
            .get_or_create(&topic)
            .map_err(|e| e.to_string());
        match t {
            Ok(t) if t.apply_handoff(&peer.id, handover, window, &node.stats) => {
                debug!(topic = %topic, from = %peer.id, "handoff applied");
            }
            Ok(_) => {
                warn!(topic = %topic, from = %peer.id, "handoff refused: the topic already has events here")
            }
            Err(e) => warn!(topic = %topic, error = %e, "handoff dropped"),
        }
        Ok(())
    }

    /// `from` has handed over everything it had for this node: topics still waiting
    /// on it were not there, and start afresh (nothing of theirs existed to lose).
    fn handoff_done(&self, node: &Node, from: &str, ring_version: u64) {
        self.heard_of_ring(ring_version);
        {
            let mut done = lock(&self.done_from);
            let v = done.entry(from.into()).or_insert(0);
            *v = (*v).max(ring_version);
        }
        if ring_version > self.cluster.ring_version() {
            // This node's ring is behind the sender's: what it waits for is settled
            // by the next reconcile, under the newer ring.
            return;
        }
        // Only waits that began at this ring version or before are settled by it: a
        // move at a newer ring is the sender's to hand over still.
        let mut settled = std::collections::HashSet::new();
        lock(&self.incoming).retain(|slot, a| {
            let done = &*a.from == from && a.ring <= ring_version;
            if done {
                settled.insert(*slot);
            }
            !done
        });
        if settled.is_empty() {
            info!(from, ring_version, "handoff complete (nothing was awaited)");
            return;
        }
        for t in node.registry.all_topics() {
            if matches!(t.placement(), Placement::Receiving { from: f, .. } if &*f == from)
                && settled.contains(&weft_router::ring::slot_of(&t.name))
            {
                t.become_owner(
                    node.registry.mint_epoch(),
                    node.idempotency_window(),
                    &node.stats,
                );
            }
        }
        info!(from, ring_version, "handoff complete");
    }

    /// Notes a ring version a peer acted under. A version that never arrives here
    /// (a confused or hostile peer) stops holding placements after HANDOFF_TIMEOUT.
    fn heard_of_ring(&self, version: u64) {
        if self.newest_ring_heard.fetch_max(version, Ordering::Relaxed) < version {
            *lock(&self.ring_heard_at) = Instant::now();
        }
    }

    /// Background repair: follows a mirror again only if sessions here watch it (a
    /// mirror made by a forwarded publish, or one whose readers are gone, is left
    /// alone; a read follows it on demand), and asks the next pass to check on it.
    fn refollow(&self, topic: &Topic, owner: &str) {
        if topic.subscriber_count() > 0 {
            self.request_follow(topic, owner);
            self.repair.store(true, Ordering::Relaxed);
        }
    }

    /// Sends `Follow` for a mirror to its owner, if a link is up.
    fn request_follow(&self, topic: &Topic, owner: &str) {
        let Some(link) = self.peer(owner).and_then(|p| p.link()) else {
            return;
        };
        let frame = encode(Kind::Follow(grpc::Follow {
            topic: topic.name.to_string(),
            ring_version: self.cluster.ring_version(),
        }));
        if link.push_control(frame) {
            topic.set_mirror_sync(MirrorSync::Requested(Instant::now()));
        }
    }

    /// Tells owners to stop relaying topics this node forgot.
    pub fn unfollow_all(&self, gone: Vec<(Arc<str>, Arc<str>)>) {
        for (topic, owner) in gone {
            if let Some(link) = self.peer(&owner).and_then(|p| p.link()) {
                link.push_control(encode(Kind::Unfollow(grpc::Unfollow {
                    topic: topic.to_string(),
                })));
            }
        }
    }

    /// Waits (bounded) until a mirror holds its owner's state, following it if
    /// needed, so a subscribe or read on this node sees exactly what the owner has.
    ///
    /// With `since`, a mirror also waits (bounded) until it has caught up with that
    /// cursor: a client resuming here may have seen newer events on another node.
    pub async fn ensure_synced(
        &self,
        topic: &Arc<Topic>,
        since: Option<&weft_proto::Cursor>,
    ) -> Result<(), ApiError> {
        let deadline = tokio::time::Instant::now() + SYNC_TIMEOUT;
        let started = Instant::now();
        let mut refollowed = false;
        loop {
            let notified = topic.synced.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let changed = topic.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let owner = match topic.placement() {
                Placement::Owner => return Ok(()),
                Placement::Mirror {
                    sync: MirrorSync::Following,
                    fresh: false,
                    owner,
                } => {
                    topic.touch();
                    if !since.is_some_and(|c| topic.is_behind(c)) {
                        return Ok(());
                    }
                    // Behind the client's cursor: the stream is on its way; if it
                    // does not come, a fresh snapshot will.
                    if !refollowed && started.elapsed() > Duration::from_secs(1) {
                        refollowed = true;
                        self.request_follow(topic, &owner);
                    }
                    owner
                }
                Placement::Mirror { owner, sync, .. } => {
                    let resend = match sync {
                        MirrorSync::Requested(at) => at.elapsed() > FOLLOW_RETRY,
                        _ => true,
                    };
                    if resend {
                        self.request_follow(topic, &owner);
                    }
                    owner
                }
                // The handoff lands within HANDOFF_TIMEOUT, or the topic starts afresh.
                Placement::Receiving { from, .. } => from,
            };
            if topic.is_dead() {
                return Err(ApiError::Unavailable {
                    message: "topic is being recycled; retry".into(),
                    retry_after_s: 1,
                });
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(ApiError::Unavailable {
                    message: format!("the owner of this topic ({owner}) is not reachable"),
                    retry_after_s: 2,
                });
            }
            let wait = (deadline - now).min(Duration::from_millis(200));
            let _ = tokio::time::timeout(wait, async {
                tokio::select! {
                    _ = notified => {}
                    _ = changed => {}
                }
            })
            .await;
        }
    }

    /// Starts a publish without waiting: sequenced here if this node owns the topic,
    /// else pushed onto the owner's link at once, so publishes started in order on one
    /// link are sequenced in that order. [`Relay::finish`] waits for the outcome.
    pub fn start_publish(
        &self,
        node: &Node,
        topic: &str,
        data: Bytes,
        kind: Option<Arc<str>>,
        key: Option<&str>,
    ) -> Ticket {
        let window = node.idempotency_window();
        let state = match node.registry.with_topic(topic, |t| {
            t.publish(data.clone(), kind.clone(), key, window, &node.stats)
        }) {
            Err(e) => TicketState::Done(Err(e)),
            Ok(Ok(p)) => TicketState::Done(Ok(p)),
            Ok(Err(Elsewhere::Owner(owner))) => {
                match self.send_publish(node, &owner, topic, &data, &kind, key) {
                    Ok(sent) => TicketState::Sent(sent),
                    Err(_) => TicketState::Retry,
                }
            }
            Ok(Err(Elsewhere::Moving)) => match self.hold_local(node, topic, &data, &kind, key) {
                Some(rx) => TicketState::Held(rx),
                None => TicketState::Retry,
            },
        };
        Ticket {
            state,
            topic: topic.to_owned(),
            data,
            kind,
            key: key.map(str::to_owned),
        }
    }

    /// Waits for a started publish; a refused or unsent one takes the slow path.
    pub async fn finish(&self, node: &Node, ticket: Ticket) -> Result<Published, ApiError> {
        let Ticket {
            state,
            topic,
            data,
            kind,
            key,
        } = ticket;
        match state {
            TicketState::Done(r) => return r,
            TicketState::Sent(sent) => match self.await_ack(sent).await {
                Ok(p) => return Ok(p),
                Err(Forward::Failed(e)) => return Err(e),
                Err(Forward::NotOwner(v)) => self.catch_up_ring(node, v).await,
            },
            TicketState::Held(rx) => {
                if let Ok(Ok(p)) = tokio::time::timeout(HANDOFF_TIMEOUT * 2, rx).await {
                    return Ok(p);
                }
            }
            TicketState::Retry => {}
        }
        self.publish(node, &topic, data, kind, key.as_deref()).await
    }

    /// Queues a publish made here behind the topic's incoming handoff; `None` if the
    /// topic is no longer waiting for one (publish again) or too much waits.
    fn hold_local(
        &self,
        node: &Node,
        topic: &str,
        data: &Bytes,
        kind: &Option<Arc<str>>,
        key: Option<&str>,
    ) -> Option<oneshot::Receiver<Published>> {
        let t = node.registry.get(topic)?;
        let (tx, rx) = oneshot::channel();
        let h = Held::Publish {
            data: data.clone(),
            kind: kind.clone(),
            key: key.map(Into::into),
            reply: HeldReply::Local(tx),
        };
        match t.hold(h) {
            Hold::Held => Some(rx),
            Hold::NotMoving(_) | Hold::Full(_) => None,
        }
    }

    async fn catch_up_ring(&self, node: &Node, peer_version: u64) {
        let v = peer_version.max(self.cluster.ring_version() + 1);
        self.cluster.wait_ring(v, Duration::from_secs(2)).await;
        self.reconcile(node);
    }

    /// Publishes on whichever node owns the topic, waiting (bounded) for a link to
    /// the owner. A 421 from a peer (its ring differs) waits for that ring version and
    /// asks the owner it then names.
    async fn publish(
        &self,
        node: &Node,
        topic: &str,
        data: Bytes,
        kind: Option<Arc<str>>,
        key: Option<&str>,
    ) -> Result<Published, ApiError> {
        let window = node.idempotency_window();
        for _ in 0..6 {
            let here = node.registry.with_topic(topic, |t| {
                t.publish(data.clone(), kind.clone(), key, window, &node.stats)
            })?;
            let owner = match here {
                Ok(published) => return Ok(published),
                Err(Elsewhere::Owner(owner)) => owner,
                Err(Elsewhere::Moving) => {
                    match self.hold_local(node, topic, &data, &kind, key) {
                        Some(rx) => {
                            if let Ok(Ok(p)) = tokio::time::timeout(HANDOFF_TIMEOUT * 2, rx).await {
                                return Ok(p);
                            }
                        }
                        None => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                    continue;
                }
            };
            if let Some(peer) = self.peer(&owner) {
                wait_for_link(&peer, Duration::from_secs(2)).await;
            }
            let sent = match self.send_publish(node, &owner, topic, &data, &kind, key) {
                Ok(sent) => self.await_ack(sent).await,
                Err(e) => Err(e),
            };
            match sent {
                Ok(p) => return Ok(p),
                Err(Forward::Failed(e)) => return Err(e),
                Err(Forward::NotOwner(v)) => self.catch_up_ring(node, v).await,
            }
        }
        Err(ApiError::Unavailable {
            message: "the topic's ownership is moving; retry".into(),
            retry_after_s: 1,
        })
    }

    /// Pushes a publish onto the owner's link (no waiting).
    fn send_publish(
        &self,
        node: &Node,
        owner: &str,
        topic: &str,
        data: &Bytes,
        kind: &Option<Arc<str>>,
        key: Option<&str>,
    ) -> Result<Sent, Forward> {
        let peer = self.peer(owner).ok_or_else(|| {
            unavailable(format!("the owner of this topic ({owner}) is unknown here"))
        })?;
        let link = peer
            .link()
            .ok_or_else(|| unavailable(format!("no link to the owner of this topic ({owner})")))?;
        let req_id = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = lock(&peer.pending);
            if pending.len() >= MAX_PENDING {
                return Err(unavailable(
                    "too many publishes in flight to the owner".into(),
                ));
            }
            pending.insert(req_id, tx);
        }
        let frame = encode(Kind::Publish(grpc::RelayPublish {
            req_id,
            topic: topic.to_owned(),
            data: data.clone(),
            r#type: kind.as_deref().map(str::to_owned),
            idempotency_key: key.map(str::to_owned),
            ring_version: self.cluster.ring_version(),
        }));
        if !link.push_control(frame) {
            lock(&peer.pending).remove(&req_id);
            return Err(unavailable("the link to the owner closed".into()));
        }
        node.stats.relay.publishes_forwarded.inc();
        Ok(Sent { peer, req_id, rx })
    }

    async fn await_ack(&self, sent: Sent) -> Result<Published, Forward> {
        match tokio::time::timeout(PUBLISH_TIMEOUT, sent.rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(unavailable("the link to the owner closed".into())),
            Err(_) => {
                lock(&sent.peer.pending).remove(&sent.req_id);
                Err(unavailable(
                    "the owner did not answer in time; the publish may not have been applied"
                        .into(),
                ))
            }
        }
    }

    /// Brings every topic's placement in line with the committed ring, and asks
    /// detached mirrors' owners again. On a ring change:
    /// - topics moving away are handed to their new owner (state first, then this node
    ///   mirrors them), or, without a link to it yet, kept (bounded) until there is one;
    /// - slots coming here from a live old owner wait for its handoff; from a dead one
    ///   (or after [`HANDOFF_TIMEOUT`]) their topics start a new epoch.
    pub fn reconcile(&self, node: &Node) {
        let _one_at_a_time = lock(&self.reconciling);
        let slots = self.cluster.slots();
        let mut prev = std::mem::replace(&mut *lock(&self.prev_slots), slots.clone());
        if prev.version == 0 {
            // A node that just started (or restarted) has no earlier view: the ring
            // before it joined was the same members without it, so the slots it owns
            // now were theirs, and they will hand them over.
            let others: std::collections::BTreeSet<&str> = slots
                .owners
                .iter()
                .map(String::as_str)
                .filter(|o| *o != &*self.me)
                .collect();
            prev = Arc::new(weft_router::ring::SlotTable::compute(0, others));
        }
        let now = Instant::now();
        let members: std::collections::HashSet<String> = self
            .cluster
            .members()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        if prev.version != slots.version {
            *lock(&self.ring_moved_at) = now;
            let mut incoming = lock(&self.incoming);
            for (slot, owner) in slots.owners.iter().enumerate() {
                let old = prev.owners.get(slot);
                let slot = slot as u32;
                if **owner == *self.me {
                    // The old owner may have said it is done before this node saw the ring.
                    let done = |o: &str| {
                        lock(&self.done_from)
                            .get(o)
                            .is_some_and(|v| *v >= slots.version)
                    };
                    match old {
                        Some(old) if **old != *self.me && members.contains(old) && !done(old) => {
                            incoming.insert(
                                slot,
                                Awaited {
                                    from: old.as_str().into(),
                                    until: now + HANDOFF_TIMEOUT,
                                    ring: slots.version,
                                },
                            );
                        }
                        _ => {
                            incoming.remove(&slot);
                        }
                    }
                } else {
                    incoming.remove(&slot);
                }
            }
        }
        {
            let mut incoming = lock(&self.incoming);
            if prev.version != slots.version {
                let mut from: HashMap<&str, usize> = HashMap::new();
                for a in incoming.values() {
                    *from.entry(&a.from).or_default() += 1;
                }
                info!(
                    ring = slots.version,
                    prev = prev.version,
                    ?from,
                    "ring moved; slots awaiting handoff"
                );
            }
            incoming.retain(|_, a| a.until > now);
        }
        let stale = slots.version < self.newest_ring_heard.load(Ordering::Relaxed)
            && lock(&self.ring_heard_at).elapsed() < HANDOFF_TIMEOUT;
        if stale {
            debug!(
                ring = slots.version,
                "a peer has handed over under a newer ring; placements wait for it"
            );
        }
        let link_grace = lock(&self.ring_moved_at).elapsed() < HANDOFF_TIMEOUT;
        let window = node.idempotency_window();
        let mut waiting_for_link = std::collections::HashSet::new();
        let mut owned = 0;
        for t in node.registry.all_topics() {
            let Some(owner) = slots.owner(&t.name) else {
                continue;
            };
            let here = owner == &*self.me;
            let placement = t.placement();
            if stale {
                match placement {
                    Placement::Owner | Placement::Receiving { .. } => owned += 1,
                    Placement::Mirror {
                        owner: held,
                        sync: MirrorSync::Detached,
                        ..
                    } => self.refollow(&t, &held),
                    Placement::Mirror { .. } => {}
                }
                continue;
            }
            match placement {
                Placement::Owner if here => owned += 1,
                Placement::Owner => {
                    let to: Arc<str> = owner.into();
                    match self.peer(owner).and_then(|p| p.link()) {
                        Some(link) => {
                            if let Some(followers) =
                                t.hand_off(&to, &link, slots.version, HANDOFF_BYTES)
                            {
                                debug!(topic = %t.name, to = owner, "handed off");
                                for l in followers {
                                    l.push_lagged(&t.name);
                                }
                                self.refollow(&t, owner);
                            }
                        }
                        None if link_grace && members.contains(owner) => {
                            // Keep sequencing it until the link to its new owner is up.
                            waiting_for_link.insert(to);
                            owned += 1;
                        }
                        None => {
                            warn!(topic = %t.name, to = owner, "no link to the new owner: its state is not handed over");
                            for l in t.become_mirror(to.clone()) {
                                l.push_lagged(&t.name);
                            }
                            self.refollow(&t, owner);
                        }
                    }
                }
                Placement::Receiving { from, .. } if here => {
                    let slot = weft_router::ring::slot_of(&t.name);
                    let waiting = lock(&self.incoming)
                        .get(&slot)
                        .is_some_and(|a| a.from == from);
                    if !waiting {
                        warn!(topic = %t.name, from = %from, "no handoff came; owning it with a new epoch");
                        t.become_owner(node.registry.mint_epoch(), window, &node.stats);
                    }
                    owned += 1;
                }
                Placement::Mirror { .. } if here => {
                    let slot = weft_router::ring::slot_of(&t.name);
                    let from = lock(&self.incoming).get(&slot).map(|a| a.from.clone());
                    match from {
                        Some(from) => t.become_receiving(from),
                        None => {
                            info!(topic = %t.name, "topic moved here from a node that is gone; owning it with a new epoch");
                            t.become_owner(node.registry.mint_epoch(), window, &node.stats);
                        }
                    }
                    owned += 1;
                }
                Placement::Receiving { .. } => {
                    t.become_mirror(owner.into());
                    self.refollow(&t, owner);
                }
                Placement::Mirror { owner: held, .. } if &*held != owner => {
                    t.become_mirror(owner.into());
                    self.refollow(&t, owner);
                }
                Placement::Mirror {
                    sync: MirrorSync::Detached,
                    ..
                } => self.refollow(&t, owner),
                Placement::Mirror {
                    sync: MirrorSync::Requested(at),
                    ..
                } if at.elapsed() > FOLLOW_RETRY => self.refollow(&t, owner),
                Placement::Mirror { .. } => {}
            }
        }
        self.owned.store(owned, Ordering::Relaxed);
        // Every peer hears, once per ring version and behind the handoffs on the same
        // link, that this node holds nothing more the ring gives it: whatever it still
        // waits for from here can start.
        if !stale {
            let peers: Vec<_> = lock(&self.peers).values().cloned().collect();
            let mut sent = lock(&self.done_sent);
            for p in peers {
                if waiting_for_link.contains(&p.id)
                    || sent.get(&p.id).is_some_and(|v| *v >= slots.version)
                {
                    continue;
                }
                if let Some(link) = p.link() {
                    if link.push_control(encode(Kind::HandoffDone(grpc::HandoffDone {
                        ring_version: slots.version,
                    }))) {
                        sent.insert(p.id.clone(), slots.version);
                    }
                }
            }
        }
        if prev.version != slots.version {
            self.load_interest(node, &slots);
        }
    }

    /// Where a topic this node does not hold yet belongs: owned elsewhere, owned here,
    /// or owned here once its old owner's handoff lands.
    pub fn placement_fn(self: &Arc<Self>) -> crate::registry::PlaceFn {
        let relay = self.clone();
        Arc::new(move |topic: &str| {
            let slots = relay.cluster.slots();
            match slots.owner(topic) {
                Some(owner) if owner != &*relay.me => crate::registry::Place::Remote(owner.into()),
                Some(_) => match lock(&relay.incoming).get(&weft_router::ring::slot_of(topic)) {
                    Some(a) => crate::registry::Place::Incoming(a.from.clone()),
                    None => crate::registry::Place::Here,
                },
                None => crate::registry::Place::Here,
            }
        })
    }

    /// Graceful drain: the router takes this node out of the ring, every topic it
    /// owns is handed to its new owner, and the links are given time to carry it all.
    pub async fn drain(&self, node: &Node) {
        if let Err(e) = self.cluster.drain().await {
            warn!(error = %e, "the router did not mark this node draining; its topics move only when it leaves");
            return;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut changes = self.cluster.changes();
        while self.cluster.slots().owners.iter().any(|o| **o == *self.me) {
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                warn!("the ring still names this node after 5 s of draining");
                break;
            }
        }
        // Hand off now, and again while links to new owners come up.
        while tokio::time::Instant::now() < deadline {
            self.reconcile(node);
            if self.owned_topics() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Let what is queued reach the peers.
        let peers: Vec<_> = lock(&self.peers).values().cloned().collect();
        for p in peers {
            if let Some(link) = p.link() {
                let flushed = tokio::time::timeout(Duration::from_secs(2), link.flushed()).await;
                if flushed.is_err() {
                    warn!(peer = %p.id, "relay link still busy after 2 s of draining");
                }
            }
        }
        info!(owned = self.owned_topics(), "drained: topics handed over");
    }

    /// Ends every link and task (after the node has stopped serving).
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
        let peers: Vec<_> = lock(&self.peers).values().cloned().collect();
        for p in peers {
            if let Some(d) = lock(&p.dialer).take() {
                d.abort();
            }
            if let Some(l) = lock(&p.link).take() {
                l.close();
            }
        }
    }

    /// A new owner sends `Followed` to every node the registry says is interested in
    /// the topics it owns, so their subscribers continue without re-subscribing.
    fn load_interest(&self, node: &Node, slots: &weft_router::ring::SlotTable) {
        for (topic, nodes) in self.cluster.interest() {
            if slots.owner(&topic) != Some(&*self.me) {
                continue;
            }
            for n in nodes {
                if *n == *self.me {
                    continue;
                }
                let Some(peer) = self.peer(&n) else { continue };
                let Some(link) = peer.link() else { continue };
                let known = node
                    .registry
                    .get(&topic)
                    .is_some_and(|t| t.followers().iter().any(|f| **f == *n));
                if !known {
                    let _ = node
                        .registry
                        .with_topic(&topic, |t| t.follow(&peer.id, &link, SNAPSHOT_BYTES));
                }
            }
        }
    }

    /// Follows membership and ring changes until [`Relay::shutdown`]: links to
    /// members, topic placements, a repair pass every second.
    ///
    /// A pass over every topic runs when the ring or the membership changes (not on
    /// registry changes, which are constant in a busy cluster), when a link comes up,
    /// when a mirror needs repair (flagged), and every 10 s as a safety net.
    pub async fn run(self: Arc<Self>, node: Arc<Node>) {
        let mut layout = self.cluster.layout_changes();
        let mut stop = self.stop.subscribe();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_pass;
        loop {
            self.sync_members(&node);
            self.repair.store(false, Ordering::Relaxed);
            self.reconcile(&node);
            last_pass = Instant::now();
            loop {
                tokio::select! {
                    r = layout.changed() => if r.is_err() { return } else { break },
                    _ = self.kick.notified() => break,
                    _ = stop.wait_for(|s| *s) => return,
                    _ = tick.tick() => {
                        if self.repair.load(Ordering::Relaxed)
                            || last_pass.elapsed() >= Duration::from_secs(10)
                        {
                            break;
                        }
                    }
                }
            }
        }
    }
}

fn fail_pending(peer: &Peer, why: &str) {
    let pending: Vec<_> = lock(&peer.pending).drain().map(|(_, tx)| tx).collect();
    for tx in pending {
        let _ = tx.send(Err(Forward::Failed(ApiError::Unavailable {
            message: why.into(),
            retry_after_s: 1,
        })));
    }
}

fn api_error(status: u32, message: String) -> ApiError {
    match status {
        400 => ApiError::BadRequest(message),
        403 => ApiError::Forbidden(message),
        413 => ApiError::TooLarge(message),
        429 => ApiError::RateLimited {
            message,
            retry_after_s: 1,
        },
        _ => ApiError::Unavailable {
            message,
            retry_after_s: 1,
        },
    }
}

/// Checks a snapshot's or handoff's history: one contiguous run of the topic ending
/// at `last_offset`, each event checked like a publish.
fn checked_history(
    node: &Node,
    topic: &str,
    epoch: &str,
    last_offset: u64,
    events: Vec<grpc::RelayEvent>,
) -> Result<Vec<Relayed>, String> {
    weft_proto::validate_topic(topic).map_err(|e| format!("snapshot: {e}"))?;
    if !weft_proto::cursor::valid_epoch(epoch) {
        return Err(format!("snapshot: invalid epoch {epoch:?}"));
    }
    let mut history = Vec::with_capacity(events.len());
    let first = events.first().map_or(last_offset + 1, |e| e.offset);
    for (i, ev) in events.into_iter().enumerate() {
        if ev.topic != topic || ev.epoch != epoch || ev.offset != first + i as u64 {
            return Err("snapshot: history is not one contiguous run of the topic".into());
        }
        history.push(relayed(node, ev)?);
    }
    if history.last().is_some_and(|e| e.offset != last_offset) {
        return Err("snapshot: history does not end at its last offset".into());
    }
    Ok(history)
}

/// Checks a relayed event the way a publish is checked: the frames built from it are
/// concatenated without escaping, so nothing unchecked from the wire gets in.
fn relayed(node: &Node, ev: grpc::RelayEvent) -> Result<Relayed, String> {
    if !weft_proto::cursor::valid_epoch(&ev.epoch) || ev.offset == 0 {
        return Err(format!(
            "event with invalid cursor {}:{}",
            ev.epoch, ev.offset
        ));
    }
    let kind = crate::http::event_kind(ev.r#type.as_deref()).map_err(|e| e.to_string())?;
    let data = crate::http::event_data(&ev.data, &node.config.limits).map_err(|e| e.to_string())?;
    Ok(Relayed {
        epoch: ev.epoch,
        offset: ev.offset,
        ts: ev.ts,
        kind,
        data,
    })
}

async fn read_hello(inbound: &mut Streaming<RelayBatch>) -> Result<String, Status> {
    let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
        .await
        .map_err(|_| Status::deadline_exceeded("no hello"))??
        .ok_or_else(|| Status::invalid_argument("link closed before hello"))?;
    let [raw] = <[Bytes; 1]>::try_from(first.frames)
        .map_err(|_| Status::invalid_argument("the first batch must hold exactly one hello"))?;
    match RelayFrame::decode(raw).ok().and_then(|f| f.kind) {
        Some(Kind::Hello(h)) if !h.node.is_empty() && h.node.len() <= 255 => Ok(h.node),
        _ => Err(Status::invalid_argument("the first frame must be a hello")),
    }
}

/// Resolves when the queue is closed (the other half of the link ended it).
async fn closed(queue: &LinkQueue) {
    loop {
        let notified = queue.ended.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if queue.is_closed() {
            return;
        }
        notified.await;
    }
}

/// Moves batches from a link's queue into the gRPC stream until either ends.
async fn pump<T>(queue: Arc<LinkQueue>, tx: mpsc::Sender<T>, wrap: fn(RelayBatch) -> T) {
    while let Some(frames) = queue.next_batch().await {
        if tx.send(wrap(RelayBatch { frames })).await.is_err() {
            break;
        }
    }
    queue.close();
}

/// Where the relay service finds the relay and its node: filled once the node has
/// joined (the service must be registered before the router it needs is up).
pub type RelaySlot = Arc<std::sync::OnceLock<(Arc<Relay>, Arc<Node>)>>;

/// The `weft.v1.Relay` gRPC service peers dial.
pub fn relay_service(slot: RelaySlot) -> grpc::relay_server::RelayServer<RelayService> {
    grpc::relay_server::RelayServer::new(RelayService { slot })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
}

/// Accepts links from peers that sort before this node.
pub struct RelayService {
    slot: RelaySlot,
}

#[tonic::async_trait]
impl grpc::relay_server::Relay for RelayService {
    type LinkStream = ReceiverStream<Result<RelayBatch, Status>>;

    async fn link(
        &self,
        request: Request<Streaming<RelayBatch>>,
    ) -> Result<Response<Self::LinkStream>, Status> {
        let Some((relay, node)) = self.slot.get().cloned() else {
            return Err(Status::unavailable(
                "this node has not joined the cluster yet",
            ));
        };
        // Who dialled, from its certificate; its Hello may name only itself.
        let caller = weft_router::identity::caller(&request)?;
        let mut inbound = request.into_inner();
        let from = match read_hello(&mut inbound).await {
            Ok(id) => id,
            Err(e) => {
                node.stats.relay.bad_frames.inc();
                return Err(e);
            }
        };
        weft_router::identity::authorize(
            &caller,
            &weft_router::identity::Action::RelayHello(&from),
        )?;
        relay.sync_members(&node);
        let peer = match relay.peer(&from) {
            Some(p) if from != *relay.me => p,
            _ => {
                node.stats.relay.bad_frames.inc();
                return Err(Status::permission_denied(format!(
                    "{from} is not a member of this cluster"
                )));
            }
        };
        let queue = Arc::new(LinkQueue::default());
        queue.push_control(relay.hello());
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(pump(queue.clone(), tx, Ok));
        tokio::spawn(async move { relay.run_link(&node, &peer, queue, inbound).await });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
