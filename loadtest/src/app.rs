//! From a parsed command line to an exit code: builds the plan and settings, runs the
//! scenario as a single process, a worker, or the parent of workers, then prints the
//! table and writes the JSON/HTML reports, the baseline comparison and the SLO verdicts.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::baseline;
use crate::cli::{Cli, Cmd, Common, Load, Outputs};
use crate::compare;
use crate::coord::{Conductor, Role, WorkerLink};
use crate::engine::{self, Settings};
use crate::html;
use crate::net::Net;
use crate::placement;
use crate::plan::{
    topic_names, Churn, Layout, Plan, Restart, ScenarioKind, Slot, SubscribeSchedule,
};
use crate::progress::Progress;
use crate::report::{Report, SloResult};
use crate::slo;
use crate::tls::TlsClient;
use crate::transport::{PublishVia, System, Transport};
use crate::workers::{self, PhaseLimits};

/// Exit code when an `--slo` objective was missed.
pub const EXIT_SLO: u8 = 3;
/// Exit code when the run is worse than `--baseline`.
pub const EXIT_BASELINE: u8 = 4;

/// Runs the command; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<u8> {
    if let Cmd::Merge(m) = &cli.command {
        let mut merged = Report::default();
        for path in &m.reports {
            merged
                .merge(&read_report(path)?)
                .with_context(|| format!("merging {}", path.display()))?;
        }
        merged.finalize()?;
        return finish(&merged, &m.out);
    }
    if let Cmd::Compare(c) = &cli.command {
        return compare::run(c);
    }
    let out = match &cli.command {
        Cmd::Connect(a) => &a.common.out,
        Cmd::Fanout(a) => &a.common.out,
        Cmd::Chat(a) => &a.common.out,
        Cmd::Ticker(a) => &a.common.out,
        Cmd::Churn(a) => &a.common.out,
        Cmd::Rolling(a) => &a.common.out,
        Cmd::Subscribe(a) => &a.common.out,
        Cmd::Merge(m) => &m.out,
        Cmd::Compare(_) => unreachable!("handled above"),
    };
    match execute(&cli.command).await? {
        Some(report) => finish(&report, out),
        None => Ok(0),
    }
}

/// Runs a scenario subcommand and returns its report; `None` in a worker process,
/// which hands its report to its parent instead.
pub async fn execute(cmd: &Cmd) -> anyhow::Result<Option<Report>> {
    let (mut plan, common) = build(cmd)?;
    let worker = common.worker_slot;
    let run_id = common.run_id.clone().unwrap_or_default();
    let root = common.shard.unwrap_or_default();
    let slot = worker.unwrap_or(root);
    // Read before anything else: a bad --ca-file is a one-line error, in every role
    // (a coordinator's or a parent's check spares its workers the same failure).
    let tls = Arc::new(TlsClient::load(common.ca_file.as_deref())?);
    let settings = settings(&plan, &common, cmd, slot, &run_id, tls.clone());
    let settle = common.settle.unwrap_or(if common.shard.is_some() {
        Duration::from_secs(2)
    } else {
        Duration::ZERO
    });

    // The process that runs the plan picks its topics (workers and shards each draw
    // the same names: the choice is a pure function of the run id and the ring).
    let runs_plan = worker.is_some() || (common.workers <= 1 && common.coordinate.is_none());
    if let (Some(owner), true) = (&common.topic_owner, runs_plan) {
        plan.topics = placement::topics_owned_by(
            &common.target,
            &tls,
            owner,
            &common.topic_prefix,
            &run_id,
            plan.kind,
            plan.topics.len(),
        )
        .await?;
    }

    if let Some(slot) = worker {
        let link = match &common.coordinator {
            Some(addr) => WorkerLink::connect(addr, &slot.to_string(), &run_id).await?,
            None => WorkerLink::new(),
        };
        let mut role = Role::Worker(link);
        let run = engine::run(&plan, &settings, &mut role).await;
        match (run, role) {
            (Ok(report), Role::Worker(link)) => link.finish(report).await,
            // The parent (or coordinator) reports why, not just that the worker left.
            (Err(e), Role::Worker(link)) => {
                link.fail(&e).await;
                return Err(e);
            }
            (Err(e), _) => return Err(e),
            (Ok(_), _) => {}
        }
        return Ok(None);
    }

    let label = match common.system {
        System::Weft => format!("{}/{}", plan.kind, common.transport),
        System::Nats => format!("{}/{}/nats", plan.kind, common.transport),
    };
    let progress = Progress::new(label, common.out.quiet);
    // A restart command runs once per run: in the only process, or in shard 0.
    let restart = plan.restart.clone().filter(|_| root.index == 0);
    let conductor = Conductor::new(common.target_pid, restart, progress, settle)?;
    let report = if common.workers > 1 || common.coordinate.is_some() {
        let ramp = settings.ramp_timeout.unwrap_or_else(|| {
            Duration::from_secs_f64(
                plan.subscribers as f64 / settings.connect_rate / root.count as f64,
            ) + Duration::from_secs(15)
        });
        let restart_time = plan
            .restart
            .as_ref()
            .map(|r| r.after + r.timeout)
            .unwrap_or_default();
        let limits = PhaseLimits {
            ramp: ramp + Duration::from_secs(30),
            load: plan.duration
                + settings.publish_timeout
                + restart_time
                + settle
                + Duration::from_secs(30),
            drain: settings.drain_timeout + Duration::from_secs(30),
        };
        match common.coordinate {
            Some(listen) => {
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("--coordinate {listen}"))?;
                eprintln!(
                    "weft-loadtest: coordinating run {run_id}: waiting for {} workers on {}",
                    common.workers,
                    listener.local_addr()?
                );
                workers::run_remote(listener, common.workers, root, &run_id, conductor, limits)
                    .await?
            }
            None => {
                // One handshake here instead of a failure in every worker.
                Net::new(&common.target, &tls, 0, false)
                    .await?
                    .check_tls()
                    .await?;
                workers::run(common.workers, root, &run_id, conductor, limits).await?
            }
        }
    } else {
        let mut role = Role::Local(conductor);
        let mut report = engine::run(&plan, &settings, &mut role).await?;
        if let Role::Local(c) = role {
            c.finish(&mut report).await;
        }
        report
    };
    Ok(Some(report))
}

