//! Node counters and their export to Prometheus (DESIGN §7).
//!
//! The hot paths bump plain relaxed atomics in [`Stats`]; a background task copies them
//! into `metrics` handles once a second ([`Exporter`]), so the fan-out path never goes
//! through the recorder. Every `weft_*` series carries a `node` label, so several nodes
//! in one process (tests) never mix their figures; the `process_*` families describe
//! the whole process and carry none (read and rendered by
//! [`weft_router::prometheus`], which the router's page shares).
//!
//! Every family is described once (`# HELP` and `# TYPE`, when [`prometheus`]
//! installs the recorder), so the page passes `promtool check metrics`; `helm/weft`'s
//! dashboard and alerts name only families listed in [`FAMILIES`], and a test holds
//! both to what a live node exports.
//!
//! HTTP requests are counted by route template (`/v1/topics/{topic}/events`, never the
//! concrete path, so the label set stays bounded) in [`track_http`]. Its duration is the
//! time to the response head: for a publish that is the publish latency, for a watch
//! (SSE, NDJSON) or a WebSocket upgrade it is the time to the stream's start.
//!
//! Bytes in and out are counted per [`Traffic`] (`ws`, `sse`, `ndjson`, `http`): the
//! protocol's bytes (WebSocket frames as written and read, HTTP bodies), before TLS.
//! Relay lag is what each peer link holds queued (bytes and frames, by `peer`), read
//! from the links at every export.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

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

/// What client bytes travel as, for `weft_bytes_received_total` / `_sent_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Traffic {
    /// WebSocket frames (after the upgrade).
    Ws,
    /// SSE response bodies.
    Sse,
    /// NDJSON bodies: watch streams out, the streaming publish in.
    Ndjson,
    /// Every other HTTP body (REST, history pages, long-poll).
    Http,
}

impl Traffic {
    pub const ALL: [Traffic; 4] = [Traffic::Ws, Traffic::Sse, Traffic::Ndjson, Traffic::Http];
    pub fn label(self) -> &'static str {
        match self {
            Traffic::Ws => "ws",
            Traffic::Sse => "sse",
            Traffic::Ndjson => "ndjson",
            Traffic::Http => "http",
        }
    }

    /// The traffic an HTTP body of this `Content-Type` is.
    pub fn of_content_type(content_type: Option<&str>) -> Self {
        match content_type.map(|c| c.split(';').next().unwrap_or("").trim()) {
            Some(c) if c.eq_ignore_ascii_case("text/event-stream") => Traffic::Sse,
            Some(c) if c.eq_ignore_ascii_case("application/x-ndjson") => Traffic::Ndjson,
            _ => Traffic::Http,
        }
    }
}

#[derive(Debug)]
pub struct Stats {
    pub published: Count,
    /// Shared with the fan-out, which counts the events it writes to sockets itself.
    pub delivered: Arc<Count>,
    /// Events replaced in a queue under the conflate policy.
    pub conflated: Arc<Count>,
    pub slow_consumer_closes: Arc<Count>,
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
    /// Client bytes read and written, by [`Traffic`].
    pub bytes_received: [Count; 4],
    pub bytes_sent: [Arc<Count>; 4],
    /// The HTTP request metrics' handles ([`track_http`]).
    pub http: HttpMetrics,
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
    /// What the topics' fan-out shares: these counters (it runs apart from any
    /// request) and the runtime hot topics deliver on.
    pub fn fanout(
        &self,
        runtime: Option<tokio::runtime::Handle>,
    ) -> Arc<crate::topic::fanout::FanOutShared> {
        Arc::new(crate::topic::fanout::FanOutShared {
            runtime,
            conflated: self.conflated.clone(),
            slow_consumer_closes: self.slow_consumer_closes.clone(),
            delivered: self.delivered.clone(),
            ws_bytes_sent: self.bytes_sent[Traffic::Ws as usize].clone(),
            latency: Some(self.delivery_latency.clone()),
        })
    }

