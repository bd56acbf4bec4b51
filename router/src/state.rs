//! The replicated state machine, as a pure type: `apply(Command) → (Response, changes)`.
//!
//! Every router applies the same committed commands in the same order, so everything
//! here is deterministic: no clock (times arrive inside commands, stamped by the leader),
//! no randomness, ordered maps only.
//!
//! Invariants kept by [`MetaState::apply`]:
//! - A rejected command leaves the state exactly as it was (all checks run before the
//!   first mutation) and does not bump the version.
//! - `version` grows by exactly one per command that changed something; every
//!   [`Change`] it emits carries that version, so a watcher that has seen version `v`
//!   has seen everything up to `v`.
//! - The slot table always equals `SlotTable::compute` of the active members; it is
//!   recomputed (and its own version bumped) exactly when the active set changes.
//! - Interest only names current members; removing a member removes its interest in
//!   the same command (`MemberRemoved` implies "all its interest is gone").

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use weft_proto::{validate_topic, Pattern};

use crate::ring::{NodeId, SlotTable};

/// Topics in one `UpdateInterest` (add + remove).
pub const MAX_INTEREST_BATCH: usize = 4096;
/// Topics one node may have interest in; past it `UpdateInterest` is refused.
pub const MAX_INTEREST_PER_NODE: usize = 1_000_000;
/// Members of the cluster.
pub const MAX_MEMBERS: usize = 1024;
/// Node ids: 1..=128 bytes of the topic alphabet (so an id can sit in a topic name).
pub const MAX_NODE_ID_LEN: usize = 128;
/// Addresses (`host:port`) and zones.
pub const MAX_ADDR_LEN: usize = 256;
pub const MAX_ZONE_LEN: usize = 64;
/// Namespaces and the size of one policy.
pub const MAX_NAMESPACES: usize = 256;
pub const MAX_POLICY_BYTES: usize = 16 * 1024;
/// Commands in one group-commit batch.
pub const MAX_BATCH: usize = 1024;

/// The nodes with interest in one topic: sorted and distinct, and nearly always one or
/// two. The registry holds one per watched topic (on every router and, as a copy, on
/// every node), so it is small: a single id is held inline (a topic watched from one
/// node allocates nothing here), more go in a sorted `Vec` — never a `BTreeSet`, whose
/// first leaf costs some 270 bytes even for one id. Serialised as the same sequence a
/// set was, so snapshots read either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSet(Ids);

/// Canonical: `Many` never holds exactly one id, so equal sets compare equal.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ids {
    One(NodeId),
    Many(Vec<NodeId>),
}

impl Default for NodeSet {
    fn default() -> Self {
        Self(Ids::Many(Vec::new()))
    }
}

impl NodeSet {
    fn as_slice(&self) -> &[NodeId] {
        match &self.0 {
            Ids::One(id) => std::slice::from_ref(id),
            Ids::Many(v) => v,
        }
    }

    fn from_sorted(mut v: Vec<NodeId>) -> Self {
        if v.len() == 1 {
            return Self(Ids::One(v.pop().expect("one id")));
        }
        v.shrink_to_fit();
        Self(Ids::Many(v))
    }

    /// Adds `id`; false if it was there.
    pub fn insert(&mut self, id: &str) -> bool {
        let at = match self.as_slice().binary_search_by(|n| n.as_str().cmp(id)) {
            Ok(_) => return false,
            Err(at) => at,
        };
        let mut v = match std::mem::take(self).0 {
            Ids::One(one) => vec![one],
            Ids::Many(v) => v,
        };
        v.insert(at, id.to_owned());
        *self = Self::from_sorted(v);
        true
    }

    /// Removes `id`; false if it was not there.
    pub fn remove(&mut self, id: &str) -> bool {
        let Ok(at) = self.as_slice().binary_search_by(|n| n.as_str().cmp(id)) else {
            return false;
        };
        let mut v = match std::mem::take(self).0 {
            Ids::One(one) => vec![one],
            Ids::Many(v) => v,
        };
        v.remove(at);
        *self = Self::from_sorted(v);
        true
    }

