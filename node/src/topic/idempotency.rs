//! A topic's idempotency window: which `Idempotency-Key` was first used for which
//! offset, and a digest of the request it came with, for as long as the key is in the
//! window (`history.idempotency_ttl_s`, at most `history.idempotency_max_keys` keys)
//! — whether or not the event is still in history.
//!
//! A key used again with the same event type and data replays the first result; with
//! another body it is a conflict (`422`, as the IETF idempotency-key draft asks). The
//! digest is the first 8 bytes of a SHA-256 over the type and the data, so it is the
//! same on every node and survives a handoff (`IdempotencyEntry.digest`). An entry
//! handed over without one (by a node that did not send it) falls back to comparing
//! with the event in history, while that is there.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The fingerprint of a publish's body: its event type and data.
pub fn body_digest(kind: Option<&str>, data: &[u8]) -> u64 {
    let mut h = Sha256::new();
    let kind = kind.unwrap_or("").as_bytes();
    h.update((kind.len() as u64).to_be_bytes());
    h.update(kind);
    h.update(data);
    let out = h.finalize();
    u64::from_be_bytes(out[..8].try_into().expect("a SHA-256 has 32 bytes"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyUse {
    pub offset: u64,
    /// `None` only for an entry handed over without a digest.
    pub digest: Option<u64>,
}

/// A topic's window. Most topics never see a key, so the tables are made on the first
/// one and given back when the window empties: an unused window is one pointer, not
/// the 80 bytes of an empty map and queue in every topic.
#[derive(Debug, Default)]
pub struct Idempotency {
    tables: Option<Box<Tables>>,
}

#[derive(Debug, Default)]
struct Tables {
    keys: HashMap<Box<str>, KeyUse>,
    /// Keys by first use, oldest first: expiry and the key cap pop from the front.
    order: VecDeque<(Instant, Box<str>)>,
}

impl Idempotency {
    /// Drops the keys past `ttl`, and the oldest ones while there are `max_keys` or
    /// more (so one more fits).
    pub fn expire(&mut self, now: Instant, ttl: Duration, max_keys: usize) {
        let Some(t) = self.tables.as_mut() else {
            return;
        };
        while let Some((at, _)) = t.order.front() {
            if now.duration_since(*at) <= ttl && t.order.len() < max_keys {
                break;
            }
            if let Some((_, key)) = t.order.pop_front() {
                t.keys.remove(&key);
            }
        }
        if t.order.is_empty() {
            self.tables = None;
        }
    }

    pub fn get(&self, key: &str) -> Option<KeyUse> {
        self.tables.as_ref()?.keys.get(key).copied()
    }

    /// Records `key`'s first use at `at`.
    pub fn insert(&mut self, key: &str, used: KeyUse, at: Instant) {
        let t = self.tables.get_or_insert_with(Box::default);
        if t.keys.insert(key.into(), used).is_none() {
            t.order.push_back((at, key.into()));
        }
    }

    /// Every key in the window, oldest first, with its first use.
    pub fn entries(&self) -> impl Iterator<Item = (&str, KeyUse, Instant)> + '_ {
        self.tables.iter().flat_map(|t| {
            t.order
                .iter()
                .filter_map(|(at, key)| t.keys.get(key).map(|k| (&**key, *k, *at)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_covers_type_and_data_and_is_stable() {
        let d = body_digest(None, b"{\"a\":1}");
        assert_eq!(d, body_digest(None, b"{\"a\":1}"));
        assert_ne!(d, body_digest(None, b"{\"a\":2}"));
        assert_ne!(d, body_digest(Some("t"), b"{\"a\":1}"));
        // The type's length is framed: type "ab" + data "c" is not type "a" + "bc".
        assert_ne!(body_digest(Some("ab"), b"c"), body_digest(Some("a"), b"bc"));
        // Fixed across builds and nodes (a handoff carries it).
        assert_eq!(body_digest(None, b""), 0xaf5570f5a1810b7a);
    }

    #[test]
    fn the_window_keeps_first_uses_in_order_and_expires_the_oldest() {
        let mut w = Idempotency::default();
        let t0 = Instant::now();
        for (i, k) in ["a", "b", "c"].into_iter().enumerate() {
            let used = KeyUse {
                offset: i as u64 + 1,
                digest: Some(i as u64),
            };
            w.insert(k, used, t0 + Duration::from_secs(i as u64));
        }
        let keys: Vec<&str> = w.entries().map(|(k, _, _)| k).collect();
        assert_eq!(keys, ["a", "b", "c"]);
        w.expire(t0 + Duration::from_secs(2), Duration::from_secs(60), 3);
        assert!(w.get("a").is_none(), "at the cap, the oldest goes");
        w.expire(t0 + Duration::from_secs(62), Duration::from_secs(60), 10);
        assert!(w.get("b").is_none(), "past the ttl");
        assert_eq!(
            w.get("c"),
            Some(KeyUse {
                offset: 3,
                digest: Some(2)
            })
        );
        w.expire(t0 + Duration::from_secs(63), Duration::from_secs(60), 10);
        assert!(w.tables.is_none(), "an empty window gives its tables back");
    }
}
