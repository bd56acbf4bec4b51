//! Subscriber sessions, one module per transport. Each `session` opens one connection
//! (or, for long-poll, one series of requests), (re)subscribes from the trackers'
//! cursors, feeds every received event to the tracker and returns why it ended.
//!
//! - [`ws`]: `GET /v1/ws`, subprotocol `weft.v1.json`, one `subscribe` per topic.
//! - [`sse`]: `GET /v1/topics/{t}/events?watch=true&since=…` for one topic, the
//!   multi-topic `GET /v1/events?topic=…&watch=true` with `Last-Event-ID` for several.
//! - [`longpoll`]: `GET /v1/topics/{t}/events?since=…&wait=…` in a loop, one per topic.
//! - [`nats`]: `--system nats`: a `nats-server` over WebSocket (`SUB` per topic), and
//!   the publisher's links (`PUB` + `PING`, acknowledged by the `PONG`).
//! - [`pubstream`]: `--publish-via stream`: the publisher's links to Weft, long-lived
//!   `POST /v1/publish/stream` requests with one acknowledgement line per event.
//!
//! Shared by the sessions: [`control`], the stop / finals / lifetime wait kept across a
//! session's loop; [`pushline`], the event push read in place; [`Drain`], a run of
//! ready messages taken without a `select!`.

use std::fmt;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use weft_proto::{ErrorBody, TopicState};

use crate::net::Net;

pub mod control;
pub mod longpoll;
pub mod nats;
pub mod pubstream;
pub mod pushline;
pub mod sse;
pub mod ws;

/// Messages a WebSocket session handles in a row, while each is ready at once, before
/// it waits on its whole `select!` again (stop, finals, lifetime, schedule). A server
/// that has fallen behind sends several frames per read; setting up and tearing down
/// the `select!` and its watch registrations for each of them cost the harness more
/// CPU than reading them.
pub const DRAIN: usize = 64;

/// A session's run of messages taken without its `select!` (at most [`DRAIN`]).
#[derive(Debug, Default)]
pub struct Drain(usize);

impl Drain {
    /// The stream's next item if it is ready without waiting and the run is not yet
    /// [`DRAIN`] long; `None`: wait on the whole `select!` (the run starts again).
    pub fn ready<S: futures_util::Stream + Unpin>(&mut self, s: &mut S) -> Option<Option<S::Item>> {
        let ready = if self.0 < DRAIN {
            futures_util::FutureExt::now_or_never(futures_util::StreamExt::next(s))
        } else {
            None
        };
        self.0 = if ready.is_some() { self.0 + 1 } else { 0 };
        ready
    }
}

/// A publisher's long-lived connections, each driven by a task fed through a bounded
/// channel of `R`; topic `t` always uses link `t % links`, so one topic's events keep
/// their order. A link whose task ended is reopened by the next publish on it.
pub struct Links<R> {
    links: Vec<tokio::sync::Mutex<Option<mpsc::Sender<R>>>>,
}

impl<R> Links<R> {
    pub fn new(links: usize) -> Self {
        Self {
            links: (0..links.max(1))
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
        }
    }

    /// The channel of topic number `topic`'s link, opened with `open(slot)` (which
    /// starts the link's task) when it has none or its task has ended.
    pub async fn sender<F, Fut>(&self, topic: usize, open: F) -> anyhow::Result<mpsc::Sender<R>>
    where
        F: FnOnce(usize) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<mpsc::Sender<R>>>,
    {
        let slot = topic % self.links.len();
        // An async mutex: an open is awaited while held, so one link is never opened
        // twice at once.
        let mut link = self.links[slot].lock().await;
        match link.as_ref().filter(|tx| !tx.is_closed()) {
            Some(tx) => Ok(tx.clone()),
            None => {
                let tx = open(slot).await?;
                *link = Some(tx.clone());
                Ok(tx)
            }
        }
    }
}

/// `first`, then whatever else is queued on `rx` right now, `max` in all at most, each
/// handed to `each`: a link writes them as one frame instead of one write each.
pub fn batch<R>(first: R, rx: &mut mpsc::Receiver<R>, max: usize, mut each: impl FnMut(R)) {
    each(first);
    for _ in 1..max {
        match rx.try_recv() {
            Ok(r) => each(r),
            Err(_) => break,
        }
    }
}

/// Which server the harness drives (`--system`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum System {
    /// A Weft node: REST publishes, `weft.v1.json` WebSocket (or SSE, long-poll).
    #[default]
    Weft,
    /// A `nats-server`'s WebSocket listener: the NATS text protocol for publishers and
    /// subscribers (for comparison; see [`nats`]).
    Nats,
}

impl fmt::Display for System {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            System::Weft => "weft",
            System::Nats => "nats",
        })
    }
}

