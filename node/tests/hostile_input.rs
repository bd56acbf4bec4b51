//! Hostile and malformed input: every case is answered with its documented code
//! (DESIGN §3.1, §3.2, §6), counted in the node's stats, and never disturbs anyone
//! else — a well-behaved subscriber connected before each attack still receives an
//! event published after it.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use weft_node::config::NamespaceConfig;
use weft_proto::{ErrorDetail, PublishResult, ServerMessage, SubscribeResult};

use weft_testkit::raw::{exchange, read_response, tcp_from};
use weft_testkit::{page_offsets, subscribe_cmd, TestNode, WsClient, WsIn, WAIT};

type RawWs = WebSocketStream<MaybeTlsStream<TcpStream>>;

const LOCAL_A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));
const LOCAL_B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
const LOCAL_C: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 3));

// ---------------------------------------------------------------------------------
// Helpers

/// Opens `/v1/ws` from `local`, offering `protocols` (no header when `None`).
async fn ws_open(
    addr: SocketAddr,
    local: IpAddr,
    protocols: Option<&str>,
) -> Result<RawWs, tokio_tungstenite::tungstenite::Error> {
    let mut req = format!("ws://{addr}/v1/ws").into_client_request().unwrap();
    if let Some(p) = protocols {
        req.headers_mut()
            .insert("sec-websocket-protocol", p.parse().unwrap());
    }
    let tcp = tcp_from(addr, local).await;
    tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(tcp))
        .await
        .map(|(ws, _)| ws)
}

/// A well-behaved WebSocket subscriber that joins before an attack; afterwards
/// [`Bystander::assert_served`] checks that the node still delivers to it.
struct Bystander {
    ws: RawWs,
    topic: String,
    http: reqwest::Client,
    base: String,
    seq: u64,
}

impl Bystander {
    async fn join(node: &TestNode, topic: &str) -> Self {
        Self::join_from(node, topic, LOCAL_A, LOCAL_A).await
    }

    /// Connects its WebSocket from `ws_ip` and publishes from `http_ip`.
    async fn join_from(node: &TestNode, topic: &str, ws_ip: IpAddr, http_ip: IpAddr) -> Self {
        let mut ws = ws_open(node.addr, ws_ip, Some(weft_proto::SUBPROTOCOL_JSON))
            .await
            .expect("bystander connects");
        ws.send(Message::text(subscribe_cmd(topic, None).to_line(Some(1))))
            .await
            .unwrap();
        let reply = next_line(&mut ws).await;
        assert_eq!(reply.id, Some(1));
        assert!(reply.result.is_some(), "bystander subscribe: {reply:?}");
        // One connection per publish: a node with a short header timeout closes
        // idle keep-alive connections, and a pooled one would race that close.
        let http = reqwest::Client::builder()
            .local_address(http_ip)
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        Self {
            ws,
            topic: topic.into(),
            http,
            base: node.url(""),
            seq: 0,
        }
    }

    /// Publishes one event to the bystander's topic and asserts it is delivered.
    async fn assert_served(&mut self) {
        self.seq += 1;
        let data = format!(r#"{{"bystander":{}}}"#, self.seq);
        let resp = self
            .http
            .post(format!("{}/v1/topics/{}/events", self.base, self.topic))
            .header("content-type", "application/json")
            .body(data.clone())
            .send()
            .await
            .expect("bystander's publish");
        assert_eq!(resp.status(), 201, "bystander's publish");
        let published: PublishResult =
            serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
        loop {
            let m = next_line(&mut self.ws).await;
            let Some(push) = m.push else { continue };
            let Some(ev) = push.event else { continue };
            assert_eq!(push.topic.as_deref(), Some(self.topic.as_str()));
            assert_eq!(ev.offset, published.offset, "bystander got the wrong event");
            assert_eq!(ev.data.get(), data);
            return;
        }
    }
}

/// The next server line on a raw WebSocket (one frame may carry several; this helper
/// is only used where the server answers one line per frame or where the rest does
/// not matter).
async fn next_line(ws: &mut RawWs) -> ServerMessage {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("bystander read timed out")
            .expect("bystander's socket ended")
            .expect("bystander's socket failed");
        match msg {
            Message::Text(t) => {
                let line = t.as_str().split('\n').next().unwrap();
                return serde_json::from_str(line).unwrap();
            }
            Message::Close(f) => panic!("bystander was closed: {f:?}"),
            _ => {}
        }
    }
}

fn error_of(m: &ServerMessage) -> &ErrorDetail {
    m.error
        .as_ref()
        .unwrap_or_else(|| panic!("expected an error reply, got {m:?}"))
}

fn assert_ok(m: &ServerMessage) {
    assert!(
        m.result.is_some() && m.error.is_none(),
        "expected a result, got {m:?}"
    );
}

