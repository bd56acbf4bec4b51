//! One connection to the target, plain or TLS, and how it is opened.
//!
//! [`Dialer`] is the one place connections are made: the HTTP clients' connector
//! ([`crate::http`]) and the WebSockets ([`crate::net::Net::ws`]) both call
//! [`Dialer::connect`], which binds the source address of connection `n`, connects,
//! and runs the TLS handshake when the target is `https://`/`wss://`.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::tls::{explain_handshake, TlsClient};

/// A connection to the target. The TLS state is boxed: idle plain connections stay
/// small, and the harness holds many of them.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("TCP connect to {addr}: {source}")]
    Tcp { addr: SocketAddr, source: io::Error },
    #[error("connect to {addr} timed out after {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    /// The handshake failed; the message says what to do about it.
    #[error("{0}")]
    Tls(String),
}

impl ConnectError {
    /// Whether the server was reached and its TLS refused (not worth retrying blindly).
    pub fn is_tls(&self) -> bool {
        matches!(self, ConnectError::Tls(_))
    }
}

/// TLS towards one server name.
struct TlsTarget {
    client: Arc<TlsClient>,
    name: ServerName<'static>,
    /// For messages: the URL's host.
    host: String,
}

/// How connections reach the target: its address, the source addresses to spread over,
/// and TLS when the target asks for it.
pub struct Dialer {
    addr: SocketAddr,
    sources: Vec<IpAddr>,
    tls: Option<TlsTarget>,
    timeout: Duration,
}

impl Dialer {
    pub fn new(addr: SocketAddr, sources: Vec<IpAddr>, timeout: Duration) -> Self {
        Self {
            addr,
            sources,
            tls: None,
            timeout,
        }
    }

    /// Runs a TLS handshake on every connection, verifying `name` (the URL's `host`).
    pub fn with_tls(
        mut self,
        client: Arc<TlsClient>,
        name: ServerName<'static>,
        host: &str,
    ) -> Self {
        self.tls = Some(TlsTarget {
            client,
            name,
            host: host.to_owned(),
        });
        self
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The source address of connection `n`, if connections are spread.
    pub fn source(&self, n: usize) -> Option<IpAddr> {
        (!self.sources.is_empty()).then(|| self.sources[n % self.sources.len()])
    }

    pub fn spreads(&self) -> bool {
        !self.sources.is_empty()
    }

    /// Connection number `n`: TCP from its source address, then TLS if the target is
    /// `https://`, all within the connect timeout.
    pub async fn connect(&self, n: usize) -> Result<Conn, ConnectError> {
        tokio::time::timeout(self.timeout, self.open(n))
            .await
            .map_err(|_| ConnectError::Timeout {
                addr: self.addr,
                after: self.timeout,
            })?
    }

    async fn open(&self, n: usize) -> Result<Conn, ConnectError> {
        let tcp = self.tcp(n).await.map_err(|source| ConnectError::Tcp {
            addr: self.addr,
            source,
        })?;
        let Some(tls) = &self.tls else {
            return Ok(Conn::Plain(tcp));
        };
        TlsConnector::from(tls.client.config())
            .connect(tls.name.clone(), tcp)
            .await
            .map(|s| Conn::Tls(Box::new(s)))
            .map_err(|e| {
                ConnectError::Tls(explain_handshake(&tls.host, &e, tls.client.has_ca_file()))
            })
    }

    async fn tcp(&self, n: usize) -> io::Result<TcpStream> {
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
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl hyper_util::client::legacy::connect::Connection for Conn {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        hyper_util::client::legacy::connect::Connected::new()
    }
}
