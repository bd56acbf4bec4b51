//! API keys for backends: `[[auth.api_keys]]` stores the hex SHA-256 of each key, never
//! the key. A presented key is hashed once and compared with every configured hash in
//! constant time, so neither the key nor which entry matched leaks through timing.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use weft_proto::Pattern;

use super::{compile_patterns, SharedBucket};
use crate::config::{ApiKeyConfig, Limits};

#[derive(Debug)]
pub struct ApiKey {
    pub name: Arc<str>,
    hash: [u8; 32],
    pub publish: Vec<Pattern>,
    pub subscribe: Vec<Pattern>,
    pub admin: bool,
    /// Publishes through this key, all its requests together.
    publishes: SharedBucket,
    /// Reads opened through this key (subscribes, watches, polls, GETs), all its
    /// sessions and requests together.
    subscribes: SharedBucket,
}

impl ApiKey {
    pub fn allow_publish(&self) -> bool {
        self.publishes.allow()
    }

    pub fn allow_subscribe(&self) -> bool {
        self.subscribes.allow()
    }
}

/// A key's own rate (burst twice that) when it names one, else the node's default.
fn bucket(own: u32, default_rate: u32, default_burst: u32) -> SharedBucket {
    if own > 0 {
        SharedBucket::new(own, own.saturating_mul(2))
    } else {
        SharedBucket::new(default_rate, default_burst)
    }
}

#[derive(Debug, Default)]
pub struct ApiKeys(Vec<Arc<ApiKey>>);

impl ApiKeys {
    /// Keys from validated configuration (the hashes are known to be 64 hex digits).
    pub fn new(config: &[ApiKeyConfig], limits: &Limits) -> Self {
        Self(
            config
                .iter()
                .filter_map(|k| {
                    let hash = decode_hex32(&k.sha256)?;
                    Some(Arc::new(ApiKey {
                        name: k.name.as_str().into(),
                        hash,
                        publish: compile_patterns(&k.publish, None),
                        subscribe: compile_patterns(&k.subscribe, None),
                        admin: k.admin,
                        publishes: bucket(
                            k.publishes_per_s,
                            limits.api_key_publishes_per_s,
                            limits.api_key_publish_burst,
                        ),
                        subscribes: bucket(
                            k.subscribes_per_s,
                            limits.api_key_subscribes_per_s,
                            limits.api_key_subscribe_burst,
                        ),
                    }))
                })
                .collect(),
        )
    }

    /// The key whose hash matches `presented`, comparing against every entry.
    pub fn find(&self, presented: &str) -> Option<Arc<ApiKey>> {
        if self.0.is_empty() {
            return None;
        }
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for k in &self.0 {
            if constant_time_eq(&digest, &k.hash) {
                found = Some(k.clone());
            }
        }
        found
    }
}

/// Compares two digests without an early exit.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn decode_hex32(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// The hex SHA-256 of a key, as `[[auth.api_keys]] sha256` wants it.
pub fn sha256_hex(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_key_by_its_hash_only() {
        let cfg = vec![
            ApiKeyConfig {
                name: "billing".into(),
                sha256: sha256_hex("k-billing"),
                publish: vec!["orders.>".into()],
                ..Default::default()
            },
            ApiKeyConfig {
                name: "ops".into(),
                sha256: sha256_hex("k-ops").to_uppercase(),
                admin: true,
                ..Default::default()
            },
        ];
        let keys = ApiKeys::new(&cfg, &Limits::default());
        let k = keys.find("k-billing").unwrap();
        assert_eq!(&*k.name, "billing");
        assert!(k.publish[0].matches("orders.new"));
        assert!(
            keys.find("k-ops").unwrap().admin,
            "upper-case hex works too"
        );
        assert!(keys.find("k-billin").is_none());
        assert!(
            keys.find(&sha256_hex("k-billing")).is_none(),
            "the hash is not the key"
        );
    }

    #[test]
    fn hex_and_compare() {
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(decode_hex32("zz").is_none());
        assert!(decode_hex32(&"g".repeat(64)).is_none());
        let a = decode_hex32(&sha256_hex("abc")).unwrap();
        let mut b = a;
        assert!(constant_time_eq(&a, &b));
        b[31] ^= 1;
        assert!(!constant_time_eq(&a, &b));
    }
}
