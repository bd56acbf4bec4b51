//! Revocation reaches every node: a 3-router + 3-node cluster over mutual TLS with
//! client authentication on; a user's WebSocket sessions on all three nodes close
//! (4001) within a second of `POST /v1/admin/revoke` on one of them, the token is
//! refused everywhere afterwards, and another user's sessions go on. A node that was
//! down when a user was revoked refuses that user once it is back (its peers send
//! every revocation in force on each new link), and until they have, a starting node
//! answers user tokens 503 instead of letting a revoked one in. The same cluster
//! checks that a reused Idempotency-Key with another body is 422 on every node.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use weft_testkit::proc_cluster::{NodeOptions, ProcCluster};
use weft_testkit::{subscribe_cmd, WsClient, WsIn};

const NODES: [&str; 3] = ["a", "b", "c"];
const SECRET: &str = "cluster-revocation-secret-0123456789";
const ADMIN_KEY: &str = "cluster-admin-key-0123456789";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(sub: &str) -> String {
    let claims = serde_json::json!({
        "sub": sub, "exp": now() + 600,
        "weft": {"sub": ["room.*"], "pub": ["room.*"]},
    });
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Revokes `sub` for five minutes through `url` with the admin key; the answer is 200.
async fn revoke(http: &reqwest::Client, url: &str, sub: &str) -> reqwest::Response {
    let resp = http
        .post(url)
        .bearer_auth(ADMIN_KEY)
        .header("content-type", "application/json")
        .body(format!(r#"{{"sub":"{sub}","until":{}}}"#, now() + 300))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "revoking {sub}");
    resp
}

/// A 3-router + 3-node cluster with client authentication on (the HMAC secret and an
/// admin API key), the routers' member heartbeat timeout set.
async fn start_cluster(name: &str, base: u8, heartbeat_timeout_ms: u64) -> ProcCluster {
    let dir = std::env::temp_dir().join(format!("weft-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("auth.toml");
    std::fs::write(
        &config,
        format!(
            "[auth]\nhmac_secret = \"{SECRET}\"\n[[auth.api_keys]]\nname = \"ops\"\nsha256 = \"{}\"\nadmin = true\n[ops]\npublic_cluster_view = true\n",
            weft_node::auth::apikey::sha256_hex(ADMIN_KEY)
        ),
    )
    .unwrap();
    let options = NodeOptions {
        extra_args: vec!["--config".into(), config.to_str().unwrap().into()],
        ..NodeOptions::default()
    };
    ProcCluster::start_with_options(name, base, &NODES, heartbeat_timeout_ms, options).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_closes_the_users_sessions_on_every_node() {
    let mut c = start_cluster("revoke", 170, 3000).await;
    c.converged(Duration::from_secs(30)).await;

    let (alice, bob) = (token("alice"), token("bob"));
    let mut alices = Vec::new();
    let mut bobs = Vec::new();
    for name in NODES {
        let addr = c.node(name).addr;
        for (t, list) in [(&alice, &mut alices), (&bob, &mut bobs)] {
            let mut ws = WsClient::connect_with(addr, &format!("/v1/ws?token={t}"), &[])
                .await
                .unwrap();
            let r = ws.request(subscribe_cmd("room.revoke", None)).await;
            assert!(r.error.is_none(), "{name}: {r:?}");
            list.push((name, ws));
        }
    }

    let http = reqwest::Client::new();
    let a = c.node("a");
    let t0 = Instant::now();
    let resp = revoke(&http, &a.url("/v1/admin/revoke"), "alice").await;
    let body: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(body["peers"], 2, "sent to both other nodes: {body}");
    for (name, ws) in alices.iter_mut() {
        let code = loop {
            if let WsIn::Closed(code) = ws.next().await {
                break code;
            }
        };
        assert_eq!(code, Some(4001), "alice on {name}");
    }
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "every node closed alice within {took:?}"
    );

    for name in NODES {
        let resp = http
            .get(c.node(name).url("/v1/topics/room.revoke"))
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 401, "alice's token on {name}");
    }
    // Bob goes on everywhere.
    let resp = http
        .post(a.url("/v1/topics/room.revoke/events"))
        .bearer_auth(&bob)
        .header("content-type", "application/json")
        .body("{\"still\":true}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    for (name, ws) in bobs.iter_mut() {
        let ev = ws
            .next_event()
            .await
            .unwrap_or_else(|| panic!("bob on {name}"));
        assert_eq!(ev.topic, "room.revoke");
    }

    // An Idempotency-Key reused with another body is 422 on every node, whether the
    // node owns the topic or forwards the publish to its owner.
    let publish = |node: &str, body: &'static str| {
        http.post(c.node(node).url("/v1/topics/room.idem/events"))
            .bearer_auth(&bob)
            .header("content-type", "application/json")
            .header("idempotency-key", "order-1")
            .body(body)
            .send()
    };
    assert_eq!(
        publish("a", "{\"n\":1}").await.unwrap().status().as_u16(),
        201
    );
    for name in NODES {
        let same = publish(name, "{\"n\":1}").await.unwrap();
        assert_eq!(same.status().as_u16(), 200, "replay on {name}");
        let other = publish(name, "{\"n\":2}").await.unwrap();
        assert_eq!(other.status().as_u16(), 422, "another body on {name}");
    }

    // Carol is revoked while c is down; back, c refuses her (and still alice).
    let carol = token("carol");
    c.sigterm_node("c");
    c.await_exit("c", Duration::from_secs(30)).await;
    revoke(&http, &c.node("a").url("/v1/admin/revoke"), "carol").await;
    c.restart_node("c").await;
    c.converged(Duration::from_secs(30)).await;
    let back = c.node("c");
    for (who, t, want) in [
        ("carol", &carol, 401),
        ("alice", &alice, 401),
        ("bob", &bob, 200),
    ] {
        let status = http
            .get(back.url("/v1/topics/room.revoke"))
            .bearer_auth(t)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        assert_eq!(status, want, "{who} on the restarted node");
    }
}

/// A node that starts while a member is down cannot know what that member revoked:
/// until its peers' sets are in (or `REVOCATION_HOLD` has passed) it answers user
/// tokens 503 and `/readyz` 503, while the admin API key still works. When the hold
/// ends, what the live peer sent is in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_node_holds_user_tokens_until_its_peers_revocations_are_in() {
    // A killed member stays in the membership for longer than the test runs.
    let mut c = start_cluster("revoke-hold", 190, 120_000).await;
    c.converged(Duration::from_secs(30)).await;
    let http = reqwest::Client::new();
    let (carol, bob) = (token("carol"), token("bob"));

    c.sigterm_node("c");
    c.await_exit("c", Duration::from_secs(30)).await;
    revoke(&http, &c.node("a").url("/v1/admin/revoke"), "carol").await;
    c.sigkill_node("b");
    let started = Instant::now();
    let back = c.restart_node_unready("c").await;

    let get = |t: &str| {
        http.get(back.url("/v1/topics/room.hold"))
            .bearer_auth(t)
            .send()
    };
    for (who, t) in [("carol", &carol), ("bob", &bob)] {
        let resp = get(t).await.unwrap();
        assert_eq!(resp.status().as_u16(), 503, "{who} while c waits for b");
        assert!(
            resp.headers().contains_key("retry-after"),
            "{who}: Retry-After"
        );
        let body: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
        let msg = body["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains("revocations"), "{who}: {body}");
    }
    let ready = http.get(back.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503, "/readyz while held");
    // API keys are not held: one revokes on the starting node, one opens a session.
    revoke(&http, &back.url("/v1/admin/revoke"), "dave").await;
    WsClient::connect_with(back.addr, &format!("/v1/ws?token={ADMIN_KEY}"), &[])
        .await
        .expect("a session with an API key while user tokens are held");
    let probed = started.elapsed();
    assert!(
        probed < weft_node::cluster::relay::REVOCATION_HOLD,
        "the probes must run inside the hold to mean anything (took {probed:?})"
    );

    // b stays down: the hold ends by itself, not before its time.
    {
        let back = &back;
        weft_testkit::wait::wait_until(
            Duration::from_secs(30),
            "c ready after the hold",
            || async move { back.try_get_json("/readyz").await.is_ok() },
        )
        .await;
    }
    let held = started.elapsed();
    assert!(
        held >= weft_node::cluster::relay::REVOCATION_HOLD,
        "ready after {held:?}, before the hold was over"
    );
    let dave = token("dave");
    for (who, t) in [("carol", &carol), ("dave", &dave)] {
        let status = get(t).await.unwrap().status().as_u16();
        assert_eq!(status, 401, "{who} after the hold");
    }
    // Bob gets in (a session needs no topic owner; b, which may own the topic, is down).
    WsClient::connect_with(back.addr, &format!("/v1/ws?token={bob}"), &[])
        .await
        .expect("bob's session on c after the hold");
}
