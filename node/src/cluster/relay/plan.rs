//! The relay's decisions, as pure code: given the ring this node last acted on, the
//! ring it has now, the members, the links, the handoffs it waits for and the
//! placement of every topic it holds, what must happen. Nothing here locks, sends or
//! reads a clock: [`Handoffs`] is the state, its methods take events in and give
//! [`Action`]s out, and the control task (`control.rs`) is the one owner that feeds
//! it and carries the actions out (openraft's `engine/` is the model).
//!
//! The rules a pass keeps:
//! - a topic the ring gives away is handed over (its state, then this node mirrors it)
//!   when a link to the new owner is up; without one it is kept, for a grace after
//!   the ring moved, and after that mirrored without its state;
//! - a slot that comes here from a member that is still up waits (bounded) for that
//!   member's handoff; from a departed one, or past [`HANDOFF_TIMEOUT`], its topics
//!   start a new epoch;
//! - while a peer has acted under a newer ring than this node has seen, nothing
//!   moves (it would hand back what it was just given);
//! - every peer hears `HandoffDone` once per ring version, after the handoffs it gets.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use weft_router::ring::{slot_of, SlotTable};

use crate::topic::{MirrorSync, Placement};

use super::{FOLLOW_RETRY, HANDOFF_TIMEOUT};

/// A slot this node waits to receive by handoff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Awaited {
    pub from: Arc<str>,
    /// Past this, topics of the slot start afresh.
    pub until: Instant,
    /// The ring version the wait began at.
    pub ring: u64,
}

/// The newest ring version a peer's handoff frames named, and when it was first heard.
#[derive(Debug, Clone, Copy)]
pub(super) struct Heard {
    pub version: u64,
    pub at: Instant,
}

/// What a pass sees of the world beyond the topics.
pub(super) struct World<'a> {
    pub slots: &'a Arc<SlotTable>,
    /// Ids of the members (active or draining).
    pub members: &'a HashSet<String>,
    /// Peers with a live link.
    pub linked: &'a HashSet<Arc<str>>,
    pub heard: Heard,
    pub now: Instant,
}

/// A topic as the planner sees it.
pub(super) type TopicView = (Arc<str>, Placement);

/// One thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Action {
    /// Queue the topic's state for its new owner on the link, then mirror it.
    HandOff { topic: Arc<str>, to: Arc<str> },
    /// Mirror the new owner without handing anything over (no link to it in time).
    Abandon { topic: Arc<str>, to: Arc<str> },
    /// Own the topic under a new epoch (no handoff is coming).
    OwnAfresh { topic: Arc<str> },
    /// Wait for the old owner's handoff.
    Receive { topic: Arc<str>, from: Arc<str> },
    /// Mirror `owner`: the ring moved on while receiving, or the owner changed.
    Mirror { topic: Arc<str>, owner: Arc<str> },
    /// Ask the owner to follow again.
    Refollow { topic: Arc<str>, owner: Arc<str> },
    /// Tell the peer this node holds nothing more the ring gives it.
    HandoffDone { peer: Arc<str>, ring: u64 },
}

/// An action and the placement it was decided on: the executor skips it when the
/// topic has changed since (a link task applied a handoff meanwhile, say); the next
/// pass decides again.
#[derive(Debug, Clone)]
pub(super) struct Step {
    pub action: Action,
    pub seen: Option<Placement>,
}

/// The ring moved: for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RingMoved {
    pub prev: u64,
    pub now: u64,
    /// Slots awaited from each old owner.
    pub awaiting: BTreeMap<Arc<str>, usize>,
}

#[derive(Debug, Default)]
pub(super) struct Plan {
    pub steps: Vec<Step>,
    /// Topics this node owns (or is receiving) after the plan.
    pub owned: u64,
    /// Set when the ring moved: the executor logs it and loads the interest the new
    /// owner inherits.
    pub moved: Option<RingMoved>,
    /// A peer has acted under a newer ring: placements wait for it.
    pub stale: bool,
}

impl Plan {
    fn push(&mut self, action: Action, seen: &Placement) {
        self.steps.push(Step {
            action,
            seen: Some(seen.clone()),
        });
    }
}

