//! The hostile-input catalogue: one table of distinct bad inputs across HTTP parsing,
//! the WebSocket handshake and framing, the JSON protocol and authentication, each
//! with the code the contract documents for it (DESIGN §3.1, §3.2, §6,
//! `docs/client-security.md`). Every case runs against one secured node over real
//! sockets, written byte for byte; every HTTP refusal must carry the JSON error body.
//! The table must hold at least 100 cases, no two alike, and every one must run.
//! Afterwards the node still serves a plain subscribe and publish, and a WebSocket
//! session that was sent every bad line is still usable.
//!
//! `hostile_input.rs` holds the scenario tests (floods, limits, timeouts, bystanders
//! during each attack); this file is the breadth.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::LazyLock;

use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use weft_node::config::NamespaceConfig;
use weft_node::Config;
use weft_proto::command::ConnectCmd;
use weft_proto::Command;
use weft_testkit::auth::{self, now, sign_hs256, ADMIN_KEY, HARNESS_KEY, ISSUER, SECRET};
use weft_testkit::raw::{client_frame, exchange, read_close_code, ws_handshake};
use weft_testkit::{subscribe_cmd, WsClient, WsIn};

const BACKEND_KEY: &str = "backend-key-catalogue-0123456789";
const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4));
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Area {
    HttpParsing,
    HttpRequest,
    WsHandshake,
    WsFraming,
    JsonProtocol,
    Auth,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Input {
    /// Bytes on a fresh connection: the HTTP status, with the JSON error body.
    Http(Vec<u8>),
    /// Bytes after a good WebSocket handshake on a fresh session: the close code.
    WsBytes(Vec<u8>),
    /// One line on the long-lived authenticated session: the error reply's code; the
    /// session goes on.
    WsLine(String),
    /// A first command on a fresh session that has no credential: the close code.
    WsFirst(String),
}

struct Case {
    area: Area,
    name: &'static str,
    input: Input,
    expect: u16,
}

fn b64(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..=c.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// A user who may read `room.*`, `ro.*` and her own `user.<sub>.>`, and publish
/// `room.*` and `ro.*` (where the namespace lets clients publish).
fn claims(sub: &str) -> Value {
    auth::claims(
        sub,
        600,
        &["room.*", "ro.*", "user.{sub}.>"],
        &["room.*", "ro.*"],
    )
}

fn token(sub: &str) -> String {
    auth::hs256(&claims(sub))
}

/// `claims("alice")` changed by `f`, signed with the node's secret.
fn token_with(f: impl FnOnce(&mut Value)) -> String {
    let mut c = claims("alice");
    f(&mut c);
    auth::hs256(&c)
}

/// A JWT with this header and payload text, HS256-signed with the node's secret.
fn signed_raw(header: &str, payload: &[u8]) -> String {
    let input = format!("{}.{}", b64(header.as_bytes()), b64(payload));
    let sig = jsonwebtoken::crypto::sign(
        input.as_bytes(),
        &EncodingKey::from_secret(SECRET.as_bytes()),
        Algorithm::HS256,
    )
    .unwrap();
    format!("{input}.{sig}")
}

/// An HTTP/1.1 request with `host` and `connection: close`, the given header lines and
/// body (with its `content-length` when there is one).
fn http(method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {target} HTTP/1.1\r\nhost: weft\r\nconnection: close\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        out.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

static HARNESS_BEARER: LazyLock<String> = LazyLock::new(|| bearer(HARNESS_KEY));

/// `Authorization` for the harness's own key.
fn as_harness() -> (&'static str, &'static str) {
    ("authorization", &HARNESS_BEARER)
}

const JSON: (&str, &str) = ("content-type", "application/json");

fn publish(topic: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut h = vec![as_harness(), JSON];
    h.extend_from_slice(headers);
    http(
        "POST",
        &format!("/v1/topics/{topic}/events"),
        &h,
        body.as_bytes(),
    )
}

fn get_as_harness(target: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut h = vec![as_harness()];
    h.extend_from_slice(headers);
    http("GET", target, &h, b"")
}

fn batch(body: &str) -> Vec<u8> {
    http(
        "POST",
        "/v1/publish",
        &[as_harness(), JSON],
        body.as_bytes(),
    )
}

/// A read of `room.a` with this `Authorization` value.
fn read_with(auth: &str) -> Vec<u8> {
    http("GET", "/v1/topics/room.a", &[("authorization", auth)], b"")
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

/// A WebSocket upgrade of `target` with exactly these header lines.
fn upgrade(target: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    http("GET", target, headers, b"")
}

fn ws_headers<'a>(replace: &[(&'a str, &'a str)], drop: &[&str]) -> Vec<(&'a str, &'a str)> {
    let mut h = vec![
        ("upgrade", "websocket"),
        ("connection", "upgrade"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", KEY),
    ];
    h.retain(|(k, _)| !drop.contains(k) && !replace.iter().any(|(r, _)| r == k));
    h.extend_from_slice(replace);
    h
}

fn line(id: u64, body: &str) -> Input {
    Input::WsLine(format!(r#"{{"id":{id},{body}}}"#))
}

/// A command as the first line of a session.
fn first(cmd: Command) -> String {
    cmd.to_line(Some(1))
}

fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

/// What the table needs to know about the node's state before it runs.
struct Ctx {
    epoch: String,
    alice: String,
}

fn cases(ctx: &Ctx) -> Vec<Case> {
    use Area::*;
    let c = |area, name, input, expect| Case {
        area,
        name,
        input,
        expect,
    };
    let alice = ctx.alice.as_str();
    let alice_ws = format!("/v1/ws?token={alice}");
    let many_fields: String = (0..101).map(|i| format!("x-f{i}: v\r\n")).collect();
    let big_header = format!("x-big: {}\r\n", "b".repeat(16 * 1024));
    let head = |s: &str| s.as_bytes().to_vec();
    let healthz_with =
        |extra: &str| head(&format!("GET /healthz HTTP/1.1\r\nhost: w\r\n{extra}\r\n"));
    let valid = token("alice");
    let (h, p, s) = {
        let mut it = valid.split('.');
        (it.next().unwrap(), it.next().unwrap(), it.next().unwrap())
    };
    let wider = b64(
        json!({"sub": "alice", "exp": now() + 600, "iss": ISSUER, "aud": "weft", "weft": {"sub": [">"], "pub": [">"]}})
            .to_string()
            .as_bytes(),
    );
    let mut flipped = s.to_owned();
    let other = if flipped.starts_with('A') { "B" } else { "A" };
    flipped.replace_range(0..1, other);
    let alg_none = format!("{}.{}.", b64(br#"{"alg":"none","typ":"JWT"}"#), p);
    let ahead = format!("{}:99", ctx.epoch);
    let json_deep = nested(65);
    let ws_deep = nested(65);
    let ws_big = format!("\"{}\"", "x".repeat(4100));
    let evil = ("origin", "https://evil.test");

    vec![
        // --- HTTP parsing: what hyper refuses before any route, and our head limits.
        c(HttpParsing, "garbage request line", Input::Http(head("GARBAGE\r\n\r\n")), 400),
        c(HttpParsing, "header line without a colon", Input::Http(healthz_with("no colon here\r\n")), 400),
        c(HttpParsing, "space inside a header name", Input::Http(healthz_with("bad name: v\r\n")), 400),
        c(HttpParsing, "control byte in the request target", Input::Http(head("GET /he\x01lthz HTTP/1.1\r\nhost: w\r\n\r\n")), 400),
        c(HttpParsing, "unknown HTTP version", Input::Http(head("GET /healthz HTTP/9.9\r\nhost: w\r\n\r\n")), 400),
        c(HttpParsing, "method with a separator character", Input::Http(head("GE(T /healthz HTTP/1.1\r\nhost: w\r\n\r\n")), 400),
        c(HttpParsing, "request line without a target", Input::Http(head("GET  HTTP/1.1\r\nhost: w\r\n\r\n")), 400),
        c(HttpParsing, "obsolete line folding", Input::Http(healthz_with("x-a: 1\r\n  folded\r\n")), 400),
        c(HttpParsing, "NUL byte in a header value", Input::Http(healthz_with("x-a: a\0b\r\n")), 400),
        c(HttpParsing, "bare CR inside a header value", Input::Http(healthz_with("x-a: a\rb\r\n")), 400),
        c(HttpParsing, "non-numeric Content-Length", Input::Http(healthz_with("content-length: ten\r\n")), 400),
        c(HttpParsing, "two different Content-Lengths", Input::Http(head("POST /v1/topics/room.a/events HTTP/1.1\r\nhost: w\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}")), 400),
        c(HttpParsing, "Transfer-Encoding that does not end in chunked", Input::Http(head("POST /v1/topics/room.a/events HTTP/1.1\r\nhost: w\r\ntransfer-encoding: gzip\r\n\r\n{}")), 400),
        c(HttpParsing, "chunked on an HTTP/1.0 request", Input::Http(head("POST /v1/topics/room.a/events HTTP/1.0\r\nhost: w\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")), 400),
        c(HttpParsing, "chunk size that is not hex", {
            let mut r = head(&format!("POST /v1/topics/room.a/events HTTP/1.1\r\nhost: w\r\nauthorization: Bearer {HARNESS_KEY}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"));
            r.extend_from_slice(b"zz\r\n{}\r\n0\r\n\r\n");
            Input::Http(r)
        }, 400),
        c(HttpParsing, "chunk size past 64 bits", {
            let mut r = head(&format!("POST /v1/topics/room.a/events HTTP/1.1\r\nhost: w\r\nauthorization: Bearer {HARNESS_KEY}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"));
            r.extend_from_slice(b"fffffffffffffffffff\r\n{}\r\n0\r\n\r\n");
            Input::Http(r)
        }, 400),
        c(HttpParsing, "101 header fields", Input::Http(healthz_with(&many_fields)), 431),
        c(HttpParsing, "header block past limits.max_header_bytes", Input::Http(healthz_with(&big_header)), 431),
        c(HttpParsing, "head past the parser's read buffer", Input::Http(healthz_with(&format!("x-big: {}\r\n", "b".repeat(100 * 1024)))), 431),
        c(HttpParsing, "target past limits.max_uri_bytes", Input::Http(http("GET", &format!("/healthz?q={}", "a".repeat(8 * 1024)), &[], b"")), 414),
        c(HttpParsing, "target past the parser's 65,534 bytes", Input::Http(http("GET", &format!("/healthz?q={}", "a".repeat(65 * 1024)), &[], b"")), 414),
        // --- HTTP requests that parse but are wrong for the route.
        c(HttpRequest, "unknown route", Input::Http(http("GET", "/v1/nope", &[], b"")), 404),
        c(HttpRequest, "known route, wrong method", Input::Http(http("DELETE", "/v1/topics/room.a/events", &[as_harness()], b"")), 405),
        c(HttpRequest, "unknown method", Input::Http(http("BREW", "/healthz", &[], b"")), 405),
        c(HttpRequest, "lower-case method", Input::Http(http("get", "/healthz", &[], b"")), 405),
        c(HttpRequest, "topic with an encoded slash", Input::Http(get_as_harness("/v1/topics/a%2Fb", &[])), 400),
        c(HttpRequest, "topic in the reserved $sys namespace", Input::Http(get_as_harness("/v1/topics/$sys.stats", &[])), 400),
        c(HttpRequest, "topic of 256 bytes", Input::Http(get_as_harness(&format!("/v1/topics/{}", "a".repeat(256)), &[])), 400),
        c(HttpRequest, "malformed percent-encoding in the topic", Input::Http(get_as_harness("/v1/topics/a%ZZ", &[])), 400),
        c(HttpRequest, "cursor that is not epoch:offset", Input::Http(get_as_harness("/v1/topics/room.cur/events?since=garbage", &[])), 400),
        c(HttpRequest, "cursor ahead of the topic", Input::Http(get_as_harness(&format!("/v1/topics/room.cur/events?since={ahead}"), &[])), 400),
        c(HttpRequest, "cursor of another epoch", Input::Http(get_as_harness("/v1/topics/room.cur/events?since=zzzz:1", &[])), 410),
        c(HttpRequest, "page limit 0", Input::Http(get_as_harness("/v1/topics/room.cur/events?limit=0", &[])), 400),
        c(HttpRequest, "page limit past max_history_request", Input::Http(get_as_harness("/v1/topics/room.cur/events?limit=1001", &[])), 400),
        c(HttpRequest, "long-poll wait past 60 s", Input::Http(get_as_harness("/v1/topics/room.cur/events?wait=61", &[])), 400),
        c(HttpRequest, "watch that is not a boolean", Input::Http(get_as_harness("/v1/topics/room.cur/events?watch=maybe", &[])), 400),
        c(HttpRequest, "Last-Event-ID that is not ASCII", {
            let mut r = head(&format!("GET /v1/topics/room.cur/events?watch=true HTTP/1.1\r\nhost: w\r\nconnection: close\r\nauthorization: Bearer {HARNESS_KEY}\r\nlast-event-id: "));
            r.extend_from_slice(b"\xff\xfe\r\n\r\n");
            Input::Http(r)
        }, 400),
        c(HttpRequest, "Last-Event-ID that is no cursor, on a history page", Input::Http(get_as_harness("/v1/topics/room.cur/events", &[("last-event-id", "wmTnco%r~]-&")])), 400),
        c(HttpRequest, "multi-topic watch without a topic", Input::Http(get_as_harness("/v1/events?watch=true", &[])), 400),
        c(HttpRequest, "multi-topic watch repeating one topic past max_topics_per_watch", Input::Http(get_as_harness("/v1/events?watch=true&topic=room.a&topic=room.a&topic=room.a&topic=room.a&topic=room.a", &[])), 400),
        c(HttpRequest, "multi-topic watch past max_topics_per_watch", Input::Http(get_as_harness("/v1/events?watch=true&topic=room.a&topic=room.b&topic=room.c&topic=room.d&topic=room.e", &[])), 400),
        c(HttpRequest, "multi-topic watch naming an invalid topic", Input::Http(get_as_harness("/v1/events?watch=true&topic=a/b", &[])), 400),
        c(HttpRequest, "multi-topic read that is not a watch", Input::Http(get_as_harness("/v1/events?topic=room.a", &[])), 400),
        c(HttpRequest, "multi-topic cursor that does not parse", Input::Http(get_as_harness("/v1/events?watch=true&topic=room.a&since=%%%", &[])), 400),
        c(HttpRequest, "preflight from a disallowed origin", Input::Http(http("OPTIONS", "/v1/topics/room.a/events", &[evil, ("access-control-request-method", "POST")], b"")), 403),
        c(HttpRequest, "publish from a disallowed origin", Input::Http(publish("room.a", &[evil], "{}")), 403),
        // --- The JSON protocol over REST.
        c(JsonProtocol, "publish body that is not JSON", Input::Http(publish("room.a", &[], "not json")), 400),
        c(JsonProtocol, "empty publish body", Input::Http(publish("room.a", &[], "")), 400),
        c(JsonProtocol, "two JSON values in one body", Input::Http(publish("room.a", &[], "{} {}")), 400),
        c(JsonProtocol, "truncated JSON", Input::Http(publish("room.a", &[], "{\"a\":")), 400),
        c(JsonProtocol, "data nested past max_json_depth", Input::Http(publish("room.a", &[], &json_deep)), 400),
        c(JsonProtocol, "body that is not UTF-8", Input::Http(http("POST", "/v1/topics/room.a/events", &[as_harness(), JSON], b"\"\xff\xfe\"")), 400),
        c(JsonProtocol, "lone UTF-16 surrogate escape", Input::Http(publish("room.a", &[], r#""\ud800""#)), 400),
        c(JsonProtocol, "body past max_message_bytes", Input::Http(publish("room.a", &[], &format!("\"{}\"", "x".repeat(5000)))), 413),
        c(JsonProtocol, "Content-Length past the limit, body never sent", Input::Http(head(&format!("POST /v1/topics/room.a/events HTTP/1.1\r\nhost: w\r\nauthorization: Bearer {HARNESS_KEY}\r\ncontent-type: application/json\r\ncontent-length: 1000000\r\n\r\n"))), 413),
        c(JsonProtocol, "text/plain body (a cross-site form)", Input::Http(http("POST", "/v1/topics/room.a/events", &[as_harness(), ("content-type", "text/plain")], b"{}")), 415),
        c(JsonProtocol, "no Content-Type", Input::Http(http("POST", "/v1/topics/room.a/events", &[as_harness()], b"{}")), 415),
        c(JsonProtocol, "urlencoded body", Input::Http(http("POST", "/v1/topics/room.a/events", &[as_harness(), ("content-type", "application/x-www-form-urlencoded")], b"a=1")), 415),
        c(JsonProtocol, "multipart body", Input::Http(http("POST", "/v1/topics/room.a/events", &[as_harness(), ("content-type", "multipart/form-data; boundary=x")], b"--x--")), 415),
        c(JsonProtocol, "a JSON-like media type that is not JSON", Input::Http(http("POST", "/v1/topics/room.a/events", &[as_harness(), ("content-type", "application/json-seq")], b"{}")), 415),
        c(JsonProtocol, "event type with a space", Input::Http(publish("room.a", &[("weft-event-type", "has space")], "{}")), 400),
        c(JsonProtocol, "event type past 64 bytes", Input::Http(publish("room.a", &[("weft-event-type", &"t".repeat(65))], "{}")), 400),
        c(JsonProtocol, "Idempotency-Key past 255 bytes", Input::Http(publish("room.a", &[("idempotency-key", &"k".repeat(256))], "{}")), 400),
        c(JsonProtocol, "empty Idempotency-Key", Input::Http(publish("room.a", &[("idempotency-key", "")], "{}")), 400),
        c(JsonProtocol, "Idempotency-Key that is not ASCII", {
            let mut r = head(&format!("POST /v1/topics/room.a/events HTTP/1.1\r\nhost: w\r\nconnection: close\r\nauthorization: Bearer {HARNESS_KEY}\r\ncontent-type: application/json\r\ncontent-length: 2\r\nidempotency-key: "));
            r.extend_from_slice(b"k\xe9\r\n\r\n{}");
            Input::Http(r)
        }, 400),
        c(JsonProtocol, "Idempotency-Key reused with another body", Input::Http(publish("room.idem", &[("idempotency-key", "reuse-k")], r#"{"n":2}"#)), 422),
        c(JsonProtocol, "batch that is not JSON", Input::Http(batch("not json")), 400),
        c(JsonProtocol, "batch item with an unknown field", Input::Http(batch(r#"{"events":[{"topic":"room.a","data":1,"extra":1}]}"#)), 400),
        c(JsonProtocol, "batch item without data", Input::Http(batch(r#"{"events":[{"topic":"room.a"}]}"#)), 400),
        c(JsonProtocol, "batch item with an invalid topic", Input::Http(batch(r#"{"events":[{"topic":"a/b","data":1}]}"#)), 400),
        c(JsonProtocol, "batch without the events field", Input::Http(batch(r#"{"evnts":[]}"#)), 400),
        c(JsonProtocol, "batch past max_batch_events", Input::Http(batch(&format!(r#"{{"events":[{}]}}"#, [r#"{"topic":"room.a","data":1}"#; 6].join(",")))), 413),
        c(JsonProtocol, "batch body past max_batch_bytes", Input::Http(batch(&format!(r#"{{"events":[{{"topic":"room.a","data":"{}"}}]}}"#, "x".repeat(20 * 1024)))), 413),
        c(JsonProtocol, "streaming publish with a non-JSON content type", Input::Http(http("POST", "/v1/publish/stream", &[as_harness(), ("content-type", "text/plain")], b"{}\n")), 415),
        c(JsonProtocol, "revoke naming both sub and jti", Input::Http(http("POST", "/v1/admin/revoke", &[("authorization", &bearer(ADMIN_KEY)), JSON], br#"{"sub":"a","jti":"b","until":1}"#)), 400),
        c(JsonProtocol, "revoke with an unknown field", Input::Http(http("POST", "/v1/admin/revoke", &[("authorization", &bearer(ADMIN_KEY)), JSON], br#"{"sub":"a","until":1,"why":"x"}"#)), 400),
        // --- The WebSocket handshake.
        c(WsHandshake, "GET /v1/ws without an upgrade", Input::Http(upgrade(&alice_ws, &ws_headers(&[], &["upgrade", "connection"]))), 400),
        c(WsHandshake, "upgrade to another protocol", Input::Http(upgrade(&alice_ws, &ws_headers(&[("upgrade", "h2c")], &[]))), 400),
        c(WsHandshake, "Connection without the upgrade token", Input::Http(upgrade(&alice_ws, &ws_headers(&[("connection", "keep-alive")], &[]))), 400),
        c(WsHandshake, "Sec-WebSocket-Version 8", Input::Http(upgrade(&alice_ws, &ws_headers(&[("sec-websocket-version", "8")], &[]))), 400),
        c(WsHandshake, "no Sec-WebSocket-Key", Input::Http(upgrade(&alice_ws, &ws_headers(&[], &["sec-websocket-key"]))), 400),
        c(WsHandshake, "Sec-WebSocket-Key that is not base64", Input::Http(upgrade(&alice_ws, &ws_headers(&[("sec-websocket-key", "not base64 at all!!!!!==")], &[]))), 400),
        c(WsHandshake, "Sec-WebSocket-Key of 15 bytes", Input::Http(upgrade(&alice_ws, &ws_headers(&[("sec-websocket-key", "dGhlIHNhbXBsZSBub25j")], &[]))), 400),
        c(WsHandshake, "Sec-WebSocket-Key with non-zero trailing bits", Input::Http(upgrade(&alice_ws, &ws_headers(&[("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZR==")], &[]))), 400),
        c(WsHandshake, "only an unsupported subprotocol", Input::Http(upgrade(&alice_ws, &ws_headers(&[("sec-websocket-protocol", "weft.v1.proto")], &[]))), 400),
        c(WsHandshake, "upgrade from a disallowed origin", Input::Http(upgrade(&alice_ws, &ws_headers(&[evil], &[]))), 403),
        c(WsHandshake, "upgrade with a bad ?token=", Input::Http(upgrade("/v1/ws?token=garbage", &ws_headers(&[], &[]))), 401),
        c(WsHandshake, "upgrade with an expired ?token=", Input::Http(upgrade(&format!("/v1/ws?token={}", token_with(|c| c["exp"] = json!(now() - 60))), &ws_headers(&[], &[]))), 401),
        c(WsHandshake, "POST to /v1/ws", Input::Http(http("POST", &alice_ws, &ws_headers(&[], &[]), b"")), 405),
        // --- WebSocket framing (RFC 6455) on a live session.
        c(WsFraming, "unmasked client frame", Input::WsBytes(client_frame(0x81, b"{}", false)), 4400),
        c(WsFraming, "binary frame", Input::WsBytes(client_frame(0x82, b"\x01", true)), 4400),
        c(WsFraming, "reserved data opcode 0x3", Input::WsBytes(client_frame(0x83, b"x", true)), 4400),
        c(WsFraming, "reserved control opcode 0xB", Input::WsBytes(client_frame(0x8B, b"", true)), 4400),
        c(WsFraming, "RSV1 set with no extension", Input::WsBytes(client_frame(0xC1, b"{}", true)), 4400),
        c(WsFraming, "ping of 126 bytes", Input::WsBytes(client_frame(0x89, &[b'p'; 126], true)), 4400),
        c(WsFraming, "fragmented ping", Input::WsBytes(client_frame(0x09, b"p", true)), 4400),
        c(WsFraming, "continuation without a message", Input::WsBytes(client_frame(0x80, b"x", true)), 4400),
        c(WsFraming, "new message inside a fragmented one", Input::WsBytes([client_frame(0x01, b"{", true), client_frame(0x81, b"{}", true)].concat()), 4400),
        c(WsFraming, "text frame that is not UTF-8", Input::WsBytes(client_frame(0x81, b"\xff\xfe", true)), 4400),
        c(WsFraming, "close frame with a 1-byte payload", Input::WsBytes(client_frame(0x88, b"\x03", true)), 1002),
        c(WsFraming, "close code 1005, never sent on the wire", Input::WsBytes(client_frame(0x88, &1005u16.to_be_bytes(), true)), 1002),
        c(WsFraming, "close code below 1000", Input::WsBytes(client_frame(0x88, &999u16.to_be_bytes(), true)), 1002),
        c(WsFraming, "close reason that is not UTF-8", Input::WsBytes(client_frame(0x88, b"\x03\xe8\xff", true)), 1007),
        c(WsFraming, "frame header claiming 2^63 bytes", Input::WsBytes(vec![0x81, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4]), 4413),
        c(WsFraming, "fragmented message past max_message_bytes", Input::WsBytes([client_frame(0x01, &[b' '; 3000], true), client_frame(0x80, &[b' '; 3000], true)].concat()), 4413),
        // --- The JSON protocol over WebSocket: an error reply each, the session goes on.
        c(JsonProtocol, "line that is not JSON", Input::WsLine("{not json".into()), 400),
        c(JsonProtocol, "line that is a JSON array", Input::WsLine("[1,2]".into()), 400),
        c(JsonProtocol, "JSON followed by garbage", Input::WsLine(r#"{"id":1001,"connect":{}} x"#.into()), 400),
        c(JsonProtocol, "unknown command", line(1002, r#""frobnicate":{}"#), 400),
        c(JsonProtocol, "two commands in one message", line(1003, r#""subscribe":{"topic":"room.a"},"unsubscribe":{"topic":"room.a"}"#), 400),
        c(JsonProtocol, "id that is a string", Input::WsLine(r#"{"id":"x","subscribe":{"topic":"room.a"}}"#.into()), 400),
        c(JsonProtocol, "subscribe without a topic", line(1004, r#""subscribe":{}"#), 400),
        c(JsonProtocol, "subscribe to an invalid topic", line(1005, r#""subscribe":{"topic":"a/b"}"#), 400),
        c(JsonProtocol, "subscribe to $sys", line(1006, r#""subscribe":{"topic":"$sys.stats"}"#), 400),
        c(JsonProtocol, "subscribe with a malformed cursor", line(1007, r#""subscribe":{"topic":"room.cur","since":"garbage"}"#), 400),
        c(JsonProtocol, "subscribe with a cursor ahead of the topic", line(1008, &format!(r#""subscribe":{{"topic":"room.cur","since":"{ahead}"}}"#)), 400),
        c(JsonProtocol, "subscribe twice", line(1009, r#""subscribe":{"topic":"room.sub"}"#), 400),
        c(JsonProtocol, "unsubscribe without a subscription", line(1010, r#""unsubscribe":{"topic":"room.never"}"#), 400),
        c(JsonProtocol, "publish without data", line(1011, r#""publish":{"topic":"room.a"}"#), 400),
        c(JsonProtocol, "publish data nested past max_json_depth", line(1012, &format!(r#""publish":{{"topic":"room.a","data":{ws_deep}}}"#)), 400),
        c(JsonProtocol, "command nested past the parser's depth", line(1013, &format!(r#""publish":{{"topic":"room.a","data":{}}}"#, nested(300))), 400),
        c(JsonProtocol, "publish data past max_message_bytes", line(1014, &format!(r#""publish":{{"topic":"room.a","data":{ws_big}}}"#)), 413),
        c(JsonProtocol, "publish with an invalid event type", line(1015, r#""publish":{"topic":"room.a","data":1,"type":"a b"}"#), 400),
        c(JsonProtocol, "history limit 0", line(1016, r#""history":{"topic":"room.cur","limit":0}"#), 400),
        c(JsonProtocol, "history limit past max_history_request", line(1017, r#""history":{"topic":"room.cur","limit":1001}"#), 400),
        c(JsonProtocol, "history from a cursor of another epoch", line(1018, r#""history":{"topic":"room.cur","since":"zzzz:1"}"#), 410),
        // --- Authentication and permissions.
        c(Auth, "no credential on a secured read", Input::Http(http("GET", "/v1/topics/room.a", &[], b"")), 401),
        c(Auth, "token with alg none", Input::Http(read_with(&bearer(&alg_none))), 401),
        c(Auth, "token with a tampered payload", Input::Http(read_with(&bearer(&format!("{h}.{wider}.{s}")))), 401),
        c(Auth, "token with a tampered signature", Input::Http(read_with(&bearer(&format!("{h}.{p}.{flipped}")))), 401),
        c(Auth, "token signed with another secret", Input::Http(read_with(&bearer(&sign_hs256(&claims("alice"), "another-secret-another-secret-!!")))), 401),
        c(Auth, "token claiming RS256 over an HMAC signature", Input::Http(read_with(&bearer(&signed_raw(r#"{"alg":"RS256","typ":"JWT"}"#, claims("alice").to_string().as_bytes())))), 401),
        c(Auth, "expired token", Input::Http(read_with(&bearer(&token_with(|c| c["exp"] = json!(now() - 60))))), 401),
        c(Auth, "token not yet valid", Input::Http(read_with(&bearer(&token_with(|c| c["nbf"] = json!(now() + 3600))))), 401),
        c(Auth, "token for another audience", Input::Http(read_with(&bearer(&token_with(|c| c["aud"] = json!("other"))))), 401),
        c(Auth, "token from another issuer", Input::Http(read_with(&bearer(&token_with(|c| c["iss"] = json!("https://evil.test/"))))), 401),
        c(Auth, "token without exp", Input::Http(read_with(&bearer(&token_with(|c| {
            c.as_object_mut().unwrap().remove("exp");
        })))), 401),
        c(Auth, "token whose exp is a string", Input::Http(read_with(&bearer(&token_with(|c| c["exp"] = json!("tomorrow"))))), 401),
        c(Auth, "token whose weft claim is not an object", Input::Http(read_with(&bearer(&token_with(|c| c["weft"] = json!("everything"))))), 401),
        c(Auth, "token whose payload is not JSON", Input::Http(read_with(&bearer(&signed_raw(r#"{"alg":"HS256","typ":"JWT"}"#, b"hello")))), 401),
        c(Auth, "token whose header is not JSON", Input::Http(read_with(&bearer(&format!("{}.{p}.{s}", b64(b"not json"))))), 401),
        c(Auth, "garbage bearer credential", Input::Http(read_with("Bearer not-a-token")), 401),
        c(Auth, "three segments of garbage", Input::Http(read_with("Bearer a.b.c")), 401),
        c(Auth, "credential past 8 KiB", Input::Http(read_with(&bearer(&"x".repeat(9 * 1024)))), 401),
        c(Auth, "Bearer with nothing after it", Input::Http(read_with("Bearer ")), 401),
        c(Auth, "Basic credentials", Input::Http(read_with("Basic YWxpY2U6cGFzcw==")), 401),
        c(Auth, "different tokens in the header and ?token=", Input::Http(http("GET", &format!("/v1/topics/room.a?token={}", token("bob")), &[("authorization", &bearer(alice))], b"")), 401),
        c(Auth, "token of a revoked subject", Input::Http(read_with(&bearer(&token("revoked-user")))), 401),
        c(Auth, "token in a cookie when auth.cookie is unset", Input::Http(http("GET", "/v1/topics/room.a", &[("cookie", &format!("weft_token={alice}"))], b"")), 401),
        c(Auth, "bad ?token= on an SSE watch", Input::Http(http("GET", "/v1/topics/room.a/events?watch=true&token=garbage", &[], b"")), 401),
        c(Auth, "read of a topic the token does not allow", Input::Http(http("GET", "/v1/topics/other.x", &[("authorization", &bearer(alice))], b"")), 403),
        c(Auth, "user publish to a topic the token may only read", Input::Http(http("POST", "/v1/topics/user.alice.x/events", &[("authorization", &bearer(alice)), JSON], b"{}")), 403),
        c(Auth, "user publish where the namespace forbids clients", Input::Http(http("POST", "/v1/topics/ro.x/events", &[("authorization", &bearer(alice)), JSON], b"{}")), 403),
        c(Auth, "user batch with a topic the token may not publish", Input::Http(http("POST", "/v1/publish", &[("authorization", &bearer(alice)), JSON], br#"{"events":[{"topic":"room.a","data":1},{"topic":"other.x","data":1}]}"#)), 403),
        c(Auth, "API key publish outside its patterns", Input::Http(http("POST", "/v1/topics/room.a/events", &[("authorization", &bearer(BACKEND_KEY)), JSON], b"{}")), 403),
        c(Auth, "unknown API key", Input::Http(read_with(&bearer("unknown-key-0123456789abcdef"))), 401),
        c(Auth, "drain with a key that is not admin", Input::Http(http("POST", "/v1/admin/drain", &[("authorization", &bearer(BACKEND_KEY))], b"")), 403),
        c(Auth, "cluster view with a user token", Input::Http(http("GET", "/v1/cluster", &[("authorization", &bearer(alice))], b"")), 403),
        c(Auth, "admin key from a web page", Input::Http(http("POST", "/v1/admin/drain", &[("authorization", &bearer(ADMIN_KEY)), ("origin", "https://app.test")], b"")), 403),
        c(Auth, "presence where the namespace has it off", line(1019, r#""presence":{"topic":"user.alice.x"}"#), 403),
        c(Auth, "WebSocket subscribe the token does not allow", line(1020, r#""subscribe":{"topic":"other.x"}"#), 403),
        c(Auth, "WebSocket publish the token does not allow", line(1021, r#""publish":{"topic":"user.alice.x","data":1}"#), 403),
        c(Auth, "WebSocket publish where the namespace forbids clients", line(1022, r#""publish":{"topic":"ro.x","data":1}"#), 403),
        c(Auth, "WebSocket history the token does not allow", line(1023, r#""history":{"topic":"other.x"}"#), 403),
        c(Auth, "refresh with a garbage token", line(1024, r#""refresh":{"token":"garbage"}"#), 401),
        c(Auth, "refresh to another subject", line(1025, &format!(r#""refresh":{{"token":"{}"}}"#, token("mallory"))), 403),
        c(Auth, "a command before connect", Input::WsFirst(first(subscribe_cmd("room.a", None))), 4001),
        c(Auth, "connect without a token", Input::WsFirst(first(Command::Connect(ConnectCmd { token: None }))), 4001),
        c(Auth, "connect with an alg-none token", Input::WsFirst(first(Command::Connect(ConnectCmd { token: Some(alg_none.clone()) }))), 4001),
        c(Auth, "connect with an expired token", Input::WsFirst(first(Command::Connect(ConnectCmd { token: Some(token_with(|c| c["exp"] = json!(now() - 60))) }))), 4009),
        c(Auth, "connect with a token past 8 KiB", Input::WsFirst(first(Command::Connect(ConnectCmd { token: Some("x".repeat(9 * 1024)) }))), 4001),
    ]
}

/// The testkit's secured config plus a backend key, an allowed origin, a presence
/// namespace, one where clients may not publish, and small limits.
fn ours(c: &mut Config) {
    c.auth.api_keys.push(auth::api_key(
        "backend",
        BACKEND_KEY,
        &["orders.>"],
        &["orders.>"],
        false,
    ));
    c.http.allowed_origins = vec!["https://app.test".into()];
    c.namespaces = vec![
        NamespaceConfig {
            pattern: "room.>".into(),
            presence: true,
            ..Default::default()
        },
        NamespaceConfig {
            pattern: "ro.>".into(),
            client_publish: false,
            ..Default::default()
        },
    ];
    c.limits.max_message_bytes = 4096;
    c.limits.max_batch_events = 5;
    c.limits.max_batch_bytes = 16 * 1024;
    c.limits.max_topics_per_watch = 4;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hostile_input_gets_its_documented_code_and_the_node_serves_on() {
    let node = auth::secured_node(ours).await;
    // What some cases refer to: a topic with events, a used idempotency key, a
    // revoked subject.
    node.publish("room.cur", "{\"n\":1}").await;
    node.publish("room.cur", "{\"n\":2}").await;
    let epoch = node.state("room.cur").await.epoch;
    let first = exchange(
        node.addr,
        LOCAL,
        publish("room.idem", &[("idempotency-key", "reuse-k")], r#"{"n":1}"#),
    )
    .await;
    assert_eq!(first.status, 201, "{first:?}");
    let revoke = format!(r#"{{"sub":"revoked-user","until":{}}}"#, now() + 3600);
    let revoked = exchange(
        node.addr,
        LOCAL,
        http(
            "POST",
            "/v1/admin/revoke",
            &[("authorization", &bearer(ADMIN_KEY)), JSON],
            revoke.as_bytes(),
        ),
    )
    .await;
    assert_eq!(revoked.status, 200, "{revoked:?}");

    let ctx = Ctx {
        epoch,
        alice: token("alice"),
    };
    let table = cases(&ctx);

    // The table is what it claims: at least 100 cases, every name and input distinct.
    let mut names = HashSet::new();
    let mut inputs = HashSet::new();
    for case in &table {
        assert!(names.insert(case.name), "two cases named {:?}", case.name);
        assert!(
            inputs.insert(case.input.clone()),
            "{:?} repeats another case's input",
            case.name
        );
    }
    let mut per_area: BTreeMap<Area, usize> = BTreeMap::new();
    for case in &table {
        *per_area.entry(case.area).or_default() += 1;
    }
    eprintln!(
        "hostile-input catalogue: {} cases {per_area:?}",
        table.len()
    );
    assert!(table.len() >= 100, "only {} cases", table.len());
    assert!(
        per_area.values().all(|n| *n >= 10),
        "every area has at least 10: {per_area:?}"
    );

    // Controls: the same builders without the fault are served, so each case is
    // refused for its fault and not for how it was put together.
    let alice = ctx.alice.as_str();
    let signed = signed_raw(
        r#"{"alg":"HS256","typ":"JWT"}"#,
        claims("alice").to_string().as_bytes(),
    );
    for (what, request, status) in [
        ("plain GET", http("GET", "/healthz", &[], b""), 200),
        (
            "GET with an extra header",
            b"GET /healthz HTTP/1.1\r\nhost: w\r\nconnection: close\r\nx-a: 1\r\n\r\n".to_vec(),
            200,
        ),
        ("publish", publish("room.a", &[], "{}"), 201),
        (
            "batch",
            batch(r#"{"events":[{"topic":"room.a","data":1}]}"#),
            201,
        ),
        (
            "page from a cursor",
            get_as_harness(
                &format!("/v1/topics/room.cur/events?since={}:1", ctx.epoch),
                &[],
            ),
            200,
        ),
        ("read with a token", read_with(&bearer(alice)), 200),
        (
            "read with a hand-signed token",
            read_with(&bearer(&signed)),
            200,
        ),
        (
            "read with a token from token_with",
            read_with(&bearer(&token_with(|_| {}))),
            200,
        ),
        (
            "user publish",
            http(
                "POST",
                "/v1/topics/room.a/events",
                &[("authorization", &bearer(alice)), JSON],
                b"{}",
            ),
            201,
        ),
    ] {
        let resp = exchange(node.addr, LOCAL, request).await;
        assert_eq!(resp.status, status, "control {what}: {resp:?}");
    }
    let mut up = weft_testkit::raw::tcp_from(node.addr, LOCAL).await;
    up.write_all(&upgrade(
        &format!("/v1/ws?token={alice}"),
        &ws_headers(&[], &[]),
    ))
    .await
    .unwrap();
    let mut status_line = [0u8; 12];
    tokio::io::AsyncReadExt::read_exact(&mut up, &mut status_line)
        .await
        .unwrap();
    assert_eq!(&status_line, b"HTTP/1.1 101", "control upgrade");
    drop(up);

    // The long-lived session every bad line goes to.
    let mut session =
        WsClient::connect_with(node.addr, &format!("/v1/ws?token={}", ctx.alice), &[])
            .await
            .unwrap();
    let r = session.request(subscribe_cmd("room.sub", None)).await;
    assert!(r.error.is_none(), "{r:?}");

    let bad0 = node.node.stats.bad_input.get();
    let mut ran = 0;
    let mut wrong = Vec::new();
    for case in &table {
        let got: Result<u16, String> = match &case.input {
            Input::Http(bytes) => {
                let resp = exchange(node.addr, LOCAL, bytes.clone()).await;
                match resp.check_error_body() {
                    Ok(()) => Ok(resp.status),
                    Err(e) if resp.status >= 400 => {
                        Err(format!("{} without the error body: {e}", resp.status))
                    }
                    Err(_) => Ok(resp.status),
                }
            }
            Input::WsBytes(bytes) => {
                let mut s =
                    ws_handshake(node.addr, LOCAL, &format!("/v1/ws?token={}", ctx.alice)).await;
                let _ = s.write_all(bytes).await;
                read_close_code(&mut s)
                    .await
                    .ok_or_else(|| "closed without a close frame".to_owned())
            }
            Input::WsLine(text) => {
                session.send_text(text).await;
                loop {
                    match session.next().await {
                        WsIn::Msg(m) if m.push.is_some() => continue,
                        WsIn::Msg(m) => match &m.error {
                            Some(e) => break Ok(e.code),
                            None => break Err(format!("not refused: {m:?}")),
                        },
                        WsIn::Closed(code) => {
                            panic!("{}: the session was closed ({code:?})", case.name)
                        }
                    }
                }
            }
            Input::WsFirst(cmd) => {
                let mut c = WsClient::connect_with(node.addr, "/v1/ws", &[])
                    .await
                    .unwrap();
                c.send_text(cmd).await;
                loop {
                    match c.next().await {
                        WsIn::Msg(_) => continue,
                        WsIn::Closed(code) => {
                            break code.ok_or_else(|| "closed without a code".to_owned())
                        }
                    }
                }
            }
        };
        ran += 1;
        match got {
            Ok(code) if code == case.expect => {}
            Ok(code) => wrong.push(format!(
                "{:?} {}: expected {}, got {code}",
                case.area, case.name, case.expect
            )),
            Err(e) => wrong.push(format!("{:?} {}: {e}", case.area, case.name)),
        }
    }
    assert_eq!(ran, table.len(), "every case ran");
    assert!(
        wrong.is_empty(),
        "{} of {} cases answered wrongly:\n{}",
        wrong.len(),
        table.len(),
        wrong.join("\n")
    );
    assert!(
        node.node.stats.bad_input.get() > bad0,
        "the refusals were counted"
    );

    // The session that took every bad line still works …
    let r = session.request(subscribe_cmd("room.after", None)).await;
    assert!(r.error.is_none(), "{r:?}");
    // … and a new subscriber gets a new event.
    let mut fresh =
        WsClient::connect_with(node.addr, &format!("/v1/ws?token={}", token("carol")), &[])
            .await
            .unwrap();
    let r = fresh.request(subscribe_cmd("room.after", None)).await;
    assert!(r.error.is_none(), "{r:?}");
    let p = node.publish("room.after", "{\"served\":true}").await;
    for c in [&mut session, &mut fresh] {
        let ev = c.next_event().await.expect("the event after the catalogue");
        assert_eq!((ev.topic.as_str(), ev.offset), ("room.after", p.offset));
    }
    node.stop().await;
}
