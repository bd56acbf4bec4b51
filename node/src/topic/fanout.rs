//! Fan-out to a topic's local sessions, after the publish is acknowledged.
//!
//! A publish holds the topic's lock only to sequence the event, store it in history
//! and *enqueue* one job for the fan-out; it never touches the subscribers' outboxes.
//! So the time to acknowledge a publish does not grow with the number of subscribers.
//! The fan-out runs after the lock is released: inline on the publishing task when the
//! topic has a handful of subscribers (cheaper than a wake-up), otherwise on a task of
//! its own on the node's delivery runtime, which splits a hot topic's members into
//! chunks spread over that runtime's worker threads.
//!
//! Delivery to a member is member-major and, when its session is idle, direct: every
//! event of the batch that the member is owed goes to its socket in one non-blocking
//! `sendmsg` from the fan-out itself ([`Outbox::push_events`]); only what the socket
//! does not take is queued for the session's task. So a delivery costs a syscall, not
//! a queue push, a wake-up, a schedule and a syscall; and a topic that falls behind
//! coalesces by itself, because a runner's batch then holds several events per member.
//!
//! # Order and exactly-once
//! - Jobs carry a per-topic sequence number and are enqueued under the topic's lock,
//!   so their order is the topic's order (events by offset, presence and resets where
//!   they happened). One runner at a time drains a topic's queue ([`FanQueue::kick`]),
//!   and a runner waits for all its chunks before the next batch: every outbox receives
//!   a topic's items in queue order.
//! - A member that joins records the sequence number at which it joined
//!   ([`Members::join`], under the topic's lock, right after its subscribe snapshot was
//!   queued): it receives exactly the jobs enqueued after it, which are exactly the
//!   events after its snapshot — no gap, no repeat.
//! - A member that leaves is flagged under the topic's lock; a runner skips flagged
//!   members. (A job already being written to that member's outbox may still land;
//!   sessions ignore events of topics they no longer subscribe to.)
//!
//! # Bounds
//! Outboxes keep their own byte budgets and slow-consumer policies
//! (`session::outbox`). The queue itself holds at most [`MAX_QUEUED`] jobs (each a
//! sequence number, an `Arc` of the event that history holds anyway, and an `Arc` of
//! the member list): a topic whose fan-out falls that far behind its publishers (the
//! node is out of CPU for it) closes its current members as slow consumers (WebSocket
//! 4008, counted in `weft_slow_consumer_closes_total`) and drops the queue. Nothing is
//! lost silently: every closed session resumes from its cursor, out of history.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::config::SlowConsumerPolicy;
use crate::session::event::StoredEvent;
use crate::session::outbox::{Frame, Outbox, Pushed};
use crate::stats::Count;
use crate::topic::Subscriber;

/// Up to this many member deliveries queued, a runner delivers inline on the task
/// that published (a wake-up and a schedule cost more than a few pushes). Each one
/// may be a direct socket write, and the publish is answered after them: this bounds
/// what a publish into a small topic waits for (about 32 short sends), whatever
/// the topic's size; larger fan-outs run on the delivery runtime.
const INLINE_DELIVERIES: usize = 32;
/// A hot topic's members are delivered in chunks of this many, spread over threads
/// (each member is a socket write when it is idle: a few microseconds).
const CHUNK: usize = 128;
/// Jobs queued per topic before its members are closed as slow consumers.
pub const MAX_QUEUED: usize = 8192;
/// Jobs a runner takes per batch.
const BATCH: usize = 256;

/// What goes to the members of a topic.
#[derive(Debug, Clone)]
pub enum Item {
    Event(Arc<StoredEvent>),
    /// A presence join/leave (only to members that asked for presence).
    Presence(Bytes),
    /// The topic's history was lost: continue from this cursor.
    Reset {
        topic: Arc<str>,
        epoch: Arc<str>,
        offset: u64,
    },
}

/// One local session as the fan-out sees it.
#[derive(Debug, Clone)]
pub struct Member {
    outbox: Arc<Outbox>,
    /// Jobs with a sequence number above this are owed to it.
    joined_at: u64,
    wants_presence: bool,
    left: Arc<AtomicBool>,
}

impl Member {
    /// Asks the CPU to fetch what delivering to this member reads first: its `left`
    /// flag and its outbox (the lock word). A hot topic's round reaches a member
    /// long after the last one evicted these from the caches, and each was a stall
    /// that profiles put at 3–4 % of the node at 5,000 subscribers (`perf annotate`:
    /// nearly all of `deliver`'s own time on the flag's load, half of `push_events`'s
    /// on the lock). Issued one member ahead, the fetch overlaps the previous
    /// member's socket write.
    #[inline]
    fn prefetch(&self) {
        prefetch(Arc::as_ptr(&self.left).cast());
        prefetch(self.outbox.lock_addr());
    }
}

