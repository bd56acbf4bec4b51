//! The one typed configuration of a node (DESIGN §8).
//!
//! Layers, lowest first: built-in defaults < TOML file (`--config`) < `WEFT_*`
//! environment < command-line flags. Every flag `--a-b` is also `WEFT_A_B`. Settings
//! that have no flag (namespaces, rarely tuned limits) live in the TOML file.
//!
//! The whole configuration is validated before anything is bound; an invalid one is
//! reported in one line and the binary exits with code 64 (EX_USAGE).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use serde::{Deserialize, Serialize};
use weft_proto::Pattern;

/// Exit code for invalid configuration or usage (sysexits EX_USAGE).
pub const EXIT_USAGE: i32 = 64;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// REST, WebSocket, SSE and metrics.
    pub http_listen: SocketAddr,
    /// Reserved for the public gRPC API (DESIGN §3.4); this build does not bind it.
    /// Cluster traffic never uses it: see `cluster_listen`.
    pub grpc_listen: SocketAddr,
    /// Relay between nodes and the embedded router, mutual TLS (`[cluster]`). Absent:
    /// `0.0.0.0:9100` with `--router`, `127.0.0.1:9100` with the embedded router.
    pub cluster_listen: Option<SocketAddr>,
    /// QUIC / WebTransport (not bound by this build).
    pub quic_listen: SocketAddr,
    /// Address peers dial for the relay; derived from the cluster listener when absent.
    pub advertise: Option<String>,
    /// Unique per node; also the `node` label of every metric.
    pub node_id: String,
    /// Router addresses; absent = embedded single-node router.
    pub router: Option<String>,
    pub data_dir: PathBuf,
    pub log_format: LogFormat,
    /// Where to write the bound addresses as JSON once listening.
    pub ready_file: Option<PathBuf>,
    pub limits: Limits,
    pub history: HistoryConfig,
    pub timing: Timing,
    /// Who may connect and what they may do (DESIGN §6).
    pub auth: AuthConfig,
    /// Browser-facing HTTP policy: allowed origins (CORS and WebSocket upgrades).
    pub http: HttpConfig,
    /// HTTPS / WSS on the HTTP listener.
    pub tls: TlsConfig,
    /// The operations surface: probes, metrics, the cluster view.
    pub ops: OpsConfig,
    /// Policies by topic pattern, first match wins; a topic that matches none gets the
    /// built-in defaults of [`NamespaceConfig`].
    pub namespaces: Vec<NamespaceConfig>,
    /// Mutual TLS on the cluster listener and every cluster connection.
    pub cluster: weft_router::tls::ClusterConfig,
}

/// A secret from the configuration: `Debug` and `Serialize` print `***`, so it cannot
/// reach a log line or `--print-config` by accident.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "***" })
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "***" })
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// `[auth]`: JWT verification for clients, API keys for backends.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Development only: anonymous clients may subscribe and publish even though the
    /// node binds a non-loopback address. The node says so at start.
    pub allow_anonymous: bool,
    /// HS256 shared secret (or `hmac_secret_file`).
    pub hmac_secret: Secret,
    pub hmac_secret_file: Option<PathBuf>,
    /// RS256 / ES256 / EdDSA public keys, PEM files.
    pub public_keys: Vec<PathBuf>,
    /// A JWKS document: a file path or an `http(s)://` URL; refetched on an unknown
    /// `kid` and every `jwks_refresh_s`.
    pub jwks: Option<String>,
    pub jwks_refresh_s: u64,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud`, when set.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`, seconds.
    pub leeway_s: u64,
    /// Read the token from this cookie too (browsers on the same site).
    pub cookie: Option<String>,
    /// Backends' keys, stored as the hex SHA-256 of the key.
    pub api_keys: Vec<ApiKeyConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            allow_anonymous: false,
            hmac_secret: Secret::default(),
            hmac_secret_file: None,
            public_keys: Vec::new(),
            jwks: None,
            jwks_refresh_s: 300,
            issuer: None,
            audience: None,
            leeway_s: 30,
            cookie: None,
            api_keys: Vec::new(),
        }
    }
}

impl AuthConfig {
    /// Whether any way to authenticate is configured; without one the node runs in
    /// development mode (DESIGN §6).
    pub fn is_configured(&self) -> bool {
        !self.hmac_secret.is_empty()
            || self.hmac_secret_file.is_some()
            || !self.public_keys.is_empty()
            || self.jwks.is_some()
            || !self.api_keys.is_empty()
    }

