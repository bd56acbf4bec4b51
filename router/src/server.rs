//! Assembles a running router on bound listeners: Raft, the public gRPC service, the
//! Raft peer service where there are peers to call it, group commit, the heartbeat
//! reaper and the bootstrap.
//!
//! ```text
//!  nodes, admins ──► listener (--listen)            weft.v1.Router only
//!  other routers ──► raft_listener (--raft-listen)  weft.v1.Raft only (routers with
//!                                                   peers; a single voter has none)
//! ```
//!
//! Every connection is accepted through [`crate::tls::Transport::incoming`]: with
//! mutual TLS the caller's identity is resolved at the handshake and each RPC is
//! authorised with it ([`crate::identity`]). The Raft peer service answers only router
//! certificates. With a Raft listener it is mounted only there and the Router service
//! only on the main listener (a call on the wrong one is answered `UNIMPLEMENTED`), so
//! a network policy can keep nodes off the Raft port altogether. A router with peers
//! must have one (the configuration refuses a group without it); a single voter — the
//! embedded router — has no Raft caller and serves no Raft at all.
//!
//! Bootstrap (the same on a laptop and in a StatefulSet): on a fresh store the router
//! with the lowest id initialises the cluster with every peer as a voter, once every
//! peer answers `Describe` at its Raft address and none belongs to a group yet (none
//! is initialised or knows a leader). A store that
//! holds any membership is never initialised again, so restarts keep the cluster they
//! belonged to.

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
use crate::raft::network::api_addr_at;
use crate::raft::{RaftNode, RaftTiming, StartError};
use crate::service::{reap_dead, Committer, RouterService, MAX_REQUEST_BYTES};
use crate::tls::Transport;

/// What [`Router::start`] needs (the binary builds it from [`crate::config::Config`]).
#[derive(Debug, Clone)]
pub struct RouterOptions {
    pub id: u64,
    /// Every voter including this one (id → the `host:port` its Raft service answers
    /// at: its Raft listener if it has one, else its main listener); empty = a single
    /// voter reachable at the bound address.
    pub peers: BTreeMap<u64, String>,
    pub data_dir: PathBuf,
    pub heartbeat_timeout: Duration,
    pub raft: RaftTiming,
    /// Mutual TLS for every connection in and out, or plaintext.
    pub transport: Transport,
}

type Serving = JoinHandle<Result<(), tonic::transport::Error>>;

/// A running router. Drop does not stop it: call [`Router::shutdown`].
pub struct Router {
    raft: RaftNode,
    addr: SocketAddr,
    raft_addr: Option<SocketAddr>,
    stop: CancellationToken,
    serve: Vec<Serving>,
    tasks: Vec<JoinHandle<()>>,
}

fn bound(l: &TcpListener) -> Result<SocketAddr, StartError> {
    l.local_addr()
        .map_err(|e| StartError::Raft(format!("listener: {e}")))
}

impl Router {
    /// Starts serving on `listener` at once (Raft on the same listener); bootstrap
    /// continues in the background.
    pub async fn start(opts: RouterOptions, listener: TcpListener) -> Result<Self, StartError> {
        Self::start_with(opts, listener, None, Routes::default()).await
    }

    /// Like [`Router::start`], with the Raft peer service on `raft_listener` alone
    /// when one is given (`--raft-listen`; `opts.peers` then names the routers' Raft
    /// addresses), and `extra` gRPC services (an embedding node's relay service) on
    /// `listener`.
    pub async fn start_with(
        opts: RouterOptions,
        listener: TcpListener,
        raft_listener: Option<TcpListener>,
        extra: Routes,
    ) -> Result<Self, StartError> {
        let addr = bound(&listener)?;
        let raft_addr = raft_listener.as_ref().map(bound).transpose()?;
        if raft_listener.is_none() && opts.peers.keys().any(|id| *id != opts.id) {
            return Err(StartError::Config(
                "a router with peers serves Raft on a listener of its own (--raft-listen)".into(),
            ));
        }
        // With a Raft listener of its own this router learns where the others' Router
        // services are; its own is at its Raft host, on the main listener's port.
        let own_api = raft_addr.map(|r| {
            let dialled = opts
                .peers
                .get(&opts.id)
                .cloned()
                .unwrap_or_else(|| r.to_string());
            api_addr_at(&dialled, &addr.to_string()).unwrap_or_else(|| addr.to_string())
        });
        let raft = RaftNode::start(
            opts.id,
            &opts.data_dir,
            &opts.raft,
            opts.transport.clone(),
            opts.peers.clone(),
            own_api,
        )
        .await?;
        let committer = Committer::spawn(raft.clone());
        let router = RouterServer::new(RouterService::new(raft.clone(), committer.clone()))
            .max_decoding_message_size(MAX_REQUEST_BYTES);
        let stop = CancellationToken::new();
        let routes = extra;
        let mut serve = Vec::new();
        if let Some(l) = raft_listener {
            serve.push(tokio::spawn(
                tonic::transport::Server::builder()
                    .tcp_nodelay(true)
                    .add_service(raft.peer_service(addr))
                    .serve_with_incoming_shutdown(
                        opts.transport.incoming(l),
                        stop.clone().cancelled_owned(),
                    ),
            ));
        }
        serve.push(tokio::spawn(
            tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .add_routes(routes)
                .add_service(router)
                .serve_with_incoming_shutdown(
                    opts.transport.incoming(listener),
                    stop.clone().cancelled_owned(),
                ),
        ));
        let mut tasks = vec![
            tokio::spawn(reap_dead(raft.clone(), committer, opts.heartbeat_timeout)),
            tokio::spawn(raft.clone().learn_leader_api()),
        ];
        let voters = if opts.peers.is_empty() {
            BTreeMap::from([(opts.id, raft_addr.unwrap_or(addr).to_string())])
        } else {
            opts.peers.clone()
        };
        tasks.push(tokio::spawn(bootstrap(raft.clone(), voters)));
        tracing::info!(id = opts.id, %addr, raft = ?raft_addr, transport = ?opts.transport, "router serving");
        Ok(Self {
            raft,
            addr,
            raft_addr,
            stop,
            serve,
            tasks,
        })
    }

    /// The address the Router service is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address the Raft service alone is bound to, when it has its own listener.
    pub fn raft_addr(&self) -> Option<SocketAddr> {
        self.raft_addr
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
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            futures_util::future::join_all(self.serve),
        )
        .await;
        self.raft.shutdown().await;
    }
}

async fn bootstrap(raft: RaftNode, voters: BTreeMap<u64, String>) {
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
    let others: Vec<(u64, String)> = voters
        .iter()
        .filter(|(id, _)| **id != raft.id())
        .map(|(id, addr)| (*id, addr.clone()))
        .collect();
    loop {
        if raft.is_initialized().await || raft.leader().is_some() {
            return;
        }
        let mut ready = true;
        for (id, addr) in &others {
            match raft.describe(*id, addr).await {
                Ok(d) if d.leader_id.is_none() && !d.initialized => {}
                Ok(_) => {
                    tracing::warn!(
                        peer = id,
                        "a peer already belongs to a group; not initialising"
                    );
                    return;
                }
                Err(e) => {
                    tracing::debug!(peer = id, error = %e, "peer not ready for bootstrap");
                    ready = false;
                }
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
        let router = Router::start_with(opts, listener, None, extra).await?;
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
