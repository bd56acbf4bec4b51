//! The state-machine store (openraft `RaftStateMachine`): applies committed entries to
//! [`MetaState`], builds and installs snapshots, and publishes changes to watchers.
//!
//! The applied state lives in memory; durability comes from the log plus snapshots.
//! A snapshot is written atomically to `<data-dir>/raft/snapshot` (sealed with a CRC,
//! tmp + fsync + rename + dir fsync) before openraft is told about it, so the log
//! prefix it covers can be purged safely. On open the last snapshot is loaded and
//! openraft re-applies the log entries after it.
//!
//! Watchers read through [`Shared`]: the current state plus a bounded buffer of recent
//! changes. A watcher further behind than the buffer gets a full snapshot instead, so a
//! slow watcher costs memory bounded by [`RECENT_CHANGES`], never stalls `apply`.

use std::collections::VecDeque;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::RaftStateMachine;
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::TypeConfig;
use super::{disk, wire};
use crate::state::{Change, MetaState, Response};

type NodeId = u64;

/// Changes kept for resuming watchers.
pub const RECENT_CHANGES: usize = 8192;

/// Everything a snapshot holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Applied {
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, BasicNode>,
    pub meta: MetaState,
}

/// What watchers and the API read.
pub struct Shared {
    inner: Mutex<Watched>,
    version_tx: watch::Sender<u64>,
}

struct Watched {
    applied: Applied,
    /// Changes in version order, evicted a whole version at a time.
    recent: VecDeque<(u64, Change)>,
    /// Every change with a version above this is in `recent`.
    floor: u64,
}

/// What a watcher at `from` should receive next.
pub enum Catchup {
    /// Changes with versions in `(from, current]`, in order.
    Changes(Vec<(u64, Change)>),
    /// `from` is older than the buffer: start over from this state.
    Snapshot(MetaState),
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Watched> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the current metadata (std mutex: short, synchronous sections only).
    pub fn state(&self) -> MetaState {
        self.lock().applied.meta.clone()
    }

    /// Runs `f` on the current metadata without cloning it.
    pub fn with_state<R>(&self, f: impl FnOnce(&MetaState) -> R) -> R {
        f(&self.lock().applied.meta)
    }

