//! A session's outbound queue, bounded by a byte budget.
//!
//! The fan-out (after the topic's lock is released) hands a member its events with
//! [`Outbox::push_events`]; it never waits and never allocates per recipient beyond
//! one queue slot holding an `Arc`. The session's writer takes everything queued at
//! once ([`Outbox::next_batch`]) and writes it in as few syscalls as the transport
//! allows.
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
//!
//! # Writing straight to the socket
//! A WebSocket session [attaches](Outbox::attach) its socket. While nothing is queued
//! and the session itself is not writing, the fan-out ([`Outbox::push_events`])
//! writes a member's events to the socket itself, all of them in one non-blocking
//! `sendmsg` ([`DirectWrite::write_now`]), under the outbox's lock: no queue slot, no wake-up, no task switch per
//! delivery. Whatever the socket does not take (it would block, or took part of a
//! frame) is queued as usual, so the session's own writer finishes it in order. The
//! session marks its own writes (a batch from [`Outbox::next_batch`], a ping, a
//! disconnect push: [`Outbox::hold`]), and the fan-out queues while one is under way,
//! so bytes of two frames never interleave on the wire. A closed outbox drops its
//! socket handle at once: nothing is written after the session's close frame.
//!
//! The rest of a frame the socket took only part of is *owed*: the queue's front entry,
//! marked, and the first bytes the socket must get, whatever the session writes next —
//! the next batch, its own ping or disconnect push ([`Hold::owed`]) or, once the
//! outbox is closed (a slow consumer's queue is dropped), its close frame
//! ([`Outbox::take_owed`]). Anything else first would land inside that frame.

use std::collections::VecDeque;
use std::io::IoSlice;
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

/// A socket the fan-out may write to without waiting.
pub trait DirectWrite: Send + Sync + 'static {
    /// One non-blocking vectored send, straight to the kernel, without consulting the
    /// runtime's readiness for the socket. The fan-out only writes a socket whose
    /// outbox is empty and whose session is not writing, so the socket is nearly
    /// always writable; reading tokio's readiness first costs a cache miss per
    /// delivery (its per-socket state, one per session, cold by the time a hot topic's
    /// round comes back to it) that profiles put at 4 % of the node at 5,000
    /// subscribers. A `WouldBlock` here leaves the readiness as it was: the events go
    /// to the queue, and the session's own writer, which does wait on readiness,
    /// finds the socket full with its own try-write and clears it then.
    fn write_now(&self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize>;
}

/// Frames one direct write offers the socket at most (the kernel's `IOV_MAX` is 1024;
/// a fan-out batch rarely holds more than a few events per member).
const MAX_IOV: usize = 64;

/// What a control frame (or the queued rest of a partly written event) counts against
/// the budget: its bytes and its queue slot.
fn control_cost(frame: &Bytes) -> usize {
    frame.len() + 64
}

/// What [`Outbox::push_events`] did with a member's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pushes {
    /// How the events that were queued (not written) fared; `Queued` when all were
    /// written.
    pub outcome: Pushed,
    /// Events written to the socket by the caller (a partly written one included: its
    /// rest is owed: written before anything else).
    pub written: usize,
    /// Bytes written to the socket by the caller.
    pub bytes: usize,
}

#[derive(Debug)]
pub struct Outbox {
    inner: Mutex<Inner>,
    notify: Notify,
    budget: usize,
}

#[derive(Default)]
struct Inner {
    queue: VecDeque<Entry>,
    bytes: usize,
    /// The most bytes ever queued at once (observability and tests).
    peak: usize,
    closed: Option<CloseReason>,
    /// The session's socket, while the fan-out may write to it directly.
    direct: Option<Arc<dyn DirectWrite>>,
    /// The session is writing to its socket (a batch, a ping, a push): the fan-out
    /// queues instead of writing.
    writing: bool,
    /// The queue's front entry is the rest of a frame the fan-out's write left half
    /// sent: the next bytes the socket must get, kept when the outbox closes. A flag
    /// beside the entry, not a field of its own: it fits in this struct's padding, and
    /// every session has one.
    owed: bool,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("queued", &self.queue.len())
            .field("bytes", &self.bytes)
            .field("closed", &self.closed)
            .field("direct", &self.direct.is_some())
            .field("writing", &self.writing)
            .field("owed", &self.owed)
            .finish()
    }
}

/// The session is writing to its socket itself; direct writes wait until this drops.
#[must_use = "the hold lasts until the guard drops"]
pub struct Hold<'a> {
    outbox: &'a Outbox,
    owed: Option<Bytes>,
}

