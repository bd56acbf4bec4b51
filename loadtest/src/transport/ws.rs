//! WebSocket sessions (`weft.v1.json`, DESIGN §3.2).
//!
//! Subscribes to every topic with `since` = the tracker's cursor (none on the first
//! session: "from now", and the reply's cursor starts the accounting). A reply with
//! `recovered:false` is a reset; recovered events go through the tracker like pushes.
//! Pushes: `event`, `skipped` (conflation), `reset`, `disconnect` (then close 4000,
//! reconnect after `after_ms`). Close 4008 (slow consumer) resumes at once.
//!
//! Subscribes go out as soon as the session is up, except a subscription's first
//! subscribe on a subscribe schedule (`subscribe`), which waits for its due time in the
//! load. The time from sending a first subscribe to its reply is the subscribe latency
//! (subscribes are pipelined: a slow reply never holds back the next send); error
//! replies are counted.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use weft_proto::command::SubscribeCmd;
use weft_proto::{close, Command, ServerMessage, SubscribeResult};

use crate::conn::Conn;
use crate::net::CONNECT_TIMEOUT;
use crate::stamp::now_us;
use crate::stats::LiveStats;
use crate::subscriber::{
    connected, lifetime_over, stopped, SessionEnd, SessionTimes, Shared, Subscriber,
};
use crate::transport::control::{Control, Ctl};
use crate::transport::{pushline, Drain};

enum Wake {
    Msg(Option<Result<Message, tokio_tungstenite::tungstenite::Error>>),
    Control(Ctl),
    /// A scheduled subscribe is due, or the load (and its schedule) started.
    Due,
}

/// When this session sends each subscription's subscribe: resumes, and everything
/// without a subscribe schedule, at once; a first subscribe on a schedule at the load's
/// start plus its offset.
struct SubscribeQueue {
    /// (offset from the load's start in µs, subscription index), earliest first.
    queue: VecDeque<(u64, usize)>,
    /// The load's start; `None` until the ramp is over (schedule only).
    start: Option<Instant>,
    start_rx: Option<watch::Receiver<Option<Instant>>>,
    /// When each subscription's subscribe was sent in this session, by index.
    asked: Vec<Option<Instant>>,
}

impl SubscribeQueue {
    fn new(sub: &Subscriber, sh: &Shared) -> Self {
        let n = sub.topics.len();
        let mut queue: Vec<(u64, usize)> = (0..n)
            .map(|i| match &sh.schedule {
                Some(t) if !sub.tracks[i].is_started() => (t.schedule.offset_us(sub.topics[i]), i),
                _ => (0, i),
            })
            .collect();
        queue.sort_unstable();
        let (start, start_rx) = match &sh.schedule {
            Some(t) => (*t.start.borrow(), Some(t.start.clone())),
            None => (Some(Instant::now()), None),
        };
        Self {
            queue: queue.into(),
            start,
            start_rx,
            asked: vec![None; n],
        }
    }

    /// The next subscription whose subscribe is due by `now`.
    fn next_due(&mut self, now: Instant) -> Option<usize> {
        if self.next_at()? > now {
            return None;
        }
        self.queue.pop_front().map(|(_, i)| i)
    }

    fn next_at(&self) -> Option<Instant> {
        let (off, _) = self.queue.front()?;
        Some(self.start? + Duration::from_micros(*off))
    }

    fn knows_start(&self) -> bool {
        self.start.is_some()
    }

    /// Resolves once the load's start is known (never, without a schedule).
    async fn started(&mut self) {
        let Some(rx) = self.start_rx.as_mut() else {
            return std::future::pending().await;
        };
        let start = rx.wait_for(Option::is_some).await.ok().and_then(|s| *s);
        match start {
            Some(s) => self.start = Some(s),
            None => std::future::pending().await,
        }
    }
}

