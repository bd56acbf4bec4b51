//! Runs one plan in one process (all of it, or its slot).
//!
//! 1. **Ramp**: spawn this slot's subscribers on an open-loop connect schedule
//!    (`--connect-rate`), wait until all have subscribed (or the ramp timeout); on a
//!    subscribe schedule (`subscribe`), until all have connected: their subscribes
//!    are the load.
//! 2. **Go**: the role decides the load's start time (the parent's, for workers).
//! 3. **Load**: the publisher runs this slot's share of the schedule; `connect` just
//!    holds its connections for `--duration`.
//! 4. **Loaded**: barrier; the conductor samples the target with connections open.
//! 5. **Drain**: read every watched topic's final cursor (from the subscribers' node,
//!    raised to what the publishers saw acknowledged), hand it to the subscribers,
//!    wait until all have caught up — at most `--drain-timeout`, then stop them.
//! 6. **Report**: trackers' books closed against the finals, histograms, counters.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use futures_util::stream::{self, StreamExt};
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use weft_proto::Cursor;

use crate::coord::{instant_at, ProgressSink, Role};
use crate::hist::{self, new_hist, SIGFIG};
use crate::net::Net;
use crate::plan::{Plan, Slot};
use crate::publisher::{EpochEnds, Publisher, Via};
use crate::recorder::Recorder;
use crate::report::{Raw, Report, TimelinePoint, REPORT_VERSION};
use crate::stats::{ErrorLog, LiveStats};
use crate::subscriber::{Finals, Shared, SubscribeTimes, Subscriber, SubscriberOutcome};
use crate::target;
use crate::tls::TlsClient;
use crate::tracker::Counts;
use crate::transport::nats::{self, NatsLinks};
use crate::transport::pubstream::StreamLinks;
use crate::transport::{topic_state, PublishVia, System, Transport};

/// File descriptors kept free for everything that is not a subscriber connection.
const FD_RESERVE: u64 = 512;
/// Connections one process holds at most, whatever its open-files limit: past this,
/// use more workers (`--workers`), which also spreads the client's CPU.
pub const MAX_CONNECTIONS_PER_PROCESS: u64 = 15_000;
/// How long stopped subscribers get to hand in their books.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Concurrent state reads when collecting final cursors.
const FINALS_CONCURRENCY: usize = 32;

/// How a process runs its part of a plan.
#[derive(Debug, Clone)]
pub struct Settings {
    pub target: String,
    /// Where publishers send (`--publish-target`; the target by default).
    pub publish_target: String,
    /// Sent as `Authorization: Bearer` (`--token`); never echoed into the report.
    pub credential: Option<String>,
    /// TLS for `https://` targets: what is trusted (`--ca-file`), one client
    /// configuration for every connection of the process.
    pub tls: Arc<TlsClient>,
    /// Weft, or a `nats-server`'s WebSocket listener.
    pub system: System,
    pub transport: Transport,
    /// The part of the run this process executes.
    pub slot: Slot,
    pub run_id: String,
    /// Connects per second over the whole run (all slots together).
    pub connect_rate: f64,
    /// How long to wait for every subscriber before starting anyway (`None`: the connect
    /// schedule's length plus 15 s).
    pub ramp_timeout: Option<Duration>,
    pub drain_timeout: Duration,
    /// In-flight publish requests, per process.
    pub max_inflight: usize,
    /// One publish in flight per topic, each topic from one process (`--ordered`).
    pub ordered: bool,
    /// How publishers reach Weft (`--publish-via`).
    pub publish_via: PublishVia,
    pub publish_timeout: Duration,
    pub longpoll_wait: Duration,
    /// Spread connections over 127.0.0.2–250 when the target is loopback.
    pub spread: bool,
    /// The options, echoed into the report.
    pub config: Value,
}

