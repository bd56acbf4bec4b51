//! One topic as its owner keeps it: offset counter, epoch, bounded history,
//! idempotency window, and the local subscribers to fan out to.
//!
//! # Invariants
//! - Offsets are contiguous from 1 within an epoch; the epoch changes only when the
//!   topic's state is lost: it was forgotten after being idle and empty, this node
//!   became its owner with no handoff ([`Topic::become_owner`]), or a mirror replaced
//!   its copy with an owner's snapshot of another epoch.
//! - Sequencing, appending to history and enqueueing the fan-out job happen under the
//!   topic's lock; the fan-out itself runs after it ([`fanout`]), in queue order, so
//!   every subscriber's queue receives a topic's events in offset order and the
//!   publish is acknowledged without waiting for it. A subscribe snapshots and joins
//!   the fan-out under the same lock and sees each event exactly once: either in its
//!   reply or as a push after it.
//! - The lock is a `std::sync::Mutex`: every section is short, non-blocking (queue
//!   pushes never wait) and never spans an `.await`.
//! - History is bounded by the namespace's count and age, and by the node's global
//!   memory budget ([`HistoryBudget`]), which evicts idle topics' history first.
//!
//! # Owner and mirror (cluster)
//! In a cluster a node holds a topic in one of two roles ([`Placement`]):
//! - **owner**: sequences it as above and also relays every event, once, to each peer
//!   node that follows it (its [`follow::PeerLink`]), under the same lock as local fan-out;
//! - **mirror**: another node owns it. The mirror keeps the owner's epoch, offsets and
//!   a bounded copy of its history, built from a `Followed` snapshot and the events
//!   that follow it on the same link, so local subscribes, resumes and reads work on
//!   the mirror with the same rules. An event that does not continue the mirror's
//!   offsets is never delivered: the mirror detaches and re-follows, and the new
//!   snapshot either fills the gap from history or tells every session `reset`.

pub mod fanout;
pub mod follow;
pub mod idempotency;
pub mod interest;
pub mod registry;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::Notify;
use weft_proto::{Cursor, PresenceEntry};

use crate::config::NamespaceConfig;
use crate::session::event::StoredEvent;
use crate::session::outbox::Outbox;
use crate::stats::Stats;
use crate::topic::interest::InterestFeed;
use fanout::{FanOutShared, FanQueue, Item, Members};
use follow::{PeerLink, Push};
use idempotency::{body_digest, Idempotency, KeyUse};

/// The node-wide history memory budget.
#[derive(Debug)]
pub struct HistoryBudget {
    pub used: AtomicUsize,
    pub limit: usize,
    /// Woken when `used` passes `limit`; the registry's evictor waits on it.
    pub over: Notify,
}

impl HistoryBudget {
    pub fn new(limit: usize) -> Self {
        Self {
            used: AtomicUsize::new(0),
            limit,
            over: Notify::new(),
        }
    }
}

#[derive(Debug)]
pub struct Subscriber {
    pub outbox: Arc<Outbox>,
    pub client: Arc<str>,
    pub user: Option<Arc<str>>,
    /// WebSocket sessions get join/leave pushes; streaming HTTP watchers do not.
    pub wants_presence: bool,
}

/// The topic was forgotten between lookup and lock; look it up again.
#[derive(Debug, Clone, Copy)]
pub struct Dead;

/// Why a cursor cannot be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CursorProblem {
    /// Another epoch, or offsets no longer in history: re-read state from `current`.
    Gone { current: Cursor },
    /// Same epoch but beyond the last offset: the cursor was not issued by this topic.
    Ahead { current: Cursor },
}

#[derive(Debug)]
pub struct Published {
    pub epoch: Arc<str>,
    pub offset: u64,
    pub duplicate: bool,
    /// A duplicate whose key was first used with another body (event type and data)
    /// within the idempotency window: the caller answers `422` rather than replaying
    /// the first result.
    pub conflict: bool,
}

/// What a subscriber gets at the moment it is registered.
#[derive(Debug)]
pub struct Snapshot {
    pub epoch: Arc<str>,
    pub offset: u64,
    /// `None` without `since`; `Some(false)` when the cursor was gone.
    pub recovered: Option<bool>,
    pub events: Vec<Arc<StoredEvent>>,
}

#[derive(Debug)]
pub struct Page {
    pub epoch: Arc<str>,
    pub events: Vec<Arc<StoredEvent>>,
    /// Cursor to read from next: the last returned offset, or the cursor asked with.
    pub next: u64,
    pub last_offset: u64,
}

/// How this node holds a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    Owner,
    /// The ring made this node the owner and the old owner, still up, is handing the
    /// topic's state over: publishes and follows wait (bounded) for it.
    Receiving {
        from: Arc<str>,
        since: Instant,
    },
    Mirror {
        owner: Arc<str>,
        sync: MirrorSync,
        /// Never synced yet: no epoch, nothing to serve.
        fresh: bool,
    },
}

/// Where a mirror stands with its owner's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorSync {
    /// Not receiving the owner's events (never asked, link lost, gap, lagged).
    Detached,
    /// A `Follow` went out at this instant; the snapshot has not arrived.
    Requested(Instant),
    /// Snapshot applied; every event of the topic arrives on the link in order.
    Following,
}

#[derive(Debug)]
enum Role {
    Owner {
        followers: Vec<Follower>,
    },
    Mirror {
        owner: Arc<str>,
        sync: MirrorSync,
    },
    Receiving {
        from: Arc<str>,
        since: Instant,
        held: VecDeque<Held>,
    },
}

/// Work that arrived for a topic while its state was on its way here.
#[derive(Debug)]
pub enum Held {
    Publish {
        data: Bytes,
        kind: Option<Arc<str>>,
        key: Option<Box<str>>,
        reply: HeldReply,
    },
    Follow {
        peer: Arc<str>,
        link: Arc<dyn PeerLink>,
        /// The snapshot's history budget, as the follow asked.
        max_bytes: usize,
    },
}

/// Where a held publish's outcome goes.
#[derive(Debug)]
pub enum HeldReply {
    /// A peer's forwarded publish: answered on its link.
    Link {
        link: Arc<dyn PeerLink>,
        req_id: u64,
    },
    /// A publish made on this node: its caller waits for this.
    Local(tokio::sync::oneshot::Sender<Published>),
}

impl HeldReply {
    fn send(self, published: Published) {
        match self {
            HeldReply::Link { link, req_id } => {
                link.push_ack(req_id, &published);
            }
            HeldReply::Local(tx) => {
                let _ = tx.send(published);
            }
        }
    }
}

/// Held work per topic, at most.
pub const MAX_HELD: usize = 10_000;

/// Why a publish was not sequenced here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Elsewhere {
    /// Another node owns the topic: publish there.
    Owner(Arc<str>),
    /// Its state is being handed to this node, and nothing was given to hold the
    /// publish with.
    Moving,
    /// Its state is being handed to this node: the publish is held, and its reply
    /// answers it when the handoff lands (or the ring moves on).
    Held,
    /// Its state is being handed to this node and too much waits for it already.
    Full,
}

/// A topic's whole state as its old owner hands it over.
#[derive(Debug)]
pub struct Handover {
    pub epoch: String,
    pub last_offset: u64,
    pub history: Vec<Relayed>,
    /// (key, offset, age, the body's digest if the old owner sent it)
    pub idempotency: Vec<(String, u64, Duration, Option<u64>)>,
}

#[derive(Debug)]
struct Follower {
    peer: Arc<str>,
    link: Arc<dyn PeerLink>,
}

/// A relayed event, validated, as a mirror applies it.
#[derive(Debug)]
pub struct Relayed {
    pub epoch: String,
    pub offset: u64,
    pub ts: u64,
    pub kind: Option<Arc<str>>,
    pub data: Bytes,
}

