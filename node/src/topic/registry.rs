//! The topics this node holds — owned, mirrored or receiving (see [`Placement`]): a
//! sharded map from name to [`Topic`], namespace policy lookup, the global history
//! budget and the sweeper that keeps all of it bounded.
//!
//! Lock order: a shard's map lock, then a topic's lock — never the reverse. A topic is
//! forgotten only under both (marked dead, then removed), and every operation that
//! finds a dead topic looks it up again, so no subscriber can attach to a topic that
//! no longer receives publishes.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weft_proto::Pattern;

use crate::config::{Config, NamespaceConfig};
use crate::error::ApiError;
use crate::topic::fanout::FanOutShared;
use crate::topic::interest::InterestFeed;
use crate::topic::{Dead, HistoryBudget, Placement, Topic};

/// Where a topic a node does not hold yet belongs (cluster mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    Here,
    /// Another node owns it: hold it as a mirror.
    Remote(Arc<str>),
    /// Owned here once this node (the old owner) hands its state over.
    Incoming(Arc<str>),
}

pub type PlaceFn = Arc<dyn Fn(&str) -> Place + Send + Sync>;

const SHARDS: usize = 64;

type Shard = Mutex<HashMap<Arc<str>, Arc<Topic>>>;

/// Namespace policies, first match wins, defaults last.
#[derive(Debug)]
pub struct Namespaces {
    rules: Vec<(Pattern, Arc<NamespaceConfig>)>,
    fallback: Arc<NamespaceConfig>,
}

impl Namespaces {
    pub fn new(configs: &[NamespaceConfig]) -> Self {
        Self {
            rules: configs
                .iter()
                .filter_map(|c| {
                    Pattern::parse(&c.pattern)
                        .ok()
                        .map(|p| (p, Arc::new(c.clone())))
                })
                .collect(),
            fallback: Arc::new(NamespaceConfig::default()),
        }
    }

    pub fn lookup(&self, topic: &str) -> Arc<NamespaceConfig> {
        self.rules
            .iter()
            .find(|(p, _)| p.matches(topic))
            .map_or_else(|| self.fallback.clone(), |(_, ns)| ns.clone())
    }
}

pub struct Registry {
    shards: Box<[Shard]>,
    hasher: RandomState,
    pub namespaces: Namespaces,
    pub budget: Arc<HistoryBudget>,
    /// Interest transitions for the router (enabled when the node joins a cluster).
    pub interest: Arc<InterestFeed>,
    /// The fan-out's counters, shared by every topic.
    fanout: Arc<FanOutShared>,
    count: AtomicUsize,
    max_topics: usize,
    epoch_seq: AtomicU64,
    epoch_base: u64,
    /// Set when the node joins a cluster: a topic another node owns is created as a
    /// mirror of it. Without it every topic is owned here.
    pub placement: std::sync::OnceLock<PlaceFn>,
}

impl Registry {
    pub fn new(config: &Config, fanout: Arc<FanOutShared>) -> Self {
        Self {
            fanout,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            namespaces: Namespaces::new(&config.namespaces),
            budget: Arc::new(HistoryBudget::new(config.history.memory_budget_bytes)),
            interest: Arc::default(),
            count: AtomicUsize::new(0),
            max_topics: config.limits.max_topics,
            epoch_seq: AtomicU64::new(0),
            epoch_base: fastrand::u64(..),
            placement: std::sync::OnceLock::new(),
        }
    }

    fn shard(&self, name: &str) -> &Shard {
        &self.shards[(self.hasher.hash_one(name) as usize) % SHARDS]
    }

    /// A fresh epoch: unique within this process and, with overwhelming probability,
    /// across restarts (random base), so a cursor never names two histories.
    pub fn mint_epoch(&self) -> Arc<str> {
        let n = self.epoch_seq.fetch_add(1, Ordering::Relaxed);
        let mut v = self
            .epoch_base
            .wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut s = String::with_capacity(13);
        for _ in 0..12 {
            s.push(char::from_digit((v % 36) as u32, 36).expect("digit < 36"));
            v /= 36;
        }
        s.into()
    }

