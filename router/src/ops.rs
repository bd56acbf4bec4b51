//! The router's ops listener (`ops_listen`, `--ops-listen`): `/metrics`, `/healthz`,
//! `/readyz` over plain HTTP/1.1, for Prometheus and the kubelet (DESIGN §7). It is
//! off unless configured: a router has no HTTP listener it could share, and a fixed
//! default port would collide when several routers run on one host (the README's
//! cluster on one machine). The Helm chart turns it on.
//!
//! - `/metrics`: the families in [`FAMILIES`] and the `process_*` ones
//!   ([`crate::prometheus`]), each with `# HELP` and `# TYPE`. The Raft and state
//!   figures are read at scrape time ([`Exporter::export`]); nothing on the write
//!   path touches the recorder. Every `weft_router_*` series but the build info
//!   carries a `router` label (the Raft id), so routers sharing a process keep their
//!   figures apart.
//! - `/healthz`: 200 while Raft runs, 503 once it stopped on a fatal error.
//! - `/readyz`: 200 while this router knows a leader (it can take or redirect writes),
//!   503 otherwise. A rolling restart that waits for readiness thus waits for each
//!   restarted router to have rejoined the group before it stops the next.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics::{Counter, Gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::identity::{refusals_for, Refusal};
use crate::prometheus::{install, with_process, Family, Kind};
use crate::raft::RaftNode;
use crate::state::MemberState;

/// Every `weft_router_*` family a router exports (the `process_*` ones come from
/// [`crate::prometheus::PROCESS_FAMILIES`]).
pub const FAMILIES: &[Family] = &[
    ("weft_router_build_info", Kind::Gauge, "Always 1; the labels say which build runs (version, git commit)."),
    ("weft_router_term", Kind::Gauge, "The current Raft term of this router."),
    ("weft_router_is_leader", Kind::Gauge, "1 while this router is the Raft leader, else 0."),
    ("weft_router_leader_id", Kind::Gauge, "Raft id of the leader this router follows (itself when leading); -1 while it knows none."),
    ("weft_router_last_log_index", Kind::Gauge, "Index of the last entry in this router's Raft log (0 when empty)."),
    ("weft_router_committed_index", Kind::Gauge, "Index of the last Raft entry this router knows to be committed (0 before any)."),
    ("weft_router_applied_index", Kind::Gauge, "Index of the last Raft entry applied to this router's state machine (0 before any)."),
    ("weft_router_raft_voters", Kind::Gauge, "Voters in the Raft membership this router holds."),
    ("weft_router_members", Kind::Gauge, "Cluster nodes in this router's applied state, by state (joining, active, draining)."),
    ("weft_router_slot_table_version", Kind::Gauge, "Version of the slot table in this router's applied state."),
    ("weft_router_state_version", Kind::Gauge, "Version of the metadata in this router's applied state (one step per applied change)."),
    ("weft_router_refused_total", Kind::Counter, "Cluster connections and calls refused, by reason (handshake, no_identity, permission_denied, unauthenticated)."),
];

/// The process-wide Prometheus recorder for a router, installed on first use, with
/// every family described and `weft_router_build_info` set.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| install(PrometheusBuilder::new(), FAMILIES, "weft_router_build_info"))
}

/// One router's series, set from its Raft handle at every scrape.
pub struct Exporter {
    raft: RaftNode,
    term: Gauge,
    is_leader: Gauge,
    leader_id: Gauge,
    last_log_index: Gauge,
    committed_index: Gauge,
    applied_index: Gauge,
    voters: Gauge,
    members: [Gauge; 3],
    slot_table_version: Gauge,
    state_version: Gauge,
    refused: Vec<(Counter, Refusal)>,
}

impl Exporter {
    /// Registers the series of `raft`'s router with the installed recorder.
    pub fn new(raft: RaftNode) -> Self {
        let id = raft.id().to_string();
        let g = |name: &'static str| metrics::gauge!(name, "router" => id.clone());
        Self {
            term: g("weft_router_term"),
            is_leader: g("weft_router_is_leader"),
            leader_id: g("weft_router_leader_id"),
            last_log_index: g("weft_router_last_log_index"),
            committed_index: g("weft_router_committed_index"),
            applied_index: g("weft_router_applied_index"),
            voters: g("weft_router_raft_voters"),
            members: ["joining", "active", "draining"].map(|s| {
                metrics::gauge!("weft_router_members", "router" => id.clone(), "state" => s)
            }),
            slot_table_version: g("weft_router_slot_table_version"),
            state_version: g("weft_router_state_version"),
            refused: Refusal::ALL
                .iter()
                .map(|r| {
                    (
                        metrics::counter!("weft_router_refused_total", "router" => id.clone(), "reason" => r.label()),
                        *r,
                    )
                })
                .collect(),
            raft,
        }
    }

    /// Copies the current figures into the series.
    pub fn export(&self) {
        let s = self.raft.status();
        self.term.set(s.term as f64);
        self.is_leader.set(if s.is_leader { 1.0 } else { 0.0 });
        self.leader_id.set(s.leader.map_or(-1.0, |l| l as f64));
        self.last_log_index
            .set(s.last_log_index.unwrap_or(0) as f64);
        self.committed_index
            .set(s.committed_index.unwrap_or(0) as f64);
        self.applied_index.set(s.applied_index.unwrap_or(0) as f64);
        self.voters.set(s.voters as f64);
        let (by_state, slots, version) = self.raft.shared().with_state(|st| {
            let mut n = [0u64; 3];
            for m in st.members().values() {
                n[match m.state {
                    MemberState::Joining => 0,
                    MemberState::Active => 1,
                    MemberState::Draining => 2,
                }] += 1;
            }
            (n, st.slots().version, st.version())
        });
        for (gauge, n) in self.members.iter().zip(by_state) {
            gauge.set(n as f64);
        }
        self.slot_table_version.set(slots as f64);
        self.state_version.set(version as f64);
        for (counter, reason) in &self.refused {
            counter.absolute(refusals_for(*reason));
        }
    }
}

/// The ops routes for `raft`'s router (its series registered with [`prometheus`]).
pub fn app(raft: RaftNode) -> axum::Router {
    let handle = prometheus();
    let exporter = Arc::new(Exporter::new(raft.clone()));
    let health = raft.clone();
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let exporter = exporter.clone();
                async move {
                    exporter.export();
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        with_process(handle.render()),
                    )
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let running = health.status().running;
                async move { probe(running, "raft stopped") }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let ready = raft.status().leader.is_some();
                async move { probe(ready, "no raft leader known") }
            }),
        )
}

fn probe(ok: bool, why: &'static str) -> Response {
    if ok {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response()
    }
}

/// Serves [`app`] on `listener` until `stop` is cancelled.
pub async fn serve(listener: TcpListener, raft: RaftNode, stop: CancellationToken) {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    let served = axum::serve(listener, app(raft))
        .with_graceful_shutdown(stop.cancelled_owned())
        .await;
    if let Err(e) = served {
        tracing::warn!(?addr, error = %e, "ops listener stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_well_formed_and_apart_from_the_process_ones() {
        crate::prometheus::check_families(FAMILIES).unwrap();
        let all: Vec<_> = FAMILIES
            .iter()
            .chain(crate::prometheus::PROCESS_FAMILIES)
            .copied()
            .collect();
        crate::prometheus::check_families(&all).unwrap();
        assert!(FAMILIES.iter().all(|f| f.0.starts_with("weft_router_")));
    }
}
