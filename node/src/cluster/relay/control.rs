//! The relay's control task: the one owner of the handoff and reconcile state
//! ([`Handoffs`]). Link tasks, request handlers and drain send it [`Msg`]s on a
//! bounded inbox instead of reconciling inline; it drains the inbox, asks the pure
//! planner (`plan.rs`) what to do, and carries the steps out on the topics and links.
//!
//! A pass over every topic runs when the ring or the membership changes (not on
//! registry changes, which are constant in a busy cluster), when a link comes up, when
//! someone asks for one (a 421 from a peer, drain), when a mirror needs repair (at the
//! next 1 s tick), and every 10 s as a safety net.
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::{debug, info, warn};
use weft_proto::grpc::relay_frame::Kind;
use weft_proto::grpc::{self};

use crate::node::Node;
use crate::topic::Topic;

use super::plan::{Action, Handoffs, Heard, Step, TopicView, World};
use super::*;

/// Messages waiting for the control task at most; senders wait when it is full.
pub(super) const INBOX: usize = 256;

/// What the control task is told.
#[derive(Debug)]
pub(super) enum Msg {
    /// Run a pass now; the reply carries the topics owned after it.
    Pass(oneshot::Sender<u64>),
    /// The peer has handed over everything it had for this node up to a ring version.
    HandoffDone { from: Arc<str>, ring: u64 },
    /// A link to the peer came up.
    LinkUp(Arc<str>),
    /// A mirror waits for its owner's snapshot: look again at the next tick.
    Repair,
}

impl Relay {
    /// Runs a pass on the control task and waits for it; the topics owned after it.
    pub async fn pass(&self) -> u64 {
        let (tx, rx) = oneshot::channel();
        if self.control.send(Msg::Pass(tx)).await.is_err() {
            return self.owned_topics();
        }
        rx.await.unwrap_or_else(|_| self.owned_topics())
    }

    /// Asks for a repair pass at the next tick. A full inbox drops the request: a pass
    /// is coming anyway.
    pub(super) fn flag_repair(&self) {
        let _ = self.control.try_send(Msg::Repair);
    }

    /// Notes a ring version a peer acted under, *before* the frame that named it is
    /// applied, so no pass can see its effect without it. A version that never arrives
    /// here (a confused or hostile peer) stops holding placements after
    /// [`HANDOFF_TIMEOUT`].
    pub(super) fn heard_of_ring(&self, version: u64) {
        let mut h = lock(&self.heard);
        if version > h.version {
            *h = Heard {
                version,
                at: Instant::now(),
            };
        }
    }

