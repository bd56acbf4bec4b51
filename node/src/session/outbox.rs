//! A session's outbound queue, bounded by a byte budget.
//!
//! The fan-out path (under a topic's lock) calls [`Outbox::push_event`]; it never waits
//! and never allocates per recipient beyond one queue slot holding an `Arc`. The
//! session's writer takes everything queued at once ([`Outbox::next_batch`]) and writes
//! it in as few syscalls as the transport allows.
//!
//! # Slow consumers
//! When queued bytes would exceed the budget, the topic's namespace policy applies:
//! - `disconnect`: the queue is dropped at once (its memory freed) and the outbox is
//!   closed with [`CloseReason::SlowConsumer`]; the session closes with 4008 and the
//!   client resumes from its cursors — nothing is lost while the events are in history.
//! - `conflate`: the newest event replaces the one already queued for the same topic,
//!   and the entry remembers the first offset it replaced, so the writer emits a
//!   `skipped {from, to}` push before it: a skip is always marked, never silent. A
//!   topic with nothing queued still gets its event queued, so the queue stays within
//!   the budget plus one event per subscribed topic.
//!
//! Replies to the client's own commands are queued in order with events (a subscribe
//! reply must precede the events after it) and count against the budget; a client
//! that sends commands and never reads is closed as a slow consumer at twice the budget.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::config::SlowConsumerPolicy;
use crate::session::event::StoredEvent;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    SlowConsumer,
    /// The session ended for another reason; further pushes are discarded.
    Gone,
}

#[derive(Debug)]
pub enum Frame {
    Event(Arc<StoredEvent>),
    /// Pre-encoded for this session's transport: replies, presence pushes.
    Control(Bytes),
    /// A topic's history was lost: the subscriber continues from this cursor.
    Reset {
        topic: Arc<str>,
        epoch: Arc<str>,
        offset: u64,
    },
}

#[derive(Debug)]
pub struct Entry {
    pub frame: Frame,
    /// Under conflation: the first offset this entry replaced (0 = nothing skipped).
    pub skipped_from: u64,
    cost: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// Queued by replacing an older event of the same topic.
    Conflated,
    /// Budget exceeded under `disconnect`: the outbox is now closed.
    Overflow,
    /// The outbox was already closed; nothing queued.
    Closed,
}

#[derive(Debug)]
pub struct Outbox {
    inner: Mutex<Inner>,
    notify: Notify,
    budget: usize,
}

#[derive(Debug, Default)]
struct Inner {
    queue: VecDeque<Entry>,
    bytes: usize,
    /// The most bytes ever queued at once (observability and tests).
    peak: usize,
    closed: Option<CloseReason>,
}

impl Outbox {
    pub fn new(budget: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            notify: Notify::new(),
            budget,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Poisoning only follows a panic in a short section that cannot leave the queue
        // inconsistent, so the data is still good.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn push_event(&self, ev: &Arc<StoredEvent>, policy: SlowConsumerPolicy) -> Pushed {
        let cost = ev.cost();
        let mut inner = self.lock();
        if inner.closed.is_some() {
            return Pushed::Closed;
        }
        let result = if inner.bytes + cost <= self.budget {
            Pushed::Queued
        } else {
            match policy {
                SlowConsumerPolicy::Disconnect => {
                    inner.overflow();
                    drop(inner);
                    self.notify.notify_one();
                    return Pushed::Overflow;
                }
                SlowConsumerPolicy::Conflate => {
                    let slot = inner.queue.iter_mut().rev().find(|e| match &e.frame {
                        Frame::Event(queued) => {
                            Arc::ptr_eq(&queued.topic, &ev.topic) || queued.topic == ev.topic
                        }
                        Frame::Control(_) | Frame::Reset { .. } => false,
                    });
                    if let Some(slot) = slot {
                        let Frame::Event(old) = &slot.frame else {
                            unreachable!("matched an event")
                        };
                        if slot.skipped_from == 0 {
                            slot.skipped_from = old.offset;
                        }
                        let old_cost = slot.cost;
                        slot.frame = Frame::Event(ev.clone());
                        slot.cost = cost;
                        inner.bytes -= old_cost;
                        inner.add(cost);
                        return Pushed::Conflated;
                    }
                    Pushed::Queued
                }
            }
        };
        inner.add(cost);
        inner.queue.push_back(Entry {
            frame: Frame::Event(ev.clone()),
            skipped_from: 0,
            cost,
        });
        drop(inner);
        self.notify.notify_one();
        result
    }

    /// Queues a droppable push (presence join/leave): when over budget it is dropped
    /// under `conflate` (reported as `Conflated`) and overflows the session under
    /// `disconnect`, like an event.
    pub fn push_droppable(&self, bytes: Bytes, policy: SlowConsumerPolicy) -> Pushed {
        self.push_bytes(bytes, self.budget, policy == SlowConsumerPolicy::Conflate)
    }