    pub fn contains(&self, id: &str) -> bool {
        self.as_slice()
            .binary_search_by(|n| n.as_str().cmp(id))
            .is_ok()
    }

    pub fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, NodeId> {
        self.as_slice().iter()
    }
}

impl<'a> IntoIterator for &'a NodeSet {
    type Item = &'a NodeId;
    type IntoIter = std::slice::Iter<'a, NodeId>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl FromIterator<NodeId> for NodeSet {
    fn from_iter<I: IntoIterator<Item = NodeId>>(ids: I) -> Self {
        let mut v: Vec<NodeId> = ids.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        Self::from_sorted(v)
    }
}

impl Serialize for NodeSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.as_slice().serialize(s)
    }
}

impl<'de> Deserialize<'de> for NodeSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<NodeId>::deserialize(d).map(Self::from_iter)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Registered, not yet heartbeating: owns no slots.
    Joining,
    /// Heartbeating: owns slots.
    Active,
    /// Going away gracefully: owns no slots, keeps its interest until it leaves.
    Draining,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: NodeId,
    /// Address peers and the router use for gRPC.
    pub addr: String,
    pub zone: String,
    pub state: MemberState,
    /// Leader clock (ms since the Unix epoch) of the last Join/Heartbeat; the leader
    /// removes members whose value falls behind its heartbeat timeout.
    pub last_heartbeat_ms: u64,
    pub sessions: u64,
    pub owned_topics: u64,
}

/// A namespace policy by topic pattern; the policy itself is opaque JSON for the nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    pub pattern: String,
    pub policy_json: String,
}

/// A write to the metadata. `at_ms` fields are stamped by the leader that proposes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Join {
        id: NodeId,
        addr: String,
        zone: String,
        load: u64,
        at_ms: u64,
    },
    Heartbeat {
        id: NodeId,
        at_ms: u64,
        sessions: u64,
        owned_topics: u64,
    },
    Leave {
        id: NodeId,
    },
    MarkDraining {
        id: NodeId,
    },
    /// Removes each listed member (and its interest) whose last heartbeat is still
    /// older than `before_ms`: a member that heartbeated after the leader decided is
    /// kept, so the decision cannot race a late heartbeat.
    RemoveDead {
        ids: Vec<NodeId>,
        before_ms: u64,
    },
    UpdateInterest {
        node: NodeId,
        add: Vec<String>,
        remove: Vec<String>,
    },
    SetNamespaces {
        namespaces: Vec<Namespace>,
    },
    /// Group commit: many callers' commands in one Raft entry, applied in order, each
    /// with its own response.
    Batch(Vec<Command>),
}

/// Why a command was rejected. The state is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CommandError {
    #[error("unknown node `{0}`")]
    UnknownNode(NodeId),
    #[error("invalid node id: {0}")]
    BadNodeId(String),
    #[error("invalid topic `{topic}`: {reason}")]
    BadTopic { topic: String, reason: String },
    #[error("{what} too large: {len} > {max}")]
    TooLarge {
        what: String,
        len: usize,
        max: usize,
    },
    #[error("invalid value: {0}")]
    Invalid(String),
    #[error("cluster full: {0} members")]
    TooManyMembers(usize),
}

/// The result of one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Applied; the metadata version afterwards (unchanged for a no-op).
    Applied {
        version: u64,
    },
    Rejected(CommandError),
    Batch(Vec<Response>),
}

impl Default for Response {
    /// openraft wants a default for membership entries, which carry no command.
    fn default() -> Self {
        Response::Applied { version: 0 }
    }
}

/// One observable change, as sent to watchers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    Member(Member),
    /// The member and all of its interest are gone.
    MemberRemoved(NodeId),
    Slots(SlotTable),
    Interest {
        node: NodeId,
        add: Vec<String>,
        remove: Vec<String>,
    },
    Namespaces(Vec<Namespace>),
}

/// The metadata every router replicates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Repr", into = "Repr")]
pub struct MetaState {
    version: u64,
    members: BTreeMap<NodeId, Member>,
    slots: SlotTable,
    /// The subscription registry: topic → nodes with at least one local subscriber.
    interest: BTreeMap<String, NodeSet>,
    /// Reverse index node → topics, so a member's interest goes in one pass. Not
    /// serialised: rebuilt from `interest` on load.
    by_node: BTreeMap<NodeId, BTreeSet<String>>,
    namespaces: Vec<Namespace>,
}