    pub fn new(node: &str) -> Self {
        Self {
            delivery_latency: metrics::histogram!("weft_delivery_latency_seconds", "node" => node.to_owned()),
            http: HttpMetrics::new(node),
            ..Self::detached()
        }
    }

    /// Counters with no exporter behind them (unit tests).
    pub fn detached() -> Self {
        Self {
            published: Count::default(),
            delivered: Arc::default(),
            conflated: Arc::default(),
            slow_consumer_closes: Arc::default(),
            rate_limited: Count::default(),
            bad_input: Count::default(),
            connections_refused: Count::default(),
            connections: Default::default(),
            subscriptions: Level::default(),
            max_session_queue_bytes: AtomicU64::new(0),
            delivery_latency: Histogram::noop(),
            relay: RelayStats::default(),
            bytes_received: Default::default(),
            bytes_sent: Default::default(),
            http: HttpMetrics::new(""),
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

    /// Client sessions open now, over every transport.
    pub fn open_connections(&self) -> i64 {
        self.connections.iter().map(Level::get).sum()
    }

    pub fn received(&self, t: Traffic) -> &Count {
        &self.bytes_received[t as usize]
    }

    pub fn sent(&self, t: Traffic) -> &Count {
        &self.bytes_sent[t as usize]
    }
}

/// Buckets of `weft_delivery_latency_seconds` (publish → socket write).
const DELIVERY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Buckets of `weft_http_request_duration_seconds` (request → response head).
const HTTP_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Every metric family a node exports but the `process_*` ones
/// ([`weft_router::prometheus::PROCESS_FAMILIES`], shared with the router): name, type,
/// help. [`prometheus`] registers them; the chart's dashboard and alerts may name only
/// these (checked by a test).
pub const FAMILIES: &[weft_router::prometheus::Family] = &[
    ("weft_build_info", Kind::Gauge, "Always 1; the labels say which build runs (version, git commit)."),
    ("weft_published_total", Kind::Counter, "Events sequenced by this node as the topic's owner."),
    ("weft_delivered_total", Kind::Counter, "Events written to client sessions on this node."),
    ("weft_queue_drops_total", Kind::Counter, "Queued events replaced under the conflate slow-consumer policy."),
    ("weft_slow_consumer_closes_total", Kind::Counter, "Sessions closed because their outbound queue exceeded its byte budget (WS close 4008)."),
    ("weft_rate_limit_hits_total", Kind::Counter, "Requests and commands refused by a rate limit (429 / 4029)."),
    ("weft_bad_input_total", Kind::Counter, "Malformed or invalid requests answered with 400, 404, 405, 413, 414, 415, 422 or 431."),
    ("weft_connections_refused_total", Kind::Counter, "Connections refused at accept (limits) or for a first request or handshake that never finished (a kept-alive connection closed for idling is not counted)."),
    ("weft_cluster_refused_total", Kind::Counter, "Cluster calls refused for the caller's certificate identity (PERMISSION_DENIED / UNAUTHENTICATED)."),
    ("weft_auth_refusals_total", Kind::Counter, "Requests, sessions and commands refused by client security, by reason (missing, invalid, expired, revoked, forbidden, origin, rate_limited)."),
    ("weft_relay_events_sent_total", Kind::Counter, "Events this node, as owner, queued to interested peers (one per event per peer)."),
    ("weft_relay_events_received_total", Kind::Counter, "Events applied from owners to this node's mirrors."),
    ("weft_relay_publishes_forwarded_total", Kind::Counter, "Publishes this node forwarded to the topic's owner."),
    ("weft_relay_lagged_total", Kind::Counter, "Follows a peer was dropped from because its relay link fell behind (it catches up from history)."),
    ("weft_relay_resets_total", Kind::Counter, "Mirrors whose history could not be continued; their sessions were told reset."),
    ("weft_relay_catch_ups_total", Kind::Counter, "Mirrors that caught up from a snapshot after a gap, nothing lost."),
    ("weft_relay_bad_frames_total", Kind::Counter, "Malformed or invalid relay frames received from peers."),
    ("weft_connections", Kind::Gauge, "Open client sessions by transport."),
    ("weft_subscriptions", Kind::Gauge, "Topic subscriptions held by sessions on this node."),
    ("weft_relay_links", Kind::Gauge, "Relay links to peer nodes that are up."),
    ("weft_topics", Kind::Gauge, "Topics this node holds (owned and mirrored)."),
    ("weft_history_bytes", Kind::Gauge, "Bytes of event history retained on this node."),
    ("weft_history_budget_bytes", Kind::Gauge, "The history memory budget (history.memory_budget_bytes)."),
    ("weft_max_session_queue_bytes", Kind::Gauge, "The largest number of bytes any one session's outbound queue has held."),
    ("weft_ready", Kind::Gauge, "1 while the node accepts new sessions (/readyz answers 200), 0 while it starts (hearing its peers' revocations) or drains."),
    ("weft_cluster_members", Kind::Gauge, "Cluster members in this node's view, by state (joining, active, draining)."),
    ("weft_ring_version", Kind::Gauge, "Version of the committed slot table this node acts on."),
    ("weft_router_heartbeat_age_seconds", Kind::Gauge, "Seconds since the router group last acknowledged this node's heartbeat (grows while the group has no leader)."),
    ("weft_delivery_latency_seconds", Kind::Histogram, "Publish to socket write, sampled once per written batch."),
    ("weft_http_requests_total", Kind::Counter, "HTTP requests answered, by route template, method and status."),
    ("weft_http_request_duration_seconds", Kind::Histogram, "HTTP request to response head, by route template and method (for a publish route: the publish latency)."),
    ("weft_http_request_bytes_total", Kind::Counter, "HTTP request body bytes read, by route template."),
    ("weft_http_response_bytes_total", Kind::Counter, "HTTP response body bytes sent, by route template (SSE and NDJSON streams included; WebSocket frames are not)."),
    ("weft_bytes_received_total", Kind::Counter, "Bytes read from clients, by transport: ws (WebSocket frames), ndjson (the streaming publish), http (other request bodies); before TLS."),
    ("weft_bytes_sent_total", Kind::Counter, "Bytes written to clients, by transport: ws (WebSocket frames), sse and ndjson (watch streams), http (other response bodies); before TLS."),
    ("weft_relay_link_queued_bytes", Kind::Gauge, "Relay lag: bytes queued on the link to each peer, not yet handed to gRPC (past 16 MiB of events the peer is dropped as lagging), by peer."),
    ("weft_relay_link_queued_frames", Kind::Gauge, "Relay lag: frames queued on the link to each peer, by peer."),
];

pub use weft_router::prometheus::Kind;

/// Registers `# HELP` / `# TYPE` for every family in [`FAMILIES`].
/// The process-wide Prometheus recorder, installed on first use, with every family
/// described and `weft_build_info` set.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("weft_delivery_latency_seconds".into()),
                DELIVERY_BUCKETS,
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("weft_http_request_duration_seconds".into()),
                    HTTP_BUCKETS,
                )
            })
            .expect("static bucket lists are non-empty");
        weft_router::prometheus::install(builder, FAMILIES, "weft_build_info")
    })
}

