//! SIGHUP reloads the cluster certificates (issue 11), on a router and on a node,
//! without dropping an established link. The file-watch path is proven by
//! `cluster_certificates_rotate.rs`; here the watch cannot see the change, so only the
//! signal can have made the reload.
//!
//! Three `weft-router` and three `weft-node` processes with mutual TLS, events flowing
//! from node a through owner b to a subscriber on c. Router 1's and node a's
//! certificate and key files are replaced by new ones of the same CA, same identity,
//! *same sizes and modification times* (what the watch compares), so the watch does
//! not notice: after three of its polling periods new connections are still shown the
//! old certificates. Then SIGHUP to both processes: new connections are shown the new
//! certificates, and every TCP connection router 1 and node a held to other cluster
//! members before is still there (the same local and remote ports: nothing was
//! dropped and dialled again). The subscriber sees every event once, in order, in one
//! epoch; membership never changed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde_json::json;
use weft_router::identity::Peer;
use weft_router::tls::{Expect, Transport};
use weft_testkit::pki::{issue_files, tls};
use weft_testkit::probe::{certificate_der, established, presented};
use weft_testkit::proc_cluster::ProcCluster;
use weft_testkit::wait::wait_for;

const NODES: [&str; 3] = ["a", "b", "c"];
/// Events per second published through node a.
const RATE: u64 = 50;

/// Replaces `name`'s certificate and key in `dir` with a new pair for `peer` from
/// `ca`, of the same sizes and modification times as the old files, each swapped in
/// atomically (written beside, dated, renamed). Returns the new certificate's DER.
fn replace_unnoticed(
    ca: &weft_router::certs::DevCa,
    dir: &Path,
    name: &str,
    peer: &Peer,
) -> Vec<u8> {
    let files = [
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    ];
    let old: Vec<(u64, SystemTime)> = files
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f).unwrap();
            (m.len(), m.modified().unwrap())
        })
        .collect();
    let scratch = dir.join(format!("{name}-next"));
    std::fs::create_dir_all(&scratch).unwrap();
    // ECDSA signatures vary in length by a byte or two: issue until the sizes match.
    for _ in 0..64 {
        let fresh = issue_files(ca, &scratch, name, peer);
        let new = [fresh.cert_file, fresh.key_file];
        let sizes: Vec<u64> = new
            .iter()
            .map(|f| std::fs::metadata(f).unwrap().len())
            .collect();
        if sizes != old.iter().map(|o| o.0).collect::<Vec<_>>() {
            continue;
        }
        for ((from, to), (_, mtime)) in new.iter().zip(&files).zip(&old) {
            std::fs::File::options()
                .write(true)
                .open(from)
                .unwrap()
                .set_modified(*mtime)
                .unwrap();
            std::fs::rename(from, to).unwrap();
        }
        for (f, (len, mtime)) in files.iter().zip(&old) {
            let m = std::fs::metadata(f).unwrap();
            assert_eq!((m.len(), m.modified().unwrap()), (*len, *mtime), "{f:?}");
        }
        return certificate_der(&files[0]);
    }
    panic!("no certificate of the old size in 64 tries");
}

