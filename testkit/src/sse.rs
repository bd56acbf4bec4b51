//! The one SSE parser of the tests ([`SseParser`]: bytes in, comments and events out,
//! no I/O) and the streaming HTTP reader over it ([`HttpStream`]: SSE events, NDJSON
//! values or raw lines of one response, each read waiting at most [`crate::WAIT`]).
//!
//! The parser holds the server to the format it documents (DESIGN §3.1): a field is
//! `name: value` with one space, and only `id`, `event`, `data` and `retry` are
//! fields; anything else is an [`SseError`] for the caller to fail on or record.

use futures_util::StreamExt;

use crate::WAIT;

/// A parsed SSE event. `event` is `message` where the server named none.
#[derive(Debug, Clone, Default)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

/// What the parser read next.
#[derive(Debug, Clone)]
pub enum SseItem {
    /// A `:` line (such as the `: ping` keepalive), without the colon and one space.
    Comment(String),
    Event(SseEvent),
}

/// A line the documented format does not allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseError {
    /// A field name other than `id`, `event`, `data`, `retry`.
    UnknownField(String),
    /// `name:value` without the space.
    NoSpace(String),
}

impl std::fmt::Display for SseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SseError::UnknownField(line) => write!(f, "unknown SSE field in {line:?}"),
            SseError::NoSpace(line) => write!(f, "SSE field without a space in {line:?}"),
        }
    }
}

/// Incremental SSE parsing: [`SseParser::feed`] what arrived, then take items with
/// [`SseParser::next_item`] until it says it needs more.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    ev: SseEvent,
    has_field: bool,
}

impl SseParser {
    pub fn feed(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete line fed, without its `\n`.
    pub fn next_line(&mut self) -> Option<String> {
        let i = self.buf.iter().position(|&b| b == b'\n')?;
        let line: Vec<u8> = self.buf.drain(..=i).collect();
        Some(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned())
    }

    /// The next comment or complete event in what was fed (`None`: feed more). An
    /// event ends at a blank line; blank lines around no field are skipped.
    pub fn next_item(&mut self) -> Option<Result<SseItem, SseError>> {
        loop {
            let line = self.next_line()?;
            if let Some(item) = self.line(line) {
                return Some(item);
            }
        }
    }

    fn line(&mut self, line: String) -> Option<Result<SseItem, SseError>> {
        if line.is_empty() {
            if !std::mem::take(&mut self.has_field) {
                return None;
            }
            let mut ev = std::mem::take(&mut self.ev);
            if ev.event.is_empty() {
                ev.event = "message".into();
            }
            return Some(Ok(SseItem::Event(ev)));
        }
        if let Some(comment) = line.strip_prefix(':') {
            let text = comment.strip_prefix(' ').unwrap_or(comment);
            return Some(Ok(SseItem::Comment(text.to_owned())));
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => match v.strip_prefix(' ') {
                Some(v) => (f, v),
                None => return Some(Err(SseError::NoSpace(line))),
            },
            None => (line.as_str(), ""),
        };
        match field {
            "id" => self.ev.id = Some(value.into()),
            "event" => self.ev.event = value.into(),
            "data" => {
                if !self.ev.data.is_empty() {
                    self.ev.data.push('\n');
                }
                self.ev.data.push_str(value);
            }
            "retry" => return None,
            _ => return Some(Err(SseError::UnknownField(line))),
        }
        self.has_field = true;
        None
    }
}

/// A streaming HTTP response read as SSE events, NDJSON lines or raw lines.
pub struct HttpStream {
    pub status: u16,
    body: Option<futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>>,
    parser: SseParser,
}

impl HttpStream {
    pub async fn open(client: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> Self {
        let mut req = client.get(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Self::from_response(req.send().await.unwrap())
    }

    pub fn from_response(resp: reqwest::Response) -> Self {
        Self {
            status: resp.status().as_u16(),
            body: Some(resp.bytes_stream().boxed()),
            parser: SseParser::default(),
        }
    }

    async fn fill(&mut self) -> bool {
        let Some(body) = self.body.as_mut() else {
            return false;
        };
        match tokio::time::timeout(WAIT, body.next())
            .await
            .expect("stream read timed out")
        {
            Some(Ok(chunk)) => {
                self.parser.feed(&chunk);
                true
            }
            _ => {
                self.body = None;
                false
            }
        }
    }

    /// The next complete line without its `\n`, or `None` at the end of the stream.
    pub async fn next_line(&mut self) -> Option<String> {
        loop {
            if let Some(line) = self.parser.next_line() {
                return Some(line);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// The next SSE comment or event, or `None` at the end; a line out of format
    /// fails the test.
    pub async fn next_sse_item(&mut self) -> Option<SseItem> {
        loop {
            if let Some(item) = self.parser.next_item() {
                return Some(item.unwrap_or_else(|e| panic!("{e}")));
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// The next SSE event (comments and `retry:` skipped), or `None` at the end.
    pub async fn next_sse(&mut self) -> Option<SseEvent> {
        loop {
            if let SseItem::Event(ev) = self.next_sse_item().await? {
                return Some(ev);
            }
        }
    }

    /// The next NDJSON value (blank keepalive lines skipped).
    pub async fn next_ndjson(&mut self) -> Option<serde_json::Value> {
        loop {
            let line = self.next_line().await?;
            if !line.trim().is_empty() {
                return Some(serde_json::from_str(&line).unwrap());
            }
        }
    }
}