/// The plan and the shared options of a scenario subcommand.
pub fn build(cmd: &Cmd) -> anyhow::Result<(Plan, Common)> {
    let (kind, mut common) = match cmd {
        Cmd::Connect(a) => (ScenarioKind::Connect, a.common.clone()),
        Cmd::Fanout(a) => (ScenarioKind::Fanout, a.common.clone()),
        Cmd::Chat(a) => (ScenarioKind::Chat, a.common.clone()),
        Cmd::Ticker(a) => (ScenarioKind::Ticker, a.common.clone()),
        Cmd::Churn(a) => (ScenarioKind::Churn, a.common.clone()),
        Cmd::Rolling(a) => (ScenarioKind::Rolling, a.common.clone()),
        Cmd::Subscribe(a) => (ScenarioKind::Subscribe, a.common.clone()),
        Cmd::Merge(_) => bail!("merge is not a scenario"),
        Cmd::Compare(_) => bail!("compare is not a scenario"),
    };
    if common.shard.is_some() && common.run_id.is_none() {
        bail!(
            "--shard needs --run-id (the same on every shard, so all shards use the same topics)"
        );
    }
    if common.workers == 0 || common.workers > 256 {
        bail!("--workers must be between 1 and 256");
    }
    if common.coordinator.is_some() && common.worker_slot.is_none() {
        bail!("--coordinator needs --worker-slot i/n (this worker's slot of the run)");
    }
    if common.coordinator.is_some() && common.run_id.is_none() {
        bail!("--coordinator needs --run-id (the coordinator's, so every worker uses the same topics)");
    }
    if common.coordinate.is_some() && (common.coordinator.is_some() || common.worker_slot.is_some())
    {
        bail!("--coordinate runs the coordinator: it takes no --coordinator or --worker-slot");
    }
    if common.coordinate.is_some() && common.run_id.is_none() {
        bail!("--coordinate needs --run-id (the same on every worker)");
    }
    if common.connect_rate <= 0.0 || common.max_inflight == 0 {
        bail!("--connect-rate and --max-inflight must be positive");
    }
    let run_id = common
        .run_id
        .get_or_insert_with(|| format!("{:08x}", fastrand::u32(..)))
        .clone();
    if run_id.is_empty()
        || !run_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        bail!("--run-id must be letters, digits, `-` or `_`");
    }
    weft_proto::validate_topic(&common.topic_prefix)
        .map_err(|e| anyhow::anyhow!("--topic-prefix: {e}"))?;
    if common.system == System::Nats {
        if !matches!(kind, ScenarioKind::Connect | ScenarioKind::Fanout) {
            bail!(
                "--system nats runs `connect` and `fanout` (NATS core keeps no history to \
                 resume, reset or replay from)"
            );
        }
        if common.transport != Transport::Ws {
            bail!("--system nats: subscribers use WebSocket (--transport ws)");
        }
        if common.publish_target.is_some() || common.topic_owner.is_some() {
            bail!("--system nats: --publish-target and --topic-owner are Weft cluster options");
        }
        if common.publish_via != PublishVia::Http {
            bail!("--system nats: publishers use NATS links (--publish-via is a Weft option)");
        }
        // NATS orders per publisher connection only, and its accounting needs each
        // topic's events in order from one publisher: always ordered.
        common.ordered = true;
    }
    if common.ordered && matches!(kind, ScenarioKind::Chat | ScenarioKind::Ticker) {
        bail!("--ordered publishes each topic from one task: use it with connect, fanout, churn, rolling or subscribe");
    }
    let names = |n: usize| topic_names(&common.topic_prefix, &run_id, kind, n);
    // A plan with `n` topics and no churn, restarts or subscribe schedule.
    let plain = |n: usize, subscribers: usize, layout: Layout, rate: f64, payload_bytes| Plan {
        kind,
        topics: names(n),
        subscribers,
        layout,
        rate,
        duration: common.duration,
        payload_bytes,
        churn: None,
        restart: None,
        subscribe: None,
    };
    let base = |load: &Load| -> anyhow::Result<Plan> {
        check_load(load.subscribers, load.topics, load.rate)?;
        Ok(plain(
            load.topics,
            load.subscribers,
            Layout::RoundRobin,
            load.rate,
            load.payload_bytes,
        ))
    };
    let plan = match cmd {
        Cmd::Connect(a) => {
            check_load(a.connections, a.topics, 0.0)?;
            if a.rate <= 0.0 {
                bail!("--rate (connects per second) must be positive");
            }
            plain(a.topics, a.connections, Layout::RoundRobin, 0.0, 0)
        }
        Cmd::Fanout(a) => base(&a.load)?,
        Cmd::Chat(a) => {
            check_load(a.rooms * a.members, a.rooms, a.rate)?;
            plain(
                a.rooms,
                a.rooms * a.members,
                Layout::Rooms { members: a.members },
                a.rate,
                a.payload_bytes,
            )
        }
        Cmd::Ticker(a) => {
            check_load(a.subscribers, a.topics, a.rate)?;
            if a.topics_per_subscriber == 0 {
                bail!("--topics-per-subscriber must be at least 1");
            }
            let layout = Layout::Random {
                per_subscriber: a.topics_per_subscriber,
                seed: run_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ b as u64).wrapping_mul(0x1000_0000_01b3)
                }),
            };
            plain(a.topics, a.subscribers, layout, a.rate, a.payload_bytes)
        }
        Cmd::Churn(a) => {
            if a.lifetime < Duration::from_millis(10) {
                bail!("--lifetime must be at least 10ms");
            }
            Plan {
                churn: Some(Churn {
                    lifetime: a.lifetime,
                    gap: a.reconnect_gap,
                }),
                ..base(&a.load)?
            }
        }
        Cmd::Rolling(a) => {
            if a.restart_cmd.trim().is_empty() {
                bail!("--restart-cmd is empty");
            }
            Plan {
                restart: Some(Restart {
                    command: a.restart_cmd.clone(),
                    after: a.restart_after,
                    timeout: a.restart_timeout,
                }),
                ..base(&a.load)?
            }
        }
        Cmd::Subscribe(a) => {
            if common.transport != Transport::Ws {
                bail!("subscribe measures WebSocket subscribe replies: use --transport ws");
            }
            if a.per_connection == 0 {
                bail!("--per-connection must be at least 1");
            }
            if !(a.rate > 0.0 && a.rate.is_finite()) {
                bail!("--rate (subscribes per second) must be positive");
            }
            check_load(a.topics, a.topics, a.rate)?;
            let schedule = SubscribeSchedule { rate: a.rate };
            // Subscribes for topics/rate, then one event per topic at the same rate.
            let secs = 2.0 * a.topics as f64 / a.rate;
            if secs > 86_400.0 {
                bail!("--topics / --rate must stay under 12 hours of subscribes");
            }
            let duration = Duration::from_secs_f64(secs);
            let subscribers = a.topics.div_ceil(a.per_connection);
            Plan {
                duration,
                subscribe: Some(schedule),
                ..plain(
                    a.topics,
                    subscribers,
                    Layout::Dealt,
                    a.rate,
                    a.payload_bytes,
                )
            }
        }
        Cmd::Merge(_) | Cmd::Compare(_) => unreachable!("handled above"),
    };
    Ok((plan, common))
}

