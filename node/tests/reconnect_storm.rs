//! Reconnect-storm protection: new sessions are admitted at a bounded rate; the excess
//! gets 503 with Retry-After, and the sessions the node already has keep being served.

mod support;

use std::time::Duration;

use support::{subscribe_cmd, HttpStream, TestNode, WsClient};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const RATE: u32 = 20;
const BURST: u32 = 10;

async fn node() -> TestNode {
    TestNode::start_with(|c| {
        c.limits.new_sessions_per_s = RATE;
        c.limits.new_sessions_burst = BURST;
    })
    .await
}

/// Tries a WebSocket upgrade; `Ok(())` when admitted, else the refusal's status and
/// Retry-After.
async fn try_ws(addr: std::net::SocketAddr) -> Result<(), (u16, Option<u64>)> {
    let req = format!("ws://{addr}/v1/ws").into_client_request().unwrap();
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => Ok(()),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let retry = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse().ok());
            Err((resp.status().as_u16(), retry))
        }
        Err(e) => panic!("unexpected upgrade failure: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_is_admitted_at_the_configured_rate_and_the_rest_told_when_to_retry() {
    let node = node().await;
    // One session from before the storm (uses one token).
    let mut existing = WsClient::connect(node.addr).await;
    assert!(existing
        .request(subscribe_cmd("home", None))
        .await
        .result
        .is_some());
    let reader = tokio::spawn(async move { existing.next_event().await.map(|e| e.offset) });

    let started = std::time::Instant::now();
    let attempts: Vec<_> = (0..200).map(|_| tokio::spawn(try_ws(node.addr))).collect();
    let mut admitted = 0u32;
    let mut refused = 0u32;
    for a in attempts {
        match a.await.unwrap() {
            Ok(()) => admitted += 1,
            Err((status, retry)) => {
                assert_eq!(status, 503);
                let retry = retry.expect("Retry-After on every refusal");
                assert!((1..=5).contains(&retry), "retry-after {retry}");
                refused += 1;
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let allowed = BURST as f64 + RATE as f64 * elapsed;
    assert!(
        admitted as f64 <= allowed + 1.0,
        "{admitted} admitted in {elapsed:.2}s; at most {allowed:.0} allowed"
    );
    assert!(
        admitted >= BURST - 1,
        "the burst was not admitted: {admitted}"
    );
    assert_eq!(admitted + refused, 200);
    assert!(node.node.stats.rate_limited.get() >= refused as u64);

    // The session the node already had is still served.
    node.publish("home", r#"{"during":"storm"}"#).await;
    assert_eq!(reader.await.unwrap(), Some(1));

    // SSE watches are sessions too.
    let mut sse_refused = false;
    for _ in 0..(BURST * 2) {
        let s = HttpStream::open(
            &node.http,
            &node.url("/v1/topics/home/events?watch=true"),
            &[],
        )
        .await;
        if s.status == 503 {
            sse_refused = true;
            break;
        }
    }
    assert!(
        sse_refused,
        "SSE watches are admitted through the same gate"
    );

    // Once the storm passes, new sessions are admitted again.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(try_ws(node.addr).await, Ok(()));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_requests_are_not_sessions() {
    let node = node().await;
    // Publishes, state reads and polls are not throttled by the session gate.
    for i in 0..(BURST * 3) {
        node.publish("p", &i.to_string()).await;
        assert_eq!(node.state("p").await.offset, i as u64 + 1);
    }
    node.stop().await;
}
