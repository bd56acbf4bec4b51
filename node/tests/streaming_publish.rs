//! `POST /v1/publish/stream`: a backend writes NDJSON events on one long request and
//! reads one acknowledgement per event back while it keeps writing — no round trip
//! per event, the same order and idempotency rules as single publishes. Real node,
//! real sockets, reqwest with a streaming body.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use weft_testkit::inproc::TestNode;
use weft_testkit::ws::{subscribe_cmd, WsClient};

const WITHIN: Duration = Duration::from_secs(10);

/// A stream in progress: lines go in on `tx`, acknowledgement lines come out of `acks`.
struct PublishStream {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    acks: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<Bytes>> + Send>>,
    buf: Vec<u8>,
}

impl PublishStream {
    async fn open(node: &TestNode) -> Self {
        let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
        let body = reqwest::Body::wrap_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
        let resp = tokio::time::timeout(
            WITHIN,
            reqwest::Client::new()
                .post(node.url("/v1/publish/stream"))
                .header("content-type", "application/x-ndjson")
                .body(body)
                .send(),
        );
        // The response head only comes once the node has the request: send a first
        // blank line so the request is under way, then wait for the head.
        tx.send(Ok(Bytes::from_static(b"\n"))).await.unwrap();
        let resp = resp.await.expect("response head in time").unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-type"].to_str().unwrap(),
            "application/x-ndjson"
        );
        Self {
            tx,
            acks: Box::pin(resp.bytes_stream()),
            buf: Vec::new(),
        }
    }

    async fn send(&self, line: &str) {
        self.tx
            .send(Ok(Bytes::from(format!("{line}\n"))))
            .await
            .unwrap();
    }

    /// The next acknowledgement line, or `None` once the response ended.
    async fn ack(&mut self) -> Option<Value> {
        loop {
            if let Some(at) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=at).collect();
                return Some(serde_json::from_slice(&line[..at]).expect("an ack is JSON"));
            }
            match tokio::time::timeout(WITHIN, self.acks.next())
                .await
                .expect("an ack in time")
            {
                Some(chunk) => self.buf.extend_from_slice(&chunk.unwrap()),
                None => return None,
            }
        }
    }

    async fn end(self) -> Vec<Value> {
        let Self { tx, acks, buf } = self;
        drop(tx);
        let mut rest = PublishStream {
            tx: mpsc::channel(1).0,
            acks,
            buf,
        };
        let mut out = Vec::new();
        while let Some(a) = rest.ack().await {
            out.push(a);
        }
        out
    }
}

