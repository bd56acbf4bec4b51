//! Validation of client and peer input that every transport shares (HTTP, WebSocket,
//! relay): topics, cursors, event types and event data.
//!
//! Event data is stored and delivered **as published**: it is validated as JSON
//! without being rebuilt, so big integers keep their digits, keys keep their order and
//! duplicates stay. The one change is that a newline or carriage return — which valid
//! JSON can only hold as insignificant whitespace outside strings — becomes a space,
//! because every line-delimited transport (WebSocket batches, NDJSON, SSE `data:`)
//! needs the data on one line. Length and meaning are unchanged.
//!
//! One nesting limit (`limits.max_json_depth`) applies on every path, checked by a
//! byte scan before the parser sees the data, so no parser downstream (the node's or
//! a subscriber's) meets a document deeper than the limit. The same scan refuses a
//! string escape of half a UTF-16 surrogate pair, which the JSON grammar admits but
//! strict parsers refuse.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::value::RawValue;
use weft_proto::{validate_topic, Cursor};

use crate::config::Limits;
use crate::error::ApiError;

/// A topic name from any transport: `400` with the rule it breaks.
pub fn check_topic(topic: &str) -> Result<(), ApiError> {
    validate_topic(topic).map_err(|e| ApiError::bad(format!("invalid topic: {e}")))
}

/// An optional `epoch:offset` cursor from any transport: `400` when malformed.
pub fn parse_since(since: Option<&str>) -> Result<Option<Cursor>, ApiError> {
    since.map(|c| parse_cursor(c, "cursor")).transpose()
}

pub fn parse_cursor(v: &str, what: &str) -> Result<Cursor, ApiError> {
    v.parse()
        .map_err(|e| ApiError::bad(format!("bad {what}: {e}")))
}

/// Validates event data as JSON within the size and depth limits and returns it as
/// published (newlines as spaces), in an allocation of its own.
pub fn event_data(bytes: &[u8], limits: &Limits) -> Result<Bytes, ApiError> {
    let max = limits.max_message_bytes;
    if bytes.len() > max {
        return Err(ApiError::TooLarge(format!(
            "event data exceeds {max} bytes"
        )));
    }
    check_shape(bytes, limits.max_json_depth)?;
    let raw: &RawValue = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad(format!("event data is not JSON: {e}")))?;
    Ok(one_line(raw.get().as_bytes()))
}

/// Event data from an already-parsed raw value (batch and WebSocket publish).
pub fn raw_data(raw: &RawValue, limits: &Limits) -> Result<Bytes, ApiError> {
    let text = raw.get().as_bytes();
    let max = limits.max_message_bytes;
    if text.len() > max {
        return Err(ApiError::TooLarge(format!(
            "event data exceeds {max} bytes"
        )));
    }
    check_shape(text, limits.max_json_depth)?;
    Ok(one_line(text))
}

/// A copy of `text` with every CR/LF (whitespace, in valid JSON) as a space. Always a
/// copy: a slice of the body would keep the whole request buffer alive for as long as
/// the event stays in history.
fn one_line(text: &[u8]) -> Bytes {
    if !text.iter().any(|b| *b == b'\n' || *b == b'\r') {
        return Bytes::copy_from_slice(text);
    }
    Bytes::from(
        text.iter()
            .map(|b| if *b == b'\n' || *b == b'\r' { b' ' } else { *b })
            .collect::<Vec<u8>>(),
    )
}

