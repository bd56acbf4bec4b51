//! `--topic-owner NODE`: topic names that one node of a cluster owns.
//!
//! In a cluster every topic has one owner node (the ring); a subscriber on another node
//! is served by a mirror the owner relays to. To measure either side on purpose, the
//! harness draws the run's usual names (`<prefix>.<run-id>.<scenario>.<i>` for
//! `i = 0, 1, …`), asks the target who owns each (`GET /v1/cluster/owner/{topic}`) and
//! keeps those `NODE` owns, in order. The choice is a pure function of the run id and
//! the ring, so workers and shards of one run pick the same names.
//!
//! Bounded: at most [`MAX_CANDIDATES_PER_TOPIC`] names are tried per topic wanted
//! (plus [`MIN_CANDIDATES`]), [`CONCURRENCY`] lookups at once, each with a timeout. A ring
//! that changes during the lookup fails the run: the names would not mean what was
//! asked.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::stream::{self, StreamExt};
use serde::Deserialize;

use crate::net::Net;
use crate::plan::{topic_name, ScenarioKind};
use crate::tls::TlsClient;

/// Names tried per topic wanted (a node of a 64-node cluster owns about 1 in 64).
pub const MAX_CANDIDATES_PER_TOPIC: usize = 256;
pub const MIN_CANDIDATES: usize = 1024;
const CONCURRENCY: usize = 32;
const CHUNK: usize = 256;
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// `GET /v1/cluster/owner/{topic}`.
#[derive(Debug, Clone, Deserialize)]
pub struct OwnerAnswer {
    pub owner: Option<String>,
    #[serde(default)]
    pub ring_version: u64,
}

/// Keeps the candidates `owner` owns, in order, until `count` are found. `answers` are
/// the lookups of `candidates` in the same order. Pure: the selection rule.
pub fn select(
    candidates: &[String],
    answers: &[OwnerAnswer],
    owner: &str,
    count: usize,
    into: &mut Vec<String>,
) {
    for (name, a) in candidates.iter().zip(answers) {
        if into.len() >= count {
            return;
        }
        if a.owner.as_deref() == Some(owner) {
            into.push(name.clone());
        }
    }
}

/// `count` topic names that `owner` owns according to the node at `target`.
pub async fn topics_owned_by(
    target: &str,
    tls: &Arc<TlsClient>,
    owner: &str,
    prefix: &str,
    run_id: &str,
    kind: ScenarioKind,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    let net = Net::new(target, tls, 0, false).await?;
    net.check_tls().await?;
    let limit = count
        .saturating_mul(MAX_CANDIDATES_PER_TOPIC)
        .saturating_add(MIN_CANDIDATES);
    let mut found = Vec::with_capacity(count);
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    let mut versions = (u64::MAX, 0u64);
    let mut tried = 0;
    while found.len() < count && tried < limit {
        let n = CHUNK.min(limit - tried);
        let names: Vec<String> = (tried..tried + n)
            .map(|i| topic_name(prefix, run_id, kind, i))
            .collect();
        let answers: Vec<anyhow::Result<OwnerAnswer>> = stream::iter(names.iter())
            .map(|t| lookup(&net, t))
            .buffered(CONCURRENCY)
            .collect()
            .await;
        let answers = answers.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
        for a in &answers {
            *seen
                .entry(a.owner.clone().unwrap_or_else(|| "(none)".into()))
                .or_insert(0) += 1;
            versions = (
                versions.0.min(a.ring_version),
                versions.1.max(a.ring_version),
            );
        }
        select(&names, &answers, owner, count, &mut found);
        tried += n;
    }
    if versions.0 != versions.1 && tried > 0 {
        bail!(
            "--topic-owner: the ring changed from version {} to {} while choosing topics; \
             retry once the cluster is stable",
            versions.0,
            versions.1
        );
    }
    if found.len() < count {
        let owners: Vec<String> = seen.iter().map(|(o, n)| format!("{o} ({n})")).collect();
        bail!(
            "--topic-owner {owner}: {} of {count} topics found among {tried} names; owners \
             seen: {}",
            found.len(),
            owners.join(", ")
        );
    }
    Ok(found)
}

async fn lookup(net: &Net, topic: &str) -> anyhow::Result<OwnerAnswer> {
    let url = net.url(&format!("/v1/cluster/owner/{topic}"));
    let resp = net
        .http(0)
        .get(&url)
        .timeout(LOOKUP_TIMEOUT)
        .send()
        .await
        .with_context(|| format!("--topic-owner: GET {url}"))?;
    let status = resp.status();
    let body = resp.bytes().await?;
    if !status.is_success() {
        bail!(
            "--topic-owner: GET {url}: {status} {}",
            crate::transport::error_message(&body)
        );
    }
    serde_json::from_slice(&body).with_context(|| format!("--topic-owner: GET {url}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_owners_names_in_order_up_to_the_count() {
        let names: Vec<String> = (0..6).map(|i| format!("t.{i}")).collect();
        let answers: Vec<OwnerAnswer> = ["a", "b", "b", "a", "b", "b"]
            .iter()
            .map(|o| OwnerAnswer {
                owner: Some(o.to_string()),
                ring_version: 3,
            })
            .collect();
        let mut out = Vec::new();
        select(&names, &answers, "b", 3, &mut out);
        assert_eq!(out, ["t.1", "t.2", "t.4"]);
        // A later chunk only tops up what is missing.
        select(&names, &answers, "b", 3, &mut out);
        assert_eq!(out.len(), 3);
        let mut none = Vec::new();
        select(&names, &answers, "c", 3, &mut none);
        assert!(none.is_empty());
    }
}
