//! The typed configuration of `weft-router` (DESIGN §8).
//!
//! Layers, lowest first: built-in defaults < TOML file (`--config`) < `WEFT_*`
//! environment < flags; every flag `--a-b` is also `WEFT_A_B`. The configuration is
//! validated before anything is bound; an invalid one is reported in one line and the
//! binary exits with 64 (EX_USAGE).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::{Deserialize, Serialize};

use crate::identity::Peer;
use crate::raft::RaftTiming;
use crate::server::RouterOptions;
use crate::tls::ClusterConfig;

/// Exit code for invalid configuration or usage (sysexits EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This router's Raft id; required, unique in the group.
    pub id: Option<u64>,
    /// The Router API nodes and admins call.
    pub listen: SocketAddr,
    /// The Raft service alone, called by the other routers only; required when
    /// `peers` names another router, so Raft never shares the port nodes reach (a
    /// NetworkPolicy can then admit routers alone to it). A single voter has no Raft
    /// traffic and needs none.
    pub raft_listen: Option<SocketAddr>,
    /// `/metrics`, `/healthz`, `/readyz` over HTTP. Unset: off (a router has no HTTP
    /// listener to share them with, and a fixed default port would collide between
    /// routers on one host; the Helm chart sets it).
    pub ops_listen: Option<SocketAddr>,
    /// Every voter including this one, `id=host:port,...`, each at its
    /// `raft_listen` address; empty = single voter.
    pub peers: String,
    pub data_dir: PathBuf,
    pub log_format: LogFormat,
    /// Where to write the bound address as JSON once listening.
    pub ready_file: Option<PathBuf>,
    /// A member silent for this long is removed with its interest.
    pub heartbeat_timeout_ms: u64,
    pub raft: RaftConfig,
    /// Mutual TLS on every connection (nodes, peers, admins).
    pub cluster: ClusterConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftConfig {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    pub snapshot_every: u64,
    pub keep_logs: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        let t = RaftTiming::default();
        Self {
            heartbeat_ms: t.heartbeat_ms,
            election_min_ms: t.election_min_ms,
            election_max_ms: t.election_max_ms,
            snapshot_every: t.snapshot_every,
            keep_logs: t.keep_logs,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            id: None,
            listen: "0.0.0.0:9400".parse().expect("literal"),
            raft_listen: None,
            ops_listen: None,
            peers: String::new(),
            data_dir: PathBuf::from("./weft-data"),
            log_format: LogFormat::Text,
            ready_file: None,
            heartbeat_timeout_ms: 5000,
            raft: RaftConfig::default(),
            cluster: ClusterConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Parses `id=host:port,...`.
pub fn parse_peers(s: &str) -> Result<BTreeMap<u64, String>, ConfigError> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| ConfigError(format!("peers: `{part}` is not id=host:port")))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| ConfigError(format!("peers: `{id}` is not a u64 id")))?;
        let addr = addr.trim();
        let port = addr.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>()));
        if !matches!(port, Some((h, Ok(_))) if !h.is_empty()) {
            return Err(ConfigError(format!("peers: `{addr}` is not host:port")));
        }
        if out.insert(id, addr.to_owned()).is_some() {
            return Err(ConfigError(format!("peers: id {id} appears twice")));
        }
    }
    Ok(out)
}

impl Config {
    /// Checks every rule and builds the router's options (loading the cluster
    /// certificates); the error is one line.
    pub fn options(&self) -> Result<RouterOptions, ConfigError> {
        self.check()?;
        let id = self.id.unwrap_or_default();
        let transport = self
            .cluster
            .transport(&Peer::Router(id.to_string()), false)
            .map_err(ConfigError)?;
        self.options_with(transport)
    }