/// Runs `plan` as `role` and returns this process's report (finalized; a worker's
/// report still merges exactly, see [`Report::merge`]).
pub async fn run(plan: &Plan, st: &Settings, role: &mut Role) -> anyhow::Result<Report> {
    let net = Arc::new(
        Net::new(&st.target, &st.tls, st.slot.index, st.spread)
            .await?
            .with_credential(st.credential.clone()),
    );
    // The publisher's own: its connections are opened on its own runtime
    // ([`Publisher::run_apart`]).
    let publish_net = Arc::new(
        Net::new(&st.publish_target, &st.tls, st.slot.index, st.spread)
            .await?
            .with_credential(st.credential.clone()),
    );
    net.check_tls().await?;
    if st.publish_target != st.target {
        publish_net.check_tls().await?;
    }
    let (start_tx, start_rx) = watch::channel::<Option<Instant>>(None);
    let topics = Arc::new(plan.topics.clone());
    let recorder = Arc::new(Recorder::new());
    let stats = Arc::new(LiveStats::default());
    let errors = Arc::new(ErrorLog::default());
    let shared = Arc::new(Shared {
        net: net.clone(),
        system: st.system,
        transport: st.transport,
        topics: topics.clone(),
        recorder: recorder.clone(),
        stats: stats.clone(),
        errors: errors.clone(),
        churn: plan.churn,
        longpoll_wait: st.longpoll_wait,
        schedule: plan.subscribe.map(|schedule| SubscribeTimes {
            schedule,
            start: start_rx,
        }),
    });

    let local: Vec<usize> = (0..plan.subscribers)
        .filter(|&j| st.slot.owns(j as u64))
        .collect();
    let mut watched = BTreeSet::new();
    let mut subscriptions = 0u64;
    let subs: Vec<(usize, Vec<usize>)> = local
        .iter()
        .map(|&j| {
            let t = plan.subscriber_topics(j);
            subscriptions += t.len() as u64;
            watched.extend(t.iter().copied());
            (j, t)
        })
        .collect();
    let connections = match st.transport {
        Transport::Longpoll => subscriptions,
        _ => local.len() as u64,
    };
    if connections > MAX_CONNECTIONS_PER_PROCESS {
        bail!(
            "this process would hold {connections} connections; one process holds at most \
             {MAX_CONNECTIONS_PER_PROCESS}: use --workers {} (or more shards)",
            connections.div_ceil(MAX_CONNECTIONS_PER_PROCESS) * st.slot.count as u64
        );
    }
    ensure_fds(connections + st.max_inflight as u64)?;

    let (finals_tx, finals_rx) = watch::channel::<Option<Arc<Finals>>>(None);
    let (stop_tx, stop_rx) = watch::channel(false);
    let local_rate = (st.connect_rate / st.slot.count as f64).max(1e-3);
    let ramp_start = Instant::now();
    let mut tasks: JoinSet<SubscriberOutcome> = JoinSet::new();
    for (q, (j, t)) in subs.into_iter().enumerate() {
        let at = ramp_start + Duration::from_secs_f64(q as f64 / local_rate);
        let sub = Subscriber::new(j, t, finals_rx.clone(), stop_rx.clone());
        tasks.spawn(sub.run(shared.clone(), at));
    }

    let phase = Arc::new(std::sync::Mutex::new("ramp"));
    let progress = tokio::spawn(progress_loop(
        role.sink(),
        stats.clone(),
        recorder.clone(),
        phase.clone(),
    ));

    // 1. Ramp.
    let ramp_len = Duration::from_secs_f64(local.len() as f64 / local_rate);
    let ramp_deadline = ramp_start
        + st.ramp_timeout
            .unwrap_or(ramp_len + Duration::from_secs(15));
    // On a subscribe schedule the subscriptions are the load: connected is ready.
    let (ready, what) = match plan.subscribe {
        Some(_) => (&stats.connects, "connected"),
        None => (&stats.subscribed, "subscribed"),
    };
    while ready.load(Relaxed) < local.len() as u64 && Instant::now() < ramp_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let subscribed = ready.load(Relaxed).min(local.len() as u64);
    if subscribed < local.len() as u64 {
        errors.add(format!(
            "{} of {} subscribers had not {what} when the load started",
            local.len() as u64 - subscribed,
            local.len()
        ));
    }

    // 2–3. Go, load.
    let start_us = role.ready(subscribed).await?;
    let start = instant_at(start_us);
    start_tx.send_replace(Some(start));
    set_phase(&phase, "load");
    // This process's own CPU over the load, reported beside the target's.
    let harness_from = target::sample(std::process::id()).map(|s| (s, Instant::now()));
    let publisher = Arc::new(Publisher {
        net: publish_net.clone(),
        topics: topics.clone(),
        recorder: recorder.clone(),
        stats: stats.clone(),
        errors: errors.clone(),
        run_id: st.run_id.clone(),
        max_inflight: st.max_inflight,
        timeout: st.publish_timeout,
        epoch_ends: Default::default(),
        ordered: st.ordered,
        via: match (st.system, st.publish_via) {
            (System::Nats, _) => Via::Nats(NatsLinks::new(publish_net.clone(), 4)),
            (System::Weft, PublishVia::Stream) => {
                Via::Stream(StreamLinks::new(publish_net.clone(), 4))
            }
            (System::Weft, PublishVia::Http) => Via::Http,
        },
        bytes: Default::default(),
        last_ack_us: Default::default(),
    });
    let published = publisher
        .clone()
        .run_apart(plan.clone(), st.slot, start, start_us)
        .await?;
    tokio::time::sleep_until(start + plan.duration).await;

    // 4. Loaded.
    let ends = std::mem::take(
        &mut *publisher
            .epoch_ends
            .lock()
            .unwrap_or_else(|p| p.into_inner()),
    );
    let harness_cpu = harness_from.and_then(|(from, at)| {
        let to = target::sample(std::process::id())?;
        Some(((to.cpu_s - from.cpu_s).max(0.0), at.elapsed().as_secs_f64()))
    });
    let epoch_ends = role.loaded(ends).await?;
    let open_at_end = stats.open.load(Relaxed);

    // 5. Drain.
    set_phase(&phase, "drain");
    let drain_deadline = Instant::now() + st.drain_timeout;
    let mut cursors = match st.system {
        System::Weft => read_finals(&net, &topics, &watched, drain_deadline, &errors).await,
        // NATS keeps no position: every subscription is owed from ordinal 0 up to what
        // its topic's publisher saw acknowledged.
        System::Nats => watched
            .iter()
            .map(|&t| (t, Cursor::new(nats::EPOCH.to_string(), 0)))
            .collect(),
    };
    raise_to_acks(&mut cursors, &epoch_ends);
    let finals = Finals {
        cursors,
        epoch_ends,
    };
    finals_tx.send_replace(Some(Arc::new(finals)));
    let mut outcomes = Vec::with_capacity(local.len());
    collect_until(&mut tasks, drain_deadline, &mut outcomes, &errors).await;
    if !tasks.is_empty() {
        errors.add(format!(
            "{} subscribers had not caught up at the drain deadline ({:?})",
            tasks.len(),
            st.drain_timeout
        ));
        stop_tx.send_replace(true);
        let grace = Instant::now() + STOP_GRACE;
        if !collect_until(&mut tasks, grace, &mut outcomes, &errors).await {
            errors.add(format!(
                "{} subscribers did not stop; their counts are missing",
                tasks.len()
            ));
            tasks.abort_all();
        }
    }
    progress.abort();

    // 6. Report.
    let mut counts = Counts::default();
    let mut sessions = 0;
    let mut unanswered = 0;
    for o in &outcomes {
        counts.add(&o.counts);
        sessions += o.sessions;
        unanswered += o.unstarted;
    }
    // WebSocket subscriptions without a reply; subscribers that never handed in their
    // books are in `errors` already.
    if st.transport != Transport::Ws {
        unanswered = 0;
    }
    let rec = recorder.snapshot();
    let timeline = rec
        .seconds
        .iter()
        .map(|(&t, s)| TimelinePoint {
            t,
            delivered: s.latency.len(),
            published: s.published,
            hist: hist::encode(&s.latency),
            ..Default::default()
        })
        .collect();
    let snap = stats.snapshot();
    let mut report = Report {
        version: REPORT_VERSION,
        scenario: plan.kind.name().into(),
        system: st.system.to_string(),
        transport: st.transport.to_string(),
        target_url: match st.system {
            System::Weft => net.base().into(),
            System::Nats => net.nats_url().into(),
        },
        publish_url: if st.publish_target == st.target {
            String::new()
        } else {
            publish_net.base().into()
        },
        run_id: st.run_id.clone(),
        started_at_ms: start_us / 1000,
        duration_s: plan.duration.as_secs_f64(),
        processes: 1,
        config: st.config.clone(),
        subscribers: local.len() as u64,
        subscriptions,
        topics: plan.topics.len() as u64,
        published: published.published,
        publish_errors: published.failed,
        publish_retries: published.retries,
        offered: published.offered,
        publish_unsent: published.unsent,
        published_bytes: publisher.bytes.load(Relaxed),
        delivered_bytes: stats.delivered_bytes.load(Relaxed),
        harness_cpu_s: harness_cpu.map(|(cpu, _)| round2(cpu)).unwrap_or_default(),
        foreign: stats.foreign.load(Relaxed),
        connects: snap.connects,
        connect_failures: snap.connect_failures,
        subscribe_failures: snap.subscribe_failures + unanswered,
        reconnects: snap.reconnects,
        sessions,
        connections_open: open_at_end,
        errors: errors.take(),
        timeline,
        raw: Raw {
            start_us,
            last_delivery_us: rec.last_delivery_us,
            connect_first_us: stats.connect_first_us.load(Relaxed),
            connect_last_us: stats.connect_last_us.load(Relaxed),
            last_ack_us: publisher.last_ack_us.load(Relaxed),
            harness_window_s: harness_cpu.map(|(_, s)| round2(s)).unwrap_or_default(),
            latency_hist: hist::encode(&rec.latency),
            publish_hist: hist::encode(&rec.publish),
            connect_hist: hist::encode(&rec.connect),
            subscribe_hist: hist::encode(&rec.subscribe),
        },
        ..Default::default()
    };
    report.set_counts(&counts);
    report.finalize()?;
    Ok(report)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn set_phase(phase: &std::sync::Mutex<&'static str>, p: &'static str) {
    *phase.lock().unwrap_or_else(|e| e.into_inner()) = p;
}

async fn progress_loop(
    sink: ProgressSink,
    stats: Arc<LiveStats>,
    recorder: Arc<Recorder>,
    phase: Arc<std::sync::Mutex<&'static str>>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut window = new_hist(SIGFIG);
    loop {
        tick.tick().await;
        window.reset();
        window.add(recorder.take_window()).ok();
        let p = *phase.lock().unwrap_or_else(|e| e.into_inner());
        sink.update(p, &stats.snapshot(), &window);
    }
}

/// Reads each watched topic's cursor once publishing is over, retrying (a node may be
/// restarting) until the deadline. Topics that cannot be read get no final cursor.
async fn read_finals(
    net: &Net,
    topics: &[String],
    watched: &BTreeSet<usize>,
    deadline: Instant,
    errors: &ErrorLog,
) -> HashMap<usize, Cursor> {
    let results: Vec<(usize, Option<Cursor>)> = stream::iter(watched.iter().copied())
        .map(|t| async move {
            let mut pause = Duration::from_millis(50);
            loop {
                match topic_state(net, t, &topics[t]).await {
                    Ok(s) => return (t, Some(Cursor::new(s.epoch, s.offset))),
                    Err(e) if Instant::now() + pause >= deadline => {
                        errors.add(format!("final cursor of {}: {e:#}", topics[t]));
                        return (t, None);
                    }
                    Err(_) => {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(1));
                    }
                }
            }
        })
        .buffer_unordered(FINALS_CONCURRENCY)
        .collect()
        .await;
    results
        .into_iter()
        .filter_map(|(t, c)| c.map(|c| (t, c)))
        .collect()
}