fn check_load(subscribers: usize, topics: usize, rate: f64) -> anyhow::Result<()> {
    if topics == 0 {
        bail!("--topics (or --rooms) must be at least 1");
    }
    if subscribers == 0 {
        bail!("there must be at least one subscriber");
    }
    if !(rate >= 0.0 && rate.is_finite()) {
        bail!("--rate must be a non-negative number");
    }
    Ok(())
}

fn settings(
    plan: &Plan,
    c: &Common,
    cmd: &Cmd,
    slot: Slot,
    run_id: &str,
    tls: Arc<TlsClient>,
) -> Settings {
    let connect_rate = match cmd {
        Cmd::Connect(a) => a.rate,
        _ => c.connect_rate,
    };
    let mut settings = Settings {
        target: c.target.clone(),
        publish_target: c.publish_target.clone().unwrap_or_else(|| c.target.clone()),
        credential: c.token.clone(),
        tls,
        system: c.system,
        transport: c.transport,
        slot,
        run_id: run_id.to_owned(),
        connect_rate,
        ramp_timeout: c.ramp_timeout,
        drain_timeout: c.drain_timeout,
        max_inflight: c.max_inflight,
        ordered: c.ordered,
        publish_via: c.publish_via,
        publish_timeout: c.publish_timeout,
        longpoll_wait: c.longpoll_wait,
        spread: !c.no_source_spread,
        config: json!({
            "subscribers": plan.subscribers,
            "topics": plan.topics.len(),
            "layout": format!("{:?}", plan.layout).split(" {").next().unwrap_or_default(),
            "rate": plan.rate,
            "duration_s": plan.duration.as_secs_f64(),
            "payload_bytes": plan.payload_bytes,
            "connect_rate": connect_rate,
            "max_inflight": c.max_inflight,
            "workers": c.workers,
            "shards": c.shard.map(|s| s.count).unwrap_or(1),
            "churn_lifetime_s": plan.churn.map(|x| x.lifetime.as_secs_f64()),
            "restart_cmd": plan.restart.as_ref().map(|r| r.command.clone()),
        }),
    };
    // Options older reports lack are echoed only when used, so a baseline taken before
    // them still compares without an options warning.
    let extra = [
        ("publish_target", c.publish_target.clone().map(Value::from)),
        ("topic_owner", c.topic_owner.clone().map(Value::from)),
        (
            "subscribe_rate",
            plan.subscribe.map(|s| Value::from(s.rate)),
        ),
        ("ordered", c.ordered.then_some(Value::from(true))),
        (
            "publish_via",
            (c.publish_via != PublishVia::Http).then(|| Value::from(c.publish_via.to_string())),
        ),
        (
            "tls",
            ["https://", "wss://"]
                .iter()
                .any(|s| c.target.starts_with(s))
                .then_some(Value::from(true)),
        ),
        (
            "system",
            (c.system != System::Weft).then(|| Value::from(c.system.to_string())),
        ),
    ];
    if let Value::Object(map) = &mut settings.config {
        for (k, v) in extra {
            if let Some(v) = v {
                map.insert(k.into(), v);
            }
        }
    }
    settings
}

