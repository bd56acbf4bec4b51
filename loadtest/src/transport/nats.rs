//! `--system nats`: the same load against a `nats-server`'s WebSocket listener
//! (`websocket { listen: "127.0.0.1:PORT", no_tls: true }`), so figures compare.
//!
//! **Connection.** WebSocket (no subprotocol), then the NATS text protocol
//! ([`crate::natsproto`]): the server's `INFO`, the client's `CONNECT` + `PING`, the
//! server's `PONG`. The server's `PING`s are answered; a `-ERR` ends the session.
//!
//! **Subscribers.** One `SUB <topic> <i+1>` per subscription, then a `PING`: its `PONG`
//! says the server has every subscription (the subscribe latency is timed to it).
//!
//! **Accounting.** NATS has no offsets. Every event carries the harness's stamp
//! `{"p","s","t","x"}`; a NATS topic is published by one publisher only (the process
//! that owns the topic, see [`crate::publisher`]), in order, one event in flight per
//! topic, so the stamp's schedule number `s` gives the event's place in its topic:
//! event `s` goes to topic `s % T` as that topic's [`ordinal`] `s / T + 1`. The
//! trackers then count exactly as for Weft, with the fixed epoch [`EPOCH`]: every
//! subscription starts at ordinal 0 (it subscribed before the load started) and is
//! owed up to the last ordinal its topic's publisher saw acknowledged. So *order* is
//! the publisher's sequence and *loss* is acknowledged minus received. NATS core has
//! no replay: a subscriber that reconnects mid-run loses what was sent meanwhile, and
//! that shows as loss.
//!
//! **Publishers.** A few links (WebSocket connections) per process; topic `t` always
//! goes over link `t % links`, so one topic's events stay in order. A publish is
//! `PUB <topic> <len>\r\n<data>\r\n` followed by `PING\r\n`; it counts as acknowledged
//! when that `PING`'s `PONG` arrives (what a NATS client's flush waits for: the server
//! answers in order, after it has processed the `PUB`). Pending acknowledgements wait
//! in a FIFO, bounded by the requests the publisher lets be in flight.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::conn::Conn;
use crate::natsproto::{self, NatsParser, ServerOp, PING, PONG};
use crate::net::{Net, CONNECT_TIMEOUT};
use crate::stamp::{now_us, Stamp};
use crate::stats::LiveStats;
use crate::subscriber::{connected, stopped, SessionEnd, SessionTimes, Shared, Subscriber};
use crate::transport::control::{Control, Ctl};
use crate::transport::{batch, Drain, Links};

/// The epoch name NATS subscriptions are accounted in (NATS has none).
pub const EPOCH: &str = "nats";
/// Publishes written to the socket in one WebSocket frame at most.
const MAX_BATCH: usize = 256;
/// Publish requests queued for one link.
const LINK_QUEUE: usize = 1024;

type Ws = WebSocketStream<Conn>;

/// Topic and place in that topic of schedule event `k` when there are `topics`
/// topics (round robin: event `k` goes to topic `k % T`; ordinals start at 1).
pub fn ordinal(k: u64, topics: usize) -> (usize, u64) {
    let t = topics.max(1) as u64;
    ((k % t) as usize, k / t + 1)
}

/// The bytes of a frame, whatever its type (the server sends binary frames).
fn frame_bytes(m: &Message) -> Option<&[u8]> {
    match m {
        Message::Binary(b) => Some(b),
        Message::Text(t) => Some(t.as_bytes()),
        _ => None,
    }
}

/// `INFO` → `CONNECT` + `PING` → `PONG`: the connection is usable.
async fn handshake(ws: &mut Ws, parser: &mut NatsParser) -> anyhow::Result<()> {
    let mut connect_sent = false;
    loop {
        let msg = ws
            .next()
            .await
            .ok_or_else(|| anyhow!("NATS server closed during the handshake"))?
            .context("NATS handshake")?;
        let Some(bytes) = frame_bytes(&msg) else {
            if let Message::Close(f) = msg {
                bail!("NATS server closed during the handshake: {f:?}");
            }
            continue;
        };
        let (mut info, mut pong, mut pings, mut err) = (false, false, 0, None);
        parser.push(bytes, |op| match op {
            ServerOp::Info(_) => info = true,
            ServerOp::Pong => pong = true,
            ServerOp::Ping => pings += 1,
            ServerOp::Err(m) => err = Some(String::from_utf8_lossy(m).into_owned()),
            _ => {}
        })?;
        if let Some(e) = err {
            bail!("NATS server refused the connection: {e}");
        }
        for _ in 0..pings {
            ws.send(Message::binary(PONG)).await?;
        }
        if info && !connect_sent {
            ws.send(Message::binary(natsproto::connect_lines("weft-loadtest")))
                .await?;
            connect_sent = true;
        }
        if pong && connect_sent {
            return Ok(());
        }
    }
}