/// The serialised form (snapshots): everything but the derived index.
#[derive(Serialize, Deserialize)]
struct Repr {
    version: u64,
    members: BTreeMap<NodeId, Member>,
    slots: SlotTable,
    interest: BTreeMap<String, NodeSet>,
    namespaces: Vec<Namespace>,
}

impl From<Repr> for MetaState {
    fn from(r: Repr) -> Self {
        let mut by_node: BTreeMap<NodeId, BTreeSet<String>> = BTreeMap::new();
        for (topic, nodes) in &r.interest {
            for n in nodes {
                by_node.entry(n.clone()).or_default().insert(topic.clone());
            }
        }
        Self {
            version: r.version,
            members: r.members,
            slots: r.slots,
            interest: r.interest,
            by_node,
            namespaces: r.namespaces,
        }
    }
}

impl From<MetaState> for Repr {
    fn from(s: MetaState) -> Self {
        Self {
            version: s.version,
            members: s.members,
            slots: s.slots,
            interest: s.interest,
            namespaces: s.namespaces,
        }
    }
}

fn check_node_id(id: &str) -> Result<(), CommandError> {
    if id.is_empty() || id.len() > MAX_NODE_ID_LEN {
        return Err(CommandError::BadNodeId(format!(
            "length {} not in 1..={MAX_NODE_ID_LEN}",
            id.len()
        )));
    }
    if !id.bytes().all(weft_proto::topic::is_topic_byte) {
        return Err(CommandError::BadNodeId(format!(
            "`{id}` has characters outside [A-Za-z0-9_.:@-]"
        )));
    }
    Ok(())
}

fn check_len(what: &'static str, len: usize, max: usize) -> Result<(), CommandError> {
    if len > max {
        Err(CommandError::TooLarge {
            what: what.into(),
            len,
            max,
        })
    } else {
        Ok(())
    }
}

impl Command {
    /// Checks that need no state: ids, lengths, topic syntax. Run by the API before
    /// proposing (cheap rejection) and again by `apply` (the log is the authority).
    pub fn validate(&self) -> Result<(), CommandError> {
        match self {
            Command::Join { id, addr, zone, .. } => {
                check_node_id(id)?;
                check_len("addr", addr.len(), MAX_ADDR_LEN)?;
                check_len("zone", zone.len(), MAX_ZONE_LEN)?;
                if addr.is_empty() {
                    return Err(CommandError::Invalid("addr is empty".into()));
                }
                Ok(())
            }
            Command::Heartbeat { id, .. }
            | Command::Leave { id }
            | Command::MarkDraining { id } => check_node_id(id),
            Command::RemoveDead { ids, .. } => {
                check_len("RemoveDead ids", ids.len(), MAX_MEMBERS)?;
                ids.iter().try_for_each(|id| check_node_id(id))
            }
            Command::UpdateInterest { node, add, remove } => {
                check_node_id(node)?;
                check_len(
                    "UpdateInterest batch",
                    add.len() + remove.len(),
                    MAX_INTEREST_BATCH,
                )?;
                for t in add.iter().chain(remove) {
                    validate_topic(t).map_err(|e| CommandError::BadTopic {
                        topic: t.chars().take(64).collect(),
                        reason: e.to_string(),
                    })?;
                }
                Ok(())
            }
            Command::SetNamespaces { namespaces } => {
                check_len("namespaces", namespaces.len(), MAX_NAMESPACES)?;
                for ns in namespaces {
                    Pattern::parse(&ns.pattern)
                        .map_err(|e| CommandError::Invalid(format!("namespace pattern: {e}")))?;
                    check_len("policy", ns.policy_json.len(), MAX_POLICY_BYTES)?;
                }
                Ok(())
            }
            Command::Batch(cmds) => {
                check_len("batch", cmds.len(), MAX_BATCH)?;
                if cmds.iter().any(|c| matches!(c, Command::Batch(_))) {
                    return Err(CommandError::Invalid("nested batch".into()));
                }
                Ok(())
            }
        }
    }
}

