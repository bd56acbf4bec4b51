//! Node counters and their export to Prometheus (DESIGN §7).
//!
//! The hot paths bump plain relaxed atomics in [`Stats`]; a background task copies them
//! into `metrics` handles once a second ([`Exporter`]), so the fan-out path never goes
//! through the recorder. Every series carries a `node` label, so several nodes in one
//! process (tests) never mix their figures.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

#[derive(Debug, Default)]
pub struct Count(AtomicU64);

impl Count {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct Level(AtomicI64);

impl Level {
    pub fn up(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn down(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Ws,
    Sse,
    Ndjson,
    LongPoll,
}

impl Transport {
    pub const ALL: [Transport; 4] = [
        Transport::Ws,
        Transport::Sse,
        Transport::Ndjson,
        Transport::LongPoll,
    ];
    pub fn label(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Sse => "sse",
            Transport::Ndjson => "ndjson",
            Transport::LongPoll => "longpoll",
        }
    }
}

#[derive(Debug)]
pub struct Stats {
    pub published: Count,
    pub delivered: Count,
    /// Events replaced in a queue under the conflate policy.
    pub conflated: Count,
    pub slow_consumer_closes: Count,
    pub rate_limited: Count,
    /// Malformed or invalid input answered with an error.
    pub bad_input: Count,
    /// Connections refused at accept (limits) or for a handshake that never finished.
    pub connections_refused: Count,
    pub connections: [Level; 4],
    pub subscriptions: Level,
    /// The largest number of bytes any one session's queue has held.
    pub max_session_queue_bytes: AtomicU64,
    /// Publish → socket write, sampled once per written batch.
    pub delivery_latency: Histogram,
    pub relay: RelayStats,
}

/// The relay between nodes (one set per node).
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Events this node, as owner, queued to peers: one per event per interested node.
    pub events_sent: Count,
    /// Events applied from owners to this node's mirrors.
    pub events_received: Count,
    /// Publishes this node sent to the topic's owner.
    pub publishes_forwarded: Count,
    /// Follows a peer was dropped from because its link fell behind.
    pub lagged: Count,
    /// Mirrors whose history could not be continued: their sessions got `reset`.
    pub resets: Count,
    /// Mirrors that caught up from a snapshot after a gap, with nothing lost.
    pub catch_ups: Count,
    /// Malformed or invalid frames from peers (the link is closed or the frame refused).
    pub bad_frames: Count,
    pub links: Level,
}

impl Stats {
    pub fn new(node: &str) -> Self {
        Self {
            delivery_latency: metrics::histogram!("weft_delivery_latency_seconds", "node" => node.to_owned()),
            ..Self::detached()
        }
    }

    /// Counters with no exporter behind them (unit tests).
    pub fn detached() -> Self {
        Self {
            published: Count::default(),
            delivered: Count::default(),
            conflated: Count::default(),
            slow_consumer_closes: Count::default(),
            rate_limited: Count::default(),
            bad_input: Count::default(),
            connections_refused: Count::default(),
            connections: Default::default(),
            subscriptions: Level::default(),
            max_session_queue_bytes: AtomicU64::new(0),
            delivery_latency: Histogram::noop(),
            relay: RelayStats::default(),
        }
    }

    /// Folds a finished session's queue high-water mark into the node's.
    pub fn session_queue_peak(&self, bytes: usize) {
        self.max_session_queue_bytes
            .fetch_max(bytes as u64, Ordering::Relaxed);
    }

    pub fn connection(&self, t: Transport) -> &Level {
        &self.connections[t as usize]
    }
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("weft_delivery_latency_seconds".into()),
                &[
                    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5,
                ],
            )
            .expect("static bucket list is non-empty");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (an embedding application); then
        // our series go there and this handle renders only what it recorded itself.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Reads one counter out of [`Stats`].
type Reader = fn(&Stats) -> u64;

/// Copies [`Stats`] into Prometheus series labelled with the node id.
pub struct Exporter {
    counters: Vec<(Counter, Reader)>,
    connections: Vec<Gauge>,
    subscriptions: Gauge,
    relay_links: Gauge,
    topics: Gauge,
    history_bytes: Gauge,
}

impl Exporter {
    pub fn new(node: &str) -> Self {
        let n = || node.to_owned();
        let c = |name: &'static str| metrics::counter!(name, "node" => n());
        Self {
            counters: vec![
                (c("weft_published_total"), |s| s.published.get()),
                (c("weft_delivered_total"), |s| s.delivered.get()),
                (c("weft_queue_drops_total"), |s| s.conflated.get()),
                (c("weft_slow_consumer_closes_total"), |s| s.slow_consumer_closes.get()),
                (c("weft_rate_limit_hits_total"), |s| s.rate_limited.get()),
                (c("weft_bad_input_total"), |s| s.bad_input.get()),
                (c("weft_connections_refused_total"), |s| s.connections_refused.get()),
                (c("weft_relay_events_sent_total"), |s| s.relay.events_sent.get()),
                (c("weft_relay_events_received_total"), |s| s.relay.events_received.get()),
                (c("weft_relay_publishes_forwarded_total"), |s| s.relay.publishes_forwarded.get()),
                (c("weft_relay_lagged_total"), |s| s.relay.lagged.get()),
                (c("weft_relay_resets_total"), |s| s.relay.resets.get()),
                (c("weft_relay_catch_ups_total"), |s| s.relay.catch_ups.get()),
                (c("weft_relay_bad_frames_total"), |s| s.relay.bad_frames.get()),
                (c("weft_cluster_refused_total"), |_| weft_router::identity::refusals()),
            ],
            connections: Transport::ALL
                .iter()
                .map(|t| metrics::gauge!("weft_connections", "node" => n(), "transport" => t.label()))
                .collect(),
            subscriptions: metrics::gauge!("weft_subscriptions", "node" => n()),
            relay_links: metrics::gauge!("weft_relay_links", "node" => n()),
            topics: metrics::gauge!("weft_topics", "node" => n()),
            history_bytes: metrics::gauge!("weft_history_bytes", "node" => n()),
        }
    }

    pub fn export(&self, stats: &Stats, topics: usize, history_bytes: usize) {
        for (counter, read) in &self.counters {
            counter.absolute(read(stats));
        }
        for (gauge, level) in self.connections.iter().zip(&stats.connections) {
            gauge.set(level.get() as f64);
        }
        self.subscriptions.set(stats.subscriptions.get() as f64);
        self.relay_links.set(stats.relay.links.get() as f64);
        self.topics.set(topics as f64);
        self.history_bytes.set(history_bytes as f64);
    }
}