/// The handoff and reconcile state. One owner (the control task) holds it.
#[derive(Debug)]
pub(super) struct Handoffs {
    me: Arc<str>,
    /// The slot table the last pass acted on (version 0: none yet).
    prev: Arc<SlotTable>,
    ring_moved_at: Instant,
    /// Slots the ring moved here from a live node.
    incoming: HashMap<u32, Awaited>,
    /// The ring version each old owner last said it had handed everything over at.
    done_from: HashMap<Arc<str>, u64>,
    /// The ring version each peer was last told `HandoffDone` for (per link).
    done_sent: HashMap<Arc<str>, u64>,
}

impl Handoffs {
    pub fn new(me: Arc<str>, now: Instant) -> Self {
        Self {
            me,
            prev: Arc::default(),
            ring_moved_at: now,
            incoming: HashMap::new(),
            done_from: HashMap::new(),
            done_sent: HashMap::new(),
        }
    }

    /// The ring the last pass acted on.
    pub fn acted_on(&self) -> &Arc<SlotTable> {
        &self.prev
    }

    /// Slot → the member whose handoff it waits for (what a topic created now starts as).
    pub fn awaiting(&self) -> HashMap<u32, Arc<str>> {
        self.incoming
            .iter()
            .map(|(slot, a)| (*slot, a.from.clone()))
            .collect()
    }

    /// A link to `peer` came up: it hears `HandoffDone` again, and mirrors of its
    /// topics that are not following follow again.
    pub fn link_up(&mut self, peer: &Arc<str>, topics: &[TopicView]) -> Vec<Step> {
        self.done_sent.remove(peer);
        let mut plan = Plan::default();
        for (name, placement) in topics {
            if let Placement::Mirror { owner, sync, .. } = placement {
                if owner == peer && *sync != MirrorSync::Following {
                    plan.push(
                        Action::Refollow {
                            topic: name.clone(),
                            owner: owner.clone(),
                        },
                        placement,
                    );
                }
            }
        }
        plan.steps
    }

    /// `from` has handed over everything it had for this node up to `ring`: topics
    /// still waiting on it were not there, and start afresh (nothing of theirs existed
    /// to lose). Returns the steps and whether any wait was settled.
    pub fn handoff_done(
        &mut self,
        from: &Arc<str>,
        ring: u64,
        my_ring: u64,
        topics: &[TopicView],
    ) -> (Vec<Step>, bool) {
        let v = self.done_from.entry(from.clone()).or_insert(0);
        *v = (*v).max(ring);
        if ring > my_ring {
            // This node's ring is behind the sender's: what it waits for is settled
            // by the pass under the newer ring (which reads `done_from`).
            return (Vec::new(), false);
        }
        // Only waits that began at this ring version or before are settled by it: a
        // move at a newer ring is the sender's to hand over still.
        let mut settled = HashSet::new();
        self.incoming.retain(|slot, a| {
            let done = a.from == *from && a.ring <= ring;
            if done {
                settled.insert(*slot);
            }
            !done
        });
        let mut plan = Plan::default();
        for (name, placement) in topics {
            if matches!(placement, Placement::Receiving { from: f, .. } if f == from)
                && settled.contains(&slot_of(name))
            {
                plan.push(
                    Action::OwnAfresh {
                        topic: name.clone(),
                    },
                    placement,
                );
            }
        }
        (plan.steps, !settled.is_empty())
    }