    /// Whether clients without credentials are let in: development mode, or on purpose.
    pub fn anonymous_allowed(&self) -> bool {
        self.allow_anonymous || !self.is_configured()
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiKeyConfig {
    pub name: String,
    /// Hex SHA-256 of the key; the key itself is never stored.
    pub sha256: String,
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    /// May call `/v1/admin/*` (and `/v1/cluster` unless it is public).
    pub admin: bool,
    /// Publishes per second through this key (all its requests together), and the
    /// burst above it; 0 = the node-wide `limits.api_key_publishes_per_s`.
    pub publishes_per_s: u32,
    /// Subscribes per second through this key — each WebSocket `subscribe` and each
    /// REST read (state, history, long-poll, watch, SSE or NDJSON stream; every topic
    /// of a multi-topic one) —, all its sessions and requests together, with a burst
    /// of twice that; 0 = the node-wide `limits.api_key_subscribes_per_s`.
    pub subscribes_per_s: u32,
}

/// `[http]`: what browsers may do.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Exact origins (`https://app.example.com`) and one-label wildcards
    /// (`https://*.example.com`). Applies to WebSocket upgrades and CORS. Empty means
    /// any origin in development mode and none otherwise.
    pub allowed_origins: Vec<String>,
}

/// `[tls]`: HTTPS and WSS directly on the HTTP listener; reloaded on SIGHUP.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// `[ops]`: the operations surface.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpsConfig {
    /// `/healthz`, `/readyz`, `/metrics` (and the admin routes) on their own listener,
    /// kept off the public Service; absent = on the HTTP listener.
    pub listen: Option<SocketAddr>,
    /// Serve `GET /v1/cluster` without an admin key.
    pub public_cluster_view: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Limits, all enforced before the thing they limit is allocated.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub max_subscriptions_per_session: usize,
    /// Largest event data accepted (publish body, WS message).
    pub max_message_bytes: usize,
    /// Largest single WebSocket frame accepted.
    pub max_frame_bytes: usize,
    pub max_batch_events: usize,
    pub max_batch_bytes: usize,
    /// Largest `limit` of a history page.
    pub max_history_request: usize,
    /// Largest long-poll `wait`, seconds (the contract caps it at 60).
    pub max_wait_s: u64,
    pub max_topics: usize,
    /// Topics in one multi-topic watch.
    pub max_topics_per_watch: usize,
    /// Sustained commands per second per session, and the burst above it.
    pub commands_per_s: u32,
    pub command_burst: u32,
    /// Byte budget of one session's outbound queue; past it the namespace's
    /// slow-consumer policy applies.
    pub outbound_queue_bytes: usize,
    /// New sessions (WebSocket, SSE, NDJSON) admitted per second, node-wide, and the
    /// burst above it. The excess gets 503 with a jittered Retry-After, so a node that
    /// inherits a reconnect storm stays responsive to the sessions it already has.
    pub new_sessions_per_s: u32,
    pub new_sessions_burst: u32,
    /// TCP connects accepted per second from one address, and the burst above it;
    /// the excess gets a canned 429 before any HTTP is read.
    pub connects_per_ip_per_s: u32,
    pub connects_per_ip_burst: u32,
    /// Open sessions per authenticated user (`sub`), over every transport.
    pub max_connections_per_user: usize,
    /// Subscribes per second per session, and the burst above it.
    pub subscribes_per_s: u32,
    pub subscribe_burst: u32,
    /// Publishes per second per session, and the burst above it.
    pub publishes_per_s: u32,
    pub publish_burst: u32,
    /// Default publishes per second per API key (all its requests together).
    pub api_key_publishes_per_s: u32,
    pub api_key_publish_burst: u32,
    /// Default subscribes (reads opened) per second per API key, all its sessions and
    /// requests together.
    pub api_key_subscribes_per_s: u32,
    pub api_key_subscribe_burst: u32,
    /// Deepest JSON nesting accepted in event data, on every path.
    pub max_json_depth: usize,
    /// Longest request target (path and query) accepted; past it `414`.
    pub max_uri_bytes: usize,
    /// Largest header block accepted (names, values, `": "` and CRLF of each field);
    /// past it `431`. More than 100 header fields is `431` too.
    pub max_header_bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    /// Global cap on retained history; idle topics are evicted first.
    pub memory_budget_bytes: usize,
    pub idempotency_ttl_s: u64,
    pub idempotency_max_keys: usize,
    /// A topic with no history and no subscribers is forgotten after this long idle.
    pub topic_idle_ttl_s: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timing {
    pub ping_interval_ms: u64,
    /// A connection's request head (and TLS handshake, and WebSocket upgrade) must
    /// complete within this; it is also how long a kept-alive HTTP connection may sit
    /// idle between requests (hyper's header timer bounds both).
    pub handshake_timeout_ms: u64,
    pub write_timeout_ms: u64,
    pub sse_keepalive_ms: u64,
    pub bookmark_interval_ms: u64,
    /// Shutdown: every session is told and closed, and the process exits, within this.
    pub shutdown_grace_ms: u64,
    /// Upper bound of the `after_ms` a disconnected client is told to wait.
    pub reconnect_jitter_ms: u64,
    pub sweep_interval_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlowConsumerPolicy {
    /// Close 4008; the client resumes from its cursors (nothing lost while in history).
    Disconnect,
    /// Keep only the newest queued event per topic and tell the client what it skipped.
    Conflate,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NamespaceConfig {
    pub pattern: String,
    /// Events kept per topic.
    pub history_size: usize,
    /// Age limit of kept events, seconds; 0 = none.
    pub history_ttl_s: u64,
    /// Whether WebSocket clients may publish (REST publish is always allowed).
    pub client_publish: bool,
    pub presence: bool,
    pub slow_consumer: SlowConsumerPolicy,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http_listen: "0.0.0.0:8080".parse().expect("literal"),
            grpc_listen: "0.0.0.0:9000".parse().expect("literal"),
            cluster_listen: None,
            quic_listen: "0.0.0.0:8443".parse().expect("literal"),
            advertise: None,
            node_id: default_node_id(),
            router: None,
            data_dir: PathBuf::from("./weft-data"),
            log_format: LogFormat::Text,
            ready_file: None,
            limits: Limits::default(),
            history: HistoryConfig::default(),
            timing: Timing::default(),
            auth: AuthConfig::default(),
            http: HttpConfig::default(),
            tls: TlsConfig::default(),
            ops: OpsConfig::default(),
            namespaces: Vec::new(),
            cluster: weft_router::tls::ClusterConfig::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1_000_000,
            max_connections_per_ip: 50_000,
            max_subscriptions_per_session: 128,
            max_message_bytes: 64 * 1024,
            max_frame_bytes: 64 * 1024,
            max_batch_events: 1000,
            max_batch_bytes: 4 * 1024 * 1024,
            max_history_request: 1000,
            max_wait_s: 60,
            max_topics: 1_000_000,
            max_topics_per_watch: 64,
            commands_per_s: 200,
            command_burst: 1000,
            outbound_queue_bytes: 1024 * 1024,
            new_sessions_per_s: 20_000,
            new_sessions_burst: 20_000,
            connects_per_ip_per_s: 2_000,
            connects_per_ip_burst: 4_000,
            max_connections_per_user: 1_000,
            subscribes_per_s: 100,
            subscribe_burst: 500,
            publishes_per_s: 100,
            publish_burst: 500,
            api_key_publishes_per_s: 50_000,
            api_key_publish_burst: 100_000,
            api_key_subscribes_per_s: 50_000,
            api_key_subscribe_burst: 100_000,
            max_json_depth: 64,
            max_uri_bytes: 8 * 1024,
            max_header_bytes: 16 * 1024,
        }
    }
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            memory_budget_bytes: 256 * 1024 * 1024,
            idempotency_ttl_s: 120,
            idempotency_max_keys: 10_000,
            topic_idle_ttl_s: 600,
        }
    }
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            ping_interval_ms: 25_000,
            handshake_timeout_ms: 10_000,
            write_timeout_ms: 10_000,
            sse_keepalive_ms: 15_000,
            bookmark_interval_ms: 30_000,
            shutdown_grace_ms: 10_000,
            reconnect_jitter_ms: 5_000,
            sweep_interval_ms: 1_000,
        }
    }
}

