//! Sockets and routes: everything that speaks to a client's connection and nothing
//! that decides where an event goes.
//!
//! - [`server`]: the accept loop, connection admission, HTTP/1.1 with upgrades, the
//!   ops listener, graceful shutdown.
//! - [`tls`]: HTTPS/WSS on the HTTP listener and certificate reload.
//! - [`head`]: the request head before routing: the URI and header limits, and
//!   hyper's own 400/414/431 given the JSON error body.
//! - [`http`]: the REST routes and the choice between a watch route's forms.
//! - [`ws`]: the WebSocket session (`weft.v1.json`).
//! - [`stream`]: SSE (one and many topics) and NDJSON watches.
//! - [`poll`]: history pages and long-poll.
//! - [`publish_stream`]: the ordered streaming publish for backends (NDJSON in,
//!   one acknowledgement per event out).
//! - [`respond`]: the JSON bodies and problem errors the routes share.
//! - [`contract`]: the OpenAPI and AsyncAPI documents, served with the node's limits.
//!
//! A transport reads a topic through [`crate::topic`] and publishes through the
//! node ([`crate::node::Node::publish`], or `start_publish`/`finish_publish` to keep
//! a session's order), which decides whether the event is sequenced here or
//! forwarded. Of the relay it uses only what an operator sees or asks for (linked
//! peers, cluster-wide revocation, forgetting follows of swept topics).

pub mod contract;
pub mod head;
pub mod http;
pub mod poll;
pub mod publish_stream;
pub mod respond;
pub mod server;
pub mod stream;
pub mod tls;
pub mod ws;