/// What a mirror did with a relayed event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Delivered,
    /// Already had it (offset at or below the mirror's).
    Stale,
    /// It does not continue the mirror's offsets: detached, must re-follow.
    Gap,
    /// The topic is not a following mirror of that peer.
    NotFollowing,
}

/// What a mirror did with a `Followed` snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowOutcome {
    /// First snapshot of a fresh mirror, or nothing new.
    Adopted,
    /// Continued the same epoch; this many missed events were delivered from history.
    CaughtUp(usize),
    /// History could not be continued: every local session was sent `reset`.
    Reset,
    /// This topic is not a mirror of that peer (owned here, or another owner).
    NotMine,
}

#[derive(Debug)]
pub struct Topic {
    pub name: Arc<str>,
    pub ns: Arc<NamespaceConfig>,
    state: Mutex<TopicState>,
    /// Deliveries to local sessions, run after the lock is released.
    fan: Arc<FanQueue>,
    /// Woken after every publish and whenever a mirror's sync state changes:
    /// long-polls wait for events, subscribes on a mirror for its snapshot. One
    /// `Notify` for both (a waiter re-checks what it waits for), 32 bytes less in
    /// every topic: an idle node with a private topic per connection has as many
    /// topics as sockets.
    pub changed: Notify,
    budget: Arc<HistoryBudget>,
    /// Where first-subscriber / last-unsubscriber transitions are reported.
    interest: Arc<InterestFeed>,
}

#[derive(Debug)]
struct TopicState {
    dead: bool,
    role: Role,
    epoch: Arc<str>,
    last_offset: u64,
    history: VecDeque<Arc<StoredEvent>>,
    history_bytes: usize,
    last_active: Instant,
    /// The local subscribers, as the fan-out delivers to them (`fanout`).
    members: Members,
    idempotency: Idempotency,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Topic {
    pub fn new(
        name: Arc<str>,
        ns: Arc<NamespaceConfig>,
        epoch: Arc<str>,
        budget: Arc<HistoryBudget>,
        interest: Arc<InterestFeed>,
        fanout: Arc<FanOutShared>,
    ) -> Self {
        Self::with_role(
            name,
            ns,
            epoch,
            Role::Owner {
                followers: Vec::new(),
            },
            budget,
            interest,
            fanout,
        )
    }

    /// A mirror of a topic `owner` sequences; fresh until its first snapshot.
    pub fn new_mirror(
        name: Arc<str>,
        ns: Arc<NamespaceConfig>,
        owner: Arc<str>,
        budget: Arc<HistoryBudget>,
        interest: Arc<InterestFeed>,
        fanout: Arc<FanOutShared>,
    ) -> Self {
        let role = Role::Mirror {
            owner,
            sync: MirrorSync::Detached,
        };
        Self::with_role(name, ns, "".into(), role, budget, interest, fanout)
    }

    /// A topic this node is about to own, waiting for `from` to hand over its state.
    pub fn new_receiving(
        name: Arc<str>,
        ns: Arc<NamespaceConfig>,
        from: Arc<str>,
        budget: Arc<HistoryBudget>,
        interest: Arc<InterestFeed>,
        fanout: Arc<FanOutShared>,
    ) -> Self {
        let role = Role::Receiving {
            from,
            since: Instant::now(),
            held: VecDeque::new(),
        };
        Self::with_role(name, ns, "".into(), role, budget, interest, fanout)
    }

    fn with_role(
        name: Arc<str>,
        ns: Arc<NamespaceConfig>,
        epoch: Arc<str>,
        role: Role,
        budget: Arc<HistoryBudget>,
        interest: Arc<InterestFeed>,
        fanout: Arc<FanOutShared>,
    ) -> Self {
        Self {
            name,
            fan: FanQueue::new(ns.slow_consumer, fanout),
            ns,
            state: Mutex::new(TopicState {
                dead: false,
                role,
                epoch,
                last_offset: 0,
                history: VecDeque::new(),
                history_bytes: 0,
                last_active: Instant::now(),
                members: Members::default(),
                idempotency: Idempotency::default(),
            }),
            changed: Notify::new(),
            budget,
            interest,
        }
    }

    fn lock(&self) -> MutexGuard<'_, TopicState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn live(&self) -> Result<MutexGuard<'_, TopicState>, Dead> {
        let st = self.lock();
        if st.dead {
            Err(Dead)
        } else {
            Ok(st)
        }
    }

    /// A live topic with state to serve: a mirror that never had a snapshot has none
    /// (callers wait for [`crate::cluster::relay::Relay::ensure_synced`] first; this guards
    /// the race where the topic was recycled meanwhile, so it is retried).
    fn served(&self) -> Result<MutexGuard<'_, TopicState>, Dead> {
        let st = self.live()?;
        if st.epoch.is_empty() {
            Err(Dead)
        } else {
            Ok(st)
        }
    }

    pub fn placement(&self) -> Placement {
        let st = self.lock();
        match &st.role {
            Role::Owner { .. } => Placement::Owner,
            Role::Receiving { from, since, .. } => Placement::Receiving {
                from: from.clone(),
                since: *since,
            },
            Role::Mirror { owner, sync } => Placement::Mirror {
                owner: owner.clone(),
                sync: *sync,
                fresh: st.epoch.is_empty(),
            },
        }
    }

    /// Whether this node can serve the topic now: it owns it, or mirrors it with the
    /// owner's stream arriving.
    pub fn is_ready(&self) -> bool {
        let st = self.lock();
        !st.epoch.is_empty()
            && matches!(
                st.role,
                Role::Owner { .. }
                    | Role::Mirror {
                        sync: MirrorSync::Following,
                        ..
                    }
            )
    }

    /// Whether `cursor` is in this topic's epoch but past what it holds (a mirror
    /// behind its owner's stream).
    pub fn is_behind(&self, cursor: &Cursor) -> bool {
        let st = self.lock();
        *st.epoch == *cursor.epoch && cursor.offset > st.last_offset
    }

    pub fn is_dead(&self) -> bool {
        self.lock().dead
    }

    pub fn cursor(&self) -> Result<Cursor, Dead> {
        let st = self.served()?;
        Ok(Cursor::new(&*st.epoch, st.last_offset))
    }

    /// The one place a publish on this node is decided: sequenced if this node owns the
    /// topic (kept in history, fanned out to local subscribers, relayed once to every
    /// following peer); held with the reply in `hold` (taken) while its handoff is on the way, in the same
    /// lock section that checks the role, so the handoff cannot land in between;
    /// otherwise the owner to forward it to.
    pub fn publish(
        &self,
        data: Bytes,
        kind: Option<Arc<str>>,
        idempotency_key: Option<&str>,
        idem: (Duration, usize),
        stats: &Stats,
        hold: &mut Option<HeldReply>,
    ) -> Result<Result<Published, Elsewhere>, Dead> {
        // Hashed before the lock is taken: up to a whole message's bytes.
        let key = idempotency_key.map(|k| (k, body_digest(kind.as_deref(), &data)));
        let mut st = self.live()?;
        match &mut st.role {
            Role::Mirror { owner, .. } => return Ok(Err(Elsewhere::Owner(owner.clone()))),
            Role::Receiving { held, .. } => {
                let Some(reply) = hold.take() else {
                    return Ok(Err(Elsewhere::Moving));
                };
                if held.len() >= MAX_HELD {
                    return Ok(Err(Elsewhere::Full));
                }
                held.push_back(Held::Publish {
                    data,
                    kind,
                    key: idempotency_key.map(Into::into),
                    reply,
                });
                return Ok(Err(Elsewhere::Held));
            }
            Role::Owner { .. } => {}
        }
        let (published, used) = self.sequence(&mut st, data, kind, key, idem, stats);
        drop(st);
        if !published.duplicate {
            self.after_deliver(used);
        }
        Ok(Ok(published))
    }

