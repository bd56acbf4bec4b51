//! Streaming HTTP watches: SSE for one topic, SSE for several topics, and NDJSON.
//!
//! A watch is a session whose writer is the response body: the body stream pulls
//! batches from the session's [`Outbox`] and turns them into one chunk each. Dropping
//! the body (client gone) unsubscribes everything.
//!
//! - One-topic SSE: `id: epoch:offset`, so `Last-Event-ID` resumes it. A cursor that
//!   is gone gets `event: reset` (its `id:` the current cursor) and the stream ends; the
//!   browser reconnects from the new id, after the client re-read state.
//! - Multi-topic SSE: `data` is the envelope and every `id:` is the [`MultiCursor`] of
//!   all topics, so one `Last-Event-ID` resumes them all. A gone cursor for one topic
//!   gets an in-stream `event: reset` for that topic (the id moves it to the current
//!   cursor) and the other topics go on.
//! - NDJSON: one envelope per line; a gone cursor is answered `410` before streaming.
//! - `: ping` comments (NDJSON: empty lines) keep proxies from timing out; SSE watchers
//!   also get `event: bookmark` with their cursor so an idle watcher's position stays
//!   current.
//! - The caller's token bounds the stream: at its `exp` the stream sends
//!   `event: disconnect` with code 4009 and ends (the client reconnects with a fresh
//!   token and its last id, nothing lost); a revoked token ends it with code 4001.
//! - Slow consumer under `disconnect`: an `event: disconnect` with code 4008 and the
//!   stream ends; the client resumes from its last id. Shutdown: `event: disconnect`
//!   with code 4000 and a `retry:` of `after_ms`, at a jittered moment in the grace.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::watch;
use tokio::time::{interval_at, Instant, Interval, MissedTickBehavior};
use weft_proto::MultiCursor;

use crate::auth::{Caller, UserGuard};
use crate::error::ApiError;
use crate::node::Node;
use crate::session::event::put_u64;
use crate::session::outbox::{CloseReason, Entry, Frame, Outbox};
use crate::stats::Transport;
use crate::topic::{CursorProblem, Subscriber, Topic};
use crate::transport::respond::problem_error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Sse,
    MultiSse,
    Ndjson,
}

/// Largest chunk one body poll produces.
const MAX_CHUNK: usize = 64 * 1024;

struct Watch {
    node: Arc<Node>,
    caller: Caller,
    /// When the caller's token expires (never for anonymous callers and API keys).
    expires_at: Option<Instant>,
    revoked: watch::Receiver<u64>,
    _user: Option<UserGuard>,
    user: Option<Arc<str>>,
    id: u64,
    format: Format,
    outbox: Arc<Outbox>,
    topics: Vec<Arc<Topic>>,
    /// This watcher's position per topic, advanced as frames are written.
    cursors: Vec<(Arc<str>, Arc<str>, u64)>,
    batch: Vec<Entry>,
    keepalive: Interval,
    bookmark: Option<Interval>,
    shutdown: watch::Receiver<bool>,
    close_at: Option<Instant>,
    finished: bool,
    first: Option<Bytes>,
}

fn transport(format: Format) -> Transport {
    match format {
        Format::Sse | Format::MultiSse => Transport::Sse,
        Format::Ndjson => Transport::Ndjson,
    }
}

fn ticker(period_ms: u64) -> Interval {
    let period = Duration::from_millis(period_ms);
    let mut i = interval_at(Instant::now() + period, period);
    i.set_missed_tick_behavior(MissedTickBehavior::Delay);
    i
}

