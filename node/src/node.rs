//! [`Node`]: the state every transport shares — configuration, the topic registry,
//! counters, readiness, the shutdown signal and the set of live session tasks.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::cluster::relay::Ticket;
use crate::config::Config;
use crate::error::ApiError;
use crate::rate::TokenBucket;
use crate::stats::Stats;
use crate::topic::registry::Registry;
use crate::topic::{Published, Topic};

pub struct Node {
    pub config: Config,
    /// Who callers are and what they may do: every transport asks this.
    pub auth: Arc<crate::auth::Auth>,
    /// HTTPS/WSS on the HTTP listener, when `[tls]` is configured.
    pub tls: Option<Arc<crate::transport::tls::Tls>>,
    pub registry: Registry,
    pub stats: Stats,
    /// False from the moment shutdown begins: `/readyz` answers 503.
    ready: AtomicBool,
    shutdown: watch::Sender<bool>,
    /// Set by `POST /v1/admin/drain`.
    drain: watch::Sender<bool>,
    /// Every session task; shutdown waits for it to empty (bounded by the grace).
    pub tasks: TaskTracker,
    /// Where WebSocket sessions and hot topics' fan-out run (see [`Delivery`]).
    pub delivery: Delivery,
    /// Where client connections are read and answered (see [`Requests`]).
    pub requests: Requests,
    pub conns: Arc<ConnLimiter>,
    next_session: AtomicU64,
    /// Membership in the cluster, when this node runs with a router (the binary
    /// always does; in-process test nodes need not).
    pub cluster: std::sync::OnceLock<Arc<crate::cluster::membership::Cluster>>,
    /// The relay to other nodes (cluster mode): publishes and mirrors go through it.
    pub relay: std::sync::OnceLock<Arc<crate::cluster::relay::Relay>>,
    /// Admission of new sessions (reconnect-storm protection). A `std` mutex: the
    /// section is a few arithmetic operations and never awaits.
    admission: Mutex<TokenBucket>,
}

impl Node {
    /// Builds the node's shared state.
    ///
    /// # Panics
    /// If the configured key or certificate files cannot be read; binaries check them
    /// first with [`crate::config::Config::check_files`] and exit 64 with the reason.
    pub fn new(config: Config) -> Arc<Self> {
        crate::stats::prometheus();
        let stats = Stats::new(&config.node_id);
        let auth = Arc::new(crate::auth::Auth::new(&config).expect("auth configuration"));
        let tls = match (&config.tls.cert_file, &config.tls.key_file) {
            (Some(c), Some(k)) => Some(Arc::new(
                crate::transport::tls::Tls::load(c, k).expect("TLS configuration"),
            )),
            _ => None,
        };
        let delivery = Delivery::new();
        Arc::new(Self {
            auth,
            tls,
            registry: Registry::new(&config, stats.fanout(Some(delivery.handle().clone()))),
            stats,
            ready: AtomicBool::new(true),
            shutdown: watch::channel(false).0,
            drain: watch::channel(false).0,
            tasks: TaskTracker::new(),
            delivery,
            requests: Requests::new(),
            conns: Arc::new(ConnLimiter::new(
                config.limits.max_connections,
                config.limits.max_connections_per_ip,
                config.limits.connects_per_ip_per_s,
                config.limits.connects_per_ip_burst,
            )),
            next_session: AtomicU64::new(1),
            cluster: std::sync::OnceLock::new(),
            relay: std::sync::OnceLock::new(),
            admission: Mutex::new(TokenBucket::new(
                config.limits.new_sessions_per_s,
                config.limits.new_sessions_burst,
            )),
            config,
        })
    }

