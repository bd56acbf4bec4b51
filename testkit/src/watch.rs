//! Cluster readers that judge as they read: a WebSocket subscriber that stamps each
//! event with its topic's epoch and surfaces resets ([`Watcher`]), a multi-topic SSE
//! watch ([`MultiSse`]), and [`Watcher::collect`] / [`MultiSse::collect`], which read
//! until each topic has the events wanted and fail the test on a reset, a close or an
//! event of a topic not watched.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::Value;
use weft_proto::SubscribeResult;

use crate::api::NodeApi;
use crate::sse::HttpStream;
use crate::ws::{subscribe_cmd, WsClient, WsIn};
use crate::Delivered;

/// What a subscriber saw next.
#[derive(Debug, Clone)]
pub enum Seen {
    Event(Delivered),
    /// History lost: the topic continues from `epoch:offset`.
    Reset {
        topic: String,
        epoch: String,
        offset: u64,
    },
    Closed(Option<u16>),
}

impl NodeApi {
    /// A WebSocket session on this node.
    pub async fn watcher(&self) -> Watcher {
        Watcher {
            node: self.name.clone(),
            ws: WsClient::connect(self.addr).await,
            epochs: HashMap::new(),
        }
    }

    /// A multi-topic SSE watch (`GET /v1/events?topic=…&watch=true`) from now on.
    pub async fn multi_sse(&self, topics: &[String]) -> MultiSse {
        let url = self.url(&multi_watch_path(topics));
        let stream = HttpStream::open(&self.http, &url, &[]).await;
        assert_eq!(stream.status, 200, "{}: multi-topic watch", self.name);
        MultiSse {
            node: self.name.clone(),
            stream,
        }
    }
}

/// `/v1/events?topic=a&topic=b&watch=true`.
pub fn multi_watch_path(topics: &[String]) -> String {
    let query = topics
        .iter()
        .map(|t| format!("topic={t}"))
        .collect::<Vec<_>>()
        .join("&");
    format!("/v1/events?{query}&watch=true")
}

/// Events gathered per topic until each topic has as many as wanted; a reset, a close
/// or an event of another topic fails the test.
struct Tally {
    source: String,
    want: BTreeMap<String, usize>,
    got: BTreeMap<String, Vec<Delivered>>,
}

impl Tally {
    fn new(source: String, want: &BTreeMap<String, usize>) -> Self {
        Self {
            source,
            want: want.clone(),
            got: want.keys().map(|t| (t.clone(), Vec::new())).collect(),
        }
    }

    fn done(&self) -> bool {
        self.want.iter().all(|(t, n)| self.got[t].len() >= *n)
    }

