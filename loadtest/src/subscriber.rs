//! One subscriber: its subscriptions' trackers and its reconnect loop.
//!
//! A subscriber runs sessions (one connection each, over its transport) until it has
//! received everything up to the topics' final cursors, or the drain deadline stops it.
//! A session ends on purpose (`churn` lifetimes), because the server asked
//! (`disconnect` push, close 4000/4008), or on an error; the next session resumes from
//! the trackers' cursors, so the accounting runs across reconnects: anything lost or
//! duplicated by a resume shows up in the counts.
//!
//! Every loop here is bounded: sessions by [`MAX_SESSIONS`] and by the stop signal the
//! engine raises at the drain deadline; waits between sessions by a capped backoff.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use weft_proto::Cursor;

use crate::net::Net;
use crate::plan::{Churn, SubscribeSchedule};
use crate::recorder::Recorder;
use crate::stamp::{now_us, Stamp};
use crate::stats::{ErrorLog, LiveStats};
use crate::tracker::{Counts, TopicTrack, Verdict};
use crate::transport::{self, System, Transport};

/// Sessions one subscriber may open in one run.
pub const MAX_SESSIONS: u64 = 100_000;
/// Longest pause the server may ask for before a reconnect.
const MAX_RECONNECT_PAUSE: Duration = Duration::from_secs(10);
const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// What is known once publishing is over.
#[derive(Debug, Clone, Default)]
pub struct Finals {
    /// Final cursor of each topic, by topic number.
    pub cursors: HashMap<usize, Cursor>,
    /// Last offset the publishers saw acknowledged in each (topic, epoch).
    pub epoch_ends: HashMap<(usize, String), u64>,
}

impl Finals {
    pub fn new(cursors: HashMap<usize, Cursor>) -> Self {
        Self {
            cursors,
            epoch_ends: HashMap::new(),
        }
    }
}

/// What every subscriber of a process shares.
pub struct Shared {
    pub net: Arc<Net>,
    /// Weft, or a `nats-server` (`--system nats`: WebSocket only).
    pub system: System,
    pub transport: Transport,
    /// Global topic names by topic number.
    pub topics: Arc<Vec<String>>,
    pub recorder: Arc<Recorder>,
    pub stats: Arc<LiveStats>,
    pub errors: Arc<ErrorLog>,
    pub churn: Option<Churn>,
    /// `wait=` of long-poll requests.
    pub longpoll_wait: Duration,
    /// `subscribe`: first subscribes go out on this schedule during the load.
    pub schedule: Option<SubscribeTimes>,
}

/// When each subscription's first subscribe is due (`subscribe` scenario).
#[derive(Debug, Clone)]
pub struct SubscribeTimes {
    pub schedule: SubscribeSchedule,
    /// The load's start, known once the ramp is over.
    pub start: watch::Receiver<Option<Instant>>,
}

/// Why a session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// Every subscription reached its topic's final cursor.
    CaughtUp,
    /// The drain deadline passed.
    Stopped,
    /// The churn lifetime of the session is over.
    Lifetime,
    /// The server asked the client to come back (drain, slow consumer, reset).
    Reconnect {
        after: Duration,
        why: String,
    },
    Failed(anyhow::Error),
}

/// What a subscriber leaves behind.
#[derive(Debug, Clone, Default)]
pub struct SubscriberOutcome {
    pub counts: Counts,
    pub sessions: u64,
    pub subscriptions: u64,
    /// Subscriptions that never started (no subscribe reply or state read).
    pub unstarted: u64,
}

/// When a session was meant to start (connect latency is measured from it) and when
/// churn ends it.
#[derive(Debug, Clone, Copy)]
pub struct SessionTimes {
    pub intended: Instant,
    pub lifetime: Option<Instant>,
}

