//! The cluster lets in only its own members (issue 11): three `weft-router` and three
//! `weft-node` processes on 127.0.0.x, every connection mutual TLS with certificates
//! the harness issued. Against that running cluster:
//!
//! - a plaintext client, a certificate from another CA and an expired certificate of
//!   the right CA are refused at the handshake (routers and nodes alike; counted by
//!   the nodes);
//! - a node certificate claiming another node's id (Join, Heartbeat, Leave, Drain,
//!   UpdateInterest, the relay Hello) gets `PERMISSION_DENIED`, and calling Raft with
//!   it too, while a router certificate passes that gate; Raft is not served on the
//!   routers' Router addresses (they have a Raft address of their own), nor by nodes;
//! - through all of it membership, ring and registry stay as they were, and a
//!   subscriber sees every event of a cross-node topic once, in order, and nothing
//!   else;
//! - an admin certificate may drain any node;
//! - secure by default: a node in cluster mode without certificates exits 64 naming
//!   the fix (so does one whose own certificate names another node or expired); `--cluster-insecure` is said in the log and in `/v1/cluster`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use prost::Message;
use serde_json::json;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use weft_proto::grpc::{self, relay_frame::Kind, RelayBatch, RelayFrame};
use weft_router::certs::DevCa;
use weft_router::identity::Peer;
use weft_router::tls::{Expect, TlsFiles, Transport};
use weft_router::RouterClient;

use weft_testkit::api::NodeApi;
use weft_testkit::bin::{self, Proc};
use weft_testkit::pki::{issue_files, tls, tls_args};
use weft_testkit::proc_cluster::ProcCluster;
use weft_testkit::wait::wait_for;
use weft_testkit::watch::Seen;

const NODES: [&str; 3] = ["a", "b", "c"];
const REFUSED: &str = "weft_cluster_refused_total";

/// Members as (id, address, state).
type Members = Vec<(String, String, i32)>;
/// The registry as (topic, nodes).
type Registry = Vec<(String, Vec<String>)>;

/// What must not change: members (id, address, state), ring version, registry.
fn layout(s: &grpc::ClusterState) -> (Members, u64, Registry) {
    let mut members: Vec<_> = s
        .members
        .iter()
        .map(|m| (m.id.clone(), m.addr.clone(), m.state))
        .collect();
    members.sort();
    let mut interest: Vec<_> = s
        .interest
        .iter()
        .map(|i| (i.topic.clone(), i.nodes.clone()))
        .collect();
    interest.sort();
    (members, s.slots.as_ref().map_or(0, |t| t.version), interest)
}

fn hello(node: &str) -> RelayBatch {
    let frame = RelayFrame {
        kind: Some(Kind::Hello(grpc::Hello {
            node: node.into(),
            ring_version: 0,
            ..Default::default()
        })),
    };
    RelayBatch {
        frames: vec![Bytes::from(frame.encode_to_vec())],
    }
}

/// Opens a relay link to `addr` (a node whose certificate must name `expect`) saying
/// `Hello{node: hello_as}`; the status the node answered, or the transport failure.
async fn relay_link(
    transport: &Transport,
    addr: &str,
    expect: &str,
    hello_as: &str,
) -> Result<(), tonic::Status> {
    let channel = transport
        .channel(addr, Expect::Node(expect.into()), Duration::from_secs(2))
        .expect("channel");
    let mut client = grpc::relay_client::RelayClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(hello(hello_as)).await.expect("queue the hello");
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        client.link(ReceiverStream::new(rx)),
    )
    .await
    .expect("the node answers a link within 10 s");
    answer.map(drop)
}

/// A Raft Vote: with `forged`, a real request with a huge term (what an intruder
/// would send to take the group over); else a request without its vote (malformed).
async fn raft_vote(transport: &Transport, addr: &str, forged: bool) -> Result<(), tonic::Status> {
    let channel = transport
        .channel(addr, Expect::Member, Duration::from_secs(2))
        .expect("channel");
    let mut client = grpc::raft_client::RaftClient::new(channel);
    let req = if forged {
        grpc::VoteRequest {
            vote: Some(grpc::RaftVote {
                leader_id: Some(grpc::LeaderId {
                    term: 999_999,
                    node_id: 9,
                }),
                committed: false,
            }),
            last_log_id: None,
        }
    } else {
        grpc::VoteRequest::default()
    };
    tokio::time::timeout(Duration::from_secs(10), client.vote(req))
        .await
        .expect("answered within 10 s")
        .map(drop)
}

