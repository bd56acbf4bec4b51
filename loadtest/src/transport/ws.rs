//! WebSocket sessions (`weft.v1.json`, DESIGN §3.2).
//!
//! Subscribes to every topic with `since` = the tracker's cursor (none on the first
//! session: "from now", and the reply's cursor starts the accounting). A reply with
//! `recovered:false` is a reset; recovered events go through the tracker like pushes.
//! Pushes: `event`, `skipped` (conflation), `reset`, `disconnect` (then close 4000,
//! reconnect after `after_ms`). Close 4008 (slow consumer) resumes at once.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use weft_proto::command::SubscribeCmd;
use weft_proto::{close, Command, ServerMessage, SubscribeResult};

use crate::net::CONNECT_TIMEOUT;
use crate::stamp::now_us;
use crate::stats::LiveStats;
use crate::subscriber::{
    connected, finals_changed, lifetime_over, stopped, SessionEnd, Shared, Subscriber,
};

enum Wake {
    Msg(Option<Result<Message, tokio_tungstenite::tungstenite::Error>>),
    Stop,
    Finals,
    Lifetime,
}

pub async fn session(
    sub: &mut Subscriber,
    sh: &Shared,
    intended: Instant,
    lifetime: Option<Instant>,
) -> SessionEnd {
    sh.stats.connect_attempt(now_us());
    let ws = tokio::select! {
        r = timeout(CONNECT_TIMEOUT, sh.net.ws(sub.id)) => r,
        _ = stopped(&mut sub.stop) => return SessionEnd::Stopped,
    };
    let mut ws = match ws {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            LiveStats::inc(&sh.stats.connect_failures);
            return SessionEnd::Failed(e.context("WebSocket connect"));
        }
        Err(_) => {
            LiveStats::inc(&sh.stats.connect_failures);
            return SessionEnd::Failed(anyhow::anyhow!("WebSocket connect timed out"));
        }
    };
    let _open = connected(sh, sub.id, intended);

    let by_name: HashMap<&str, usize> = sub
        .topics
        .iter()
        .enumerate()
        .map(|(i, &t)| (sh.topics[t].as_str(), i))
        .collect();
    for i in 0..sub.topics.len() {
        let cmd = Command::Subscribe(SubscribeCmd {
            topic: sh.topics[sub.topics[i]].clone(),
            since: sub.tracks[i].cursor().map(|c| c.to_string()),
            snapshot: false,
        });
        if let Err(e) = ws
            .send(Message::text(cmd.to_line(Some(i as u64 + 1))))
            .await
        {
            return SessionEnd::Failed(anyhow::Error::new(e).context("sending subscribe"));
        }
    }

    let mut reconnect_after: Option<Duration> = None;
    loop {
        let wake = tokio::select! {
            m = ws.next() => Wake::Msg(m),
            _ = stopped(&mut sub.stop) => Wake::Stop,
            _ = finals_changed(&mut sub.finals) => Wake::Finals,
            _ = lifetime_over(lifetime) => Wake::Lifetime,
        };
        let msg = match wake {
            Wake::Stop => return bye(ws, SessionEnd::Stopped).await,
            Wake::Lifetime => return bye(ws, SessionEnd::Lifetime).await,
            Wake::Finals => {
                if sub.caught_up() {
                    return bye(ws, SessionEnd::CaughtUp).await;
                }
                continue;
            }
            Wake::Msg(m) => m,
        };
        match msg {
            Some(Ok(Message::Text(text))) => {
                let now = now_us();
                for line in text.as_str().split('\n').filter(|l| !l.trim().is_empty()) {
                    if let Err(end) = handle(sub, sh, &by_name, line, now, &mut reconnect_after) {
                        return bye(ws, end).await;
                    }
                }
                if sub.caught_up() {
                    return bye(ws, SessionEnd::CaughtUp).await;
                }
            }
            Some(Ok(Message::Close(frame))) => {
                let (code, reason) = frame
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                return match code {
                    close::RECONNECT => SessionEnd::Reconnect {
                        after: reconnect_after.unwrap_or_default(),
                        why: format!("close {code} {reason}"),
                    },
                    close::SLOW_CONSUMER => SessionEnd::Reconnect {
                        after: Duration::ZERO,
                        why: format!("close {code} (slow consumer) {reason}"),
                    },
                    _ => match reconnect_after {
                        Some(after) => SessionEnd::Reconnect {
                            after,
                            why: format!("disconnect push, then close {code}"),
                        },
                        None => SessionEnd::Failed(anyhow::anyhow!(
                            "closed by the server: {code} {reason}"
                        )),
                    },
                };
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                return match reconnect_after {
                    Some(after) => SessionEnd::Reconnect {
                        after,
                        why: "disconnect push, then the connection dropped".into(),
                    },
                    None => SessionEnd::Failed(anyhow::Error::new(e).context("WebSocket read")),
                }
            }
            None => {
                return match reconnect_after {
                    Some(after) => SessionEnd::Reconnect {
                        after,
                        why: "disconnect push, then end of stream".into(),
                    },
                    None => {
                        SessionEnd::Failed(anyhow::anyhow!("WebSocket ended without a close frame"))
                    }
                }
            }
        }
    }
}

