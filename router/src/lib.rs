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

pub mod ring;
pub mod state;
