//! `weft-router`: parse the configuration, bind, serve until SIGTERM/SIGINT.

use std::process::ExitCode;

use tracing::info;
use weft_router::config::{Cli, LogFormat, Subcommand};
use weft_router::server::Router;

fn usage_exit(msg: impl std::fmt::Display) -> ExitCode {
    weft_router::cli::usage_exit("weft-router", msg)
}

fn main() -> ExitCode {
    let cli: Cli = match weft_router::cli::parse_args("weft-router") {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    if let Some(Subcommand::Certs {
        out,
        routers,
        nodes,
        days,
    }) = &cli.command
    {
        let validity = std::time::Duration::from_secs(days.saturating_mul(24 * 3600));
        return match weft_router::certs::write_dev_set(out, *routers, nodes, validity) {
            Ok(files) => {
                for f in files {
                    println!("{}", f.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => usage_exit(format!("certs: {e}")),
        };
    }
    let config = match cli.load() {
        Ok(c) => c,
        Err(e) => return usage_exit(format!("invalid config: {e}")),
    };
    if cli.file.print_config {
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
    match rt.block_on(run(&config, opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-router: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context;
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind {addr}"))
}

async fn run(
    config: &weft_router::config::Config,
    opts: weft_router::server::RouterOptions,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let listener = bind(config.listen).await?;
    let raft_listener = match config.raft_listen {
        Some(a) => Some(bind(a).await?),
        None => None,
    };
    let ops_listener = match config.ops_listen {
        Some(a) => Some(bind(a).await?),
        None => None,
    };
    let id = opts.id;
    let _reloader = opts.transport.spawn_reloader();
    let insecure = (!opts.transport.is_tls())
        .then(|| tokio::spawn(weft_router::tls::warn_insecure_forever("weft-router")));
    let router = Router::start_with(opts, listener, raft_listener, Default::default()).await?;
    let addr = router.local_addr();
    let raft_addr = router.raft_addr();
    let ops_addr = ops_listener.as_ref().and_then(|l| l.local_addr().ok());
    let stop_ops = tokio_util::sync::CancellationToken::new();
    let ops = ops_listener.map(|l| {
        tokio::spawn(weft_router::ops::serve(
            l,
            router.raft().clone(),
            stop_ops.clone(),
        ))
    });
    info!(%addr, raft = ?raft_addr, ops = ?ops_addr, id, "weft-router listening");
    if let Some(path) = &config.ready_file {
        let mut ready = serde_json::json!({
            "listen": addr.to_string(),
            "id": id,
            "pid": std::process::id(),
        });
        if let Some(r) = raft_addr {
            ready["raft_listen"] = r.to_string().into();
        }
        if let Some(o) = ops_addr {
            ready["ops_listen"] = o.to_string().into();
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, ready.to_string())
            .and_then(|()| std::fs::rename(&tmp, path))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    weft_router::cli::shutdown_signal().await;
    if let Some(t) = insecure {
        t.abort();
    }
    stop_ops.cancel();
    if let Some(t) = ops {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), t).await;
    }
    router.shutdown().await;
    info!("stopped");
    Ok(())
}

fn init_logging(format: LogFormat) {
    weft_router::cli::init_logging(format == LogFormat::Json, "info,openraft=warn");
}
