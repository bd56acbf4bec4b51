//! Publishing on a node that may not own the topic: sequence here, hold behind a
//! handoff, or forward to the owner and wait for its ack (a [`Ticket`]).
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use weft_proto::grpc::relay_frame::Kind;
use weft_proto::grpc::{self};

use crate::error::ApiError;
use crate::node::Node;
use crate::topic::{Elsewhere, HeldReply, Published};

use super::*;

/// A publish could not be forwarded.
#[derive(Debug)]
pub(super) enum Forward {
    /// The peer does not own the topic under its ring version.
    NotOwner(u64),
    Failed(ApiError),
}

pub(super) type Pending = oneshot::Sender<Result<Published, Forward>>;

/// A publish sent to its owner, awaiting the ack.
pub(super) struct Sent {
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

pub(super) enum TicketState {
    Done(Result<Published, ApiError>),
    Sent(Sent),
    /// Waiting behind the topic's incoming handoff.
    Held(oneshot::Receiver<Published>),
    /// Not sent (no link to the owner yet, or the topic was moving): the slow path
    /// waits for the link and tries again.
    Retry(Option<Arc<str>>),
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

pub(super) fn unavailable(message: String) -> Forward {
    Forward::Failed(ApiError::Unavailable {
        message,
        retry_after_s: 1,
    })
}

pub(super) fn fail_pending(peer: &Peer, why: &str) {
    let pending: Vec<_> = lock(&peer.pending).drain().map(|(_, tx)| tx).collect();
    for tx in pending {
        let _ = tx.send(Err(Forward::Failed(ApiError::Unavailable {
            message: why.into(),
            retry_after_s: 1,
        })));
    }
}

impl Relay {
    /// Starts a publish without waiting ([`Relay::attempt`]), so publishes started in
    /// order on one link are sequenced in that order. [`Relay::finish`] waits for the
    /// outcome.
    pub fn start_publish(
        &self,
        node: &Node,
        topic: &str,
        data: Bytes,
        kind: Option<Arc<str>>,
        key: Option<&str>,
    ) -> Ticket {
        Ticket {
            state: self.attempt(node, topic, &data, &kind, key),
            topic: topic.to_owned(),
            data,
            kind,
            key: key.map(str::to_owned),
        }
    }

    /// One try at a publish made on this node, without waiting: sequenced here if this
    /// node owns the topic, held behind its handoff if one is on the way (both decided
    /// by [`Node::publish_here`]), else pushed onto the owner's link.
    fn attempt(
        &self,
        node: &Node,
        topic: &str,
        data: &Bytes,
        kind: &Option<Arc<str>>,
        key: Option<&str>,
    ) -> TicketState {
        let (tx, rx) = oneshot::channel();
        let outcome = node.publish_here(topic, data, kind, key, &mut Some(HeldReply::Local(tx)));
        match outcome {
            Err(e) => TicketState::Done(Err(e)),
            Ok(Ok(p)) => TicketState::Done(Ok(p)),
            Ok(Err(Elsewhere::Owner(owner))) => {
                match self.send_publish(node, &owner, topic, data, kind, key) {
                    Ok(sent) => TicketState::Sent(sent),
                    Err(_) => TicketState::Retry(Some(owner)),
                }
            }
            Ok(Err(Elsewhere::Held)) => TicketState::Held(rx),
            Ok(Err(Elsewhere::Full)) => TicketState::Done(Err(ApiError::Unavailable {
                message: "too many publishes wait for this topic's handoff".into(),
                retry_after_s: 1,
            })),
            // Not reached: a reply was given. Try again.
            Ok(Err(Elsewhere::Moving)) => TicketState::Retry(None),
        }
    }

    /// Waits for a started publish; what is not settled (a 421, a held publish whose
    /// handoff did not land, no link yet) is tried again, a bounded number of times.
    pub async fn finish(&self, node: &Node, ticket: Ticket) -> Result<Published, ApiError> {
        let Ticket {
            mut state,
            topic,
            data,
            kind,
            key,
        } = ticket;
        for _ in 0..6 {
            if let Some(result) = self.settle(state).await {
                return result;
            }
            state = self.attempt(node, &topic, &data, &kind, key.as_deref());
        }
        Err(ApiError::Unavailable {
            message: "the topic's ownership is moving; retry".into(),
            retry_after_s: 1,
        })
    }

    /// Waits for one try's outcome; `None` if it must be tried again (after waiting,
    /// bounded, for what it lacked: the ring the owner named, the link to the owner).
    async fn settle(&self, state: TicketState) -> Option<Result<Published, ApiError>> {
        match state {
            TicketState::Done(r) => Some(r),
            TicketState::Sent(sent) => match self.await_ack(sent).await {
                Ok(p) => Some(Ok(p)),
                Err(Forward::Failed(e)) => Some(Err(e)),
                Err(Forward::NotOwner(v)) => {
                    self.catch_up_ring(v).await;
                    None
                }
            },
            TicketState::Held(rx) => match tokio::time::timeout(HANDOFF_TIMEOUT * 2, rx).await {
                Ok(Ok(p)) => Some(Ok(p)),
                _ => None,
            },
            TicketState::Retry(owner) => {
                match owner.and_then(|o| self.peer(&o)) {
                    Some(peer) => wait_for_link(&peer, Duration::from_secs(2)).await,
                    None => tokio::time::sleep(Duration::from_millis(20)).await,
                }
                None
            }
        }
    }

    /// A peer answered 421 under `peer_version`: wait (bounded) for that ring here,
    /// and for the control task's pass under it, before asking again.
    pub(super) async fn catch_up_ring(&self, peer_version: u64) {
        let v = peer_version.max(self.cluster.ring_version() + 1);
        self.cluster.wait_ring(v, Duration::from_secs(2)).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.pass()).await;
    }

    /// Pushes a publish onto the owner's link (no waiting).
    pub(super) fn send_publish(
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

    pub(super) async fn await_ack(&self, sent: Sent) -> Result<Published, Forward> {
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
}
