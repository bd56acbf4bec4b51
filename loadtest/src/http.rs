//! The harness's HTTP/1.1 client: hyper's pooled client whose connections come from the
//! run's [`Dialer`] (source address, TLS), so REST publishes, state reads, SSE watches
//! and long-polls reach an `https://` target with the same TLS configuration as the
//! WebSockets. Connections are kept alive and reused (up to 1024 idle, 30 s idle time).
//!
//! The API is the small part of a request builder the transports use: a method, a URL,
//! headers, a body, a timeout; a response's status, headers, whole body or next chunk.
//! [`HttpClient::duplex`] is the one request whose body is written while its answer is
//! read (the streaming publish), on a connection of its own outside the pool.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::channel::{Channel, Sender};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{HeaderMap, Method, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;

use crate::conn::{Conn, ConnectError, Dialer};

/// The largest whole body [`Response::bytes`] reads: far above any answer the node
/// gives (a long-poll page of 1,000 events of 64 KiB at most), so a server that
/// streams without end cannot make the harness buffer it all.
pub const MAX_BODY: usize = 128 << 20;
/// Body chunks a [`HttpClient::duplex`] request queues before its writer waits.
const DUPLEX_CHUNKS: usize = 16;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Connecting (the dialer's message, which says what to do about a TLS failure)
    /// or exchanging the request.
    #[error("{0}")]
    Request(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("reading the body: {0}")]
    Body(#[from] hyper::Error),
    #[error("the answer's body exceeds {MAX_BODY} bytes")]
    TooLarge,
    #[error("bad request {0}")]
    Build(#[from] hyper::http::Error),
}

impl From<hyper_util::client::legacy::Error> for HttpError {
    fn from(e: hyper_util::client::legacy::Error) -> Self {
        // A connect failure carries the dialer's own error, whose message says what
        // to do (a TLS certificate not trusted names --ca-file).
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = source {
            if let Some(c) = s.downcast_ref::<ConnectError>() {
                return HttpError::Request(c.to_string());
            }
            source = s.source();
        }
        let mut msg = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            source = s.source();
        }
        HttpError::Request(msg)
    }
}

/// Opens connection `slot` of the dialer for each new pooled connection.
#[derive(Clone)]
struct Connector {
    dialer: Arc<Dialer>,
    slot: usize,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<Conn>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<TokioIo<Conn>, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    /// Every request goes to the target, whatever the URL's host resolves to.
    fn call(&mut self, _: Uri) -> Self::Future {
        let dialer = self.dialer.clone();
        let slot = self.slot;
        Box::pin(async move { dialer.connect(slot).await.map(TokioIo::new) })
    }
}

/// A pooled HTTP client whose connections all use one source address.
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<Connector, Full<Bytes>>,
    /// Where [`duplex`](Self::duplex) requests connect (the pool's own connector).
    connector: Connector,
    /// Sent as `Authorization` on every request (marked sensitive).
    credential: Option<HeaderValue>,
}

/// The body side of a [`HttpClient::duplex`] request: each chunk sent is written to
/// the connection as it comes; dropping it ends the request body.
pub type BodySender = Sender<Bytes, std::convert::Infallible>;

impl HttpClient {
    /// A client for connections `slot` of `dialer`.
    pub fn new(dialer: Arc<Dialer>, slot: usize, credential: Option<HeaderValue>) -> Self {
        let connector = Connector { dialer, slot };
        let inner = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(1024)
            .build(connector.clone());
        Self {
            inner,
            connector,
            credential,
        }
    }