/// Refused before any gRPC answer: the handshake failed, so the call never reached a
/// service (tonic reports a transport failure as UNAVAILABLE, UNKNOWN, CANCELLED or INTERNAL,
/// never as an answer of the service such as PERMISSION_DENIED).
fn assert_refused_at_handshake(what: &str, r: Result<(), tonic::Status>) {
    match r {
        Ok(()) => panic!("{what}: accepted"),
        Err(s) => assert!(
            matches!(
                s.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
            ),
            "{what}: expected a failed handshake, got {:?} {}",
            s.code(),
            s.message()
        ),
    }
}

fn assert_denied(what: &str, r: Result<impl std::fmt::Debug, tonic::Status>) {
    match r {
        Ok(v) => panic!("{what}: accepted ({v:?})"),
        Err(s) => assert_eq!(s.code(), Code::PermissionDenied, "{what}: {}", s.message()),
    }
}

/// Publishes `{"n": k}` as event number `k` (the next after `published`).
async fn publish(api: &NodeApi, topic: &str, published: &mut u64) {
    *published += 1;
    let n = *published;
    let r = api.publish(topic, &json!({"n": n})).await;
    assert_eq!(r.offset, n, "publish {n} through {}", api.name);
}

/// A topic named `prefix.N` owned by `owner`.
async fn topic_owned_by(api: &NodeApi, prefix: &str, owner: &str) -> String {
    for i in 0..10_000 {
        let t = format!("{prefix}.{i}");
        if api.owner(&t).await.owner == owner {
            return t;
        }
    }
    panic!("no topic owned by {owner}");
}

fn write_files(dir: &Path, name: &str, cert_pem: &str, key_pem: &str, ca_pem: &str) -> TlsFiles {
    let files = TlsFiles {
        ca_file: dir.join(format!("{name}-ca.crt")),
        cert_file: dir.join(format!("{name}.crt")),
        key_file: dir.join(format!("{name}.key")),
    };
    std::fs::write(&files.ca_file, ca_pem).unwrap();
    std::fs::write(&files.cert_file, cert_pem).unwrap();
    std::fs::write(&files.key_file, key_pem).unwrap();
    files
}

