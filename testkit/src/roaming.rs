//! Subscribers that survive their node, for membership changes under load. Told
//! `disconnect` (or cut off), a [`Roaming`] client waits the `after_ms` it was told
//! (capped), connects to another node of its [`Targets`] and resumes every topic from
//! its cursor — WebSocket `subscribe` with `since`, SSE with the last `id:` as
//! `Last-Event-ID` — as a well-behaved client does. It logs all it sees ([`SubLog`]);
//! it judges nothing: the test does, afterwards.
//!
//! The clients are the kit's own ([`WsClient`], [`SseParser`]), read without their
//! per-read deadline and raced against the roamer's stop signal and timers.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;

use crate::api::NodeApi;
use crate::sse::{SseEvent, SseItem, SseParser};
use crate::watch::multi_watch_path;
use crate::ws::{subscribe_cmd, Frame, WsClient};

/// How long a roaming client keeps trying to find a node that takes its session back.
const RECONNECT_WITHIN: Duration = Duration::from_secs(60);
/// The longest `after_ms` a roaming client honours before reconnecting.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(5);
/// A roaming WebSocket client told `disconnect` waits this long for the close frame.
const CLOSE_AFTER_PUSH: Duration = Duration::from_secs(2);
/// Times a roaming client asks again for a subscription refused as retryable (503, 429).
const SUBSCRIBE_ATTEMPTS: u32 = 40;
const SUBSCRIBE_RETRY: Duration = Duration::from_millis(500);

/// The nodes roaming clients may (re)connect to, in order, shared with the test (which
/// adds a node once it has joined). A restarted node keeps its address.
#[derive(Clone, Default)]
pub struct Targets(Arc<Mutex<Vec<NodeApi>>>);

impl Targets {
    pub fn new(apis: Vec<NodeApi>) -> Self {
        Self(Arc::new(Mutex::new(apis)))
    }

    pub fn add(&self, api: NodeApi) {
        lock_log(&self.0).push(api);
    }

    pub fn all(&self) -> Vec<NodeApi> {
        lock_log(&self.0).clone()
    }

    /// Every target, starting with the one after `name`: a client leaving `name` tries
    /// the others first and `name` last.
    pub fn after(&self, name: &str) -> Vec<NodeApi> {
        let all = self.all();
        let i = all.iter().position(|a| a.name == name).map_or(0, |i| i + 1);
        all[i..].iter().chain(&all[..i]).cloned().collect()
    }
}

fn lock_log<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One thing a roaming subscriber saw on a topic.
#[derive(Debug, Clone, PartialEq)]
pub enum Obs {
    /// An event. Its epoch is the envelope's (SSE) or, as WebSocket pushes carry none,
    /// the topic's epoch as the latest subscribe reply or `reset` gave it.
    Event {
        epoch: String,
        offset: u64,
        data: Value,
    },
    /// A `reset` push / `event: reset`, or a resume answered `recovered:false`: the
    /// topic goes on from `epoch:offset`.
    Reset { epoch: String, offset: u64 },
}

/// Everything a roaming subscriber saw, for the test to judge afterwards.
#[derive(Debug, Clone, Default)]
pub struct SubLog {
    /// WebSocket: per topic, the cursor of the first subscribe reply (without a cursor:
    /// from now). SSE watches opened "from now" record none.
    pub start: BTreeMap<String, (String, u64)>,
    /// Per topic, in arrival order.
    pub seen: BTreeMap<String, Vec<Obs>>,
    /// Each session held, in order: its node and how it ended.
    pub sessions: Vec<String>,
    /// Every `disconnect` push / `event: disconnect` and the node that sent it.
    pub disconnects: Vec<(String, weft_proto::DisconnectPush)>,
    /// What the protocol should never produce (a `skipped` push, an unparsable line, a
    /// subscribe refused for good, no node taking the session back…).
    pub anomalies: Vec<String>,
}