/// Asserts `resp` is the JSON error `{"error":{"code":code,"message":…}}` with HTTP
/// status `code`, and returns the error object.
async fn expect_error(resp: reqwest::Response, code: u16) -> ErrorDetail {
    let status = resp.status().as_u16();
    let url = resp.url().clone();
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = resp.bytes().await.unwrap();
    assert_eq!(
        status,
        code,
        "{url}: expected {code}, got {status}: {}",
        String::from_utf8_lossy(&body)
    );
    assert!(
        ctype.starts_with("application/json"),
        "{url}: error content-type is {ctype:?}"
    );
    let parsed: weft_proto::ErrorBody = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "{url}: body is not {{\"error\":{{…}}}} ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    });
    assert_eq!(parsed.error.code, code, "{url}: code in the body");
    assert!(!parsed.error.message.is_empty(), "{url}: empty message");
    parsed.error
}

/// Reads until EOF or a reset; panics if the peer keeps the connection open past
/// `within`. Returns whatever bytes arrived first.
async fn expect_closed(s: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => panic!(
                "server kept the connection open for {within:?} (got {:?})",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

const HEALTHZ: &str = "GET /healthz HTTP/1.1\r\nhost: weft\r\n\r\n";

/// One `GET /healthz` on a kept-alive raw connection; returns the status.
async fn healthz_on(s: &mut TcpStream) -> u16 {
    s.write_all(HEALTHZ.as_bytes()).await.unwrap();
    read_response(s).await.status
}

fn ns(pattern: &str, f: impl FnOnce(&mut NamespaceConfig)) -> NamespaceConfig {
    let mut n = NamespaceConfig {
        pattern: pattern.into(),
        ..Default::default()
    };
    f(&mut n);
    n
}

fn line(id: u64, body: &str) -> String {
    format!(r#"{{"id":{id},{body}}}"#)
}

// ---------------------------------------------------------------------------------
// WebSocket: per-line errors keep the session

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_malformed_lines_get_400_and_the_session_goes_on() {
    let node = TestNode::start().await;
    let mut by = Bystander::join(&node, "bystander").await;
    let bad0 = node.node.stats.bad_input.get();
    let mut c = WsClient::connect(node.addr).await;

    c.send_text("{not json").await;
    let m = c.next_msg().await;
    assert_eq!(m.id, None, "malformed JSON has no id to echo");
    assert_eq!(error_of(&m).code, 400);
    // The same session still works.
    let r = c.request(subscribe_cmd("after.garbage", None)).await;
    assert_ok(&r);

    c.send_text(r#"{"id":3,"frobnicate":{}}"#).await;
    let m = c.next_msg().await;
    assert_eq!((m.id, error_of(&m).code), (Some(3), 400), "{m:?}");

    c.send_text(r#"{"id":4,"subscribe":{}}"#).await;
    let m = c.next_msg().await;
    assert_eq!((m.id, error_of(&m).code), (Some(4), 400), "{m:?}");

    // Several commands in one frame: one reply each, in order.
    let frame = [
        line(10, r#""subscribe":{"topic":"multi.a"}"#),
        "{oops".into(),
        line(11, r#""frobnicate":{}"#),
        line(12, r#""subscribe":{"topic":"multi.b"}"#),
        line(13, r#""subscribe":{}"#),
        line(14, r#""connect":{}"#),
    ]
    .join("\n");
    c.send_text(&frame).await;
    let replies: Vec<ServerMessage> = {
        let mut v = Vec::new();
        for _ in 0..6 {
            v.push(c.next_msg().await);
        }
        v
    };
    let shape: Vec<(Option<u64>, Option<u16>)> = replies
        .iter()
        .map(|m| (m.id, m.error.as_ref().map(|e| e.code)))
        .collect();
    assert_eq!(
        shape,
        vec![
            (Some(10), None),
            (None, Some(400)),
            (Some(11), Some(400)),
            (Some(12), None),
            (Some(13), Some(400)),
            (Some(14), None),
        ]
    );
    assert!(replies[0].result.is_some() && replies[3].result.is_some());
    // The two subscriptions of that frame are live.
    let a = node.publish("multi.a", r#"{"x":1}"#).await;
    let b = node.publish("multi.b", r#"{"x":2}"#).await;
    let got: Vec<(String, u64)> = [c.next_event().await, c.next_event().await]
        .into_iter()
        .map(|d| d.expect("event after the mixed frame"))
        .map(|d| (d.topic, d.offset))
        .collect();
    assert_eq!(
        got,
        vec![("multi.a".into(), a.offset), ("multi.b".into(), b.offset)]
    );

    by.assert_served().await;
    assert_eq!(
        node.node.stats.bad_input.get() - bad0,
        6,
        "every malformed line is counted once"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_ten_mib_frame_closes_4413() {
    let node = TestNode::start().await;
    let mut by = Bystander::join(&node, "bystander").await;
    let bad0 = node.node.stats.bad_input.get();
    let ws = ws_open(node.addr, LOCAL_A, Some(weft_proto::SUBPROTOCOL_JSON))
        .await
        .unwrap();
    let (mut sink, mut stream) = ws.split();
    // Written from its own task: the server may stop reading before all of it is sent.
    let writer = tokio::spawn(async move {
        let data = "x".repeat(10 * 1024 * 1024);
        let cmd = format!(r#"{{"id":1,"publish":{{"topic":"big","data":"{data}"}}}}"#);
        let _ = sink.send(Message::text(cmd)).await;
        sink
    });
    let code = match tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("no close within 10 s")
    {
        Some(Ok(Message::Close(f))) => f.map(|f| u16::from(f.code)),
        Some(Ok(other)) => panic!("expected a close, got {other:?}"),
        Some(Err(e)) => panic!("socket failed before a close frame: {e}"),
        None => None,
    };
    writer.abort();
    assert_eq!(code, Some(weft_proto::close::TOO_BIG));
    assert_eq!(node.state("big").await.offset, 0, "nothing was published");
    by.assert_served().await;
    assert_eq!(node.node.stats.bad_input.get() - bad0, 1);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_binary_frame_closes_4400() {
    let node = TestNode::start().await;
    let mut by = Bystander::join(&node, "bystander").await;
    let bad0 = node.node.stats.bad_input.get();
    let mut c = WsClient::connect(node.addr).await;
    c.send_raw(Message::binary(b"\x0a\x03abc".to_vec()))
        .await
        .unwrap();
    match c.next().await {
        WsIn::Closed(code) => assert_eq!(code, Some(weft_proto::close::PROTOCOL_ERROR)),
        WsIn::Msg(m) => panic!("expected close 4400, got {m:?}"),
    }
    by.assert_served().await;
    assert_eq!(node.node.stats.bad_input.get() - bad0, 1);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_bad_topics_and_cursors_in_subscribe() {
    let node = TestNode::start().await;
    let mut by = Bystander::join(&node, "bystander").await;
    for i in 0..3 {
        node.publish("cur", &format!(r#"{{"i":{i}}}"#)).await;
    }
    let state = node.state("cur").await;
    assert_eq!(state.offset, 3);
    assert_ne!(state.epoch, "zzzz");
    let bad0 = node.node.stats.bad_input.get();
    let mut c = WsClient::connect(node.addr).await;

    let long = "a".repeat(256);
    for topic in ["a/b", "", long.as_str(), "$sys.x", "a b", "ünï"] {
        let m = c.request(subscribe_cmd(topic, None)).await;
        assert_eq!(error_of(&m).code, 400, "topic {topic:?}: {m:?}");
    }
    // The longest valid name is fine.
    assert_ok(&c.request(subscribe_cmd(&"a".repeat(255), None)).await);

    let m = c.request(subscribe_cmd("cur", Some("garbage"))).await;
    assert_eq!(error_of(&m).code, 400, "malformed cursor: {m:?}");

    // A cursor ahead of the topic was never issued: 400.
    let ahead = format!("{}:{}", state.epoch, state.offset + 100);
    let m = c.request(subscribe_cmd("cur", Some(&ahead))).await;
    assert_eq!(error_of(&m).code, 400, "cursor ahead: {m:?}");

    // Another epoch: subscribed, not recovered, told the current cursor.
    let m = c.request(subscribe_cmd("cur", Some("zzzz:5"))).await;
    assert_ok(&m);
    let r: SubscribeResult = serde_json::from_str(m.result.as_ref().unwrap().get()).unwrap();
    assert_eq!(r.recovered, Some(false));
    assert_eq!((r.epoch.as_str(), r.offset), (state.epoch.as_str(), 3));
    assert!(r.events.is_empty());
    // … and from there every later event arrives.
    let p = node.publish("cur", r#"{"i":3}"#).await;
    assert_eq!(c.next_event().await.unwrap().offset, p.offset);

    by.assert_served().await;
    assert_eq!(
        node.node.stats.bad_input.get() - bad0,
        8,
        "six bad topics, a malformed and an ahead cursor"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_subscriptions_beyond_the_limit_get_429() {
    let node = TestNode::start_with(|c| c.limits.max_subscriptions_per_session = 5).await;
    let mut by = Bystander::join(&node, "bystander").await;
    let limited0 = node.node.stats.rate_limited.get();
    let mut c = WsClient::connect(node.addr).await;
    for i in 0..5 {
        assert_ok(&c.request(subscribe_cmd(&format!("s{i}"), None)).await);
    }
    for i in 5..8 {
        let m = c.request(subscribe_cmd(&format!("s{i}"), None)).await;
        assert_eq!(error_of(&m).code, 429, "subscription {i}: {m:?}");
    }
    // The refused ones are not subscribed; the earlier ones still are.
    for i in (0..8).rev() {
        node.publish(&format!("s{i}"), &format!(r#"{{"i":{i}}}"#))
            .await;
    }
    let mut topics = Vec::new();
    for _ in 0..5 {
        topics.push(c.next_event().await.expect("event").topic);
    }
    assert_eq!(topics, ["s4", "s3", "s2", "s1", "s0"]);
    // After an unsubscribe there is room again.
    let m = c
        .request(weft_proto::Command::Unsubscribe(
            weft_proto::command::UnsubscribeCmd { topic: "s0".into() },
        ))
        .await;
    assert_ok(&m);
    assert_ok(&c.request(subscribe_cmd("s5", None)).await);

    by.assert_served().await;
    assert_eq!(node.node.stats.rate_limited.get() - limited0, 3);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_command_flood_gets_429_then_close_4029() {
    let node = TestNode::start_with(|c| {
        c.limits.commands_per_s = 5;
        c.limits.command_burst = 10;
    })
    .await;
    let mut by = Bystander::join(&node, "bystander").await;
    let limited0 = node.node.stats.rate_limited.get();
    let mut c = WsClient::connect(node.addr).await;

    // A burst of 15 in one frame: the first 10 pass, the rest are refused with 429.
    let frame: Vec<String> = (1..=15).map(|i| line(i, r#""connect":{}"#)).collect();
    c.send_text(&frame.join("\n")).await;
    let mut refused = 0;
    for i in 1..=15 {
        let m = c.next_msg().await;
        assert_eq!(m.id, Some(i), "replies in order");
        if i <= 10 {
            assert_ok(&m);
        } else if let Some(e) = &m.error {
            assert_eq!(e.code, 429, "{m:?}");
            refused += 1;
        }
    }
    assert!(
        refused >= 4,
        "only {refused} of 5 over-burst commands refused"
    );

    // A sustained flood: the session is closed 4029 (bounded: at most 300 frames).
    let mut sent = 0;
    for i in 100..400 {
        let cmd = line(i, r#""connect":{}"#);
        if c.send_raw(Message::text(cmd)).await.is_err() {
            break;
        }
        sent += 1;
    }
    assert!(sent > 11, "the flood was cut short after {sent} frames");
    let mut replies_429 = 0;
    let code = loop {
        match c.next().await {
            WsIn::Msg(m) => {
                if let Some(e) = &m.error {
                    assert_eq!(e.code, 429, "{m:?}");
                    replies_429 += 1;
                }
            }
            WsIn::Closed(code) => break code,
        }
    };
    assert_eq!(code, Some(weft_proto::close::RATE_LIMITED));

    by.assert_served().await;
    // The session is closed after `command_burst` + 1 refusals in a row, each counted.
    let hits = node.node.stats.rate_limited.get() - limited0;
    assert!(
        hits >= 11 && hits >= refused,
        "rate-limit hits: {hits} (429 replies seen: {refused} in the burst, {replies_429} in the flood)"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_publish_where_clients_may_not_is_403() {
    let node = TestNode::start_with(|c| {
        c.namespaces
            .push(ns("readonly.>", |n| n.client_publish = false));
    })
    .await;
    let mut by = Bystander::join(&node, "bystander").await;
    let mut c = WsClient::connect(node.addr).await;
    c.send_text(&line(
        7,
        r#""publish":{"topic":"readonly.x","data":{"a":1}}"#,
    ))
    .await;
    let m = c.next_msg().await;
    assert_eq!((m.id, error_of(&m).code), (Some(7), 403), "{m:?}");
    assert_eq!(node.state("readonly.x").await.offset, 0);
    // Elsewhere the same session may publish, and REST may publish to readonly.x.
    c.send_text(&line(8, r#""publish":{"topic":"open.x","data":{"a":1}}"#))
        .await;
    let m = c.next_msg().await;
    assert_eq!(m.id, Some(8));
    assert_ok(&m);
    node.publish("readonly.x", r#"{"from":"rest"}"#).await;
    by.assert_served().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_upgrade_with_only_an_unsupported_subprotocol_is_400() {
    let node = TestNode::start().await;
    let mut by = Bystander::join(&node, "bystander").await;
    let bad0 = node.node.stats.bad_input.get();
    let mut s = TcpStream::connect(node.addr).await.unwrap();
    s.write_all(
        b"GET /v1/ws HTTP/1.1\r\nhost: weft\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
          sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          sec-websocket-protocol: weft.v1.proto\r\n\r\n",
    )
    .await
    .unwrap();
    let resp = read_response(&mut s).await;
    assert_eq!(resp.status, 400, "{resp:?}");
    assert!(resp
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/json")));
    let body = resp.json();
    assert_eq!(body["error"]["code"], 400, "{body}");
    assert!(body["error"]["message"].is_string());
    // A real client sees the handshake refused too.
    let Err(err) = ws_open(node.addr, LOCAL_A, Some(weft_proto::SUBPROTOCOL_PROTO)).await else {
        panic!("the handshake offering only weft.v1.proto must fail");
    };
    match err {
        tokio_tungstenite::tungstenite::Error::Http(r) => assert_eq!(r.status(), 400),
        other => panic!("expected an HTTP 400, got {other}"),
    }
    by.assert_served().await;
    assert!(
        node.node.stats.bad_input.get() - bad0 >= 2,
        "refused upgrades are not counted as bad input"
    );
    node.stop().await;
}

// ---------------------------------------------------------------------------------
// HTTP

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_invalid_topic_in_path_is_400() {
    let node = TestNode::start().await;
    let mut by = Bystander::join(&node, "bystander").await;
    let bad0 = node.node.stats.bad_input.get();
    let long = "a".repeat(256);
    let topics = ["a%2Fb", "%24sys.x", "$sys.x", long.as_str(), "a%20b", "%00"];
    let mut answered = 0;
    for t in topics {
        for (method, path) in [
            (reqwest::Method::GET, format!("/v1/topics/{t}")),
            (reqwest::Method::GET, format!("/v1/topics/{t}/events")),
            (reqwest::Method::POST, format!("/v1/topics/{t}/events")),
        ] {
            let resp = node
                .http
                .request(method, node.url(&path))
                .body("{}")
                .send()
                .await
                .unwrap();
            expect_error(resp, 400).await;
            answered += 1;
        }
    }
    assert_eq!(node.node.registry.topic_count(), 1, "no topic was created");
    by.assert_served().await;
    assert!(
        node.node.stats.bad_input.get() - bad0 >= answered,
        "{answered} invalid-topic requests, bad_input grew by {}",
        node.node.stats.bad_input.get() - bad0
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_publish_bodies_not_json_or_too_large() {
    const MAX: usize = 1024;
    let node = TestNode::start_with(|c| c.limits.max_message_bytes = MAX).await;
    let mut by = Bystander::join(&node, "bystander").await;
    let bad0 = node.node.stats.bad_input.get();
    let url = node.url("/v1/topics/pub/events");
    let post = |body: reqwest::Body| {
        node.http
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };

    for body in ["not json", "{\"a\":", "", "{} {}"] {
        expect_error(post(body.into()).await.unwrap(), 400).await;
    }
    let resp = node
        .http
        .post(&url)
        .header("content-type", "application/json")
        .header("weft-event-type", "has space")
        .body("{}")
        .send()
        .await
        .unwrap();
    expect_error(resp, 400).await;

    // Over the limit with a Content-Length.
    let big = format!("\"{}\"", "x".repeat(MAX));
    expect_error(post(big.clone().into()).await.unwrap(), 413).await;
    // Over the limit without one (chunked).
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        big.as_bytes().chunks(100).map(|c| Ok(c.to_vec())).collect();
    let stream = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    expect_error(post(stream).await.unwrap(), 413).await;
    assert_eq!(node.state("pub").await.offset, 0, "nothing was published");

    // Exactly at the limit, chunked, is accepted.
    let at_limit = format!("\"{}\"", "x".repeat(MAX - 2));
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = at_limit
        .as_bytes()
        .chunks(100)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let resp = post(reqwest::Body::wrap_stream(futures_util::stream::iter(
        chunks,
    )))
    .await
    .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(node.state("pub").await.offset, 1);

    by.assert_served().await;
    assert!(
        node.node.stats.bad_input.get() - bad0 >= 7,
        "7 rejected publishes, bad_input grew by {}",
        node.node.stats.bad_input.get() - bad0
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_bad_cursors_and_parameters() {
    let node =
        TestNode::start_with(|c| c.namespaces.push(ns("tiny.>", |n| n.history_size = 2))).await;
    let mut by = Bystander::join(&node, "bystander").await;
    for i in 0..3 {
        node.publish("poll.t", &format!(r#"{{"i":{i}}}"#)).await;
    }
    let epoch = node.state("poll.t").await.epoch;
    assert_ne!(epoch, "zzzz");
    let current = format!("{epoch}:3");
    let bad0 = node.node.stats.bad_input.get();
    let get = |q: String| {
        node.http
            .get(node.url(&format!("/v1/topics/poll.t/events?{q}")))
            .send()
    };

    let mut bad = 0;
    for q in [
        "since=garbage".to_owned(),
        "since=abc:".into(),
        "since=:5".into(),
        format!("since={epoch}:-1"),
        format!("since={epoch}:103"),
        "wait=61".into(),
        "wait=-1".into(),
        "wait=soon".into(),
        "limit=0".into(),
        "limit=1001".into(),
        "limit=ten".into(),
        "watch=maybe".into(),
    ] {
        expect_error(get(q).await.unwrap(), 400).await;
        bad += 1;
    }

    // Another epoch: 410 with the current cursor, for a page and for a long-poll.
    for q in [
        "since=zzzz:5",
        "since=zzzz:5&wait=1",
        "since=zzzz:0&limit=1",
    ] {
        let e = expect_error(get(q.into()).await.unwrap(), 410).await;
        assert_eq!(e.cursor.as_deref(), Some(current.as_str()), "{q}");
    }
    // NDJSON answers 410 before streaming.
    let resp = node
        .http
        .get(node.url("/v1/topics/poll.t/events?since=zzzz:5"))
        .header("accept", "application/x-ndjson")
        .send()
        .await
        .unwrap();
    let e = expect_error(resp, 410).await;
    assert_eq!(e.cursor.as_deref(), Some(current.as_str()));

    // Out of retention (history keeps 2): 410; the retained range still reads.
    for i in 0..5 {
        node.publish("tiny.t", &format!(r#"{{"i":{i}}}"#)).await;
    }
    let tiny = node.state("tiny.t").await.epoch;
    let resp = node
        .http
        .get(node.url(&format!("/v1/topics/tiny.t/events?since={tiny}:1")))
        .send()
        .await
        .unwrap();
    let e = expect_error(resp, 410).await;
    assert_eq!(e.cursor, Some(format!("{tiny}:5")));
    let (status, page) = node
        .get_json(&format!("/v1/topics/tiny.t/events?since={tiny}:3"))
        .await;
    assert_eq!(status, 200);
    let offsets = page_offsets(&page);
    assert_eq!(offsets, [4, 5]);

    by.assert_served().await;
    assert!(
        node.node.stats.bad_input.get() - bad0 >= bad,
        "{bad} bad requests, bad_input grew by {}",
        node.node.stats.bad_input.get() - bad0
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_unknown_route_is_404_and_wrong_method_405() {
    let node = TestNode::start().await;
    let mut by = Bystander::join(&node, "bystander").await;
    for path in ["/v1/nope", "/nope", "/v1/topics/t/events/extra", "/v2/ws"] {
        let resp = node.http.get(node.url(path)).send().await.unwrap();
        expect_error(resp, 404).await;
    }
    for (method, path) in [
        (reqwest::Method::DELETE, "/v1/topics/t/events"),
        (reqwest::Method::PUT, "/v1/topics/t/events"),
        (reqwest::Method::POST, "/v1/topics/t"),
        (reqwest::Method::GET, "/v1/publish"),
        (reqwest::Method::POST, "/healthz"),
    ] {
        let resp = node
            .http
            .request(method.clone(), node.url(path))
            .body("{}")
            .send()
            .await
            .unwrap();
        expect_error(resp, 405).await;
    }
    assert_eq!(node.state("t").await.offset, 0);
    by.assert_served().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_batch_publish_is_all_or_nothing() {
    let node = TestNode::start_with(|c| {
        c.limits.max_batch_events = 5;
        c.limits.max_message_bytes = 1024;
    })
    .await;
    let mut by = Bystander::join(&node, "bystander").await;
    node.publish("batch.a", "1").await;
    node.publish("batch.b", "1").await;
    // A live subscriber of batch.a must see nothing of the refused batches.
    let mut watcher = WsClient::connect(node.addr).await;
    assert_ok(&watcher.request(subscribe_cmd("batch.a", None)).await);
    let bad0 = node.node.stats.bad_input.get();
    let batch = |body: String| {
        node.http
            .post(node.url("/v1/publish"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let item = |topic: &str, data: &str| format!(r#"{{"topic":"{topic}","data":{data}}}"#);
    let events = |items: Vec<String>| format!(r#"{{"events":[{}]}}"#, items.join(","));

    // One bad item anywhere: 400 and nothing published.
    let big = format!("\"{}\"", "x".repeat(2000));
    for (items, code) in [
        (
            vec![
                item("batch.a", "2"),
                item("bad/topic", "2"),
                item("batch.b", "2"),
            ],
            400,
        ),
        (
            vec![item("batch.a", "2"), item("batch.b", "2"), item("", "2")],
            400,
        ),
        (
            vec![
                item("batch.a", "2"),
                r#"{"topic":"batch.b","data":2,"type":"no spaces"}"#.into(),
            ],
            400,
        ),
        (
            vec![
                item("batch.a", "2"),
                r#"{"topic":"batch.b","data":2,"extra":1}"#.into(),
            ],
            400,
        ),
        (vec![item("batch.a", "2"), item("batch.b", &big)], 413),
        // Over max_batch_events.
        (
            (0..6).map(|i| item("batch.a", &i.to_string())).collect(),
            413,
        ),
    ] {
        expect_error(batch(events(items)).await.unwrap(), code).await;
    }
    for body in [
        "not json",
        r#"{"events":[{"topic":"batch.a"}]}"#,
        r#"{"evnts":[]}"#,
    ] {
        expect_error(batch(body.into()).await.unwrap(), 400).await;
    }
    assert_eq!(node.state("batch.a").await.offset, 1, "batch.a unchanged");
    assert_eq!(node.state("batch.b").await.offset, 1, "batch.b unchanged");

    // A good batch of exactly the limit goes through.
    let resp = batch(events(
        (0..5)
            .map(|i| item(if i % 2 == 0 { "batch.a" } else { "batch.b" }, "3"))
            .collect(),
    ))
    .await
    .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(node.state("batch.a").await.offset, 4);
    assert_eq!(node.state("batch.b").await.offset, 3);
    assert_eq!(
        watcher.next_event().await.unwrap().offset,
        2,
        "the first event the watcher sees is from the good batch"
    );

    by.assert_served().await;
    assert!(
        node.node.stats.bad_input.get() - bad0 >= 9,
        "9 refused batches, bad_input grew by {}",
        node.node.stats.bad_input.get() - bad0
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_refused_before_routing_carry_the_json_error_body() {
    let node = TestNode::start().await;
    let mut by = Bystander::join(&node, "bystander").await;
    let limits = node.node.config.limits.clone();
    let bad0 = node.node.stats.bad_input.get();
    let get = |target: &str, headers: &str| {
        format!("GET {target} HTTP/1.1\r\nhost: weft\r\n{headers}\r\n").into_bytes()
    };
    let many_fields: String = (0..101).map(|i| format!("x-f{i}: v\r\n")).collect();
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        // hyper's own refusals, rewritten with the body.
        ("garbage request line", b"GARBAGE\r\n\r\n".to_vec(), 400),
        (
            "header line without a colon",
            get("/healthz", "no colon here\r\n"),
            400,
        ),
        (
            "space in a header name",
            get("/healthz", "bad name: v\r\n"),
            400,
        ),
        (
            "control byte in the target",
            b"GET /he\x01lthz HTTP/1.1\r\nhost: w\r\n\r\n".to_vec(),
            400,
        ),
        (
            "unknown HTTP version",
            b"GET /healthz HTTP/9.9\r\nhost: w\r\n\r\n".to_vec(),
            400,
        ),
        (
            "non-numeric Content-Length",
            get("/healthz", "content-length: ten\r\n"),
            400,
        ),
        ("101 header fields", get("/healthz", &many_fields), 431),
        (
            "target past hyper's 65,534 bytes",
            get(&format!("/healthz?q={}", "a".repeat(65 * 1024)), ""),
            414,
        ),
        (
            "head past the read buffer",
            get(
                "/healthz",
                &format!("x-big: {}\r\n", "b".repeat(100 * 1024)),
            ),
            431,
        ),
        // Our documented limits, under hyper's.
        (
            "target past limits.max_uri_bytes",
            get(
                &format!("/healthz?q={}", "a".repeat(limits.max_uri_bytes)),
                "",
            ),
            414,
        ),
        (
            "header block past limits.max_header_bytes",
            get(
                "/healthz",
                &format!("x-big: {}\r\n", "b".repeat(limits.max_header_bytes)),
            ),
            431,
        ),
    ];
    let n = cases.len() as u64;
    for (what, request, code) in cases {
        let resp = exchange(node.addr, LOCAL_A, request).await;
        assert_eq!(resp.status, code, "{what}: {resp:?}");
        if let Err(e) = resp.check_error_body() {
            panic!("{what}: {e}");
        }
    }
    // Just under the limits is served.
    let fits = format!("/healthz?q={}", "a".repeat(limits.max_uri_bytes - 20));
    let resp = exchange(node.addr, LOCAL_A, get(&fits, "x-ok: 1\r\n")).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    by.assert_served().await;
    assert_eq!(
        node.node.stats.bad_input.get() - bad0,
        n,
        "every refused head is counted once"
    );
    let metrics = node.http.get(node.url("/metrics")).send().await.unwrap();
    let text = metrics.text().await.unwrap();
    assert!(
        text.lines().any(|l| l.starts_with("weft_bad_input_total")),
        "weft_bad_input_total is exported"
    );
    node.stop().await;
}

// ---------------------------------------------------------------------------------
// Connections

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_request_line_is_closed_after_the_handshake_timeout() {
    let node = TestNode::start_with(|c| c.timing.handshake_timeout_ms = 300).await;
    let mut by = Bystander::join(&node, "bystander").await;
    let refused0 = node.node.stats.connections_refused.get();

    let mut stalled = TcpStream::connect(node.addr).await.unwrap();
    stalled.write_all(b"GET /v1/topics/x HTT").await.unwrap();
    let started = Instant::now();
    let closer = tokio::spawn(async move {
        expect_closed(&mut stalled, Duration::from_secs(3)).await;
        started.elapsed()
    });
    // Meanwhile everyone else is served.
    by.assert_served().await;
    let (status, _) = node.get_json("/healthz").await;
    assert_eq!(status, 200);
    let took = closer.await.unwrap();
    assert!(
        took >= Duration::from_millis(250) && took <= Duration::from_secs(2),
        "stalled connection closed after {took:?}, expected ~300 ms"
    );
    by.assert_served().await;
    assert!(
        node.node.stats.connections_refused.get() > refused0,
        "a handshake that never finished is not counted in connections_refused"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_and_silent_handshakes_are_closed_too() {
    let node = TestNode::start_with(|c| c.timing.handshake_timeout_ms = 300).await;
    let mut by = Bystander::join(&node, "bystander").await;

    // Slowloris: one header byte every 50 ms never completes a head within 300 ms.
    let mut trickle = TcpStream::connect(node.addr).await.unwrap();
    let started = Instant::now();
    let request = b"GET /healthz HTTP/1.1\r\nhost: weft\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut closed_after = None;
    for b in request {
        if trickle.write_all(&[*b]).await.is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        let mut probe = [0u8; 256];
        if let Ok(r) =
            tokio::time::timeout(Duration::from_millis(50), trickle.read(&mut probe)).await
        {
            if matches!(r, Ok(0) | Err(_)) {
                closed_after = Some(started.elapsed());
                break;
            }
        }
    }
    let took = closed_after.expect("a trickled request head was never cut off");
    assert!(
        took <= Duration::from_secs(2),
        "trickled connection closed only after {took:?}"
    );

    // A connection that sends nothing at all.
    let mut silent = TcpStream::connect(node.addr).await.unwrap();
    let started = Instant::now();
    expect_closed(&mut silent, Duration::from_secs(3)).await;
    assert!(
        started.elapsed() <= Duration::from_secs(2),
        "silent connection closed after {:?}",
        started.elapsed()
    );
    by.assert_served().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_kept_alive_connection_is_closed_but_not_counted_as_refused() {
    let node = TestNode::start_with(|c| c.timing.handshake_timeout_ms = 300).await;
    let refused0 = node.node.stats.connections_refused.get();

    // Two requests on one kept-alive connection, then silence past the timeout.
    let mut kept = TcpStream::connect(node.addr).await.unwrap();
    assert_eq!(healthz_on(&mut kept).await, 200);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        healthz_on(&mut kept).await,
        200,
        "a connection idle for less than the timeout is still served"
    );
    let started = Instant::now();
    let rest = expect_closed(&mut kept, Duration::from_secs(3)).await;
    assert!(rest.is_empty(), "an idle close writes nothing: {rest:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed after {:?}, before the idle bound",
        started.elapsed()
    );
    assert_eq!(
        node.node.stats.connections_refused.get(),
        refused0,
        "closing an idle kept-alive connection is not a refusal"
    );

    // A connection whose first request never completes is still one.
    let mut stalled = TcpStream::connect(node.addr).await.unwrap();
    stalled.write_all(b"GET /healthz HTT").await.unwrap();
    expect_closed(&mut stalled, Duration::from_secs(3)).await;
    let deadline = Instant::now() + Duration::from_secs(2);
    while node.node.stats.connections_refused.get() == refused0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(node.node.stats.connections_refused.get(), refused0 + 1);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_per_ip_limit_get_a_canned_429() {
    let node = TestNode::start_with(|c| c.limits.max_connections_per_ip = 2).await;
    // The bystander and its publisher come from other addresses.
    let mut by = Bystander::join_from(&node, "bystander", LOCAL_B, LOCAL_C).await;
    let refused0 = node.node.stats.connections_refused.get();

    let mut first = tcp_from(node.addr, LOCAL_A).await;
    let mut second = tcp_from(node.addr, LOCAL_A).await;
    // Served (so admitted), and kept alive.
    assert_eq!(healthz_on(&mut first).await, 200);
    assert_eq!(healthz_on(&mut second).await, 200);

    let mut third = tcp_from(node.addr, LOCAL_A).await;
    let resp = read_response(&mut third).await;
    assert_eq!(resp.status, 429, "{resp:?}");
    assert!(
        resp.header("retry-after").is_some(),
        "429 without Retry-After"
    );
    assert!(resp
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/json")));
    assert_eq!(resp.json()["error"]["code"], 429);
    expect_closed(&mut third, Duration::from_secs(2)).await;
    assert!(node.node.stats.connections_refused.get() > refused0);

    by.assert_served().await;
    // The admitted ones are unaffected.
    assert_eq!(healthz_on(&mut second).await, 200);

    // Once one closes, a new connection is accepted (bounded retry: the server notices
    // the close asynchronously).
    drop(first);
    let mut accepted = false;
    for _ in 0..40 {
        let mut s = tcp_from(node.addr, LOCAL_A).await;
        // A refused connection is answered at once, before any request.
        let mut probe = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(200), s.peek(&mut probe)).await {
            Err(_) => {
                assert_eq!(healthz_on(&mut s).await, 200);
                accepted = true;
                break;
            }
            Ok(_) => {
                let resp = read_response(&mut s).await;
                assert_eq!(resp.status, 429, "{resp:?}");
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        accepted,
        "a freed place was never given to a new connection"
    );
    by.assert_served().await;
    node.stop().await;
}
