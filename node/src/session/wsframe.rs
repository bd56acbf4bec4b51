//! RFC 6455 framing for the server side of `weft.v1.json`.
//!
//! Why not tungstenite on the server: it keeps a read buffer per socket (4 KiB even
//! when tuned) and copies every outgoing payload into a per-socket write buffer. Weft
//! holds millions of mostly idle sockets and fans one event out to thousands of them,
//! so here:
//! - server frames are unmasked, so a frame depends only on its payload: an event's
//!   whole frame (header included) is built once and shared by every recipient
//!   ([`text`]); the session writes queued frames with one vectored write;
//! - reads go through a per-thread scratch buffer and [`FrameReader`] keeps bytes only
//!   while a frame or a fragmented message is incomplete, so an idle session holds no
//!   buffer at all.
//!
//! Every length from the wire is checked against the frame and message caps before it
//! sizes anything. Extensions are not negotiated, so any RSV bit is a protocol error;
//! client frames must be masked; control frames must be final and at most 125 bytes.

use bytes::{BufMut, Bytes, BytesMut};

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest server frame header (2 + 8 bytes of length; no mask).
pub const MAX_HEADER: usize = 10;

/// Writes a final, unmasked frame header for `len` payload bytes.
pub fn put_header(out: &mut BytesMut, opcode: u8, len: usize) {
    out.put_u8(0x80 | opcode);
    if len < 126 {
        out.put_u8(len as u8);
    } else if len <= u16::MAX as usize {
        out.put_u8(126);
        out.put_u16(len as u16);
    } else {
        out.put_u8(127);
        out.put_u64(len as u64);
    }
}

/// A complete frame: header and payload.
pub fn frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(MAX_HEADER + payload.len());
    put_header(&mut out, opcode, payload.len());
    out.put_slice(payload);
    out.freeze()
}

/// A complete text frame carrying `payload` (valid UTF-8 by construction).
pub fn text(payload: &[u8]) -> Bytes {
    frame(OP_TEXT, payload)
}

/// A close frame with `code` and a reason cut to fit a control frame.
pub fn close(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    frame(OP_CLOSE, &payload)
}