    /// One reconcile pass: brings every topic's placement in line with `w.slots`, and
    /// asks detached mirrors' owners again.
    pub fn pass(&mut self, w: &World<'_>, topics: &[TopicView]) -> Plan {
        let slots = w.slots;
        let now = w.now;
        let mut prev = std::mem::replace(&mut self.prev, slots.clone());
        if prev.version == 0 {
            // A node that just started (or restarted) has no earlier view: the ring
            // before it joined was the same members without it, so the slots it owns
            // now were theirs, and they will hand them over.
            let others: std::collections::BTreeSet<&str> = slots
                .owners
                .iter()
                .map(String::as_str)
                .filter(|o| *o != &*self.me)
                .collect();
            prev = Arc::new(SlotTable::compute(0, others));
        }
        let mut plan = Plan::default();
        if prev.version != slots.version {
            self.ring_moved(&prev, w);
            let mut awaiting = BTreeMap::new();
            for a in self.incoming.values() {
                *awaiting.entry(a.from.clone()).or_default() += 1;
            }
            plan.moved = Some(RingMoved {
                prev: prev.version,
                now: slots.version,
                awaiting,
            });
        }
        self.incoming.retain(|_, a| a.until > now);
        plan.stale = slots.version < w.heard.version
            && now.saturating_duration_since(w.heard.at) < HANDOFF_TIMEOUT;
        let link_grace = now.saturating_duration_since(self.ring_moved_at) < HANDOFF_TIMEOUT;
        let mut waiting_for_link = HashSet::new();
        for (name, placement) in topics {
            let Some(owner) = slots.owner(name) else {
                continue;
            };
            let owner: Arc<str> = owner.into();
            let here = owner == self.me;
            let topic = name.clone();
            if plan.stale {
                match placement {
                    Placement::Owner | Placement::Receiving { .. } => plan.owned += 1,
                    Placement::Mirror {
                        owner: held,
                        sync: MirrorSync::Detached,
                        ..
                    } => plan.push(
                        Action::Refollow {
                            topic,
                            owner: held.clone(),
                        },
                        placement,
                    ),
                    Placement::Mirror { .. } => {}
                }
                continue;
            }
            match placement {
                Placement::Owner if here => plan.owned += 1,
                Placement::Owner => {
                    if w.linked.contains(&owner) {
                        plan.push(Action::HandOff { topic, to: owner }, placement);
                    } else if link_grace && w.members.contains(&*owner) {
                        // Keep sequencing it until the link to its new owner is up.
                        waiting_for_link.insert(owner);
                        plan.owned += 1;
                    } else {
                        plan.push(Action::Abandon { topic, to: owner }, placement);
                    }
                }
                Placement::Receiving { from, .. } if here => {
                    let waiting = self
                        .incoming
                        .get(&slot_of(name))
                        .is_some_and(|a| a.from == *from);
                    if !waiting {
                        plan.push(Action::OwnAfresh { topic }, placement);
                    }
                    plan.owned += 1;
                }
                Placement::Mirror { .. } if here => {
                    match self.incoming.get(&slot_of(name)) {
                        Some(a) => plan.push(
                            Action::Receive {
                                topic,
                                from: a.from.clone(),
                            },
                            placement,
                        ),
                        None => plan.push(Action::OwnAfresh { topic }, placement),
                    }
                    plan.owned += 1;
                }
                Placement::Receiving { .. } => {
                    plan.push(Action::Mirror { topic, owner }, placement);
                }
                Placement::Mirror { owner: held, .. } if *held != owner => {
                    plan.push(Action::Mirror { topic, owner }, placement);
                }
                Placement::Mirror {
                    sync: MirrorSync::Detached,
                    ..
                } => plan.push(Action::Refollow { topic, owner }, placement),
                Placement::Mirror {
                    sync: MirrorSync::Requested(at),
                    ..
                } if now.saturating_duration_since(*at) > FOLLOW_RETRY => {
                    plan.push(Action::Refollow { topic, owner }, placement)
                }
                Placement::Mirror { .. } => {}
            }
        }
        // Every linked peer hears, once per ring version and behind the handoffs on the
        // same link, that this node holds nothing more the ring gives it: whatever it
        // still waits for from here can start.
        if !plan.stale {
            let mut peers: Vec<&Arc<str>> = w.linked.iter().collect();
            peers.sort();
            for peer in peers {
                if waiting_for_link.contains(peer)
                    || self
                        .done_sent
                        .get(peer)
                        .is_some_and(|v| *v >= slots.version)
                {
                    continue;
                }
                self.done_sent.insert(peer.clone(), slots.version);
                plan.steps.push(Step {
                    action: Action::HandoffDone {
                        peer: peer.clone(),
                        ring: slots.version,
                    },
                    seen: None,
                });
            }
        }
        plan
    }

