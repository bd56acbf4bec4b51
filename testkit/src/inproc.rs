//! Nodes in the test's own process, over real sockets on `127.0.0.1:0`:
//!
//! - [`TestNode`]: one node without a cluster (`server::serve`), its [`Node`] at hand
//!   so a test can read its counters and readiness directly;
//! - [`ClusterNode`]: a node as the binary runs it in a cluster
//!   (`run_with_router`: relay listener, embedded router unless the config names one);
//! - [`InProcCluster`]: one in-process router and several [`ClusterNode`]s joined to
//!   it, relaying, plaintext on loopback (the TLS paths are proven by the process
//!   cluster, [`crate::proc_cluster`]).
//!
//! Each is stopped through its shutdown future, as `main` stops on SIGTERM; dropping one
//! signals the same.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use weft_node::{Config, Node};
use weft_proto::{PublishResult, TopicState};

use crate::api::NodeApi;
use crate::bin::Workdir;

/// A process-wide sequence, so that in-process nodes never share an id or a directory.
fn seq() -> u64 {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    SEQ.fetch_add(1, Ordering::Relaxed)
}

async fn loopback() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// A node without a cluster.
pub struct TestNode {
    pub addr: SocketAddr,
    pub node: Arc<Node>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    pub http: reqwest::Client,
    /// Sent as `Authorization: Bearer` by [`TestNode::publish`], `state` and
    /// `get_json`, for nodes with authentication on.
    pub credential: Option<String>,
}

