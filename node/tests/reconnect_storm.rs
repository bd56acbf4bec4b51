//! Reconnect-storm protection: new sessions are admitted at a bounded rate; the excess
//! gets 503 with Retry-After, and the sessions the node already has keep being served.

use std::time::Duration;

use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use weft_testkit::{subscribe_cmd, HttpStream, TestNode, WsClient};

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

/// One raw HTTP/1.1 GET /healthz from `source`, returning the status line.
async fn raw_get(source: &str, addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut s = socket.connect(addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(weft_testkit::WAIT, s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_connecting_too_fast_is_refused_and_others_are_not() {
    let node = TestNode::start_with(|c| {
        c.limits.connects_per_ip_per_s = 5;
        c.limits.connects_per_ip_burst = 5;
    })
    .await;
    let mut ok = 0;
    let mut refused = 0;
    for _ in 0..12 {
        let status = raw_get("127.0.0.1", node.addr).await;
        if status.starts_with("HTTP/1.1 200") {
            ok += 1;
        } else {
            assert!(status.starts_with("HTTP/1.1 429"), "{status}");
            refused += 1;
        }
    }
    assert!(
        (5..=7).contains(&ok),
        "{ok} admitted from one address at 5/s burst 5"
    );
    assert!(refused >= 5);
    // A different address is not affected.
    assert!(raw_get("127.0.0.2", node.addr)
        .await
        .starts_with("HTTP/1.1 200"));
    assert!(node.node.stats.connections_refused.get() >= refused);
    node.stop().await;
}