/// Sum of the refusal counter over every node (each counts what reached it).
async fn refusals(c: &ProcCluster) -> f64 {
    let mut sum = 0.0;
    for n in NODES {
        sum += c.node(n).metric(REFUSED).await.unwrap_or(0.0);
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn intruders_are_refused_and_the_cluster_is_unchanged() {
    let c = ProcCluster::start("intruders", 220, &NODES).await;
    c.converged(Duration::from_secs(20)).await;
    for n in NODES {
        let view = c.cluster(n).await;
        assert_eq!(view["transport"], "mutual-tls", "{n}: {view}");
        assert_eq!(view["insecure"], false, "{n}: {view}");
    }
    let routers = c.router_addrs();
    let router1 = routers[&1].clone();
    let (a, b, cc) = (c.node("a"), c.node("b"), c.node("c"));
    let (addr_b, addr_c) = (c.cluster_addr("b"), c.cluster_addr("c"));

    // A live subscriber on c to a topic b owns; events are published through a.
    let topic = topic_owned_by(&a, "guarded", "b").await;
    let mut watcher = cc.watcher().await;
    let (epoch, start) = watcher.subscribe(&topic).await;
    assert_eq!(start, 0);
    let mut published = 0u64;
    publish(&a, &topic, &mut published).await;
    // The registry records c's interest asynchronously: settle it first.
    let before = wait_for(
        Duration::from_secs(10),
        "the registry holds c's interest",
        || async {
            let l = layout(&c.router_state().await);
            if l.2
                .iter()
                .any(|(t, n)| *t == topic && n == &["c".to_owned()])
            {
                Ok(l)
            } else {
                Err(format!("{l:?}"))
            }
        },
    )
    .await;
    let refused_before = refusals(&c).await;

    // 1. Plaintext.
    let plain = Transport::Plaintext;
    assert_refused_at_handshake(
        "plaintext GetState on a router",
        RouterClient::new(vec![router1.clone()])
            .get_state()
            .await
            .map(drop),
    );
    assert_refused_at_handshake(
        "plaintext relay link",
        relay_link(&plain, &addr_b, "b", "evil").await,
    );

    // 2. Another CA, claiming to be a member.
    let tmp = c.certs_dir().join("intruder");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(c.certs_dir().join("ca.crt"), tmp.join("ca.crt")).unwrap();
    let other = DevCa::generate("another CA", Duration::from_secs(3600)).unwrap();
    let forged = other
        .issue(&Peer::Node("a".into()), Duration::from_secs(3600))
        .unwrap();
    // It trusts the real CA (so only its own certificate can fail).
    let real_ca = std::fs::read_to_string(c.certs_dir().join("ca.crt")).unwrap();
    let foreign = tls(write_files(
        &tmp,
        "foreign",
        &forged.cert_pem,
        &forged.key_pem,
        &real_ca,
    ));
    assert_refused_at_handshake(
        "another CA's certificate at a router",
        RouterClient::with_transport(vec![router1.clone()], foreign.clone())
            .join("a", "127.0.0.1:1", "", 0)
            .await
            .map(drop),
    );
    assert_refused_at_handshake(
        "another CA's certificate at a node",
        relay_link(&foreign, &addr_b, "b", "a").await,
    );

    // 3. The right CA, expired.
    let day = Duration::from_secs(24 * 3600);
    let now = SystemTime::now();
    let old = c
        .ca()
        .issue_between(&Peer::Node("a".into()), now - 2 * day, now - day)
        .unwrap();
    let expired = tls(write_files(
        &tmp,
        "expired",
        &old.cert_pem,
        &old.key_pem,
        &real_ca,
    ));
    assert_refused_at_handshake(
        "an expired certificate at a router",
        RouterClient::with_transport(vec![router1.clone()], expired.clone())
            .heartbeat("a", 0, 0)
            .await
            .map(drop),
    );
    assert_refused_at_handshake(
        "an expired certificate at a node",
        relay_link(&expired, &addr_c, "c", "a").await,
    );

    // 4. A valid node certificate (a's own) claiming to be someone else.
    let as_a = tls(issue_files(
        c.ca(),
        &tmp,
        "stolen-a",
        &Peer::Node("a".into()),
    ));
    let r = RouterClient::with_transport(routers.values().cloned().collect(), as_a.clone());
    assert_denied(
        "Join as a new id",
        r.join("evil", "127.0.0.1:1", "", 0).await,
    );
    assert_denied("Join as b", r.join("b", "127.0.0.1:1", "", 0).await);
    assert_denied("Heartbeat as b", r.heartbeat("b", 0, 0).await);
    assert_denied("Leave as b", r.leave("b").await);
    assert_denied("Drain as b", r.drain("b").await);
    assert_denied(
        "UpdateInterest as b",
        r.update_interest("b", vec!["stolen.topic".into()], vec![topic.clone()])
            .await,
    );
    assert_denied(
        "relay Hello as b",
        relay_link(&as_a, &addr_c, "c", "b").await,
    );
    assert_denied(
        "relay Hello as a stranger",
        relay_link(&as_a, &addr_c, "c", "evil").await,
    );
    let raft1 = c.router_raft_addr(1);
    assert_denied(
        "Raft with a node certificate",
        raft_vote(&as_a, &raft1, true).await,
    );
    // The gate is real: a router certificate passes it (and the malformed vote is
    // refused as such), and reading the metadata is open to members.
    let as_router = tls(issue_files(
        c.ca(),
        &tmp,
        "router-9",
        &Peer::Router("9".into()),
    ));
    let e = raft_vote(&as_router, &raft1, false).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    // Raft is not served on the Router address nodes reach.
    let e = raft_vote(&as_router, &router1, false).await.unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{}", e.message());
    assert!(
        r.get_state().await.is_ok(),
        "a member may read the metadata"
    );
    // Nodes do not serve Raft at all.
    let e = raft_vote(&as_router, &addr_b, false).await.unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{}", e.message());

    // Nothing changed, and the refusals were counted by the nodes that saw them:
    // plaintext, another CA, expired (3 handshakes) + 2 denied Hellos at least.
    publish(&b, &topic, &mut published).await;
    publish(&cc, &topic, &mut published).await;
    let after = layout(&c.router_state().await);
    assert_eq!(before, after, "membership, ring or registry changed");
    c.converged(Duration::from_secs(5)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let counted = refusals(&c).await - refused_before;
        if counted >= 5.0 {
            break;
        }
        assert!(Instant::now() < deadline, "refusals counted: {counted}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut want = BTreeMap::new();
    want.insert(topic.clone(), published as usize);
    let got = watcher.collect(&want, Duration::from_secs(10)).await;
    let offsets: Vec<u64> = got[&topic].iter().map(|d| d.offset).collect();
    assert_eq!(offsets, (1..=published).collect::<Vec<_>>());
    for d in &got[&topic] {
        assert_eq!(d.epoch, epoch);
        assert_eq!(d.data, json!({"n": d.offset}), "a foreign event");
    }
    // The next thing the subscriber sees is the next real event: nothing was injected.
    publish(&a, &topic, &mut published).await;
    match watcher.next().await {
        Seen::Event(d) => {
            assert_eq!((d.offset, d.data), (published, json!({"n": published})));
        }
        other => panic!("after the attacks: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_certificate_may_drain_any_node() {
    let c = ProcCluster::start("admin-drain", 225, &NODES).await;
    c.converged(Duration::from_secs(20)).await;
    let admin = tls(issue_files(
        c.ca(),
        &c.certs_dir(),
        "ops",
        &Peer::Admin("ops".into()),
    ));
    let r = RouterClient::with_transport(c.router_addrs().values().cloned().collect(), admin);
    // An admin may not act as a node in anything else.
    assert_denied("an admin's Leave", r.leave("c").await);
    assert_denied("an admin's Join", r.join("c", "127.0.0.1:1", "", 0).await);
    r.drain("c").await.expect("an admin drains c");
    wait_for(Duration::from_secs(10), "c is draining", || async {
        let s = c.router_state().await;
        match s.members.iter().find(|m| m.id == "c") {
            Some(m) if m.state == grpc::MemberState::Draining as i32 => Ok(()),
            m => Err(format!("c is {m:?}")),
        }
    })
    .await;
}

fn node_bin() -> std::process::Command {
    bin::command(env!("CARGO_BIN_EXE_weft-node"))
}

#[test]
fn cluster_mode_without_certificates_exits_64_naming_the_fix() {
    for args in [
        // An external router group.
        vec!["--router", "127.0.0.1:1", "--http-listen", "127.0.0.1:0"],
        // The embedded router reachable from other hosts.
        vec![
            "--cluster-listen",
            "0.0.0.0:0",
            "--http-listen",
            "127.0.0.1:0",
        ],
    ] {
        let err = bin::usage_error(&node_bin().args(&args).output().unwrap());
        for fix in ["cluster.ca_file", "weft-router certs", "--cluster-insecure"] {
            assert!(err.contains(fix), "{fix}: {err}");
        }
    }
    // A certificate naming another node is refused before anything is bound.
    let dir = std::env::temp_dir().join(format!("weft-node-certs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    weft_router::certs::write_dev_set(&dir, 1, &["n1".into()], Duration::from_secs(3600)).unwrap();
    let mut cmd = node_bin();
    let n1 = TlsFiles {
        ca_file: dir.join("ca.crt"),
        cert_file: dir.join("node-n1.crt"),
        key_file: dir.join("node-n1.key"),
    };
    tls_args(&mut cmd, &n1);
    let err = bin::usage_error(
        &cmd.args(["--node-id", "n2", "--router", "127.0.0.1:1"])
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("weft://node/n1") && err.contains("weft://node/n2"),
        "{err}"
    );
    // So is its own certificate once expired: peers would refuse it at every handshake.
    let ca = DevCa::generate("expiry CA", Duration::from_secs(3600)).unwrap();
    let day = Duration::from_secs(24 * 3600);
    let now = SystemTime::now();
    let old = ca
        .issue_between(&Peer::Node("n1".into()), now - 2 * day, now - day)
        .unwrap();
    let files = write_files(&dir, "old-n1", &old.cert_pem, &old.key_pem, ca.cert_pem());
    let mut cmd = node_bin();
    tls_args(&mut cmd, &files);
    let err = bin::usage_error(
        &cmd.args(["--node-id", "n1", "--router", "127.0.0.1:1"])
            .output()
            .unwrap(),
    );
    assert!(err.contains("expired"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_insecure_is_logged_and_shown_in_the_cluster_view() {
    let dir = std::env::temp_dir().join(format!("weft-insecure-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ready = dir.join("ready.json");
    let log = dir.join("stderr.log");
    let mut child = Proc(
        bin::loopback_node(&dir)
            .args(["--node-id", "open-1", "--cluster-insecure"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let bound = bin::await_ready_file(&mut child.0, &ready, "node open-1").await;
    let addr = bound["http"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("ready file without an http address: {bound}"));
    let api = NodeApi::new("open-1", addr);
    let view = wait_for(Duration::from_secs(10), "a cluster view", || {
        api.try_get_json("/v1/cluster")
    })
    .await;
    drop(child);
    assert_eq!(view["insecure"], true, "{view}");
    assert_eq!(view["transport"], "plaintext", "{view}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("--cluster-insecure"),
        "no warning at start:\n{text}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