    /// Every rule that needs no file.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.id
            .ok_or_else(|| ConfigError("--id is required".into()))?;
        self.cluster.check(false).map_err(ConfigError)?;
        self.options_with(crate::tls::Transport::Plaintext)
            .map(|_| ())
    }

    fn options_with(&self, transport: crate::tls::Transport) -> Result<RouterOptions, ConfigError> {
        let id = self
            .id
            .ok_or_else(|| ConfigError("--id is required".into()))?;
        let peers = parse_peers(&self.peers)?;
        if !peers.is_empty() && !peers.contains_key(&id) {
            return Err(ConfigError(format!(
                "--peers must include this router's own id {id}"
            )));
        }
        if self.raft_listen.is_none() && peers.keys().any(|p| *p != id) {
            return Err(ConfigError(
                "a router with --peers serves Raft on an address of its own: set --raft-listen \
                 (raft_listen; the Helm chart uses :9401) and name those addresses in --peers"
                    .into(),
            ));
        }
        if self.raft_listen == Some(self.listen) && self.listen.port() != 0 {
            return Err(ConfigError(format!(
                "raft_listen must differ from listen ({})",
                self.listen
            )));
        }
        if let Some(ops) = self.ops_listen.filter(|a| a.port() != 0) {
            if ops == self.listen || Some(ops) == self.raft_listen {
                return Err(ConfigError(format!(
                    "ops_listen ({ops}) must differ from listen and raft_listen"
                )));
            }
        }
        if self.heartbeat_timeout_ms == 0 {
            return Err(ConfigError(
                "heartbeat_timeout_ms must be greater than 0".into(),
            ));
        }
        let r = &self.raft;
        if r.heartbeat_ms == 0 || r.election_min_ms <= r.heartbeat_ms {
            return Err(ConfigError(
                "raft.election_min_ms must exceed raft.heartbeat_ms (> 0)".into(),
            ));
        }
        if r.election_max_ms <= r.election_min_ms {
            return Err(ConfigError(
                "raft.election_max_ms must exceed raft.election_min_ms".into(),
            ));
        }
        if r.snapshot_every == 0 {
            return Err(ConfigError(
                "raft.snapshot_every must be greater than 0".into(),
            ));
        }
        Ok(RouterOptions {
            id,
            peers,
            data_dir: self.data_dir.clone(),
            heartbeat_timeout: Duration::from_millis(self.heartbeat_timeout_ms),
            raft: RaftTiming {
                heartbeat_ms: r.heartbeat_ms,
                election_min_ms: r.election_min_ms,
                election_max_ms: r.election_max_ms,
                snapshot_every: r.snapshot_every,
                keep_logs: r.keep_logs,
            },
            transport,
        })
    }

    /// The effective configuration as TOML (it holds no secrets).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print: {e}"))
    }
}

/// The flags `weft-node` and `weft-router` share: the configuration file and
/// `--print-config`.
#[derive(Debug, clap::Args)]
pub struct FileFlags {
    /// TOML configuration file.
    #[arg(long, env = "WEFT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (secrets masked) and exit.
    #[arg(long)]
    pub print_config: bool,
}

impl FileFlags {
    /// The configuration in the named file (defaults where it names none) and the
    /// file's text; an error names the file and the line.
    pub fn read<T: serde::de::DeserializeOwned + Default>(
        &self,
    ) -> Result<(T, Option<String>), ConfigError> {
        let Some(path) = &self.config else {
            return Ok((T::default(), None));
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        let parsed = toml::from_str::<T>(&text).map_err(|e| {
            let at = e
                .span()
                .map(|s| format!(" (line {})", text[..s.start].matches('\n').count() + 1))
                .unwrap_or_default();
            ConfigError(format!("{}{at}: {}", path.display(), e.message().trim()))
        })?;
        Ok((parsed, Some(text)))
    }
}

/// Command-line flags; each overrides only what it names.
#[derive(Debug, Parser)]
#[command(
    name = "weft-router",
    version,
    about = "Weft router: the Raft-backed metadata service"
)]
pub struct Cli {
    #[command(flatten)]
    pub file: FileFlags,
    #[arg(long, env = "WEFT_ID")]
    pub id: Option<u64>,
    /// The Router API (nodes, admins).
    #[arg(long, env = "WEFT_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// The Raft service alone (other routers only), required with --peers, which
    /// names these addresses.
    #[arg(long, env = "WEFT_RAFT_LISTEN")]
    pub raft_listen: Option<SocketAddr>,
    /// `/metrics`, `/healthz`, `/readyz` over HTTP (off unless set).
    #[arg(long, env = "WEFT_OPS_LISTEN")]
    pub ops_listen: Option<SocketAddr>,
    /// Every voter including this one, at its Raft address: `id=host:port,...`.
    #[arg(long, env = "WEFT_PEERS")]
    pub peers: Option<String>,
    #[arg(long, env = "WEFT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    #[arg(long, env = "WEFT_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    #[arg(long, env = "WEFT_READY_FILE")]
    pub ready_file: Option<PathBuf>,
    #[arg(long, env = "WEFT_HEARTBEAT_TIMEOUT_MS")]
    pub heartbeat_timeout_ms: Option<u64>,
    #[command(flatten)]
    pub cluster: ClusterFlags,
    #[command(subcommand)]
    pub command: Option<Subcommand>,
}

/// `--cluster-*` flags, shared with `weft-node`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClusterFlags {
    /// PEM CA bundle cluster members chain to.
    #[arg(long, env = "WEFT_CLUSTER_CA_FILE")]
    pub cluster_ca_file: Option<PathBuf>,
    /// PEM certificate of this member (URI SAN weft://router/<id> or weft://node/<id>).
    #[arg(long, env = "WEFT_CLUSTER_CERT_FILE")]
    pub cluster_cert_file: Option<PathBuf>,
    /// PEM private key of this member.
    #[arg(long, env = "WEFT_CLUSTER_KEY_FILE")]
    pub cluster_key_file: Option<PathBuf>,
    /// Plaintext, unauthenticated cluster connections (experiments only).
    #[arg(long, env = "WEFT_CLUSTER_INSECURE")]
    pub cluster_insecure: bool,
}

