//! The data each published event carries, and the wall clock the harness measures with.
//!
//! Every event the harness publishes is the JSON object
//! `{"p":<publisher>,"s":<sequence>,"t":<intended send time, µs since the Unix epoch>,"x":"<padding>"}`.
//! `t` is the time the open-loop schedule *intended* to send the event, not the time the
//! request actually left: a publisher that falls behind (a slow node, a full in-flight
//! window) still stamps the scheduled time, so the queueing it suffered shows up in the
//! latency instead of being hidden (no coordinated omission). The one exception is the
//! harness's own timer: tokio's fires up to a millisecond after the due time, so a
//! publisher that was on time stamps the moment it woke (`publisher::wait_until_due`).
//!
//! The clock is the system wall clock so that stamps written by one process (or pod) can
//! be compared with receive times taken by another; across machines the clocks must be
//! synchronised (NTP/PTP) for latencies to mean anything.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;

/// Microseconds since the Unix epoch, from the system clock.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The decoded header of an event's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Stamp {
    /// Who published: a publisher id (chat: the member id).
    pub p: u64,
    /// The event's index in the global open-loop schedule.
    pub s: u64,
    /// Intended send time, µs since the Unix epoch.
    pub t: u64,
}

/// Length of `{"p":,"s":,"t":,"x":""}` without the numbers.
const FRAME_LEN: usize = 23;

impl Stamp {
    /// Encodes the stamp as event data of about `payload_bytes` bytes (never less than
    /// the stamp itself needs).
    pub fn encode(&self, payload_bytes: usize) -> String {
        let digits = digits(self.p) + digits(self.s) + digits(self.t);
        let pad = payload_bytes.saturating_sub(FRAME_LEN + digits);
        let mut out = String::with_capacity(FRAME_LEN + digits + pad);
        out.push_str("{\"p\":");
        out.push_str(&self.p.to_string());
        out.push_str(",\"s\":");
        out.push_str(&self.s.to_string());
        out.push_str(",\"t\":");
        out.push_str(&self.t.to_string());
        out.push_str(",\"x\":\"");
        out.extend(std::iter::repeat_n('x', pad));
        out.push_str("\"}");
        out
    }

    /// Decodes event data; `None` when it was not written by the harness. The harness's
    /// own layout is read directly (this runs once per delivery); anything else goes
    /// through a JSON parser.
    pub fn decode(data: &str) -> Option<Stamp> {
        Self::decode_fast(data.as_bytes()).or_else(|| serde_json::from_str(data).ok())
    }

    fn decode_fast(b: &[u8]) -> Option<Stamp> {
        let rest = b.strip_prefix(b"{\"p\":")?;
        let (p, rest) = number(rest)?;
        let rest = rest.strip_prefix(b",\"s\":")?;
        let (s, rest) = number(rest)?;
        let rest = rest.strip_prefix(b",\"t\":")?;
        let (t, rest) = number(rest)?;
        // The rest must be the padding and the end of the object.
        let pad = rest.strip_prefix(b",\"x\":\"")?.strip_suffix(b"\"}")?;
        pad.iter().all(|&c| c == b'x').then_some(Stamp { p, s, t })
    }
}

/// A leading unsigned decimal and the rest.
fn number(b: &[u8]) -> Option<(u64, &[u8])> {
    let end = b
        .iter()
        .position(|c| !c.is_ascii_digit())
        .unwrap_or(b.len());
    if end == 0 || end > 20 {
        return None;
    }
    let n = std::str::from_utf8(&b[..end]).ok()?.parse().ok()?;
    Some((n, &b[end..]))
}

fn digits(mut n: u64) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_size() {
        let s = Stamp {
            p: 3,
            s: 12345,
            t: 1_732_262_400_000_000,
        };
        for size in [0, 10, 64, 100, 1024] {
            let text = s.encode(size);
            assert_eq!(Stamp::decode(&text), Some(s));
            assert!(serde_json::from_str::<serde_json::Value>(&text).is_ok());
            if size >= 64 {
                assert_eq!(text.len(), size, "{text}");
            }
        }
    }

    #[test]
    fn other_layouts_still_decode() {
        let s = Stamp { p: 1, s: 2, t: 3 };
        assert_eq!(Stamp::decode_fast(s.encode(40).as_bytes()), Some(s));
        // Reordered keys or whitespace: not the fast path, same answer.
        assert_eq!(Stamp::decode(r#"{"t":3, "s":2, "p":1}"#), Some(s));
        assert_eq!(Stamp::decode_fast(br#"{"t":3,"s":2,"p":1}"#), None);
        assert_eq!(
            Stamp::decode_fast(br#"{"p":1,"s":2,"t":3,"x":"xx"} "#),
            None
        );
    }

    #[test]
    fn foreign_data_is_not_a_stamp() {
        assert_eq!(Stamp::decode(r#"{"hello":"world"}"#), None);
        assert_eq!(Stamp::decode("42"), None);
    }
}
