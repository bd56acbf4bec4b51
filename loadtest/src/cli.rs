//! The command line: one subcommand per scenario plus `merge`.
//!
//! Rates and counts are totals for the whole run: with `--workers N` or `--shard i/n`
//! each process runs its share. `--max-inflight` is per process.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::plan::Slot;
use crate::slo::{self, Objective};
use crate::transport::{PublishVia, System, Transport};

#[derive(Debug, Parser)]
#[command(
    name = "weft-loadtest",
    version,
    about = "Load-test harness for Weft: open-loop publishers, WebSocket/SSE/long-poll subscribers, loss and latency accounting",
    after_help = "Exit codes: 0 ok, 1 error, 2 usage, 3 an --slo objective was missed, 4 worse than --baseline."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Open N connections at a target rate and hold them: connect rate, failures,
    /// connect latency, target RSS per connection.
    Connect(ConnectArgs),
    /// S subscribers over T topics; publishers at R events/s in total.
    Fanout(FanoutArgs),
    /// Rooms whose members publish over HTTP and receive everyone's messages.
    Chat(ChatArgs),
    /// Many topics updated at a high rate; each subscriber watches a random subset.
    Ticker(TickerArgs),
    /// Fanout whose connections come and go, resuming with their cursors.
    Churn(ChurnArgs),
    /// Fanout load kept running while --restart-cmd restarts the node(s).
    Rolling(RollingArgs),
    /// Subscribe to N fresh topics at a given rate: subscribe-reply latency and
    /// failures, then one event per topic to check every subscription delivers.
    Subscribe(SubscribeArgs),
    /// Merge JSON reports of shards run on several machines into one.
    Merge(MergeArgs),
    /// Side by side: the medians of several runs of the same loads against each
    /// system (JSON reports of `--system weft` and `--system nats` runs).
    Compare(CompareArgs),
}

