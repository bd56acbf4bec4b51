//! The durable Raft log and vote (openraft `RaftLogStorage`).
//!
//! Files under `<data-dir>/raft/`:
//!
//! ```text
//! log      append-only records: len u32 LE ‖ crc32(payload) u32 LE ‖ payload (JSON entry)
//! vote     sealed JSON vote, replaced atomically
//! purged   sealed JSON last purged log id, replaced atomically
//! ```
//!
//! Invariants:
//! - `append` acknowledges (calls `log_io_completed`) only after the records are
//!   written and the file fsynced; `save_vote` returns only after the vote file was
//!   replaced atomically and its directory fsynced. Raft's safety depends on both.
//! - On open, a torn tail (a record cut short, or a bad checksum on the very last
//!   record: a write interrupted by a crash) is truncated away; a bad checksum with
//!   valid records after it is corruption and opening fails.
//! - `purge` first records the purge mark durably, then rewrites the file without the
//!   purged prefix (tmp + fsync + rename), so the file never grows without bound and
//!   a crash in between only leaves extra entries that open() drops again.
//!
//! Entries are also kept in memory (the log is bounded by snapshot-driven purging), so
//! reads never touch the disk. The mutex is a `std` one: every critical section is
//! short and synchronous and none spans an `.await`.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    Entry, LogId, LogState, OptionalSend, RaftLogId, RaftLogReader, StorageError, StorageIOError,
    Vote,
};

use super::disk;
use super::TypeConfig;

/// Largest single record accepted on read; anything bigger is damage, not data.
const MAX_RECORD: usize = 64 * 1024 * 1024;

type NodeId = u64;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("raft log io at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("raft log {path} is corrupt at byte {offset}: {what}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        what: String,
    },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The log store; cheap to clone (readers share it).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    dir: PathBuf,
    file: File,
    /// Byte offset of each entry's record in `file`, by log index.
    offsets: BTreeMap<u64, u64>,
    entries: BTreeMap<u64, Entry<TypeConfig>>,
    /// Current end of the valid part of `file`.
    end: u64,
    last_purged: Option<LogId<NodeId>>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
}

fn encode(entry: &Entry<TypeConfig>) -> io::Result<Vec<u8>> {
    let payload = serde_json::to_vec(entry).map_err(io::Error::other)?;
    let len = u32::try_from(payload.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "entry over 4 GiB"))?;
    let mut rec = Vec::with_capacity(payload.len() + 8);
    rec.extend_from_slice(&len.to_le_bytes());
    rec.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    rec.extend_from_slice(&payload);
    Ok(rec)
}

impl LogStore {
    /// Opens (or creates) the log under `dir`, recovering from a torn tail.
    pub fn open(dir: &Path) -> Result<Self, LogError> {
        std::fs::create_dir_all(dir).map_err(io_at(dir))?;
        let log_path = dir.join("log");
        let existed = log_path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&log_path)
            .map_err(io_at(&log_path))?;
        if !existed {
            disk::sync_dir(dir).map_err(io_at(dir))?;
        }
        let vote = read_sealed_json(&dir.join("vote"))?;
        let committed = read_sealed_json(&dir.join("committed")).unwrap_or(None);
        let last_purged: Option<LogId<NodeId>> = read_sealed_json(&dir.join("purged"))?;

