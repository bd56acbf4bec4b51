//! Assembles a running router on a bound listener: Raft, the public gRPC service (and
//! the Raft peer service where there are peers to call it) on one port, group commit,
//! the heartbeat reaper and the bootstrap.
//!
//! Every connection is accepted through [`crate::tls::Transport::incoming`]: with
//! mutual TLS the caller's identity is resolved at the handshake and each RPC is
//! authorised with it ([`crate::identity`]). The Raft peer service is mounted only on
//! a router with peers, and answers only router certificates; a single voter (the
//! embedded router) has no caller for it and does not serve it.
//!
//! Bootstrap (the same on a laptop and in a StatefulSet): on a fresh store the router
//! with the lowest id initialises the cluster with every peer as a voter, once every
//! peer answers and none knows a leader. A store that holds any membership is never
//! initialised again, so restarts keep the cluster they belonged to.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use weft_proto::grpc::router_server::RouterServer;

use crate::client::RouterClient;
use crate::raft::{RaftNode, RaftTiming, StartError};
use crate::service::{reap_dead, Committer, RouterService, MAX_REQUEST_BYTES};
use crate::tls::Transport;

/// What [`Router::start`] needs (the binary builds it from [`crate::config::Config`]).
#[derive(Debug, Clone)]
pub struct RouterOptions {
    pub id: u64,
    /// Every voter including this one (id → `host:port`); empty = a single voter
    /// reachable at the bound address.
    pub peers: BTreeMap<u64, String>,
    pub data_dir: PathBuf,
    pub heartbeat_timeout: Duration,
    pub raft: RaftTiming,
    /// Mutual TLS for every connection in and out, or plaintext.
    pub transport: Transport,
}

/// A running router. Drop does not stop it: call [`Router::shutdown`].
pub struct Router {
    raft: RaftNode,
    addr: SocketAddr,
    stop: CancellationToken,
    serve: JoinHandle<Result<(), tonic::transport::Error>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Router {
    /// Starts serving on `listener` at once; bootstrap continues in the background.
    pub async fn start(opts: RouterOptions, listener: TcpListener) -> Result<Self, StartError> {
        Self::start_with(opts, listener, Routes::default()).await
    }

    /// Like [`Router::start`], also serving `extra` gRPC services on the same listener
    /// (an embedding node's relay service).
    pub async fn start_with(
        opts: RouterOptions,
        listener: TcpListener,
        extra: Routes,
    ) -> Result<Self, StartError> {
        let addr = listener
            .local_addr()
            .map_err(|e| StartError::Raft(format!("listener: {e}")))?;
        let raft =
            RaftNode::start(opts.id, &opts.data_dir, &opts.raft, opts.transport.clone()).await?;
        let committer = Committer::spawn(raft.clone());
        let router = RouterServer::new(RouterService::new(raft.clone(), committer.clone()))
            .max_decoding_message_size(MAX_REQUEST_BYTES);
        let stop = CancellationToken::new();
        let has_peers = opts.peers.keys().any(|id| *id != opts.id);
        let mut routes = extra;
        if has_peers {
            routes = routes.add_service(raft.peer_service());
        }
        let serve = tokio::spawn(
            tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .add_routes(routes)
                .add_service(router)
                .serve_with_incoming_shutdown(
                    opts.transport.incoming(listener),
                    stop.clone().cancelled_owned(),
                ),
        );
        let mut tasks = vec![tokio::spawn(reap_dead(
            raft.clone(),
            committer,
            opts.heartbeat_timeout,
        ))];
        let voters = if opts.peers.is_empty() {
            BTreeMap::from([(opts.id, addr.to_string())])
        } else {
            opts.peers.clone()
        };
        tasks.push(tokio::spawn(bootstrap(
            raft.clone(),
            voters,
            opts.transport.clone(),
        )));
        tracing::info!(id = opts.id, %addr, transport = ?opts.transport, "router serving");
        Ok(Self {
            raft,
            addr,
            stop,
            serve,
            tasks,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn raft(&self) -> &RaftNode {
        &self.raft
    }

    /// Stops accepting, lets in-flight calls finish (bounded), then stops Raft.
    pub async fn shutdown(self) {
        self.stop.cancel();
        for t in &self.tasks {
            t.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.serve).await;
        self.raft.shutdown().await;
    }
}

async fn bootstrap(raft: RaftNode, voters: BTreeMap<u64, String>, transport: Transport) {
    if raft.is_initialized().await {
        tracing::info!("existing raft state found; not initialising");
        return;
    }
    let lowest = voters.keys().next().copied();
    if lowest != Some(raft.id()) {
        tracing::info!(
            ?lowest,
            "fresh store; waiting for the lowest id to initialise"
        );
        return;
    }
    let others: Vec<RouterClient> = voters
        .iter()
        .filter(|(id, _)| **id != raft.id())
        .map(|(_, addr)| RouterClient::with_transport(vec![addr.clone()], transport.clone()))
        .collect();
    loop {
        if raft.is_initialized().await || raft.leader().is_some() {
            return;
        }
        let mut ready = true;
        for c in &others {
            match tokio::time::timeout(Duration::from_secs(1), c.get_state()).await {
                Ok(Ok(s)) if s.leader_id.is_none() => {}
                Ok(Ok(_)) => {
                    tracing::warn!("a peer already follows a leader; not initialising");
                    return;
                }
                _ => ready = false,
            }
        }
        if ready {
            match raft.initialize(voters.clone()).await {
                Ok(true) => tracing::info!(?voters, "initialised the router cluster"),
                Ok(false) => tracing::info!("already initialised"),
                Err(e) => tracing::error!(error = %e, "initialise failed"),
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A single-voter router inside another process (the node's default, DESIGN §8).
pub struct Embedded {
    router: Router,
}

impl Embedded {
    /// Starts a single-voter router with its data under `data_dir`, serving on
    /// `listener`, initialised on a fresh directory. Returns a client bound to it once
    /// it leads (within `Duration::from_secs(10)`, or an error).
    pub async fn start(
        data_dir: impl Into<PathBuf>,
        listener: TcpListener,
    ) -> Result<(Self, RouterClient), StartError> {
        Self::start_with(data_dir, listener, Routes::default(), Transport::Plaintext).await
    }

    /// Like [`Embedded::start`], also serving `extra` gRPC services on the listener,
    /// over `transport` (plaintext is for a loopback listener only).
    pub async fn start_with(
        data_dir: impl Into<PathBuf>,
        listener: TcpListener,
        extra: Routes,
        transport: Transport,
    ) -> Result<(Self, RouterClient), StartError> {
        let opts = RouterOptions {
            id: 1,
            peers: BTreeMap::new(),
            data_dir: data_dir.into(),
            heartbeat_timeout: Duration::from_secs(5),
            raft: RaftTiming::default(),
            transport: transport.clone(),
        };
        let router = Router::start_with(opts, listener, extra).await?;
        if router
            .raft()
            .wait_for_leader(Duration::from_secs(10))
            .await
            .is_none()
        {
            router.shutdown().await;
            return Err(StartError::Raft("embedded router elected no leader".into()));
        }
        let client = RouterClient::with_transport(vec![router.local_addr().to_string()], transport);
        Ok((Self { router }, client))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.router.local_addr()
    }

    pub async fn shutdown(self) {
        self.router.shutdown().await;
    }
}
