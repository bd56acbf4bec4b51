//! The NATS client protocol, as far as the harness speaks it: an incremental parser of
//! what a `nats-server` sends (`INFO`, `MSG`, `PING`, `PONG`, `+OK`, `-ERR`) and the
//! lines a client sends (`CONNECT`, `SUB`, `PUB`, `PING`, `PONG`); pure logic.
//!
//! Over WebSocket the server's frames carry the text protocol as a byte stream: one
//! frame may end in the middle of a control line or a payload, and one frame may hold
//! many messages. [`NatsParser::push`] therefore keeps the unfinished tail of a frame
//! and parses across frames. It is bounded: a control line longer than its limit, a
//! `MSG` whose announced length exceeds the payload limit, or a tail that cannot be a
//! message are errors — a length read from the wire is checked before anything is
//! kept for it — so a broken server cannot make a subscriber grow without bound.

use thiserror::Error;

/// Default longest control line accepted from a server. `MSG` lines are short (the
/// server's own `max_control_line` for clients is 4 KiB), but an `INFO` lists a
/// cluster's URLs and may be longer.
pub const MAX_CONTROL_LINE: usize = 64 * 1024;
/// Default largest payload accepted (the server's default `max_payload` is 1 MiB).
pub const MAX_PAYLOAD: usize = 1 << 20;

