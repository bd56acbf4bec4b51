//! Reaching the target: its URL, TCP and WebSocket connects, and HTTP clients.
//!
//! One client IP can hold only about 28k connections to one server port (the ephemeral
//! port range). When the target is on loopback, every connection is bound to one of the
//! source addresses 127.0.0.2–127.0.0.250 first (connection `n` gets address
//! `n % 249`, rotated per worker), which lifts that limit to millions. WebSockets bind a
//! `TcpSocket` before connecting and hand the stream to tokio-tungstenite; HTTP uses one
//! reqwest client per source address (`local_address`), each keeping its connections
//! alive.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;
use weft_proto::SUBPROTOCOL_JSON;

/// Time allowed for a TCP connect plus handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest WebSocket message accepted from the node (a batch of pushes).
const MAX_WS_MESSAGE: usize = 16 << 20;

pub struct Net {
    /// `http://host:port` without a trailing slash.
    base: String,
    /// `ws://host:port/v1/ws`.
    ws_url: String,
    /// `ws://host:port/`: a `nats-server`'s WebSocket listener (`--system nats`).
    nats_url: String,
    addr: SocketAddr,
    sources: Vec<IpAddr>,
    http: Vec<OnceLock<reqwest::Client>>,
    /// `Authorization: Bearer` on every request and handshake (`--token`).
    credential: Option<HeaderValue>,
}

impl Net {
    /// Resolves `target` (`http://host:port`); `rotate` shifts the source addresses so
    /// that workers start on different ones; `spread` enables source addresses at all.
    pub async fn new(target: &str, rotate: usize, spread: bool) -> anyhow::Result<Self> {
        let url = reqwest::Url::parse(target).with_context(|| {
            format!("--target `{target}` is not a URL like http://127.0.0.1:8080")
        })?;
        if !matches!(url.scheme(), "http" | "ws" | "nats+ws") {
            bail!("--target `{target}`: only http:// targets are supported (run the harness next to the node or its load balancer), or ws:// for a nats-server's WebSocket listener (--system nats)");
        }
        let host = url
            .host_str()
            .with_context(|| format!("--target `{target}` has no host"))?
            .to_owned();
        let port = url.port_or_known_default().unwrap_or(80);
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
        let authority = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        Ok(Self {
            base: format!("http://{authority}"),
            ws_url: format!("ws://{authority}/v1/ws"),
            nats_url: format!("ws://{authority}/"),
            addr,
            http: (0..sources.len().max(1)).map(|_| OnceLock::new()).collect(),
            sources,
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
        !self.sources.is_empty()
    }

    fn source(&self, n: usize) -> Option<IpAddr> {
        (!self.sources.is_empty()).then(|| self.sources[n % self.sources.len()])
    }

    /// A TCP connection for connection number `n`.
    pub async fn tcp(&self, n: usize) -> std::io::Result<TcpStream> {
        let socket = if self.addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(ip) = self.source(n) {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let stream = socket.connect(self.addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// A `weft.v1.json` WebSocket for connection number `n`. Client buffers are kept
    /// small: the harness holds many idle sockets and should not be the thing that runs
    /// out of memory first.
    pub async fn ws(&self, n: usize) -> anyhow::Result<WebSocketStream<TcpStream>> {
        let stream = self.tcp(n).await.context("TCP connect")?;
        let mut req = self.ws_url.as_str().into_client_request()?;
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(SUBPROTOCOL_JSON),
        );
        if let Some(c) = &self.credential {
            req.headers_mut().insert("Authorization", c.clone());
        }
        let config = WebSocketConfig::default()
            .read_buffer_size(8 * 1024)
            .write_buffer_size(0)
            .max_message_size(Some(MAX_WS_MESSAGE))
            .max_frame_size(Some(MAX_WS_MESSAGE));
        let (ws, resp) = tokio_tungstenite::client_async_with_config(req, stream, Some(config))
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
    pub async fn nats_ws(&self, n: usize) -> anyhow::Result<WebSocketStream<TcpStream>> {
        let stream = self.tcp(n).await.context("TCP connect")?;
        let req = self.nats_url.as_str().into_client_request()?;
        let config = WebSocketConfig::default()
            .read_buffer_size(8 * 1024)
            .write_buffer_size(0)
            .max_message_size(Some(MAX_WS_MESSAGE))
            .max_frame_size(Some(MAX_WS_MESSAGE));
        let (ws, _) = tokio_tungstenite::client_async_with_config(req, stream, Some(config))
            .await
            .context("WebSocket handshake")?;
        Ok(ws)
    }

    /// The HTTP client for connection number `n`.
    pub fn http(&self, n: usize) -> &reqwest::Client {
        let slot = n % self.http.len();
        self.http[slot].get_or_init(|| {
            let mut b = reqwest::Client::builder()
                .no_proxy()
                .tcp_nodelay(true)
                .connect_timeout(CONNECT_TIMEOUT)
                .pool_idle_timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(1024);
            if let Some(ip) = self.source(slot) {
                b = b.local_address(ip);
            }
            if let Some(c) = &self.credential {
                let mut headers = reqwest::header::HeaderMap::new();
                if let Ok(v) = reqwest::header::HeaderValue::from_bytes(c.as_bytes()) {
                    let mut v = v;
                    v.set_sensitive(true);
                    headers.insert(reqwest::header::AUTHORIZATION, v);
                }
                b = b.default_headers(headers);
            }
            b.build().expect("a plain HTTP client always builds")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn parses_targets() {
        let n = Net::new("http://127.0.0.1:8080/", 3, true).await.unwrap();
        assert_eq!(n.base(), "http://127.0.0.1:8080");
        assert_eq!(n.ws_url, "ws://127.0.0.1:8080/v1/ws");
        assert!(n.spreads());
        assert_eq!(n.source(0), Some("127.0.0.5".parse().unwrap()));
        assert_eq!(n.source(249), n.source(0));
        assert_eq!(n.source(246), Some("127.0.0.2".parse().unwrap()));
        let n = Net::new("http://127.0.0.1:8080", 0, false).await.unwrap();
        assert!(!n.spreads());
        let e = Net::new("https://127.0.0.1:1", 0, true)
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("only http://"), "{e}");
        assert!(Net::new("127.0.0.1:8080", 0, true).await.is_err());
        let n = Net::new("ws://127.0.0.1:4222", 0, true).await.unwrap();
        assert_eq!(n.nats_url, "ws://127.0.0.1:4222/");
    }
}
