//! The WebSocket transport, subprotocol `weft.v1.json` (DESIGN §3.2).
//!
//! The upgrade is answered by the HTTP handler; the session then runs in its own task
//! (tracked for shutdown) that both reads commands and writes the session's outbox:
//!
//! ```text
//!   socket ─► read frame ─► split on '\n' ─► parse_command ─► dispatch ─► reply ─┐
//!                                                                              ▼
//!   topic fan-out ─────────────────────────────────────────────────────────► Outbox
//!                                                                              │
//!   socket ◄── one text frame per batch (lines joined by '\n') ◄───────────────┘
//! ```
//!
//! Replies go through the same outbox as events, so a subscribe reply always precedes
//! the events after it. A batch of one event is sent as the event's shared frame bytes.
//!
//! Authentication: the handshake's credential (header, `?token=`, cookie) or, without
//! one, a `connect {token}` as the first command within the handshake timeout (any
//! other command first closes 4001). `refresh {token}` replaces the token (same
//! subject); a subscription the new token no longer allows ends with an
//! `unsubscribed {code: 403}` push for its topic. 30 s before expiry the session gets
//! `expiring`, at expiry `disconnect{code:4009}` and close 4009; a revoked token
//! closes 4001. A command the token does not allow is answered `403` and the session
//! goes on.
//!
//! Close codes: 4400 protocol error (binary frame, broken framing), 4413 message too
//! big, 4008 slow consumer, 4029 command flood, 4000 shutdown (after a `disconnect`
//! push with a jittered `after_ms`). Server pings every `ping_interval`; a peer silent
//! for two intervals is dropped. Per-line errors (malformed JSON, unknown command,
//! missing fields, bad topic or cursor, limits) are answered with an error reply and
//! the session goes on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use weft_proto::command::{HistoryCmd, PublishCmd, SubscribeCmd};
use weft_proto::{close, parse_command, Command};

use crate::auth::edge::{admit_subscribe, require};
use crate::auth::{Caller, Credential, Op, Refusal, UserGuard, EXPIRING_NOTICE};
use crate::error::ApiError;
use crate::input::{check_topic, event_kind, parse_since, raw_data};
use crate::node::{ConnGuard, Node};
use crate::rate::{Buckets, Rate};
use crate::session::event::{put_u64, write_event_array};
use crate::session::outbox::{CloseReason, DirectWrite, Entry, Frame, Outbox, Pushed};
use crate::session::wsframe::{self, FrameError, FrameReader, Incoming};
use crate::stats::{Count, Stats, Traffic, Transport};
use crate::topic::{Published, Subscriber, Topic};
use crate::transport::head::JsonRefusals;
use crate::transport::respond::problem_error;

/// What the accept loop attaches to each request.
#[derive(Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub guard: Arc<ConnGuard>,
}

/// Largest text frame the server writes in one batch.
const MAX_BATCH: usize = 64 * 1024;

fn bad_upgrade(msg: &str) -> Response {
    ApiError::bad(msg).into_response()
}

/// Whether a `Sec-WebSocket-Key` is the base64 of 16 bytes (RFC 6455 §4.1): 22
/// characters of the alphabet, the last carrying only 2 bits, then `==`.
fn is_websocket_key(k: &[u8]) -> bool {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let value = |c: u8| ALPHABET.iter().position(|a| *a == c);
    k.len() == 24
        && k.ends_with(b"==")
        && k[..22].iter().all(|c| value(*c).is_some())
        && value(k[21]).is_some_and(|v| v & 0x0f == 0)
}

pub async fn upgrade(
    State(node): State<Arc<Node>>,
    ext: Option<axum::Extension<Caller>>,
    mut req: Request,
) -> Response {
    let h = req.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        h.get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return bad_upgrade("this route needs a WebSocket upgrade");
    }
    if h.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        let mut r = bad_upgrade("Sec-WebSocket-Version must be 13");
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return r;
    }
    let Some(key) = h
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|k| is_websocket_key(k.as_bytes()))
    else {
        return bad_upgrade("Sec-WebSocket-Key must be the base64 of 16 bytes");
    };
    let accept = derive_accept_key(key.as_bytes());
    // The origin was checked by the edge middleware, as for every route. Without a
    // credential the client authenticates with `connect`, unless anonymous is allowed.
    let caller = ext.map(|e| e.0);
    let user_guard = match caller.as_ref().map(|c| node.auth.admit_user(c)) {
        Some(Err(e)) => return e.into_response(),
        Some(Ok(g)) => g,
        None => None,
    };
    let offered: Vec<&str> = h
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let protocol = if offered.is_empty() {
        None
    } else if offered.contains(&weft_proto::SUBPROTOCOL_JSON) {
        Some(weft_proto::SUBPROTOCOL_JSON)
    } else {
        return bad_upgrade("supported subprotocols: weft.v1.json");
    };
    if let Err(refused) = node.admit_session() {
        return refused.into_response();
    }
    let info = req.extensions().get::<ConnInfo>().cloned();
    let on_upgrade = hyper::upgrade::on(&mut req);
    // The session is made here, not in the task: what an `async` block captures stays
    // in its task for the task's whole life, even once moved out, so capturing the
    // caller, the connection's details and the guards would add ~400 bytes to every
    // idle session.
    let session = Box::new(Session::new(node.clone(), info, caller, user_guard));
    node.tasks.spawn_on(
        serve_upgraded(Box::new((on_upgrade, session))),
        node.delivery.handle(),
    );
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let hs = resp.headers_mut();
    hs.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    hs.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    hs.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header"),
    );
    if let Some(p) = protocol {
        hs.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    resp
}

/// A session's whole task: waits for the upgrade, then runs the session on the socket
/// hyper hands back. The accept loop serves `TokioIo<TcpStream>` (behind
/// `JsonRefusals`); taking the socket back lets the session wait for readiness with no
/// buffer and write with `writev`.
///
/// Both come in one box: an `async fn` keeps each argument in its task for the task's
/// whole life, so one pointer here instead of two is 8 bytes per idle session, and with
/// it the task fits tokio's next 128-byte step down.
async fn serve_upgraded(pending: Box<(hyper::upgrade::OnUpgrade, Box<Session>)>) {
    // Moved out inside a block, so the box is freed here, not when the task ends.
    let (on_upgrade, session) = {
        let pending = pending;
        *pending
    };
    let Ok(upgraded) = on_upgrade.await else {
        return;
    };
    let run = match run_on_tcp(session, upgraded) {
        Ok(run) => run,
        // Boxed: an idle session's memory is mostly this task, and a TLS stream held in
        // place (rustls keeps its state inline) would size every session's task for
        // it, TLS or not — about 2.7 KiB per connection.
        Err((session, upgraded)) => return Box::pin(run_over_tls(session, upgraded)).await,
    };
    run.await
}

