//! Bounded polling. A test that waits for the system to reach a state asks here, so
//! that every wait has a deadline and fails saying what it saw instead.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often [`wait_for`] probes.
const POLL: Duration = Duration::from_millis(100);

/// Polls `probe` every 100 ms until it returns `Ok`, for at most `within`; then panics
/// with `what` and the last `Err` the probe gave (what it saw instead).
pub async fn wait_for<T, F, Fut>(within: Duration, what: &str, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    wait_for_every(POLL, within, what, probe).await
}

/// [`wait_for`], probing every `period`.
pub async fn wait_for_every<T, F, Fut>(
    period: Duration,
    within: Duration,
    what: &str,
    mut probe: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        let last = match probe().await {
            Ok(v) => return v,
            Err(e) => e,
        };
        if start.elapsed() >= within {
            panic!("{what}: not within {within:?}; last seen: {last}");
        }
        tokio::time::sleep(period).await;
    }
}

/// Polls `cond` until it holds, for at most `within`; panics with `what` otherwise.
pub async fn wait_until<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(within, what, || {
        let fut = cond();
        async move {
            if fut.await {
                Ok(())
            } else {
                Err("condition false".into())
            }
        }
    })
    .await
}
