//! Who a client is and what it may do: the one place every transport asks.
//!
//! ```text
//!  request ─► credentials (Authorization: Bearer | ?token= | cookie | WS connect)
//!               │
//!               ├─ API key?  sha256(key) compared in constant time with [[auth.api_keys]]
//!               └─ JWT?      signature (HS256 | RS256 | ES256 | EdDSA | JWKS by kid),
//!                            exp / nbf (with leeway), iss, aud, revocation
//!               ▼
//!            Caller (resolved once, at the edge) ─► Auth::check(caller, Op) ─► ok | 401 | 403
//! ```
//!
//! Rules:
//! - A presented credential that does not verify is refused (`401`), even where
//!   anonymous access is allowed: a client never silently falls back to anonymous.
//! - With no authentication configured the node is in **development mode**: anonymous
//!   callers may do everything a client can, and admin routes answer loopback callers
//!   that are not a browser page of another site (no `Origin` header).
//! - A JWT caller's rights are its `weft` claim: `sub` patterns (read: subscribe,
//!   history, state, long-poll, presence), `pub` patterns (publish), `presence`.
//!   `{sub}` in a pattern expands to the token's subject (only when the subject is a
//!   single topic segment, so a crafted subject cannot widen a pattern).
//! - Refusals are counted by reason (`weft_auth_refusals_total{reason}`); a token or a
//!   key never appears in a log line or an error body.

pub mod apikey;
pub mod credentials;
pub mod edge;
pub mod jwt;
pub mod mint;
pub mod origin;
pub mod revoke;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use weft_proto::Pattern;

use crate::config::Config;
use crate::error::ApiError;
use crate::rate::TokenBucket;

pub use credentials::Credential;

/// The resolved identity of one request or session.
#[derive(Debug, Clone)]
pub enum Caller {
    /// No credentials; allowed only in development mode or with
    /// `auth.allow_anonymous`.
    Anonymous,
    /// A verified client token.
    User(Arc<User>),
    /// A backend's API key.
    Key(Arc<apikey::ApiKey>),
}

/// A verified JWT's subject, rights and lifetime.
#[derive(Debug)]
pub struct User {
    pub sub: Arc<str>,
    pub jti: Option<String>,
    /// When the token stops being valid (its `exp`).
    pub expires: SystemTime,
    pub subscribe: Vec<Pattern>,
    pub publish: Vec<Pattern>,
    pub presence: bool,
}

impl Caller {
    /// The user name shown in presence, if any.
    pub fn user(&self) -> Option<Arc<str>> {
        match self {
            Caller::User(u) => Some(u.sub.clone()),
            Caller::Key(k) => Some(k.name.clone()),
            Caller::Anonymous => None,
        }
    }

    pub fn expires(&self) -> Option<SystemTime> {
        match self {
            Caller::User(u) => Some(u.expires),
            _ => None,
        }
    }
}

/// What a caller asks to do.
#[derive(Debug, Clone, Copy)]
pub enum Op<'a> {
    /// Subscribe, history, state, long-poll: anything that reads a topic.
    Read(&'a str),
    Publish(&'a str),
    Presence(&'a str),
    /// `/v1/admin/*`, and `/v1/cluster` unless it is public.
    Admin,
}

/// Why a request was refused, as counted in `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Missing,
    Invalid,
    Expired,
    Revoked,
    Forbidden,
    Origin,
    RateLimited,
    /// A user token at a node that has just started and not yet heard its peers'
    /// revocations (503).
    Starting,
}

impl Refusal {
    pub const ALL: [Refusal; 8] = [
        Refusal::Missing,
        Refusal::Invalid,
        Refusal::Expired,
        Refusal::Revoked,
        Refusal::Forbidden,
        Refusal::Origin,
        Refusal::RateLimited,
        Refusal::Starting,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Invalid => "invalid",
            Refusal::Expired => "expired",
            Refusal::Revoked => "revoked",
            Refusal::Forbidden => "forbidden",
            Refusal::Origin => "origin",
            Refusal::RateLimited => "rate_limited",
            Refusal::Starting => "starting",
        }
    }
}

