//! The request head before routing: our own limits on it, and hyper's own refusals
//! given the JSON error body every other error has (DESIGN §3.1).
//!
//! hyper answers a head it cannot parse by itself, before any service runs: `400`
//! for a malformed request line or header, `414` for a request target past its fixed
//! 65,534 bytes, `431` for a head larger than the connection's read buffer or with
//! more than 100 header fields. It has no hook for the body of those answers. So:
//!
//! - the documented limits (`limits.max_uri_bytes`, `limits.max_header_bytes`) sit
//!   well below hyper's, and [`limits`] enforces them as the outermost middleware:
//!   an over-long target is our `414`, an over-large header block our `431`, both
//!   counted with the other refusals;
//! - what still reaches hyper's own refusal (unparseable framing, a head past the
//!   read buffer) goes out through [`JsonRefusals`], which recognises hyper's
//!   automatic answer — a status line of `400`, `414` or `431` followed by nothing
//!   but `content-length: 0`, `date` and `connection` — and writes the same status
//!   with a JSON body instead. A response of ours always carries a `content-type`,
//!   so it is never taken for one. The server counts these when hyper reports the
//!   parse error (`serve_http`).
//!
//! ```text
//!   bytes ─► hyper parses the head ──(unparseable / past the buffer)──► automatic 4xx ─► JsonRefusals ─► JSON 4xx
//!                   │
//!                   ▼
//!            limits (414 / 431) ─► count_refusals ─► edge (origin, caller) ─► routes
//! ```

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::rt::{Read, ReadBufCursor, Write};

use crate::error::ApiError;
use crate::node::Node;

/// The read buffer hyper may grow per connection while it reads a head: our limits
/// plus room for the request line's method and version, and never below 64 KiB.
pub fn read_buffer_bytes(limits: &crate::config::Limits) -> usize {
    (limits.max_uri_bytes + limits.max_header_bytes + 4096).max(64 * 1024)
}

/// `414` past `limits.max_uri_bytes` of request target, `431` past
/// `limits.max_header_bytes` of header fields (each counted as it is on the wire:
/// name, `": "`, value, CRLF).
pub async fn limits(State(node): State<Arc<Node>>, req: Request, next: Next) -> Response {
    let l = &node.config.limits;
    let uri = req.uri();
    let target = uri.path_and_query().map_or(0, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.scheme_str().map_or(0, |s| s.len() + 3);
    if target > l.max_uri_bytes {
        return ApiError::UriTooLong(format!(
            "the request target exceeds {} bytes",
            l.max_uri_bytes
        ))
        .into_response();
    }
    let headers: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if headers > l.max_header_bytes {
        return ApiError::HeadersTooLarge(format!(
            "the header fields exceed {} bytes",
            l.max_header_bytes
        ))
        .into_response();
    }
    next.run(req).await
}

/// The IO hyper serves, with hyper's automatic `400`/`414`/`431` rewritten to carry
/// the JSON error body. Everything else passes through untouched.
pub struct JsonRefusals<I> {
    io: I,
    /// A rewritten refusal being written: its bytes, how many are out, and how many
    /// of hyper's bytes it stands for (reported once all of it is written).
    pending: Option<(Vec<u8>, usize, usize)>,
}

impl<I> JsonRefusals<I> {
    pub fn new(io: I) -> Self {
        Self { io, pending: None }
    }

    pub fn into_inner(self) -> I {
        self.io
    }
}

/// hyper's automatic refusals.
const AUTOMATIC: [StatusCode; 3] = [
    StatusCode::BAD_REQUEST,
    StatusCode::URI_TOO_LONG,
    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
];

/// The error each automatic refusal stands for.
fn refusal(status: StatusCode) -> ApiError {
    match status {
        StatusCode::URI_TOO_LONG => ApiError::UriTooLong("the request target is too long".into()),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => ApiError::HeadersTooLarge(
            "the request head is too large or has too many header fields".into(),
        ),
        _ => ApiError::bad(
            "malformed HTTP request: the request line or a header field could not be parsed",
        ),
    }
}

/// If `buf` is exactly one of hyper's automatic refusals, the response to write in
/// its place.
fn rewrite(buf: &[u8]) -> Option<Vec<u8>> {
    // Every write of every response passes here: the status is looked at first.
    if buf.len() > 256 || !matches!(buf.get(9..12), Some(b"400" | b"414" | b"431")) {
        return None;
    }
    let head = buf.strip_suffix(b"\r\n\r\n")?;
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let rest = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))?;
    let status = AUTOMATIC.into_iter().find(|s| {
        rest.strip_prefix(s.as_str())
            .and_then(|r| r.strip_prefix(' '))
            .is_some_and(|reason| Some(reason) == s.canonical_reason())
    })?;
    for line in lines {
        let (name, value) = line.split_once(':')?;
        match name.to_ascii_lowercase().as_str() {
            "content-length" if value.trim() == "0" => {}
            "date" | "connection" => {}
            _ => return None,
        }
    }
    let body = refusal(status).body_json();
    Some(
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            status.as_str(),
            status.canonical_reason().unwrap_or(""),
            body.len()
        )
        .into_bytes(),
    )
}