        let mut bytes = Vec::new();
        file.seek(SeekFrom::Start(0)).map_err(io_at(&log_path))?;
        file.read_to_end(&mut bytes).map_err(io_at(&log_path))?;
        let mut offsets = BTreeMap::new();
        let mut entries = BTreeMap::new();
        let mut pos = 0usize;
        let mut torn = false;
        while pos < bytes.len() {
            let rest = &bytes[pos..];
            if rest.len() < 8 {
                torn = true;
                break;
            }
            let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
            if len > MAX_RECORD || rest.len() < 8 + len {
                torn = true;
                break;
            }
            let payload = &rest[8..8 + len];
            let is_last = rest.len() == 8 + len;
            if crc32fast::hash(payload) != crc {
                if is_last {
                    torn = true;
                    break;
                }
                return Err(LogError::Corrupt {
                    path: log_path,
                    offset: pos as u64,
                    what: "checksum mismatch before the end of the log".into(),
                });
            }
            let entry: Entry<TypeConfig> =
                serde_json::from_slice(payload).map_err(|e| LogError::Corrupt {
                    path: log_path.clone(),
                    offset: pos as u64,
                    what: e.to_string(),
                })?;
            let index = entry.get_log_id().index;
            // A later record for an index replaces earlier ones (cannot happen after
            // truncate, which cuts the file, but costs nothing to honour).
            offsets.split_off(&index);
            entries.split_off(&index);
            offsets.insert(index, pos as u64);
            entries.insert(index, entry);
            pos += 8 + len;
        }
        if torn {
            tracing::warn!(path = %log_path.display(), at = pos, dropped = bytes.len() - pos, "truncating torn tail of the raft log");
            file.set_len(pos as u64).map_err(io_at(&log_path))?;
            file.sync_all().map_err(io_at(&log_path))?;
        }
        // Entries at or below the purge mark may survive a crash during purge.
        if let Some(p) = last_purged {
            entries = entries.split_off(&(p.index + 1));
            offsets = offsets.split_off(&(p.index + 1));
        }
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                dir: dir.to_owned(),
                file,
                offsets,
                entries,
                end: pos as u64,
                last_purged,
                vote,
                committed,
            })),
        })
    }

    /// The last committed log index openraft reported (`save_committed`), if any.
    pub fn committed_index(&self) -> Option<u64> {
        self.lock().committed.map(|c| c.index)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock means a panic mid-write; the in-memory view may be ahead of
        // the file, but every mutation re-derives from the file on the next open.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn read_sealed_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, LogError> {
    let Some(bytes) = disk::read_optional(path).map_err(io_at(path))? else {
        return Ok(None);
    };
    let body = disk::unseal(&bytes).map_err(|e| LogError::Corrupt {
        path: path.to_owned(),
        offset: 0,
        what: e.to_string(),
    })?;
    serde_json::from_slice(body)
        .map(Some)
        .map_err(|e| LogError::Corrupt {
            path: path.to_owned(),
            offset: 0,
            what: e.to_string(),
        })
}

fn write_sealed_json<T: serde::Serialize>(path: &Path, v: &T) -> io::Result<()> {
    let body = serde_json::to_vec(v).map_err(io::Error::other)?;
    disk::write_atomic(path, &disk::seal(&body))
}

impl Inner {
    fn append_durably(&mut self, entries: Vec<Entry<TypeConfig>>) -> io::Result<()> {
        let mut buf = Vec::new();
        let mut placed = Vec::with_capacity(entries.len());
        for e in entries {
            let at = self.end + buf.len() as u64;
            buf.extend_from_slice(&encode(&e)?);
            placed.push((at, e));
        }
        self.file.write_all(&buf)?;
        self.file.sync_data()?;
        self.end += buf.len() as u64;
        for (at, e) in placed {
            let index = e.get_log_id().index;
            self.offsets.insert(index, at);
            self.entries.insert(index, e);
        }
        Ok(())
    }

    /// Deletes entries with index >= `index` (conflicting suffix).
    fn truncate_from(&mut self, index: u64) -> io::Result<()> {
        if let Some((_, &at)) = self.offsets.range(index..).next() {
            self.file.set_len(at)?;
            self.file.sync_all()?;
            self.end = at;
        }
        self.offsets.split_off(&index);
        self.entries.split_off(&index);
        Ok(())
    }

    /// Deletes entries with index <= `log_id.index` and rewrites the file without them.
    fn purge_upto(&mut self, log_id: LogId<NodeId>) -> io::Result<()> {
        write_sealed_json(&self.dir.join("purged"), &log_id)?;
        self.last_purged = Some(log_id);
        self.entries = self.entries.split_off(&(log_id.index + 1));
        let log_path = self.dir.join("log");
        let tmp = self.dir.join("log.tmp");
        let mut buf = Vec::new();
        let mut offsets = BTreeMap::new();
        for (&i, e) in &self.entries {
            offsets.insert(i, buf.len() as u64);
            buf.extend_from_slice(&encode(e)?);
        }
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all(&buf)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &log_path)?;
        disk::sync_dir(&self.dir)?;
        self.file = OpenOptions::new().read(true).append(true).open(&log_path)?;
        self.offsets = offsets;
        self.end = buf.len() as u64;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let inner = self.lock();
        Ok(inner.entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let inner = self.lock();
        let last = inner
            .entries
            .values()
            .next_back()
            .map(|e| *e.get_log_id())
            .or(inner.last_purged);
        Ok(LogState {
            last_purged_log_id: inner.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut inner = self.lock();
        write_sealed_json(&inner.dir.join("vote"), vote)
            .map_err(|e| StorageIOError::write_vote(&e))?;
        inner.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.lock().vote)
    }

    /// The committed index is a hint that lets a restarted router re-apply its log
    /// before it hears from a leader; losing it is harmless, so it is not fsynced.
    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        let mut inner = self.lock();
        inner.committed = committed;
        let body = serde_json::to_vec(&committed).map_err(|e| StorageIOError::write(&e))?;
        let path = inner.dir.join("committed");
        let tmp = inner.dir.join("committed.tmp");
        std::fs::write(&tmp, disk::seal(&body))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| StorageIOError::write(&e))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        let res = self.lock().append_durably(entries);
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let err = StorageIOError::write_logs(&e);
                callback.log_io_completed(Err(e));
                Err(err.into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.lock()
            .truncate_from(log_id.index)
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.lock()
            .purge_upto(log_id)
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    use crate::state::Command;

    fn entry(term: u64, index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(Command::Leave {
                id: format!("n{index}"),
            }),
        }
    }