/// Subscribes a new watch to `topics` (resuming from `cursors`) and returns the
/// streaming response.
pub async fn open(
    node: Arc<Node>,
    caller: Caller,
    format: Format,
    topics: Vec<String>,
    cursors: MultiCursor,
) -> Result<Response, ApiError> {
    node.admit_session()?;
    let user_guard = node.auth.admit_user(&caller)?;
    let timing = &node.config.timing;
    let id = node.next_session_id();
    let client = node.client_id(id);
    let budget = node.config.limits.outbound_queue_bytes;
    let mut w = Watch {
        expires_at: caller.expires().map(instant_of),
        revoked: node.auth.session_notices(),
        _user: user_guard,
        user: caller.user(),
        caller,
        id,
        format,
        outbox: Arc::new(Outbox::new(budget)),
        topics: Vec::with_capacity(topics.len()),
        cursors: Vec::with_capacity(topics.len()),
        batch: Vec::new(),
        keepalive: ticker(timing.sse_keepalive_ms),
        bookmark: (format != Format::Ndjson).then(|| ticker(timing.bookmark_interval_ms)),
        shutdown: node.shutdown_signal(),
        close_at: None,
        finished: false,
        first: None,
        node: node.clone(),
    };
    node.stats.connection(transport(format)).up();
    for name in topics {
        node.ready_topic(&name, cursors.get(&name)).await?;
        let since = cursors.get(&name);
        let mut snapshot = None;
        let subscribed = node.registry.with_topic(&name, |t| {
            let sub = Subscriber {
                outbox: w.outbox.clone(),
                client: client.clone(),
                user: w.user.clone(),
                wants_presence: false,
            };
            let outbox = &w.outbox;
            let r = t.subscribe(id, sub, since, false, budget, |snap| {
                if snap.recovered != Some(false) {
                    for ev in &snap.events {
                        outbox.push_snapshot(Frame::Event(ev.clone()));
                    }
                }
                snapshot = Some((snap.epoch.clone(), snap.offset, snap.recovered));
            })?;
            Ok(r.map(|()| t.clone()))
        })?;
        let topic = subscribed.map_err(problem_error)?;
        node.stats.subscriptions.up();
        w.topics.push(topic.clone());
        let (epoch, offset, recovered) = snapshot.expect("subscribe ran its snapshot callback");
        let start = match (recovered, since) {
            (Some(true), Some(c)) => c.offset,
            _ => offset,
        };
        w.cursors.push((topic.name.clone(), epoch.clone(), start));
        if recovered == Some(false) {
            let current = weft_proto::Cursor::new(&*epoch, offset);
            match format {
                Format::Ndjson => return Err(problem_error(CursorProblem::Gone { current })),
                Format::Sse => {
                    let mut out = BytesMut::new();
                    w.write_reset(&mut out, &topic.name, &epoch, offset);
                    w.finished = true;
                    w.first = Some(out.freeze());
                }
                Format::MultiSse => w.outbox.push_snapshot(Frame::Reset {
                    topic: topic.name.clone(),
                    epoch,
                    offset,
                }),
            }
        }
    }
    if *w.shutdown.borrow() {
        w.close_at = Some(node.close_deadline().into());
    }
    if w.first.is_none() {
        // A first chunk flushes the headers at once, so clients see the stream open.
        w.first = Some(match format {
            Format::Ndjson => Bytes::from_static(b"\n"),
            _ => Bytes::from_static(b"retry: 1000\n\n"),
        });
    }
    let content_type = match format {
        Format::Ndjson => "application/x-ndjson",
        _ => "text/event-stream",
    };
    let body = Body::from_stream(futures_util::stream::unfold(w, |mut w| async move {
        w.next_chunk().await.map(|b| (Ok::<_, Infallible>(b), w))
    }));
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        body,
    )
        .into_response())
}

/// The tokio instant of a wall-clock time (now, if it has passed). A time too far
/// ahead for the clock (a token's `exp` may be anything) is capped at a year.
pub fn instant_of(t: std::time::SystemTime) -> Instant {
    const FAR: Duration = Duration::from_secs(365 * 24 * 3600);
    let left = t
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default()
        .min(FAR);
    Instant::now() + left
}