    /// `POST url` with a body that is still being written while the answer is read:
    /// a new connection (never pooled: it lives as long as the exchange), the request
    /// sent with `first` as its first body chunk, and the answer's head awaited within
    /// `within`. Returns the body's sender and the answer, whose body is read with
    /// [`Response::chunk`].
    pub async fn duplex(
        &self,
        url: &str,
        content_type: &'static str,
        first: Bytes,
        within: Duration,
    ) -> Result<(BodySender, Response), HttpError> {
        let uri: Uri = url
            .parse()
            .map_err(|e| HttpError::Request(format!("bad URL {url}: {e}")))?;
        let open = async {
            let conn = self
                .connector
                .dialer
                .connect(self.connector.slot)
                .await
                .map_err(|e| HttpError::Request(e.to_string()))?;
            let (mut send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn))
                .await
                .map_err(|e| HttpError::Request(format!("HTTP handshake: {e}")))?;
            // The connection's driver ends with the exchange (or its failure, which the
            // body and the answer then report).
            tokio::spawn(async move {
                let _ = connection.await;
            });
            let (mut tx, body) = Channel::new(DUPLEX_CHUNKS);
            let mut req = hyper::Request::builder()
                .method(Method::POST)
                .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
                .header(CONTENT_TYPE, content_type);
            if let Some(host) = uri.authority() {
                req = req.header(HOST, host.as_str());
            }
            if let Some(c) = &self.credential {
                req = req.header(AUTHORIZATION, c.clone());
            }
            let req = req.body(body)?;
            tx.send_data(first)
                .await
                .map_err(|_| HttpError::Request("the request body closed".into()))?;
            let resp = send
                .send_request(req)
                .await
                .map_err(|e| HttpError::Request(format!("sending the request: {e}")))?;
            let (head, body) = resp.into_parts();
            Ok((
                tx,
                Response {
                    status: head.status,
                    headers: head.headers,
                    body,
                    deadline: None,
                },
            ))
        };
        tokio::time::timeout(within, open)
            .await
            .map_err(|_| HttpError::Timeout(within))?
    }

    pub fn get(&self, url: impl Into<String>) -> RequestBuilder<'_> {
        self.request(Method::GET, url.into())
    }

    pub fn post(&self, url: impl Into<String>) -> RequestBuilder<'_> {
        self.request(Method::POST, url.into())
    }

    fn request(&self, method: Method, url: String) -> RequestBuilder<'_> {
        let mut req = hyper::Request::builder().method(method).uri(url);
        if let Some(c) = &self.credential {
            req = req.header(AUTHORIZATION, c.clone());
        }
        RequestBuilder {
            client: self,
            req,
            body: Bytes::new(),
            timeout: None,
        }
    }
}

pub struct RequestBuilder<'a> {
    client: &'a HttpClient,
    req: hyper::http::request::Builder,
    body: Bytes,
    timeout: Option<Duration>,
}

impl RequestBuilder<'_> {
    pub fn header<V>(
        mut self,
        name: impl TryInto<HeaderName, Error: Into<hyper::http::Error>>,
        value: V,
    ) -> Self
    where
        V: TryInto<HeaderValue, Error: Into<hyper::http::Error>>,
    {
        self.req = self.req.header(name, value);
        self
    }

    pub fn body(mut self, body: Bytes) -> Self {
        self.body = body;
        self
    }

    /// Bounds the wait for the answer's head and the reading of its whole body
    /// ([`Response::bytes`]).
    pub fn timeout(mut self, after: Duration) -> Self {
        self.timeout = Some(after);
        self
    }

    pub async fn send(self) -> Result<Response, HttpError> {
        let req = self.req.body(Full::new(self.body))?;
        let deadline = self.timeout.map(|t| (Instant::now() + t, t));
        let answer = self.client.inner.request(req);
        let resp = match deadline {
            Some((at, after)) => tokio::time::timeout_at(at, answer)
                .await
                .map_err(|_| HttpError::Timeout(after))??,
            None => answer.await?,
        };
        let (head, body) = resp.into_parts();
        Ok(Response {
            status: head.status,
            headers: head.headers,
            body,
            deadline,
        })
    }
}

pub struct Response {
    status: StatusCode,
    headers: HeaderMap,
    body: Incoming,
    deadline: Option<(Instant, Duration)>,
}

impl Response {
    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The whole body, at most [`MAX_BODY`] bytes (within the request's timeout, if
    /// it has one).
    pub async fn bytes(self) -> Result<Bytes, HttpError> {
        use hyper::body::Body;
        // A Content-Length past the cap is refused before a byte is read.
        if self.body.size_hint().lower() > MAX_BODY as u64 {
            return Err(HttpError::TooLarge);
        }
        let read = http_body_util::Limited::new(self.body, MAX_BODY).collect();
        let collected = match self.deadline {
            Some((at, after)) => tokio::time::timeout_at(at, read)
                .await
                .map_err(|_| HttpError::Timeout(after))?,
            None => read.await,
        };
        match collected {
            Ok(c) => Ok(c.to_bytes()),
            Err(e) => match e.downcast::<hyper::Error>() {
                Ok(e) => Err(HttpError::Body(*e)),
                Err(_) => Err(HttpError::TooLarge),
            },
        }
    }

    /// The body's next chunk of data; `None` at its end. Cancel-safe: a chunk is never
    /// lost by dropping the future (as `select!` does).
    pub async fn chunk(&mut self) -> Option<Result<Bytes, HttpError>> {
        loop {
            match self.body.frame().await? {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        return Some(Ok(data));
                    }
                }
                Err(e) => return Some(Err(e.into())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_body_past_the_cap_is_an_error_not_an_allocation() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                MAX_BODY + 1
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(&[b'x'; 4096]).await;
        });
        let dialer = Arc::new(Dialer::new(addr, Vec::new(), Duration::from_secs(5)));
        let client = HttpClient::new(dialer, 0, None);
        let resp = client
            .get(format!("http://{addr}/"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .unwrap();
        assert!(matches!(resp.bytes().await, Err(HttpError::TooLarge)));
    }
}