    /// Notifies on every applied version.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version_tx.subscribe()
    }

    /// What a watcher that has seen version `from` needs to catch up.
    pub fn catch_up(&self, from: u64) -> Catchup {
        let w = self.lock();
        if from < w.floor {
            return Catchup::Snapshot(w.applied.meta.clone());
        }
        Catchup::Changes(
            w.recent
                .iter()
                .filter(|(v, _)| *v > from)
                .cloned()
                .collect(),
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The file form: `meta_len u32 LE ‖ meta JSON ‖ data (Applied JSON)`, sealed.
fn encode_snapshot(
    meta: &SnapshotMeta<NodeId, BasicNode>,
    data: &[u8],
) -> std::io::Result<Vec<u8>> {
    let m = serde_json::to_vec(meta).map_err(std::io::Error::other)?;
    let mut body = Vec::with_capacity(4 + m.len() + data.len());
    body.extend_from_slice(&(m.len() as u32).to_le_bytes());
    body.extend_from_slice(&m);
    body.extend_from_slice(data);
    Ok(disk::seal(&body))
}

type StoredSnapshot = (SnapshotMeta<NodeId, BasicNode>, Vec<u8>);

fn decode_snapshot(bytes: &[u8]) -> std::io::Result<StoredSnapshot> {
    let body = disk::unseal(bytes)?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad snapshot layout");
    if body.len() < 4 {
        return Err(bad());
    }
    let mlen = u32::from_le_bytes([body[0], body[1], body[2], body[3]]) as usize;
    if body.len() < 4 + mlen {
        return Err(bad());
    }
    let meta = serde_json::from_slice(&body[4..4 + mlen]).map_err(std::io::Error::other)?;
    Ok((meta, body[4 + mlen..].to_vec()))
}

/// The state-machine store handed to openraft.
pub struct StateMachineStore {
    path: PathBuf,
    shared: Arc<Shared>,
    snapshot_seq: u64,
}

impl StateMachineStore {
    /// Opens the store under `dir`, loading the last snapshot if there is one.
    pub fn open(dir: &Path) -> Result<Self, SnapshotError> {
        let path = dir.join("snapshot");
        let io = |source| SnapshotError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let applied: Applied = match disk::read_optional(&path).map_err(io)? {
            Some(bytes) => {
                let (_, data) = decode_snapshot(&bytes).map_err(io)?;
                wire::decode_snapshot_data(&data)
                    .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?
            }
            None => Applied::default(),
        };
        let version = applied.meta.version();
        let (version_tx, _) = watch::channel(version);
        Ok(Self {
            path,
            shared: Arc::new(Shared {
                inner: Mutex::new(Watched {
                    applied,
                    recent: VecDeque::new(),
                    floor: version,
                }),
                version_tx,
            }),
            snapshot_seq: 0,
        })
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    fn save(
        &mut self,
        meta: SnapshotMeta<NodeId, BasicNode>,
        data: Vec<u8>,
    ) -> std::io::Result<()> {
        disk::write_atomic(&self.path, &encode_snapshot(&meta, &data)?)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let (data, last_applied, membership) = {
            let w = self.shared.lock();
            let data = wire::encode_snapshot_data(&w.applied);
            (data, w.applied.last_applied, w.applied.membership.clone())
        };
        self.snapshot_seq += 1;
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, self.snapshot_seq),
            None => format!("none-{}", self.snapshot_seq),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        self.save(meta.clone(), data.clone())
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError<NodeId>>
    {
        let w = self.shared.lock();
        Ok((w.applied.last_applied, w.applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut w = self.shared.lock();
        let mut out = Vec::new();
        let mut changes = Vec::new();
        for entry in entries {
            w.applied.last_applied = Some(entry.log_id);
            out.push(match entry.payload {
                EntryPayload::Blank => Response::default(),
                EntryPayload::Normal(cmd) => w.applied.meta.apply(&cmd, &mut changes),
                EntryPayload::Membership(m) => {
                    w.applied.membership = StoredMembership::new(Some(entry.log_id), m);
                    Response::default()
                }
            });
        }
        w.recent.extend(changes);
        while w.recent.len() > RECENT_CHANGES {
            // Evict a whole version so the buffer never holds half of one.
            let Some(&(v, _)) = w.recent.front() else {
                break;
            };
            while w.recent.front().is_some_and(|(x, _)| *x == v) {
                w.recent.pop_front();
            }
            w.floor = v;
        }
        let version = w.applied.meta.version();
        drop(w);
        self.shared.version_tx.send_replace(version);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        Self {
            path: self.path.clone(),
            shared: self.shared.clone(),
            snapshot_seq: self.snapshot_seq + 1,
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let applied = wire::decode_snapshot_data(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        self.save(meta.clone(), data)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        let version = applied.meta.version();
        {
            let mut w = self.shared.lock();
            w.applied = Applied {
                last_applied: meta.last_log_id,
                membership: meta.last_membership.clone(),
                meta: applied.meta,
            };
            // History before the snapshot is unknown here: watchers restart from it.
            w.recent.clear();
            w.floor = version;
        }
        self.shared.version_tx.send_replace(version);
        tracing::info!(
            last_log = ?meta.last_log_id.map(|l| l.index),
            version,
            "installed a snapshot from the leader"
        );
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        // Read from the file, the authority: a builder may have written a newer one.
        let Some(bytes) =
            disk::read_optional(&self.path).map_err(|e| StorageIOError::read_snapshot(None, &e))?
        else {
            return Ok(None);
        };
        let (meta, data) =
            decode_snapshot(&bytes).map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;
    use crate::state::Command;

    fn entry(index: u64, cmd: Command) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(cmd),
        }
    }

    fn join(id: &str) -> Command {
        Command::Join {
            id: id.into(),
            addr: "h:1".into(),
            zone: String::new(),
            load: 0,
            at_ms: 1,
        }
    }

    #[tokio::test]
    async fn snapshot_survives_reopen_and_watchers_resume_or_restart() {
        let dir = std::env::temp_dir().join(format!("weft-sm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let mut sm = StateMachineStore::open(&dir).unwrap();
            let shared = sm.shared();
            let mut rx = shared.subscribe();
            sm.apply([entry(1, join("a")), entry(2, join("b"))])
                .await
                .unwrap();
            assert_eq!(*rx.borrow_and_update(), 2);
            match shared.catch_up(1) {
                Catchup::Changes(c) => {
                    assert_eq!(c.len(), 1);
                    assert_eq!(c[0].0, 2);
                }
                Catchup::Snapshot(_) => panic!("version 1 is in the buffer"),
            }
            let snap = sm
                .get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .unwrap();
            assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(2));
        }
        let mut sm = StateMachineStore::open(&dir).unwrap();
        let (applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(2));
        let shared = sm.shared();
        assert_eq!(shared.state().members().len(), 2);
        // After a restart the change history is gone: an old watcher starts over.
        assert!(matches!(shared.catch_up(1), Catchup::Snapshot(s) if s.version() == 2));
        assert!(matches!(shared.catch_up(2), Catchup::Changes(c) if c.is_empty()));
        assert!(sm.get_current_snapshot().await.unwrap().is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