/// Reads one counter out of [`Stats`].
type Reader = fn(&Stats) -> u64;

/// Copies [`Stats`] (and the node's readiness and cluster view) into Prometheus series labelled with the node id.
pub struct Exporter {
    counters: Vec<(Counter, Reader)>,
    connections: Vec<Gauge>,
    subscriptions: Gauge,
    relay_links: Gauge,
    topics: Gauge,
    history_bytes: Gauge,
    history_budget: Gauge,
    max_session_queue: Gauge,
    ready: Gauge,
    members: [Gauge; 3],
    ring_version: Gauge,
    heartbeat_age: Gauge,
    /// `weft_bytes_received_total` and `weft_bytes_sent_total`, by [`Traffic::ALL`].
    bytes: Vec<(Counter, Counter)>,
    /// Relay lag gauges (queued bytes, frames) of each peer linked at the last round.
    /// A peer whose link is gone is set to 0 once and dropped from the map, so the map
    /// holds the current links only.
    links: std::sync::Mutex<std::collections::HashMap<Arc<str>, (Gauge, Gauge)>>,
    node: String,
}

impl Exporter {
    pub fn new(node: &str) -> Self {
        let n = || node.to_owned();
        let c = |name: &'static str| metrics::counter!(name, "node" => n());
        let g = |name: &'static str| metrics::gauge!(name, "node" => n());
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
            subscriptions: g("weft_subscriptions"),
            relay_links: g("weft_relay_links"),
            topics: g("weft_topics"),
            history_bytes: g("weft_history_bytes"),
            history_budget: g("weft_history_budget_bytes"),
            max_session_queue: g("weft_max_session_queue_bytes"),
            ready: g("weft_ready"),
            members: ["joining", "active", "draining"]
                .map(|s| metrics::gauge!("weft_cluster_members", "node" => n(), "state" => s)),
            ring_version: g("weft_ring_version"),
            heartbeat_age: g("weft_router_heartbeat_age_seconds"),
            bytes: Traffic::ALL
                .iter()
                .map(|t| {
                    (
                        metrics::counter!("weft_bytes_received_total", "node" => n(), "transport" => t.label()),
                        metrics::counter!("weft_bytes_sent_total", "node" => n(), "transport" => t.label()),
                    )
                })
                .collect(),
            links: Default::default(),
            node: n(),
        }
    }

    /// One export round (the background task calls it once a second).
    pub fn export(&self, node: &crate::Node) {
        let stats = &node.stats;
        for (counter, read) in &self.counters {
            counter.absolute(read(stats));
        }
        for (gauge, level) in self.connections.iter().zip(&stats.connections) {
            gauge.set(level.get() as f64);
        }
        for ((received, sent), t) in self.bytes.iter().zip(Traffic::ALL) {
            received.absolute(stats.received(t).get());
            sent.absolute(stats.sent(t).get());
        }
        if let Some(relay) = node.relay.get() {
            self.export_links(relay.link_backlogs());
        }
        self.subscriptions.set(stats.subscriptions.get() as f64);
        self.relay_links.set(stats.relay.links.get() as f64);
        self.topics.set(node.registry.topic_count() as f64);
        self.history_bytes.set(node.registry.history_bytes() as f64);
        self.history_budget
            .set(node.config.history.memory_budget_bytes as f64);
        self.max_session_queue
            .set(stats.max_session_queue_bytes.load(Ordering::Relaxed) as f64);
        self.ready.set(if node.is_ready() { 1.0 } else { 0.0 });
        if let Some(cluster) = node.cluster.get() {
            let health = cluster.health();
            for (gauge, n) in self.members.iter().zip(health.members_by_state) {
                gauge.set(n as f64);
            }
            self.ring_version.set(health.ring_version as f64);
            if let Some(age) = health.heartbeat_age {
                self.heartbeat_age.set(age.as_secs_f64());
            }
        }
    }
}