/// The session's run over the TCP socket hyper hands back, unless the connection is
/// TLS. A plain function so that no part of the upgrade (the socket, the bytes read
/// past the request) is kept in the task beside the run it was moved into.
#[allow(clippy::result_large_err)]
fn run_on_tcp(
    session: Box<Session>,
    upgraded: hyper::upgrade::Upgraded,
) -> Result<impl std::future::Future<Output = ()>, (Box<Session>, hyper::upgrade::Upgraded)> {
    match upgraded.downcast::<JsonRefusals<TokioIo<TcpStream>>>() {
        Ok(parts) => Ok(session.run(
            Arc::new(parts.io.into_inner().into_inner()),
            early_bytes(parts.read_buf),
        )),
        Err(upgraded) => Err((session, upgraded)),
    }
}

/// The bytes the client sent right behind its upgrade request, copied out: `read_buf`
/// may share hyper's whole connection read buffer, which must not live as long as
/// the session. A boxed slice, 16 bytes in the session's task where `Bytes` is 32.
fn early_bytes(read_buf: Bytes) -> Box<[u8]> {
    read_buf.to_vec().into_boxed_slice()
}

/// Over TLS the session talks to one end of a socket pair and a pump task carries
/// bytes between the other end and the TLS stream, so the session code stays the same
/// (at the price of the pump's buffers while TLS is on).
async fn run_over_tls(session: Box<Session>, upgraded: hyper::upgrade::Upgraded) {
    let Ok(parts) =
        upgraded.downcast::<JsonRefusals<TokioIo<tokio_rustls::server::TlsStream<TcpStream>>>>()
    else {
        tracing::error!("upgraded connection is neither TCP nor TLS");
        return;
    };
    let Ok((session_end, pump_end)) = tokio::net::UnixStream::pair() else {
        return;
    };
    let mut tls = parts.io.into_inner().into_inner();
    let pump = tokio::spawn(async move {
        let mut pump_end = pump_end;
        let _ = tokio::io::copy_bidirectional(&mut tls, &mut pump_end).await;
    });
    session
        .run(Arc::new(session_end), early_bytes(parts.read_buf))
        .await;
    // The pump ends once the session's end is dropped and the TLS close is written;
    // bound it so a stuck peer cannot keep it.
    let _ = timeout(Duration::from_secs(5), pump).await;
}

struct Session {
    node: Arc<Node>,
    id: u64,
    client: Arc<str>,
    outbox: Arc<Outbox>,
    subs: Subs,
    /// The session's command, subscribe and publish rates ([`Limit`]).
    limits: Buckets<3>,
    /// Consecutive commands refused for rate; past the burst the session is closed.
    refused: u32,
    /// Commands waiting for a mirror's snapshot come back here (made on first use,
    /// so idle sessions hold no channel).
    deferred: Option<Deferred>,
    deferred_in_flight: usize,
    /// Who the session is; `None` until a `connect {token}` verifies.
    caller: Option<Caller>,
    user_guard: Option<UserGuard>,
    expires_at: Option<Instant>,
    expiring_sent: bool,
    /// Changes when live sessions must re-check themselves: a revocation, or the node
    /// shutting down (one watch for both: each pending wait sits in every idle task).
    notices: tokio::sync::watch::Receiver<u64>,
    /// A `connect`/`refresh` token being verified (a JWKS fetch may be needed); the
    /// lines that arrive meanwhile wait in `held`, in order.
    verifying: Option<tokio::sync::oneshot::Receiver<Verified>>,
    held: Vec<String>,
    /// When the peer last sent anything (a pong included). Here rather than a local of
    /// `run`: 16 bytes more in the task would take it to tokio's next 128-byte step.
    last_seen: Instant,
    _conn: Option<ConnInfo>,
}

/// The rate limits each session has, as indexes into its [`Buckets`].
#[derive(Clone, Copy)]
enum Limit {
    Commands = 0,
    Subscribes = 1,
    Publishes = 2,
}

/// The rates and bursts of a session's [`Limit`]s, in their order.
fn rates(l: &crate::config::Limits) -> [Rate; 3] {
    [
        Rate::new(l.commands_per_s, l.command_burst),
        Rate::new(l.subscribes_per_s, l.subscribe_burst),
        Rate::new(l.publishes_per_s, l.publish_burst),
    ]
}

/// A session's subscriptions by topic name, in a `Vec` searched in order: there are
/// at most `limits.max_subscriptions_per_session` (128 by default), and a session with
/// one or two (the common case) holds a small allocation instead of a map's first
/// four slots.
#[derive(Default)]
struct Subs(Vec<(Arc<str>, Arc<Topic>)>);

impl Subs {
    fn contains(&self, name: &str) -> bool {
        self.0.iter().any(|(n, _)| &**n == name)
    }

    fn remove(&mut self, name: &str) -> Option<Arc<Topic>> {
        let at = self.0.iter().position(|(n, _)| &**n == name)?;
        Some(self.0.swap_remove(at).1)
    }

