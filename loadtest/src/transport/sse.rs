//! SSE sessions (DESIGN §3.1).
//!
//! A subscription that has not started reads `GET /v1/topics/{t}` first and watches from
//! that cursor ("GET state then watch since state.offset never misses and never
//! duplicates"). One topic: `GET /v1/topics/{t}/events?watch=true&since=e:o`, whose
//! event ids are `epoch:offset`. Several topics: `GET /v1/events?topic=a&topic=b&watch=true`
//! with `Last-Event-ID: a=e:o,b=e:o` (a `MultiCursor`); its `data` is an envelope.
//! `event: reset` (then the server closes) restarts from the cursor it carries;
//! `event: disconnect` asks for a reconnect after `after_ms`; `410` carries the cursor.

use std::time::Duration;

use hyper::StatusCode;
use tokio::time::timeout;
use weft_proto::{Cursor, DisconnectPush, Envelope, MultiCursor};

use crate::http::HttpError;
use crate::net::CONNECT_TIMEOUT;
use crate::sse::{SseEvent, SseParser};
use crate::stamp::now_us;
use crate::stats::LiveStats;
use crate::subscriber::{connected, stopped, SessionEnd, SessionTimes, Shared, Subscriber};
use crate::transport::control::{Control, Ctl};
use crate::transport::{error_message, gone_cursor, retry_after};

/// Longest SSE line accepted.
const MAX_LINE: usize = 16 << 20;

enum Wake {
    Chunk(Option<Result<bytes::Bytes, HttpError>>),
    Control(Ctl),
}