impl Exporter {
    /// Sets each linked peer's lag gauges; zeroes and forgets peers no longer linked.
    fn export_links(&self, backlogs: Vec<(Arc<str>, usize, usize)>) {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let live: std::collections::HashSet<&str> =
            backlogs.iter().map(|(peer, _, _)| &**peer).collect();
        links.retain(|peer, (bytes, frames)| {
            let keep = live.contains(&**peer);
            if !keep {
                bytes.set(0.0);
                frames.set(0.0);
            }
            keep
        });
        for (peer, queued_bytes, queued_frames) in &backlogs {
            let (bytes, frames) = links.entry(peer.clone()).or_insert_with(|| {
                let label = || peer.to_string();
                (
                    metrics::gauge!("weft_relay_link_queued_bytes", "node" => self.node.clone(), "peer" => label()),
                    metrics::gauge!("weft_relay_link_queued_frames", "node" => self.node.clone(), "peer" => label()),
                )
            });
            bytes.set(*queued_bytes as f64);
            frames.set(*queued_frames as f64);
        }
    }
}

/// The `/metrics` page: every recorded family, then the `process_*` families read
/// from `/proc/self` at scrape time ([`weft_router::prometheus::with_process`]).
///
/// A family with no series yet (the relay lag of a node without peers, the bytes of a
/// transport nobody used) is still declared with its `# HELP` and `# TYPE`, so what a
/// node exports does not depend on its traffic.
pub fn render() -> String {
    let mut page = prometheus().render();
    for &(name, kind, help) in FAMILIES {
        if name.starts_with("process_") || page.contains(&format!("# TYPE {name} ")) {
            continue;
        }
        page.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {}\n\n",
            kind.name()
        ));
    }
    weft_router::prometheus::with_process(page)
}

