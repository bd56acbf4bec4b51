//! How cluster connections are made and accepted: mutual TLS with rustls, or
//! plaintext where no certificate is needed (DESIGN §6).
//!
//! ```text
//! TcpListener ─accept─► handshake task (TLS, bounded, timeout) ─► ClusterIo{stream, ClusterConn}
//!                                 │ client cert → Peer (identity::Peer::from_cert)
//!                                 ▼
//!        tonic serve_with_incoming: every request carries the ClusterConn extension
//! ```
//!
//! - **Mutual TLS** ([`Transport::MutualTls`]): a server asks every client for a
//!   certificate chaining to the cluster CA (`cluster.ca_file`) and refuses the
//!   handshake otherwise (including an expired one); a client checks that the server's
//!   certificate chains to the same CA and names the identity it dialled
//!   ([`Expect`]). Identities come from the URI SAN, never from host names, so a
//!   member's certificate needs no DNS name.
//! - **Reload without dropping links**: [`Certs`] holds the current rustls configs
//!   behind a lock; every *new* handshake (either direction) uses the current ones, an
//!   established connection keeps the session it negotiated. [`Certs::watch`] reloads
//!   on SIGHUP and when a file's mtime or size changes (polled every
//!   [`RELOAD_POLL`]). A set that does not load (a half-written rotation) is logged
//!   and the previous one kept.
//! - We drive rustls ourselves (tokio-rustls) instead of tonic's `ServerTlsConfig`
//!   because tonic's config is fixed for the life of the server: it cannot rotate.
//! - `TCP_NODELAY` is set on every accepted and dialled socket: relay frames are small
//!   and Nagle plus delayed ACKs add ~40 ms tails.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::either::Either;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::identity::{count_refusal, Peer, Refusal};

/// How often the certificate files are checked for a change.
pub const RELOAD_POLL: Duration = Duration::from_secs(2);
/// A TLS handshake must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress per listener; past it new connections wait in the backlog.
const MAX_HANDSHAKES: usize = 256;
/// Handshakes in progress from one IP address; past it a new connection from there is
/// closed at once. One address holding idle connections open can then take only a
/// quarter of [`MAX_HANDSHAKES`], never stall every member's new links. A member opens
/// a few connections at a time (its relay links and router channels); members on one
/// host (loopback test clusters) share an address, hence the room.
const MAX_HANDSHAKES_PER_IP: usize = 64;

/// Where a member's certificate material lives (`cluster.ca_file`, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM bundle of the CA certificate(s) members must chain to.
    pub ca_file: PathBuf,
    /// PEM chain of this member's certificate (leaf first).
    pub cert_file: PathBuf,
    /// PEM private key of this member's certificate (never logged).
    pub key_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {msg}")]
    Read { path: String, msg: String },
    #[error("{0}")]
    Invalid(String),
}

fn read_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Read {
        path: path.display().to_string(),
        msg: e.to_string(),
    }
}

/// How this process's cluster connections are secured.
#[derive(Clone)]
pub enum Transport {
    /// No TLS: the embedded router on loopback, or `--cluster-insecure`. Every caller
    /// is [`Peer::Unverified`].
    Plaintext,
    /// Mutual TLS with the member certificate in [`Certs`].
    MutualTls(Arc<Certs>),
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Plaintext => f.write_str("Plaintext"),
            Self::MutualTls(c) => write!(f, "MutualTls({})", c.identity()),
        }
    }
}

/// Whom a client expects at the other end of a connection it dials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// A router (any id): Raft peers, the router group.
    Router,
    /// This node: a relay link.
    Node(String),
    /// Any member: the router API, which a node with an embedded router serves too.
    Member,
}

impl Expect {
    fn accepts(&self, peer: &Peer) -> bool {
        match (self, peer) {
            (Self::Router, Peer::Router(_)) => true,
            (Self::Node(want), Peer::Node(id)) => want == id,
            (Self::Member, Peer::Router(_) | Peer::Node(_)) => true,
            _ => false,
        }
    }
}

/// What a connection on a cluster listener is known by; tonic puts it on every request
/// of the connection (read it with [`crate::identity::caller`]).
#[derive(Debug, Clone)]
pub struct ClusterConn {
    pub remote: Option<SocketAddr>,
    pub peer: Peer,
}