/// Handles one JSON message of a frame.
fn handle(
    sub: &mut Subscriber,
    sh: &Shared,
    by_name: &HashMap<&str, usize>,
    line: &str,
    now: u64,
    reconnect_after: &mut Option<Duration>,
) -> Result<(), SessionEnd> {
    let m: ServerMessage = match serde_json::from_str(line) {
        Ok(m) => m,
        Err(e) => {
            sh.errors.add(format!("undecodable WebSocket message: {e}"));
            return Ok(());
        }
    };
    if let Some(id) = m.id {
        let Some(i) = (id as usize)
            .checked_sub(1)
            .filter(|&i| i < sub.topics.len())
        else {
            sh.errors
                .add(format!("reply to an unknown command id {id}"));
            return Ok(());
        };
        if let Some(err) = m.error {
            return Err(SessionEnd::Failed(anyhow::anyhow!(
                "subscribe to {} refused: {} {}",
                sh.topics[sub.topics[i]],
                err.code,
                err.message
            )));
        }
        if let Some(raw) = m.result {
            let r: SubscribeResult = serde_json::from_str(raw.get()).map_err(|e| {
                SessionEnd::Failed(anyhow::anyhow!("undecodable subscribe reply: {e}"))
            })?;
            if sub.tracks[i].is_started() && r.recovered == Some(false) {
                sub.on_reset(sh, i, &r.epoch, r.offset);
            } else {
                let fresh = !sub.tracks[i].is_started();
                if fresh {
                    sub.on_start(sh, i, &r.epoch, r.offset);
                }
                for ev in &r.events {
                    sub.on_event(sh, i, None, ev.offset, ev.data.get(), now);
                }
                if !fresh {
                    sub.on_start(sh, i, &r.epoch, r.offset);
                }
            }
        }
    }
    if let Some(push) = m.push {
        if let Some(d) = push.disconnect {
            *reconnect_after = Some(Duration::from_millis(d.after_ms));
            return Ok(());
        }
        let Some(i) = push.topic.as_deref().and_then(|t| by_name.get(t).copied()) else {
            return Ok(());
        };
        if let Some(ev) = push.event {
            sub.on_event(sh, i, None, ev.offset, ev.data.get(), now);
        } else if let Some(s) = push.skipped {
            sub.tracks[i].skipped(s.from, s.to);
        } else if let Some(r) = push.reset {
            sub.on_reset(sh, i, &r.epoch, r.offset);
        }
    }
    Ok(())
}

/// Closes politely (bounded) and returns `end`.
async fn bye(mut ws: WebSocketStream<TcpStream>, end: SessionEnd) -> SessionEnd {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    let _ = timeout(Duration::from_millis(500), ws.close(Some(frame))).await;
    end
}