    /// The owner's publish, under the lock, with its idempotency key and the body's
    /// digest. Returns the outcome and the budget's use.
    fn sequence(
        &self,
        st: &mut TopicState,
        data: Bytes,
        kind: Option<Arc<str>>,
        key: Option<(&str, u64)>,
        idem: (Duration, usize),
        stats: &Stats,
    ) -> (Published, usize) {
        let now = Instant::now();
        if let Some((key, digest)) = key {
            st.idempotency.expire(now, idem.0, idem.1);
            if let Some(first) = st.idempotency.get(key) {
                let conflict = match first.digest {
                    Some(d) => d != digest,
                    // Handed over without a digest: compare while the event is kept.
                    None => Self::kept(st, first.offset)
                        .is_some_and(|e| body_digest(e.kind.as_deref(), &e.data) != digest),
                };
                let published = Published {
                    epoch: st.epoch.clone(),
                    offset: first.offset,
                    duplicate: true,
                    conflict,
                };
                return (published, 0);
            }
        }
        st.last_offset += 1;
        let offset = st.last_offset;
        let ev = Arc::new(StoredEvent::new(
            self.name.clone(),
            st.epoch.clone(),
            offset,
            now_ms(),
            kind,
            data,
        ));
        if let Some((key, digest)) = key {
            let used = KeyUse {
                offset,
                digest: Some(digest),
            };
            st.idempotency.insert(key, used, now);
        }
        st.last_active = now;
        let used = self.deliver(st, &ev, now);
        if let Role::Owner { followers } = &mut st.role {
            if !followers.is_empty() {
                followers.retain(|f| match f.link.push_event(&ev) {
                    Push::Queued => {
                        stats.relay.events_sent.inc();
                        true
                    }
                    Push::Full => {
                        // The peer's link is behind: stop relaying this topic to it
                        // and say so; it re-follows and catches up from history.
                        stats.relay.lagged.inc();
                        f.link.push_lagged(&self.name);
                        false
                    }
                    Push::Closed => false,
                });
            }
        }
        stats.published.inc();
        let published = Published {
            conflict: false,
            epoch: st.epoch.clone(),
            offset,
            duplicate: false,
        };
        (published, used)
    }

    /// Runs what was held, in arrival order, now that this node owns the topic.
    fn release_held(
        &self,
        st: &mut TopicState,
        held: VecDeque<Held>,
        idem: (Duration, usize),
        stats: &Stats,
    ) -> usize {
        let mut used = 0;
        for h in held {
            match h {
                Held::Publish {
                    data,
                    kind,
                    key,
                    reply,
                } => {
                    let key = key
                        .as_deref()
                        .map(|k| (k, body_digest(kind.as_deref(), &data)));
                    let (p, u) = self.sequence(st, data, kind, key, idem, stats);
                    used = used.max(u);
                    reply.send(p);
                }
                Held::Follow {
                    peer,
                    link,
                    max_bytes,
                } => {
                    self.follow_locked(st, &peer, &link, max_bytes);
                }
            }
        }
        used
    }

    /// Appends to history and queues to every local subscriber (under the lock).
    /// Returns the budget's use after the append.
    fn deliver(&self, st: &mut TopicState, ev: &Arc<StoredEvent>, now: Instant) -> usize {
        let cost = ev.cost();
        st.history.push_back(ev.clone());
        st.history_bytes += cost;
        let used = self.budget.used.fetch_add(cost, Ordering::Relaxed) + cost;
        self.trim(st, now);
        st.members.enqueue(&self.fan, Item::Event(ev.clone()));
        used
    }

    /// Wakes long-polls and, past the budget, the evictor (after the lock is dropped).
    fn after_deliver(&self, used: usize) {
        self.fan.kick();
        self.changed.notify_waiters();
        if used > self.budget.limit {
            self.budget.over.notify_one();
        }
    }

    /// Owner: registers `peer`'s link as a follower and queues the `Followed` snapshot
    /// on it under the lock, so every later event follows the snapshot on that link.
    /// The snapshot carries the newest history up to `max_bytes`. On a mirror:
    /// `Err(owner)`; while a handoff is on its way the follow is held until it lands.
    pub fn follow(
        &self,
        peer: &Arc<str>,
        link: Arc<dyn PeerLink>,
        max_bytes: usize,
    ) -> Result<Result<(), Arc<str>>, Dead> {
        let mut st = self.live()?;
        match &mut st.role {
            Role::Mirror { owner, .. } => return Ok(Err(owner.clone())),
            Role::Receiving { held, from, .. } => {
                if held.len() >= MAX_HELD {
                    return Ok(Err(from.clone()));
                }
                held.push_back(Held::Follow {
                    peer: peer.clone(),
                    link,
                    max_bytes,
                });
                return Ok(Ok(()));
            }
            Role::Owner { .. } => {}
        }
        self.follow_locked(&mut st, peer, &link, max_bytes);
        Ok(Ok(()))
    }

    fn follow_locked(
        &self,
        st: &mut TopicState,
        peer: &Arc<str>,
        link: &Arc<dyn PeerLink>,
        max_bytes: usize,
    ) {
        let history = Self::history_tail(st, max_bytes);
        let snapshot = weft_proto::grpc::Followed {
            topic: self.name.to_string(),
            epoch: st.epoch.to_string(),
            last_offset: st.last_offset,
            history,
        };
        if let Role::Owner { followers } = &mut st.role {
            followers.retain(|f| f.peer != *peer);
            if link.push_followed(snapshot) {
                followers.push(Follower {
                    peer: peer.clone(),
                    link: link.clone(),
                });
            }
        }
    }

    /// The newest history that fits in `max_bytes`, oldest first, as relay events.
    /// The event at `offset`, while history keeps it.
    fn kept(st: &TopicState, offset: u64) -> Option<&Arc<StoredEvent>> {
        let first = st.history.front()?.offset;
        let i = offset.checked_sub(first)?;
        st.history
            .get(usize::try_from(i).ok()?)
            .filter(|e| e.offset == offset)
    }

    fn history_tail(st: &TopicState, max_bytes: usize) -> Vec<weft_proto::grpc::RelayEvent> {
        let mut taken = 0;
        let mut bytes = 0;
        for ev in st.history.iter().rev() {
            bytes += ev.data.len() + ev.topic.len() + 64;
            if bytes > max_bytes {
                break;
            }
            taken += 1;
        }
        let skip = st.history.len() - taken;
        st.history.iter().skip(skip).map(|e| e.to_relay()).collect()
    }

    /// Old owner, graceful move: queues the topic's whole state for `to` on `link`
    /// and becomes a mirror of `to` in the same instant (under the lock), so the
    /// handoff precedes every publish this node forwards there afterwards. Returns
    /// the links of peers that followed it here (to be told to look again), or `None`
    /// if it is not the owner or the link is gone.
    pub fn hand_off(
        &self,
        to: &Arc<str>,
        link: &dyn PeerLink,
        ring_version: u64,
        max_bytes: usize,
    ) -> Option<Vec<Arc<dyn PeerLink>>> {
        let mut st = self.lock();
        if st.dead || !matches!(st.role, Role::Owner { .. }) {
            return None;
        }
        let now = Instant::now();
        let idempotency = st
            .idempotency
            .entries()
            .map(|(key, used, at)| weft_proto::grpc::IdempotencyEntry {
                key: key.to_owned(),
                offset: used.offset,
                age_ms: now.duration_since(at).as_millis() as u64,
                digest: used.digest,
            })
            .collect();
        let handoff = weft_proto::grpc::Handoff {
            topic: self.name.to_string(),
            epoch: st.epoch.to_string(),
            last_offset: st.last_offset,
            history: Self::history_tail(&st, max_bytes),
            idempotency,
            ring_version,
        };
        if !link.push_handoff(handoff) {
            return None;
        }
        let old = std::mem::replace(
            &mut st.role,
            Role::Mirror {
                owner: to.clone(),
                sync: MirrorSync::Detached,
            },
        );
        st.idempotency = Idempotency::default();
        drop(st);
        self.changed.notify_waiters();
        match old {
            Role::Owner { followers } => Some(followers.into_iter().map(|f| f.link).collect()),
            _ => Some(Vec::new()),
        }
    }