/// Options every scenario shares.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Base URL of the node (or of the load balancer in front of a cluster):
    /// `http://host:port`, or `https://host:port` for a node serving TLS (its
    /// WebSockets are then `wss://` to the same host); with `--system nats`, the
    /// nats-server's WebSocket listener (`ws://host:port`).
    #[arg(
        long,
        env = "WEFT_LOADTEST_TARGET",
        default_value = "http://127.0.0.1:8080"
    )]
    pub target: String,
    /// The server under test: a Weft node, or a nats-server's WebSocket listener
    /// (NATS text protocol; `connect` and `fanout` only; implies --ordered).
    #[arg(long, value_enum, env = "WEFT_LOADTEST_SYSTEM", default_value_t = System::Weft)]
    pub system: System,
    /// Ordered publishing: each topic is published by one task that waits for each
    /// acknowledgement before sending the next event (at most one publish in flight
    /// per topic), as a producer that must keep a topic's order does.
    #[arg(long)]
    pub ordered: bool,
    /// How publishers reach Weft: one `POST /v1/topics/{t}/events` per event, or a
    /// few long-lived `POST /v1/publish/stream` requests (one NDJSON line per event,
    /// one acknowledgement line back, the same idempotency keys), as a backend that
    /// does not pay a round trip per event would publish.
    #[arg(long, value_enum, env = "WEFT_LOADTEST_PUBLISH_VIA", default_value_t = PublishVia::Http)]
    pub publish_via: PublishVia,
    /// Where publishers send (`POST /v1/topics/{t}/events`); default: --target. In a
    /// cluster, another node than the subscribers' measures the relay between them.
    #[arg(long, env = "WEFT_LOADTEST_PUBLISH_TARGET")]
    pub publish_target: Option<String>,
    /// A JWT or API key sent as `Authorization: Bearer` on every request and
    /// WebSocket handshake, for nodes with authentication on.
    #[arg(long, env = "WEFT_LOADTEST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A PEM bundle of CA certificates trusted for an `https://` target, in addition to
    /// the platform's roots (e.g. the CA that signed the node's `tls.cert_file`). The
    /// certificate must name the target URL's host (an IP address as an IP SAN).
    #[arg(long, env = "WEFT_LOADTEST_CA_FILE", value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
    /// Use only topic names that this node id owns, as --target's ring says
    /// (`GET /v1/cluster/owner/{topic}`): names are drawn in order and the others
    /// skipped.
    #[arg(long)]
    pub topic_owner: Option<String>,
    /// How subscribers connect.
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    pub transport: Transport,
    /// Length of the load (`connect`: how long connections are held).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// After the load, how long subscribers may take to catch up before they are stopped.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub drain_timeout: Duration,
    /// Subscriber connects per second during the ramp (whole run).
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// Start the load even if not every subscriber has subscribed after this long
    /// (default: the connect schedule's length + 15s).
    #[arg(long, value_parser = parse_duration)]
    pub ramp_timeout: Option<Duration>,
    /// Publish requests in flight at once, per process.
    #[arg(long, default_value_t = 256)]
    pub max_inflight: usize,
    /// Retry a publish until this long after its scheduled time.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub publish_timeout: Duration,
    /// `wait=` of long-poll requests.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub longpoll_wait: Duration,
    /// Run as N worker processes (each holds 1/N of the connections).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Run only shard i of n (0-based) of subscribers and publishers, for many pods;
    /// merge the shards' JSON reports with `weft-loadtest merge`. Needs --run-id.
    #[arg(long)]
    pub shard: Option<Slot>,
    /// Names this run's topics (`<prefix>.<run-id>.<scenario>.<n>`); random by default.
    #[arg(long, env = "WEFT_LOADTEST_RUN_ID")]
    pub run_id: Option<String>,
    /// First segment of topic names.
    #[arg(long, default_value = "lt")]
    pub topic_prefix: String,
    /// PID of the target process, to report its CPU time and RSS (Linux /proc).
    #[arg(long)]
    pub target_pid: Option<u32>,
    /// Do not bind connections to 127.0.0.2–250 when the target is on loopback.
    #[arg(long)]
    pub no_source_spread: bool,
    /// Pause between the end of the load and reading the final cursors (default: 2s
    /// with --shard, else 0).
    #[arg(long, value_parser = parse_duration)]
    pub settle: Option<Duration>,
    /// The slot this process runs as a worker (`i/n`): set by the parent for
    /// `--workers`; with `--coordinator`, this pod's slot of the distributed run.
    #[arg(long, env = "WEFT_LOADTEST_WORKER_SLOT")]
    pub worker_slot: Option<Slot>,
    /// Coordinate a distributed run: listen here for the `--workers N` remote worker
    /// processes (`--coordinator`), start them together, merge their reports (the
    /// `--slo` gate applies to the whole run). The coordinator itself opens no
    /// connection to the target.
    #[arg(long, env = "WEFT_LOADTEST_COORDINATE")]
    pub coordinate: Option<std::net::SocketAddr>,
    /// Run as a remote worker of the coordinator at HOST:PORT, in `--worker-slot`
    /// (retried for 3 minutes while the coordinator starts).
    #[arg(long, env = "WEFT_LOADTEST_COORDINATOR")]
    pub coordinator: Option<String>,
    #[command(flatten)]
    pub out: Outputs,
}

/// What to do with the report.
#[derive(Debug, Clone, Args)]
pub struct Outputs {
    /// Write the JSON report here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write an HTML report (inline SVG plots) here.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// Compare with an earlier JSON report; exit 4 when p99 or throughput is worse by
    /// more than --baseline-threshold percent.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    #[arg(long, default_value_t = 10.0)]
    pub baseline_threshold: f64,
    /// Objectives, e.g. 'p99<10ms,loss=0'; exit 3 when one is missed.
    #[arg(long, value_parser = parse_slo)]
    pub slo: Option<SloSpec>,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Connections opened per second (this replaces --connect-rate).
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// Topics the connections subscribe to (connection j watches topic j % T).
    #[arg(long, default_value_t = 1)]
    pub topics: usize,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Args)]
pub struct Load {
    /// Subscribers (one connection each).
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// Topics; subscriber j watches topic j % T, event k goes to topic k % T.
    #[arg(long, default_value_t = 10)]
    pub topics: usize,
    /// Events published per second, in total.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Size of each event's data.
    #[arg(long, default_value_t = 128)]
    pub payload_bytes: usize,
}

#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub load: Load,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Args)]
pub struct ChatArgs {
    #[arg(long, default_value_t = 10)]
    pub rooms: usize,
    /// Members per room; each subscribes to its room and publishes to it.
    #[arg(long, default_value_t = 10)]
    pub members: usize,
    /// Messages per second, in total (sent by the members in turn).
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 128)]
    pub payload_bytes: usize,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Args)]
