//! Raft on an address of its own (`--raft-listen`, issue 11): three real `weft-router`
//! processes over mutual TLS, each serving `weft.v1.Router` on `--listen` and
//! `weft.v1.Raft` on `--raft-listen`, `--peers` naming the Raft addresses. They elect
//! a leader and serve a node; each service answers only where it is mounted
//! (`UNIMPLEMENTED` elsewhere); a follower's redirect names the leader's *Router*
//! address; Raft still takes only router certificates; a leader's failure is survived.

use std::sync::Arc;
use std::time::Duration;

use tonic::Code;
use weft_proto::grpc;
use weft_router::identity::Peer;
use weft_router::tls::{Expect, Transport};
use weft_router::RouterClient;
use weft_testkit::bin::Workdir;
use weft_testkit::pki::{issue_files, tls, Pki};
use weft_testkit::routers::RouterGroup;
use weft_testkit::wait::wait_for;

/// `Raft.Vote` at `addr` with bytes that are no vote (what answers says which gate
/// the call reached).
async fn raft_call(transport: &Transport, addr: &str) -> tonic::Status {
    let channel = transport
        .channel(addr, Expect::Router, Duration::from_secs(2))
        .unwrap();
    let mut client = grpc::raft_client::RaftClient::new(channel);
    tokio::time::timeout(
        Duration::from_secs(10),
        client.vote(grpc::RaftPayload {
            json: b"not a vote".to_vec(),
        }),
    )
    .await
    .expect("answered within 10 s")
    .unwrap_err()
}

/// A follower's answer to a Join by node n1: UNAVAILABLE and the `weft-leader` it
/// names.
async fn redirect_from(transport: &Transport, addr: &str) -> Result<String, String> {
    let channel = transport
        .channel(addr, Expect::Router, Duration::from_secs(2))
        .unwrap();
    let err = grpc::router_client::RouterClient::new(channel)
        .join(grpc::JoinRequest {
            id: "n1".into(),
            addr: "127.0.0.1:9000".into(),
            zone: String::new(),
            load: 0,
        })
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
    let mut g = RouterGroup::start_split(&dir, 50, 60_000, Some(pki.clone())).await;
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
        let (api, raft) = (g.addr(id).to_owned(), g.raft_addr(id).unwrap().to_owned());
        // Raft on the Router address: not there.
        let e = raft_call(&router, &api).await;
        assert_eq!(e.code(), Code::Unimplemented, "Raft on {api}: {e:?}");
        // Raft on the Raft address: a router passes the gate (the bytes are refused
        // as such), a node does not.
        let e = raft_call(&router, &raft).await;
        assert_eq!(e.code(), Code::InvalidArgument, "Raft on {raft}: {e:?}");
        let e = raft_call(&node, &raft).await;
        assert_eq!(e.code(), Code::PermissionDenied, "node on {raft}: {e:?}");
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
