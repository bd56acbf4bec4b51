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
//! whenever the ring or the members change or a link comes up (and every 10 s; every
//! second while a mirror waits to be repaired): a topic the ring gives here becomes owned
//! (new epoch: without a handoff its old state is gone, so its mirrors see `reset`), a
//! topic it gives away becomes a mirror of the new owner, and detached mirrors follow
//! again. A new owner also loads the registry's interest for what it gained and sends
//! `Followed` to those nodes at once, so nobody has to re-subscribe.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use tonic::transport::Channel;
use weft_proto::grpc::relay_frame::Kind;
use weft_proto::grpc::{self};

use crate::cluster::membership::Cluster;

mod codec;
mod dial;
mod drain;
mod inbound;
mod link;
mod placement;
mod publish;
mod service;

use codec::*;
pub use codec::{ack_frame, encode, followed_frame, moved_frame};
use dial::*;
pub use link::LinkQueue;
use link::*;
pub use publish::Ticket;
use publish::*;
pub use service::{relay_service, RelayService, RelaySlot};

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

/// A slot this node waits to receive by handoff.
#[derive(Debug, Clone)]
struct Awaited {
    from: Arc<str>,
    /// Past this, topics of the slot start afresh.
    until: Instant,
    /// The ring version the wait began at.
    ring: u64,
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

    /// Topics owned here, as of the last reconcile pass (at most 10 s old).
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
}
