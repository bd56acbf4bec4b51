//! `weft-loadtest`: parse the command line, run it, exit with its code.

use std::process::ExitCode;

use clap::Parser;
use weft_loadtest::{app, cli::Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft-loadtest: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(app::run(cli));
    // Subscriber and publisher tasks are all finished or aborted by now; do not wait
    // for stragglers (a socket close stuck in the kernel) on the way out.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("weft-loadtest: {e:#}");
            ExitCode::FAILURE
        }
    }
}
