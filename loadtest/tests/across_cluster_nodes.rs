//! The harness across the nodes of a cluster, in-process: one `weft-router` and two
//! `weft-node`s (`a`, `b`) on `127.0.0.1:0`, joined and relaying. Subscribers on `b`,
//! topics owned by `a` (`--topic-owner a`), publishers on the owner or on `b`
//! (`--publish-target`): every event still reaches every subscriber exactly once and
//! in order, the books add up, and `subscribe` measures a subscribe on a mirror (a node
//! with no local interest in the topic yet).

mod common;

use clap::Parser;
use common::run;
use weft_loadtest::app;
use weft_loadtest::cli::Cli;
use weft_loadtest::report::Report;
use weft_testkit::inproc::InProcCluster;

/// A clean run, and every subscriber connected and subscribed.
fn assert_clean(r: &Report) {
    common::assert_clean(r);
    assert_eq!(r.connect_failures, 0, "{:?}", r.errors);
    assert_eq!(r.subscribe_failures, 0, "{:?}", r.errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_on_a_mirror_get_every_event_and_subscribes_are_measured() {
    let cluster = InProcCluster::start("loadtest", &["a", "b"]).await;
    let (a, b) = (cluster.url("a"), cluster.url("b"));

    // Publishing to the owner, subscribers on the other node.
    let r = run_fanout(&b, &a, "via-owner").await;
    assert_clean(&r);
    assert_eq!(r.published, 200);
    assert_eq!(r.expected, 200 * 4, "4 subscribers per topic");
    assert_eq!(r.publish_url, a);
    assert_eq!(r.target_url, b);
    assert_eq!(r.subscribe_latency_us.count, 8, "one first subscribe each");

    // Publishing to the mirror itself: forwarded to the owner, relayed back.
    let r = run_fanout(&b, &b, "via-mirror").await;
    assert_clean(&r);
    assert_eq!(r.expected, 200 * 4);
    assert!(r.publish_url.is_empty(), "same target: {}", r.publish_url);

    // Fresh topics owned by `a`, subscribed on `b` at a fixed rate; then one event each.
    let r = run(&format!(
        "subscribe --target {b} --publish-target {a} --topic-owner a \
         --topics 40 --rate 40 --per-connection 10 --run-id sub-mirror"
    ))
    .await;
    assert_clean(&r);
    assert_eq!((r.subscribers, r.subscriptions), (4, 40));
    assert_eq!(r.subscribe_latency_us.count, 40);
    assert!(
        r.subscribe_latency_us.max < 5_000_000,
        "{:?}",
        r.subscribe_latency_us
    );
    assert_eq!((r.published, r.expected), (40, 40), "one event per topic");
    assert_eq!(r.config["topic_owner"], "a");

    // Nobody by that name owns anything: a clear refusal before any load.
    let cli = Cli::try_parse_from([
        "weft-loadtest",
        "fanout",
        "--target",
        &b,
        "--topic-owner",
        "nobody",
        "--quiet",
    ])
    .unwrap();
    let e = app::execute(&cli.command).await.expect_err("refused");
    let msg = format!("{e:#}");
    assert!(
        msg.contains("owners seen: a (") && msg.contains("b ("),
        "{msg}"
    );

    cluster.stop().await;
}

async fn run_fanout(target: &str, publish: &str, run_id: &str) -> Report {
    run(&format!(
        "fanout --target {target} --publish-target {publish} --topic-owner a \
         --subscribers 8 --topics 2 --rate 100 --duration 2s --run-id {run_id}"
    ))
    .await
}
