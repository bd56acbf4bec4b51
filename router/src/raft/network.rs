//! Raft RPCs between routers over gRPC (`weft.v1.Raft`).
//!
//! **Only for trusted cluster peers**: the peer service appends to the replicated log,
//! so it is mounted only on a router that has peers (never on a node, nor on a single
//! voter) — on its own `--raft-listen` address when one is set — and every RPC is
//! refused unless the caller's certificate names a router ([`crate::identity`]).
//! The messages are protobuf (`proto/weft/v1/raft.proto`), converted to and from
//! openraft's types in [`super::wire`], which refuses a malformed one
//! (`INVALID_ARGUMENT`). A peer whose Raft stopped answers `UNAVAILABLE`; the only
//! typed error on the wire is InstallSnapshot's chunk mismatch, which makes the
//! sender restart the snapshot.
//!
//! Peers are dialled at the address the configuration (`--peers`) names for their id,
//! falling back to the one in the Raft membership: the configuration is what the
//! operator says now, so moving Raft to another port needs only a restart of every
//! router, not a membership change.
//!
//! `Describe` tells a caller who answers at a Raft address and where that router's
//! `weft.v1.Router` service is ([`Described`]): the bootstrap asks it of every peer,
//! and with separate Raft addresses a follower asks it of the leader, so that the
//! writes it refuses name the leader's Router address, not its Raft one.
//!
//! One tonic `Channel` per peer address is cached and shared by every client openraft
//! creates for that peer (a channel multiplexes requests over one HTTP/2 connection
//! and reconnects by itself), instead of dialling per RPC.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    Infallible, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError,
    SnapshotMismatch,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use tonic::transport::Channel;
use weft_proto::grpc::raft_client::RaftClient;
use weft_proto::grpc::raft_server::Raft as RaftRpc;
use weft_proto::grpc::{self as pb, DescribeReply, DescribeRequest};

use super::wire::{FromWire, ToWire};
use super::TypeConfig;
use crate::identity::{authorize, caller, Action};
use crate::tls::{Expect, Transport};

type NodeId = u64;

/// Largest Raft message accepted (snapshots are sent in chunks smaller than this).
pub const MAX_RAFT_MESSAGE: usize = 16 * 1024 * 1024;

/// Creates per-peer clients from a shared channel cache.
#[derive(Clone)]
pub struct Network {
    transport: Transport,
    /// The configured Raft address of each peer (`--peers`); preferred to the
    /// membership's.
    peers: Arc<BTreeMap<NodeId, String>>,
    /// addr → channel. std mutex: lookups only, never held across an await. Bounded
    /// by the number of distinct peer addresses in the membership.
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

/// What a router said about itself in answer to `Describe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    pub id: NodeId,
    pub initialized: bool,
    pub leader_id: Option<NodeId>,
    /// Its `weft.v1.Router` address, as a node dials it (see [`api_addr_at`]).
    pub api_addr: String,
}

/// The Router address of a router dialled at `raft_addr` (`host:port`) whose
/// Router service is bound to `bound` (`ip:port`): `bound` itself, or — when it is
/// bound to every interface (`0.0.0.0`, `::`) — the host it was dialled at with the
/// bound port. `None` when `bound` does not parse.
pub fn api_addr_at(raft_addr: &str, bound: &str) -> Option<String> {
    let bound: SocketAddr = bound.parse().ok()?;
    if !bound.ip().is_unspecified() {
        return Some(bound.to_string());
    }
    let (host, _) = raft_addr.rsplit_once(':')?;
    Some(format!("{host}:{}", bound.port()))
}

impl Network {
    /// Peers are dialled over `transport`, expecting a router certificate, at the
    /// address `peers` names for them (else the membership's).
    pub fn new(transport: Transport, peers: BTreeMap<NodeId, String>) -> Self {
        Self {
            transport,
            peers: Arc::new(peers),
            channels: Arc::default(),
        }
    }