impl ClusterFlags {
    /// Overrides what the flags name.
    pub fn apply(&self, c: &mut ClusterConfig) {
        if self.cluster_ca_file.is_some() {
            c.ca_file.clone_from(&self.cluster_ca_file);
        }
        if self.cluster_cert_file.is_some() {
            c.cert_file.clone_from(&self.cluster_cert_file);
        }
        if self.cluster_key_file.is_some() {
            c.key_file.clone_from(&self.cluster_key_file);
        }
        if self.cluster_insecure {
            c.insecure = true;
        }
    }
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Subcommand {
    /// Write a development CA and member certificates (rcgen) into a directory.
    Certs {
        /// Directory to write ca.crt, router-<i>.crt, node-<id>.crt, admin.crt and keys.
        #[arg(long)]
        out: PathBuf,
        /// Router certificates for ids 1..=N.
        #[arg(long, default_value_t = 3)]
        routers: u64,
        /// Node ids, comma-separated.
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u64,
    },
}

impl Cli {
    /// Builds the effective configuration: defaults < file < env/flags, validated.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let (mut c, _) = self.file.read::<Config>()?;
        if self.id.is_some() {
            c.id = self.id;
        }
        if let Some(v) = self.listen {
            c.listen = v;
        }
        if self.raft_listen.is_some() {
            c.raft_listen = self.raft_listen;
        }
        if self.ops_listen.is_some() {
            c.ops_listen = self.ops_listen;
        }
        if let Some(v) = &self.peers {
            c.peers.clone_from(v);
        }
        if let Some(v) = &self.data_dir {
            c.data_dir.clone_from(v);
        }
        if let Some(v) = self.log_format {
            c.log_format = v;
        }
        if self.ready_file.is_some() {
            c.ready_file.clone_from(&self.ready_file);
        }
        if let Some(v) = self.heartbeat_timeout_ms {
            c.heartbeat_timeout_ms = v;
        }
        self.cluster.apply(&mut c.cluster);
        c.check()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_and_reject_garbage() {
        let p = parse_peers("1=127.0.0.1:9400, 2=r2:9400,3=[::1]:9400").unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[&2], "r2:9400");
        for bad in ["1", "x=a:1", "1=a", "1=a:1,1=b:2", "1=:80"] {
            assert!(parse_peers(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn layers_and_validation() {
        let dir = weft_testkit::bin::Workdir::new("config", "router-layers");
        let path = dir.write(
            "r.toml",
            "id = 2\nheartbeat_timeout_ms = 900\n[raft]\nheartbeat_ms = 50\n[cluster]\ninsecure = true\n",
        );
        let cli = Cli::try_parse_from([
            "weft-router",
            "--config",
            path.to_str().unwrap(),
            "--id",
            "3",
        ])
        .unwrap();
        let c = cli.load().unwrap();
        assert_eq!(c.id, Some(3), "flag beats file");
        assert_eq!(c.heartbeat_timeout_ms, 900, "file beats default");
        assert_eq!(c.raft.heartbeat_ms, 50);
        assert!(c.cluster.insecure);
        let mut bad = c.clone();
        bad.cluster.insecure = false;
        let e = bad.options().unwrap_err().to_string();
        assert!(e.contains("cluster.ca_file") && !e.contains('\n'), "{e}");
        bad.cluster.ca_file = Some("ca.crt".into());
        let e = bad.options().unwrap_err().to_string();
        assert!(e.contains("all three"), "{e}");
        let mut bad = c.clone();
        bad.raft_listen = Some(bad.listen);
        let e = bad.options().unwrap_err().to_string();
        assert!(e.contains("raft_listen must differ"), "{e}");
        let mut bad = c.clone();
        bad.peers = "1=a:1,2=b:2".into();
        let e = bad.options().unwrap_err().to_string();
        assert!(e.contains("own id") && !e.contains('\n'), "{e}");
        // A group of routers keeps Raft off the port nodes reach.
        let mut bad = c.clone();
        bad.peers = "2=a:1,3=b:2".into();
        let e = bad.options().unwrap_err().to_string();
        assert!(e.contains("--raft-listen") && !e.contains('\n'), "{e}");
        let mut ok = bad.clone();
        ok.raft_listen = Some("127.0.0.1:0".parse().unwrap());
        ok.options().expect("with a Raft address of its own");
        let mut bad = c;
        bad.id = None;
        assert!(bad.options().is_err());
    }
}
