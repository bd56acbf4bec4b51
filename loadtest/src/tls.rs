//! TLS to the target (`https://`, `wss://`): one rustls client configuration per process,
//! shared by every connection of every transport.
//!
//! Trusted: the platform's roots (as `rustls-native-certs` finds them) plus every
//! certificate of the `--ca-file` PEM bundle. The bundle is read when the process starts
//! ([`TlsClient::load`]), so a missing or unreadable file is a one-line error before any
//! connection; the platform's roots are read only when a connection first needs TLS, so
//! a plain `http://` run never reads them. The server name verified (and sent as SNI) is
//! the target URL's host: a DNS name against the certificate's DNS names, an IP address
//! against its IP address names.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{CertificateError, ClientConfig, RootCertStore};

/// Why `--ca-file` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    #[error("--ca-file {path}: cannot read it: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--ca-file {path}: not a PEM certificate bundle: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error(
        "--ca-file {path}: holds no certificate (expected `-----BEGIN CERTIFICATE-----` blocks)"
    )]
    Empty { path: PathBuf },
    #[error("--ca-file {path}: certificate {index} cannot be a trust anchor: {reason}")]
    Anchor {
        path: PathBuf,
        index: usize,
        reason: String,
    },
}

/// The run's TLS client: what it trusts, and the one configuration built from it.
pub struct TlsClient {
    ca_file: Option<PathBuf>,
    /// The `--ca-file` certificates, checked to be usable trust anchors.
    extra: Vec<CertificateDer<'static>>,
    config: OnceLock<Arc<ClientConfig>>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("ca_file", &self.ca_file)
            .field("extra", &self.extra.len())
            .finish_non_exhaustive()
    }
}

impl TlsClient {
    /// Reads and checks `ca_file` (if any); the configuration is built on first use.
    pub fn load(ca_file: Option<&Path>) -> Result<Self, CaFileError> {
        let extra = match ca_file {
            Some(path) => read_bundle(path)?,
            None => Vec::new(),
        };
        Ok(Self {
            ca_file: ca_file.map(Path::to_owned),
            extra,
            config: OnceLock::new(),
        })
    }

    /// The client configuration: the platform's roots and `--ca-file`'s, ring as the
    /// provider (the workspace's), HTTP/1.1 offered by ALPN (the node's HTTP and
    /// WebSocket listener speaks HTTP/1.1).
    pub fn config(&self) -> Arc<ClientConfig> {
        self.config
            .get_or_init(|| {
                let mut roots = RootCertStore::empty();
                // A platform without a bundle (a scratch image) has no roots: then only
                // `--ca-file` is trusted, which is what such a run wants anyway.
                let _ =
                    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
                for cert in &self.extra {
                    roots
                        .add(cert.clone())
                        .expect("checked to be a trust anchor when loaded");
                }
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let mut config = ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .expect("ring supports the default protocol versions")
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                Arc::new(config)
            })
            .clone()
    }

    /// Whether `--ca-file` was given.
    pub fn has_ca_file(&self) -> bool {
        self.ca_file.is_some()
    }
}

/// The certificates of a PEM bundle, each checked to be a usable trust anchor.
fn read_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaFileError> {
    let pem = std::fs::read(path).map_err(|source| CaFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaFileError::Pem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CaFileError::Empty {
            path: path.to_owned(),
        });
    }
    for (i, cert) in certs.iter().enumerate() {
        RootCertStore::empty()
            .add(cert.clone())
            .map_err(|e| CaFileError::Anchor {
                path: path.to_owned(),
                index: i + 1,
                reason: e.to_string(),
            })?;
    }
    Ok(certs)
}

/// The name a target's certificate must carry: its URL's host (brackets of an IPv6
/// literal removed), as a DNS name or an IP address.
pub fn server_name(host: &str) -> anyhow::Result<ServerName<'static>> {
    let host = host.trim_matches(['[', ']']);
    ServerName::try_from(host.to_owned())
        .map_err(|e| anyhow::anyhow!("`{host}` is not a host name TLS can verify: {e}"))
}

/// What a failed handshake means for the person running the harness. A certificate the
/// client does not trust names `--ca-file`, whether or not one was given.
pub fn explain_handshake(host: &str, e: &std::io::Error, has_ca_file: bool) -> String {
    let rustls_error = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(
            err @ rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ),
        ) => format!(
            "the TLS certificate of {host} does not name {host} ({err}): the target URL's \
             host must be one of its names (an IP address as an IP address name)"
        ),
        Some(err @ rustls::Error::InvalidCertificate(_)) => {
            let fix = if has_ca_file {
                "the --ca-file bundle does not hold the CA that signed it"
            } else {
                "pass the CA that signed it with --ca-file"
            };
            format!("the TLS certificate of {host} is not trusted ({err}): {fix}")
        }
        Some(other) => format!(
            "TLS handshake with {host} failed: {other} (does the target serve TLS on this port?)"
        ),
        None => format!("TLS handshake with {host} failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, text: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("weft-loadtest-tls-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_bad_ca_file_is_a_clear_error_naming_the_flag() {
        let key_only = file(
            "key-only.pem",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        );
        let not_der = file(
            "not-der.pem",
            "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
        );
        let cases = [
            (PathBuf::from("/nonexistent/ca.crt"), "cannot read it"),
            (key_only, "holds no certificate"),
            (not_der, "certificate 1 cannot be a trust anchor"),
        ];
        for (path, why) in &cases {
            let e = TlsClient::load(Some(path)).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("--ca-file {}: ", path.display())) && e.contains(why),
                "{e}"
            );
            assert!(!e.contains('\n'), "one line: {e}");
            let _ = std::fs::remove_file(path);
        }
        assert!(!TlsClient::load(None).unwrap().has_ca_file());
    }

    #[test]
    fn server_names_are_dns_names_or_ip_addresses() {
        assert!(matches!(
            server_name("127.0.0.1").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("[::1]").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("weft.example").unwrap(),
            ServerName::DnsName(_)
        ));
    }

    #[test]
    fn handshake_errors_say_what_to_do() {
        let untrusted = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        let m = explain_handshake("node.test", &untrusted, false);
        assert!(
            m.contains("not trusted") && m.contains("with --ca-file"),
            "{m}"
        );
        let m = explain_handshake("node.test", &untrusted, true);
        assert!(m.contains("the --ca-file bundle does not hold"), "{m}");
        let wrong_name = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::NotValidForName),
        );
        let m = explain_handshake("10.0.0.1", &wrong_name, true);
        assert!(m.contains("does not name 10.0.0.1"), "{m}");
        let eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "tls handshake eof");
        let m = explain_handshake("node.test", &eof, false);
        assert!(m.starts_with("TLS handshake with node.test failed"), "{m}");
    }
}
