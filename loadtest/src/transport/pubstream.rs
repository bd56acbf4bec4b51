//! `--publish-via stream`: the publisher's events go over a few long-lived
//! `POST /v1/publish/stream` requests instead of one `POST /v1/topics/{t}/events`
//! each — what a backend that must not pay a round trip per event runs.
//!
//! **Links.** A link is one such request: an NDJSON body the harness keeps writing,
//! `{"topic":…,"data":…,"idempotency_key":…}` per line, and an NDJSON answer the node
//! writes as it sequences them, one acknowledgement per line *in line order*
//! (`{"seq":n,"epoch":…,"offset":…}` or `{"seq":n,"error":{"code","message"}}`).
//! Topic `t` always goes over link `t % links`, so one topic's events keep their
//! order; waiting publishes sit in a FIFO and each acknowledgement line goes to the
//! oldest, checked by its `seq`. This is the shape of the NATS publisher's links
//! ([`super::nats`]), so an ordered run with streams compares producer for producer.
//!
//! **Failure.** A link whose answer ends, breaks, or says something out of order is
//! closed: its waiting publishes fail and the publisher retries them on a new link
//! (the same `Idempotency-Key` as the single publish, so a retry of an event the node
//! did sequence is answered `duplicate` and published once).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail};
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use weft_proto::ErrorDetail;

use super::{batch, Links};
use crate::http::{BodySender, Response};
use crate::net::{Net, CONNECT_TIMEOUT};

/// Publish lines written to the request body in one chunk at most.
const MAX_BATCH: usize = 256;
/// Publish requests queued for one link.
const LINK_QUEUE: usize = 1024;
/// Lines written and not yet acknowledged on one link before it is given up as stuck
/// (its waiting publishes then fail and are retried on a new link). The publisher's
/// in-flight window keeps a healthy link far below this.
const MAX_UNACKED: usize = 4 * LINK_QUEUE;
/// The longest acknowledgement line accepted (they are under 200 bytes).
const MAX_ACK_LINE: usize = 64 << 10;

/// What the node answered for one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineAck {
    Published { epoch: String, offset: u64 },
    Refused { code: u16, message: String },
}

/// One acknowledgement line as the node writes it.
#[derive(Debug, Deserialize)]
struct AckLine {
    seq: u64,
    #[serde(default)]
    epoch: Option<String>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    error: Option<ErrorDetail>,
}

impl AckLine {
    fn into_ack(self) -> anyhow::Result<LineAck> {
        match (self.error, self.epoch, self.offset) {
            (Some(e), _, _) => Ok(LineAck::Refused {
                code: e.code,
                message: e.message,
            }),
            (None, Some(epoch), Some(offset)) => Ok(LineAck::Published { epoch, offset }),
            _ => bail!(
                "acknowledgement {} has neither an error nor an epoch and offset",
                self.seq
            ),
        }
    }
}

/// The NDJSON line that publishes `data` (a JSON value) to `topic`.
pub fn line(topic: &str, data: &[u8], idempotency_key: &str) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + topic.len() + idempotency_key.len() + 48);
    out.extend_from_slice(b"{\"topic\":");
    // Serialising a `str` cannot fail.
    serde_json::to_writer(&mut out, topic).expect("a str serialises");
    out.extend_from_slice(b",\"data\":");
    out.extend_from_slice(data);
    out.extend_from_slice(b",\"idempotency_key\":");
    serde_json::to_writer(&mut out, idempotency_key).expect("a str serialises");
    out.extend_from_slice(b"}\n");
    Bytes::from(out)
}

/// Where one line's acknowledgement goes.
type AckTx = oneshot::Sender<anyhow::Result<LineAck>>;
/// Lines written and not yet acknowledged: each line's `seq` and its waiting publish.
type Waiting = VecDeque<(u64, AckTx)>;

/// One publish waiting to be written.
struct LineReq {
    line: Bytes,
    ack: AckTx,
}

/// The publisher's streams; topic `t` always uses link `t % links`.
pub struct StreamLinks {
    net: Arc<Net>,
    links: Links<LineReq>,
}

impl StreamLinks {
    pub fn new(net: Arc<Net>, links: usize) -> Self {
        Self {
            net,
            links: Links::new(links),
        }
    }

    /// Sends `line` (from [`line`]) for topic number `topic` and waits for its
    /// acknowledgement. A broken link is reopened by the next publish.
    pub async fn publish(&self, topic: usize, line: Bytes) -> anyhow::Result<LineAck> {
        let tx = self
            .links
            .sender(topic, |slot| open(&self.net, slot))
            .await?;
        let (ack, acked) = oneshot::channel();
        tx.send(LineReq { line, ack })
            .await
            .map_err(|_| anyhow!("the publish stream closed"))?;
        acked
            .await
            .map_err(|_| anyhow!("the publish stream ended before this event's acknowledgement"))?
    }
}

/// Opens link `slot`: the request is under way and the node answered `200`.
async fn open(net: &Net, slot: usize) -> anyhow::Result<mpsc::Sender<LineReq>> {
    // A blank first line (the node skips it) puts the request on the wire, so the
    // answer's head comes back before the first event.
    let (body, resp) = net
        .http(slot)
        .duplex(
            &net.url("/v1/publish/stream"),
            "application/x-ndjson",
            Bytes::from_static(b"\n"),
            CONNECT_TIMEOUT,
        )
        .await
        .map_err(|e| anyhow!("opening a publish stream: {e}"))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let msg = super::error_message(
            &tokio::time::timeout(Duration::from_secs(5), resp.bytes())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default(),
        );
        bail!("publish stream answered {status}: {msg}");
    }
    let (tx, rx) = mpsc::channel(LINK_QUEUE);
    tokio::spawn(run_link(body, resp, rx));
    Ok(tx)
}