impl Default for NamespaceConfig {
    fn default() -> Self {
        Self {
            pattern: ">".into(),
            history_size: 1000,
            history_ttl_s: 3600,
            client_publish: true,
            presence: false,
            slow_consumer: SlowConsumerPolicy::Disconnect,
        }
    }
}

fn default_node_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "weft-node".into())
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Checks every cross-field rule; the error is one line for the operator.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError(m));
        let l = &self.limits;
        if l.max_wait_s > 60 {
            return bad(format!(
                "limits.max_wait_s = {} exceeds the contract's 60",
                l.max_wait_s
            ));
        }
        for (name, v) in [
            ("limits.max_connections", l.max_connections),
            ("limits.max_connections_per_ip", l.max_connections_per_ip),
            (
                "limits.max_subscriptions_per_session",
                l.max_subscriptions_per_session,
            ),
            ("limits.max_message_bytes", l.max_message_bytes),
            ("limits.max_frame_bytes", l.max_frame_bytes),
            ("limits.max_batch_events", l.max_batch_events),
            ("limits.max_batch_bytes", l.max_batch_bytes),
            ("limits.max_history_request", l.max_history_request),
            ("limits.max_topics", l.max_topics),
            ("limits.max_topics_per_watch", l.max_topics_per_watch),
            ("limits.outbound_queue_bytes", l.outbound_queue_bytes),
            ("limits.max_uri_bytes", l.max_uri_bytes),
            ("limits.max_header_bytes", l.max_header_bytes),
            (
                "history.memory_budget_bytes",
                self.history.memory_budget_bytes,
            ),
        ] {
            if v == 0 {
                return bad(format!("{name} must be greater than 0"));
            }
        }
        if l.connects_per_ip_per_s == 0 || l.connects_per_ip_burst == 0 {
            return bad("limits.connects_per_ip_per_s and limits.connects_per_ip_burst must be greater than 0".into());
        }
        if l.new_sessions_per_s == 0 || l.new_sessions_burst == 0 {
            return bad(
                "limits.new_sessions_per_s and limits.new_sessions_burst must be greater than 0"
                    .into(),
            );
        }
        if l.commands_per_s == 0 || l.command_burst == 0 {
            return bad(
                "limits.commands_per_s and limits.command_burst must be greater than 0".into(),
            );
        }
        if l.outbound_queue_bytes < l.max_message_bytes {
            return bad(format!(
                "limits.outbound_queue_bytes ({}) must be at least limits.max_message_bytes ({})",
                l.outbound_queue_bytes, l.max_message_bytes
            ));
        }
        let t = &self.timing;
        for (name, v) in [
            ("timing.ping_interval_ms", t.ping_interval_ms),
            ("timing.handshake_timeout_ms", t.handshake_timeout_ms),
            ("timing.write_timeout_ms", t.write_timeout_ms),
            ("timing.sse_keepalive_ms", t.sse_keepalive_ms),
            ("timing.bookmark_interval_ms", t.bookmark_interval_ms),
            ("timing.shutdown_grace_ms", t.shutdown_grace_ms),
            ("timing.sweep_interval_ms", t.sweep_interval_ms),
        ] {
            if v == 0 {
                return bad(format!("{name} must be greater than 0"));
            }
        }
        if self.node_id.is_empty() || !self.node_id.bytes().all(weft_proto::topic::is_topic_byte) {
            return bad(format!(
                "node_id `{}` must be 1+ characters of [A-Za-z0-9_.:@-]",
                self.node_id
            ));
        }
        for ns in &self.namespaces {
            Pattern::parse(&ns.pattern).map_err(|e| ConfigError(format!("namespace: {e}")))?;
            if ns.history_size == 0 {
                return bad(format!(
                    "namespace `{}`: history_size must be greater than 0",
                    ns.pattern
                ));
            }
        }
        self.validate_security()?;
        self.cluster
            .check(self.cluster_plaintext_ok())
            .map_err(ConfigError)?;
        if let Some(r) = &self.router {
            let addrs = self.router_addrs();
            if addrs.is_empty()
                || addrs.len() != r.split(',').count()
                || addrs
                    .iter()
                    .any(|a| a.parse::<std::net::SocketAddr>().is_err() && !a.contains(':'))
            {
                return bad(format!(
                    "--router must be comma-separated host:port router addresses, got {r:?}"
                ));
            }
        }
        Ok(())
    }

    fn validate_security(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError(m));
        let a = &self.auth;
        if !a.hmac_secret.is_empty() && a.hmac_secret_file.is_some() {
            return bad("set auth.hmac_secret or auth.hmac_secret_file, not both".into());
        }
        if !a.hmac_secret.is_empty() && a.hmac_secret.expose().len() < 32 {
            return bad("auth.hmac_secret must be at least 32 bytes (RFC 7518 §3.2)".into());
        }
        if a.jwks_refresh_s == 0 {
            return bad("auth.jwks_refresh_s must be greater than 0".into());
        }
        if a.leeway_s > 300 {
            return bad(format!(
                "auth.leeway_s = {} is more than 300 s of clock skew",
                a.leeway_s
            ));
        }
        if let Some(c) = &a.cookie {
            if c.is_empty()
                || !c
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
            {
                return bad(format!("auth.cookie `{c}` is not a cookie name"));
            }
        }
        let mut names = std::collections::HashSet::new();
        for k in &a.api_keys {
            if k.name.is_empty() || !names.insert(k.name.as_str()) {
                return bad(format!(
                    "auth.api_keys: every key needs a unique, non-empty name (`{}`)",
                    k.name
                ));
            }
            if k.sha256.len() != 64 || !k.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return bad(format!(
                    "auth.api_keys `{}`: sha256 must be the 64 hex digits of the key's SHA-256",
                    k.name
                ));
            }
            for p in k.publish.iter().chain(&k.subscribe) {
                Pattern::parse(p)
                    .map_err(|e| ConfigError(format!("auth.api_keys `{}`: {e}", k.name)))?;
            }
        }
        for o in &self.http.allowed_origins {
            crate::auth::origin::OriginPattern::parse(o)
                .map_err(|e| ConfigError(format!("http.allowed_origins: {e}")))?;
        }
        // hyper refuses a request target past 65,534 bytes by itself.
        if self.limits.max_uri_bytes > 65_534 {
            return bad(format!(
                "limits.max_uri_bytes = {} exceeds the HTTP parser's 65534",
                self.limits.max_uri_bytes
            ));
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return bad("set both tls.cert_file and tls.key_file, or neither".into());
        }
        let l = &self.limits;
        for (name, v) in [
            ("limits.subscribes_per_s", l.subscribes_per_s),
            ("limits.subscribe_burst", l.subscribe_burst),
            ("limits.publishes_per_s", l.publishes_per_s),
            ("limits.publish_burst", l.publish_burst),
            ("limits.api_key_publishes_per_s", l.api_key_publishes_per_s),
            ("limits.api_key_publish_burst", l.api_key_publish_burst),
            (
                "limits.api_key_subscribes_per_s",
                l.api_key_subscribes_per_s,
            ),
            ("limits.api_key_subscribe_burst", l.api_key_subscribe_burst),
        ] {
            if v == 0 {
                return bad(format!("{name} must be greater than 0"));
            }
        }
        if l.max_connections_per_user == 0 || l.max_json_depth == 0 {
            return bad(
                "limits.max_connections_per_user and limits.max_json_depth must be greater than 0"
                    .into(),
            );
        }
        Ok(())
    }

    /// Reads every key and certificate file the configuration names, so a bad one is
    /// a usage error at start rather than a refused client later.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        crate::auth::Auth::new(self).map_err(ConfigError)?;
        if let (Some(c), Some(k)) = (&self.tls.cert_file, &self.tls.key_file) {
            crate::transport::tls::Tls::load(c, k).map_err(ConfigError)?;
        }
        Ok(())
    }

    /// Secure by default: a listener that other machines can reach needs
    /// authentication, unless anonymous access was asked for on purpose.
    pub fn check_exposure(&self, addr: SocketAddr) -> Result<(), ConfigError> {
        if addr.ip().is_loopback() || self.auth.is_configured() || self.auth.allow_anonymous {
            return Ok(());
        }
        Err(ConfigError(format!(
            "refusing to serve {addr} without authentication: configure [auth] (hmac_secret, public_keys, jwks or api_keys), bind 127.0.0.1, or set auth.allow_anonymous = true (WEFT_AUTH_ALLOW_ANONYMOUS=true) on purpose"
        )))
    }

    /// The cluster listener's address (see [`Config::cluster_listen`]).
    pub fn cluster_listen(&self) -> SocketAddr {
        self.cluster_listen.unwrap_or_else(|| {
            if self.router.is_some() {
                SocketAddr::from(([0, 0, 0, 0], 9100))
            } else {
                SocketAddr::from(([127, 0, 0, 1], 9100))
            }
        })
    }

    /// Only the embedded router on a loopback cluster listener may run without
    /// certificates: nobody off this host can reach it.
    fn cluster_plaintext_ok(&self) -> bool {
        self.router.is_none() && self.cluster_listen().ip().is_loopback()
    }

    /// How cluster connections are secured; loads and checks the certificates (they
    /// must name `weft://node/<node_id>`).
    pub fn cluster_transport(&self) -> Result<weft_router::tls::Transport, ConfigError> {
        self.cluster
            .transport(
                &weft_router::identity::Peer::Node(self.node_id.clone()),
                self.cluster_plaintext_ok(),
            )
            .map_err(ConfigError)
    }

    /// The external router group's addresses (`--router`), empty without one.
    pub fn router_addrs(&self) -> Vec<String> {
        self.router
            .iter()
            .flat_map(|r| r.split(','))
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// The effective configuration as TOML, with every secret-looking value masked.
    pub fn to_masked_toml(&self) -> String {
        let mut value = toml::Value::try_from(self).expect("config serialises");
        mask_secrets(&mut value);
        toml::to_string_pretty(&value).expect("config serialises")
    }
}

