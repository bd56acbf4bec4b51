//! The open-loop publisher: `POST /v1/topics/{topic}/events` on a fixed schedule.
//!
//! Event `k` of the plan is due at `start + k/rate` whatever happened to earlier events:
//! the loop sleeps until each due time, takes a slot of the bounded in-flight window
//! (`--max-inflight`) and hands the request to a task. When the node is slow the window
//! fills and requests leave late, but every event still carries its *scheduled* time,
//! so the delay it suffered is part of its measured latency (no coordinated omission).
//!
//! Requests use keep-alive connections and carry `Idempotency-Key: <run>-<k>`, so a
//! retry (connection refused during a restart, 429, 503, 5xx) cannot publish twice while
//! the owner's dedupe window holds. Each event is retried until `--publish-timeout`
//! after its due time, then counted as a publish error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use reqwest::StatusCode;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::net::Net;
use crate::plan::{Plan, Slot};
use crate::recorder::Recorder;
use crate::stamp::{now_us, Stamp};
use crate::stats::{ErrorLog, LiveStats};
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
    /// What the `201` answers said: how far each (topic, epoch) got.
    pub epoch_ends: Mutex<EpochEnds>,
}

/// What a publisher did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublishOutcome {
    pub published: u64,
    pub failed: u64,
    pub retries: u64,
}

impl Publisher {
    /// Publishes this slot's share of the plan's schedule, which starts at `start`
    /// (`start_us` on the wall clock). Returns when every request has finished.
    pub async fn run(
        self: Arc<Self>,
        plan: &Plan,
        slot: Slot,
        start: Instant,
        start_us: u64,
    ) -> PublishOutcome {
        let window = Arc::new(Semaphore::new(self.max_inflight.max(1)));
        let mut tasks: JoinSet<(bool, u64)> = JoinSet::new();
        let mut out = PublishOutcome::default();
        let total = plan.total_events();
        let mut k = slot.index as u64;
        while k < total {
            let offset = plan.event_offset_us(k);
            tokio::time::sleep_until(start + Duration::from_micros(offset)).await;
            let permit = window
                .clone()
                .acquire_owned()
                .await
                .expect("the window semaphore is never closed");
            let stamp = Stamp {
                p: plan.event_publisher(k, slot),
                s: k,
                t: start_us + offset,
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

    /// One event with its retries; `(published, retries)`.
    async fn publish(&self, k: u64, topic: usize, body: Bytes, intended_us: u64) -> (bool, u64) {
        let deadline = Instant::now()
            + self
                .timeout
                .saturating_sub(Duration::from_micros(now_us().saturating_sub(intended_us)));
        let client = self.net.http(k as usize % PUBLISH_CLIENTS);
        let url = self
            .net
            .url(&format!("/v1/topics/{}/events", self.topics[topic]));
        let key = format!("{}-{k}", self.run_id);
        let mut backoff = Duration::from_millis(50);
        let mut retries = 0;
        loop {
            let sent = client
                .post(&url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header("Idempotency-Key", &key)
                .timeout(REQUEST_TIMEOUT)
                .body(body.clone())
                .send()
                .await;
            let (why, pause) = match sent {
                Ok(resp) if resp.status().is_success() => {
                    let ack = now_us();
                    self.recorder.publish(k as usize, ack, intended_us);
                    LiveStats::inc(&self.stats.published);
                    if let Ok(body) = resp.bytes().await {
                        if let Ok(r) = serde_json::from_slice::<PublishResult>(&body) {
                            self.note(topic, r);
                        }
                    }
                    return (true, retries);
                }
                Ok(resp) => {
                    let status = resp.status();
                    let after = retry_after(resp.headers());
                    let msg = error_message(&resp.bytes().await.unwrap_or_default());
                    let why = format!("publish answered {status}: {msg}");
                    if status == StatusCode::TOO_MANY_REQUESTS
                        || status == StatusCode::SERVICE_UNAVAILABLE
                    {
                        (why, after)
                    } else if status.is_server_error() {
                        (why, backoff)
                    } else {
                        return self.failed(why, retries);
                    }
                }
                Err(e) => (
                    format!("publish failed: {:#}", anyhow::Error::new(e)),
                    backoff,
                ),
            };
            if Instant::now() + pause >= deadline {
                return self.failed(format!("{why} (gave up after {retries} retries)"), retries);
            }
            retries += 1;
            tokio::time::sleep(pause).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    fn note(&self, topic: usize, r: PublishResult) {
        let mut ends = self.epoch_ends.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: a topic gets a new epoch only when its history is lost.
        if ends.len() < 1_000_000 {
            let e = ends.entry((topic, r.epoch)).or_insert(0);
            *e = (*e).max(r.offset);
        }
    }

    fn failed(&self, why: String, retries: u64) -> (bool, u64) {
        LiveStats::inc(&self.stats.publish_errors);
        self.errors.add(why);
        (false, retries)
    }
}

impl PublishOutcome {
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
