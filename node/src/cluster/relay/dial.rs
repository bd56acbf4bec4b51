//! Keeping one link per peer: which side dials, the cached channel, the `Hello`,
//! the link's lifetime (up, read loop, down).
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Status, Streaming};
use tracing::{debug, info, warn};
use weft_proto::grpc::relay_client::RelayClient;
use weft_proto::grpc::relay_frame::Kind;
use weft_proto::grpc::{self, RelayBatch};

use crate::node::Node;
use crate::topic::{MirrorSync, Placement};

use super::*;

/// Waits (bounded) for a link to `peer` to be up.
pub(super) async fn wait_for_link(peer: &Peer, timeout: Duration) {
    let mut gen = peer.generation.subscribe();
    let _ = tokio::time::timeout(timeout, async {
        while peer.link().is_none() {
            if gen.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
}

impl Relay {
    /// Keeps peers in line with the membership: new members get a record (and a
    /// dialler, if this node dials them), departed ones are closed.
    pub(super) fn sync_members(self: &Arc<Self>, node: &Arc<Node>) {
        let members = self.cluster.members();
        let mut peers = lock(&self.peers);
        peers.retain(|id, peer| {
            let keep = members.iter().any(|(m, _)| **m == **id);
            if !keep {
                info!(peer = %id, "peer left the cluster; its link ends when it stops sending");
                if let Some(d) = lock(&peer.dialer).take() {
                    d.abort();
                }
                // What it sent before leaving (a drained node's last handoffs) may
                // still be on the wire: the link is read to its end, or closed after
                // a grace if the peer went silent.
                if let Some(l) = lock(&peer.link).take() {
                    tokio::spawn(async move {
                        tokio::time::sleep(HANDOFF_TIMEOUT).await;
                        l.close();
                    });
                }
                fail_pending(peer, "the owner left the cluster");
            }
            keep
        });
        for (id, addr) in members {
            if *id == *self.me {
                continue;
            }
            let peer = peers
                .entry(id.as_str().into())
                .or_insert_with(|| {
                    Arc::new(Peer {
                        id: id.as_str().into(),
                        addr: Mutex::new(addr.clone()),
                        channel: Mutex::default(),
                        link: Mutex::default(),
                        generation: watch::channel(0).0,
                        pending: Mutex::default(),
                        dialer: Mutex::default(),
                        revocations_heard: AtomicBool::new(false),
                    })
                })
                .clone();
            *lock(&peer.addr) = addr;
            if *self.me < *peer.id {
                let mut dialer = lock(&peer.dialer);
                if dialer.as_ref().is_none_or(|d| d.is_finished()) {
                    *dialer = Some(tokio::spawn(self.clone().dial(node.clone(), peer.clone())));
                }
            }
        }
        drop(peers);
        // A peer that left no longer holds user tokens back.
        self.release_revocation_hold(node);
    }

    /// Keeps a link to `peer` up: dial, run, back off, again.
    pub(super) async fn dial(self: Arc<Self>, node: Arc<Node>, peer: Arc<Peer>) {
        let mut backoff = Duration::from_millis(50);
        let mut stop = self.stop.subscribe();
        loop {
            if *stop.borrow() {
                return;
            }
            let started = Instant::now();
            match self.connect(&node, &peer).await {
                Ok((queue, inbound, marks_end)) => {
                    self.run_link(&node, &peer, queue, inbound, marks_end).await;
                    if started.elapsed() > Duration::from_secs(5) {
                        backoff = Duration::from_millis(50);
                    }
                }
                Err(e) => debug!(peer = %peer.id, error = %e, "relay dial failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    pub(super) fn channel(&self, peer: &Peer) -> Result<Channel, Status> {
        let addr = lock(&peer.addr).clone();
        let mut cached = lock(&peer.channel);
        if let Some((a, ch)) = cached.as_ref() {
            if *a == addr {
                return Ok(ch.clone());
            }
        }
        let ch = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Status::invalid_argument(format!("peer address {addr}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        // Mutual TLS: the peer must present `weft://node/<its id>`.
        let ch = self
            .cluster
            .transport
            .lazy(ch, weft_router::tls::Expect::Node(peer.id.to_string()));
        *cached = Some((addr, ch.clone()));
        Ok(ch)
    }

    pub(super) async fn connect(
        &self,
        node: &Node,
        peer: &Peer,
    ) -> Result<(Arc<LinkQueue>, Streaming<RelayBatch>, bool), Status> {
        let channel = self.channel(peer)?;
        let queue = Arc::new(LinkQueue::default());
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(pump(queue.clone(), self.hello(), tx, |b| b));
        let mut client = RelayClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let resp = tokio::time::timeout(HELLO_TIMEOUT, client.link(ReceiverStream::new(rx)))
            .await
            .map_err(|_| Status::deadline_exceeded("relay link handshake"));
        let mut inbound = match resp {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(e)) | Err(e) => {
                queue.close();
                return Err(e);
            }
        };
        match read_hello(&mut inbound).await {
            Ok(h) if h.node == *peer.id => Ok((queue, inbound, h.revocations_sent)),
            Ok(grpc::Hello { node: id, .. }) => {
                queue.close();
                node.stats.relay.bad_frames.inc();
                Err(Status::failed_precondition(format!(
                    "dialled {} but {id} answered",
                    peer.id
                )))
            }
            Err(e) => {
                queue.close();
                Err(e)
            }
        }
    }

    pub(super) fn hello(&self) -> Bytes {
        encode(Kind::Hello(grpc::Hello {
            node: self.me.to_string(),
            ring_version: self.cluster.ring_version(),
            revocations_sent: true,
        }))
    }

    /// Serves one link until either side ends it. `marks_end`: the peer's `Hello` said
    /// it understands and sends `RevocationsSent` (see `revocations.rs`).
    pub(super) async fn run_link(
        self: &Arc<Self>,
        node: &Arc<Node>,
        peer: &Arc<Peer>,
        queue: Arc<LinkQueue>,
        mut inbound: Streaming<RelayBatch>,
        marks_end: bool,
    ) {
        self.link_up(node, peer, &queue, marks_end);
        // The control task hears of it after the link is usable: its pass sends
        // `HandoffDone` and the follows this link can now carry.
        let _ = self
            .control
            .send(control::Msg::LinkUp(peer.id.clone()))
            .await;
        let mut stop = self.stop.subscribe();
        let mut to_control = Vec::new();
        loop {
            let msg = tokio::select! {
                m = inbound.message() => m,
                _ = stop.wait_for(|s| *s) => break,
                _ = closed(&queue) => break,
            };
            match msg {
                Ok(Some(batch)) => {
                    let handled = self.handle_batch(node, peer, &queue, batch, &mut to_control);
                    // What the control task must hear, in link order; a busy control
                    // task slows this link's reading, nothing else.
                    for m in to_control.drain(..) {
                        let _ = self.control.send(m).await;
                    }
                    if let Err(e) = handled {
                        node.stats.relay.bad_frames.inc();
                        warn!(peer = %peer.id, error = %e, "bad relay frame; closing the link");
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    if matches!(
                        e.code(),
                        tonic::Code::ResourceExhausted
                            | tonic::Code::OutOfRange
                            | tonic::Code::Internal
                    ) {
                        // Oversized or undecodable at the gRPC layer.
                        node.stats.relay.bad_frames.inc();
                        warn!(peer = %peer.id, error = %e, "bad relay message; link closed");
                    } else {
                        debug!(peer = %peer.id, error = %e, "relay link ended");
                    }
                    break;
                }
            }
        }
        queue.close();
        self.link_down(node, peer, &queue);
    }

    pub(super) fn link_up(
        &self,
        node: &Node,
        peer: &Arc<Peer>,
        queue: &Arc<LinkQueue>,
        marks_end: bool,
    ) {
        if let Some(old) = lock(&peer.link).replace(queue.clone()) {
            old.close();
        }
        node.stats.relay.links.up();
        peer.generation.send_modify(|g| *g += 1);
        self.send_revocations(node, queue, marks_end);
        if !marks_end {
            // An older peer sends its set without an end mark: best effort.
            self.heard_revocations(node, peer);
        }
        info!(peer = %peer.id, "relay link up");
    }

    pub(super) fn link_down(&self, node: &Node, peer: &Arc<Peer>, queue: &Arc<LinkQueue>) {
        {
            let mut link = lock(&peer.link);
            if link.as_ref().is_some_and(|l| Arc::ptr_eq(l, queue)) {
                *link = None;
            }
        }
        node.stats.relay.links.down();
        peer.generation.send_modify(|g| *g += 1);
        fail_pending(
            peer,
            "the link to the topic's owner was lost; the publish may not have been applied",
        );
        self.flag_repair();
        // What this link delivered can no longer be trusted to continue: detach.
        for t in node.registry.all_topics() {
            if let Placement::Mirror { owner, .. } = t.placement() {
                if owner == peer.id {
                    t.set_mirror_sync(MirrorSync::Detached);
                }
            }
        }
        info!(peer = %peer.id, "relay link down");
    }
}