/// How publishers reach a Weft node (`--publish-via`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PublishVia {
    /// One `POST /v1/topics/{t}/events` per event, over keep-alive connections.
    #[default]
    Http,
    /// Long-lived `POST /v1/publish/stream` requests, one NDJSON line per event and
    /// one acknowledgement line back (see [`pubstream`]).
    Stream,
}

impl fmt::Display for PublishVia {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PublishVia::Http => "http",
            PublishVia::Stream => "stream",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Ws,
    Sse,
    Longpoll,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Ws => "ws",
            Transport::Sse => "sse",
            Transport::Longpoll => "longpoll",
        })
    }
}

/// `GET /v1/topics/{topic}`: the cursor a new HTTP subscription starts from.
pub async fn topic_state(net: &Net, conn: usize, topic: &str) -> anyhow::Result<TopicState> {
    let resp = net
        .http(conn)
        .get(net.url(&format!("/v1/topics/{topic}")))
        .timeout(crate::net::CONNECT_TIMEOUT)
        .send()
        .await?;
    let status = resp.status();
    let body = resp.bytes().await?;
    if !status.is_success() {
        anyhow::bail!("GET state of {topic}: {status} {}", error_message(&body));
    }
    Ok(serde_json::from_slice(&body)?)
}

/// The message of a `{"error":{…}}` body, or the body itself (shortened).
pub fn error_message(body: &[u8]) -> String {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => e.error.message,
        Err(_) => String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
    }
}

/// The cursor in a `410 Gone` body.
pub fn gone_cursor(body: &[u8]) -> Option<weft_proto::Cursor> {
    serde_json::from_slice::<ErrorBody>(body)
        .ok()?
        .error
        .cursor?
        .parse()
        .ok()
}

/// `Retry-After` in seconds (capped), for 429 and 503 answers.
pub fn retry_after(headers: &hyper::HeaderMap) -> std::time::Duration {
    let secs = headers
        .get(hyper::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1);
    std::time::Duration::from_secs(secs.min(10))
}

/// Starts every subscription of `sub` not yet started at its topic's current cursor
/// (GET state, then watch since it: nothing missed, nothing repeated). On failure or a
/// stop, returns how the session ends.
pub(crate) async fn start_from_state(
    sub: &mut crate::subscriber::Subscriber,
    sh: &crate::subscriber::Shared,
) -> Result<(), crate::subscriber::SessionEnd> {
    use crate::subscriber::{stopped, SessionEnd};
    for i in 0..sub.topics.len() {
        if sub.tracks[i].is_started() {
            continue;
        }
        let topic = &sh.topics[sub.topics[i]];
        let state = tokio::select! {
            s = topic_state(&sh.net, sub.id, topic) => s,
            _ = stopped(&mut sub.stop) => return Err(SessionEnd::Stopped),
        };
        match state {
            Ok(s) => sub.on_start(sh, i, &s.epoch, s.offset),
            Err(e) => {
                crate::stats::LiveStats::inc(&sh.stats.connect_failures);
                return Err(SessionEnd::Failed(e));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod drain_tests {
    use super::*;

    #[test]
    fn a_run_of_ready_messages_stops_at_drain_then_starts_again() {
        let mut items = futures_util::stream::iter(0..1_000);
        let mut d = Drain::default();
        let run: Vec<i32> = std::iter::from_fn(|| d.ready(&mut items).flatten()).collect();
        assert_eq!(run, (0..DRAIN as i32).collect::<Vec<_>>());
        // After the select! the next run goes on where the last one stopped.
        assert_eq!(d.ready(&mut items), Some(Some(DRAIN as i32)));
    }

    #[test]
    fn nothing_ready_means_wait_on_the_select() {
        let mut never = futures_util::stream::pending::<u8>();
        let mut d = Drain::default();
        assert_eq!(d.ready(&mut never), None);
        let mut ended = futures_util::stream::empty::<u8>();
        assert_eq!(
            d.ready(&mut ended),
            Some(None),
            "an ended stream is ready: None"
        );
    }
}

#[cfg(test)]
mod batch_tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_takes_what_is_queued_up_to_its_size_and_leaves_the_rest_in_order() {
        let (tx, mut rx) = mpsc::channel(8);
        for i in 1..=5 {
            tx.send(i).await.unwrap();
        }
        let first = rx.recv().await.unwrap();
        let mut got = Vec::new();
        batch(first, &mut rx, 3, |i| got.push(i));
        assert_eq!(got, [1, 2, 3]);
        got.clear();
        let first = rx.recv().await.unwrap();
        batch(first, &mut rx, 3, |i| got.push(i));
        assert_eq!(got, [4, 5], "a batch does not wait for more");
    }
}