pub struct TickerArgs {
    #[arg(long, default_value_t = 1000)]
    pub topics: usize,
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// Topics each subscriber watches (a pseudo-random subset; SSE uses the
    /// multi-topic watch, long-poll one poll loop per topic).
    #[arg(long, default_value_t = 20)]
    pub topics_per_subscriber: usize,
    /// Updates per second, in total, each to a pseudo-random topic.
    #[arg(long, default_value_t = 5000.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Args)]
pub struct ChurnArgs {
    #[command(flatten)]
    pub load: Load,
    /// Mean session lifetime (each lives 0.5–1.5× of it), then it reconnects and
    /// resumes from its cursors.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub lifetime: Duration,
    /// Pause between a session's end and its reconnect.
    #[arg(long, value_parser = parse_duration, default_value = "100ms")]
    pub reconnect_gap: Duration,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Args)]
pub struct RollingArgs {
    #[command(flatten)]
    pub load: Load,
    /// Shell command (run with `sh -c`) that restarts the node(s), e.g.
    /// 'kubectl rollout restart statefulset/weft && kubectl rollout status statefulset/weft'.
    #[arg(long)]
    pub restart_cmd: String,
    /// When to run it, after the load starts.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub restart_after: Duration,
    /// Kill the command after this long.
    #[arg(long, value_parser = parse_duration, default_value = "120s")]
    pub restart_timeout: Duration,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Args)]
pub struct SubscribeArgs {
    /// Fresh topics, each subscribed once (subscriber j of S watches topics j, j+S, …).
    #[arg(long, default_value_t = 1000)]
    pub topics: usize,
    /// Subscribe commands per second, in total; the load lasts topics/rate for the
    /// subscribes plus as long again for one event per topic (--duration is not used).
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Subscriptions per WebSocket connection (the node's default limit is 128).
    #[arg(long, default_value_t = 100)]
    pub per_connection: usize,
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Args)]
pub struct MergeArgs {
    /// JSON reports of the shards of one run.
    #[arg(required = true)]
    pub reports: Vec<PathBuf>,
    #[command(flatten)]
    pub out: Outputs,
}

#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    /// JSON reports; runs of the same load (scenario, subscribers, topics, rate,
    /// payload, ordering) against the same system are one group.
    #[arg(required = true)]
    pub reports: Vec<PathBuf>,
    /// Write the comparison as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write it as an HTML page here.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// Write it as a markdown table here (it is also printed).
    #[arg(long)]
    pub markdown: Option<PathBuf>,
}

/// A parsed `--slo`.
#[derive(Debug, Clone, PartialEq)]
pub struct SloSpec(pub Vec<Objective>);

fn parse_slo(s: &str) -> Result<SloSpec, String> {
    slo::parse(s).map(SloSpec).map_err(|e| e.to_string())
}

/// `250ms`, `10s`, `1.5s`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 500ms, 10s, 2m"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1e3,
        "us" | "µs" => n / 1e6,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        u => return Err(format!("`{s}`: unknown unit `{u}` (use ms, s, m or h)")),
    };
    if !secs.is_finite() || secs > 7.0 * 86_400.0 {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("10 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_duration("abc").is_err());
    }

    #[test]
    fn the_documented_command_line_parses() {
        let cli = Cli::try_parse_from([
            "weft-loadtest",
            "fanout",
            "--target",
            "http://127.0.0.1:9999",
            "--transport",
            "sse",
            "--subscribers",
            "50",
            "--topics",
            "5",
            "--rate",
            "200",
            "--payload-bytes",
            "256",
            "--duration",
            "10s",
            "--json",
            "out.json",
            "--slo",
            "p99<10ms,loss=0",
        ])
        .unwrap();
        let Cmd::Fanout(f) = cli.command else {
            panic!("not fanout")
        };
        assert_eq!(f.load.subscribers, 50);
        assert_eq!(f.common.transport, Transport::Sse);
        assert_eq!(f.common.out.slo.unwrap().0.len(), 2);
        let e = Cli::try_parse_from(["weft-loadtest", "fanout", "--slo", "p99<10"]).unwrap_err();
        assert!(e.to_string().contains("needs a unit"), "{e}");
        let e = Cli::try_parse_from(["weft-loadtest", "fanout", "--shard", "2/2"]).unwrap_err();
        assert!(e.to_string().contains("below the count"), "{e}");
    }
}
