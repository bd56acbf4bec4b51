//! `/v1/openapi.json` and `/v1/asyncapi.json` describe the node that serves them:
//! every documented path answers on the real router with a documented status, and
//! every documented error body has the contract's shape.

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
