//! A peer node that follows a topic, as the topic sees it.
//!
//! An owner relays every event to the nodes that follow the topic, under the same lock
//! as its local fan-out, so a follower sees the snapshot first and then every event in
//! order. The topic needs only to *queue* things for a peer; how they are encoded and
//! sent is the relay's business ([`crate::cluster::relay::LinkQueue`] implements this
//! trait). Keeping the trait here is what lets `topic` never name a relay type.
//!
//! Methods are called under the topic's lock (and some after it): they must only
//! queue, never block.

use std::sync::Arc;

use weft_proto::grpc::{Followed, Handoff};

use crate::session::event::StoredEvent;

use super::Published;

/// What happened to an event queued for a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// Over the link's event budget: the peer is lagging.
    Full,
    Closed,
}

/// The outgoing side of one peer's link.
pub trait PeerLink: Send + Sync + std::fmt::Debug {
    /// Queues one event (its relay encoding is made once per event and shared).
    fn push_event(&self, ev: &Arc<StoredEvent>) -> Push;
    /// Tells the peer it no longer receives `topic`'s events on this link.
    fn push_lagged(&self, topic: &str);
    /// Queues the snapshot that starts a follow; false if the link is gone.
    fn push_followed(&self, snapshot: Followed) -> bool;
    /// Queues a topic's whole state for its new owner; false if the link is gone.
    fn push_handoff(&self, handoff: Handoff) -> bool;
    /// Answers a publish the peer forwarded.
    fn push_ack(&self, req_id: u64, published: &Published);
    /// Answers a held publish whose topic moved on before its handoff landed: the
    /// peer asks the owner its ring names next.
    fn push_moved(&self, req_id: u64, topic: &str);
    fn is_closed(&self) -> bool;
}

/// A link that records what a topic queued on it (unit tests).
#[cfg(test)]
pub mod recorder {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    pub enum Queued {
        Event(u64),
        Lagged(String),
        Followed(Followed),
        Handoff(Handoff),
        Ack(u64, u64),
        Moved(u64),
    }

    #[derive(Debug, Default)]
    pub struct Recorder {
        pub queued: Mutex<Vec<Queued>>,
        closed: AtomicBool,
    }

    impl Recorder {
        pub fn close(&self) {
            self.closed.store(true, Ordering::SeqCst);
        }

        pub fn take(&self) -> Vec<Queued> {
            std::mem::take(&mut self.queued.lock().unwrap())
        }

        fn record(&self, q: Queued) -> bool {
            if self.is_closed() {
                return false;
            }
            self.queued.lock().unwrap().push(q);
            true
        }
    }

    impl PeerLink for Recorder {
        fn push_event(&self, ev: &Arc<StoredEvent>) -> Push {
            if self.record(Queued::Event(ev.offset)) {
                Push::Queued
            } else {
                Push::Closed
            }
        }
        fn push_lagged(&self, topic: &str) {
            self.record(Queued::Lagged(topic.into()));
        }
        fn push_followed(&self, snapshot: Followed) -> bool {
            self.record(Queued::Followed(snapshot))
        }
        fn push_handoff(&self, handoff: Handoff) -> bool {
            self.record(Queued::Handoff(handoff))
        }
        fn push_ack(&self, req_id: u64, published: &Published) {
            self.record(Queued::Ack(req_id, published.offset));
        }
        fn push_moved(&self, req_id: u64, _topic: &str) {
            self.record(Queued::Moved(req_id));
        }
        fn is_closed(&self) -> bool {
            self.closed.load(Ordering::SeqCst)
        }
    }
}
