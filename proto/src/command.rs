//! Client → server commands of `weft.v1.json` (DESIGN §3.2).
//!
//! A command is one JSON object per line: an optional numeric `id` (echoed in the reply)
//! and exactly one command key. [`parse_command`] turns a line into a [`Command`] or a
//! [`CommandError`] that carries the numeric code to answer with and, when it could be
//! read, the id to echo — so a malformed command is answered, never dropped silently.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectCmd {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscribeCmd {
    pub topic: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub snapshot: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnsubscribeCmd {
    pub topic: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishCmd {
    pub topic: String,
    pub data: Box<RawValue>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryCmd {
    pub topic: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceCmd {
    pub topic: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshCmd {
    pub token: String,
}

#[derive(Debug, Clone)]
pub enum Command {
    Connect(ConnectCmd),
    Subscribe(SubscribeCmd),
    Unsubscribe(UnsubscribeCmd),
    Publish(PublishCmd),
    History(HistoryCmd),
    Presence(PresenceCmd),
    Refresh(RefreshCmd),
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::Connect(_) => "connect",
            Command::Subscribe(_) => "subscribe",
            Command::Unsubscribe(_) => "unsubscribe",
            Command::Publish(_) => "publish",
            Command::History(_) => "history",
            Command::Presence(_) => "presence",
            Command::Refresh(_) => "refresh",
        }
    }

    /// Encodes `{"id":id,"<name>":{…}}` — what a client sends.
    pub fn to_line(&self, id: Option<u64>) -> String {
        serde_json::to_string(&Tagged { id, command: self }).expect("commands always serialise")
    }
}

struct Tagged<'a> {
    id: Option<u64>,
    command: &'a Command,
}

impl Serialize for Tagged<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        if let Some(id) = self.id {
            map.serialize_entry("id", &id)?;
        }
        let name = self.command.name();
        match self.command {
            Command::Connect(c) => map.serialize_entry(name, c)?,
            Command::Subscribe(c) => map.serialize_entry(name, c)?,
            Command::Unsubscribe(c) => map.serialize_entry(name, c)?,
            Command::Publish(c) => map.serialize_entry(name, c)?,
            Command::History(c) => map.serialize_entry(name, c)?,
            Command::Presence(c) => map.serialize_entry(name, c)?,
            Command::Refresh(c) => map.serialize_entry(name, c)?,
        }
        map.end()
    }
}

/// Why a line is not a command, with the code to answer (always 400 today) and the id
/// to echo when the line had a readable one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CommandError {
    pub id: Option<u64>,
    pub code: u16,
    pub message: String,
}

fn bad(id: Option<u64>, message: impl Into<String>) -> CommandError {
    CommandError {
        id,
        code: 400,
        message: message.into(),
    }
}

fn body<T: DeserializeOwned>(
    id: Option<u64>,
    name: &str,
    raw: &RawValue,
) -> Result<T, CommandError> {
    serde_json::from_str(raw.get()).map_err(|e| bad(id, format!("invalid `{name}` command: {e}")))
}

