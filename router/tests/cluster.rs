//! Real `weft-router` processes on 127.0.0.x: election, follower redirects, leader
//! failover, restart on the data dirs, heartbeat expiry, bad input. Each process's log
//! goes to a file that is printed only when the test fails; every process is killed by
//! its PID when the harness drops. The routers speak mutual TLS, as in production: the
//! harness reads them with its admin certificate and writes as each node with that
//! node's own certificate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::Code;
use weft_proto::grpc;
use weft_router::identity::Peer;
use weft_router::tls::TlsFiles;
use weft_router::RouterClient;
use weft_testkit::bin::Workdir;
use weft_testkit::pki::{tls, Pki};
use weft_testkit::routers::{join_request, RouterGroup};

/// A group of three routers on `127.0.0.{ip_base+1..ip_base+3}` over mutual TLS, with a
/// CA and certificates made for the test.
async fn start(name: &str, ip_base: u8, heartbeat_timeout_ms: u64) -> (Workdir, RouterGroup) {
    let dir = Workdir::new("cluster", name);
    let pki = Arc::new(Pki::create(dir.join("certs")));
    let group = RouterGroup::start(&dir, ip_base, heartbeat_timeout_ms, pki).await;
    (dir, group)
}

/// SIGTERM and wait: the process must exit cleanly (status 0) within 10 s.
async fn sigterm(c: &mut RouterGroup, id: u64) {
    let status = c.sigterm(id, Duration::from_secs(10)).await;
    assert!(status.success(), "router {id} exited with {status}");
}

