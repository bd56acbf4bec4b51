//! Shared harness for the integration tests: a real node on `127.0.0.1:0` and real
//! clients for every transport. Each test binary uses the parts it needs.
#![allow(dead_code)]
pub mod cluster;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use weft_node::{Config, Node};
use weft_proto::{Command, PublishResult, ServerMessage, TopicState};

pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestNode {
    pub addr: SocketAddr,
    pub node: Arc<Node>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    pub http: reqwest::Client,
    /// Sent as `Authorization: Bearer` by [`TestNode::publish`], `state` and
    /// `get_json`, for nodes with authentication on.
    pub credential: Option<String>,
}

impl TestNode {
    fn authed(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.credential {
            Some(c) => req.bearer_auth(c),
            None => req,
        }
    }

    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> Self {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let mut config = Config {
            node_id: format!(
                "test-{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ),
            ..Default::default()
        };
        config.timing.shutdown_grace_ms = 1000;
        configure(&mut config);
        config.validate().expect("test config is valid");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let node = Node::new(config);
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(weft_node::transport::server::serve(
            node.clone(),
            listener,
            async move {
                let _ = rx.await;
            },
        ));
        Self {
            addr,
            node,
            stop: Some(tx),
            task: Some(task),
            http: reqwest::Client::new(),
            credential: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn publish(&self, topic: &str, data: &str) -> PublishResult {
        let resp = self
            .authed(
                self.http
                    .post(self.url(&format!("/v1/topics/{topic}/events"))),
            )
            .header("content-type", "application/json")
            .body(data.to_owned())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201, "publish to {topic}");
        serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
    }

    pub async fn state(&self, topic: &str) -> TopicState {
        let resp = self
            .authed(self.http.get(self.url(&format!("/v1/topics/{topic}"))))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
    }

    /// Status and parsed JSON body of a GET.
    pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let resp = self
            .authed(self.http.get(self.url(path)))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.bytes().await.unwrap();
        (
            status,
            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        )
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("node stops within its grace")
                .unwrap()
                .unwrap();
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// One event as any transport delivered it.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivered {
    pub topic: String,
    pub epoch: String,
    pub offset: u64,
    pub data: serde_json::Value,
}

/// What a WebSocket read produced.
#[derive(Debug)]
pub enum WsIn {
    Msg(Box<ServerMessage>),
    Closed(Option<u16>),
}

pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pending: VecDeque<ServerMessage>,
    next_id: u64,
    pub closed: Option<Option<u16>>,
}

impl WsClient {
    /// Opens `ws://{addr}{path}` with extra request headers; the handshake's error
    /// (such as a refused upgrade) is returned, not unwrapped.
    pub async fn connect_with(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        let mut req = format!("ws://{addr}{path}").into_client_request()?;
        req.headers_mut().insert(
            "sec-websocket-protocol",
            weft_proto::SUBPROTOCOL_JSON.parse().unwrap(),
        );
        for (k, v) in headers {
            req.headers_mut().insert(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let (ws, _) = tokio_tungstenite::connect_async(req).await?;
        Ok(Self::from_stream(ws))
    }

    pub fn from_stream(ws: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Self {
        Self {
            ws,
            pending: VecDeque::new(),
            next_id: 1,
            closed: None,
        }
    }

    pub async fn connect(addr: SocketAddr) -> Self {
        let mut req = format!("ws://{addr}/v1/ws").into_client_request().unwrap();
        req.headers_mut().insert(
            "sec-websocket-protocol",
            weft_proto::SUBPROTOCOL_JSON.parse().unwrap(),
        );
        let (ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
        assert_eq!(
            resp.headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().unwrap()),
            Some(weft_proto::SUBPROTOCOL_JSON)
        );
        Self {
            ws,
            pending: VecDeque::new(),
            next_id: 1,
            closed: None,
        }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.unwrap();
    }

    pub async fn send_raw(
        &mut self,
        msg: Message,
    ) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        self.ws.send(msg).await
    }

    pub async fn send(&mut self, cmd: Command) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.send_text(&cmd.to_line(Some(id))).await;
        id
    }

    /// The next message (pushes and replies, in arrival order), or the close.
    pub async fn next(&mut self) -> WsIn {
        if let Some(m) = self.pending.pop_front() {
            return WsIn::Msg(Box::new(m));
        }
        if let Some(code) = self.closed {
            return WsIn::Closed(code);
        }
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("websocket read timed out");
            match msg {
                Some(Ok(Message::Text(t))) => {
                    for line in t.as_str().split('\n').filter(|l| !l.is_empty()) {
                        let m: ServerMessage = serde_json::from_str(line)
                            .unwrap_or_else(|e| panic!("bad server line {line}: {e}"));
                        self.pending.push_back(m);
                    }
                    if let Some(m) = self.pending.pop_front() {
                        return WsIn::Msg(Box::new(m));
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.map(|f| u16::from(f.code));
                    self.closed = Some(code);
                    return WsIn::Closed(code);
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    self.closed = Some(None);
                    return WsIn::Closed(None);
                }
            }
        }
    }

    pub async fn next_msg(&mut self) -> ServerMessage {
        match self.next().await {
            WsIn::Msg(m) => *m,
            WsIn::Closed(code) => {
                panic!("connection closed ({code:?}) while a message was expected")
            }
        }
    }

    /// Sends `cmd` and returns its reply; pushes that arrive first stay queued.
    pub async fn request(&mut self, cmd: Command) -> ServerMessage {
        let id = self.send(cmd).await;
        let mut held = Vec::new();
        let reply = loop {
            let m = self.next_msg().await;
            if m.id == Some(id) {
                break m;
            }
            held.push(m);
        };
        for m in held.into_iter().rev() {
            self.pending.push_front(m);
        }
        reply
    }

    /// The next event push (skipping other pushes), as a [`Delivered`].
    pub async fn next_event(&mut self) -> Option<Delivered> {
        loop {
            match self.next().await {
                WsIn::Msg(m) => {
                    if let Some(push) = m.push {
                        if let (Some(topic), Some(ev)) = (push.topic, push.event) {
                            return Some(Delivered {
                                topic,
                                epoch: String::new(),
                                offset: ev.offset,
                                data: serde_json::from_str(ev.data.get()).unwrap(),
                            });
                        }
                    }
                }
                WsIn::Closed(_) => return None,
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

pub fn subscribe_cmd(topic: &str, since: Option<&str>) -> Command {
    Command::Subscribe(weft_proto::command::SubscribeCmd {
        topic: topic.into(),
        since: since.map(Into::into),
        snapshot: false,
    })
}

/// A parsed SSE event.
#[derive(Debug, Clone, Default)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

/// A streaming HTTP response read as SSE events or NDJSON lines.
pub struct HttpStream {
    pub status: u16,
    body: Option<futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>>,
    buf: Vec<u8>,
}

impl HttpStream {
    pub async fn open(client: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> Self {
        let mut req = client.get(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        Self {
            status,
            body: Some(resp.bytes_stream().boxed()),
            buf: Vec::new(),
        }
    }

    async fn fill(&mut self) -> bool {
        let Some(body) = self.body.as_mut() else {
            return false;
        };
        match tokio::time::timeout(WAIT, body.next())
            .await
            .expect("stream read timed out")
        {
            Some(Ok(chunk)) => {
                self.buf.extend_from_slice(&chunk);
                true
            }
            _ => {
                self.body = None;
                false
            }
        }
    }

    /// The next complete line without its `\n`, or `None` at the end of the stream.
    pub async fn next_line(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Some(String::from_utf8(line[..line.len() - 1].to_vec()).unwrap());
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// The next SSE event (comments and `retry:` skipped), or `None` at the end.
    pub async fn next_sse(&mut self) -> Option<SseEvent> {
        let mut ev = SseEvent::default();
        let mut has_field = false;
        loop {
            let line = self.next_line().await?;
            if line.is_empty() {
                if has_field {
                    if ev.event.is_empty() {
                        ev.event = "message".into();
                    }
                    return Some(ev);
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(": ").unwrap_or((line.as_str(), ""));
            match field {
                "id" => ev.id = Some(value.into()),
                "event" => ev.event = value.into(),
                "data" => {
                    if !ev.data.is_empty() {
                        ev.data.push('\n');
                    }
                    ev.data.push_str(value);
                }
                "retry" => continue,
                other => panic!("unknown SSE field {other}"),
            }
            has_field = true;
        }
    }

    /// The next NDJSON value (blank keepalive lines skipped).
    pub async fn next_ndjson(&mut self) -> Option<serde_json::Value> {
        loop {
            let line = self.next_line().await?;
            if !line.trim().is_empty() {
                return Some(serde_json::from_str(&line).unwrap());
            }
        }
    }
}

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
                c.pending.extend(Self::events_of_reply(topic, &reply));
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