/// What the JSON parser lets through but a subscriber's may not, in one byte scan:
/// `400` when arrays and objects nest deeper than `max` (brackets inside strings do
/// not count), or when a string holds a `\u` escape of half a UTF-16 surrogate pair
/// without its other half (`"\ud800"`): RFC 8259's grammar admits it, but it is no
/// Unicode text, and strict parsers (serde_json into a `String`, I-JSON) refuse the
/// whole document. Everything else malformed is left to the parser.
fn check_shape(text: &[u8], max: usize) -> Result<(), ApiError> {
    let hex4 = |at: usize| -> Option<u16> {
        let digits = std::str::from_utf8(text.get(at..at + 4)?).ok()?;
        u16::from_str_radix(digits, 16).ok()
    };
    let lone = || {
        ApiError::bad("event data holds half a UTF-16 surrogate pair (`\\ud800`-`\\udfff` without its other half)")
    };
    let (mut depth, mut in_string, mut i) = (0usize, false, 0usize);
    while i < text.len() {
        let b = text[i];
        if in_string {
            match b {
                b'\\' if text.get(i + 1) == Some(&b'u') => match hex4(i + 2) {
                    Some(0xD800..=0xDBFF) => {
                        let low = (text.get(i + 6..i + 8) == Some(&b"\\u"[..]))
                            .then(|| hex4(i + 8))
                            .flatten();
                        if !matches!(low, Some(0xDC00..=0xDFFF)) {
                            return Err(lone());
                        }
                        i += 12;
                        continue;
                    }
                    Some(0xDC00..=0xDFFF) => return Err(lone()),
                    _ => {
                        i += 6;
                        continue;
                    }
                },
                b'\\' => {
                    i += 2;
                    continue;
                }
                b'"' => in_string = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Err(ApiError::bad(format!(
                        "event data nests deeper than {max} levels"
                    )));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// An event type from `Weft-Event-Type` / `type`: the topic alphabet, at most 64 bytes,
/// so it can sit in JSON and SSE `event:` lines unescaped.
pub fn event_kind(kind: Option<&str>) -> Result<Option<Arc<str>>, ApiError> {
    match kind {
        None => Ok(None),
        Some(k)
            if !k.is_empty()
                && k.len() <= 64
                && k.bytes().all(weft_proto::topic::is_topic_byte) =>
        {
            Ok(Some(k.into()))
        }
        Some(_) => Err(ApiError::bad(
            "event type must be 1-64 characters of [A-Za-z0-9_.:@-]",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize) -> Limits {
        Limits {
            max_message_bytes: max,
            ..Limits::default()
        }
    }

    #[test]
    fn data_is_kept_as_published_and_copied_out_of_the_body() {
        let pretty = b"{\n  \"a\": 1\n}";
        assert_eq!(
            &event_data(pretty, &limits(100)).unwrap()[..],
            b"{   \"a\": 1 }"
        );
        // No re-encoding: digits, key order and duplicate keys survive.
        let exact = br#"{"z":12345678901234567890123,"a":1,"a":2}"#;
        let stored = event_data(exact, &limits(100)).unwrap();
        assert_eq!(&stored[..], &exact[..]);
        let multi = b"{\"z\":\n12345678901234567890123,\r\n\"a\":1,\"a\":2}";
        assert_eq!(
            &event_data(multi, &limits(100)).unwrap()[..],
            b"{\"z\": 12345678901234567890123,  \"a\":1,\"a\":2}"
        );
        let compact = b"  {\"a\":1} ";
        let out = event_data(compact, &limits(100)).unwrap();
        assert_eq!(&out[..], b"{\"a\":1}");
        assert_ne!(out.as_ptr(), compact[2..].as_ptr());
        assert_eq!(event_data(b"{", &limits(100)).unwrap_err().code(), 400);
        assert_eq!(event_data(b"[1,2,3]", &limits(3)).unwrap_err().code(), 413);
    }

    #[test]
    fn one_depth_limit_and_strings_do_not_count() {
        let l = Limits::default();
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(event_data(deep(64).as_bytes(), &l).is_ok());
        assert_eq!(event_data(deep(65).as_bytes(), &l).unwrap_err().code(), 400);
        assert_eq!(
            event_data("[".repeat(32_000).as_bytes(), &l)
                .unwrap_err()
                .code(),
            400
        );
        let raw: Box<RawValue> = serde_json::from_str(&deep(65)).unwrap();
        assert_eq!(
            raw_data(&raw, &l).unwrap_err().code(),
            400,
            "same limit on every path"
        );
        let in_string = format!("\"{}\\\"{}\"", "[".repeat(100), "{".repeat(100));
        assert!(event_data(in_string.as_bytes(), &l).is_ok());
    }

    #[test]
    fn half_a_surrogate_pair_is_refused_and_whole_pairs_pass() {
        let l = Limits::default();
        for ok in [
            r#""\ud83d\ude00""#,
            r#"{"k":"a\uD83D\uDE00b"}"#,
            r#""\u00e9\\ud800""#,
            r#""\\\\ud800""#,
            r#"["\ud7ff","\ue000"]"#,
        ] {
            assert!(event_data(ok.as_bytes(), &l).is_ok(), "{ok}");
        }
        for bad in [
            r#""\ud800""#,
            r#""\udc00""#,
            r#""\ud800x""#,
            r#""\ud800\u0041""#,
            r#""\ude00\ud83d""#,
            r#"{"\udbff":1}"#,
        ] {
            let e = event_data(bad.as_bytes(), &l).unwrap_err();
            assert_eq!(e.code(), 400, "{bad}");
            // serde_json, as a subscriber would use it, refuses it too.
            assert!(
                serde_json::from_str::<serde_json::Value>(bad).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn event_kind_rules() {
        assert!(event_kind(Some("tick")).unwrap().is_some());
        assert!(event_kind(Some("a b")).is_err());
        assert!(event_kind(Some("")).is_err());
        assert!(event_kind(Some(&"x".repeat(65))).is_err());
    }
}