    fn progress(&self) -> String {
        self.want
            .iter()
            .filter(|(t, n)| self.got[*t].len() < **n)
            .map(|(t, n)| format!("{t}: {}/{n}", self.got[t].len()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn take(&mut self, seen: Seen) {
        match seen {
            Seen::Event(d) => match self.got.get_mut(&d.topic) {
                Some(list) => list.push(d),
                None => panic!("{}: event of a topic not watched: {d:?}", self.source),
            },
            Seen::Reset {
                topic,
                epoch,
                offset,
            } => panic!(
                "{}: unexpected reset of {topic} to {epoch}:{offset}; missing {}",
                self.source,
                self.progress()
            ),
            Seen::Closed(code) => panic!(
                "{}: closed ({code:?}); missing {}",
                self.source,
                self.progress()
            ),
        }
    }
}

/// A WebSocket session that subscribes to topics from now on and reads their pushes.
/// Event pushes carry no epoch, so each event is stamped with its topic's epoch as the
/// subscribe reply or the latest `reset` gave it.
pub struct Watcher {
    pub node: String,
    ws: WsClient,
    epochs: HashMap<String, String>,
}

impl Watcher {
    /// Subscribes without a cursor; returns the reply's cursor `(epoch, offset)`.
    pub async fn subscribe(&mut self, topic: &str) -> (String, u64) {
        let reply = self.ws.request(subscribe_cmd(topic, None)).await;
        if let Some(e) = &reply.error {
            panic!(
                "{}: subscribe to {topic} refused: {} {}",
                self.node, e.code, e.message
            );
        }
        let raw = reply
            .result
            .as_ref()
            .unwrap_or_else(|| panic!("{}: subscribe to {topic}: no result", self.node));
        let r: SubscribeResult = serde_json::from_str(raw.get())
            .unwrap_or_else(|e| panic!("{}: subscribe reply {}: {e}", self.node, raw.get()));
        assert!(
            r.events.is_empty(),
            "{}: a subscribe without a cursor replied with events",
            self.node
        );
        self.epochs.insert(topic.into(), r.epoch.clone());
        (r.epoch, r.offset)
    }

    /// The next event, reset or close (other pushes skipped). A read waits at most
    /// [`crate::WAIT`].
    pub async fn next(&mut self) -> Seen {
        loop {
            let m = match self.ws.next().await {
                WsIn::Closed(code) => return Seen::Closed(code),
                WsIn::Msg(m) => m,
            };
            let Some(push) = m.push else { continue };
            if let Some(d) = &push.disconnect {
                panic!("{}: disconnect push {d:?}", self.node);
            }
            let Some(topic) = push.topic else { continue };
            if let Some(ev) = push.event {
                let epoch = self.epochs.get(&topic).cloned().unwrap_or_default();
                let data = serde_json::from_str(ev.data.get()).expect("event data is JSON");
                return Seen::Event(Delivered {
                    topic,
                    epoch,
                    offset: ev.offset,
                    data,
                });
            }
            if let Some(r) = push.reset {
                self.epochs.insert(topic.clone(), r.epoch.clone());
                return Seen::Reset {
                    topic,
                    epoch: r.epoch,
                    offset: r.offset,
                };
            }
            if let Some(s) = push.skipped {
                panic!("{}: {topic}: skipped push {s:?}", self.node);
            }
        }
    }

    /// Reads until each topic of `want` has that many events; fails on a reset or close,
    /// or when `within` passes first.
    pub async fn collect(
        &mut self,
        want: &BTreeMap<String, usize>,
        within: Duration,
    ) -> BTreeMap<String, Vec<Delivered>> {
        let source = format!("WebSocket on {}", self.node);
        collect(source, want, within, self).await
    }
}

/// A multi-topic SSE watch read as events and resets (`bookmark`s skipped).
pub struct MultiSse {
    pub node: String,
    stream: HttpStream,
}

impl MultiSse {
    pub async fn next(&mut self) -> Seen {
        loop {
            let Some(ev) = self.stream.next_sse().await else {
                return Seen::Closed(None);
            };
            let v: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
            match ev.event.as_str() {
                "bookmark" => continue,
                "reset" => {
                    return Seen::Reset {
                        topic: v["topic"].as_str().unwrap_or_default().into(),
                        epoch: v["epoch"].as_str().unwrap_or_default().into(),
                        offset: v["offset"].as_u64().unwrap_or_default(),
                    }
                }
                "disconnect" => return Seen::Closed(v["code"].as_u64().map(|c| c as u16)),
                "message" => {
                    return Seen::Event(Delivered {
                        topic: v["topic"].as_str().expect("envelope topic").into(),
                        epoch: v["epoch"].as_str().expect("envelope epoch").into(),
                        offset: v["offset"].as_u64().expect("envelope offset"),
                        data: v["data"].clone(),
                    })
                }
                other => panic!("{}: unexpected SSE event {other}: {}", self.node, ev.data),
            }
        }
    }

    /// As [`Watcher::collect`].
    pub async fn collect(
        &mut self,
        want: &BTreeMap<String, usize>,
        within: Duration,
    ) -> BTreeMap<String, Vec<Delivered>> {
        let source = format!("SSE on {}", self.node);
        collect(source, want, within, self).await
    }
}

/// A subscriber whose observations [`collect`] can tally.
trait Observer {
    fn observe(&mut self) -> impl std::future::Future<Output = Seen> + '_;
}

impl Observer for Watcher {
    fn observe(&mut self) -> impl std::future::Future<Output = Seen> + '_ {
        self.next()
    }
}

impl Observer for MultiSse {
    fn observe(&mut self) -> impl std::future::Future<Output = Seen> + '_ {
        self.next()
    }
}

/// Reads from `sub` until each topic of `want` has that many events; fails on a reset
/// or close, or when `within` passes first.
async fn collect(
    source: String,
    want: &BTreeMap<String, usize>,
    within: Duration,
    sub: &mut impl Observer,
) -> BTreeMap<String, Vec<Delivered>> {
    let mut tally = Tally::new(source, want);
    let deadline = tokio::time::Instant::now() + within;
    while !tally.done() {
        match tokio::time::timeout_at(deadline, sub.observe()).await {
            Ok(seen) => tally.take(seen),
            Err(_) => panic!(
                "{}: not every event within {within:?}; missing {}",
                tally.source,
                tally.progress()
            ),
        }
    }
    tally.got
}
