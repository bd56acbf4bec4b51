//! HTTPS and WSS on the HTTP listener (`tls.cert_file`, `tls.key_file`), with rustls.
//!
//! The certificate chain and key are loaded at start (a bad pair is a start-up error)
//! and reloaded on SIGHUP and whenever either file's modification time changes (as
//! when cert-manager rotates a mounted Secret). A reload swaps the configuration that
//! *new* handshakes use; live sessions keep the connection they have. A reload that
//! fails keeps the previous certificate and logs why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

pub struct Tls {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<TlsAcceptor>,
    stamp: RwLock<(Option<SystemTime>, Option<SystemTime>)>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cert_file", &self.cert_file)
            .finish_non_exhaustive()
    }
}

impl Tls {
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Self, String> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let acceptor = acceptor(cert_file, key_file)?;
        Ok(Self {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            current: RwLock::new(acceptor),
            stamp: RwLock::new(stamps(cert_file, key_file)),
        })
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reloads the files now.
    pub fn reload(&self) -> Result<(), String> {
        let next = acceptor(&self.cert_file, &self.key_file)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
        *self.stamp.write().unwrap_or_else(|p| p.into_inner()) =
            stamps(&self.cert_file, &self.key_file);
        Ok(())
    }

    /// Reloads on SIGHUP and when the files change, until the task is aborted.
    pub fn spawn_reloader(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let tls = self.clone();
        tokio::spawn(async move {
            let mut hup = signal_hup();
            let mut poll = tokio::time::interval(Duration::from_secs(5));
            loop {
                let why = tokio::select! {
                    _ = recv_hup(&mut hup) => "SIGHUP",
                    _ = poll.tick() => {
                        let now = stamps(&tls.cert_file, &tls.key_file);
                        if now == *tls.stamp.read().unwrap_or_else(|p| p.into_inner()) {
                            continue;
                        }
                        "files changed"
                    }
                };
                match tls.reload() {
                    Ok(()) => tracing::info!(reason = why, "TLS certificate reloaded"),
                    Err(e) => {
                        tracing::warn!(reason = why, error = %e, "TLS reload failed; keeping the previous certificate")
                    }
                }
            }
        })
    }
}

#[cfg(unix)]
fn signal_hup() -> Option<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}

#[cfg(unix)]
async fn recv_hup(s: &mut Option<tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

fn stamps(cert: &Path, key: &Path) -> (Option<SystemTime>, Option<SystemTime>) {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (m(cert), m(key))
}

fn acceptor(cert_file: &Path, key_file: &Path) -> Result<TlsAcceptor, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| format!("tls.cert_file {}: {e}", cert_file.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.cert_file {}: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "tls.cert_file {}: no certificate in PEM",
            cert_file.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("tls.key_file {}: {e}", key_file.display()))?;
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls: certificate and key do not match: {e}"))?;
    // HTTP/1.1 only: WebSocket upgrades and SSE ride on it.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
