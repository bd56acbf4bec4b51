//! `POST /v1/publish/stream`: an ordered streaming publish for backends.
//!
//! The request body is NDJSON, one event per line:
//! `{"topic":"t","data":{…},"type":"x","idempotency_key":"k"}` (`type` and
//! `idempotency_key` optional). The response is NDJSON too, one acknowledgement per
//! line *in the same order*, written as soon as each event is sequenced:
//! `{"seq":1,"topic":"t","epoch":"…","offset":42}` (with `"duplicate":true` for a
//! replayed idempotency key) or `{"seq":2,"error":{"code":403,"message":"…"}}`.
//! `seq` counts request lines from 1. The producer pays no round trip per event: it
//! keeps writing while acknowledgements come back, and the connection stays open for as
//! long as it keeps publishing.
//!
//! The same rules as single publishes: each line is checked like a
//! `POST /v1/topics/{t}/events` body (topic, permissions, size, JSON depth, the
//! idempotency window, `422` for a reused key with other data). A bad line is answered
//! with its error and the stream goes on; a line longer than the limit ends the stream
//! after its error (there is no telling where the next line starts). Events of one
//! stream are sequenced in line order (each is started before the next line is read,
//! so forwarded ones leave on their owner's link in order), with at most
//! [`MAX_IN_FLIGHT`] unacknowledged at once: past that the node stops reading the body,
//! and TCP flow control slows the producer down.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::cluster::relay::Ticket;
use crate::error::ApiError;
use crate::input::{event_kind, raw_data};
use crate::node::Node;
use crate::session::event::put_u64;
use crate::transport::http::write_publish_fields;

/// Events started and not yet acknowledged, per stream.
pub const MAX_IN_FLIGHT: usize = 256;
/// Acknowledgement lines buffered towards a slow reader before the stream waits.
const ACKS_BUFFERED: usize = 64;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line<'a> {
    #[serde(borrow)]
    topic: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

/// What one request line became.
enum Started {
    Ticket { topic: String, ticket: Ticket },
    Refused(ApiError),
}

/// The route. `check` decides who may publish to a topic (the caller was resolved at
/// the edge); it runs for every line.
pub async fn publish_stream(
    node: Arc<Node>,
    headers: HeaderMap,
    body: Body,
    check: impl Fn(&Node, &str) -> Result<(), ApiError> + Send + Sync + 'static,
) -> Result<Response, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.trim().starts_with("application/x-ndjson") {
        return Err(ApiError::UnsupportedMediaType(
            "a publish stream is application/x-ndjson".into(),
        ));
    }
    let (tx, rx) = mpsc::channel::<Bytes>(ACKS_BUFFERED);
    let max_line = node.config.limits.max_message_bytes + 4096;
    tokio::spawn(run(node, body, tx, max_line, check));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
    });
    let mut resp = Body::from_stream(stream).into_response();
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(resp)
}

/// An acknowledgement line on its way: resolves when its event is sequenced.
type Ack = std::pin::Pin<Box<dyn std::future::Future<Output = Bytes> + Send>>;

async fn run(
    node: Arc<Node>,
    body: Body,
    tx: mpsc::Sender<Bytes>,
    max_line: usize,
    check: impl Fn(&Node, &str) -> Result<(), ApiError>,
) {
    let mut body = body.into_data_stream();
    let mut buf = BytesMut::new();
    let mut pending: VecDeque<Ack> = VecDeque::new();
    let mut seq = 0u64;
    let mut ended = false;
    // How much of `buf` is known to hold no newline: a long line arriving in small
    // chunks is searched once, not once per chunk.
    let mut scanned = 0usize;
    loop {
        // Every complete line is started (in order) before anything is awaited.
        while pending.len() < MAX_IN_FLIGHT {
            let Some(line) = next_line(&mut buf, &mut scanned) else {
                break;
            };
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            seq += 1;
            pending.push_back(ack(node.clone(), seq, start(&node, &line, &check)));
        }
        if !ended && buf.len() > max_line {
            seq += 1;
            let e = ApiError::TooLarge(format!(
                "line exceeds {max_line} bytes; the stream ends here"
            ));
            pending.push_back(ack(node.clone(), seq, Started::Refused(e)));
            buf.clear();
            scanned = 0;
            ended = true;
        }
        if ended && pending.len() < MAX_IN_FLIGHT && !buf.is_empty() {
            // The body ended without a final newline: the last line still counts.
            let line = std::mem::take(&mut buf);
            scanned = 0;
            if !line.iter().all(u8::is_ascii_whitespace) {
                seq += 1;
                pending.push_back(ack(node.clone(), seq, start(&node, &line, &check)));
            }
        }
        let full = pending.len() >= MAX_IN_FLIGHT;
        let Some(front) = pending.front_mut() else {
            if ended {
                return;
            }
            match body.next().await {
                Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                Some(Err(_)) | None => ended = true,
            }
            continue;
        };
        if ended || full {
            let line = front.await;
            pending.pop_front();
            if tx.send(line).await.is_err() {
                return;
            }
            continue;
        }
        // Whichever comes first: the oldest event's acknowledgement or more input.
        tokio::select! {
            biased;
            line = front => {
                pending.pop_front();
                if tx.send(line).await.is_err() {
                    return;
                }
            }
            chunk = body.next() => match chunk {
                Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                Some(Err(_)) | None => ended = true,
            },
        }
    }
}