    /// Adds a topic the session is not subscribed to yet.
    fn insert(&mut self, name: Arc<str>, topic: Arc<Topic>) {
        if self.0.len() < 4 {
            self.0.reserve_exact(1);
        }
        self.0.push((name, topic));
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn names(&self) -> impl Iterator<Item = &Arc<str>> {
        self.0.iter().map(|(n, _)| n)
    }

    fn topics(&self) -> impl Iterator<Item = &Arc<Topic>> {
        self.0.iter().map(|(_, t)| t)
    }
}

/// A verified (or refused) `connect`/`refresh` token.
struct Verified {
    id: Option<u64>,
    refresh: bool,
    result: Result<Caller, (Refusal, ApiError)>,
}

/// Lines a session may send while its token is being verified; their bytes are
/// bounded by `limits.max_message_bytes` in all.
const MAX_HELD_LINES: usize = 256;

async fn next_verified(
    v: &mut Option<tokio::sync::oneshot::Receiver<Verified>>,
) -> Option<Verified> {
    match v {
        Some(rx) => rx.await.ok(),
        None => std::future::pending().await,
    }
}

type Deferred = (
    mpsc::Sender<(Option<u64>, Result<Command, ApiError>)>,
    mpsc::Receiver<(Option<u64>, Result<Command, ApiError>)>,
);

/// Subscribes (and history reads) one session may have waiting for other nodes.
const MAX_DEFERRED: usize = 64;

async fn next_deferred(
    deferred: &mut Option<Deferred>,
) -> Option<(Option<u64>, Result<Command, ApiError>)> {
    match deferred {
        Some((_, rx)) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// What woke a session's loop.
enum Wake {
    Verified(Verified),
    /// One of the session's deadlines (see `run`) may have passed.
    Deadline,
    /// A revocation or the node's shutdown (see `Session::notices`).
    Notice,
    /// The socket is readable (true), or failed.
    Readable(bool),
    Deferred(Option<u64>, Result<Command, ApiError>),
    Batch(Result<Vec<Entry>, CloseReason>),
}

/// Why the session loop ended.
enum End {
    /// Send a close frame with this code and wait briefly for the peer's.
    Close(u16, String),
    /// The peer closed: answer with this close frame.
    Answer(Bytes),
    /// The peer is gone or unresponsive: just drop the socket.
    Silent,
}

thread_local! {
    /// Scratch buffer every session on this thread reads into, so idle sessions hold
    /// none (see [`crate::session::wsframe`]).
    static READ_BUF: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0u8; 64 * 1024].into_boxed_slice());
}

/// A queued entry's bytes on the wire (after [`Session::prepare`]).
impl Wire for Entry {
    fn wire(&self) -> &[u8] {
        match &self.frame {
            Frame::Event(ev) => ev.ws_frame(),
            Frame::Control(b) => b,
            // `prepare` turned every reset into a control frame.
            Frame::Reset { .. } => &[],
        }
    }
}

impl Wire for Bytes {
    fn wire(&self) -> &[u8] {
        self
    }
}

/// Something that is whole WebSocket frames on the wire.
trait Wire {
    fn wire(&self) -> &[u8];
}

/// A socket the session can wait on without a buffer: readiness, then a try-read or
/// try-write (TCP, or the socket pair in front of a TLS stream); the fan-out may
/// try-write it too ([`DirectWrite`]).
pub trait Socket: DirectWrite {
    /// Read readiness as a poll, not a future: the waker is kept in the socket's
    /// registration (one reader slot, and only the session's task reads), so waiting
    /// holds no waiter node in the task. `readable()`'s future is 168 bytes of every
    /// idle session's task; this wait is the 8 of a reference.
    fn poll_read_ready(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>>;
    fn writable(&self) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
    fn try_read(&self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// The session's own write: through the runtime's readiness, which a `WouldBlock`
    /// clears, so that `writable()` then waits for the socket to drain.
    fn try_write_vectored(&self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize>;
}

macro_rules! socket_impl {
    ($t:ty) => {
        impl Socket for $t {
            fn poll_read_ready(
                &self,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                <$t>::poll_read_ready(self, cx)
            }
            async fn writable(&self) -> std::io::Result<()> {
                <$t>::writable(self).await
            }
            fn try_read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
                <$t>::try_read(self, buf)
            }
            fn try_write_vectored(&self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
                <$t>::try_write_vectored(self, bufs)
            }
        }
        impl DirectWrite for $t {
            fn write_now(&self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
                // `sendmsg` on the socket tokio keeps non-blocking; see the trait.
                socket2::SockRef::from(self).send_vectored(bufs)
            }
        }
    };
}
socket_impl!(TcpStream);
socket_impl!(tokio::net::UnixStream);

/// Until `stream` is readable (or failed), for a try-read.
fn readable<S: Socket>(stream: &S) -> impl std::future::Future<Output = std::io::Result<()>> + '_ {
    std::future::poll_fn(move |cx| stream.poll_read_ready(cx))
}

/// Writes whole frames with vectored writes, resuming after partial writes; every byte
/// written is added to `sent` (`weft_bytes_sent_total{transport="ws"}`).
async fn write_frames<S: Socket, F: Wire>(
    stream: &S,
    frames: &[F],
    sent: &Count,
) -> std::io::Result<()> {
    const MAX_IOV: usize = 64;
    let (mut idx, mut off) = (0usize, 0usize);
    while idx < frames.len() {
        stream.writable().await?;
        let mut slices = [std::io::IoSlice::new(&[]); MAX_IOV];
        let mut n = 0;
        for (i, f) in frames[idx..].iter().take(MAX_IOV).enumerate() {
            slices[i] = std::io::IoSlice::new(if i == 0 { &f.wire()[off..] } else { f.wire() });
            n += 1;
        }
        match stream.try_write_vectored(&slices[..n]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(mut written) => {
                sent.add(written as u64);
                while written > 0 && idx < frames.len() {
                    let left = frames[idx].wire().len() - off;
                    if written >= left {
                        written -= left;
                        idx += 1;
                        off = 0;
                    } else {
                        off += written;
                        written = 0;
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A `disconnect {code, reason, after_ms}` push for the session to write, and the
/// close (same code, `close_reason`) that follows it.
fn disconnect(
    node: &Node,
    code: u16,
    reason: &str,
    after_ms: u64,
    close_reason: &str,
) -> (Option<Bytes>, Option<End>) {
    let push = wsframe::text(&node.disconnect_push(code, reason, after_ms));
    (Some(push), Some(End::Close(code, close_reason.into())))
}

/// Writes `frames` within `limit`; false if the socket failed or the time ran out.
/// The write's state (a timer and a readiness wait, about 370 bytes) is boxed: it
/// lives on the heap while a write is under way, not inline in every session's task.
async fn write_within<S: Socket, F: Wire>(
    limit: Duration,
    stream: &S,
    frames: &[F],
    sent: &Count,
) -> bool {
    Box::pin(timeout(limit, write_frames(stream, frames, sent)))
        .await
        .is_ok_and(|r| r.is_ok())
}

/// How a session's socket is left: a close frame and the peer's answer, or the
/// answer to the peer's close, or nothing. `owed` (the rest of a frame the fan-out
/// half sent) goes before either frame.
async fn finish<S: Socket>(
    stream: &S,
    end: Option<End>,
    owed: Option<Bytes>,
    reader: &mut FrameReader,
    sent: &Count,
    write_timeout: Duration,
) {
    let last = |frame: Bytes| -> Vec<Bytes> { owed.into_iter().chain([frame]).collect() };
    match end {
        Some(End::Close(code, reason)) => {
            let frames = last(wsframe::close(code, &reason));
            write_within(write_timeout, stream, &frames, sent).await;
            // Let the peer answer the close before the socket is dropped.
            let _ = timeout(Duration::from_millis(500), await_close(stream, reader)).await;
        }
        Some(End::Answer(frame)) => {
            write_within(write_timeout, stream, &last(frame), sent).await;
        }
        _ => {}
    }
}

/// Reads until the peer's close frame (or EOF), discarding everything else (into the
/// thread's scratch buffer: a buffer of its own would sit in every session's task).
async fn await_close<S: Socket>(stream: &S, reader: &mut FrameReader) {
    let mut reader_done = false;
    while !reader_done {
        if readable(stream).await.is_err() {
            return;
        }
        let done = READ_BUF.with(|cell| {
            let mut buf = cell.borrow_mut();
            match stream.try_read(&mut buf[..]) {
                Ok(0) => true,
                Ok(n) => reader
                    .feed(&mut buf[..n], |m| {
                        reader_done |= matches!(m, Incoming::Close(_))
                    })
                    .is_err(),
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            }
        });
        if done {
            return;
        }
    }
}

impl Session {
    fn new(
        node: Arc<Node>,
        conn: Option<ConnInfo>,
        caller: Option<Caller>,
        user_guard: Option<UserGuard>,
    ) -> Self {
        let id = node.next_session_id();
        let limits = &node.config.limits;
        Self {
            expires_at: caller
                .as_ref()
                .and_then(Caller::expires)
                .map(crate::transport::stream::instant_of),
            expiring_sent: false,
            notices: node.auth.session_notices(),
            caller,
            user_guard,
            verifying: None,
            held: Vec::new(),
            client: node.client_id(id),
            outbox: Arc::new(Outbox::new(limits.outbound_queue_bytes)),
            subs: Subs::default(),
            limits: Buckets::new(&rates(limits)),
            last_seen: Instant::now(),
            refused: 0,
            deferred: None,
            deferred_in_flight: 0,
            _conn: conn,
            id,
            node,
        }
    }

    /// The session's loop, until the socket closes. `self` comes boxed, and the socket
    /// in the `Arc` the fan-out shares: an `async fn` keeps its by-value arguments
    /// beside the locals they move into, so a `Session` passed by value would sit in
    /// the task twice (about 390 bytes more per session), and a socket 24 bytes more.
    /// `early`: the bytes the client sent right behind its upgrade request.
    async fn run<S: Socket>(mut self: Box<Self>, stream: Arc<S>, mut early: Box<[u8]>) {
        let node = self.node.clone();
        // The fan-out writes events straight to the socket while the outbox is idle.
        self.outbox.attach(stream.clone());
        let stream = &*stream;
        let gauge = node.stats.connection(Transport::Ws);
        gauge.up();
        let (received, sent) = (
            node.stats.received(Traffic::Ws),
            node.stats.sent(Traffic::Ws),
        );
        let limits = &node.config.limits;
        let mut reader = FrameReader::new(limits.max_frame_bytes, limits.max_message_bytes);
        let timing = &node.config.timing;
        let ping_every = Duration::from_millis(timing.ping_interval_ms);
        let write_timeout = Duration::from_millis(timing.write_timeout_ms);
        let mut next_ping = Instant::now() + ping_every;
        // One timer for every deadline, the ping's included, kept across the loop and
        // moved only when the earliest deadline changes: a session woken for a batch
        // or a command does not register and cancel a timer each time.
        let mut armed = next_ping;
        let timer = tokio::time::sleep_until(armed);
        tokio::pin!(timer);
        self.last_seen = Instant::now();
        let mut close_at: Option<Instant> =
            node.shutting_down().then(|| node.close_deadline().into());
        received.add(early.len() as u64);
        let mut end = if early.is_empty() {
            None
        } else {
            self.on_bytes(&mut reader, &mut early)
        };
        drop(std::mem::take(&mut early));
        // A session without a caller must `connect` within the handshake timeout.
        let connect_by = self
            .caller
            .is_none()
            .then(|| Instant::now() + Duration::from_millis(timing.handshake_timeout_ms));
        while end.is_none() {
            let expires_at = self.expires_at;
            let expiring_at = expires_at
                .filter(|_| !self.expiring_sent)
                .map(|e| e.checked_sub(EXPIRING_NOTICE).unwrap_or(e));
            let connect_by =
                connect_by.filter(|_| self.caller.is_none() && self.verifying.is_none());
            let next_deadline = [connect_by, expiring_at, expires_at, close_at]
                .into_iter()
                .flatten()
                .fold(next_ping, Instant::min);
            if next_deadline != armed {
                armed = next_deadline;
                timer.as_mut().reset(armed);
            }
            // The waits only say what happened; the session acts on it below, once they
            // are dropped, so its task is sized for the larger of the two, not both.
            let wake = tokio::select! {
                Some(v) = next_verified(&mut self.verifying) => Wake::Verified(v),
                _ = &mut timer => Wake::Deadline,
                // The sender lives as long as the node, which this session holds.
                _ = self.notices.changed() => Wake::Notice,
                ready = readable(stream) => Wake::Readable(ready.is_ok()),
                Some((id, cmd)) = next_deferred(&mut self.deferred) => Wake::Deferred(id, cmd),
                r = self.outbox.next_batch_owned(MAX_BATCH) => Wake::Batch(r),
            };
            // A frame the session writes itself (a push before it ends, a ping).
            let mut own: Option<Bytes> = None;
            match wake {
                Wake::Verified(v) => {
                    self.verifying = None;
                    end = self.on_verified(v);
                }
                Wake::Deadline => {
                    let passed = |at: Option<Instant>| at.is_some_and(|at| at <= Instant::now());
                    if passed(close_at) {
                        (own, end) = disconnect(
                            &node,
                            close::RECONNECT,
                            "shutdown",
                            node.reconnect_after_ms(),
                            "shutdown",
                        );
                    } else if passed(connect_by) {
                        node.auth.count(Refusal::Missing);
                        end = Some(End::Close(
                            close::UNAUTHORIZED,
                            "connect with a token first".into(),
                        ));
                    } else if passed(expires_at) {
                        node.auth.count(Refusal::Expired);
                        (own, end) = disconnect(
                            &node,
                            close::TOKEN_EXPIRED,
                            "token expired",
                            0,
                            "token expired: reconnect with a fresh token",
                        );
                    } else if passed(expiring_at) {
                        self.expiring_sent = true;
                        let in_s = expires_at
                            .map_or(0, |e| e.saturating_duration_since(Instant::now()).as_secs());
                        let push = serde_json::json!({"push": {"expiring": {"in_s": in_s}}});
                        self.outbox
                            .push_control(wsframe::text(push.to_string().as_bytes()));
                    } else if passed(Some(next_ping)) {
                        next_ping = Instant::now() + ping_every;
                        self.outbox.release_if_idle();
                        // No traffic (pongs included) for two intervals: the peer is gone.
                        if self.last_seen.elapsed() > 2 * ping_every {
                            end = Some(End::Silent);
                        } else {
                            own = Some(Bytes::from_static(&[0x89, 0x00]));
                        }
                    }
                }
                Wake::Notice => {
                    if close_at.is_none() && node.shutting_down() {
                        close_at = Some(node.close_deadline().into());
                    }
                    if !self
                        .caller
                        .as_ref()
                        .is_none_or(|c| node.auth.still_valid(c))
                    {
                        node.auth.count(Refusal::Revoked);
                        end = Some(End::Close(close::UNAUTHORIZED, "token revoked".into()));
                    }
                }
                Wake::Readable(false) => end = Some(End::Silent),
                Wake::Readable(true) => {
                    end = READ_BUF.with(|cell| {
                        let mut buf = cell.borrow_mut();
                        match stream.try_read(&mut buf[..]) {
                            Ok(0) => Some(End::Silent),
                            Ok(n) => {
                                self.last_seen = Instant::now();
                                received.add(n as u64);
                                self.on_bytes(&mut reader, &mut buf[..n])
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
                            Err(_) => Some(End::Silent),
                        }
                    });
                }
                Wake::Deferred(id, cmd) => self.on_deferred(id, cmd),
                Wake::Batch(Ok(mut batch)) => {
                    self.prepare(&mut batch);
                    if !write_within(write_timeout, stream, &batch, sent).await {
                        end = Some(End::Silent);
                    }
                    self.outbox.written();
                }
                Wake::Batch(Err(CloseReason::SlowConsumer)) => {
                    // The outbox is closed: nothing else writes to the socket now.
                    (own, end) = disconnect(
                        &node,
                        close::SLOW_CONSUMER,
                        "slow consumer",
                        0,
                        "slow consumer: resume with your cursors",
                    );
                }
                Wake::Batch(Err(CloseReason::Gone)) => end = Some(End::Silent),
            }
            if let Some(frame) = own {
                let mut hold = self.outbox.hold();
                // The rest of a frame the fan-out half sent goes first.
                let frames: Vec<Bytes> = hold.owed().into_iter().chain([frame]).collect();
                if !write_within(write_timeout, stream, &frames, sent).await && end.is_none() {
                    // A ping that cannot be written: the peer is gone.
                    end = Some(End::Silent);
                }
            }
        }
        // Nothing more from the fan-out: the socket is the session's alone again.
        node.stats.session_queue_peak(self.outbox.peak_bytes());
        self.outbox.close();
        let owed = self.outbox.take_owed();
        // Boxed, like every write here: an idle session's task holds none of this.
        Box::pin(finish(stream, end, owed, &mut reader, sent, write_timeout)).await;
        for topic in self.subs.topics() {
            topic.unsubscribe(self.id);
            node.stats.subscriptions.down();
        }
        gauge.down();
    }

    /// Feeds freshly read bytes to the frame reader and handles each message.
    fn on_bytes(&mut self, reader: &mut FrameReader, bytes: &mut [u8]) -> Option<End> {
        let mut end = None;
        let result = reader.feed(bytes, |msg| {
            if end.is_some() {
                return;
            }
            end = match msg {
                Incoming::Text(text) => self.on_text(text),
                Incoming::Binary => {
                    self.node.stats.bad_input.inc();
                    Some(End::Close(
                        close::PROTOCOL_ERROR,
                        "binary frames are not part of weft.v1.json".into(),
                    ))
                }
                Incoming::Ping(payload) => {
                    self.outbox
                        .push_control(wsframe::frame(wsframe::OP_PONG, payload));
                    None
                }
                Incoming::Pong => None,
                Incoming::Close(code) => {
                    Some(End::Answer(wsframe::close(code.unwrap_or(1000), "")))
                }
            };
        });
        match result {
            Ok(()) => end,
            Err(e) => {
                self.node.stats.bad_input.inc();
                let code = match e {
                    FrameError::TooBig(..) => close::TOO_BIG,
                    FrameError::Protocol(_) | FrameError::Utf8 => close::PROTOCOL_ERROR,
                    // The peer's close frame was invalid: answer as RFC 6455 §7.4 says
                    // and do not wait for another close.
                    FrameError::BadClose => return Some(End::Answer(wsframe::close(1002, ""))),
                    FrameError::BadCloseReason => {
                        return Some(End::Answer(wsframe::close(1007, "")))
                    }
                };
                Some(End::Close(code, e.to_string()))
            }
        }
    }

    /// Turns a batch into wire frames: events share their pre-built frame.
    /// Readies a batch to be written as it is: counts it, samples its latency, and
    /// turns the rare per-session pushes (a conflation skip, a reset) into their frames
    /// in place. Events keep their shared frame: nothing is copied per recipient.
    fn prepare(&self, batch: &mut [Entry]) {
        let stats = &self.node.stats;
        if let Some(Frame::Event(ev)) = batch.first().map(|e| &e.frame) {
            stats
                .delivery_latency
                .record(ev.sequenced_at.elapsed().as_secs_f64());
        }
        let mut events = 0;
        for entry in batch.iter_mut() {
            match &entry.frame {
                Frame::Event(ev) => {
                    events += 1;
                    if entry.skipped_from > 0 {
                        // Two frames back to back: the skip notice, then the event.
                        let skipped = serde_json::json!({"push": {"topic": &*ev.topic, "skipped": {"from": entry.skipped_from, "to": ev.offset - 1}}});
                        let mut both =
                            BytesMut::from(&wsframe::text(skipped.to_string().as_bytes())[..]);
                        both.put_slice(ev.ws_frame());
                        entry.frame = Frame::Control(both.freeze());
                        entry.skipped_from = 0;
                    }
                }
                Frame::Control(_) => {}
                Frame::Reset {
                    topic,
                    epoch,
                    offset,
                } => {
                    let reset = serde_json::json!({"push": {"topic": &**topic, "reset": {"epoch": &**epoch, "offset": offset}}});
                    entry.frame = Frame::Control(wsframe::text(reset.to_string().as_bytes()));
                }
            }
        }
        stats.delivered.add(events);
    }

    /// Handles one text frame; returns how to end the session if it must end.
    fn on_text(&mut self, text: &str) -> Option<End> {
        for line in text.split('\n') {
            if let Some(end) = self.on_line(line) {
                return Some(end);
            }
        }
        None
    }

    /// One command line. Every line, well-formed or not, spends from the command
    /// rate, so a flood of garbage is throttled like a flood of commands.
    fn on_line(&mut self, line: &str) -> Option<End> {
        let line = line.trim();
        if line.is_empty() {
            return None;
        }
        if self.verifying.is_some() {
            let held_bytes: usize = self.held.iter().map(String::len).sum::<usize>() + line.len();
            if self.held.len() >= MAX_HELD_LINES
                || held_bytes > self.node.config.limits.max_message_bytes
            {
                return Some(End::Close(
                    close::RATE_LIMITED,
                    "too many commands while the token is verified".into(),
                ));
            }
            self.held.push(line.to_owned());
            return None;
        }
        // Parsed first so a refusal can name the command's id; every line counts
        // against the rate, well-formed or not.
        let parsed = parse_command(line);
        if !self.allow(Limit::Commands) {
            self.node.stats.rate_limited.inc();
            self.refused += 1;
            if self.refused > self.node.config.limits.command_burst {
                return Some(End::Close(
                    close::RATE_LIMITED,
                    "command rate exceeded".into(),
                ));
            }
            let id = match &parsed {
                Ok((id, _)) => *id,
                Err(e) => e.id,
            };
            self.reply_error(
                id,
                &ApiError::RateLimited {
                    message: "too many commands; slow down".into(),
                    retry_after_s: 1,
                },
            );
            return None;
        }
        self.refused = 0;
        let (id, cmd) = match parsed {
            Ok(parsed) => parsed,
            Err(e) => {
                self.node.stats.bad_input.inc();
                self.reply_error(e.id, &ApiError::BadRequest(e.message));
                return None;
            }
        };
        match cmd {
            Command::Connect(c) => return self.connect(id, c.token, false),
            Command::Refresh(r) => return self.connect(id, Some(r.token), true),
            _ if self.caller.is_none() => {
                self.node.auth.count(Refusal::Missing);
                return Some(End::Close(
                    close::UNAUTHORIZED,
                    "connect with a token first".into(),
                ));
            }
            _ => {}
        }
        if let Err(e) = self.dispatch(id, cmd) {
            if e.code() == 400 || e.code() == 413 {
                self.node.stats.bad_input.inc();
            }
            self.reply_error(id, &e);
        }
        None
    }

    /// `connect` (with or without a token) and `refresh`: a token is verified off the
    /// session's path; the commands behind it wait, in order.
    fn connect(&mut self, id: Option<u64>, token: Option<String>, refresh: bool) -> Option<End> {
        let Some(token) = token else {
            if self.caller.is_none() {
                if !self.node.auth.anonymous_allowed() {
                    self.node.auth.count(Refusal::Missing);
                    return Some(End::Close(
                        close::UNAUTHORIZED,
                        "connect needs a token".into(),
                    ));
                }
                self.caller = Some(Caller::Anonymous);
            }
            self.reply_connected(id);
            return None;
        };
        if token.len() > crate::auth::credentials::MAX_CREDENTIAL {
            return self.on_verified(Verified {
                id,
                refresh,
                result: Err((
                    Refusal::Invalid,
                    ApiError::Unauthorized("malformed token".into()),
                )),
            });
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let auth = self.node.auth.clone();
        tokio::spawn(async move {
            let result = auth.resolve(Credential::new(&token)).await;
            let _ = tx.send(Verified {
                id,
                refresh,
                result,
            });
        });
        self.verifying = Some(rx);
        None
    }

    fn on_verified(&mut self, v: Verified) -> Option<End> {
        match v.result {
            Ok(caller) => {
                let same_subject = match (&self.caller, &caller) {
                    (Some(Caller::User(old)), Caller::User(new)) => old.sub == new.sub,
                    (Some(Caller::User(_)), _) => false,
                    _ => true,
                };
                if !same_subject {
                    self.node.auth.count(Refusal::Forbidden);
                    self.reply_error(
                        v.id,
                        &ApiError::Forbidden("a refresh must keep the token's subject".into()),
                    );
                } else {
                    if !matches!(self.caller, Some(Caller::User(_))) {
                        match self.node.auth.admit_user(&caller) {
                            Ok(g) => self.user_guard = g,
                            Err(_) => {
                                return Some(End::Close(
                                    close::RATE_LIMITED,
                                    "too many sessions for this user".into(),
                                ))
                            }
                        }
                    }
                    self.expires_at = caller.expires().map(crate::transport::stream::instant_of);
                    self.expiring_sent = false;
                    self.caller = Some(caller);
                    self.end_unreadable();
                    self.reply_connected(v.id);
                }
            }
            Err((reason, e)) => {
                self.node.auth.count(reason);
                if !v.refresh || self.caller.is_none() {
                    let code = if reason == Refusal::Expired {
                        close::TOKEN_EXPIRED
                    } else {
                        close::UNAUTHORIZED
                    };
                    return Some(End::Close(code, e.to_string()));
                }
                // A failed refresh leaves the session on its current token.
                self.reply_error(v.id, &e);
            }
        }
        for line in std::mem::take(&mut self.held) {
            if let Some(end) = self.on_line(&line) {
                return Some(end);
            }
        }
        None
    }

    /// After the token changed: every subscription the new token no longer allows
    /// ends here, and the client is told so, topic by topic, with
    /// `{"push":{"topic":"t","unsubscribed":{"code":403,"reason":"…"}}}` ahead of the
    /// refresh's reply. The events queued before it are still delivered; as after an
    /// `unsubscribe`, only an event the fan-out was already writing may follow it.
    fn end_unreadable(&mut self) {
        let refused: Vec<Arc<str>> = self
            .subs
            .names()
            .filter(|t| self.allowed(Op::Read(t)).is_err())
            .cloned()
            .collect();
        for name in refused {
            if let Some(topic) = self.subs.remove(&name) {
                topic.unsubscribe(self.id);
                self.node.stats.subscriptions.down();
            }
            let push = weft_proto::ServerMessage {
                id: None,
                result: None,
                error: None,
                push: Some(weft_proto::Push {
                    topic: Some(name.to_string()),
                    unsubscribed: Some(weft_proto::UnsubscribedPush {
                        code: 403,
                        reason: "the refreshed token does not allow this topic".into(),
                    }),
                    ..Default::default()
                }),
            };
            let frame = wsframe::text(&serde_json::to_vec(&push).expect("serialises"));
            if self.outbox.push_control(frame) == Pushed::Overflow {
                self.node.stats.slow_consumer_closes.inc();
            }
        }
    }

    fn reply_connected(&self, id: Option<u64>) {
        let r = weft_proto::ConnectResult {
            client: self.client.to_string(),
            node: self.node.config.node_id.clone(),
        };
        self.reply(id, &serde_json::to_vec(&r).expect("serialises"));
    }

    /// Asks the one permission function for this session's caller.
    /// Takes a token from one of the session's rate limits.
    fn allow(&mut self, limit: Limit) -> bool {
        let rates = rates(&self.node.config.limits);
        self.limits.allow(limit as usize, &rates)
    }

    fn allowed(&self, op: Op<'_>) -> Result<(), ApiError> {
        let caller = self
            .caller
            .as_ref()
            .ok_or_else(|| ApiError::Unauthorized("connect with a token first".into()))?;
        let client_rule = match op {
            Op::Publish(t) => self.node.registry.namespaces.lookup(t).client_publish,
            _ => true,
        };
        require(&self.node, caller, op, client_rule)
    }

    fn reply(&self, id: Option<u64>, result: &[u8]) {
        push_reply(&self.outbox, &self.node.stats, id, result);
    }

    fn reply_error(&self, id: Option<u64>, e: &ApiError) {
        push_error(&self.outbox, &self.node.stats, id, e);
    }

    /// A command that came back after waiting for a mirror's snapshot.
    fn on_deferred(&mut self, id: Option<u64>, cmd: Result<Command, ApiError>) {
        self.deferred_in_flight -= 1;
        let result = cmd.and_then(|cmd| {
            // The token may have been refreshed to a narrower one while it waited.
            match &cmd {
                Command::Subscribe(s) => self.allowed(Op::Read(&s.topic))?,
                Command::History(h) => self.allowed(Op::Read(&h.topic))?,
                _ => {}
            }
            self.dispatch_now(id, cmd)
        });
        if let Err(e) = result {
            self.reply_error(id, &e);
        }
    }

    /// Runs `cmd` now if `topic` is ready here; on a mirror still waiting for its
    /// owner's snapshot it runs once that arrives (bounded wait), without blocking
    /// the session meanwhile.
    fn when_ready(
        &mut self,
        id: Option<u64>,
        topic: &str,
        since: Option<&str>,
        cmd: Command,
    ) -> Result<(), ApiError> {
        check_topic(topic)?;
        let since = parse_since(since)?;
        if self.node.topic_to_sync(topic, since.as_ref())?.is_none() {
            return self.dispatch_now(id, cmd);
        }
        if self.deferred_in_flight >= MAX_DEFERRED {
            return Err(ApiError::RateLimited {
                message: format!(
                    "at most {MAX_DEFERRED} subscribes may wait for other nodes at once"
                ),
                retry_after_s: 1,
            });
        }
        let (tx, _) = self
            .deferred
            .get_or_insert_with(|| mpsc::channel(MAX_DEFERRED));
        let tx = tx.clone();
        self.deferred_in_flight += 1;
        let (node, topic) = (self.node.clone(), topic.to_owned());
        tokio::spawn(async move {
            let r = node.ready_topic(&topic, since.as_ref()).await.map(|()| cmd);
            let _ = tx.send((id, r)).await;
        });
        Ok(())
    }

    fn dispatch(&mut self, id: Option<u64>, cmd: Command) -> Result<(), ApiError> {
        match cmd {
            Command::Subscribe(s) => {
                check_topic(&s.topic)?;
                self.allowed(Op::Read(&s.topic))?;
                if !self.allow(Limit::Subscribes) {
                    self.node.stats.rate_limited.inc();
                    return Err(ApiError::RateLimited {
                        message: "too many subscribes; slow down".into(),
                        retry_after_s: 1,
                    });
                }
                if let Some(caller) = &self.caller {
                    admit_subscribe(&self.node, caller)?;
                }
                let (topic, since) = (s.topic.clone(), s.since.clone());
                self.when_ready(id, &topic, since.as_deref(), Command::Subscribe(s))
            }
            Command::History(h) => {
                check_topic(&h.topic)?;
                self.allowed(Op::Read(&h.topic))?;
                let (topic, since) = (h.topic.clone(), h.since.clone());
                self.when_ready(id, &topic, since.as_deref(), Command::History(h))
            }
            cmd => self.dispatch_now(id, cmd),
        }
    }

    fn dispatch_now(&mut self, id: Option<u64>, cmd: Command) -> Result<(), ApiError> {
        match cmd {
            Command::Connect(_) | Command::Refresh(_) => {
                self.reply_connected(id);
                Ok(())
            }
            Command::Subscribe(s) => self.subscribe(id, s),
            Command::Unsubscribe(u) => {
                check_topic(&u.topic)?;
                let topic = self
                    .subs
                    .remove(u.topic.as_str())
                    .ok_or_else(|| ApiError::bad(format!("not subscribed to `{}`", u.topic)))?;
                topic.unsubscribe(self.id);
                self.node.stats.subscriptions.down();
                self.reply(id, b"{}");
                Ok(())
            }
            Command::Publish(p) => self.publish(id, p),
            Command::History(h) => self.history(id, h),
            Command::Presence(p) => {
                check_topic(&p.topic)?;
                self.allowed(Op::Presence(&p.topic))?;
                if !self.node.registry.namespaces.lookup(&p.topic).presence {
                    return Err(ApiError::Forbidden(format!(
                        "presence is off for the namespace of `{}`",
                        p.topic
                    )));
                }
                let clients = self
                    .node
                    .registry
                    .get(&p.topic)
                    .map(|t| t.presence(1000))
                    .unwrap_or_default();
                let r = weft_proto::PresenceResult {
                    topic: p.topic,
                    clients,
                };
                self.reply(id, &serde_json::to_vec(&r).expect("serialises"));
                Ok(())
            }
        }
    }

    fn subscribe(&mut self, id: Option<u64>, s: SubscribeCmd) -> Result<(), ApiError> {
        check_topic(&s.topic)?;
        let since = parse_since(s.since.as_deref())?;
        if self.subs.contains(s.topic.as_str()) {
            return Err(ApiError::bad(format!(
                "already subscribed to `{}`",
                s.topic
            )));
        }
        let max = self.node.config.limits.max_subscriptions_per_session;
        if self.subs.len() >= max {
            self.node.stats.rate_limited.inc();
            return Err(ApiError::RateLimited {
                message: format!("at most {max} subscriptions per session"),
                retry_after_s: 1,
            });
        }
        let budget = self.node.config.limits.outbound_queue_bytes / 2;
        let outbox = &self.outbox;
        let subscribed = self.node.registry.with_topic(&s.topic, |t| {
            let sub = Subscriber {
                outbox: outbox.clone(),
                client: self.client.clone(),
                user: self.caller.as_ref().and_then(Caller::user),
                wants_presence: true,
            };
            let r = t.subscribe(self.id, sub, since.as_ref(), s.snapshot, budget, |snap| {
                let mut out = BytesMut::with_capacity(
                    96 + snap.events.iter().map(|e| e.data.len() + 48).sum::<usize>(),
                );
                out.put_slice(b"{\"epoch\":\"");
                out.put_slice(snap.epoch.as_bytes());
                out.put_slice(b"\",\"offset\":");
                put_u64(&mut out, snap.offset);
                if let Some(rec) = snap.recovered {
                    out.put_slice(if rec {
                        b",\"recovered\":true"
                    } else {
                        b",\"recovered\":false"
                    });
                }
                out.put_slice(b",\"events\":");
                write_event_array(&mut out, &snap.events);
                out.put_u8(b'}');
                // Under the topic's lock: precedes every later event of the topic.
                outbox.push_snapshot(Frame::Control(reply_frame(id, &out)));
            })?;
            Ok(r.map(|()| t.clone()))
        })?;
        let topic = subscribed.map_err(problem_error)?;
        self.subs.insert(topic.name.clone(), topic);
        self.node.stats.subscriptions.up();
        Ok(())
    }

    fn publish(&mut self, id: Option<u64>, p: PublishCmd) -> Result<(), ApiError> {
        crate::transport::http::refuse_while_draining(&self.node)?;
        check_topic(&p.topic)?;
        self.allowed(Op::Publish(&p.topic))?;
        if !self.allow(Limit::Publishes) {
            self.node.stats.rate_limited.inc();
            return Err(ApiError::RateLimited {
                message: "too many publishes; slow down".into(),
                retry_after_s: 1,
            });
        }
        let kind = event_kind(p.kind.as_deref())?;
        let data = raw_data(&p.data, &self.node.config.limits)?;
        let ticket = self.node.start_publish(&p.topic, data, kind, None);
        if ticket.is_done() {
            let published = ticket.into_done()?;
            self.reply(id, &publish_result(p.topic, &published));
            return Ok(());
        }
        // Forwarded to the owner (already on its link, so this session's publishes
        // keep their order); the reply follows when the owner answers.
        let (node, outbox) = (self.node.clone(), self.outbox.clone());
        tokio::spawn(async move {
            match node.finish_publish(ticket).await {
                Ok(published) => push_reply(
                    &outbox,
                    &node.stats,
                    id,
                    &publish_result(p.topic, &published),
                ),
                Err(e) => push_error(&outbox, &node.stats, id, &e),
            }
        });
        Ok(())
    }

    fn history(&mut self, id: Option<u64>, h: HistoryCmd) -> Result<(), ApiError> {
        check_topic(&h.topic)?;
        let max = self.node.config.limits.max_history_request;
        let limit = match h.limit {
            None => max,
            Some(n) if n >= 1 && n as usize <= max => n as usize,
            Some(_) => return Err(ApiError::bad(format!("`limit` must be from 1 to {max}"))),
        };
        let since = parse_since(h.since.as_deref())?;
        let page = self
            .node
            .registry
            .with_topic(&h.topic, |t| match &since {
                Some(c) => t.read(Some(c), limit),
                None => t.tail(limit),
            })?
            .map_err(problem_error)?;
        let page = fit_reply(
            page,
            self.node.config.limits.outbound_queue_bytes / 2,
            since.is_some(),
        );
        let mut out = BytesMut::with_capacity(
            96 + page.events.iter().map(|e| e.data.len() + 48).sum::<usize>(),
        );
        out.put_slice(b"{\"epoch\":\"");
        out.put_slice(page.epoch.as_bytes());
        out.put_slice(b"\",\"offset\":");
        put_u64(&mut out, page.last_offset);
        out.put_slice(b",\"events\":");
        write_event_array(&mut out, &page.events);
        out.put_slice(b",\"next\":\"");
        out.put_slice(page.epoch.as_bytes());
        out.put_u8(b':');
        put_u64(&mut out, page.next);
        out.put_slice(b"\"}");
        self.reply(id, &out);
        Ok(())
    }
}

/// Bounds a history reply by bytes, so asking for a page within the documented
/// limits never overflows the session's queue: a read after a cursor keeps its oldest
/// events and `next` says where to continue; a tail keeps its newest.
fn fit_reply(
    mut page: crate::topic::Page,
    budget: usize,
    after_cursor: bool,
) -> crate::topic::Page {
    let cost = |e: &Arc<crate::session::event::StoredEvent>| e.data.len() + 96;
    let total: usize = page.events.iter().map(cost).sum();
    if total <= budget {
        return page;
    }
    // How many events, taken in this order, fit the budget (at least one).
    let fitting = |events: &mut dyn Iterator<Item = &Arc<crate::session::event::StoredEvent>>| {
        let mut used = 0;
        events
            .take_while(|e| {
                used += cost(e);
                used <= budget
            })
            .count()
            .max(1)
    };
    if after_cursor {
        let keep = fitting(&mut page.events.iter());
        page.events.truncate(keep);
        page.next = page.events.last().map_or(page.next, |e| e.offset);
    } else {
        let keep = fitting(&mut page.events.iter().rev());
        page.events.drain(..page.events.len() - keep);
    }
    page
}

fn publish_result(topic: String, published: &Published) -> Vec<u8> {
    let r = weft_proto::PublishResult {
        topic,
        epoch: published.epoch.to_string(),
        offset: published.offset,
    };
    serde_json::to_vec(&r).expect("serialises")
}

fn push_reply(outbox: &Outbox, stats: &Stats, id: Option<u64>, result: &[u8]) {
    if outbox.push_control(reply_frame(id, result)) == Pushed::Overflow {
        stats.slow_consumer_closes.inc();
    }
}

fn push_error(outbox: &Outbox, stats: &Stats, id: Option<u64>, e: &ApiError) {
    let mut v = serde_json::json!({ "id": id, "error": e.detail() });
    if id.is_none() {
        v.as_object_mut().map(|o| o.remove("id"));
    }
    if outbox.push_control(wsframe::text(v.to_string().as_bytes())) == Pushed::Overflow {
        stats.slow_consumer_closes.inc();
    }
}

/// `{"id":N,"result":…}` as a WebSocket text frame (no `id` when the command had none).
fn reply_frame(id: Option<u64>, result: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(result.len() + 24);
    out.put_u8(b'{');
    if let Some(id) = id {
        out.put_slice(b"\"id\":");
        put_u64(&mut out, id);
        out.put_u8(b',');
    }
    out.put_slice(b"\"result\":");
    out.put_slice(result);
    out.put_u8(b'}');
    wsframe::text(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle WebSocket session is mostly its task: its `run` future is what every
    /// open connection costs beyond the socket, so it is held to a budget here (2,224
    /// bytes before the session came boxed and its writes were boxed, 1,368 after;
    /// 1,232 with one watch for revocations and shutdown; 960 since the read wait is a
    /// poll of the socket's registration, the outbox's wait holds only its `Notified`,
    /// and the socket and early bytes come as an `Arc` and a boxed slice).
    #[tokio::test]
    async fn an_idle_sessions_task_stays_small() {
        let node = Node::new(crate::config::Config::default());
        let (stream, _peer) = tokio::net::UnixStream::pair().unwrap();
        let session = Box::new(Session::new(node.clone(), None, None, None));
        let run = session.run(Arc::new(stream), Box::default());
        let size = std::mem::size_of_val(&run);
        assert!(size <= 1_000, "a session's run future is {size} bytes");
        // What is spawned for a TCP session: the run future and little else. tokio
        // rounds a task up to 128 bytes, and the task tracker adds 8 to the future:
        // up to 1,040 here is a 1,152-byte task, 1,048 would be 1,280.
        let mut req = Request::new(Body::empty());
        let session = Box::new(Session::new(node, None, None, None));
        let task = serve_upgraded(Box::new((hyper::upgrade::on(&mut req), session)));
        let size = std::mem::size_of_val(&task);
        assert!(size <= 1_040, "a session's task is {size} bytes");
    }
}
