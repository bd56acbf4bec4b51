//! Reaching the target: its URL, its connections (plain or TLS) and HTTP clients.
//!
//! One client IP can hold only about 28k connections to one server port (the ephemeral
//! port range). When the target is on loopback, every connection is bound to one of the
//! source addresses 127.0.0.2–127.0.0.250 first (connection `n` gets address
//! `n % 249`, rotated per worker), which lifts that limit to millions. Every connection
//! is opened by the one [`Dialer`]: WebSockets hand its stream to tokio-tungstenite;
//! HTTP uses one pooled client per source address ([`HttpClient`]), each keeping its
//! connections alive.
//!
//! ```text
//!   https://host:port ─► Net ─► Dialer (source address, TLS from tls::TlsClient)
//!                                 ├─► HttpClient × sources: publish, state, SSE, long-poll
//!                                 └─► WebSocket: wss://host:port/v1/ws
//! ```

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;
use weft_proto::SUBPROTOCOL_JSON;

use crate::conn::{Conn, ConnectError, Dialer};
use crate::http::HttpClient;
use crate::tls::{server_name, TlsClient};

/// Time allowed for a TCP connect plus handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest WebSocket message accepted from the node (a batch of pushes).
const MAX_WS_MESSAGE: usize = 16 << 20;

pub struct Net {
    /// `http://host:port` or `https://host:port`, without a trailing slash.
    base: String,
    /// `ws://host:port/v1/ws` (`wss://` for a TLS target).
    ws_url: String,
    /// `ws://host:port/`: a `nats-server`'s WebSocket listener (`--system nats`).
    nats_url: String,
    dialer: Arc<Dialer>,
    http: Vec<OnceLock<HttpClient>>,
    /// `Authorization: Bearer` on every request and handshake (`--token`).
    credential: Option<HeaderValue>,
}