/// Masks every value that looks like a secret. [`Secret`] fields print `***`
/// already; this also catches a secret-named string elsewhere. Paths to secret files
/// (`*_file`) and hashes are not secrets and stay, so the output loads back.
fn mask_secrets(v: &mut toml::Value) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                let k = k.to_ascii_lowercase();
                let secret_name = ["secret", "token", "password"]
                    .iter()
                    .any(|s| k.contains(s))
                    && !k.ends_with("_file");
                match v {
                    toml::Value::String(s) if secret_name && !s.is_empty() => {
                        *s = "***".into();
                    }
                    other => mask_secrets(other),
                }
            }
        }
        toml::Value::Array(a) => a.iter_mut().for_each(mask_secrets),
        _ => {}
    }
}

/// Command-line flags. Every one is optional so that it overrides only what it names.
#[derive(Debug, Parser)]
#[command(
    name = "weft-node",
    version,
    about = "Weft edge node: real-time pub/sub over WebSocket, SSE, HTTP streaming and long-poll"
)]
pub struct Cli {
    #[command(flatten)]
    pub file: weft_router::config::FileFlags,
    #[arg(long, env = "WEFT_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Reserved for the public gRPC API; not bound by this build.
    #[arg(long, env = "WEFT_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
    /// Relay and embedded router (mutual TLS); see `cluster_listen`.
    #[arg(long, env = "WEFT_CLUSTER_LISTEN")]
    pub cluster_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub cluster: weft_router::config::ClusterFlags,
    #[arg(long, env = "WEFT_QUIC_LISTEN")]
    pub quic_listen: Option<SocketAddr>,
    #[arg(long, env = "WEFT_ADVERTISE")]
    pub advertise: Option<String>,
    #[arg(long, env = "WEFT_NODE_ID")]
    pub node_id: Option<String>,
    #[arg(long, env = "WEFT_ROUTER")]
    pub router: Option<String>,
    #[arg(long, env = "WEFT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    #[arg(long, env = "WEFT_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    #[arg(long, env = "WEFT_READY_FILE")]
    pub ready_file: Option<PathBuf>,
    #[arg(long, env = "WEFT_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    #[arg(long, env = "WEFT_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    #[arg(long, env = "WEFT_MAX_SUBSCRIPTIONS_PER_SESSION")]
    pub max_subscriptions_per_session: Option<usize>,
    #[arg(long, env = "WEFT_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    #[arg(long, env = "WEFT_OUTBOUND_QUEUE_BYTES")]
    pub outbound_queue_bytes: Option<usize>,
    #[arg(long, env = "WEFT_NEW_SESSIONS_PER_S")]
    pub new_sessions_per_s: Option<u32>,
    #[arg(long, env = "WEFT_HISTORY_MEMORY_BUDGET_BYTES")]
    pub history_memory_budget_bytes: Option<usize>,
    #[arg(long, env = "WEFT_PING_INTERVAL_MS")]
    pub ping_interval_ms: Option<u64>,
    #[arg(long, env = "WEFT_HANDSHAKE_TIMEOUT_MS")]
    pub handshake_timeout_ms: Option<u64>,
    #[arg(long, env = "WEFT_BOOKMARK_INTERVAL_MS")]
    pub bookmark_interval_ms: Option<u64>,
    #[arg(long, env = "WEFT_SSE_KEEPALIVE_MS")]
    pub sse_keepalive_ms: Option<u64>,
    #[arg(long, env = "WEFT_SHUTDOWN_GRACE_MS")]
    pub shutdown_grace_ms: Option<u64>,
    #[arg(long, env = "WEFT_RECONNECT_JITTER_MS")]
    pub reconnect_jitter_ms: Option<u64>,
    /// Serve `/healthz`, `/readyz`, `/metrics` and the admin routes here instead.
    #[arg(long, env = "WEFT_OPS_LISTEN")]
    pub ops_listen: Option<SocketAddr>,
    #[arg(long, env = "WEFT_OPS_PUBLIC_CLUSTER_VIEW")]
    pub ops_public_cluster_view: Option<bool>,
    /// Let clients in without credentials although the node is reachable from other
    /// machines (development only).
    #[arg(long, env = "WEFT_AUTH_ALLOW_ANONYMOUS")]
    pub auth_allow_anonymous: Option<bool>,
    #[arg(long, env = "WEFT_AUTH_HMAC_SECRET", hide_env_values = true)]
    pub auth_hmac_secret: Option<Secret>,
    #[arg(long, env = "WEFT_AUTH_HMAC_SECRET_FILE")]
    pub auth_hmac_secret_file: Option<PathBuf>,
    /// Comma-separated PEM files (RS256, ES256, EdDSA public keys).
    #[arg(long, env = "WEFT_AUTH_PUBLIC_KEYS", value_delimiter = ',')]
    pub auth_public_keys: Option<Vec<PathBuf>>,
    #[arg(long, env = "WEFT_AUTH_JWKS")]
    pub auth_jwks: Option<String>,
    #[arg(long, env = "WEFT_AUTH_ISSUER")]
    pub auth_issuer: Option<String>,
    #[arg(long, env = "WEFT_AUTH_AUDIENCE")]
    pub auth_audience: Option<String>,
    #[arg(long, env = "WEFT_AUTH_COOKIE")]
    pub auth_cookie: Option<String>,
    #[arg(long, env = "WEFT_AUTH_LEEWAY_S")]
    pub auth_leeway_s: Option<u64>,
    /// Comma-separated origins (`https://app.example.com`, `https://*.example.com`).
    #[arg(long, env = "WEFT_HTTP_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub http_allowed_origins: Option<Vec<String>>,
    #[arg(long, env = "WEFT_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    #[arg(long, env = "WEFT_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Tool>,
}

