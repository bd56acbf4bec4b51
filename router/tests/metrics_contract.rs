//! What a router's ops listener (`--ops-listen`) promises, checked against a live
//! `weft-router` process over mutual TLS: `promtool check metrics` accepts the
//! `/metrics` page (HELP and TYPE for every family), every family of
//! `weft_router::ops::FAMILIES` and the shared `process_*` ones is there, the Raft
//! and state figures say what the router is (leader, term, indexes, voters, members,
//! slot table), refused connections and calls are counted by reason; `/healthz` and
//! `/readyz` answer 200 on a router that leads, and `/readyz` 503 on one that knows no
//! leader.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tonic::Code;
use weft_proto::grpc;
use weft_router::identity::Peer;
use weft_router::tls::Expect;
use weft_router::RouterClient;
use weft_testkit::bin::{self, Proc, Workdir};
use weft_testkit::metrics::parse_labelled;
use weft_testkit::pki::{issue_files, tls, tls_args, Pki};
use weft_testkit::wait::wait_for;

/// A single `weft-router` started with `args` (plus `--ops-listen` and a ready file
/// on 127.0.0.1:0); its process and ready file.
async fn start(dir: &Workdir, name: &str, args: &mut Command) -> (Proc, Value) {
    let ready = dir.join(format!("{name}.ready.json"));
    let log = dir.log(name, &format!("{name}.log"));
    let out = bin::log_file(&log);
    let child = args
        .args(["--listen", "127.0.0.1:0", "--ops-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.join(name))
        .arg("--ready-file")
        .arg(&ready)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("spawn weft-router");
    let mut proc = Proc(child);
    let bound = bin::await_ready_file(&mut proc.0, &ready, name).await;
    (proc, bound)
}

async fn get(ops: &str, path: &str) -> (u16, String) {
    let r = reqwest::get(format!("http://{ops}{path}")).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn value(page: &str, name: &str) -> f64 {
    parse_labelled(page, name, "router", "1")
        .unwrap_or_else(|| panic!("{name}{{router=\"1\"}} missing from:\n{page}"))
}

fn series(page: &str, line: &str) -> bool {
    page.lines().any(|l| l == line)
}

#[tokio::test]
async fn a_leading_router_exports_its_raft_figures_and_refusals_and_passes_promtool() {
    let promtool = bin::tool("promtool", "PROMTOOL");
    let dir = Workdir::new("router-metrics", "leader");
    let pki = Arc::new(Pki::create(dir.join("certs")));
    let mut cmd = bin::command(bin::path("weft-router"));
    tls_args(
        &mut cmd,
        &pki.member_files("router-1", &Peer::Router("1".into())),
    );
    cmd.args(["--id", "1", "--raft-listen", "127.0.0.1:0"]);
    let (_router, bound) = start(&dir, "router-1", &mut cmd).await;
    let (listen, raft, ops) = (
        bound["listen"].as_str().unwrap().to_owned(),
        bound["raft_listen"].as_str().unwrap().to_owned(),
        bound["ops_listen"].as_str().unwrap().to_owned(),
    );
    wait_for(Duration::from_secs(15), "/readyz 200", || async {
        match get(&ops, "/readyz").await {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(get(&ops, "/healthz").await.0, 200);

    // A node joins and heartbeats: one active member, a slot table.
    let node = tls(issue_files(
        pki.ca(),
        pki.dir(),
        "node-n1",
        &Peer::Node("n1".into()),
    ));
    let client = RouterClient::with_transport(vec![listen.clone()], node.clone());
    client.join("n1", "127.0.0.1:9000", "", 0).await.unwrap();
    client.heartbeat("n1", 0, 0).await.unwrap();
    // Refusals: a plaintext connection (handshake), a node calling Raft (permission).
    assert!(RouterClient::new(vec![listen.clone()])
        .get_state()
        .await
        .is_err());
    let channel = node
        .channel(&raft, Expect::Router, Duration::from_secs(2))
        .unwrap();
    let e = grpc::raft_client::RaftClient::new(channel)
        .describe(grpc::DescribeRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    let page = wait_for(
        Duration::from_secs(10),
        "the figures on /metrics",
        || async {
            let (status, page) = get(&ops, "/metrics").await;
            if status != 200 {
                return Err(format!("{status}"));
            }
            let active = parse_labelled(&page, "weft_router_members", "state", "active");
            if active == Some(1.0) {
                Ok(page)
            } else {
                Err(format!("active members {active:?}"))
            }
        },
    )
    .await;

    if let Some(promtool) = promtool {
        let mut check = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            check
                .stdin
                .take()
                .unwrap()
                .write_all(page.as_bytes())
                .unwrap();
        }
        let out = check.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics:\n{}{}\n--- page ---\n{page}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for (family, kind, _) in weft_router::ops::FAMILIES
        .iter()
        .chain(weft_router::prometheus::PROCESS_FAMILIES)
    {
        assert!(
            page.contains(&format!("# HELP {family} ")),
            "{family} has no HELP line:\n{page}"
        );
        assert!(
            page.contains(&format!("# TYPE {family} {}\n", kind.name())),
            "{family} has no TYPE line:\n{page}"
        );
    }
    assert!(page.contains("weft_router_build_info{version=\""), "{page}");
    assert_eq!(value(&page, "weft_router_is_leader"), 1.0);
    assert_eq!(value(&page, "weft_router_leader_id"), 1.0);
    assert_eq!(value(&page, "weft_router_raft_voters"), 1.0);
    assert!(value(&page, "weft_router_term") >= 1.0);
    let (last, committed, applied) = (
        value(&page, "weft_router_last_log_index"),
        value(&page, "weft_router_committed_index"),
        value(&page, "weft_router_applied_index"),
    );
    // Initialisation, the leader's blank entry, Join and Heartbeat.
    assert!(applied >= 3.0, "applied {applied}");
    assert!(
        last >= committed && committed >= applied,
        "{last} {committed} {applied}"
    );
    assert!(value(&page, "weft_router_slot_table_version") >= 1.0);
    assert!(value(&page, "weft_router_state_version") >= 2.0);
    assert!(series(
        &page,
        "weft_router_members{router=\"1\",state=\"joining\"} 0"
    ));
    assert!(
        parse_labelled(&page, "weft_router_refused_total", "reason", "handshake")
            .is_some_and(|n| n >= 1.0),
        "{page}"
    );
    assert!(
        parse_labelled(
            &page,
            "weft_router_refused_total",
            "reason",
            "permission_denied"
        )
        .is_some_and(|n| n >= 1.0),
        "{page}"
    );
    for must in [
        "process_cpu_seconds_total ",
        "process_resident_memory_bytes ",
    ] {
        assert!(page.contains(&format!("\n{must}")), "{must} missing");
    }
}

#[tokio::test]
async fn a_router_without_a_leader_is_alive_but_not_ready() {
    let dir = Workdir::new("router-metrics", "alone");
    // Peers that never start: no quorum, no leader.
    let free = bin::free_addrs("127.0.0.1", 3);
    let peers = format!("1={},2={},3={}", free[0], free[1], free[2]);
    let raft = peers.split(',').next().unwrap()[2..].to_owned();
    let mut cmd = bin::command(bin::path("weft-router"));
    cmd.args(["--cluster-insecure", "--id", "1", "--raft-listen", &raft])
        .args(["--peers", &peers]);
    let (_router, bound) = start(&dir, "router-1", &mut cmd).await;
    let ops = bound["ops_listen"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(get(&ops, "/healthz").await.0, 200);
    let (status, body) = get(&ops, "/readyz").await;
    assert_eq!((status, body.trim()), (503, "no raft leader known"));
    let (_, page) = get(&ops, "/metrics").await;
    assert_eq!(value(&page, "weft_router_leader_id"), -1.0);
    assert_eq!(value(&page, "weft_router_is_leader"), 0.0);
}