pub struct Auth {
    dev_mode: bool,
    anonymous: bool,
    jwt: jwt::Verifier,
    keys: apikey::ApiKeys,
    pub origins: origin::OriginPolicy,
    pub cookie: Option<String>,
    pub revocations: revoke::Revocations,
    /// Bumped on every revocation so live sessions re-check themselves.
    revoked_gen: watch::Sender<u64>,
    /// True while a cluster node that has just started waits for its peers'
    /// revocations (`cluster::relay::revocations`): user tokens get 503 meanwhile.
    revocations_held: AtomicBool,
    /// Open sessions per user (`sub`), for `limits.max_connections_per_user`.
    users: Mutex<HashMap<Arc<str>, usize>>,
    max_per_user: usize,
    public_cluster_view: bool,
    node_id: String,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("dev_mode", &self.dev_mode)
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// Builds the verifier from the configuration, reading key files now so a bad key
    /// is a start-up error, not a refused client later.
    pub fn new(config: &Config) -> Result<Self, String> {
        let a = &config.auth;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let keys = apikey::ApiKeys::new(&a.api_keys, &config.limits);
        // Every reason's series exists from the start, so rates work from zero.
        for reason in Refusal::ALL {
            metrics::counter!("weft_auth_refusals_total", "node" => config.node_id.clone(), "reason" => reason.label())
                .increment(0);
        }
        Ok(Self {
            dev_mode: !a.is_configured(),
            anonymous: a.anonymous_allowed(),
            jwt: jwt::Verifier::new(a)?,
            keys,
            origins: origin::OriginPolicy::new(&config.http.allowed_origins, !a.is_configured()),
            cookie: a.cookie.clone(),
            revocations: revoke::Revocations::new(100_000),
            revoked_gen: watch::channel(0).0,
            revocations_held: AtomicBool::new(false),
            users: Mutex::new(HashMap::new()),
            max_per_user: config.limits.max_connections_per_user,
            public_cluster_view: config.ops.public_cluster_view,
            node_id: config.node_id.clone(),
        })
    }

    /// Counts one refusal in `weft_auth_refusals_total{reason}`.
    pub fn count(&self, reason: Refusal) {
        metrics::counter!("weft_auth_refusals_total", "node" => self.node_id.clone(), "reason" => reason.label())
            .increment(1);
    }

    /// Development mode: no authentication configured.
    pub fn dev_mode(&self) -> bool {
        self.dev_mode
    }

    /// Whether clients without credentials are let in.
    pub fn anonymous_allowed(&self) -> bool {
        self.anonymous
    }

    pub fn public_cluster_view(&self) -> bool {
        self.public_cluster_view
    }

    /// Starts the JWKS refresher, if a JWKS source is configured.
    pub fn spawn_refresh(self: &Arc<Self>) {
        self.jwt.spawn_refresh();
    }

    /// Resolves a presented credential into a caller, or `401` when it does not
    /// verify. (A request without one is decided at the edge: anonymous where allowed.)
    pub async fn resolve(&self, cred: Credential<'_>) -> Result<Caller, (Refusal, ApiError)> {
        let secret = cred.secret();
        if let Some(key) = self.keys.find(secret) {
            return Ok(Caller::Key(key));
        }
        if self.revocations_held() && jwt::looks_like_jwt(secret) {
            return Err((
                Refusal::Starting,
                ApiError::Unavailable {
                    message: "this node has just started and is still hearing its peers' revocations; retry".into(),
                    retry_after_s: 1,
                },
            ));
        }
        if !jwt::looks_like_jwt(secret) {
            return Err((
                Refusal::Invalid,
                ApiError::Unauthorized("unknown API key or malformed token".into()),
            ));
        }
        let user = self.jwt.verify(secret).await.map_err(|e| match e {
            jwt::JwtError::Expired => (
                Refusal::Expired,
                ApiError::Unauthorized("token expired".into()),
            ),
            jwt::JwtError::Invalid(why) => (
                Refusal::Invalid,
                ApiError::Unauthorized(format!("invalid token: {why}")),
            ),
        })?;
        if self.revocations.is_revoked(&user.sub, user.jti.as_deref()) {
            return Err((
                Refusal::Revoked,
                ApiError::Unauthorized("token revoked".into()),
            ));
        }
        Ok(Caller::User(Arc::new(user)))
    }

