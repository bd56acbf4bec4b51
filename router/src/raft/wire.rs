//! openraft's Raft messages ↔ the `weft.v1` protobuf messages of
//! `proto/weft/v1/raft.proto`: the one place that knows both.
//!
//! [`ToWire`] turns openraft's request and response types into the generated ones;
//! [`FromWire`] turns what arrived back, checking every field first: a required
//! message that is absent, a count or a length over its cap ([`MAX_ENTRIES`],
//! [`MAX_CONFIGS`], [`MAX_MEMBERS`], [`MAX_NAME`]), a duplicated id or a command
//! that does not parse is a [`WireError`], which the peer service answers
//! `INVALID_ARGUMENT` (and a client reports as a network error). Nothing here
//! panics on input, and nothing is sized from a wire length before it was checked
//! (the message itself is bounded by the gRPC decoding limit,
//! [`super::network::MAX_RAFT_MESSAGE`]).
//!
//! A normal entry's [`Command`] is a `MetaCommand`, and a snapshot's data (what a
//! leader sends in InstallSnapshot and a router keeps in its snapshot file) is a
//! `MetaSnapshot`: [`encode_snapshot_data`] and [`decode_snapshot_data`]. Only the
//! router's own log file keeps JSON entries (`log_store.rs`); nothing JSON crosses the
//! wire.

use std::collections::{BTreeMap, BTreeSet};

use openraft::error::SnapshotMismatch;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{
    BasicNode, CommittedLeaderId, Entry, EntryPayload, LeaderId, LogId, Membership, SnapshotMeta,
    SnapshotSegmentId, StoredMembership, Vote,
};
use weft_proto::grpc as pb;

use super::sm_store::Applied;
use super::TypeConfig;
use crate::ring::SlotTable;
use crate::state::{Command, Member, MemberState, MetaState, Namespace};

type NodeId = u64;

/// Entries one AppendEntries may carry (openraft sends at most `max_payload_entries`,
/// 300 by default).
pub const MAX_ENTRIES: usize = 4096;
/// Voter sets in a membership: one, or two while it changes (joint consensus).
pub const MAX_CONFIGS: usize = 2;
/// Members (voters and learners) one membership may name, and voters per set.
pub const MAX_MEMBERS: usize = 64;
/// Longest Raft address or snapshot id, in bytes.
pub const MAX_NAME: usize = 255;

/// Why a message from the wire was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("{0} is missing")]
    Missing(&'static str),
    #[error("{what}: {n} is more than {max}")]
    TooMany {
        what: &'static str,
        n: usize,
        max: usize,
    },
    #[error("{0}")]
    Invalid(String),
}

impl From<WireError> for tonic::Status {
    fn from(e: WireError) -> Self {
        tonic::Status::invalid_argument(format!("malformed raft message: {e}"))
    }
}

fn cap(what: &'static str, n: usize, max: usize) -> Result<(), WireError> {
    if n > max {
        return Err(WireError::TooMany { what, n, max });
    }
    Ok(())
}

fn required<T>(v: Option<T>, what: &'static str) -> Result<T, WireError> {
    v.ok_or(WireError::Missing(what))
}

/// openraft → wire.
pub trait ToWire {
    type Wire;
    fn to_wire(&self) -> Result<Self::Wire, WireError>;
}

/// wire → openraft, every field checked.
pub trait FromWire: Sized {
    type Wire;
    fn from_wire(w: Self::Wire) -> Result<Self, WireError>;
}

fn leader_id(l: &LeaderId<NodeId>) -> pb::LeaderId {
    pb::LeaderId {
        term: l.term,
        node_id: l.node_id,
    }
}

fn log_id(l: &LogId<NodeId>) -> pb::LogId {
    pb::LogId {
        leader_id: Some(leader_id(&l.leader_id)),
        index: l.index,
    }
}

fn opt_log_id(l: &Option<LogId<NodeId>>) -> Option<pb::LogId> {
    l.as_ref().map(log_id)
}

fn vote(v: &Vote<NodeId>) -> pb::RaftVote {
    pb::RaftVote {
        leader_id: Some(leader_id(&v.leader_id)),
        committed: v.committed,
    }
}

fn parse_log_id(w: pb::LogId) -> Result<LogId<NodeId>, WireError> {
    let l = required(w.leader_id, "log_id.leader_id")?;
    Ok(LogId::new(
        CommittedLeaderId::new(l.term, l.node_id),
        w.index,
    ))
}

fn parse_opt_log_id(w: Option<pb::LogId>) -> Result<Option<LogId<NodeId>>, WireError> {
    w.map(parse_log_id).transpose()
}

