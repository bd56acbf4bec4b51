//! Client security with real parts: tokens minted here for HS256, RS256 (key made by
//! the `openssl` CLI), ES256 and EdDSA (rcgen); a JWKS served by a real local HTTP
//! server that rotates its key; API keys; permissions on every read and write;
//! WebSocket connect/refresh/expiry; SSE expiry; revocation; origins and CORS.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use weft_node::Config;
use weft_proto::Command;
use weft_testkit::auth::{self, hs256, now, ADMIN_KEY, SECRET};
use weft_testkit::{subscribe_cmd, HttpStream, TestNode, WsClient, WsIn};

const BACKEND_KEY: &str = "backend-key-0123456789";

/// A secured test node (this file's config on top of the testkit's) whose harness
/// calls authenticate with [`auth::HARNESS_KEY`].
async fn secured_node(f: impl FnOnce(&mut Config)) -> TestNode {
    auth::secured_node(|c| {
        ours(c);
        f(c);
    })
    .await
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("weft-auth-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Alice-style claims: may read `room.*` and her own `user.<sub>.>`, publish `room.*`.
fn claims(sub: &str, exp_in: i64) -> serde_json::Value {
    auth::claims(sub, exp_in, &["room.*", "user.{sub}.>"], &["room.*"])
}

/// The testkit's JWT (HS256 + the given PEM public keys), admin and harness keys, and
/// this file's own.
fn secured(c: &mut Config, public_keys: Vec<PathBuf>) {
    auth::secure(c);
    c.auth.public_keys = public_keys;
    ours(c);
}

/// This file's additions: a backend key and a namespace with presence.
fn ours(c: &mut Config) {
    c.auth.api_keys.push(auth::api_key(
        "backend",
        BACKEND_KEY,
        &["orders.>", "room.*"],
        &["orders.>"],
        false,
    ));
    c.namespaces = vec![weft_node::config::NamespaceConfig {
        pattern: "room.>".into(),
        presence: true,
        ..Default::default()
    }];
}

struct Signer {
    alg: Algorithm,
    key: EncodingKey,
    public_pem: PathBuf,
}

fn keys(d: &Path) -> Vec<Signer> {
    let rsa_priv = d.join("rsa.key");
    let rsa_pub = d.join("rsa.pub.pem");
    let ok = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&rsa_priv)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl is installed")
        .success();
    assert!(ok);
    assert!(std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&rsa_priv)
        .arg("-out")
        .arg(&rsa_pub)
        .status()
        .unwrap()
        .success());
    let mut out = vec![Signer {
        alg: Algorithm::RS256,
        key: EncodingKey::from_rsa_pem(&std::fs::read(&rsa_priv).unwrap()).unwrap(),
        public_pem: rsa_pub,
    }];
    for (alg, sig, name) in [
        (Algorithm::ES256, &rcgen::PKCS_ECDSA_P256_SHA256, "ec"),
        (Algorithm::EdDSA, &rcgen::PKCS_ED25519, "ed"),
    ] {
        let kp = rcgen::KeyPair::generate_for(sig).unwrap();
        let public = d.join(format!("{name}.pub.pem"));
        std::fs::write(&public, kp.public_key_pem()).unwrap();
        let private = kp.serialize_pem();
        let key = match alg {
            Algorithm::ES256 => EncodingKey::from_ec_pem(private.as_bytes()).unwrap(),
            _ => EncodingKey::from_ed_pem(private.as_bytes()).unwrap(),
        };
        out.push(Signer {
            alg,
            key,
            public_pem: public,
        });
    }
    out
}