    fn tmp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("weft-log-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn append(store: &LogStore, entries: Vec<Entry<TypeConfig>>) {
        store.lock().append_durably(entries).unwrap();
    }

    async fn read_all(store: &mut LogStore) -> Vec<u64> {
        store
            .try_get_log_entries(..)
            .await
            .unwrap()
            .iter()
            .map(|e| e.log_id.index)
            .collect()
    }

    #[tokio::test]
    async fn entries_and_vote_survive_reopen() {
        let dir = tmp_dir("reopen");
        {
            let mut s = LogStore::open(&dir).unwrap();
            append(&s, (1..=5).map(|i| entry(1, i)).collect());
            s.save_vote(&Vote::new(3, 2)).await.unwrap();
        }
        let mut s = LogStore::open(&dir).unwrap();
        assert_eq!(read_all(&mut s).await, vec![1, 2, 3, 4, 5]);
        assert_eq!(s.read_vote().await.unwrap(), Some(Vote::new(3, 2)));
        let st = s.get_log_state().await.unwrap();
        assert_eq!(st.last_log_id.map(|l| l.index), Some(5));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn torn_tail_is_truncated() {
        let dir = tmp_dir("torn");
        {
            let s = LogStore::open(&dir).unwrap();
            append(&s, (1..=3).map(|i| entry(1, i)).collect());
        }
        let path = dir.join("log");
        let full = std::fs::metadata(&path).unwrap().len();
        // Cut the last record in half, as a crash mid-write would.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(full - 10).unwrap();
        drop(f);
        let mut s = LogStore::open(&dir).unwrap();
        assert_eq!(read_all(&mut s).await, vec![1, 2]);
        // The store keeps working after recovery: new entries land after the cut.
        append(&s, vec![entry(2, 3)]);
        drop(s);
        let mut s = LogStore::open(&dir).unwrap();
        assert_eq!(read_all(&mut s).await, vec![1, 2, 3]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn bad_checksum_at_the_end_is_torn_but_in_the_middle_is_an_error() {
        let dir = tmp_dir("crc");
        {
            let s = LogStore::open(&dir).unwrap();
            append(&s, (1..=3).map(|i| entry(1, i)).collect());
        }
        let path = dir.join("log");
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 2] ^= 0xff; // last record's payload
        std::fs::write(&path, &bytes).unwrap();
        let mut s = LogStore::open(&dir).unwrap();
        assert_eq!(read_all(&mut s).await, vec![1, 2]);
        drop(s);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[12] ^= 0xff; // first record's payload, valid records follow
        std::fs::write(&path, &bytes).unwrap();
        match LogStore::open(&dir) {
            Err(LogError::Corrupt { offset: 0, .. }) => {}
            Err(e) => panic!("wrong error {e}"),
            Ok(_) => panic!("corruption mid-log was accepted"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn truncate_and_purge_are_durable_and_bound_the_file() {
        let dir = tmp_dir("purge");
        {
            let mut s = LogStore::open(&dir).unwrap();
            append(&s, (1..=100).map(|i| entry(1, i)).collect());
            s.truncate(LogId::new(CommittedLeaderId::new(1, 1), 91))
                .await
                .unwrap();
            let before = std::fs::metadata(dir.join("log")).unwrap().len();
            s.purge(LogId::new(CommittedLeaderId::new(1, 1), 80))
                .await
                .unwrap();
            let after = std::fs::metadata(dir.join("log")).unwrap().len();
            assert!(after * 5 < before, "purge must shrink the file");
            append(&s, vec![entry(2, 91)]);
        }
        let mut s = LogStore::open(&dir).unwrap();
        assert_eq!(read_all(&mut s).await, (81..=91).collect::<Vec<_>>());
        let st = s.get_log_state().await.unwrap();
        assert_eq!(st.last_purged_log_id.map(|l| l.index), Some(80));
        assert_eq!(st.last_log_id.map(|l| l.leader_id.term), Some(2));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