impl Net {
    /// Resolves `target` (`http://host:port`, or `https://` with TLS from `tls`);
    /// `rotate` shifts the source addresses so that workers start on different ones;
    /// `spread` enables source addresses at all.
    pub async fn new(
        target: &str,
        tls: &Arc<TlsClient>,
        rotate: usize,
        spread: bool,
    ) -> anyhow::Result<Self> {
        let url: hyper::Uri = target
            .parse()
            .ok()
            .filter(|u: &hyper::Uri| u.scheme().is_some())
            .with_context(|| {
                format!("--target `{target}` is not a URL like http://127.0.0.1:8080")
            })?;
        let secure = match url.scheme_str() {
            Some("http" | "ws" | "nats+ws") => false,
            Some("https" | "wss") => true,
            _ => bail!("--target `{target}`: use an http:// or https:// URL (ws:// or wss:// for a nats-server's WebSocket listener, --system nats)"),
        };
        let host = url
            .host()
            .filter(|h| !h.is_empty())
            .with_context(|| format!("--target `{target}` has no host"))?
            .to_owned();
        let port = url.port_u16().unwrap_or(if secure { 443 } else { 80 });
        let addr = tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
            .await
            .with_context(|| format!("cannot resolve {host}"))?
            .next()
            .with_context(|| format!("{host} resolves to no address"))?;
        let sources = match addr.ip() {
            IpAddr::V4(ip) if spread && ip.is_loopback() => (0..249)
                .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + ((i + rotate) % 249) as u8)))
                .collect(),
            _ => Vec::new(),
        };
        let authority = match url.port_u16() {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        let slots = sources.len().max(1);
        let mut dialer = Dialer::new(addr, sources, CONNECT_TIMEOUT);
        if secure {
            dialer = dialer.with_tls(tls.clone(), server_name(&host)?, &host);
        }
        let (http, ws) = if secure {
            ("https", "wss")
        } else {
            ("http", "ws")
        };
        Ok(Self {
            base: format!("{http}://{authority}"),
            ws_url: format!("{ws}://{authority}/v1/ws"),
            nats_url: format!("{ws}://{authority}/"),
            http: (0..slots).map(|_| OnceLock::new()).collect(),
            dialer: Arc::new(dialer),
            credential: None,
        })
    }

    /// Authenticates every request and WebSocket handshake with `credential` (a JWT
    /// or an API key), marked sensitive so it never shows in a debug print.
    pub fn with_credential(mut self, credential: Option<String>) -> Self {
        self.credential = credential.and_then(|c| {
            let mut v = HeaderValue::from_str(&format!("Bearer {c}")).ok()?;
            v.set_sensitive(true);
            Some(v)
        });
        self
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// `ws://host:port/`: where `--system nats` connects.
    pub fn nats_url(&self) -> &str {
        &self.nats_url
    }

    /// `base` + `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Whether connections are spread over source addresses.
    pub fn spreads(&self) -> bool {
        self.dialer.spreads()
    }

    /// Before a run: for a TLS target, one handshake, so that a certificate the
    /// harness does not trust fails the run at once with the reason (and `--ca-file`)
    /// instead of as every connection's failure. A target that cannot be reached yet is
    /// left to the run's own retries, as for a plain target.
    pub async fn check_tls(&self) -> anyhow::Result<()> {
        if !self.dialer.is_tls() {
            return Ok(());
        }
        match self.dialer.connect(0).await {
            Err(e @ ConnectError::Tls(_)) => bail!("--target {}: {e}", self.base),
            _ => Ok(()),
        }
    }

    /// A `weft.v1.json` WebSocket for connection number `n`. Client buffers are kept
    /// small: the harness holds many idle sockets and should not be the thing that runs
    /// out of memory first.
    pub async fn ws(&self, n: usize) -> anyhow::Result<WebSocketStream<Conn>> {
        let stream = self.dialer.connect(n).await?;
        let mut req = self.ws_url.as_str().into_client_request()?;
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(SUBPROTOCOL_JSON),
        );
        if let Some(c) = &self.credential {
            req.headers_mut().insert("Authorization", c.clone());
        }
        let (ws, resp) =
            tokio_tungstenite::client_async_with_config(req, stream, Some(ws_config()))
                .await
                .context("WebSocket handshake")?;
        let proto = resp
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok());
        if proto != Some(SUBPROTOCOL_JSON) {
            bail!("server did not select subprotocol {SUBPROTOCOL_JSON} (got {proto:?})");
        }
        Ok(ws)
    }

    /// A plain WebSocket (no subprotocol) to a `nats-server`'s WebSocket listener, for
    /// connection number `n`, with the same small buffers as [`ws`](Self::ws).
    pub async fn nats_ws(&self, n: usize) -> anyhow::Result<WebSocketStream<Conn>> {
        let stream = self.dialer.connect(n).await?;
        let req = self.nats_url.as_str().into_client_request()?;
        let (ws, _) = tokio_tungstenite::client_async_with_config(req, stream, Some(ws_config()))
            .await
            .context("WebSocket handshake")?;
        Ok(ws)
    }

    /// The HTTP client for connection number `n`.
    pub fn http(&self, n: usize) -> &HttpClient {
        let slot = n % self.http.len();
        self.http[slot]
            .get_or_init(|| HttpClient::new(self.dialer.clone(), slot, self.credential.clone()))
    }
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_WS_MESSAGE))
        .max_frame_size(Some(MAX_WS_MESSAGE))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls() -> Arc<TlsClient> {
        Arc::new(TlsClient::load(None).unwrap())
    }

    #[tokio::test]
    async fn parses_targets() {
        let n = Net::new("http://127.0.0.1:8080/", &tls(), 3, true)
            .await
            .unwrap();
        assert_eq!(n.base(), "http://127.0.0.1:8080");
        assert_eq!(n.ws_url, "ws://127.0.0.1:8080/v1/ws");
        assert!(n.spreads());
        assert!(!n.dialer.is_tls());
        assert_eq!(n.dialer.source(0), Some("127.0.0.5".parse().unwrap()));
        assert_eq!(n.dialer.source(249), n.dialer.source(0));
        assert_eq!(n.dialer.source(246), Some("127.0.0.2".parse().unwrap()));
        assert_eq!(n.http.len(), 249, "one HTTP client per source address");
        let n = Net::new("http://127.0.0.1:8080", &tls(), 0, false)
            .await
            .unwrap();
        assert!(!n.spreads());
        assert_eq!(n.http.len(), 1);
        assert!(Net::new("127.0.0.1:8080", &tls(), 0, true).await.is_err());
        let e = Net::new("ftp://127.0.0.1:1", &tls(), 0, true)
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("http:// or https://"), "{e}");
        let n = Net::new("ws://127.0.0.1:4222", &tls(), 0, true)
            .await
            .unwrap();
        assert_eq!(n.nats_url, "ws://127.0.0.1:4222/");
    }

    /// An https target: TLS on every connection, WebSockets as wss:// to the same
    /// host, the same source spreading; an IP or a DNS host is the name verified.
    #[tokio::test]
    async fn https_targets_use_tls_and_wss() {
        let n = Net::new("https://127.0.0.1:8443/", &tls(), 0, true)
            .await
            .unwrap();
        assert_eq!(n.base(), "https://127.0.0.1:8443");
        assert_eq!(n.ws_url, "wss://127.0.0.1:8443/v1/ws");
        assert_eq!(n.url("/v1/topics/a"), "https://127.0.0.1:8443/v1/topics/a");
        assert!(n.dialer.is_tls());
        assert!(n.spreads(), "source spreading holds for TLS too");
        let n = Net::new("https://localhost", &tls(), 0, false)
            .await
            .unwrap();
        assert_eq!(n.base(), "https://localhost");
        assert_eq!(n.ws_url, "wss://localhost/v1/ws");
        assert!(n.dialer.is_tls());
    }
}