async fn get(node: &TestNode, path: &str, token: Option<&str>) -> (u16, String) {
    let mut req = node.http.get(node.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// A WebSocket session with `token` in the query string (as browsers send it).
async fn ws_with_token(node: &TestNode, token: &str) -> WsClient {
    WsClient::connect_with(node.addr, &format!("/v1/ws?token={token}"), &[])
        .await
        .unwrap()
}

async fn post(node: &TestNode, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut req = node
        .http
        .post(node.url(path))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test]
async fn tokens_of_every_algorithm_verify_and_every_bad_token_is_refused() {
    let d = dir("algs");
    let signers = keys(&d);
    let pems = signers.iter().map(|s| s.public_pem.clone()).collect();
    let node = TestNode::start_with(|c| secured(c, pems)).await;

    let good = claims("alice", 60);
    let mut tokens = vec![("HS256".to_string(), hs256(&good))];
    for s in &signers {
        tokens.push((
            format!("{:?}", s.alg),
            encode(&Header::new(s.alg), &good, &s.key).unwrap(),
        ));
    }
    for (alg, t) in &tokens {
        assert_eq!(
            get(&node, "/v1/topics/room.a", Some(t)).await.0,
            200,
            "{alg}"
        );
    }

    let with = |k: &str, v: serde_json::Value| {
        let mut c = good.clone();
        c[k] = v;
        hs256(&c)
    };
    let mut tampered = tokens[1].1.clone().into_bytes();
    let mid = tampered.iter().position(|b| *b == b'.').unwrap() + 5;
    tampered[mid] = if tampered[mid] == b'A' { b'B' } else { b'A' };
    let foreign = encode(
        &Header::new(Algorithm::HS256),
        &good,
        &EncodingKey::from_secret(b"someone-else-someone-else-someone"),
    )
    .unwrap();
    let bad = [
        ("expired", with("exp", (now() - 10).into())),
        ("not yet valid", with("nbf", (now() + 600).into())),
        ("wrong issuer", with("iss", "https://evil.test/".into())),
        ("wrong audience", with("aud", "other".into())),
        (
            "alg none",
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0."
                .into(),
        ),
        ("tampered", String::from_utf8(tampered).unwrap()),
        ("foreign key", foreign),
        ("garbage", "not-a-token".into()),
    ];
    for (why, t) in &bad {
        let (status, body) = get(&node, "/v1/topics/room.a", Some(t)).await;
        assert_eq!(status, 401, "{why}: {body}");
        assert!(!body.contains(t.as_str()), "{why}: the token is echoed");
        assert!(body.contains("\"code\":401"), "{why}: {body}");
    }
    // The same refusals on the query-string path browsers use.
    let (status, _) = get(
        &node,
        &format!("/v1/topics/room.a?token={}", bad[0].1),
        None,
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = get(&node, "/v1/topics/room.a", None).await;
    assert_eq!(status, 401, "no credentials");

    let (_, metrics) = get(&node, "/metrics", None).await;
    for reason in ["expired", "invalid", "missing"] {
        assert!(
            metrics.contains(&format!("reason=\"{reason}\"")),
            "refusals by reason: {reason}"
        );
    }
    assert!(!metrics.contains(SECRET));
}

#[tokio::test]
async fn permissions_follow_token_patterns_and_api_keys() {
    let node = TestNode::start_with(|c| secured(c, vec![])).await;
    let alice = hs256(&claims("alice", 60));

    // Reads: the token's `sub` patterns, with {sub} expanded.
    for (path, want) in [
        ("/v1/topics/room.a", 200),
        ("/v1/topics/user.alice.inbox", 200),
        ("/v1/topics/user.bob.inbox", 403),
        ("/v1/topics/secret.x/events", 403),
        ("/v1/topics/secret.x/events?wait=1", 403),
        ("/v1/events?topic=room.a&topic=secret.x&watch=true", 403),
        ("/v1/topics/room.a/presence", 200),
    ] {
        assert_eq!(get(&node, path, Some(&alice)).await.0, want, "GET {path}");
    }
    // Writes: the `pub` patterns.
    for (path, want) in [
        ("/v1/topics/room.a/events", 201),
        ("/v1/topics/user.alice.x/events", 403),
    ] {
        assert_eq!(
            post(&node, path, Some(&alice), "{}").await.0,
            want,
            "POST {path}"
        );
    }
    let batch = r#"{"events":[{"topic":"room.a","data":1},{"topic":"orders.x","data":2}]}"#;
    assert_eq!(post(&node, "/v1/publish", Some(&alice), batch).await.0, 403);
    // A user is never an admin.
    assert_eq!(
        post(&node, "/v1/admin/drain", Some(&alice), "{}").await.0,
        403
    );
    assert_eq!(get(&node, "/v1/cluster", Some(&alice)).await.0, 403);

    // Backend key: its own patterns; not an admin.
    assert_eq!(
        post(&node, "/v1/publish", Some(BACKEND_KEY), batch).await.0,
        201
    );
    assert_eq!(
        get(&node, "/v1/topics/orders.x", Some(BACKEND_KEY)).await.0,
        200
    );
    assert_eq!(
        get(&node, "/v1/topics/room.a", Some(BACKEND_KEY)).await.0,
        403
    );
    assert_eq!(
        post(&node, "/v1/admin/drain", Some(BACKEND_KEY), "{}")
            .await
            .0,
        403
    );
    assert_eq!(
        get(&node, "/v1/topics/orders.x", Some("wrong-key-0000"))
            .await
            .0,
        401
    );
    // Admin key: admin routes only through it.
    assert_eq!(get(&node, "/v1/cluster", Some(ADMIN_KEY)).await.0, 200);
    assert_eq!(get(&node, "/v1/cluster", None).await.0, 401);
    // Probes stay public.
    assert_eq!(get(&node, "/healthz", None).await.0, 200);
    assert_eq!(get(&node, "/readyz", None).await.0, 200);
    assert!(node.node.is_ready(), "nothing here drained the node");

    // WebSocket: the same rules, a refusal is a 403 reply and the session goes on.
    let mut ws = ws_with_token(&node, &alice).await;
    let r = ws.request(subscribe_cmd("secret.x", None)).await;
    assert_eq!(r.error.unwrap().code, 403);
    let r = ws.request(subscribe_cmd("room.a", None)).await;
    assert!(r.error.is_none(), "{r:?}");
    let publish = |topic: &str| {
        Command::Publish(weft_proto::command::PublishCmd {
            topic: topic.into(),
            data: serde_json::value::RawValue::from_string("{\"x\":1}".into()).unwrap(),
            kind: None,
        })
    };
    assert_eq!(
        ws.request(publish("orders.x")).await.error.unwrap().code,
        403
    );
    assert!(ws.request(publish("room.a")).await.error.is_none());
    let ev = ws.next_event().await.unwrap();
    assert_eq!(ev.topic, "room.a");
}

/// `weft_auth_refusals_total{reason="rate_limited"}` once it reaches `at_least` (the
/// recorder exports on a period), or what it was after 5 s.
async fn rate_refusals(node: &TestNode, at_least: f64) -> f64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, text) = get(node, "/metrics", None).await;
        let n = weft_testkit::metrics::parse_labelled(
            &text,
            "weft_auth_refusals_total",
            "reason",
            "rate_limited",
        )
        .unwrap_or(0.0);
        if n >= at_least || std::time::Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn an_api_key_is_held_to_its_own_publish_and_subscribe_rates() {
    const SLOW_KEY: &str = "slow-key-0123456789abcdef";
    let node = secured_node(|c| {
        let mut slow = auth::api_key("slow", SLOW_KEY, &["orders.>"], &["orders.>"], false);
        // One per second each, a burst of two.
        slow.publishes_per_s = 1;
        slow.subscribes_per_s = 1;
        c.auth.api_keys.push(slow);
    })
    .await;
    let before = rate_refusals(&node, 0.0).await;

    // Publishes: the burst, then 429 with Retry-After; another key is not held by it.
    for want in [201, 201, 429] {
        let resp = node
            .http
            .post(node.url("/v1/topics/orders.a/events"))
            .bearer_auth(SLOW_KEY)
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), want);
        if want == 429 {
            assert_eq!(resp.headers()["retry-after"], "1");
            let body = resp.text().await.unwrap();
            assert!(
                body.contains("publish rate") && !body.contains(SLOW_KEY),
                "{body}"
            );
        }
    }
    assert_eq!(
        post(&node, "/v1/topics/orders.a/events", Some(BACKEND_KEY), "{}")
            .await
            .0,
        201
    );

    // Subscribes: REST reads and WebSocket subscribes draw on one bucket per key.
    let (status, _) = get(&node, "/v1/topics/orders.a", Some(SLOW_KEY)).await;
    assert_eq!(status, 200);
    let mut ws = WsClient::connect_with(
        node.addr,
        "/v1/ws",
        &[("authorization", &format!("Bearer {SLOW_KEY}"))],
    )
    .await
    .unwrap();
    let r = ws.request(subscribe_cmd("orders.a", None)).await;
    assert!(r.error.is_none(), "the burst's second: {r:?}");
    let r = ws.request(subscribe_cmd("orders.b", None)).await;
    assert_eq!(r.error.expect("over the key's rate").code, 429);
    let (status, body) = get(&node, "/v1/topics/orders.a/events", Some(SLOW_KEY)).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("subscribe rate"), "{body}");
    // The refused session goes on: a second later the key may subscribe again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = ws.request(subscribe_cmd("orders.b", None)).await;
    assert!(r.error.is_none(), "a token came back: {r:?}");
    assert_eq!(
        get(&node, "/v1/topics/orders.a", Some(BACKEND_KEY)).await.0,
        200,
        "another key has its own bucket"
    );

    // Every refusal counted by its reason.
    assert_eq!(rate_refusals(&node, before + 3.0).await, before + 3.0);
}

