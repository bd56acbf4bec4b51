//! What every Weft binary does the same way around its own work: parse the command
//! line (exit 64 on anything invalid), log to stderr as text or JSON, and wait for
//! SIGTERM/SIGINT. Used by `weft-router` and `weft-node`.

use crate::config::EXIT_USAGE;

/// Parses a Weft binary's command line the way every Weft binary does: `--help` and
/// `--version` print and succeed; anything invalid prints one line
/// (`<bin>: invalid config: …`) and exits 64. Shared by `weft-router` and `weft-node`.
pub fn parse_args<C: clap::Parser>(bin: &str) -> Result<C, std::process::ExitCode> {
    match C::try_parse() {
        Ok(cli) => Ok(cli),
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            let _ = e.print();
            Err(std::process::ExitCode::SUCCESS)
        }
        Err(e) => {
            let text = e.to_string();
            let line = text
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            Err(usage_exit(bin, format!("invalid config: {line}")))
        }
    }
}

/// Prints `<bin>: <msg>` and returns exit code 64.
pub fn usage_exit(bin: &str, msg: impl std::fmt::Display) -> std::process::ExitCode {
    eprintln!("{bin}: {msg}");
    std::process::ExitCode::from(EXIT_USAGE)
}

/// Logs to stderr, as text or one JSON object per line (`--log-format json`).
///
/// `RUST_LOG` (an `EnvFilter` directive list, e.g. `info,weft_node::cluster::relay=debug`)
/// replaces `default_filter` when set. Without it openraft logs at WARN whatever the
/// default says: at INFO it writes a line (and a full `RaftState` dump) per election
/// and membership change. Text logs carry ANSI colours only when stderr is a terminal,
/// so a log file or a container runtime's log never holds escape codes.
pub fn init_logging(json: bool, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_directives(default_filter).into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        use std::io::IsTerminal;
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

/// `default_filter` with `openraft=warn` added unless it names openraft itself.
fn default_directives(default_filter: &str) -> String {
    if default_filter
        .split(',')
        .any(|d| d.trim().starts_with("openraft"))
    {
        default_filter.to_owned()
    } else {
        format!("{default_filter},openraft=warn")
    }
}

/// Resolves on SIGTERM or SIGINT (only SIGINT if SIGTERM cannot be listened for).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops this process");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
    }
}

#[cfg(test)]
mod tests {
    use super::default_directives;

    #[test]
    fn openraft_is_quiet_unless_the_default_names_it() {
        assert_eq!(default_directives("info"), "info,openraft=warn");
        assert_eq!(
            default_directives("info,openraft=debug"),
            "info,openraft=debug"
        );
    }
}
