//! # weft-loadtest — the load-test harness of Weft
//!
//! Drives a Weft node (or a cluster behind one URL) with open-loop publishers and many
//! subscribers over WebSocket, SSE or long-poll, and accounts for every event: what was
//! published, what each subscriber was owed, what it received, how late. The same
//! `fanout` and `connect` loads also run against a `nats-server` over WebSocket
//! (`--system nats`), and `compare` puts the two side by side.
//!
//! ```text
//!  publisher (open-loop schedule, HTTP POST)          subscribers (ws | sse | longpoll)
//!   event k intended at start + k/R ──► node ──► push ──► Tracker (gaps, dups, reorders,
//!   data = {"p","s","t":intended_us,"x":pad}                resets per topic)
//!                                                          Recorder (latency = recv − t)
//!                     │                                        │
//!                     └──────────── Report (JSON, table, HTML, SLO, baseline) ◄─┘
//! ```
//!
//! # Layout
//! - [`app`]: from the parsed command line to an exit code.
//! - [`cli`]: the command line (one subcommand per scenario, shared options).
//! - [`plan`]: what a scenario means: topic names, who subscribes to what, which topic
//!   each scheduled event goes to; and the `i/n` slot a process runs.
//! - [`placement`]: `--topic-owner`: topic names one node of a cluster owns.
//! - [`stamp`]: the data each published event carries (publisher, sequence, intended
//!   send time, padding) and the wall clock.
//! - [`tracker`]: per-subscription delivery accounting: gaps, duplicates, reordering,
//!   resets, skips; pure logic.
//! - [`recorder`]: HDR histograms (latency, connect, publish), per-second buckets and
//!   the live window; [`hist`] encodes them for reports.
//! - [`stats`]: live atomic counters for the progress line, and the error log.
//! - [`net`]: target URL, source-address spreading over 127.0.0.x, WebSocket connects,
//!   HTTP clients; [`conn`] opens every connection (TCP, then TLS for `https://`),
//!   [`tls`] holds the run's TLS client configuration (platform roots + `--ca-file`),
//!   [`http`] the pooled HTTP/1.1 client over those connections.
//! - [`sse`]: an incremental `text/event-stream` parser; pure logic.
//! - [`natsproto`]: the NATS text protocol: an incremental, bounded parser of what a
//!   server sends, and the client's lines; pure logic.
//! - [`subscriber`]: one subscriber's reconnect loop; [`transport`] holds its sessions
//!   over WebSocket, SSE and long-poll.
//! - [`publisher`]: the open-loop publisher (HTTP, publish streams, or NATS links)
//!   with bounded in-flight requests, and its ordered mode (one publish in flight per
//!   topic).
//! - [`engine`]: runs one scenario in one process: ramp, go, publish, drain, finals.
//! - [`coord`]: the barriers between a process and its parent (workers) and the
//!   conductor that samples the target and runs `--restart-cmd`.
//! - [`workers`]: `--workers N`: re-exec as N processes and merge their reports.
//! - [`target`]: CPU and RSS of the target process from `/proc`.
//! - [`report`]: the report, merging, the final table; [`html`] the HTML page;
//!   [`slo`] and [`baseline`] the pass/fail checks; [`compare`] the side-by-side
//!   medians of several systems' runs.
//! - [`progress`]: the live progress line.

pub mod app;
pub mod baseline;
pub mod cli;
pub mod compare;
pub mod conn;
pub mod coord;
pub mod engine;
pub mod hist;
pub mod html;
pub mod http;
pub mod natsproto;
pub mod net;
pub mod placement;
pub mod plan;
pub mod progress;
pub mod publisher;
pub mod recorder;
pub mod report;
pub mod slo;
pub mod sse;
pub mod stamp;
pub mod stats;
pub mod subscriber;
pub mod target;
pub mod tls;
pub mod tracker;
pub mod transport;
pub mod workers;
