//! The HTTP side of one node as the tests read it, whether the node is a process or
//! in-process: `/v1/cluster`, owners, state, publishes (with and without retries),
//! drain and metrics. Every request has a deadline; errors say which node answered
//! what.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;
use weft_proto::{PublishResult, TopicState};

use crate::metrics::parse_metric;
use crate::wait::wait_for;

/// Longest a single HTTP request of the kit may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The node copies its counters into `/metrics` once a second; two reads further apart
/// than this straddle at least one copy.
const EXPORT_PERIOD: Duration = Duration::from_millis(1200);

/// `GET /v1/cluster/owner/{topic}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Owner {
    pub topic: String,
    pub slot: u64,
    pub owner: String,
    pub ring_version: u64,
}

/// One node's HTTP side; cheap to clone into tasks.
#[derive(Clone)]
pub struct NodeApi {
    /// The node id (it labels the node's metrics and names it in messages).
    pub name: String,
    pub addr: SocketAddr,
    pub http: reqwest::Client,
}

impl NodeApi {
    pub fn new(name: &str, addr: SocketAddr) -> Self {
        Self {
            name: name.into(),
            addr,
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The JSON body of a GET answered 200, or why not.
    pub async fn try_get_json(&self, path: &str) -> Result<Value, String> {
        let resp = self
            .http
            .get(self.url(path))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(|e| format!("{} GET {path}: {e}", self.name))?;
        let status = resp.status().as_u16();
        let body = resp
            .bytes()
            .await
            .map_err(|e| format!("{} GET {path}: {e}", self.name))?;
        if status != 200 {
            return Err(format!(
                "{} GET {path}: {status} {}",
                self.name,
                String::from_utf8_lossy(&body)
            ));
        }
        serde_json::from_slice(&body).map_err(|e| format!("{} GET {path}: {e}", self.name))
    }

    pub async fn get_json(&self, path: &str) -> Value {
        self.try_get_json(path)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `GET /v1/cluster`.
    pub async fn cluster(&self) -> Value {
        self.get_json("/v1/cluster").await
    }

    /// Polls `/v1/cluster` until `cond` holds, for at most `within`; the view it held in.
    pub async fn await_view(
        &self,
        within: Duration,
        what: &str,
        cond: impl Fn(&Value) -> bool,
    ) -> Value {
        let cond = &cond;
        crate::wait::wait_for_every(Duration::from_millis(25), within, what, || async move {
            let v = self.try_get_json("/v1/cluster").await?;
            if cond(&v) {
                Ok(v)
            } else {
                Err(v.to_string())
            }
        })
        .await
    }

    /// `POST /v1/admin/drain`; the node answers `202` and drains as on SIGTERM.
    pub async fn drain(&self) {
        let resp = self
            .http
            .post(self.url("/v1/admin/drain"))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{} POST /v1/admin/drain: {e}", self.name));
        assert_eq!(resp.status(), 202, "{} POST /v1/admin/drain", self.name);
    }

    /// `GET /v1/cluster/owner/{topic}`.
    pub async fn owner(&self, topic: &str) -> Owner {
        let v = self.get_json(&format!("/v1/cluster/owner/{topic}")).await;
        serde_json::from_value(v.clone())
            .unwrap_or_else(|e| panic!("{}: owner of {topic}: {e}: {v}", self.name))
    }

    /// The owner of each topic as this node answers it (a few requests in flight).
    pub async fn owners(&self, topics: &[String]) -> Vec<Owner> {
        futures_util::stream::iter(topics.iter().map(|t| self.owner(t)))
            .buffered(8)
            .collect()
            .await
    }

    /// The first of `prefix-0`, `prefix-1`, … that `owner` owns, as this node says.
    pub async fn topic_owned_by(&self, prefix: &str, owner: &str) -> String {
        for i in 0..500 {
            let t = format!("{prefix}-{i}");
            if self.owner(&t).await.owner == owner {
                return t;
            }
        }
        panic!("no {prefix}-N topic is owned by {owner}");
    }

    /// `GET /v1/topics/{topic}`.
    pub async fn state(&self, topic: &str) -> TopicState {
        let v = self.get_json(&format!("/v1/topics/{topic}")).await;
        serde_json::from_value(v.clone())
            .unwrap_or_else(|e| panic!("{}: state of {topic}: {e}: {v}", self.name))
    }

    /// One publish attempt: the result, or the status and body it was refused with.
    pub async fn try_publish(
        &self,
        topic: &str,
        data: &Value,
        idempotency_key: Option<&str>,
    ) -> Result<PublishResult, (u16, String)> {
        let mut req = self
            .http
            .post(self.url(&format!("/v1/topics/{topic}/events")))
            .header("content-type", "application/json")
            .timeout(REQUEST_TIMEOUT)
            .body(data.to_string());
        if let Some(key) = idempotency_key {
            req = req.header("idempotency-key", key);
        }
        let resp = req.send().await.map_err(|e| (0, e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(|e| (status, e.to_string()))?;
        if status != 201 {
            return Err((status, String::from_utf8_lossy(&body).into_owned()));
        }
        serde_json::from_slice(&body).map_err(|e| (status, e.to_string()))
    }

    /// Publishes and expects `201`.
    pub async fn publish(&self, topic: &str, data: &Value) -> PublishResult {
        self.try_publish(topic, data, None)
            .await
            .unwrap_or_else(|(status, body)| {
                panic!("publish to {topic} on {}: {status} {body}", self.name)
            })
    }

    /// Publishes with an `Idempotency-Key`, retrying while the node answers `503`
    /// (owner unreachable, DESIGN §3.1) or cannot be reached, for at most `within`. Any
    /// other refusal fails the test. The key makes a retry of an applied publish a no-op.
    pub async fn publish_retrying(
        &self,
        topic: &str,
        data: &Value,
        key: &str,
        within: Duration,
    ) -> PublishResult {
        wait_for(
            within,
            &format!("publish to {topic} on {}", self.name),
            || async move {
                match self.try_publish(topic, data, Some(key)).await {
                    Ok(r) => Ok(r),
                    Err((status @ (0 | 503), body)) => Err(format!("{status} {body}")),
                    Err((status, body)) => {
                        panic!("publish to {topic} on {}: {status} {body}", self.name)
                    }
                }
            },
        )
        .await
    }

    /// The value of a Prometheus series `name{node="<this node>",…}` (summed over its
    /// other labels), or `None` when the node exports no such series.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let resp = self
            .http
            .get(self.url("/metrics"))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{} GET /metrics: {e}", self.name));
        assert_eq!(resp.status(), 200, "{} GET /metrics", self.name);
        let text = resp.bytes().await.expect("read /metrics");
        parse_metric(&String::from_utf8_lossy(&text), name, &self.name)
    }

    /// [`NodeApi::metric`] once it has stopped moving: two reads an export period apart
    /// agree. Call it after the activity it counts is over.
    pub async fn settled_metric(&self, name: &str, within: Duration) -> Option<f64> {
        let start = Instant::now();
        let mut last = self.metric(name).await;
        loop {
            tokio::time::sleep(EXPORT_PERIOD).await;
            let now = self.metric(name).await;
            if now == last {
                return now;
            }
            assert!(
                start.elapsed() < within,
                "{name} on {} still moving after {within:?}: {last:?} then {now:?}",
                self.name
            );
            last = now;
        }
    }
}