    /// New owner, graceful move: waits for `from`'s handoff (publishes and follows
    /// are held meanwhile).
    pub fn become_receiving(&self, from: Arc<str>) {
        let mut st = self.lock();
        if st.dead || !matches!(st.role, Role::Mirror { .. }) {
            return;
        }
        st.role = Role::Receiving {
            from,
            since: Instant::now(),
            held: VecDeque::new(),
        };
        drop(st);
        self.changed.notify_waiters();
    }

    /// New owner: takes the old owner's state and sequences from it — same epoch,
    /// next offset — then runs what was held, in order. Local sessions that followed
    /// this topic as a mirror continue, catching up from the handed-over history (or
    /// `reset` if it does not reach back to them). False if this topic cannot take it
    /// (already owned with events of its own).
    pub fn apply_handoff(
        &self,
        from: &str,
        handover: Handover,
        idem: (Duration, usize),
        stats: &Stats,
    ) -> bool {
        let mut st = self.lock();
        if st.dead {
            return false;
        }
        let pristine = st.last_offset == 0;
        let held = match &mut st.role {
            Role::Receiving { from: f, held, .. } if &**f == from => std::mem::take(held),
            Role::Mirror { .. } => VecDeque::new(),
            Role::Owner { followers } if pristine && followers.is_empty() => VecDeque::new(),
            _ => return false,
        };
        let outcome = self.merge(
            &mut st,
            &handover.epoch,
            handover.last_offset,
            handover.history,
            stats,
        );
        st.role = Role::Owner {
            followers: Vec::new(),
        };
        let now = Instant::now();
        let mut idempotency = Idempotency::default();
        for (key, offset, age, sent) in handover.idempotency {
            let at = now.checked_sub(age).unwrap_or(now);
            // The old owner sends each entry's digest; one that did not (an older
            // build) has it taken from the handed-over history while the event is
            // there, else the entry falls back to comparing with history (`sequence`).
            let digest = sent.or_else(|| {
                Self::kept(&st, offset).map(|e| body_digest(e.kind.as_deref(), &e.data))
            });
            idempotency.insert(&key, KeyUse { offset, digest }, at);
        }
        st.idempotency = idempotency;
        let used = self.release_held(&mut st, held, idem, stats).max(outcome.1);
        drop(st);
        self.after_deliver(used);
        self.changed.notify_waiters();
        true
    }

    /// Owner: stops relaying to `peer`.
    pub fn unfollow(&self, peer: &str) {
        if let Role::Owner { followers } = &mut self.lock().role {
            followers.retain(|f| &*f.peer != peer);
        }
    }

    /// The peers this owner relays to.
    pub fn followers(&self) -> Vec<Arc<str>> {
        match &self.lock().role {
            Role::Owner { followers } => followers.iter().map(|f| f.peer.clone()).collect(),
            Role::Mirror { .. } | Role::Receiving { .. } => Vec::new(),
        }
    }

    /// Mirror: notes that a `Follow` went out (or, with `Detached`, that the link is gone).
    pub fn set_mirror_sync(&self, sync: MirrorSync) {
        let mut st = self.lock();
        if let Role::Mirror { sync: s, .. } = &mut st.role {
            *s = sync;
        }
    }

    /// A mirror about to send `Follow`: `Requested(at)` from now on. Set *before* the
    /// frame goes out, never after: the owner's snapshot can land (and make the
    /// mirror `Following`) before the sender's next statement runs, and marking it
    /// `Requested` then would drop every relayed event until the follow retry. Returns
    /// what it replaced (`None`: not a mirror), for [`Topic::unmark_follow_requested`].
    pub fn mark_follow_requested(&self, at: Instant) -> Option<MirrorSync> {
        let mut st = self.lock();
        match &mut st.role {
            Role::Mirror { sync, .. } => Some(std::mem::replace(sync, MirrorSync::Requested(at))),
            _ => None,
        }
    }

    /// The `Follow` marked at `at` did not go out: back to `prev`, unless the state has
    /// moved on since.
    pub fn unmark_follow_requested(&self, at: Instant, prev: MirrorSync) {
        let mut st = self.lock();
        if let Role::Mirror { sync, .. } = &mut st.role {
            if *sync == MirrorSync::Requested(at) {
                *sync = prev;
            }
        }
    }

    /// Mirror: applies one relayed event from `from` if it continues the offsets.
    pub fn apply_relayed(&self, from: &str, ev: Relayed, stats: &Stats) -> Applied {
        let mut st = self.lock();
        if st.dead {
            return Applied::NotFollowing;
        }
        match &st.role {
            Role::Mirror {
                owner,
                sync: MirrorSync::Following,
            } if &**owner == from => {}
            _ => return Applied::NotFollowing,
        }
        if *st.epoch == *ev.epoch && ev.offset <= st.last_offset {
            return Applied::Stale;
        }
        if *st.epoch != *ev.epoch || ev.offset != st.last_offset + 1 {
            if let Role::Mirror { sync, .. } = &mut st.role {
                *sync = MirrorSync::Detached;
            }
            return Applied::Gap;
        }
        let used = self.append_relayed(&mut st, ev);
        drop(st);
        stats.relay.events_received.inc();
        self.after_deliver(used);
        Applied::Delivered
    }

    fn append_relayed(&self, st: &mut TopicState, ev: Relayed) -> usize {
        st.last_offset = ev.offset;
        let stored = self.stored(&st.epoch, ev);
        self.deliver(st, &stored, Instant::now())
    }

    /// A relayed event as this node stores it (the owner's epoch, offset and time).
    fn stored(&self, epoch: &Arc<str>, ev: Relayed) -> Arc<StoredEvent> {
        Arc::new(StoredEvent::new(
            self.name.clone(),
            epoch.clone(),
            ev.offset,
            ev.ts,
            ev.kind,
            ev.data,
        ))
    }

    /// Drops all history (and gives its bytes back to the budget).
    fn clear_history(&self, st: &mut TopicState) {
        let freed = std::mem::take(&mut st.history_bytes);
        st.history.clear();
        self.budget.used.fetch_sub(freed, Ordering::Relaxed);
    }

    /// Mirror: applies the owner's `Followed` snapshot. A fresh mirror adopts it; one
    /// in the same epoch delivers what it missed if the snapshot's history reaches
    /// back to it; otherwise every local session is told `reset` to the new cursor.
    /// `switch` lets a mirror of another owner accept it (the ring moved the topic).
    pub fn apply_followed(
        &self,
        from: &Arc<str>,
        switch: bool,
        epoch: &str,
        last_offset: u64,
        history: Vec<Relayed>,
        stats: &Stats,
    ) -> FollowOutcome {
        let mut st = self.lock();
        if st.dead {
            return FollowOutcome::NotMine;
        }
        match &mut st.role {
            Role::Mirror { owner, sync } if owner == from || switch => {
                *owner = from.clone();
                *sync = MirrorSync::Following;
            }
            _ => return FollowOutcome::NotMine,
        }
        let (outcome, used) = self.merge(&mut st, epoch, last_offset, history, stats);
        drop(st);
        self.after_deliver(used);
        self.changed.notify_waiters();
        outcome
    }

