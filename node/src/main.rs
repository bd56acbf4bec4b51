//! `weft-node`: parse the configuration, bind, run until SIGTERM/SIGINT.

use std::process::ExitCode;

use tracing::info;
use weft_node::config::{Cli, Config, LogFormat};

fn usage_exit(msg: impl std::fmt::Display) -> ExitCode {
    weft_router::cli::usage_exit("weft-node", msg)
}

fn main() -> ExitCode {
    let cli: Cli = match weft_router::cli::parse_args("weft-node") {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let config = match cli.load() {
        Ok(c) => c,
        Err(e) => return usage_exit(format!("invalid config: {e}")),
    };
    if cli.file.print_config {
        print!("{}", config.to_masked_toml());
        return ExitCode::SUCCESS;
    }
    // Keys and certificates are read before anything is bound: a bad one is a usage
    // error, and so is a reachable client listener without authentication.
    if let Err(e) = config
        .check_exposure(config.http_listen)
        .and_then(|()| config.check_files())
        .and_then(|()| config.cluster_transport().map(|_| ()))
    {
        return usage_exit(format!("invalid config: {e}"));
    }
    init_logging(config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft-node: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-node: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = bind(config.http_listen)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.http_listen))?;
    let cluster_listen = config.cluster_listen();
    let cluster = bind(cluster_listen)
        .map_err(|e| anyhow::anyhow!("cannot listen on {cluster_listen}: {e}"))?;
    let ops = match config.ops.listen {
        Some(addr) => {
            Some(bind(addr).map_err(|e| anyhow::anyhow!("cannot listen on {addr} (ops): {e}"))?)
        }
        None => None,
    };
    let http = listener.local_addr()?;
    let cluster_addr = cluster.local_addr()?;
    let ops_addr = ops.as_ref().map(|l| l.local_addr()).transpose()?;
    if config.router.is_some() {
        info!(router = ?config.router_addrs(), "cluster mode: joining the external router group");
    } else {
        info!("single-node mode with the embedded router");
    }
    let scheme = if config.tls.cert_file.is_some() {
        "https"
    } else {
        "http"
    };
    info!(%http, %scheme, cluster = %cluster_addr, ops = ?ops_addr, node_id = %config.node_id, "weft-node listening");
    if let Some(path) = &config.ready_file {
        let ready = serde_json::json!({
            "http": http.to_string(),
            "cluster": cluster_addr.to_string(),
            "ops": ops_addr.map(|a| a.to_string()),
            "scheme": scheme,
            "node_id": config.node_id,
            "pid": std::process::id(),
        });
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, ready.to_string()).and_then(|()| std::fs::rename(&tmp, path))?;
    }
    weft_node::run_with_router(
        listener,
        ops,
        cluster,
        config,
        weft_router::cli::shutdown_signal(),
    )
    .await
}

/// Binds with a deep accept backlog: tokio's default of 1024 overflows under
/// reconnect bursts, and every dropped SYN costs that client a 1 s retransmit. The
/// kernel caps it at `net.core.somaxconn`.
fn bind(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(65_535)
}

fn init_logging(format: LogFormat) {
    weft_router::cli::init_logging(format == LogFormat::Json, "info");
}
