//! # weft-proto — every type that crosses the wire
//!
//! The node, the router and the load-test harness depend on this crate and never
//! redefine a message. Apart from the generated gRPC stubs it holds only pure logic and
//! serde types; no I/O.
//!
//! # Layout
//! - [`topic`]: topic-name rules (`[A-Za-z0-9_.:@-]{1,255}`) and `*`/`>` patterns.
//! - [`cursor`]: the `epoch:offset` cursor and the multi-topic cursor carried in SSE ids.
//! - [`command`]: client → server commands of `weft.v1.json`, and the parser that turns
//!   one line into a command or a numbered protocol error.
//! - [`message`]: server → client messages (replies, pushes) and the REST bodies
//!   (publish results, topic state, history pages, error bodies).
//! - [`grpc`]: code generated from `proto/weft/v1/*.proto` (the router's API, the
//!   router-peer Raft service and the node-to-node `Relay`), clients and servers.

pub mod command;
pub mod cursor;
pub mod message;
pub mod topic;

/// gRPC messages, clients and servers of package `weft.v1`, generated at build time
/// from `proto/weft/v1/*.proto` (see `build.rs`; no system `protoc` needed).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod grpc {
    tonic::include_proto!("weft.v1");
}

pub use command::{parse_command, Command, CommandError};
pub use cursor::{Cursor, CursorError, MultiCursor};
pub use message::*;
pub use topic::{validate_topic, Pattern, TopicError};

/// The JSON WebSocket subprotocol (DESIGN §3.2).
pub const SUBPROTOCOL_JSON: &str = "weft.v1.json";
/// The protobuf WebSocket subprotocol (not served yet; see the README).
pub const SUBPROTOCOL_PROTO: &str = "weft.v1.proto";

/// Close codes of DESIGN §3.2.
pub mod close {
    /// Reconnect advised (drain / shutdown).
    pub const RECONNECT: u16 = 4000;
    pub const UNAUTHORIZED: u16 = 4001;
    pub const FORBIDDEN: u16 = 4003;
    /// Slow consumer: the session's outbound budget was exceeded; resume with cursors.
    pub const SLOW_CONSUMER: u16 = 4008;
    pub const TOKEN_EXPIRED: u16 = 4009;
    pub const RATE_LIMITED: u16 = 4029;
    pub const PROTOCOL_ERROR: u16 = 4400;
    pub const TOO_BIG: u16 = 4413;
}
