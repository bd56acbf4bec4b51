//! Every transport delivers every event of a topic in offset order, exactly once, to
//! every subscriber, while several publishers publish concurrently. One scenario,
//! run over WebSocket, SSE, NDJSON and long-poll.

use std::collections::HashMap;

use weft_testkit::{assert_contiguous, Kind, Sub, TestNode};

const PUBLISHERS: usize = 4;
const PER_PUBLISHER: usize = 50;
const TOPICS: [&str; 3] = ["orders.eu", "orders.us", "ticks:btc@x"];
const SUBS_PER_TOPIC: usize = 2;

async fn every_event_in_order_exactly_once(kind: Kind) {
    let node = TestNode::start().await;
    let mut subs = Vec::new();
    for topic in TOPICS {
        let state = node.state(topic).await;
        assert_eq!(state.offset, 0);
        for _ in 0..SUBS_PER_TOPIC {
            let since = format!("{}:0", state.epoch);
            subs.push((topic, Sub::open(&node, kind, topic, &since).await));
        }
    }
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let http = node.http.clone();
        let base = node.url("");
        publishers.push(tokio::spawn(async move {
            for n in 0..PER_PUBLISHER {
                for topic in TOPICS {
                    let resp = http
                        .post(format!("{base}/v1/topics/{topic}/events"))
                        .header("content-type", "application/json")
                        .body(format!(r#"{{"p":{p},"n":{n}}}"#))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(resp.status(), 201);
                }
            }
        }));
    }
    let total = PUBLISHERS * PER_PUBLISHER;
    let readers: Vec<_> = subs
        .into_iter()
        .map(|(topic, mut sub)| tokio::spawn(async move { (topic, sub.take(total).await) }))
        .collect();
    for p in publishers {
        p.await.unwrap();
    }
    for r in readers {
        let (topic, events) = r.await.unwrap();
        assert_contiguous(&events, 1);
        // Each publisher's own events arrive in the order it published them.
        let mut next_n: HashMap<u64, u64> = HashMap::new();
        for e in &events {
            let p = e.data["p"].as_u64().unwrap();
            let n = e.data["n"].as_u64().unwrap();
            let expect = next_n.entry(p).or_insert(0);
            assert_eq!(n, *expect, "{topic}: publisher {p} out of order");
            *expect += 1;
        }
        assert!(
            next_n.values().all(|&n| n == PER_PUBLISHER as u64),
            "{topic}: {next_n:?}"
        );
    }
    let stats = &node.node.stats;
    assert_eq!(stats.published.get(), (total * TOPICS.len()) as u64);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket() {
    every_event_in_order_exactly_once(Kind::Ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse() {
    every_event_in_order_exactly_once(Kind::Sse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndjson() {
    every_event_in_order_exactly_once(Kind::Ndjson).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll() {
    every_event_in_order_exactly_once(Kind::LongPoll).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_transports_on_one_topic_see_the_same_sequence() {
    let node = TestNode::start().await;
    let state = node.state("shared").await;
    let since = format!("{}:0", state.epoch);
    let mut subs = Vec::new();
    for kind in weft_testkit::ALL_KINDS {
        subs.push(Sub::open(&node, kind, "shared", &since).await);
    }
    for n in 0..30 {
        node.publish("shared", &format!(r#"{{"n":{n}}}"#)).await;
    }
    let mut seqs = Vec::new();
    for mut s in subs {
        let events = s.take(30).await;
        assert_contiguous(&events, 1);
        seqs.push(events.iter().map(|e| e.data.clone()).collect::<Vec<_>>());
    }
    assert!(seqs.windows(2).all(|w| w[0] == w[1]), "transports disagree");
    node.stop().await;
}
