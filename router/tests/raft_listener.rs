//! Raft on an address of its own (`--raft-listen`, issue 11): three real `weft-router`
//! processes over mutual TLS, each serving `weft.v1.Router` on `--listen` and
//! `weft.v1.Raft` on `--raft-listen`, `--peers` naming the Raft addresses. They elect
//! a leader and serve a node; each service answers only where it is mounted
//! (`UNIMPLEMENTED` elsewhere); a follower's redirect names the leader's *Router*
//! address; Raft still takes only router certificates, and malformed Raft messages
//! are refused `INVALID_ARGUMENT` with the group unharmed; a leader's failure is
//! survived.

use std::sync::Arc;
use std::time::Duration;

use tonic::Code;
use weft_proto::grpc;
use weft_router::identity::Peer;
use weft_router::tls::{Expect, Transport};
use weft_router::RouterClient;
use weft_testkit::bin::Workdir;
use weft_testkit::pki::{issue_files, tls, Pki};
use weft_testkit::routers::{join_request, RouterGroup};
use weft_testkit::wait::wait_for;

/// `Raft.Vote` at `addr` without its vote (what answers says which gate the call
/// reached).
async fn raft_call(transport: &Transport, addr: &str) -> tonic::Status {
    let channel = transport
        .channel(addr, Expect::Router, Duration::from_secs(2))
        .unwrap();
    let mut client = grpc::raft_client::RaftClient::new(channel);
    tokio::time::timeout(
        Duration::from_secs(10),
        client.vote(grpc::VoteRequest::default()),
    )
    .await
    .expect("answered within 10 s")
    .unwrap_err()
}

