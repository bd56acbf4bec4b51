//! The ring: topic → slot → owner (DESIGN §5).
//!
//! Two steps, both pure and deterministic across processes, platforms and releases:
//!
//! ```text
//! topic ──seeded FNV-1a + fmix64──► hash % SLOTS ──► slot ──SlotTable.owners[slot]──► node
//! ```
//!
//! The [`SlotTable`] is computed from the *active* members with `hashring` over
//! [`VNODES_PER_NODE`] virtual nodes per member. Virtual-node keys are fixed-width byte
//! strings hashed with [`SeededHasher`] (never `std`'s randomly seeded hasher, and never
//! `Hash` of a `usize`, whose width depends on the platform), so every process that
//! sees the same members computes the same table, and a membership change moves only
//! the slots whose ring neighbour changed (about `1/n` of them when an n-th node joins).
//!
//! The table is committed through Raft with a version; nodes use the committed table
//! rather than recomputing it, so "same version ⇒ same owner" holds even if this
//! algorithm changes in a later release.

use std::hash::{BuildHasher, Hash, Hasher};

use hashring::HashRing;
use serde::{Deserialize, Serialize};

/// Identity of an edge node (its `--node-id`).
pub type NodeId = String;

/// Fixed number of slots. Changing it re-maps every topic: it is part of the contract.
pub const SLOTS: u32 = 4096;

/// Virtual nodes per member on the ring: enough that 3–10 members get within a few
/// percent of an even share of the slots.
pub const VNODES_PER_NODE: u32 = 128;

/// Seed of every ring hash. Changing it re-maps every topic.
const SEED: u64 = 0x5745_4654_5249_4e47; // "WEFTRING"

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Seeded 64-bit FNV-1a with a murmur3 `fmix64` finaliser (FNV alone clusters inputs
/// that differ only in their last bytes, which virtual-node keys do).
#[derive(Debug, Clone)]
pub struct SeededHasher {
    state: u64,
}

impl Default for SeededHasher {
    fn default() -> Self {
        Self {
            state: FNV_OFFSET ^ SEED,
        }
    }
}

impl Hasher for SeededHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.state ^= u64::from(b);
            self.state = self.state.wrapping_mul(FNV_PRIME);
        }
    }

    fn finish(&self) -> u64 {
        fmix64(self.state)
    }
}

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// Builds [`SeededHasher`]s for `hashring`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SeededBuildHasher;

impl BuildHasher for SeededBuildHasher {
    type Hasher = SeededHasher;
    fn build_hasher(&self) -> SeededHasher {
        SeededHasher::default()
    }
}

/// The stable hash of a topic name.
pub fn topic_hash(topic: &str) -> u64 {
    let mut h = SeededHasher::default();
    h.write(topic.as_bytes());
    h.finish()
}

/// The slot of a topic, in `0..SLOTS`.
pub fn slot_of(topic: &str) -> u32 {
    (topic_hash(topic) % u64::from(SLOTS)) as u32
}

/// One virtual node: hashed as `len(id) as u32 BE ‖ id ‖ replica as u32 BE`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct VNode<'a> {
    node: &'a str,
    replica: u32,
}

impl Hash for VNode<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(&(self.node.len() as u32).to_be_bytes());
        state.write(self.node.as_bytes());
        state.write(&self.replica.to_be_bytes());
    }
}

/// A ring lookup key: a slot number as 8 fixed big-endian bytes.
struct SlotKey(u32);

impl Hash for SlotKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(b"slot");
        state.write(&u64::from(self.0).to_be_bytes());
    }
}

/// Which node owns each slot, at a version. `owners` is empty when no member is active.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SlotTable {
    /// Bumped by the router each time the active set changes.
    pub version: u64,
    /// `owners[slot]`; either empty or exactly [`SLOTS`] long.
    pub owners: Vec<NodeId>,
}

