//! Barriers between the phases of a run, and the conductor that owns what happens once
//! per run rather than once per process.
//!
//! ```text
//!  ramp (connect subscribers) ─► ready ─► go(start_us) ─► load (publish) ─► loaded
//!      ─► drain (finals, catch up) ─► report
//! ```
//!
//! A process runs as [`Role::Local`] (alone, or one shard of many pods) or as
//! [`Role::Worker`] of a parent process (`--workers N`) or of a coordinator on the
//! network (`--coordinator HOST:PORT`, one pod of a distributed run). Alone, its own
//! [`Conductor`] decides the start time, samples the target, runs `--restart-cmd` and
//! shows progress. As a worker it tells its parent when it is ready and loaded (one
//! JSON line each, [`WorkerMsg`]: on stdout, or on the TCP connection after a
//! `hello` naming its slot and run id) and waits for the parent's `go` and `drain`
//! ([`ParentMsg`], on stdin or the connection); the parent's conductor does the rest
//! for all workers.

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader, Lines};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::hist;
use crate::plan::Restart;
use crate::progress::Progress;
use crate::publisher::EpochEnds;
use crate::report::{Report, RestartOutcome};
use crate::stamp::now_us;
use crate::stats::StatsSnapshot;
use crate::target::Sampler;

/// Lead time between the decision to start and the start, so every worker is waiting
/// for it.
const START_LEAD: Duration = Duration::from_millis(100);

/// Worker → parent, one JSON object per stdout line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerMsg {
    /// A remote worker's first line: which slot of which run it runs.
    Hello {
        slot: String,
        run_id: String,
    },
    Ready {
        subscribed: u64,
    },
    Progress {
        stats: StatsSnapshot,
        window: String,
    },
    /// Publishing is over; how far each (topic, epoch) got, as this worker saw it.
    Loaded {
        epoch_ends: Vec<EpochEnd>,
    },
    Report(Box<Report>),
    /// The worker cannot run its slot (e.g. the target's TLS certificate is not
    /// trusted): why, so the parent's error says it rather than "closed its output".
    Failed {
        error: String,
    },
}

/// Parent → worker, one JSON object per stdin line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParentMsg {
    Go {
        start_us: u64,
    },
    /// Start draining; the epoch ends merged over every worker.
    Drain {
        epoch_ends: Vec<EpochEnd>,
    },
}

/// The last acknowledged offset of one (topic, epoch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochEnd {
    pub topic: usize,
    pub epoch: String,
    pub offset: u64,
}

pub fn to_list(ends: &EpochEnds) -> Vec<EpochEnd> {
    ends.iter()
        .map(|((topic, epoch), &offset)| EpochEnd {
            topic: *topic,
            epoch: epoch.clone(),
            offset,
        })
        .collect()
}

/// Adds `list` into `ends`, keeping the highest offset of each (topic, epoch).
pub fn merge_into(ends: &mut EpochEnds, list: &[EpochEnd]) {
    for e in list {
        let v = ends.entry((e.topic, e.epoch.clone())).or_insert(0);
        *v = (*v).max(e.offset);
    }
}

/// The tokio instant matching a wall-clock time (µs since the Unix epoch).
pub fn instant_at(us: u64) -> Instant {
    let now = now_us();
    if us >= now {
        Instant::now() + Duration::from_micros(us - now)
    } else {
        Instant::now()
            .checked_sub(Duration::from_micros(now - us))
            .unwrap_or_else(Instant::now)
    }
}

/// Once-per-run duties: start time, target sampling, restart command, progress display.
pub struct Conductor {
    sampler: Option<Arc<Mutex<Sampler>>>,
    restart: Option<Restart>,
    restart_task: Option<JoinHandle<RestartOutcome>>,
    restart_outcome: Option<RestartOutcome>,
    progress: Arc<Mutex<Progress>>,
    /// Pause after the load before the finals are read (shards on other machines may
    /// still be publishing).
    settle: Duration,
}

