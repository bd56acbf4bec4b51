//! The one WebSocket client of the tests, speaking `weft.v1.json`: connect (with
//! headers, or asserting the negotiated subprotocol), send commands with ids, read
//! pushes and replies in arrival order (a frame may carry several messages separated
//! by `\n`), and see the close code. Reads in [`WsClient::next`] wait at most
//! [`crate::WAIT`]; [`WsClient::read_frame`] has no deadline, for callers that race
//! it against their own timers (the roaming subscribers).

use std::collections::VecDeque;
use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Response;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use weft_proto::{Command, ServerMessage};

use crate::{Delivered, WAIT};

/// What a WebSocket read produced.
#[derive(Debug)]
pub enum WsIn {
    Msg(Box<ServerMessage>),
    Closed(Option<u16>),
}

/// One read of the socket, as it came.
#[derive(Debug)]
pub enum Frame {
    /// A text frame: each of its lines parsed, or why it did not parse.
    Messages(Vec<Result<ServerMessage, String>>),
    /// A close frame and its code.
    Close(Option<u16>),
    /// A read error.
    Error(String),
    /// The connection ended without a close frame.
    End,
    /// Pings, pongs, binary frames.
    Other,
}

pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pending: VecDeque<ServerMessage>,
    next_id: u64,
    pub closed: Option<Option<u16>>,
}

impl WsClient {
    /// Opens `ws://{addr}{path}` asking for `weft.v1.json`, with extra request headers;
    /// the handshake's error (such as a refused upgrade) is returned, not unwrapped.
    pub async fn connect_with(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        Ok(Self::handshake(addr, path, headers).await?.0)
    }

    async fn handshake(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(Self, Response), tokio_tungstenite::tungstenite::Error> {
        let mut req = format!("ws://{addr}{path}").into_client_request()?;
        req.headers_mut().insert(
            "sec-websocket-protocol",
            weft_proto::SUBPROTOCOL_JSON.parse().unwrap(),
        );
        for (k, v) in headers {
            req.headers_mut().insert(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let (ws, resp) = tokio_tungstenite::connect_async(req).await?;
        Ok((Self::from_stream(ws), resp))
    }

    pub fn from_stream(ws: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Self {
        Self {
            ws,
            pending: VecDeque::new(),
            next_id: 1,
            closed: None,
        }
    }

    /// `/v1/ws` on `addr`; the server must pick `weft.v1.json`.
    pub async fn connect(addr: SocketAddr) -> Self {
        let (c, resp) = Self::handshake(addr, "/v1/ws", &[]).await.unwrap();
        assert_eq!(
            resp.headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().unwrap()),
            Some(weft_proto::SUBPROTOCOL_JSON)
        );
        c
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.unwrap();
    }

    pub async fn send_raw(
        &mut self,
        msg: Message,
    ) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        self.ws.send(msg).await
    }

    /// Sends `cmd` with the next id; the id.
    pub async fn send(&mut self, cmd: Command) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.send_text(&cmd.to_line(Some(id))).await;
        id
    }

    /// Reads the socket once, with no deadline.
    pub async fn read_frame(&mut self) -> Frame {
        match self.ws.next().await {
            Some(Ok(Message::Text(t))) => Frame::Messages(
                t.as_str()
                    .split('\n')
                    .filter(|l| !l.trim().is_empty())
                    .map(|line| {
                        serde_json::from_str(line)
                            .map_err(|e| format!("bad server line {line}: {e}"))
                    })
                    .collect(),
            ),
            Some(Ok(Message::Close(frame))) => Frame::Close(frame.map(|f| u16::from(f.code))),
            Some(Ok(_)) => Frame::Other,
            Some(Err(e)) => Frame::Error(e.to_string()),
            None => Frame::End,
        }
    }

    /// The next message (pushes and replies, in arrival order), or the close.
    pub async fn next(&mut self) -> WsIn {
        if let Some(m) = self.pending.pop_front() {
            return WsIn::Msg(Box::new(m));
        }
        if let Some(code) = self.closed {
            return WsIn::Closed(code);
        }
        loop {
            let frame = tokio::time::timeout(WAIT, self.read_frame())
                .await
                .expect("websocket read timed out");
            match frame {
                Frame::Messages(lines) => {
                    for m in lines {
                        self.pending.push_back(m.unwrap_or_else(|e| panic!("{e}")));
                    }
                    if let Some(m) = self.pending.pop_front() {
                        return WsIn::Msg(Box::new(m));
                    }
                }
                Frame::Close(code) => {
                    self.closed = Some(code);
                    return WsIn::Closed(code);
                }
                Frame::Other => {}
                Frame::Error(_) | Frame::End => {
                    self.closed = Some(None);
                    return WsIn::Closed(None);
                }
            }
        }
    }

    pub async fn next_msg(&mut self) -> ServerMessage {
        match self.next().await {
            WsIn::Msg(m) => *m,
            WsIn::Closed(code) => {
                panic!("connection closed ({code:?}) while a message was expected")
            }
        }
    }

    /// Sends `cmd` and returns its reply; pushes that arrive first stay queued.
    pub async fn request(&mut self, cmd: Command) -> ServerMessage {
        let id = self.send(cmd).await;
        let mut held = Vec::new();
        let reply = loop {
            let m = self.next_msg().await;
            if m.id == Some(id) {
                break m;
            }
            held.push(m);
        };
        for m in held.into_iter().rev() {
            self.pending.push_front(m);
        }
        reply
    }

    /// Queues messages to be read before anything more from the socket.
    pub fn queue(&mut self, msgs: impl IntoIterator<Item = ServerMessage>) {
        self.pending.extend(msgs);
    }

    /// The next event push (skipping other pushes), as a [`Delivered`].
    pub async fn next_event(&mut self) -> Option<Delivered> {
        loop {
            match self.next().await {
                WsIn::Msg(m) => {
                    if let Some(push) = m.push {
                        if let (Some(topic), Some(ev)) = (push.topic, push.event) {
                            return Some(Delivered {
                                topic,
                                epoch: String::new(),
                                offset: ev.offset,
                                data: serde_json::from_str(ev.data.get()).unwrap(),
                            });
                        }
                    }
                }
                WsIn::Closed(_) => return None,
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// `subscribe` to `topic`, from `since` if given, without a snapshot.
pub fn subscribe_cmd(topic: &str, since: Option<&str>) -> Command {
    Command::Subscribe(weft_proto::command::SubscribeCmd {
        topic: topic.into(),
        since: since.map(Into::into),
        snapshot: false,
    })
}