async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn tick_opt(i: &mut Option<Interval>) {
    match i {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

impl Watch {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        if self.finished {
            return None;
        }
        loop {
            tokio::select! {
                biased;
                _ = sleep_opt(self.close_at) => {
                    self.finished = true;
                    let after = self.node.reconnect_after_ms();
                    return Some(self.disconnect(weft_proto::close::RECONNECT, "shutdown", after));
                }
                _ = sleep_opt(self.expires_at) => {
                    self.finished = true;
                    return Some(self.disconnect(weft_proto::close::TOKEN_EXPIRED, "token expired", 0));
                }
                r = self.revoked.changed() => {
                    if r.is_ok() && !self.node.auth.still_valid(&self.caller) {
                        self.finished = true;
                        return Some(self.disconnect(weft_proto::close::UNAUTHORIZED, "token revoked", 0));
                    }
                }
                r = self.outbox.next_batch(&mut self.batch, MAX_CHUNK) => match r {
                    Ok(()) => return Some(self.encode_batch()),
                    Err(CloseReason::SlowConsumer) => {
                        self.finished = true;
                        return Some(self.disconnect(weft_proto::close::SLOW_CONSUMER, "slow consumer", 0));
                    }
                    Err(CloseReason::Gone) => return None,
                },
                _ = self.keepalive.tick() => {
                    return Some(Bytes::from_static(match self.format {
                        Format::Ndjson => b"\n",
                        _ => b": ping\n\n",
                    }));
                }
                _ = tick_opt(&mut self.bookmark) => return Some(self.bookmark_frame()),
                r = self.shutdown.changed(), if self.close_at.is_none() => {
                    if r.is_err() || *self.shutdown.borrow() {
                        self.close_at = Some(self.node.close_deadline().into());
                    }
                }
            }
        }
    }

    fn cursor_mut(&mut self, topic: &str) -> Option<&mut (Arc<str>, Arc<str>, u64)> {
        self.cursors.iter_mut().find(|(t, _, _)| &**t == topic)
    }

    fn write_multi_id(&self, out: &mut BytesMut) {
        out.put_slice(b"id: ");
        for (i, (topic, epoch, offset)) in self.cursors.iter().enumerate() {
            if i > 0 {
                out.put_u8(b',');
            }
            out.put_slice(topic.as_bytes());
            out.put_u8(b'=');
            out.put_slice(epoch.as_bytes());
            out.put_u8(b':');
            put_u64(out, *offset);
        }
        out.put_u8(b'\n');
    }

    fn encode_batch(&mut self) -> Bytes {
        let mut batch = std::mem::take(&mut self.batch);
        let mut events = 0u64;
        if let Some(Frame::Event(ev)) = batch.first().map(|e| &e.frame) {
            self.node
                .stats
                .delivery_latency
                .record(ev.sequenced_at.elapsed().as_secs_f64());
        }
        // The common case — one event, nothing skipped, one topic — shares the bytes.
        if batch.len() == 1 && batch[0].skipped_from == 0 && self.format != Format::MultiSse {
            if let Frame::Event(ev) = &batch[0].frame {
                if let Some(c) = self.cursor_mut(&ev.topic) {
                    c.2 = ev.offset;
                }
                self.node.stats.delivered.inc();
                let out = match self.format {
                    Format::Ndjson => ev.ndjson_line().clone(),
                    _ => ev.sse_frame().clone(),
                };
                batch.clear();
                self.batch = batch;
                return out;
            }
        }
        let mut out = BytesMut::with_capacity(MAX_CHUNK.min(batch.len() * 256));
        for entry in batch.drain(..) {
            match entry.frame {
                Frame::Event(ev) => {
                    events += 1;
                    if entry.skipped_from > 0 {
                        self.write_skipped(
                            &mut out,
                            &ev.topic,
                            &ev.epoch,
                            entry.skipped_from,
                            ev.offset - 1,
                        );
                    }
                    if let Some(c) = self.cursor_mut(&ev.topic) {
                        c.1 = ev.epoch.clone();
                        c.2 = ev.offset;
                    }
                    match self.format {
                        Format::Sse => out.put_slice(ev.sse_frame()),
                        Format::Ndjson => out.put_slice(ev.ndjson_line()),
                        Format::MultiSse => {
                            self.write_multi_id(&mut out);
                            out.put_slice(ev.multi_sse_frame());
                        }
                    }
                }
                Frame::Control(bytes) => out.put_slice(&bytes),
                Frame::Reset {
                    topic,
                    epoch,
                    offset,
                } => self.write_reset(&mut out, &topic, &epoch, offset),
            }
        }
        self.batch = batch;
        self.node.stats.delivered.add(events);
        out.freeze()
    }

    fn write_reset(&mut self, out: &mut BytesMut, topic: &Arc<str>, epoch: &Arc<str>, offset: u64) {
        if let Some(c) = self.cursor_mut(topic) {
            c.1 = epoch.clone();
            c.2 = offset;
        }
        let data = serde_json::json!({ "topic": &**topic, "epoch": &**epoch, "offset": offset });
        match self.format {
            Format::Ndjson => {
                let line = serde_json::json!({ "topic": &**topic, "reset": { "epoch": &**epoch, "offset": offset } });
                out.put_slice(line.to_string().as_bytes());
                out.put_u8(b'\n');
            }
            Format::Sse => {
                out.put_slice(
                    format!("id: {epoch}:{offset}\nevent: reset\ndata: {data}\n\n").as_bytes(),
                );
            }
            Format::MultiSse => {
                self.write_multi_id(out);
                out.put_slice(format!("event: reset\ndata: {data}\n\n").as_bytes());
            }
        }
    }

    fn write_skipped(&self, out: &mut BytesMut, topic: &str, epoch: &str, from: u64, to: u64) {
        let data = serde_json::json!({ "topic": topic, "epoch": epoch, "from": from, "to": to });
        match self.format {
            Format::Ndjson => {
                let line =
                    serde_json::json!({ "topic": topic, "skipped": { "from": from, "to": to } });
                out.put_slice(line.to_string().as_bytes());
                out.put_u8(b'\n');
            }
            _ => out.put_slice(format!("event: skipped\ndata: {data}\n\n").as_bytes()),
        }
    }

    fn bookmark_frame(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(128);
        match self.format {
            Format::MultiSse => self.write_multi_id(&mut out),
            _ => {
                if let Some((_, epoch, offset)) = self.cursors.first() {
                    out.put_slice(b"id: ");
                    out.put_slice(epoch.as_bytes());
                    out.put_u8(b':');
                    put_u64(&mut out, *offset);
                    out.put_u8(b'\n');
                }
            }
        }
        let id_line = std::str::from_utf8(&out)
            .unwrap_or("")
            .trim_start_matches("id: ")
            .trim_end()
            .to_owned();
        out.put_slice(b"event: bookmark\ndata: ");
        out.put_slice(
            serde_json::json!({ "cursor": id_line })
                .to_string()
                .as_bytes(),
        );
        out.put_slice(b"\n\n");
        out.freeze()
    }

    fn disconnect(&self, code: u16, reason: &str, after_ms: u64) -> Bytes {
        let push = weft_proto::DisconnectPush {
            code,
            reason: reason.into(),
            reconnect: true,
            after_ms,
        };
        let json = serde_json::to_string(&push).expect("serialises");
        Bytes::from(match self.format {
            Format::Ndjson => format!("{{\"disconnect\":{json}}}\n"),
            _ => format!(
                "retry: {}\nevent: disconnect\ndata: {json}\n\n",
                after_ms.max(1)
            ),
        })
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        for t in &self.topics {
            t.unsubscribe(self.id);
            self.node.stats.subscriptions.down();
        }
        self.node.stats.session_queue_peak(self.outbox.peak_bytes());
        self.outbox.close();
        self.node.stats.connection(transport(self.format)).down();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_far_future_expiry_does_not_overflow_the_clock() {
        let far = std::time::UNIX_EPOCH + Duration::from_secs(u32::MAX as u64 * 1000);
        let at = instant_of(far);
        assert!(at > Instant::now() + Duration::from_secs(364 * 24 * 3600));
        let past = std::time::UNIX_EPOCH;
        assert!(instant_of(past) <= Instant::now());
    }
}