/// Parses one line of `weft.v1.json`.
pub fn parse_command(line: &str) -> Result<(Option<u64>, Command), CommandError> {
    let map: BTreeMap<std::borrow::Cow<'_, str>, &RawValue> = serde_json::from_str(line)
        .map_err(|e| bad(None, format!("malformed JSON command: {e}")))?;
    let id = match map.get("id") {
        None => None,
        Some(raw) if raw.get() == "null" => None,
        Some(raw) => Some(
            raw.get()
                .parse::<u64>()
                .map_err(|_| bad(None, "`id` must be a non-negative integer"))?,
        ),
    };
    let mut names = map.iter().filter(|(k, _)| k.as_ref() != "id");
    let (name, raw) = match (names.next(), names.next()) {
        (Some(one), None) => one,
        (None, _) => return Err(bad(id, "the message names no command")),
        (Some(_), Some(_)) => return Err(bad(id, "a message must carry exactly one command")),
    };
    let cmd = match name.as_ref() {
        "connect" => Command::Connect(body(id, name, raw)?),
        "subscribe" => Command::Subscribe(body(id, name, raw)?),
        "unsubscribe" => Command::Unsubscribe(body(id, name, raw)?),
        "publish" => Command::Publish(body(id, name, raw)?),
        "history" => Command::History(body(id, name, raw)?),
        "presence" => Command::Presence(body(id, name, raw)?),
        "refresh" => Command::Refresh(body(id, name, raw)?),
        other => {
            let shown: String = other.chars().take(64).collect();
            return Err(bad(id, format!("unknown command `{shown}`")));
        }
    };
    Ok((id, cmd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_command() {
        let (id, c) =
            parse_command(r#"{"id":2,"subscribe":{"topic":"t","since":"e:4","snapshot":true}}"#)
                .unwrap();
        assert_eq!(id, Some(2));
        match c {
            Command::Subscribe(s) => {
                assert_eq!(s.topic, "t");
                assert_eq!(s.since.as_deref(), Some("e:4"));
                assert!(s.snapshot);
            }
            other => panic!("wrong command {other:?}"),
        }
        let (_, c) = parse_command(r#"{"publish":{"topic":"t","data":{"a":[1,2]}}}"#).unwrap();
        match c {
            Command::Publish(p) => assert_eq!(p.data.get(), r#"{"a":[1,2]}"#),
            other => panic!("wrong command {other:?}"),
        }
        for line in [
            r#"{"id":1,"connect":{}}"#,
            r#"{"id":3,"unsubscribe":{"topic":"t"}}"#,
            r#"{"id":5,"history":{"topic":"t","limit":10}}"#,
            r#"{"id":6,"presence":{"topic":"t"}}"#,
            r#"{"id":7,"refresh":{"token":"x"}}"#,
        ] {
            parse_command(line).unwrap();
        }
    }

    #[test]
    fn round_trips_through_to_line() {
        let cmd = Command::Subscribe(SubscribeCmd {
            topic: "a.b".into(),
            since: Some("e:1".into()),
            snapshot: false,
        });
        let line = cmd.to_line(Some(9));
        assert_eq!(
            line,
            r#"{"id":9,"subscribe":{"topic":"a.b","since":"e:1"}}"#
        );
        let (id, back) = parse_command(&line).unwrap();
        assert_eq!(id, Some(9));
        assert_eq!(back.name(), "subscribe");
    }

    #[test]
    fn errors_keep_the_id_when_readable() {
        let e = parse_command("{not json").unwrap_err();
        assert_eq!((e.id, e.code), (None, 400));
        let e = parse_command(r#"{"id":4,"frobnicate":{}}"#).unwrap_err();
        assert_eq!(e.id, Some(4));
        assert!(e.message.contains("unknown command"), "{}", e.message);
        let e = parse_command(r#"{"id":5,"subscribe":{}}"#).unwrap_err();
        assert_eq!(e.id, Some(5));
        assert!(e.message.contains("missing field `topic`"), "{}", e.message);
        let e = parse_command(r#"{"id":6,"subscribe":{"topic":"t","bogus":1}}"#).unwrap_err();
        assert!(e.message.contains("unknown field"), "{}", e.message);
        let e = parse_command(r#"{"id":7}"#).unwrap_err();
        assert_eq!(e.id, Some(7));
        let e = parse_command(r#"{"id":8,"subscribe":{"topic":"t"},"unsubscribe":{"topic":"t"}}"#)
            .unwrap_err();
        assert!(e.message.contains("exactly one"));
        let e = parse_command(r#"{"id":-1,"connect":{}}"#).unwrap_err();
        assert_eq!(e.id, None);
        assert!(parse_command("[1,2]").is_err());
        assert!(parse_command("").is_err());
    }
}
