//! Raft RPCs between routers over gRPC (`weft.v1.Raft`).
//!
//! **Only for trusted cluster peers**: the peer service appends to the replicated log,
//! so it is mounted only on a router that has peers (never on a node, nor on a single
//! voter) — on its own `--raft-listen` address when one is set — and every RPC is
//! refused unless the caller's certificate names a router ([`crate::identity`]).
//! Payloads are openraft's own types as JSON, so the wire stays private to this
//! module.
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

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;
use weft_proto::grpc::raft_client::RaftClient;
use weft_proto::grpc::raft_server::Raft as RaftRpc;
use weft_proto::grpc::{DescribeReply, DescribeRequest, RaftPayload};

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

impl PeerClient {
    async fn call<Req, Resp, E>(
        &mut self,
        which: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let err = |msg: String| PeerError {
            addr: self.addr.clone(),
            msg,
        };
        let Some(client) = self.client.as_mut() else {
            return Err(RPCError::Network(NetworkError::new(&err(
                "invalid address".into(),
            ))));
        };
        let json = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(RaftPayload { json });
        request.set_timeout(option.hard_ttl());
        let reply = match which {
            Rpc::Append => client.append_entries(request).await,
            Rpc::Vote => client.vote(request).await,
            Rpc::Snapshot => client.install_snapshot(request).await,
        }
        .map_err(|s| {
            RPCError::Network(NetworkError::new(&err(format!(
                "{:?}: {}",
                s.code(),
                s.message()
            ))))
        })?;
        let result: Result<Resp, RaftError<NodeId, E>> =
            serde_json::from_slice(&reply.into_inner().json)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

enum Rpc {
    Append,
    Vote,
    Snapshot,
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Rpc::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Rpc::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Rpc::Vote, &rpc, &option).await
    }
}

/// The server side: hands peer RPCs to the local Raft. Only for trusted cluster peers.
pub struct PeerService {
    pub(super) raft: openraft::Raft<TypeConfig>,
    /// Where this router's `weft.v1.Router` service is bound (told by `Describe`).
    pub(super) api_addr: SocketAddr,
}

/// Refuses every caller but a router, then decodes.
fn decode<T: DeserializeOwned>(req: tonic::Request<RaftPayload>) -> Result<T, tonic::Status> {
    authorize(&caller(&req)?, &Action::Raft)?;
    serde_json::from_slice(&req.into_inner().json)
        .map_err(|e| tonic::Status::invalid_argument(format!("bad raft payload: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
    serde_json::to_vec(v)
        .map(|json| tonic::Response::new(RaftPayload { json }))
        .map_err(|e| tonic::Status::internal(e.to_string()))
}

#[tonic::async_trait]
impl RaftRpc for PeerService {
    async fn append_entries(
        &self,
        req: tonic::Request<RaftPayload>,
    ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = decode(req)?;
        encode(&self.raft.append_entries(rpc).await)
    }

    async fn vote(
        &self,
        req: tonic::Request<RaftPayload>,
    ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
        let rpc: VoteRequest<NodeId> = decode(req)?;
        encode(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: tonic::Request<RaftPayload>,
    ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(req)?;
        encode(&self.raft.install_snapshot(rpc).await)
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