    /// Brings this node's copy to the owner's `(epoch, last_offset, history)`: a fresh
    /// copy adopts it; the same epoch delivers what was missed if the history reaches
    /// back to it; anything else replaces the copy and tells local sessions `reset`.
    fn merge(
        &self,
        st: &mut TopicState,
        epoch: &str,
        last_offset: u64,
        history: Vec<Relayed>,
        stats: &Stats,
    ) -> (FollowOutcome, usize) {
        let fresh = st.epoch.is_empty();
        if !fresh && *st.epoch == *epoch && last_offset <= st.last_offset {
            return (FollowOutcome::Adopted, 0);
        }
        if !fresh
            && *st.epoch == *epoch
            && history.last().map(|e| e.offset) == Some(last_offset)
            && history
                .first()
                .is_some_and(|e| e.offset <= st.last_offset + 1)
        {
            let mut used = 0;
            let mut n = 0;
            for ev in history {
                if ev.offset > st.last_offset {
                    used = self.append_relayed(st, ev);
                    n += 1;
                }
            }
            stats.relay.catch_ups.inc();
            return (FollowOutcome::CaughtUp(n), used);
        }
        // Replace the copy wholesale with the owner's.
        self.clear_history(st);
        st.epoch = epoch.into();
        let now = Instant::now();
        for ev in history {
            let stored = self.stored(&st.epoch, ev);
            let cost = stored.cost();
            st.history.push_back(stored);
            st.history_bytes += cost;
            self.budget.used.fetch_add(cost, Ordering::Relaxed);
        }
        self.trim(st, now);
        st.last_offset = last_offset;
        if fresh || st.members.is_empty() {
            (FollowOutcome::Adopted, 0)
        } else {
            self.reset_subscribers(st);
            stats.relay.resets.inc();
            (FollowOutcome::Reset, 0)
        }
    }

    /// Queues `reset` for every local session (the caller kicks the fan-out after
    /// the lock, through `after_deliver`).
    fn reset_subscribers(&self, st: &mut TopicState) {
        let reset = Item::Reset {
            topic: self.name.clone(),
            epoch: st.epoch.clone(),
            offset: st.last_offset,
        };
        st.members.enqueue(&self.fan, reset);
    }

    /// The ring made this node the owner and no handoff is coming (the old owner is
    /// gone, or it did not hand this topic over in time): the topic starts a new epoch,
    /// local sessions that had the old one get `reset`, and held work runs.
    pub fn become_owner(&self, epoch: Arc<str>, idem: (Duration, usize), stats: &Stats) {
        let mut st = self.lock();
        if st.dead {
            return;
        }
        let held = match &mut st.role {
            Role::Owner { .. } => return,
            Role::Receiving { held, .. } => std::mem::take(held),
            Role::Mirror { .. } => VecDeque::new(),
        };
        st.role = Role::Owner {
            followers: Vec::new(),
        };
        let had_state = !st.epoch.is_empty();
        self.clear_history(&mut st);
        st.epoch = epoch;
        st.last_offset = 0;
        st.idempotency = Idempotency::default();
        if had_state && !st.members.is_empty() {
            self.reset_subscribers(&mut st);
            stats.relay.resets.inc();
        }
        let used = self.release_held(&mut st, held, idem, stats);
        drop(st);
        self.after_deliver(used);
        self.changed.notify_waiters();
    }

    /// The ring gave the topic to `owner`: this node becomes (or re-points) a mirror,
    /// detached until it follows the new owner. Returns the links of peers that were
    /// following it here, so they can be told to look again.
    pub fn become_mirror(&self, owner: Arc<str>) -> Vec<Arc<dyn PeerLink>> {
        let mut st = self.lock();
        if st.dead {
            return Vec::new();
        }
        let old = std::mem::replace(
            &mut st.role,
            Role::Mirror {
                owner,
                sync: MirrorSync::Detached,
            },
        );
        drop(st);
        self.changed.notify_waiters();
        match old {
            Role::Owner { followers } => followers.into_iter().map(|f| f.link).collect(),
            Role::Mirror { .. } => Vec::new(),
            Role::Receiving { held, .. } => {
                // The ring moved on before the handoff landed: held work is refused
                // (retryable) and its callers go to the new owner.
                for h in held {
                    if let Held::Publish {
                        reply: HeldReply::Link { link, req_id },
                        ..
                    } = h
                    {
                        link.push_moved(req_id, &self.name);
                    }
                }
                Vec::new()
            }
        }
    }

    /// Drops events beyond the namespace's count and age limits.
    fn trim(&self, st: &mut TopicState, now: Instant) {
        let max_age =
            (self.ns.history_ttl_s > 0).then(|| Duration::from_secs(self.ns.history_ttl_s));
        let mut freed = 0;
        while let Some(front) = st.history.front() {
            let too_many = st.history.len() > self.ns.history_size;
            let too_old = max_age.is_some_and(|age| now.duration_since(front.sequenced_at) > age);
            if !(too_many || too_old) {
                break;
            }
            freed += front.cost();
            st.history.pop_front();
        }
        if freed > 0 {
            st.history_bytes -= freed;
            self.budget.used.fetch_sub(freed, Ordering::Relaxed);
        }
    }

    /// The events after `cursor`, at most `limit`.
    fn after(
        st: &TopicState,
        cursor: &Cursor,
        limit: usize,
    ) -> Result<Vec<Arc<StoredEvent>>, CursorProblem> {
        let current = Cursor::new(&*st.epoch, st.last_offset);
        if cursor.epoch != *st.epoch {
            return Err(CursorProblem::Gone { current });
        }
        if cursor.offset > st.last_offset {
            return Err(CursorProblem::Ahead { current });
        }
        if cursor.offset == st.last_offset {
            return Ok(Vec::new());
        }
        let first = match st.history.front() {
            Some(ev) => ev.offset,
            None => return Err(CursorProblem::Gone { current }),
        };
        if cursor.offset + 1 < first {
            return Err(CursorProblem::Gone { current });
        }
        let skip = (cursor.offset + 1 - first) as usize;
        Ok(st.history.iter().skip(skip).take(limit).cloned().collect())
    }

    /// A history page after `since` (or from now without it).
    pub fn read(
        &self,
        since: Option<&Cursor>,
        limit: usize,
    ) -> Result<Result<Page, CursorProblem>, Dead> {
        let st = self.served()?;
        let from = since.map_or(st.last_offset, |c| c.offset);
        let events = match since {
            Some(c) => match Self::after(&st, c, limit) {
                Ok(evs) => evs,
                Err(p) => return Ok(Err(p)),
            },
            None => Vec::new(),
        };
        let next = events.last().map_or(from, |e| e.offset);
        Ok(Ok(Page {
            epoch: st.epoch.clone(),
            events,
            next,
            last_offset: st.last_offset,
        }))
    }

    /// The newest `limit` events still in history.
    pub fn tail(&self, limit: usize) -> Result<Result<Page, CursorProblem>, Dead> {
        let st = self.served()?;
        let skip = st.history.len().saturating_sub(limit);
        let events: Vec<_> = st.history.iter().skip(skip).cloned().collect();
        Ok(Ok(Page {
            epoch: st.epoch.clone(),
            next: st.last_offset,
            last_offset: st.last_offset,
            events,
        }))
    }

    /// The last event, if still in history, and the current cursor.
    pub fn state(&self) -> Result<(Cursor, Option<Arc<StoredEvent>>), Dead> {
        let st = self.served()?;
        let last = st
            .history
            .back()
            .filter(|e| e.offset == st.last_offset)
            .cloned();
        Ok((Cursor::new(&*st.epoch, st.last_offset), last))
    }