impl Hold<'_> {
    /// The rest of a half-sent frame, to be written before the session's own frame.
    pub fn owed(&mut self) -> Option<Bytes> {
        self.owed.take()
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.outbox.written();
    }
}

impl Outbox {
    pub fn new(budget: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            notify: Notify::new(),
            budget,
        }
    }

    /// The address of the lock a push takes first, for the fan-out to prefetch.
    pub fn lock_addr(&self) -> *const u8 {
        std::ptr::from_ref(&self.inner).cast()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Poisoning only follows a panic in a short section that cannot leave the queue
        // inconsistent, so the data is still good.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets the fan-out write events straight to `socket` while nothing is queued and
    /// the session is not writing (see the module's documentation).
    pub fn attach(&self, socket: Arc<dyn DirectWrite>) {
        let mut inner = self.lock();
        if inner.closed.is_none() {
            inner.direct = Some(socket);
        }
    }

    /// Marks the session as writing to its socket until the guard drops.
    pub fn hold(&self) -> Hold<'_> {
        let mut inner = self.lock();
        inner.writing = true;
        let owed = inner.take_owed();
        Hold { outbox: self, owed }
    }

    /// The rest of a half-sent frame, for the session's last writes once the outbox
    /// is closed (its close frame must not land inside that frame).
    pub fn take_owed(&self) -> Option<Bytes> {
        self.lock().take_owed()
    }

    /// The session finished writing what [`Self::next_batch`] gave it.
    pub fn written(&self) {
        self.lock().writing = false;
    }

    /// Hands a member its events, in order: written to the socket at once when the
    /// outbox is idle and a socket is attached, else (and for whatever the socket did
    /// not take) queued under the budget and the namespace's policy.
    pub fn push_events(&self, evs: &[&Arc<StoredEvent>], policy: SlowConsumerPolicy) -> Pushes {
        let mut out = Pushes {
            outcome: Pushed::Queued,
            written: 0,
            bytes: 0,
        };
        let mut inner = self.lock();
        if inner.closed.is_some() {
            out.outcome = Pushed::Closed;
            return out;
        }
        let mut rest = evs;
        if let Some(socket) = inner
            .direct
            .as_ref()
            .filter(|_| inner.queue.is_empty() && !inner.writing)
        {
            let n = evs.len().min(MAX_IOV);
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            for (slot, ev) in slices.iter_mut().zip(&evs[..n]) {
                *slot = IoSlice::new(ev.ws_frame());
            }
            match socket.write_now(&slices[..n]) {
                Ok(written) if written > 0 => {
                    out.bytes = written;
                    let mut left = written;
                    let mut whole = 0;
                    while whole < n && left >= evs[whole].ws_frame().len() {
                        left -= evs[whole].ws_frame().len();
                        whole += 1;
                    }
                    out.written = whole;
                    if left > 0 {
                        // Part of a frame went out: the socket is owed its rest (the
                        // queue was empty, so it is the front entry).
                        inner.owe(evs[whole].ws_frame().slice(left..));
                        out.written += 1;
                    }
                    rest = &evs[out.written..];
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // The socket is broken: the session finds out on its own read or write.
                Err(_) => inner.direct = None,
            }
        }
        for ev in rest {
            out.outcome = self.queue_event(&mut inner, ev, policy);
            if matches!(out.outcome, Pushed::Overflow | Pushed::Closed) {
                break;
            }
        }
        let queued = !inner.queue.is_empty() || inner.closed.is_some();
        drop(inner);
        if queued {
            self.notify.notify_one();
        }
        out
    }

    /// Queues one event under the budget and the policy (the caller notifies).
    fn queue_event(
        &self,
        inner: &mut Inner,
        ev: &Arc<StoredEvent>,
        policy: SlowConsumerPolicy,
    ) -> Pushed {
        let cost = ev.cost();
        if inner.closed.is_some() {
            return Pushed::Closed;
        }
        let result = if inner.bytes + cost <= self.budget {
            Pushed::Queued
        } else {
            match policy {
                SlowConsumerPolicy::Disconnect => {
                    inner.overflow();
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
        let cost = control_cost(&bytes);
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
            Frame::Control(b) => control_cost(b),
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
        inner.drop_queue();
        inner.direct = None;
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
    /// buffer between writes. Only the wait is held across the `await` (the batch is
    /// taken by [`Self::take_batch`], a plain function), so the future is little more
    /// than the `Notified`: it sits in every idle session's task.
    pub fn next_batch_owned(
        &self,
        max_bytes: usize,
    ) -> impl std::future::Future<Output = Result<Vec<Entry>, CloseReason>> + '_ {
        self.wait_for(move |outbox| outbox.take_owned(max_bytes))
    }

    /// [`Self::take_batch`] into a fresh vector.
    fn take_owned(&self, max_bytes: usize) -> Option<Result<Vec<Entry>, CloseReason>> {
        let mut out = Vec::new();
        self.take_batch(&mut out, max_bytes)
            .map(|taken| taken.map(|()| out))
    }

    /// Moves queued entries into `out` (up to `max_bytes`, at least one), or returns
    /// the close reason once the queue is closed. Waits while the queue is empty.
    /// With a socket attached, direct writes are held off until the caller calls
    /// [`Self::written`].
    pub fn next_batch<'a>(
        &'a self,
        out: &'a mut Vec<Entry>,
        max_bytes: usize,
    ) -> impl std::future::Future<Output = Result<(), CloseReason>> + 'a {
        self.wait_for(move |outbox| outbox.take_batch(out, max_bytes))
    }

    /// Until `take` has something: it is tried once, then after every wake-up of the
    /// queue. The `Notified` is created before each try, so a push between the try and
    /// the wait is not missed. `take` is given the outbox rather than capturing it, so
    /// the future holds one reference to it, not two (it sits in every idle session's
    /// task).
    async fn wait_for<T>(&self, mut take: impl FnMut(&Self) -> Option<T>) -> T {
        loop {
            let notified = self.notify.notified();
            if let Some(taken) = take(self) {
                return taken;
            }
            notified.await;
        }
    }

    /// What [`Self::next_batch`] returns if it need not wait; `None` while the queue is
    /// empty and open.
    fn take_batch(
        &self,
        out: &mut Vec<Entry>,
        max_bytes: usize,
    ) -> Option<Result<(), CloseReason>> {
        let mut inner = self.lock();
        if let Some(reason) = inner.closed {
            return Some(Err(reason));
        }
        if !inner.queue.is_empty() {
            let mut taken = 0;
            let mut events = false;
            // An owed rest is the front entry: it goes first, like any other.
            inner.owed = false;
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
            // Until the session says it has written these, the fan-out queues
            // (only a session with a socket attached can be written directly).
            inner.writing = inner.direct.is_some();
            if inner.queue.is_empty() && (!events || inner.queue.capacity() > 64) {
                // A session that has just been answered (a subscribe reply)
                // usually goes idle: it gives its buffer back (15,000 kept
                // 4-entry queues are ~3.5 MiB). One that is receiving events
                // keeps a small one, so the fan-out allocates nothing per
                // delivery; it gives it back when idle (`release_if_idle`).
                inner.queue = VecDeque::new();
            }
            return Some(Ok(()));
        }
        None
    }
}

impl Inner {
    fn add(&mut self, cost: usize) {
        self.bytes += cost;
        self.peak = self.peak.max(self.bytes);
    }

    /// Drops the queue (not what the socket is owed: see [`Outbox::take_owed`]).
    fn overflow(&mut self) {
        self.closed = Some(CloseReason::SlowConsumer);
        self.drop_queue();
        self.direct = None;
    }

    /// Frees the queue but for an owed rest.
    fn drop_queue(&mut self) {
        let owed = self.take_owed();
        self.queue = VecDeque::new();
        self.bytes = 0;
        if let Some(rest) = owed {
            self.owe(rest);
        }
    }

    /// Makes `rest` (of a half-sent frame) the owed front entry; the queue is empty.
    fn owe(&mut self, rest: Bytes) {
        let cost = control_cost(&rest);
        self.add(cost);
        self.queue.push_back(Entry {
            frame: Frame::Control(rest),
            skipped_from: 0,
            cost,
        });
        self.owed = true;
    }

    fn take_owed(&mut self) -> Option<Bytes> {
        if !std::mem::take(&mut self.owed) {
            return None;
        }
        let Frame::Control(rest) = &self.queue.front()?.frame else {
            return None;
        };
        let rest = rest.clone();
        if let Some(entry) = self.queue.pop_front() {
            self.bytes -= entry.cost;
        }
        Some(rest)
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
        push(&o, &ev(&t, 1, 10), SlowConsumerPolicy::Disconnect);
        o.next_batch_owned(usize::MAX).await.unwrap();
        assert!(
            o.lock().queue.capacity() > 0,
            "receiving events: the buffer stays"
        );
        o.release_if_idle();
        assert_eq!(o.lock().queue.capacity(), 0, "the idle timer frees it");
    }

    /// One event through the fan-out's entry point (no socket attached: queued).
    fn push(o: &Outbox, ev: &Arc<StoredEvent>, policy: SlowConsumerPolicy) -> Pushed {
        o.push_events(&[ev], policy).outcome
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

    /// A connected socket pair: the outbox's end (attached) and the client's end.
    fn attached(o: &Outbox) -> (Arc<tokio::net::UnixStream>, tokio::net::UnixStream) {
        let (server, client) = tokio::net::UnixStream::pair().unwrap();
        let server = Arc::new(server);
        o.attach(server.clone());
        (server, client)
    }

    /// Everything the client end has received so far (waits up to a second for `n`).
    async fn received(client: &tokio::net::UnixStream, n: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
        let mut buf = vec![0u8; 1 << 16];
        while got.len() < n && tokio::time::Instant::now() < deadline {
            let _ = tokio::time::timeout_at(deadline, client.readable()).await;
            match client.try_read(&mut buf) {
                Ok(k) => got.extend_from_slice(&buf[..k]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("read: {e}"),
            }
        }
        got
    }

    fn wire(evs: &[Arc<StoredEvent>]) -> Vec<u8> {
        evs.iter().flat_map(|e| e.ws_frame().to_vec()).collect()
    }

    /// An idle outbox with a socket: the fan-out's events go straight to the socket,
    /// all of them, byte for byte and in order, and nothing is queued or woken.
    #[tokio::test]
    async fn an_idle_session_gets_its_events_written_directly() {
        let t: Arc<str> = "t".into();
        let o = Outbox::new(1 << 20);
        let (_server, client) = attached(&o);
        let evs: Vec<_> = (1..=3).map(|i| ev(&t, i, 50)).collect();
        let p = o.push_events(
            &evs.iter().collect::<Vec<_>>(),
            SlowConsumerPolicy::Disconnect,
        );
        let expect = wire(&evs);
        assert_eq!(
            (p.outcome, p.written, p.bytes),
            (Pushed::Queued, 3, expect.len())
        );
        assert_eq!(o.queued_bytes(), 0, "nothing queued");
        assert_eq!(received(&client, expect.len()).await, expect);
    }

    /// While the session writes to its socket (a batch or a ping), the fan-out queues:
    /// two writers never interleave bytes on one socket.
    #[tokio::test]
    async fn a_session_that_is_writing_gets_its_events_queued() {
        let t: Arc<str> = "t".into();
        let o = Outbox::new(1 << 20);
        let (_server, client) = attached(&o);
        let hold = o.hold();
        let p = o.push_events(&[&ev(&t, 1, 50)], SlowConsumerPolicy::Disconnect);
        assert_eq!(p.written, 0);
        assert!(o.queued_bytes() > 0);
        drop(hold);
        // Queued events stay ahead: with a queue, nothing is written directly.
        let p = o.push_events(&[&ev(&t, 2, 50)], SlowConsumerPolicy::Disconnect);
        assert_eq!(p.written, 0, "the queue keeps its order");
        let got = drain(&o).await;
        assert_eq!(got.len(), 2);
        o.written();
        let p = o.push_events(&[&ev(&t, 3, 50)], SlowConsumerPolicy::Disconnect);
        assert_eq!(p.written, 1, "idle again: written directly");
        assert_eq!(
            received(&client, 1).await.len(),
            ev(&t, 3, 50).ws_frame().len()
        );
    }

    /// A socket that takes part of a frame: its owed rest comes first, then the events
    /// that did not go, so the client still reads every frame whole and in order.
    #[tokio::test]
    async fn a_partial_write_queues_the_rest_in_order() {
        let t: Arc<str> = "t".into();
        let o = Outbox::new(16 << 20);
        let (server, client) = attached(&o);
        // Larger than any socket buffer: the kernel takes only part of the first.
        let evs: Vec<_> = (1..=3).map(|i| ev(&t, i, 2 << 20)).collect();
        let p = o.push_events(
            &evs.iter().collect::<Vec<_>>(),
            SlowConsumerPolicy::Disconnect,
        );
        assert_eq!(p.outcome, Pushed::Queued);
        assert_eq!(p.written, 1, "one frame partly written");
        assert!(p.bytes > 0 && p.bytes < evs[0].ws_frame().len());
        // The session's writer: drain the queue onto the socket.
        let expect = wire(&evs);
        let reader = tokio::spawn(async move { received(&client, expect.len()).await });
        let mut out = Vec::new();
        o.next_batch(&mut out, usize::MAX).await.unwrap();
        let mut bytes: Vec<u8> = Vec::new();
        for e in &out {
            match &e.frame {
                Frame::Event(ev) => bytes.extend_from_slice(ev.ws_frame()),
                Frame::Control(b) => bytes.extend_from_slice(b),
                Frame::Reset { .. } => panic!("no reset here"),
            }
        }
        let mut at = 0;
        while at < bytes.len() {
            server.writable().await.unwrap();
            match server.try_write_vectored(&[IoSlice::new(&bytes[at..])]) {
                Ok(k) => at += k,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("write: {e}"),
            }
        }
        assert!(reader.await.unwrap() == wire(&evs), "every byte, in order");
    }

    /// A closed outbox lets go of the socket: nothing is written after the session's
    /// close frame, and the socket is not kept open by a topic's member list.
    /// A session's own frame (a ping, a disconnect push) must not land inside a frame
    /// the fan-out half sent: its hold hands over that frame's rest first, and until
    /// it is written nothing else goes to the socket directly.
    #[tokio::test]
    async fn the_rest_of_a_half_sent_frame_goes_before_the_sessions_own_frame() {
        let t: Arc<str> = "t".into();
        let o = Outbox::new(16 << 20);
        let (_server, _client) = attached(&o);
        let big = ev(&t, 1, 2 << 20);
        let p = o.push_events(&[&big], SlowConsumerPolicy::Disconnect);
        assert_eq!(p.written, 1);
        assert!(p.bytes < big.ws_frame().len(), "the socket took part of it");
        assert!(o.queued_bytes() > 0, "the rest counts against the budget");
        // Owed bytes keep the fan-out from writing: the next event is queued.
        let next = o.push_events(&[&ev(&t, 2, 10)], SlowConsumerPolicy::Disconnect);
        assert_eq!(next.written, 0);
        let mut hold = o.hold();
        let rest = hold.owed().expect("the rest is owed");
        assert_eq!(rest, big.ws_frame().slice(p.bytes..));
        assert!(hold.owed().is_none(), "handed over once");
        drop(hold);
        // The queued event is still there, after the rest.
        let got = drain(&o).await;
        assert!(matches!(&got[..], [Entry { frame: Frame::Event(e), .. }] if e.offset == 2));
    }

    /// A slow consumer's queue is dropped, but not the rest of a half-sent frame: the
    /// session's close frame needs it written first.
    #[tokio::test]
    async fn an_overflow_keeps_what_the_socket_is_owed_for_the_close() {
        let t: Arc<str> = "t".into();
        let o = Outbox::new(3 << 20);
        let (_server, _client) = attached(&o);
        let big = ev(&t, 1, 2 << 20);
        let p = o.push_events(&[&big], SlowConsumerPolicy::Disconnect);
        assert!(p.written == 1 && p.bytes < big.ws_frame().len());
        let over = o.push_events(&[&ev(&t, 2, 2 << 20)], SlowConsumerPolicy::Disconnect);
        assert_eq!(over.outcome, Pushed::Overflow);
        let mut out = Vec::new();
        assert_eq!(
            o.next_batch(&mut out, usize::MAX).await,
            Err(CloseReason::SlowConsumer)
        );
        assert_eq!(
            o.take_owed(),
            Some(big.ws_frame().slice(p.bytes..)),
            "kept past the overflow"
        );
        assert_eq!(o.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn a_closed_outbox_writes_nothing_and_drops_the_socket() {
        let t: Arc<str> = "t".into();
        let o = Outbox::new(1 << 20);
        let (server, client) = attached(&o);
        o.close();
        assert_eq!(Arc::strong_count(&server), 1, "the outbox let go");
        let p = o.push_events(&[&ev(&t, 1, 50)], SlowConsumerPolicy::Disconnect);
        assert_eq!((p.outcome, p.written), (Pushed::Closed, 0));
        drop(server);
        assert!(received(&client, 1).await.is_empty());
    }

    #[tokio::test]
    async fn keeps_order_and_budget() {
        let t: Arc<str> = "t".into();
        let o = Outbox::new(10_000);
        for i in 1..=5 {
            assert_eq!(
                push(&o, &ev(&t, i, 100), SlowConsumerPolicy::Disconnect),
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
            match push(&o, &ev(&t, pushed + 1, 100), SlowConsumerPolicy::Disconnect) {
                Pushed::Queued => pushed += 1,
                Pushed::Overflow => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(pushed >= 1 && o.queued_bytes() == 0);
        assert_eq!(
            push(&o, &ev(&t, 99, 1), SlowConsumerPolicy::Disconnect),
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
            push(&o, &ev(&a, i, 100), SlowConsumerPolicy::Conflate);
            push(&o, &ev(&b, i, 100), SlowConsumerPolicy::Conflate);
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
