//! A bounded benchmark of the router group's commit throughput (issue 11: Raft
//! messages as protobuf, measured before and after). Ignored by default; run it in
//! release mode and copy its last line into BENCHMARKS.md:
//!
//! ```sh
//! cargo test --release -p weft-router --test commit_throughput -- --ignored --nocapture
//! ```
//!
//! Three real `weft-router` processes over mutual TLS, Raft on its own addresses (as
//! the Helm chart runs them). `CLIENTS` node identities, each with its own certificate
//! and `RouterClient`, join and then alternate Heartbeat and UpdateInterest (a fresh
//! topic each time) for `WRITES_PER_CLIENT` writes, each waiting for its write to be
//! committed and applied. Once with one client (latency-bound), once with all of them
//! at once (group commit batches them). Every write is acknowledged by the leader only
//! after a quorum has the entry durably on disk, so the figure includes two fsyncs
//! per entry (leader and one follower) on this machine's disk.

use std::sync::Arc;
use std::time::{Duration, Instant};

use weft_router::identity::Peer;
use weft_router::RouterClient;
use weft_testkit::bin::Workdir;
use weft_testkit::pki::{issue_files, tls, Pki};
use weft_testkit::routers::RouterGroup;

const CLIENTS: usize = 16;
const WRITES_PER_CLIENT: usize = 250;
/// The whole run must end within this.
const BOUND: Duration = Duration::from_secs(300);

/// Runs `clients` writers of `writes` writes each; (writes per second, mean latency).
async fn run(clients: &[(String, RouterClient)], writes: usize) -> (f64, Duration) {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (id, client) in clients {
        let (id, client) = (id.clone(), client.clone());
        tasks.push(tokio::spawn(async move {
            let mut spent = Duration::ZERO;
            for i in 0..writes {
                let t = Instant::now();
                if i % 2 == 0 {
                    client.heartbeat(&id, i as u64, 0).await
                } else {
                    client
                        .update_interest(&id, vec![format!("bench.{id}.{i}")], vec![])
                        .await
                }
                .unwrap_or_else(|e| panic!("{id}: write {i}: {e}"));
                spent += t.elapsed();
            }
            spent
        }));
    }
    let mut spent = Duration::ZERO;
    for t in tasks {
        spent += t.await.expect("writer");
    }
    let total = (clients.len() * writes) as f64;
    (
        total / started.elapsed().as_secs_f64(),
        spent / (clients.len() * writes) as u32,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run in release with --ignored --nocapture"]
async fn commit_throughput_of_three_routers_over_mutual_tls() {
    tokio::time::timeout(BOUND, async {
        let dir = Workdir::new("bench", "commit");
        let pki = Arc::new(Pki::create(dir.join("certs")));
        let group = RouterGroup::start(&dir, 90, 600_000, pki.clone()).await;
        let leader = group.leader(Duration::from_secs(20)).await;
        let addrs: Vec<String> = group
            .ids()
            .iter()
            .map(|id| group.addr(*id).to_owned())
            .collect();
        let mut clients = Vec::new();
        for n in 0..CLIENTS {
            let id = format!("bench-{n}");
            let t = tls(issue_files(
                pki.ca(),
                pki.dir(),
                &format!("node-{id}"),
                &Peer::Node(id.clone()),
            ));
            let c = RouterClient::with_transport(addrs.clone(), t);
            c.join(&id, "127.0.0.1:9000", "", 0).await.unwrap();
            clients.push((id, c));
        }
        // Warm up: every client found the leader, every channel is connected.
        run(&clients, 4).await;
        let (one_rate, one_lat) = run(&clients[..1], WRITES_PER_CLIENT * 4).await;
        let (all_rate, all_lat) = run(&clients, WRITES_PER_CLIENT).await;
        let state = group.state(Duration::from_secs(5)).await;
        assert_eq!(state.members.len(), CLIENTS);
        eprintln!(
            "commit throughput (leader {leader}): 1 client: {one_rate:.0} writes/s, mean {:.2} ms; \
             {CLIENTS} clients: {all_rate:.0} writes/s, mean {:.2} ms ({} writes)",
            one_lat.as_secs_f64() * 1e3,
            all_lat.as_secs_f64() * 1e3,
            CLIENTS * WRITES_PER_CLIENT
        );
    })
    .await
    .expect("the benchmark ends within its bound");
}