/// A member's loaded certificate material, replaced whole on reload.
pub struct Certs {
    files: TlsFiles,
    /// std lock: read to clone an `Arc` per handshake, never held across an await.
    current: RwLock<Arc<Loaded>>,
}

struct Loaded {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    identity: Peer,
    stamp: Vec<Option<(SystemTime, u64)>>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn stamp(files: &TlsFiles) -> Vec<Option<(SystemTime, u64)>> {
    [&files.ca_file, &files.cert_file, &files.key_file]
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

fn load(files: &TlsFiles, check_dates: bool) -> Result<Loaded, TlsError> {
    let stamp = stamp(files);
    let ca: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.ca_file)
        .map_err(|e| read_err(&files.ca_file, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| read_err(&files.ca_file, e))?;
    let mut roots = RootCertStore::empty();
    for c in ca {
        roots
            .add(c)
            .map_err(|e| TlsError::Invalid(format!("{}: {e}", files.ca_file.display())))?;
    }
    if roots.is_empty() {
        return Err(TlsError::Invalid(format!(
            "{} holds no CA certificate",
            files.ca_file.display()
        )));
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert_file)
        .map_err(|e| read_err(&files.cert_file, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| read_err(&files.cert_file, e))?;
    let leaf = chain.first().ok_or_else(|| {
        TlsError::Invalid(format!(
            "{} holds no certificate",
            files.cert_file.display()
        ))
    })?;
    let identity = Peer::from_cert(leaf)
        .map_err(|e| TlsError::Invalid(format!("{}: {e}", files.cert_file.display())))?;
    if check_dates {
        check_validity(leaf)
            .map_err(|e| TlsError::Invalid(format!("{}: {e}", files.cert_file.display())))?;
    }
    // The key's own error text could quote it: report only the path.
    let key = PrivateKeyDer::from_pem_file(&files.key_file).map_err(|_| {
        TlsError::Invalid(format!(
            "{} holds no PEM private key",
            files.key_file.display()
        ))
    })?;
    let roots = Arc::new(roots);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| TlsError::Invalid(format!("client verifier: {e}")))?;
    let mut server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| {
            TlsError::Invalid(format!(
                "{} does not fit {}: {e}",
                files.key_file.display(),
                files.cert_file.display()
            ))
        })?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(MemberVerifier {
            roots,
            provider: provider(),
        }))
        .with_client_auth_cert(chain, key)
        .map_err(|e| TlsError::Invalid(format!("client certificate: {e}")))?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Loaded {
        server: Arc::new(server),
        client: Arc::new(client),
        identity,
        stamp,
    })
}

/// Refuses a member certificate outside its validity period: peers would refuse it at
/// every handshake, so say so at start (or keep the current set on reload).
fn check_validity(der: &CertificateDer<'_>) -> Result<(), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|_| "the certificate does not parse".to_owned())?;
    let v = cert.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now < v.not_before {
        return Err(format!(
            "the certificate is not valid before {}",
            v.not_before
        ));
    }
    if now > v.not_after {
        return Err(format!("the certificate expired on {}", v.not_after));
    }
    Ok(())
}

/// When a certificate stops being valid (`None` if it does not parse, or its end is
/// before the Unix epoch).
fn not_after(der: &[u8]) -> Option<SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

impl Certs {
    /// Loads the files; the error is one line naming the file at fault. The
    /// certificate's dates are not checked (a test may present an expired one); a
    /// member starts with [`Certs::load_member`].
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let loaded = load(&files, false)?;
        Ok(Arc::new(Self {
            files,
            current: RwLock::new(Arc::new(loaded)),
        }))
    }

    /// [`Certs::load`], refusing a certificate outside its validity period.
    pub fn load_member(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let loaded = load(&files, true)?;
        Ok(Arc::new(Self {
            files,
            current: RwLock::new(Arc::new(loaded)),
        }))
    }

    fn current(&self) -> Arc<Loaded> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The identity this member's certificate names.
    pub fn identity(&self) -> Peer {
        self.current().identity.clone()
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Reloads when `force` or when a file changed since the last load. A set that
    /// does not load, or names another identity, is refused and the current one kept.
    pub fn reload(&self, force: bool) -> Result<bool, TlsError> {
        let cur = self.current();
        if !force && stamp(&self.files) == cur.stamp {
            return Ok(false);
        }
        let fresh = load(&self.files, true)?;
        if fresh.identity != cur.identity {
            return Err(TlsError::Invalid(format!(
                "the new certificate names {} but this member is {}",
                fresh.identity, cur.identity
            )));
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
        Ok(true)
    }

    /// Reloads on SIGHUP and whenever the files change, until the process ends.
    pub async fn watch(self: Arc<Self>) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(RELOAD_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let force = tokio::select! {
                _ = tick.tick() => false,
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => None } } => true,
            };
            match self.reload(force) {
                Ok(true) => tracing::info!(
                    identity = %self.identity(),
                    cert = %self.files.cert_file.display(),
                    "cluster certificates reloaded; new connections use them"
                ),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cluster certificates not reloaded; keeping the current ones")
                }
            }
        }
    }
}

