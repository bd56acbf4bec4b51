//! The harness across the nodes of a cluster, in-process: one `weft-router` and two
//! `weft-node`s (`a`, `b`) on `127.0.0.1:0`, joined and relaying. Subscribers on `b`,
//! topics owned by `a` (`--topic-owner a`), publishers on the owner or on `b`
//! (`--publish-target`): every event still reaches every subscriber exactly once and
//! in order, the books add up, and `subscribe` measures a subscribe on a mirror (a node
//! with no local interest in the topic yet).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use weft_loadtest::app;
use weft_loadtest::cli::Cli;
use weft_loadtest::report::Report;

/// The cluster must be joined and linked within this.
const CONVERGE_WITHIN: Duration = Duration::from_secs(30);

struct ClusterNode {
    id: &'static str,
    http: String,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

struct Cluster {
    router: Option<weft_router::Router>,
    nodes: Vec<ClusterNode>,
    dir: PathBuf,
}

impl Cluster {
    async fn start(ids: &[&'static str]) -> Self {
        let dir =
            std::env::temp_dir().join(format!("weft-loadtest-cluster-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let router = weft_router::Router::start(
            weft_router::RouterOptions {
                id: 1,
                peers: Default::default(),
                data_dir: dir.join("router"),
                heartbeat_timeout: Duration::from_secs(3),
                raft: Default::default(),
                // In-process on loopback; the TLS paths are proven by weft-node's
                // process tests.
                transport: weft_router::tls::Transport::Plaintext,
            },
            listener,
        )
        .await
        .expect("router starts");
        assert!(
            router
                .raft()
                .wait_for_leader(Duration::from_secs(10))
                .await
                .is_some(),
            "the router elects itself"
        );
        let router_addr = router.local_addr().to_string();
        let mut nodes = Vec::new();
        for &id in ids {
            let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", http.local_addr().unwrap());
            let mut config = weft_node::Config {
                node_id: id.into(),
                router: Some(router_addr.clone()),
                data_dir: dir.join(id),
                ..Default::default()
            };
            config.timing.shutdown_grace_ms = 1000;
            config.cluster.insecure = true;
            let (tx, rx) = oneshot::channel::<()>();
            let task = tokio::spawn(weft_node::run_with_router(
                http,
                None,
                grpc,
                config,
                async move {
                    let _ = rx.await;
                },
            ));
            nodes.push(ClusterNode {
                id,
                http: url,
                stop: Some(tx),
                task,
            });
        }
        let cluster = Self {
            router: Some(router),
            nodes,
            dir,
        };
        cluster.converge().await;
        cluster
    }

    /// Waits until every node sees every member active and has a relay link to each
    /// other node.
    async fn converge(&self) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + CONVERGE_WITHIN;
        let ids: Vec<&str> = self.nodes.iter().map(|n| n.id).collect();
        loop {
            let mut last = String::new();
            let mut ok = true;
            for n in &self.nodes {
                let view: Value = match client
                    .get(format!("{}/v1/cluster", n.http))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                {
                    Ok(r) => serde_json::from_slice(&r.bytes().await.unwrap_or_default())
                        .unwrap_or_default(),
                    Err(e) => {
                        ok = false;
                        last = e.to_string();
                        continue;
                    }
                };
                let active = view["members"].as_array().is_some_and(|ms| {
                    ids.iter()
                        .all(|id| ms.iter().any(|m| m["id"] == *id && m["state"] == "active"))
                });
                let links = view["this_node"]["relay_links"]
                    .as_array()
                    .map(|l| l.len())
                    .unwrap_or(0);
                if !active || links < ids.len() - 1 {
                    ok = false;
                    last = view.to_string();
                }
            }
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not converge within {CONVERGE_WITHIN:?}; last view: {last}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn url(&self, id: &str) -> &str {
        &self.nodes.iter().find(|n| n.id == id).unwrap().http
    }

    async fn stop(mut self) {
        for n in &mut self.nodes {
            if let Some(tx) = n.stop.take() {
                let _ = tx.send(());
            }
        }
        for n in self.nodes.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(10), n.task).await;
        }
        if let Some(r) = self.router.take() {
            r.shutdown().await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn run(args: &[&str]) -> Report {
    let mut argv = vec!["weft-loadtest"];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["--quiet", "--drain-timeout", "10s"]);
    let cli = Cli::try_parse_from(&argv).expect("arguments parse");
    let report = app::execute(&cli.command)
        .await
        .expect("scenario runs")
        .expect("a local run returns its report");
    eprintln!("{}", report.table());
    report
}

fn assert_clean(r: &Report) {
    assert!(r.published > 0, "nothing published");
    assert_eq!(r.publish_errors, 0, "{:?}", r.errors);
    assert_eq!(r.lost, 0, "lost events: {:?}", r.errors);
    assert_eq!(r.duplicates, 0);
    assert_eq!(r.reordered, 0);
    assert_eq!(r.resets, 0, "{:?}", r.errors);
    assert_eq!(r.stale, 0);
    assert_eq!(r.foreign, 0);
    assert_eq!(r.unstarted, 0);
    assert_eq!(r.delivered, r.expected);
    assert_eq!(r.latency_us.count, r.delivered);
    assert_eq!(r.connect_failures, 0, "{:?}", r.errors);
    assert_eq!(r.subscribe_failures, 0, "{:?}", r.errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_on_a_mirror_get_every_event_and_subscribes_are_measured() {
    let cluster = Cluster::start(&["a", "b"]).await;
    let (a, b) = (cluster.url("a").to_owned(), cluster.url("b").to_owned());

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
    let r = run(&[
        "subscribe",
        "--target",
        &b,
        "--publish-target",
        &a,
        "--topic-owner",
        "a",
        "--topics",
        "40",
        "--rate",
        "40",
        "--per-connection",
        "10",
        "--run-id",
        "sub-mirror",
    ])
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
    run(&[
        "fanout",
        "--target",
        target,
        "--publish-target",
        publish,
        "--topic-owner",
        "a",
        "--subscribers",
        "8",
        "--topics",
        "2",
        "--rate",
        "100",
        "--duration",
        "2s",
        "--run-id",
        run_id,
    ])
    .await
}
