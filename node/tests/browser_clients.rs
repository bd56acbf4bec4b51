//! Client security as a browser sees it: Debian's headless Chromium, driven by
//! playwright-core (`tests/browser/drive.mjs`), loads the same little web app
//! (`tests/browser/page.js`) from two local HTTP servers on two origins, one in
//! `http.allowed_origins` and one not, against a secured in-process node.
//!
//! - The allowed page watches a topic with `EventSource` (`?token=`), subscribes over
//!   a WebSocket (`?token=`, `weft.v1.json`), publishes with a CORS `fetch` (bearer
//!   token, JSON body) and sees its event on both.
//! - The disallowed page, holding the same valid token, is refused on every path.
//! - HTML form POSTs (`text/plain`, urlencoded, multipart) from either page publish
//!   nothing, and `no-cors` POSTs to `/v1/admin/drain` — even with the admin key in
//!   `?token=` — leave the node ready.
//!
//! The node's own counters prove the browser's requests reached it and were refused
//! there, so a browser that sent nothing cannot pass. Chromium, Node.js and
//! `tests/browser/node_modules` are installed by `.ci/run`; where one is missing the
//! test fails when `CI` is set and otherwise says loudly that it did not run.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use axum::http::header;
use axum::response::{Html, IntoResponse};
use serde_json::{json, Value};
use weft_testkit::auth::{self, ADMIN_KEY};
use weft_testkit::TestNode;

const LIVE: &str = "room.live";
const DENIED: &str = "room.denied";
const FORM: &str = "room.form";

/// The browser app, served by both page servers.
const PAGE_JS: &str = include_str!("browser/page.js");

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Chromium's path, or `None` (after a loud note) when it, Node.js or playwright-core
/// is missing. Panics when `CI` is set: there a missing tool is a broken setup.
fn chromium() -> Option<PathBuf> {
    let chromium = std::env::var_os("WEFT_CHROMIUM")
        .filter(|p| !p.is_empty())
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    let node = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let mut missing = Vec::new();
    if !chromium.is_file() {
        missing.push(format!(
            "Chromium at {} (apt-get install chromium, or set WEFT_CHROMIUM)",
            chromium.display()
        ));
    }
    if !node {
        missing.push("Node.js (`node` on PATH)".to_string());
    }
    if !browser_dir()
        .join("node_modules/playwright-core/package.json")
        .is_file()
    {
        missing.push("playwright-core (npm ci in node/tests/browser)".to_string());
    }
    if missing.is_empty() {
        return Some(chromium);
    }
    let what = missing.join("; ");
    if std::env::var_os("CI").is_some() {
        panic!("the browser test cannot run: missing {what}; .ci/run installs them");
    }
    // Straight to stderr, past the test harness's capture, so a plain `cargo test`
    // shows it.
    let _ = writeln!(
        std::io::stderr(),
        "\n!!!!!!!! SKIPPED: the browser test did not run: missing {what}.\n\
         !!!!!!!! Install them as .ci/run does; in CI this is a failure.\n"
    );
    None
}