/// Raises each final cursor to the last offset the publishers saw acknowledged in the
/// same epoch. In a cluster the subscribers' node may mirror a topic and answer a state
/// read before the owner's last events have reached it; what the owner acknowledged is
/// owed all the same, so a mirror that never delivers the tail shows as loss instead of
/// shortening the books.
pub fn raise_to_acks(cursors: &mut HashMap<usize, Cursor>, acked: &EpochEnds) {
    for ((topic, epoch), &offset) in acked {
        if let Some(c) = cursors.get_mut(topic) {
            if c.epoch == *epoch && c.offset < offset {
                c.offset = offset;
            }
        }
    }
}

/// Raises the open-files soft limit to the hard limit and checks that `needed`
/// connections fit, with a clear hint when they do not.
fn ensure_fds(needed: u64) -> anyhow::Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    let have = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Ok(());
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
        lim.rlim_cur
    };
    if needed + FD_RESERVE > have {
        bail!(
            "this process would need about {} open files but may have {have}; \
             split the load with --workers N (each worker takes 1/N of the connections)",
            needed + FD_RESERVE
        );
    }
    Ok(())
}

/// Collects finished subscriber tasks until none is left (true) or `deadline` (false).
async fn collect_until(
    tasks: &mut JoinSet<SubscriberOutcome>,
    deadline: Instant,
    outcomes: &mut Vec<SubscriberOutcome>,
    errors: &ErrorLog,
) -> bool {
    loop {
        tokio::select! {
            r = tasks.join_next() => match r {
                Some(Ok(o)) => outcomes.push(o),
                Some(Err(e)) => errors.add(format!("subscriber task failed: {e}")),
                None => return true,
            },
            _ = tokio::time::sleep_until(deadline) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finals_rise_to_what_the_owner_acknowledged_in_the_same_epoch() {
        let mut cursors = HashMap::from([
            (0, Cursor::new("e1".to_string(), 90)),
            (1, Cursor::new("e1".to_string(), 50)),
            (2, Cursor::new("e2".to_string(), 7)),
        ]);
        let acked = EpochEnds::from([
            // A mirror answered before the owner's last 10 events reached it.
            ((0, "e1".to_string()), 100),
            // The state read is ahead of the acks (publishes by others): kept.
            ((1, "e1".to_string()), 40),
            // Another epoch (the topic was reset): not comparable, kept.
            ((2, "e1".to_string()), 500),
            // A topic nobody watches here.
            ((3, "e1".to_string()), 9),
        ]);
        raise_to_acks(&mut cursors, &acked);
        assert_eq!(cursors[&0].offset, 100);
        assert_eq!(cursors[&1].offset, 50);
        assert_eq!(cursors[&2], Cursor::new("e2".to_string(), 7));
        assert!(!cursors.contains_key(&3));
    }
}