fn parse_vote(w: Option<pb::RaftVote>) -> Result<Vote<NodeId>, WireError> {
    let v = required(w, "vote")?;
    let l = required(v.leader_id, "vote.leader_id")?;
    Ok(if v.committed {
        Vote::new_committed(l.term, l.node_id)
    } else {
        Vote::new(l.term, l.node_id)
    })
}

fn membership(m: &Membership<NodeId, BasicNode>) -> pb::Membership {
    pb::Membership {
        configs: m
            .get_joint_config()
            .iter()
            .map(|set| pb::VoterSet {
                ids: set.iter().copied().collect(),
            })
            .collect(),
        nodes: m
            .nodes()
            .map(|(id, n)| pb::RaftMember {
                id: *id,
                addr: n.addr.clone(),
            })
            .collect(),
    }
}

fn parse_membership(w: Option<pb::Membership>) -> Result<Membership<NodeId, BasicNode>, WireError> {
    let w = required(w, "membership")?;
    if w.configs.is_empty() {
        return Err(WireError::Missing("membership.configs"));
    }
    cap("membership.configs", w.configs.len(), MAX_CONFIGS)?;
    cap("membership.nodes", w.nodes.len(), MAX_MEMBERS)?;
    let mut configs = Vec::with_capacity(w.configs.len());
    for set in w.configs {
        cap("membership voter set", set.ids.len(), MAX_MEMBERS)?;
        let n = set.ids.len();
        let ids: BTreeSet<NodeId> = set.ids.into_iter().collect();
        if ids.is_empty() || ids.len() != n {
            return Err(WireError::Invalid(
                "a membership voter set is empty or names an id twice".into(),
            ));
        }
        configs.push(ids);
    }
    let mut nodes = BTreeMap::new();
    for m in w.nodes {
        cap("membership node address", m.addr.len(), MAX_NAME)?;
        if nodes.insert(m.id, BasicNode { addr: m.addr }).is_some() {
            return Err(WireError::Invalid(format!(
                "membership names node {} twice",
                m.id
            )));
        }
    }
    Ok(Membership::new(configs, nodes))
}

impl ToWire for Entry<TypeConfig> {
    type Wire = pb::Entry;
    fn to_wire(&self) -> Result<pb::Entry, WireError> {
        use pb::entry::Payload;
        let payload = match &self.payload {
            EntryPayload::Blank => Payload::Blank(pb::Blank {}),
            EntryPayload::Normal(cmd) => Payload::Command(command(cmd)),
            EntryPayload::Membership(m) => Payload::Membership(membership(m)),
        };
        Ok(pb::Entry {
            log_id: Some(log_id(&self.log_id)),
            payload: Some(payload),
        })
    }
}

impl FromWire for Entry<TypeConfig> {
    type Wire = pb::Entry;
    fn from_wire(w: pb::Entry) -> Result<Self, WireError> {
        use pb::entry::Payload;
        let log_id = parse_log_id(required(w.log_id, "entry.log_id")?)?;
        let payload = match required(w.payload, "entry.payload")? {
            Payload::Blank(_) => EntryPayload::Blank,
            Payload::Command(c) => EntryPayload::Normal(parse_command(c, 0).map_err(|e| {
                WireError::Invalid(format!("entry {}: command: {e}", log_id.index))
            })?),
            Payload::Membership(m) => EntryPayload::Membership(parse_membership(Some(m))?),
        };
        Ok(Entry { log_id, payload })
    }
}

/// A command as the wire carries it.
fn command(c: &Command) -> pb::MetaCommand {
    use pb::meta_command::Command as C;
    let c = match c {
        Command::Join {
            id,
            addr,
            zone,
            load,
            at_ms,
        } => C::Join(pb::MetaJoin {
            id: id.clone(),
            addr: addr.clone(),
            zone: zone.clone(),
            load: *load,
            at_ms: *at_ms,
        }),
        Command::Heartbeat {
            id,
            at_ms,
            sessions,
            owned_topics,
        } => C::Heartbeat(pb::MetaHeartbeat {
            id: id.clone(),
            at_ms: *at_ms,
            sessions: *sessions,
            owned_topics: *owned_topics,
        }),
        Command::Leave { id } => C::Leave(id.clone()),
        Command::MarkDraining { id } => C::MarkDraining(id.clone()),
        Command::RemoveDead { ids, before_ms } => C::RemoveDead(pb::MetaRemoveDead {
            ids: ids.clone(),
            before_ms: *before_ms,
        }),
        Command::UpdateInterest { node, add, remove } => C::UpdateInterest(pb::InterestDelta {
            node: node.clone(),
            add: add.clone(),
            remove: remove.clone(),
        }),
        Command::SetNamespaces { namespaces } => C::SetNamespaces(pb::NamespaceList {
            namespaces: namespaces.iter().map(namespace).collect(),
        }),
        Command::Batch(cs) => C::Batch(pb::MetaBatch {
            commands: cs.iter().map(command).collect(),
        }),
    };
    pb::MetaCommand { command: Some(c) }
}

