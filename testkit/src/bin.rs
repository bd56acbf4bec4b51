//! Real binaries as the tests start them: found next to the test that runs them (and
//! built once with the cargo that built the test when they are not there), started with
//! no `WEFT_*` variable inherited from the test's environment, read through the ready
//! file they write once bound, logging to files that are printed only when the test
//! fails, and killed by their own PID when dropped. A test never kills by name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A process's ready file must appear within this.
pub const START_WITHIN: Duration = Duration::from_secs(15);
/// Lines of each log printed when a test fails.
const LOG_TAIL_LINES: usize = 400;

/// The workspace binary `name` (`weft-node`, `weft-router`, `weft-loadtest`) in the
/// profile directory this test was built into (`<target>/<profile>`; a test runs from
/// `<target>/<profile>/deps`), which is where cargo puts the binaries of the package
/// under test. When it is not there (only another package's targets were built), it is
/// built there once with the cargo that built this kit.
pub fn path(name: &str) -> PathBuf {
    static BINS: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let mut bins = BINS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(bin) = bins.get(name) {
        return bin.clone();
    }
    let dir = profile_dir();
    let bin = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !bin.exists() {
        build(name, &dir);
    }
    assert!(
        bin.exists(),
        "{} is missing after building {name}",
        bin.display()
    );
    bins.insert(name.to_owned(), bin.clone());
    bin
}

/// `<target>/<profile>`: the directory of the running test, or its parent when that is
/// cargo's `deps`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    let dir = exe.parent().expect("the test sits in a directory");
    match dir.file_name().and_then(|n| n.to_str()) {
        Some("deps") => dir.parent().expect("deps sits in a profile directory"),
        _ => dir,
    }
    .to_path_buf()
}

/// `cargo build -p <name> --bin <name>` into the profile directory `dir`
/// (`<target>/debug`, `<target>/release` or `<target>/<profile>`).
fn build(name: &str, dir: &Path) {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "-p", name, "--bin", name])
        .stdin(Stdio::null());
    match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(profile) => {
            cmd.args(["--profile", profile]);
        }
    }
    if let Some(target_dir) = dir.parent() {
        cmd.arg("--target-dir").arg(target_dir);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("run cargo to build {name}: {e}"));
    assert!(
        out.status.success(),
        "building {name} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An external tool (helm, promtool, …): its path from `$<env>` or `PATH`; `None`
/// (after a loud note) when it is not installed and `CI` is not set. Panics in CI:
/// there a missing tool is a broken setup.
pub fn tool(name: &str, env: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        if std::env::var_os("CI").is_some() {
            panic!("{name} is not installed (set {env} or put it on PATH; .ci/run installs it)");
        }
        eprintln!(
            "\n!!!!!!!! SKIPPED: {name} is not installed, so this check did not run.\n\
             !!!!!!!! Install it as .ci/run does (or set {env}); in CI this is a failure.\n"
        );
    }
    found
}