/// Verifies that a server's certificate chains to the cluster CA (and is in its
/// validity period). The identity it names is checked by the connector, which knows
/// whom it dialled; host names play no part.
#[derive(Debug)]
struct MemberVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for MemberVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// One accepted cluster connection: the stream and who is at the other end.
pub struct ClusterIo {
    stream: Stream,
    info: ClusterConn,
    /// When the peer's certificate stops being valid. A handshake refuses an expired
    /// certificate; this ends a connection that outlives its certificate (its next
    /// read or write fails), so no request from a member whose certificate expired is
    /// served, however long its link has been up.
    expires: Option<SystemTime>,
    /// Set once the certificate's end passed: every later read and write fails.
    expired: bool,
}

impl ClusterIo {
    fn check_expiry(&mut self) -> io::Result<()> {
        if !self.expired && self.expires.is_some_and(|at| SystemTime::now() >= at) {
            self.expired = true;
            count_refusal(
                Refusal::Handshake,
                &self.info.peer.to_string(),
                self.info.remote,
                "a connection whose certificate expired (closed)",
            );
        }
        if self.expired {
            Err(expired())
        } else {
            Ok(())
        }
    }
}

fn expired() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "the peer's certificate expired",
    )
}

/// A cluster connection's bytes: plaintext (`--cluster-insecure`) or TLS.
type Stream = Either<TcpStream, Box<tokio_rustls::server::TlsStream<TcpStream>>>;

impl Connected for ClusterIo {
    type ConnectInfo = ClusterConn;
    fn connect_info(&self) -> ClusterConn {
        self.info.clone()
    }
}

impl AsyncRead for ClusterIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_expiry()?;
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClusterIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_expiry()?;
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_expiry()?;
        Pin::new(&mut this.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The stream of connections a tonic server serves (`serve_with_incoming*`).
pub type Incoming = ReceiverStream<Result<ClusterIo, io::Error>>;

impl Transport {
    /// Whether connections are authenticated.
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::MutualTls(_))
    }

    /// Accepts on `listener`. With TLS every handshake runs in its own task (never in
    /// the accept loop), bounded in number and time; a refused handshake (no client
    /// certificate, another CA, expired, no `weft://` identity) is logged and counted
    /// and never reaches tonic. The accept task ends when the stream is dropped.
    pub fn incoming(&self, listener: TcpListener) -> Incoming {
        let (tx, rx) = mpsc::channel(64);
        let transport = self.clone();
        tokio::spawn(async move {
            let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
            let per_ip = PerIp::default();
            loop {
                let permit = tokio::select! {
                    p = handshakes.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                    () = tx.closed() => return,
                };
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    () = tx.closed() => return,
                };
                let (tcp, remote) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "cluster listener: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                match &transport {
                    Transport::Plaintext => {
                        drop(permit);
                        let io = ClusterIo {
                            stream: Either::Left(tcp),
                            info: ClusterConn {
                                remote: Some(remote),
                                peer: Peer::Unverified,
                            },
                            expires: None,
                            expired: false,
                        };
                        if tx.send(Ok(io)).await.is_err() {
                            return;
                        }
                    }
                    Transport::MutualTls(certs) => {
                        let Some(from_ip) = per_ip.take(remote.ip()) else {
                            per_ip.refused(remote);
                            continue;
                        };
                        let config = certs.current().server.clone();
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            let _permit = (permit, from_ip);
                            if let Some(io) = handshake(config, tcp, remote).await {
                                let _ = tx.send(Ok(io)).await;
                            }
                        });
                    }
                }
            }
        });
        ReceiverStream::new(rx)
    }

    /// A lazily connecting channel to `addr` (`host:port`) expecting `expect` there.
    pub fn channel(
        &self,
        addr: &str,
        expect: Expect,
        connect_timeout: Duration,
    ) -> Result<Channel, tonic::transport::Error> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true);
        Ok(self.lazy(endpoint, expect))
    }

    /// Dials `addr` (`host:port`) as [`Transport::channel`] would, expecting `expect`
    /// there, and returns the certificate the server presented; the connection is
    /// then closed. What a *new* connection sees now (after a reload, say): for
    /// diagnostics and tests. Plaintext has none to show.
    pub async fn presented_certificate(
        &self,
        addr: &str,
        expect: Expect,
    ) -> io::Result<CertificateDer<'static>> {
        let Self::MutualTls(certs) = self else {
            return Err(io::Error::other(
                "a plaintext connection presents no certificate",
            ));
        };
        let uri: Uri = format!("http://{addr}").parse().map_err(io::Error::other)?;
        let io = dial(certs.clone(), expect, uri).await?;
        io.inner()
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.clone().into_owned())
            .ok_or_else(|| io::Error::other("the server sent no certificate"))
    }

    /// Connects `endpoint` lazily over this transport.
    pub fn lazy(&self, endpoint: Endpoint, expect: Expect) -> Channel {
        match self {
            Self::Plaintext => endpoint.connect_lazy(),
            Self::MutualTls(certs) => {
                let certs = certs.clone();
                endpoint.connect_with_connector_lazy(tower::service_fn(move |uri: Uri| {
                    dial(certs.clone(), expect.clone(), uri)
                }))
            }
        }
    }
}

