//! One subscriber to one topic over any of the node's transports (WebSocket, SSE,
//! NDJSON streaming, long-poll), read as a sequence of [`Delivered`] events, so that a
//! scenario is written once and run over every transport ([`ALL_KINDS`]).

use std::collections::VecDeque;

use weft_proto::ServerMessage;

use crate::inproc::TestNode;
use crate::sse::HttpStream;
use crate::ws::{subscribe_cmd, WsClient};
use crate::Delivered;

/// The transports a scenario runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ws,
    Sse,
    Ndjson,
    LongPoll,
}

pub const ALL_KINDS: [Kind; 4] = [Kind::Ws, Kind::Sse, Kind::Ndjson, Kind::LongPoll];

/// One subscriber to one topic over any transport, read as a sequence of events.
pub enum Sub {
    Ws(Box<WsClient>),
    Stream(HttpStream, Kind),
    LongPoll {
        http: reqwest::Client,
        base: String,
        topic: String,
        cursor: String,
        buf: VecDeque<Delivered>,
    },
}

fn cursor_parts(id: &str) -> (String, u64) {
    let (e, o) = id.rsplit_once(':').unwrap();
    (e.to_owned(), o.parse().unwrap())
}

impl Sub {
    /// Subscribes to `topic` from cursor `since` and waits until the subscription is
    /// established (reply, first chunk), so events published after this are live.
    pub async fn open(node: &TestNode, kind: Kind, topic: &str, since: &str) -> Self {
        match kind {
            Kind::Ws => {
                let mut c = WsClient::connect(node.addr).await;
                let reply = c.request(subscribe_cmd(topic, Some(since))).await;
                assert!(reply.result.is_some(), "subscribe failed: {reply:?}");
                c.queue(Self::events_of_reply(topic, &reply));
                Sub::Ws(Box::new(c))
            }
            Kind::Sse => {
                let url = node.url(&format!(
                    "/v1/topics/{topic}/events?watch=true&since={since}"
                ));
                let s = HttpStream::open(&node.http, &url, &[]).await;
                assert_eq!(s.status, 200);
                Sub::Stream(s, kind)
            }
            Kind::Ndjson => {
                let url = node.url(&format!("/v1/topics/{topic}/events?since={since}"));
                let s =
                    HttpStream::open(&node.http, &url, &[("accept", "application/x-ndjson")]).await;
                assert_eq!(s.status, 200);
                Sub::Stream(s, kind)
            }
            Kind::LongPoll => Sub::LongPoll {
                http: node.http.clone(),
                base: node.url(&format!("/v1/topics/{topic}/events")),
                topic: topic.into(),
                cursor: since.into(),
                buf: VecDeque::new(),
            },
        }
    }

    /// A subscribe reply's recovered events, as pushes, so they read like live ones.
    fn events_of_reply(topic: &str, reply: &ServerMessage) -> Vec<ServerMessage> {
        let result: weft_proto::SubscribeResult =
            serde_json::from_str(reply.result.as_ref().unwrap().get()).unwrap();
        result
            .events
            .into_iter()
            .map(|ev| ServerMessage {
                id: None,
                result: None,
                error: None,
                push: Some(weft_proto::Push {
                    topic: Some(topic.into()),
                    event: Some(ev),
                    ..Default::default()
                }),
            })
            .collect()
    }

    pub async fn next(&mut self) -> Option<Delivered> {
        match self {
            Sub::Ws(c) => c.next_event().await,
            Sub::Stream(s, Kind::Sse) => loop {
                let ev = s.next_sse().await?;
                if ev.event == "message" {
                    let (epoch, offset) =
                        cursor_parts(ev.id.as_deref().expect("SSE event has an id"));
                    return Some(Delivered {
                        topic: String::new(),
                        epoch,
                        offset,
                        data: serde_json::from_str(&ev.data).unwrap(),
                    });
                }
            },
            Sub::Stream(s, _) => loop {
                let v = s.next_ndjson().await?;
                if v.get("offset").is_some() {
                    return Some(Delivered {
                        topic: v["topic"].as_str().unwrap().into(),
                        epoch: v["epoch"].as_str().unwrap().into(),
                        offset: v["offset"].as_u64().unwrap(),
                        data: v["data"].clone(),
                    });
                }
            },
            Sub::LongPoll {
                http,
                base,
                topic,
                cursor,
                buf,
            } => loop {
                if let Some(d) = buf.pop_front() {
                    return Some(d);
                }
                let resp = http
                    .get(format!("{base}?since={cursor}&wait=5"))
                    .send()
                    .await
                    .ok()?;
                assert_eq!(resp.status(), 200, "long-poll failed");
                let page: weft_proto::PollPage =
                    serde_json::from_slice(&resp.bytes().await.ok()?).unwrap();
                let (epoch, _) = cursor_parts(&page.next);
                for ev in page.events {
                    buf.push_back(Delivered {
                        topic: topic.clone(),
                        epoch: epoch.clone(),
                        offset: ev.offset,
                        data: serde_json::from_str(ev.data.get()).unwrap(),
                    });
                }
                *cursor = page.next;
            },
        }
    }

    /// Reads exactly `n` events (panics on a stream end or a timeout).
    pub async fn take(&mut self, n: usize) -> Vec<Delivered> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.next().await {
                Some(d) => out.push(d),
                None => panic!("stream ended after {} of {n} events", out.len()),
            }
        }
        out
    }
}

/// The offsets of the `events` of a history or long-poll page, in order.
pub fn page_offsets(page: &serde_json::Value) -> Vec<u64> {
    page["events"]
        .as_array()
        .unwrap_or_else(|| panic!("a page without events: {page}"))
        .iter()
        .map(|e| e["offset"].as_u64().expect("an event offset"))
        .collect()
}

/// Asserts offsets are exactly `from..from+len` in order (no gap, no duplicate).
pub fn assert_contiguous(events: &[Delivered], from: u64) {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(
            e.offset,
            from + i as u64,
            "event {i}: expected offset {}, got {}",
            from + i as u64,
            e.offset
        );
    }
}
