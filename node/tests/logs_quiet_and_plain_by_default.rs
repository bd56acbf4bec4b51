//! What an operator sees in the log of a fresh `weft-node` and `weft-router`, started
//! as a container runtime or a service manager starts them: stderr to a file (not a
//! terminal) and no `RUST_LOG` (the shared harnesses set one, so only this test
//! exercises the defaults; docs/observability.md "Logs"):
//!
//! - text logs hold no ANSI escape codes when stderr is not a terminal;
//! - `--log-format json` writes one JSON object per line, each with a level and target;
//! - the default filter is `info` with openraft at `warn`: the Raft election each
//!   binary goes through at startup writes no openraft line, and startup is a handful
//!   of lines, while `RUST_LOG=openraft=info` turns those lines on.
//!
//! Each run waits for the ready file, then [`SETTLE`] so the election and the node's
//! join have happened, reads the startup log, stops the process with SIGTERM and checks
//! the whole log.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_testkit::bin::{self, Proc, Workdir};

/// After the ready file, long enough for a one-member Raft group to elect itself and
/// for the node to join (both take well under a second on loopback).
const SETTLE: Duration = Duration::from_secs(2);
/// The most lines a quiet startup may write at the default filter.
const STARTUP_LINES: usize = 10;
const EXIT_WITHIN: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Binary {
    Node,
    Router,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Format {
    Text,
    Json,
}

/// One line of the log, as far as this test cares.
struct Line<'a> {
    level: String,
    /// Written by openraft: its target (JSON), or its target or spans (text).
    openraft: bool,
    text: &'a str,
}

#[test]
fn default_logs_are_plain_quiet_and_keep_openraft_at_warn() {
    let work = Workdir::new("logs", "defaults");
    for binary in [Binary::Node, Binary::Router] {
        for format in [Format::Text, Format::Json] {
            let (startup, all) = run(&work, binary, format, None);
            let what = format!("{binary:?} {format:?} (default filter)");
            check_plain(&what, &all);
            let lines = parse(&what, format, &all);
            let openraft: Vec<&str> = lines
                .iter()
                .filter(|l| l.openraft && l.level != "WARN" && l.level != "ERROR")
                .map(|l| l.text)
                .collect();
            assert!(
                openraft.is_empty(),
                "{what}: openraft below WARN without RUST_LOG:\n{}",
                openraft.join("\n")
            );
            let startup_lines = startup.lines().count();
            assert!(
                (1..=STARTUP_LINES).contains(&startup_lines),
                "{what}: startup wrote {startup_lines} lines (at most {STARTUP_LINES}):\n{startup}"
            );
            // Nothing below INFO either.
            let chatty: Vec<&str> = lines
                .iter()
                .filter(|l| l.level == "DEBUG" || l.level == "TRACE")
                .map(|l| l.text)
                .collect();
            assert!(
                chatty.is_empty(),
                "{what}: below INFO:\n{}",
                chatty.join("\n")
            );
        }
    }
}

#[test]
fn rust_log_openraft_info_turns_the_raft_lines_on() {
    let work = Workdir::new("logs", "openraft-info");
    for binary in [Binary::Node, Binary::Router] {
        for format in [Format::Text, Format::Json] {
            let (_, all) = run(&work, binary, format, Some("openraft=info"));
            let what = format!("{binary:?} {format:?} (RUST_LOG=openraft=info)");
            check_plain(&what, &all);
            let lines = parse(&what, format, &all);
            let raft = lines
                .iter()
                .filter(|l| l.openraft && l.level == "INFO")
                .count();
            assert!(raft > 0, "{what}: no openraft INFO line:\n{all}");
        }
    }
}