impl TestNode {
    fn authed(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.credential {
            Some(c) => req.bearer_auth(c),
            None => req,
        }
    }

    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A node on a fresh port, configured by `configure` over the test defaults (a
    /// unique id, a 1 s shutdown grace).
    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> Self {
        Self::start_on(loopback().await, configure)
    }

    /// [`TestNode::start_with`] on a listener the test bound (to restart on a port).
    pub fn start_on(listener: TcpListener, configure: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config {
            node_id: format!("test-{}-{}", std::process::id(), seq()),
            ..Default::default()
        };
        config.timing.shutdown_grace_ms = 1000;
        configure(&mut config);
        config.validate().expect("test config is valid");
        let addr = listener.local_addr().unwrap();
        let node = Node::new(config);
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(weft_node::transport::server::serve(
            node.clone(),
            listener,
            async move {
                let _ = rx.await;
            },
        ));
        Self {
            addr,
            node,
            stop: Some(tx),
            task: Some(task),
            http: reqwest::Client::new(),
            credential: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn publish(&self, topic: &str, data: &str) -> PublishResult {
        let resp = self
            .authed(
                self.http
                    .post(self.url(&format!("/v1/topics/{topic}/events"))),
            )
            .header("content-type", "application/json")
            .body(data.to_owned())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201, "publish to {topic}");
        serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
    }

    pub async fn state(&self, topic: &str) -> TopicState {
        let resp = self
            .authed(self.http.get(self.url(&format!("/v1/topics/{topic}"))))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
    }

    /// Status and parsed JSON body of a GET.
    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let resp = self
            .authed(self.http.get(self.url(path)))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.bytes().await.unwrap();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    /// Stops the node; it must exit cleanly within 30 s.
    pub async fn stop(self) {
        self.stop_within(Duration::from_secs(30)).await
    }

    /// Stops the node; it must exit cleanly within `within`. A node already stopped
    /// (or a handle to one stopped elsewhere) returns at once.
    pub async fn stop_within(mut self, within: Duration) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(within, task)
                .await
                .expect("node stops within its grace")
                .expect("node task")
                .expect("node exits cleanly");
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A node as the binary runs it in a cluster, in-process.
pub struct ClusterNode {
    /// Its HTTP side (named by its node id).
    pub api: NodeApi,
    /// Its HTTP listener.
    pub http: SocketAddr,
    /// Its cluster listener: the relay, and the embedded router when it has one.
    pub cluster: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    /// Its own data dir, removed by [`ClusterNode::stop`]; `None` when the test gave one.
    dir: Option<PathBuf>,
}

impl ClusterNode {
    /// Node `node_id` on fresh ports. Without a `router` in the config (set it in
    /// `configure`) it embeds its own single-voter router; without a `data_dir` it gets
    /// a fresh one.
    pub async fn start(node_id: &str, configure: impl FnOnce(&mut Config)) -> Self {
        let own_dir = std::env::temp_dir().join(format!(
            "weft-inproc-{node_id}-{}-{}",
            std::process::id(),
            seq()
        ));
        let _ = std::fs::remove_dir_all(&own_dir);
        let mut config = Config {
            node_id: node_id.into(),
            data_dir: own_dir.clone(),
            ..Default::default()
        };
        configure(&mut config);
        let dir = (config.data_dir == own_dir).then_some(own_dir);
        let (http_l, cluster_l) = (loopback().await, loopback().await);
        let (http, cluster) = (
            http_l.local_addr().unwrap(),
            cluster_l.local_addr().unwrap(),
        );
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(weft_node::run_with_router(
            http_l,
            None,
            cluster_l,
            config,
            async move {
                let _ = rx.await;
            },
        ));
        Self {
            api: NodeApi::new(node_id, http),
            http,
            cluster,
            stop: Some(tx),
            task: Some(task),
            dir,
        }
    }

    /// `GET /v1/cluster`.
    pub async fn view(&self) -> Value {
        self.api.cluster().await
    }

    /// Polls `/v1/cluster` until `cond` holds, for at most 10 s; that view.
    pub async fn await_view(&self, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
        self.api
            .await_view(Duration::from_secs(10), what, cond)
            .await
    }

    /// Stops the node; it must exit cleanly within 20 s.
    pub async fn stop(mut self) {
        if let Some(outcome) = self.shutdown(Duration::from_secs(20)).await {
            outcome.expect("node task").expect("node exits cleanly");
        } else {
            panic!("node {} did not stop within 20 s", self.api.name);
        }
    }

    /// Signals the node to stop and waits at most `within`; what it exited with, or
    /// `None` if it had not exited. Its own data dir is removed either way.
    pub async fn shutdown(
        &mut self,
        within: Duration,
    ) -> Option<Result<anyhow::Result<()>, tokio::task::JoinError>> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let outcome = match self.task.take() {
            Some(task) => tokio::time::timeout(within, task).await.ok(),
            None => None,
        };
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        outcome
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// The cluster must be joined and linked within this.
const CONVERGE_WITHIN: Duration = Duration::from_secs(30);

/// One in-process router and nodes joined to it, plaintext on loopback.
pub struct InProcCluster {
    router: Option<weft_router::Router>,
    pub nodes: Vec<ClusterNode>,
    /// Removed when the cluster goes (kept when the test fails).
    _workdir: Workdir,
}

impl InProcCluster {
    /// A router (heartbeat timeout 3 s) and one node per id, converged.
    pub async fn start(name: &str, ids: &[&str]) -> Self {
        let workdir = Workdir::new("inproc", name);
        let router = weft_router::Router::start(
            weft_router::RouterOptions {
                id: 1,
                peers: Default::default(),
                data_dir: workdir.join("router"),
                heartbeat_timeout: Duration::from_secs(3),
                raft: Default::default(),
                transport: weft_router::tls::Transport::Plaintext,
            },
            loopback().await,
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
            let data_dir = workdir.join(id);
            let router_addr = router_addr.clone();
            nodes.push(
                ClusterNode::start(id, |c| {
                    c.router = Some(router_addr);
                    c.data_dir = data_dir;
                    c.timing.shutdown_grace_ms = 1000;
                    c.cluster.insecure = true;
                })
                .await,
            );
        }
        let cluster = Self {
            router: Some(router),
            nodes,
            _workdir: workdir,
        };
        cluster.converge().await;
        cluster
    }

    /// Waits until every node sees every member active and has a relay link to each
    /// other node.
    async fn converge(&self) {
        let ids: Vec<&str> = self.nodes.iter().map(|n| n.api.name.as_str()).collect();
        let ids = &ids;
        crate::wait::wait_for(CONVERGE_WITHIN, "the cluster converges", || async move {
            for n in &self.nodes {
                let view = n.api.try_get_json("/v1/cluster").await?;
                let active = view["members"].as_array().is_some_and(|ms| {
                    ids.iter()
                        .all(|id| ms.iter().any(|m| m["id"] == *id && m["state"] == "active"))
                });
                let links = view["this_node"]["relay_links"]
                    .as_array()
                    .map(|l| l.len())
                    .unwrap_or(0);
                if !active || links < ids.len() - 1 {
                    return Err(format!("last view: {view}"));
                }
            }
            Ok(())
        })
        .await
    }

    /// `http://host:port` of node `id`.
    pub fn url(&self, id: &str) -> String {
        self.node(id).api.url("")
    }

    pub fn node(&self, id: &str) -> &ClusterNode {
        self.nodes
            .iter()
            .find(|n| n.api.name == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    /// Stops every node (each given 10 s), then the router.
    pub async fn stop(mut self) {
        for n in &mut self.nodes {
            if let Some(tx) = n.stop.take() {
                let _ = tx.send(());
            }
        }
        for mut n in self.nodes.drain(..) {
            let _ = n.shutdown(Duration::from_secs(10)).await;
        }
        if let Some(r) = self.router.take() {
            r.shutdown().await;
        }
    }
}
