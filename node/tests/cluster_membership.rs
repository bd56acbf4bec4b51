//! A node as the binary runs it (embedded router, membership, interest): the router's
//! subscription registry follows the node's local interest — a topic is registered when
//! it gains its first local subscriber on any transport and removed when the last one
//! leaves — and `/v1/cluster` shows it.

mod support;

use std::time::{Duration, Instant};

use support::{subscribe_cmd, HttpStream, WsClient};
use weft_proto::command::UnsubscribeCmd;
use weft_proto::Command;

struct ClusteredNode {
    addr: std::net::SocketAddr,
    http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    dir: std::path::PathBuf,
}

impl ClusteredNode {
    async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "weft-cluster-{}-{}",
            std::process::id(),
            fastrand_u64()
        ));
        let http_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = http_l.local_addr().unwrap();
        let config = weft_node::Config {
            node_id: "member-1".into(),
            data_dir: dir.clone(),
            ..Default::default()
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(weft_node::run_with_router(
            http_l,
            None,
            grpc_l,
            config,
            async move {
                let _ = rx.await;
            },
        ));
        Self {
            addr,
            http: reqwest::Client::new(),
            stop: Some(tx),
            task,
            dir,
        }
    }

    async fn view(&self) -> serde_json::Value {
        let resp = self
            .http
            .get(format!("http://{}/v1/cluster", self.addr))
            .send()
            .await
            .unwrap();
        serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
    }

    /// Polls `/v1/cluster` until this node's registered interest is `n` topics.
    async fn await_interest(&self, n: u64) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let view = self.view().await;
            if view["this_node"]["interest_topics"] == n {
                return view;
            }
            assert!(
                Instant::now() < deadline,
                "interest never reached {n}: {view}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(20), &mut self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_follows_local_interest_on_every_transport() {
    let node = ClusteredNode::start().await;
    // Joined and active, owning every slot, with no interest yet.
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.view().await["this_node"]["state"] != "active" {
        assert!(Instant::now() < deadline, "never became active");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    node.await_interest(0).await;

    let mut ws = WsClient::connect(node.addr).await;
    for t in ["a", "b", "c"] {
        assert!(ws.request(subscribe_cmd(t, None)).await.result.is_some());
    }
    // A second subscriber on the same topic changes nothing at the router.
    let mut other = WsClient::connect(node.addr).await;
    assert!(other
        .request(subscribe_cmd("a", None))
        .await
        .result
        .is_some());
    let view = node.await_interest(3).await;
    assert_eq!(view["interest"]["topics"], 3);

    // An SSE watch is local interest too.
    let sse = HttpStream::open(
        &node.http,
        &format!("http://{}/v1/topics/d/events?watch=true", node.addr),
        &[],
    )
    .await;
    assert_eq!(sse.status, 200);
    node.await_interest(4).await;
    drop(sse);
    node.await_interest(3).await;

    // `a` keeps its other subscriber; `b` loses its only one.
    for t in ["a", "b"] {
        let reply = ws
            .request(Command::Unsubscribe(UnsubscribeCmd { topic: t.into() }))
            .await;
        assert!(reply.result.is_some());
    }
    node.await_interest(2).await;
    // Closing the sessions ends the rest.
    ws.close().await;
    other.close().await;
    node.await_interest(0).await;
    node.stop().await;
}