/// Handshakes in progress by source address ([`MAX_HANDSHAKES_PER_IP`]).
#[derive(Default, Clone)]
struct PerIp {
    open: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    /// When a refusal was last logged: a flood is counted in full but logged once a
    /// second.
    last_log: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

/// One handshake's place for its address; given back on drop.
struct IpPlace {
    open: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl PerIp {
    fn take(&self, ip: std::net::IpAddr) -> Option<IpPlace> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= MAX_HANDSHAKES_PER_IP {
            return None;
        }
        *n += 1;
        Some(IpPlace {
            open: self.open.clone(),
            ip,
        })
    }

    fn refused(&self, remote: SocketAddr) {
        crate::identity::count(Refusal::Handshake);
        let mut last = self.last_log.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            *last = Some(std::time::Instant::now());
            tracing::warn!(
                %remote,
                reason = Refusal::Handshake.label(),
                "cluster: refused connections from an address with {MAX_HANDSHAKES_PER_IP} TLS handshakes in progress (counted; logged at most once a second)"
            );
        }
    }
}

impl Drop for IpPlace {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

async fn handshake(
    config: Arc<ServerConfig>,
    tcp: TcpStream,
    remote: SocketAddr,
) -> Option<ClusterIo> {
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
            // Closed before a word of TLS: a TCP probe or a port scan, not a refusal.
            tracing::debug!(%remote, "cluster connection closed before its TLS handshake");
            return None;
        }
        Ok(Err(e)) => {
            count_refusal(
                Refusal::Handshake,
                "unauthenticated",
                Some(remote),
                &format!("a TLS handshake: {e}"),
            );
            return None;
        }
        Err(_) => {
            count_refusal(
                Refusal::Handshake,
                "unauthenticated",
                Some(remote),
                "a TLS handshake: timed out",
            );
            return None;
        }
    };
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first().cloned());
    let peer = match leaf.as_deref().map(Peer::from_cert) {
        Some(Ok(p)) => p,
        Some(Err(e)) => {
            count_refusal(
                Refusal::NoIdentity,
                "unidentified",
                Some(remote),
                &format!("a connection: {e}"),
            );
            return None;
        }
        None => {
            count_refusal(
                Refusal::Handshake,
                "unauthenticated",
                Some(remote),
                "a connection without a client certificate",
            );
            return None;
        }
    };
    tracing::debug!(%peer, %remote, "cluster connection accepted");
    let expires = leaf.as_deref().and_then(not_after);
    Some(ClusterIo {
        stream: Either::Right(Box::new(tls)),
        info: ClusterConn {
            remote: Some(remote),
            peer,
        },
        expires,
        expired: false,
    })
}