    /// Queues a reply or other control frame; closes the outbox at twice the budget.
    pub fn push_control(&self, bytes: Bytes) -> Pushed {
        self.push_bytes(bytes, self.budget.saturating_mul(2), false)
    }

    fn push_bytes(&self, bytes: Bytes, limit: usize, drop_when_over: bool) -> Pushed {
        let cost = bytes.len() + 64;
        let mut inner = self.lock();
        if inner.closed.is_some() {
            return Pushed::Closed;
        }
        if inner.bytes + cost > limit {
            if drop_when_over {
                return Pushed::Conflated;
            }
            inner.overflow();
            drop(inner);
            self.notify.notify_one();
            return Pushed::Overflow;
        }
        inner.add(cost);
        inner.queue.push_back(Entry {
            frame: Frame::Control(bytes),
            skipped_from: 0,
            cost,
        });
        drop(inner);
        self.notify.notify_one();
        Pushed::Queued
    }

    /// Queues what a subscribe snapshot owes the client (recovered events, a reset).
    /// Not subject to the policy: the caller bounds a snapshot by the budget.
    pub fn push_snapshot(&self, frame: Frame) {
        let cost = match &frame {
            Frame::Event(ev) => ev.cost(),
            Frame::Control(b) => b.len() + 64,
            Frame::Reset { .. } => 128,
        };
        let mut inner = self.lock();
        if inner.closed.is_some() {
            return;
        }
        inner.add(cost);
        inner.queue.push_back(Entry {
            frame,
            skipped_from: 0,
            cost,
        });
        drop(inner);
        self.notify.notify_one();
    }

    /// Marks the outbox closed (the session is ending); later pushes are discarded.
    pub fn close(&self) {
        let mut inner = self.lock();
        if inner.closed.is_none() {
            inner.closed = Some(CloseReason::Gone);
        }
        inner.queue = VecDeque::new();
        inner.bytes = 0;
    }

    /// Gives the queue's buffer back if nothing is queued (a session calls this on its
    /// idle timer).
    pub fn release_if_idle(&self) {
        let mut inner = self.lock();
        if inner.queue.is_empty() && inner.queue.capacity() > 0 {
            inner.queue = VecDeque::new();
        }
    }

    /// Closes the session as a slow consumer (its fan-out fell too far behind); false
    /// if it was closed already.
    pub fn close_slow(&self) -> bool {
        let mut inner = self.lock();
        if inner.closed.is_some() {
            return false;
        }
        inner.overflow();
        drop(inner);
        self.notify.notify_one();
        true
    }

    pub fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// The most bytes this queue has held at once.
    pub fn peak_bytes(&self) -> usize {
        self.lock().peak
    }

    /// Like [`Self::next_batch`], into a fresh vector: an idle session keeps no batch
    /// buffer between writes.
    pub async fn next_batch_owned(&self, max_bytes: usize) -> Result<Vec<Entry>, CloseReason> {
        let mut out = Vec::new();
        self.next_batch(&mut out, max_bytes).await?;
        Ok(out)
    }

    /// Moves queued entries into `out` (up to `max_bytes`, at least one), or returns
    /// the close reason once the queue is closed. Waits while the queue is empty.
    pub async fn next_batch(
        &self,
        out: &mut Vec<Entry>,
        max_bytes: usize,
    ) -> Result<(), CloseReason> {
        loop {
            let notified = self.notify.notified();
            {
                let mut inner = self.lock();
                if let Some(reason) = inner.closed {
                    return Err(reason);
                }
                if !inner.queue.is_empty() {
                    let mut taken = 0;
                    let mut events = false;
                    while let Some(entry) = inner.queue.front() {
                        if taken > 0 && taken + entry.cost > max_bytes {
                            break;
                        }
                        let entry = inner.queue.pop_front().expect("front exists");
                        taken += entry.cost;
                        events |= matches!(entry.frame, Frame::Event(_));
                        out.push(entry);
                    }
                    inner.bytes -= taken;
                    if inner.queue.is_empty() && (!events || inner.queue.capacity() > 64) {
                        // A session that has just been answered (a subscribe reply)
                        // usually goes idle: it gives its buffer back (15,000 kept
                        // 4-entry queues are ~3.5 MiB). One that is receiving events
                        // keeps a small one, so the fan-out allocates nothing per
                        // delivery; it gives it back when idle (`release_if_idle`).
                        inner.queue = VecDeque::new();
                    }
                    return Ok(());
                }
            }
            notified.await;
        }
    }
}

impl Inner {
    fn add(&mut self, cost: usize) {
        self.bytes += cost;
        self.peak = self.peak.max(self.bytes);
    }

