//! Raw sockets for tests of what a well-behaved client never sends: HTTP requests and
//! WebSocket frames written byte for byte, and the answers read back without a client
//! library smoothing them over.

use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::WAIT;

/// A TCP connection to `addr` from `local` (any 127.x.y.z works on loopback), so a
/// per-IP limit on 127.0.0.1 does not count it.
pub async fn tcp_from(addr: SocketAddr, local: IpAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(local, 0)).unwrap();
    socket.connect(addr).await.unwrap()
}

/// An HTTP response read off a raw socket.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Lower-cased names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Whether this is the JSON error of DESIGN §3.1 for its own status: a JSON
    /// content type and `{"error":{"code":status,"message":"…"}}`. `Err` says what is
    /// wrong.
    pub fn check_error_body(&self) -> Result<(), String> {
        let ctype = self.header("content-type").unwrap_or("");
        if !ctype.starts_with("application/json") {
            return Err(format!("content-type is {ctype:?}"));
        }
        let body: weft_proto::ErrorBody = serde_json::from_slice(&self.body).map_err(|e| {
            format!(
                "body is not the error shape ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })?;
        if body.error.code != self.status {
            return Err(format!(
                "code {} in a {} body",
                body.error.code, self.status
            ));
        }
        if body.error.message.is_empty() {
            return Err("empty message".into());
        }
        Ok(())
    }
}

/// Reads one HTTP/1.1 response: the head, then `Content-Length` bytes or up to EOF.
pub async fn read_response<R: AsyncRead + Unpin>(s: &mut R) -> RawResponse {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = tokio::time::timeout(WAIT, s.read(&mut chunk))
            .await
            .expect("response head timed out")
            .expect("read the response head");
        assert!(
            n > 0,
            "connection closed before a response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map(|(_, v)| v.parse::<usize>().unwrap());
    let mut body = buf[head_end + 4..].to_vec();
    while length.is_none_or(|l| body.len() < l) {
        let n = tokio::time::timeout(WAIT, s.read(&mut chunk))
            .await
            .expect("response body timed out")
            .unwrap_or(0);
        if n == 0 {
            assert!(length.is_none(), "connection closed inside the body");
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    RawResponse {
        status,
        headers,
        body,
    }
}

/// Sends `request` on a fresh connection from `local` and reads one response. The
/// writer runs apart: the server may answer before it has read everything.
pub async fn exchange(addr: SocketAddr, local: IpAddr, request: Vec<u8>) -> RawResponse {
    let (mut r, mut w) = tcp_from(addr, local).await.into_split();
    let writer = tokio::spawn(async move {
        let _ = w.write_all(&request).await;
        w
    });
    let resp = read_response(&mut r).await;
    writer.abort();
    resp
}

/// A client WebSocket frame, masked as RFC 6455 requires unless `masked` is false.
/// `b0` is the first byte as sent (FIN, RSV bits, opcode).
pub fn client_frame(b0: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut out = vec![b0];
    let bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(bit | n as u8),
        n if n <= u16::MAX as usize => {
            out.push(bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// The code of the first close frame the server sends on `s` (skipping other frames),
/// or `None` if the connection ends without one.
pub async fn read_close_code<R: AsyncRead + Unpin>(s: &mut R) -> Option<u16> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        // Whole server frames (unmasked) at the front of `buf`.
        while buf.len() >= 2 {
            let (op, len7) = (buf[0] & 0x0f, (buf[1] & 0x7f) as usize);
            let (len, header) = match len7 {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                127 if buf.len() >= 10 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&buf[2..10]);
                    (u64::from_be_bytes(b) as usize, 10)
                }
                126 | 127 => break,
                n => (n, 2),
            };
            if buf.len() < header + len {
                break;
            }
            if op == 0x8 {
                let p = &buf[header..header + len];
                return (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]));
            }
            buf.drain(..header + len);
        }
        match tokio::time::timeout(WAIT, s.read(&mut chunk)).await {
            Err(_) => panic!("no close frame within {WAIT:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Opens a WebSocket on `path` (offering `weft.v1.json`) by hand and returns the raw
/// socket right after the server's `101`, for frames written byte for byte.
pub async fn ws_handshake(addr: SocketAddr, local: IpAddr, path: &str) -> TcpStream {
    let mut s = tcp_from(addr, local).await;
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: weft\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-protocol: {}\r\n\r\n",
        weft_proto::SUBPROTOCOL_JSON
    );
    s.write_all(req.as_bytes()).await.unwrap();
    // Byte by byte up to the end of the head, so no frame is read past it.
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, s.read(&mut b))
            .await
            .expect("upgrade response timed out")
            .expect("read the upgrade response");
        assert!(
            n > 0,
            "closed during the upgrade: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101 "),
        "upgrade refused: {:?}",
        String::from_utf8_lossy(&head)
    );
    s
}
