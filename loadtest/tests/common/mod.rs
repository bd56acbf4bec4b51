//! What the harness's own tests share: running a scenario in this process, and the
//! books of a clean run. (Each test file uses what it needs of it.)
#![allow(dead_code)]

use clap::Parser;
use weft_loadtest::app;
use weft_loadtest::cli::Cli;
use weft_loadtest::report::Report;

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
