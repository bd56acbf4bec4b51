//! Who is calling, and what it may do: the one place that decides (DESIGN §6).
//!
//! A cluster connection's caller is resolved **once**, right after its TLS handshake,
//! from the URI SAN of its certificate — `weft://node/<id>`, `weft://router/<id>` or
//! `weft://admin/<name>` — into a [`Peer`] that rides on every request of that
//! connection (see [`crate::tls`]). Handlers ask [`authorize`] with the [`Action`] they
//! are about to perform; nothing downstream re-parses a certificate or trusts an id
//! sent in a message body for *who* the caller is.
//!
//! Rules:
//! - a node may Join, Heartbeat, Leave, Drain, UpdateInterest and open a relay link
//!   (its `Hello`) only as the id in its own certificate;
//! - an admin may Drain any node (and read the metadata), nothing else;
//! - Raft RPCs come only from routers;
//! - reading the metadata (GetState, Watch) is open to every verified member;
//! - on a plaintext listener (the embedded router on loopback, or
//!   `--cluster-insecure`) nobody is authenticated: [`Peer::Unverified`] may do
//!   anything, as before this module existed.
//!
//! Every refusal is answered `PERMISSION_DENIED`, logged with the peer's identity and
//! counted by [`Refusal`] reason ([`refusals`], [`refusals_for`]).

use std::sync::atomic::{AtomicU64, Ordering};

/// The URI scheme of member identities.
pub const SCHEME: &str = "weft://";

/// The caller of a cluster connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Peer {
    /// An edge node (`weft://node/<node-id>`).
    Node(String),
    /// A router (`weft://router/<raft-id>`).
    Router(String),
    /// An operator (`weft://admin/<name>`).
    Admin(String),
    /// A plaintext connection: nothing is known about the caller.
    Unverified,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the certificate does not parse")]
    BadCertificate,
    #[error("the certificate names no weft:// identity in its URI SANs")]
    None,
    #[error("the certificate names more than one weft:// identity")]
    Several,
    #[error("`{0}` is not weft://node/<id>, weft://router/<id> or weft://admin/<name>")]
    Malformed(String),
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 255 && id.bytes().all(weft_proto::topic::is_topic_byte)
}

impl Peer {
    /// Parses `weft://<role>/<id>`.
    pub fn from_uri(uri: &str) -> Result<Self, IdentityError> {
        let bad = || IdentityError::Malformed(uri.chars().take(300).collect());
        let rest = uri.strip_prefix(SCHEME).ok_or_else(bad)?;
        let (role, id) = rest.split_once('/').ok_or_else(bad)?;
        if !valid_id(id) {
            return Err(bad());
        }
        match role {
            "node" => Ok(Self::Node(id.into())),
            "router" => Ok(Self::Router(id.into())),
            "admin" => Ok(Self::Admin(id.into())),
            _ => Err(bad()),
        }
    }

    /// The identity a certificate (DER) names: exactly one `weft://` URI SAN.
    pub fn from_cert(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|_| IdentityError::BadCertificate)?;
        let san = cert
            .subject_alternative_name()
            .map_err(|_| IdentityError::BadCertificate)?;
        let mut found = None;
        for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                if uri.starts_with(SCHEME) {
                    if found.is_some() {
                        return Err(IdentityError::Several);
                    }
                    found = Some(Self::from_uri(uri)?);
                }
            }
        }
        found.ok_or(IdentityError::None)
    }

    /// `weft://<role>/<id>`, or `unverified`.
    pub fn uri(&self) -> String {
        match self {
            Self::Node(id) => format!("{SCHEME}node/{id}"),
            Self::Router(id) => format!("{SCHEME}router/{id}"),
            Self::Admin(name) => format!("{SCHEME}admin/{name}"),
            Self::Unverified => "unverified".into(),
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.uri())
    }
}

/// What a caller asks to do; node ids are the ones named in the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action<'a> {
    Join(&'a str),
    Heartbeat(&'a str),
    Leave(&'a str),
    Drain(&'a str),
    UpdateInterest(&'a str),
    /// GetState, Watch.
    ReadMetadata,
    /// AppendEntries, Vote, InstallSnapshot.
    Raft,
    /// A relay link whose `Hello` names this node.
    RelayHello(&'a str),
}

impl Action<'_> {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Join(_) => "Join",
            Self::Heartbeat(_) => "Heartbeat",
            Self::Leave(_) => "Leave",
            Self::Drain(_) => "Drain",
            Self::UpdateInterest(_) => "UpdateInterest",
            Self::ReadMetadata => "ReadMetadata",
            Self::Raft => "Raft",
            Self::RelayHello(_) => "RelayHello",
        }
    }
}

/// Whether `peer` may perform `action`. Pure: see [`authorize`] for the answer on the
/// wire.
pub fn permits(peer: &Peer, action: &Action<'_>) -> bool {
    use Action as A;
    match (peer, action) {
        (Peer::Unverified, _) => true,
        (_, A::ReadMetadata) => true,
        (Peer::Router(_), A::Raft) => true,
        (Peer::Admin(_), A::Drain(_)) => true,
        (
            Peer::Node(me),
            A::Join(id)
            | A::Heartbeat(id)
            | A::Leave(id)
            | A::Drain(id)
            | A::UpdateInterest(id)
            | A::RelayHello(id),
        ) => me == id,
        _ => false,
    }
}

/// Why a cluster caller was refused (the `reason` label of the routers'
/// `weft_router_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The TLS handshake failed: no client certificate, another CA, expired, or too
    /// slow.
    Handshake,
    /// The certificate names no single valid `weft://` identity.
    NoIdentity,
    /// A verified member asked for what it may not do ([`authorize`]).
    PermissionDenied,
    /// A request that did not come through a cluster listener ([`caller`]).
    Unauthenticated,
}

impl Refusal {
    pub const ALL: [Refusal; 4] = [
        Refusal::Handshake,
        Refusal::NoIdentity,
        Refusal::PermissionDenied,
        Refusal::Unauthenticated,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Handshake => "handshake",
            Refusal::NoIdentity => "no_identity",
            Refusal::PermissionDenied => "permission_denied",
            Refusal::Unauthenticated => "unauthenticated",
        }
    }
}

