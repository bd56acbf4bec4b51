//! Client-token revocations between nodes, and the hold a node keeps on user tokens
//! until it has heard what its peers revoked.
//!
//! A revocation made on one node goes to every linked peer at once
//! ([`Relay::broadcast_revoke`]). A node that was down at the time learns it when its
//! links come up: each side sends the peer every revocation in force, then
//! `RevocationsSent`. Until every member of the cluster has sent that (or
//! [`SYNC_HOLD`] has passed), a node that has just started refuses user tokens with
//! `503` and its `/readyz` says not ready: otherwise, for the moment between its start
//! and its peers' sets arriving, a token revoked while it was down would be let in.
//!
//! Older peers do not mark the end of their set (their `Hello` lacks
//! `revocations_sent`); they are never sent the frame, and their set counts as heard
//! once their link is up.
use std::sync::atomic::Ordering;
use std::time::{Duration, UNIX_EPOCH};

use tracing::{info, warn};
use weft_proto::grpc::relay_frame::Kind;
use weft_proto::grpc::{self};

use crate::auth::revoke::Target;
use crate::node::Node;

use super::*;

/// The longest a starting node holds user tokens back waiting for a peer's set: a
/// member that is down (and not yet removed from the membership) cannot send one.
/// Past it the node serves, and logs which peers it did not hear.
pub const SYNC_HOLD: Duration = Duration::from_secs(10);

/// Longest `sub` or `jti` taken from a peer.
const MAX_NAME: usize = 256;

/// A client-token revocation as a relay frame.
fn revoke_frame(target: &Target, until_s: u64) -> bytes::Bytes {
    let (sub, jti) = match target {
        Target::Sub(s) => (s.clone(), String::new()),
        Target::Jti(j) => (String::new(), j.clone()),
    };
    encode(Kind::Revoke(grpc::Revoke {
        sub,
        jti,
        until: until_s,
    }))
}

impl Relay {
    /// Sends a client-token revocation to every linked peer (control frames: never
    /// dropped for lag). A peer that is down hears it from the set its peers send
    /// when its links come up again.
    pub fn broadcast_revoke(&self, target: &Target, until_s: u64) -> usize {
        let frame = revoke_frame(target, until_s);
        let peers: Vec<Arc<Peer>> = lock(&self.peers).values().cloned().collect();
        peers
            .iter()
            .filter_map(|p| p.link())
            .filter(|link| link.push_control(frame.clone()))
            .count()
    }

    /// Sends every revocation in force to a peer whose link just came up, then (to a
    /// peer that understands it) `RevocationsSent`. The receiver takes an entry it
    /// already has without writing anything.
    pub(super) fn send_revocations(&self, node: &Node, link: &LinkQueue, mark_end: bool) {
        for (target, until) in node.auth.revocations() {
            let until_s = until.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            if !link.push_control(revoke_frame(&target, until_s)) {
                return;
            }
        }
        if mark_end {
            link.push_control(encode(Kind::RevocationsSent(grpc::RevocationsSent {})));
        }
    }

    /// A peer's `Revoke` frame. Peers are members (mutual TLS, identity checked at
    /// `Hello`); a malformed frame is still an error that closes the link.
    pub(super) fn apply_revoke(&self, node: &Node, r: grpc::Revoke) -> Result<(), String> {
        let target = match (r.sub.is_empty(), r.jti.is_empty()) {
            (false, true) if r.sub.len() <= MAX_NAME => Target::Sub(r.sub),
            (true, false) if r.jti.len() <= MAX_NAME => Target::Jti(r.jti),
            _ => return Err("revoke needs exactly one of sub or jti".into()),
        };
        let until = UNIX_EPOCH
            .checked_add(Duration::from_secs(r.until))
            .ok_or("revoke: `until` out of range")?;
        // An `until` already past is a no-op, not a broken link.
        let _ = node.auth.revoke(target, until);
        Ok(())
    }

    /// `peer` has sent its whole set (or is an older peer whose link is up).
    pub(super) fn heard_revocations(&self, node: &Node, peer: &Peer) {
        peer.revocations_heard.store(true, Ordering::Release);
        self.release_revocation_hold(node);
    }

    /// Lifts the hold on user tokens once every peer in the membership has sent its
    /// set. Called whenever a set completes and whenever the peers change (one that
    /// left no longer counts).
    pub(super) fn release_revocation_hold(&self, node: &Node) {
        if !node.auth.revocations_held() {
            return;
        }
        let peers = lock(&self.peers);
        let all = peers
            .values()
            .all(|p| p.revocations_heard.load(Ordering::Acquire));
        if all && node.auth.release_revocation_hold() {
            info!(
                peers = peers.len(),
                "every peer's revocations heard; accepting user tokens"
            );
        }
    }

    /// After [`SYNC_HOLD`]: serves whatever is still missing, and says who.
    pub fn end_revocation_hold(&self, node: &Node) {
        let missing: Vec<String> = lock(&self.peers)
            .values()
            .filter(|p| !p.revocations_heard.load(Ordering::Acquire))
            .map(|p| p.id.to_string())
            .collect();
        if node.auth.release_revocation_hold() {
            warn!(
                missing = ?missing,
                hold_s = SYNC_HOLD.as_secs(),
                "accepting user tokens without these peers' revocations; a token revoked while this node was down may be let in until one of them links"
            );
        }
    }
}