/// One SSE session, after `start_from_state` (the caller) set where each topic resumes.
pub async fn session(sub: &mut Subscriber, sh: &Shared, when: SessionTimes) -> SessionEnd {
    let SessionTimes { intended, lifetime } = when;
    let multi = sub.topics.len() > 1;
    let client = sh.net.http(sub.id);
    let req = if multi {
        let mut path = String::from("/v1/events?watch=true");
        let mut cursor = MultiCursor::default();
        for (i, &t) in sub.topics.iter().enumerate() {
            path.push_str("&topic=");
            path.push_str(&sh.topics[t]);
            if let Some(c) = sub.tracks[i].cursor() {
                cursor.entries.push((sh.topics[t].clone(), c));
            }
        }
        client
            .get(sh.net.url(&path))
            .header("Last-Event-ID", cursor.to_string())
    } else {
        let topic = &sh.topics[sub.topics[0]];
        let since = sub.tracks[0]
            .cursor()
            .map(|c| format!("&since={c}"))
            .unwrap_or_default();
        client.get(
            sh.net
                .url(&format!("/v1/topics/{topic}/events?watch=true{since}")),
        )
    }
    .header(hyper::header::ACCEPT, "text/event-stream");

    let resp = tokio::select! {
        r = timeout(CONNECT_TIMEOUT, req.send()) => r,
        _ = stopped(&mut sub.stop) => return SessionEnd::Stopped,
    };
    let mut resp = match resp {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            LiveStats::inc(&sh.stats.connect_failures);
            return SessionEnd::Failed(anyhow::Error::new(e).context("SSE request"));
        }
        Err(_) => {
            LiveStats::inc(&sh.stats.connect_failures);
            return SessionEnd::Failed(anyhow::anyhow!("SSE request timed out"));
        }
    };
    let status = resp.status();
    if status != StatusCode::OK {
        LiveStats::inc(&sh.stats.connect_failures);
        let wait = retry_after(resp.headers());
        let body = resp.bytes().await.unwrap_or_default();
        return match status {
            StatusCode::GONE if !multi => match gone_cursor(&body) {
                Some(c) => {
                    sub.on_reset(sh, 0, &c.epoch, c.offset);
                    SessionEnd::Reconnect {
                        after: Duration::ZERO,
                        why: "410 Gone on watch".into(),
                    }
                }
                None => SessionEnd::Failed(anyhow::anyhow!("410 without a cursor")),
            },
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                SessionEnd::Reconnect {
                    after: wait,
                    why: format!("SSE watch answered {status}"),
                }
            }
            _ => SessionEnd::Failed(anyhow::anyhow!(
                "SSE watch answered {status}: {}",
                error_message(&body)
            )),
        };
    }
    let _open = connected(sh, sub.id, intended);

    let mut parser = SseParser::new(MAX_LINE);
    let mut events: Vec<SseEvent> = Vec::new();
    let mut reconnect_after: Option<Duration> = None;
    let mut reset_seen = false;
    let mut control = Control::new(sub, lifetime);
    loop {
        let wake = tokio::select! {
            c = resp.chunk() => Wake::Chunk(c),
            c = control.next_event() => Wake::Control(c),
        };
        let chunk = match wake {
            Wake::Control(Ctl::Stop) => return SessionEnd::Stopped,
            Wake::Control(Ctl::Lifetime) => return SessionEnd::Lifetime,
            Wake::Control(Ctl::Finals) => {
                if sub.caught_up() {
                    return SessionEnd::CaughtUp;
                }
                continue;
            }
            Wake::Chunk(c) => c,
        };
        let chunk = match chunk {
            Some(Ok(c)) => c,
            Some(Err(e)) if reconnect_after.is_none() && !reset_seen => {
                return SessionEnd::Failed(anyhow::Error::new(e).context("SSE read"))
            }
            None if reconnect_after.is_none() && !reset_seen => {
                return SessionEnd::Failed(anyhow::anyhow!("SSE stream ended"))
            }
            _ => {
                return SessionEnd::Reconnect {
                    after: reconnect_after.unwrap_or_default(),
                    why: if reset_seen {
                        "SSE reset".into()
                    } else {
                        "SSE disconnect".into()
                    },
                }
            }
        };
        if let Err(e) = parser.push(&chunk, &mut events) {
            return SessionEnd::Failed(e.into());
        }
        let now = now_us();
        for ev in events.drain(..) {
            match ev.event.as_deref().unwrap_or("message") {
                "bookmark" => {}
                "disconnect" => {
                    let after = serde_json::from_str::<DisconnectPush>(&ev.data)
                        .map(|d| d.after_ms)
                        .unwrap_or(0);
                    reconnect_after = Some(Duration::from_millis(after));
                }
                "reset" => match reset_target(sub, sh, multi, &ev) {
                    Some((i, c)) => {
                        sub.on_reset(sh, i, &c.epoch, c.offset);
                        reset_seen = true;
                    }
                    None => {
                        return SessionEnd::Failed(anyhow::anyhow!(
                            "SSE reset without a usable cursor: {}",
                            ev.data
                        ))
                    }
                },
                _ if multi => match serde_json::from_str::<Envelope>(&ev.data) {
                    Ok(env) => match topic_index(sub, sh, &env.topic) {
                        Some(i) => {
                            sub.on_event(sh, i, Some(&env.epoch), env.offset, env.data.get(), now);
                        }
                        None => sh.errors.add("SSE envelope for a topic not watched"),
                    },
                    Err(e) => sh.errors.add(format!("undecodable SSE envelope: {e}")),
                },
                _ => match ev.id.as_deref().map(str::parse::<Cursor>) {
                    Some(Ok(c)) => {
                        sub.on_event(sh, 0, Some(&c.epoch), c.offset, &ev.data, now);
                    }
                    _ => sh.errors.add("SSE event without an `epoch:offset` id"),
                },
            }
        }
        if sub.caught_up() {
            return SessionEnd::CaughtUp;
        }
    }
}

fn topic_index(sub: &Subscriber, sh: &Shared, topic: &str) -> Option<usize> {
    sub.topics.iter().position(|&t| sh.topics[t] == topic)
}

/// Which subscription a reset is for, and where to continue: the data may be
/// `{"epoch","offset"}` (optionally with `"topic"`), an error body with `cursor`, or
/// only the event id.
fn reset_target(
    sub: &Subscriber,
    sh: &Shared,
    multi: bool,
    ev: &SseEvent,
) -> Option<(usize, Cursor)> {
    let v: serde_json::Value = serde_json::from_str(&ev.data).unwrap_or_default();
    let i = match v.get("topic").and_then(|t| t.as_str()) {
        Some(t) => topic_index(sub, sh, t)?,
        None if !multi => 0,
        None => return None,
    };
    let from_fields = match (
        v.get("epoch").and_then(|e| e.as_str()),
        v.get("offset").and_then(|o| o.as_u64()),
    ) {
        (Some(e), Some(o)) => Some(Cursor::new(e, o)),
        _ => None,
    };
    let from_cursor = || {
        v.get("cursor")
            .or_else(|| v.get("error").and_then(|e| e.get("cursor")))
            .and_then(|c| c.as_str())
            .and_then(|c| c.parse().ok())
    };
    let from_id = || ev.id.as_deref().and_then(|id| id.parse().ok());
    let c = from_fields.or_else(from_cursor).or_else(from_id)?;
    Some((i, c))
}
