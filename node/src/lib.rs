//! # weft-node — the Weft edge node
//!
//! One process that holds client sessions over WebSocket, SSE, NDJSON streaming and
//! long-poll, and owns topics: it sequences every event (contiguous offsets per topic),
//! keeps bounded history and fans events out to local sessions.
//!
//! ```text
//! socket ─► server (accept, limits) ─► http (routes) ─┬─ ws      (session task)
//!                                                     ├─ stream  (SSE / NDJSON body)
//!                                                     └─ poll    (pages, long-poll)
//!        commands / publishes ─► registry ─► topic (owner: offset, history, fan-out)
//!                                               │ Arc<StoredEvent>, encoded once
//!                                               ▼
//!                                        outbox per session (byte budget, policy)
//! ```
//!
//! # Layout
//! The folders follow the data path. [`node`] is the composition root every layer is
//! handed; below it `transport` uses `topic` and `session`, `cluster` uses `topic`
//! and `session`, `topic` uses only `session`, and `session` uses neither: `topic`
//! never names a relay or transport type (it queues for peers through
//! [`topic::follow::PeerLink`]).
//! - [`transport`]: sockets and routes only — the accept loop and TLS, the HTTP
//!   routes, the WebSocket session, SSE/NDJSON streams and long-poll.
//! - [`session`]: what a session holds between a topic and its socket: the
//!   byte-budgeted outbox with its slow-consumer policies, events encoded once per wire
//!   format, RFC 6455 frames.
//! - [`topic`]: one topic's lock and its invariants (offsets, history, idempotency,
//!   fan-out to local sessions and to following peers, role transitions), the
//!   registry of topics with its memory budget, and the interest feed.
//! - [`cluster`]: membership (join, heartbeat, the router's metadata) and the
//!   [`cluster::relay`] between nodes, split by job.
//! - [`auth`]: who a client is (JWT, API key, anonymous) and what it may do; origins.
//! - [`input`]: validation that HTTP, WebSocket and the relay share.
//! - [`config`], [`error`], [`stats`], [`rate`]: configuration, the API error with its
//!   stable codes, counters and the Prometheus exporter, token buckets.
//!
//! `docs/architecture.md` has the picture, the lock order and each module's invariants.

pub mod auth;
pub mod cluster;
pub mod config;
pub mod error;
pub mod heap;
pub mod input;
pub mod node;
pub mod rate;
pub mod session;
pub mod stats;
pub mod topic;
pub mod transport;

use std::future::Future;
use std::sync::Arc;

pub use config::Config;
pub use node::Node;

/// Runs a node on a bound listener until `shutdown` resolves, then drains within the
/// configured grace period. Tests bind `127.0.0.1:0` and pass the listener in.
pub async fn run(
    listener: tokio::net::TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    config.validate()?;
    let node = Node::new(config);
    transport::server::serve(node, listener, shutdown).await
}

