//! Revoked subjects and token ids (`POST /v1/admin/revoke`), each until a time. The
//! set is bounded: past its capacity the entry that expires first is dropped, and
//! expired entries are pruned on every insert.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

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
    /// Where the set is kept across restarts (the binary's data dir), if anywhere.
    file: Mutex<Option<PathBuf>>,
}

/// One entry as the file keeps it.
#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    jti: Option<String>,
    /// Unix seconds.
    until: u64,
}

/// The largest revocation file read back (a bounded set of short names).
const MAX_FILE_BYTES: u64 = 64 << 20;

impl Revocations {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            capacity,
            file: Mutex::new(None),
        }
    }

    /// Keeps the set in `path` from now on, after taking in what it holds (entries not
    /// yet expired, at most the capacity): a restarted node goes on refusing what was
    /// revoked before. A missing file is an empty set; an unreadable one is an error.
    pub fn persist_to(&self, path: &Path) -> Result<usize, String> {
        let loaded = match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("{}: {e}", path.display())),
            Ok(m) if m.len() > MAX_FILE_BYTES => {
                return Err(format!(
                    "{}: larger than {MAX_FILE_BYTES} bytes",
                    path.display()
                ))
            }
            Ok(_) => {
                let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
                serde_json::from_slice::<Vec<Stored>>(&text)
                    .map_err(|e| format!("{}: {e}", path.display()))?
            }
        };
        let mut n = 0;
        for s in loaded {
            let target = match (s.sub, s.jti) {
                (Some(sub), None) => Target::Sub(sub),
                (None, Some(jti)) => Target::Jti(jti),
                _ => continue,
            };
            let until = UNIX_EPOCH + Duration::from_secs(s.until);
            if matches!(self.insert(target, until), Ok(true)) {
                n += 1;
            }
        }
        *self.file.lock().unwrap_or_else(|p| p.into_inner()) = Some(path.to_owned());
        Ok(n)
    }

    /// Every entry still in force.
    pub fn active(&self) -> Vec<(Target, SystemTime)> {
        let now = SystemTime::now();
        let e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.iter()
            .filter(|(_, u)| **u > now)
            .map(|(t, u)| (t.clone(), *u))
            .collect()
    }

    /// Adds (or extends) an entry, and writes the set to its file if it has one. A
    /// failed write is logged; the entry holds in memory regardless.
    pub fn add(&self, target: Target, until: SystemTime) -> Result<(), ApiError> {
        if !self.insert(target, until)? {
            // Known already (a peer's link-up resend): nothing to write.
            return Ok(());
        }
        let file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(path) = file.as_ref() {
            if let Err(e) = self.write(path) {
                tracing::warn!(file = %path.display(), error = %e, "revocations not saved; they hold until this node restarts");
            }
        }
        Ok(())
    }

    /// Writes the set to a temporary file beside `path`, then renames it over.
    fn write(&self, path: &Path) -> std::io::Result<()> {
        let stored: Vec<Stored> = self
            .active()
            .into_iter()
            .map(|(t, until)| {
                let until = until.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
                match t {
                    Target::Sub(sub) => Stored {
                        sub: Some(sub),
                        jti: None,
                        until,
                    },
                    Target::Jti(jti) => Stored {
                        sub: None,
                        jti: Some(jti),
                        until,
                    },
                }
            })
            .collect();
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&stored)?)?;
        std::fs::rename(&tmp, path)
    }

    /// True if the set changed.
    fn insert(&self, target: Target, until: SystemTime) -> Result<bool, ApiError> {
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
        let slot = e.entry(target).or_insert(SystemTime::UNIX_EPOCH);
        let changed = *slot < until;
        *slot = (*slot).max(until);
        Ok(changed)
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

    #[test]
    fn a_restarted_node_refuses_what_was_revoked_before_and_forgets_what_expired() {
        let dir = std::env::temp_dir().join(format!("weft-revoke-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("revocations.json");
        let _ = std::fs::remove_file(&path);
        let before = Revocations::new(10);
        assert_eq!(before.persist_to(&path).unwrap(), 0, "no file yet: empty");
        let later = SystemTime::now() + Duration::from_secs(3600);
        before.add(Target::Sub("alice".into()), later).unwrap();
        before.add(Target::Jti("j9".into()), later).unwrap();
        // An entry that will have expired by the restart.
        before
            .add(
                Target::Sub("brief".into()),
                SystemTime::now() + Duration::from_secs(1),
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(1100));

        let after = Revocations::new(10);
        assert_eq!(after.persist_to(&path).unwrap(), 2);
        assert!(after.is_revoked("alice", None));
        assert!(after.is_revoked("bob", Some("j9")));
        assert!(!after.is_revoked("brief", None));

        std::fs::write(&path, b"{not json").unwrap();
        assert!(Revocations::new(10).persist_to(&path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