/// A session's subscriptions by topic name. Most subscribers watch one topic: a string
/// compare then finds it, where hashing the name for every event cost more.
enum ByName<'a> {
    One(&'a str),
    Many(HashMap<&'a str, usize>),
}

impl<'a> ByName<'a> {
    fn new(sub: &Subscriber, sh: &'a Shared) -> Self {
        match sub.topics[..] {
            [t] => Self::One(&sh.topics[t]),
            _ => Self::Many(
                sub.topics
                    .iter()
                    .enumerate()
                    .map(|(i, &t)| (sh.topics[t].as_str(), i))
                    .collect(),
            ),
        }
    }

    /// The index of the subscription to `topic`.
    fn get(&self, topic: &str) -> Option<usize> {
        match self {
            Self::One(t) => (*t == topic).then_some(0),
            Self::Many(m) => m.get(topic).copied(),
        }
    }
}

/// One JSON message of a received frame, with when it arrived.
struct Got<'a> {
    line: &'a str,
    /// Wall clock, µs (delivery latency).
    now: u64,
    /// Monotonic (subscribe latency).
    at: Instant,
}

pub async fn session(sub: &mut Subscriber, sh: &Shared, when: SessionTimes) -> SessionEnd {
    let SessionTimes { intended, lifetime } = when;
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

    let by_name = ByName::new(sub, sh);
    let mut due = SubscribeQueue::new(sub, sh);
    let mut reconnect_after: Option<Duration> = None;
    let mut drain = Drain::default();
    let mut control = Control::new(sub, lifetime);
    loop {
        while let Some(i) = due.next_due(Instant::now()) {
            let cmd = Command::Subscribe(SubscribeCmd {
                topic: sh.topics[sub.topics[i]].clone(),
                since: sub.tracks[i].cursor().map(|c| c.to_string()),
                snapshot: false,
            });
            let sent = Instant::now();
            if let Err(e) = ws
                .send(Message::text(cmd.to_line(Some(i as u64 + 1))))
                .await
            {
                return SessionEnd::Failed(anyhow::Error::new(e).context("sending subscribe"));
            }
            due.asked[i] = Some(sent);
        }
        let next = due.next_at();
        let wake = match drain.ready(&mut ws) {
            Some(m) => Wake::Msg(m),
            None => tokio::select! {
                m = ws.next() => Wake::Msg(m),
                c = control.next_event() => Wake::Control(c),
                _ = lifetime_over(next), if next.is_some() => Wake::Due,
                _ = due.started(), if !due.knows_start() => Wake::Due,
            },
        };
        let msg = match wake {
            Wake::Control(Ctl::Stop) => return bye(ws, SessionEnd::Stopped).await,
            Wake::Control(Ctl::Lifetime) => return bye(ws, SessionEnd::Lifetime).await,
            Wake::Due => continue,
            Wake::Control(Ctl::Finals) => {
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
                let at = Instant::now();
                for line in text.as_str().split('\n').filter(|l| !l.trim().is_empty()) {
                    let got = Got { line, now, at };
                    if let Err(end) =
                        handle(sub, sh, &by_name, &due.asked, got, &mut reconnect_after)
                    {
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
    by_name: &ByName<'_>,
    asked: &[Option<Instant>],
    got: Got<'_>,
    reconnect_after: &mut Option<Duration>,
) -> Result<(), SessionEnd> {
    let now = got.now;
    if let Some((topic, offset, data)) = pushline::event_push(got.line) {
        if let Some(i) = by_name.get(topic) {
            sub.on_event(sh, i, None, offset, data, now);
        }
        return Ok(());
    }
    let m: ServerMessage = match serde_json::from_str(got.line) {
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
            LiveStats::inc(&sh.stats.subscribe_failures);
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
                if let (true, Some(asked)) = (fresh, asked[i]) {
                    let us = got.at.saturating_duration_since(asked).as_micros() as u64;
                    sh.recorder.subscribe(sub.id, us);
                }
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
        let Some(i) = push.topic.as_deref().and_then(|t| by_name.get(t)) else {
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
async fn bye(mut ws: WebSocketStream<Conn>, end: SessionEnd) -> SessionEnd {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    let _ = timeout(Duration::from_millis(500), ws.close(Some(frame))).await;
    end
}
