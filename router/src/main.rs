//! `weft-router`: parse the configuration, bind, serve until SIGTERM/SIGINT.

use std::process::ExitCode;

use tracing::{info, warn};
use weft_router::config::{Cli, LogFormat};
use weft_router::server::Router;

fn usage_exit(msg: impl std::fmt::Display) -> ExitCode {
    weft_router::config::usage_exit("weft-router", msg)
}

fn main() -> ExitCode {
    let cli: Cli = match weft_router::config::parse_args("weft-router") {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let config = match cli.load() {
        Ok(c) => c,
        Err(e) => return usage_exit(format!("invalid config: {e}")),
    };
    if cli.print_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    let opts = match config.options() {
        Ok(o) => o,
        Err(e) => return usage_exit(format!("invalid config: {e}")),
    };
    init_logging(config.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft-router: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(config.listen, config.ready_file, opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-router: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    listen: std::net::SocketAddr,
    ready_file: Option<std::path::PathBuf>,
    opts: weft_router::server::RouterOptions,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot bind {listen}"))?;
    let id = opts.id;
    let router = Router::start(opts, listener).await?;
    let addr = router.local_addr();
    info!(%addr, id, "weft-router listening");
    if let Some(path) = &ready_file {
        let ready = serde_json::json!({
            "listen": addr.to_string(),
            "id": id,
            "pid": std::process::id(),
        });
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, ready.to_string())
            .and_then(|()| std::fs::rename(&tmp, path))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    shutdown_signal().await;
    router.shutdown().await;
    info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the router");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT"),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,openraft=warn".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
