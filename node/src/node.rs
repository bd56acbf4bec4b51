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

use crate::config::Config;
use crate::error::ApiError;
use crate::rate::TokenBucket;
use crate::registry::Registry;
use crate::stats::Stats;

pub struct Node {
    pub config: Config,
    pub registry: Registry,
    pub stats: Stats,
    /// False from the moment shutdown begins: `/readyz` answers 503.
    ready: AtomicBool,
    shutdown: watch::Sender<bool>,
    /// Every session task; shutdown waits for it to empty (bounded by the grace).
    pub tasks: TaskTracker,
    pub conns: Arc<ConnLimiter>,
    next_session: AtomicU64,
    /// Admission of new sessions (reconnect-storm protection). A `std` mutex: the
    /// section is a few arithmetic operations and never awaits.
    admission: Mutex<TokenBucket>,
}

impl Node {
    pub fn new(config: Config) -> Arc<Self> {
        crate::stats::prometheus();
        let stats = Stats::new(&config.node_id);
        Arc::new(Self {
            registry: Registry::new(&config),
            stats,
            ready: AtomicBool::new(true),
            shutdown: watch::channel(false).0,
            tasks: TaskTracker::new(),
            conns: Arc::new(ConnLimiter::new(
                config.limits.max_connections,
                config.limits.max_connections_per_ip,
            )),
            next_session: AtomicU64::new(1),
            admission: Mutex::new(TokenBucket::new(
                config.limits.new_sessions_per_s,
                config.limits.new_sessions_burst,
            )),
            config,
        })
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Readiness goes false and every session is told to wind down.
    pub fn begin_shutdown(&self) {
        self.ready.store(false, Ordering::Relaxed);
        self.shutdown.send_replace(true);
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Admits one new session, or refuses it with 503 and a Retry-After spread over
    /// 1-5 s so refused clients do not come back in one wave.
    pub fn admit_session(&self) -> Result<(), ApiError> {
        if !self.is_ready() {
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

/// Connection admission: a node-wide cap and a per-IP cap, checked at accept.
#[derive(Debug)]
pub struct ConnLimiter {
    total: AtomicUsize,
    max: usize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    max_per_ip: usize,
}

/// Holds one admitted connection's place; dropping it frees the place.
#[derive(Debug)]
pub struct ConnGuard {
    limiter: Arc<ConnLimiter>,
    ip: IpAddr,
}

impl ConnLimiter {
    pub fn new(max: usize, max_per_ip: usize) -> Self {
        Self {
            total: AtomicUsize::new(0),
            max,
            per_ip: Mutex::new(HashMap::new()),
            max_per_ip,
        }
    }

    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnGuard, ApiError> {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if self.total.load(Ordering::Relaxed) >= self.max {
            return Err(ApiError::Unavailable {
                message: "connection limit of this node reached".into(),
                retry_after_s: 1,
            });
        }
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return Err(ApiError::RateLimited {
                message: "connection limit for this address reached".into(),
                retry_after_s: 1,
            });
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(ConnGuard {
            limiter: self.clone(),
            ip,
        })
    }

    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut per_ip = self
            .limiter
            .per_ip
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
        self.limiter.total.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_counts_and_frees() {
        let l = Arc::new(ConnLimiter::new(3, 2));
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
        assert!(l.per_ip.lock().unwrap().len() <= 2);
    }
}
