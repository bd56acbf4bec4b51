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
//!   snapshots and the change feed, peer network, and [`raft::RaftNode`], the only
//!   handle the rest of the crate uses.
//! - [`service`]: the public `weft.v1.Router` gRPC service, group commit, the
//!   heartbeat reaper.
//! - [`client`]: [`client::RouterClient`], leader-following with bounded retries.
//! - [`server`]: [`server::Router`] (the Router API and the Raft service on one bound
//!   listener or on two, bootstrap) and
//!   [`server::Embedded`], the single-voter router a node runs in-process.
//! - [`identity`]: who a cluster caller is (from its certificate's URI SAN) and the
//!   one permission function every RPC asks. Pure.
//! - [`tls`]: mutual TLS for every cluster connection: reloadable rustls configs, the
//!   accepting stream that resolves identities at the handshake, dialling channels.
//! - [`certs`]: dev CA and member certificates (`weft-router certs`, the tests).
//! - [`ops`]: the ops listener (`--ops-listen`): `/metrics` (Raft and state figures
//!   read at scrape time), `/healthz`, `/readyz`.
//! - [`prometheus`]: what both binaries' `/metrics` pages share: family tables,
//!   HELP/TYPE registration, the `process_*` families from `/proc`.
//! - [`config`]: layered configuration of the binary.
//! - [`cli`]: command-line parsing, logging and signals shared with `weft-node`.

pub mod certs;
pub mod cli;
pub mod client;
pub mod config;
pub mod identity;
pub mod ops;
pub mod prometheus;
pub mod raft;
pub mod server;
pub mod service;
pub mod tls;

pub use client::RouterClient;
pub use server::{Embedded, Router, RouterOptions};
pub mod ring;
pub mod state;