/// Retries `f` until it succeeds or `within` passes; returns how long it took.
async fn eventually<T, F, Fut>(within: Duration, mut f: F) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let start = Instant::now();
    loop {
        match f().await {
            Ok(v) => return (v, start.elapsed()),
            Err(e) => assert!(start.elapsed() < within, "gave up: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_routers_elect_redirect_and_fail_over() {
    let (_dir, mut c) = start("failover", 20, 60_000).await;
    let leader = c.leader(Duration::from_secs(15)).await;
    let follower = c.ids().into_iter().find(|id| *id != leader).unwrap();

    // A follower refuses a write with UNAVAILABLE and names the leader...
    let mut raw = grpc::router_client::RouterClient::new(c.channel_as(follower, "n1"));
    let err = raw
        .join(join_request("n1", "127.0.0.1:9000"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(
        err.metadata().get("weft-leader").unwrap().to_str().unwrap(),
        c.addr(leader)
    );
    // ...and a client that only knows the follower is redirected and applied.
    let via_follower = c.client_of(follower, "n1");
    via_follower
        .join("n1", "127.0.0.1:9000", "z", 0)
        .await
        .unwrap();
    via_follower.heartbeat("n1", 0, 0).await.unwrap();

    // Kill the leader: writes resume under a new leader within a few seconds.
    c.kill(leader);
    let client = c.client_as("n1");
    let (_, took) = eventually(Duration::from_secs(10), || {
        client.update_interest("n1", vec!["after.failover".into()], vec![])
    })
    .await;
    assert!(took < Duration::from_secs(8), "failover took {took:?}");
    let new_leader = c.leader(Duration::from_secs(10)).await;
    assert_ne!(new_leader, leader);
    let s = client.get_state().await.unwrap();
    assert_eq!(
        s.members.len(),
        1,
        "the write made before the kill survived"
    );
    assert_eq!(s.interest[0].topic, "after.failover");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_of_every_router_keeps_membership_slots_and_registry() {
    let (_dir, mut c) = start("restart", 30, 60_000).await;
    c.leader(Duration::from_secs(15)).await;
    let client = c.client();
    for n in ["n1", "n2"] {
        let as_n = c.client_as(n);
        as_n.join(n, &format!("{n}:9000"), "", 0).await.unwrap();
        as_n.heartbeat(n, 1, 1).await.unwrap();
    }
    c.client_as("n1")
        .update_interest("n1", vec!["a".into(), "b".into()], vec![])
        .await
        .unwrap();
    c.client_as("n2")
        .update_interest("n2", vec!["b".into()], vec![])
        .await
        .unwrap();
    let before = client.get_state().await.unwrap();

    for id in [1, 2, 3] {
        sigterm(&mut c, id).await;
    }
    for id in [1, 2, 3] {
        c.spawn(id).await;
    }
    c.leader(Duration::from_secs(15)).await;
    let client = c.client();
    // Followers apply the log as the new leader commits: wait for the same version.
    let (after, _) = eventually(Duration::from_secs(10), || {
        let client = client.clone();
        let want = before.version;
        async move {
            let s = client.get_state().await?;
            if s.version >= want {
                Ok(s)
            } else {
                Err(tonic::Status::unavailable("behind"))
            }
        }
    })
    .await;
    let ids = |s: &grpc::ClusterState| s.members.iter().map(|m| m.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&after), ids(&before));
    assert_eq!(after.slots, before.slots);
    assert_eq!(after.interest, before.interest);
    assert_eq!(after.version, before.version);
    // And it still takes writes.
    c.client_as("n1").heartbeat("n1", 1, 1).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_member_is_removed_and_bad_input_gets_errors() {
    let (_dir, c) = start("expiry", 40, 1500).await;
    c.leader(Duration::from_secs(15)).await;
    let client = c.client();
    let n2 = c.client_as("n2");
    for n in ["n1", "n2"] {
        let as_n = c.client_as(n);
        as_n.join(n, &format!("{n}:9000"), "", 0).await.unwrap();
        as_n.heartbeat(n, 0, 0).await.unwrap();
    }
    c.client_as("n1")
        .update_interest("n1", vec!["a".into()], vec![])
        .await
        .unwrap();
    n2.update_interest("n2", vec!["a".into(), "b".into()], vec![])
        .await
        .unwrap();

    // Bad input on leader and follower alike: an error status, state unchanged.
    let before = client.get_state().await.unwrap();
    for id in c.ids() {
        let e = c
            .client_of(id, "ghost")
            .heartbeat("ghost", 0, 0)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        // Another member's id, from a valid certificate of the cluster: refused.
        let e = c
            .client_of(id, "n2")
            .heartbeat("n1", 0, 0)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        let r = c.client_of(id, "n1");
        let e = r
            .update_interest("n1", vec!["no/slash".into()], vec![])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let many: Vec<String> = (0..5000).map(|i| format!("t.{i}")).collect();
        let e = r.update_interest("n1", many, vec![]).await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        // A 4 MB request past the server's decoding cap, from a client without one.
        let mut raw = grpc::router_client::RouterClient::new(c.channel_as(id, "n1"))
            .max_encoding_message_size(64 * 1024 * 1024);
        let e = raw
            .update_interest(grpc::UpdateInterestRequest {
                node: "n1".into(),
                add: vec!["x".repeat(1024); 4000],
                remove: vec![],
            })
            .await
            .unwrap_err();
        assert!(
            matches!(e.code(), Code::ResourceExhausted | Code::OutOfRange),
            "{e:?}"
        );
    }
    let mid = client.get_state().await.unwrap();
    assert_eq!(mid.version, before.version);
    assert_eq!(mid.interest, before.interest);

    // n2 keeps heartbeating, n1 goes silent: n1 and its interest go in one entry.
    let deadline = Instant::now() + Duration::from_secs(12);
    let state = loop {
        n2.heartbeat("n2", 0, 0).await.unwrap();
        let s = client.get_state().await.unwrap();
        if s.members.len() == 1 {
            break s;
        }
        assert!(Instant::now() < deadline, "n1 was never removed: {s:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(state.members[0].id, "n2");
    assert!(state
        .interest
        .iter()
        .all(|i| i.nodes == vec!["n2".to_string()]));
    assert_eq!(state.interest.len(), 2);
    assert!(state.slots.unwrap().owners.iter().all(|o| o == "n2"));
    assert_eq!(
        state.version,
        mid.version + 1,
        "removal of the member and its interest is one versioned change"
    );
    // Every router processes still running: nothing panicked.
    for id in c.ids() {
        c.client_for(id).get_state().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_from_one_address_cannot_stall_the_handshakes_of_members() {
    let (_dir, c) = start("handshakes", 60, 60_000).await;
    c.leader(Duration::from_secs(15)).await;
    // 300 connections from one address (127.0.0.250) that never say a word of TLS:
    // more than the listener's 256 handshakes in progress, were they all let in.
    let router: std::net::SocketAddr = c.addr(1).parse().unwrap();
    let mut idle = Vec::new();
    for _ in 0..300 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.250:0".parse().unwrap()).unwrap();
        idle.push(socket.connect(router).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A member (another address) still gets through at once: its client gives up after
    // a 1 s connect, far less than the 10 s an idle handshake may take.
    let started = Instant::now();
    let member = c.client_of(1, "n1");
    member
        .get_state()
        .await
        .expect("a member's handshake while the flood holds");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    // The flood was refused past its share, not queued: most of its sockets are closed.
    let mut closed = 0;
    for s in &idle {
        let mut buf = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(20), s.peek(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
            _ => {}
        }
    }
    assert!(closed >= 300 - 64 - 1, "only {closed} of 300 were closed");
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_outlives_its_certificate_is_closed() {
    let dir = Workdir::new("cluster", "outlived");
    let pki = Arc::new(Pki::create(dir.join("certs")));
    let c = RouterGroup::start(&dir, 70, 60_000, pki.clone()).await;
    let leader = c.leader(Duration::from_secs(15)).await;
    // n1's certificate ends in 3 s.
    let now = std::time::SystemTime::now();
    let ends = now + Duration::from_secs(3);
    let issued = pki
        .ca()
        .issue_between(
            &Peer::Node("n1".into()),
            now - Duration::from_secs(3600),
            ends,
        )
        .unwrap();
    let files = TlsFiles {
        ca_file: pki.dir().join("ca.crt"),
        cert_file: pki.dir().join("short.crt"),
        key_file: pki.dir().join("short.key"),
    };
    std::fs::write(&files.cert_file, &issued.cert_pem).unwrap();
    std::fs::write(&files.key_file, &issued.key_pem).unwrap();
    let n1 = RouterClient::with_transport(vec![c.addr(leader).to_owned()], tls(files));
    n1.join("n1", "127.0.0.1:9000", "", 0).await.unwrap();
    n1.heartbeat("n1", 0, 0).await.unwrap();
    // The link is up and idle; the certificate ends while it is.
    tokio::time::sleep(
        ends.duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
            + Duration::from_millis(1500),
    )
    .await;
    // Its next request finds the connection closed, and a new one refused at the
    // handshake: the member is out, however long its link had been up.
    let e = n1
        .heartbeat("n1", 0, 0)
        .await
        .expect_err("a request over a link whose certificate ended");
    assert!(
        matches!(e.code(), Code::Unavailable | Code::Unknown),
        "a transport error: {e:?}"
    );
    assert!(c.client().get_state().await.is_ok(), "the group serves on");
}
