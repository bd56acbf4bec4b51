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

use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
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
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
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
    mut conductor: Conductor,
    limits: PhaseLimits,
) -> anyhow::Result<Report> {
    let exe = std::env::current_exe().context("cannot find this executable to start workers")?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let (tx, rx) = mpsc::channel(4096);
    let mut children = Vec::with_capacity(count);
    let mut stdins = Vec::with_capacity(count);
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
        stdins.push(child.stdin.take().expect("piped"));
        children.push(child);
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
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
    let mut ws = Workers {
        children,
        stdins,
        rx,
        stats: vec![StatsSnapshot::default(); count],
        window: new_hist(SIGFIG),
        reports: vec![None; count],
        epoch_ends: EpochEnds::new(),
        last_show: Instant::now(),
    };

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
    /// Handles messages until every worker has sent one matching `until`.
    async fn wait(
        &mut self,
        conductor: &Conductor,
        phase: &str,
        limit: Duration,
        until: impl Fn(&WorkerMsg) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        let mut done = vec![false; self.children.len()];
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
                        _ => {}
                    }
                    if matched {
                        done[w] = true;
                    }
                }
                Some(Event::Gone(w, why)) => {
                    if self.reports[w].is_none() {
                        let status = self.children[w].try_wait().ok().flatten();
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
        for (w, stdin) in self.stdins.iter_mut().enumerate() {
            stdin
                .write_all(line.as_bytes())
                .await
                .with_context(|| format!("telling worker {w} to proceed"))?;
            stdin.flush().await?;
        }
        Ok(())
    }
}
