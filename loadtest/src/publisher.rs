//! The open-loop publisher: `POST /v1/topics/{topic}/events` on a fixed schedule.
//!
//! Event `k` of the plan is due at `start + k/rate` whatever happened to earlier events:
//! the loop sleeps until each due time, takes a slot of the bounded in-flight window
//! (`--max-inflight`) and hands the request to a task. When the node is slow the window
//! fills and requests leave late, but every event still carries its *scheduled* time,
//! so the delay it suffered is part of its measured latency (no coordinated omission).
//! Only the harness's own timer lateness is left out: an event whose publisher was on
//! time is stamped when the timer fired (`wait_until_due`).
//!
//! Requests use keep-alive connections and carry `Idempotency-Key: <run>-<k>`, so a
//! retry (connection refused during a restart, 429, 503, 5xx) cannot publish twice while
//! the owner's dedupe window holds. Each event is retried until `--publish-timeout`
//! after its due time, then counted as a publish error.
//!
//! **Streams** (`--publish-via stream`): the same events, keys and retries over a few
//! long-lived `POST /v1/publish/stream` requests ([`pubstream`]), one line per event;
//! a line refused with `429`, `503` or a `5xx` is retried like the single publish.
//!
//! **Ordered** (`--ordered`, and always with `--system nats`): what a producer that must
//! keep a topic's order does. Each topic is published by one process only (the slot
//! that owns the topic number), by one task that sends the topic's events in schedule
//! order and waits for each acknowledgement (Weft: the `201`; NATS: the `PONG` of the
//! `PING` after the `PUB`) before it sends the next: at most one publish in flight per
//! topic. The schedule stays open-loop — each event is still due at `start + k/rate`
//! and stamped with that time, so a slow acknowledgement delays the events queued
//! behind it and their latency shows it. A topic whose next event is already more
//! than `--publish-timeout` late stops there; the rest of its events are *unsent*
//! (`publish_unsent`), which bounds the run and keeps every topic's acknowledged
//! events a prefix of its schedule.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use hyper::StatusCode;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::net::Net;
use crate::plan::{Plan, Slot};
use crate::recorder::Recorder;
use crate::stamp::{now_us, Stamp};
use crate::stats::{ErrorLog, LiveStats};
use crate::transport::nats::{self, NatsLinks};
use crate::transport::pubstream::{self, LineAck, StreamLinks};
use crate::transport::{error_message, retry_after};
use weft_proto::PublishResult;

/// Last acknowledged offset per (topic, epoch).
pub type EpochEnds = HashMap<(usize, String), u64>;

/// HTTP clients (connection pools) publishers spread over.
const PUBLISH_CLIENTS: usize = 4;
/// Time allowed for one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Publisher {
    pub net: Arc<Net>,
    pub topics: Arc<Vec<String>>,
    pub recorder: Arc<Recorder>,
    pub stats: Arc<LiveStats>,
    pub errors: Arc<ErrorLog>,
    pub run_id: String,
    pub max_inflight: usize,
    /// How long after its due time an event may still be retried.
    pub timeout: Duration,
    /// What the `201` answers said: how far each (topic, epoch) got (NATS: the last
    /// acknowledged ordinal of each topic, in epoch [`nats::EPOCH`]).
    pub epoch_ends: Mutex<EpochEnds>,
    /// One publish in flight per topic, each topic from one process (see above).
    pub ordered: bool,
    /// How the events reach the server.
    pub via: Via,
    /// Acknowledged payload bytes.
    pub bytes: AtomicU64,
    /// Wall clock of the last acknowledgement, µs.
    pub last_ack_us: AtomicU64,
}

/// How a publisher's events reach the server.
pub enum Via {
    /// One `POST /v1/topics/{t}/events` per event, over keep-alive connections.
    Http,
    /// `--publish-via stream`: a line each on a few long-lived publish streams.
    Stream(StreamLinks),
    /// `--system nats`: `PUB` + `PING` on NATS links.
    Nats(NatsLinks),
}

/// How every attempt at one event goes out.
enum Route<'a> {
    Http {
        client: usize,
        url: String,
        key: String,
    },
    Nats {
        links: &'a NatsLinks,
        subject: Arc<str>,
        /// The event's place in its topic (NATS has no offsets).
        place: u64,
    },
    /// The event's publish-stream line.
    Stream { links: &'a StreamLinks, line: Bytes },
}