fn namespace(n: &Namespace) -> pb::Namespace {
    pb::Namespace {
        pattern: n.pattern.clone(),
        policy_json: n.policy_json.clone(),
    }
}

/// A command from the wire. Its values are checked when it is applied (as a command
/// a leader proposes is); here only its shape: every command present, at most
/// [`crate::state::MAX_BATCH`] in a batch, and a batch never inside a batch deeper
/// than one level (group commit makes exactly one).
fn parse_command(w: pb::MetaCommand, depth: usize) -> Result<Command, WireError> {
    use pb::meta_command::Command as C;
    Ok(match required(w.command, "command")? {
        C::Join(j) => Command::Join {
            id: j.id,
            addr: j.addr,
            zone: j.zone,
            load: j.load,
            at_ms: j.at_ms,
        },
        C::Heartbeat(h) => Command::Heartbeat {
            id: h.id,
            at_ms: h.at_ms,
            sessions: h.sessions,
            owned_topics: h.owned_topics,
        },
        C::Leave(id) => Command::Leave { id },
        C::MarkDraining(id) => Command::MarkDraining { id },
        C::RemoveDead(r) => Command::RemoveDead {
            ids: r.ids,
            before_ms: r.before_ms,
        },
        C::UpdateInterest(d) => Command::UpdateInterest {
            node: d.node,
            add: d.add,
            remove: d.remove,
        },
        C::SetNamespaces(ns) => Command::SetNamespaces {
            namespaces: ns.namespaces.into_iter().map(parse_namespace).collect(),
        },
        C::Batch(b) => {
            if depth > 0 {
                return Err(WireError::Invalid("a batch inside a batch".into()));
            }
            cap("batch", b.commands.len(), crate::state::MAX_BATCH)?;
            Command::Batch(
                b.commands
                    .into_iter()
                    .map(|c| parse_command(c, depth + 1))
                    .collect::<Result<_, _>>()?,
            )
        }
    })
}

fn parse_namespace(n: pb::Namespace) -> Namespace {
    Namespace {
        pattern: n.pattern,
        policy_json: n.policy_json,
    }
}

/// The state machine as a snapshot carries it (a `MetaSnapshot`, protobuf).
pub fn encode_snapshot_data(a: &Applied) -> Vec<u8> {
    use prost::Message;
    let s = &a.meta;
    pb::MetaSnapshot {
        last_applied: opt_log_id(&a.last_applied),
        membership_log_id: opt_log_id(a.membership.log_id()),
        membership: Some(membership(a.membership.membership())),
        state: Some(pb::ClusterState {
            version: s.version(),
            members: s
                .members()
                .values()
                .map(crate::service::member_to_proto)
                .collect(),
            slots: Some(pb::SlotTable {
                version: s.slots().version,
                owners: s.slots().owners.clone(),
            }),
            interest: s
                .interest()
                .iter()
                .map(|(topic, nodes)| pb::Interest {
                    topic: topic.clone(),
                    nodes: nodes.iter().cloned().collect(),
                })
                .collect(),
            namespaces: s.namespaces().iter().map(namespace).collect(),
            ..Default::default()
        }),
    }
    .encode_to_vec()
}