/// Starts `binary` with stderr and stdout to a file and `RUST_LOG` as given (removed
/// otherwise), waits for it to be ready and settled, stops it; returns the log as it
/// was before SIGTERM and the whole log.
fn run(work: &Workdir, binary: Binary, format: Format, rust_log: Option<&str>) -> (String, String) {
    let name = format!(
        "{binary:?}-{format:?}-{}",
        if rust_log.is_some() { "env" } else { "default" }
    )
    .to_lowercase();
    let dir = work.join(&name);
    std::fs::create_dir_all(&dir).unwrap();
    let log = work.log(&name, &format!("{name}.log"));
    let ready = dir.join("ready.json");
    let mut cmd = match binary {
        Binary::Node => node(&dir),
        Binary::Router => router(&dir),
    };
    cmd.arg("--ready-file").arg(&ready);
    if format == Format::Json {
        cmd.args(["--log-format", "json"]);
    }
    cmd.env_remove("RUST_LOG");
    if let Some(filter) = rust_log {
        cmd.env("RUST_LOG", filter);
    }
    let out = bin::log_file(&log);
    let child = cmd
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {name}: {e}"));
    let mut proc = Proc(child);
    bin::wait_ready_file(&mut proc.0, &ready, &name);
    std::thread::sleep(SETTLE);
    assert!(proc.try_exit().is_none(), "{name} exited:\n{}", read(&log));
    let startup = read(&log);
    proc.sigterm();
    let deadline = Instant::now() + EXIT_WITHIN;
    while proc.try_exit().is_none() {
        assert!(
            Instant::now() < deadline,
            "{name} outlived SIGTERM by {EXIT_WITHIN:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (startup, read(&log))
}

/// A standalone node (development mode, its embedded router) on loopback.
fn node(dir: &Path) -> Command {
    let mut cmd = bin::command(env!("CARGO_BIN_EXE_weft-node"));
    cmd.args([
        "--http-listen",
        "127.0.0.1:0",
        "--cluster-listen",
        "127.0.0.1:0",
    ])
    .arg("--data-dir")
    .arg(dir.join("data"));
    cmd
}

/// A one-member router group (it elects itself).
fn router(dir: &Path) -> Command {
    let listen = bin::free_addr("127.0.0.1");
    let mut cmd = bin::command(bin::path("weft-router"));
    cmd.arg("--cluster-insecure")
        .args(["--id", "1", "--listen", &listen])
        .args(["--peers", &format!("1={listen}")])
        .arg("--data-dir")
        .arg(dir.join("data"));
    cmd
}

fn read(p: &PathBuf) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// No escape character anywhere: no colour, no cursor movement.
fn check_plain(what: &str, log: &str) {
    if let Some((n, line)) = log.lines().enumerate().find(|(_, l)| l.contains('\u{1b}')) {
        panic!("{what}: line {} holds an escape code: {line:?}", n + 1);
    }
}

/// Every line as level and target: `--log-format json` lines are JSON objects with
/// `level` and `target`; text lines are `<timestamp> <LEVEL> <spans:><target>: <message>`.
fn parse<'a>(what: &str, format: Format, log: &'a str) -> Vec<Line<'a>> {
    let lines: Vec<Line<'a>> = log
        .lines()
        .map(|text| match format {
            Format::Json => {
                let v: Value = serde_json::from_str(text).unwrap_or_else(|e| {
                    panic!("{what}: not one JSON object per line ({e}): {text:?}")
                });
                assert!(v.is_object(), "{what}: a line is not an object: {text}");
                let field = |k: &str| {
                    v[k].as_str()
                        .unwrap_or_else(|| panic!("{what}: no `{k}` in {text}"))
                        .to_owned()
                };
                Line {
                    level: field("level"),
                    openraft: field("target").starts_with("openraft"),
                    text,
                }
            }
            Format::Text => {
                let mut words = text.split_whitespace();
                let _timestamp = words.next();
                let level = words.next().unwrap_or_default().to_owned();
                assert!(
                    ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&level.as_str()),
                    "{what}: not a log line of the text format: {text:?}"
                );
                // Then the spans and the target, up to the message.
                let context = words.next().unwrap_or_default();
                Line {
                    level,
                    openraft: context.contains("openraft"),
                    text,
                }
            }
        })
        .collect();
    assert!(!lines.is_empty(), "{what}: an empty log");
    lines
}