impl MetaState {
    /// A state from the parts a snapshot carries (`interest`: each topic with its
    /// nodes, in any order); refused if a topic is listed twice or without a node.
    pub fn from_parts(
        version: u64,
        members: BTreeMap<NodeId, Member>,
        slots: SlotTable,
        interest: impl IntoIterator<Item = (String, Vec<NodeId>)>,
        namespaces: Vec<Namespace>,
    ) -> Result<Self, String> {
        let mut map = BTreeMap::new();
        for (topic, mut nodes) in interest {
            nodes.sort();
            nodes.dedup();
            if nodes.is_empty() {
                return Err(format!("topic `{topic}` has interest from no node"));
            }
            if map
                .insert(topic.clone(), NodeSet::from_sorted(nodes))
                .is_some()
            {
                return Err(format!("topic `{topic}` is listed twice"));
            }
        }
        Ok(Repr {
            version,
            members,
            slots,
            interest: map,
            namespaces,
        }
        .into())
    }

    pub fn version(&self) -> u64 {
        self.version
    }
    pub fn members(&self) -> &BTreeMap<NodeId, Member> {
        &self.members
    }
    pub fn slots(&self) -> &SlotTable {
        &self.slots
    }
    pub fn interest(&self) -> &BTreeMap<String, NodeSet> {
        &self.interest
    }
    pub fn namespaces(&self) -> &[Namespace] {
        &self.namespaces
    }
    /// Topics `node` has interest in.
    pub fn interest_of(&self, node: &str) -> Option<&BTreeSet<String>> {
        self.by_node.get(node)
    }

    /// Members whose last heartbeat is older than `before_ms` (leader clock).
    pub fn silent_since(&self, before_ms: u64) -> Vec<NodeId> {
        self.members
            .values()
            .filter(|m| m.last_heartbeat_ms < before_ms)
            .map(|m| m.id.clone())
            .collect()
    }

    /// Applies one committed command. On `Rejected` nothing changed and `changes` is
    /// left as it was; otherwise the changes it made are appended to `changes`.
    pub fn apply(&mut self, cmd: &Command, changes: &mut Vec<(u64, Change)>) -> Response {
        if let Err(e) = cmd.validate() {
            return Response::Rejected(e);
        }
        if let Command::Batch(cmds) = cmd {
            return Response::Batch(cmds.iter().map(|c| self.apply(c, changes)).collect());
        }
        let mut out = Vec::new();
        match self.apply_one(cmd, &mut out) {
            Err(e) => Response::Rejected(e),
            Ok(()) => {
                if !out.is_empty() {
                    self.version += 1;
                    changes.extend(out.into_iter().map(|c| (self.version, c)));
                }
                Response::Applied {
                    version: self.version,
                }
            }
        }
    }

