//! The response bodies several routes share: a JSON `200`, a history page, and the
//! error a cursor problem becomes. Kept apart so that routes, long-poll and the
//! streaming transports depend on it rather than on each other.

use std::sync::Arc;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};

use crate::error::ApiError;
use crate::session::event::{put_u64, write_event_array, StoredEvent};
use crate::topic::CursorProblem;

pub fn json_ok(body: Bytes) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// `{"events":[…],"next":"e:o"}`.
pub fn page_json(epoch: &str, events: &[Arc<StoredEvent>], next: u64) -> Bytes {
    let mut out =
        BytesMut::with_capacity(64 + events.iter().map(|e| e.data.len() + 48).sum::<usize>());
    out.extend_from_slice(b"{\"events\":");
    write_event_array(&mut out, events);
    out.extend_from_slice(b",\"next\":\"");
    out.extend_from_slice(epoch.as_bytes());
    out.extend_from_slice(b":");
    put_u64(&mut out, next);
    out.extend_from_slice(b"\"}");
    out.freeze()
}

pub fn problem_error(p: CursorProblem) -> ApiError {
    match p {
        CursorProblem::Gone { current } => ApiError::Gone {
            message: format!("cursor is of another epoch or out of retention; re-read state and continue from {current}"),
            cursor: current.to_string(),
        },
        CursorProblem::Ahead { current } => {
            ApiError::bad(format!("cursor is ahead of the topic, whose current cursor is {current}"))
        }
    }
}