impl Conductor {
    /// Takes the target's baseline sample now, before any connection is opened.
    pub fn new(
        target_pid: Option<u32>,
        restart: Option<Restart>,
        progress: Progress,
        settle: Duration,
    ) -> anyhow::Result<Self> {
        let sampler = match target_pid {
            Some(pid) => Some(Arc::new(Mutex::new(Sampler::new(pid)?))),
            None => None,
        };
        Ok(Self {
            sampler,
            restart,
            restart_task: None,
            restart_outcome: None,
            progress: Arc::new(Mutex::new(progress)),
            settle,
        })
    }

    /// Decides the start of the load: µs since the Unix epoch, a little ahead.
    pub fn go(&mut self) -> u64 {
        let start_us = now_us() + START_LEAD.as_micros() as u64;
        if let Some(s) = &self.sampler {
            s.lock().unwrap_or_else(|p| p.into_inner()).load_started();
        }
        if let Some(r) = self.restart.clone() {
            self.restart_task = Some(tokio::spawn(run_restart(r, instant_at(start_us))));
        }
        start_us
    }

    /// The load is over (connections still open): waits for the restart command,
    /// samples the target, lets stragglers settle.
    pub async fn loaded(&mut self) {
        if let Some(task) = self.restart_task.take() {
            self.restart_outcome = task.await.ok();
        }
        if let Some(s) = &self.sampler {
            s.lock().unwrap_or_else(|p| p.into_inner()).load_ended();
        }
        tokio::time::sleep(self.settle).await;
    }

    /// Shows a progress update (and samples the target's RSS for its timeline).
    pub fn show(&self, phase: &str, stats: &StatsSnapshot, window: &Histogram<u64>) {
        if let Some(s) = &self.sampler {
            s.lock().unwrap_or_else(|p| p.into_inner()).tick();
        }
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .update(phase, stats, window);
    }

    /// Adds the target figures and the restart outcome to the final report.
    pub async fn finish(mut self, report: &mut Report) {
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .finish();
        if let Some(s) = self.sampler.take() {
            let mut sampler = s.lock().unwrap_or_else(|p| p.into_inner());
            // Per-connection memory means something only when connections are all that
            // changed; under publishing load, history and queues dominate.
            let open = if report.scenario == "connect" {
                report.connections_open
            } else {
                0
            };
            report.target = Some(sampler.finish(open));
        }
        if let Some(task) = self.restart_task.take() {
            self.restart_outcome = task.await.ok();
        }
        if let Some(outcome) = self.restart_outcome.take() {
            report.restart = Some(outcome);
        }
    }
}

/// Runs `sh -c COMMAND` at `start + after`, its output going to stderr; killed after
/// the timeout.
pub async fn run_restart(r: Restart, start: Instant) -> RestartOutcome {
    tokio::time::sleep_until(start + r.after).await;
    let began = Instant::now();
    let mut out = RestartOutcome {
        command: r.command.clone(),
        started_after_s: began.duration_since(start).as_secs_f64(),
        ..Default::default()
    };
    let stdout = std::io::stderr().lock().flush().ok().and_then(|_| {
        std::os::fd::AsFd::as_fd(&std::io::stderr())
            .try_clone_to_owned()
            .ok()
    });
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(&r.command)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(fd) = stdout {
        cmd.stdout(std::process::Stdio::from(fd));
    }
    match cmd.spawn() {
        Ok(mut child) => match tokio::time::timeout(r.timeout, child.wait()).await {
            Ok(Ok(status)) => out.exit_code = status.code(),
            Ok(Err(e)) => eprintln!("weft-loadtest: waiting for --restart-cmd: {e}"),
            Err(_) => {
                out.timed_out = true;
                let _ = child.kill().await;
            }
        },
        Err(e) => eprintln!("weft-loadtest: cannot start --restart-cmd: {e}"),
    }
    out.duration_s = began.elapsed().as_secs_f64();
    out
}

/// A worker's side of the line protocol.
pub struct WorkerLink {
    lines: Lines<BufReader<Box<dyn AsyncRead + Unpin + Send>>>,
    out: Out,
    /// The task writing `out`'s lines to the coordinator's connection.
    writer: Option<JoinHandle<()>>,
}

/// Where a worker's lines go: its stdout (a child of `--workers`), or the task that
/// writes them to the coordinator's TCP connection (`--coordinator`). That channel is
/// unbounded, but a worker sends one progress line a second and four more per run.
#[derive(Clone)]
pub enum Out {
    Stdout(Arc<Mutex<std::io::Stdout>>),
    Connection(tokio::sync::mpsc::UnboundedSender<String>),
}

