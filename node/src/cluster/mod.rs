//! The node in a cluster.
//!
//! - [`membership`]: join, heartbeats, the router's metadata (members and ring),
//!   interest batches for the subscription registry, `/v1/cluster`.
//! - [`relay`]: links between nodes — publishes forwarded to owners, events to
//!   mirrors, handoffs when the ring changes — split by job.

pub mod membership;
pub mod relay;