    /// The configured Raft address of `id`, if any.
    pub fn peer_addr(&self, id: NodeId) -> Option<&str> {
        self.peers.get(&id).map(String::as_str)
    }

    /// Asks the router at Raft address `addr` who it is (bounded by `timeout`).
    pub async fn describe(&self, addr: &str, timeout: Duration) -> Result<Described, String> {
        let channel = self
            .channel(addr)
            .ok_or_else(|| format!("{addr} is not host:port"))?;
        let mut request = tonic::Request::new(DescribeRequest {});
        request.set_timeout(timeout);
        let r = tokio::time::timeout(timeout, RaftClient::new(channel).describe(request))
            .await
            .map_err(|_| format!("{addr}: Describe timed out"))?
            .map_err(|s| format!("{addr}: {:?}: {}", s.code(), s.message()))?
            .into_inner();
        let api_addr = api_addr_at(addr, &r.api_addr).ok_or_else(|| {
            format!(
                "{addr}: Describe named no usable address ({:?})",
                r.api_addr
            )
        })?;
        Ok(Described {
            id: r.id,
            initialized: r.initialized,
            leader_id: r.leader_id,
            api_addr,
        })
    }

    fn channel(&self, addr: &str) -> Option<Channel> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(addr) {
            return Some(c.clone());
        }
        let c = self
            .transport
            .channel(addr, Expect::Router, Duration::from_secs(1))
            .ok()?;
        map.insert(addr.to_owned(), c.clone());
        Some(c)
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        let addr = self.peer_addr(target).unwrap_or(&node.addr).to_owned();
        PeerClient {
            target,
            client: self.channel(&addr).map(|c| {
                RaftClient::new(c)
                    .max_decoding_message_size(MAX_RAFT_MESSAGE)
                    .max_encoding_message_size(MAX_RAFT_MESSAGE)
            }),
            addr,
        }
    }
}

/// The client side of one peer link.
pub struct PeerClient {
    target: NodeId,
    addr: String,
    /// `None` when the address does not parse: every RPC then reports unreachable.
    client: Option<RaftClient<Channel>>,
}

#[derive(Debug, thiserror::Error)]
#[error("peer {addr}: {msg}")]
struct PeerError {
    addr: String,
    msg: String,
}

