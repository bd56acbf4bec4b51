//! `--workers N`: the parent re-executes itself as N worker processes, each running one
//! slot of the run (`WEFT_LOADTEST_WORKER_SLOT=i/n`, the same `WEFT_LOADTEST_RUN_ID`,
//! the same arguments), so no process holds more than its share of the sockets.
//!
//! The parent drives the barriers of [`crate::coord`] for all of them: it waits for every
//! `ready`, decides the start and sends `go`, waits for every `loaded`, samples the target
//! and runs the restart command through its conductor, sends `drain`, and merges the
//! partial reports. It shows one progress line summed over the workers. A worker that
//! dies, or a phase that overruns its time limit, fails the run (the other workers are
//! killed when their handles drop).
//!
//! `--coordinate ADDR --workers N` is the same parent for workers that are separate
//! processes elsewhere (pods of a distributed run): it listens on `ADDR` and takes N
//! connections from `weft-loadtest … --coordinator ADDR --worker-slot i/N`, each
//! opening with a `hello` that names its slot and run id (every slot of the run once,
//! the coordinator's run id), then drives the same barriers over the connections. The
//! merged report, and so the `--slo` gate, is the whole run's.

use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::AsyncWrite;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Child;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::coord::{merge_into, to_list, Conductor, ParentMsg, WorkerMsg};
use crate::hist::{self, new_hist, SIGFIG};
use crate::plan::Slot;
use crate::publisher::EpochEnds;
use crate::report::Report;
use crate::stats::StatsSnapshot;

pub const ENV_RUN_ID: &str = "WEFT_LOADTEST_RUN_ID";
pub const ENV_WORKER_SLOT: &str = "WEFT_LOADTEST_WORKER_SLOT";

/// Time limits of the three phases the parent waits through.
#[derive(Debug, Clone, Copy)]
pub struct PhaseLimits {
    pub ramp: Duration,
    pub load: Duration,
    pub drain: Duration,
}

enum Event {
    Msg(usize, WorkerMsg),
    Gone(usize, String),
}

struct Workers {
    /// Local worker processes (none for remote workers).
    children: Vec<Child>,
    /// Where each worker reads the parent's messages: a child's stdin, or a remote
    /// worker's connection.
    inputs: Vec<Box<dyn AsyncWrite + Unpin + Send>>,
    rx: mpsc::Receiver<Event>,
    stats: Vec<StatsSnapshot>,
    window: hdrhistogram::Histogram<u64>,
    reports: Vec<Option<Report>>,
    epoch_ends: EpochEnds,
    last_show: Instant,
}

/// Runs the plan as `count` workers within `root`, returning the merged report.
pub async fn run(
    count: usize,
    root: Slot,
    run_id: &str,
    conductor: Conductor,
    limits: PhaseLimits,
) -> anyhow::Result<Report> {
    let exe = std::env::current_exe().context("cannot find this executable to start workers")?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let (tx, rx) = mpsc::channel(4096);
    let mut children = Vec::with_capacity(count);
    let mut inputs = Vec::with_capacity(count);
    for w in 0..count {
        let mut child = tokio::process::Command::new(&exe)
            .args(&args)
            .env(ENV_RUN_ID, run_id)
            .env(ENV_WORKER_SLOT, root.split(w, count).to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting worker {w}"))?;
        let stdout = child.stdout.take().expect("piped");
        inputs.push(
            Box::new(child.stdin.take().expect("piped")) as Box<dyn AsyncWrite + Unpin + Send>
        );
        children.push(child);
        read_worker(w, BufReader::new(stdout).lines(), tx.clone());
    }
    drive(Workers::new(children, inputs, rx), conductor, limits).await
}

/// Coordinates `count` remote workers of the run `run_id` that connect to `listener`
/// (within [`crate::coord::COORDINATOR_CONNECT`]), each in its own slot of `root`;
/// returns the merged report.
pub async fn run_remote(
    listener: tokio::net::TcpListener,
    count: usize,
    root: Slot,
    run_id: &str,
    conductor: Conductor,
    limits: PhaseLimits,
) -> anyhow::Result<Report> {
    let (tx, rx) = mpsc::channel(4096);
    let mut inputs: Vec<Option<Box<dyn AsyncWrite + Unpin + Send>>> =
        (0..count).map(|_| None).collect();
    let expected: Vec<String> = (0..count)
        .map(|w| root.split(w, count).to_string())
        .collect();
    // Pods start in any order and may wait for a node and an image: as long as the
    // workers keep trying to reach the coordinator.
    let connect_within = crate::coord::COORDINATOR_CONNECT;
    let deadline = Instant::now() + connect_within;
    while inputs.iter().any(Option::is_none) {
        let missing: Vec<&String> = expected
            .iter()
            .zip(&inputs)
            .filter(|(_, i)| i.is_none())
            .map(|(s, _)| s)
            .collect();
        let (stream, peer) = tokio::time::timeout_at(deadline, listener.accept())
            .await
            .map_err(|_| {
                anyhow::anyhow!("workers {missing:?} did not connect within {connect_within:?}")
            })?
            .context("accepting a worker")?;
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let hello = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .map_err(|_| anyhow::anyhow!("{peer} sent no hello"))??;
        let Some(WorkerMsg::Hello {
            slot,
            run_id: theirs,
        }) = hello.as_deref().and_then(|l| serde_json::from_str(l).ok())
        else {
            bail!("{peer} did not open with a hello: {hello:?}");
        };
        if theirs != run_id {
            bail!("{peer} runs {theirs}, this coordinator runs {run_id}: check --run-id");
        }
        let Some(w) = expected.iter().position(|s| *s == slot) else {
            bail!("{peer} runs slot {slot}; this run's slots are {expected:?}");
        };
        if inputs[w].is_some() {
            bail!("two workers run slot {slot} (the second from {peer})");
        }
        inputs[w] = Some(Box::new(write));
        read_worker(w, lines, tx.clone());
    }
    drop(tx);
    let inputs = inputs.into_iter().flatten().collect();
    drive(Workers::new(Vec::new(), inputs, rx), conductor, limits).await
}

/// Forwards worker `w`'s lines to the parent as events, until they end.
fn read_worker<R>(w: usize, mut lines: tokio::io::Lines<R>, tx: mpsc::Sender<Event>)
where
    R: tokio::io::AsyncBufRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            match lines.next_line().await {
                Ok(Some(line)) => match serde_json::from_str::<WorkerMsg>(&line) {
                    Ok(m) => {
                        if tx.send(Event::Msg(w, m)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx
                            .send(Event::Gone(w, format!("sent an unreadable line ({e})")))
                            .await;
                        return;
                    }
                },
                Ok(None) => {
                    let _ = tx.send(Event::Gone(w, "closed its output".into())).await;
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Event::Gone(w, format!("output failed: {e}"))).await;
                    return;
                }
            }
        }
    });
}

