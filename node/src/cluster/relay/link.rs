//! A link's outgoing queue: encoded frames bounded in bytes, drained in batches by
//! the link's pump into its gRPC stream.
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, Notify};
use tracing::warn;
use weft_proto::grpc::relay_frame::Kind;
use weft_proto::grpc::{self, RelayBatch};

use crate::session::event::StoredEvent;
use crate::topic::follow::{PeerLink, Push};
use crate::topic::Published;

use super::*;

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
pub(super) struct LinkInner {
    frames: VecDeque<Bytes>,
    bytes: usize,
    closed: bool,
}

impl LinkQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, LinkInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an event frame unless the link holds its event budget already.
    fn push_event_frame(&self, frame: Bytes) -> Push {
        let mut q = self.lock();
        if q.closed {
            return Push::Closed;
        }
        if q.bytes + frame.len() > LINK_EVENT_BUDGET {
            return Push::Full;
        }
        q.bytes += frame.len();
        q.frames.push_back(frame);
        drop(q);
        self.notify.notify_one();
        Push::Queued
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

    /// What the link holds queued now: (bytes, frames). Its growth is the peer's lag.
    pub fn backlog(&self) -> (usize, usize) {
        let q = self.lock();
        (q.bytes, q.frames.len())
    }

    /// Resolves once everything queued has been handed to gRPC (or the link closed).
    pub(super) async fn flushed(&self) {
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
    pub(super) async fn next_batch(&self) -> Option<Vec<Bytes>> {
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

/// Moves batches from a link's queue into the gRPC stream until either ends.
/// Sends `hello` alone as the link's first batch (the other side takes exactly one
/// frame, the `Hello`, before anything else: a handoff queued the instant the link
/// came up must not share its batch), then the queue's batches until either side ends.
pub(super) async fn pump<T>(
    queue: Arc<LinkQueue>,
    hello: Bytes,
    tx: mpsc::Sender<T>,
    wrap: fn(RelayBatch) -> T,
) {
    let first = RelayBatch {
        frames: vec![hello],
    };
    if tx.send(wrap(first)).await.is_err() {
        queue.close();
        return;
    }
    while let Some(frames) = queue.next_batch().await {
        if tx.send(wrap(RelayBatch { frames })).await.is_err() {
            break;
        }
    }
    queue.close();
}

/// Resolves when the queue is closed (the other half of the link ended it).
pub(super) async fn closed(queue: &LinkQueue) {
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

/// What a topic queues for a peer that follows it, encoded for the wire.
impl PeerLink for LinkQueue {
    fn push_event(&self, ev: &Arc<StoredEvent>) -> Push {
        self.push_event_frame(ev.relay_frame())
    }

    fn push_lagged(&self, topic: &str) {
        self.push_control(encode(Kind::Lagged(grpc::Lagged {
            topic: topic.to_owned(),
        })));
    }

    fn push_followed(&self, snapshot: grpc::Followed) -> bool {
        self.push_control(encode(Kind::Followed(snapshot)))
    }

    fn push_handoff(&self, handoff: grpc::Handoff) -> bool {
        self.push_control(encode(Kind::Handoff(handoff)))
    }

    fn push_ack(&self, req_id: u64, published: &Published) {
        self.push_control(ack_frame(req_id, published));
    }

    fn push_moved(&self, req_id: u64, topic: &str) {
        self.push_control(moved_frame(req_id, topic));
    }

    fn is_closed(&self) -> bool {
        LinkQueue::is_closed(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backlog_is_what_the_pump_has_not_taken() {
        let queue = LinkQueue::default();
        assert_eq!(queue.backlog(), (0, 0));
        assert!(queue.push_control(Bytes::from_static(b"abc")));
        assert!(queue.push_control(Bytes::from_static(b"de")));
        assert_eq!(queue.backlog(), (5, 2));
        let batch = futures_util::FutureExt::now_or_never(queue.next_batch())
            .flatten()
            .expect("queued frames");
        assert_eq!(batch.len(), 2);
        assert_eq!(queue.backlog(), (0, 0));
    }

    #[tokio::test]
    async fn the_hello_travels_alone_even_when_frames_were_queued_before_the_pump_ran() {
        let queue = Arc::new(LinkQueue::default());
        // A handoff the control task queued the instant the link came up.
        assert!(queue.push_control(Bytes::from_static(b"handoff")));
        assert!(queue.push_control(Bytes::from_static(b"done")));
        let (tx, mut rx) = mpsc::channel(4);
        tokio::spawn(pump(queue.clone(), Bytes::from_static(b"hello"), tx, |b| b));
        let first = rx.recv().await.expect("the hello batch");
        assert_eq!(first.frames, vec![Bytes::from_static(b"hello")]);
        let next = rx.recv().await.expect("the queued frames");
        assert_eq!(
            next.frames,
            vec![Bytes::from_static(b"handoff"), Bytes::from_static(b"done")]
        );
        queue.close();
    }
}