type DialFuture = Pin<
    Box<
        dyn Future<
                Output = Result<
                    hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
                    io::Error,
                >,
            > + Send,
    >,
>;

fn dial(certs: Arc<Certs>, expect: Expect, uri: Uri) -> DialFuture {
    Box::pin(async move {
        let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
        let port = uri.port_u16().unwrap_or(80);
        let tcp = TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        let config = certs.current().client.clone();
        // The name is not checked (identities are URI SANs); rustls needs one to send.
        let name = ServerName::try_from("weft.cluster").expect("literal name");
        let tls = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsConnector::from(config).connect(name, tcp),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| Peer::from_cert(c));
        match peer {
            Some(Ok(p)) if expect.accepts(&p) => Ok(hyper_util::rt::TokioIo::new(tls)),
            Some(Ok(p)) => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("dialled {uri} expecting {expect:?} but {p} answered"),
            )),
            Some(Err(e)) => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                e.to_string(),
            )),
            None => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the server sent no certificate",
            )),
        }
    })
}

/// The `[cluster]` section of both binaries: the member's certificate material, or
/// the explicit choice to run without (`cluster.insecure`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// PEM CA bundle members must chain to (`--cluster-ca-file`).
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain of this member (`--cluster-cert-file`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of this member (`--cluster-key-file`); only the path is ever
    /// printed or logged.
    pub key_file: Option<PathBuf>,
    /// Plaintext cluster connections, for experiments (`--cluster-insecure`).
    pub insecure: bool,
}

/// The one line a member started in cluster mode without certificates prints.
pub const NEEDS_TLS: &str = "cluster connections need mutual TLS: set cluster.ca_file, cluster.cert_file and cluster.key_file (--cluster-ca-file etc.; `weft-router certs --out DIR` writes a dev set), or pass --cluster-insecure for an experiment";

impl ClusterConfig {
    /// The files, when all three are set; an error when only some are.
    pub fn files(&self) -> Result<Option<TlsFiles>, String> {
        match (&self.ca_file, &self.cert_file, &self.key_file) {
            (Some(ca), Some(cert), Some(key)) => Ok(Some(TlsFiles {
                ca_file: ca.clone(),
                cert_file: cert.clone(),
                key_file: key.clone(),
            })),
            (None, None, None) => Ok(None),
            _ => Err(
                "cluster.ca_file, cluster.cert_file and cluster.key_file go together: set all three"
                    .into(),
            ),
        }
    }

    /// Checks the combination without reading files: TLS, or `insecure`, or (when
    /// `plaintext_ok`: an embedded router on loopback) neither.
    pub fn check(&self, plaintext_ok: bool) -> Result<(), String> {
        let files = self.files()?;
        if files.is_some() && self.insecure {
            return Err(
                "cluster.insecure contradicts the cluster certificate files: choose one".into(),
            );
        }
        if files.is_none() && !self.insecure && !plaintext_ok {
            return Err(NEEDS_TLS.into());
        }
        Ok(())
    }

    /// Builds the transport: loads the certificates and checks that they name `me`.
    pub fn transport(&self, me: &Peer, plaintext_ok: bool) -> Result<Transport, String> {
        self.check(plaintext_ok)?;
        let Some(files) = self.files()? else {
            return Ok(Transport::Plaintext);
        };
        let certs = Certs::load_member(files).map_err(|e| e.to_string())?;
        let named = certs.identity();
        if named != *me {
            return Err(format!(
                "the cluster certificate names {named}, but this member is {me}"
            ));
        }
        Ok(Transport::MutualTls(certs))
    }
}

impl Transport {
    /// Starts reloading the certificates on SIGHUP and file changes (mutual TLS only).
    pub fn spawn_reloader(&self) -> Option<tokio::task::JoinHandle<()>> {
        match self {
            Self::Plaintext => None,
            Self::MutualTls(certs) => Some(tokio::spawn(certs.clone().watch())),
        }
    }
}

/// Logs the insecure-mode warning at start and every minute, forever.
pub async fn warn_insecure_forever(what: &'static str) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        tracing::warn!(
            "{what}: --cluster-insecure: cluster connections are plaintext and unauthenticated; anyone who reaches the cluster listener can join, read and change the cluster"
        );
    }
}
