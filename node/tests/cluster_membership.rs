//! A node as the binary runs it (embedded router, membership, interest): the router's
//! subscription registry follows the node's local interest — a topic is registered when
//! it gains its first local subscriber on any transport and removed when the last one
//! leaves — and `/v1/cluster` shows it.

use weft_proto::command::UnsubscribeCmd;
use weft_proto::Command;
use weft_testkit::inproc::ClusterNode;
use weft_testkit::{subscribe_cmd, HttpStream, WsClient};

/// Polls `/v1/cluster` until this node's registered interest is `n` topics.
async fn await_interest(node: &ClusterNode, n: u64) -> serde_json::Value {
    node.await_view(&format!("interest reaches {n}"), |v| {
        v["this_node"]["interest_topics"] == n
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_follows_local_interest_on_every_transport() {
    let node = ClusterNode::start("member-1", |_| {}).await;
    // Joined and active, owning every slot, with no interest yet.
    node.await_view("active", |v| v["this_node"]["state"] == "active")
        .await;
    await_interest(&node, 0).await;

    let mut ws = WsClient::connect(node.http).await;
    for t in ["a", "b", "c"] {
        assert!(ws.request(subscribe_cmd(t, None)).await.result.is_some());
    }
    // A second subscriber on the same topic changes nothing at the router.
    let mut other = WsClient::connect(node.http).await;
    assert!(other
        .request(subscribe_cmd("a", None))
        .await
        .result
        .is_some());
    let view = await_interest(&node, 3).await;
    assert_eq!(view["interest"]["topics"], 3);

    // An SSE watch is local interest too.
    let sse = HttpStream::open(
        &node.api.http,
        &node.api.url("/v1/topics/d/events?watch=true"),
        &[],
    )
    .await;
    assert_eq!(sse.status, 200);
    await_interest(&node, 4).await;
    drop(sse);
    await_interest(&node, 3).await;

    // `a` keeps its other subscriber; `b` loses its only one.
    for t in ["a", "b"] {
        let reply = ws
            .request(Command::Unsubscribe(UnsubscribeCmd { topic: t.into() }))
            .await;
        assert!(reply.result.is_some());
    }
    await_interest(&node, 2).await;
    // Closing the sessions ends the rest.
    ws.close().await;
    other.close().await;
    await_interest(&node, 0).await;
    node.stop().await;
}