fn ack(node: Arc<Node>, seq: u64, started: Started) -> Ack {
    Box::pin(async move {
        match started {
            Started::Ticket { topic, ticket } => {
                ack_line(seq, &topic, node.finish_publish(ticket).await)
            }
            Started::Refused(e) => error_line(seq, &e),
        }
    })
}

/// Takes one `\n`-terminated line off the front of `buf`, searching only past
/// `scanned` (the bytes already known to hold none).
fn next_line(buf: &mut BytesMut, scanned: &mut usize) -> Option<BytesMut> {
    let Some(at) = buf[*scanned..].iter().position(|&b| b == b'\n') else {
        *scanned = buf.len();
        return None;
    };
    let at = *scanned + at;
    *scanned = 0;
    let mut line = buf.split_to(at + 1);
    line.truncate(at);
    Some(line)
}

fn start(
    node: &Node,
    line: &[u8],
    check: &impl Fn(&Node, &str) -> Result<(), ApiError>,
) -> Started {
    match prepare(node, line, check) {
        Ok((topic, data, kind, key)) => {
            let ticket = node.start_publish(&topic, data, kind, key.as_deref());
            Started::Ticket { topic, ticket }
        }
        Err(e) => Started::Refused(e),
    }
}

type Prepared = (String, Bytes, Option<Arc<str>>, Option<String>);

fn prepare(
    node: &Node,
    line: &[u8],
    check: &impl Fn(&Node, &str) -> Result<(), ApiError>,
) -> Result<Prepared, ApiError> {
    let limits = &node.config.limits;
    let l: Line<'_> =
        serde_json::from_slice(line).map_err(|e| ApiError::bad(format!("invalid line: {e}")))?;
    crate::input::check_topic(&l.topic)?;
    if let Some(k) = &l.idempotency_key {
        if k.is_empty() || k.len() > 255 || !k.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ApiError::bad(
                "idempotency_key must be 1-255 visible ASCII characters",
            ));
        }
    }
    let kind = event_kind(l.kind.as_deref())?;
    let data = raw_data(l.data, limits)?;
    check(node, &l.topic)?;
    Ok((l.topic.into_owned(), data, kind, l.idempotency_key))
}

fn ack_line(seq: u64, topic: &str, result: Result<crate::topic::Published, ApiError>) -> Bytes {
    match result {
        Ok(p) if p.conflict => error_line(
            seq,
            &ApiError::Unprocessable("this idempotency_key was used with a different body".into()),
        ),
        Ok(p) => {
            let mut out = BytesMut::with_capacity(96 + topic.len());
            out.extend_from_slice(b"{\"seq\":");
            put_u64(&mut out, seq);
            out.extend_from_slice(b",");
            write_publish_fields(&mut out, topic, &p.epoch, p.offset);
            if p.duplicate {
                out.extend_from_slice(b",\"duplicate\":true");
            }
            out.extend_from_slice(b"}\n");
            out.freeze()
        }
        Err(e) => error_line(seq, &e),
    }
}

fn error_line(seq: u64, e: &ApiError) -> Bytes {
    let body = serde_json::json!({ "seq": seq, "error": e.detail() });
    let mut s = body.to_string();
    s.push('\n');
    Bytes::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_on_newlines_and_keep_partial_tails() {
        let mut buf = BytesMut::from(&b"{\"a\":1}\n{\"b\":2}\n{\"c\""[..]);
        let mut scanned = 0;
        assert_eq!(
            &next_line(&mut buf, &mut scanned).unwrap()[..],
            b"{\"a\":1}"
        );
        assert_eq!(
            &next_line(&mut buf, &mut scanned).unwrap()[..],
            b"{\"b\":2}"
        );
        assert!(
            next_line(&mut buf, &mut scanned).is_none(),
            "an unfinished line waits"
        );
        assert_eq!(&buf[..], b"{\"c\"");
        assert_eq!(scanned, 4, "what was searched is not searched again");
        buf.extend_from_slice(b":3}\n");
        assert_eq!(
            &next_line(&mut buf, &mut scanned).unwrap()[..],
            b"{\"c\":3}"
        );
        assert_eq!(scanned, 0);
    }

    #[test]
    fn an_error_line_names_its_seq_and_code() {
        let line = error_line(7, &ApiError::Forbidden("no".into()));
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["seq"], 7);
        assert_eq!(v["error"]["code"], 403);
        assert!(line.ends_with(b"\n"));
    }
}