impl Default for WorkerLink {
    fn default() -> Self {
        Self::new()
    }
}

/// How long a remote worker keeps trying to reach its coordinator (pods start in any
/// order).
pub const COORDINATOR_CONNECT: Duration = Duration::from_secs(180);

impl WorkerLink {
    /// The link to the parent process, over stdin and stdout.
    pub fn new() -> Self {
        Self {
            lines:
                BufReader::new(Box::new(tokio::io::stdin()) as Box<dyn AsyncRead + Unpin + Send>)
                    .lines(),
            out: Out::Stdout(Arc::new(Mutex::new(std::io::stdout()))),
            writer: None,
        }
    }

    /// The link to a coordinator at `addr` (retried for [`COORDINATOR_CONNECT`]),
    /// announced with this worker's slot and run id.
    pub async fn connect(addr: &str, slot: &str, run_id: &str) -> anyhow::Result<Self> {
        let deadline = Instant::now() + COORDINATOR_CONNECT;
        let stream = loop {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => anyhow::bail!("cannot reach the coordinator {addr}: {e}"),
            }
        };
        let _ = stream.set_nodelay(true);
        let (read, mut write) = stream.into_split();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Some(line) = rx.recv().await {
                if write.write_all(line.as_bytes()).await.is_err() {
                    return;
                }
            }
            let _ = write.shutdown().await;
        });
        let link = Self {
            lines: BufReader::new(Box::new(read) as Box<dyn AsyncRead + Unpin + Send>).lines(),
            out: Out::Connection(tx),
            writer: Some(writer),
        };
        link.send(&WorkerMsg::Hello {
            slot: slot.to_owned(),
            run_id: run_id.to_owned(),
        });
        Ok(link)
    }

    pub fn send(&self, msg: &WorkerMsg) {
        send_line(&self.out, msg);
    }

    /// Sends `report` and waits until it has left (the process exits next).
    pub async fn finish(self, report: Report) {
        self.send(&WorkerMsg::Report(Box::new(report)));
        self.close().await;
    }

    /// Tells the parent why this worker cannot go on, and waits until that has left.
    pub async fn fail(self, error: &anyhow::Error) {
        self.send(&WorkerMsg::Failed {
            error: format!("{error:#}"),
        });
        self.close().await;
    }

    async fn close(mut self) {
        let Some(writer) = self.writer.take() else {
            return;
        };
        // Closing the channel ends the writer once it has written every line.
        drop(self.out);
        let _ = tokio::time::timeout(Duration::from_secs(30), writer).await;
    }

    async fn recv(&mut self) -> anyhow::Result<ParentMsg> {
        let line = self
            .lines
            .next_line()
            .await?
            .ok_or_else(|| anyhow::anyhow!("the parent process went away"))?;
        serde_json::from_str(&line)
            .map_err(|e| anyhow::anyhow!("bad message from the parent: {e}: {line}"))
    }
}

fn send_line(out: &Out, msg: &WorkerMsg) {
    let line = serde_json::to_string(msg).expect("worker messages serialise");
    match out {
        Out::Stdout(o) => {
            let mut o = o.lock().unwrap_or_else(|p| p.into_inner());
            // A closed stdout means the parent is gone; the next barrier notices.
            let _ = writeln!(o, "{line}");
            let _ = o.flush();
        }
        // A closed connection: the next barrier notices too.
        Out::Connection(tx) => {
            let _ = tx.send(line + "\n");
        }
    }
}

/// How one process takes part in a run.
pub enum Role {
    Local(Conductor),
    Worker(WorkerLink),
}

/// Where a process's progress updates go.
#[derive(Clone)]
pub enum ProgressSink {
    Local(Arc<Mutex<Progress>>, Option<Arc<Mutex<Sampler>>>),
    Parent(Out),
}