    /// Whether `caller` may do `op`; `401`/`403` with the reason when not.
    /// `namespace_client_publish` is the namespace's `client_publish` rule, which
    /// binds clients (tokens and anonymous sessions) but not backends' API keys.
    pub fn check(
        &self,
        caller: &Caller,
        op: Op<'_>,
        namespace_client_publish: bool,
    ) -> Result<(), (Refusal, ApiError)> {
        let forbidden = |what: String| (Refusal::Forbidden, ApiError::Forbidden(what));
        match (caller, op) {
            (Caller::Anonymous, Op::Admin) => {
                if self.dev_mode {
                    Ok(())
                } else {
                    Err(missing())
                }
            }
            (Caller::Anonymous, _) if !self.anonymous => Err(missing()),
            (Caller::Anonymous, Op::Publish(topic)) if !namespace_client_publish => Err(forbidden(
                format!("clients may not publish to the namespace of `{topic}`"),
            )),
            (Caller::Anonymous, _) => Ok(()),
            (Caller::User(_), Op::Admin) => {
                Err(forbidden("admin routes need an admin API key".into()))
            }
            (Caller::User(u), Op::Read(topic)) => allowed(&u.subscribe, topic)
                .then_some(())
                .ok_or_else(|| forbidden(format!("this token may not read `{topic}`"))),
            (Caller::User(u), Op::Presence(topic)) => (u.presence && allowed(&u.subscribe, topic))
                .then_some(())
                .ok_or_else(|| forbidden(format!("this token may not see presence of `{topic}`"))),
            (Caller::User(u), Op::Publish(topic)) => {
                if !namespace_client_publish {
                    return Err(forbidden(format!(
                        "clients may not publish to the namespace of `{topic}`"
                    )));
                }
                allowed(&u.publish, topic)
                    .then_some(())
                    .ok_or_else(|| forbidden(format!("this token may not publish to `{topic}`")))
            }
            (Caller::Key(k), Op::Admin) => k
                .admin
                .then_some(())
                .ok_or_else(|| forbidden(format!("API key `{}` is not an admin key", k.name))),
            (Caller::Key(k), Op::Read(topic) | Op::Presence(topic)) => allowed(&k.subscribe, topic)
                .then_some(())
                .ok_or_else(|| forbidden(format!("API key `{}` may not read `{topic}`", k.name))),
            (Caller::Key(k), Op::Publish(topic)) => {
                if !allowed(&k.publish, topic) {
                    return Err(forbidden(format!(
                        "API key `{}` may not publish to `{topic}`",
                        k.name
                    )));
                }
                if !k.allow_publish() {
                    return Err((
                        Refusal::RateLimited,
                        ApiError::RateLimited {
                            message: format!("API key `{}` is over its publish rate", k.name),
                            retry_after_s: 1,
                        },
                    ));
                }
                Ok(())
            }
        }
    }

    /// Whether `caller` may open one more read now: an API key is held to its
    /// subscribe rate (all its sessions and requests together); users and anonymous
    /// sessions are held per session and per address instead.
    pub fn admit_subscribe(&self, caller: &Caller) -> Result<(), (Refusal, ApiError)> {
        match caller {
            Caller::Key(k) if !k.allow_subscribe() => Err((
                Refusal::RateLimited,
                ApiError::RateLimited {
                    message: format!("API key `{}` is over its subscribe rate", k.name),
                    retry_after_s: 1,
                },
            )),
            _ => Ok(()),
        }
    }

    /// Takes one of a user's session places (`limits.max_connections_per_user`);
    /// the guard frees it. Anonymous callers and API keys are bounded per address.
    pub fn admit_user(self: &Arc<Self>, caller: &Caller) -> Result<Option<UserGuard>, ApiError> {
        let Caller::User(u) = caller else {
            return Ok(None);
        };
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        let open = users.entry(u.sub.clone()).or_insert(0);
        if *open >= self.max_per_user {
            return Err(ApiError::RateLimited {
                message: format!("at most {} sessions per user", self.max_per_user),
                retry_after_s: 5,
            });
        }
        *open += 1;
        Ok(Some(UserGuard {
            auth: self.clone(),
            sub: u.sub.clone(),
        }))
    }

