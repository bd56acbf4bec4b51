//! A stored event and its frames, encoded once per transport.
//!
//! The owner creates one [`StoredEvent`] per publish (a mirror one per relayed event) and shares it (`Arc`) between the
//! topic's history and every subscriber's queue. Each transport's frame is built the
//! first time a recipient of that transport needs it and then shared (`Bytes`) by all
//! recipients: the fan-out path never encodes or copies per recipient.
//!
//! `data` is compact JSON (no raw newline, guaranteed at publish), and topic, epoch and
//! type come from restricted alphabets, so frames are built by concatenation with no
//! escaping; the tests decode them with the `weft-proto` types.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};

/// Fixed per-event overhead counted against memory budgets (struct, Arc, cached
/// frames' headers), on top of the data length.
const EVENT_OVERHEAD: usize = 192;

#[derive(Debug)]
pub struct StoredEvent {
    pub topic: Arc<str>,
    pub epoch: Arc<str>,
    pub offset: u64,
    /// Milliseconds since the Unix epoch at the owner.
    pub ts: u64,
    pub kind: Option<Arc<str>>,
    /// Compact JSON.
    pub data: Bytes,
    /// When the owner sequenced it, for the publish→socket latency histogram.
    pub sequenced_at: Instant,
    ws: OnceLock<Bytes>,
    sse: OnceLock<Bytes>,
    ndjson: OnceLock<Bytes>,
    multi_sse: OnceLock<Bytes>,
    relay: OnceLock<Bytes>,
}

impl StoredEvent {
    pub fn new(
        topic: Arc<str>,
        epoch: Arc<str>,
        offset: u64,
        ts: u64,
        kind: Option<Arc<str>>,
        data: Bytes,
    ) -> Self {
        Self {
            topic,
            epoch,
            offset,
            ts,
            kind,
            data,
            sequenced_at: Instant::now(),
            ws: OnceLock::new(),
            sse: OnceLock::new(),
            ndjson: OnceLock::new(),
            multi_sse: OnceLock::new(),
            relay: OnceLock::new(),
        }
    }

    /// The event as an encoded relay frame (`weft.v1.RelayFrame`), built once by the
    /// owner and shared by every peer link it goes out on.
    pub fn relay_frame(&self) -> Bytes {
        self.relay
            .get_or_init(|| {
                use prost::Message;
                let frame = weft_proto::grpc::RelayFrame {
                    kind: Some(weft_proto::grpc::relay_frame::Kind::Event(self.to_relay())),
                };
                Bytes::from(frame.encode_to_vec())
            })
            .clone()
    }

    /// The relay message for this event.
    pub fn to_relay(&self) -> weft_proto::grpc::RelayEvent {
        weft_proto::grpc::RelayEvent {
            topic: self.topic.to_string(),
            epoch: self.epoch.to_string(),
            offset: self.offset,
            ts: self.ts,
            r#type: self.kind.as_deref().map(str::to_owned),
            data: self.data.clone(),
        }
    }

    /// Bytes charged to history and queue budgets.
    pub fn cost(&self) -> usize {
        EVENT_OVERHEAD + 2 * self.data.len()
    }

    /// `{"offset":N,"data":…,"ts":T,"type":"k"}` — the event object of the contract.
    pub fn write_json(&self, out: &mut BytesMut) {
        out.reserve(self.data.len() + 64);
        out.put_u8(b'{');
        self.write_fields(out);
    }

    /// `{"topic":…,"epoch":…,"offset":…,"data":…,"ts":…,"type":…}` — the envelope.
    pub fn write_envelope(&self, out: &mut BytesMut) {
        out.reserve(self.data.len() + self.topic.len() + 96);
        out.put_slice(b"{\"topic\":\"");
        out.put_slice(self.topic.as_bytes());
        out.put_slice(b"\",\"epoch\":\"");
        out.put_slice(self.epoch.as_bytes());
        out.put_slice(b"\",");
        self.write_fields(out);
    }

    /// `"offset":N,"data":…,"ts":T[,"type":"k"]}` — the tail both objects share.
    fn write_fields(&self, out: &mut BytesMut) {
        out.put_slice(b"\"offset\":");
        put_u64(out, self.offset);
        out.put_slice(b",\"data\":");
        out.put_slice(&self.data);
        out.put_slice(b",\"ts\":");
        put_u64(out, self.ts);
        if let Some(kind) = &self.kind {
            out.put_slice(b",\"type\":\"");
            out.put_slice(kind.as_bytes());
            out.put_u8(b'"');
        }
        out.put_u8(b'}');
    }

    /// `{"push":{"topic":"t","event":{…}}}` for `weft.v1.json`, as a whole WebSocket
    /// text frame: server frames are unmasked, so the header is the same for every
    /// recipient and the frame is built once.
    pub fn ws_frame(&self) -> &Bytes {
        self.ws.get_or_init(|| {
            let payload_len = self.ws_payload_len();
            let mut out =
                BytesMut::with_capacity(payload_len + crate::session::wsframe::MAX_HEADER);
            crate::session::wsframe::put_header(
                &mut out,
                crate::session::wsframe::OP_TEXT,
                payload_len,
            );
            out.put_slice(b"{\"push\":{\"topic\":\"");
            out.put_slice(self.topic.as_bytes());
            out.put_slice(b"\",\"event\":");
            self.write_json(&mut out);
            out.put_slice(b"}}");
            out.freeze()
        })
    }