/// What one attempt at publishing an event came to.
enum Attempt {
    /// Acknowledged at `at_us` (wall clock); where the topic got, if the answer said.
    Done {
        at_us: u64,
        end: Option<(String, u64)>,
    },
    /// Worth another try, after `after` (the backoff when `None`).
    Retry {
        why: String,
        after: Option<Duration>,
    },
    /// Refused for good.
    Fail(String),
}

/// What a publisher did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublishOutcome {
    pub published: u64,
    pub failed: u64,
    pub retries: u64,
    /// Events of this process's schedule.
    pub offered: u64,
    /// Ordered: events never sent because their topic fell more than
    /// `--publish-timeout` behind.
    pub unsent: u64,
}

impl Publisher {
    /// [`Publisher::run`] on a thread and a current-thread runtime of its own, as a
    /// separate producer process would run: an acknowledgement is read when it arrives,
    /// not after the subscriber tasks of this process that the same event woke. (On the
    /// shared runtime an ordered publisher of one hot topic queued behind hundreds of
    /// them per event, which capped its rate at what the harness could do — against
    /// Weft and nats-server alike.) The publisher's connections are opened on that
    /// runtime, so its `Net` must not have been used before.
    pub async fn run_apart(
        self: Arc<Self>,
        plan: Plan,
        slot: Slot,
        start: Instant,
        start_us: u64,
    ) -> anyhow::Result<PublishOutcome> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("weft-loadtest-publisher".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                let _ =
                    tx.send(runtime.map(|rt| rt.block_on(self.run(&plan, slot, start, start_us))));
            })
            .context("cannot start the publisher thread")?;
        rx.await
            .context("the publisher thread ended without a result")?
            .context("cannot start the publisher's runtime")
    }

    /// Publishes this slot's share of the plan's schedule, which starts at `start`
    /// (`start_us` on the wall clock). Returns when every request has finished.
    pub async fn run(
        self: Arc<Self>,
        plan: &Plan,
        slot: Slot,
        start: Instant,
        start_us: u64,
    ) -> PublishOutcome {
        if self.ordered {
            return self.run_ordered(plan, slot, start, start_us).await;
        }
        let window = Arc::new(Semaphore::new(self.max_inflight.max(1)));
        let mut tasks: JoinSet<(bool, u64)> = JoinSet::new();
        let total = plan.total_events();
        let mut out = PublishOutcome {
            offered: slot.share(total),
            ..Default::default()
        };
        let mut k = slot.index as u64;
        while k < total {
            let offset = plan.event_offset_us(k);
            let t = wait_until_due(start + Duration::from_micros(offset), start_us + offset).await;
            let permit = window
                .clone()
                .acquire_owned()
                .await
                .expect("the window semaphore is never closed");
            let stamp = Stamp {
                p: plan.event_publisher(k, slot),
                s: k,
                t,
            };
            let topic = plan.event_topic(k);
            let body = Bytes::from(stamp.encode(plan.payload_bytes));
            let me = self.clone();
            tasks.spawn(async move {
                let r = me.publish(k, topic, body, stamp.t).await;
                drop(permit);
                r
            });
            while let Some(done) = tasks.try_join_next() {
                out.add(done);
            }
            k += slot.count as u64;
        }
        while let Some(done) = tasks.join_next().await {
            out.add(done);
        }
        out
    }

    /// Ordered: one task per topic this process owns, each sending its topic's events
    /// one at a time. The in-flight window still caps requests across topics.
    async fn run_ordered(
        self: Arc<Self>,
        plan: &Plan,
        slot: Slot,
        start: Instant,
        start_us: u64,
    ) -> PublishOutcome {
        let window = Arc::new(Semaphore::new(self.max_inflight.max(1)));
        let total = plan.total_events();
        let mut tasks: JoinSet<PublishOutcome> = JoinSet::new();
        // Each task walks its topic's events lazily: memory does not grow with the
        // schedule.
        let shared = Arc::new(plan.clone());
        for topic in (0..plan.topics.len()).filter(|&t| slot.owns(t as u64)) {
            let (me, window, plan) = (self.clone(), window.clone(), shared.clone());
            tasks.spawn(async move {
                let mut out = PublishOutcome {
                    offered: plan.topic_events(topic, total).count() as u64,
                    ..Default::default()
                };
                let mut events = plan.topic_events(topic, total);
                while let Some(k) = events.next() {
                    let offset = plan.event_offset_us(k);
                    let due = start + Duration::from_micros(offset);
                    let t = wait_until_due(due, start_us + offset).await;
                    if Instant::now() > due + me.timeout {
                        out.unsent = 1 + events.count() as u64;
                        me.errors.add(format!(
                            "ordered publisher more than --publish-timeout ({:?}) behind: \
                             the rest of a topic's events were not sent",
                            me.timeout
                        ));
                        break;
                    }
                    let stamp = Stamp {
                        p: plan.event_publisher(k, slot),
                        s: k,
                        t,
                    };
                    let permit = window
                        .acquire()
                        .await
                        .expect("the window semaphore is never closed");
                    let body = Bytes::from(stamp.encode(plan.payload_bytes));
                    let r = me.publish(k, topic, body, stamp.t).await;
                    drop(permit);
                    out.add(Ok(r));
                }
                out
            });
        }
        let mut out = PublishOutcome::default();
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(o) => out.merge(&o),
                Err(e) => self
                    .errors
                    .add(format!("ordered publisher task failed: {e}")),
            }
        }
        out
    }

    /// One event with its retries; `(published, retries)`. Whatever the way it goes
    /// (one request, a NATS link, a publish stream), a refusal worth retrying and a
    /// broken connection are retried with a doubling backoff (or the server's
    /// `Retry-After`) until `--publish-timeout` after the event's due time.
    async fn publish(&self, k: u64, topic: usize, body: Bytes, intended_us: u64) -> (bool, u64) {
        let deadline = Instant::now()
            + self
                .timeout
                .saturating_sub(Duration::from_micros(now_us().saturating_sub(intended_us)));
        let how = self.route(k, topic, &body);
        let mut backoff = Duration::from_millis(50);
        let mut retries = 0;
        loop {
            let (why, pause) = match self.attempt(topic, &how, &body).await {
                Attempt::Done { at_us, end } => {
                    self.acked(k, body.len(), intended_us, at_us);
                    if let Some((epoch, offset)) = end {
                        self.note(topic, &epoch, offset);
                    }
                    return (true, retries);
                }
                Attempt::Retry { why, after } => (why, after.unwrap_or(backoff)),
                Attempt::Fail(why) => return self.failed(why, retries),
            };
            if Instant::now() + pause >= deadline {
                return self.failed(format!("{why} (gave up after {retries} retries)"), retries);
            }
            retries += 1;
            tokio::time::sleep(pause).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// What every attempt at event `k` sends, built once.
    fn route(&self, k: u64, topic: usize, body: &Bytes) -> Route<'_> {
        let name = &self.topics[topic];
        let key = format!("{}-{k}", self.run_id);
        match &self.via {
            Via::Nats(links) => Route::Nats {
                links,
                subject: Arc::from(name.as_str()),
                place: nats::ordinal(k, self.topics.len()).1,
            },
            Via::Stream(links) => Route::Stream {
                links,
                line: pubstream::line(name, body, &key),
            },
            Via::Http => Route::Http {
                client: k as usize % PUBLISH_CLIENTS,
                url: self.net.url(&format!("/v1/topics/{name}/events")),
                key,
            },
        }
    }

    /// One try at publishing an event.
    async fn attempt(&self, topic: usize, how: &Route<'_>, body: &Bytes) -> Attempt {
        match how {
            Route::Http { client, url, key } => {
                let sent = self
                    .net
                    .http(*client)
                    .post(url)
                    .header(hyper::header::CONTENT_TYPE, "application/json")
                    .header("Idempotency-Key", key)
                    .timeout(REQUEST_TIMEOUT)
                    .body(body.clone())
                    .send()
                    .await;
                match sent {
                    Ok(resp) if resp.status().is_success() => {
                        // Acknowledged at the `201`'s head; its body says where.
                        let at_us = now_us();
                        let end = resp
                            .bytes()
                            .await
                            .ok()
                            .and_then(|b| serde_json::from_slice::<PublishResult>(&b).ok())
                            .map(|r| (r.epoch, r.offset));
                        Attempt::Done { at_us, end }
                    }
                    Ok(resp) => {
                        let status = resp.status();
                        let after = retry_after(resp.headers());
                        let msg = error_message(&resp.bytes().await.unwrap_or_default());
                        let why = format!("publish answered {status}: {msg}");
                        if status == StatusCode::TOO_MANY_REQUESTS
                            || status == StatusCode::SERVICE_UNAVAILABLE
                        {
                            Attempt::Retry {
                                why,
                                after: Some(after),
                            }
                        } else if status.is_server_error() {
                            Attempt::Retry { why, after: None }
                        } else {
                            Attempt::Fail(why)
                        }
                    }
                    Err(e) => Attempt::Retry {
                        why: format!("publish failed: {:#}", anyhow::Error::new(e)),
                        after: None,
                    },
                }
            }
            // `PUB` + `PING`, acknowledged by the `PONG`. A retry after a lost `PONG`
            // may publish twice; subscribers count that as a duplicate.
            Route::Nats {
                links,
                subject,
                place,
            } => {
                match tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    links.publish(topic, subject, body.clone()),
                )
                .await
                {
                    Ok(Ok(())) => Attempt::Done {
                        at_us: now_us(),
                        end: Some((nats::EPOCH.to_owned(), *place)),
                    },
                    Ok(Err(e)) => Attempt::Retry {
                        why: format!("publish failed: {e:#}"),
                        after: None,
                    },
                    Err(_) => Attempt::Retry {
                        why: format!("NATS publish not acknowledged within {REQUEST_TIMEOUT:?}"),
                        after: None,
                    },
                }
            }
            // A line of a publish stream: the single publish's key and retry rules (a
            // broken stream is reopened by the retry).
            Route::Stream { links, line } => {
                match tokio::time::timeout(REQUEST_TIMEOUT, links.publish(topic, line.clone()))
                    .await
                {
                    Ok(Ok(LineAck::Published { epoch, offset })) => Attempt::Done {
                        at_us: now_us(),
                        end: Some((epoch, offset)),
                    },
                    Ok(Ok(LineAck::Refused { code, message })) => {
                        let why = format!("publish stream line answered {code}: {message}");
                        if code == 429 || code >= 500 {
                            Attempt::Retry { why, after: None }
                        } else {
                            Attempt::Fail(why)
                        }
                    }
                    Ok(Err(e)) => Attempt::Retry {
                        why: format!("publish failed: {e:#}"),
                        after: None,
                    },
                    Err(_) => Attempt::Retry {
                        why: format!(
                            "publish stream line not acknowledged within {REQUEST_TIMEOUT:?}"
                        ),
                        after: None,
                    },
                }
            }
        }
    }

    fn acked(&self, k: u64, bytes: usize, intended_us: u64, ack: u64) {
        self.recorder.publish(k as usize, ack, intended_us);
        LiveStats::inc(&self.stats.published);
        self.bytes.fetch_add(bytes as u64, Relaxed);
        self.last_ack_us.fetch_max(ack, Relaxed);
    }

    fn note(&self, topic: usize, epoch: &str, offset: u64) {
        let mut ends = self.epoch_ends.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: a topic gets a new epoch only when its history is lost.
        if ends.len() < 1_000_000 {
            let e = ends.entry((topic, epoch.to_owned())).or_insert(0);
            *e = (*e).max(offset);
        }
    }

    fn failed(&self, why: String, retries: u64) -> (bool, u64) {
        LiveStats::inc(&self.stats.publish_errors);
        self.errors.add(why);
        (false, retries)
    }
}

