//! Development certificates for a cluster (`weft-router certs`), made with rcgen.
//!
//! [`DevCa`] is a fresh CA; [`DevCa::issue`] signs a member certificate whose only
//! identity is its URI SAN (`weft://node/<id>`, `weft://router/<id>`,
//! `weft://admin/<name>`, see [`crate::identity`]), usable as both TLS server and
//! client. [`write_dev_set`] writes the CA and one certificate per member into a
//! directory, with keys readable by the owner only.
//!
//! These are for laptops, tests and demos. In production use your own CA (for
//! example cert-manager) issuing the same URI SANs.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

use crate::identity::Peer;

/// Validity of the certificates `weft-router certs` writes.
pub const DEV_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {msg}")]
    Write { path: String, msg: String },
    #[error("{0}")]
    Invalid(String),
}

/// A member certificate and its key, PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A freshly generated CA that signs member certificates.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl DevCa {
    /// A new self-signed CA named `name`, valid from an hour ago for `validity`.
    pub fn generate(name: &str, validity: Duration) -> Result<Self, CertsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + validity;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate (what members put in `cluster.ca_file`).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key, PEM (written beside the CA so more members can be issued).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A certificate for `peer` valid from an hour ago for `validity`.
    pub fn issue(&self, peer: &Peer, validity: Duration) -> Result<Issued, CertsError> {
        let now = SystemTime::now();
        self.issue_between(peer, now - Duration::from_secs(3600), now + validity)
    }

    /// A certificate for `peer` valid between `not_before` and `not_after` (tests
    /// issue expired ones with this).
    pub fn issue_between(
        &self,
        peer: &Peer,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Issued, CertsError> {
        let mut params = member_params(peer).map_err(CertsError::Invalid)?;
        let key = KeyPair::generate()?;
        params.not_before = OffsetDateTime::from(not_before);
        params.not_after = OffsetDateTime::from(not_after);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// What every member certificate holds, whoever issues it (`weft-router certs`, or a
/// pod's own init step, `weft-node cluster-cert`): its identity as the common name and
/// as the one URI SAN (`weft://<role>/<id>`, [`crate::identity`]), signing only, for
/// both ends of a TLS connection. The validity is the issuer's to set. An unverified
/// peer has no identity to certify.
pub fn member_params(peer: &Peer) -> Result<CertificateParams, String> {
    if matches!(peer, Peer::Unverified) {
        return Err("an unverified peer has no certificate".into());
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, peer.uri());
    let uri = rcgen::string::Ia5String::try_from(peer.uri()).map_err(|e| e.to_string())?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    Ok(params)
}

fn write(path: &Path, text: &str, private: bool) -> Result<(), CertsError> {
    write_atomic(path, text, private).map_err(|e| CertsError::Write {
        path: path.display().to_string(),
        msg: e.to_string(),
    })
}

/// Writes `text` to `path` through a temporary file and a rename, so a watcher (the
/// members' certificate reload) never sees a half-written file; `private` files are
/// owner-only (0600).
pub fn write_atomic(path: &Path, text: &str, private: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Writes `<name>.crt` and `<name>.key` for `peer` into `dir`.
pub fn write_member(
    ca: &DevCa,
    dir: &Path,
    name: &str,
    peer: &Peer,
    validity: Duration,
) -> Result<(PathBuf, PathBuf), CertsError> {
    let issued = ca.issue(peer, validity)?;
    let (crt, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    // The key first: a reload triggered by the certificate finds the matching key.
    write(&key, &issued.key_pem, true)?;
    write(&crt, &issued.cert_pem, false)?;
    Ok((crt, key))
}

/// Writes a dev set into `dir`: `ca.crt`/`ca.key`, `router-<i>.{crt,key}` for
/// `1..=routers`, `node-<id>.{crt,key}` per node and `admin.{crt,key}`. Returns the
/// files written.
pub fn write_dev_set(
    dir: &Path,
    routers: u64,
    nodes: &[String],
    validity: Duration,
) -> Result<Vec<PathBuf>, CertsError> {
    std::fs::create_dir_all(dir).map_err(|e| CertsError::Write {
        path: dir.display().to_string(),
        msg: e.to_string(),
    })?;
    let ca = DevCa::generate("weft dev cluster CA", validity)?;
    let mut out = vec![dir.join("ca.crt"), dir.join("ca.key")];
    write(&out[1], &ca.key_pem(), true)?;
    write(&out[0], ca.cert_pem(), false)?;
    let mut members: Vec<(String, Peer)> = (1..=routers)
        .map(|i| (format!("router-{i}"), Peer::Router(i.to_string())))
        .collect();
    for n in nodes {
        let peer = Peer::from_uri(&format!("weft://node/{n}"))
            .map_err(|_| CertsError::Invalid(format!("--nodes: `{n}` is not a valid node id")))?;
        members.push((format!("node-{n}"), peer));
    }
    members.push(("admin".into(), Peer::Admin("admin".into())));
    for (name, peer) in &members {
        let (crt, key) = write_member(&ca, dir, name, peer, validity)?;
        out.push(crt);
        out.push(key);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_name_their_member() {
        let ca = DevCa::generate("test", DEV_VALIDITY).unwrap();
        let peer = Peer::Node("n-1".into());
        let issued = ca.issue(&peer, DEV_VALIDITY).unwrap();
        let der = rustls_pki_types::CertificateDer::from_pem_slice(issued.cert_pem.as_bytes());
        use rustls_pki_types::pem::PemObject;
        let der = der.unwrap();
        assert_eq!(Peer::from_cert(&der).unwrap(), peer);
        assert!(issued.key_pem.contains("PRIVATE KEY"));
    }
}
