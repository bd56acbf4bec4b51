//! History pages and long-poll (`wait=S`) on `GET /v1/topics/{topic}/events`.
//!
//! A long-poll answers as soon as at least one event exists after its cursor, else
//! after `wait` seconds with none; shutdown answers it at once. Without `since` it
//! waits for the first event after "now". It holds no subscription: it waits on the
//! topic's change notification and re-reads history, so it cannot miss an event.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::Response;
use weft_proto::Cursor;

use crate::error::ApiError;
use crate::node::Node;
use crate::stats::Transport;
use crate::topic::Page;
use crate::transport::respond::{json_ok, page_json, problem_error};

fn respond(node: &Node, page: Page) -> Response {
    node.stats.delivered.add(page.events.len() as u64);
    json_ok(page_json(&page.epoch, &page.events, page.next))
}

pub fn page(
    node: &Node,
    topic: &str,
    since: Option<&Cursor>,
    limit: usize,
) -> Result<Response, ApiError> {
    let page = node.registry.with_topic(topic, |t| t.read(since, limit))?;
    Ok(respond(node, page.map_err(problem_error)?))
}

struct InFlight<'a>(&'a crate::stats::Level);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.down();
    }
}

pub async fn long_poll(
    node: Arc<Node>,
    topic: String,
    since: Option<Cursor>,
    limit: usize,
    wait_s: u64,
) -> Result<Response, ApiError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait_s);
    let gauge = node.stats.connection(Transport::LongPoll);
    gauge.up();
    let _in_flight = InFlight(gauge);
    let mut shutdown = node.shutdown_signal();
    let mut since = since;
    loop {
        node.ready_topic(&topic, since.as_ref()).await?;
        let t = node.registry.get_or_create(&topic)?;
        let notified = t.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let Ok(result) = t.read(since.as_ref(), limit) else {
            continue;
        };
        let page = result.map_err(problem_error)?;
        if !page.events.is_empty() || Instant::now() >= deadline.into_std() || *shutdown.borrow() {
            return Ok(respond(&node, page));
        }
        if since.is_none() {
            since = Some(Cursor::new(&*page.epoch, page.next));
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = shutdown.changed() => {}
        }
    }
}
