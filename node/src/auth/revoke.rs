//! Revoked subjects and token ids (`POST /v1/admin/revoke`), each until a time. The
//! set is bounded: past its capacity the entry that expires first is dropped, and
//! expired entries are pruned on every insert.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::SystemTime;

use crate::error::ApiError;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Sub(String),
    Jti(String),
}

#[derive(Debug)]
pub struct Revocations {
    entries: Mutex<HashMap<Target, SystemTime>>,
    capacity: usize,
}

impl Revocations {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    pub fn add(&self, target: Target, until: SystemTime) -> Result<(), ApiError> {
        let now = SystemTime::now();
        if until <= now {
            return Err(ApiError::bad("`until` must be in the future"));
        }
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.retain(|_, u| *u > now);
        if e.len() >= self.capacity && !e.contains_key(&target) {
            if let Some(first) = e.iter().min_by_key(|(_, u)| **u).map(|(t, _)| t.clone()) {
                e.remove(&first);
            }
        }
        let slot = e.entry(target).or_insert(until);
        *slot = (*slot).max(until);
        Ok(())
    }

    pub fn is_revoked(&self, sub: &str, jti: Option<&str>) -> bool {
        let e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if e.is_empty() {
            return false;
        }
        let now = SystemTime::now();
        let live = |t: &Target| e.get(t).is_some_and(|u| *u > now);
        live(&Target::Sub(sub.to_owned())) || jti.is_some_and(|j| live(&Target::Jti(j.to_owned())))
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn revokes_until_and_stays_bounded() {
        let r = Revocations::new(2);
        let soon = SystemTime::now() + Duration::from_secs(60);
        r.add(Target::Sub("alice".into()), soon).unwrap();
        assert!(r.is_revoked("alice", None));
        assert!(!r.is_revoked("bob", Some("j1")));
        r.add(Target::Jti("j1".into()), soon + Duration::from_secs(60))
            .unwrap();
        assert!(r.is_revoked("bob", Some("j1")));
        // Full: the entry expiring first gives way.
        r.add(Target::Sub("carol".into()), soon + Duration::from_secs(120))
            .unwrap();
        assert_eq!(r.len(), 2);
        assert!(!r.is_revoked("alice", None));
        assert!(r
            .add(
                Target::Sub("x".into()),
                SystemTime::now() - Duration::from_secs(1)
            )
            .is_err());
    }
}
