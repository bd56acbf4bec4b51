//! Every scenario, in a short mode, against an in-process node over real sockets: the
//! harness must see zero loss and counts that add up (expected = published × the
//! subscribers of each topic), on every transport.

use std::time::Duration;

mod common;

use clap::Parser;
use weft_loadtest::app;
use weft_loadtest::cli::Cli;
use weft_loadtest::report::Report;
use weft_testkit::TestNode;

/// The node every scenario runs against: the kit's in-process node with the id the
/// owner-aware scenarios expect, a 1 s grace and a short reconnect jitter.
fn configure(c: &mut weft_node::Config) {
    c.node_id = node_id();
    c.timing.shutdown_grace_ms = 1000;
    c.timing.reconnect_jitter_ms = 200;
}

/// [`configure`], with authentication on: one API key that may publish and subscribe
/// everywhere.
fn secured(c: &mut weft_node::Config, key: &str) {
    configure(c);
    c.auth.api_keys = vec![weft_node::config::ApiKeyConfig {
        name: "loadtest".into(),
        sha256: weft_node::auth::apikey::sha256_hex(key),
        publish: vec![">".into()],
        subscribe: vec![">".into()],
        ..Default::default()
    }];
}

fn node_id() -> String {
    format!("loadtest-{}", std::process::id())
}

async fn start() -> TestNode {
    TestNode::start_with(configure).await
}

/// Stops the node; it must exit cleanly within 10 s.
async fn stop(node: TestNode) {
    node.stop_within(Duration::from_secs(10)).await
}

/// Runs the harness against `node` with the command line `args`.
async fn run(node: &TestNode, args: &str) -> Report {
    common::run(&format!("{args} --target {}", node.url(""))).await
}

/// A clean run, with plausible latencies.
fn assert_clean(r: &Report) {
    common::assert_clean(r);
    assert!(
        r.latency_us.p50 > 0 && r.latency_us.p50 < 2_000_000,
        "{:?}",
        r.latency_us
    );
    assert!(r.deliveries_per_s > 0.0);
    assert_eq!(r.connect_failures, 0, "{:?}", r.errors);
    assert!(r.connects >= r.subscribers);
    if r.transport == "ws" {
        assert_eq!(r.subscribe_failures, 0, "{:?}", r.errors);
        assert_eq!(
            r.subscribe_latency_us.count, r.subscriptions,
            "each subscription's first subscribe is timed"
        );
    }
}

async fn fanout(transport: &str) {
    let node = start().await;
    let r = run(
        &node,
        &format!(
            "fanout --transport {transport} --subscribers 12 --topics \
             3 --rate 150 --payload-bytes 200 --duration 2s"
        ),
    )
    .await;
    stop(node).await;
    assert_clean(&r);
    assert_eq!(r.published, 300);
    // 4 subscribers per topic, every event owed to each of them.
    assert_eq!(r.expected, 300 * 4);
    assert_eq!(
        (r.scenario.as_str(), r.transport.as_str()),
        ("fanout", transport)
    );
    assert_eq!(r.subscribers, 12);
    assert!(!r.timeline.is_empty());
}

/// A node with authentication on: the harness authenticates every publish, watch and
/// WebSocket with `--token` (here an API key), and is refused without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_against_a_secured_node_with_a_token() {
    const KEY: &str = "loadtest-key-0123456789";
    let node = TestNode::start_with(|c| secured(c, KEY)).await;
    for transport in ["ws", "sse"] {
        let r = run(
            &node,
            &format!(
                "fanout --transport {transport} --subscribers 6 --topics \
                 2 --rate 100 --duration 1s --token {KEY}"
            ),
        )
        .await;
        assert_clean(&r);
        assert_eq!(r.expected, r.published * 3, "{transport}");
    }
    let refused = run(
        &node,
        "fanout --subscribers 2 --topics 1 --rate 20 --duration 1s --ramp-timeout 2s",
    )
    .await;
    assert_eq!(refused.published, 0, "no publish without credentials");
    stop(node).await;
}

