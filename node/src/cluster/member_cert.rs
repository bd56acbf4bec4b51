//! A member's cluster certificate, signed with an existing CA (`weft-node cluster-cert`).
//!
//! The Helm chart's default cluster mTLS: the chart generates a CA at install (Helm's
//! `genCA`, kept across upgrades) and every router and node pod runs this command in an
//! init container, which signs a fresh key for the pod's own identity
//! (`weft://node/<pod>`, `weft://router/<ordinal>`, see `weft_router::identity`). The
//! CA key is mounted only into the init container; the member gets `ca.crt`, `tls.crt`
//! and `tls.key` in a memory-backed volume that dies with the pod. Helm's own
//! `genSignedCert` cannot write URI SANs, which is why the signing happens here.
//!
//! The certificate is what `weft-router certs` issues: the identity as the only URI
//! SAN (and as the CN), digital signature, server and client auth, valid from an hour
//! ago (clock skew) for the requested time but never past the CA's own expiry.
//!
//! CA keys are read as PKCS#8 (`PRIVATE KEY`) or PKCS#1 RSA (`RSA PRIVATE KEY`, what
//! `genCA` writes); the key must belong to the CA certificate.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{Issuer, KeyPair, PublicKeyData};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;
use weft_router::identity::Peer;

#[derive(Debug, thiserror::Error)]
pub enum MemberCertError {
    #[error("{0}")]
    Invalid(String),
    #[error("signing the certificate: {0}")]
    Sign(#[from] rcgen::Error),
    #[error("{path}: {msg}")]
    Write { path: String, msg: String },
}

/// A member certificate and its key, PEM.
#[derive(Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// When it expires (clamped to the CA's expiry).
    pub not_after: OffsetDateTime,
}

/// Signs a fresh key for `peer` with the CA (`ca_cert_pem`, `ca_key_pem`), valid
/// from an hour before `now` until `now + validity` or the CA's expiry, whichever
/// comes first.
pub fn issue(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    peer: &Peer,
    validity: Duration,
    now: SystemTime,
) -> Result<Issued, MemberCertError> {
    let mut params = weft_router::certs::member_params(peer).map_err(MemberCertError::Invalid)?;
    let ca_der = CertificateDer::from_pem_slice(ca_cert_pem.as_bytes())
        .map_err(|_| MemberCertError::Invalid("the CA file holds no PEM certificate".into()))?;
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der)
        .map_err(|_| MemberCertError::Invalid("the CA certificate does not parse".into()))?;
    if !ca.is_ca() {
        return Err(MemberCertError::Invalid(
            "the CA certificate is not a CA (basicConstraints CA:TRUE)".into(),
        ));
    }
    let ca_key = ca_key_pair(ca_key_pem)?;
    // The raw public keys (the SPKI's bit string), not the whole SPKI: encoders
    // differ in the algorithm parameters.
    if ca_key.der_bytes() != &*ca.public_key().subject_public_key.data {
        return Err(MemberCertError::Invalid(
            "the CA key does not belong to the CA certificate".into(),
        ));
    }
    let ca_not_after = ca.validity().not_after.to_datetime();
    let issuer = Issuer::from_ca_cert_der(&ca_der, ca_key)?;

    let key = KeyPair::generate()?;
    let now = OffsetDateTime::from(now);
    let wanted = now + validity;
    params.not_before = now - time::Duration::hours(1);
    params.not_after = wanted.min(ca_not_after);
    if params.not_after <= now {
        return Err(MemberCertError::Invalid(format!(
            "the CA certificate expired at {ca_not_after}"
        )));
    }
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after: params.not_after,
    })
}

/// The CA's signing key: PKCS#8, or PKCS#1 RSA wrapped into PKCS#8 (ring reads only
/// PKCS#8). The key's own parse errors are never shown: they could quote it.
fn ca_key_pair(pem: &str) -> Result<KeyPair, MemberCertError> {
    let bad = || {
        MemberCertError::Invalid(
            "the CA key must be a PEM PKCS#8 (PRIVATE KEY) or PKCS#1 RSA (RSA PRIVATE KEY) key; convert others with `openssl pkcs8 -topk8 -nocrypt`"
                .into(),
        )
    };
    let pkcs8 = match PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| bad())? {
        PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        PrivateKeyDer::Pkcs1(k) => rsa_pkcs1_to_pkcs8(k.secret_pkcs1_der()),
        _ => return Err(bad()),
    };
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from(pkcs8);
    KeyPair::try_from(&der).map_err(|_| bad())
}