/// [`encode_snapshot_data`]'s bytes back, every field checked. A snapshot file
/// written before snapshots had a schema (JSON, which starts with `{`; a
/// `MetaSnapshot` never does) still loads.
pub fn decode_snapshot_data(data: &[u8]) -> Result<Applied, WireError> {
    use prost::Message;
    if data.first() == Some(&b'{') {
        return serde_json::from_slice(data)
            .map_err(|e| WireError::Invalid(format!("snapshot (JSON, before protobuf): {e}")));
    }
    let w =
        pb::MetaSnapshot::decode(data).map_err(|e| WireError::Invalid(format!("snapshot: {e}")))?;
    let membership = StoredMembership::new(
        parse_opt_log_id(w.membership_log_id)?,
        match w.membership {
            // A store that was never initialised has no membership yet.
            None => Membership::default(),
            Some(m) if m.configs.is_empty() && m.nodes.is_empty() => Membership::default(),
            m => parse_membership(m)?,
        },
    );
    let st = required(w.state, "snapshot.state")?;
    cap(
        "snapshot members",
        st.members.len(),
        crate::state::MAX_MEMBERS,
    )?;
    let mut members = BTreeMap::new();
    for m in st.members {
        let state = match pb::MemberState::try_from(m.state) {
            Ok(pb::MemberState::Joining) => MemberState::Joining,
            Ok(pb::MemberState::Active) => MemberState::Active,
            Ok(pb::MemberState::Draining) => MemberState::Draining,
            _ => {
                return Err(WireError::Invalid(format!(
                    "snapshot: member {} has state {}",
                    m.id, m.state
                )))
            }
        };
        let id = m.id.clone();
        let member = Member {
            id: m.id,
            addr: m.addr,
            zone: m.zone,
            state,
            last_heartbeat_ms: m.last_heartbeat_ms,
            sessions: m.sessions,
            owned_topics: m.owned_topics,
        };
        if members.insert(id.clone(), member).is_some() {
            return Err(WireError::Invalid(format!(
                "snapshot names member {id} twice"
            )));
        }
    }
    let slots = required(st.slots, "snapshot.state.slots")?;
    let meta = MetaState::from_parts(
        st.version,
        members,
        SlotTable {
            version: slots.version,
            owners: slots.owners,
        },
        st.interest.into_iter().map(|i| (i.topic, i.nodes)),
        st.namespaces.into_iter().map(parse_namespace).collect(),
    )
    .map_err(|e| WireError::Invalid(format!("snapshot: {e}")))?;
    Ok(Applied {
        last_applied: parse_opt_log_id(w.last_applied)?,
        membership,
        meta,
    })
}

impl ToWire for VoteRequest<NodeId> {
    type Wire = pb::VoteRequest;
    fn to_wire(&self) -> Result<pb::VoteRequest, WireError> {
        Ok(pb::VoteRequest {
            vote: Some(vote(&self.vote)),
            last_log_id: opt_log_id(&self.last_log_id),
        })
    }
}

impl FromWire for VoteRequest<NodeId> {
    type Wire = pb::VoteRequest;
    fn from_wire(w: pb::VoteRequest) -> Result<Self, WireError> {
        Ok(VoteRequest {
            vote: parse_vote(w.vote)?,
            last_log_id: parse_opt_log_id(w.last_log_id)?,
        })
    }
}

impl ToWire for VoteResponse<NodeId> {
    type Wire = pb::VoteReply;
    fn to_wire(&self) -> Result<pb::VoteReply, WireError> {
        Ok(pb::VoteReply {
            vote: Some(vote(&self.vote)),
            vote_granted: self.vote_granted,
            last_log_id: opt_log_id(&self.last_log_id),
        })
    }
}

impl FromWire for VoteResponse<NodeId> {
    type Wire = pb::VoteReply;
    fn from_wire(w: pb::VoteReply) -> Result<Self, WireError> {
        Ok(VoteResponse {
            vote: parse_vote(w.vote)?,
            vote_granted: w.vote_granted,
            last_log_id: parse_opt_log_id(w.last_log_id)?,
        })
    }
}

impl ToWire for AppendEntriesRequest<TypeConfig> {
    type Wire = pb::AppendEntriesRequest;
    fn to_wire(&self) -> Result<pb::AppendEntriesRequest, WireError> {
        Ok(pb::AppendEntriesRequest {
            vote: Some(vote(&self.vote)),
            prev_log_id: opt_log_id(&self.prev_log_id),
            entries: self
                .entries
                .iter()
                .map(ToWire::to_wire)
                .collect::<Result<_, _>>()?,
            leader_commit: opt_log_id(&self.leader_commit),
        })
    }
}

impl FromWire for AppendEntriesRequest<TypeConfig> {
    type Wire = pb::AppendEntriesRequest;
    fn from_wire(w: pb::AppendEntriesRequest) -> Result<Self, WireError> {
        cap("entries", w.entries.len(), MAX_ENTRIES)?;
        Ok(AppendEntriesRequest {
            vote: parse_vote(w.vote)?,
            prev_log_id: parse_opt_log_id(w.prev_log_id)?,
            entries: w
                .entries
                .into_iter()
                .map(Entry::from_wire)
                .collect::<Result<_, _>>()?,
            leader_commit: parse_opt_log_id(w.leader_commit)?,
        })
    }
}

impl ToWire for AppendEntriesResponse<NodeId> {
    type Wire = pb::AppendEntriesReply;
    fn to_wire(&self) -> Result<pb::AppendEntriesReply, WireError> {
        use pb::append_entries_reply::Result as R;
        let result = match self {
            AppendEntriesResponse::Success => R::Success(pb::Blank {}),
            AppendEntriesResponse::PartialSuccess(m) => R::PartialSuccess(pb::PartialSuccess {
                matching: opt_log_id(m),
            }),
            AppendEntriesResponse::Conflict => R::Conflict(pb::Blank {}),
            AppendEntriesResponse::HigherVote(v) => R::HigherVote(vote(v)),
        };
        Ok(pb::AppendEntriesReply {
            result: Some(result),
        })
    }
}

