//! The machine-readable contracts the node serves: the REST API (OpenAPI 3.1,
//! `/v1/openapi.json`) and the WebSocket protocol (AsyncAPI 3.0, `/v1/asyncapi.json`).
//!
//! The documents are written in `node/contract/` with the default limits. Every
//! schema bound that comes from configuration is marked `"x-weft-limit":
//! "limits.<name>"`; the node serves the OpenAPI document with those bounds
//! (`maximum` or `maxItems`) set to its own configuration, so a client generated
//! from a node's document knows that node's limits. `tests/contract_documents.rs`
//! holds the documents to the routes, and a bounded schemathesis run holds the
//! server to the document.

use bytes::Bytes;
use serde_json::Value;

use crate::config::Limits;

pub const OPENAPI: &str = include_str!("../../contract/openapi.json");
pub const ASYNCAPI: &str = include_str!("../../contract/asyncapi.json");

/// The configured value of a `x-weft-limit` name; `None` for a name the node does not
/// know (a unit test keeps the document free of those).
fn limit(limits: &Limits, name: &str) -> Option<u64> {
    let v = match name {
        "limits.max_history_request" => limits.max_history_request,
        "limits.max_wait_s" => limits.max_wait_s as usize,
        "limits.max_topics_per_watch" => limits.max_topics_per_watch,
        "limits.max_batch_events" => limits.max_batch_events,
        _ => return None,
    };
    Some(v as u64)
}

/// Sets every marked bound in `doc` from `limits`; returns the names it saw.
fn apply(doc: &mut Value, limits: &Limits, seen: &mut Vec<String>) {
    match doc {
        Value::Object(map) => {
            if let Some(name) = map.get("x-weft-limit").and_then(Value::as_str) {
                let name = name.to_owned();
                if let Some(v) = limit(limits, &name) {
                    for key in ["maximum", "maxItems"] {
                        if map.contains_key(key) {
                            map.insert(key.into(), v.into());
                        }
                    }
                }
                seen.push(name);
            }
            map.values_mut().for_each(|v| apply(v, limits, seen));
        }
        Value::Array(items) => items.iter_mut().for_each(|v| apply(v, limits, seen)),
        _ => {}
    }
}

/// The OpenAPI document with this node's limits.
pub fn openapi(limits: &Limits) -> Bytes {
    let mut doc: Value = serde_json::from_str(OPENAPI).expect("the OpenAPI document is JSON");
    apply(&mut doc, limits, &mut Vec::new());
    Bytes::from(serde_json::to_vec(&doc).expect("a JSON value serialises"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The written document states the default limits, and names only limits the
    /// node knows.
    #[test]
    fn the_written_bounds_are_the_defaults_and_every_marker_is_known() {
        let mut doc: Value = serde_json::from_str(OPENAPI).unwrap();
        let written = doc.clone();
        let mut seen = Vec::new();
        apply(&mut doc, &Limits::default(), &mut seen);
        assert_eq!(doc, written, "a bound in openapi.json is not the default");
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 4, "{seen:?}");
        for name in &seen {
            assert!(limit(&Limits::default(), name).is_some(), "unknown {name}");
        }
    }

    #[test]
    fn the_served_document_carries_the_configured_limits() {
        let limits = Limits {
            max_history_request: 50,
            max_topics_per_watch: 3,
            ..Limits::default()
        };
        let doc: Value = serde_json::from_slice(&openapi(&limits)).unwrap();
        let get = &doc["paths"]["/v1/topics/{topic}/events"]["get"]["parameters"];
        let limit = get
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "limit")
            .unwrap();
        assert_eq!(limit["schema"]["maximum"], 50);
        let topics = &doc["paths"]["/v1/events"]["get"]["parameters"][0];
        assert_eq!(topics["schema"]["maxItems"], 3);
    }
}
