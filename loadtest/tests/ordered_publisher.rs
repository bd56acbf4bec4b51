//! `--ordered` really keeps at most one publish in flight per topic, in schedule
//! order: a fake node counts, per topic, the requests it holds at once while each
//! acknowledgement takes 15 ms. The same server shows several in flight per topic
//! without `--ordered`, so the count can tell the two apart. Against an in-process
//! node, an ordered run's books add up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::time::Instant;
use weft_loadtest::app;
use weft_loadtest::cli::Cli;
use weft_loadtest::plan::{topic_names, Layout, Plan, ScenarioKind, Slot};
use weft_loadtest::publisher::{Publisher, Via};
use weft_loadtest::recorder::Recorder;
use weft_loadtest::stamp::{now_us, Stamp};
use weft_loadtest::stats::{ErrorLog, LiveStats};

mod common;

/// What the fake node saw, per topic path.
#[derive(Default)]
struct Seen {
    inflight: HashMap<String, usize>,
    max_inflight: HashMap<String, usize>,
    order: HashMap<String, Vec<u64>>,
}

/// A keep-alive HTTP/1.1 server answering every POST with 201 after `delay`.
async fn fake_node(delay: Duration) -> (std::net::SocketAddr, Arc<Mutex<Seen>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let state = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let state = state.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(s);
                loop {
                    let mut path = String::new();
                    let mut len = 0usize;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        if path.is_empty() {
                            path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                        }
                    }
                    let mut body = vec![0; len];
                    if r.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let s = Stamp::decode(std::str::from_utf8(&body).unwrap())
                        .unwrap()
                        .s;
                    {
                        let mut st = state.lock().unwrap();
                        st.order.entry(path.clone()).or_default().push(s);
                        let n = st.inflight.entry(path.clone()).or_default();
                        *n += 1;
                        let n = *n;
                        let m = st.max_inflight.entry(path.clone()).or_default();
                        *m = (*m).max(n);
                    }
                    tokio::time::sleep(delay).await;
                    *state.lock().unwrap().inflight.get_mut(&path).unwrap() -= 1;
                    let body = r#"{"topic":"t","epoch":"e","offset":1}"#;
                    let msg = format!(
                        "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if r.get_mut().write_all(msg.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

async fn publish(
    ordered: bool,
    ack_delay: Duration,
    timeout: Duration,
) -> (Arc<Mutex<Seen>>, weft_loadtest::publisher::PublishOutcome) {
    let (addr, seen) = fake_node(ack_delay).await;
    // 2 topics, 200 events/s each: an event every 5 ms per topic, each acknowledged
    // after 15 ms — an unordered publisher has about three per topic in flight.
    let plan = Plan {
        kind: ScenarioKind::Fanout,
        topics: topic_names("lt", "ord", ScenarioKind::Fanout, 2),
        subscribers: 1,
        layout: Layout::RoundRobin,
        rate: 400.0,
        duration: Duration::from_millis(500),
        payload_bytes: 64,
        churn: None,
        restart: None,
        subscribe: None,
    };
    let publisher = Arc::new(Publisher {
        net: common::plain_net(addr).await,
        topics: Arc::new(plan.topics.clone()),
        recorder: Arc::new(Recorder::new()),
        stats: Arc::new(LiveStats::default()),
        errors: Arc::new(ErrorLog::default()),
        run_id: "ord".into(),
        max_inflight: 64,
        timeout,
        epoch_ends: Default::default(),
        ordered,
        via: Via::Http,
        bytes: Default::default(),
        last_ack_us: Default::default(),
    });
    let start_us = now_us() + 50_000;
    let start = Instant::now() + Duration::from_micros(50_000);
    let out = publisher.run(&plan, Slot::default(), start, start_us).await;
    (seen, out)
}

#[tokio::test]
async fn ordered_mode_has_at_most_one_publish_in_flight_per_topic() {
    let (seen, out) = publish(true, Duration::from_millis(15), Duration::from_secs(10)).await;
    assert_eq!((out.published, out.failed, out.offered), (200, 0, 200));
    let st = seen.lock().unwrap();
    assert_eq!(st.max_inflight.len(), 2, "both topics published");
    for (path, max) in &st.max_inflight {
        assert_eq!(*max, 1, "{path}: {max} publishes in flight at once");
    }
    for (path, order) in &st.order {
        assert_eq!(order.len(), 100, "{path}");
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "{path}: sent in schedule order: {order:?}"
        );
    }
}

#[tokio::test]
async fn unordered_mode_overlaps_publishes_on_a_topic() {
    let (seen, out) = publish(false, Duration::from_millis(15), Duration::from_secs(10)).await;
    assert_eq!(out.published, 200);
    let st = seen.lock().unwrap();
    assert!(
        st.max_inflight.values().all(|&m| m >= 2),
        "the fake node counts overlap: {:?}",
        st.max_inflight
    );
}

/// Acknowledgements slower than the schedule by more than --publish-timeout: each
/// topic's publisher stops at the first event that is that late, and the rest of its
/// events are counted unsent (not failed, not silently dropped).
#[tokio::test]
async fn an_ordered_publisher_too_far_behind_stops_and_counts_the_rest_unsent() {
    let (seen, out) = publish(true, Duration::from_millis(400), Duration::from_millis(200)).await;
    // Per topic: event 0 is acknowledged after 400 ms; event 1 was due at 5 ms and is
    // then 395 ms late, more than 200 ms: the topic stops.
    assert_eq!(out.offered, 200);
    assert_eq!((out.published, out.failed, out.unsent), (2, 0, 198));
    let st = seen.lock().unwrap();
    assert!(st.max_inflight.values().all(|&m| m == 1));
}

#[tokio::test]
async fn ordered_fanout_against_a_node_adds_up() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let config = weft_node::Config {
        node_id: format!("ordered-{}", std::process::id()),
        ..Default::default()
    };
    let node = tokio::spawn(weft_node::run(listener, config, async move {
        let _ = rx.await;
    }));
    let target = format!("http://{addr}");
    let cli = Cli::try_parse_from([
        "weft-loadtest",
        "fanout",
        "--ordered",
        "--target",
        &target,
        "--subscribers",
        "20",
        "--topics",
        "2",
        "--rate",
        "200",
        "--payload-bytes",
        "100",
        "--duration",
        "2s",
        "--quiet",
    ])
    .unwrap();
    let r = app::execute(&cli.command).await.unwrap().unwrap();
    eprintln!("{}", r.table());
    assert_eq!((r.published, r.offered, r.publish_unsent), (400, 400, 0));
    assert_eq!(r.expected, 400 * 10);
    assert_eq!((r.delivered, r.lost, r.duplicates), (r.expected, 0, 0));
    assert_eq!(r.delivered_bytes, r.delivered * 100);
    assert_eq!(r.published_bytes, r.published * 100);
    assert!(
        r.publish_achieved_per_s > 150.0,
        "{}",
        r.publish_achieved_per_s
    );
    let _ = tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), node).await;
}
