//! The message a WebSocket subscriber gets thousands of times a second, read in place:
//! `{"push":{"topic":"T","event":{"offset":N,"data":D,"ts":N[,"type":"K"]}}}`, exactly
//! as a node writes it (`weft-node`'s `session::event`). Anything else — replies,
//! other pushes, another key order, a topic or type with an escape, extra keys — is not
//! this shape and goes to the full decode of a `ServerMessage`; the two agree on every
//! event this reads (`tests`, on lines of the node's own encoder too). A serde decode
//! of the same shape was 9 % of the harness's CPU at 5,000 subscribers × 1 topic.
//!
//! `data` is any JSON value; it is delimited here (strings, escapes, nesting) but its
//! inside is not validated: the tracker needs its exact bytes, and the stamp decode
//! reads them.

/// The topic, offset and data (raw JSON, byte for byte) of an event push line, or
/// `None` when the line is not exactly that shape.
pub fn event_push(line: &str) -> Option<(&str, u64, &str)> {
    let rest = line.strip_prefix(r#"{"push":{"topic":""#)?;
    let (topic, rest) = plain_string(rest)?;
    let rest = rest.strip_prefix(r#","event":{"offset":"#)?;
    let (offset, rest) = number(rest)?;
    let rest = rest.strip_prefix(r#","data":"#)?;
    let len = value_len(rest.as_bytes())?;
    let (data, rest) = rest.split_at(len);
    let rest = rest.strip_prefix(r#","ts":"#)?;
    let (_, rest) = number(rest)?;
    let rest = match rest.strip_prefix(r#","type":""#) {
        Some(r) => plain_string(r)?.1,
        None => rest,
    };
    (rest == "}}}").then_some((topic, offset, data))
}

/// A string's content up to its closing quote, if it has no escape; and what follows.
fn plain_string(s: &str) -> Option<(&str, &str)> {
    let end = s.find(['"', '\\'])?;
    (s.as_bytes()[end] == b'"').then(|| (&s[..end], &s[end + 1..]))
}

/// A `u64` in plain decimal digits (no sign, no leading zero unless it is `0`).
fn number(s: &str) -> Option<(u64, &str)> {
    let end = s
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(s.len());
    let digits = &s[..end];
    if digits.is_empty() || (digits.len() > 1 && digits.starts_with('0')) {
        return None;
    }
    Some((digits.parse().ok()?, &s[end..]))
}

/// Nesting deeper than this is not an event this harness publishes: full decode.
const MAX_DEPTH: usize = 64;

/// The length of the JSON value at the start of `b`: a string, an object or array
/// (brackets balanced, strings and their escapes skipped), or a scalar (up to the next
/// `,` `}` `]`). `None` if it does not end inside `b`.
fn value_len(b: &[u8]) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                i += 1;
                while *b.get(i)? != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return None;
                }
            }
            b'}' | b']' if depth == 0 => return (i > 0).then_some(i),
            b'}' | b']' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            b',' if depth == 0 => return (i > 0).then_some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use weft_proto::ServerMessage;

    use super::*;

    /// What the full decode reads of an event push line: topic, offset, raw data.
    fn full(line: &str) -> (String, u64, String) {
        let m: ServerMessage = serde_json::from_str(line).expect("valid message");
        let push = m.push.expect("a push");
        let ev = push.event.expect("an event");
        (push.topic.unwrap(), ev.offset, ev.data.get().to_owned())
    }

    #[test]
    fn reads_what_the_full_decode_reads_on_lines_of_the_node_shape() {
        for line in [
            r#"{"push":{"topic":"bench.t1","event":{"offset":7,"data":{"p":1,"s":2,"t":3,"x":"aaaa"},"ts":1700000000000}}}"#,
            r#"{"push":{"topic":"a","event":{"offset":18446744073709551615,"data":[1,"two",{"x":null}],"ts":1,"type":"tick"}}}"#,
            r#"{"push":{"topic":"b.c","event":{"offset":0,"data":"x\n\"y}],{","ts":0}}}"#,
            r#"{"push":{"topic":"n","event":{"offset":3,"data":-1.5e3,"ts":2}}}"#,
            r#"{"push":{"topic":"n","event":{"offset":3,"data":true,"ts":2}}}"#,
            r#"{"push":{"topic":"n","event":{"offset":3,"data":{"k":"\\","l":["]","}"]},"ts":2}}}"#,
        ] {
            let (topic, offset, data) = event_push(line).unwrap_or_else(|| panic!("{line}"));
            assert_eq!(
                (topic.to_owned(), offset, data.to_owned()),
                full(line),
                "{line}"
            );
        }
    }

    #[test]
    fn any_other_shape_is_left_to_the_full_decode() {
        for line in [
            // Another key order, extra keys, escapes in names: valid, but not read here.
            r#"{"push":{"event":{"offset":1,"data":1,"ts":0},"topic":"b.c"}}"#,
            r#"{"push":{"topic":"a","event":{"data":1,"offset":1,"ts":0}}}"#,
            r#"{"push":{"topic":"a\u002eb","event":{"offset":1,"data":1,"ts":0}}}"#,
            r#"{"push":{"topic":"a","event":{"offset":1,"data":1,"ts":0,"extra":1}}}"#,
            r#"{"push":{"topic":"a","event":{"offset":1,"data":1,"ts":0,"type":"k\"q"}}}"#,
            // Replies and other pushes.
            r#"{"id":1,"result":{"epoch":"e","offset":0,"recovered":true,"events":[]}}"#,
            r#"{"push":{"topic":"a","reset":{"epoch":"e2","offset":3}}}"#,
            r#"{"push":{"topic":"a","skipped":{"from":1,"to":4}}}"#,
            r#"{"push":{"disconnect":{"code":4000,"reason":"drain","reconnect":true,"after_ms":10}}}"#,
        ] {
            assert_eq!(event_push(line), None, "{line}");
            serde_json::from_str::<ServerMessage>(line).expect("the full decode reads it");
        }
    }

    /// The JSON inside a node's WebSocket text frame (server frames are unmasked).
    fn payload(frame: &[u8]) -> &str {
        let header = match frame[1] & 0x7f {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        std::str::from_utf8(&frame[header..]).unwrap()
    }

    #[test]
    fn reads_the_frames_the_node_itself_encodes() {
        use std::sync::Arc;
        use weft_node::session::event::StoredEvent;
        let datas = [
            r#"{"p":0,"s":41,"t":1700000000000123,"x":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}"#,
            r#""a \"quoted\" }], string""#,
            r#"[1,{"k":[]},"\\"]"#,
            "0",
            "null",
        ];
        for (n, data) in datas.into_iter().enumerate() {
            for kind in [None, Some(Arc::<str>::from("tick"))] {
                let offset = [0, 7, u64::MAX][n % 3];
                let ev = StoredEvent::new(
                    "bench.t1".into(),
                    "ep".into(),
                    offset,
                    1_700_000_000_000,
                    kind.clone(),
                    bytes::Bytes::copy_from_slice(data.as_bytes()),
                );
                let line = payload(ev.ws_frame());
                assert_eq!(event_push(line), Some(("bench.t1", offset, data)), "{line}");
                assert_eq!(
                    full(line),
                    ("bench.t1".to_owned(), offset, data.to_owned()),
                    "{line}"
                );
            }
        }
    }

    /// Only the data's boundaries are checked, not its grammar (a node publishes valid
    /// JSON only); everything around it must be exactly the node's shape.
    #[test]
    fn a_line_not_closed_as_the_node_writes_it_is_never_read_as_an_event() {
        for line in [
            r#"{"push":{"topic":"a","event":{"offset":1,"data":{"x":1,"ts":0}}}"#,
            r#"{"push":{"topic":"a","event":{"offset":1,"data":"open,"ts":0}}}"#,
            r#"{"push":{"topic":"a","event":{"offset":01,"data":1,"ts":0}}}"#,
            r#"{"push":{"topic":"a","event":{"offset":18446744073709551616,"data":1,"ts":0}}}"#,
            r#"{"push":{"topic":"a","event":{"offset":1,"data":,"ts":0}}}"#,
            r#"{"push":{"topic":"a","event":{"offset":1,"data":1,"ts":0}}}trailing"#,
            r#"{"push":{"topic":"a","event":{"offset":1,"data":1,"ts":0}}"#,
            r#"{"push":{"topic":"a"#,
        ] {
            assert_eq!(event_push(line), None, "{line}");
        }
        let deep = format!(
            r#"{{"push":{{"topic":"a","event":{{"offset":1,"data":{}{},"ts":0}}}}}}"#,
            "[".repeat(MAX_DEPTH + 1),
            "]".repeat(MAX_DEPTH + 1)
        );
        assert_eq!(event_push(&deep), None);
    }
}
