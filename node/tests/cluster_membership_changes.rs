//! Membership changes under load, end to end (issue 5; DESIGN §4 "Drain", §5 "Ownership
//! change"): three `weft-router` processes and three or four `weft-node` processes on
//! 127.0.0.x, publishers and subscribers running throughout.
//!
//! "A rolling restart must be invisible to clients except for a reconnect":
//! - every node restarted in turn with SIGTERM, or a fourth node added, while events are
//!   published: every subscriber (WebSocket and multi-topic SSE, on every node, moving
//!   to another node when told to) receives every acknowledged event exactly once, in
//!   offset order, in one epoch, and never a `reset`;
//! - a SIGKILLed node's topics start a new epoch: each subscriber sees contiguous
//!   offsets or a `reset` before any jump, and then every event acknowledged after it;
//!   topics owned by the survivors go on untouched;
//! - a drained node tells each session `disconnect{reconnect:true}` and closes them
//!   spread over the first half of its grace period, then exits within the grace.
//!
//! Publishers send every event with an `Idempotency-Key` and retry it on the next node
//! on `503` or a connection error until it is acknowledged (bounded), so every event
//! that exists was acknowledged: the acknowledgements are the truth the subscribers are
//! held to. Checks gather every problem before failing, so a failure shows the whole
//! picture; the processes' logs are printed with it (`WEFT_TEST_NODE_LOG` sets the
//! nodes' `RUST_LOG`, e.g. `info,weft_node::cluster::relay=debug`, to see every handoff).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use weft_proto::{ServerMessage, SubscribeResult};
use weft_testkit::api::NodeApi;
use weft_testkit::proc_cluster::{NodeOptions, ProcCluster, HEARTBEAT_TIMEOUT_MS};
use weft_testkit::roaming::{Obs, Roaming, SubLog, Targets};
use weft_testkit::WsClient;

const NODES: [&str; 3] = ["a", "b", "c"];
const TOPICS: usize = 24;
/// The nodes' shutdown grace: sessions are closed over its first half.
const GRACE_MS: u64 = 3000;
/// The largest `after_ms` a drained session is told.
const JITTER_MS: u64 = 500;
/// Nodes join, heartbeat and activate; slots move and are handed over.
const CONVERGE_WITHIN: Duration = Duration::from_secs(30);
/// A SIGTERMed node hands its topics over (bounded by the node at about 7 s), closes
/// its sessions within the grace and leaves the router (bounded at 3 s).
const EXIT_WITHIN: Duration = Duration::from_secs(20);
/// Every subscriber holds every acknowledged event this long after the last publish.
const DELIVER_WITHIN: Duration = Duration::from_secs(30);
/// Sequential publishers; each publishes once per [`PUBLISH_EVERY`] at most: about
/// 250 events per second in total.
const PUBLISHERS: usize = 4;
const PUBLISH_EVERY: Duration = Duration::from_millis(16);
/// One event must be acknowledged (retries on other nodes included) within this.
const PUBLISH_WITHIN: Duration = Duration::from_secs(30);

fn node_options() -> NodeOptions {
    NodeOptions {
        shutdown_grace_ms: GRACE_MS,
        reconnect_jitter_ms: Some(JITTER_MS),
        log_filter: std::env::var("WEFT_TEST_NODE_LOG").unwrap_or_else(|_| "info".into()),
        extra_args: Vec::new(),
    }
}

fn topic_names(prefix: &str) -> Vec<String> {
    (0..TOPICS).map(|i| format!("{prefix}.{i}")).collect()
}

/// An acknowledged publish.
#[derive(Debug, Clone)]
struct Ack {
    topic: String,
    key: String,
    publisher: usize,
    /// This publisher's n-th event (over all topics).
    seq: u64,
    epoch: String,
    offset: u64,
    /// Answered `200 Idempotent-Replayed` (an earlier attempt had been applied).
    replayed: bool,
    at: Instant,
}

/// Publishers running until [`Load::finish`].
struct Load {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<(Vec<Ack>, Vec<String>)>>,
    acked: Arc<AtomicU64>,
}

/// What the publishers did.
struct Published {
    acks: Vec<Ack>,
    /// Events never acknowledged within [`PUBLISH_WITHIN`], or refused outright.
    failures: Vec<String>,
    retried: usize,
}