    /// Registers a subscriber and returns what it must be sent first. `on_snapshot`
    /// runs under the topic's lock, so whatever it queues precedes every later event.
    ///
    /// `max_recover_bytes` bounds a recovery: one that would not fit is reported as not
    /// recovered (the client re-reads state) rather than overflowing the session.
    pub fn subscribe(
        &self,
        id: u64,
        sub: Subscriber,
        since: Option<&Cursor>,
        snapshot: bool,
        max_recover_bytes: usize,
        on_snapshot: impl FnOnce(&Snapshot),
    ) -> Result<Result<(), CursorProblem>, Dead> {
        let mut st = self.served()?;
        let snap = match since {
            None => Snapshot {
                epoch: st.epoch.clone(),
                offset: st.last_offset,
                recovered: None,
                events: if snapshot {
                    st.history
                        .back()
                        .filter(|e| e.offset == st.last_offset)
                        .cloned()
                        .into_iter()
                        .collect()
                } else {
                    Vec::new()
                },
            },
            Some(c) => match Self::after(&st, c, usize::MAX) {
                Ok(events)
                    if events.iter().map(|e| e.cost()).sum::<usize>() <= max_recover_bytes =>
                {
                    Snapshot {
                        epoch: st.epoch.clone(),
                        offset: st.last_offset,
                        recovered: Some(true),
                        events,
                    }
                }
                Ok(_) | Err(CursorProblem::Gone { .. }) => Snapshot {
                    epoch: st.epoch.clone(),
                    offset: st.last_offset,
                    recovered: Some(false),
                    events: Vec::new(),
                },
                Err(p @ CursorProblem::Ahead { .. }) => return Ok(Err(p)),
            },
        };
        on_snapshot(&snap);
        if self.ns.presence && sub.wants_presence {
            let join = presence_push(&self.name, "join", &sub.client, sub.user.as_deref());
            self.push_presence(&mut st, join);
        }
        // Owed every fan-out job from here on: exactly the events after `snap`.
        st.members.join(id, sub);
        if st.members.len() == 1 {
            self.interest.changed(&self.name, true);
        }
        st.last_active = Instant::now();
        drop(st);
        self.fan.kick();
        Ok(Ok(()))
    }

    pub fn unsubscribe(&self, id: u64) {
        let mut st = self.lock();
        if let Some(sub) = st.members.leave(id) {
            st.last_active = Instant::now();
            if self.ns.presence && sub.wants_presence && !st.dead {
                let leave = presence_push(&self.name, "leave", &sub.client, sub.user.as_deref());
                self.push_presence(&mut st, leave);
            }
            if st.members.is_empty() {
                self.interest.changed(&self.name, false);
            }
            drop(st);
            self.fan.kick();
        }
    }

    /// Queues a presence push (the caller kicks the fan-out after the lock).
    fn push_presence(&self, st: &mut TopicState, frame: Bytes) {
        st.members.enqueue(&self.fan, Item::Presence(frame));
    }

    /// Who is subscribed, at most `max` entries.
    pub fn presence(&self, max: usize) -> Vec<PresenceEntry> {
        let st = self.lock();
        st.members
            .subscribers()
            .take(max)
            .map(|s| PresenceEntry {
                client: s.client.to_string(),
                user: s.user.as_deref().map(str::to_owned),
            })
            .collect()
    }

    pub fn subscriber_count(&self) -> usize {
        self.lock().members.len()
    }

    /// Periodic upkeep: drops aged history. Returns whether the topic is idle and
    /// empty for `idle_ttl` (a mirror: without subscribers, whatever its copy of history
    /// holds), in which case it has been marked dead and must be removed.
    pub fn sweep(&self, now: Instant, idle_ttl: Duration) -> bool {
        let mut st = self.lock();
        self.trim(&mut st, now);
        let mirror = matches!(st.role, Role::Mirror { .. });
        // Held work, or peers that follow it, keep a topic alive like local subscribers.
        if let Role::Owner { followers } = &mut st.role {
            followers.retain(|f| !f.link.is_closed());
        }
        let busy = match &st.role {
            Role::Receiving { .. } => true,
            Role::Owner { followers } => !followers.is_empty(),
            Role::Mirror { .. } => false,
        };
        let forget = !busy
            && st.members.is_empty()
            && (mirror || st.history.is_empty())
            && now.duration_since(st.last_active) >= idle_ttl;
        if forget {
            st.dead = true;
            if mirror {
                // A mirror's history is a copy: give its budget back.
                self.clear_history(&mut st);
                st.history = VecDeque::new();
            }
        }
        forget
    }

    /// Marks the topic in use (a read on a mirror keeps it followed for the idle TTL).
    pub fn touch(&self) {
        self.lock().last_active = Instant::now();
    }

    /// When it last published or changed subscribers, and its history size.
    pub fn activity(&self) -> (Instant, usize) {
        let st = self.lock();
        (st.last_active, st.history_bytes)
    }

    /// Drops the oldest events until at most `keep` remain; returns bytes freed.
    pub fn evict_history(&self, keep: usize) -> usize {
        let mut st = self.lock();
        let mut freed = 0;
        while st.history.len() > keep {
            if let Some(ev) = st.history.pop_front() {
                freed += ev.cost();
            }
        }
        if st.history.is_empty() {
            st.history = VecDeque::new();
        }
        st.history_bytes -= freed;
        self.budget.used.fetch_sub(freed, Ordering::Relaxed);
        freed
    }

    pub fn history_len(&self) -> usize {
        self.lock().history.len()
    }
}