/// `PrivateKeyInfo { version 0, rsaEncryption NULL, OCTET STRING pkcs1 }` (RFC 5208).
fn rsa_pkcs1_to_pkcs8(pkcs1: &[u8]) -> Vec<u8> {
    const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    let mut algorithm = der(0x06, RSA_ENCRYPTION);
    algorithm.extend_from_slice(&[0x05, 0x00]);
    let mut body = der(0x02, &[0]);
    body.extend(der(0x30, &algorithm));
    body.extend(der(0x04, pkcs1));
    der(0x30, &body)
}

/// One DER tag-length-value.
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// Writes `ca.crt`, `tls.key` (owner-only) and `tls.crt` into `dir`, each through a
/// rename so a watching member never reads half a file. Returns the paths.
pub fn write_files(
    dir: &Path,
    ca_cert_pem: &str,
    issued: &Issued,
) -> Result<Vec<PathBuf>, MemberCertError> {
    std::fs::create_dir_all(dir).map_err(|e| MemberCertError::Write {
        path: dir.display().to_string(),
        msg: e.to_string(),
    })?;
    // The key before the certificate: a reload the certificate triggers finds its key.
    let files = [
        ("ca.crt", ca_cert_pem, false),
        ("tls.key", issued.key_pem.as_str(), true),
        ("tls.crt", issued.cert_pem.as_str(), false),
    ];
    let mut out = Vec::new();
    for (name, text, private) in files {
        let path = dir.join(name);
        weft_router::certs::write_atomic(&path, text, private).map_err(|e| {
            MemberCertError::Write {
                path: path.display().to_string(),
                msg: e.to_string(),
            }
        })?;
        out.push(path);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_router::certs::DevCa;
    use weft_router::tls::{Certs, TlsFiles};

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn issue_now(ca: &DevCa, peer: &Peer, validity: Duration) -> Issued {
        issue(
            ca.cert_pem(),
            &ca.key_pem(),
            peer,
            validity,
            SystemTime::now(),
        )
        .unwrap()
    }

    #[test]
    fn issued_files_load_as_the_member_they_name() {
        let ca = DevCa::generate("test CA", 30 * DAY).unwrap();
        let peer = Peer::Router("2".into());
        let issued = issue_now(&ca, &peer, 7 * DAY);
        let dir = std::env::temp_dir().join(format!("weft-member-cert-{}", std::process::id()));
        let files = write_files(&dir, ca.cert_pem(), &issued).unwrap();
        assert_eq!(files.len(), 3);
        let certs = Certs::load_member(TlsFiles {
            ca_file: dir.join("ca.crt"),
            cert_file: dir.join("tls.crt"),
            key_file: dir.join("tls.key"),
        })
        .unwrap();
        assert_eq!(certs.identity(), peer);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("tls.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the key is owner-only");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn validity_never_outlives_the_ca_and_keys_must_match() {
        let ca = DevCa::generate("short CA", 2 * DAY).unwrap();
        let peer = Peer::Node("n1".into());
        let issued = issue_now(&ca, &peer, 365 * DAY);
        assert!(issued.not_after < OffsetDateTime::now_utc() + time::Duration::days(3));

        let other = DevCa::generate("other CA", 2 * DAY).unwrap();
        let e = issue(
            ca.cert_pem(),
            &other.key_pem(),
            &peer,
            DAY,
            SystemTime::now(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("does not belong"), "{e}");
        let e = issue(ca.cert_pem(), "not a key", &peer, DAY, SystemTime::now())
            .unwrap_err()
            .to_string();
        assert!(e.contains("PKCS#8"), "{e}");
        // A member certificate is not a CA.
        let e = issue(
            &issued.cert_pem,
            &issued.key_pem,
            &peer,
            DAY,
            SystemTime::now(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not a CA"), "{e}");
        let later = SystemTime::now() + 3 * DAY;
        let e = issue(ca.cert_pem(), &ca.key_pem(), &peer, DAY, later)
            .unwrap_err()
            .to_string();
        assert!(e.contains("expired"), "{e}");
    }

    #[test]
    fn der_lengths_use_the_long_form_above_127_bytes() {
        assert_eq!(der(0x04, &[1, 2]), vec![0x04, 2, 1, 2]);
        let long = der(0x04, &[0; 300]);
        assert_eq!(&long[..4], &[0x04, 0x82, 0x01, 0x2c]);
        assert_eq!(long.len(), 304);
    }
}