/// `weft-node <tool>`: operator tools that run instead of the node and exit.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Tool {
    /// Sign this member's cluster certificate with a CA and write ca.crt, tls.crt and
    /// tls.key into --out (the Helm chart's init container; see
    /// `cluster::member_cert`).
    ClusterCert {
        /// The CA certificate (PEM).
        #[arg(long)]
        ca_cert: PathBuf,
        /// The CA's key (PEM, PKCS#8 or PKCS#1 RSA).
        #[arg(long)]
        ca_key: PathBuf,
        /// The member: weft://node/<node-id> or weft://router/<id>.
        #[arg(long)]
        identity: String,
        #[arg(long)]
        out: PathBuf,
        /// Validity in days (never past the CA's expiry).
        #[arg(long, default_value_t = 365)]
        days: u64,
    },
    /// Print an HS256 client token signed with this node's HMAC secret
    /// (`auth.hmac_secret` or `auth.hmac_secret_file` of the effective configuration),
    /// with its `auth.issuer` and `auth.audience`.
    Token {
        /// The token's subject (`sub`).
        #[arg(long)]
        subject: String,
        /// Patterns it may subscribe to (comma-separated; `{sub}` = the subject).
        #[arg(long, value_delimiter = ',')]
        subscribe: Vec<String>,
        /// Patterns it may publish to (comma-separated).
        #[arg(long, value_delimiter = ',')]
        publish: Vec<String>,
        /// It may read and join presence.
        #[arg(long)]
        presence: bool,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_s: u64,
    },
}

