//! The node in a cluster.
//!
//! - [`membership`]: join, heartbeats, the router's metadata (members and ring),
//!   interest batches for the subscription registry, `/v1/cluster`.
//! - [`member_cert`]: a member's cluster certificate signed with an existing CA
//!   (`weft-node cluster-cert`, the Helm chart's init container).
//! - [`relay`]: links between nodes — publishes forwarded to owners, events to
//!   mirrors, handoffs when the ring changes — split by job.

pub mod member_cert;
pub mod membership;
pub mod relay;