pub struct Subscriber {
    pub id: usize,
    /// Global topic numbers, one per subscription.
    pub topics: Vec<usize>,
    pub tracks: Vec<TopicTrack>,
    pub finals: watch::Receiver<Option<Arc<Finals>>>,
    pub stop: watch::Receiver<bool>,
    all_started: bool,
}

impl Subscriber {
    pub fn new(
        id: usize,
        topics: Vec<usize>,
        finals: watch::Receiver<Option<Arc<Finals>>>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        let tracks = topics.iter().map(|_| TopicTrack::new()).collect();
        Self {
            id,
            topics,
            tracks,
            finals,
            stop,
            all_started: false,
        }
    }

    /// Runs sessions until caught up or stopped; the first connect is scheduled at
    /// `first_at` (connect latency is measured from the schedule, not from the attempt).
    pub async fn run(mut self, sh: Arc<Shared>, first_at: Instant) -> SubscriberOutcome {
        let mut stop = self.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep_until(first_at) => {}
            _ = stopped(&mut stop) => {}
        }
        let mut intended = first_at;
        let mut backoff = BACKOFF_START;
        let mut sessions = 0;
        while sessions < MAX_SESSIONS && !*self.stop.borrow() {
            sessions += 1;
            let lifetime = sh
                .churn
                .map(|c| Instant::now() + c.lifetime.mul_f64(0.5 + fastrand::f64()));
            sh.stats.connect_attempt(crate::stamp::now_us());
            let when = SessionTimes { intended, lifetime };
            let end = match sh.transport {
                _ if sh.system == System::Nats => {
                    transport::nats::session(&mut self, &sh, when).await
                }
                Transport::Ws => transport::ws::session(&mut self, &sh, when).await,
                // The HTTP transports start from the topics' state (the cursor each
                // session resumes after, or the current end).
                Transport::Sse | Transport::Longpoll => {
                    match transport::start_from_state(&mut self, &sh).await {
                        Err(end) => end,
                        Ok(()) if sh.transport == Transport::Sse => {
                            transport::sse::session(&mut self, &sh, when).await
                        }
                        Ok(()) => transport::longpoll::session(&mut self, &sh, when).await,
                    }
                }
            };
            let pause = match end {
                SessionEnd::CaughtUp | SessionEnd::Stopped => break,
                SessionEnd::Lifetime => {
                    LiveStats::inc(&sh.stats.reconnects);
                    backoff = BACKOFF_START;
                    sh.churn.map(|c| c.gap).unwrap_or_default()
                }
                SessionEnd::Reconnect { after, why } => {
                    LiveStats::inc(&sh.stats.reconnects);
                    sh.errors.add(format!("server asked to reconnect: {why}"));
                    backoff = BACKOFF_START;
                    after.min(MAX_RECONNECT_PAUSE)
                }
                SessionEnd::Failed(e) => {
                    LiveStats::inc(&sh.stats.reconnects);
                    sh.errors.add(format!("{:#}", e));
                    let b = backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    b
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stopped(&mut stop) => {}
            }
            intended = Instant::now();
        }
        self.outcome(sessions)
    }

    fn outcome(&self, sessions: u64) -> SubscriberOutcome {
        let finals = self.finals.borrow().clone();
        let mut counts = Counts::default();
        for (i, t) in self.tracks.iter().enumerate() {
            let topic = self.topics[i];
            let last = finals.as_ref().and_then(|f| f.cursors.get(&topic));
            let end = |epoch: &str| {
                finals
                    .as_ref()
                    .and_then(|f| f.epoch_ends.get(&(topic, epoch.to_owned())).copied())
            };
            counts.add(&t.finish(last, end));
        }
        SubscriberOutcome {
            counts,
            sessions,
            subscriptions: self.topics.len() as u64,
            unstarted: self.tracks.iter().filter(|t| !t.is_started()).count() as u64,
        }
    }