/// One thing the server said; borrows from the parser's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerOp<'a> {
    /// `INFO {json}`: the server's description (first thing on a connection).
    Info(&'a [u8]),
    /// `MSG <subject> <sid> [reply-to] <#bytes>` and its payload.
    Msg {
        subject: &'a [u8],
        sid: u64,
        payload: &'a [u8],
    },
    Ping,
    Pong,
    Ok,
    /// `-ERR '<message>'`.
    Err(&'a [u8]),
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NatsError {
    #[error("NATS control line longer than {0} bytes")]
    LineTooLong(usize),
    #[error("NATS MSG announces {len} payload bytes; at most {max} are accepted")]
    PayloadTooLarge { len: u64, max: usize },
    #[error("malformed NATS line: {0}")]
    Malformed(String),
    #[error("NATS MSG payload is not followed by CRLF")]
    MissingCrlf,
}

/// The incremental parser of a server's byte stream.
#[derive(Debug)]
pub struct NatsParser {
    /// The unfinished tail of what was pushed (a partial line or message).
    tail: Vec<u8>,
    max_line: usize,
    max_payload: usize,
}

impl Default for NatsParser {
    fn default() -> Self {
        Self::new(MAX_CONTROL_LINE, MAX_PAYLOAD)
    }
}

/// How far parsing got in a buffer.
enum Step<'a> {
    /// One operation, and the bytes it took.
    Op(ServerOp<'a>, usize),
    /// The buffer ends inside an operation.
    NeedMore,
}

impl NatsParser {
    pub fn new(max_line: usize, max_payload: usize) -> Self {
        Self {
            tail: Vec::new(),
            max_line,
            max_payload,
        }
    }

    /// Bytes held from earlier pushes (an unfinished operation).
    pub fn pending(&self) -> usize {
        self.tail.len()
    }

    /// Feeds one chunk (a WebSocket frame's bytes); calls `on_op` for every complete
    /// operation, in order. After an error the connection is unusable.
    pub fn push(
        &mut self,
        chunk: &[u8],
        mut on_op: impl FnMut(ServerOp<'_>),
    ) -> Result<(), NatsError> {
        if self.tail.is_empty() {
            // The common case: parse the frame in place, keep only its unfinished end.
            let used = self.parse_all(chunk, &mut on_op)?;
            self.tail.extend_from_slice(&chunk[used..]);
            return Ok(());
        }
        // Finish the held operation first; only as many bytes as it can need are
        // copied, then the rest of the chunk is parsed in place.
        let mut taken = 0;
        loop {
            let want = self.tail_needs();
            let add = want
                .saturating_sub(self.tail.len())
                .min(chunk.len() - taken);
            self.tail.extend_from_slice(&chunk[taken..taken + add]);
            taken += add;
            let tail = std::mem::take(&mut self.tail);
            match parse_one(&tail, self.max_line, self.max_payload)? {
                Step::Op(op, used) => {
                    on_op(op);
                    // The tail held at most one operation plus what it needed.
                    self.tail = tail[used..].to_vec();
                    if self.tail.is_empty() {
                        break;
                    }
                }
                Step::NeedMore => {
                    self.tail = tail;
                    if taken == chunk.len() {
                        return self.check_tail();
                    }
                }
            }
        }
        let rest = &chunk[taken..];
        let used = self.parse_all(rest, &mut on_op)?;
        self.tail.extend_from_slice(&rest[used..]);
        self.check_tail()
    }

    /// Parses complete operations from the start of `buf`; returns the bytes used.
    fn parse_all(
        &self,
        buf: &[u8],
        on_op: &mut impl FnMut(ServerOp<'_>),
    ) -> Result<usize, NatsError> {
        let mut at = 0;
        while at < buf.len() {
            match parse_one(&buf[at..], self.max_line, self.max_payload)? {
                Step::Op(op, used) => {
                    on_op(op);
                    at += used;
                }
                Step::NeedMore => break,
            }
        }
        // What is left must be able to become an operation.
        if buf.len() - at > self.max_line && find_crlf(&buf[at..], self.max_line).is_none() {
            return Err(NatsError::LineTooLong(self.max_line));
        }
        Ok(at)
    }

    /// How many bytes the held operation needs in total, as far as it is known: its
    /// control line plus payload once the line is complete, else the longest line.
    fn tail_needs(&self) -> usize {
        match find_crlf(&self.tail, self.max_line) {
            Some(end) => match msg_len(&self.tail[..end]) {
                // The length was checked when the line was first parsed (NeedMore
                // comes only after that check); `min` keeps this bounded regardless.
                Some(len) => end + 2 + (len as usize).min(self.max_payload) + 2,
                None => end + 2,
            },
            None => self.max_line + 2,
        }
    }

    fn check_tail(&self) -> Result<(), NatsError> {
        if self.tail.len() > self.max_line + 2 + self.max_payload + 2 {
            return Err(NatsError::LineTooLong(self.max_line));
        }
        if find_crlf(&self.tail, self.max_line).is_none() && self.tail.len() > self.max_line {
            return Err(NatsError::LineTooLong(self.max_line));
        }
        Ok(())
    }
}

/// Index of the first `\r\n` within the first `max_line + 2` bytes.
fn find_crlf(buf: &[u8], max_line: usize) -> Option<usize> {
    let window = &buf[..buf.len().min(max_line + 2)];
    window.windows(2).position(|w| w == b"\r\n")
}

/// The payload length of a `MSG` control line (without CRLF), if it is one.
fn msg_len(line: &[u8]) -> Option<u64> {
    let mut parts = line
        .split(|&b| b == b' ' || b == b'\t')
        .filter(|p| !p.is_empty());
    let op = parts.next()?;
    if !op.eq_ignore_ascii_case(b"MSG") {
        return None;
    }
    parse_u64(parts.next_back()?)
}

fn parse_u64(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 19 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

fn shown(line: &[u8]) -> String {
    String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned()
}

/// Parses one operation at the start of `buf`.
fn parse_one(buf: &[u8], max_line: usize, max_payload: usize) -> Result<Step<'_>, NatsError> {
    let Some(end) = find_crlf(buf, max_line) else {
        if buf.len() > max_line + 1 {
            return Err(NatsError::LineTooLong(max_line));
        }
        return Ok(Step::NeedMore);
    };
    if end > max_line {
        return Err(NatsError::LineTooLong(max_line));
    }
    let line = &buf[..end];
    let after = end + 2;
    let (op, args) = match line.iter().position(|&b| b == b' ' || b == b'\t') {
        Some(sp) => (&line[..sp], line[sp + 1..].trim_ascii()),
        None => (line, &[][..]),
    };
    let simple = |o| Ok(Step::Op(o, after));
    if op.eq_ignore_ascii_case(b"MSG") {
        let parts: Vec<&[u8]> = args
            .split(|&b| b == b' ' || b == b'\t')
            .filter(|p| !p.is_empty())
            .collect();
        if parts.len() != 3 && parts.len() != 4 {
            return Err(NatsError::Malformed(shown(line)));
        }
        let subject = parts[0];
        let sid = parse_u64(parts[1]).ok_or_else(|| NatsError::Malformed(shown(line)))?;
        let len =
            parse_u64(parts[parts.len() - 1]).ok_or_else(|| NatsError::Malformed(shown(line)))?;
        if len > max_payload as u64 {
            return Err(NatsError::PayloadTooLarge {
                len,
                max: max_payload,
            });
        }
        let len = len as usize;
        if buf.len() < after + len + 2 {
            return Ok(Step::NeedMore);
        }
        if &buf[after + len..after + len + 2] != b"\r\n" {
            return Err(NatsError::MissingCrlf);
        }
        let payload = &buf[after..after + len];
        Ok(Step::Op(
            ServerOp::Msg {
                subject,
                sid,
                payload,
            },
            after + len + 2,
        ))
    } else if op.eq_ignore_ascii_case(b"PING") {
        simple(ServerOp::Ping)
    } else if op.eq_ignore_ascii_case(b"PONG") {
        simple(ServerOp::Pong)
    } else if op.eq_ignore_ascii_case(b"+OK") {
        simple(ServerOp::Ok)
    } else if op.eq_ignore_ascii_case(b"-ERR") {
        simple(ServerOp::Err(args))
    } else if op.eq_ignore_ascii_case(b"INFO") {
        simple(ServerOp::Info(args))
    } else {
        Err(NatsError::Malformed(shown(line)))
    }
}

/// `CONNECT {...}\r\nPING\r\n`: no echo of the client's own messages, no `+OK`s
/// (verbose off), no headers; the `PONG` to the `PING` says the server took it.
pub fn connect_lines(name: &str) -> Vec<u8> {
    let opts = serde_json::json!({
        "verbose": false,
        "pedantic": false,
        "protocol": 1,
        "headers": false,
        "no_responders": false,
        "echo": false,
        "lang": "rust",
        "version": env!("CARGO_PKG_VERSION"),
        "name": name,
    });
    format!("CONNECT {opts}\r\nPING\r\n").into_bytes()
}

/// Appends `SUB <subject> <sid>\r\n`.
pub fn sub_line(out: &mut Vec<u8>, subject: &str, sid: u64) {
    out.extend_from_slice(b"SUB ");
    out.extend_from_slice(subject.as_bytes());
    out.push(b' ');
    out.extend_from_slice(sid.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends `PUB <subject> <len>\r\n<payload>\r\n`.
pub fn pub_frame(out: &mut Vec<u8>, subject: &str, payload: &[u8]) {
    out.extend_from_slice(b"PUB ");
    out.extend_from_slice(subject.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

pub const PING: &[u8] = b"PING\r\n";
pub const PONG: &[u8] = b"PONG\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    /// An owned copy of an operation, for comparing.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Owned {
        Info(String),
        Msg(String, u64, Vec<u8>),
        Ping,
        Pong,
        Ok,
        Err(String),
    }

    fn own(op: ServerOp<'_>) -> Owned {
        let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        match op {
            ServerOp::Info(b) => Owned::Info(s(b)),
            ServerOp::Msg {
                subject,
                sid,
                payload,
            } => Owned::Msg(s(subject), sid, payload.to_vec()),
            ServerOp::Ping => Owned::Ping,
            ServerOp::Pong => Owned::Pong,
            ServerOp::Ok => Owned::Ok,
            ServerOp::Err(b) => Owned::Err(s(b)),
        }
    }

    fn feed(p: &mut NatsParser, chunks: &[&[u8]]) -> Result<Vec<Owned>, NatsError> {
        let mut out = Vec::new();
        for c in chunks {
            p.push(c, |op| out.push(own(op)))?;
        }
        Ok(out)
    }

    const STREAM: &[u8] = b"INFO {\"server_id\":\"x\",\"max_payload\":1048576}\r\n\
PING\r\nMSG lt.r.fanout.0 1 5\r\nhello\r\nmsg a.b 22 reply.to 3\r\n\r\n\r\r\n\
+OK\r\nMSG a 7 0\r\n\r\n-ERR 'Slow Consumer'\r\nPONG\r\n";

    fn expected() -> Vec<Owned> {
        vec![
            Owned::Info("{\"server_id\":\"x\",\"max_payload\":1048576}".into()),
            Owned::Ping,
            Owned::Msg("lt.r.fanout.0".into(), 1, b"hello".to_vec()),
            // A payload may hold CR, LF, even CRLF: only the length counts.
            Owned::Msg("a.b".into(), 22, b"\r\n\r".to_vec()),
            Owned::Ok,
            Owned::Msg("a".into(), 7, Vec::new()),
            Owned::Err("'Slow Consumer'".into()),
            Owned::Pong,
        ]
    }

    #[test]
    fn merged_frames_parse_in_one_push() {
        let mut p = NatsParser::default();
        assert_eq!(feed(&mut p, &[STREAM]).unwrap(), expected());
        assert_eq!(p.pending(), 0);
    }

    #[test]
    fn frames_split_anywhere_parse_the_same() {
        for split in 0..=STREAM.len() {
            let (a, b) = STREAM.split_at(split);
            let mut p = NatsParser::default();
            assert_eq!(
                feed(&mut p, &[a, b]).unwrap(),
                expected(),
                "split at {split}"
            );
            assert_eq!(p.pending(), 0);
        }
        // One byte per frame.
        let mut p = NatsParser::default();
        let bytes: Vec<&[u8]> = STREAM.chunks(1).collect();
        assert_eq!(feed(&mut p, &bytes).unwrap(), expected());
        // Three pieces at every pair of cut points of a shorter stream.
        let s = b"MSG a 1 4\r\nabcd\r\nPING\r\n";
        for i in 0..s.len() {
            for j in i..s.len() {
                let mut p = NatsParser::default();
                let got = feed(&mut p, &[&s[..i], &s[i..j], &s[j..]]).unwrap();
                assert_eq!(
                    got,
                    vec![Owned::Msg("a".into(), 1, b"abcd".to_vec()), Owned::Ping],
                    "cuts {i} {j}"
                );
            }
        }
    }

    #[test]
    fn many_messages_in_random_pieces_parse_as_one_stream() {
        let mut stream = Vec::new();
        let mut want = Vec::new();
        for i in 0..500u64 {
            let payload = format!(
                "{{\"p\":0,\"s\":{i},\"x\":\"{}\"}}",
                "x".repeat((i % 97) as usize)
            );
            stream.extend_from_slice(format!("MSG t.{i} {i} {}\r\n", payload.len()).as_bytes());
            stream.extend_from_slice(payload.as_bytes());
            stream.extend_from_slice(b"\r\n");
            want.push(Owned::Msg(format!("t.{i}"), i, payload.into_bytes()));
            if i % 50 == 0 {
                stream.extend_from_slice(b"PING\r\n");
                want.push(Owned::Ping);
            }
        }
        let mut rng = fastrand::Rng::with_seed(12);
        for _ in 0..50 {
            let mut p = NatsParser::default();
            let mut pieces = Vec::new();
            let mut at = 0;
            while at < stream.len() {
                let n = rng.usize(1..=300).min(stream.len() - at);
                pieces.push(&stream[at..at + n]);
                at += n;
            }
            assert_eq!(feed(&mut p, &pieces).unwrap(), want);
            assert_eq!(p.pending(), 0);
        }
    }

    #[test]
    fn an_oversized_length_is_refused_before_anything_is_kept() {
        let mut p = NatsParser::new(64, 1024);
        let e = feed(&mut p, &[b"MSG a 1 1025\r\n"]).unwrap_err();
        assert_eq!(
            e,
            NatsError::PayloadTooLarge {
                len: 1025,
                max: 1024
            }
        );
        // A length too big for any integer is malformed, not a huge allocation.
        let mut p = NatsParser::new(64, 1024);
        assert!(matches!(
            feed(&mut p, &[b"MSG a 1 99999999999999999999999\r\n"]),
            Err(NatsError::Malformed(_))
        ));
        // The same refusal when the line arrives in pieces.
        let mut p = NatsParser::new(64, 1024);
        assert!(feed(&mut p, &[b"MSG a 1 10", b"25\r", b"\n"]).is_err());
        // Exactly the limit is fine.
        let mut p = NatsParser::new(64, 4);
        assert_eq!(
            feed(&mut p, &[b"MSG a 1 4\r\nabcd\r\n"]).unwrap(),
            vec![Owned::Msg("a".into(), 1, b"abcd".to_vec())]
        );
    }

    #[test]
    fn endless_lines_and_garbage_are_errors() {
        let mut p = NatsParser::new(16, 1024);
        assert_eq!(
            feed(&mut p, &[&[b'A'; 10], &[b'A'; 10]]).unwrap_err(),
            NatsError::LineTooLong(16)
        );
        let mut p = NatsParser::new(16, 1024);
        assert_eq!(
            feed(&mut p, &[&[b'A'; 40]]).unwrap_err(),
            NatsError::LineTooLong(16)
        );
        let mut p = NatsParser::default();
        assert!(matches!(
            feed(&mut p, &[b"HELLO world\r\n"]),
            Err(NatsError::Malformed(_))
        ));
        let mut p = NatsParser::default();
        assert!(matches!(
            feed(&mut p, &[b"MSG a x 3\r\nabc\r\n"]),
            Err(NatsError::Malformed(_))
        ));
        let mut p = NatsParser::default();
        assert_eq!(
            feed(&mut p, &[b"MSG a 1 3\r\nabcXY"]).unwrap_err(),
            NatsError::MissingCrlf
        );
    }

    #[test]
    fn the_held_tail_stays_bounded() {
        // A payload trickling in is held, never more than line + payload + 2 CRLF.
        let mut p = NatsParser::new(32, 100);
        feed(&mut p, &[b"MSG a 1 100\r\n"]).unwrap();
        for _ in 0..99 {
            feed(&mut p, &[b"x"]).unwrap();
            assert!(p.pending() <= 32 + 2 + 100 + 2);
        }
        let got = feed(&mut p, &[b"x\r\nPONG\r\n"]).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(p.pending(), 0);
    }

    #[test]
    fn client_lines() {
        let mut out = Vec::new();
        sub_line(&mut out, "lt.r.fanout.0", 3);
        pub_frame(&mut out, "lt.r.fanout.0", b"{\"p\":0}");
        assert_eq!(
            out,
            b"SUB lt.r.fanout.0 3\r\nPUB lt.r.fanout.0 7\r\n{\"p\":0}\r\n".to_vec()
        );
        let c = String::from_utf8(connect_lines("t")).unwrap();
        assert!(
            c.starts_with("CONNECT {") && c.ends_with("}\r\nPING\r\n"),
            "{c}"
        );
        let json: serde_json::Value = serde_json::from_str(
            c.trim_start_matches("CONNECT ")
                .split("\r\n")
                .next()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(json["verbose"], false);
        assert_eq!(json["protocol"], 1);
    }
}