fn read_report(path: &Path) -> anyhow::Result<Report> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a weft-loadtest JSON report", path.display()))
}

/// Prints and writes the outputs; returns the exit code. The SLO verdicts go into
/// the JSON and HTML reports too; the paths written are printed last.
pub fn finish(report: &Report, out: &Outputs) -> anyhow::Result<u8> {
    let mut report = report.clone();
    report.derive_target();
    let mut code = 0;
    if let Some(spec) = &out.slo {
        report.slo = slo::check(&spec.0, &report)
            .into_iter()
            .map(|v| SloResult {
                objective: v.clause,
                actual: v.actual,
                ok: v.ok,
            })
            .collect();
        if report.slo.iter().any(|v| !v.ok) {
            code = EXIT_SLO;
        }
    }
    print!("{}", report.table());
    let mut wrote = Vec::new();
    if let Some(path) = &out.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        wrote.push(("JSON", path));
    }
    if let Some(path) = &out.html {
        std::fs::write(path, html::render(&report))
            .with_context(|| format!("writing {}", path.display()))?;
        wrote.push(("HTML", path));
    }
    if let Some(path) = &out.baseline {
        let base = read_report(path)?;
        let cmp = baseline::compare(&base, &report, out.baseline_threshold);
        print!("{}", cmp.table());
        if cmp.regressed() && code == 0 {
            code = EXIT_BASELINE;
        }
    }
    if !report.slo.is_empty() {
        println!("SLO:");
        for v in &report.slo {
            println!(
                "  {} {} (actual {})",
                if v.ok { "PASS" } else { "FAIL" },
                v.objective,
                v.actual
            );
        }
    }
    for (what, path) in wrote {
        println!("{what} report: {}", path.display());
    }
    Ok(code)
}