/// A command for `bin` with no `WEFT_*` variable inherited from the test's environment
/// and stdin closed.
pub fn command(bin: impl AsRef<Path>) -> Command {
    let mut cmd = Command::new(bin.as_ref());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("WEFT_") {
            cmd.env_remove(k);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// An address on `ip` that was free a moment ago (routers need their peers' addresses
/// before they start, so they cannot bind port 0).
pub fn free_addr(ip: &str) -> String {
    free_addrs(ip, 1).remove(0)
}

/// `n` distinct addresses on `ip` that were free a moment ago. All are held bound
/// until every one is picked: picked one at a time, the kernel may hand the same
/// port out twice (a router then refused `raft_listen` equal to `listen`).
pub fn free_addrs(ip: &str, n: usize) -> Vec<String> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind(format!("{ip}:0")).expect("bind a free port"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("bound address").to_string())
        .collect()
}

/// `path` opened for appending (a restarted process continues its log).
pub fn log_file(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Asserts that a binary refused its configuration as the binaries do: exit code 64,
/// exactly one line on stderr, nothing on stdout. Returns that line.
pub fn usage_error(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(64), "exit status; stderr: {stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "stderr must be exactly one line: {stderr:?}"
    );
    assert!(
        stderr.ends_with('\n') && !stderr.trim().is_empty(),
        "{stderr:?}"
    );
    assert!(out.stdout.is_empty(), "nothing on stdout");
    stderr.trim_end().to_owned()
}

/// `weft-node` for a single-node process test: loopback listeners on ports the OS
/// picks, its data dir and ready file under `dir` (`data/`, `ready.json`). The test adds
/// its own flags and output, then waits with [`await_ready_file`] or [`wait_ready_file`].
pub fn loopback_node(dir: &Path) -> Command {
    let mut cmd = command(path("weft-node"));
    cmd.args([
        "--http-listen",
        "127.0.0.1:0",
        "--cluster-listen",
        "127.0.0.1:0",
    ])
    .arg("--data-dir")
    .arg(dir.join("data"))
    .arg("--ready-file")
    .arg(dir.join("ready.json"));
    cmd
}

/// One look at a starting process: its ready file parsed, or `None` to look again.
/// Panics if the process exited or the deadline passed.
fn ready_yet(child: &mut Child, path: &Path, what: &str, deadline: Instant) -> Option<Value> {
    if let Ok(text) = std::fs::read_to_string(path) {
        if let Ok(v) = serde_json::from_str::<Value>(&text) {
            return Some(v);
        }
    }
    if let Some(status) = child.try_wait().expect("poll the child") {
        panic!("{what} exited before it was ready: {status}");
    }
    assert!(
        Instant::now() < deadline,
        "{what} wrote no ready file within {START_WITHIN:?}"
    );
    None
}

/// Waits for a process's ready file and returns it parsed; panics if the process exits
/// first or the file never appears within [`START_WITHIN`].
pub async fn await_ready_file(child: &mut Child, path: &Path, what: &str) -> Value {
    let deadline = Instant::now() + START_WITHIN;
    loop {
        if let Some(v) = ready_yet(child, path, what, deadline) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`await_ready_file`] for a test without a runtime.
pub fn wait_ready_file(child: &mut Child, path: &Path, what: &str) -> Value {
    let deadline = Instant::now() + START_WITHIN;
    loop {
        if let Some(v) = ready_yet(child, path, what, deadline) {
            return v;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process, SIGKILLed by its own PID and reaped when dropped.
pub struct Proc(pub Child);

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Sends SIGTERM to this process (by its PID).
    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Sends SIGHUP to this process (by its PID): Weft binaries reload certificates.
    pub fn sighup(&self) {
        self.signal("HUP");
    }

    /// `kill -<sig> <pid>`.
    fn signal(&self, sig: &str) {
        let pid = self.pid();
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .stdin(Stdio::null())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} {pid}: {status}");
    }

    /// Its exit status if it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.0.try_wait().expect("poll the child")
    }

    /// Waits for it to exit on its own, for at most `within`; panics naming `what`
    /// if it is still up.
    pub async fn await_exit(&mut self, what: &str, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.try_exit() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{what} did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One temporary directory for a harness's processes (data dirs, ready files, logs),
/// shared by the parts of the harness. When the last handle drops it is removed — or,
/// when the test is failing, kept and every log registered with it printed (its last
/// lines). Drop it after the processes that write into it.
#[derive(Clone)]
pub struct Workdir(Arc<WorkdirInner>);

struct WorkdirInner {
    name: String,
    root: PathBuf,
    logs: Mutex<Vec<(String, PathBuf)>>,
}

impl Workdir {
    /// A fresh `<tmp>/weft-<kind>-<name>-<pid>` (an old one of that name is removed).
    pub fn new(kind: &str, name: &str) -> Self {
        let root = std::env::temp_dir().join(format!("weft-{kind}-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap_or_else(|e| panic!("create {}: {e}", root.display()));
        Self(Arc::new(WorkdirInner {
            name: name.into(),
            root,
            logs: Mutex::new(Vec::new()),
        }))
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }

    pub fn root(&self) -> &Path {
        &self.0.root
    }

    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.0.root.join(rel)
    }

    /// Writes `text` to `<root>/<file>` and returns its path (configuration files).
    pub fn write(&self, file: &str, text: &str) -> PathBuf {
        let path = self.join(file);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// `<root>/<file>`, registered as the log of `what` (printed if the test fails).
    pub fn log(&self, what: &str, file: &str) -> PathBuf {
        let path = self.join(file);
        let mut logs = self.0.logs.lock().unwrap_or_else(|p| p.into_inner());
        if !logs.iter().any(|(_, p)| *p == path) {
            logs.push((what.to_owned(), path.clone()));
        }
        path
    }
}

impl Drop for WorkdirInner {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.root);
            return;
        }
        let logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        for (what, path) in logs.iter() {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(LOG_TAIL_LINES);
            eprintln!(
                "===== cluster {}: {what} ({} lines, last {}) =====",
                self.name,
                lines.len(),
                lines.len() - from
            );
            for line in &lines[from..] {
                eprintln!("{line}");
            }
        }
        eprintln!(
            "===== cluster {}: files kept in {} =====",
            self.name,
            self.root.display()
        );
    }
}
