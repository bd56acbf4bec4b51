//! Reconnecting with a cursor resumes with no gap and no duplicate, on every transport
//! that carries one: WebSocket `since`, SSE `Last-Event-ID`, long-poll `since`, and
//! the multi-topic SSE id. A cursor outside retention or of another epoch gets
//! 410 / `recovered:false` / `event: reset` with the current cursor. GET state then
//! watch since its offset misses nothing and repeats nothing.

use weft_node::config::NamespaceConfig;
use weft_proto::{MultiCursor, SubscribeResult};
use weft_testkit::{
    assert_contiguous, page_offsets, subscribe_cmd, HttpStream, Kind, Sub, TestNode, WsIn,
};

async fn publish_n(node: &TestNode, topic: &str, from: usize, n: usize) {
    for i in from..from + n {
        node.publish(topic, &format!(r#"{{"i":{i}}}"#)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_since_recovers_missed_events() {
    let node = TestNode::start().await;
    let epoch = node.state("room").await.epoch;
    let mut first = Sub::open(&node, Kind::Ws, "room", &format!("{epoch}:0")).await;
    publish_n(&node, "room", 0, 5).await;
    let seen = first.take(5).await;
    assert_contiguous(&seen, 1);
    drop(first);
    // Missed while away.
    publish_n(&node, "room", 5, 7).await;
    let mut c = weft_testkit::WsClient::connect(node.addr).await;
    let reply = c
        .request(subscribe_cmd("room", Some(&format!("{epoch}:5"))))
        .await;
    let r: SubscribeResult = serde_json::from_str(reply.result.unwrap().get()).unwrap();
    assert_eq!(
        (r.recovered, r.offset, r.epoch.as_str()),
        (Some(true), 12, epoch.as_str())
    );
    let recovered: Vec<u64> = r.events.iter().map(|e| e.offset).collect();
    assert_eq!(recovered, (6..=12).collect::<Vec<_>>());
    // Live events continue right after the recovered ones.
    publish_n(&node, "room", 12, 3).await;
    for expect in 13..=15 {
        assert_eq!(c.next_event().await.unwrap().offset, expect);
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_last_event_id_wins_over_the_original_since() {
    let node = TestNode::start().await;
    let epoch = node.state("feed").await.epoch;
    let url = node.url(&format!(
        "/v1/topics/feed/events?watch=true&since={epoch}:0"
    ));
    let mut s = HttpStream::open(&node.http, &url, &[]).await;
    publish_n(&node, "feed", 0, 4).await;
    let mut last_id = String::new();
    for expect in 1..=4 {
        let ev = s.next_sse().await.unwrap();
        assert_eq!(ev.event, "message");
        last_id = ev.id.unwrap();
        assert_eq!(last_id, format!("{epoch}:{expect}"));
    }
    drop(s);
    publish_n(&node, "feed", 4, 6).await;
    // A browser reconnects to the same URL (since=…:0) with Last-Event-ID.
    let mut s = HttpStream::open(&node.http, &url, &[("last-event-id", &last_id)]).await;
    for expect in 5..=10 {
        let ev = s.next_sse().await.unwrap();
        assert_eq!(
            ev.id.unwrap(),
            format!("{epoch}:{expect}"),
            "resumed without gap or repeat"
        );
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_since_resumes_and_waits() {
    let node = TestNode::start().await;
    let epoch = node.state("lp").await.epoch;
    publish_n(&node, "lp", 0, 3).await;
    let (status, page) = node
        .get_json(&format!("/v1/topics/lp/events?since={epoch}:1&wait=5"))
        .await;
    assert_eq!(status, 200);
    let offsets = page_offsets(&page);
    assert_eq!(offsets, vec![2, 3]);
    assert_eq!(page["next"], format!("{epoch}:3"));
    // Nothing new: the poll waits until an event arrives, then answers with it.
    let waiter = {
        let http = node.http.clone();
        let url = node.url(&format!("/v1/topics/lp/events?since={epoch}:3&wait=10"));
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let body: serde_json::Value =
                serde_json::from_slice(&http.get(url).send().await.unwrap().bytes().await.unwrap())
                    .unwrap();
            (started.elapsed(), body)
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    node.publish("lp", r#"{"late":true}"#).await;
    let (took, body) = waiter.await.unwrap();
    assert!(
        took >= std::time::Duration::from_millis(250),
        "answered before the event existed"
    );
    assert!(
        took < std::time::Duration::from_secs(5),
        "did not answer when the event arrived"
    );
    assert_eq!(body["events"][0]["offset"], 4);
    assert_eq!(body["next"], format!("{epoch}:4"));
    // wait=1 with nothing new answers empty with the same cursor.
    let (status, page) = node
        .get_json(&format!("/v1/topics/lp/events?since={epoch}:4&wait=1"))
        .await;
    assert_eq!((status, page["events"].as_array().unwrap().len()), (200, 0));
    assert_eq!(page["next"], format!("{epoch}:4"));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_topic_sse_id_resumes_every_topic() {
    let node = TestNode::start().await;
    let url = node.url("/v1/events?topic=a.x&topic=b.y&watch=true");
    let mut s = HttpStream::open(&node.http, &url, &[]).await;
    assert_eq!(s.status, 200);
    node.publish("a.x", r#"{"k":"a1"}"#).await;
    node.publish("b.y", r#"{"k":"b1"}"#).await;
    node.publish("a.x", r#"{"k":"a2"}"#).await;
    let mut last_id = String::new();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let ev = s.next_sse().await.unwrap();
        let env: weft_proto::Envelope = serde_json::from_str(&ev.data).unwrap();
        seen.push((env.topic.clone(), env.offset));
        last_id = ev.id.unwrap();
    }
    assert_eq!(
        seen,
        vec![("a.x".into(), 1), ("b.y".into(), 1), ("a.x".into(), 2)]
    );
    let cursors = MultiCursor::parse(&last_id, 8).unwrap();
    assert_eq!(cursors.get("a.x").unwrap().offset, 2);
    assert_eq!(cursors.get("b.y").unwrap().offset, 1);
    drop(s);
    node.publish("b.y", r#"{"k":"b2"}"#).await;
    node.publish("a.x", r#"{"k":"a3"}"#).await;
    let mut s = HttpStream::open(&node.http, &url, &[("last-event-id", &last_id)]).await;
    let mut resumed = Vec::new();
    for _ in 0..2 {
        let env: weft_proto::Envelope =
            serde_json::from_str(&s.next_sse().await.unwrap().data).unwrap();
        resumed.push((env.topic, env.offset));
    }
    resumed.sort();
    assert_eq!(resumed, vec![("a.x".into(), 3), ("b.y".into(), 2)]);
    node.stop().await;
}

async fn small_history_node() -> TestNode {
    TestNode::start_with(|c| {
        c.namespaces.push(NamespaceConfig {
            pattern: "short.>".into(),
            history_size: 3,
            ..Default::default()
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursor_out_of_retention_is_gone_everywhere() {
    let node = small_history_node().await;
    let epoch = node.state("short.t").await.epoch;
    publish_n(&node, "short.t", 0, 10).await;
    let current = format!("{epoch}:10");
    // Poll and long-poll: 410 with the current cursor.
    for q in ["", "&wait=2"] {
        let (status, body) = node
            .get_json(&format!("/v1/topics/short.t/events?since={epoch}:2{q}"))
            .await;
        assert_eq!(status, 410, "{body}");
        assert_eq!(body["error"]["code"], 410);
        assert_eq!(body["error"]["cursor"], current);
    }
    // The oldest kept cursor still works: offsets 8..=10 are kept, so since=7 is whole.
    let (status, body) = node
        .get_json(&format!("/v1/topics/short.t/events?since={epoch}:7"))
        .await;
    assert_eq!((status, body["events"].as_array().unwrap().len()), (200, 3));
    // WebSocket: recovered:false with the current cursor.
    let mut c = weft_testkit::WsClient::connect(node.addr).await;
    let reply = c
        .request(subscribe_cmd("short.t", Some(&format!("{epoch}:2"))))
        .await;
    let r: SubscribeResult = serde_json::from_str(reply.result.unwrap().get()).unwrap();
    assert_eq!(
        (r.recovered, r.offset, r.events.len()),
        (Some(false), 10, 0)
    );
    // …and it is subscribed from the current cursor on.
    node.publish("short.t", "11").await;
    assert_eq!(c.next_event().await.unwrap().offset, 11);
    // SSE: `event: reset` whose id is the current cursor, then the stream ends.
    let url = node.url(&format!(
        "/v1/topics/short.t/events?watch=true&since={epoch}:2"
    ));
    let mut s = HttpStream::open(&node.http, &url, &[]).await;
    let ev = s.next_sse().await.unwrap();
    assert_eq!(ev.event, "reset");
    assert_eq!(ev.id.as_deref(), Some(format!("{epoch}:11").as_str()));
    assert!(s.next_sse().await.is_none(), "stream ends after reset");
    // NDJSON: 410 before streaming.
    let ndj = HttpStream::open(
        &node.http,
        &url.replace("watch=true&", ""),
        &[("accept", "application/x-ndjson")],
    )
    .await;
    assert_eq!(ndj.status, 410);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_epoch_is_gone_and_multi_topic_resets_only_that_topic() {
    let node = TestNode::start().await;
    publish_n(&node, "a", 0, 2).await;
    publish_n(&node, "b", 0, 2).await;
    let ea = node.state("a").await.epoch;
    let (status, body) = node.get_json("/v1/topics/a/events?since=other:1").await;
    assert_eq!(
        (status, body["error"]["cursor"].as_str()),
        (410, Some(format!("{ea}:2").as_str()))
    );
    let eb = node.state("b").await.epoch;
    // `a` has a foreign cursor, `b` a good one.
    let id = format!("a=other:1,b={eb}:1");
    let url = node.url("/v1/events?topic=a&topic=b&watch=true");
    let mut s = HttpStream::open(&node.http, &url, &[("last-event-id", &id)]).await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let ev = s.next_sse().await.unwrap();
        got.push((ev.event.clone(), ev.data.clone(), ev.id.unwrap()));
    }
    let reset = got
        .iter()
        .find(|g| g.0 == "reset")
        .expect("reset for topic a");
    let data: serde_json::Value = serde_json::from_str(&reset.1).unwrap();
    assert_eq!(
        (data["topic"].as_str(), data["offset"].as_u64()),
        (Some("a"), Some(2))
    );
    let msg = got
        .iter()
        .find(|g| g.0 == "message")
        .expect("b's missed event");
    let env: weft_proto::Envelope = serde_json::from_str(&msg.1).unwrap();
    assert_eq!((env.topic.as_str(), env.offset), ("b", 2));
    // The stream goes on for both topics, and the id now carries a's current cursor.
    node.publish("a", r#"{"after":"reset"}"#).await;
    let ev = s.next_sse().await.unwrap();
    let env: weft_proto::Envelope = serde_json::from_str(&ev.data).unwrap();
    assert_eq!((env.topic.as_str(), env.offset), ("a", 3));
    let ids = MultiCursor::parse(&ev.id.unwrap(), 8).unwrap();
    assert_eq!(ids.get("a").unwrap().to_string(), format!("{ea}:3"));
    assert_eq!(ids.get("b").unwrap().to_string(), format!("{eb}:2"));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_then_watch_misses_nothing_and_repeats_nothing() {
    for kind in weft_testkit::ALL_KINDS {
        let node = TestNode::start().await;
        let topic = "live";
        publish_n(&node, topic, 0, 5).await;
        // A publisher keeps going while the client reads state and starts watching.
        let publisher = {
            let http = node.http.clone();
            let url = node.url(&format!("/v1/topics/{topic}/events"));
            tokio::spawn(async move {
                for i in 0..40 {
                    http.post(&url)
                        .header("content-type", "application/json")
                        .body(format!("{i}"))
                        .send()
                        .await
                        .unwrap();
                }
            })
        };
        let state = node.state(topic).await;
        let mut sub = Sub::open(
            &node,
            kind,
            topic,
            &format!("{}:{}", state.epoch, state.offset),
        )
        .await;
        publisher.await.unwrap();
        let remaining = (45 - state.offset) as usize;
        let events = sub.take(remaining).await;
        assert_contiguous(&events, state.offset + 1);
        assert_eq!(events.last().unwrap().offset, 45, "{kind:?}");
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_subscribe_returns_the_last_event() {
    let node = TestNode::start().await;
    publish_n(&node, "snap", 0, 3).await;
    let mut c = weft_testkit::WsClient::connect(node.addr).await;
    let cmd = weft_proto::Command::Subscribe(weft_proto::command::SubscribeCmd {
        topic: "snap".into(),
        since: None,
        snapshot: true,
    });
    let reply = c.request(cmd).await;
    let r: SubscribeResult = serde_json::from_str(reply.result.unwrap().get()).unwrap();
    assert_eq!(r.recovered, None);
    assert_eq!(
        r.events.iter().map(|e| e.offset).collect::<Vec<_>>(),
        vec![3]
    );
    assert_eq!(r.events[0].data.get(), r#"{"i":2}"#);
    let WsIn::Msg(_) = ({
        node.publish("snap", "4").await;
        c.next().await
    }) else {
        panic!("expected the next event")
    };
    node.stop().await;
}
