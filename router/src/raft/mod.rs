//! Everything that knows about openraft lives under this module, so a later move to
//! openraft 0.10 stays local: the rest of the crate sees [`state`](crate::state)
//! commands and responses, and (from the node module) a small handle.
//!
//! - [`log_store`]: the durable log and vote.
//! - [`sm_store`]: the state machine, snapshots, and the change feed for watchers.
//! - [`disk`]: fsync/atomic-replace helpers.
//! - [`network`]: the peer gRPC service and cached per-peer channels.
//! - [`wire`]: openraft's messages ↔ the `weft.v1` Raft protobuf messages, checked.
//! - [`node`]: [`RaftNode`], the handle the rest of the crate uses.

pub mod disk;
pub mod log_store;
pub mod network;
pub mod node;
pub mod sm_store;
pub mod wire;

pub use node::{RaftNode, RaftStatus, RaftTiming, StartError, WriteError};

use std::io::Cursor;

use crate::state::{Command, Response};

openraft::declare_raft_types!(
    /// Raft types of the router group: router ids are `u64`, nodes carry their
    /// peer-service address, entries carry [`Command`]s.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
);

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU64, Ordering};

    use openraft::testing::{StoreBuilder, Suite};
    use openraft::StorageError;

    use super::log_store::LogStore;
    use super::sm_store::StateMachineStore;
    use super::TypeConfig;

    /// Removes the store's directory when a suite case ends.
    struct DirGuard(PathBuf);
    impl Drop for DirGuard {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    struct Builder;
    static SEQ: AtomicU64 = AtomicU64::new(0);

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, DirGuard> for Builder {
        async fn build(
            &self,
        ) -> Result<(DirGuard, LogStore, StateMachineStore), StorageError<u64>> {
            let dir = std::env::temp_dir().join(format!(
                "weft-suite-{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            let log = LogStore::open(&dir).expect("open log");
            let sm = StateMachineStore::open(&dir).expect("open sm");
            Ok((DirGuard(dir), log, sm))
        }
    }

    /// openraft's own storage conformance suite against the durable stores.
    #[test]
    fn openraft_storage_suite() {
        Suite::test_all(Builder).expect("storage suite");
    }
}
