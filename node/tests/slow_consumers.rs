//! A client that stops reading never delays the other subscribers, the node's queue
//! memory stays inside the configured budget, and each slow-consumer policy is
//! observable by the client exactly as DESIGN §4 specifies:
//! - `disconnect`: the events it had, in order, then a `disconnect` push and close
//!   4008; resuming with its cursor recovers the rest from history — nothing lost;
//! - `conflate`: it keeps receiving, newest event last, and every skipped range is
//!   announced with a `skipped {from,to}` push — never a silent gap.

use weft_node::config::{NamespaceConfig, SlowConsumerPolicy};
use weft_proto::SubscribeResult;
use weft_testkit::{subscribe_cmd, HttpStream, TestNode, WsClient, WsIn};

const BUDGET: usize = 256 * 1024;
const EVENTS: u64 = 1500;
const PAD: usize = 16 * 1024;

async fn node() -> TestNode {
    TestNode::start_with(|c| {
        c.limits.outbound_queue_bytes = BUDGET;
        c.namespaces.push(NamespaceConfig {
            pattern: "conf.>".into(),
            slow_consumer: SlowConsumerPolicy::Conflate,
            history_size: 2000,
            ..Default::default()
        });
        c.namespaces.push(NamespaceConfig {
            pattern: "slow.>".into(),
            slow_consumer: SlowConsumerPolicy::Disconnect,
            history_size: 2000,
            ..Default::default()
        });
    })
    .await
}

/// Publishes EVENTS padded events one by one (about 24 MB: far past what the kernel's
/// socket buffers absorb) while a fast subscriber reads all along and must get every
/// one. The publisher stays at most WINDOW events ahead of the fast reader (well inside
/// its budget), so only the stalled client can be the slow one — and the fast one
/// progressing to the end shows the stalled one never held it back.
async fn publish_past_a_stalled_reader(node: &TestNode, topic: &str) {
    const WINDOW: u64 = 4;
    let mut fast = WsClient::connect(node.addr).await;
    assert!(fast
        .request(subscribe_cmd(topic, None))
        .await
        .result
        .is_some());
    let (progress_tx, mut progress) = tokio::sync::watch::channel(0u64);
    let reader = tokio::spawn(async move {
        for expect in 1..=EVENTS {
            let ev = fast
                .next_event()
                .await
                .expect("fast subscriber was cut off");
            assert_eq!(ev.offset, expect, "fast subscriber saw a gap");
            let _ = progress_tx.send(expect);
        }
    });
    let pad = "x".repeat(PAD);
    for i in 0..EVENTS {
        if i > WINDOW {
            let behind = i - WINDOW;
            tokio::time::timeout(weft_testkit::WAIT, progress.wait_for(|&got| got >= behind))
                .await
                .expect("fast subscriber stalled")
                .expect("fast reader ended early");
        }
        node.publish(topic, &format!(r#"{{"i":{i},"pad":"{pad}"}}"#))
            .await;
    }
    reader.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_policy_closes_4008_and_resume_recovers_everything() {
    let node = node().await;
    let topic = "slow.feed";
    let epoch = node.state(topic).await.epoch;
    let mut slow = WsClient::connect(node.addr).await;
    assert!(slow
        .request(subscribe_cmd(topic, Some(&format!("{epoch}:0"))))
        .await
        .result
        .is_some());
    publish_past_a_stalled_reader(&node, topic).await;
    assert!(node.node.stats.slow_consumer_closes.get() >= 1);
    // Now the slow client reads what reached it: contiguous events, then the notice.
    let mut last = 0;
    let close = loop {
        match slow.next().await {
            WsIn::Msg(m) => {
                let push = m.push.expect("only pushes follow");
                if let Some(ev) = push.event {
                    assert_eq!(ev.offset, last + 1, "gap before the disconnect");
                    last = ev.offset;
                } else {
                    let d = push
                        .disconnect
                        .expect("a disconnect push precedes the close");
                    assert_eq!((d.code, d.reconnect), (4008, true));
                }
            }
            WsIn::Closed(code) => break code,
        }
    };
    assert_eq!(close, Some(4008));
    assert!(last < EVENTS, "the slow client should have been cut off");
    let peak = node
        .node
        .stats
        .max_session_queue_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        peak as usize <= BUDGET,
        "queue peaked at {peak} bytes, budget {BUDGET}"
    );
    // Resume from its cursor: everything after `last` comes back from history.
    let mut again = WsClient::connect(node.addr).await;
    let reply = again
        .request(subscribe_cmd(topic, Some(&format!("{epoch}:{last}"))))
        .await;
    let r: SubscribeResult = serde_json::from_str(reply.result.unwrap().get()).unwrap();
    if r.recovered == Some(true) {
        let offsets: Vec<u64> = r.events.iter().map(|e| e.offset).collect();
        assert_eq!(offsets, (last + 1..=EVENTS).collect::<Vec<_>>());
    } else {
        // Too much to fit one session's budget: the client is told to page history.
        assert_eq!(r.recovered, Some(false));
        let (status, page) = node
            .get_json(&format!(
                "/v1/topics/{topic}/events?since={epoch}:{last}&limit=1000"
            ))
            .await;
        assert_eq!(status, 200);
        assert_eq!(
            page["events"][0]["offset"].as_u64(),
            Some(last + 1),
            "history still holds the rest"
        );
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflate_policy_marks_every_skip_and_ends_on_the_newest() {
    let node = node().await;
    let topic = "conf.ticker";
    let mut slow = WsClient::connect(node.addr).await;
    assert!(slow
        .request(subscribe_cmd(topic, None))
        .await
        .result
        .is_some());
    publish_past_a_stalled_reader(&node, topic).await;
    assert!(node.node.stats.conflated.get() > 0, "nothing was conflated");
    assert_eq!(node.node.stats.slow_consumer_closes.get(), 0);
    let mut next = 1;
    let mut skips = 0;
    while next <= EVENTS {
        let push = slow.next_msg().await.push.expect("push");
        if let Some(s) = push.skipped {
            assert_eq!(s.from, next, "skip must start where delivery stopped");
            assert!(s.to >= s.from);
            next = s.to + 1;
            skips += 1;
        } else if let Some(ev) = push.event {
            assert_eq!(ev.offset, next, "silent gap");
            next += 1;
        }
    }
    assert!(skips > 0);
    assert_eq!(next, EVENTS + 1, "the newest event is delivered last");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_sse_watcher_gets_a_disconnect_event() {
    let node = node().await;
    let topic = "slow.sse";
    let url = node.url(&format!("/v1/topics/{topic}/events?watch=true"));
    let mut slow = HttpStream::open(&node.http, &url, &[]).await;
    publish_past_a_stalled_reader(&node, topic).await;
    let mut last_id = None;
    let code = loop {
        let ev = slow
            .next_sse()
            .await
            .expect("stream ended without a disconnect event");
        match ev.event.as_str() {
            "message" => last_id = ev.id,
            "disconnect" => {
                let d: weft_proto::DisconnectPush = serde_json::from_str(&ev.data).unwrap();
                break d.code;
            }
            _ => {}
        }
    };
    assert_eq!(code, 4008);
    assert!(
        slow.next_sse().await.is_none(),
        "the stream ends after the notice"
    );
    assert!(last_id.is_some(), "some events arrived before the cut");
    node.stop().await;
}
