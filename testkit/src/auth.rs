//! Client-security fixtures shared by the tests that need a secured node: one HS256
//! secret, issuer and audience, an admin key and a harness key, the configuration
//! that uses them, and real tokens signed for them (jsonwebtoken). Tests add what is
//! theirs (more keys, namespaces, public keys, origins) on top.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use weft_node::auth::apikey::sha256_hex;
use weft_node::config::{ApiKeyConfig, Secret};
use weft_node::Config;

use crate::TestNode;

/// The HS256 secret of [`secure`]; tokens from [`hs256`] are signed with it.
pub const SECRET: &str = "testkit-hs256-secret-testkit-hs256!";
pub const ISSUER: &str = "https://idp.test/";
pub const AUDIENCE: &str = "weft";
/// An API key with `admin = true` (and nothing else).
pub const ADMIN_KEY: &str = "admin-key-testkit-0123456789";
/// An API key that may publish and read every topic: the harness's own calls.
pub const HARNESS_KEY: &str = "harness-key-testkit-0123456789";

/// Unix seconds now.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `claims` signed HS256 with [`SECRET`].
pub fn hs256(claims: &Value) -> String {
    sign_hs256(claims, SECRET)
}

/// `claims` signed HS256 with another secret.
pub fn sign_hs256(claims: &Value, secret: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// A user's claims for [`secure`]'s issuer and audience, expiring `exp_in` seconds
/// from now (negative: already expired), reading `read` and publishing `publish`
/// (DESIGN §6 patterns), with presence.
pub fn claims(sub: &str, exp_in: i64, read: &[&str], publish: &[&str]) -> Value {
    json!({
        "sub": sub,
        "exp": now() as i64 + exp_in,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "weft": {"sub": read, "pub": publish, "presence": true},
    })
}

/// An `[[auth.api_keys]]` entry for `key` (stored as its SHA-256, as operators do).
pub fn api_key(
    name: &str,
    key: &str,
    publish: &[&str],
    subscribe: &[&str],
    admin: bool,
) -> ApiKeyConfig {
    let patterns = |p: &[&str]| p.iter().map(|s| s.to_string()).collect();
    ApiKeyConfig {
        name: name.into(),
        sha256: sha256_hex(key),
        publish: patterns(publish),
        subscribe: patterns(subscribe),
        admin,
        ..Default::default()
    }
}

/// HS256 with [`SECRET`], [`ISSUER`] and [`AUDIENCE`] and no leeway; the admin key
/// (`ops`) and the harness key (`harness`).
pub fn secure(c: &mut Config) {
    c.auth.hmac_secret = Secret::new(SECRET);
    c.auth.issuer = Some(ISSUER.into());
    c.auth.audience = Some(AUDIENCE.into());
    c.auth.leeway_s = 0;
    c.auth.api_keys = vec![
        api_key("ops", ADMIN_KEY, &[], &[], true),
        api_key("harness", HARNESS_KEY, &[">"], &[">"], false),
    ];
}

/// A node configured by [`secure`] and then `f`, whose harness calls
/// ([`TestNode::publish`], [`TestNode::state`], …) authenticate with [`HARNESS_KEY`].
pub async fn secured_node(f: impl FnOnce(&mut Config)) -> TestNode {
    let mut node = TestNode::start_with(|c| {
        secure(c);
        f(c);
    })
    .await;
    node.credential = Some(HARNESS_KEY.into());
    node
}
