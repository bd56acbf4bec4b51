//! What a session holds between a topic and its socket.
//!
//! - [`event`]: a stored event and its frames, encoded once per wire format and
//!   shared by every session that sends it.
//! - [`outbox`]: a session's byte-budgeted queue of those frames and the
//!   slow-consumer policies that apply when it is full.
//! - [`wsframe`]: RFC 6455 framing: pre-built shared frames out, bufferless idle
//!   reads in.
//!
//! Topics push into outboxes under their lock; transports drain them to sockets.

pub mod event;
pub mod outbox;
pub mod wsframe;
