//! The embedded single-voter router over real gRPC on 127.0.0.1:0: writes, state,
//! watch resume, bad input, and a restart on the same data dir.

use std::time::Duration;

use tokio::net::TcpListener;
use tonic::Code;
use weft_proto::grpc::watch_event::Change;
use weft_router::Embedded;

fn data_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("weft-emb-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_router_serves_writes_state_and_watch_and_survives_restart() {
    let dir = data_dir("main");
    let (router, client) = Embedded::start(&dir, listener().await).await.unwrap();

    client.join("n1", "127.0.0.1:9000", "z1", 0).await.unwrap();
    client.heartbeat("n1", 3, 0).await.unwrap();
    let v = client
        .update_interest("n1", vec!["chat.a".into(), "chat.b".into()], vec![])
        .await
        .unwrap();
    let state = client.get_state().await.unwrap();
    assert_eq!(state.version, v);
    assert_eq!(state.members.len(), 1);
    assert_eq!(state.members[0].sessions, 3);
    let slots = state.slots.unwrap();
    assert_eq!(slots.owners.len(), 4096);
    assert!(slots.owners.iter().all(|o| o == "n1"));
    assert_eq!(state.interest.len(), 2);

    // Watch from 0: a snapshot first, then live changes with growing versions.
    let mut w = client.watch(0).await.unwrap();
    let first = w.message().await.unwrap().unwrap();
    assert!(matches!(first.change, Some(Change::Snapshot(_))));
    assert_eq!(first.version, v);
    let v2 = client
        .update_interest("n1", vec![], vec!["chat.a".into()])
        .await
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), w.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.version, v2);
    match ev.change {
        Some(Change::Interest(d)) => assert_eq!(d.remove, vec!["chat.a".to_string()]),
        other => panic!("{other:?}"),
    }
    // Resume from an old version replays exactly what came after it.
    let mut w = client.watch(v).await.unwrap();
    let ev = w.message().await.unwrap().unwrap();
    assert_eq!(ev.version, v2);

    // Many concurrent writers: all applied (group commit), none lost.
    let mut tasks = Vec::new();
    for i in 0..200 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            c.update_interest("n1", vec![format!("bulk.{i}")], vec![])
                .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(client.get_state().await.unwrap().interest.len(), 201);

    // Bad input: a gRPC error, never a panic, state unchanged.
    let before = client.get_state().await.unwrap();
    let e = client.heartbeat("ghost", 0, 0).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = client
        .update_interest("n1", vec!["bad/topic".into()], vec![])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let many: Vec<String> = (0..5000).map(|i| format!("t{i}")).collect();
    let e = client
        .update_interest("n1", many, vec![])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let e = client.join("bad id", "x:1", "", 0).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(client.get_state().await.unwrap(), before);

    router.shutdown().await;

    // Restart on the same directory: state kept, not re-initialised.
    let (router, client) = Embedded::start(&dir, listener().await).await.unwrap();
    let after = client.get_state().await.unwrap();
    assert_eq!(after.members.len(), 1);
    assert_eq!(after.interest.len(), 201);
    assert_eq!(after.slots.unwrap().version, slots.version);
    router.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