    /// Revokes a subject or a token id until `until`; live sessions of the caller
    /// are told through [`Auth::session_notices`].
    pub fn revoke(&self, target: revoke::Target, until: SystemTime) -> Result<(), ApiError> {
        self.revocations.add(target, until)?;
        self.revoked_gen.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Holds user tokens back (503) until [`Self::release_revocation_hold`]: a cluster
    /// node calls this before it serves, when it verifies tokens at all.
    pub fn hold_until_revocations_heard(&self) {
        if self.jwt.is_enabled() {
            self.revocations_held.store(true, Ordering::Release);
        }
    }

    pub fn revocations_held(&self) -> bool {
        self.revocations_held.load(Ordering::Acquire)
    }

    /// Ends the hold; true if there was one.
    pub fn release_revocation_hold(&self) -> bool {
        self.revocations_held.swap(false, Ordering::AcqRel)
    }

    /// Keeps revocations in `path` across restarts ([`revoke::Revocations::persist_to`]).
    pub fn persist_revocations(&self, path: &std::path::Path) -> Result<usize, String> {
        let n = self.revocations.persist_to(path)?;
        if n > 0 {
            self.revoked_gen.send_modify(|g| *g += 1);
        }
        Ok(n)
    }

    /// Every revocation still in force (a peer that links up hears them all).
    pub fn revocations(&self) -> Vec<(revoke::Target, SystemTime)> {
        self.revocations.active()
    }

    /// Changes whenever live sessions must re-check themselves: something was revoked
    /// (a session then asks [`Auth::still_valid`]), or the node began to shut down
    /// ([`Self::notify_sessions`]). A WebSocket session waits on this one watch for
    /// both.
    pub fn session_notices(&self) -> watch::Receiver<u64> {
        self.revoked_gen.subscribe()
    }

    /// Tells every session waiting on [`Self::session_notices`] to re-check itself.
    pub fn notify_sessions(&self) {
        self.revoked_gen.send_modify(|g| *g += 1);
    }

    /// Whether a live session's caller may go on: not revoked (expiry is timed by the
    /// session itself).
    pub fn still_valid(&self, caller: &Caller) -> bool {
        match caller {
            Caller::User(u) => !self.revocations.is_revoked(&u.sub, u.jti.as_deref()),
            _ => true,
        }
    }
}

/// One user session's place; dropping it frees the place.
pub struct UserGuard {
    auth: Arc<Auth>,
    sub: Arc<str>,
}

impl Drop for UserGuard {
    fn drop(&mut self) {
        let mut users = self.auth.users.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = users.get_mut(&self.sub) {
            *n -= 1;
            if *n == 0 {
                users.remove(&self.sub);
            }
        }
    }
}

pub(crate) fn missing() -> (Refusal, ApiError) {
    (
        Refusal::Missing,
        ApiError::Unauthorized(
            "credentials required: Authorization: Bearer <token or API key>, ?token=, or the WebSocket connect command".into(),
        ),
    )
}

fn allowed(patterns: &[Pattern], topic: &str) -> bool {
    patterns.iter().any(|p| p.matches(topic))
}

/// Compiles a claim's or key's patterns, expanding `{sub}` to `subject` where the
/// subject is one plain segment; a pattern that does not compile grants nothing.
pub fn compile_patterns(patterns: &[String], subject: Option<&str>) -> Vec<Pattern> {
    let plain_subject = subject.filter(|s| {
        !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| weft_proto::topic::is_topic_byte(b) && b != b'.')
    });
    patterns
        .iter()
        .filter_map(|p| {
            if p.contains("{sub}") {
                plain_subject.and_then(|s| Pattern::parse(&p.replace("{sub}", s)).ok())
            } else {
                Pattern::parse(p).ok()
            }
        })
        .collect()
}

/// How long before expiry a WebSocket session is told to refresh.
pub const EXPIRING_NOTICE: Duration = Duration::from_secs(30);

/// A token bucket behind a mutex, shared by every request of one API key.
#[derive(Debug)]
pub struct SharedBucket(Mutex<TokenBucket>);

impl SharedBucket {
    pub fn new(rate: u32, burst: u32) -> Self {
        Self(Mutex::new(TokenBucket::new(rate, burst)))
    }
    pub fn allow(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).allow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_expands_only_as_one_plain_segment() {
        let p = compile_patterns(&["user.{sub}.>".into(), "public.*".into()], Some("alice"));
        assert!(allowed(&p, "user.alice.inbox"));
        assert!(!allowed(&p, "user.bob.inbox"));
        assert!(allowed(&p, "public.news"));
        // A subject with a dot or a wildcard would widen the pattern: dropped.
        for evil in ["a.>", "*", ">", "a b", ""] {
            let p = compile_patterns(&["user.{sub}.>".into()], Some(evil));
            assert!(p.is_empty(), "{evil:?} expanded to {p:?}");
        }
        assert!(compile_patterns(&["user.{sub}".into()], None).is_empty());
        assert!(compile_patterns(&["bad..pattern".into()], None).is_empty());
    }
}