type PeerResult<T, E = Infallible> = Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl PeerClient {
    fn network<E: std::error::Error>(
        &self,
        msg: impl std::fmt::Display,
    ) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
        RPCError::Network(NetworkError::new(&PeerError {
            addr: self.addr.clone(),
            msg: msg.to_string(),
        }))
    }

    /// Sends `req` (converted to its protobuf message) with `rpc` and converts the
    /// reply back; a failed call, or a reply that does not convert, is a network error.
    async fn call<Req, Wire, Reply, Resp, E, F, Fut>(
        &mut self,
        req: &Req,
        option: &RPCOption,
        rpc: F,
    ) -> PeerResult<Resp, E>
    where
        Req: ToWire<Wire = Wire>,
        Resp: FromWire<Wire = Reply>,
        E: std::error::Error,
        F: FnOnce(RaftClient<Channel>, tonic::Request<Wire>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Reply>, tonic::Status>>,
    {
        let Some(client) = self.client.clone() else {
            return Err(self.network("invalid address"));
        };
        let wire = req.to_wire().map_err(|e| self.network(e))?;
        let mut request = tonic::Request::new(wire);
        request.set_timeout(option.hard_ttl());
        let reply = rpc(client, request)
            .await
            .map_err(|s| self.network(format!("{:?}: {}", s.code(), s.message())))?;
        Resp::from_wire(reply.into_inner()).map_err(|e| self.network(format!("bad reply: {e}")))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> PeerResult<AppendEntriesResponse<NodeId>> {
        self.call(&rpc, &option, |mut c, r| async move {
            c.append_entries(r).await
        })
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> PeerResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let answer: Result<InstallSnapshotResponse<NodeId>, SnapshotMismatch> = self
            .call(&rpc, &option, |mut c, r| async move {
                c.install_snapshot(r).await
            })
            .await?;
        answer.map_err(|m| {
            RPCError::RemoteError(RemoteError::new(
                self.target,
                RaftError::APIError(InstallSnapshotError::SnapshotMismatch(m)),
            ))
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> PeerResult<VoteResponse<NodeId>> {
        self.call(&rpc, &option, |mut c, r| async move { c.vote(r).await })
            .await
    }
}

/// The server side: hands peer RPCs to the local Raft. Only for trusted cluster peers.
pub struct PeerService {
    pub(super) raft: openraft::Raft<TypeConfig>,
    /// Where this router's `weft.v1.Router` service is bound (told by `Describe`).
    pub(super) api_addr: SocketAddr,
}

/// Refuses every caller but a router, then converts the message (`INVALID_ARGUMENT`
/// when it is malformed).
fn decode<T: FromWire>(req: tonic::Request<T::Wire>) -> Result<T, tonic::Status> {
    authorize(&caller(&req)?, &Action::Raft)?;
    Ok(T::from_wire(req.into_inner())?)
}

fn encode<T: ToWire>(v: &T) -> Result<tonic::Response<T::Wire>, tonic::Status> {
    v.to_wire()
        .map(tonic::Response::new)
        .map_err(|e| tonic::Status::internal(e.to_string()))
}

/// Raft on this router stopped (shut down, or a storage failure): the caller retries
/// elsewhere or later.
fn stopped<E: std::fmt::Display>(e: E) -> tonic::Status {
    tonic::Status::unavailable(format!("raft: {e}"))
}

#[tonic::async_trait]
impl RaftRpc for PeerService {
    async fn append_entries(
        &self,
        req: tonic::Request<pb::AppendEntriesRequest>,
    ) -> Result<tonic::Response<pb::AppendEntriesReply>, tonic::Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = decode(req)?;
        encode(&self.raft.append_entries(rpc).await.map_err(stopped)?)
    }

    async fn vote(
        &self,
        req: tonic::Request<pb::VoteRequest>,
    ) -> Result<tonic::Response<pb::VoteReply>, tonic::Status> {
        let rpc: VoteRequest<NodeId> = decode(req)?;
        encode(&self.raft.vote(rpc).await.map_err(stopped)?)
    }

    async fn install_snapshot(
        &self,
        req: tonic::Request<pb::InstallSnapshotRequest>,
    ) -> Result<tonic::Response<pb::InstallSnapshotReply>, tonic::Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(req)?;
        let answer = match self.raft.install_snapshot(rpc).await {
            Ok(r) => Ok(r),
            Err(RaftError::APIError(InstallSnapshotError::SnapshotMismatch(m))) => Err(m),
            Err(e) => return Err(stopped(e)),
        };
        encode(&answer)
    }

    async fn describe(
        &self,
        req: tonic::Request<DescribeRequest>,
    ) -> Result<tonic::Response<DescribeReply>, tonic::Status> {
        authorize(&caller(&req)?, &Action::Raft)?;
        let metrics = self.raft.metrics().borrow().clone();
        let initialized = self.raft.is_initialized().await.unwrap_or(true);
        Ok(tonic::Response::new(DescribeReply {
            id: metrics.id,
            initialized,
            leader_id: metrics.current_leader,
            api_addr: self.api_addr.to_string(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::api_addr_at;

    #[test]
    fn router_address_is_the_bound_one_or_the_dialled_host() {
        assert_eq!(
            api_addr_at("r1.peers:9401", "0.0.0.0:9400").as_deref(),
            Some("r1.peers:9400")
        );
        assert_eq!(
            api_addr_at("[::1]:9401", "[::]:9400").as_deref(),
            Some("[::1]:9400")
        );
        assert_eq!(
            api_addr_at("127.0.0.1:9401", "127.0.0.5:7000").as_deref(),
            Some("127.0.0.5:7000")
        );
        assert_eq!(api_addr_at("r1:9401", "nonsense"), None);
        assert_eq!(api_addr_at("no-port", "0.0.0.0:1"), None);
    }
}
