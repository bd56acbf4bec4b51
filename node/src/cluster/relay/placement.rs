//! Where a topic lives, as the data path asks it: waiting until a mirror holds its
//! owner's state, following owners, where a new topic starts, and the interest a new
//! owner inherits. The decisions that move topics are `plan.rs`, carried out by the
//! control task (`control.rs`).
use std::sync::Arc;
use std::time::{Duration, Instant};

use weft_proto::grpc::relay_frame::Kind;
use weft_proto::grpc::{self};

use crate::error::ApiError;
use crate::node::Node;
use crate::topic::{MirrorSync, Placement, Topic};

use super::*;

impl Relay {
    /// Background repair: follows a mirror again only if sessions here watch it (a
    /// mirror made by a forwarded publish, or one whose readers are gone, is left
    /// alone; a read follows it on demand). True if it asked: the next pass should
    /// check on it.
    #[must_use = "a mirror that asked wants a repair pass"]
    pub(super) fn refollow(&self, topic: &Topic, owner: &str) -> bool {
        let ask = topic.subscriber_count() > 0;
        if ask {
            self.request_follow(topic, owner);
        }
        ask
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
        // Marked before it is sent: the snapshot may come back before the next line.
        let at = Instant::now();
        let prev = topic.mark_follow_requested(at);
        if !link.push_control(frame) {
            if let Some(prev) = prev {
                topic.unmark_follow_requested(at, prev);
            }
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
            // A publish or a sync change: either way, look again.
            let _ = tokio::time::timeout(wait, changed).await;
        }
    }

    /// Where a topic this node does not hold yet belongs: owned elsewhere, owned here,
    /// or owned here once its old owner's handoff lands.
    pub fn placement_fn(self: &Arc<Self>) -> crate::topic::registry::PlaceFn {
        use crate::topic::registry::Place;
        let relay = self.clone();
        Arc::new(move |topic: &str| {
            let planned = relay.planned.read().unwrap_or_else(|p| p.into_inner());
            match planned.slots.owner(topic) {
                Some(owner) if owner != &*relay.me => Place::Remote(owner.into()),
                Some(_) => match planned.awaiting.get(&weft_router::ring::slot_of(topic)) {
                    Some(from) => Place::Incoming(from.clone()),
                    None => Place::Here,
                },
                None => Place::Here,
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
}