/// Runs a node the way the binary does, in a cluster. `cluster` is the cluster
/// listener (`--cluster-listen`): it serves the relay to other nodes and, without
/// `--router`, the embedded single-voter router (data under `<data_dir>/router`);
/// with `--router` the node joins that external router group. Every connection on it
/// and every one the node dials is mutual TLS when `[cluster]` names certificates
/// (required except for the embedded router on loopback or `cluster.insecure`). The
/// node joins, heartbeats, follows the metadata, and serves clients on `http` until
/// `shutdown`; then it drains, leaves the cluster and stops what it started.
pub async fn run_with_router(
    http: tokio::net::TcpListener,
    ops: Option<tokio::net::TcpListener>,
    cluster: tokio::net::TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    config.validate()?;
    let transport = config.cluster_transport()?;
    let cluster_addr = cluster.local_addr()?;
    let advertise = config.advertise.clone().unwrap_or_else(|| {
        // Peers need a routable address; a wildcard bind only works on one host.
        let ip = if cluster_addr.ip().is_unspecified() {
            std::net::IpAddr::from([127, 0, 0, 1])
        } else {
            cluster_addr.ip()
        };
        std::net::SocketAddr::new(ip, cluster_addr.port()).to_string()
    });
    let reloader = transport.spawn_reloader();
    let insecure_warning = config
        .cluster
        .insecure
        .then(|| tokio::spawn(weft_router::tls::warn_insecure_forever("weft-node")));
    let node = Node::new(config);
    // Revocations outlive a restart (and peers send theirs on every new link, for what
    // this node missed while it was down).
    let revocations = node.config.data_dir.join("revocations.json");
    std::fs::create_dir_all(&node.config.data_dir)
        .map_err(|e| anyhow::anyhow!("data dir {}: {e}", node.config.data_dir.display()))?;
    let kept = node
        .auth
        .persist_revocations(&revocations)
        .map_err(|e| anyhow::anyhow!("revocations: {e}"))?;
    if kept > 0 {
        tracing::info!(kept, "revocations still in force from before the restart");
    }
    // The relay service needs the node and its cluster membership, which needs the
    // router; the service is registered first and looks both up per link.
    let relay_slot = cluster::relay::RelaySlot::default();
    let routes = tonic::service::Routes::new(cluster::relay::relay_service(relay_slot.clone()));
    let external = node.config.router_addrs();
    let (embedded, client, grpc_server) = if external.is_empty() {
        let (router, client) = weft_router::Embedded::start_with(
            node.config.data_dir.join("router"),
            cluster,
            routes,
            transport.clone(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("embedded router: {e}"))?;
        (Some(router), client, None)
    } else {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .add_routes(routes)
                .serve_with_incoming_shutdown(transport.incoming(cluster), async {
                    let _ = stop_rx.await;
                }),
        );
        (
            None,
            weft_router::RouterClient::with_transport(external, transport.clone()),
            Some((stop_tx, server)),
        )
    };
    let security = cluster::membership::Security {
        transport,
        insecure: node.config.cluster.insecure,
    };
    let cluster = join_with_retry(&node, advertise, client, embedded.is_some(), security).await?;
    let _ = node.cluster.set(cluster.clone());
    let relay = cluster::relay::Relay::new(cluster.clone());
    let _ = node.relay.set(relay.clone());
    node.registry.placement.set(relay.placement_fn()).ok();
    // Until every peer has sent what it revoked (bounded), user tokens get 503 and
    // `/readyz` is false: a token revoked while this node was down must not get in.
    node.auth.hold_until_revocations_heard();
    let hold = {
        let (relay, node) = (relay.clone(), node.clone());
        tokio::spawn(async move {
            tokio::time::sleep(cluster::relay::REVOCATION_HOLD).await;
            relay.end_revocation_hold(&node);
        })
    };
    // The first pass before anything can create a topic here: until it has run, the
    // slots the ring just gave this node are not known to be awaiting their old
    // owners' handoffs, and a topic a peer's forwarded publish or follow created in
    // that window would start a new epoch (its sessions elsewhere would see `reset`
    // after a plain restart). Peers' links are accepted only after it.
    let relay_task = tokio::spawn(relay.clone().run(node.clone()));
    relay.pass().await;
    let _ = relay_slot.set((relay.clone(), node.clone()));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let membership = tokio::spawn(cluster.run(node.clone(), stopped));
    // On SIGTERM or `POST /v1/admin/drain`: readiness goes false, the router takes
    // this node out of the ring and its topics are handed over, and only then do
    // sessions start closing (they reconnect to nodes that have the state already).
    let (drain_node, drain_relay) = (node.clone(), relay.clone());
    let shutdown = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = drain_node.drain_requested() => tracing::info!("drain requested"),
        }
        drain_node.mark_unready();
        drain_relay.drain().await;
    };
    let served = transport::server::serve_all(node, http, ops, shutdown).await;
    let _ = stop.send(true);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), membership).await;
    relay.shutdown();
    relay_task.abort();
    if let Some(router) = embedded {
        router.shutdown().await;
    }
    if let Some((stop, server)) = grpc_server {
        let _ = stop.send(());
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), server).await;
    }
    hold.abort();
    for task in [reloader, insecure_warning].into_iter().flatten() {
        task.abort();
    }
    served
}

/// Joins the router, retrying for a while: an external group may still be electing.
async fn join_with_retry(
    node: &Node,
    advertise: String,
    client: weft_router::RouterClient,
    embedded: bool,
    security: cluster::membership::Security,
) -> anyhow::Result<Arc<cluster::membership::Cluster>> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match cluster::membership::Cluster::join(
            node.config.node_id.clone(),
            advertise.clone(),
            client.clone(),
            embedded,
            security.clone(),
        )
        .await
        {
            Ok(c) => return Ok(c),
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "cannot join the router yet; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => return Err(anyhow::anyhow!("joining the router: {e}")),
        }
    }
}
