//! Bringing topic placements in line with the committed ring: the maintenance loop,
//! reconcile passes, handoffs out, follows of mirrors, interest of new owners.
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use weft_proto::grpc::relay_frame::Kind;
use weft_proto::grpc::{self};

use crate::error::ApiError;
use crate::node::Node;
use crate::topic::{MirrorSync, Placement, Topic};

use super::*;

impl Relay {
    /// Notes a ring version a peer acted under. A version that never arrives here
    /// (a confused or hostile peer) stops holding placements after HANDOFF_TIMEOUT.
    pub(super) fn heard_of_ring(&self, version: u64) {
        if self.newest_ring_heard.fetch_max(version, Ordering::Relaxed) < version {
            *lock(&self.ring_heard_at) = Instant::now();
        }
    }

    /// Background repair: follows a mirror again only if sessions here watch it (a
    /// mirror made by a forwarded publish, or one whose readers are gone, is left
    /// alone; a read follows it on demand), and asks the next pass to check on it.
    pub(super) fn refollow(&self, topic: &Topic, owner: &str) {
        if topic.subscriber_count() > 0 {
            self.request_follow(topic, owner);
            self.repair.store(true, Ordering::Relaxed);
        }
    }

    /// Sends `Follow` for a mirror to its owner, if a link is up.
    pub(super) fn request_follow(&self, topic: &Topic, owner: &str) {
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
                                t.hand_off(&to, &*link, slots.version, HANDOFF_BYTES)
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
    pub fn placement_fn(self: &Arc<Self>) -> crate::topic::registry::PlaceFn {
        let relay = self.clone();
        Arc::new(move |topic: &str| {
            let slots = relay.cluster.slots();
            match slots.owner(topic) {
                Some(owner) if owner != &*relay.me => {
                    crate::topic::registry::Place::Remote(owner.into())
                }
                Some(_) => match lock(&relay.incoming).get(&weft_router::ring::slot_of(topic)) {
                    Some(a) => crate::topic::registry::Place::Incoming(a.from.clone()),
                    None => crate::topic::registry::Place::Here,
                },
                None => crate::topic::registry::Place::Here,
            }
        })
    }

    /// A new owner sends `Followed` to every node the registry says is interested in
    /// the topics it owns, so their subscribers continue without re-subscribing.
    pub(super) fn load_interest(&self, node: &Node, slots: &weft_router::ring::SlotTable) {
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
                        .with_topic(&topic, |t| t.follow(&peer.id, link.clone(), SNAPSHOT_BYTES));
                }
            }
        }
    }

    /// Follows membership and ring changes until [`Relay::shutdown`]: links to
    /// members, topic placements, a pass every 10 s, every second while a repair is flagged.
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