/// Malformed Raft messages a router certificate may send: each is refused
/// `INVALID_ARGUMENT` (the router checks them before openraft sees them).
async fn malformed_are_refused(transport: &Transport, addr: &str) {
    let channel = transport
        .channel(addr, Expect::Router, Duration::from_secs(2))
        .unwrap();
    let mut client = grpc::raft_client::RaftClient::new(channel);
    let leader = Some(grpc::LeaderId {
        term: 1,
        node_id: 9,
    });
    let vote = Some(grpc::RaftVote {
        leader_id: leader,
        committed: true,
    });
    let append = |entries| grpc::AppendEntriesRequest {
        vote,
        prev_log_id: None,
        entries,
        leader_commit: None,
    };
    let no_log_id = grpc::Entry {
        log_id: None,
        payload: Some(grpc::entry::Payload::Blank(grpc::Blank {})),
    };
    let bad_command = grpc::Entry {
        log_id: Some(grpc::LogId {
            leader_id: leader,
            index: 1,
        }),
        // A command with nothing in it.
        payload: Some(grpc::entry::Payload::Command(grpc::MetaCommand {
            command: None,
        })),
    };
    let empty_membership = grpc::Entry {
        log_id: bad_command.log_id,
        payload: Some(grpc::entry::Payload::Membership(grpc::Membership::default())),
    };
    for (what, req) in [
        ("an entry without a log id", append(vec![no_log_id])),
        ("an empty command", append(vec![bad_command])),
        ("an empty membership", append(vec![empty_membership])),
        (
            "an AppendEntries without a vote",
            grpc::AppendEntriesRequest::default(),
        ),
    ] {
        let e = client.append_entries(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
    }
    let e = client
        .install_snapshot(grpc::InstallSnapshotRequest {
            vote,
            meta: None,
            offset: 0,
            data: vec![],
            done: true,
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::InvalidArgument,
        "a snapshot without meta: {e:?}"
    );
}

/// A follower's answer to a Join by node n1: UNAVAILABLE and the `weft-leader` it
/// names.
async fn redirect_from(transport: &Transport, addr: &str) -> Result<String, String> {
    let channel = transport
        .channel(addr, Expect::Router, Duration::from_secs(2))
        .unwrap();
    let err = grpc::router_client::RouterClient::new(channel)
        .join(join_request("n1", "127.0.0.1:9000"))
        .await
        .err()
        .ok_or("a follower accepted a write")?;
    if err.code() != Code::Unavailable {
        return Err(format!("{err:?}"));
    }
    err.metadata()
        .get("weft-leader")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| format!("no weft-leader yet: {}", err.message()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_with_their_own_raft_address_elect_serve_and_keep_services_apart() {
    let dir = Workdir::new("raft-listener", "split");
    let pki = Arc::new(Pki::create(dir.join("certs")));
    let mut g = RouterGroup::start(&dir, 50, 60_000, pki.clone()).await;
    let leader = g.leader(Duration::from_secs(20)).await;
    let follower = g.ids().into_iter().find(|id| *id != leader).unwrap();

    // A node (its own certificate) joins and heartbeats through a follower.
    let node = tls(issue_files(
        pki.ca(),
        pki.dir(),
        "node-n1",
        &Peer::Node("n1".into()),
    ));
    let via_follower =
        RouterClient::with_transport(vec![g.addr(follower).to_owned()], node.clone());
    via_follower
        .join("n1", "127.0.0.1:9000", "z", 0)
        .await
        .unwrap();
    via_follower.heartbeat("n1", 0, 0).await.unwrap();
    via_follower
        .update_interest("n1", vec!["split.topic".into()], vec![])
        .await
        .unwrap();
    let state = g.state(Duration::from_secs(10)).await;
    assert_eq!(state.members.len(), 1, "{state:?}");
    assert_eq!(
        state.leader_addr,
        g.addr(leader),
        "GetState names the Router address"
    );

    // The follower's redirect names the leader's Router address, not its Raft one.
    let router = tls(issue_files(
        pki.ca(),
        pki.dir(),
        "router-9",
        &Peer::Router("9".into()),
    ));
    let named = wait_for(
        Duration::from_secs(10),
        "a redirect naming the leader",
        || redirect_from(&node, g.addr(follower)),
    )
    .await;
    assert_eq!(named, g.addr(leader));

    for id in g.ids() {
        let (api, raft) = (g.addr(id).to_owned(), g.raft_addr(id).to_owned());
        // Raft on the Router address: not there.
        let e = raft_call(&router, &api).await;
        assert_eq!(e.code(), Code::Unimplemented, "Raft on {api}: {e:?}");
        // Raft on the Raft address: a router passes the gate (the bytes are refused
        // as such), a node does not.
        let e = raft_call(&router, &raft).await;
        assert_eq!(e.code(), Code::InvalidArgument, "Raft on {raft}: {e:?}");
        let e = raft_call(&node, &raft).await;
        assert_eq!(e.code(), Code::PermissionDenied, "node on {raft}: {e:?}");
        malformed_are_refused(&router, &raft).await;
        // The Router API on the Raft address: not there either.
        let e = RouterClient::with_transport(vec![raft.clone()], pki.admin_transport())
            .get_state()
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unimplemented, "Router on {raft}: {e:?}");
    }

    // The leader dies: a new one takes writes, reached through the survivors.
    g.kill(leader);
    let client = RouterClient::with_transport(
        g.ids().iter().map(|id| g.addr(*id).to_owned()).collect(),
        node.clone(),
    );
    wait_for(
        Duration::from_secs(15),
        "a write after failover",
        || async {
            client
                .update_interest("n1", vec!["after.failover".into()], vec![])
                .await
                .map_err(|e| format!("{e:?}"))
        },
    )
    .await;
    let new_leader = g.leader(Duration::from_secs(10)).await;
    assert_ne!(new_leader, leader);
    let other = g.ids().into_iter().find(|id| *id != new_leader).unwrap();
    let named = wait_for(
        Duration::from_secs(10),
        "a redirect naming the new leader",
        || redirect_from(&node, g.addr(other)),
    )
    .await;
    assert_eq!(named, g.addr(new_leader));
}

/// Router 3 is down while more entries are committed than the log keeps (a snapshot
/// every 1,000, 200 kept): when it comes back, the leader can only send it a snapshot
/// — InstallSnapshot over the protobuf messages — and it ends with the leader's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_behind_the_purged_log_catches_up_from_a_snapshot() {
    let dir = Workdir::new("raft-listener", "snapshot");
    let pki = Arc::new(Pki::create(dir.join("certs")));
    let mut g = RouterGroup::start(&dir, 56, 600_000, pki.clone()).await;
    g.leader(Duration::from_secs(20)).await;
    let node = tls(issue_files(
        pki.ca(),
        pki.dir(),
        "node-n1",
        &Peer::Node("n1".into()),
    ));
    let client =
        RouterClient::with_transport(vec![g.addr(1).to_owned(), g.addr(2).to_owned()], node);
    client.join("n1", "127.0.0.1:9000", "", 0).await.unwrap();
    let behind = if g.leader(Duration::from_secs(5)).await == 3 {
        2
    } else {
        3
    };
    g.kill(behind);
    // One entry per write: a single writer waits for each.
    for i in 0..1300u64 {
        client.heartbeat("n1", i, 0).await.unwrap();
    }
    client
        .update_interest("n1", vec!["after.snapshot".into()], vec![])
        .await
        .unwrap();
    let want = g.state(Duration::from_secs(10)).await;
    g.spawn(behind).await;
    let caught_up = g.client_for(behind);
    let got = wait_for(
        Duration::from_secs(20),
        "the restarted router catches up",
        || async {
            let s = caught_up.get_state().await.map_err(|e| format!("{e:?}"))?;
            if s.version >= want.version {
                Ok(s)
            } else {
                Err(format!("at version {} of {}", s.version, want.version))
            }
        },
    )
    .await;
    assert_eq!(got.members, want.members);
    assert_eq!(got.interest, want.interest);
    assert_eq!(got.slots, want.slots);
    let log = std::fs::read_to_string(dir.join(format!("router-{behind}.log"))).unwrap();
    assert!(
        log.contains("installed a snapshot from the leader"),
        "router {behind} caught up without a snapshot"
    );
}