impl Cli {
    /// Builds the effective configuration: defaults < file < env/flags.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let (mut c, text) = self.file.read::<Config>().map_err(|e| ConfigError(e.0))?;
        let listen_in_file = text.is_some_and(|text| {
            text.parse::<toml::Table>()
                .is_ok_and(|t| t.contains_key("http_listen"))
        });
        macro_rules! set {
            ($($field:ident => $($path:ident).+;)*) => {$(
                if let Some(v) = self.$field.clone() { c.$($path).+ = v; }
            )*};
        }
        set! {
            http_listen => http_listen;
            grpc_listen => grpc_listen;
            quic_listen => quic_listen;
            node_id => node_id;
            data_dir => data_dir;
            log_format => log_format;
            max_connections => limits.max_connections;
            max_connections_per_ip => limits.max_connections_per_ip;
            max_subscriptions_per_session => limits.max_subscriptions_per_session;
            max_message_bytes => limits.max_message_bytes;
            outbound_queue_bytes => limits.outbound_queue_bytes;
            new_sessions_per_s => limits.new_sessions_per_s;
            history_memory_budget_bytes => history.memory_budget_bytes;
            ping_interval_ms => timing.ping_interval_ms;
            handshake_timeout_ms => timing.handshake_timeout_ms;
            bookmark_interval_ms => timing.bookmark_interval_ms;
            sse_keepalive_ms => timing.sse_keepalive_ms;
            shutdown_grace_ms => timing.shutdown_grace_ms;
            reconnect_jitter_ms => timing.reconnect_jitter_ms;
            ops_public_cluster_view => ops.public_cluster_view;
            auth_allow_anonymous => auth.allow_anonymous;
            auth_hmac_secret => auth.hmac_secret;
            auth_public_keys => auth.public_keys;
            auth_leeway_s => auth.leeway_s;
            http_allowed_origins => http.allowed_origins;
        }
        macro_rules! set_opt {
            ($($field:ident => $($path:ident).+;)*) => {$(
                if self.$field.is_some() { c.$($path).+ = self.$field.clone(); }
            )*};
        }
        set_opt! {
            ops_listen => ops.listen;
            auth_hmac_secret_file => auth.hmac_secret_file;
            auth_jwks => auth.jwks;
            auth_issuer => auth.issuer;
            auth_audience => auth.audience;
            auth_cookie => auth.cookie;
            tls_cert_file => tls.cert_file;
            tls_key_file => tls.key_file;
            advertise => advertise;
            router => router;
            ready_file => ready_file;
            cluster_listen => cluster_listen;
        }
        // Development mode binds loopback unless an address was given on purpose.
        if !listen_in_file
            && self.http_listen.is_none()
            && !c.auth.is_configured()
            && !c.auth.allow_anonymous
        {
            c.http_listen.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        self.cluster.apply(&mut c.cluster);
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn flags_override_file() {
        let dir = weft_testkit::bin::Workdir::new("config", "flags-override-file");
        let path = dir.write(
            "c.toml",
            "node_id = \"from-file\"\n[limits]\nmax_message_bytes = 1000\noutbound_queue_bytes = 5000\n[[namespaces]]\npattern = \"chat.>\"\nslow_consumer = \"conflate\"\n",
        );
        let cli = Cli::try_parse_from([
            "weft-node",
            "--config",
            path.to_str().unwrap(),
            "--node-id",
            "from-flag",
        ])
        .unwrap();
        let c = cli.load().unwrap();
        assert_eq!(c.node_id, "from-flag");
        assert_eq!(c.limits.max_message_bytes, 1000);
        assert_eq!(c.namespaces[0].slow_consumer, SlowConsumerPolicy::Conflate);
        assert_eq!(
            c.namespaces[0].history_size, 1000,
            "unset namespace fields take defaults"
        );
    }

    #[test]
    fn rejects_bad_values_in_one_line() {
        let mut c = Config::default();
        c.limits.max_wait_s = 61;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("max_wait_s") && !e.contains('\n'), "{e}");
        let mut c = Config::default();
        c.namespaces.push(NamespaceConfig {
            pattern: "a.>.b".into(),
            ..Default::default()
        });
        assert!(c.validate().is_err());
        let c = Config {
            node_id: "has space".into(),
            ..Default::default()
        };
        assert!(c.validate().is_err());
    }

