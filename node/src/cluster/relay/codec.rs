//! Relay frames to and from values: encoding what goes out, and checking what a
//! peer sent (events, histories, the `Hello`) exactly as a client's publish is checked.

use bytes::Bytes;
use prost::Message;
use tonic::{Status, Streaming};
use weft_proto::grpc::relay_frame::Kind;
use weft_proto::grpc::{self, RelayBatch, RelayFrame};

use crate::error::ApiError;
use crate::node::Node;
use crate::topic::{Published, Relayed};

use super::*;

pub fn encode(kind: Kind) -> Bytes {
    Bytes::from(RelayFrame { kind: Some(kind) }.encode_to_vec())
}

pub fn followed_frame(f: grpc::Followed) -> Bytes {
    encode(Kind::Followed(f))
}

pub fn ack_frame(req_id: u64, p: &Published) -> Bytes {
    encode(Kind::PublishAck(grpc::PublishAck {
        req_id,
        epoch: p.epoch.to_string(),
        offset: p.offset,
        duplicate: p.duplicate,
        conflict: p.conflict,
    }))
}

/// A held publish whose topic moved on before its handoff landed: the sender asks
/// the owner its ring names next.
pub fn moved_frame(req_id: u64, topic: &str) -> Bytes {
    encode(Kind::Error(grpc::RelayError {
        req_id,
        topic: topic.to_owned(),
        status: 421,
        message: "the topic moved before its handoff landed".into(),
        ring_version: 0,
    }))
}

/// Checks a snapshot's or handoff's history: one contiguous run of the topic ending
/// at `last_offset`, each event checked like a publish.
pub(super) fn checked_history(
    node: &Node,
    topic: &str,
    epoch: &str,
    last_offset: u64,
    events: Vec<grpc::RelayEvent>,
) -> Result<Vec<Relayed>, String> {
    weft_proto::validate_topic(topic).map_err(|e| format!("snapshot: {e}"))?;
    if !weft_proto::cursor::valid_epoch(epoch) {
        return Err(format!("snapshot: invalid epoch {epoch:?}"));
    }
    let mut history = Vec::with_capacity(events.len());
    let first = events.first().map_or(last_offset + 1, |e| e.offset);
    for (i, ev) in events.into_iter().enumerate() {
        if ev.topic != topic || ev.epoch != epoch || ev.offset != first + i as u64 {
            return Err("snapshot: history is not one contiguous run of the topic".into());
        }
        history.push(relayed(node, ev)?);
    }
    if history.last().is_some_and(|e| e.offset != last_offset) {
        return Err("snapshot: history does not end at its last offset".into());
    }
    Ok(history)
}

/// Checks a relayed event the way a publish is checked: the frames built from it are
/// concatenated without escaping, so nothing unchecked from the wire gets in.
pub(super) fn relayed(node: &Node, ev: grpc::RelayEvent) -> Result<Relayed, String> {
    if !weft_proto::cursor::valid_epoch(&ev.epoch) || ev.offset == 0 {
        return Err(format!(
            "event with invalid cursor {}:{}",
            ev.epoch, ev.offset
        ));
    }
    let kind = crate::input::event_kind(ev.r#type.as_deref()).map_err(|e| e.to_string())?;
    let data =
        crate::input::event_data(&ev.data, &node.config.limits).map_err(|e| e.to_string())?;
    Ok(Relayed {
        epoch: ev.epoch,
        offset: ev.offset,
        ts: ev.ts,
        kind,
        data,
    })
}

/// The peer's `Hello`, the first frame of every link, with its node id checked.
pub(super) async fn read_hello(inbound: &mut Streaming<RelayBatch>) -> Result<grpc::Hello, Status> {
    let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
        .await
        .map_err(|_| Status::deadline_exceeded("no hello"))??
        .ok_or_else(|| Status::invalid_argument("link closed before hello"))?;
    let [raw] = <[Bytes; 1]>::try_from(first.frames)
        .map_err(|_| Status::invalid_argument("the first batch must hold exactly one hello"))?;
    match RelayFrame::decode(raw).ok().and_then(|f| f.kind) {
        Some(Kind::Hello(h)) if !h.node.is_empty() && h.node.len() <= 255 => Ok(h),
        _ => Err(Status::invalid_argument("the first frame must be a hello")),
    }
}

pub(super) fn api_error(status: u32, message: String) -> ApiError {
    match status {
        400 => ApiError::BadRequest(message),
        403 => ApiError::Forbidden(message),
        413 => ApiError::TooLarge(message),
        429 => ApiError::RateLimited {
            message,
            retry_after_s: 1,
        },
        _ => ApiError::Unavailable {
            message,
            retry_after_s: 1,
        },
    }
}
