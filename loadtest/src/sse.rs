//! An incremental `text/event-stream` parser (the subset of the WHATWG rules a Weft
//! node uses): `id`, `event`, `data` (several `data` lines join with `\n`), comments
//! (`: ping`) ignored, an empty line dispatches. Lines end with `\n` or `\r\n`.
//!
//! The buffered partial line is bounded: a line longer than the limit is an error, so a
//! broken server cannot make a subscriber grow without bound.

use thiserror::Error;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    pub id: Option<String>,
    /// `None` means the default type, `message`.
    pub event: Option<String>,
    pub data: String,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SseError {
    #[error("SSE line longer than {0} bytes")]
    LineTooLong(usize),
    #[error("SSE stream is not UTF-8")]
    NotUtf8,
}

#[derive(Debug)]
pub struct SseParser {
    buf: Vec<u8>,
    current: SseEvent,
    has_fields: bool,
    max_line: usize,
}

impl SseParser {
    pub fn new(max_line: usize) -> Self {
        Self {
            buf: Vec::new(),
            current: SseEvent::default(),
            has_fields: false,
            max_line,
        }
    }

    /// Feeds a chunk; complete events are appended to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        let mut rest = chunk;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let (head, tail) = rest.split_at(nl);
            rest = &tail[1..];
            if self.buf.len() + head.len() > self.max_line {
                return Err(SseError::LineTooLong(self.max_line));
            }
            let line = if self.buf.is_empty() {
                head
            } else {
                self.buf.extend_from_slice(head);
                &self.buf[..]
            };
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let line = std::str::from_utf8(line).map_err(|_| SseError::NotUtf8)?;
            let done = Self::field(&mut self.current, &mut self.has_fields, line);
            self.buf.clear();
            if let Some(ev) = done {
                out.push(ev);
            }
        }
        if self.buf.len() + rest.len() > self.max_line {
            return Err(SseError::LineTooLong(self.max_line));
        }
        self.buf.extend_from_slice(rest);
        Ok(())
    }

    fn field(cur: &mut SseEvent, has: &mut bool, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            if !*has {
                return None;
            }
            *has = false;
            return Some(std::mem::take(cur));
        }
        if line.starts_with(':') {
            return None;
        }
        let (name, value) = match line.split_once(':') {
            Some((n, v)) => (n, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match name {
            "id" => cur.id = Some(value.to_owned()),
            "event" => cur.event = Some(value.to_owned()),
            "data" => {
                if *has && !cur.data.is_empty() {
                    cur.data.push('\n');
                }
                cur.data.push_str(value);
            }
            _ => return None,
        }
        *has = true;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut p = SseParser::new(1024);
        let mut out = Vec::new();
        for c in chunks {
            p.push(c, &mut out).unwrap();
        }
        out
    }

    #[test]
    fn events_across_chunk_boundaries() {
        let stream = b": ping\n\nid: e1:5\nevent: message\ndata: {\"a\":1}\n\nid: e1:6\r\ndata: x\r\ndata: y\r\n\r\nevent: bookmark\nid: e1:6\n\n";
        for split in 0..stream.len() {
            let (a, b) = stream.split_at(split);
            let evs = parse_all(&[a, b]);
            assert_eq!(evs.len(), 3, "split at {split}");
            assert_eq!(evs[0].id.as_deref(), Some("e1:5"));
            assert_eq!(evs[0].event.as_deref(), Some("message"));
            assert_eq!(evs[0].data, "{\"a\":1}");
            assert_eq!(evs[1].data, "x\ny");
            assert_eq!(evs[1].event, None);
            assert_eq!(evs[2].event.as_deref(), Some("bookmark"));
        }
    }

    #[test]
    fn long_lines_are_refused() {
        let mut p = SseParser::new(16);
        let mut out = Vec::new();
        assert_eq!(
            p.push(&[b'a'; 10], &mut out)
                .and(p.push(&[b'a'; 10], &mut out)),
            Err(SseError::LineTooLong(16))
        );
    }
}