    fn apply_one(&mut self, cmd: &Command, out: &mut Vec<Change>) -> Result<(), CommandError> {
        match cmd {
            Command::Join {
                id,
                addr,
                zone,
                load,
                at_ms,
            } => {
                let _ = load; // reported by heartbeats from now on; kept for the wire shape
                if !self.members.contains_key(id) && self.members.len() >= MAX_MEMBERS {
                    return Err(CommandError::TooManyMembers(self.members.len()));
                }
                let m = self.members.entry(id.clone()).or_insert_with(|| Member {
                    id: id.clone(),
                    addr: String::new(),
                    zone: String::new(),
                    state: MemberState::Joining,
                    last_heartbeat_ms: 0,
                    sessions: 0,
                    owned_topics: 0,
                });
                let was_draining = m.state == MemberState::Draining;
                m.addr.clone_from(addr);
                m.zone.clone_from(zone);
                m.last_heartbeat_ms = m.last_heartbeat_ms.max(*at_ms);
                if was_draining {
                    // Came back: it must heartbeat again to own slots.
                    m.state = MemberState::Joining;
                }
                out.push(Change::Member(m.clone()));
                Ok(())
            }
            Command::Heartbeat {
                id,
                at_ms,
                sessions,
                owned_topics,
            } => {
                let m = self
                    .members
                    .get_mut(id)
                    .ok_or_else(|| CommandError::UnknownNode(id.clone()))?;
                // max: heartbeats stamped by a new leader whose clock lags must not
                // move liveness backwards.
                m.last_heartbeat_ms = m.last_heartbeat_ms.max(*at_ms);
                m.sessions = *sessions;
                m.owned_topics = *owned_topics;
                if m.state == MemberState::Joining {
                    m.state = MemberState::Active;
                    out.push(Change::Member(m.clone()));
                    self.recompute_slots(out);
                }
                // Load alone is not a metadata change: watchers are not woken each
                // second per node; GetState shows the latest load.
                Ok(())
            }
            Command::MarkDraining { id } => {
                let m = self
                    .members
                    .get_mut(id)
                    .ok_or_else(|| CommandError::UnknownNode(id.clone()))?;
                if m.state != MemberState::Draining {
                    let was_active = m.state == MemberState::Active;
                    m.state = MemberState::Draining;
                    out.push(Change::Member(m.clone()));
                    if was_active {
                        self.recompute_slots(out);
                    }
                }
                Ok(())
            }
            Command::Leave { id } => {
                if !self.members.contains_key(id) {
                    return Err(CommandError::UnknownNode(id.clone()));
                }
                self.remove_members(std::slice::from_ref(id), out);
                Ok(())
            }
            Command::RemoveDead { ids, before_ms } => {
                let dead: Vec<NodeId> = ids
                    .iter()
                    .filter(|id| {
                        self.members
                            .get(*id)
                            .is_some_and(|m| m.last_heartbeat_ms < *before_ms)
                    })
                    .cloned()
                    .collect();
                self.remove_members(&dead, out);
                Ok(())
            }
            Command::UpdateInterest { node, add, remove } => {
                if !self.members.contains_key(node) {
                    return Err(CommandError::UnknownNode(node.clone()));
                }
                let current = self.by_node.get(node);
                let have = current.map_or(0, BTreeSet::len);
                let new_adds = add
                    .iter()
                    .filter(|t| !current.is_some_and(|s| s.contains(*t)))
                    .collect::<BTreeSet<_>>();
                if have + new_adds.len() > MAX_INTEREST_PER_NODE {
                    return Err(CommandError::TooLarge {
                        what: "interest of one node".into(),
                        len: have + new_adds.len(),
                        max: MAX_INTEREST_PER_NODE,
                    });
                }
                // Checks done: mutate. `remove` wins over `add` for a topic in both.
                let mut added = Vec::new();
                let mut removed = Vec::new();
                for t in new_adds {
                    if remove.contains(t) {
                        continue;
                    }
                    self.interest.entry(t.clone()).or_default().insert(node);
                    self.by_node
                        .entry(node.clone())
                        .or_default()
                        .insert(t.clone());
                    added.push(t.clone());
                }
                for t in remove {
                    if self.unlink(node, t) {
                        removed.push(t.clone());
                    }
                }
                removed.sort();
                removed.dedup();
                if !added.is_empty() || !removed.is_empty() {
                    out.push(Change::Interest {
                        node: node.clone(),
                        add: added,
                        remove: removed,
                    });
                }
                Ok(())
            }
            Command::SetNamespaces { namespaces } => {
                if *namespaces != self.namespaces {
                    self.namespaces.clone_from(namespaces);
                    out.push(Change::Namespaces(namespaces.clone()));
                }
                Ok(())
            }
            Command::Batch(_) => Err(CommandError::Invalid("nested batch".into())),
        }
    }

    /// Removes `node`'s interest in `topic`; true if it had it.
    fn unlink(&mut self, node: &str, topic: &str) -> bool {
        let Some(nodes) = self.interest.get_mut(topic) else {
            return false;
        };
        if !nodes.remove(node) {
            return false;
        }
        if nodes.is_empty() {
            self.interest.remove(topic);
        }
        if let Some(ts) = self.by_node.get_mut(node) {
            ts.remove(topic);
            if ts.is_empty() {
                self.by_node.remove(node);
            }
        }
        true
    }