/// `--publish-via stream`, ordered and not, against a node with authentication on:
/// the books add up exactly as with one request per event, and the node saw every
/// event arrive on a publish stream (its request-bytes counter for that route) and no
/// single publish at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_over_publish_streams_adds_up_and_never_posts_single_events() {
    const KEY: &str = "loadtest-stream-key-0123456789";
    // An id of its own: the node's counters are this process's, shared by every test.
    let id = format!("loadtest-stream-{}", std::process::id());
    let node = TestNode::start_with(|c| {
        secured(c, KEY);
        c.node_id = id.clone();
    })
    .await;
    let mut published = 0;
    for ordered in ["", "--ordered"] {
        let r = run(
            &node,
            &format!(
                "fanout --publish-via stream {ordered} --subscribers 8 --topics 4 \
                 --rate 200 --payload-bytes 120 --duration 2s --token {KEY}"
            ),
        )
        .await;
        assert_clean(&r);
        assert_eq!((r.published, r.offered), (400, 400), "{ordered}");
        assert_eq!(r.expected, 400 * 2, "{ordered}");
        assert_eq!(r.delivered_bytes, r.delivered * 120, "{ordered}");
        assert_eq!(
            r.config["publish_via"], "stream",
            "the report says how it published"
        );
        assert!(r.table().contains("over publish streams"), "{ordered}");
        published += r.published;
    }
    let addr = node.url("").trim_start_matches("http://").parse().unwrap();
    let metrics = common::plain_net(addr)
        .await
        .http(0)
        .get(node.url("/metrics"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics);
    let mine = |l: &&str| l.contains(&format!("node=\"{id}\""));
    let stream_bytes: f64 = metrics
        .lines()
        .filter(mine)
        .filter(|l| {
            l.starts_with("weft_http_request_bytes_total")
                && l.contains("route=\"/v1/publish/stream\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    // Each line holds at least the 120-byte event.
    assert!(
        stream_bytes >= (published * 120) as f64,
        "{stream_bytes} bytes on publish streams for {published} events"
    );
    let single = metrics
        .lines()
        .filter(mine)
        .filter(|l| {
            l.starts_with("weft_http_requests_total")
                && l.contains("method=\"POST\"")
                && l.contains("/events\"")
        })
        .count();
    assert_eq!(single, 0, "no event was posted on its own");
    stop(node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_over_websocket() {
    fanout("ws").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_over_sse() {
    fanout("sse").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_over_longpoll() {
    fanout("longpoll").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_rooms_publish_and_receive() {
    let node = start().await;
    let r = run(&node, "chat --rooms 3 --members 4 --rate 60 --duration 2s").await;
    stop(node).await;
    assert_clean(&r);
    assert_eq!(r.published, 120);
    // Every message reaches the 4 members of its room, the sender included.
    assert_eq!(r.expected, 120 * 4);
    assert_eq!(r.subscribers, 12);
}

async fn ticker(transport: &str) {
    let node = start().await;
    let args = format!(
        "ticker --transport {transport} --topics 40 --subscribers 6 --topics-per-subscriber 8 \
         --rate 300 --duration 2s --run-id tick"
    );
    let r = run(&node, &args).await;
    stop(node).await;
    assert_clean(&r);
    assert_eq!(r.published, 600);
    assert_eq!(r.subscriptions, 6 * 8);
    // Each subscription is owed exactly the events published to its topic.
    let argv = std::iter::once("weft-loadtest").chain(args.split_whitespace());
    let (plan, _) = app::build(&Cli::try_parse_from(argv).unwrap().command).unwrap();
    let mut per_topic = vec![0u64; plan.topics.len()];
    for k in 0..plan.total_events() {
        per_topic[plan.event_topic(k)] += 1;
    }
    let owed: u64 = (0..plan.subscribers)
        .flat_map(|j| plan.subscriber_topics(j))
        .map(|t| per_topic[t])
        .sum();
    assert_eq!(r.expected, owed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticker_over_websocket() {
    ticker("ws").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticker_over_multi_topic_sse() {
    ticker("sse").await;
}

async fn churn(transport: &str) {
    let node = start().await;
    let r = run(
        &node,
        &format!(
            "churn --transport {transport} --subscribers 8 --topics 2 --rate \
             100 --duration 3s --lifetime 600ms --reconnect-gap 50ms"
        ),
    )
    .await;
    stop(node).await;
    assert_clean(&r);
    assert!(
        r.reconnects >= 8,
        "sessions should have come and gone: {}",
        r.reconnects
    );
    assert!(r.sessions > r.subscribers);
    assert_eq!(r.expected, 300 * 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_resumes_without_loss_over_websocket() {
    churn("ws").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_resumes_without_loss_over_sse() {
    churn("sse").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_resumes_without_loss_over_longpoll() {
    churn("longpoll").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_measures_rate_latency_and_target_memory() {
    let node = start().await;
    // The node runs in this process, so this process is the target.
    let pid = std::process::id().to_string();
    let r = run(
        &node,
        &format!("connect --connections 60 --rate 300 --duration 1s --target-pid {pid}"),
    )
    .await;
    stop(node).await;
    assert_eq!(r.connects, 60, "{:?}", r.errors);
    assert_eq!(r.connect_failures, 0);
    assert_eq!(r.connections_open, 60);
    assert_eq!(r.connect_latency_us.count, 60);
    // 60 connects scheduled over 0.2 s.
    assert!(
        r.connect_per_s > 100.0 && r.connect_per_s < 1000.0,
        "{}",
        r.connect_per_s
    );
    let t = r.target.expect("target figures with --target-pid");
    assert!(t.rss_bytes > 0 && t.rss_per_conn_bytes.is_some());
    assert_eq!((r.published, r.expected, r.lost), (0, 0, 0));
}

/// `subscribe`: fresh topics subscribed on a schedule, each reply timed, then one
/// event per topic that every subscription must receive. `--topic-owner` with the
/// node's own id keeps every name (a standalone node owns all its topics).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_times_every_reply_and_checks_delivery() {
    let node = start().await;
    let owner = node_id();
    let r = run(
        &node,
        &format!(
            "subscribe --topics 30 --rate 60 --per-connection 8 --topic-owner \
             {owner} --publish-target {}",
            node.url("")
        ),
    )
    .await;
    stop(node).await;
    assert_clean(&r);
    assert_eq!(r.scenario, "subscribe");
    // 30 topics over connections of at most 8: 4 connections, each topic once.
    assert_eq!((r.subscribers, r.subscriptions, r.topics), (4, 30, 30));
    assert_eq!(r.subscribe_latency_us.count, 30);
    assert_eq!(r.subscribe_failures, 0);
    // Subscribes are due over 0.5 s, then one event per topic over another 0.5 s.
    assert_eq!((r.published, r.expected), (30, 30));
    assert!((r.duration_s - 1.0).abs() < 1e-6, "{}", r.duration_s);
    assert!(
        r.subscribe_latency_us.max < 2_000_000,
        "{:?}",
        r.subscribe_latency_us
    );
    assert!(r.publish_url.is_empty(), "same URL as the target");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_is_websocket_only() {
    let cli = Cli::try_parse_from(["weft-loadtest", "subscribe", "--transport", "sse"]).unwrap();
    let e = app::build(&cli.command).unwrap_err();
    assert!(e.to_string().contains("--transport ws"), "{e}");
}

/// `rolling`: the restart command makes the test stop the node and start a new one on
/// the same port. Subscribers reconnect and resume; publishes retry; history (in
/// memory) is gone, so every subscription sees a reset — signalled, never silent loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_is_survived() {
    let node = start().await;
    let addr = node.addr;
    let flag = std::env::temp_dir().join(format!("weft-loadtest-restart-{}", std::process::id()));
    let _ = std::fs::remove_file(&flag);
    let cmd = format!("touch {} && sleep 1.5", flag.display());
    let restarter = {
        let flag = flag.clone();
        tokio::spawn(async move {
            while !flag.exists() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            stop(node).await;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .expect("rebind the same port");
            TestNode::start_on(listener, configure)
        })
    };
    let target = format!("http://{addr}");
    let r = common::run_with(
        &format!(
            "rolling --subscribers 6 --topics 2 --rate 50 --duration \
             4s --restart-after 1s --target {target}"
        ),
        &["--restart-cmd", &cmd],
    )
    .await;
    stop(restarter.await.unwrap()).await;
    let _ = std::fs::remove_file(&flag);

    let restart = r.restart.clone().expect("restart outcome");
    assert_eq!(restart.exit_code, Some(0));
    assert_eq!(
        r.publish_errors, 0,
        "publishes retry across the restart: {:?}",
        r.errors
    );
    assert_eq!(r.published, 200);
    assert_eq!(r.lost, 0, "{:?}", r.errors);
    assert_eq!(r.duplicates, 0);
    assert!(
        r.resets >= 6,
        "each subscription learns history was lost: {}",
        r.resets
    );
    assert!(r.reconnects >= 6, "{}", r.reconnects);
    assert_eq!(r.delivered, r.expected);
    // What the old epoch took with it is accounted for: each of the 3 subscribers of a
    // topic either received an event or saw it go down with the reset.
    assert_eq!(r.delivered + r.reset_dropped, r.published * 3, "{r:?}");
}