impl FromWire for AppendEntriesResponse<NodeId> {
    type Wire = pb::AppendEntriesReply;
    fn from_wire(w: pb::AppendEntriesReply) -> Result<Self, WireError> {
        use pb::append_entries_reply::Result as R;
        Ok(match required(w.result, "append_entries.result")? {
            R::Success(_) => AppendEntriesResponse::Success,
            R::PartialSuccess(p) => {
                AppendEntriesResponse::PartialSuccess(parse_opt_log_id(p.matching)?)
            }
            R::Conflict(_) => AppendEntriesResponse::Conflict,
            R::HigherVote(v) => AppendEntriesResponse::HigherVote(parse_vote(Some(v))?),
        })
    }
}

impl ToWire for SnapshotMeta<NodeId, BasicNode> {
    type Wire = pb::SnapshotMeta;
    fn to_wire(&self) -> Result<pb::SnapshotMeta, WireError> {
        Ok(pb::SnapshotMeta {
            last_log_id: opt_log_id(&self.last_log_id),
            last_membership_log_id: opt_log_id(self.last_membership.log_id()),
            last_membership: Some(membership(self.last_membership.membership())),
            snapshot_id: self.snapshot_id.clone(),
        })
    }
}

impl FromWire for SnapshotMeta<NodeId, BasicNode> {
    type Wire = pb::SnapshotMeta;
    fn from_wire(w: pb::SnapshotMeta) -> Result<Self, WireError> {
        cap("snapshot_id", w.snapshot_id.len(), MAX_NAME)?;
        Ok(SnapshotMeta {
            last_log_id: parse_opt_log_id(w.last_log_id)?,
            last_membership: StoredMembership::new(
                parse_opt_log_id(w.last_membership_log_id)?,
                parse_membership(w.last_membership)?,
            ),
            snapshot_id: w.snapshot_id,
        })
    }
}

impl ToWire for InstallSnapshotRequest<TypeConfig> {
    type Wire = pb::InstallSnapshotRequest;
    fn to_wire(&self) -> Result<pb::InstallSnapshotRequest, WireError> {
        Ok(pb::InstallSnapshotRequest {
            vote: Some(vote(&self.vote)),
            meta: Some(self.meta.to_wire()?),
            offset: self.offset,
            data: self.data.clone(),
            done: self.done,
        })
    }
}

impl FromWire for InstallSnapshotRequest<TypeConfig> {
    type Wire = pb::InstallSnapshotRequest;
    fn from_wire(w: pb::InstallSnapshotRequest) -> Result<Self, WireError> {
        Ok(InstallSnapshotRequest {
            vote: parse_vote(w.vote)?,
            meta: SnapshotMeta::from_wire(required(w.meta, "meta")?)?,
            offset: w.offset,
            data: w.data,
            done: w.done,
        })
    }
}

fn segment(s: &SnapshotSegmentId) -> pb::SnapshotSegmentId {
    pb::SnapshotSegmentId {
        id: s.id.clone(),
        offset: s.offset,
    }
}

fn parse_segment(w: Option<pb::SnapshotSegmentId>) -> Result<SnapshotSegmentId, WireError> {
    let w = required(w, "snapshot segment")?;
    cap("snapshot segment id", w.id.len(), MAX_NAME)?;
    Ok(SnapshotSegmentId {
        id: w.id,
        offset: w.offset,
    })
}

/// An InstallSnapshot answer: the receiver's vote, or the chunk it expected instead.
impl ToWire for Result<InstallSnapshotResponse<NodeId>, SnapshotMismatch> {
    type Wire = pb::InstallSnapshotReply;
    fn to_wire(&self) -> Result<pb::InstallSnapshotReply, WireError> {
        use pb::install_snapshot_reply::Result as R;
        let result = match self {
            Ok(r) => R::Vote(vote(&r.vote)),
            Err(m) => R::Mismatch(pb::SnapshotMismatch {
                expect: Some(segment(&m.expect)),
                got: Some(segment(&m.got)),
            }),
        };
        Ok(pb::InstallSnapshotReply {
            result: Some(result),
        })
    }
}