    /// The control task, until [`Relay::shutdown`]. Its first pass runs at once.
    pub async fn run(self: Arc<Self>, node: Arc<Node>) {
        let Some(mut inbox) = lock(&self.inbox).take() else {
            return;
        };
        let mut state = Handoffs::new(self.me.clone(), Instant::now());
        let mut layout = self.cluster.layout_changes();
        let mut stop = self.stop.subscribe();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_pass: Option<Instant> = None;
        let mut repair = false;
        let mut replies = Vec::new();
        let mut pass = true;
        loop {
            if !pass {
                let first = tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => return,
                    r = layout.changed() => {
                        if r.is_err() {
                            return;
                        }
                        pass = true;
                        None
                    }
                    m = inbox.recv() => match m {
                        Some(m) => Some(m),
                        None => return,
                    },
                    _ = tick.tick() => {
                        pass = repair || last_pass.is_none_or(|t| t.elapsed() >= Duration::from_secs(10));
                        None
                    }
                };
                // Everything already queued is taken in before a pass decides anything.
                let queued = std::iter::from_fn(|| inbox.try_recv().ok());
                for m in first.into_iter().chain(queued) {
                    match m {
                        Msg::Pass(reply) => {
                            pass = true;
                            replies.push(reply);
                        }
                        Msg::HandoffDone { from, ring } => {
                            self.on_handoff_done(&node, &mut state, &from, ring, &mut repair)
                        }
                        Msg::LinkUp(peer) => {
                            let steps = state.link_up(&peer, &views(&node));
                            self.execute(&node, steps, 0, &mut repair);
                            pass = true;
                        }
                        Msg::Repair => repair = true,
                    }
                }
            }
            if pass {
                self.sync_members(&node);
                repair = false;
                self.run_pass(&node, &mut state, &mut repair);
                last_pass = Some(Instant::now());
                let owned = self.owned_topics();
                for r in replies.drain(..) {
                    let _ = r.send(owned);
                }
                pass = false;
            }
        }
    }

    /// One reconcile pass: plan, carry out, publish what the data path reads.
    fn run_pass(&self, node: &Node, state: &mut Handoffs, repair: &mut bool) {
        let slots = self.cluster.slots();
        let members: HashSet<String> = self
            .cluster
            .members()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let linked: HashSet<Arc<str>> = lock(&self.peers)
            .values()
            .filter(|p| p.link().is_some())
            .map(|p| p.id.clone())
            .collect();
        let world = World {
            slots: &slots,
            members: &members,
            linked: &linked,
            heard: *lock(&self.heard),
            now: Instant::now(),
        };
        let plan = state.pass(&world, &views(node));
        self.publish_awaiting(state);
        if let Some(m) = &plan.moved {
            info!(ring = m.now, prev = m.prev, from = ?m.awaiting, "ring moved; slots awaiting handoff");
        }
        if plan.stale {
            debug!(
                ring = slots.version,
                "a peer has handed over under a newer ring; placements wait for it"
            );
        }
        self.execute(node, plan.steps, slots.version, repair);
        self.owned.store(plan.owned, Ordering::Relaxed);
        if plan.moved.is_some() {
            self.load_interest(node, &slots);
        }
    }

    fn on_handoff_done(
        &self,
        node: &Node,
        state: &mut Handoffs,
        from: &Arc<str>,
        ring: u64,
        repair: &mut bool,
    ) {
        let (steps, settled) =
            state.handoff_done(from, ring, self.cluster.ring_version(), &views(node));
        self.publish_awaiting(state);
        self.execute(node, steps, 0, repair);
        if settled {
            info!(from = %from, ring_version = ring, "handoff complete");
        } else {
            info!(from = %from, ring_version = ring, "handoff complete (nothing was awaited)");
        }
    }

    /// Where a topic created now starts ([`Relay::placement_fn`]): the ring the control
    /// task has acted on and the handoffs it waits for under it.
    fn publish_awaiting(&self, state: &Handoffs) {
        *self.planned.write().unwrap_or_else(|p| p.into_inner()) = Planned {
            slots: state.acted_on().clone(),
            awaiting: state.awaiting(),
        };
    }

    /// Carries out the planner's steps, in order. A step whose topic has changed since
    /// it was planned is skipped: the next pass decides again.
    fn execute(&self, node: &Node, steps: Vec<Step>, ring: u64, repair: &mut bool) {
        for Step { action, seen } in steps {
            let still = |name: &str| {
                node.registry
                    .get(name)
                    .filter(|t| seen.as_ref().is_none_or(|seen| t.placement() == *seen))
            };
            match action {
                Action::HandoffDone { peer, ring } => {
                    // No link: a new one hears it (its `LinkUp` clears what was sent).
                    if let Some(link) = self.peer(&peer).and_then(|p| p.link()) {
                        link.push_control(encode(Kind::HandoffDone(grpc::HandoffDone {
                            ring_version: ring,
                        })));
                    }
                }
                Action::HandOff { topic, to } => {
                    let (Some(t), Some(link)) =
                        (still(&topic), self.peer(&to).and_then(|p| p.link()))
                    else {
                        continue;
                    };
                    if let Some(followers) = t.hand_off(&to, &*link, ring, HANDOFF_BYTES) {
                        debug!(topic = %topic, to = %to, "handed off");
                        for l in followers {
                            l.push_lagged(&topic);
                        }
                        *repair |= self.refollow(&t, &to);
                    }
                }
                Action::Abandon { topic, to } => {
                    if let Some(t) = still(&topic) {
                        warn!(topic = %topic, to = %to, "no link to the new owner: its state is not handed over");
                        *repair |= self.mirror(&t, to);
                    }
                }
                Action::Mirror { topic, owner } => {
                    if let Some(t) = still(&topic) {
                        *repair |= self.mirror(&t, owner);
                    }
                }
                Action::OwnAfresh { topic } => {
                    if let Some(t) = still(&topic) {
                        info!(topic = %topic, "no handoff is coming; owning it with a new epoch");
                        t.become_owner(
                            node.registry.mint_epoch(),
                            node.idempotency_window(),
                            &node.stats,
                        );
                    }
                }
                Action::Receive { topic, from } => {
                    if let Some(t) = still(&topic) {
                        t.become_receiving(from);
                    }
                }
                Action::Refollow { topic, owner } => {
                    if let Some(t) = still(&topic) {
                        *repair |= self.refollow(&t, &owner);
                    }
                }
            }
        }
    }

    /// Makes `t` a mirror of `owner`: peers that followed it here look again, and it
    /// follows the new owner.
    fn mirror(&self, t: &Topic, owner: Arc<str>) -> bool {
        for l in t.become_mirror(owner.clone()) {
            l.push_lagged(&t.name);
        }
        self.refollow(t, &owner)
    }
}

/// Every topic held here, as the planner sees it.
fn views(node: &Node) -> Vec<TopicView> {
    node.registry
        .all_topics()
        .into_iter()
        .map(|t| (t.name.clone(), t.placement()))
        .collect()
}
