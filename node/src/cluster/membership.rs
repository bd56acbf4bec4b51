//! This node's membership in the cluster: it joins the router with its advertised
//! address, heartbeats with its load, and follows the router's metadata (members and
//! the versioned slot table) through a resumable Watch, so it can name the owner of
//! any topic and describe the cluster at `GET /v1/cluster`.
//!
//! The router is either embedded (the default: a single-voter router in this process,
//! DESIGN §8) or external (`--router`, a 3/5-voter group). Either way the node talks to
//! it through the same [`RouterClient`], which follows the leader with bounded retries.
//!
//! The view is a copy of committed metadata, replaced or patched only by Watch events
//! in version order, so every node with the same slot-table version names the same
//! owner for every topic. It is held under a `std` mutex: sections are short copies,
//! never across an `.await`.
//!
//! Interest: first-subscriber / last-unsubscriber transitions reach the router's
//! subscription registry in batches ([`crate::topic::interest`]); after a rejoin the node
//! announces its whole interest again. The view follows the registry from the Watch
//! stream; a new owner reads it ([`crate::cluster::relay`]'s `load_interest`) to send
//! snapshots to the nodes that watch what it gained.
//!
//! The relay follows `layout_changes()` (members and ring) to keep links and topic
//! placements in line; [`Cluster::changes`] (every applied change) serves drain and
//! ring waits.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};
use weft_proto::grpc::{self, watch_event::Change};
use weft_router::ring::SlotTable;
use weft_router::tls::Transport;
use weft_router::RouterClient;

use crate::node::Node;

/// How often the node reports its load; the router expires it after its own timeout.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// How long interest transitions gather before they go to the router as one write.
const INTEREST_WINDOW: Duration = Duration::from_millis(20);
/// Topics per `UpdateInterest` (the router's cap is 4,096).
const INTEREST_BATCH: usize = 2048;

/// How this node's cluster connections are secured.
#[derive(Debug, Clone)]
pub struct Security {
    pub transport: Transport,
    /// `--cluster-insecure` was given.
    pub insecure: bool,
}

pub struct Cluster {
    pub node_id: String,
    pub advertise: String,
    /// Whether the router runs inside this process.
    pub embedded: bool,
    /// How cluster connections are secured (the relay dials peers with it).
    pub transport: Transport,
    /// Plaintext by the operator's choice (`--cluster-insecure`), shown in `/v1/cluster`.
    pub insecure: bool,
    client: RouterClient,
    view: Mutex<View>,
    /// The metadata version, bumped after every applied change.
    changed: watch::Sender<u64>,
    /// Bumped when members or the ring change (not the registry).
    layout: watch::Sender<u64>,
}

#[derive(Debug, Clone, Default)]
struct View {
    version: u64,
    members: BTreeMap<String, grpc::Member>,
    slots: Arc<SlotTable>,
    /// The router's subscription registry: topic → nodes with local subscribers.
    interest: std::collections::HashMap<String, weft_router::state::NodeSet>,
    router_id: u64,
    leader_id: Option<u64>,
    leader_addr: String,
    /// When the last heartbeat was acknowledged.
    last_ack: Option<Instant>,
}