    fn overflow(&mut self) {
        self.closed = Some(CloseReason::SlowConsumer);
        self.queue = VecDeque::new();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle session holds no queue buffer, and the fan-out path allocates none per
    /// delivery: only a batch without events (a reply) or the idle timer frees it.
    #[tokio::test]
    async fn the_queue_buffer_is_freed_when_idle_not_per_delivery() {
        let t: Arc<str> = "t".into();
        let o = Outbox::new(1 << 20);
        o.push_control(Bytes::from_static(b"reply"));
        o.next_batch_owned(usize::MAX).await.unwrap();
        assert_eq!(
            o.lock().queue.capacity(),
            0,
            "answered, then idle: no buffer"
        );
        o.push_event(&ev(&t, 1, 10), SlowConsumerPolicy::Disconnect);
        o.next_batch_owned(usize::MAX).await.unwrap();
        assert!(
            o.lock().queue.capacity() > 0,
            "receiving events: the buffer stays"
        );
        o.release_if_idle();
        assert_eq!(o.lock().queue.capacity(), 0, "the idle timer frees it");
    }

    fn ev(topic: &Arc<str>, offset: u64, len: usize) -> Arc<StoredEvent> {
        Arc::new(StoredEvent::new(
            topic.clone(),
            "e".into(),
            offset,
            0,
            None,
            Bytes::from(vec![b'1'; len]),
        ))
    }

    async fn drain(o: &Outbox) -> Vec<Entry> {
        let mut out = Vec::new();
        o.next_batch(&mut out, usize::MAX).await.unwrap();
        out
    }

    #[tokio::test]
    async fn keeps_order_and_budget() {
        let t: Arc<str> = "t".into();
        let o = Outbox::new(10_000);
        for i in 1..=5 {
            assert_eq!(
                o.push_event(&ev(&t, i, 100), SlowConsumerPolicy::Disconnect),
                Pushed::Queued
            );
        }
        let got = drain(&o).await;
        let offsets: Vec<u64> = got
            .iter()
            .map(|e| match &e.frame {
                Frame::Event(ev) => ev.offset,
                _ => 0,
            })
            .collect();
        assert_eq!(offsets, vec![1, 2, 3, 4, 5]);
        assert_eq!(o.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn disconnect_policy_closes_and_frees() {
        let t: Arc<str> = "t".into();
        let o = Outbox::new(1000);
        let mut pushed = 0;
        loop {
            match o.push_event(&ev(&t, pushed + 1, 100), SlowConsumerPolicy::Disconnect) {
                Pushed::Queued => pushed += 1,
                Pushed::Overflow => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(pushed >= 1 && o.queued_bytes() == 0);
        assert_eq!(
            o.push_event(&ev(&t, 99, 1), SlowConsumerPolicy::Disconnect),
            Pushed::Closed
        );
        let mut out = Vec::new();
        assert_eq!(
            o.next_batch(&mut out, usize::MAX).await,
            Err(CloseReason::SlowConsumer)
        );
    }

    #[tokio::test]
    async fn conflate_keeps_newest_per_topic_and_marks_skip() {
        let a: Arc<str> = "a".into();
        let b: Arc<str> = "b".into();
        let o = Outbox::new(1200);
        for i in 1..=20 {
            o.push_event(&ev(&a, i, 100), SlowConsumerPolicy::Conflate);
            o.push_event(&ev(&b, i, 100), SlowConsumerPolicy::Conflate);
        }
        assert!(
            o.queued_bytes() <= 1200 + 2 * 400,
            "bounded: {}",
            o.queued_bytes()
        );
        let got = drain(&o).await;
        let last_a = got
            .iter()
            .rev()
            .find_map(|e| match &e.frame {
                Frame::Event(ev) if &*ev.topic == "a" => Some((ev.offset, e.skipped_from)),
                _ => None,
            })
            .unwrap();
        assert_eq!(last_a.0, 20, "newest event survives");
        assert!(last_a.1 > 0 && last_a.1 < 20, "skip is marked: {last_a:?}");
        // Offsets per topic stay increasing and every gap is covered by a skip mark.
        let mut next = 1;
        for e in &got {
            if let Frame::Event(ev) = &e.frame {
                if &*ev.topic == "a" {
                    let from = if e.skipped_from > 0 {
                        e.skipped_from
                    } else {
                        ev.offset
                    };
                    assert_eq!(from, next, "gap not marked");
                    next = ev.offset + 1;
                }
            }
        }
    }

    #[tokio::test]
    async fn control_frames_are_bounded_too() {
        let o = Outbox::new(1000);
        let mut n = 0;
        while o.push_control(Bytes::from(vec![b'x'; 100])) == Pushed::Queued {
            n += 1;
            assert!(n < 1000);
        }
        let mut out = Vec::new();
        assert_eq!(
            o.next_batch(&mut out, usize::MAX).await,
            Err(CloseReason::SlowConsumer)
        );
    }
}