/// The TCP connections `pid` holds to or from any of `cluster` (the members' cluster
/// addresses).
fn cluster_links(pid: u32, cluster: &BTreeSet<SocketAddr>) -> BTreeSet<(SocketAddr, SocketAddr)> {
    established(pid)
        .into_iter()
        .filter(|(l, r)| cluster.contains(l) || cluster.contains(r))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_reloads_a_router_and_a_node_without_dropping_links() {
    let c = ProcCluster::start("sighup", 60, &NODES).await;
    let ring = c.converged(Duration::from_secs(20)).await;
    let (a, cc) = (c.node("a"), c.node("c"));

    // Events from a, owned by b, watched on c: the relay carries them both ways.
    let topic = a.topic_owned_by("hup", "b").await;
    let mut watcher = cc.watcher().await;
    let (epoch, start) = watcher.subscribe(&topic).await;
    assert_eq!(start, 0);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let publisher = {
        let (a, topic) = (a.clone(), topic.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
            let mut sent = 0u64;
            while !*stop_rx.borrow() {
                tick.tick().await;
                a.publish(&topic, &json!({ "n": sent })).await;
                sent += 1;
            }
            sent
        })
    };

    // Who to probe: router 1 at its Router address, node a at its cluster listener,
    // with the harness's own (admin) certificate.
    let certs = c.certs_dir();
    std::fs::create_dir_all(certs.join("probe")).unwrap();
    let mut probe_files = issue_files(
        c.ca(),
        &certs.join("probe"),
        "probe",
        &Peer::Admin("probe".into()),
    );
    probe_files.ca_file = certs.join("ca.crt");
    let probe: Transport = tls(probe_files);
    let router1 = c.router_addrs()[&1].clone();
    let node_a = c.cluster_addr("a");
    let at_router = || presented(&probe, &router1, Expect::Router);
    let at_node = || presented(&probe, &node_a, Expect::Node("a".into()));
    let old_router = certificate_der(&c.member_files("router-1").cert_file);
    let old_node = certificate_der(&c.member_files("node-a").cert_file);
    assert_eq!(at_router().await.unwrap(), old_router);
    assert_eq!(at_node().await.unwrap(), old_node);

    // The links router 1 and node a hold now, to and from cluster members.
    let mut cluster: BTreeSet<SocketAddr> = NODES
        .iter()
        .map(|n| c.cluster_addr(n).parse().unwrap())
        .collect();
    for id in c.router_ids() {
        cluster.insert(c.router_addrs()[&id].parse().unwrap());
        cluster.insert(c.router_raft_addr(id).parse().unwrap());
    }
    let (pid_router, pid_node) = (c.router_pid(1), c.node_pid("a"));
    let before_router = cluster_links(pid_router, &cluster);
    let before_node = cluster_links(pid_node, &cluster);
    // Router 1: its two Raft peers and the three nodes at least; node a: the routers
    // it talks to and its two relay peers.
    assert!(
        before_router.len() >= 4,
        "router 1 links: {before_router:?}"
    );
    assert!(before_node.len() >= 3, "node a links: {before_node:?}");

    // New files the watch cannot tell from the old ones.
    let new_router = replace_unnoticed(c.ca(), &certs, "router-1", &Peer::Router("1".into()));
    let new_node = replace_unnoticed(c.ca(), &certs, "node-a", &Peer::Node("a".into()));
    assert_ne!(new_router, old_router);
    assert_ne!(new_node, old_node);
    // Three polling periods later nothing reloaded: what follows is the signal's doing.
    tokio::time::sleep(weft_router::tls::RELOAD_POLL * 3).await;
    assert_eq!(
        at_router().await.unwrap(),
        old_router,
        "router 1 reloaded unasked"
    );
    assert_eq!(
        at_node().await.unwrap(),
        old_node,
        "node a reloaded unasked"
    );

    c.sighup_router(1);
    c.sighup_node("a");
    wait_for(
        Duration::from_secs(10),
        "router 1 presents its new certificate",
        || async {
            match at_router().await? {
                der if der == new_router => Ok(()),
                _ => Err("still the old one".to_owned()),
            }
        },
    )
    .await;
    wait_for(
        Duration::from_secs(10),
        "node a presents its new certificate",
        || async {
            match at_node().await? {
                der if der == new_node => Ok(()),
                _ => Err("still the old one".to_owned()),
            }
        },
    )
    .await;

    // Events keep flowing for a while on the links that were there before.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_router = cluster_links(pid_router, &cluster);
    let after_node = cluster_links(pid_node, &cluster);
    let dropped_router: Vec<_> = before_router.difference(&after_router).collect();
    let dropped_node: Vec<_> = before_node.difference(&after_node).collect();
    assert!(
        dropped_router.is_empty(),
        "router 1 dropped {dropped_router:?}"
    );
    assert!(dropped_node.is_empty(), "node a dropped {dropped_node:?}");
    // Both processes are the ones started (SIGHUP stopped neither).
    assert_eq!((c.router_pid(1), c.node_pid("a")), (pid_router, pid_node));

    let _ = stop_tx.send(true);
    let sent = publisher.await.expect("publisher");
    assert!(sent > RATE * 3, "only {sent} events flowed");
    let want = BTreeMap::from([(topic.clone(), sent as usize)]);
    let got = watcher.collect(&want, Duration::from_secs(20)).await;
    let events = &got[&topic];
    let offsets: Vec<u64> = events.iter().map(|d| d.offset).collect();
    assert_eq!(
        offsets,
        (1..=sent).collect::<Vec<_>>(),
        "lost, duplicated or reordered"
    );
    assert!(events.iter().all(|d| d.epoch == epoch), "the epoch changed");
    assert_eq!(
        c.converged(Duration::from_secs(5)).await,
        ring,
        "the ring moved: someone left the cluster"
    );
}