    /// Length of the push JSON inside [`Self::ws_frame`], computed without building it.
    fn ws_payload_len(&self) -> usize {
        let digits = |v: u64| if v == 0 { 1 } else { v.ilog10() as usize + 1 };
        let kind = self
            .kind
            .as_ref()
            .map_or(0, |k| ",\"type\":\"\"".len() + k.len());
        "{\"push\":{\"topic\":\"".len()
            + self.topic.len()
            + "\",\"event\":".len()
            + "{\"offset\":".len()
            + digits(self.offset)
            + ",\"data\":".len()
            + self.data.len()
            + ",\"ts\":".len()
            + digits(self.ts)
            + kind
            + "}".len()
            + "}}".len()
    }

    /// `id: e:o\nevent: <type|message>\ndata: <data>\n\n` for a one-topic SSE watch.
    pub fn sse_frame(&self) -> &Bytes {
        self.sse.get_or_init(|| {
            let mut out = BytesMut::with_capacity(self.data.len() + 64);
            out.put_slice(b"id: ");
            out.put_slice(self.epoch.as_bytes());
            out.put_u8(b':');
            put_u64(&mut out, self.offset);
            out.put_slice(b"\nevent: ");
            out.put_slice(self.kind.as_deref().unwrap_or("message").as_bytes());
            out.put_slice(b"\ndata: ");
            out.put_slice(&self.data);
            out.put_slice(b"\n\n");
            out.freeze()
        })
    }

    /// `event: <type|message>\ndata: <envelope>\n\n` for a multi-topic SSE watch; the
    /// `id:` line (every topic's cursor) is the one per-recipient part and is written
    /// before it by the session.
    pub fn multi_sse_frame(&self) -> &Bytes {
        self.multi_sse.get_or_init(|| {
            let mut out = BytesMut::with_capacity(self.data.len() + 128);
            out.put_slice(b"event: ");
            out.put_slice(self.kind.as_deref().unwrap_or("message").as_bytes());
            out.put_slice(b"\ndata: ");
            self.write_envelope(&mut out);
            out.put_slice(b"\n\n");
            out.freeze()
        })
    }

    /// One NDJSON line: the envelope and `\n`.
    pub fn ndjson_line(&self) -> &Bytes {
        self.ndjson.get_or_init(|| {
            let mut out = BytesMut::with_capacity(self.data.len() + 128);
            self.write_envelope(&mut out);
            out.put_u8(b'\n');
            out.freeze()
        })
    }
}

pub fn put_u64(out: &mut BytesMut, v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    let mut v = v;
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.put_slice(&buf[i..]);
}

/// Writes `[e1,e2,…]`.
pub fn write_event_array(out: &mut BytesMut, events: &[Arc<StoredEvent>]) {
    out.put_u8(b'[');
    for (i, ev) in events.iter().enumerate() {
        if i > 0 {
            out.put_u8(b',');
        }
        ev.write_json(out);
    }
    out.put_u8(b']');
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::{Envelope, ServerMessage};

    fn ev(kind: Option<&str>) -> StoredEvent {
        StoredEvent::new(
            "a.b".into(),
            "ep1".into(),
            42,
            1_700_000_000_000,
            kind.map(Into::into),
            Bytes::from_static(br#"{"x":[1,"two"]}"#),
        )
    }

    #[test]
    fn ws_frame_decodes_as_contract_push() {
        for kind in [None, Some("tick")] {
            let e = ev(kind);
            let frame = e.ws_frame();
            assert_eq!(frame[0], 0x81, "final text frame");
            let (len, hdr) = match frame[1] {
                126 => (u16::from_be_bytes([frame[2], frame[3]]) as usize, 4),
                n => (n as usize, 2),
            };
            assert_eq!(frame.len(), hdr + len, "header length matches the payload");
            let m: ServerMessage = serde_json::from_slice(&frame[hdr..]).unwrap();
            let push = m.push.unwrap();
            assert_eq!(push.topic.as_deref(), Some("a.b"));
            let got = push.event.unwrap();
            assert_eq!(
                (got.offset, got.ts, got.kind.as_deref()),
                (42, 1_700_000_000_000, kind)
            );
            assert_eq!(got.data.get(), r#"{"x":[1,"two"]}"#);
        }
    }

    #[test]
    fn sse_and_ndjson_frames() {
        let e = ev(None);
        assert_eq!(
            &e.sse_frame()[..],
            &b"id: ep1:42\nevent: message\ndata: {\"x\":[1,\"two\"]}\n\n"[..]
        );
        let line = e.ndjson_line();
        assert_eq!(line.last(), Some(&b'\n'));
        let env: Envelope = serde_json::from_slice(&line[..line.len() - 1]).unwrap();
        assert_eq!(
            (env.topic.as_str(), env.epoch.as_str(), env.offset),
            ("a.b", "ep1", 42)
        );
        let multi = std::str::from_utf8(ev(Some("k")).multi_sse_frame())
            .unwrap()
            .to_owned();
        assert!(
            multi.starts_with("event: k\ndata: {\"topic\":\"a.b\""),
            "{multi}"
        );
    }

    #[test]
    fn frames_are_shared_not_rebuilt() {
        let e = ev(None);
        let a = e.ws_frame().as_ptr();
        let b = e.ws_frame().as_ptr();
        assert_eq!(a, b);
    }

    #[test]
    fn put_u64_edges() {
        for v in [0u64, 7, 10, 12345, u64::MAX] {
            let mut b = BytesMut::new();
            put_u64(&mut b, v);
            assert_eq!(std::str::from_utf8(&b).unwrap(), v.to_string());
        }
    }
}