    #[test]
    fn print_config_never_shows_a_secret_and_loads_back() {
        let mut c = Config::default();
        c.auth.hmac_secret = Secret::new("super-secret-value-super-secret-value");
        c.auth.api_keys.push(ApiKeyConfig {
            name: "k".into(),
            sha256: "a".repeat(64),
            ..Default::default()
        });
        let printed = c.to_masked_toml();
        assert!(!printed.contains("super-secret"), "{printed}");
        assert!(printed.contains("hmac_secret = \"***\""), "{printed}");
        assert!(!format!("{c:?}").contains("super-secret"));
        let back: Config = toml::from_str(&printed).unwrap();
        assert_eq!(back.auth.api_keys[0].sha256, "a".repeat(64));
    }

    #[test]
    fn cluster_mode_needs_certificates_unless_embedded_on_loopback() {
        Config::default().validate().unwrap();
        assert_eq!(
            Config::default().cluster_listen(),
            "127.0.0.1:9100".parse().unwrap()
        );
        let external = Config {
            router: Some("r1:9400".into()),
            ..Default::default()
        };
        assert_eq!(external.cluster_listen(), "0.0.0.0:9100".parse().unwrap());
        let e = external.validate().unwrap_err().to_string();
        assert!(e.contains("cluster.ca_file") && !e.contains('\n'), "{e}");
        let open_embedded = Config {
            cluster_listen: Some("0.0.0.0:9100".parse().unwrap()),
            ..Default::default()
        };
        assert!(open_embedded.validate().is_err());
        let mut insecure = external.clone();
        insecure.cluster.insecure = true;
        insecure.validate().unwrap();
        insecure.cluster.ca_file = Some("ca.crt".into());
        assert!(insecure.validate().is_err(), "some files and insecure");
    }

    #[test]
    fn masks_secrets() {
        let mut v: toml::Value = toml::from_str("a = 1\n[auth]\nhmac_secret = \"x\"\n").unwrap();
        mask_secrets(&mut v);
        assert_eq!(v["auth"]["hmac_secret"].as_str(), Some("***"));
        assert_eq!(v["a"].as_integer(), Some(1));
    }
}