    /// Whether every subscription has reached its topic's final cursor.
    pub fn caught_up(&self) -> bool {
        let finals = self.finals.borrow();
        let Some(f) = finals.as_ref() else {
            return false;
        };
        self.tracks
            .iter()
            .zip(&self.topics)
            .all(|(t, topic)| f.cursors.get(topic).is_some_and(|c| t.caught_up(c)))
    }

    /// A subscribe reply or state read: the subscription's position.
    pub fn on_start(&mut self, sh: &Shared, i: usize, epoch: &str, offset: u64) {
        let before = self.tracks[i].counts().resets;
        self.tracks[i].start(epoch, offset);
        if self.tracks[i].counts().resets > before {
            LiveStats::inc(&sh.stats.resets);
        }
        if !self.all_started && self.tracks.iter().all(TopicTrack::is_started) {
            self.all_started = true;
            LiveStats::inc(&sh.stats.subscribed);
        }
    }

    /// The server said history is gone: continue from `epoch:offset`.
    pub fn on_reset(&mut self, sh: &Shared, i: usize, epoch: &str, offset: u64) {
        if self.tracks[i].is_started() {
            LiveStats::inc(&sh.stats.resets);
            self.tracks[i].reset(epoch, offset);
        } else {
            self.on_start(sh, i, epoch, offset);
        }
    }

    pub fn on_event(
        &mut self,
        sh: &Shared,
        i: usize,
        epoch: Option<&str>,
        offset: u64,
        data: &str,
        now_us: u64,
    ) -> Verdict {
        account(
            sh,
            self.id,
            &mut self.tracks[i],
            epoch,
            offset,
            data,
            now_us,
        )
    }
}

/// Accounts one received event of one subscription: the tracker's verdict, the live
/// counters, and the latency (receive time − the stamp's intended time) when the data
/// carries a stamp. `now_us` is passed in so tests can use a fake clock.
pub fn account(
    sh: &Shared,
    id: usize,
    track: &mut TopicTrack,
    epoch: Option<&str>,
    offset: u64,
    data: &str,
    now_us: u64,
) -> Verdict {
    let missing = track.missing();
    let resets = track.counts().resets;
    let v = match epoch {
        Some(e) => track.event_in_epoch(e, offset),
        None => track.event(offset),
    };
    if track.counts().resets > resets {
        LiveStats::inc(&sh.stats.resets);
    }
    match v {
        Verdict::New | Verdict::Reordered => {
            LiveStats::inc(&sh.stats.delivered);
            sh.stats
                .delivered_bytes
                .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
            if v == Verdict::Reordered {
                LiveStats::inc(&sh.stats.reordered);
            }
            if track.missing() > missing {
                sh.stats.gaps.fetch_add(
                    track.missing() - missing,
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            match Stamp::decode(data) {
                Some(stamp) => sh.recorder.delivery(id, now_us, stamp.t),
                None => LiveStats::inc(&sh.stats.foreign),
            }
        }
        Verdict::Duplicate => LiveStats::inc(&sh.stats.duplicates),
        Verdict::Unstarted => sh
            .errors
            .add("event received before its subscription started"),
    }
    v
}

/// Resolves when the stop flag is (or becomes) set, or its sender is gone.
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Resolves on the next change of the finals (never, once the sender is gone).
pub async fn finals_changed(finals: &mut watch::Receiver<Option<Arc<Finals>>>) {
    if finals.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Resolves at the session's churn deadline, or never.
pub async fn lifetime_over(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Decrements the open-connection gauge when a session's connection goes away.
pub struct OpenGuard<'a>(pub &'a LiveStats);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Connect bookkeeping shared by the transports: latency from the schedule and the
/// connect-rate window.
pub fn connected<'a>(sh: &'a Shared, id: usize, intended: Instant) -> OpenGuard<'a> {
    sh.recorder
        .connect(id, intended.elapsed().as_micros() as u64);
    sh.stats.connected(now_us());
    OpenGuard(&sh.stats)
}