/// Serves the web app on `ip` (any port); the page's origin is `http://{addr}`.
async fn serve_page(ip: &str, title: &'static str) -> SocketAddr {
    let app = axum::Router::new()
        .route(
            "/",
            axum::routing::get(move || async move {
                Html(format!(
                    "<!doctype html><meta charset=utf-8><title>{title}</title>\
                     <body><script src=\"/page.js\"></script></body>"
                ))
            }),
        )
        .route(
            "/page.js",
            axum::routing::get(|| async {
                ([(header::CONTENT_TYPE, "text/javascript")], PAGE_JS).into_response()
            }),
        );
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// A user's token that may read and publish `room.*`.
fn token(sub: &str) -> String {
    auth::hs256(&auth::claims(sub, 600, &["room.*"], &["room.*"]))
}

/// `weft_auth_refusals_total{reason="origin"}` of this node, from `/metrics`.
async fn origin_refusals(node: &TestNode) -> u64 {
    let text = node
        .http
        .get(node.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let id = format!("node=\"{}\"", node.node.config.node_id);
    text.lines()
        .filter(|l| {
            l.starts_with("weft_auth_refusals_total{")
                && l.contains(&id)
                && l.contains("reason=\"origin\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Runs `drive.mjs` with `config`; its JSON report.
async fn drive(config: Value) -> Value {
    let child = Command::new("node")
        .arg("drive.mjs")
        .arg(config.to_string())
        .current_dir(browser_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node starts");
    let pid = child.id();
    let waited = tokio::time::timeout(
        Duration::from_secs(150),
        tokio::task::spawn_blocking(move || {
            let out = child.wait_with_output().expect("drive.mjs runs");
            (out.status, out.stdout, out.stderr)
        }),
    )
    .await;
    let Ok(done) = waited else {
        let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        panic!("drive.mjs did not finish within 150 s");
    };
    let (status, stdout, stderr) = done.unwrap();
    let stderr = String::from_utf8_lossy(&stderr);
    assert!(status.success(), "drive.mjs failed ({status}): {stderr}");
    let line = String::from_utf8_lossy(&stdout);
    serde_json::from_str(line.trim())
        .unwrap_or_else(|e| panic!("drive.mjs printed no report ({e}): {line}\n{stderr}"))
}

#[tokio::test]
async fn a_page_on_an_allowed_origin_uses_every_transport_and_other_pages_change_nothing() {
    let Some(chromium) = chromium() else {
        return;
    };
    let allowed = serve_page("127.0.0.2", "weft: allowed origin").await;
    let denied = serve_page("127.0.0.3", "weft: disallowed origin").await;
    let node = auth::secured_node(|c| {
        c.http.allowed_origins = vec![format!("http://{allowed}")];
    })
    .await;
    let bad_input_before = node.node.stats.bad_input.get();
    let origin_before = origin_refusals(&node).await;

    let report = drive(json!({
        "chromium": chromium,
        "allowed_page": format!("http://{allowed}/"),
        "denied_page": format!("http://{denied}/"),
        "node": format!("http://{}", node.addr),
        "token": token("alice"),
        "admin_key": ADMIN_KEY,
        "live_topic": LIVE,
        "denied_topic": DENIED,
        "form_topic": FORM,
    }))
    .await;
    let pretty = serde_json::to_string_pretty(&report).unwrap();
    let ok = &report["allowed"];
    let no = &report["denied"];
    assert!(
        node.node.is_ready(),
        "a web page drained the node: {pretty}"
    );
    assert_eq!(ok["origin"], format!("http://{allowed}"), "{pretty}");
    assert!(
        ok["agent"]
            .as_str()
            .unwrap_or("")
            .contains("HeadlessChrome"),
        "{pretty}"
    );

    // The allowed origin: a CORS publish, seen by the EventSource and the WebSocket.
    assert_eq!(ok["publish"]["status"], 201, "CORS publish: {pretty}");
    let offset = ok["publish"]["body"]["offset"].clone();
    assert!(
        offset.is_u64(),
        "the page reads the publish result: {pretty}"
    );
    assert_eq!(node.state(LIVE).await.offset, offset.as_u64().unwrap());
    assert_eq!(ok["state"]["status"], 200, "CORS state read: {pretty}");
    assert_eq!(ok["state"]["body"]["offset"], offset, "{pretty}");
    let nonce = &ok["nonce"];
    assert_eq!(ok["sse"]["opened"], true, "EventSource opens: {pretty}");
    assert_eq!(
        ok["sse"]["wait"],
        Value::Null,
        "EventSource event: {pretty}"
    );
    let sse_events = ok["sse"]["events"].as_array().unwrap();
    assert_eq!(sse_events.len(), 1, "{pretty}");
    assert_eq!(sse_events[0]["data"]["nonce"], *nonce);
    assert!(
        sse_events[0]["id"]
            .as_str()
            .unwrap()
            .ends_with(&format!(":{offset}")),
        "the SSE id is the event's cursor: {pretty}"
    );
    assert_eq!(ok["ws"]["opened"], true, "WebSocket opens: {pretty}");
    assert_eq!(ok["ws"]["protocol"], "weft.v1.json", "{pretty}");
    assert_eq!(
        ok["ws"]["subscribed"], true,
        "WebSocket subscribe: {pretty}"
    );
    assert_eq!(ok["ws"]["wait"], Value::Null, "WebSocket event: {pretty}");
    let ws_events = ok["ws"]["events"].as_array().unwrap();
    assert_eq!(ws_events.len(), 1, "{pretty}");
    assert_eq!(ws_events[0]["topic"], LIVE);
    assert_eq!(ws_events[0]["offset"], offset);
    assert_eq!(ws_events[0]["data"]["nonce"], *nonce);

    // The disallowed origin, with the same valid token: refused on every path.
    assert_eq!(no["origin"], format!("http://{denied}"), "{pretty}");
    assert_eq!(no["sse"]["opened"], false, "EventSource refused: {pretty}");
    assert_eq!(no["sse"]["errored"], true, "{pretty}");
    assert_eq!(no["sse"]["readyState"], 2, "closed, not retrying: {pretty}");
    assert_eq!(no["sse"]["events"], json!([]), "{pretty}");
    assert_eq!(no["ws"]["opened"], false, "WebSocket refused: {pretty}");
    assert_eq!(no["ws"]["closeCode"], 1006, "{pretty}");
    for what in ["publish", "state"] {
        let err = no[what]["error"].as_str().unwrap_or("");
        assert!(err.contains("TypeError"), "{what} blocked: {pretty}");
    }
    assert_eq!(node.state(DENIED).await.offset, 0, "nothing published");

    // Forms from both pages were sent, and published nothing.
    for page in [ok, no] {
        for enctype in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data",
        ] {
            assert_eq!(
                page["forms"][enctype]["submitted"], true,
                "{enctype}: {pretty}"
            );
        }
    }
    assert_eq!(node.state(FORM).await.offset, 0, "a form published");

    // `no-cors` drains are opaque to the page, and the node is still serving.
    for page in [ok, no] {
        for how in ["anonymous", "admin_key"] {
            let d = &page["drain"][how];
            assert!(
                d["type"] == "opaque" || d["error"].is_string(),
                "{how}: {pretty}"
            );
        }
    }
    let (status, _) = node.get_json("/readyz").await;
    assert_eq!(status, 200);

    // The node refused these itself: the allowed page's forms are 415 (their origin
    // and token are good, their type is not); the disallowed page's EventSource,
    // WebSocket, publish preflight, state read, three forms and two drains are
    // origin refusals, as is the allowed page's drain with the admin key.
    assert_eq!(
        node.node.stats.bad_input.get() - bad_input_before,
        3,
        "the allowed page's forms reached the node as 415s: {pretty}"
    );
    assert_eq!(
        origin_refusals(&node).await - origin_before,
        10,
        "one origin refusal per refused request: {pretty}"
    );
}

/// The same rule without a browser: a request that says it comes from a web page (as
/// every browser POST does) is refused on the admin routes even with the admin key and
/// an allowed origin; a backend's request with the key drains.
#[tokio::test]
async fn admin_routes_refuse_web_pages_whatever_the_credential() {
    let node = TestNode::start_with(|c| {
        c.auth.api_keys = vec![auth::api_key("ops", ADMIN_KEY, &[], &[], true)];
        c.http.allowed_origins = vec!["https://app.example.com".into()];
    })
    .await;
    let drain = |headers: &[(&str, &str)]| {
        let mut req = node
            .http
            .post(node.url(&format!("/v1/admin/drain?token={ADMIN_KEY}")));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send()
    };
    for headers in [
        &[("origin", "https://app.example.com")][..],
        &[("sec-fetch-site", "cross-site")][..],
        &[("sec-fetch-site", "same-site")][..],
    ] {
        let r = drain(headers).await.unwrap();
        assert_eq!(r.status().as_u16(), 403, "{headers:?}");
        assert!(node.node.is_ready(), "{headers:?} drained the node");
    }
    let r = drain(&[]).await.unwrap();
    assert_eq!(r.status().as_u16(), 202);
    assert!(
        !node.node.is_ready(),
        "a backend's drain with the admin key works"
    );
}