    /// The ring moved from `prev` to `w.slots`: slots that come here from a live member
    /// that has not said it is done wait for its handoff; every other wait ends.
    fn ring_moved(&mut self, prev: &SlotTable, w: &World<'_>) {
        self.ring_moved_at = w.now;
        let version = w.slots.version;
        for (slot, owner) in w.slots.owners.iter().enumerate() {
            let old = prev.owners.get(slot);
            let slot = slot as u32;
            // The old owner may have said it is done before this node saw the ring.
            let done = |o: &str| self.done_from.get(o).is_some_and(|v| *v >= version);
            let awaited = match old {
                Some(old)
                    if **owner == *self.me
                        && **old != *self.me
                        && w.members.contains(old)
                        && !done(old) =>
                {
                    Some(Awaited {
                        from: old.as_str().into(),
                        until: w.now + HANDOFF_TIMEOUT,
                        ring: version,
                    })
                }
                _ => None,
            };
            match awaited {
                Some(a) => {
                    self.incoming.insert(slot, a);
                }
                None => {
                    self.incoming.remove(&slot);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Each transition the cluster process tests exercise, as a table of events in and
    //! actions out. Topics are chosen by the slot the ring gives them, so a test names
    //! the owner it means rather than a hash.
    use super::*;
    use std::time::Duration;

    const ME: &str = "n2";

    fn s(v: &str) -> Arc<str> {
        v.into()
    }

    fn hand_off(topic: Arc<str>, to: &str) -> Action {
        Action::HandOff { topic, to: s(to) }
    }

    fn abandon(topic: Arc<str>, to: &str) -> Action {
        Action::Abandon { topic, to: s(to) }
    }

    fn receive(topic: Arc<str>, from: &str) -> Action {
        Action::Receive {
            topic,
            from: s(from),
        }
    }

    fn mirror_of(topic: Arc<str>, owner: &str) -> Action {
        Action::Mirror {
            topic,
            owner: s(owner),
        }
    }

    fn refollow(topic: Arc<str>, owner: &str) -> Action {
        Action::Refollow {
            topic,
            owner: s(owner),
        }
    }

    fn own_afresh(topic: Arc<str>) -> Action {
        Action::OwnAfresh { topic }
    }

    fn done(peer: &str, ring: u64) -> Action {
        Action::HandoffDone {
            peer: s(peer),
            ring,
        }
    }

    fn ring(version: u64, active: &[&str]) -> Arc<SlotTable> {
        Arc::new(SlotTable::compute(version, active.iter().copied()))
    }

    /// `n` topic names whose slots `before` gave to `prev_owner` and `now` gives to `owner`.
    fn topics_moving(
        before: &SlotTable,
        now: &SlotTable,
        prev_owner: &str,
        owner: &str,
        n: usize,
    ) -> Vec<Arc<str>> {
        let found: Vec<Arc<str>> = (0..100_000)
            .map(|i| format!("t{i}"))
            .filter(|t| before.owner(t) == Some(prev_owner) && now.owner(t) == Some(owner))
            .take(n)
            .map(Into::into)
            .collect();
        assert_eq!(found.len(), n, "enough topics move that way");
        found
    }

    fn topic_moving(
        before: &SlotTable,
        now: &SlotTable,
        prev_owner: &str,
        owner: &str,
    ) -> Arc<str> {
        topics_moving(before, now, prev_owner, owner, 1).remove(0)
    }

    fn owned_by(table: &SlotTable, owner: &str) -> Arc<str> {
        topic_moving(table, table, owner, owner)
    }

    fn mirror(owner: &str, sync: MirrorSync) -> Placement {
        Placement::Mirror {
            owner: s(owner),
            sync,
            fresh: false,
        }
    }

    fn receiving(from: &str, since: Instant) -> Placement {
        Placement::Receiving {
            from: s(from),
            since,
        }
    }

    struct Case {
        h: Handoffs,
        members: HashSet<String>,
        linked: HashSet<Arc<str>>,
        heard: Heard,
        t0: Instant,
    }

    impl Case {
        /// This node (n2) has acted on `prev` (members as given, links to all of them).
        fn after(prev: &Arc<SlotTable>, members: &[&str]) -> Self {
            let t0 = Instant::now();
            let mut c = Self {
                h: Handoffs::new(s(ME), t0),
                members: members.iter().map(|m| m.to_string()).collect(),
                linked: members.iter().filter(|m| **m != ME).map(|m| s(m)).collect(),
                heard: Heard { version: 0, at: t0 },
                t0,
            };
            c.h.prev = prev.clone();
            c
        }

        fn pass(&mut self, slots: &Arc<SlotTable>, after: Duration, topics: &[TopicView]) -> Plan {
            let w = World {
                slots,
                members: &self.members,
                linked: &self.linked,
                heard: self.heard,
                now: self.t0 + after,
            };
            self.h.pass(&w, topics)
        }
    }

    /// n3 joins a ring of n1 and n2 (this node); every member is linked.
    fn scale_out() -> (Case, Arc<SlotTable>, Arc<SlotTable>) {
        let before = ring(1, &["n1", "n2"]);
        let after = ring(2, &["n1", "n2", "n3"]);
        (Case::after(&before, &["n1", "n2", "n3"]), before, after)
    }

    fn actions(steps: &[Step]) -> Vec<Action> {
        steps.iter().map(|s| s.action.clone()).collect()
    }

    fn topic_actions(plan: &Plan) -> Vec<Action> {
        actions(&plan.steps)
            .into_iter()
            .filter(|a| !matches!(a, Action::HandoffDone { .. }))
            .collect()
    }

    #[test]
    fn scale_out_hands_moving_topics_to_the_new_member_and_keeps_the_rest() {
        let (mut c, before, after) = scale_out();
        let moving = topic_moving(&before, &after, ME, "n3");
        let staying = topic_moving(&before, &after, ME, ME);
        let mirrored = topic_moving(&before, &after, "n1", "n1");
        let topics = vec![
            (moving.clone(), Placement::Owner),
            (staying, Placement::Owner),
            (mirrored, mirror("n1", MirrorSync::Following)),
        ];
        let plan = c.pass(&after, Duration::ZERO, &topics);
        assert_eq!(topic_actions(&plan), vec![hand_off(moving, "n3")]);
        assert_eq!(plan.owned, 1);
        assert!(plan.moved.is_some());
        // Both peers hear HandoffDone, after the handoff.
        let done: Vec<_> = actions(&plan.steps)
            .into_iter()
            .filter(|a| matches!(a, Action::HandoffDone { ring: 2, .. }))
            .collect();
        assert_eq!(done.len(), 2);
        assert!(matches!(plan.steps[0].action, Action::HandOff { .. }));
    }

    #[test]
    fn scale_out_keeps_a_topic_until_the_link_to_its_new_owner_is_up_then_hands_it_over() {
        let (mut c, before, after) = scale_out();
        c.linked.remove("n3");
        let moving = topic_moving(&before, &after, ME, "n3");
        let topics = vec![(moving.clone(), Placement::Owner)];
        let plan = c.pass(&after, Duration::ZERO, &topics);
        assert_eq!(topic_actions(&plan), vec![]);
        assert_eq!(plan.owned, 1, "still sequenced here");
        // n1 hears HandoffDone; n3 (no link, and waited for) does not.
        assert_eq!(actions(&plan.steps), vec![done("n1", 2)]);
        // The link comes up: the next pass hands over and tells n3 it is done.
        let steps = c.h.link_up(&s("n3"), &topics);
        assert!(steps.is_empty());
        c.linked.insert(s("n3"));
        let plan = c.pass(&after, Duration::from_secs(1), &topics);
        assert_eq!(
            actions(&plan.steps),
            vec![hand_off(moving, "n3"), done("n3", 2)]
        );
        assert_eq!(plan.owned, 0);
    }

    #[test]
    fn a_new_owner_with_no_link_past_the_grace_is_mirrored_without_its_state() {
        let (mut c, before, after) = scale_out();
        c.linked.remove("n3");
        let moving = topic_moving(&before, &after, ME, "n3");
        let topics = vec![(moving.clone(), Placement::Owner)];
        c.pass(&after, Duration::ZERO, &topics);
        let plan = c.pass(&after, HANDOFF_TIMEOUT + Duration::from_millis(1), &topics);
        assert_eq!(topic_actions(&plan), vec![abandon(moving, "n3")]);
    }

    #[test]
    fn the_joining_member_waits_for_handoffs_of_slots_from_live_owners() {
        // n2 is the new member: its first pass has no earlier view.
        let after = ring(2, &["n1", "n2"]);
        let mut c = Case::after(&Arc::default(), &["n1", "n2"]);
        let t = owned_by(&after, ME);
        let topics = vec![(t.clone(), mirror("n1", MirrorSync::Following))];
        let plan = c.pass(&after, Duration::ZERO, &topics);
        assert_eq!(topic_actions(&plan), vec![receive(t.clone(), "n1")]);
        assert_eq!(plan.owned, 1);
        assert_eq!(
            c.h.awaiting().get(&slot_of(&t)).map(|f| f.to_string()),
            Some("n1".into())
        );
        // Receiving, the next pass (no move) leaves it waiting.
        let topics = vec![(t.clone(), receiving("n1", c.t0))];
        let plan = c.pass(&after, Duration::from_secs(1), &topics);
        assert_eq!(topic_actions(&plan), vec![]);
        // No handoff within the timeout: a new epoch.
        let plan = c.pass(&after, HANDOFF_TIMEOUT + Duration::from_millis(1), &topics);
        assert_eq!(topic_actions(&plan), vec![own_afresh(t)]);
        assert!(c.h.awaiting().is_empty());
    }

    #[test]
    fn restart_on_the_same_id_awaits_the_members_that_held_its_slots_meanwhile() {
        // n2 restarted: the router's ring still names it (same id), the others held its
        // topics while it was away. With no earlier view, everything it owns now is
        // awaited from whoever else is in the ring (its first pass must not start
        // them afresh, or their subscribers elsewhere would see `reset`).
        let now = ring(5, &["n1", "n2", "n3"]);
        let mut c = Case::after(&Arc::default(), &["n1", "n2", "n3"]);
        let plan = c.pass(&now, Duration::ZERO, &[]);
        let awaited = c.h.awaiting();
        assert!(!awaited.is_empty());
        assert!(awaited.values().all(|f| &**f == "n1" || &**f == "n3"));
        assert_eq!(
            awaited.len(),
            now.owners.iter().filter(|o| *o == ME).count(),
            "every slot it owns is awaited"
        );
        let from = plan
            .moved
            .expect("the first pass counts as a move")
            .awaiting;
        assert_eq!(from.values().sum::<usize>(), awaited.len());
    }

    #[test]
    fn a_crashed_owners_slots_start_a_new_epoch_at_once() {
        let before = ring(1, &["n1", "n2", "n3"]);
        let after = ring(2, &["n2", "n3"]);
        // n1 is gone from the members (SIGKILL, then removed).
        let mut c = Case::after(&before, &["n2", "n3"]);
        let t = topic_moving(&before, &after, "n1", ME);
        let topics = vec![(t.clone(), mirror("n1", MirrorSync::Detached))];
        let plan = c.pass(&after, Duration::ZERO, &topics);
        assert_eq!(topic_actions(&plan), vec![own_afresh(t)]);
        assert_eq!(plan.owned, 1);
        assert!(c.h.awaiting().is_empty());
    }

    #[test]
    fn drain_hands_every_owned_topic_over_and_then_says_done() {
        let before = ring(1, &["n1", "n2"]);
        // n2 drains: still a member, no longer in the ring.
        let after = ring(2, &["n1"]);
        let mut c = Case::after(&before, &["n1", "n2"]);
        let a = owned_by(&before, ME);
        let b = topic_moving(&before, &after, "n1", "n1");
        let topics = vec![
            (a.clone(), Placement::Owner),
            (b, mirror("n1", MirrorSync::Following)),
        ];
        let plan = c.pass(&after, Duration::ZERO, &topics);
        assert_eq!(
            actions(&plan.steps),
            vec![hand_off(a.clone(), "n1"), done("n1", 2)]
        );
        assert_eq!(plan.owned, 0);
        // Once handed over (a mirror now), a repeat pass has nothing to do.
        let topics = vec![(a, mirror("n1", MirrorSync::Following))];
        let plan = c.pass(&after, Duration::from_millis(50), &topics);
        assert!(plan.steps.is_empty());
        assert!(plan.moved.is_none());
    }

    #[test]
    fn a_peer_that_acted_under_a_newer_ring_freezes_placements_until_ours_catches_up() {
        let (mut c, before, after) = scale_out();
        // n3 already handed this node a topic under ring 3, which this node has not seen:
        // it owns it now, and ring 2 gives it to n3. Handing it back would lose it.
        let handed_here = topic_moving(&before, &after, ME, "n3");
        let detached = owned_by(&before, "n1");
        c.heard = Heard {
            version: 3,
            at: c.t0,
        };
        let topics = vec![
            (handed_here, Placement::Owner),
            (detached.clone(), mirror("n1", MirrorSync::Detached)),
        ];
        let plan = c.pass(&after, Duration::ZERO, &topics);
        assert!(plan.stale);
        assert_eq!(plan.owned, 1);
        assert_eq!(
            actions(&plan.steps),
            vec![refollow(detached, "n1")],
            "no move, no HandoffDone: only repairs"
        );
        // A peer that names a ring that never comes stops freezing after the timeout.
        let plan = c.pass(&after, HANDOFF_TIMEOUT + Duration::from_millis(1), &topics);
        assert!(!plan.stale);
    }

    #[test]
    fn a_departed_peer_is_not_waited_for_and_its_mirrors_repoint() {
        let before = ring(1, &["n1", "n2", "n3"]);
        let after = ring(2, &["n2", "n3"]);
        let mut c = Case::after(&before, &["n2", "n3"]);
        c.linked.remove("n1");
        // A topic of n1's that n3 now owns: this node's mirror re-points to n3.
        let t = topic_moving(&before, &after, "n1", "n3");
        let topics = vec![(t.clone(), mirror("n1", MirrorSync::Following))];
        let plan = c.pass(&after, Duration::ZERO, &topics);
        assert_eq!(topic_actions(&plan), vec![mirror_of(t, "n3")]);
        // HandoffDone goes only to linked peers.
        assert!(actions(&plan.steps)
            .iter()
            .all(|a| !matches!(a, Action::HandoffDone { peer, .. } if &**peer == "n1")));
    }

    #[test]
    fn an_owner_whose_new_owner_left_the_members_is_abandoned_at_once() {
        let before = ring(1, &["n1", "n2"]);
        let after = ring(2, &["n1", "n2", "n3"]);
        // n3 was in the ring but is no longer a member (it crashed right after joining).
        let mut c = Case::after(&before, &["n1", "n2"]);
        let moving = topic_moving(&before, &after, ME, "n3");
        let plan = c.pass(
            &after,
            Duration::ZERO,
            &[(moving.clone(), Placement::Owner)],
        );
        assert_eq!(topic_actions(&plan), vec![abandon(moving, "n3")]);
    }

    #[test]
    fn a_handoff_done_before_the_ring_change_means_nothing_is_awaited_from_that_owner() {
        // n2 joins; n1 hands over what it had and says done under ring 2 before this
        // node has seen ring 2.
        let before = ring(1, &["n1", "n3"]);
        let after = ring(2, &["n1", "n2", "n3"]);
        let mut c = Case::after(&before, &["n1", "n2", "n3"]);
        let moving = topics_moving(&before, &after, "n1", ME, 2);
        let (handed, never_existed) = (moving[0].clone(), moving[1].clone());
        let (steps, settled) = c.h.handoff_done(&s("n1"), 2, 1, &[]);
        assert!(steps.is_empty() && !settled, "settled later, under ring 2");
        let topics = vec![
            // Its handoff was applied: owned here with n1's epoch.
            (handed.clone(), Placement::Owner),
            // n1 had nothing of it: no wait, a new epoch at once.
            (never_existed.clone(), mirror("n1", MirrorSync::Detached)),
        ];
        let plan = c.pass(&after, Duration::ZERO, &topics);
        assert!(c.h.awaiting().values().all(|f| &**f != "n1"));
        assert_eq!(topic_actions(&plan), vec![own_afresh(never_existed)]);
        assert_eq!(plan.owned, 2);
    }

    #[test]
    fn handoff_done_settles_only_waits_from_that_member_at_or_before_its_ring() {
        let after = ring(2, &["n1", "n2", "n3"]);
        let mut c = Case::after(&Arc::default(), &["n1", "n2", "n3"]);
        c.pass(&after, Duration::ZERO, &[]);
        let from_n1 = (0..100_000)
            .map(|i| -> Arc<str> { format!("t{i}").into() })
            .find(|t| {
                c.h.incoming
                    .get(&slot_of(t))
                    .is_some_and(|a| &*a.from == "n1")
            })
            .unwrap();
        let from_n3 = (0..100_000)
            .map(|i| -> Arc<str> { format!("t{i}").into() })
            .find(|t| {
                c.h.incoming
                    .get(&slot_of(t))
                    .is_some_and(|a| &*a.from == "n3")
            })
            .unwrap();
        let topics = vec![
            (from_n1.clone(), receiving("n1", c.t0)),
            (from_n3.clone(), receiving("n3", c.t0)),
        ];
        // A HandoffDone for an older ring settles nothing that began at ring 2.
        let (steps, settled) = c.h.handoff_done(&s("n1"), 1, 2, &topics);
        assert!(steps.is_empty() && !settled);
        let (steps, settled) = c.h.handoff_done(&s("n1"), 2, 2, &topics);
        assert!(settled);
        assert_eq!(actions(&steps), vec![own_afresh(from_n1)]);
        assert!(c.h.awaiting().values().all(|f| &**f == "n3"));
    }

    #[test]
    fn mirrors_refollow_when_detached_or_when_a_follow_went_unanswered() {
        let table = ring(1, &["n1", "n2"]);
        let mut c = Case::after(&table, &["n1", "n2"]);
        let t = owned_by(&table, "n1");
        let at = c.t0;
        for (sync, after, want) in [
            (MirrorSync::Following, Duration::from_secs(9), false),
            (MirrorSync::Detached, Duration::ZERO, true),
            (MirrorSync::Requested(at), Duration::from_millis(500), false),
            (
                MirrorSync::Requested(at),
                FOLLOW_RETRY + Duration::from_millis(1),
                true,
            ),
        ] {
            let plan = c.pass(&table, after, &[(t.clone(), mirror("n1", sync))]);
            let refollow = topic_actions(&plan) == vec![refollow(t.clone(), "n1")];
            assert_eq!(refollow, want, "{sync:?} after {after:?}");
        }
    }

    #[test]
    fn handoff_done_goes_once_per_ring_version_and_again_on_a_new_link() {
        let table = ring(1, &["n1", "n2"]);
        let mut c = Case::after(&Arc::default(), &["n1", "n2"]);
        let first = c.pass(&table, Duration::ZERO, &[]);
        assert_eq!(
            actions(&first.steps)
                .iter()
                .filter(|a| matches!(a, Action::HandoffDone { .. }))
                .count(),
            1
        );
        assert!(c.pass(&table, Duration::from_secs(1), &[]).steps.is_empty());
        c.h.link_up(&s("n1"), &[]);
        assert_eq!(
            actions(&c.pass(&table, Duration::from_secs(2), &[]).steps),
            vec![done("n1", 1)]
        );
    }

    #[test]
    fn a_new_link_refollows_that_peers_mirrors_that_are_not_following() {
        let table = ring(1, &["n1", "n2", "n3"]);
        let mut c = Case::after(&table, &["n1", "n2", "n3"]);
        let a = owned_by(&table, "n1");
        let b = owned_by(&table, "n3");
        let topics = vec![
            (a.clone(), mirror("n1", MirrorSync::Detached)),
            (b, mirror("n3", MirrorSync::Detached)),
        ];
        assert_eq!(
            actions(&c.h.link_up(&s("n1"), &topics)),
            vec![refollow(a, "n1")]
        );
    }

    #[test]
    fn the_ring_moving_on_while_receiving_mirrors_the_newest_owner() {
        let (mut c, before, after) = scale_out();
        let t = topic_moving(&before, &after, ME, "n3");
        let plan = c.pass(
            &after,
            Duration::ZERO,
            &[(t.clone(), receiving("n1", c.t0))],
        );
        assert_eq!(topic_actions(&plan), vec![mirror_of(t, "n3")]);
    }
}