    /// `/readyz`: not draining, and not holding user tokens back while it hears its
    /// peers' revocations (a cluster node that has just started).
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && !self.auth.revocations_held()
    }

    /// From the moment drain or shutdown begins.
    pub fn is_draining(&self) -> bool {
        !self.ready.load(Ordering::Relaxed)
    }

    /// Why [`Self::is_ready`] is false, for a 503's body.
    pub fn unready_reason(&self) -> &'static str {
        if self.is_draining() {
            "node is draining"
        } else {
            "node is starting: still hearing its peers' revocations"
        }
    }

    /// Readiness goes false; sessions go on (a cluster node hands its topics over
    /// before they are told to wind down).
    pub fn mark_unready(&self) {
        self.ready.store(false, Ordering::Relaxed);
    }

    /// `POST /v1/admin/drain`: drain as on SIGTERM, then exit.
    pub fn request_drain(&self) {
        self.drain.send_replace(true);
    }

    pub async fn drain_requested(&self) {
        let mut rx = self.drain.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Readiness goes false and every session is told to wind down.
    pub fn begin_shutdown(&self) {
        self.ready.store(false, Ordering::Relaxed);
        self.shutdown.send_replace(true);
        // WebSocket sessions hear it through their one notice watch.
        self.auth.notify_sessions();
    }

    /// Whether [`Self::begin_shutdown`] has been called.
    pub fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Admits one new session, or refuses it with 503 and a Retry-After spread over
    /// 1-5 s so refused clients do not come back in one wave.
    pub fn admit_session(&self) -> Result<(), ApiError> {
        // Draining only: a starting node's hold on user tokens is decided at
        // authentication, so API-key and anonymous sessions are not held with them.
        if self.is_draining() {
            return Err(ApiError::Unavailable {
                message: "node is shutting down".into(),
                retry_after_s: 1,
            });
        }
        if self
            .admission
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .allow()
        {
            return Ok(());
        }
        self.stats.rate_limited.inc();
        Err(ApiError::Unavailable {
            message: "too many new sessions right now; retry after the indicated delay".into(),
            retry_after_s: fastrand::u64(1..=5),
        })
    }

    /// Starts a publish: sequenced here when this node owns the topic (or runs
    /// alone), else pushed to its owner at once, keeping the caller's order.
    pub fn start_publish(
        &self,
        topic: &str,
        data: Bytes,
        kind: Option<Arc<str>>,
        key: Option<&str>,
    ) -> Ticket {
        if let Some(relay) = self.relay.get() {
            return relay.start_publish(self, topic, data, kind, key);
        }
        Ticket::done(
            self.publish_here(topic, &data, &kind, key, &mut None)
                .and_then(|r| {
                    r.map_err(|_| ApiError::Unavailable {
                        message: "another node owns this topic".into(),
                        retry_after_s: 1,
                    })
                }),
        )
    }

    /// A publish on this node, through [`Topic::publish`] (the one place that decides
    /// whether it is sequenced here, held behind the topic's incoming handoff with the
    /// reply in `hold`, or belongs to another owner), with this node's idempotency window.
    pub fn publish_here(
        &self,
        topic: &str,
        data: &Bytes,
        kind: &Option<Arc<str>>,
        key: Option<&str>,
        hold: &mut Option<crate::topic::HeldReply>,
    ) -> Result<Result<Published, crate::topic::Elsewhere>, ApiError> {
        let window = self.idempotency_window();
        self.registry.with_topic(topic, |t| {
            t.publish(data.clone(), kind.clone(), key, window, &self.stats, hold)
        })
    }

    pub async fn finish_publish(&self, ticket: Ticket) -> Result<Published, ApiError> {
        match self.relay.get() {
            Some(relay) => relay.finish(self, ticket).await,
            None => ticket.into_done(),
        }
    }

    pub async fn publish(
        &self,
        topic: &str,
        data: Bytes,
        kind: Option<Arc<str>>,
        key: Option<&str>,
    ) -> Result<Published, ApiError> {
        let ticket = self.start_publish(topic, data, kind, key);
        self.finish_publish(ticket).await
    }

    /// Makes `topic` ready to serve here: on a mirror, waits (bounded) for the
    /// owner's snapshot, and for the mirror to reach `since` if the client saw newer
    /// events elsewhere. Owned topics and standalone nodes are ready at once.
    pub async fn ready_topic(
        &self,
        topic: &str,
        since: Option<&weft_proto::Cursor>,
    ) -> Result<(), ApiError> {
        match (self.relay.get(), self.topic_to_sync(topic, since)?) {
            (Some(relay), Some(t)) => relay.ensure_synced(&t, since).await,
            _ => Ok(()),
        }
    }

    /// The topic a subscribe with `since` must wait for before it is served here
    /// ([`Self::ready_topic`]), or `None` when it can be served at once: a standalone
    /// node, an owned topic, or a mirror that is synced and not behind `since`.
    pub fn topic_to_sync(
        &self,
        topic: &str,
        since: Option<&weft_proto::Cursor>,
    ) -> Result<Option<Arc<Topic>>, ApiError> {
        if self.relay.get().is_none() {
            return Ok(None);
        }
        let t = self.registry.get_or_create(topic)?;
        let ready = t.is_ready() && !since.is_some_and(|c| t.is_behind(c));
        Ok((!ready).then_some(t))
    }

    pub fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    pub fn client_id(&self, session: u64) -> Arc<str> {
        format!("{}-{session}", self.config.node_id).into()
    }

    pub fn idempotency_window(&self) -> (Duration, usize) {
        (
            Duration::from_secs(self.config.history.idempotency_ttl_s),
            self.config.history.idempotency_max_keys,
        )
    }

    /// When, after shutdown begins, this session should be closed: spread over the first
    /// half of the grace period so closes do not all land at once.
    pub fn close_deadline(&self) -> Instant {
        let spread = self.config.timing.shutdown_grace_ms / 2;
        Instant::now() + Duration::from_millis(fastrand::u64(0..=spread))
    }

    /// The `after_ms` to tell a disconnected client: jittered so reconnects spread out.
    pub fn reconnect_after_ms(&self) -> u64 {
        fastrand::u64(0..=self.config.timing.reconnect_jitter_ms)
    }

    /// `{"push":{"disconnect":{…}}}` for one session.
    pub fn disconnect_push(&self, code: u16, reason: &str, after_ms: u64) -> Bytes {
        let push = weft_proto::DisconnectPush {
            code,
            reason: reason.into(),
            reconnect: true,
            after_ms,
        };
        let body = serde_json::json!({ "push": { "disconnect": push } });
        Bytes::from(serde_json::to_vec(&body).expect("push serialises"))
    }
}

