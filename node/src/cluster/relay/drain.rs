//! Leaving gracefully: hand every owned topic over before sessions close.
use std::time::Duration;

use tracing::{info, warn};

use super::*;

impl Relay {
    /// Graceful drain: the router takes this node out of the ring, every topic it
    /// owns is handed to its new owner, and the links are given time to carry it all.
    pub async fn drain(&self) {
        if let Err(e) = self.cluster.drain().await {
            warn!(error = %e, "the router did not mark this node draining; its topics move only when it leaves");
            return;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut changes = self.cluster.changes();
        while self.cluster.slots().owners.iter().any(|o| **o == *self.me) {
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                warn!("the ring still names this node after 5 s of draining");
                break;
            }
        }
        // Hand off now, and again while links to new owners come up.
        while tokio::time::Instant::now() < deadline {
            if tokio::time::timeout_at(deadline, self.pass()).await == Ok(0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Let what is queued reach the peers.
        let peers: Vec<_> = lock(&self.peers).values().cloned().collect();
        for p in peers {
            if let Some(link) = p.link() {
                let flushed = tokio::time::timeout(Duration::from_secs(2), link.flushed()).await;
                if flushed.is_err() {
                    warn!(peer = %p.id, "relay link still busy after 2 s of draining");
                }
            }
        }
        info!(owned = self.owned_topics(), "drained: topics handed over");
    }

    /// Ends every link and task (after the node has stopped serving).
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
        let peers: Vec<_> = lock(&self.peers).values().cloned().collect();
        for p in peers {
            if let Some(d) = lock(&p.dialer).take() {
                d.abort();
            }
            if let Some(l) = lock(&p.link).take() {
                l.close();
            }
        }
    }
}
