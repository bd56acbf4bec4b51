//! Server → client messages and REST bodies (DESIGN §3.1, §3.2).
//!
//! The node writes the hot-path frames (event pushes, SSE and NDJSON lines) by hand so
//! each event is encoded once; these types are the reference shape for everything else
//! and what clients (the load-test harness, tests) decode with. The node's tests decode
//! its hand-written frames with these types, so the two cannot drift apart.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// One event as it appears inside a push, a subscribe reply, a history page or a poll.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub offset: u64,
    pub data: Box<RawValue>,
    /// Milliseconds since the Unix epoch, stamped by the topic's owner.
    pub ts: u64,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// An event with its topic and epoch: NDJSON lines and multi-topic SSE `data`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    pub topic: String,
    pub epoch: String,
    pub offset: u64,
    pub data: Box<RawValue>,
    pub ts: u64,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// `201` body of a publish, and one entry of a batch publish's results.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishResult {
    pub topic: String,
    pub epoch: String,
    pub offset: u64,
}

/// `POST /v1/publish` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchPublish {
    pub events: Vec<BatchItem>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchItem {
    pub topic: String,
    pub data: Box<RawValue>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchResult {
    pub results: Vec<PublishResult>,
}

/// `GET /v1/topics/{topic}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopicState {
    pub topic: String,
    pub epoch: String,
    pub offset: u64,
    pub last: Option<Event>,
}

/// A history page or a long-poll answer: the events after the cursor and the cursor to
/// ask with next.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PollPage {
    pub events: Vec<Event>,
    pub next: String,
}

/// Reply to `subscribe`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubscribeResult {
    pub epoch: String,
    pub offset: u64,
    /// Present when the subscribe carried `since`: whether every missed event is in
    /// `events`. `false` means the cursor was of another epoch or out of retention: the
    /// client should re-read state; `epoch`/`offset` are the current cursor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
    pub events: Vec<Event>,
}

/// Reply to `history`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryResult {
    pub epoch: String,
    pub offset: u64,
    pub events: Vec<Event>,
    pub next: String,
}

/// Reply to `connect` / `refresh`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectResult {
    pub client: String,
    pub node: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEntry {
    pub client: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// Reply to `presence` and body of `GET /v1/topics/{topic}/presence`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PresenceResult {
    pub topic: String,
    pub clients: Vec<PresenceEntry>,
}

/// The error object of every error reply and error body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: u16,
    pub message: String,
    /// With `410`: the topic's current cursor, to re-read state and watch from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// `{"error":{…}}` — every REST error body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// Any server → client WebSocket message, for clients to decode.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerMessage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<Push>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Push {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<Event>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join: Option<PresenceEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leave: Option<PresenceEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset: Option<ResetPush>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<SkippedPush>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiring: Option<ExpiringPush>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disconnect: Option<DisconnectPush>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsubscribed: Option<UnsubscribedPush>,
}

/// History was lost: re-read state and continue from this cursor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetPush {
    pub epoch: String,
    pub offset: u64,
}

/// Conflation dropped the events `from..=to` of this topic for this session (the
/// session was too slow); the next event pushed is `to + 1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedPush {
    pub from: u64,
    pub to: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpiringPush {
    pub in_s: u64,
}

/// The server ended this session's subscription to the push's topic (a `refresh`
/// to a token that no longer allows it: code 403). As after an `unsubscribe`, an
/// event that was already being written to the session may still follow it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnsubscribedPush {
    pub code: u16,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisconnectPush {
    pub code: u16,
    pub reason: String,
    pub reconnect: bool,
    pub after_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_contract_examples() {
        for line in [
            r#"{"id":2,"result":{"epoch":"e","offset":45,"recovered":true,"events":[]}}"#,
            r#"{"id":2,"error":{"code":403,"message":"no"}}"#,
            r#"{"push":{"topic":"t","event":{"offset":46,"data":{"x":1},"ts":1732262400000}}}"#,
            r#"{"push":{"topic":"t","join":{"client":"c1","user":"u1"}}}"#,
            r#"{"push":{"topic":"t","reset":{"epoch":"e2","offset":0}}}"#,
            r#"{"push":{"expiring":{"in_s":30}}}"#,
            r#"{"push":{"disconnect":{"code":4000,"reason":"draining","reconnect":true,"after_ms":1375}}}"#,
        ] {
            let m: ServerMessage = serde_json::from_str(line).unwrap();
            assert!(
                m.result.is_some() || m.error.is_some() || m.push.is_some(),
                "{line}"
            );
        }
        let m: ServerMessage = serde_json::from_str(
            r#"{"push":{"topic":"t","event":{"offset":46,"data":{"x":1},"ts":1,"type":"tick"}}}"#,
        )
        .unwrap();
        let ev = m.push.unwrap().event.unwrap();
        assert_eq!(
            (ev.offset, ev.kind.as_deref(), ev.data.get()),
            (46, Some("tick"), r#"{"x":1}"#)
        );
    }
}
