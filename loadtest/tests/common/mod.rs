//! What the harness's own tests share: running a scenario in this process, and the
//! books of a clean run. (Each test file uses what it needs of it.)
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use weft_loadtest::app;
use weft_loadtest::cli::Cli;
use weft_loadtest::net::Net;
use weft_loadtest::report::Report;
use weft_loadtest::tls::TlsClient;

const BIN: &str = env!("CARGO_BIN_EXE_weft-loadtest");

/// Runs the `weft-loadtest` binary with the command line `args` (split at white space:
/// no argument may hold any) and `env`, none of the harness's own variables inherited;
/// bounded at 90 s. Prints its output.
pub async fn exec(args: &str, env: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args.split_whitespace())
        .env_remove("WEFT_LOADTEST_TARGET")
        .env_remove("WEFT_LOADTEST_RUN_ID")
        .env_remove("WEFT_LOADTEST_WORKER_SLOT")
        .env_remove("WEFT_LOADTEST_CA_FILE")
        .env_remove("WEFT_LOADTEST_TOKEN")
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .expect("the binary finishes by itself")
        .unwrap();
    eprintln!(
        "$ weft-loadtest {args}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The harness's connections to a plain-HTTP node at `addr`.
pub async fn plain_net(addr: SocketAddr) -> Arc<Net> {
    Arc::new(
        Net::new(
            &format!("http://{addr}"),
            &Arc::new(TlsClient::load(None).unwrap()),
            0,
            false,
        )
        .await
        .unwrap(),
    )
}

/// Runs `weft-loadtest ARGS --quiet --drain-timeout 10s` in process, ARGS a command
/// line split at white space; prints its table.
pub async fn run(args: &str) -> Report {
    run_with(args, &[]).await
}

/// [`run`], with `extra` arguments that may hold white space.
pub async fn run_with(args: &str, extra: &[&str]) -> Report {
    let mut argv = vec!["weft-loadtest"];
    argv.extend(args.split_whitespace());
    argv.extend_from_slice(extra);
    argv.extend_from_slice(&["--quiet", "--drain-timeout", "10s"]);
    let cli = Cli::try_parse_from(&argv).expect("arguments parse");
    let report = app::execute(&cli.command)
        .await
        .expect("scenario runs")
        .expect("a local run returns its report");
    eprintln!("{}", report.table());
    report
}

/// No loss, no duplicates, no reordering, no resets; deliveries add up, each with a
/// latency.
pub fn assert_clean(r: &Report) {
    assert!(r.published > 0, "nothing published");
    assert_eq!(r.publish_errors, 0, "{:?}", r.errors);
    assert_eq!(r.lost, 0, "lost events: {:?}", r.errors);
    assert_eq!(r.duplicates, 0);
    assert_eq!(r.reordered, 0);
    assert_eq!(r.resets, 0, "{:?}", r.errors);
    assert_eq!(r.stale, 0);
    assert_eq!(r.foreign, 0);
    assert_eq!(r.unstarted, 0);
    assert_eq!(r.delivered, r.expected);
    assert_eq!(
        r.latency_us.count, r.delivered,
        "every delivery has a latency"
    );
}