/// The barriers of a run, for every worker; the merged report.
async fn drive(
    mut ws: Workers,
    mut conductor: Conductor,
    limits: PhaseLimits,
) -> anyhow::Result<Report> {
    ws.wait(&conductor, "ramp", limits.ramp, |m| {
        matches!(m, WorkerMsg::Ready { .. })
    })
    .await?;
    let start_us = conductor.go();
    ws.broadcast(&ParentMsg::Go { start_us }).await?;
    ws.wait(&conductor, "load", limits.load, |m| {
        matches!(m, WorkerMsg::Loaded { .. })
    })
    .await?;
    conductor.loaded().await;
    let epoch_ends = to_list(&ws.epoch_ends);
    ws.broadcast(&ParentMsg::Drain { epoch_ends }).await?;
    ws.wait(&conductor, "drain", limits.drain, |m| {
        matches!(m, WorkerMsg::Report(_))
    })
    .await?;

    let mut merged = Report::default();
    for r in ws.reports.iter().flatten() {
        merged.merge(r)?;
    }
    merged.finalize()?;
    for c in &mut ws.children {
        let _ = tokio::time::timeout(Duration::from_secs(5), c.wait()).await;
    }
    conductor.finish(&mut merged).await;
    Ok(merged)
}

impl Workers {
    /// One worker per input, none heard from yet.
    fn new(
        children: Vec<Child>,
        inputs: Vec<Box<dyn AsyncWrite + Unpin + Send>>,
        rx: mpsc::Receiver<Event>,
    ) -> Self {
        let count = inputs.len();
        Self {
            children,
            inputs,
            rx,
            stats: vec![StatsSnapshot::default(); count],
            window: new_hist(SIGFIG),
            reports: vec![None; count],
            epoch_ends: EpochEnds::new(),
            last_show: Instant::now(),
        }
    }

    /// Handles messages until every worker has sent one matching `until`.
    async fn wait(
        &mut self,
        conductor: &Conductor,
        phase: &str,
        limit: Duration,
        until: impl Fn(&WorkerMsg) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        let mut done = vec![false; self.inputs.len()];
        while done.iter().any(|d| !d) {
            let ev = tokio::select! {
                ev = self.rx.recv() => ev,
                _ = tokio::time::sleep_until(deadline) => {
                    let missing: Vec<usize> = (0..done.len()).filter(|&w| !done[w]).collect();
                    bail!("workers {missing:?} did not finish the {phase} phase within {limit:?}");
                }
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    self.show(conductor, phase);
                    continue;
                }
            };
            match ev {
                Some(Event::Msg(w, m)) => {
                    let matched = until(&m);
                    match m {
                        WorkerMsg::Progress { stats, window } => {
                            self.stats[w] = stats;
                            if let Ok(h) = hist::decode(&window) {
                                self.window.add(h).ok();
                            }
                        }
                        WorkerMsg::Report(r) => self.reports[w] = Some(*r),
                        WorkerMsg::Loaded { epoch_ends } => {
                            merge_into(&mut self.epoch_ends, &epoch_ends)
                        }
                        WorkerMsg::Failed { error } => bail!("worker {w} failed: {error}"),
                        _ => {}
                    }
                    if matched {
                        done[w] = true;
                    }
                }
                Some(Event::Gone(w, why)) => {
                    if self.reports[w].is_none() {
                        let status = self
                            .children
                            .get_mut(w)
                            .and_then(|c| c.try_wait().ok().flatten());
                        bail!(
                            "worker {w} {why}{}",
                            status.map(|s| format!(" ({s})")).unwrap_or_default()
                        );
                    }
                }
                None => bail!("every worker went away"),
            }
            if self.last_show.elapsed() >= Duration::from_secs(1) {
                self.show(conductor, phase);
            }
        }
        Ok(())
    }

    fn show(&mut self, conductor: &Conductor, phase: &str) {
        let mut sum = StatsSnapshot::default();
        for s in &self.stats {
            sum.add(s);
        }
        conductor.show(phase, &sum, &self.window);
        self.window.reset();
        self.last_show = Instant::now();
    }

    async fn broadcast(&mut self, msg: &ParentMsg) -> anyhow::Result<()> {
        let mut line = serde_json::to_string(msg)?;
        line.push('\n');
        for (w, input) in self.inputs.iter_mut().enumerate() {
            input
                .write_all(line.as_bytes())
                .await
                .with_context(|| format!("telling worker {w} to proceed"))?;
            input.flush().await?;
        }
        Ok(())
    }
}
