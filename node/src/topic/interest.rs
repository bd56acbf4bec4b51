//! Local interest transitions on their way to the router's subscription registry.
//!
//! A topic reports its first local subscriber (`on`) and its last one leaving (`off`)
//! here, under its own lock; the cluster task drains the set in batches into
//! `UpdateInterest` (group commit at the router). The set keeps only each topic's
//! latest state, so a subscribe/unsubscribe flurry inside one batch window costs
//! nothing, and it is bounded by the number of topics. Reporting never blocks the
//! fan-out path, and nothing is recorded until a cluster enables the feed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct InterestFeed {
    enabled: AtomicBool,
    pending: Mutex<HashMap<Arc<str>, bool>>,
    notify: Notify,
}

/// One batch for the router: topics gained and topics lost.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Batch {
    pub add: Vec<String>,
    pub remove: Vec<String>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }
}

impl InterestFeed {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, bool>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts recording transitions (a cluster is there to receive them).
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    pub fn changed(&self, topic: &Arc<str>, on: bool) {
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        self.lock().insert(topic.clone(), on);
        self.notify.notify_one();
    }

    /// Takes at most `max` pending transitions.
    pub fn take(&self, max: usize) -> Batch {
        let mut pending = self.lock();
        let topics: Vec<Arc<str>> = pending.keys().take(max).cloned().collect();
        let mut batch = Batch::default();
        for t in topics {
            match pending.remove(&t) {
                Some(true) => batch.add.push(t.to_string()),
                Some(false) => batch.remove.push(t.to_string()),
                None => {}
            }
        }
        if pending.is_empty() && pending.capacity() > 1024 {
            *pending = HashMap::new();
        }
        batch
    }

    /// Puts back a batch that could not be sent, unless a newer state is pending.
    pub fn requeue(&self, batch: Batch) {
        let mut pending = self.lock();
        for (topics, on) in [(batch.add, true), (batch.remove, false)] {
            for t in topics {
                pending.entry(t.into()).or_insert(on);
            }
        }
    }

    pub async fn wait(&self) {
        self.notify.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_state_wins_and_disabled_records_nothing() {
        let f = InterestFeed::default();
        let a: Arc<str> = "a".into();
        let b: Arc<str> = "b".into();
        f.changed(&a, true);
        assert!(
            f.take(10).is_empty(),
            "nothing recorded before a cluster enables it"
        );
        f.enable();
        f.changed(&a, true);
        f.changed(&a, false);
        f.changed(&b, true);
        let mut batch = f.take(10);
        batch.add.sort();
        assert_eq!(
            batch,
            Batch {
                add: vec!["b".into()],
                remove: vec!["a".into()]
            }
        );
        assert!(f.take(10).is_empty());
    }

    #[test]
    fn batches_are_bounded_and_requeue_keeps_newer_states() {
        let f = InterestFeed::default();
        f.enable();
        for i in 0..10 {
            f.changed(&Arc::from(format!("t{i}")), true);
        }
        let first = f.take(4);
        assert_eq!(first.add.len(), 4);
        // While the batch was in flight, one of its topics lost its last subscriber.
        let flipped: Arc<str> = first.add[0].as_str().into();
        f.changed(&flipped, false);
        f.requeue(first);
        let rest = f.take(100);
        assert_eq!(rest.add.len() + rest.remove.len(), 10);
        assert_eq!(
            rest.remove,
            vec![flipped.to_string()],
            "the newer 'off' was kept"
        );
    }
}