impl Cluster {
    /// Joins the router and loads the current metadata.
    pub async fn join(
        node_id: String,
        advertise: String,
        client: RouterClient,
        embedded: bool,
        security: Security,
    ) -> Result<Arc<Self>, tonic::Status> {
        client.join(&node_id, &advertise, "", 0).await?;
        let state = client.get_state().await?;
        let cluster = Arc::new(Self {
            node_id,
            advertise,
            embedded,
            transport: security.transport,
            insecure: security.insecure,
            client,
            view: Mutex::new(View::default()),
            changed: watch::channel(0).0,
            layout: watch::channel(0).0,
        });
        cluster.lock().replace(state);
        cluster.changed.send_modify(|v| *v += 1);
        info!(node = %cluster.node_id, addr = %cluster.advertise, "joined the cluster");
        Ok(cluster)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The node that owns `topic` under the committed slot table this node knows.
    pub fn owner_of(&self, topic: &str) -> Option<String> {
        self.lock().slots.owner(topic).map(str::to_owned)
    }

    pub fn ring_version(&self) -> u64 {
        self.lock().slots.version
    }

    /// Asks the router to take this node out of the ring (it stays a member).
    pub async fn drain(&self) -> Result<u64, tonic::Status> {
        self.client.drain(&self.node_id).await
    }

    /// The committed slot table this node knows.
    pub fn slots(&self) -> Arc<SlotTable> {
        self.lock().slots.clone()
    }

    /// Members (id, gRPC address).
    pub fn members(&self) -> Vec<(String, String)> {
        self.lock()
            .members
            .values()
            .map(|m| (m.id.clone(), m.addr.clone()))
            .collect()
    }

    /// The registry: topic → nodes with local subscribers.
    pub fn interest(&self) -> Vec<(String, Vec<String>)> {
        self.lock()
            .interest
            .iter()
            .map(|(t, n)| (t.clone(), n.iter().cloned().collect()))
            .collect()
    }

    /// Bumped after every applied metadata change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Bumped when the members or the ring change.
    pub fn layout_changes(&self) -> watch::Receiver<u64> {
        self.layout.subscribe()
    }

    /// Waits (bounded) until the ring version is at least `version`.
    pub async fn wait_ring(&self, version: u64, timeout: Duration) {
        let mut changes = self.changes();
        let _ = tokio::time::timeout(timeout, async {
            while self.ring_version() < version {
                if changes.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    /// Heartbeats and follows metadata until `stop` turns true, then leaves.
    pub async fn run(self: Arc<Self>, node: Arc<Node>, mut stop: watch::Receiver<bool>) {
        let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
        let watcher = tokio::spawn(self.clone().follow(stop.clone()));
        node.registry.interest.enable();
        self.announce_all(&node);
        let reporter = tokio::spawn(self.clone().report_interest(node.clone()));
        loop {
            tokio::select! {
                _ = heartbeat.tick() => self.heartbeat(&node).await,
                _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
            }
        }
        watcher.abort();
        reporter.abort();
        if let Err(e) = self.client.leave(&self.node_id).await {
            warn!(error = %e, "could not leave the cluster cleanly");
        }
    }

    async fn heartbeat(&self, node: &Node) {
        let sessions: i64 = node.stats.connections.iter().map(|l| l.get()).sum();
        let owned = node
            .relay
            .get()
            .map_or(node.registry.topic_count() as u64, |r| r.owned_topics());
        match self
            .client
            .heartbeat(&self.node_id, sessions.max(0) as u64, owned)
            .await
        {
            Ok(_) => self.lock().last_ack = Some(Instant::now()),
            Err(status) if status.code() == tonic::Code::NotFound => {
                // The router expired this node (a long pause): join again.
                warn!("the router no longer knows this node; joining again");
                if self
                    .client
                    .join(&self.node_id, &self.advertise, "", 0)
                    .await
                    .is_ok()
                {
                    // Expiry removed this node's interest with it: announce it again.
                    self.announce_all(node);
                }
            }
            Err(status) => warn!(error = %status, "heartbeat failed"),
        }
    }

    /// Queues every topic with local subscribers as an interest gain.
    fn announce_all(&self, node: &Node) {
        for topic in node.registry.interested_topics() {
            node.registry.interest.changed(&topic, true);
        }
    }

    /// Sends interest transitions to the router in batches; a failed batch is put back
    /// (unless a newer state replaced it) and retried after a backoff.
    async fn report_interest(self: Arc<Self>, node: Arc<Node>) {
        let feed = node.registry.interest.clone();
        let mut backoff = Duration::from_millis(100);
        loop {
            feed.wait().await;
            tokio::time::sleep(INTEREST_WINDOW).await;
            loop {
                let batch = feed.take(INTEREST_BATCH);
                if batch.is_empty() {
                    break;
                }
                let (add, remove) = (batch.add.clone(), batch.remove.clone());
                match self
                    .client
                    .update_interest(&self.node_id, add, remove)
                    .await
                {
                    Ok(_) => backoff = Duration::from_millis(100),
                    Err(e) => {
                        warn!(error = %e, "interest update failed; will retry");
                        feed.requeue(batch);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
        }
    }

    /// Applies the router's change stream, resuming from the last version after any
    /// interruption (the router sends a snapshot when that version is too old).
    async fn follow(self: Arc<Self>, stop: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        while !*stop.borrow() {
            let from = self.lock().version;
            match self.client.watch(from).await {
                Ok(mut stream) => {
                    backoff = Duration::from_millis(100);
                    loop {
                        match stream.message().await {
                            Ok(Some(ev)) => self.apply(ev),
                            Ok(None) => break,
                            Err(e) => {
                                warn!(error = %e, "metadata watch interrupted");
                                break;
                            }
                        }
                    }
                }
                Err(e) => warn!(error = %e, "cannot watch the router"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    fn apply(&self, ev: grpc::WatchEvent) {
        let layout = !matches!(ev.change, Some(Change::Interest(_)) | None);
        let mut view = self.lock();
        match ev.change {
            Some(Change::Snapshot(state)) => view.replace(state),
            Some(Change::Member(m)) => {
                view.members.insert(m.id.clone(), m);
            }
            Some(Change::MemberRemoved(id)) => {
                view.members.remove(&id);
            }
            // The ring only moves forward: a router that restarted and has not
            // applied its whole log yet may send an older table; it is ignored.
            Some(Change::Slots(t)) if t.version >= view.slots.version => {
                view.slots = Arc::new(SlotTable {
                    version: t.version,
                    owners: t.owners,
                })
            }
            Some(Change::Slots(_)) => {}
            Some(Change::Interest(delta)) => {
                for topic in delta.add {
                    view.interest.entry(topic).or_default().insert(&delta.node);
                }
                for topic in delta.remove {
                    if let Some(nodes) = view.interest.get_mut(&topic) {
                        nodes.remove(&delta.node);
                        if nodes.is_empty() {
                            view.interest.remove(&topic);
                        }
                    }
                }
            }
            Some(Change::Namespaces(_)) | None => {}
        }
        view.version = view.version.max(ev.version);
        drop(view);
        self.changed.send_modify(|v| *v += 1);
        if layout {
            self.layout.send_modify(|v| *v += 1);
        }
    }

    /// `GET /v1/cluster/owner/{topic}`: who sequences `topic` under this node's ring.
    pub fn describe_owner(&self, topic: &str) -> serde_json::Value {
        let view = self.lock();
        serde_json::json!({
            "topic": topic,
            "slot": weft_router::ring::slot_of(topic),
            "owner": view.slots.owner(topic),
            "ring_version": view.slots.version,
        })
    }

    /// What the metrics exporter reads once a second (cheap: no clone of the view).
    pub fn health(&self) -> Health {
        let view = self.lock();
        let mut members_by_state = [0usize; 3];
        for m in view.members.values() {
            match grpc::MemberState::try_from(m.state) {
                Ok(grpc::MemberState::Joining) => members_by_state[0] += 1,
                Ok(grpc::MemberState::Active) => members_by_state[1] += 1,
                Ok(grpc::MemberState::Draining) => members_by_state[2] += 1,
                _ => {}
            }
        }
        Health {
            members_by_state,
            ring_version: view.slots.version,
            heartbeat_age: view.last_ack.map(|t| t.elapsed()),
        }
    }

    /// `GET /v1/cluster`: members and their states, ring version, slots per node, the
    /// router leader, and this node's view.
    pub fn describe(&self) -> serde_json::Value {
        let view = self.lock().clone();
        let per_node = view.slots.slots_per_node();
        let mut interest_per_node: BTreeMap<&str, usize> = BTreeMap::new();
        for nodes in view.interest.values() {
            for n in nodes {
                *interest_per_node.entry(n.as_str()).or_insert(0) += 1;
            }
        }
        let state_name = |s: i32| match grpc::MemberState::try_from(s) {
            Ok(grpc::MemberState::Joining) => "joining",
            Ok(grpc::MemberState::Active) => "active",
            Ok(grpc::MemberState::Draining) => "draining",
            _ => "unknown",
        };
        let members: Vec<_> = view
            .members
            .values()
            .map(|m| {
                serde_json::json!({
                    "id": m.id,
                    "addr": m.addr,
                    "zone": m.zone,
                    "state": state_name(m.state),
                    "last_heartbeat_ms": m.last_heartbeat_ms,
                    "sessions": m.sessions,
                    "owned_topics": m.owned_topics,
                    "slots": per_node.get(m.id.as_str()).copied().unwrap_or(0),
                })
            })
            .collect();
        serde_json::json!({
            "node": self.node_id,
            "mode": if self.embedded { "embedded" } else { "external" },
            // `plaintext` is the embedded router on loopback or --cluster-insecure.
            "transport": if self.transport.is_tls() { "mutual-tls" } else { "plaintext" },
            "insecure": self.insecure,
            "router": {
                "answered_by": view.router_id,
                "leader_id": view.leader_id,
                "leader_addr": view.leader_addr,
            },
            "version": view.version,
            "ring": {
                "version": view.slots.version,
                "slots": view.slots.owners.len(),
                "slots_per_node": per_node,
            },
            "members": members,
            "interest": {
                "topics": view.interest.len(),
                "topics_per_node": interest_per_node,
            },
            "this_node": {
                "id": self.node_id,
                "advertise": self.advertise,
                "state": view.members.get(&self.node_id).map(|m| state_name(m.state)).unwrap_or("unknown"),
                "slots": per_node.get(self.node_id.as_str()).copied().unwrap_or(0),
                "interest_topics": interest_per_node.get(self.node_id.as_str()).copied().unwrap_or(0),
                "view_version": view.version,
                "last_heartbeat_ack_ms_ago": view.last_ack.map(|t| t.elapsed().as_millis() as u64),
            },
        })
    }
}

impl View {
    fn replace(&mut self, state: grpc::ClusterState) {
        self.version = state.version;
        self.members = state
            .members
            .into_iter()
            .map(|m| (m.id.clone(), m))
            .collect();
        self.interest = state
            .interest
            .into_iter()
            .map(|i| (i.topic, i.nodes.into_iter().collect()))
            .collect();
        let slots = state
            .slots
            .map(|t| SlotTable {
                version: t.version,
                owners: t.owners,
            })
            .unwrap_or_default();
        if slots.version >= self.slots.version {
            self.slots = Arc::new(slots);
        }
        self.router_id = state.router_id;
        self.leader_id = state.leader_id;
        self.leader_addr = state.leader_addr;
    }
}

/// This node's view of the cluster, for metrics ([`Cluster::health`]).
#[derive(Debug, Clone, Copy)]
pub struct Health {
    /// Members joining, active, draining.
    pub members_by_state: [usize; 3],
    pub ring_version: u64,
    /// Since the router last acknowledged a heartbeat; `None` before the first.
    pub heartbeat_age: Option<std::time::Duration>,
}
