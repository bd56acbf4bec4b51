//! `weft-node`: parse the configuration, bind, run until SIGTERM/SIGINT.

use std::process::ExitCode;

use tracing::info;
use weft_node::config::{Cli, Config, LogFormat, Tool};

fn usage_exit(msg: impl std::fmt::Display) -> ExitCode {
    weft_router::cli::usage_exit("weft-node", msg)
}

fn main() -> ExitCode {
    let cli: Cli = match weft_router::cli::parse_args("weft-node") {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    if let Some(tool) = &cli.command {
        return run_tool(&cli, tool);
    }
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

/// The operator tools: each prints what it made on stdout, or one line and exits 64.
fn run_tool(cli: &Cli, tool: &Tool) -> ExitCode {
    let done = match tool {
        Tool::ClusterCert {
            ca_cert,
            ca_key,
            identity,
            out,
            days,
        } => cluster_cert(ca_cert, ca_key, identity, out, *days),
        Tool::Token {
            subject,
            subscribe,
            publish,
            presence,
            ttl_s,
        } => token(
            cli,
            weft_node::auth::mint::TokenSpec {
                subject: subject.clone(),
                subscribe: subscribe.clone(),
                publish: publish.clone(),
                presence: *presence,
                ttl: std::time::Duration::from_secs(*ttl_s),
                ..Default::default()
            },
        ),
    };
    match done {
        Ok(said) => {
            print!("{said}");
            ExitCode::SUCCESS
        }
        Err(e) => usage_exit(e),
    }
}

fn read(p: &std::path::Path) -> Result<String, String> {
    std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))
}

/// `weft-node cluster-cert`: the member's certificate, signed with the CA.
fn cluster_cert(
    ca_cert: &std::path::Path,
    ca_key: &std::path::Path,
    identity: &str,
    out: &std::path::Path,
    days: u64,
) -> Result<String, String> {
    use weft_node::cluster::member_cert;
    let peer = weft_router::identity::Peer::from_uri(identity)
        .map_err(|e| format!("cluster-cert --identity: {e}"))?;
    let (ca_pem, key_pem) = (read(ca_cert)?, read(ca_key)?);
    let validity = std::time::Duration::from_secs(days.saturating_mul(24 * 3600));
    let issued = member_cert::issue(
        &ca_pem,
        &key_pem,
        &peer,
        validity,
        std::time::SystemTime::now(),
    )
    .map_err(|e| format!("cluster-cert: {e}"))?;
    let files = member_cert::write_files(out, &ca_pem, &issued)
        .map_err(|e| format!("cluster-cert: {e}"))?;
    let mut said = format!("{peer}: valid until {}\n", issued.not_after);
    for f in files {
        said.push_str(&format!("{}\n", f.display()));
    }
    Ok(said)
}

/// `weft-node token`: a client token signed with the effective configuration's HMAC
/// secret, carrying its issuer and audience.
fn token(cli: &Cli, mut spec: weft_node::auth::mint::TokenSpec) -> Result<String, String> {
    use weft_node::auth::mint;
    let config = cli.load().map_err(|e| format!("invalid config: {e}"))?;
    let a = &config.auth;
    let from_file;
    let secret: &[u8] = if !a.hmac_secret.is_empty() {
        a.hmac_secret.expose().as_bytes()
    } else if let Some(path) = &a.hmac_secret_file {
        from_file = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        mint::secret_from_file(&from_file).map_err(|e| format!("token: {e}"))?
    } else {
        return Err(
            "token: no HMAC secret configured (auth.hmac_secret or auth.hmac_secret_file)".into(),
        );
    };
    spec.issuer = a.issuer.clone();
    spec.audience = a.audience.clone();
    let token = mint::mint_hs256(secret, &spec, std::time::SystemTime::now())
        .map_err(|e| format!("token: {e}"))?;
    Ok(format!("{token}\n"))
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
