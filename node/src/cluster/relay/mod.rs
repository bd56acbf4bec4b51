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
//! - `Revoke`, `RevocationsSent` → client-token revocations, and the end of the set
//!   each side sends at link-up; a node that has just started holds user tokens back
//!   until every peer's set is in (`revocations.rs`).
//!
//! # Ownership
//! The topic's [`Placement`] on this node is the truth the data path uses; the control
//! task ([`Relay::run`], `control.rs`) is the one owner of the handoff state and brings
//! placements in line with the committed ring, deciding through the pure planner
//! (`plan.rs`), whenever the ring or the members change or a link comes up (and every
//! 10 s; every second while a mirror waits to be repaired): a topic the ring gives here becomes owned
//! (new epoch: without a handoff its old state is gone, so its mirrors see `reset`), a
//! topic it gives away becomes a mirror of the new owner, and detached mirrors follow
//! again. A new owner also loads the registry's interest for what it gained and sends
//! `Followed` to those nodes at once, so nobody has to re-subscribe.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

use crate::cluster::membership::Cluster;

mod codec;
mod control;
mod dial;
mod drain;
mod inbound;
mod link;
mod placement;
mod plan;
mod publish;
mod revocations;
mod service;

use codec::*;
pub use codec::{ack_frame, encode, followed_frame, moved_frame};
use dial::*;
pub use link::LinkQueue;
use link::*;
pub use publish::Ticket;
use publish::*;
pub use revocations::SYNC_HOLD as REVOCATION_HOLD;
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

/// What a topic created on the data path (a forwarded publish, a follow, a handoff)
/// starts as: its place under the ring the control task has *acted on*, not the newest
/// one. A ring the control task has not planned yet must not place a topic: under it,
/// a slot coming here would look owned with no handoff awaited, and the topic would
/// start a new epoch that the old owner's handoff can no longer continue. The next pass
/// moves the topic like any other.
#[derive(Debug, Default)]
struct Planned {
    slots: Arc<weft_router::ring::SlotTable>,
    /// Slot → the member whose handoff it waits for.
    awaiting: HashMap<u32, Arc<str>>,
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
    /// Set once a link from it has carried its whole revocation set (or, from an
    /// older peer that does not mark the end, once a link came up).
    revocations_heard: AtomicBool,
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
    /// The control task's inbox ([`control::Msg`]), and its receiving end until the
    /// task takes it.
    control: mpsc::Sender<control::Msg>,
    inbox: Mutex<Option<mpsc::Receiver<control::Msg>>>,
    /// Written by the control task only. Topics owned here after its last pass
    /// (reported in heartbeats).
    owned: AtomicU64,
    /// Written by the control task only: where a topic created now starts.
    planned: RwLock<Planned>,
    /// The newest ring version a peer's handoff frames named (written by link tasks,
    /// before the frame is applied; read by each pass): while this node's own view is
    /// older, it moves no topic (it would hand back what it was just given).
    heard: Mutex<plan::Heard>,
    stop: watch::Sender<bool>,
}

impl Relay {
    pub fn new(cluster: Arc<Cluster>) -> Arc<Self> {
        let (control, inbox) = mpsc::channel(control::INBOX);
        Arc::new(Self {
            me: cluster.node_id.as_str().into(),
            cluster,
            peers: Mutex::default(),
            next_req: AtomicU64::new(1),
            control,
            inbox: Mutex::new(Some(inbox)),
            owned: AtomicU64::new(0),
            planned: RwLock::default(),
            heard: Mutex::new(plan::Heard {
                version: 0,
                at: Instant::now(),
            }),
            stop: watch::channel(false).0,
        })
    }

    /// Topics owned here, as of the control task's last pass (at most 10 s old).
    pub fn owned_topics(&self) -> u64 {
        self.owned.load(Ordering::Relaxed)
    }

    fn peer(&self, id: &str) -> Option<Arc<Peer>> {
        lock(&self.peers).get(id).cloned()
    }

    /// What each live link holds queued, (peer, bytes, frames): the relay lag the
    /// exporter reports as `weft_relay_link_queued_bytes` / `_frames`.
    pub fn link_backlogs(&self) -> Vec<(Arc<str>, usize, usize)> {
        lock(&self.peers)
            .values()
            .filter_map(|p| {
                let (bytes, frames) = p.link()?.backlog();
                Some((p.id.clone(), bytes, frames))
            })
            .collect()
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