impl PublishOutcome {
    fn merge(&mut self, o: &PublishOutcome) {
        self.published += o.published;
        self.failed += o.failed;
        self.retries += o.retries;
        self.offered += o.offered;
        self.unsent += o.unsent;
    }

    fn add(&mut self, done: Result<(bool, u64), tokio::task::JoinError>) {
        match done {
            Ok((ok, retries)) => {
                if ok {
                    self.published += 1;
                } else {
                    self.failed += 1;
                }
                self.retries += retries;
            }
            Err(_) => self.failed += 1,
        }
    }
}

/// Waits for an event's due time and returns the time to stamp it with (µs on the wall
/// clock).
///
/// A publisher that is already late when it gets here was held back by the system (an
/// acknowledgement it waited for, the in-flight window): the event keeps its *scheduled*
/// time, so that delay is part of its latency (no coordinated omission). A publisher that
/// is early sleeps, and tokio's timer fires on the next millisecond tick after `due`,
/// 0–1 ms late (0.5 ms on average): that lateness is the harness's own, so the event is
/// stamped with the moment the sleep returned, never earlier than scheduled.
async fn wait_until_due(due: Instant, scheduled_us: u64) -> u64 {
    if Instant::now() >= due {
        return scheduled_us;
    }
    tokio::time::sleep_until(due).await;
    now_us().max(scheduled_us)
}
