//! Every member's certificate, and the CA itself, is replaced on disk while events flow
//! (issue 11), as cert-manager rotates mounted Secrets: nobody restarts, established
//! links stay up, and afterwards the old CA is refused on every member.
//!
//! Three `weft-router` and three `weft-node` processes with mutual TLS; 200 events/s
//! over 10 topics, published through all three nodes, watched on all three. The
//! rotation: (1) the CA bundle gains a new CA, (2) every member gets a certificate of
//! the new CA, (3) the bundle drops the old CA. Every subscriber sees every event of
//! every topic exactly once, in order, in one epoch, with no `reset`; every member
//! then accepts a new-CA certificate, refuses an old-CA one, and presents its own new
//! certificate (a probe trusting the new CA alone gets through).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;
use weft_router::certs::DevCa;
use weft_router::identity::Peer;
use weft_router::tls::Transport;

use weft_testkit::pki::{issue_files, tls};
use weft_testkit::proc_cluster::ProcCluster;

const NODES: [&str; 3] = ["a", "b", "c"];
const TOPICS: usize = 10;
/// Events per second over all publishers.
const RATE: u64 = 200;
/// Members poll their files every 2 s; a step is given this long to be picked up.
const STEP: Duration = Duration::from_secs(5);

/// Every member (routers, nodes) answers `transport`'s handshake as `want`.
async fn all_members_accept(c: &ProcCluster, transport: &Transport, want: bool, what: &str) {
    c.members_accept(transport, want, what, STEP * 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_certificate_and_the_ca_rotate_under_load_losing_nothing() {
    let c = ProcCluster::start("rotate", 220, &NODES).await;
    c.converged(Duration::from_secs(20)).await;
    let topics: Vec<String> = (0..TOPICS).map(|i| format!("rot.{i}")).collect();

    // Subscribers on every node, to every topic.
    let mut watchers = Vec::new();
    for n in NODES {
        let mut w = c.node(n).watcher().await;
        for t in &topics {
            let (_, offset) = w.subscribe(t).await;
            assert_eq!(offset, 0, "{n}: {t} is fresh");
        }
        watchers.push(w);
    }

    // 200 events/s: one paced publisher per node, round robin over the topics.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut publishers = Vec::new();
    for n in NODES {
        let api = c.node(n);
        let topics = topics.clone();
        let stop = stop_rx.clone();
        publishers.push(tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_micros(1_000_000 * NODES.len() as u64 / RATE));
            let mut sent = 0u64;
            while !*stop.borrow() {
                tick.tick().await;
                let t = &topics[(sent as usize) % topics.len()];
                api.publish(t, &json!({"from": api.name, "n": sent})).await;
                sent += 1;
            }
            sent
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let old_ca = std::fs::read_to_string(c.certs_dir().join("ca.crt")).unwrap();
    let new_ca =
        DevCa::generate("weft test CA, rotated", Duration::from_secs(24 * 3600)).expect("a new CA");
    let probes = c.certs_dir().join("probes");
    std::fs::create_dir_all(&probes).unwrap();
    std::fs::write(
        probes.join("ca.crt"),
        [old_ca.as_str(), new_ca.cert_pem()].concat(),
    )
    .unwrap();
    let old_probe = tls(issue_files(
        c.ca(),
        &probes,
        "old",
        &Peer::Admin("old".into()),
    ));
    let new_probe = tls(issue_files(
        &new_ca,
        &probes,
        "new",
        &Peer::Admin("new".into()),
    ));
    all_members_accept(&c, &old_probe, true, "members accept the old CA").await;

    let started = Instant::now();
    // 1. Trust both.
    c.write_ca_bundle(&[&old_ca, new_ca.cert_pem()]);
    all_members_accept(&c, &new_probe, true, "members trust the new CA").await;
    // 2. Every member gets a new-CA certificate.
    c.reissue_all(&new_ca);
    tokio::time::sleep(STEP).await;
    // 3. Trust only the new CA.
    c.write_ca_bundle(&[new_ca.cert_pem()]);
    all_members_accept(&c, &old_probe, false, "members refuse the old CA").await;
    all_members_accept(&c, &new_probe, true, "members still accept the new CA").await;
    // A probe that trusts the new CA alone gets through only if each member now
    // presents its new certificate, not the one it started with.
    let new_only = probes.join("new-only");
    std::fs::create_dir_all(&new_only).unwrap();
    std::fs::write(new_only.join("ca.crt"), new_ca.cert_pem()).unwrap();
    let new_only_probe = tls(issue_files(
        &new_ca,
        &new_only,
        "probe",
        &Peer::Admin("new-only".into()),
    ));
    all_members_accept(
        &c,
        &new_only_probe,
        true,
        "members present their new-CA certificates",
    )
    .await;
    let rotation = started.elapsed();

    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = stop_tx.send(true);
    let mut total = 0;
    for p in publishers {
        total += p.await.expect("publisher");
    }
    // What each topic holds now, as the owner says.
    let mut want = BTreeMap::new();
    for t in &topics {
        let s = c.node("a").state(t).await;
        want.insert(t.clone(), s.offset as usize);
    }
    assert_eq!(
        want.values().sum::<usize>() as u64,
        total,
        "every acknowledged publish is in its topic"
    );
    assert!(total > RATE * 5, "only {total} events flowed");
    for w in &mut watchers {
        let node = w.node.clone();
        let got = w.collect(&want, Duration::from_secs(20)).await;
        for (t, events) in &got {
            let offsets: Vec<u64> = events.iter().map(|d| d.offset).collect();
            assert_eq!(
                offsets,
                (1..=want[t] as u64).collect::<Vec<_>>(),
                "{node}: {t}: lost, duplicated or reordered"
            );
            let epochs: std::collections::BTreeSet<&str> =
                events.iter().map(|d| d.epoch.as_str()).collect();
            assert_eq!(epochs.len(), 1, "{node}: {t}: epochs {epochs:?}");
        }
    }
    // Nobody left the cluster while it rotated.
    c.converged(Duration::from_secs(5)).await;
    eprintln!("rotation took {rotation:?}; {total} events over {TOPICS} topics");
}