#[tokio::test]
async fn a_user_holds_at_most_max_connections_per_user_sessions_over_every_transport() {
    let node = secured_node(|c| c.limits.max_connections_per_user = 2).await;
    let alice = hs256(&claims("alice", 60));
    let bob = hs256(&claims("bob", 60));
    let ws_status = |token: String| {
        let addr = node.addr;
        async move {
            match WsClient::connect_with(addr, &format!("/v1/ws?token={token}"), &[]).await {
                Ok(c) => Ok(c),
                Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
                Err(e) => panic!("{e}"),
            }
        }
    };
    // Two places: one WebSocket and one SSE stream.
    let first = ws_status(alice.clone())
        .await
        .expect("alice's first session");
    let sse = HttpStream::open(
        &node.http,
        &node.url(&format!(
            "/v1/topics/room.u/events?watch=true&token={alice}"
        )),
        &[],
    )
    .await;
    assert_eq!(sse.status, 200);
    // A third is refused, on either transport; another user is not.
    assert_eq!(ws_status(alice.clone()).await.err(), Some(429));
    let resp = node
        .http
        .get(node.url(&format!(
            "/v1/topics/room.u/events?watch=true&token={alice}"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    let _bob = ws_status(bob).await.expect("bob has places of his own");
    // A closed session gives its place back.
    first.close().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match ws_status(alice.clone()).await {
            Ok(_) => break,
            Err(429) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(code) => panic!("alice's place did not come back: {code}"),
        }
    }
    drop(sse);
}

#[tokio::test]
async fn websocket_refreshed_three_times_keeps_every_event_and_expiry_closes_4009() {
    let node = secured_node(|_| {}).await;

    // Without a credential at the handshake, a command before `connect` closes 4001.
    let mut ws = WsClient::connect_with(node.addr, "/v1/ws", &[])
        .await
        .unwrap();
    ws.send(subscribe_cmd("room.r", None)).await;
    assert!(matches!(ws.next().await, WsIn::Closed(Some(4001))));
    // A bad token in `connect` closes 4001 too.
    let mut ws = WsClient::connect_with(node.addr, "/v1/ws", &[])
        .await
        .unwrap();
    ws.send(Command::Connect(weft_proto::command::ConnectCmd {
        token: Some(hs256(&claims("alice", -5))),
    }))
    .await;
    assert!(matches!(ws.next().await, WsIn::Closed(Some(4009 | 4001))));

    // connect, then refresh three times while events flow: nothing is lost.
    let mut ws = WsClient::connect_with(node.addr, "/v1/ws", &[])
        .await
        .unwrap();
    let r = ws
        .request(Command::Connect(weft_proto::command::ConnectCmd {
            token: Some(hs256(&claims("alice", 4))),
        }))
        .await;
    assert!(r.error.is_none(), "{r:?}");
    assert!(ws
        .request(subscribe_cmd(
            "room.r",
            Some(&format!("{}:0", node.state("room.r").await.epoch))
        ))
        .await
        .error
        .is_none());
    let mut next = 1u64;
    for round in 0..3 {
        for _ in 0..5 {
            node.publish("room.r", &format!("{{\"n\":{next}}}")).await;
            next += 1;
        }
        let r = ws
            .request(Command::Refresh(weft_proto::command::RefreshCmd {
                token: hs256(&claims("alice", 4)),
            }))
            .await;
        assert!(r.error.is_none(), "refresh {round}: {r:?}");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // A refresh to another subject is refused; the session goes on.
    let r = ws
        .request(Command::Refresh(weft_proto::command::RefreshCmd {
            token: hs256(&claims("mallory", 60)),
        }))
        .await;
    assert_eq!(r.error.unwrap().code, 403);
    let mut seen = Vec::new();
    while seen.len() < 15 {
        seen.push(ws.next_event().await.expect("event").offset);
    }
    assert_eq!(seen, (1..=15).collect::<Vec<_>>(), "every event, in order");

    // No more refreshes: `expiring`, then `disconnect{4009}` and close 4009.
    let mut expiring = false;
    let mut disconnect = None;
    let code = loop {
        match ws.next().await {
            WsIn::Msg(m) => {
                let p = m.push.unwrap_or_default();
                expiring |= p.expiring.is_some();
                if let Some(d) = p.disconnect {
                    disconnect = Some(d.code);
                }
            }
            WsIn::Closed(code) => break code,
        }
    };
    assert!(expiring, "told to refresh before expiry");
    assert_eq!((disconnect, code), (Some(4009), Some(4009)));

    // Meanwhile events go on; a new token and the cursor resume with nothing lost.
    node.publish("room.r", "{\"n\":16}").await;
    let state = node.state("room.r").await;
    let mut ws = ws_with_token(&node, &hs256(&claims("alice", 60))).await;
    let r = ws
        .request(subscribe_cmd(
            "room.r",
            Some(&format!("{}:15", state.epoch)),
        ))
        .await;
    let result: serde_json::Value = serde_json::from_str(r.result.unwrap().get()).unwrap();
    assert_eq!(result["recovered"], true);
    assert_eq!(result["events"][0]["offset"], 16);
}

#[tokio::test]
async fn a_refresh_to_a_narrower_token_ends_the_subscriptions_it_no_longer_allows() {
    let node = secured_node(|_| {}).await;
    let narrow = |sub: &str| {
        let mut c = claims(sub, 60);
        c["weft"]["sub"] = serde_json::json!(["user.{sub}.>"]);
        hs256(&c)
    };
    let mut ws = ws_with_token(&node, &hs256(&claims("alice", 60))).await;
    for t in ["room.a", "room.b", "user.alice.inbox"] {
        let r = ws.request(subscribe_cmd(t, None)).await;
        assert!(r.error.is_none(), "{t}: {r:?}");
    }
    node.publish("room.a", "{\"before\":1}").await;

    let id = ws
        .send(Command::Refresh(weft_proto::command::RefreshCmd {
            token: narrow("alice"),
        }))
        .await;
    // Everything queued before the refresh, then one `unsubscribed` per topic the new
    // token refuses, then the refresh's reply.
    let mut events = Vec::new();
    let mut ended = Vec::new();
    loop {
        let m = ws.next_msg().await;
        if m.id == Some(id) {
            assert!(m.error.is_none(), "refresh: {m:?}");
            break;
        }
        let p = m.push.expect("a push before the reply");
        let topic = p.topic.expect("a topic push");
        if let Some(u) = p.unsubscribed {
            assert_eq!(u.code, 403, "{topic}");
            assert!(!u.reason.is_empty());
            ended.push(topic);
        } else if p.event.is_some() {
            assert!(
                ended.is_empty(),
                "an event of {topic} after an unsubscribed push"
            );
            events.push(topic);
        }
    }
    ended.sort();
    assert_eq!(ended, ["room.a", "room.b"]);
    assert_eq!(
        events,
        ["room.a"],
        "the event before the refresh is delivered"
    );

    // From now on only what the new token allows arrives.
    node.publish("room.a", "{\"after\":1}").await;
    node.publish("room.b", "{\"after\":1}").await;
    node.publish("user.alice.inbox", "{\"after\":1}").await;
    let next = ws
        .next_event()
        .await
        .expect("the kept subscription's event");
    assert_eq!(next.topic, "user.alice.inbox");
    // Subscribing again is refused 403; the session goes on.
    let r = ws.request(subscribe_cmd("room.a", None)).await;
    assert_eq!(r.error.map(|e| e.code), Some(403));
    // Unsubscribing an ended one: it is no longer a subscription.
    let r = ws
        .request(Command::Unsubscribe(weft_proto::command::UnsubscribeCmd {
            topic: "room.b".into(),
        }))
        .await;
    assert_eq!(r.error.map(|e| e.code), Some(400));
    node.publish("user.alice.inbox", "{\"again\":1}").await;
    let next = ws.next_event().await.expect("still served");
    assert_eq!(next.topic, "user.alice.inbox");
    assert_eq!(
        node.node.stats.subscriptions.get(),
        1,
        "the ended ones are gone"
    );

    // A refresh that keeps every topic ends none.
    let r = ws
        .request(Command::Refresh(weft_proto::command::RefreshCmd {
            token: narrow("alice"),
        }))
        .await;
    assert!(r.error.is_none() && r.id.is_some());
    node.publish("user.alice.inbox", "{\"last\":1}").await;
    let m = ws.next_msg().await;
    let p = m.push.expect("push");
    assert!(p.unsubscribed.is_none() && p.event.is_some(), "{p:?}");
}

#[tokio::test]
async fn sse_watch_ends_at_token_expiry_with_a_disconnect_event() {
    let node = secured_node(|_| {}).await;
    let token = hs256(&claims("alice", 2));
    let mut sse = HttpStream::open(
        &node.http,
        &node.url(&format!(
            "/v1/topics/room.s/events?watch=true&token={token}"
        )),
        &[],
    )
    .await;
    assert_eq!(sse.status, 200);
    node.publish("room.s", "{\"a\":1}").await;
    let mut got_event = false;
    let disconnect = loop {
        let e = sse
            .next_sse()
            .await
            .expect("the stream ends with a disconnect event");
        match e.event.as_str() {
            "message" => got_event = true,
            "disconnect" => break e.data,
            _ => {}
        }
    };
    assert!(got_event);
    let d: serde_json::Value = serde_json::from_str(&disconnect).unwrap();
    assert_eq!(d["code"], 4009);
    assert!(sse.next_sse().await.is_none(), "the stream ends");
}

#[tokio::test]
async fn a_token_from_the_cookie_and_a_secret_file_works_on_every_path_and_ndjson_ends_at_expiry() {
    let d = dir("cookie");
    let secret_file = d.join("hmac.secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let node = secured_node(|c| {
        // The HS256 secret from a file only (trailing newline trimmed), the token also
        // from a cookie, one allowed origin.
        c.auth.hmac_secret = weft_node::config::Secret::new("");
        c.auth.hmac_secret_file = Some(secret_file);
        c.auth.cookie = Some("weft_token".into());
        c.http.allowed_origins = vec!["https://app.example.com".into()];
    })
    .await;
    let alice = hs256(&claims("alice", 60));
    let cookie = format!("theme=dark; weft_token={alice}");
    let origin = ("origin", "https://app.example.com");

    // REST read and publish with the cookie alone; a credentialed CORS answer.
    let resp = node
        .http
        .post(node.url("/v1/topics/room.c/events"))
        .header("cookie", &cookie)
        .header(origin.0, origin.1)
        .header("content-type", "application/json")
        .body("{\"n\":1}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    assert_eq!(resp.headers()["access-control-allow-credentials"], "true");
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let preflight = node
        .http
        .request(
            reqwest::Method::OPTIONS,
            node.url("/v1/topics/room.c/events"),
        )
        .header(origin.0, origin.1)
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status().as_u16(), 204);
    assert_eq!(
        preflight.headers()["access-control-allow-credentials"],
        "true"
    );
    // A bad token in the cookie is refused like any other, and not echoed.
    let resp = node
        .http
        .get(node.url("/v1/topics/room.c"))
        .header("cookie", "weft_token=not.a.token")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    assert!(!resp.text().await.unwrap().contains("not.a.token"));

    // SSE and WebSocket with the cookie (as a browser on the same site sends it).
    let mut sse = HttpStream::open(
        &node.http,
        &node.url("/v1/topics/room.c/events?watch=true"),
        &[("cookie", &cookie)],
    )
    .await;
    assert_eq!(sse.status, 200);
    let mut ws = WsClient::connect_with(node.addr, "/v1/ws", &[("cookie", &cookie), origin])
        .await
        .unwrap();
    let r = ws.request(subscribe_cmd("room.c", None)).await;
    assert!(r.error.is_none(), "{r:?}");
    node.publish("room.c", "{\"n\":2}").await;
    assert_eq!(ws.next_event().await.unwrap().topic, "room.c");
    loop {
        let e = sse.next_sse().await.expect("the SSE stream delivers");
        if e.event == "message" && e.data.contains("\"n\":2") {
            break;
        }
    }

    // NDJSON ends at the token's expiry with a disconnect line (code 4009).
    let short = hs256(&claims("alice", 2));
    let mut nd = HttpStream::open(
        &node.http,
        &node.url("/v1/topics/room.c/events?watch=true"),
        &[
            ("cookie", &format!("weft_token={short}")),
            ("accept", "application/x-ndjson"),
        ],
    )
    .await;
    assert_eq!(nd.status, 200);
    node.publish("room.c", "{\"n\":3}").await;
    let mut got_event = false;
    let disconnect = loop {
        let line = nd
            .next_ndjson()
            .await
            .expect("the stream ends with a disconnect line");
        if let Some(d) = line.get("disconnect") {
            break d.clone();
        }
        got_event |= line["data"]["n"] == 3;
    };
    assert!(got_event, "the event before expiry arrived");
    assert_eq!(disconnect["code"], 4009);
    assert_eq!(disconnect["reconnect"], true);
    assert!(nd.next_ndjson().await.is_none(), "the stream ends");
}

#[tokio::test]
async fn revocation_closes_live_sessions_and_refuses_the_token() {
    let node = secured_node(|_| {}).await;
    let token = hs256(&claims("alice", 600));
    let mut ws = WsClient::connect_with(
        node.addr,
        "/v1/ws",
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await
    .unwrap();
    assert!(ws
        .request(subscribe_cmd("room.v", None))
        .await
        .error
        .is_none());
    let bob = hs256(&claims("bob", 600));
    let mut bystander = ws_with_token(&node, &bob).await;
    assert!(bystander
        .request(subscribe_cmd("room.v", None))
        .await
        .error
        .is_none());

    let body = format!(r#"{{"sub":"alice","until":{}}}"#, now() + 300);
    assert_eq!(
        post(
            &node,
            "/v1/admin/revoke",
            Some(&alice_not_admin(&token)),
            &body
        )
        .await
        .0,
        403
    );
    let t0 = std::time::Instant::now();
    assert_eq!(
        post(&node, "/v1/admin/revoke", Some(ADMIN_KEY), &body)
            .await
            .0,
        200
    );
    let code = loop {
        if let WsIn::Closed(code) = ws.next().await {
            break code;
        }
    };
    assert_eq!(code, Some(4001));
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "closed within a second"
    );
    assert_eq!(get(&node, "/v1/topics/room.v", Some(&token)).await.0, 401);
    // Others go on.
    node.publish("room.v", "{}").await;
    assert_eq!(bystander.next_event().await.unwrap().offset, 1);
}

/// The user's own token, which may not revoke anything.
fn alice_not_admin(token: &str) -> String {
    token.to_owned()
}

#[tokio::test]
async fn origins_cors_and_content_types() {
    let node = secured_node(|c| {
        c.http.allowed_origins = vec![
            "https://app.example.com".into(),
            "https://*.example.org".into(),
        ];
    })
    .await;
    let preflight = |origin: &'static str| {
        node.http
            .request(
                reqwest::Method::OPTIONS,
                node.url("/v1/topics/room.a/events"),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .send()
    };
    let ok = preflight("https://app.example.com").await.unwrap();
    assert_eq!(ok.status().as_u16(), 204);
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert!(ok.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("Authorization"));
    assert_eq!(
        preflight("https://a.example.org")
            .await
            .unwrap()
            .status()
            .as_u16(),
        204
    );
    assert_eq!(
        preflight("https://evil.test")
            .await
            .unwrap()
            .status()
            .as_u16(),
        403
    );

    // A cross-site request that needs no preflight is refused before it acts.
    let admin = node
        .http
        .post(node.url("/v1/admin/drain"))
        .header("origin", "https://evil.test")
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status().as_u16(), 403);
    assert!(node.node.is_ready());
    // Publishing needs application/json: an HTML form's types get 415.
    let alice = hs256(&claims("alice", 60));
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        let r = node
            .http
            .post(node.url("/v1/topics/room.a/events"))
            .header("content-type", ct)
            .bearer_auth(&alice)
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 415, "{ct}");
    }
    // WebSocket upgrades follow the same origin list.
    let refused = WsClient::connect_with(
        node.addr,
        &format!("/v1/ws?token={alice}"),
        &[("origin", "https://evil.test")],
    )
    .await;
    assert!(
        refused.is_err(),
        "a disallowed origin cannot open a WebSocket"
    );
    let allowed = WsClient::connect_with(
        node.addr,
        &format!("/v1/ws?token={alice}"),
        &[("origin", "https://app.example.com")],
    )
    .await;
    assert!(allowed.is_ok());
}