impl FromWire for Result<InstallSnapshotResponse<NodeId>, SnapshotMismatch> {
    type Wire = pb::InstallSnapshotReply;
    fn from_wire(w: pb::InstallSnapshotReply) -> Result<Self, WireError> {
        use pb::install_snapshot_reply::Result as R;
        Ok(match required(w.result, "install_snapshot.result")? {
            R::Vote(v) => Ok(InstallSnapshotResponse {
                vote: parse_vote(Some(v))?,
            }),
            R::Mismatch(m) => Err(SnapshotMismatch {
                expect: parse_segment(m.expect)?,
                got: parse_segment(m.got)?,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lid(term: u64, node: u64, index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(term, node), index)
    }

    fn members() -> Membership<NodeId, BasicNode> {
        Membership::new(
            vec![BTreeSet::from([1, 2, 3]), BTreeSet::from([2, 3, 4])],
            BTreeMap::from([1, 2, 3, 4, 5].map(|i| {
                (
                    i,
                    BasicNode {
                        addr: format!("r{i}:9401"),
                    },
                )
            })),
        )
    }

    fn round_trip<T>(v: T)
    where
        T: ToWire + FromWire<Wire = <T as ToWire>::Wire> + PartialEq + std::fmt::Debug,
    {
        let back = T::from_wire(v.to_wire().unwrap()).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn every_message_survives_the_wire() {
        round_trip(VoteRequest {
            vote: Vote::new(7, 2),
            last_log_id: Some(lid(6, 1, 41)),
        });
        round_trip(VoteRequest::<NodeId> {
            vote: Vote::new_committed(1, 1),
            last_log_id: None,
        });
        round_trip(VoteResponse {
            vote: Vote::new(7, 2),
            vote_granted: true,
            last_log_id: None,
        });
        let cmd = Command::Heartbeat {
            id: "n1".into(),
            at_ms: 5,
            sessions: 2,
            owned_topics: 3,
        };
        let append = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(3, 1),
            prev_log_id: Some(lid(3, 1, 9)),
            entries: vec![
                Entry {
                    log_id: lid(3, 1, 10),
                    payload: EntryPayload::Blank,
                },
                Entry {
                    log_id: lid(3, 1, 11),
                    payload: EntryPayload::Normal(cmd),
                },
                Entry {
                    log_id: lid(3, 1, 12),
                    payload: EntryPayload::Membership(members()),
                },
            ],
            leader_commit: Some(lid(3, 1, 10)),
        };
        // (AppendEntriesRequest has no PartialEq: compare its fields.)
        let back = AppendEntriesRequest::from_wire(append.to_wire().unwrap()).unwrap();
        assert_eq!(
            (
                back.vote,
                back.prev_log_id,
                &back.entries,
                back.leader_commit
            ),
            (
                append.vote,
                append.prev_log_id,
                &append.entries,
                append.leader_commit
            )
        );
        for r in [
            AppendEntriesResponse::Success,
            AppendEntriesResponse::PartialSuccess(Some(lid(1, 1, 1))),
            AppendEntriesResponse::PartialSuccess(None),
            AppendEntriesResponse::Conflict,
            AppendEntriesResponse::HigherVote(Vote::new(9, 3)),
        ] {
            round_trip(r);
        }
        round_trip(InstallSnapshotRequest::<TypeConfig> {
            vote: Vote::new_committed(3, 1),
            meta: SnapshotMeta {
                last_log_id: Some(lid(3, 1, 500)),
                last_membership: StoredMembership::new(Some(lid(1, 1, 0)), members()),
                snapshot_id: "snap-1".into(),
            },
            offset: 4096,
            data: vec![1, 2, 3],
            done: false,
        });
        round_trip(Ok::<_, SnapshotMismatch>(InstallSnapshotResponse {
            vote: Vote::new(2, 2),
        }));
        round_trip(Err::<InstallSnapshotResponse<NodeId>, _>(
            SnapshotMismatch {
                expect: SnapshotSegmentId {
                    id: "a".into(),
                    offset: 0,
                },
                got: SnapshotSegmentId {
                    id: "a".into(),
                    offset: 10,
                },
            },
        ));
    }

    fn refused<T: FromWire + std::fmt::Debug>(w: T::Wire) -> WireError {
        T::from_wire(w).unwrap_err()
    }

    #[test]
    fn malformed_messages_are_refused_not_trusted() {
        // Required messages absent.
        assert_eq!(
            refused::<VoteRequest<NodeId>>(pb::VoteRequest::default()),
            WireError::Missing("vote")
        );
        let vote = Some(pb::RaftVote {
            leader_id: Some(pb::LeaderId {
                term: 1,
                node_id: 1,
            }),
            committed: true,
        });
        assert_eq!(
            refused::<VoteRequest<NodeId>>(pb::VoteRequest {
                vote: Some(pb::RaftVote::default()),
                last_log_id: None
            }),
            WireError::Missing("vote.leader_id")
        );
        assert!(matches!(
            refused::<AppendEntriesResponse<NodeId>>(pb::AppendEntriesReply::default()),
            WireError::Missing(_)
        ));
        let append = |entries: Vec<pb::Entry>| pb::AppendEntriesRequest {
            vote,
            prev_log_id: None,
            entries,
            leader_commit: None,
        };
        let log_id = Some(pb::LogId {
            leader_id: Some(pb::LeaderId {
                term: 1,
                node_id: 1,
            }),
            index: 1,
        });
        // An entry without a log id, without a payload, with a command that is no
        // command, with a log id without a leader.
        for (e, want) in [
            (
                pb::Entry {
                    log_id: None,
                    payload: Some(pb::entry::Payload::Blank(pb::Blank {})),
                },
                "entry.log_id",
            ),
            (
                pb::Entry {
                    log_id,
                    payload: None,
                },
                "entry.payload",
            ),
            (
                pb::Entry {
                    log_id,
                    payload: Some(pb::entry::Payload::Command(pb::MetaCommand {
                        command: None,
                    })),
                },
                "command",
            ),
            (
                pb::Entry {
                    log_id,
                    payload: Some(pb::entry::Payload::Command(batch(vec![batch(vec![])]))),
                },
                "a batch inside a batch",
            ),
            (
                pb::Entry {
                    log_id,
                    payload: Some(pb::entry::Payload::Command(batch(
                        (0..=crate::state::MAX_BATCH)
                            .map(|_| pb::MetaCommand {
                                command: Some(pb::meta_command::Command::Leave("n1".into())),
                            })
                            .collect(),
                    ))),
                },
                "batch",
            ),
            (
                pb::Entry {
                    log_id: Some(pb::LogId {
                        leader_id: None,
                        index: 3,
                    }),
                    payload: Some(pb::entry::Payload::Blank(pb::Blank {})),
                },
                "log_id.leader_id",
            ),
        ] {
            let e = refused::<AppendEntriesRequest<TypeConfig>>(append(vec![e]));
            assert!(e.to_string().contains(want), "{e} (want {want})");
        }
        // Too many entries: refused before any is converted.
        let blank = pb::Entry {
            log_id,
            payload: Some(pb::entry::Payload::Blank(pb::Blank {})),
        };
        assert!(matches!(
            refused::<AppendEntriesRequest<TypeConfig>>(append(vec![blank; MAX_ENTRIES + 1])),
            WireError::TooMany {
                what: "entries",
                ..
            }
        ));
        // Memberships: empty, too many sets, an empty set, a duplicate, a long address.
        let with = |m: pb::Membership| {
            append(vec![pb::Entry {
                log_id,
                payload: Some(pb::entry::Payload::Membership(m)),
            }])
        };
        let set = |ids: &[u64]| pb::VoterSet { ids: ids.to_vec() };
        for m in [
            pb::Membership::default(),
            pb::Membership {
                configs: vec![set(&[1]), set(&[2]), set(&[3])],
                nodes: vec![],
            },
            pb::Membership {
                configs: vec![set(&[])],
                nodes: vec![],
            },
            pb::Membership {
                configs: vec![set(&[1, 1])],
                nodes: vec![],
            },
            pb::Membership {
                configs: vec![set(&[1])],
                nodes: vec![
                    pb::RaftMember {
                        id: 1,
                        addr: "a:1".into(),
                    },
                    pb::RaftMember {
                        id: 1,
                        addr: "b:1".into(),
                    },
                ],
            },
            pb::Membership {
                configs: vec![set(&[1])],
                nodes: vec![pb::RaftMember {
                    id: 1,
                    addr: "x".repeat(MAX_NAME + 1),
                }],
            },
            pb::Membership {
                configs: vec![set(&(0..MAX_MEMBERS as u64 + 1).collect::<Vec<_>>())],
                nodes: vec![],
            },
        ] {
            refused::<AppendEntriesRequest<TypeConfig>>(with(m));
        }
        // A snapshot without its meta, or with an over-long id.
        assert_eq!(
            refused::<InstallSnapshotRequest<TypeConfig>>(pb::InstallSnapshotRequest {
                vote,
                meta: None,
                offset: 0,
                data: vec![],
                done: true,
            }),
            WireError::Missing("meta")
        );
        assert!(matches!(
            refused::<InstallSnapshotRequest<TypeConfig>>(pb::InstallSnapshotRequest {
                vote,
                meta: Some(pb::SnapshotMeta {
                    last_log_id: None,
                    last_membership_log_id: None,
                    last_membership: Some(pb::Membership {
                        configs: vec![set(&[1])],
                        nodes: vec![],
                    }),
                    snapshot_id: "s".repeat(MAX_NAME + 1),
                }),
                offset: 0,
                data: vec![],
                done: true,
            }),
            WireError::TooMany { .. }
        ));
        let status: tonic::Status = WireError::Missing("vote").into();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }

    fn batch(commands: Vec<pb::MetaCommand>) -> pb::MetaCommand {
        pb::MetaCommand {
            command: Some(pb::meta_command::Command::Batch(pb::MetaBatch { commands })),
        }
    }

    /// One of every command, as a leader proposes them (a group commit included).
    fn every_command() -> Vec<Command> {
        let one = vec![
            Command::Join {
                id: "n1".into(),
                addr: "10.0.0.1:9100".into(),
                zone: "z1".into(),
                load: 7,
                at_ms: 1_700_000_000_123,
            },
            Command::Heartbeat {
                id: "n1".into(),
                at_ms: 1_700_000_000_456,
                sessions: 12,
                owned_topics: 3,
            },
            Command::Leave { id: "n2".into() },
            Command::MarkDraining { id: "n3".into() },
            Command::RemoveDead {
                ids: vec!["n4".into(), "n5".into()],
                before_ms: 99,
            },
            Command::UpdateInterest {
                node: "n1".into(),
                add: vec!["a.b".into(), "c".into()],
                remove: vec!["d".into()],
            },
            Command::SetNamespaces {
                namespaces: vec![Namespace {
                    pattern: "room.>".into(),
                    policy_json: r#"{"presence":true}"#.into(),
                }],
            },
        ];
        let mut all = one.clone();
        all.push(Command::Batch(one));
        all
    }

    #[test]
    fn every_command_crosses_the_wire_as_protobuf() {
        use prost::Message;
        for cmd in every_command() {
            let entry = Entry::<TypeConfig> {
                log_id: lid(2, 1, 5),
                payload: EntryPayload::Normal(cmd.clone()),
            };
            let w = entry.to_wire().unwrap();
            let bytes = w.encode_to_vec();
            // The JSON it used to travel as begins `{"Join":…`: nowhere on the wire now.
            let json = serde_json::to_vec(&cmd).unwrap();
            let head = &json[..json.len().min(8)];
            assert!(
                !bytes.windows(head.len()).any(|w| w == head),
                "no JSON on the wire for {cmd:?}"
            );
            let back =
                Entry::<TypeConfig>::from_wire(pb::Entry::decode(&bytes[..]).unwrap()).unwrap();
            match back.payload {
                EntryPayload::Normal(c) => assert_eq!(c, cmd),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_snapshot_is_protobuf_and_loads_back_to_the_same_state() {
        let mut meta = MetaState::default();
        let mut changes = Vec::new();
        for cmd in every_command() {
            meta.apply(&cmd, &mut changes);
        }
        // Interest from two nodes on one topic, one on another.
        meta.apply(
            &Command::Join {
                id: "n9".into(),
                addr: "x:1".into(),
                zone: String::new(),
                load: 0,
                at_ms: 1,
            },
            &mut changes,
        );
        meta.apply(
            &Command::UpdateInterest {
                node: "n9".into(),
                add: vec!["a.b".into()],
                remove: vec![],
            },
            &mut changes,
        );
        assert!(meta.interest()["a.b"].len() == 2, "{:?}", meta.interest());
        let applied = Applied {
            last_applied: Some(lid(4, 2, 77)),
            membership: StoredMembership::new(Some(lid(1, 1, 1)), members()),
            meta,
        };
        let data = encode_snapshot_data(&applied);
        assert_ne!(data.first(), Some(&b'{'));
        let back = decode_snapshot_data(&data).unwrap();
        assert_eq!(back.last_applied, applied.last_applied);
        assert_eq!(back.membership, applied.membership);
        assert_eq!(
            serde_json::to_string(&back.meta).unwrap(),
            serde_json::to_string(&applied.meta).unwrap()
        );
        // A snapshot file written before snapshots were protobuf still loads.
        let legacy = serde_json::to_vec(&applied).unwrap();
        let old = decode_snapshot_data(&legacy).unwrap();
        assert_eq!(old.last_applied, applied.last_applied);
        assert_eq!(
            serde_json::to_string(&old.meta).unwrap(),
            serde_json::to_string(&applied.meta).unwrap()
        );
        // A store that was never initialised round-trips too.
        let empty = decode_snapshot_data(&encode_snapshot_data(&Applied::default())).unwrap();
        assert_eq!(empty.last_applied, None);
        assert_eq!(empty.membership, StoredMembership::default());
        // Damaged data is an error, never a panic.
        for bad in [&data[..data.len() / 2], b"\xff\xff\xff", b"{not json"] {
            assert!(decode_snapshot_data(bad).is_err());
        }
    }
}
