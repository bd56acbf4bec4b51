//! Raft RPCs between routers over gRPC (`weft.v1.Raft`).
//!
//! **Only for trusted cluster peers**: the peer service appends to the replicated log,
//! so it is mounted only on a router that has peers (never on a node, nor on a single
//! voter) and every RPC is refused unless the caller's certificate names a router
//! ([`crate::identity`]). Payloads are openraft's own types as JSON, so the wire stays
//! private to this module.
//!
//! One tonic `Channel` per peer address is cached and shared by every client openraft
//! creates for that peer (a channel multiplexes requests over one HTTP/2 connection
//! and reconnects by itself), instead of dialling per RPC.

use std::collections::HashMap;
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
use weft_proto::grpc::RaftPayload;

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
    /// addr → channel. std mutex: lookups only, never held across an await. Bounded
    /// by the number of distinct peer addresses in the membership.
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl Network {
    /// Peers are dialled over `transport`, expecting a router certificate.
    pub fn new(transport: Transport) -> Self {
        Self {
            transport,
            channels: Arc::default(),
        }
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
        PeerClient {
            target,
            addr: node.addr.clone(),
            client: self.channel(&node.addr).map(|c| {
                RaftClient::new(c)
                    .max_decoding_message_size(MAX_RAFT_MESSAGE)
                    .max_encoding_message_size(MAX_RAFT_MESSAGE)
            }),
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
}
