//! The certificates of a process cluster. Every cluster connection is mutual TLS, as in
//! production: a harness makes a CA and one certificate per router and node (rcgen,
//! through [`weft_router::certs::DevCa`]) under one directory, and reads the routers
//! with an admin certificate of its own. The intrusion and rotation tests issue more
//! (expired, other ids, another CA) with [`issue_files`].

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use weft_router::certs::DevCa;
use weft_router::identity::Peer;
use weft_router::tls::{Certs, TlsFiles, Transport};

/// Validity of the harness's certificates.
const CERT_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// Writes `<dir>/<name>.{crt,key}` for `peer`, signed by `ca`; returns the files
/// (with `<dir>/ca.crt` as the CA bundle).
pub fn issue_files(ca: &DevCa, dir: &Path, name: &str, peer: &Peer) -> TlsFiles {
    let (cert_file, key_file) =
        weft_router::certs::write_member(ca, dir, name, peer, CERT_VALIDITY)
            .unwrap_or_else(|e| panic!("issue {peer}: {e}"));
    TlsFiles {
        ca_file: dir.join("ca.crt"),
        cert_file,
        key_file,
    }
}

/// A transport presenting `files`.
pub fn tls(files: TlsFiles) -> Transport {
    Transport::MutualTls(Certs::load(files).expect("load test certificates"))
}

/// `--cluster-ca-file … --cluster-cert-file … --cluster-key-file …`.
pub fn tls_args(cmd: &mut Command, files: &TlsFiles) {
    cmd.arg("--cluster-ca-file")
        .arg(&files.ca_file)
        .arg("--cluster-cert-file")
        .arg(&files.cert_file)
        .arg("--cluster-key-file")
        .arg(&files.key_file);
}

/// A cluster CA, the directory its members' files live in (`ca.crt`,
/// `<member>.{crt,key}`) and the harness's own admin certificate.
pub struct Pki {
    ca: DevCa,
    dir: PathBuf,
    /// The harness's certificate, reloaded by [`Pki::write_ca_bundle`] and
    /// [`Pki::reissue`].
    admin: Arc<Certs>,
}

impl Pki {
    /// A new CA in `dir` (created) and an admin certificate for the harness.
    pub fn create(dir: PathBuf) -> Self {
        std::fs::create_dir_all(&dir).expect("create the certificates' directory");
        let ca = DevCa::generate("weft test CA", CERT_VALIDITY).expect("generate a CA");
        std::fs::write(dir.join("ca.crt"), ca.cert_pem()).expect("write the CA");
        let admin = Certs::load(issue_files(
            &ca,
            &dir,
            "admin",
            &Peer::Admin("harness".into()),
        ))
        .expect("load the harness's certificate");
        Self { ca, dir, admin }
    }

    pub fn ca(&self) -> &DevCa {
        &self.ca
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The transport the harness reads the routers with (its admin certificate).
    pub fn admin_transport(&self) -> Transport {
        Transport::MutualTls(self.admin.clone())
    }

    /// The certificate files of member `name` (`router-1`, `node-a`, …), issued for
    /// `peer` on first use and kept across restarts.
    pub fn member_files(&self, name: &str, peer: &Peer) -> TlsFiles {
        let files = TlsFiles {
            ca_file: self.dir.join("ca.crt"),
            cert_file: self.dir.join(format!("{name}.crt")),
            key_file: self.dir.join(format!("{name}.key")),
        };
        if files.cert_file.exists() {
            files
        } else {
            issue_files(&self.ca, &self.dir, name, peer)
        }
    }

    /// Replaces the CA bundle every member reads (`ca.crt`) with `pems`.
    pub fn write_ca_bundle(&self, pems: &[&str]) {
        let path = self.dir.join("ca.crt");
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, pems.concat()).expect("write the CA bundle");
        std::fs::rename(&tmp, &path).expect("replace the CA bundle");
        self.admin
            .reload(true)
            .expect("the harness reloads its CA bundle");
    }

    /// Issues a new certificate and key from `ca` for every member named and the
    /// harness itself, replacing the files the members read (each member reloads them
    /// by itself).
    pub fn reissue(&self, ca: &DevCa, members: &[(String, Peer)]) {
        let admin = ("admin".to_owned(), Peer::Admin("harness".into()));
        for (name, peer) in members.iter().chain([&admin]) {
            weft_router::certs::write_member(ca, &self.dir, name, peer, CERT_VALIDITY)
                .unwrap_or_else(|e| panic!("reissue {name}: {e}"));
        }
        self.admin
            .reload(true)
            .expect("the harness reloads its certificate");
    }
}
