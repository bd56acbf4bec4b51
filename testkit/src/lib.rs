//! Weft's shared test kit, a dev-dependency of the node, router and loadtest tests.
//! Everything here drives real parts: real sockets on loopback, real processes, real
//! mutual TLS. Nothing is mocked.
//!
//! # Layout
//!
//! | module | what it owns |
//! |---|---|
//! | [`bin`] | finding (building once if missing) the workspace binaries, spawning them without inherited `WEFT_*`, ready files, log files printed on failure, kill by PID on drop |
//! | [`wait`] | bounded polling: [`wait::wait_for`], [`wait::wait_until`] |
//! | [`pki`] | a cluster CA and the member certificates of a process cluster |
//! | [`probe`] | members seen from outside: handshakes, the certificate a new connection is shown, a process's established TCP connections |
//! | [`routers`] | the one spawner of a three-`weft-router` group (plaintext or mutual TLS) |
//! | [`proc_cluster`] | routers plus `weft-node` processes on their own loopback addresses |
//! | [`auth`] | client-security fixtures: one HS256 secret, admin and harness API keys, the config that uses them, tokens signed for them, a secured [`inproc::TestNode`] |
//! | [`api`] | [`api::NodeApi`], the HTTP client of one node (state, publish, owners, drain, metrics) |
//! | [`metrics`] | reading a series out of a Prometheus text page |
//! | [`inproc`] | in-process nodes: [`inproc::TestNode`] (no cluster), [`inproc::ClusterNode`] and [`inproc::InProcCluster`] (router and relay) |
//! | [`ws`] | the one WebSocket client ([`ws::WsClient`]) |
//! | [`raw`] | raw sockets: HTTP requests and WebSocket frames byte for byte, responses and close codes read back |
//! | [`sse`] | the one SSE parser ([`sse::SseParser`]) and the streaming HTTP reader over it ([`sse::HttpStream`]) |
//! | [`sub`] | one subscriber over any transport, read as a sequence of events |
//! | [`watch`] | cluster readers that judge as they read: [`watch::Watcher`], [`watch::MultiSse`] |
//! | [`roaming`] | subscribers that follow a drain or a crash to another node and log what they saw |
//!
//! ```text
//!  tests ──► proc_cluster ──► routers ──► bin (spawn, ready file, logs, kill)
//!     │           │  └──────────► pki
//!     │           └──► api ──► metrics, wait
//!     ├──► inproc ──► api
//!     └──► sub / watch / roaming ──► ws, sse
//! ```

pub mod api;
pub mod auth;
pub mod bin;
pub mod inproc;
pub mod metrics;
pub mod pki;
pub mod probe;
pub mod proc_cluster;
pub mod raw;
pub mod roaming;
pub mod routers;
pub mod sse;
pub mod sub;
pub mod wait;
pub mod watch;
pub mod ws;

use std::time::Duration;

pub use inproc::TestNode;
pub use sse::{HttpStream, SseEvent};
pub use sub::{assert_contiguous, page_offsets, Kind, Sub, ALL_KINDS};
pub use ws::{subscribe_cmd, WsClient, WsIn};

/// The longest a single read of a client of this kit waits before failing the test.
pub const WAIT: Duration = Duration::from_secs(10);

/// One event as any transport delivered it.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivered {
    pub topic: String,
    /// Empty where the transport does not carry it (WebSocket pushes, single-topic SSE
    /// parsed without its id).
    pub epoch: String,
    pub offset: u64,
    pub data: serde_json::Value,
}
