//! The rest of the contract a client relies on: server pings and dead-peer detection,
//! SSE keepalives and bookmarks, `Idempotency-Key`, batch publish, presence, and the
//! WebSocket `history` command.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_node::config::NamespaceConfig;
use weft_proto::command::{HistoryCmd, PresenceCmd, UnsubscribeCmd};
use weft_proto::{Command, HistoryResult, PresenceResult};
use weft_testkit::sse::SseItem;
use weft_testkit::{subscribe_cmd, HttpStream, TestNode, WsClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_answers_pings_is_dropped_and_a_live_one_is_kept() {
    let node = TestNode::start_with(|c| c.timing.ping_interval_ms = 200).await;
    // A well-behaved client: tokio-tungstenite answers pings on its own while read.
    let mut live = WsClient::connect(node.addr).await;
    assert!(live
        .request(subscribe_cmd("keep", None))
        .await
        .result
        .is_some());
    // Reading all along is what makes it answer pings.
    let live_reader = tokio::spawn(async move { live.next_event().await.map(|e| e.offset) });
    // A raw client that completes the handshake and then never reads or answers.
    let mut dead = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    dead.write_all(
        b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    let mut pings = 0;
    // Read what the server sends: the 101, pings (0x89 0x00), then EOF when it gives up.
    let closed_after = loop {
        match tokio::time::timeout(Duration::from_secs(5), dead.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break started.elapsed(),
            Ok(Ok(n)) => pings += buf[..n].windows(2).filter(|w| w == &[0x89, 0x00]).count(),
            Err(_) => panic!("server never dropped the silent peer"),
        }
    };
    assert!(pings >= 1, "the server pings");
    assert!(
        closed_after >= Duration::from_millis(400),
        "dropped too early: {closed_after:?}"
    );
    assert!(
        closed_after < Duration::from_secs(3),
        "dropped too late: {closed_after:?}"
    );
    // The live client outlived it and still gets events.
    node.publish("keep", "1").await;
    assert_eq!(
        live_reader.await.unwrap(),
        Some(1),
        "the answering client was kept"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sse_watchers_get_keepalives_and_bookmarks_with_their_cursor() {
    let node = TestNode::start_with(|c| {
        c.timing.sse_keepalive_ms = 100;
        c.timing.bookmark_interval_ms = 150;
    })
    .await;
    node.publish("quiet", "1").await;
    node.publish("quiet", "2").await;
    let epoch = node.state("quiet").await.epoch;
    let mut s = HttpStream::open(
        &node.http,
        &node.url("/v1/topics/quiet/events?watch=true"),
        &[],
    )
    .await;
    let (mut pings, mut bookmark) = (0, None);
    while bookmark.is_none() || pings == 0 {
        match s.next_sse_item().await.unwrap() {
            SseItem::Comment(c) if c == "ping" => pings += 1,
            SseItem::Comment(_) => {}
            SseItem::Event(ev) => {
                if let Some(id) = &ev.id {
                    assert_eq!(
                        *id,
                        format!("{epoch}:2"),
                        "a bookmark carries the watcher's cursor"
                    );
                }
                if ev.event == "bookmark" {
                    bookmark = Some(ev.data);
                }
            }
        }
    }
    let data: serde_json::Value = serde_json::from_str(&bookmark.unwrap()).unwrap();
    assert_eq!(data["cursor"], format!("{epoch}:2"));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_publishes_once() {
    let node = TestNode::start().await;
    let post = |key: &'static str| {
        node.http
            .post(node.url("/v1/topics/pay/events"))
            .header("content-type", "application/json")
            .header("Idempotency-Key", key)
            .body(r#"{"amount":5}"#)
            .send()
    };
    let first = post("k-1").await.unwrap();
    assert_eq!(first.status(), 201);
    let first: serde_json::Value = first.json_body().await;
    let again = post("k-1").await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: serde_json::Value = again.json_body().await;
    assert_eq!(first, again, "the replay names the original offset");
    let other: serde_json::Value = post("k-2").await.unwrap().json_body().await;
    assert_eq!(other["offset"], 2);
    assert_eq!(
        node.state("pay").await.offset,
        2,
        "the repeat was not published"
    );
    node.stop().await;
}

/// A key reused with another body is `422` for the whole idempotency window, also
/// once the first event has left history; the same body still replays the first
/// result. The event type is part of the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_with_another_body_is_422_after_the_event_left_history() {
    let node = TestNode::start_with(|c| {
        c.namespaces.push(NamespaceConfig {
            pattern: "short.>".into(),
            history_size: 2,
            ..Default::default()
        })
    })
    .await;
    let post = |key: &'static str, body: &'static str, kind: Option<&'static str>| {
        let mut req = node
            .http
            .post(node.url("/v1/topics/short.pay/events"))
            .header("content-type", "application/json")
            .header("Idempotency-Key", key)
            .body(body);
        if let Some(k) = kind {
            req = req.header("weft-event-type", k);
        }
        req.send()
    };
    let first = post("k", r#"{"amount":5}"#, None).await.unwrap();
    assert_eq!(first.status(), 201);
    let first: serde_json::Value = first.json_body().await;
    assert_eq!(first["offset"], 1);
    // While the event is in history, and after three more push it out of it.
    for round in ["in history", "out of history"] {
        let other = post("k", r#"{"amount":500}"#, None).await.unwrap();
        assert_eq!(other.status(), 422, "{round}: another body");
        let e: serde_json::Value = other.json_body().await;
        assert_eq!(e["error"]["code"], 422);
        let typed = post("k", r#"{"amount":5}"#, Some("refund")).await.unwrap();
        assert_eq!(typed.status(), 422, "{round}: same data, another type");
        let same = post("k", r#"{"amount":5}"#, None).await.unwrap();
        assert_eq!(same.status(), 200, "{round}: the same body replays");
        assert_eq!(same.headers()["idempotent-replayed"], "true");
        let same: serde_json::Value = same.json_body().await;
        assert_eq!(same, first, "{round}: the first result");
        if round == "in history" {
            for i in 0..3 {
                node.publish("short.pay", &format!(r#"{{"other":{i}}}"#))
                    .await;
            }
            let epoch = node.state("short.pay").await.epoch;
            let (status, page) = node
                .get_json(&format!("/v1/topics/short.pay/events?since={epoch}:2"))
                .await;
            assert_eq!(status, 200);
            assert_eq!(weft_testkit::page_offsets(&page), [3, 4]);
            let (status, _) = node
                .get_json(&format!("/v1/topics/short.pay/events?since={epoch}:0"))
                .await;
            assert_eq!(status, 410, "offset 1 is out of history");
        }
    }
    assert_eq!(
        node.state("short.pay").await.offset,
        4,
        "no refused body was published"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_publish_sequences_each_topic() {
    let node = TestNode::start().await;
    let body = r#"{"events":[{"topic":"a","data":1},{"topic":"b","data":{"x":2},"type":"t"},{"topic":"a","data":[3]}]}"#;
    let resp = node
        .http
        .post(node.url("/v1/publish"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let r: weft_proto::BatchResult = resp.json_body().await;
    let got: Vec<(String, u64)> = r
        .results
        .iter()
        .map(|p| (p.topic.clone(), p.offset))
        .collect();
    assert_eq!(got, vec![("a".into(), 1), ("b".into(), 1), ("a".into(), 2)]);
    let b = node.state("b").await;
    let last = b.last.unwrap();
    assert_eq!(
        (last.kind.as_deref(), last.data.get()),
        (Some("t"), r#"{"x":2}"#)
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_lists_subscribers_and_pushes_join_and_leave() {
    let node = TestNode::start_with(|c| {
        c.namespaces.push(NamespaceConfig {
            pattern: "room.>".into(),
            presence: true,
            ..Default::default()
        })
    })
    .await;
    let mut alice = WsClient::connect(node.addr).await;
    assert!(alice
        .request(subscribe_cmd("room.1", None))
        .await
        .result
        .is_some());
    let mut bob = WsClient::connect(node.addr).await;
    assert!(bob
        .request(subscribe_cmd("room.1", None))
        .await
        .result
        .is_some());
    let join = alice.next_msg().await.push.unwrap();
    let bob_id = join.join.expect("alice sees bob join").client;
    let reply = alice
        .request(Command::Presence(PresenceCmd {
            topic: "room.1".into(),
        }))
        .await;
    let p: PresenceResult = serde_json::from_str(reply.result.unwrap().get()).unwrap();
    assert_eq!(p.clients.len(), 2);
    assert!(p.clients.iter().any(|c| c.client == bob_id));
    let (status, body) = node.get_json("/v1/topics/room.1/presence").await;
    assert_eq!(
        (status, body["clients"].as_array().unwrap().len()),
        (200, 2)
    );
    assert!(bob
        .request(Command::Unsubscribe(UnsubscribeCmd {
            topic: "room.1".into()
        }))
        .await
        .result
        .is_some());
    let leave = alice.next_msg().await.push.unwrap();
    assert_eq!(leave.leave.unwrap().client, bob_id);
    // Presence is off elsewhere.
    let (status, _) = node.get_json("/v1/topics/other/presence").await;
    assert_eq!(status, 403);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_history_pages_and_tail() {
    let node = TestNode::start().await;
    for i in 1..=10 {
        node.publish("h", &i.to_string()).await;
    }
    let epoch = node.state("h").await.epoch;
    let mut c = WsClient::connect(node.addr).await;
    let page = |since: Option<String>, limit| {
        Command::History(HistoryCmd {
            topic: "h".into(),
            since,
            limit: Some(limit),
        })
    };
    let r: HistoryResult = serde_json::from_str(
        c.request(page(Some(format!("{epoch}:2")), 3))
            .await
            .result
            .unwrap()
            .get(),
    )
    .unwrap();
    assert_eq!(
        r.events.iter().map(|e| e.offset).collect::<Vec<_>>(),
        vec![3, 4, 5]
    );
    assert_eq!((r.next, r.offset), (format!("{epoch}:5"), 10));
    let r: HistoryResult =
        serde_json::from_str(c.request(page(None, 2)).await.result.unwrap().get()).unwrap();
    assert_eq!(
        r.events.iter().map(|e| e.offset).collect::<Vec<_>>(),
        vec![9, 10],
        "tail without since"
    );
    let err = c.request(page(Some("zz:1".into()), 2)).await.error.unwrap();
    assert_eq!((err.code, err.cursor), (410, Some(format!("{epoch}:10"))));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_refuses_publishes_and_closes_connections_after_answering() {
    let node = TestNode::start_with(|c| c.timing.shutdown_grace_ms = 5000).await;
    node.publish("d", "1").await;
    let mut ws = WsClient::connect(node.addr).await;
    node.node.begin_shutdown();
    let resp = node
        .http
        .post(node.url("/v1/topics/d/events"))
        .header("content-type", "application/json")
        .body("2")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    assert_eq!(resp.headers()["connection"], "close");
    let resp = node.http.get(node.url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    let publish = Command::Publish(weft_proto::command::PublishCmd {
        topic: "d".into(),
        data: serde_json::value::RawValue::from_string("3".into()).unwrap(),
        kind: None,
    });
    let err = ws
        .request(publish)
        .await
        .error
        .expect("publish refused while draining");
    assert_eq!(err.code, 503);
    assert_eq!(
        node.state("d").await.offset,
        1,
        "nothing acknowledged during the drain"
    );
    node.stop().await;
}

/// Decodes a reqwest response body as JSON (reqwest is built without its json feature).
trait JsonBody {
    async fn json_body<T: serde::de::DeserializeOwned>(self) -> T;
}

impl JsonBody for reqwest::Response {
    async fn json_body<T: serde::de::DeserializeOwned>(self) -> T {
        serde_json::from_slice(&self.bytes().await.unwrap()).unwrap()
    }
}

/// `POST /v1/admin/drain` on a standalone node drains it as SIGTERM does: readiness
/// goes false at once, sessions are told to reconnect, and the node stops serving
/// within its grace period without any signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_drain_stops_a_standalone_node_within_its_grace() {
    let mut config = weft_node::Config::default();
    config.timing.shutdown_grace_ms = 1000;
    let node = weft_node::Node::new(config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = tokio::spawn(weft_node::transport::server::serve(
        node.clone(),
        listener,
        std::future::pending(),
    ));
    let mut ws = WsClient::connect(addr).await;
    assert!(ws
        .request(subscribe_cmd("drained", None))
        .await
        .result
        .is_some());
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("http://{addr}/v1/admin/drain"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert!(!node.is_ready(), "readiness goes false at once");
    // The session is told to reconnect elsewhere before it is closed.
    let mut told = false;
    while let Ok(msg) = tokio::time::timeout(Duration::from_secs(3), ws.next()).await {
        match msg {
            weft_testkit::WsIn::Msg(m) => {
                if let Some(push) = m.push {
                    told |= push.disconnect.is_some_and(|d| d.reconnect);
                }
            }
            _ => break,
        }
    }
    assert!(told, "the session got disconnect{{reconnect:true}}");
    tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("the node stops within its grace")
        .unwrap()
        .unwrap();
}
