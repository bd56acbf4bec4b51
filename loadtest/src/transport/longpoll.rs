//! Long-poll sessions (DESIGN §3.1): per topic, `GET
//! /v1/topics/{t}/events?since=e:o&wait=S&limit=N` in a loop, each answer's `next`
//! being the following request's `since`. `410 Gone` carries the cursor to restart
//! from (a reset). The first request of a session uses `wait=0`, so its latency is the
//! session's connect latency.
//!
//! A session polls all of the subscriber's topics concurrently and ends when every
//! topic has caught up, or as soon as one poll loop ends for another reason.

use std::time::Duration;

use futures_util::future::try_join_all;
use hyper::StatusCode;
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use weft_proto::{Cursor, PollPage};

use crate::http::{HttpError, Response};
use crate::stamp::now_us;
use crate::stats::LiveStats;
use crate::subscriber::{
    account, connected, Finals, OpenGuard, SessionEnd, SessionTimes, Shared, Subscriber,
};
use crate::tracker::TopicTrack;
use crate::transport::control::{Control, Ctl};
use crate::transport::{error_message, gone_cursor, retry_after};

/// Events asked for per poll.
const LIMIT: u32 = 1000;
/// Requests one topic's loop may make in a session (with `wait` ≥ 1 s this is hours).
const MAX_POLLS: u64 = 1_000_000;

/// One long-poll session, after `start_from_state` (the caller) set where each topic
/// resumes.
pub async fn session(sub: &mut Subscriber, sh: &Shared, when: SessionTimes) -> SessionEnd {
    let SessionTimes { intended, lifetime } = when;
    if sub.caught_up() {
        return SessionEnd::CaughtUp;
    }

    let id = sub.id;
    let (stop, finals) = (sub.stop.clone(), sub.finals.clone());
    let first_latency = std::sync::OnceLock::new();
    let loops = sub.tracks.iter_mut().zip(&sub.topics).map(|(track, &t)| {
        let ctx = LoopCtx {
            sh,
            id,
            topic_no: t,
            control: Control::with(stop.clone(), finals.clone(), lifetime),
            finals: finals.clone(),
            intended,
            first: &first_latency,
        };
        async move {
            match poll_topic(ctx, track).await {
                SessionEnd::CaughtUp => Ok(()),
                other => Err(other),
            }
        }
    });
    let result = try_join_all(loops).await;
    match result {
        Ok(_) => SessionEnd::CaughtUp,
        Err(end) => end,
    }
}

struct LoopCtx<'a, 'b> {
    sh: &'a Shared,
    id: usize,
    topic_no: usize,
    /// The stop / finals / lifetime wait, kept across this loop's polls.
    control: Control,
    /// Read for the caught-up check.
    finals: watch::Receiver<Option<std::sync::Arc<Finals>>>,
    intended: Instant,
    /// Set by the first successful poll of the session: the connect bookkeeping.
    first: &'b std::sync::OnceLock<OpenGuard<'a>>,
}

enum Wake {
    Answer(Result<Result<Response, HttpError>, tokio::time::error::Elapsed>),
    Control(Ctl),
}

async fn poll_topic(mut cx: LoopCtx<'_, '_>, track: &mut TopicTrack) -> SessionEnd {
    let sh = cx.sh;
    let topic = &sh.topics[cx.topic_no];
    let mut wait = Duration::ZERO;
    for _ in 0..MAX_POLLS {
        if caught_up(&cx, track) {
            return SessionEnd::CaughtUp;
        }
        let Some(cursor) = track.cursor() else {
            return SessionEnd::Failed(anyhow::anyhow!("long-poll without a cursor"));
        };
        let url = sh.net.url(&format!(
            "/v1/topics/{topic}/events?since={cursor}&wait={}&limit={LIMIT}",
            wait.as_secs()
        ));
        let req = sh.net.http(cx.id).get(url).send();
        let wake = tokio::select! {
            r = timeout(wait + Duration::from_secs(10), req) => Wake::Answer(r),
            c = cx.control.next_event() => Wake::Control(c),
        };
        let resp = match wake {
            Wake::Control(Ctl::Stop) => return SessionEnd::Stopped,
            Wake::Control(Ctl::Lifetime) => return SessionEnd::Lifetime,
            // The pending poll is dropped: a caught-up check and a fresh poll follow.
            Wake::Control(Ctl::Finals) => continue,
            Wake::Answer(Err(_)) => {
                return SessionEnd::Failed(anyhow::anyhow!("long-poll timed out"))
            }
            Wake::Answer(Ok(Err(e))) => {
                if cx.first.get().is_none() {
                    LiveStats::inc(&sh.stats.connect_failures);
                }
                return SessionEnd::Failed(anyhow::Error::new(e).context("long-poll request"));
            }
            Wake::Answer(Ok(Ok(r))) => r,
        };
        let status = resp.status();
        let after = retry_after(resp.headers());
        let body = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => return SessionEnd::Failed(anyhow::Error::new(e).context("long-poll body")),
        };
        let now = now_us();
        if cx.first.get().is_none() {
            let _ = cx.first.set(connected(sh, cx.id, cx.intended));
        }
        match status {
            StatusCode::OK => {
                let page: PollPage = match serde_json::from_slice(&body) {
                    Ok(p) => p,
                    Err(e) => {
                        return SessionEnd::Failed(anyhow::anyhow!("undecodable poll page: {e}"))
                    }
                };
                for ev in &page.events {
                    account(
                        sh,
                        cx.id,
                        track,
                        Some(&cursor.epoch),
                        ev.offset,
                        ev.data.get(),
                        now,
                    );
                }
                match page.next.parse::<Cursor>() {
                    Ok(next) if next.epoch == cursor.epoch => track.advance_to(next.offset),
                    Ok(next) => {
                        LiveStats::inc(&sh.stats.resets);
                        track.reset(&next.epoch, next.offset);
                    }
                    Err(e) => {
                        return SessionEnd::Failed(anyhow::anyhow!(
                            "poll page `next` {:?} is not a cursor: {e}",
                            page.next
                        ))
                    }
                }
                wait = sh.longpoll_wait;
            }
            StatusCode::GONE => match gone_cursor(&body) {
                Some(c) => {
                    LiveStats::inc(&sh.stats.resets);
                    track.reset(&c.epoch, c.offset);
                }
                None => return SessionEnd::Failed(anyhow::anyhow!("410 without a cursor")),
            },
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                return SessionEnd::Reconnect {
                    after,
                    why: format!("long-poll answered {status}"),
                }
            }
            _ => {
                return SessionEnd::Failed(anyhow::anyhow!(
                    "long-poll answered {status}: {}",
                    error_message(&body)
                ))
            }
        }
    }
    SessionEnd::Failed(anyhow::anyhow!("long-poll loop hit its request cap"))
}

fn caught_up(cx: &LoopCtx<'_, '_>, track: &TopicTrack) -> bool {
    cx.finals
        .borrow()
        .as_ref()
        .and_then(|f| f.cursors.get(&cx.topic_no))
        .is_some_and(|c| track.caught_up(c))
}