#[inline]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it reads nothing into the program, never faults
    // (whatever the address), and `sse` is part of the x86_64 baseline.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// What every topic's fan-out shares: where hot topics deliver, the node-wide
/// counters and the slow-consumer outcomes.
#[derive(Debug, Default)]
pub struct FanOutShared {
    /// The runtime a hot topic's runner and its chunks run on (the node's delivery
    /// runtime, so a round of socket writes never queues ahead of a publish); `None`:
    /// the caller's runtime, or inline without one (unit tests).
    pub runtime: Option<tokio::runtime::Handle>,
    pub conflated: Arc<Count>,
    pub slow_consumer_closes: Arc<Count>,
    /// Events the fan-out wrote to sockets itself (`weft_delivered_total`).
    pub delivered: Arc<Count>,
    /// WebSocket bytes the fan-out wrote itself (`weft_bytes_sent_total{transport="ws"}`).
    pub ws_bytes_sent: Arc<Count>,
    /// Publish to socket write, sampled once per delivery run that wrote directly.
    pub latency: Option<metrics::Histogram>,
}

/// A topic's local sessions (the topic's subscribers), kept under the topic's lock.
#[derive(Debug, Default)]
pub struct Members {
    seq: u64,
    by_id: ById,
    /// The member list jobs share, rebuilt at the next enqueue after a change.
    list: Option<Arc<[Member]>>,
}

#[derive(Debug)]
struct Joined {
    sub: Subscriber,
    joined_at: u64,
    left: Arc<AtomicBool>,
}

/// Members a topic keeps in a `Vec` searched by id; past it, a `HashMap`.
const SMALL_MEMBERS: usize = 8;

/// The joined sessions by id. Most topics have one or a few (a private topic per user
/// is common), and a `HashMap`'s first allocation already holds four 72-byte slots; so
/// up to [`SMALL_MEMBERS`] live in a `Vec` grown one slot at a time, more in a map.
#[derive(Debug)]
enum ById {
    Small(Vec<(u64, Joined)>),
    Large(HashMap<u64, Joined>),
}

impl Default for ById {
    fn default() -> Self {
        Self::Small(Vec::new())
    }
}

impl ById {
    /// Adds or replaces `id`'s entry; the replaced one, if any.
    fn insert(&mut self, id: u64, j: Joined) -> Option<Joined> {
        match self {
            Self::Small(v) => {
                if let Some((_, old)) = v.iter_mut().find(|(k, _)| *k == id) {
                    return Some(std::mem::replace(old, j));
                }
                if v.len() < SMALL_MEMBERS {
                    v.reserve_exact(1);
                    v.push((id, j));
                    return None;
                }
                let mut map: HashMap<u64, Joined> = v.drain(..).collect();
                map.insert(id, j);
                *self = Self::Large(map);
                None
            }
            Self::Large(map) => map.insert(id, j),
        }
    }

    /// Removes `id`'s entry; an emptied set gives its memory back.
    fn remove(&mut self, id: u64) -> Option<Joined> {
        let out = match self {
            Self::Small(v) => {
                let at = v.iter().position(|(k, _)| *k == id)?;
                Some(v.swap_remove(at).1)
            }
            Self::Large(map) => map.remove(&id),
        };
        if self.is_empty() {
            *self = Self::default();
        }
        out
    }