static REFUSED: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

pub(crate) fn count(reason: Refusal) {
    REFUSED[reason as usize].fetch_add(1, Ordering::Relaxed);
}

/// Cluster requests refused since the process started, for every reason (exported by
/// the node as `weft_cluster_refused_total`).
pub fn refusals() -> u64 {
    Refusal::ALL.iter().map(|r| refusals_for(*r)).sum()
}

/// Refusals for one reason since the process started.
pub fn refusals_for(reason: Refusal) -> u64 {
    REFUSED[reason as usize].load(Ordering::Relaxed)
}

/// Counts and logs a refusal at the edge (a handshake or an identity that did not
/// resolve); `what` says what was refused.
pub fn count_refusal(
    reason: Refusal,
    peer: &str,
    remote: Option<std::net::SocketAddr>,
    what: &str,
) {
    count(reason);
    tracing::warn!(peer, remote = ?remote, reason = reason.label(), "cluster: refused {what}");
}

/// [`permits`], answered as the gRPC status the caller gets: `PERMISSION_DENIED`,
/// logged with the caller's identity and counted.
pub fn authorize(peer: &Peer, action: &Action<'_>) -> Result<(), tonic::Status> {
    if permits(peer, action) {
        return Ok(());
    }
    count(Refusal::PermissionDenied);
    tracing::warn!(peer = %peer, action = ?action, "cluster: request refused");
    Err(tonic::Status::permission_denied(format!(
        "{peer} may not {}{}",
        action.name(),
        match action {
            Action::Join(id)
            | Action::Heartbeat(id)
            | Action::Leave(id)
            | Action::Drain(id)
            | Action::UpdateInterest(id)
            | Action::RelayHello(id) => format!(" as {id}"),
            Action::ReadMetadata | Action::Raft => String::new(),
        }
    )))
}

/// The caller of `req`, as resolved at its connection's handshake.
/// `UNAUTHENTICATED` when the request did not come through a cluster listener.
pub fn caller<T>(req: &tonic::Request<T>) -> Result<Peer, tonic::Status> {
    req.extensions()
        .get::<crate::tls::ClusterConn>()
        .map(|c| c.peer.clone())
        .ok_or_else(|| {
            count(Refusal::Unauthenticated);
            tonic::Status::unauthenticated("no cluster identity on this connection")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_into_roles_and_reject_garbage() {
        assert_eq!(
            Peer::from_uri("weft://node/n1").unwrap(),
            Peer::Node("n1".into())
        );
        assert_eq!(
            Peer::from_uri("weft://router/3").unwrap(),
            Peer::Router("3".into())
        );
        assert_eq!(
            Peer::from_uri("weft://admin/ops").unwrap(),
            Peer::Admin("ops".into())
        );
        for bad in [
            "weft://node/",
            "weft://node",
            "weft://king/n1",
            "http://node/n1",
            "weft://node/a/b",
            "weft://node/has space",
        ] {
            assert!(Peer::from_uri(bad).is_err(), "{bad}");
        }
        assert_eq!(Peer::Node("n1".into()).uri(), "weft://node/n1");
    }

    #[test]
    fn a_node_acts_only_as_itself() {
        let n1 = Peer::Node("n1".into());
        for a in [
            Action::Join("n1"),
            Action::Heartbeat("n1"),
            Action::Leave("n1"),
            Action::Drain("n1"),
            Action::UpdateInterest("n1"),
            Action::RelayHello("n1"),
            Action::ReadMetadata,
        ] {
            assert!(permits(&n1, &a), "{a:?}");
        }
        for a in [
            Action::Join("n2"),
            Action::Heartbeat("n2"),
            Action::Leave("n2"),
            Action::Drain("n2"),
            Action::UpdateInterest("n2"),
            Action::RelayHello("n2"),
            Action::Raft,
        ] {
            assert!(!permits(&n1, &a), "{a:?}");
        }
    }

    #[test]
    fn raft_only_from_routers_and_admins_only_drain() {
        let r = Peer::Router("1".into());
        let admin = Peer::Admin("ops".into());
        assert!(permits(&r, &Action::Raft));
        assert!(!permits(&r, &Action::Join("n1")));
        assert!(!permits(&admin, &Action::Raft));
        assert!(permits(&admin, &Action::Drain("n7")));
        assert!(!permits(&admin, &Action::Leave("n7")));
        assert!(!permits(&admin, &Action::RelayHello("n7")));
        assert!(permits(&Peer::Unverified, &Action::Raft));
    }

    #[test]
    fn refusals_are_permission_denied_and_counted() {
        let before = refusals();
        let denied = refusals_for(Refusal::PermissionDenied);
        let e = authorize(&Peer::Node("n1".into()), &Action::Drain("n2")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("weft://node/n1"), "{}", e.message());
        assert!(refusals() > before);
        assert!(refusals_for(Refusal::PermissionDenied) > denied);
    }
}