#[tokio::test]
async fn each_event_is_acknowledged_while_the_stream_stays_open() {
    let node = TestNode::start().await;
    let mut s = PublishStream::open(&node).await;
    // One line at a time, each acknowledged before the next is written: the request
    // body is still open, so the acks cannot be waiting for it to end.
    for k in 1..=5u64 {
        s.send(&format!(r#"{{"topic":"ticks.a","data":{{"k":{k}}}}}"#))
            .await;
        let ack = s.ack().await.expect("an ack");
        assert_eq!(ack["seq"], k);
        assert_eq!(ack["topic"], "ticks.a");
        assert_eq!(ack["offset"], k, "offsets follow line order");
    }
    assert!(s.end().await.is_empty());
}

#[tokio::test]
async fn a_pipelined_stream_keeps_line_order_and_every_event_is_delivered() {
    let node = TestNode::start().await;
    let mut ws = WsClient::connect(node.addr).await;
    ws.request(subscribe_cmd("ticks.b", None)).await;
    let s = PublishStream::open(&node).await;
    let n = 1000u64;
    // Written without waiting for any ack; more than the 256 the node keeps in flight.
    let datas: Vec<String> = (1..=n)
        .map(|k| format!(r#"{{"k":{k},"s":"caf\u00e9 \"q\" {k}"}}"#))
        .collect();
    for d in &datas {
        s.send(&format!(r#"{{"topic":"ticks.b","data":{d}}}"#))
            .await;
    }
    let acks = s.end().await;
    assert_eq!(acks.len() as u64, n);
    for (i, a) in acks.iter().enumerate() {
        assert_eq!(a["seq"], i as u64 + 1);
        assert_eq!(a["offset"], i as u64 + 1);
    }
    for (k, d) in datas.iter().enumerate() {
        let ev = ws.next_event().await.expect("every event delivered");
        assert_eq!(ev.offset, k as u64 + 1);
        let want: Value = serde_json::from_str(d).unwrap();
        assert_eq!(ev.data, want, "the data as published");
    }
}

#[tokio::test]
async fn a_bad_line_gets_its_error_and_the_stream_goes_on() {
    let node = TestNode::start().await;
    let mut s = PublishStream::open(&node).await;
    s.send(r#"{"topic":"ticks.c","data":1}"#).await;
    s.send("not json").await;
    s.send(r#"{"topic":"bad topic!","data":1}"#).await;
    s.send(r#"{"topic":"ticks.c","data":2,"extra":true}"#).await;
    s.send(r#"{"topic":"ticks.c","data":3}"#).await;
    let acks: Vec<Value> = [
        s.ack().await,
        s.ack().await,
        s.ack().await,
        s.ack().await,
        s.ack().await,
    ]
    .into_iter()
    .map(Option::unwrap)
    .collect();
    assert_eq!(acks[0]["offset"], 1);
    for (i, a) in acks[1..4].iter().enumerate() {
        assert_eq!(a["seq"], i as u64 + 2);
        assert_eq!(a["error"]["code"], 400, "line {}: {a}", i + 2);
    }
    assert_eq!(acks[4]["seq"], 5);
    assert_eq!(acks[4]["offset"], 2, "refused lines take no offset");
    assert_eq!(node.state("ticks.c").await.offset, 2);
}

#[tokio::test]
async fn idempotency_keys_dedupe_and_a_reused_key_with_other_data_is_422() {
    let node = TestNode::start().await;
    let s = PublishStream::open(&node).await;
    s.send(r#"{"topic":"ticks.d","data":{"v":1},"idempotency_key":"k1"}"#)
        .await;
    s.send(r#"{"topic":"ticks.d","data":{"v":1},"idempotency_key":"k1"}"#)
        .await;
    s.send(r#"{"topic":"ticks.d","data":{"v":2},"idempotency_key":"k1"}"#)
        .await;
    s.send(r#"{"topic":"ticks.d","data":{"v":3},"idempotency_key":"k2"}"#)
        .await;
    let acks = s.end().await;
    assert_eq!(acks.len(), 4);
    assert_eq!(acks[0]["offset"], 1);
    assert!(acks[0].get("duplicate").is_none());
    assert_eq!(acks[1]["offset"], 1);
    assert_eq!(acks[1]["duplicate"], true);
    assert_eq!(acks[2]["error"]["code"], 422);
    assert_eq!(acks[3]["offset"], 2);
}

#[tokio::test]
async fn a_line_over_the_limit_ends_the_stream_with_413_and_the_node_serves_on() {
    let node = TestNode::start_with(|c| c.limits.max_message_bytes = 1024).await;
    let s = PublishStream::open(&node).await;
    s.send(r#"{"topic":"ticks.e","data":1}"#).await;
    let huge = format!(
        r#"{{"topic":"ticks.e","data":"{}"}}"#,
        "x".repeat(64 * 1024)
    );
    s.send(&huge).await;
    let acks = s.end().await;
    assert_eq!(acks[0]["offset"], 1);
    assert_eq!(acks.last().unwrap()["error"]["code"], 413);
    // A single publish still works.
    assert_eq!(node.publish("ticks.e", "2").await.offset, 2);
}

#[tokio::test]
async fn a_stream_must_say_it_is_ndjson() {
    let node = TestNode::start().await;
    let resp = reqwest::Client::new()
        .post(node.url("/v1/publish/stream"))
        .header("content-type", "application/json")
        .body(r#"{"topic":"t","data":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
}