/// Connection admission, checked at accept before any byte is read: a node-wide cap,
/// a per-IP cap on open connections, and a per-IP connect rate, so one address can
/// neither hold nor churn through the node's capacity.
#[derive(Debug)]
pub struct ConnLimiter {
    total: AtomicUsize,
    max: usize,
    per_ip: Mutex<HashMap<IpAddr, PerIp>>,
    max_per_ip: usize,
    rate: (u32, u32),
}

#[derive(Debug)]
struct PerIp {
    open: usize,
    connects: TokenBucket,
}

/// Holds one admitted connection's place; dropping it frees the place.
#[derive(Debug)]
pub struct ConnGuard {
    limiter: Arc<ConnLimiter>,
    ip: IpAddr,
}

impl ConnLimiter {
    pub fn new(max: usize, max_per_ip: usize, connects_per_s: u32, connect_burst: u32) -> Self {
        Self {
            total: AtomicUsize::new(0),
            max,
            per_ip: Mutex::new(HashMap::new()),
            max_per_ip,
            rate: (connects_per_s, connect_burst),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, PerIp>> {
        self.per_ip.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnGuard, ApiError> {
        let mut per_ip = self.lock();
        if self.total.load(Ordering::Relaxed) >= self.max {
            return Err(ApiError::Unavailable {
                message: "connection limit of this node reached".into(),
                retry_after_s: 1,
            });
        }
        let (rate, burst) = self.rate;
        let entry = per_ip.entry(ip).or_insert_with(|| PerIp {
            open: 0,
            connects: TokenBucket::new(rate, burst),
        });
        if entry.open >= self.max_per_ip {
            return Err(ApiError::RateLimited {
                message: "connection limit for this address reached".into(),
                retry_after_s: 1,
            });
        }
        if !entry.connects.allow() {
            return Err(ApiError::RateLimited {
                message: "connecting too fast from this address".into(),
                retry_after_s: 1,
            });
        }
        entry.open += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(ConnGuard {
            limiter: self.clone(),
            ip,
        })
    }

    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Forgets addresses with no open connection whose connect budget has refilled:
    /// keeping them would change nothing, so the map only holds addresses that matter.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.lock()
            .retain(|_, e| e.open > 0 || !e.connects.is_full_at(now));
    }

    pub fn tracked_addresses(&self) -> usize {
        self.lock().len()
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut per_ip = self.limiter.lock();
        if let Some(e) = per_ip.get_mut(&self.ip) {
            e.open -= 1;
        }
        self.limiter.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A runtime of its own for delivery: the WebSocket sessions and the fan-out runs of
/// hot topics, whose work is writing events to sockets. On one runtime, a publish's
/// connection task, woken by its socket, waits at the back of the same FIFO run queue
/// as every session task and every round of writes the previous event started; with
/// delivery here, the kernel interleaves the two runtimes' threads and a publish is
/// read and acknowledged without waiting for a round of writes. Sockets stay
/// registered with the request thread that served their upgrade ([`Requests`]).
pub struct Delivery {
    rt: Option<tokio::runtime::Runtime>,
}

impl Delivery {
    fn new() -> Self {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("weft-delivery")
            .enable_all()
            .build()
            .expect("the delivery runtime starts");
        Self { rt: Some(rt) }
    }

    pub fn handle(&self) -> &tokio::runtime::Handle {
        self.rt.as_ref().expect("live until dropped").handle()
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Delivery")
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        // A node may be dropped inside another runtime (tests): never block there.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The threads client connections are served on: one current-thread runtime per
/// core, each connection handed to the next in turn when it is accepted. A request is
/// then read, published and answered on the thread whose I/O driver saw its socket
/// ready, with no second worker woken to steal it — on the multi-thread scheduler that
/// wake costs about one futex or eventfd write per request (BENCHMARKS.md, issue 12).
/// Connections are long-lived, so turn-by-turn assignment keeps the threads evenly
/// loaded; a connection never moves once placed.
pub struct Requests {
    handles: Vec<tokio::runtime::Handle>,
    next: AtomicUsize,
    /// Dropping a sender ends its thread's runtime.
    _stops: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl Requests {
    fn new() -> Self {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let (mut handles, mut stops) = (Vec::new(), Vec::new());
        for k in 0..threads {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a request runtime starts");
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            handles.push(rt.handle().clone());
            stops.push(stop);
            std::thread::Builder::new()
                .name(format!("weft-request-{k}"))
                .spawn(move || {
                    rt.block_on(async {
                        let _ = stopped.await;
                    });
                    // Whatever is still running is cut off, as the multi-thread
                    // runtime's shutdown would: the node is gone.
                    rt.shutdown_background();
                })
                .expect("a request thread starts");
        }
        Self {
            handles,
            next: AtomicUsize::new(0),
            _stops: stops,
        }
    }

    /// The runtime the next accepted connection is served on.
    pub fn next(&self) -> &tokio::runtime::Handle {
        let k = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[k]
    }
}

impl std::fmt::Debug for Requests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Requests({} threads)", self.handles.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_placed_on_each_request_thread_in_turn() {
        let requests = Requests::new();
        let n = requests.handles.len();
        let names: Vec<String> = (0..2 * n)
            .map(|_| {
                let (tx, rx) = std::sync::mpsc::channel();
                requests.next().spawn(async move {
                    let _ = tx.send(std::thread::current().name().map(str::to_owned));
                });
                rx.recv_timeout(Duration::from_secs(5))
                    .expect("the request thread runs what it is given")
                    .expect("request threads are named")
            })
            .collect();
        let expected: Vec<String> = (0..2 * n)
            .map(|k| format!("weft-request-{}", k % n))
            .collect();
        assert_eq!(names, expected);
    }

    #[test]
    fn limiter_counts_and_frees() {
        let l = Arc::new(ConnLimiter::new(3, 2, 1000, 1000));
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let g1 = l.admit(a).unwrap();
        let _g2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).unwrap_err().code(), 429);
        let _g3 = l.admit(b).unwrap();
        assert_eq!(l.admit(b).unwrap_err().code(), 503);
        drop(g1);
        assert_eq!(l.open(), 2);
        l.admit(a).unwrap();
    }

    #[test]
    fn connect_rate_per_address_and_the_map_stays_bounded() {
        let l = Arc::new(ConnLimiter::new(1000, 1000, 1, 3));
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        for _ in 0..3 {
            drop(l.admit(a).unwrap());
        }
        let refused = l.admit(a).unwrap_err();
        assert!(refused.to_string().contains("too fast"), "{refused}");
        // Another address has its own budget.
        drop(l.admit("127.0.0.3".parse().unwrap()).unwrap());
        // Addresses whose budget is spent are remembered; refilled ones are forgotten.
        l.sweep();
        assert_eq!(l.tracked_addresses(), 2);
        let idle = Arc::new(ConnLimiter::new(1000, 1000, 1000, 1));
        drop(idle.admit(a).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(5));
        idle.sweep();
        assert_eq!(idle.tracked_addresses(), 0);
    }
}