#[tokio::test]
async fn development_mode_allows_anonymous_but_not_cross_site_admin() {
    let node = TestNode::start().await;
    assert!(node.node.auth.dev_mode());
    assert_eq!(
        post(&node, "/v1/topics/dev.t/events", None, "{}").await.0,
        201
    );
    // A page on any site may read (CORS is open in development mode), but cannot reach
    // the admin routes, as a `no-cors` fetch would try.
    for (method, path, want) in [
        (reqwest::Method::GET, "/v1/topics/dev.t", 200),
        (reqwest::Method::POST, "/v1/admin/drain", 403),
    ] {
        let r = node
            .http
            .request(method.clone(), node.url(path))
            .header("origin", "https://anywhere.test")
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status().as_u16(),
            want,
            "{method} {path} from another site"
        );
    }
    assert!(node.node.is_ready());
    // A bad token is refused even though anonymous access is on.
    assert_eq!(
        get(&node, "/v1/topics/dev.t", Some("bad.to.ken")).await.0,
        401
    );
}

#[tokio::test]
async fn jwks_from_a_url_rotates_keys_without_a_restart() {
    let jwks = Arc::new(Mutex::new(serde_json::json!({"keys": []})));
    let served = jwks.clone();
    let app = axum::Router::new().route(
        "/jwks",
        axum::routing::get(move || {
            let served = served.clone();
            async move { served.lock().unwrap().to_string() }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mint = |kid: &str| {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let key = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
        let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap();
        jwk.common.key_id = Some(kid.into());
        (key, jwk)
    };
    let sign = |key: &EncodingKey, kid: &str, sub: &str| {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(kid.into());
        encode(&h, &claims(sub, 60), key).unwrap()
    };
    let (k1, jwk1) = mint("k1");
    *jwks.lock().unwrap() = serde_json::json!({"keys": [jwk1]});
    let node = TestNode::start_with(|c| {
        c.auth.jwks = Some(url.clone());
        c.auth.issuer = Some(auth::ISSUER.into());
        c.auth.audience = Some(auth::AUDIENCE.into());
    })
    .await;
    let t1 = sign(&k1, "k1", "alice");
    let mut status = (0, String::new());
    for _ in 0..50 {
        status = get(&node, "/v1/topics/room.j", Some(&t1)).await;
        if status.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status.0, 200, "a token of the first key: {}", status.1);
    // The IdP rotates: k2 replaces k1. A token naming k2 makes the node refetch.
    let (k2, jwk2) = mint("k2");
    *jwks.lock().unwrap() = serde_json::json!({"keys": [jwk2]});
    let t2 = sign(&k2, "k2", "alice");
    // Unknown-kid refetches are spaced by at least a second (no fetch amplification).
    tokio::time::sleep(weft_node::auth::jwt::UNKNOWN_KID_REFETCH + Duration::from_millis(100))
        .await;
    assert_eq!(
        get(&node, "/v1/topics/room.j", Some(&t2)).await.0,
        200,
        "the new key, no restart"
    );
    assert_eq!(
        get(&node, "/v1/topics/room.j", Some(&t1)).await.0,
        401,
        "the retired key"
    );
    // A token naming a key the IdP never had is refused.
    let (k3, _) = mint("k3");
    assert_eq!(
        get(&node, "/v1/topics/room.j", Some(&sign(&k3, "k3", "alice")))
            .await
            .0,
        401
    );
}