/// A message read from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'a> {
    Text(&'a str),
    Binary,
    Ping(&'a [u8]),
    Pong,
    Close(Option<u16>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("{0} exceeds the limit of {1} bytes")]
    TooBig(&'static str, usize),
    #[error("text message is not valid UTF-8")]
    Utf8,
    /// A close frame with a 1-byte payload or a code no endpoint may send
    /// (RFC 6455 §7.4): answered with close 1002.
    #[error("invalid close frame")]
    BadClose,
    /// A close frame whose reason is not UTF-8: answered with close 1007.
    #[error("close reason is not valid UTF-8")]
    BadCloseReason,
}

/// Whether a peer may send `code` in a close frame (RFC 6455 §7.4.1-2): never 1004,
/// 1005, 1006 or 1015, nothing below 1000, and nothing unassigned below 3000.
pub fn is_sendable_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Incremental parser of client frames with bounded state.
#[derive(Debug)]
pub struct FrameReader {
    /// An incomplete frame carried over between reads (empty, unallocated, when idle).
    partial: Vec<u8>,
    /// A fragmented data message being assembled: its opcode and payload so far.
    message: Option<(u8, Vec<u8>)>,
    max_frame: usize,
    max_message: usize,
    closed: bool,
}

impl FrameReader {
    pub fn new(max_frame: usize, max_message: usize) -> Self {
        Self {
            partial: Vec::new(),
            message: None,
            max_frame,
            max_message,
            closed: false,
        }
    }

    /// Bytes held between reads (for tests and memory accounting).
    pub fn buffered(&self) -> usize {
        self.partial.capacity() + self.message.as_ref().map_or(0, |(_, m)| m.capacity())
    }

    /// Parses everything in `input` (freshly read, unmasked in place), handing each
    /// complete message to `on_message`. Stops after a close frame.
    pub fn feed(
        &mut self,
        input: &mut [u8],
        mut on_message: impl FnMut(Incoming<'_>),
    ) -> Result<(), FrameError> {
        if self.closed {
            return Ok(());
        }
        if self.partial.is_empty() {
            let used = self.parse(input, &mut on_message)?;
            if used < input.len() {
                self.partial = input[used..].to_vec();
            }
        } else {
            let mut data = std::mem::take(&mut self.partial);
            data.extend_from_slice(input);
            let used = self.parse(&mut data, &mut on_message)?;
            if used < data.len() {
                data.drain(..used);
                data.shrink_to_fit();
                self.partial = data;
            }
        }
        Ok(())
    }

    /// Parses whole frames from `data`; returns how many bytes it consumed.
    fn parse(
        &mut self,
        data: &mut [u8],
        on_message: &mut impl FnMut(Incoming<'_>),
    ) -> Result<usize, FrameError> {
        let mut pos = 0;
        while !self.closed {
            let buf = &data[pos..];
            if buf.len() < 2 {
                break;
            }
            let (b0, b1) = (buf[0], buf[1]);
            if b0 & 0x70 != 0 {
                return Err(FrameError::Protocol(
                    "reserved bits set without an extension",
                ));
            }
            if b1 & 0x80 == 0 {
                return Err(FrameError::Protocol("client frames must be masked"));
            }
            let fin = b0 & 0x80 != 0;
            let opcode = b0 & 0x0F;
            let (len, mut header) = match b1 & 0x7F {
                126 => {
                    if buf.len() < 4 {
                        break;
                    }
                    (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
                }
                127 => {
                    if buf.len() < 10 {
                        break;
                    }
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&buf[2..10]);
                    (u64::from_be_bytes(b), 10)
                }
                n => (n as u64, 2),
            };
            let is_control = opcode & 0x8 != 0;
            if is_control && (!fin || len > 125) {
                return Err(FrameError::Protocol(
                    "control frames must be final and at most 125 bytes",
                ));
            }
            if len > self.max_frame as u64 {
                return Err(FrameError::TooBig("frame", self.max_frame));
            }
            let len = len as usize;
            if buf.len() < header + 4 + len {
                break;
            }
            let mask = [
                buf[header],
                buf[header + 1],
                buf[header + 2],
                buf[header + 3],
            ];
            header += 4;
            let start = pos + header;
            let payload = &mut data[start..start + len];
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i & 3];
            }
            pos = start + len;
            let payload = &data[start..start + len];
            match opcode {
                OP_PING => on_message(Incoming::Ping(payload)),
                OP_PONG => on_message(Incoming::Pong),
                OP_CLOSE => {
                    self.closed = true;
                    let code = match payload.len() {
                        0 => None,
                        1 => return Err(FrameError::BadClose),
                        _ => {
                            let code = u16::from_be_bytes([payload[0], payload[1]]);
                            if !is_sendable_close_code(code) {
                                return Err(FrameError::BadClose);
                            }
                            if std::str::from_utf8(&payload[2..]).is_err() {
                                return Err(FrameError::BadCloseReason);
                            }
                            Some(code)
                        }
                    };
                    on_message(Incoming::Close(code));
                }
                OP_TEXT | OP_BINARY => {
                    if self.message.is_some() {
                        return Err(FrameError::Protocol(
                            "new message before the fragmented one finished",
                        ));
                    }
                    if fin {
                        deliver(opcode, payload, on_message)?;
                    } else {
                        if len > self.max_message {
                            return Err(FrameError::TooBig("message", self.max_message));
                        }
                        self.message = Some((opcode, payload.to_vec()));
                    }
                }
                OP_CONTINUATION => {
                    let Some((op, mut msg)) = self.message.take() else {
                        return Err(FrameError::Protocol("continuation without a message"));
                    };
                    if msg.len() + len > self.max_message {
                        return Err(FrameError::TooBig("message", self.max_message));
                    }
                    msg.extend_from_slice(payload);
                    if fin {
                        deliver(op, &msg, on_message)?;
                    } else {
                        self.message = Some((op, msg));
                    }
                }
                _ => return Err(FrameError::Protocol("unknown opcode")),
            }
        }
        Ok(pos)
    }
}

fn deliver(
    opcode: u8,
    payload: &[u8],
    on_message: &mut impl FnMut(Incoming<'_>),
) -> Result<(), FrameError> {
    if opcode == OP_TEXT {
        let text = std::str::from_utf8(payload).map_err(|_| FrameError::Utf8)?;
        on_message(Incoming::Text(text));
    } else {
        on_message(Incoming::Binary);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame, as a browser would send it.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 65535 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        out
    }

    fn read_all(r: &mut FrameReader, bytes: &[u8]) -> Result<Vec<String>, FrameError> {
        let mut got = Vec::new();
        let mut buf = bytes.to_vec();
        r.feed(&mut buf, |m| got.push(format!("{m:?}")))?;
        Ok(got)
    }

    #[test]
    fn header_lengths() {
        for (len, hdr) in [
            (5usize, 2usize),
            (125, 2),
            (126, 4),
            (65535, 4),
            (65536, 10),
        ] {
            let f = text(&vec![b'a'; len]);
            assert_eq!(f.len(), len + hdr, "len {len}");
            assert_eq!(f[0], 0x81);
        }
        assert_eq!(
            &close(4008, "slow")[..],
            &[0x88, 6, 0x0f, 0xa8, b's', b'l', b'o', b'w']
        );
        assert!(close(4000, &"é".repeat(100)).len() <= 127);
    }

    #[test]
    fn reads_messages_split_anywhere() {
        let mut wire = client_frame(true, OP_TEXT, b"hello");
        wire.extend(client_frame(true, OP_PING, b"p"));
        wire.extend(client_frame(false, OP_TEXT, b"frag"));
        wire.extend(client_frame(true, OP_CONTINUATION, b"mented"));
        wire.extend(client_frame(true, OP_TEXT, &vec![b'x'; 300]));
        for split in 0..wire.len() {
            let mut r = FrameReader::new(1 << 16, 1 << 16);
            let mut got = read_all(&mut r, &wire[..split]).unwrap();
            got.extend(read_all(&mut r, &wire[split..]).unwrap());
            assert_eq!(got.len(), 4, "split at {split}: {got:?}");
            assert_eq!(got[0], r#"Text("hello")"#);
            assert_eq!(got[1], "Ping([112])");
            assert_eq!(got[2], r#"Text("fragmented")"#);
            assert_eq!(r.buffered(), 0, "idle reader holds nothing");
        }
    }

    #[test]
    fn enforces_caps_before_buffering() {
        let mut r = FrameReader::new(1000, 1500);
        // Only the header of a 10 MiB frame: refused before any payload arrives.
        let big = client_frame(true, OP_TEXT, &vec![b'a'; 10 << 20]);
        assert_eq!(
            read_all(&mut r, &big[..14]),
            Err(FrameError::TooBig("frame", 1000))
        );
        let mut r = FrameReader::new(1000, 1500);
        let mut wire = client_frame(false, OP_TEXT, &[b'a'; 900]);
        wire.extend(client_frame(true, OP_CONTINUATION, &[b'a'; 900]));
        assert_eq!(
            read_all(&mut r, &wire),
            Err(FrameError::TooBig("message", 1500))
        );
    }

    #[test]
    fn protocol_violations() {
        let cases: Vec<(Vec<u8>, FrameError)> = vec![
            (
                vec![0x81, 0x05, b'h', b'e', b'l', b'l', b'o'],
                FrameError::Protocol("client frames must be masked"),
            ),
            (
                {
                    let mut f = client_frame(true, OP_TEXT, b"x");
                    f[0] |= 0x40;
                    f
                },
                FrameError::Protocol("reserved bits set without an extension"),
            ),
            (
                client_frame(false, OP_PING, b""),
                FrameError::Protocol("control frames must be final and at most 125 bytes"),
            ),
            (
                client_frame(true, OP_CONTINUATION, b"x"),
                FrameError::Protocol("continuation without a message"),
            ),
            (
                client_frame(true, 0x3, b"x"),
                FrameError::Protocol("unknown opcode"),
            ),
            (client_frame(true, OP_TEXT, &[0xff, 0xfe]), FrameError::Utf8),
        ];
        for (wire, err) in cases {
            let mut r = FrameReader::new(1000, 1000);
            assert_eq!(read_all(&mut r, &wire), Err(err));
        }
    }

    #[test]
    fn close_stops_reading() {
        let mut wire = client_frame(true, OP_CLOSE, &1000u16.to_be_bytes());
        wire.extend(client_frame(true, OP_TEXT, b"after"));
        let mut r = FrameReader::new(1000, 1000);
        assert_eq!(
            read_all(&mut r, &wire).unwrap(),
            vec!["Close(Some(1000))".to_string()]
        );
    }

    #[test]
    fn invalid_close_frames_are_refused_with_the_rfc_codes() {
        let bad = |payload: &[u8]| {
            let mut r = FrameReader::new(1000, 1000);
            read_all(&mut r, &client_frame(true, OP_CLOSE, payload))
        };
        assert_eq!(bad(&[0x03]), Err(FrameError::BadClose), "1-byte payload");
        for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert_eq!(
                bad(&code.to_be_bytes()),
                Err(FrameError::BadClose),
                "{code}"
            );
        }
        let mut invalid_reason = 1000u16.to_be_bytes().to_vec();
        invalid_reason.extend([0xff, 0xfe]);
        assert_eq!(bad(&invalid_reason), Err(FrameError::BadCloseReason));
        for code in [1000u16, 1001, 1003, 1007, 1011, 3000, 4999] {
            assert!(bad(&code.to_be_bytes()).is_ok(), "{code}");
        }
        assert_eq!(bad(&[]).unwrap(), vec!["Close(None)".to_string()]);
    }
}