/// Counts and times every HTTP request by route template (a `tower` middleware on the
/// node's router), and counts its body bytes both ways by route and by [`Traffic`]. The
/// concrete path never becomes a label: topics are unbounded.
pub async fn track_http(
    axum::extract::State(node): axum::extract::State<std::sync::Arc<crate::Node>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::header::CONTENT_TYPE;
    let started = std::time::Instant::now();
    let http = &node.stats.http;
    let route = http.route(
        req.extensions()
            .get::<axum::extract::MatchedPath>()
            .map_or("unmatched", |p| p.as_str()),
    );
    let method = METHODS[..METHODS.len() - 1]
        .iter()
        .position(|m| *m == req.method().as_str())
        .unwrap_or(METHODS.len() - 1);
    let content_type = |h: &axum::http::HeaderMap| {
        Traffic::of_content_type(h.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()))
    };
    let traffic_in = content_type(req.headers());
    let req = req.map(|body| {
        axum::body::Body::new(CountedBody {
            body,
            route: route.request_bytes.clone(),
            node: node.clone(),
            count: Direction::Received(traffic_in),
        })
    });
    let resp = next.run(req).await;
    let by_method = route.method(http, method);
    by_method.count(http, &route.route, method, resp.status().as_u16());
    by_method.duration.record(started.elapsed().as_secs_f64());
    let traffic_out = content_type(resp.headers());
    let (parts, body) = resp.into_parts();
    axum::response::Response::from_parts(
        parts,
        axum::body::Body::new(CountedBody {
            body,
            route: route.response_bytes.clone(),
            node,
            count: Direction::Sent(traffic_out),
        }),
    )
}
/// The request metrics' handles, resolved once per route template and method (and
/// status) rather than per request: a labelled lookup in the recorder hashes every
/// label and takes a registry lock, and building its labels allocates four strings.
/// Bounded like the label set itself: the router's templates plus `unmatched`, eight
/// methods, the statuses the node answers.
pub struct HttpMetrics {
    node: String,
    routes: std::sync::RwLock<std::collections::HashMap<Box<str>, Arc<RouteMetrics>>>,
}

/// One route template's handles.
struct RouteMetrics {
    route: Box<str>,
    request_bytes: Counter,
    response_bytes: Counter,
    methods: [OnceLock<MethodMetrics>; METHODS.len()],
}

/// One route and method's handles.
struct MethodMetrics {
    duration: Histogram,
    /// By status; a handful per route, so a scan beats a map.
    statuses: std::sync::Mutex<Vec<(u16, Counter)>>,
}