    pub fn get(&self, name: &str) -> Option<Arc<Topic>> {
        self.shard(name)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// The topic, created (with a new epoch) if this node has none by that name.
    pub fn get_or_create(&self, name: &str) -> Result<Arc<Topic>, ApiError> {
        let mut shard = self.shard(name).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = shard.get(name) {
            return Ok(t.clone());
        }
        if self.count.load(Ordering::Relaxed) >= self.max_topics {
            return Err(ApiError::Unavailable {
                message: format!("this node holds its maximum of {} topics", self.max_topics),
                retry_after_s: 5,
            });
        }
        let name: Arc<str> = name.into();
        let place = self.placement.get().map_or(Place::Here, |f| f(&name));
        let ns = self.namespaces.lookup(&name);
        let topic = Arc::new(match place {
            Place::Remote(owner) => Topic::new_mirror(
                name.clone(),
                ns,
                owner,
                self.budget.clone(),
                self.interest.clone(),
                self.fanout.clone(),
            ),
            Place::Incoming(from) => Topic::new_receiving(
                name.clone(),
                ns,
                from,
                self.budget.clone(),
                self.interest.clone(),
                self.fanout.clone(),
            ),
            Place::Here => Topic::new(
                name.clone(),
                ns,
                self.mint_epoch(),
                self.budget.clone(),
                self.interest.clone(),
                self.fanout.clone(),
            ),
        });
        shard.insert(name, topic.clone());
        self.count.fetch_add(1, Ordering::Relaxed);
        Ok(topic)
    }

    /// Runs `f` on the live topic, retrying if it was forgotten meanwhile.
    pub fn with_topic<T>(
        &self,
        name: &str,
        mut f: impl FnMut(&Arc<Topic>) -> Result<T, Dead>,
    ) -> Result<T, ApiError> {
        for _ in 0..8 {
            let topic = self.get_or_create(name)?;
            if let Ok(v) = f(&topic) {
                return Ok(v);
            }
        }
        Err(ApiError::Unavailable {
            message: "topic is being recycled; retry".into(),
            retry_after_s: 1,
        })
    }

    /// Topics with at least one local subscriber (to re-announce after a rejoin).
    pub fn interested_topics(&self) -> Vec<Arc<str>> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let map = shard.lock().unwrap_or_else(|p| p.into_inner());
            out.extend(
                map.values()
                    .filter(|t| t.subscriber_count() > 0)
                    .map(|t| t.name.clone()),
            );
        }
        out
    }

    /// Every topic held here (for the relay's ownership and repair scans).
    pub fn all_topics(&self) -> Vec<Arc<Topic>> {
        let mut out = Vec::with_capacity(self.topic_count());
        for shard in self.shards.iter() {
            out.extend(
                shard
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .cloned(),
            );
        }
        out
    }

    pub fn topic_count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn history_bytes(&self) -> usize {
        self.budget.used.load(Ordering::Relaxed)
    }

    /// Drops aged history everywhere and forgets idle, empty topics. Returns the
    /// mirrors it forgot with their owners, which should stop relaying to this node.
    pub fn sweep(&self, idle_ttl: Duration) -> Vec<(Arc<str>, Arc<str>)> {
        let now = Instant::now();
        let mut unfollow = Vec::new();
        for shard in self.shards.iter() {
            let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
            let before = map.len();
            map.retain(|name, t| {
                if !t.sweep(now, idle_ttl) {
                    return true;
                }
                if let Placement::Mirror { owner, .. } = t.placement() {
                    unfollow.push((name.clone(), owner));
                }
                false
            });
            let removed = before - map.len();
            if removed > 0 {
                self.count.fetch_sub(removed, Ordering::Relaxed);
                if map.capacity() > 64 && map.len() < map.capacity() / 4 {
                    map.shrink_to_fit();
                }
            }
        }
        unfollow
    }

    /// Brings history under the memory budget: whole histories of the least recently
    /// active topics go first; only if that is not enough are the busiest trimmed.
    pub fn enforce_budget(&self) {
        let limit = self.budget.limit;
        let target = limit / 10 * 9;
        if self.history_bytes() <= limit {
            return;
        }
        let mut topics: Vec<(Instant, Arc<Topic>)> = Vec::new();
        for shard in self.shards.iter() {
            let map = shard.lock().unwrap_or_else(|p| p.into_inner());
            topics.extend(map.values().filter_map(|t| {
                let (active, bytes) = t.activity();
                (bytes > 0).then(|| (active, t.clone()))
            }));
        }
        topics.sort_by_key(|(active, _)| *active);
        let newest = topics.last().map(|(a, _)| *a);
        for (active, topic) in &topics {
            if self.history_bytes() <= target {
                return;
            }
            if Some(*active) != newest {
                topic.evict_history(0);
            }
        }
        // Only the most recently active topic(s) remain: halve histories until within.
        while self.history_bytes() > target {
            let mut freed = 0;
            for (_, topic) in &topics {
                let len = topic.history_len();
                freed += topic.evict_history(len / 2);
            }
            if freed == 0 {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Stats;
    use bytes::Bytes;

    fn publish(r: &Registry, name: &str, n: usize, size: usize, stats: &Stats) {
        for _ in 0..n {
            r.with_topic(name, |t| {
                t.publish(
                    Bytes::from(vec![b'1'; size]),
                    None,
                    None,
                    (Duration::from_secs(1), 10),
                    stats,
                    &mut None,
                )
            })
            .unwrap()
            .unwrap();
        }
    }

    #[test]
    fn namespaces_first_match_then_defaults() {
        let ns = Namespaces::new(&[
            NamespaceConfig {
                pattern: "chat.>".into(),
                history_size: 5,
                ..Default::default()
            },
            NamespaceConfig {
                pattern: ">".into(),
                history_size: 7,
                ..Default::default()
            },
        ]);
        assert_eq!(ns.lookup("chat.a").history_size, 5);
        assert_eq!(ns.lookup("prices").history_size, 7);
        assert_eq!(Namespaces::new(&[]).lookup("x").history_size, 1000);
    }

    #[test]
    fn epochs_are_distinct_and_valid() {
        let r = Registry::new(&Config::default(), Arc::default());
        let a = r.mint_epoch();
        let b = r.mint_epoch();
        assert_ne!(a, b);
        assert!(weft_proto::cursor::valid_epoch(&a), "{a}");
    }

    #[test]
    fn budget_evicts_idle_topics_first() {
        let mut c = Config::default();
        c.history.memory_budget_bytes = 200_000;
        let r = Registry::new(&c, Arc::default());
        let stats = Stats::detached();
        publish(&r, "idle", 100, 1000, &stats);
        std::thread::sleep(Duration::from_millis(5));
        publish(&r, "hot", 60, 1000, &stats);
        assert!(r.history_bytes() > 200_000);
        r.enforce_budget();
        assert!(r.history_bytes() <= 200_000, "{}", r.history_bytes());
        assert_eq!(
            r.get("idle").unwrap().history_len(),
            0,
            "idle topic evicted first"
        );
        assert_eq!(
            r.get("hot").unwrap().history_len(),
            60,
            "hot topic kept whole"
        );
    }

    #[test]
    fn budget_trims_a_single_hot_topic() {
        let mut c = Config::default();
        c.history.memory_budget_bytes = 50_000;
        let r = Registry::new(&c, Arc::default());
        let stats = Stats::detached();
        publish(&r, "hot", 200, 1000, &stats);
        r.enforce_budget();
        assert!(r.history_bytes() <= 50_000);
        assert!(
            r.get("hot").unwrap().history_len() > 0,
            "newest events kept"
        );
    }

    #[test]
    fn topic_table_is_bounded_and_shrinks() {
        let mut c = Config::default();
        c.limits.max_topics = 3;
        let r = Registry::new(&c, Arc::default());
        for n in ["a", "b", "c"] {
            r.get_or_create(n).unwrap();
        }
        assert_eq!(r.get_or_create("d").unwrap_err().code(), 503);
        r.sweep(Duration::ZERO);
        assert_eq!(r.topic_count(), 0);
        let fresh = r.get_or_create("a").unwrap();
        assert_eq!(fresh.cursor().unwrap().offset, 0);
    }
}