impl Load {
    fn start(run: &str, targets: &Targets, topics: &[String]) -> Self {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let acked = Arc::new(AtomicU64::new(0));
        let tasks = (0..PUBLISHERS)
            .map(|p| {
                tokio::spawn(publisher(
                    p,
                    format!("{run}-{p}"),
                    targets.clone(),
                    topics.to_vec(),
                    stopped.clone(),
                    acked.clone(),
                ))
            })
            .collect();
        Self { stop, tasks, acked }
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    async fn finish(self) -> Published {
        self.stop.send_replace(true);
        let mut out = Published {
            acks: Vec::new(),
            failures: Vec::new(),
            retried: 0,
        };
        for t in self.tasks {
            let (acks, failures) = tokio::time::timeout(PUBLISH_WITHIN + REQUEST_SLACK, t)
                .await
                .expect("a publisher stops within its bound")
                .expect("publisher task");
            out.acks.extend(acks);
            out.failures.extend(failures);
        }
        out.retried = out.acks.iter().filter(|a| a.replayed).count();
        out
    }
}

/// Longer than any single request of a publisher.
const REQUEST_SLACK: Duration = Duration::from_secs(15);

/// One sequential publisher: each event goes to the next node in turn; a `503` or a
/// connection error sends the same event (same key) to the next node after it.
async fn publisher(
    p: usize,
    run: String,
    targets: Targets,
    topics: Vec<String>,
    stop: tokio::sync::watch::Receiver<bool>,
    acked: Arc<AtomicU64>,
) -> (Vec<Ack>, Vec<String>) {
    let mut acks = Vec::new();
    let mut failures = Vec::new();
    let mut tick = tokio::time::interval(PUBLISH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_node = p;
    let mut seq = 0u64;
    while !*stop.borrow() {
        tick.tick().await;
        let topic = &topics[(p * 7 + seq as usize) % topics.len()];
        let key = format!("{run}-{seq}");
        let data = json!({ "k": key });
        let started = Instant::now();
        let mut last = String::new();
        let mut tries = 0;
        loop {
            let nodes = targets.all();
            let api = &nodes[next_node % nodes.len()];
            next_node += 1;
            tries += 1;
            match publish_once(api, topic, &data, &key).await {
                Ok((epoch, offset, replayed)) => {
                    acks.push(Ack {
                        topic: topic.clone(),
                        key: key.clone(),
                        publisher: p,
                        seq,
                        epoch,
                        offset,
                        replayed,
                        at: Instant::now(),
                    });
                    acked.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err((status @ (0 | 503), body)) => {
                    last = format!("{}: {status} {body}", api.name);
                    if started.elapsed() >= PUBLISH_WITHIN {
                        failures.push(format!(
                            "{key} to {topic}: not acknowledged within {PUBLISH_WITHIN:?} \
                             ({tries} tries); last: {last}"
                        ));
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err((status, body)) => {
                    failures.push(format!(
                        "{key} to {topic} on {}: {status} {body} (try {tries}; before: {last})",
                        api.name
                    ));
                    break;
                }
            }
        }
        seq += 1;
    }
    (acks, failures)
}

/// One publish attempt with an `Idempotency-Key`: `(epoch, offset, replayed)`, or the
/// status (0: no answer) and body it was refused with.
async fn publish_once(
    api: &NodeApi,
    topic: &str,
    data: &Value,
    key: &str,
) -> Result<(String, u64, bool), (u16, String)> {
    let resp = api
        .http
        .post(api.url(&format!("/v1/topics/{topic}/events")))
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .timeout(Duration::from_secs(10))
        .body(data.to_string())
        .send()
        .await
        .map_err(|e| (0, e.to_string()))?;
    let status = resp.status().as_u16();
    let replayed = resp.headers().get("idempotent-replayed").is_some();
    let body = resp.bytes().await.map_err(|e| (0, e.to_string()))?;
    if status != 201 && status != 200 {
        return Err((status, String::from_utf8_lossy(&body).into_owned()));
    }
    let r: weft_proto::PublishResult = serde_json::from_slice(&body)
        .map_err(|e| (status, format!("{e}: {}", String::from_utf8_lossy(&body))))?;
    if r.topic != topic {
        return Err((status, format!("acknowledged for topic {}", r.topic)));
    }
    Ok((r.epoch, r.offset, replayed))
}

/// Publishes again, on every node in turn, the first, a middle and the last
/// acknowledged event of each topic (same key, same data): the idempotency window moved
/// with the topic, so each is answered `200 Idempotent-Replayed` with its original
/// cursor and sequences nothing.
async fn check_replays(targets: &Targets, acks: &[Ack], problems: &mut Vec<String>) {
    let mut per_topic: BTreeMap<&str, Vec<&Ack>> = BTreeMap::new();
    for a in acks {
        per_topic.entry(&a.topic).or_default().push(a);
    }
    let nodes = targets.all();
    let mut i = 0;
    for (topic, mut list) in per_topic {
        list.sort_by_key(|a| a.at);
        let picks = [0, list.len() / 2, list.len() - 1];
        for a in picks.iter().map(|&k| list[k]) {
            let api = &nodes[i % nodes.len()];
            i += 1;
            let data = json!({ "k": a.key });
            match publish_once(api, topic, &data, &a.key).await {
                Ok((epoch, offset, true)) if epoch == a.epoch && offset == a.offset => {}
                Ok((epoch, offset, replayed)) => problems.push(format!(
                    "{topic}: {} (acknowledged at {}:{}) published again on {}: answered \
                     {epoch}:{offset}, replayed: {replayed}",
                    a.key, a.epoch, a.offset, api.name
                )),
                Err((status, body)) => problems.push(format!(
                    "{topic}: {} published again on {}: {status} {body}",
                    a.key, api.name
                )),
            }
        }
    }
}

/// A WebSocket and a multi-topic SSE subscriber on every target, all subscribed to
/// every topic from now.
async fn subscribers(targets: &Targets, topics: &[String]) -> Vec<Roaming> {
    let mut subs = Vec::new();
    for api in targets.all() {
        let ws = format!("WebSocket from {}", api.name);
        subs.push(Roaming::websocket(&ws, targets, &api, topics).await);
        let sse = format!("SSE from {}", api.name);
        subs.push(Roaming::sse(&sse, targets, &api, topics).await);
    }
    subs
}

/// One topic's acknowledged events in one epoch: offset → key.
#[derive(Debug, Default, Clone)]
struct Epoch {
    keys: BTreeMap<u64, String>,
}

impl Epoch {
    fn last(&self) -> u64 {
        self.keys.keys().next_back().copied().unwrap_or(0)
    }
}

/// What was acknowledged, per topic and epoch; with the problems the acknowledgements
/// show on their own (two events at one offset, offsets nobody acknowledged, a
/// publisher's events out of order).
#[derive(Debug, Default)]
struct Truth {
    topics: BTreeMap<String, BTreeMap<String, Epoch>>,
    /// Per topic, the epoch of the first and of the last acknowledgement.
    first_epoch: BTreeMap<String, String>,
    last_epoch: BTreeMap<String, String>,
}

impl Truth {
    fn from_acks(acks: &[Ack], problems: &mut Vec<String>) -> Self {
        let mut t = Truth::default();
        let mut latest: BTreeMap<String, Instant> = BTreeMap::new();
        let mut earliest: BTreeMap<String, Instant> = BTreeMap::new();
        for a in acks {
            let epoch = t
                .topics
                .entry(a.topic.clone())
                .or_default()
                .entry(a.epoch.clone())
                .or_default();
            if let Some(other) = epoch.keys.insert(a.offset, a.key.clone()) {
                problems.push(format!(
                    "{}: two publishes acknowledged at {}:{}: {other} and {}",
                    a.topic, a.epoch, a.offset, a.key
                ));
            }
            if latest.get(&a.topic).is_none_or(|at| a.at > *at) {
                latest.insert(a.topic.clone(), a.at);
                t.last_epoch.insert(a.topic.clone(), a.epoch.clone());
            }
            if earliest.get(&a.topic).is_none_or(|at| a.at < *at) {
                earliest.insert(a.topic.clone(), a.at);
                t.first_epoch.insert(a.topic.clone(), a.epoch.clone());
            }
        }
        for (topic, epochs) in &t.topics {
            for (e, ep) in epochs {
                let missing: Vec<u64> = (1..=ep.last())
                    .filter(|o| !ep.keys.contains_key(o))
                    .collect();
                if !missing.is_empty() {
                    problems.push(format!(
                        "{topic}: epoch {e} has offsets up to {} but {} of them were never \
                         acknowledged (sequenced twice, or a publish given up): {}",
                        ep.last(),
                        missing.len(),
                        first_few(&missing)
                    ));
                }
            }
        }
        // Each publisher waits for an acknowledgement before its next event: within an
        // epoch its events must be sequenced in the order it sent them.
        let mut by_publisher: BTreeMap<(usize, &str, &str), Vec<&Ack>> = BTreeMap::new();
        for a in acks {
            by_publisher
                .entry((a.publisher, &a.topic, &a.epoch))
                .or_default()
                .push(a);
        }
        for ((p, topic, epoch), mut list) in by_publisher {
            list.sort_by_key(|a| a.seq);
            for w in list.windows(2) {
                if w[1].offset <= w[0].offset {
                    problems.push(format!(
                        "{topic}: publisher {p}'s {} was sequenced at {epoch}:{} after its {} at \
                         {epoch}:{}",
                        w[1].key, w[1].offset, w[0].key, w[0].offset
                    ));
                }
            }
        }
        t
    }

    /// The topic's only epoch; a problem if it has several.
    fn single_epoch(&self, topic: &str, problems: &mut Vec<String>) -> Option<(&str, &Epoch)> {
        let epochs = self.topics.get(topic)?;
        if epochs.len() != 1 {
            let seen: Vec<String> = epochs
                .iter()
                .map(|(e, ep)| format!("{e} (last offset {})", ep.last()))
                .collect();
            problems.push(format!(
                "{topic}: acknowledged in {} epochs, where the epoch must not change: {}",
                epochs.len(),
                seen.join(", ")
            ));
            return None;
        }
        epochs.iter().next().map(|(e, ep)| (e.as_str(), ep))
    }

    /// Per topic: the epoch and offset every subscriber must reach.
    fn targets(&self) -> BTreeMap<String, (String, u64)> {
        self.last_epoch
            .iter()
            .map(|(t, e)| (t.clone(), (e.clone(), self.topics[t][e].last())))
            .collect()
    }
}

fn first_few<T: std::fmt::Debug>(v: &[T]) -> String {
    if v.len() <= 8 {
        format!("{v:?}")
    } else {
        format!("{:?} … ({} in all)", &v[..8], v.len())
    }
}

/// The offsets around index `i` of what a subscriber saw (for failure messages).
fn around(obs: &[Obs], i: usize) -> String {
    let from = i.saturating_sub(4);
    obs[from..(i + 4).min(obs.len())]
        .iter()
        .map(|o| match o {
            Obs::Event { epoch, offset, .. } => format!("{epoch}:{offset}"),
            Obs::Reset { epoch, offset } => format!("reset→{epoch}:{offset}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Waits (bounded) until every subscriber's position on every topic is the topic's
/// last acknowledged cursor; the checks after it say what is missing if not.
async fn await_delivery(subs: &[Roaming], want: &BTreeMap<String, (String, u64)>) {
    let deadline = Instant::now() + DELIVER_WITHIN;
    while Instant::now() < deadline {
        let behind = subs.iter().any(|s| {
            want.iter().any(|(t, (e, o))| match s.position(t) {
                Some((pe, po)) => pe != *e || po < *o,
                None => *o > 0,
            })
        });
        if !behind {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stops every subscriber; their logs by name.
/// Stops the load of a graceful change, checks that re-publishing acknowledged keys
/// replays them, waits for every acknowledged event to arrive, and stops the
/// subscribers: what was published, what each saw, and the replay problems.
async fn settle_graceful(
    what: &str,
    load: Load,
    targets: &Targets,
    subs: Vec<Roaming>,
) -> (Published, Vec<(String, SubLog)>, Vec<String>) {
    let published = load.finish().await;
    let mut replays = Vec::new();
    check_replays(targets, &published.acks, &mut replays).await;
    let truth = Truth::from_acks(&published.acks, &mut Vec::new());
    await_delivery(&subs, &truth.targets()).await;
    let logs = finish_all(subs).await;
    eprintln!("{what}: {}", summary(&published, &logs));
    (published, logs, replays)
}

async fn finish_all(subs: Vec<Roaming>) -> Vec<(String, SubLog)> {
    let mut out = Vec::new();
    for s in subs {
        let name = s.name.clone();
        out.push((name, s.finish().await));
    }
    out
}

/// Holds one subscriber to "every acknowledged event of `topic`, exactly once, in offset
/// order, in the topic's one epoch, no reset", from where it started.
fn check_exactly_once(
    who: &str,
    log: &SubLog,
    topic: &str,
    epoch: &str,
    truth: &Epoch,
    problems: &mut Vec<String>,
) {
    let from = match log.start.get(topic) {
        Some((e, o)) => {
            if e != epoch {
                problems.push(format!(
                    "{who}: {topic}: subscribed in epoch {e}, events acknowledged in {epoch}"
                ));
                return;
            }
            *o
        }
        None => 0,
    };
    let empty = Vec::new();
    let obs = log.seen.get(topic).unwrap_or(&empty);
    let mut expect = from + 1;
    for (i, o) in obs.iter().enumerate() {
        match o {
            Obs::Reset { epoch: e, offset } => {
                problems.push(format!(
                    "{who}: {topic}: reset to {e}:{offset} after {} (no reset may happen); \
                     seen around it: {}",
                    expect - 1,
                    around(obs, i)
                ));
                return;
            }
            Obs::Event {
                epoch: e,
                offset,
                data,
            } => {
                if e != epoch {
                    problems.push(format!(
                        "{who}: {topic}: offset {offset} in epoch {e}, acknowledged in {epoch}"
                    ));
                    return;
                }
                if *offset != expect {
                    let what = if *offset < expect {
                        "repeated or out of order"
                    } else {
                        "gap"
                    };
                    problems.push(format!(
                        "{who}: {topic}: {what}: offset {offset} where {expect} was due; seen \
                         around it: {}",
                        around(obs, i)
                    ));
                    return;
                }
                let key = data["k"].as_str().unwrap_or("?");
                match truth.keys.get(offset) {
                    Some(k) if k == key => {}
                    Some(k) => {
                        problems.push(format!(
                            "{who}: {topic}: offset {offset} carries {key}, acknowledged for {k}"
                        ));
                        return;
                    }
                    None => {
                        problems.push(format!(
                            "{who}: {topic}: offset {offset} ({key}) was never acknowledged"
                        ));
                        return;
                    }
                }
                expect += 1;
            }
        }
    }
    let last = truth.last();
    if expect - 1 < last {
        problems.push(format!(
            "{who}: {topic}: received up to offset {} of {last} (missing {} events)",
            expect - 1,
            last + 1 - expect
        ));
    }
}

/// What every subscriber's log says on its own: anomalies, and disconnect pushes that
/// do not invite a reconnect.
fn check_sessions(who: &str, log: &SubLog, problems: &mut Vec<String>) {
    for a in &log.anomalies {
        problems.push(format!("{who}: {a}"));
    }
    for (node, d) in &log.disconnects {
        if !d.reconnect || d.code != weft_proto::close::RECONNECT || d.after_ms > JITTER_MS {
            problems.push(format!("{who}: disconnect from {node}: {d:?}"));
        }
    }
}

/// Fails with every problem found (and the processes' logs, as the cluster is dropped
/// while panicking).
fn fail_on(problems: &[String], what: &str) {
    if problems.is_empty() {
        return;
    }
    let shown = problems.len().min(60);
    panic!(
        "{what}: {} problem(s):\n  {}{}",
        problems.len(),
        problems[..shown].join("\n  "),
        if shown < problems.len() {
            format!("\n  … and {} more", problems.len() - shown)
        } else {
            String::new()
        }
    );
}

/// A one-line account of the run, printed with the test's output.
fn summary(published: &Published, logs: &[(String, SubLog)]) -> String {
    let moves: Vec<String> = logs
        .iter()
        .map(|(who, log)| format!("{who}: {} session(s)", log.sessions.len() + 1))
        .collect();
    format!(
        "{} events acknowledged ({} after a retry that had been applied), {} publish \
         failure(s); {}",
        published.acks.len(),
        published.retried,
        published.failures.len(),
        moves.join(", ")
    )
}

/// Tests 1 and 2: the acknowledgements and every subscriber, held to exactly once in
/// one epoch with no reset.
fn check_no_loss(
    published: &Published,
    logs: &[(String, SubLog)],
    topics: &[String],
) -> Vec<String> {
    let mut problems: Vec<String> = published.failures.clone();
    let truth = Truth::from_acks(&published.acks, &mut problems);
    for t in topics {
        if !truth.topics.contains_key(t) {
            problems.push(format!("{t}: no event was acknowledged"));
        }
    }
    for (who, log) in logs {
        check_sessions(who, log, &mut problems);
        for t in topics {
            match truth.single_epoch(t, &mut Vec::new()) {
                Some((epoch, ep)) => check_exactly_once(who, log, t, epoch, ep, &mut problems),
                // The epoch changed (reported below): say whether this subscriber was
                // told (a reset) or not (a jump).
                None => {
                    let first = &truth.first_epoch[t];
                    check_through_crash(
                        who,
                        log,
                        t,
                        first,
                        &truth,
                        Some("no reset may happen in a graceful membership change"),
                        &mut problems,
                    );
                }
            }
        }
    }
    for t in topics {
        truth.single_epoch(t, &mut problems);
    }
    problems
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_loses_nothing() {
    let mut c = ProcCluster::start_with_options(
        "rolling",
        20,
        &NODES,
        HEARTBEAT_TIMEOUT_MS,
        node_options(),
    )
    .await;
    c.converged(CONVERGE_WITHIN).await;
    let topics = topic_names("roll");
    let targets = Targets::new(NODES.iter().map(|n| c.node(n)).collect());
    let subs = subscribers(&targets, &topics).await;
    let load = Load::start("roll", &targets, &topics);
    tokio::time::sleep(Duration::from_secs(2)).await;

    for n in NODES {
        let before = load.acked();
        let began = Instant::now();
        c.sigterm_node(n);
        let status = c.await_exit(n, EXIT_WITHIN).await;
        assert!(status.success(), "{n} exited with {status} after SIGTERM");
        let exited = began.elapsed();
        c.restart_node(n).await;
        c.converged(CONVERGE_WITHIN).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        eprintln!(
            "rolling: {n} exited {exited:?} after SIGTERM; back and converged after {:?}; \
             {} events acknowledged meanwhile",
            began.elapsed(),
            load.acked() - before
        );
        assert!(
            load.acked() > before,
            "no event was acknowledged while {n} restarted"
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let (published, logs, replays) = settle_graceful("rolling", load, &targets, subs).await;
    let mut problems = check_no_loss(&published, &logs, &topics);
    problems.extend(replays);
    for (who, log) in &logs {
        // Every node restarted, so every subscriber was told to move at least once.
        if log.disconnects.is_empty() {
            problems.push(format!(
                "{who}: no disconnect push through three restarts (sessions: {:?})",
                log.sessions
            ));
        }
    }
    fail_on(&problems, "rolling restart under load");
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_a_node_under_load_loses_nothing() {
    let mut c = ProcCluster::start_with_options(
        "scaleout",
        40,
        &NODES,
        HEARTBEAT_TIMEOUT_MS,
        node_options(),
    )
    .await;
    let v1 = c.converged(CONVERGE_WITHIN).await;
    let topics = topic_names("grow");
    let targets = Targets::new(NODES.iter().map(|n| c.node(n)).collect());
    let before = c.node("a").owners(&topics).await;
    let mut subs = subscribers(&targets, &topics).await;
    let load = Load::start("grow", &targets, &topics);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let d = c.add_node("d").await;
    let v2 = c.converged(CONVERGE_WITHIN).await;
    assert!(v2 > v1, "the ring moved past version {v1} (now {v2})");
    targets.add(d.clone());
    // A subscriber that starts on the new node, mid-stream.
    subs.push(Roaming::websocket("WebSocket from d (late)", &targets, &d, &topics).await);
    tokio::time::sleep(Duration::from_secs(3)).await;

    let (published, logs, replays) = settle_graceful("scale-out", load, &targets, subs).await;

    let view = d.cluster().await;
    let d_slots = view["ring"]["slots_per_node"]["d"].as_u64().unwrap_or(0);
    assert!(d_slots > 0, "d got no slots: {}", view["ring"]);
    let after = d.owners(&topics).await;
    let moved: Vec<String> = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| b.owner != a.owner)
        .map(|(b, a)| format!("{}: {} → {}", b.topic, b.owner, a.owner))
        .collect();
    eprintln!("scale-out: d has {d_slots} slots; topics moved: {moved:?}");
    assert!(
        !moved.is_empty(),
        "none of the {TOPICS} topics moved to d; the test would prove nothing"
    );

    let mut problems = check_no_loss(&published, &logs, &topics);
    problems.extend(replays);
    for m in after.iter().zip(&before) {
        if m.0.owner != m.1.owner && m.0.owner != "d" {
            problems.push(format!(
                "{} moved from {} to {}, not to the new node",
                m.0.topic, m.1.owner, m.0.owner
            ));
        }
    }
    fail_on(&problems, "adding a node under load");
    drop(c);
}

/// Test 3: one subscriber's view of one topic through the crash of its owner (or not):
/// contiguous offsets within an epoch, a reset before any change of epoch or jump,
/// and at the end the topic's last epoch up to its last acknowledged offset. Events
/// are compared with the acknowledgements of their epoch where there is one.
fn check_through_crash(
    who: &str,
    log: &SubLog,
    topic: &str,
    first_epoch: &str,
    truth: &Truth,
    no_reset_because: Option<&str>,
    problems: &mut Vec<String>,
) {
    let (mut epoch, mut last) = match log.start.get(topic) {
        Some((e, o)) => (e.clone(), *o),
        None => (first_epoch.to_owned(), 0),
    };
    let empty = Vec::new();
    let obs = log.seen.get(topic).unwrap_or(&empty);
    let acked = &truth.topics[topic];
    for (i, o) in obs.iter().enumerate() {
        match o {
            Obs::Reset {
                epoch: e,
                offset: off,
            } => {
                if let Some(why) = no_reset_because {
                    problems.push(format!(
                        "{who}: {topic}: reset to {e}:{off}, but {why}; seen around it: {}",
                        around(obs, i)
                    ));
                    return;
                }
                epoch = e.clone();
                last = *off;
            }
            Obs::Event {
                epoch: e,
                offset,
                data,
            } => {
                if *e != epoch || *offset != last + 1 {
                    problems.push(format!(
                        "{who}: {topic}: {e}:{offset} right after {epoch}:{last} without a \
                         reset; seen around it: {}",
                        around(obs, i)
                    ));
                    return;
                }
                let key = data["k"].as_str().unwrap_or("?");
                if let Some(k) = acked.get(e).and_then(|ep| ep.keys.get(offset)) {
                    if k != key {
                        problems.push(format!(
                            "{who}: {topic}: {e}:{offset} carries {key}, acknowledged for {k}"
                        ));
                        return;
                    }
                }
                last = *offset;
            }
        }
    }
    let final_epoch = &truth.last_epoch[topic];
    let final_last = acked[final_epoch].last();
    if epoch != *final_epoch || last < final_last {
        problems.push(format!(
            "{who}: {topic}: ended at {epoch}:{last}, the last acknowledged event is \
             {final_epoch}:{final_last}"
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_never_leaves_a_silent_gap() {
    let mut c = ProcCluster::start_with_options(
        "sigkill",
        60,
        &NODES,
        HEARTBEAT_TIMEOUT_MS,
        node_options(),
    )
    .await;
    let v1 = c.converged(CONVERGE_WITHIN).await;
    let topics = topic_names("crash");
    let owners = c.node("a").owners(&topics).await;
    let doomed: BTreeSet<String> = owners
        .iter()
        .filter(|o| o.owner == "c")
        .map(|o| o.topic.clone())
        .collect();
    assert!(
        !doomed.is_empty() && doomed.len() < topics.len(),
        "c owns {} of the {TOPICS} topics; the test needs some on each side",
        doomed.len()
    );
    let targets = Targets::new(NODES.iter().map(|n| c.node(n)).collect());
    let subs = subscribers(&targets, &topics).await;
    let first_epochs: BTreeMap<String, String> = {
        let a = c.node("a");
        let mut m = BTreeMap::new();
        for t in &topics {
            m.insert(t.clone(), a.state(t).await.epoch);
        }
        m
    };
    let load = Load::start("crash", &targets, &topics);
    tokio::time::sleep(Duration::from_secs(3)).await;

    c.sigkill_node("c");
    let v2 = c
        .converged(Duration::from_millis(HEARTBEAT_TIMEOUT_MS) + CONVERGE_WITHIN)
        .await;
    assert!(v2 > v1, "the ring moved past version {v1} (now {v2})");
    tokio::time::sleep(Duration::from_secs(4)).await;

    let published = load.finish().await;
    let mut problems: Vec<String> = published.failures.clone();
    let truth = Truth::from_acks(&published.acks, &mut problems);
    await_delivery(&subs, &truth.targets()).await;
    let logs = finish_all(subs).await;
    eprintln!("sigkill: {}", summary(&published, &logs));

    for t in &topics {
        let Some(epochs) = truth.topics.get(t) else {
            problems.push(format!("{t}: no event was acknowledged"));
            continue;
        };
        let allowed = if doomed.contains(t) { 2 } else { 1 };
        if epochs.len() > allowed || (allowed == 1 && !epochs.contains_key(&first_epochs[t])) {
            problems.push(format!(
                "{t} (owner {}): acknowledged in epochs {:?}, first epoch {}",
                if doomed.contains(t) {
                    "killed"
                } else {
                    "alive"
                },
                epochs.keys().collect::<Vec<_>>(),
                first_epochs[t]
            ));
        }
        if doomed.contains(t) && truth.last_epoch[t] == first_epochs[t] {
            problems.push(format!(
                "{t}: its owner was SIGKILLed, yet its last events were acknowledged in its \
                 first epoch {}",
                first_epochs[t]
            ));
        }
    }
    let mut resets = BTreeMap::new();
    for (who, log) in &logs {
        check_sessions(who, log, &mut problems);
        for t in &topics {
            if truth.topics.contains_key(t) {
                let no_reset = (!doomed.contains(t)).then_some("its owner did not die");
                check_through_crash(
                    who,
                    log,
                    t,
                    &first_epochs[t],
                    &truth,
                    no_reset,
                    &mut problems,
                );
                let n = log.seen.get(t).map_or(0, |obs| {
                    obs.iter()
                        .filter(|o| matches!(o, Obs::Reset { .. }))
                        .count()
                });
                *resets.entry(who.clone()).or_insert(0) += n;
            }
        }
    }
    eprintln!(
        "sigkill: {} of {TOPICS} topics lost their owner; resets seen per subscriber: {resets:?}",
        doomed.len()
    );
    fail_on(&problems, "SIGKILL of a node under load");
    drop(c);
}

/// How one session on the drained node ended, in time since the drain was asked for.
#[derive(Debug, Default)]
struct SessionEnd {
    push: Option<(Duration, weft_proto::DisconnectPush)>,
    close: Option<(Duration, Option<u16>)>,
    other: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_closes_sessions_gradually_and_exits_by_the_deadline() {
    const SESSIONS: usize = 100;
    /// Beyond the grace, for the handoff before it and leaving the router after it.
    const EXIT_MARGIN: Duration = Duration::from_secs(2);
    let half = Duration::from_millis(GRACE_MS / 2);
    let mut c =
        ProcCluster::start_with_options("drain", 80, &NODES, HEARTBEAT_TIMEOUT_MS, node_options())
            .await;
    c.converged(CONVERGE_WITHIN).await;
    let a = c.node("a");
    let mut sessions = Vec::new();
    for i in 0..SESSIONS {
        let mut ws = WsClient::connect(a.addr).await;
        let reply = ws
            .request(weft_testkit::subscribe_cmd(
                &format!("drain.{}", i % 10),
                None,
            ))
            .await;
        assert!(
            reply.result.is_some(),
            "session {i}: subscribe refused: {reply:?}"
        );
        let r: SubscribeResult =
            serde_json::from_str(reply.result.as_ref().expect("result").get()).expect("reply");
        assert!(r.events.is_empty());
        sessions.push(ws);
    }

    let t0 = Instant::now();
    let readers: Vec<_> = sessions
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let mut end = SessionEnd::default();
                loop {
                    match ws.next().await {
                        weft_testkit::WsIn::Msg(m) => {
                            let m: ServerMessage = *m;
                            match m.push.and_then(|p| p.disconnect) {
                                Some(d) if end.push.is_none() => end.push = Some((t0.elapsed(), d)),
                                Some(d) => {
                                    end.other.push(format!("a second disconnect push {d:?}"))
                                }
                                None => {}
                            }
                        }
                        weft_testkit::WsIn::Closed(code) => {
                            end.close = Some((t0.elapsed(), code));
                            return end;
                        }
                    }
                }
            })
        })
        .collect();
    a.drain().await;
    let status = c.await_exit("a", EXIT_WITHIN).await;
    let exited = t0.elapsed();

    let mut problems = Vec::new();
    let mut closes = Vec::new();
    for (i, r) in readers.into_iter().enumerate() {
        let end = match r.await {
            Ok(end) => end,
            Err(e) => {
                problems.push(format!("session {i}: reader failed: {e}"));
                continue;
            }
        };
        problems.extend(end.other.iter().map(|o| format!("session {i}: {o}")));
        match &end.push {
            Some((_, d))
                if d.reconnect
                    && d.code == weft_proto::close::RECONNECT
                    && d.after_ms <= JITTER_MS => {}
            Some((_, d)) => problems.push(format!("session {i}: disconnect push {d:?}")),
            None => problems.push(format!("session {i}: closed without a disconnect push")),
        }
        match end.close {
            Some((at, Some(code))) if code == weft_proto::close::RECONNECT => {
                if let Some((pushed, _)) = &end.push {
                    if *pushed > at {
                        problems.push(format!("session {i}: the push came after the close"));
                    }
                }
                closes.push(at);
            }
            other => problems.push(format!("session {i}: ended with {other:?}, not close 4000")),
        }
    }
    closes.sort();
    let (first, last) = (
        closes.first().copied().unwrap_or_default(),
        closes.last().copied().unwrap_or_default(),
    );
    let span = last - first;
    eprintln!(
        "drain: {} sessions closed between {first:?} and {last:?} after the drain (span \
         {span:?}); the process exited {exited:?} after it ({status})",
        closes.len()
    );
    if span < half / 3 {
        problems.push(format!(
            "the closes span {span:?}; spread over the first half of the grace ({half:?}) \
             they should span at least {:?}",
            half / 3
        ));
    }
    let window = Duration::from_millis(100);
    let crowded = closes
        .iter()
        .map(|t| {
            closes
                .iter()
                .filter(|u| **u >= *t && **u < *t + window)
                .count()
        })
        .max()
        .unwrap_or(0);
    if crowded > SESSIONS / 2 {
        problems.push(format!(
            "{crowded} of {SESSIONS} sessions closed within one {window:?}"
        ));
    }
    if last > exited {
        problems.push(format!(
            "a session closed {last:?} after the drain, after the exit ({exited:?})"
        ));
    }
    if !status.success() {
        problems.push(format!("the drained node exited with {status}"));
    }
    let deadline = Duration::from_millis(GRACE_MS) + EXIT_MARGIN;
    if exited > deadline {
        problems.push(format!(
            "the drained node exited {exited:?} after the drain: later than its grace plus \
             {EXIT_MARGIN:?} ({deadline:?})"
        ));
    }
    fail_on(&problems, "drain of a node with 100 sessions");
    drop(c);
}

/// The judges themselves, on made-up runs: they must fail a run that lost, repeated,
/// reordered or mislabelled an event, or showed a reset where none may happen, and
/// pass a clean one.
#[test]
fn the_checks_catch_loss_duplicates_reordering_and_resets() {
    let base = Instant::now();
    let ack = |epoch: &str, offset: u64, n: u64| Ack {
        topic: "t".into(),
        key: format!("k{n}"),
        publisher: 0,
        seq: n,
        epoch: epoch.into(),
        offset,
        replayed: false,
        at: base + Duration::from_millis(n),
    };
    let ev = |epoch: &str, offset: u64, n: u64| Obs::Event {
        epoch: epoch.into(),
        offset,
        data: json!({ "k": format!("k{n}") }),
    };
    let reset = |epoch: &str, offset: u64| Obs::Reset {
        epoch: epoch.into(),
        offset,
    };
    let topics = vec!["t".to_string()];
    let judge = |acks: Vec<Ack>, seen: Vec<Obs>| {
        let published = Published {
            acks,
            failures: Vec::new(),
            retried: 0,
        };
        let mut log = SubLog::default();
        log.seen.insert("t".into(), seen);
        check_no_loss(&published, &[("sub".into(), log)], &topics)
    };
    let acks = || (1..=5).map(|o| ack("e1", o, o)).collect::<Vec<_>>();
    let seen = |offsets: &[u64]| offsets.iter().map(|&o| ev("e1", o, o)).collect::<Vec<_>>();

    assert_eq!(judge(acks(), seen(&[1, 2, 3, 4, 5])), Vec::<String>::new());
    for (what, got) in [
        ("a gap", seen(&[1, 2, 4, 5])),
        ("a lost tail", seen(&[1, 2, 3, 4])),
        ("a duplicate", seen(&[1, 2, 2, 3, 4, 5])),
        ("a reordering", seen(&[1, 3, 2, 4, 5])),
        (
            "a reset",
            vec![
                ev("e1", 1, 1),
                ev("e1", 2, 2),
                reset("e1", 2),
                ev("e1", 3, 3),
            ],
        ),
        (
            "another payload",
            vec![ev("e1", 1, 1), ev("e1", 2, 3), ev("e1", 3, 2)],
        ),
        ("another epoch", vec![ev("e2", 1, 1)]),
    ] {
        assert!(!judge(acks(), got).is_empty(), "{what} passed the check");
    }
    // Two acknowledgements at one offset, an offset nobody acknowledged (a retry
    // sequenced twice), a publisher's events out of order, an epoch change.
    let mut twice = acks();
    twice[2].offset = 2;
    assert!(!judge(twice, seen(&[1, 2])).is_empty());
    let mut skipped = acks();
    skipped[2].offset = 6;
    assert!(!judge(skipped, seen(&[1, 2])).is_empty());
    let mut swapped = acks();
    swapped.swap(1, 2);
    (swapped[1].offset, swapped[2].offset) = (2, 3);
    assert!(!judge(swapped, Vec::new()).is_empty());
    let mut moved = acks();
    moved[4].epoch = "e2".into();
    moved[4].offset = 1;
    assert!(!judge(moved, seen(&[1, 2, 3, 4])).is_empty());

    // Through a crash: a reset before the new epoch passes; a jump, or stopping short of
    // the last acknowledged event, does not.
    let mut crash = acks()[..3].to_vec();
    crash.extend([ack("e2", 1, 10), ack("e2", 2, 11)]);
    let mut problems = Vec::new();
    let truth = Truth::from_acks(&crash, &mut problems);
    assert_eq!(problems, Vec::<String>::new());
    let walk = |seen: Vec<Obs>| {
        let mut log = SubLog::default();
        log.seen.insert("t".into(), seen);
        let mut problems = Vec::new();
        check_through_crash("sub", &log, "t", "e1", &truth, None, &mut problems);
        problems
    };
    let told = vec![
        ev("e1", 1, 1),
        ev("e1", 2, 2),
        reset("e2", 0),
        ev("e2", 1, 10),
        ev("e2", 2, 11),
    ];
    assert_eq!(walk(told), Vec::<String>::new());
    let silent = vec![
        ev("e1", 1, 1),
        ev("e1", 2, 2),
        ev("e2", 1, 10),
        ev("e2", 2, 11),
    ];
    assert!(!walk(silent).is_empty(), "a silent change of epoch passed");
    let short = vec![ev("e1", 1, 1), reset("e2", 0), ev("e2", 1, 10)];
    assert!(
        !walk(short).is_empty(),
        "a missing event after the reset passed"
    );
    let gap = vec![
        ev("e1", 1, 1),
        ev("e1", 3, 3),
        reset("e2", 0),
        ev("e2", 1, 10),
        ev("e2", 2, 11),
    ];
    assert!(!walk(gap).is_empty(), "a gap before the reset passed");
}