/// The `method` label's values; anything else is `other`.
const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "other",
];

impl std::fmt::Debug for HttpMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpMetrics")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl HttpMetrics {
    pub fn new(node: &str) -> Self {
        Self {
            node: node.to_owned(),
            routes: Default::default(),
        }
    }

    /// The handles of `route` (a template, or `unmatched`).
    fn route(&self, route: &str) -> Arc<RouteMetrics> {
        let read = self.routes.read().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = read.get(route) {
            return r.clone();
        }
        drop(read);
        let mut write = self.routes.write().unwrap_or_else(|p| p.into_inner());
        write
            .entry(route.into())
            .or_insert_with(|| {
                let (node, route) = (self.node.clone(), route.to_owned());
                Arc::new(RouteMetrics {
                    route: route.clone().into(),
                    request_bytes: metrics::counter!("weft_http_request_bytes_total", "node" => node.clone(), "route" => route.clone()),
                    response_bytes: metrics::counter!("weft_http_response_bytes_total", "node" => node, "route" => route),
                    methods: Default::default(),
                })
            })
            .clone()
    }
}

impl RouteMetrics {
    fn method(&self, http: &HttpMetrics, method: usize) -> &MethodMetrics {
        self.methods[method].get_or_init(|| MethodMetrics {
            duration: metrics::histogram!(
                "weft_http_request_duration_seconds",
                "node" => http.node.clone(),
                "route" => self.route.to_string(),
                "method" => METHODS[method],
            ),
            statuses: Default::default(),
        })
    }
}

impl MethodMetrics {
    fn count(&self, http: &HttpMetrics, route: &str, method: usize, status: u16) {
        let mut statuses = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, c)) = statuses.iter().find(|(s, _)| *s == status) {
            c.increment(1);
            return;
        }
        let c = metrics::counter!(
            "weft_http_requests_total",
            "node" => http.node.clone(),
            "route" => route.to_owned(),
            "method" => METHODS[method],
            "status" => status.to_string(),
        );
        c.increment(1);
        statuses.push((status, c));
    }
}

/// Which of the node's byte counters a [`CountedBody`] adds to.
#[derive(Clone, Copy)]
enum Direction {
    Received(Traffic),
    Sent(Traffic),
}

/// A body that adds the size of every data frame it yields to its route's counter and
/// to the node's per-traffic count.
struct CountedBody {
    body: axum::body::Body,
    route: Counter,
    node: std::sync::Arc<crate::Node>,
    count: Direction,
}

impl http_body::Body for CountedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                let n = data.len() as u64;
                self.route.increment(n);
                let stats = &self.node.stats;
                match self.count {
                    Direction::Received(t) => stats.received(t).add(n),
                    Direction::Sent(t) => stats.sent(t).add(n),
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_method_and_status_resolve_their_handles_once() {
        let http = HttpMetrics::new("n-test");
        let route = http.route("/v1/topics/{topic}/events");
        assert!(Arc::ptr_eq(
            &route,
            &http.route("/v1/topics/{topic}/events")
        ));
        assert!(!Arc::ptr_eq(&route, &http.route("unmatched")));
        let post = METHODS.iter().position(|m| *m == "POST").unwrap();
        let by_method = route.method(&http, post);
        assert!(std::ptr::eq(by_method, route.method(&http, post)));
        for status in [200, 200, 201, 200, 429] {
            by_method.count(&http, &route.route, post, status);
        }
        let statuses: Vec<u16> = by_method
            .statuses
            .lock()
            .unwrap()
            .iter()
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(statuses, [200, 201, 429]);
    }

    #[test]
    fn every_family_is_described_once() {
        let all: Vec<_> = FAMILIES
            .iter()
            .chain(weft_router::prometheus::PROCESS_FAMILIES)
            .copied()
            .collect();
        weft_router::prometheus::check_families(&all).unwrap();
    }
}