impl<I: Write + Unpin> JsonRefusals<I> {
    /// Writes the pending rewrite; ready with the count of hyper's bytes it replaced.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some((bytes, at, covers)) = &mut self.pending else {
            return Poll::Ready(Ok(0));
        };
        while *at < bytes.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &bytes[*at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *at += n;
        }
        let covers = *covers;
        self.pending = None;
        Poll::Ready(Ok(covers))
    }
}

impl<I: Read + Unpin> Read for JsonRefusals<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: Write + Unpin> Write for JsonRefusals<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.pending.is_none() {
            match rewrite(buf) {
                Some(bytes) => this.pending = Some((bytes, 0, buf.len())),
                None => return Pin::new(&mut this.io).poll_write(cx, buf),
            }
        }
        this.poll_pending(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.pending.is_none() {
            // hyper writes an automatic refusal as one buffer of its own.
            let first = bufs.iter().find(|b| !b.is_empty());
            match first.and_then(|b| rewrite(b).map(|r| (r, b.len()))) {
                Some((bytes, covers)) => this.pending = Some((bytes, 0, covers)),
                None => return Pin::new(&mut this.io).poll_write_vectored(cx, bufs),
            }
        }
        this.poll_pending(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(resp: &[u8]) -> serde_json::Value {
        let text = std::str::from_utf8(resp).unwrap();
        let (_, body) = text.split_once("\r\n\r\n").unwrap();
        serde_json::from_str(body).unwrap()
    }

    #[test]
    fn hypers_automatic_refusals_get_the_json_body() {
        for (raw, code) in [
            (&b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: Sun, 06 Nov 1994 08:49:37 GMT\r\n\r\n"[..], 400),
            (b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\n\r\n", 414),
            (b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\n", 431),
        ] {
            let out = rewrite(raw).expect("rewritten");
            let text = std::str::from_utf8(&out).unwrap();
            assert!(text.starts_with(&format!("HTTP/1.1 {code} ")), "{text}");
            assert!(text.contains("\r\ncontent-type: application/json\r\n"));
            let body = body_of(&out);
            assert_eq!(body["error"]["code"], code);
            let len: usize = text
                .split("\r\n")
                .find_map(|l| l.strip_prefix("content-length: "))
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(len, text.split_once("\r\n\r\n").unwrap().1.len());
        }
    }

    #[test]
    fn responses_of_ours_and_others_pass_through() {
        for raw in [
            // Ours: always a content-type, and a body.
            &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 50\r\n\r\n"[..],
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nx-other: 1\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Whatever\r\ncontent-length: 0\r\n\r\n",
            // Not a whole head in this buffer.
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n{}",
            b"{\"error\":1}",
            b"",
        ] {
            assert!(rewrite(raw).is_none(), "{:?}", String::from_utf8_lossy(raw));
        }
    }
}
