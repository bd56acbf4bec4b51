//! What a session waits for besides its socket — the stop, a change of the finals, the
//! end of its churn lifetime — as one wait kept for the whole session and polled only
//! after one of those waits woke it.
//!
//! A session's loop selects over its socket and these. Built afresh in every
//! `select!`, each `watch` wait read its channel's value and locked the channel's
//! waiter list to register and again to deregister, once per received message, on
//! channels every subscriber of the process shares (`tokio::sync::notify` was 5 % of
//! the harness's CPU at 1,000 subscribers × 1 topic, 100/s). Kept across the loop and
//! polled through a waker of its own, a received message costs an atomic swap here.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::subscriber::{finals_changed, lifetime_over, stopped, Finals, Subscriber};

/// Why the session's control wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ctl {
    /// The stop flag is set (drain deadline).
    Stop,
    /// The finals changed: the session checks whether it has caught up.
    Finals,
    /// The churn lifetime is over.
    Lifetime,
}

/// The receivers the wait owns (handed back when it ends, so a `watch` change is
/// seen once).
struct Waits {
    stop: watch::Receiver<bool>,
    finals: watch::Receiver<Option<Arc<Finals>>>,
    lifetime: Option<Instant>,
}

async fn wait(mut w: Waits) -> (Ctl, Waits) {
    let ctl = tokio::select! {
        _ = stopped(&mut w.stop) => Ctl::Stop,
        _ = finals_changed(&mut w.finals) => Ctl::Finals,
        _ = lifetime_over(w.lifetime) => Ctl::Lifetime,
    };
    (ctl, w)
}

/// Set by the wait's own waker; the session's task waker it forwards to.
struct Woken {
    flag: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.flag.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// One session's control wait (see the module docs).
pub struct Control {
    fut: Pin<Box<dyn Future<Output = (Ctl, Waits)> + Send>>,
    woken: Arc<Woken>,
    waker: Waker,
}

impl Control {
    pub fn new(sub: &Subscriber, lifetime: Option<Instant>) -> Self {
        Self::with(sub.stop.clone(), sub.finals.clone(), lifetime)
    }

    /// The same from receivers of the subscriber's channels (one per concurrent loop,
    /// as long-poll runs one per topic).
    pub fn with(
        stop: watch::Receiver<bool>,
        finals: watch::Receiver<Option<Arc<Finals>>>,
        lifetime: Option<Instant>,
    ) -> Self {
        let woken = Arc::new(Woken {
            // The first poll polls the wait (and so registers its waker).
            flag: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Self {
            fut: Box::pin(wait(Waits {
                stop,
                finals,
                lifetime,
            })),
            waker: Waker::from(woken.clone()),
            woken,
        }
    }

    /// The next control event. Cancel-safe: dropped unfinished (another `select!`
    /// branch won), the wait goes on inside `self`.
    pub fn next_event(&mut self) -> impl Future<Output = Ctl> + '_ {
        std::future::poll_fn(move |cx| self.poll_next(cx))
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Ctl> {
        // Register first: a wake between the swap and the poll below is not lost.
        self.woken.task.register(cx.waker());
        if !self.woken.flag.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let mut own = Context::from_waker(&self.waker);
        match self.fut.as_mut().poll(&mut own) {
            Poll::Ready((ctl, waits)) => {
                // The next wait starts from the receivers as this one left them.
                self.fut = Box::pin(wait(waits));
                self.woken.flag.store(true, Ordering::Release);
                Poll::Ready(ctl)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn control(lifetime: Option<Instant>) -> (Control, watch::Sender<bool>, FinalsTx) {
        let (stop_tx, stop) = watch::channel(false);
        let (finals_tx, finals) = watch::channel(None);
        (Control::with(stop, finals, lifetime), stop_tx, finals_tx)
    }

    type FinalsTx = watch::Sender<Option<Arc<Finals>>>;

    /// Polls `c` once, without waiting.
    fn now(c: &mut Control) -> Option<Ctl> {
        futures_util::FutureExt::now_or_never(c.next_event())
    }

    #[tokio::test]
    async fn a_stop_set_after_many_idle_polls_is_seen() {
        let (mut c, stop, _finals) = control(None);
        for _ in 0..100 {
            assert_eq!(now(&mut c), None, "nothing happened yet");
        }
        stop.send_replace(true);
        let got = tokio::time::timeout(Duration::from_secs(5), c.next_event()).await;
        assert_eq!(got.ok(), Some(Ctl::Stop));
    }

    #[tokio::test]
    async fn each_change_of_the_finals_is_seen_once() {
        let (mut c, _stop, finals) = control(None);
        assert_eq!(now(&mut c), None);
        finals.send_replace(Some(Arc::new(Finals::default())));
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), c.next_event())
                .await
                .ok(),
            Some(Ctl::Finals)
        );
        assert_eq!(now(&mut c), None, "the same change is not reported twice");
        finals.send_replace(Some(Arc::new(Finals::default())));
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), c.next_event())
                .await
                .ok(),
            Some(Ctl::Finals),
            "a second change is"
        );
    }

    #[tokio::test]
    async fn a_wait_dropped_by_a_losing_select_branch_still_ends_at_the_lifetime() {
        let (mut c, _stop, _finals) = control(Some(Instant::now() + Duration::from_millis(50)));
        // Another branch wins first: the control wait is dropped unfinished.
        tokio::select! {
            _ = c.next_event() => panic!("too early"),
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
        let got = tokio::time::timeout(Duration::from_secs(5), c.next_event()).await;
        assert_eq!(got.ok(), Some(Ctl::Lifetime));
    }
}