    fn remove_members(&mut self, ids: &[NodeId], out: &mut Vec<Change>) {
        let mut active_changed = false;
        for id in ids {
            let Some(m) = self.members.remove(id) else {
                continue;
            };
            active_changed |= m.state == MemberState::Active;
            for topic in self.by_node.remove(id).unwrap_or_default() {
                if let Some(nodes) = self.interest.get_mut(&topic) {
                    nodes.remove(id);
                    if nodes.is_empty() {
                        self.interest.remove(&topic);
                    }
                }
            }
            out.push(Change::MemberRemoved(id.clone()));
        }
        if active_changed {
            self.recompute_slots(out);
        }
    }

    fn recompute_slots(&mut self, out: &mut Vec<Change>) {
        let active = self
            .members
            .values()
            .filter(|m| m.state == MemberState::Active)
            .map(|m| m.id.as_str());
        self.slots = SlotTable::compute(self.slots.version + 1, active);
        out.push(Change::Slots(self.slots.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(id: &str, at_ms: u64) -> Command {
        Command::Join {
            id: id.into(),
            addr: format!("{id}:9000"),
            zone: "z".into(),
            load: 0,
            at_ms,
        }
    }
    fn hb(id: &str, at_ms: u64) -> Command {
        Command::Heartbeat {
            id: id.into(),
            at_ms,
            sessions: 1,
            owned_topics: 2,
        }
    }
    fn interest(node: &str, add: &[&str], remove: &[&str]) -> Command {
        Command::UpdateInterest {
            node: node.into(),
            add: add.iter().map(|s| s.to_string()).collect(),
            remove: remove.iter().map(|s| s.to_string()).collect(),
        }
    }
    fn apply(s: &mut MetaState, c: Command) -> Response {
        s.apply(&c, &mut Vec::new())
    }
    fn active_cluster() -> MetaState {
        let mut s = MetaState::default();
        for id in ["n1", "n2", "n3"] {
            apply(&mut s, join(id, 10));
            apply(&mut s, hb(id, 20));
        }
        s
    }

    #[test]
    fn join_then_heartbeat_activates_and_bumps_the_slot_table() {
        let mut s = MetaState::default();
        let mut ch = Vec::new();
        assert_eq!(
            s.apply(&join("n1", 5), &mut ch),
            Response::Applied { version: 1 }
        );
        assert_eq!(s.members()["n1"].state, MemberState::Joining);
        assert!(s.slots().owners.is_empty(), "joining members own nothing");
        assert_eq!(ch.len(), 1);
        let r = s.apply(&hb("n1", 6), &mut ch);
        assert_eq!(r, Response::Applied { version: 2 });
        assert_eq!(s.members()["n1"].state, MemberState::Active);
        assert_eq!(s.slots().version, 1);
        assert!(s.slots().owners.iter().all(|o| o == "n1"));
        assert!(matches!(ch.last(), Some((2, Change::Slots(_)))));
        // A plain heartbeat updates load but is not a metadata change.
        let r = s.apply(&hb("n1", 7), &mut ch);
        assert_eq!(r, Response::Applied { version: 2 });
        assert_eq!(s.members()["n1"].last_heartbeat_ms, 7);
        assert_eq!(ch.len(), 3);
    }

    #[test]
    fn slot_table_follows_the_active_set() {
        let mut s = active_cluster();
        let v = s.slots().version;
        assert_eq!(s.slots(), &SlotTable::compute(v, ["n1", "n2", "n3"]));
        apply(&mut s, Command::MarkDraining { id: "n2".into() });
        assert_eq!(s.slots().version, v + 1);
        assert_eq!(s.slots(), &SlotTable::compute(v + 1, ["n1", "n3"]));
        // Draining again is a no-op: no version bump.
        let before = s.version();
        apply(&mut s, Command::MarkDraining { id: "n2".into() });
        assert_eq!(s.version(), before);
        apply(&mut s, Command::Leave { id: "n2".into() });
        assert_eq!(s.slots().version, v + 1, "n2 was not active any more");
        assert!(!s.members().contains_key("n2"));
    }

    #[test]
    fn interest_is_batched_idempotent_and_versioned() {
        let mut s = active_cluster();
        let v = s.version();
        let mut ch = Vec::new();
        s.apply(&interest("n1", &["a", "b", "a"], &[]), &mut ch);
        assert_eq!(s.version(), v + 1);
        assert_eq!(s.interest()["a"], NodeSet::from_iter(["n1".to_string()]));
        assert_eq!(
            ch,
            vec![(
                v + 1,
                Change::Interest {
                    node: "n1".into(),
                    add: vec!["a".into(), "b".into()],
                    remove: vec![]
                }
            )]
        );
        // Same again: no change, no bump.
        s.apply(&interest("n1", &["a"], &["zzz"]), &mut ch);
        assert_eq!(s.version(), v + 1);
        s.apply(&interest("n2", &["a"], &[]), &mut ch);
        s.apply(&interest("n1", &[], &["a", "b"]), &mut ch);
        assert_eq!(s.interest()["a"], NodeSet::from_iter(["n2".to_string()]));
        assert!(!s.interest().contains_key("b"), "empty entries are dropped");
        assert_eq!(s.interest_of("n1"), None);
    }

    #[test]
    fn remove_dead_removes_members_and_interest_in_one_entry() {
        let mut s = active_cluster();
        apply(&mut s, interest("n1", &["a", "b"], &[]));
        apply(&mut s, interest("n2", &["a"], &[]));
        apply(&mut s, hb("n3", 100)); // n3 heartbeated after the cutoff
        let v = s.version();
        let slots_v = s.slots().version;
        let mut ch = Vec::new();
        let r = s.apply(
            &Command::RemoveDead {
                ids: vec!["n1".into(), "n3".into(), "gone".into()],
                before_ms: 50,
            },
            &mut ch,
        );
        assert_eq!(r, Response::Applied { version: v + 1 });
        assert!(!s.members().contains_key("n1"));
        assert!(s.members().contains_key("n3"), "a late heartbeat wins");
        assert_eq!(s.interest()["a"], NodeSet::from_iter(["n2".to_string()]));
        assert!(!s.interest().contains_key("b"));
        assert_eq!(s.slots().version, slots_v + 1);
        assert!(s.slots().owners.iter().all(|o| o != "n1"));
        assert!(ch.iter().all(|(ver, _)| *ver == v + 1));
        assert_eq!(s.silent_since(20), Vec::<String>::new());
        assert_eq!(
            s.silent_since(101),
            vec!["n2".to_string(), "n3".to_string()]
        );
    }

    #[test]
    fn bad_input_is_rejected_and_changes_nothing() {
        let mut s = active_cluster();
        apply(&mut s, interest("n1", &["a"], &[]));
        let before = s.clone();
        let too_many: Vec<String> = (0..=MAX_INTEREST_BATCH).map(|i| format!("t{i}")).collect();
        let cases = [
            (hb("ghost", 1), "unknown node"),
            (interest("ghost", &["a"], &[]), "unknown node"),
            (Command::Leave { id: "ghost".into() }, "unknown node"),
            (interest("n1", &["ok", "bad/topic"], &[]), "invalid topic"),
            (interest("n1", &[""], &[]), "invalid topic"),
            (interest("n1", &[&"x".repeat(256)], &[]), "invalid topic"),
            (
                Command::UpdateInterest {
                    node: "n1".into(),
                    add: too_many,
                    remove: vec![],
                },
                "too large",
            ),
            (join("bad id", 1), "invalid node id"),
            (join(&"x".repeat(129), 1), "invalid node id"),
            (
                Command::Join {
                    id: "n9".into(),
                    addr: "a".repeat(300),
                    zone: String::new(),
                    load: 0,
                    at_ms: 1,
                },
                "too large",
            ),
            (
                Command::SetNamespaces {
                    namespaces: vec![Namespace {
                        pattern: "a.>.b".into(),
                        policy_json: "{}".into(),
                    }],
                },
                "invalid value",
            ),
            (
                Command::Batch(vec![Command::Batch(vec![])]),
                "invalid value",
            ),
        ];
        for (cmd, want) in cases {
            let mut ch = Vec::new();
            match s.apply(&cmd, &mut ch) {
                Response::Rejected(e) => {
                    assert!(e.to_string().contains(want), "{cmd:?}: {e}")
                }
                other => panic!("{cmd:?} accepted: {other:?}"),
            }
            assert!(ch.is_empty());
            assert_eq!(s, before, "{cmd:?} changed the state");
        }
    }

    #[test]
    fn batch_applies_each_command_on_its_own() {
        let mut s = MetaState::default();
        let r = apply(
            &mut s,
            Command::Batch(vec![join("n1", 1), hb("ghost", 1), hb("n1", 2)]),
        );
        let Response::Batch(rs) = r else {
            panic!("{r:?}")
        };
        assert_eq!(rs[0], Response::Applied { version: 1 });
        assert!(matches!(
            rs[1],
            Response::Rejected(CommandError::UnknownNode(_))
        ));
        assert_eq!(rs[2], Response::Applied { version: 2 });
    }

    #[test]
    fn heartbeat_time_never_goes_backwards() {
        let mut s = active_cluster();
        apply(&mut s, hb("n1", 1000));
        apply(&mut s, hb("n1", 900)); // a new leader with a lagging clock
        assert_eq!(s.members()["n1"].last_heartbeat_ms, 1000);
    }

    #[test]
    fn a_node_set_stays_sorted_and_distinct_and_reads_a_serialised_set() {
        let mut n = NodeSet::default();
        assert!(n.insert("n2") && n.insert("n1") && n.insert("n3"));
        assert!(!n.insert("n1"), "already there");
        assert_eq!(
            n.iter().map(String::as_str).collect::<Vec<_>>(),
            ["n1", "n2", "n3"]
        );
        assert!(n.remove("n2") && !n.remove("n2"));
        assert!(n.contains("n3") && !n.contains("n2"));
        assert_eq!(n.len(), 2);
        // Down to one id (held inline) and back up: the same set either way.
        assert!(n.remove("n1"));
        assert_eq!(n, NodeSet::from_iter(["n3".to_string()]));
        assert!(n.insert("n1"));
        assert_eq!(n, NodeSet::from_iter(["n3".to_string(), "n1".into()]));
        assert!(n.remove("n1") && n.remove("n3") && n.is_empty());
        assert_eq!(n, NodeSet::default());
        // Snapshots written while the registry held `BTreeSet`s read back the same.
        let old = serde_json::to_string(&BTreeSet::from(["b".to_string(), "a".into()])).unwrap();
        let back: NodeSet = serde_json::from_str(&old).unwrap();
        assert_eq!(
            back,
            NodeSet::from_iter(["a".to_string(), "b".into(), "a".into()])
        );
        assert_eq!(serde_json::to_string(&back).unwrap(), old);
    }

    #[test]
    fn snapshot_round_trip_rebuilds_the_index() {
        let mut s = active_cluster();
        apply(&mut s, interest("n1", &["a", "b"], &[]));
        apply(
            &mut s,
            Command::SetNamespaces {
                namespaces: vec![Namespace {
                    pattern: "chat.>".into(),
                    policy_json: "{\"history_size\":5}".into(),
                }],
            },
        );
        let json = serde_json::to_vec(&s).unwrap();
        let mut back: MetaState = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, s);
        apply(&mut back, Command::Leave { id: "n1".into() });
        assert!(back.interest().is_empty(), "index rebuilt on load");
    }

    #[test]
    fn same_commands_same_state() {
        let cmds = vec![
            join("b", 1),
            join("a", 1),
            hb("a", 2),
            hb("b", 2),
            interest("a", &["x", "y"], &[]),
            Command::MarkDraining { id: "b".into() },
        ];
        let mut s1 = MetaState::default();
        let mut s2 = MetaState::default();
        for c in &cmds {
            s1.apply(c, &mut Vec::new());
            s2.apply(c, &mut Vec::new());
        }
        assert_eq!(
            serde_json::to_string(&s1).unwrap(),
            serde_json::to_string(&s2).unwrap()
        );
    }
}
