//! [`RouterClient`]: what a node uses to talk to the router group.
//!
//! It keeps one tonic `Channel` per router address and remembers the last leader.
//! A write refused with `UNAVAILABLE` is retried at the address in the `weft-leader`
//! metadata, or at the next configured router when none is named, with exponential
//! backoff, at most [`MAX_RETRIES`] times. Other errors (bad input, unknown node) are
//! returned at once: retrying cannot fix them.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::Channel;
use tonic::{Code, Status};
use weft_proto::grpc::{self, router_client::RouterClient as GrpcClient};

use crate::service::{LEADER_HEADER, MAX_REQUEST_BYTES};
use crate::tls::{Expect, Transport};

/// Retries after the first attempt.
pub const MAX_RETRIES: usize = 3;
/// Backoff before retry n is `BASE_BACKOFF * 2^n` plus up to 50% jitter.
const BASE_BACKOFF: Duration = Duration::from_millis(100);
/// Cached channels; leader addresses learnt from metadata are added up to this.
const MAX_CHANNELS: usize = 64;

#[derive(Clone)]
pub struct RouterClient {
    endpoints: Arc<Vec<String>>,
    transport: Transport,
    /// std mutex: map lookups only, never across an await.
    state: Arc<Mutex<ClientState>>,
}

struct ClientState {
    target: String,
    next: usize,
    channels: HashMap<String, Channel>,
}

impl RouterClient {
    /// A plaintext client for the routers at `endpoints` (`host:port`); nothing
    /// connects yet.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self::with_transport(endpoints, Transport::Plaintext)
    }

    /// A client for the routers at `endpoints` over `transport` (mutual TLS: the
    /// server must present a member certificate of the cluster CA).
    pub fn with_transport(endpoints: Vec<String>, transport: Transport) -> Self {
        let target = endpoints.first().cloned().unwrap_or_default();
        Self {
            endpoints: Arc::new(endpoints),
            transport,
            state: Arc::new(Mutex::new(ClientState {
                target,
                next: 0,
                channels: HashMap::new(),
            })),
        }
    }

    fn client(&self) -> Result<(String, GrpcClient<Channel>), Status> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let addr = st.target.clone();
        let ch = match st.channels.get(&addr) {
            Some(c) => c.clone(),
            None => {
                let c = self
                    .transport
                    .channel(&addr, Expect::Member, Duration::from_secs(1))
                    .map_err(|e| {
                        Status::invalid_argument(format!("bad router address {addr}: {e}"))
                    })?;
                if st.channels.len() >= MAX_CHANNELS {
                    st.channels.clear();
                }
                st.channels.insert(addr.clone(), c.clone());
                c
            }
        };
        Ok((
            addr,
            GrpcClient::new(ch)
                .max_decoding_message_size(64 * 1024 * 1024)
                .max_encoding_message_size(MAX_REQUEST_BYTES),
        ))
    }

    /// After a failure at `failed`: go to the named leader, or to the next router.
    fn redirect(&self, failed: &str, leader: Option<String>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.target != failed {
            return; // someone else already moved on
        }
        st.target = match leader {
            Some(l) if l != failed => l,
            _ if !self.endpoints.is_empty() => {
                st.next = (st.next + 1) % self.endpoints.len();
                self.endpoints[st.next].clone()
            }
            _ => failed.to_owned(),
        };
    }

    async fn call<T, F, Fut>(&self, f: F) -> Result<T, Status>
    where
        F: Fn(GrpcClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut attempt = 0;
        loop {
            let (addr, client) = self.client()?;
            let err = match f(client).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(e) => e,
            };
            if err.code() != Code::Unavailable || attempt >= MAX_RETRIES {
                return Err(err);
            }
            let leader = err
                .metadata()
                .get(LEADER_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let named = leader.is_some();
            self.redirect(&addr, leader);
            // Straight to a named leader; back off when we are guessing.
            if !named {
                let base = BASE_BACKOFF * 2u32.pow(attempt as u32);
                let jitter = base.mul_f64(fastrand::f64() * 0.5);
                tokio::time::sleep(base + jitter).await;
            }
            attempt += 1;
        }
    }

    pub async fn join(&self, id: &str, addr: &str, zone: &str, load: u64) -> Result<u64, Status> {
        let req = grpc::JoinRequest {
            id: id.into(),
            addr: addr.into(),
            zone: zone.into(),
            load,
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.join(req).await }
        })
        .await
        .map(|r| r.version)
    }

    pub async fn heartbeat(
        &self,
        id: &str,
        sessions: u64,
        owned_topics: u64,
    ) -> Result<u64, Status> {
        let req = grpc::HeartbeatRequest {
            id: id.into(),
            sessions,
            owned_topics,
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.heartbeat(req).await }
        })
        .await
        .map(|r| r.version)
    }

    pub async fn leave(&self, id: &str) -> Result<u64, Status> {
        let req = grpc::LeaveRequest { id: id.into() };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.leave(req).await }
        })
        .await
        .map(|r| r.version)
    }

    pub async fn drain(&self, id: &str) -> Result<u64, Status> {
        let req = grpc::DrainRequest { id: id.into() };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.drain(req).await }
        })
        .await
        .map(|r| r.version)
    }

    pub async fn update_interest(
        &self,
        node: &str,
        add: Vec<String>,
        remove: Vec<String>,
    ) -> Result<u64, Status> {
        let req = grpc::UpdateInterestRequest {
            node: node.into(),
            add,
            remove,
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.update_interest(req).await }
        })
        .await
        .map(|r| r.version)
    }

    /// The state as the router currently targeted has applied it.
    pub async fn get_state(&self) -> Result<grpc::ClusterState, Status> {
        self.call(|mut c| async move { c.get_state(grpc::GetStateRequest {}).await })
            .await
    }

    /// Changes after `from_version` (0 = a snapshot first).
    pub async fn watch(
        &self,
        from_version: u64,
    ) -> Result<tonic::Streaming<grpc::WatchEvent>, Status> {
        self.call(|mut c| async move { c.watch(grpc::WatchRequest { from_version }).await })
            .await
    }
}
