//! The accept loop: admission, one task per connection, HTTP/1.1 with upgrades, and
//! graceful shutdown bounded by the grace period.
//!
//! The loop only accepts and admits: each admitted connection is handed to the next
//! request thread ([`crate::node::Requests`]), which does its TLS, reads, publishes
//! and answers, so a request never wakes a second thread to be served.
//!
//! Each accepted socket is checked against the connection limits *before* any HTTP is
//! read; a refused one gets a canned `503`/`429` from its own short task, so the loop
//! never waits on a client. The HTTP handshake (headers) must complete within
//! `handshake_timeout_ms`, so a connection that never finishes its request is closed;
//! the same bound closes a kept-alive connection idle that long between requests
//! (hyper has one timer for both), which is not counted as a refusal.
//!
//! With `tls.cert_file`/`tls.key_file` each connection's TLS handshake runs in its own
//! task too, bounded by the same timeout, and new handshakes use the certificate as
//! last reloaded ([`crate::transport::tls`]). The ops listener (`ops.listen`), when configured,
//! serves probes, metrics and admin routes apart from clients: it is not subject to the
//! client connection limits, so probes answer on a node full of clients.
//!
//! Shutdown: the loop stops accepting, readiness goes false, every session is told to
//! close (each at a jittered moment in the first half of the grace), and `serve`
//! returns once every connection task is done or the grace period is over.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;
use tracing::{info, warn};

use crate::error::ApiError;
use crate::node::Node;
use crate::transport::head::{self, JsonRefusals};
use crate::transport::http::app;
use crate::transport::ws::ConnInfo;

/// Serves `node` on `listener` until `shutdown` resolves, then winds down within the
/// configured grace period.
pub async fn serve(
    node: Arc<Node>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    serve_all(node, listener, None, shutdown).await
}

/// [`serve`], with the ops surface on a listener of its own when `ops` is given.
pub async fn serve_all(
    node: Arc<Node>,
    listener: TcpListener,
    ops: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    node.config.check_exposure(listener.local_addr()?)?;
    if node.auth.dev_mode() {
        warn!(
            "DEVELOPMENT MODE: no authentication is configured, so anonymous clients may subscribe and publish and any origin is allowed; this node only serves loopback unless auth.allow_anonymous is set. Configure [auth] before exposing it."
        );
    } else if node.config.auth.allow_anonymous {
        warn!("auth.allow_anonymous is set: clients without credentials may subscribe and publish");
    }
    node.auth.spawn_refresh();
    let app = app(node.clone());
    let background = spawn_background(node.clone());
    let reloader = node.tls.as_ref().map(|t| t.spawn_reloader());
    let ops_task = ops.map(|l| tokio::spawn(serve_ops(node.clone(), l)));
    tokio::pin!(shutdown);
    let mut draining: Option<tokio::time::Instant> = None;
    let grace = Duration::from_millis(node.config.timing.shutdown_grace_ms);
    loop {
        tokio::select! {
            // A standalone node drains on request as on SIGTERM (a cluster node's
            // `shutdown` future hands its topics over first, then resolves).
            _ = node.drain_requested(), if draining.is_none() && node.relay.get().is_none() => {
                info!(connections = node.tasks.len(), grace_ms = grace.as_millis() as u64, "drain requested; shutting down");
                node.begin_shutdown();
                node.tasks.close();
                draining = Some(tokio::time::Instant::now() + grace);
            }
            _ = &mut shutdown, if draining.is_none() => {
                info!(connections = node.tasks.len(), grace_ms = grace.as_millis() as u64, "shutting down");
                node.begin_shutdown();
                node.tasks.close();
                draining = Some(tokio::time::Instant::now() + grace);
            }
            // While draining the node keeps accepting, so probes see `/readyz` answer
            // 503; each new connection is served one request and closed.
            _ = node.tasks.wait(), if draining.is_some() => break,
            _ = sleep_opt(draining) => {
                warn!(left = node.tasks.len(), "grace period over with connections still open");
                break;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match node.conns.admit(peer.ip()) {
                    Ok(guard) => {
                        let info = ConnInfo { peer, guard: Arc::new(guard) };
                        hand_off(&node, &app, stream, info);
                    }
                    Err(refusal) => {
                        node.stats.connections_refused.inc();
                        tokio::spawn(refuse(stream, refusal));
                    }
                },
                Err(e) => {
                    // Out of file descriptors or similar: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
    drop(listener);
    background.abort();
    if let Some(t) = reloader {
        t.abort();
    }
    if let Some(t) = ops_task {
        t.abort();
    }
    Ok(())
}

/// Most ops connections served at once (probes, scrapes, admin calls).
const MAX_OPS_CONNECTIONS: usize = 256;

/// The ops listener: plain HTTP/1.1, its own small connection cap.
async fn serve_ops(node: Arc<Node>, listener: TcpListener) {
    let app = crate::transport::http::ops_app(node.clone());
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_OPS_CONNECTIONS));
    loop {
        let Ok((stream, _peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (app, node) = (app.clone(), node.clone());
        let timeout = Duration::from_millis(node.config.timing.handshake_timeout_ms);
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                app.clone().oneshot(req.map(Body::new))
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .serve_connection(JsonRefusals::new(TokioIo::new(stream)), service)
                .await;
            if served.is_err_and(|e| e.is_parse()) {
                node.stats.bad_input.inc();
            }
        });
    }
}

async fn sleep_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn refuse(mut stream: TcpStream, why: ApiError) {
    let body = why.body_json();
    let status = match why.code() {
        429 => "429 Too Many Requests",
        _ => "503 Service Unavailable",
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(resp.as_bytes())).await;
}

/// Serves an accepted connection on the next request thread (`Node::requests`): the
/// socket leaves this runtime's I/O driver and joins that thread's.
fn hand_off(node: &Arc<Node>, app: &Router, stream: TcpStream, info: ConnInfo) {
    let std_stream = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot hand an accepted connection over");
            return;
        }
    };
    let (node2, app) = (node.clone(), app.clone());
    node.tasks.spawn_on(
        async move {
            match TcpStream::from_std(std_stream) {
                Ok(stream) => connection(node2, app, stream, info).await,
                Err(e) => warn!(error = %e, "cannot serve a handed-over connection"),
            }
        },
        node.requests.next(),
    );
}