fn presence_push(topic: &str, what: &str, client: &str, user: Option<&str>) -> Bytes {
    let entry = PresenceEntry {
        client: client.to_owned(),
        user: user.map(str::to_owned),
    };
    let body = serde_json::json!({ "push": { "topic": topic, what: entry } });
    // Only WebSocket sessions ask for presence pushes, so this is a WS frame.
    crate::session::wsframe::text(&serde_json::to_vec(&body).expect("presence push serialises"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A topic waiting for `old`'s handoff.
    fn receiving_from_old() -> Topic {
        Topic::new_receiving(
            "t".into(),
            Arc::new(NamespaceConfig::default()),
            "old".into(),
            Arc::new(HistoryBudget::new(1 << 30)),
            Arc::default(),
            Arc::default(),
        )
    }

    /// One publish with no reply to hold it with (the topic is live).
    fn publish_one(
        t: &Topic,
        data: &'static [u8],
        key: Option<&str>,
        idem: (Duration, usize),
        stats: &Stats,
    ) -> Result<Published, Elsewhere> {
        t.publish(Bytes::from_static(data), None, key, idem, stats, &mut None)
            .expect("the topic is live")
    }
    use crate::config::SlowConsumerPolicy;
    use crate::session::outbox::Frame;
    use crate::topic::follow::recorder::{Queued, Recorder};

    fn topic(history_size: usize) -> Topic {
        topic_counted(history_size, Arc::default())
    }

    fn topic_counted(history_size: usize, fanout: Arc<FanOutShared>) -> Topic {
        let ns = NamespaceConfig {
            history_size,
            ..Default::default()
        };
        Topic::new(
            "t".into(),
            Arc::new(ns),
            "ep".into(),
            Arc::new(HistoryBudget::new(1 << 30)),
            Arc::default(),
            fanout,
        )
    }

    fn publish(t: &Topic, n: usize, stats: &Stats) {
        for i in 0..n {
            t.publish(
                Bytes::from(i.to_string()),
                None,
                None,
                (Duration::from_secs(60), 100),
                stats,
                &mut None,
            )
            .unwrap()
            .unwrap();
        }
    }

    #[test]
    fn offsets_contiguous_and_history_bounded() {
        let stats = Stats::detached();
        let t = topic(5);
        publish(&t, 12, &stats);
        assert_eq!(t.cursor().unwrap(), Cursor::new("ep", 12));
        assert_eq!(t.history_len(), 5);
        let page = t.read(Some(&Cursor::new("ep", 9)), 100).unwrap().unwrap();
        assert_eq!(
            page.events.iter().map(|e| e.offset).collect::<Vec<_>>(),
            vec![10, 11, 12]
        );
        assert_eq!(page.next, 12);
    }

    #[test]
    fn history_ages_out() {
        let stats = Stats::detached();
        let ns = NamespaceConfig {
            history_ttl_s: 60,
            ..Default::default()
        };
        let budget = Arc::new(HistoryBudget::new(1 << 30));
        let t = Topic::new(
            "t".into(),
            Arc::new(ns),
            "ep".into(),
            budget.clone(),
            Arc::default(),
            Arc::default(),
        );
        publish(&t, 3, &stats);
        assert!(budget.used.load(Ordering::Relaxed) > 0);
        assert!(!t.sweep(
            Instant::now() + Duration::from_secs(30),
            Duration::from_secs(600)
        ));
        assert_eq!(t.history_len(), 3, "younger than the TTL: kept");
        t.sweep(
            Instant::now() + Duration::from_secs(61),
            Duration::from_secs(600),
        );
        assert_eq!(t.history_len(), 0, "older than the TTL: dropped");
        assert_eq!(
            budget.used.load(Ordering::Relaxed),
            0,
            "the budget is given back"
        );
        assert_eq!(
            t.cursor().unwrap().offset,
            3,
            "the offset survives its history"
        );
    }

    #[test]
    fn cursor_rules() {
        let stats = Stats::detached();
        let t = topic(5);
        publish(&t, 12, &stats);
        let current = Cursor::new("ep", 12);
        // Offsets 8..=12 are kept: since=7 is still whole, since=6 is gone.
        assert!(t.read(Some(&Cursor::new("ep", 7)), 100).unwrap().is_ok());
        assert_eq!(
            t.read(Some(&Cursor::new("ep", 6)), 100)
                .unwrap()
                .unwrap_err(),
            CursorProblem::Gone {
                current: current.clone()
            }
        );
        assert_eq!(
            t.read(Some(&Cursor::new("other", 12)), 100)
                .unwrap()
                .unwrap_err(),
            CursorProblem::Gone {
                current: current.clone()
            }
        );
        assert_eq!(
            t.read(Some(&Cursor::new("ep", 13)), 100)
                .unwrap()
                .unwrap_err(),
            CursorProblem::Ahead {
                current: current.clone()
            }
        );
        let page = t.read(Some(&current), 100).unwrap().unwrap();
        assert!(page.events.is_empty());
        assert_eq!(page.next, 12);
        let page = t.read(None, 100).unwrap().unwrap();
        assert_eq!((page.events.len(), page.next), (0, 12));
    }

    #[test]
    fn idempotency_key_dedupes() {
        let stats = Stats::detached();
        let t = topic(10);
        let w = (Duration::from_secs(60), 100);
        let a = publish_one(&t, b"1", Some("k1"), w, &stats).unwrap();
        let b = publish_one(&t, b"1", Some("k1"), w, &stats).unwrap();
        let c = publish_one(&t, b"1", Some("k2"), w, &stats).unwrap();
        assert_eq!((a.offset, a.duplicate), (1, false));
        assert_eq!((b.offset, b.duplicate), (1, true));
        assert_eq!(c.offset, 2);
    }

    #[test]
    fn idempotency_window_is_bounded() {
        let stats = Stats::detached();
        let t = topic(10);
        let w = (Duration::from_secs(60), 3);
        for k in ["a", "b", "c", "d", "e"] {
            publish_one(&t, b"1", Some(k), w, &stats).unwrap();
        }
        // "a" fell out of the 3-key window, so it publishes anew.
        let again = publish_one(&t, b"1", Some("a"), w, &stats).unwrap();
        assert!(!again.duplicate);
    }

    #[test]
    fn subscribe_snapshot_then_pushes_exactly_once() {
        let stats = Stats::detached();
        let t = topic(100);
        publish(&t, 3, &stats);
        let outbox = Arc::new(Outbox::new(1 << 20));
        let sub = Subscriber {
            outbox: outbox.clone(),
            client: "c".into(),
            user: None,
            wants_presence: false,
        };
        let mut seen = Vec::new();
        t.subscribe(
            1,
            sub,
            Some(&Cursor::new("ep", 1)),
            false,
            usize::MAX,
            |snap| {
                assert_eq!(snap.recovered, Some(true));
                seen.extend(snap.events.iter().map(|e| e.offset));
            },
        )
        .unwrap()
        .unwrap();
        publish(&t, 2, &stats);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut out = Vec::new();
        rt.block_on(outbox.next_batch(&mut out, usize::MAX))
            .unwrap();
        for e in out {
            if let Frame::Event(ev) = e.frame {
                seen.push(ev.offset);
            }
        }
        assert_eq!(seen, vec![2, 3, 4, 5]);
    }

    #[test]
    fn slow_subscriber_is_cut_off_and_counted() {
        let stats = Stats::detached();
        let t = topic_counted(100, stats.fanout(None));
        let _outbox = subscribe_with_budget(&t, 1000);
        publish(&t, 50, &stats);
        assert_eq!(stats.slow_consumer_closes.get(), 1);
        let _ = SlowConsumerPolicy::Disconnect;
    }

    #[test]
    fn sweep_forgets_only_idle_empty_topics() {
        let stats = Stats::detached();
        let t = topic(2);
        assert!(
            !t.sweep(Instant::now(), Duration::from_secs(60)),
            "fresh topic is not idle"
        );
        assert!(t.sweep(
            Instant::now() + Duration::from_secs(61),
            Duration::from_secs(60)
        ));
        assert!(t.cursor().is_err(), "a forgotten topic refuses work");
        let t = topic(2);
        publish(&t, 1, &stats);
        assert!(!t.sweep(
            Instant::now() + Duration::from_secs(61),
            Duration::from_secs(60)
        ));
    }

    fn relayed(epoch: &str, offset: u64) -> Relayed {
        Relayed {
            epoch: epoch.into(),
            offset,
            ts: 0,
            kind: None,
            data: Bytes::from(offset.to_string()),
        }
    }

    fn mirror(owner: &str) -> Topic {
        Topic::new_mirror(
            "t".into(),
            Arc::new(NamespaceConfig::default()),
            owner.into(),
            Arc::new(HistoryBudget::new(1 << 30)),
            Arc::default(),
            Arc::default(),
        )
    }

    fn subscribe_to(t: &Topic) -> Arc<Outbox> {
        subscribe_with_budget(t, 1 << 20)
    }

    /// Subscribes a session whose outbox holds `budget` bytes.
    fn subscribe_with_budget(t: &Topic, budget: usize) -> Arc<Outbox> {
        let outbox = Arc::new(Outbox::new(budget));
        let sub = Subscriber {
            outbox: outbox.clone(),
            client: "c".into(),
            user: None,
            wants_presence: false,
        };
        t.subscribe(1, sub, None, false, usize::MAX, |_| {})
            .unwrap()
            .unwrap();
        outbox
    }

    fn drain(outbox: &Outbox) -> Vec<String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let mut out = Vec::new();
        while outbox.queued_bytes() > 0 {
            rt.block_on(outbox.next_batch(&mut out, usize::MAX))
                .unwrap();
        }
        out.into_iter()
            .map(|e| match e.frame {
                Frame::Event(ev) => format!("{}:{}", ev.epoch, ev.offset),
                Frame::Reset { epoch, offset, .. } => format!("reset {epoch}:{offset}"),
                Frame::Control(_) => "control".into(),
            })
            .collect()
    }

    #[test]
    fn a_snapshot_that_lands_before_the_follow_call_returns_is_kept() {
        let stats = Stats::detached();
        let t = mirror("o");
        let owner: Arc<str> = "o".into();
        // The follow is marked first; the owner's snapshot then lands at once.
        let at = Instant::now();
        let prev = t.mark_follow_requested(at).expect("a mirror");
        assert_eq!(prev, MirrorSync::Detached);
        t.apply_followed(&owner, false, "ep", 1, vec![relayed("ep", 1)], &stats);
        // Undoing a mark that has been overtaken changes nothing.
        t.unmark_follow_requested(at, prev);
        assert_eq!(
            t.apply_relayed("o", relayed("ep", 2), &stats),
            Applied::Delivered,
            "the mirror follows: the stream after the snapshot is applied"
        );
        // A mark whose frame never went out is undone.
        let at = Instant::now();
        let prev = t.mark_follow_requested(at).unwrap();
        t.unmark_follow_requested(at, prev);
        assert_eq!(
            t.apply_relayed("o", relayed("ep", 3), &stats),
            Applied::Delivered
        );
    }

    #[test]
    fn a_mirror_serves_nothing_until_its_snapshot_then_follows_in_order() {
        let stats = Stats::detached();
        let t = mirror("o");
        let owner: Arc<str> = "o".into();
        assert!(!t.is_ready());
        assert!(t.cursor().is_err(), "a fresh mirror has no state to serve");
        let out = t.apply_followed(
            &owner,
            false,
            "ep",
            2,
            vec![relayed("ep", 1), relayed("ep", 2)],
            &stats,
        );
        assert_eq!(out, FollowOutcome::Adopted);
        assert!(t.is_ready());
        assert_eq!(t.cursor().unwrap(), Cursor::new("ep", 2));
        let outbox = subscribe_to(&t);
        assert_eq!(
            t.apply_relayed("o", relayed("ep", 3), &stats),
            Applied::Delivered
        );
        assert_eq!(
            t.apply_relayed("o", relayed("ep", 3), &stats),
            Applied::Stale
        );
        assert_eq!(
            t.apply_relayed("x", relayed("ep", 4), &stats),
            Applied::NotFollowing,
            "only the owner's stream is applied"
        );
        // A hole is never delivered: the mirror detaches.
        assert_eq!(t.apply_relayed("o", relayed("ep", 5), &stats), Applied::Gap);
        assert!(!t.is_ready());
        assert_eq!(
            t.apply_relayed("o", relayed("ep", 4), &stats),
            Applied::NotFollowing
        );
        // The next snapshot reaches back to it: the missed events are delivered.
        let hist = (2..=5).map(|o| relayed("ep", o)).collect();
        assert_eq!(
            t.apply_followed(&owner, false, "ep", 5, hist, &stats),
            FollowOutcome::CaughtUp(2)
        );
        assert_eq!(drain(&outbox), ["ep:3", "ep:4", "ep:5"]);
        // One that does not (or another epoch) resets the sessions to the owner's cursor.
        t.set_mirror_sync(MirrorSync::Detached);
        let out = t.apply_followed(&owner, false, "ep2", 7, vec![relayed("ep2", 7)], &stats);
        assert_eq!(out, FollowOutcome::Reset);
        assert_eq!(drain(&outbox), ["reset ep2:7"]);
        assert_eq!(t.cursor().unwrap(), Cursor::new("ep2", 7));
    }

    #[test]
    fn handoff_keeps_epoch_offsets_idempotency_and_runs_held_work_in_order() {
        let stats = Stats::detached();
        let idem = (Duration::from_secs(60), 100);
        let old = topic(100);
        for k in ["k1", "k2", "k3"] {
            publish_one(&old, b"1", Some(k), idem, &stats).unwrap();
        }
        let link = Recorder::default();
        let to: Arc<str> = "new".into();
        assert!(old.hand_off(&to, &link, 7, 1 << 20).is_some());
        assert_eq!(
            publish_one(&old, b"1", None, idem, &stats).unwrap_err(),
            Elsewhere::Owner(to.clone()),
            "the old owner sequences nothing after the handoff"
        );
        let h = match link.take().as_slice() {
            [Queued::Handoff(h)] => h.clone(),
            other => panic!("expected one handoff, got {other:?}"),
        };
        assert_eq!(
            (h.epoch.as_str(), h.last_offset, h.history.len()),
            ("ep", 3, 3)
        );
        assert_eq!(h.idempotency.len(), 3);
        let digest = idempotency::body_digest(None, b"1");
        assert!(
            h.idempotency.iter().all(|e| e.digest == Some(digest)),
            "each key travels with its body's digest"
        );

        // The new owner was waiting, with a publish held.
        let new = receiving_from_old();
        assert_eq!(
            publish_one(&new, b"1", None, idem, &stats).unwrap_err(),
            Elsewhere::Moving
        );
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let mut reply = Some(HeldReply::Local(tx));
        assert_eq!(
            new.publish(
                Bytes::from_static(b"2"),
                None,
                None,
                idem,
                &stats,
                &mut reply
            )
            .unwrap()
            .unwrap_err(),
            Elsewhere::Held
        );
        assert!(reply.is_none(), "the reply is kept with the held publish");
        let handover = Handover {
            epoch: h.epoch,
            last_offset: h.last_offset,
            history: h
                .history
                .into_iter()
                .map(|e| Relayed {
                    epoch: e.epoch,
                    offset: e.offset,
                    ts: e.ts,
                    kind: e.r#type.map(Into::into),
                    data: e.data,
                })
                .collect(),
            idempotency: h
                .idempotency
                .into_iter()
                .map(|e| (e.key, e.offset, Duration::from_millis(e.age_ms), e.digest))
                .collect(),
        };
        assert!(new.apply_handoff("old", handover, idem, &stats));
        let held = rx
            .try_recv()
            .expect("the held publish ran when the state landed");
        assert_eq!(
            (&*held.epoch, held.offset),
            ("ep", 4),
            "same epoch, next offset"
        );
        let replay = publish_one(&new, b"1", Some("k2"), idem, &stats).unwrap();
        assert_eq!(
            (replay.offset, replay.duplicate, replay.conflict),
            (2, true, false),
            "idempotency moved too"
        );
        let page = new.read(Some(&Cursor::new("ep", 0)), 100).unwrap().unwrap();
        assert_eq!(page.events.len(), 4, "history moved with it");
        // The digests came with the handoff, so a reuse with another body conflicts
        // even once the event is gone from history.
        new.clear_history(&mut new.lock());
        let other = publish_one(&new, b"2", Some("k2"), idem, &stats).unwrap();
        assert_eq!((other.offset, other.conflict), (2, true));
    }

    #[test]
    fn a_handed_over_key_conflicts_by_its_sent_digest_when_its_event_did_not_come_along() {
        let stats = Stats::detached();
        let idem = (Duration::from_secs(60), 100);
        let new = receiving_from_old();
        // The history did not fit in the handoff; the key's digest did.
        let handover = Handover {
            epoch: "ep".into(),
            last_offset: 5,
            history: Vec::new(),
            idempotency: vec![(
                "k".into(),
                5,
                Duration::ZERO,
                Some(idempotency::body_digest(None, b"x")),
            )],
        };
        assert!(new.apply_handoff("old", handover, idem, &stats));
        let other = publish_one(&new, b"y", Some("k"), idem, &stats).unwrap();
        assert_eq!(
            (other.offset, other.duplicate, other.conflict),
            (5, true, true)
        );
        let same = publish_one(&new, b"x", Some("k"), idem, &stats).unwrap();
        assert_eq!(
            (same.offset, same.duplicate, same.conflict),
            (5, true, false)
        );
    }

    #[test]
    fn an_owner_with_followers_is_not_forgotten() {
        let t = topic(10);
        let link = Arc::new(Recorder::default());
        t.follow(&"peer".into(), link.clone(), 1 << 20)
            .unwrap()
            .unwrap();
        let later = Instant::now() + Duration::from_secs(3600);
        assert!(
            !t.sweep(later, Duration::from_secs(60)),
            "a peer follows it"
        );
        link.close();
        assert!(
            t.sweep(later, Duration::from_secs(60)),
            "its follower is gone"
        );
    }
}