    fn len(&self) -> usize {
        match self {
            Self::Small(v) => v.len(),
            Self::Large(map) => map.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn values(&self) -> impl Iterator<Item = &Joined> {
        let (small, large) = match self {
            Self::Small(v) => (Some(v.iter().map(|(_, j)| j)), None),
            Self::Large(map) => (None, Some(map.values())),
        };
        small
            .into_iter()
            .flatten()
            .chain(large.into_iter().flatten())
    }
}

impl Members {
    /// Adds a session; it is owed every job enqueued from now on.
    pub fn join(&mut self, id: u64, sub: Subscriber) {
        let j = Joined {
            sub,
            joined_at: self.seq,
            left: Arc::default(),
        };
        if let Some(old) = self.by_id.insert(id, j) {
            old.left.store(true, Ordering::Relaxed);
        }
        self.list = None;
    }

    /// Removes a session; it is owed nothing more.
    pub fn leave(&mut self, id: u64) -> Option<Subscriber> {
        let j = self.by_id.remove(id)?;
        j.left.store(true, Ordering::Relaxed);
        self.list = None;
        Some(j.sub)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn subscribers(&self) -> impl Iterator<Item = &Subscriber> {
        self.by_id.values().map(|j| &j.sub)
    }

    /// Queues `item` for every current member (under the topic's lock).
    pub fn enqueue(&mut self, queue: &FanQueue, item: Item) {
        if self.by_id.is_empty() {
            return;
        }
        self.seq += 1;
        let members = self
            .list
            .get_or_insert_with(|| {
                self.by_id
                    .values()
                    .map(|j| Member {
                        outbox: j.sub.outbox.clone(),
                        joined_at: j.joined_at,
                        wants_presence: j.sub.wants_presence,
                        left: j.left.clone(),
                    })
                    .collect()
            })
            .clone();
        queue.push(Job {
            seq: self.seq,
            item,
            members,
        });
    }
}

#[derive(Debug)]
struct Job {
    seq: u64,
    item: Item,
    members: Arc<[Member]>,
}

#[derive(Debug, Default)]
struct QueueState {
    jobs: VecDeque<Job>,
    running: bool,
}

/// A topic's fan-out jobs, and at most one runner draining them.
#[derive(Debug)]
pub struct FanQueue {
    state: Mutex<QueueState>,
    policy: SlowConsumerPolicy,
    stats: Arc<FanOutShared>,
}

impl FanQueue {
    pub fn new(policy: SlowConsumerPolicy, stats: Arc<FanOutShared>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::default(),
            policy,
            stats,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, job: Job) {
        let mut st = self.lock();
        if st.jobs.len() < MAX_QUEUED {
            st.jobs.push_back(job);
            return;
        }
        // Hopelessly behind: every current member is owed everything queued, and
        // is closed instead; it resumes from its cursor.
        st.jobs.clear();
        drop(st);
        for m in job.members.iter() {
            if !m.left.load(Ordering::Relaxed) && m.outbox.close_slow() {
                self.stats.slow_consumer_closes.inc();
            }
        }
    }

    /// Jobs not yet delivered.
    pub fn backlog(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Delivers what is queued, unless a runner is at it already: inline when it is
    /// small or there is no runtime (unit tests), else on a task of its own. Called
    /// after the topic's lock is released.
    pub fn kick(self: &Arc<Self>) {
        let small = {
            let mut st = self.lock();
            if st.running || st.jobs.is_empty() {
                return;
            }
            st.running = true;
            st.jobs.iter().map(|j| j.members.len()).sum::<usize>() <= INLINE_DELIVERIES
        };
        let rt = self
            .stats
            .runtime
            .clone()
            .map_or_else(tokio::runtime::Handle::try_current, Ok);
        match rt {
            Ok(rt) if !small => {
                let q = self.clone();
                rt.spawn(async move { q.run().await });
            }
            _ => self.run_inline(),
        }
    }

    /// Takes the next batch, or ends the run (under the queue's lock, so a job pushed
    /// after this either is taken or finds no runner and kicks one).
    fn next_batch(&self) -> Option<Vec<Job>> {
        let mut st = self.lock();
        if st.jobs.is_empty() {
            st.running = false;
            return None;
        }
        let n = st.jobs.len().min(BATCH);
        Some(st.jobs.drain(..n).collect())
    }

    fn run_inline(&self) {
        while let Some(batch) = self.next_batch() {
            for (members, items) in groups(batch) {
                self.deliver(&members, &items);
            }
        }
    }

    async fn run(self: Arc<Self>) {
        while let Some(batch) = self.next_batch() {
            for (members, items) in groups(batch) {
                if members.len() <= CHUNK {
                    self.deliver(&members, &items);
                    continue;
                }
                // A hot topic: its members in chunks over the worker threads; the
                // next batch starts only when every chunk is written.
                let items: Arc<[(u64, Item)]> = items.into();
                let mut chunks = tokio::task::JoinSet::new();
                for start in (CHUNK..members.len()).step_by(CHUNK) {
                    let (q, m, i) = (self.clone(), members.clone(), items.clone());
                    let end = (start + CHUNK).min(m.len());
                    chunks.spawn(async move { q.deliver(&m[start..end], &i) });
                }
                self.deliver(&members[..CHUNK], &items);
                while chunks.join_next().await.is_some() {}
            }
        }
    }

    /// Member-major: each outbox gets all its items in one go — written to its socket
    /// at once when the session is idle (no wake-up at all), else queued with one
    /// wake-up.
    fn deliver(&self, members: &[Member], items: &[(u64, Item)]) {
        let (mut written, mut bytes) = (0, 0);
        let mut run: Vec<&Arc<StoredEvent>> = Vec::with_capacity(items.len().min(64));
        for (k, m) in members.iter().enumerate() {
            if let Some(next) = members.get(k + 1) {
                next.prefetch();
            }
            if m.left.load(Ordering::Relaxed) {
                continue;
            }
            for (i, (seq, item)) in items.iter().enumerate() {
                if *seq <= m.joined_at {
                    continue;
                }
                let pushed = match item {
                    // Consecutive events go to the outbox together (one direct write).
                    Item::Event(ev) => {
                        run.push(ev);
                        if matches!(items.get(i + 1), Some((_, Item::Event(_)))) {
                            continue;
                        }
                        let p = m.outbox.push_events(&run, self.policy);
                        run.clear();
                        written += p.written;
                        bytes += p.bytes;
                        p.outcome
                    }
                    Item::Presence(frame) if m.wants_presence => {
                        m.outbox.push_droppable(frame.clone(), self.policy)
                    }
                    Item::Presence(_) => Pushed::Queued,
                    Item::Reset {
                        topic,
                        epoch,
                        offset,
                    } => {
                        m.outbox.push_snapshot(Frame::Reset {
                            topic: topic.clone(),
                            epoch: epoch.clone(),
                            offset: *offset,
                        });
                        Pushed::Queued
                    }
                };
                if !self.outcome(pushed) {
                    break;
                }
            }
            run.clear();
        }
        if written > 0 {
            self.stats.delivered.add(written as u64);
            self.stats.ws_bytes_sent.add(bytes as u64);
            let first = items.iter().find_map(|(_, item)| match item {
                Item::Event(ev) => Some(ev),
                _ => None,
            });
            if let (Some(h), Some(ev)) = (&self.stats.latency, first) {
                h.record(ev.sequenced_at.elapsed().as_secs_f64());
            }
        }
    }

    /// Counts what a push did; false once the member can take nothing more.
    fn outcome(&self, pushed: Pushed) -> bool {
        match pushed {
            Pushed::Queued => true,
            Pushed::Conflated => {
                self.stats.conflated.inc();
                true
            }
            Pushed::Overflow => {
                self.stats.slow_consumer_closes.inc();
                false
            }
            Pushed::Closed => false,
        }
    }
}

/// Consecutive jobs that share one member list: the list, and their items in order.
type Group = (Arc<[Member]>, Vec<(u64, Item)>);

fn groups(batch: Vec<Job>) -> Vec<Group> {
    let mut out: Vec<Group> = Vec::new();
    for job in batch {
        match out.last_mut() {
            Some((members, items)) if Arc::ptr_eq(members, &job.members) => {
                items.push((job.seq, job.item));
            }
            _ => out.push((job.members, vec![(job.seq, job.item)])),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::outbox::CloseReason;

    fn event(offset: u64) -> Item {
        Item::Event(Arc::new(StoredEvent::new(
            "t".into(),
            "ep".into(),
            offset,
            0,
            None,
            Bytes::from(offset.to_string()),
        )))
    }

    fn sub(outbox: &Arc<Outbox>, wants_presence: bool) -> Subscriber {
        Subscriber {
            outbox: outbox.clone(),
            client: "c".into(),
            user: None,
            wants_presence,
        }
    }

    fn queue() -> Arc<FanQueue> {
        FanQueue::new(SlowConsumerPolicy::Disconnect, Arc::default())
    }

    /// Offsets queued in `outbox`, draining it.
    fn offsets(rt: &tokio::runtime::Runtime, outbox: &Outbox) -> Vec<u64> {
        let mut out = Vec::new();
        while outbox.queued_bytes() > 0 {
            for e in rt.block_on(outbox.next_batch_owned(usize::MAX)).unwrap() {
                if let Frame::Event(ev) = e.frame {
                    out.push(ev.offset);
                }
            }
        }
        out
    }

    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    #[test]
    fn members_stay_exact_across_the_small_and_large_forms() {
        let outbox = Arc::new(Outbox::new(1 << 20));
        let mut members = Members::default();
        let n = 3 * SMALL_MEMBERS as u64;
        for id in 0..n {
            members.join(id, sub(&outbox, false));
            assert_eq!(members.len() as u64, id + 1);
        }
        assert!(matches!(members.by_id, ById::Large(_)));
        // Joining again under the same id replaces, never duplicates.
        members.join(3, sub(&outbox, true));
        assert_eq!(members.len() as u64, n);
        assert_eq!(
            members.subscribers().filter(|s| s.wants_presence).count(),
            1
        );
        for id in (0..n).filter(|id| id % 2 == 0) {
            assert!(members.leave(id).is_some());
            assert!(members.leave(id).is_none(), "left once");
        }
        assert_eq!(members.len() as u64, n / 2);
        for id in (0..n).filter(|id| id % 2 == 1) {
            assert!(members.leave(id).is_some());
        }
        assert!(members.is_empty());
        assert!(
            matches!(&members.by_id, ById::Small(v) if v.capacity() == 0),
            "an emptied topic holds no member memory"
        );
        // Small again: replace and leave by id.
        members.join(7, sub(&outbox, false));
        members.join(7, sub(&outbox, true));
        assert_eq!(members.len(), 1);
        assert!(members.leave(7).unwrap().wants_presence);
    }

    #[test]
    fn a_member_gets_exactly_the_jobs_queued_after_it_joined() {
        let q = queue();
        let mut members = Members::default();
        let (early, late) = (
            Arc::new(Outbox::new(1 << 20)),
            Arc::new(Outbox::new(1 << 20)),
        );
        members.join(1, sub(&early, false));
        members.enqueue(&q, event(1));
        members.enqueue(&q, event(2));
        // Joins while 1 and 2 are still queued (its snapshot covered them).
        members.join(2, sub(&late, false));
        members.enqueue(&q, event(3));
        q.kick();
        let rt = current_thread();
        assert_eq!(offsets(&rt, &early), vec![1, 2, 3]);
        assert_eq!(
            offsets(&rt, &late),
            vec![3],
            "no repeat of what its snapshot had"
        );
    }

    #[test]
    fn a_member_that_left_gets_nothing_more() {
        let q = queue();
        let mut members = Members::default();
        let (stays, leaves) = (
            Arc::new(Outbox::new(1 << 20)),
            Arc::new(Outbox::new(1 << 20)),
        );
        members.join(1, sub(&stays, false));
        members.join(2, sub(&leaves, false));
        members.enqueue(&q, event(1));
        members.leave(2);
        members.enqueue(&q, event(2));
        q.kick();
        let rt = current_thread();
        assert_eq!(offsets(&rt, &stays), vec![1, 2]);
        assert!(offsets(&rt, &leaves).is_empty());
    }

    #[test]
    fn presence_goes_only_to_members_that_asked_for_it() {
        let q = queue();
        let mut members = Members::default();
        let (wants, not) = (
            Arc::new(Outbox::new(1 << 20)),
            Arc::new(Outbox::new(1 << 20)),
        );
        members.join(1, sub(&wants, true));
        members.join(2, sub(&not, false));
        members.enqueue(&q, Item::Presence(Bytes::from_static(b"join")));
        q.kick();
        assert!(wants.queued_bytes() > 0);
        assert_eq!(not.queued_bytes(), 0);
    }

    /// A hot topic's members are written by several tasks at once; each outbox still
    /// gets every event once, in offset order, across many batches.
    #[test]
    fn chunks_over_threads_keep_each_members_order() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        let q = queue();
        let mut members = Members::default();
        let outboxes: Vec<_> = (0..3 * CHUNK + 7)
            .map(|i| {
                let o = Arc::new(Outbox::new(1 << 24));
                members.join(i as u64, sub(&o, false));
                o
            })
            .collect();
        let n = 3 * BATCH as u64 + 5;
        rt.block_on(async {
            for k in 1..=n {
                members.enqueue(&q, event(k));
                if k % 100 == 0 {
                    q.kick();
                    tokio::task::yield_now().await;
                }
            }
            q.kick();
            while q.lock().running || q.backlog() > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        });
        let want: Vec<u64> = (1..=n).collect();
        for o in &outboxes {
            assert_eq!(offsets(&rt, o), want);
        }
    }

    #[test]
    fn a_hopeless_backlog_closes_its_members_as_slow_consumers() {
        let stats = Arc::new(FanOutShared::default());
        let q = FanQueue::new(SlowConsumerPolicy::Disconnect, stats.clone());
        let mut members = Members::default();
        let o = Arc::new(Outbox::new(1 << 30));
        members.join(1, sub(&o, false));
        // No runner drains it (nothing kicks): the queue fills up.
        for k in 1..=MAX_QUEUED as u64 + 1 {
            members.enqueue(&q, event(k));
        }
        assert_eq!(q.backlog(), 0, "the backlog was dropped");
        assert_eq!(stats.slow_consumer_closes.get(), 1);
        let rt = current_thread();
        assert!(matches!(
            rt.block_on(o.next_batch_owned(usize::MAX)),
            Err(CloseReason::SlowConsumer)
        ));
    }
}