async fn connection(node: Arc<Node>, app: Router, stream: TcpStream, info: ConnInfo) {
    let _ = stream.set_nodelay(true);
    match &node.tls {
        None => serve_http(node, app, TokioIo::new(stream), info).await,
        Some(tls) => {
            let handshake = Duration::from_millis(node.config.timing.handshake_timeout_ms);
            match tokio::time::timeout(handshake, tls.acceptor().accept(stream)).await {
                Ok(Ok(tls_stream)) => serve_http(node, app, TokioIo::new(tls_stream), info).await,
                _ => node.stats.connections_refused.inc(),
            }
        }
    }
}

async fn serve_http<I>(node: Arc<Node>, app: Router, io: I, info: ConnInfo)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    // Whether a request has arrived on this connection: one that has not yet sent its
    // first request is not "idle" at drain time, its request is on the way.
    let served = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = served.clone();
    let draining_node = node.clone();
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        seen.store(true, std::sync::atomic::Ordering::Relaxed);
        req.extensions_mut().insert(info.clone());
        let node = draining_node.clone();
        let call = app.clone().oneshot(req.map(Body::new));
        async move {
            let mut resp = call.await?;
            if node.is_draining() {
                // Draining: answer, then close, so clients reconnect elsewhere.
                resp.headers_mut().insert(
                    axum::http::header::CONNECTION,
                    axum::http::HeaderValue::from_static("close"),
                );
            }
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let timing = &node.config.timing;
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(timing.handshake_timeout_ms))
        .max_buf_size(head::read_buffer_bytes(&node.config.limits))
        .keep_alive(true);
    // hyper's own refusals of a head it cannot parse get the JSON error body.
    let conn = builder
        .serve_connection(JsonRefusals::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let grace = Duration::from_millis(timing.shutdown_grace_ms);
    let mut shutdown = node.shutdown_signal();
    tokio::select! {
        r = conn.as_mut() => {
            match r {
                // hyper's header timer runs whenever it waits for a head, between
                // requests too: after a served request, its firing is a kept-alive
                // connection closed for idling (or a next head that stalled — the
                // same bound, told apart by no counter), not a refusal.
                Err(e) if e.is_timeout() && served.load(std::sync::atomic::Ordering::Relaxed) => {}
                // A first request that never finished within the handshake timeout.
                Err(e) if e.is_timeout() => node.stats.connections_refused.inc(),
                // A head hyper could not parse, answered 400/414/431 (`head`).
                Err(e) if e.is_parse() => node.stats.bad_input.inc(),
                _ => {}
            }
            return;
        }
        _ = async { let _ = shutdown.wait_for(|down| *down).await; } => {}
    }
    // Draining. Every response now carries `Connection: close`. A kept-alive
    // connection lingers briefly so a request already on its way is answered rather
    // than cut off (the keep-alive race), then closes if idle; one that has not yet
    // sent its first request gets it answered, so a probe or a late client is never
    // closed unanswered.
    if served.load(std::sync::atomic::Ordering::Relaxed) {
        let linger = Duration::from_millis((timing.shutdown_grace_ms / 4).min(1000));
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = tokio::time::sleep(linger) => {}
        }
        conn.as_mut().graceful_shutdown();
    }
    let _ = tokio::time::timeout(grace, conn).await;
}

/// Upkeep tasks: history sweeping, the memory-budget evictor, metrics export, and
/// giving freed heap back once connection churn settles (`crate::heap`).
fn spawn_background(node: Arc<Node>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let exporter = crate::stats::Exporter::new(&node.config.node_id);
        let mut trim_policy = crate::heap::TrimPolicy::default();
        let trimmer = crate::heap::Trimmer::default();
        let idle_ttl = Duration::from_secs(node.config.history.topic_idle_ttl_s);
        let mut sweep =
            tokio::time::interval(Duration::from_millis(node.config.timing.sweep_interval_ms));
        let mut export = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = sweep.tick() => {
                    let forgotten = node.registry.sweep(idle_ttl);
                    if let Some(relay) = node.relay.get() {
                        relay.unfollow_all(forgotten);
                    }
                    node.conns.sweep();
                }
                _ = node.registry.budget.over.notified() => node.registry.enforce_budget(),
                _ = export.tick() => {
                    exporter.export(&node);
                    crate::stats::prometheus().run_upkeep();
                    if trim_policy.tick(node.stats.open_connections()) {
                        trimmer.start();
                    }
                }
            }
        }
    })
}