/// Writes queued lines (in batches) and hands each acknowledgement line to the oldest
/// waiting publish. Ends when the exchange fails, says something unexpected, or every
/// sender is gone; the waiting publishes then fail.
async fn run_link(mut body: BodySender, mut resp: Response, mut rx: mpsc::Receiver<LineReq>) {
    let mut waiting = Waiting::new();
    let mut sent = 0u64;
    let mut buf = BytesMut::new();
    loop {
        tokio::select! {
            biased;
            chunk = resp.chunk() => {
                let Some(Ok(chunk)) = chunk else { break };
                buf.extend_from_slice(&chunk);
                if !hand_out(&mut buf, &mut waiting) {
                    break;
                }
            }
            req = rx.recv() => {
                let Some(req) = req else { break };
                let mut chunk = BytesMut::new();
                batch(req, &mut rx, MAX_BATCH, |r| {
                    chunk.extend_from_slice(&r.line);
                    sent += 1;
                    waiting.push_back((sent, r.ack));
                });
                // Awaiting the send stops the reading of acknowledgements only while
                // the body's channel is full, i.e. while the node is not reading lines;
                // each read of the node's makes room again, and what it owes back for a
                // read (a short line per line) stays far under the socket buffers, so
                // the node never waits on us while we wait on it.
                if waiting.len() > MAX_UNACKED || body.send_data(chunk.freeze()).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// Takes every complete acknowledgement line off `buf` and answers the oldest waiting
/// publish with it. `false`: the link is unusable (a line out of order or
/// unreadable, or one too long).
fn hand_out(buf: &mut BytesMut, waiting: &mut Waiting) -> bool {
    while let Some(at) = buf.iter().position(|&b| b == b'\n') {
        let line = buf.split_to(at + 1);
        let parsed: AckLine = match serde_json::from_slice(&line[..at]) {
            Ok(l) => l,
            Err(_) => return false,
        };
        match waiting.front() {
            Some((seq, _)) if *seq == parsed.seq => {}
            _ => return false,
        }
        let (_, ack) = waiting.pop_front().expect("checked above");
        let _ = ack.send(parsed.into_ack());
    }
    buf.len() <= MAX_ACK_LINE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_one_json_object_with_the_data_verbatim() {
        let data = br#"{"p":1,"s":2,"t":3,"x":"\u00e9"}"#;
        let l = line("room-\"1\"", data, "run-7");
        assert!(l.ends_with(b"}\n") && !l[..l.len() - 1].contains(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&l).unwrap();
        assert_eq!(v["topic"], "room-\"1\"");
        assert_eq!(v["idempotency_key"], "run-7");
        let raw = std::str::from_utf8(&l).unwrap();
        assert!(
            raw.contains(std::str::from_utf8(data).unwrap()),
            "data is written byte for byte"
        );
    }

    fn waiter(seq: u64) -> ((u64, AckTx), oneshot::Receiver<anyhow::Result<LineAck>>) {
        let (tx, rx) = oneshot::channel();
        ((seq, tx), rx)
    }

    #[test]
    fn acknowledgements_go_to_the_oldest_waiting_publish_and_a_partial_line_waits() {
        let mut waiting = VecDeque::new();
        let (w1, mut r1) = waiter(1);
        let (w2, mut r2) = waiter(2);
        waiting.push_back(w1);
        waiting.push_back(w2);
        let mut buf = BytesMut::from(
            &b"{\"seq\":1,\"topic\":\"a\",\"epoch\":\"e\",\"offset\":4}\n{\"seq\":2,\"err"[..],
        );
        assert!(hand_out(&mut buf, &mut waiting));
        assert_eq!(
            r1.try_recv().unwrap().unwrap(),
            LineAck::Published {
                epoch: "e".into(),
                offset: 4
            }
        );
        assert!(
            r2.try_recv().is_err(),
            "the second line is not complete yet"
        );
        buf.extend_from_slice(b"or\":{\"code\":429,\"message\":\"slow down\"}}\n");
        assert!(hand_out(&mut buf, &mut waiting));
        assert_eq!(
            r2.try_recv().unwrap().unwrap(),
            LineAck::Refused {
                code: 429,
                message: "slow down".into()
            }
        );
        assert!(waiting.is_empty() && buf.is_empty());
    }

    #[test]
    fn an_acknowledgement_out_of_order_closes_the_link() {
        let mut waiting = VecDeque::new();
        let (w1, _r1) = waiter(1);
        waiting.push_back(w1);
        let mut buf = BytesMut::from(&b"{\"seq\":2,\"epoch\":\"e\",\"offset\":4}\n"[..]);
        assert!(!hand_out(&mut buf, &mut waiting));
        let mut buf = BytesMut::from(&b"not json\n"[..]);
        assert!(!hand_out(&mut buf, &mut waiting));
        let mut buf = BytesMut::from(&vec![b'x'; MAX_ACK_LINE + 1][..]);
        assert!(
            !hand_out(&mut buf, &mut waiting),
            "an endless line is not buffered"
        );
    }
}