impl SlotTable {
    /// Computes the owners for `active` (order and duplicates do not matter).
    pub fn compute<'a>(version: u64, active: impl IntoIterator<Item = &'a str>) -> Self {
        let mut members: Vec<&str> = active.into_iter().collect();
        members.sort_unstable();
        members.dedup();
        if members.is_empty() {
            return Self {
                version,
                owners: Vec::new(),
            };
        }
        let mut ring = HashRing::with_hasher(SeededBuildHasher);
        // Sorted input keeps the (stable) sort of equal ring keys deterministic.
        ring.batch_add(
            members
                .iter()
                .flat_map(|&node| (0..VNODES_PER_NODE).map(move |replica| VNode { node, replica }))
                .collect(),
        );
        let owners = (0..SLOTS)
            .map(|slot| {
                ring.get(&SlotKey(slot))
                    .map(|v| v.node.to_owned())
                    .unwrap_or_default()
            })
            .collect();
        Self { version, owners }
    }

    /// The owner of `topic`, if any member is active.
    pub fn owner(&self, topic: &str) -> Option<&str> {
        self.owners
            .get(slot_of(topic) as usize)
            .map(String::as_str)
            .filter(|o| !o.is_empty())
    }

    /// Slots owned per node, for `/v1/cluster` and logs.
    pub fn slots_per_node(&self) -> std::collections::BTreeMap<&str, usize> {
        let mut m = std::collections::BTreeMap::new();
        for o in &self.owners {
            *m.entry(o.as_str()).or_insert(0) += 1;
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("chat.room-{i}")).collect()
    }

    #[test]
    fn topic_hash_is_a_fixed_function() {
        // Pinned values: a change here re-maps every topic in every deployed cluster.
        assert_eq!(slot_of("a"), slot_of("a"));
        let pinned: Vec<u32> = ["a", "chat.room-1", "prices.EURUSD"]
            .iter()
            .map(|t| slot_of(t))
            .collect();
        let again: Vec<u32> = ["a", "chat.room-1", "prices.EURUSD"]
            .iter()
            .map(|t| (topic_hash(t) % 4096) as u32)
            .collect();
        assert_eq!(pinned, again);
        assert_eq!(pinned, [2111, 597, 3447]);
        assert_eq!(topic_hash(""), fmix64(FNV_OFFSET ^ SEED));
        assert_ne!(topic_hash("ab"), topic_hash("ba"));
    }

    #[test]
    fn slots_spread_over_the_whole_range() {
        let mut seen = vec![0u32; SLOTS as usize];
        for t in topics(100_000) {
            seen[slot_of(&t) as usize] += 1;
        }
        let empty = seen.iter().filter(|&&c| c == 0).count();
        assert_eq!(empty, 0, "100k topics should touch every one of 4096 slots");
    }

    #[test]
    fn same_members_same_owners_whatever_the_order() {
        let a = SlotTable::compute(1, ["n1", "n2", "n3"]);
        let b = SlotTable::compute(1, ["n3", "n1", "n2", "n1"]);
        assert_eq!(a, b);
        assert_eq!(a.owners.len(), SLOTS as usize);
        for t in topics(1000) {
            let o = a.owner(&t).expect("owner");
            assert_eq!(Some(o), b.owner(&t));
            assert_eq!(
                Some(o),
                SlotTable::compute(1, ["n2", "n3", "n1"]).owner(&t),
                "recomputing names the same owner"
            );
        }
    }

    #[test]
    fn table_is_pinned_across_processes() {
        // A digest of the whole table for a fixed member set: if this changes, nodes of
        // different builds would disagree on owners.
        let t = SlotTable::compute(7, ["node-a", "node-b", "node-c"]);
        let mut h = SeededHasher::default();
        for o in &t.owners {
            h.write(o.as_bytes());
        }
        let digest = h.finish();
        assert_eq!(digest, 0x4eec_ac72_6848_2286);
        let again = SlotTable::compute(7, ["node-c", "node-b", "node-a"]);
        let mut h2 = SeededHasher::default();
        for o in &again.owners {
            h2.write(o.as_bytes());
        }
        assert_eq!(digest, h2.finish());
    }

    #[test]
    fn load_is_roughly_even() {
        let t = SlotTable::compute(1, ["n1", "n2", "n3"]);
        for (node, n) in t.slots_per_node() {
            let share = n as f64 / f64::from(SLOTS);
            assert!((0.25..0.42).contains(&share), "{node} has {share}");
        }
    }

    #[test]
    fn adding_a_fourth_node_moves_about_a_quarter_and_only_to_it() {
        let three = SlotTable::compute(1, ["n1", "n2", "n3"]);
        let four = SlotTable::compute(2, ["n1", "n2", "n3", "n4"]);
        let mut moved = 0;
        for (a, b) in three.owners.iter().zip(&four.owners) {
            if a != b {
                moved += 1;
                assert_eq!(b, "n4", "a slot moved between old nodes");
            }
        }
        let share = f64::from(moved) / f64::from(SLOTS);
        assert!((0.18..=0.32).contains(&share), "moved {share}");
        // Per topic, as a node would see it.
        let moved_topics = topics(1000)
            .iter()
            .filter(|t| three.owner(t) != four.owner(t))
            .count();
        assert!((150..=350).contains(&moved_topics), "{moved_topics}");
    }

    #[test]
    fn removing_a_node_moves_only_its_slots() {
        let four = SlotTable::compute(1, ["n1", "n2", "n3", "n4"]);
        let three = SlotTable::compute(2, ["n1", "n2", "n4"]);
        for (a, b) in four.owners.iter().zip(&three.owners) {
            if a != "n3" {
                assert_eq!(a, b, "a slot not owned by the removed node moved");
            } else {
                assert_ne!(b, "n3");
            }
        }
    }

    #[test]
    fn no_members_no_owner() {
        let t = SlotTable::compute(3, std::iter::empty());
        assert!(t.owners.is_empty());
        assert_eq!(t.owner("x"), None);
        assert_eq!(t.version, 3);
    }
}
