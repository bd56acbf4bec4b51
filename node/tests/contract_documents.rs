//! `/v1/openapi.json` and `/v1/asyncapi.json` describe the node that serves them:
//! every documented path answers on the real router with a documented status, and
//! every documented error body has the contract's shape. The limits the document
//! states (`x-weft-limits`, and every `limits.<name> (default N)` in its prose) are the
//! configuration's defaults, and every operation documents the answers a limit can
//! give it (414, 429, 431, 503).

use serde_json::Value;
use weft_testkit::TestNode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_path_is_served_with_a_documented_status() {
    let node = TestNode::start().await;
    let (status, openapi) = node.get_json("/v1/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(openapi["openapi"], "3.1.0");
    let paths = openapi["paths"].as_object().unwrap();
    assert!(paths.len() >= 11, "only {} paths documented", paths.len());
    for (path, ops) in paths {
        let url = node.url(&path.replace("{topic}", "doc.t"));
        for (method, op) in ops.as_object().unwrap() {
            if path == "/v1/admin/drain" {
                // Calling it would drain the node under test: check it is routed
                // (a GET is refused with 405, not 404) and that 202 is documented.
                let resp = node.http.get(&url).send().await.unwrap();
                assert_eq!(resp.status().as_u16(), 405, "{path} is not routed");
                assert!(
                    op["responses"]["202"].is_object(),
                    "{path}: 202 undocumented"
                );
                continue;
            }
            let documented: Vec<u16> = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .map(|k| k.parse().unwrap())
                .collect();
            let req = match method.as_str() {
                "get" if path == "/v1/events" => node.http.get(format!("{url}?topic=a&watch=true")),
                "get" if path.ends_with("/events") => node.http.get(format!("{url}?wait=0")),
                "get" if path == "/v1/ws" => node.http.get(&url),
                "get" => node.http.get(&url),
                "post" if path == "/v1/publish" => node
                    .http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(r#"{"events":[{"topic":"doc.t","data":1}]}"#),
                "post" => node
                    .http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body("{}"),
                other => panic!("undocumented method {other}"),
            };
            let resp = req.send().await.unwrap();
            let got = resp.status().as_u16();
            assert_ne!(got, 404, "{method} {path} is documented but not routed");
            assert!(
                documented.contains(&got),
                "{method} {path} answered {got}, documented {documented:?}"
            );
            if got >= 400 {
                let body: serde_json::Value =
                    serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
                assert_eq!(body["error"]["code"], got, "{method} {path}");
            }
        }
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncapi_examples_are_what_the_protocol_parses_and_sends() {
    let node = TestNode::start().await;
    let (status, doc) = node.get_json("/v1/asyncapi.json").await;
    assert_eq!((status, doc["asyncapi"].as_str()), (200, Some("3.0.0")));
    let messages = doc["channels"]["session"]["messages"].as_object().unwrap();
    let mut commands = 0;
    for (name, m) in messages {
        let example = m["examples"][0]["payload"].to_string();
        if name.starts_with("cmd_") {
            weft_proto::parse_command(&example).unwrap_or_else(|e| panic!("{name}: {e}"));
            commands += 1;
        } else {
            let parsed: weft_proto::ServerMessage = serde_json::from_str(&example).unwrap();
            assert!(
                parsed.result.is_some() || parsed.error.is_some() || parsed.push.is_some(),
                "{name}"
            );
        }
    }
    assert_eq!(commands, 7, "every command of DESIGN §3.2 is documented");
    node.stop().await;
}

/// The written document (the one the node serves, before it sets the marked bounds to
/// its own configuration).
fn written_openapi() -> Value {
    serde_json::from_str(weft_node::transport::contract::OPENAPI).expect("openapi.json is JSON")
}

/// `limits.<field>` → default, from `Limits::default()` as the configuration serialises it.
fn default_limits() -> serde_json::Map<String, Value> {
    let Value::Object(fields) =
        serde_json::to_value(weft_node::config::Limits::default()).expect("Limits serialises")
    else {
        panic!("Limits serialises as a table")
    };
    fields
        .into_iter()
        .map(|(k, v)| (format!("limits.{k}"), v))
        .collect()
}

/// Every string in `doc` (descriptions, summaries), with where it is.
fn strings<'a>(doc: &'a Value, at: String, out: &mut Vec<(String, &'a str)>) {
    match doc {
        Value::String(s) => out.push((at, s)),
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                strings(v, format!("{at}/{i}"), out);
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                strings(v, format!("{at}/{k}"), out);
            }
        }
        _ => {}
    }
}

/// Each `limits.<name>` in `text`, with the number written right after it if there is
/// one (`limits.x (default 5)`, `limits.x, default 5`, `limits.x 5`).
fn mentions(text: &str) -> Vec<(String, Option<u64>)> {
    let mut out = Vec::new();
    for (at, _) in text.match_indices("limits.") {
        if text[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
            continue; // `x-weft-limits.` or similar, not a configuration name
        }
        let rest = &text[at + "limits.".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        if name.is_empty() {
            continue; // `limits.*`
        }
        let after = rest[name.len()..].trim_start_matches([' ', ',', '(']);
        let after = after.strip_prefix("default ").unwrap_or(after);
        let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
        out.push((format!("limits.{name}"), digits.parse().ok()));
    }
    out
}

#[test]
fn every_configurable_limit_is_documented_with_its_default() {
    let doc = written_openapi();
    let defaults = default_limits();
    let table = doc["x-weft-limits"]
        .as_object()
        .expect("the document has an x-weft-limits table");
    let documented: Vec<&String> = table.keys().collect();
    let configured: Vec<&String> = defaults.keys().collect();
    let missing: Vec<_> = configured
        .iter()
        .filter(|k| !table.contains_key(**k))
        .collect();
    let stale: Vec<_> = documented
        .iter()
        .filter(|k| !defaults.contains_key(**k))
        .collect();
    assert!(
        missing.is_empty(),
        "limits the document does not state: {missing:?}"
    );
    assert!(
        stale.is_empty(),
        "x-weft-limits names what the configuration lacks: {stale:?}"
    );
    for (name, entry) in table {
        assert_eq!(entry["default"], defaults[name], "x-weft-limits {name}");
        for field in ["unit", "applies", "answer"] {
            assert!(
                entry[field].as_str().is_some_and(|s| !s.is_empty()),
                "x-weft-limits {name} has no {field}"
            );
        }
    }

    // The prose says the same numbers as the table.
    let mut texts = Vec::new();
    strings(&doc, String::new(), &mut texts);
    let mut checked = 0;
    for (at, text) in texts {
        for (name, number) in mentions(text) {
            let Some(default) = defaults.get(&name) else {
                panic!("{at} names {name}, which the configuration does not have: {text}");
            };
            if let Some(n) = number {
                assert_eq!(
                    Some(n),
                    default.as_u64(),
                    "{at} states {name} as {n}: {text}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 40, "only {checked} stated defaults found");

    // The fixed limits the node exports as constants.
    let fixed = &doc["x-weft-fixed-limits"];
    assert_eq!(
        fixed["publish_stream_in_flight"]["value"],
        weft_node::transport::publish_stream::MAX_IN_FLIGHT
    );
}

#[test]
fn every_operation_documents_the_answers_of_the_limits() {
    let doc = written_openapi();
    for (name, status) in [("TooManyRequests", "429"), ("Unavailable", "503")] {
        let r = &doc["components"]["responses"][name];
        assert_eq!(
            r["headers"]["Retry-After"]["required"], true,
            "{status} ({name}) documents Retry-After"
        );
    }
    let ops = doc["paths"].as_object().unwrap();
    let mut n = 0;
    for (path, methods) in ops {
        for (method, op) in methods.as_object().unwrap() {
            let r = &op["responses"];
            for (status, component) in [
                ("414", "UriTooLong"),
                ("429", "TooManyRequests"),
                ("431", "HeadersTooLarge"),
                ("503", "Unavailable"),
            ] {
                assert_eq!(
                    r[status]["$ref"],
                    format!("#/components/responses/{component}"),
                    "{method} {path}: {status}"
                );
            }
            // Every 429 names the per-address limits that can answer any request.
            let why = r["429"]["description"].as_str().unwrap_or_default();
            assert!(
                why.contains("limits.connects_per_ip_per_s")
                    && why.contains("limits.max_connections_per_ip"),
                "{method} {path}: 429 does not say which limits: {why}"
            );
            n += 1;
        }
    }
    assert!(n >= 17, "{n} operations");
    let rest = |path: &str, method: &str, status: &str| {
        doc["paths"][path][method]["responses"][status]["description"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    // The limits of a caller, where they apply.
    let publish = rest("/v1/topics/{topic}/events", "post", "429");
    assert!(
        publish.contains("limits.api_key_publishes_per_s"),
        "{publish}"
    );
    let read = rest("/v1/topics/{topic}/events", "get", "429");
    assert!(read.contains("limits.api_key_subscribes_per_s"), "{read}");
    assert!(read.contains("limits.max_connections_per_user"), "{read}");
    let ws = rest("/v1/ws", "get", "503");
    assert!(ws.contains("limits.new_sessions_per_s"), "{ws}");
}