/// A connected, handshaken NATS WebSocket for connection number `n`.
async fn open(net: &Net, n: usize) -> anyhow::Result<(Ws, NatsParser)> {
    let mut ws = net.nats_ws(n).await.context("NATS WebSocket connect")?;
    let mut parser = NatsParser::default();
    handshake(&mut ws, &mut parser).await?;
    Ok((ws, parser))
}

enum Wake {
    Msg(Option<Result<Message, tokio_tungstenite::tungstenite::Error>>),
    Control(Ctl),
}

/// What one frame's operations asked of the session.
#[derive(Default)]
struct FrameEffects {
    pings: usize,
    error: Option<String>,
}

/// One subscriber session against a `nats-server`.
pub async fn session(sub: &mut Subscriber, sh: &Shared, when: SessionTimes) -> SessionEnd {
    let SessionTimes { intended, lifetime } = when;
    let opened = tokio::select! {
        r = timeout(CONNECT_TIMEOUT, open(&sh.net, sub.id)) => r,
        _ = stopped(&mut sub.stop) => return SessionEnd::Stopped,
    };
    let (mut ws, mut parser) = match opened {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            LiveStats::inc(&sh.stats.connect_failures);
            return SessionEnd::Failed(e);
        }
        Err(_) => {
            LiveStats::inc(&sh.stats.connect_failures);
            return SessionEnd::Failed(anyhow!("NATS connect timed out"));
        }
    };
    let _open = connected(sh, sub.id, intended);

    let mut lines = Vec::new();
    for (i, &t) in sub.topics.iter().enumerate() {
        natsproto::sub_line(&mut lines, &sh.topics[t], i as u64 + 1);
    }
    lines.extend_from_slice(PING);
    let asked = Instant::now();
    if let Err(e) = ws.send(Message::binary(lines)).await {
        return SessionEnd::Failed(anyhow::Error::new(e).context("sending SUB"));
    }
    let mut subscribe_pending = true;
    let topics = sh.topics.len();
    let mut drain = Drain::default();
    let mut control = Control::new(sub, lifetime);
    loop {
        let wake = match drain.ready(&mut ws) {
            Some(m) => Wake::Msg(m),
            None => tokio::select! {
                m = ws.next() => Wake::Msg(m),
                c = control.next_event() => Wake::Control(c),
            },
        };
        let msg = match wake {
            Wake::Control(Ctl::Stop) => return bye(ws, SessionEnd::Stopped).await,
            Wake::Control(Ctl::Lifetime) => return bye(ws, SessionEnd::Lifetime).await,
            Wake::Control(Ctl::Finals) => {
                if sub.caught_up() {
                    return bye(ws, SessionEnd::CaughtUp).await;
                }
                continue;
            }
            Wake::Msg(m) => m,
        };
        let msg = match msg {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                return SessionEnd::Failed(anyhow::Error::new(e).context("NATS WebSocket read"))
            }
            None => return SessionEnd::Failed(anyhow!("NATS WebSocket ended")),
        };
        let Some(bytes) = frame_bytes(&msg) else {
            if let Message::Close(f) = msg {
                return SessionEnd::Failed(anyhow!("closed by the NATS server: {f:?}"));
            }
            continue;
        };
        let now = now_us();
        let at = Instant::now();
        let mut fx = FrameEffects::default();
        let parsed = parser.push(bytes, |op| match op {
            ServerOp::Msg { sid, payload, .. } => {
                deliver(sub, sh, sid, payload, topics, now);
            }
            ServerOp::Pong if subscribe_pending => {
                subscribe_pending = false;
                let us = at.saturating_duration_since(asked).as_micros() as u64;
                for i in 0..sub.topics.len() {
                    if !sub.tracks[i].is_started() {
                        sh.recorder.subscribe(sub.id, us);
                        sub.on_start(sh, i, EPOCH, 0);
                    }
                }
            }
            ServerOp::Ping => fx.pings += 1,
            ServerOp::Err(m) => fx.error = Some(String::from_utf8_lossy(m).into_owned()),
            _ => {}
        });
        if let Err(e) = parsed {
            return bye(ws, SessionEnd::Failed(anyhow!("from the NATS server: {e}"))).await;
        }
        if let Some(e) = fx.error {
            return bye(ws, SessionEnd::Failed(anyhow!("NATS -ERR {e}"))).await;
        }
        for _ in 0..fx.pings {
            if let Err(e) = ws.send(Message::binary(PONG)).await {
                return SessionEnd::Failed(anyhow::Error::new(e).context("sending PONG"));
            }
        }
        if sub.caught_up() {
            return bye(ws, SessionEnd::CaughtUp).await;
        }
    }
}

