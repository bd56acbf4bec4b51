//! The `weft.v1.Relay` gRPC service: accepts links from peers that sort first.
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use weft_proto::grpc::{self, RelayBatch};

use crate::node::Node;

use super::*;

/// Where the relay service finds the relay and its node: filled once the node has
/// joined (the service must be registered before the router it needs is up).
pub type RelaySlot = Arc<std::sync::OnceLock<(Arc<Relay>, Arc<Node>)>>;

/// The `weft.v1.Relay` gRPC service peers dial.
pub fn relay_service(slot: RelaySlot) -> grpc::relay_server::RelayServer<RelayService> {
    grpc::relay_server::RelayServer::new(RelayService { slot })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
}

/// Accepts links from peers that sort before this node.
pub struct RelayService {
    slot: RelaySlot,
}

#[tonic::async_trait]
impl grpc::relay_server::Relay for RelayService {
    type LinkStream = ReceiverStream<Result<RelayBatch, Status>>;

    async fn link(
        &self,
        request: Request<Streaming<RelayBatch>>,
    ) -> Result<Response<Self::LinkStream>, Status> {
        let Some((relay, node)) = self.slot.get().cloned() else {
            return Err(Status::unavailable(
                "this node has not joined the cluster yet",
            ));
        };
        // Who dialled, from its certificate; its Hello may name only itself.
        let caller = weft_router::identity::caller(&request)?;
        let mut inbound = request.into_inner();
        let hello = match read_hello(&mut inbound).await {
            Ok(h) => h,
            Err(e) => {
                node.stats.relay.bad_frames.inc();
                return Err(e);
            }
        };
        let from = hello.node;
        weft_router::identity::authorize(
            &caller,
            &weft_router::identity::Action::RelayHello(&from),
        )?;
        relay.sync_members(&node);
        let peer = match relay.peer(&from) {
            Some(p) if from != *relay.me => p,
            _ => {
                node.stats.relay.bad_frames.inc();
                return Err(Status::permission_denied(format!(
                    "{from} is not a member of this cluster"
                )));
            }
        };
        let queue = Arc::new(LinkQueue::default());
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(pump(queue.clone(), relay.hello(), tx, Ok));
        tokio::spawn(async move {
            relay
                .run_link(&node, &peer, queue, inbound, hello.revocations_sent)
                .await
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