impl SubLog {
    /// The cursor after the last thing seen on `topic` (an event or a reset).
    pub fn position(&self, topic: &str) -> Option<(String, u64)> {
        self.seen
            .get(topic)
            .and_then(|obs| obs.last())
            .map(|o| match o {
                Obs::Event { epoch, offset, .. } | Obs::Reset { epoch, offset } => {
                    (epoch.clone(), *offset)
                }
            })
    }

    fn record(&mut self, topic: &str, obs: Obs) {
        self.seen.entry(topic.to_owned()).or_default().push(obs);
    }
}

/// A subscriber that survives its node: told `disconnect` (or cut off), it waits the
/// `after_ms` it was told (capped), connects to another node of its [`Targets`] and
/// resumes every topic from its cursor — WebSocket `subscribe` with `since`, SSE with
/// the last `id:` as `Last-Event-ID` — as a well-behaved client does. It logs all it
/// sees ([`SubLog`]); it judges nothing.
pub struct Roaming {
    pub name: String,
    log: Arc<Mutex<SubLog>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// How a roaming client's session ended.
enum Ended {
    Stop,
    Gone {
        why: String,
        /// The `after_ms` of a `disconnect` it was told first.
        told: Option<u64>,
    },
}

impl Roaming {
    /// A WebSocket client on `first`, subscribed (without cursors: from now) to every
    /// topic when this returns.
    pub async fn websocket(
        name: &str,
        targets: &Targets,
        first: &NodeApi,
        topics: &[String],
    ) -> Self {
        let ws = ws_open(first)
            .await
            .unwrap_or_else(|e| panic!("{name}: connect: {e}"));
        let log = Arc::new(Mutex::new(SubLog::default()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let roamer = WsRoamer {
            name: name.into(),
            topics: topics.to_vec(),
            roam: Roam {
                targets: targets.clone(),
                log: log.clone(),
                stop: stopped,
            },
            cursors: topics.iter().map(|t| (t.clone(), None)).collect(),
            ready: Some(ready_tx),
        };
        let task = tokio::spawn(roamer.run(first.clone(), ws));
        let ready = tokio::time::timeout(Duration::from_secs(30), ready_rx).await;
        if !matches!(ready, Ok(Ok(()))) {
            panic!(
                "{name}: not subscribed to every topic on {} within 30 s: {:?}",
                first.name,
                lock_log(&log).anomalies
            );
        }
        Self {
            name: name.into(),
            log,
            stop,
            task,
        }
    }

    /// A multi-topic SSE watch (`GET /v1/events?topic=…&watch=true`) on `first`, from
    /// now, open when this returns.
    pub async fn sse(name: &str, targets: &Targets, first: &NodeApi, topics: &[String]) -> Self {
        let resp = sse_open(first, topics, None)
            .await
            .unwrap_or_else(|e| panic!("{name}: open the watch: {e}"));
        let log = Arc::new(Mutex::new(SubLog::default()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let roamer = SseRoamer {
            topics: topics.to_vec(),
            roam: Roam {
                targets: targets.clone(),
                log: log.clone(),
                stop: stopped,
            },
            last_id: None,
        };
        let task = tokio::spawn(roamer.run(first.clone(), resp));
        Self {
            name: name.into(),
            log,
            stop,
            task,
        }
    }

    /// Where this subscriber is on `topic` ([`SubLog::position`]).
    pub fn position(&self, topic: &str) -> Option<(String, u64)> {
        lock_log(&self.log).position(topic)
    }

    /// Stops the client and returns its log.
    pub async fn finish(self) -> SubLog {
        self.stop.send_replace(true);
        let abort = self.task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .is_err()
        {
            abort.abort();
            lock_log(&self.log)
                .anomalies
                .push("the client did not stop within 10 s".into());
        }
        std::mem::take(&mut *lock_log(&self.log))
    }
}

/// A `weft.v1.json` WebSocket to `api`, or why not (refused, 503 while draining…).
async fn ws_open(api: &NodeApi) -> Result<WsClient, String> {
    match tokio::time::timeout(
        Duration::from_secs(5),
        WsClient::connect_with(api.addr, "/v1/ws", &[]),
    )
    .await
    {
        Ok(Ok(ws)) => Ok(ws),
        Ok(Err(e)) => Err(format!("{}: {e}", api.name)),
        Err(_) => Err(format!("{}: connect timed out", api.name)),
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Waits `d`; false if the client was stopped meanwhile.
async fn pause(stop: &mut tokio::sync::watch::Receiver<bool>, d: Duration) -> bool {
    if *stop.borrow() {
        return false;
    }
    let stopped = tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.wait_for(|s| *s) => true,
    };
    !stopped && !*stop.borrow()
}

/// What both roaming clients share: where they may go, what they log, when to stop.
struct Roam {
    targets: Targets,
    log: Arc<Mutex<SubLog>>,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl Roam {
    /// Logs how the session on `node` ended and waits the `after_ms` it was told
    /// (capped; 50 ms if told nothing); false if the client was stopped meanwhile.
    async fn after_session(&mut self, node: &str, why: String, told: Option<u64>) -> bool {
        lock_log(&self.log).sessions.push(format!("{node}: {why}"));
        let delay = Duration::from_millis(told.unwrap_or(50)).min(MAX_RECONNECT_DELAY);
        pause(&mut self.stop, delay).await
    }

    /// Opens a session with `open` on the next target that takes one, trying `left`
    /// last; `None` if stopped or none did within [`RECONNECT_WITHIN`] (an anomaly,
    /// logged as `gone` with the last refusal).
    async fn reconnect<T, F, Fut>(
        &mut self,
        left: &str,
        gone: &str,
        open: F,
    ) -> Option<(NodeApi, T)>
    where
        F: Fn(NodeApi) -> Fut,
        Fut: std::future::Future<Output = Result<T, String>>,
    {
        let deadline = Instant::now() + RECONNECT_WITHIN;
        let mut last = String::new();
        loop {
            for api in self.targets.after(left) {
                if *self.stop.borrow() {
                    return None;
                }
                match open(api.clone()).await {
                    Ok(session) => return Some((api, session)),
                    Err(e) => last = e,
                }
            }
            if Instant::now() >= deadline {
                lock_log(&self.log)
                    .anomalies
                    .push(format!("{gone} within {RECONNECT_WITHIN:?}; last: {last}"));
                return None;
            }
            if !pause(&mut self.stop, Duration::from_millis(200)).await {
                return None;
            }
        }
    }
}

struct WsRoamer {
    name: String,
    topics: Vec<String>,
    roam: Roam,
    /// Per topic, the cursor to resume from: `None` until the first subscribe reply.
    cursors: BTreeMap<String, Option<(String, u64)>>,
    /// Told once every first subscribe is answered.
    ready: Option<tokio::sync::oneshot::Sender<()>>,
}

/// One WebSocket session's bookkeeping.
#[derive(Default)]
struct WsSession {
    next_id: u64,
    /// Subscribe commands awaiting their reply: id → topic.
    pending: HashMap<u64, String>,
    /// Subscribes to send again (refused as retryable): when, topic.
    again: Vec<(tokio::time::Instant, String)>,
    attempts: HashMap<String, u32>,
    /// A `disconnect` push arrived: its `after_ms`, and when.
    told: Option<(u64, tokio::time::Instant)>,
}

impl WsRoamer {
    async fn run(mut self, first: NodeApi, ws: WsClient) {
        let (mut node, mut ws) = (first, ws);
        loop {
            let (why, told) = match self.session(&node.name, &mut ws).await {
                Ended::Stop => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close()).await;
                    return;
                }
                Ended::Gone { why, told } => (why, told),
            };
            drop(ws);
            if !self.roam.after_session(&node.name, why, told).await {
                return;
            }
            let what = format!("{}: no node took the session back", self.name);
            match self
                .roam
                .reconnect(&node.name, &what, |api| async move { ws_open(&api).await })
                .await
            {
                Some((api, socket)) => (node, ws) = (api, socket),
                None => return,
            }
        }
    }

    async fn subscribe(
        &self,
        ws: &mut WsClient,
        s: &mut WsSession,
        topic: &str,
    ) -> Result<(), String> {
        s.next_id += 1;
        let id = s.next_id;
        let since = self.cursors[topic]
            .as_ref()
            .map(|(e, o)| format!("{e}:{o}"));
        let line = subscribe_cmd(topic, since.as_deref()).to_line(Some(id));
        s.pending.insert(id, topic.to_owned());
        ws.send_raw(tokio_tungstenite::tungstenite::Message::text(line))
            .await
            .map_err(|e| format!("send subscribe: {e}"))
    }

    async fn session(&mut self, node: &str, ws: &mut WsClient) -> Ended {
        let mut s = WsSession::default();
        for t in self.topics.clone() {
            if let Err(why) = self.subscribe(ws, &mut s, &t).await {
                return Ended::Gone { why, told: None };
            }
        }
        loop {
            let again_at = s.again.iter().map(|(at, _)| *at).min();
            let give_up_at = s.told.map(|(_, at)| at + CLOSE_AFTER_PUSH);
            let gone = |why: String, s: &WsSession| Ended::Gone {
                why,
                told: s.told.map(|(after, _)| after),
            };
            tokio::select! {
                r = self.roam.stop.changed() => {
                    if r.is_err() || *self.roam.stop.borrow() {
                        return Ended::Stop;
                    }
                }
                _ = sleep_until_opt(again_at) => {
                    let now = tokio::time::Instant::now();
                    let (due, later): (Vec<_>, Vec<_>) =
                        std::mem::take(&mut s.again).into_iter().partition(|(at, _)| *at <= now);
                    s.again = later;
                    for (_, t) in due {
                        if let Err(why) = self.subscribe(ws, &mut s, &t).await {
                            return gone(why, &s);
                        }
                    }
                }
                _ = sleep_until_opt(give_up_at) => {
                    return gone(format!("no close within {CLOSE_AFTER_PUSH:?} of the disconnect push"), &s);
                }
                frame = ws.read_frame() => match frame {
                    Frame::Messages(lines) => {
                        for m in lines {
                            match m {
                                Ok(m) => self.on_message(node, m, &mut s),
                                Err(e) => lock_log(&self.roam.log)
                                    .anomalies
                                    .push(format!("{node}: {e}")),
                            }
                        }
                    }
                    Frame::Close(code) => {
                        let after = if s.told.is_some() { " after the disconnect push" } else { "" };
                        return gone(format!("closed {code:?}{after}"), &s);
                    }
                    Frame::Other => {}
                    Frame::Error(e) => return gone(format!("read error: {e}"), &s),
                    Frame::End => return gone("connection ended".into(), &s),
                }
            }
        }
    }

    fn on_message(&mut self, node: &str, m: weft_proto::ServerMessage, s: &mut WsSession) {
        if let Some(id) = m.id {
            self.on_reply(node, id, m, s);
            return;
        }
        let Some(push) = m.push else { return };
        let mut log = lock_log(&self.roam.log);
        if let Some(d) = push.disconnect {
            s.told = Some((d.after_ms, tokio::time::Instant::now()));
            log.disconnects.push((node.to_owned(), d));
            return;
        }
        let Some(topic) = push.topic else { return };
        let Some(Some(cursor)) = self.cursors.get_mut(&topic) else {
            log.anomalies.push(format!(
                "{node}: a push for {topic} before its subscribe reply"
            ));
            return;
        };
        if let Some(ev) = push.event {
            let data = serde_json::from_str(ev.data.get()).unwrap_or(Value::Null);
            cursor.1 = ev.offset;
            let epoch = cursor.0.clone();
            log.record(
                &topic,
                Obs::Event {
                    epoch,
                    offset: ev.offset,
                    data,
                },
            );
        } else if let Some(r) = push.reset {
            *cursor = (r.epoch.clone(), r.offset);
            log.record(
                &topic,
                Obs::Reset {
                    epoch: r.epoch,
                    offset: r.offset,
                },
            );
        } else if let Some(sk) = push.skipped {
            log.anomalies
                .push(format!("{node}: {topic}: skipped {}..={}", sk.from, sk.to));
        }
    }

    fn on_reply(&mut self, node: &str, id: u64, m: weft_proto::ServerMessage, s: &mut WsSession) {
        let mut log = lock_log(&self.roam.log);
        let Some(topic) = s.pending.remove(&id) else {
            log.anomalies
                .push(format!("{node}: a reply to unknown command {id}"));
            return;
        };
        if let Some(e) = m.error {
            let n = s.attempts.entry(topic.clone()).or_insert(0);
            *n += 1;
            if matches!(e.code, 429 | 503) && *n < SUBSCRIBE_ATTEMPTS {
                s.again
                    .push((tokio::time::Instant::now() + SUBSCRIBE_RETRY, topic));
            } else {
                log.anomalies.push(format!(
                    "{node}: subscribe to {topic} refused (attempt {n}): {} {}",
                    e.code, e.message
                ));
            }
            return;
        }
        let parsed = m.result.as_ref().map(|raw| {
            serde_json::from_str::<weft_proto::SubscribeResult>(raw.get())
                .map_err(|e| format!("{e}: {}", raw.get()))
        });
        let r = match parsed {
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                log.anomalies
                    .push(format!("{node}: subscribe reply for {topic}: {e}"));
                return;
            }
            None => {
                log.anomalies.push(format!(
                    "{node}: subscribe reply for {topic} without result"
                ));
                return;
            }
        };
        let since = self.cursors[&topic].clone();
        let cursor = match (since, r.recovered) {
            (None, _) => {
                if !r.events.is_empty() {
                    log.anomalies.push(format!(
                        "{node}: a subscribe to {topic} without a cursor replied with events"
                    ));
                }
                log.start.insert(topic.clone(), (r.epoch.clone(), r.offset));
                (r.epoch, r.offset)
            }
            (Some((_, from)), Some(true)) => {
                let mut last = from;
                for ev in &r.events {
                    let data = serde_json::from_str(ev.data.get()).unwrap_or(Value::Null);
                    last = ev.offset;
                    log.record(
                        &topic,
                        Obs::Event {
                            epoch: r.epoch.clone(),
                            offset: ev.offset,
                            data,
                        },
                    );
                }
                (r.epoch, last)
            }
            (Some(_), _) => {
                log.record(
                    &topic,
                    Obs::Reset {
                        epoch: r.epoch.clone(),
                        offset: r.offset,
                    },
                );
                (r.epoch, r.offset)
            }
        };
        self.cursors.insert(topic, Some(cursor));
        if s.pending.is_empty() && s.again.is_empty() {
            if let Some(tx) = self.ready.take() {
                let _ = tx.send(());
            }
        }
    }
}

/// `GET /v1/events?topic=…&watch=true` on `api`, resuming from `last_id` if given:
/// the response once it is `200`, or why not.
async fn sse_open(
    api: &NodeApi,
    topics: &[String],
    last_id: Option<&str>,
) -> Result<reqwest::Response, String> {
    let mut req = api.http.get(api.url(&multi_watch_path(topics)));
    if let Some(id) = last_id {
        req = req.header("last-event-id", id);
    }
    // Subscribing on a node waits (bounded) for each topic's owner: allow for that.
    let resp = match tokio::time::timeout(Duration::from_secs(20), req.send()).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(format!("{}: {e}", api.name)),
        Err(_) => return Err(format!("{}: no answer within 20 s", api.name)),
    };
    let status = resp.status().as_u16();
    if status == 200 {
        return Ok(resp);
    }
    let body = tokio::time::timeout(Duration::from_secs(2), resp.bytes())
        .await
        .ok()
        .and_then(|b| b.ok())
        .unwrap_or_default();
    Err(format!(
        "{}: {status} {}",
        api.name,
        String::from_utf8_lossy(&body)
    ))
}

struct SseRoamer {
    topics: Vec<String>,
    roam: Roam,
    /// The last `id:` received: what a browser sends as `Last-Event-ID`.
    last_id: Option<String>,
}

impl SseRoamer {
    async fn run(mut self, first: NodeApi, resp: reqwest::Response) {
        let (mut node, mut resp) = (first, resp);
        loop {
            let (why, told) = match self.session(&node.name, resp).await {
                Ended::Stop => return,
                Ended::Gone { why, told } => (why, told),
            };
            if !self.roam.after_session(&node.name, why, told).await {
                return;
            }
            let (topics, last_id) = (&self.topics, self.last_id.as_deref());
            let open = |api: NodeApi| async move { sse_open(&api, topics, last_id).await };
            match self
                .roam
                .reconnect(&node.name, "no node took the watch back", open)
                .await
            {
                Some((api, r)) => (node, resp) = (api, r),
                None => return,
            }
        }
    }

    async fn session(&mut self, node: &str, resp: reqwest::Response) -> Ended {
        let mut body = resp.bytes_stream();
        let mut parser = SseParser::default();
        let mut told = None;
        loop {
            let chunk = tokio::select! {
                r = self.roam.stop.changed() => {
                    if r.is_err() || *self.roam.stop.borrow() {
                        return Ended::Stop;
                    }
                    continue;
                }
                c = body.next() => c,
            };
            match chunk {
                Some(Ok(bytes)) => parser.feed(&bytes),
                Some(Err(e)) => {
                    return Ended::Gone {
                        why: format!("stream error: {e}"),
                        told,
                    }
                }
                None => {
                    return Ended::Gone {
                        why: "stream ended".into(),
                        told,
                    }
                }
            }
            while let Some(item) = parser.next_item() {
                match item {
                    Ok(SseItem::Event(ev)) => {
                        if let Some(after) = self.dispatch(node, ev) {
                            told = Some(after);
                        }
                    }
                    Ok(SseItem::Comment(_)) => {}
                    Err(e) => lock_log(&self.roam.log)
                        .anomalies
                        .push(format!("{node}: {e}")),
                }
            }
        }
    }

    /// Handles one SSE event; the `after_ms` of a `disconnect`.
    fn dispatch(&mut self, node: &str, ev: SseEvent) -> Option<u64> {
        if let Some(id) = ev.id {
            self.last_id = Some(id);
        }
        if ev.data.is_empty() {
            return None;
        }
        let data = ev.data;
        let v: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
        let mut log = lock_log(&self.roam.log);
        let topic = v["topic"].as_str().unwrap_or_default().to_owned();
        match ev.event.as_str() {
            "message" => match (v["epoch"].as_str(), v["offset"].as_u64()) {
                (Some(epoch), Some(offset)) => log.record(
                    &topic,
                    Obs::Event {
                        epoch: epoch.into(),
                        offset,
                        data: v["data"].clone(),
                    },
                ),
                _ => log
                    .anomalies
                    .push(format!("{node}: an SSE message without a cursor: {data}")),
            },
            "reset" => match (v["epoch"].as_str(), v["offset"].as_u64()) {
                (Some(epoch), Some(offset)) => log.record(
                    &topic,
                    Obs::Reset {
                        epoch: epoch.into(),
                        offset,
                    },
                ),
                _ => log
                    .anomalies
                    .push(format!("{node}: a reset without a cursor: {data}")),
            },
            "bookmark" => {}
            "disconnect" => match serde_json::from_value::<weft_proto::DisconnectPush>(v) {
                Ok(d) => {
                    let after = d.after_ms;
                    log.disconnects.push((node.to_owned(), d));
                    return Some(after);
                }
                Err(e) => log
                    .anomalies
                    .push(format!("{node}: a bad disconnect event {data}: {e}")),
            },
            other => log
                .anomalies
                .push(format!("{node}: SSE event {other}: {data}")),
        }
        None
    }
}