impl ProgressSink {
    pub fn update(&self, phase: &str, stats: &StatsSnapshot, window: &Histogram<u64>) {
        match self {
            ProgressSink::Local(p, sampler) => {
                if let Some(s) = sampler {
                    s.lock().unwrap_or_else(|p| p.into_inner()).tick();
                }
                p.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .update(phase, stats, window);
            }
            ProgressSink::Parent(out) => send_line(
                out,
                &WorkerMsg::Progress {
                    stats: *stats,
                    window: hist::encode(window),
                },
            ),
        }
    }
}

impl Role {
    pub fn sink(&self) -> ProgressSink {
        match self {
            Role::Local(c) => ProgressSink::Local(c.progress.clone(), c.sampler.clone()),
            Role::Worker(w) => ProgressSink::Parent(w.out.clone()),
        }
    }

    /// The ramp is done: returns the start of the load (µs since the Unix epoch).
    pub async fn ready(&mut self, subscribed: u64) -> anyhow::Result<u64> {
        match self {
            Role::Local(c) => Ok(c.go()),
            Role::Worker(w) => {
                w.send(&WorkerMsg::Ready { subscribed });
                match w.recv().await? {
                    ParentMsg::Go { start_us } => Ok(start_us),
                    other => anyhow::bail!("expected `go` from the parent, got {other:?}"),
                }
            }
        }
    }

    /// The load is over; returns when the drain may begin, with the epoch ends of the
    /// whole run (a worker's own merged with its siblings').
    pub async fn loaded(&mut self, ends: EpochEnds) -> anyhow::Result<EpochEnds> {
        match self {
            Role::Local(c) => {
                c.loaded().await;
                Ok(ends)
            }
            Role::Worker(w) => {
                w.send(&WorkerMsg::Loaded {
                    epoch_ends: to_list(&ends),
                });
                match w.recv().await? {
                    ParentMsg::Drain { epoch_ends } => {
                        let mut all = ends;
                        merge_into(&mut all, &epoch_ends);
                        Ok(all)
                    }
                    other => anyhow::bail!("expected `drain` from the parent, got {other:?}"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_line_each() {
        let m = WorkerMsg::Report(Box::default());
        let line = serde_json::to_string(&m).unwrap();
        assert!(!line.contains('\n'));
        assert!(matches!(
            serde_json::from_str::<WorkerMsg>(&line).unwrap(),
            WorkerMsg::Report(_)
        ));
        let go = serde_json::to_string(&ParentMsg::Go { start_us: 5 }).unwrap();
        assert_eq!(go, r#"{"go":{"start_us":5}}"#);
        let drain = ParentMsg::Drain {
            epoch_ends: vec![EpochEnd {
                topic: 1,
                epoch: "e".into(),
                offset: 9,
            }],
        };
        let back: ParentMsg =
            serde_json::from_str(&serde_json::to_string(&drain).unwrap()).unwrap();
        let ParentMsg::Drain { epoch_ends } = back else {
            panic!("not drain")
        };
        let mut ends = EpochEnds::new();
        merge_into(&mut ends, &epoch_ends);
        let older = EpochEnd {
            topic: 1,
            epoch: "e".into(),
            offset: 4,
        };
        merge_into(&mut ends, &[older]);
        assert_eq!(ends[&(1, "e".to_string())], 9);
        assert_eq!(to_list(&ends), epoch_ends);
    }

    #[tokio::test]
    async fn restart_command_is_run_and_timed() {
        let r = Restart {
            command: "exit 7".into(),
            after: Duration::from_millis(20),
            timeout: Duration::from_secs(5),
        };
        let out = run_restart(r, Instant::now()).await;
        assert_eq!(out.exit_code, Some(7));
        assert!(out.started_after_s >= 0.019, "{out:?}");
        let r = Restart {
            command: "sleep 5".into(),
            after: Duration::ZERO,
            timeout: Duration::from_millis(100),
        };
        let out = run_restart(r, Instant::now()).await;
        assert!(out.timed_out);
        assert!(out.duration_s < 2.0);
    }

    #[test]
    fn instants_follow_the_wall_clock() {
        let now = now_us();
        let later = instant_at(now + 200_000);
        let d = later.duration_since(Instant::now());
        assert!(
            d > Duration::from_millis(150) && d <= Duration::from_millis(200),
            "{d:?}"
        );
        let _ = instant_at(0); // far past: clamps without panicking
    }
}