/// Accounts one `MSG`: its subscription from the sid, its place from the stamp.
fn deliver(sub: &mut Subscriber, sh: &Shared, sid: u64, payload: &[u8], topics: usize, now: u64) {
    let Some(i) = (sid as usize)
        .checked_sub(1)
        .filter(|&i| i < sub.topics.len())
    else {
        sh.errors.add(format!("NATS MSG for an unknown sid {sid}"));
        return;
    };
    let stamp = std::str::from_utf8(payload)
        .ok()
        .and_then(|d| Stamp::decode(d).map(|s| (d, s)));
    let Some((data, stamp)) = stamp else {
        LiveStats::inc(&sh.stats.foreign);
        return;
    };
    let (topic, place) = ordinal(stamp.s, topics);
    if topic != sub.topics[i] {
        LiveStats::inc(&sh.stats.foreign);
        return;
    }
    if !sub.tracks[i].is_started() {
        // The server has the subscription (it delivers); its PONG is on the way.
        sub.on_start(sh, i, EPOCH, 0);
    }
    sub.on_event(sh, i, None, place, data, now);
}

/// Closes politely (bounded) and returns `end`.
async fn bye(mut ws: Ws, end: SessionEnd) -> SessionEnd {
    let _ = timeout(Duration::from_millis(500), ws.close(None)).await;
    end
}

/// One publish waiting to be written.
struct PubReq {
    subject: Arc<str>,
    payload: Bytes,
    ack: oneshot::Sender<()>,
}

/// The publisher's NATS connections; topic `t` always uses link `t % links`.
pub struct NatsLinks {
    net: Arc<Net>,
    links: Links<PubReq>,
}

impl NatsLinks {
    pub fn new(net: Arc<Net>, links: usize) -> Self {
        Self {
            net,
            links: Links::new(links),
        }
    }

    /// Publishes `payload` on `subject` and waits for the `PONG` of the `PING` that
    /// follows it. A broken link is reopened by the next publish.
    pub async fn publish(
        &self,
        topic: usize,
        subject: &Arc<str>,
        payload: Bytes,
    ) -> anyhow::Result<()> {
        let tx = self
            .links
            .sender(topic, |slot| async move {
                let (ws, parser) = timeout(CONNECT_TIMEOUT, open(&self.net, slot))
                    .await
                    .map_err(|_| anyhow!("NATS publisher connect timed out"))??;
                let (tx, rx) = mpsc::channel(LINK_QUEUE);
                tokio::spawn(run_link(ws, parser, rx));
                Ok(tx)
            })
            .await?;
        let (ack, acked) = oneshot::channel();
        tx.send(PubReq {
            subject: subject.clone(),
            payload,
            ack,
        })
        .await
        .map_err(|_| anyhow!("NATS publisher connection closed"))?;
        acked
            .await
            .map_err(|_| anyhow!("NATS connection lost before the PONG"))
    }
}

/// Writes queued publishes (each followed by a `PING`) in batches and hands each
/// `PONG` to the oldest waiting publish. Ends when the connection fails or every
/// sender is gone; the waiting publishes then fail (their senders drop).
async fn run_link(ws: Ws, mut parser: NatsParser, mut rx: mpsc::Receiver<PubReq>) {
    let (mut sink, mut stream) = ws.split();
    let mut waiting: VecDeque<oneshot::Sender<()>> = VecDeque::new();
    loop {
        tokio::select! {
            req = rx.recv() => {
                let Some(req) = req else { break };
                let mut frame = Vec::new();
                batch(req, &mut rx, MAX_BATCH, |r| {
                    natsproto::pub_frame(&mut frame, &r.subject, &r.payload);
                    frame.extend_from_slice(PING);
                    waiting.push_back(r.ack);
                });
                if sink.send(Message::binary(frame)).await.is_err() {
                    break;
                }
            }
            msg = stream.next() => {
                let Some(Ok(msg)) = msg else { break };
                let Some(bytes) = frame_bytes(&msg) else {
                    if matches!(msg, Message::Close(_)) {
                        break;
                    }
                    continue;
                };
                let (mut pongs, mut pings, mut failed) = (0usize, 0usize, false);
                let parsed = parser.push(bytes, |op| match op {
                    ServerOp::Pong => pongs += 1,
                    ServerOp::Ping => pings += 1,
                    ServerOp::Err(_) => failed = true,
                    _ => {}
                });
                for _ in 0..pongs {
                    if let Some(ack) = waiting.pop_front() {
                        let _ = ack.send(());
                    }
                }
                if parsed.is_err() || failed {
                    break;
                }
                for _ in 0..pings {
                    if sink.send(Message::binary(PONG)).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinals_follow_the_round_robin_schedule() {
        assert_eq!(ordinal(0, 1), (0, 1));
        assert_eq!(ordinal(41, 1), (0, 42));
        // Three topics: events 0,3,6 are topic 0's first three.
        assert_eq!(ordinal(6, 3), (0, 3));
        assert_eq!(ordinal(7, 3), (1, 3));
        assert_eq!(ordinal(2, 3), (2, 1));
    }
}
