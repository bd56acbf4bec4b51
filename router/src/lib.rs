//! # weft-router — the cluster's metadata service
//!
//! An openraft group whose replicated state machine holds membership, the versioned
//! slot table (the ring), namespaces and the subscription registry (DESIGN §5).
//!
//! # Layout
//! - [`ring`]: topic → slot (seeded stable hash) and the [`ring::SlotTable`] computed
//!   with `hashring` over virtual nodes. Pure.
//! - [`state`]: the state machine as a pure type, `apply(Command) → Response` plus the
//!   changes watchers see. Pure.
//! - [`raft`]: the openraft boundary: durable log/vote store, state-machine store with
//!   snapshots and the change feed. Nothing outside it names an openraft type.

pub mod raft;
pub mod ring;
pub mod state;
