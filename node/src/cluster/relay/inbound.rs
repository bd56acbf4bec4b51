//! What a link delivers: each frame a peer sends, dispatched to the owner side
//! (publishes, follows) or the mirror side (snapshots, events, handoffs).
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tracing::{debug, info, warn};
use weft_proto::grpc::relay_frame::Kind;
use weft_proto::grpc::{self, RelayBatch, RelayFrame};

use crate::error::ApiError;
use crate::node::Node;
use crate::topic::{
    Applied, Elsewhere, FollowOutcome, Handover, HeldReply, MirrorSync, Placement, Published,
};

use super::*;

impl Relay {
    pub(super) fn handle_batch(
        &self,
        node: &Node,
        peer: &Arc<Peer>,
        queue: &Arc<LinkQueue>,
        batch: RelayBatch,
        to_control: &mut Vec<control::Msg>,
    ) -> Result<(), String> {
        for raw in batch.frames {
            let frame = RelayFrame::decode(raw).map_err(|e| format!("undecodable frame: {e}"))?;
            let kind = frame.kind.ok_or("empty frame")?;
            self.handle_frame(node, peer, queue, kind, to_control)?;
        }
        Ok(())
    }

    pub(super) fn handle_frame(
        &self,
        node: &Node,
        peer: &Arc<Peer>,
        queue: &Arc<LinkQueue>,
        kind: Kind,
        to_control: &mut Vec<control::Msg>,
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
                        if self.refollow(&t, &peer.id) {
                            to_control.push(control::Msg::Repair);
                        }
                    }
                }
                Ok(())
            }
            Kind::Handoff(h) => self.apply_handoff(node, peer, h),
            Kind::HandoffDone(d) => {
                // After the handoffs before it on this link, which are applied already.
                self.heard_of_ring(d.ring_version);
                to_control.push(control::Msg::HandoffDone {
                    from: peer.id.clone(),
                    ring: d.ring_version,
                });
                Ok(())
            }
            Kind::Revoke(r) => self.apply_revoke(node, r),
            Kind::RevocationsSent(_) => {
                self.heard_revocations(node, peer);
                Ok(())
            }
            Kind::Lagged(l) => {
                if let Some(t) = node.registry.get(&l.topic) {
                    if matches!(t.placement(), Placement::Mirror { owner, .. } if owner == peer.id)
                    {
                        t.set_mirror_sync(MirrorSync::Detached);
                        if self.refollow(&t, &peer.id) {
                            to_control.push(control::Msg::Repair);
                        }
                    }
                }
                Ok(())
            }
        }
    }

    pub(super) fn resolve(&self, peer: &Peer, req_id: u64, result: Result<Published, Forward>) {
        if let Some(tx) = lock(&peer.pending).remove(&req_id) {
            let _ = tx.send(result);
        }
    }

    /// Owner side of a forwarded publish: answered now, or (topic arriving by
    /// handoff) held and answered when it lands.
    pub(super) fn serve_publish(&self, node: &Node, queue: &Arc<LinkQueue>, p: grpc::RelayPublish) {
        let req_id = p.req_id;
        let topic = p.topic.clone();
        let reply = match self.check_and_publish(node, queue, p) {
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

    pub(super) fn check_and_publish(
        &self,
        node: &Node,
        queue: &Arc<LinkQueue>,
        p: grpc::RelayPublish,
    ) -> Result<Option<Published>, Forward> {
        weft_proto::validate_topic(&p.topic)
            .map_err(|e| Forward::Failed(ApiError::bad(format!("invalid topic: {e}"))))?;
        let kind = crate::input::event_kind(p.r#type.as_deref()).map_err(Forward::Failed)?;
        let data =
            crate::input::event_data(&p.data, &node.config.limits).map_err(Forward::Failed)?;
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
        let mut reply = Some(HeldReply::Link {
            link: queue.clone(),
            req_id: p.req_id,
        });
        let outcome = node.publish_here(&p.topic, &data, &kind, key, &mut reply);
        match outcome {
            Ok(Ok(published)) => Ok(Some(published)),
            Ok(Err(Elsewhere::Held)) => Ok(None),
            Ok(Err(Elsewhere::Full)) => Err(unavailable(
                "too many publishes wait for this topic's handoff".into(),
            )),
            // Not converted yet, or the handoff landed meanwhile: the sender retries.
            Ok(Err(Elsewhere::Owner(_) | Elsewhere::Moving)) => Err(Forward::NotOwner(version)),
            Err(e) => Err(Forward::Failed(e)),
        }
    }

    /// Owner side of `Follow`: register and snapshot, or say who owns it.
    pub(super) fn serve_follow(
        &self,
        node: &Node,
        peer: &Arc<Peer>,
        queue: &Arc<LinkQueue>,
        topic: &str,
    ) {
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
            .with_topic(topic, |t| t.follow(&peer.id, queue.clone(), SNAPSHOT_BYTES))
        {
            Ok(Ok(())) => {}
            Ok(Err(_)) => refuse(421, "ownership of this topic is moving here".into()),
            Err(e) => refuse(e.code().into(), e.to_string()),
        }
    }

    /// Mirror side of `Followed`.
    pub(super) fn apply_followed(
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
    pub(super) fn apply_handoff(
        &self,
        node: &Node,
        peer: &Arc<Peer>,
        h: grpc::Handoff,
    ) -> Result<(), String> {
        let topic = h.topic.clone();
        self.heard_of_ring(h.ring_version);
        let history = checked_history(node, &h.topic, &h.epoch, h.last_offset, h.history)?;
        let mut idempotency = Vec::with_capacity(h.idempotency.len());
        for e in h.idempotency {
            if e.key.is_empty() || e.key.len() > 255 || e.offset == 0 || e.offset > h.last_offset {
                return Err("handoff: invalid idempotency entry".into());
            }
            idempotency.push((e.key, e.offset, Duration::from_millis(e.age_ms), e.digest));
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
}
