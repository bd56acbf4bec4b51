//! HTTPS and WSS on the node's own listener, with a test CA made by rcgen and a real
//! rustls client: requests and WebSocket sessions work over TLS, and a certificate
//! replaced on disk is picked up for new handshakes while a live WSS session goes on.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use weft_testkit::TestNode;

fn ca() -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

/// A server certificate for 127.0.0.1 signed by `ca`, written as PEM files.
fn write_leaf(ca: &CertifiedIssuer<'static, KeyPair>, dir: &std::path::Path, cn: &str) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, cn.to_owned());
    let cert = p.signed_by(&key, ca).unwrap();
    // Write the key first: the node reloads when either file changes and needs a
    // matching pair, so the certificate lands last.
    std::fs::write(dir.join("tls.key.tmp"), key.serialize_pem()).unwrap();
    std::fs::rename(dir.join("tls.key.tmp"), dir.join("tls.key")).unwrap();
    std::fs::write(dir.join("tls.crt.tmp"), cert.pem()).unwrap();
    std::fs::rename(dir.join("tls.crt.tmp"), dir.join("tls.crt")).unwrap();
    cert.der().to_vec()
}

fn connector(ca: &CertifiedIssuer<'static, KeyPair>) -> TlsConnector {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

async fn tls_connect(
    c: &TlsConnector,
    addr: std::net::SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    c.connect(name, tcp).await.unwrap()
}

/// One HTTPS request over a fresh connection: the status line and the peer's
/// certificate.
async fn https_get(c: &TlsConnector, addr: std::net::SocketAddr, path: &str) -> (String, Vec<u8>) {
    let mut tls = tls_connect(c, addr).await;
    let peer = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).to_string();
    (text.lines().next().unwrap_or("").to_owned(), peer)
}

/// Publishes through the node itself (the harness's HTTP client speaks plain HTTP).
async fn publish(node: &TestNode, data: &'static str) {
    node.node
        .publish(
            "tls.t",
            bytes::Bytes::from_static(data.as_bytes()),
            None,
            None,
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn https_and_wss_work_and_a_new_certificate_is_picked_up_under_live_sessions() {
    let dir = std::env::temp_dir().join(format!("weft-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let authority = ca();
    let first = write_leaf(&authority, &dir, "first");
    let node = TestNode::start_with(|c| {
        c.tls.cert_file = Some(dir.join("tls.crt"));
        c.tls.key_file = Some(dir.join("tls.key"));
    })
    .await;
    let client = connector(&authority);

    let (status, peer) = https_get(&client, node.addr, "/healthz").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(peer, first);
    // Plain HTTP on the TLS port is not served.
    let mut plain = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), plain.read(&mut buf))
        .await
        .map(|r| r.unwrap_or(0))
        .unwrap_or(0);
    assert!(!String::from_utf8_lossy(&buf[..n]).contains("200 OK"));

    // A WSS session subscribes and receives.
    let tls = tls_connect(&client, node.addr).await;
    let mut req = "wss://127.0.0.1/v1/ws".into_client_request().unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "weft.v1.json".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::client_async(req, tls).await.unwrap();
    ws.send(Message::text(r#"{"id":1,"subscribe":{"topic":"tls.t"}}"#))
        .await
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(reply.to_text().unwrap().contains("\"id\":1"), "{reply:?}");
    publish(&node, r#"{"n":1}"#).await;
    let ev = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(ev.to_text().unwrap().contains(r#"{"n":1}"#));

    // Rotate the certificate on disk (as cert-manager does): new handshakes get it…
    tokio::time::sleep(Duration::from_millis(1100)).await; // a distinct mtime
    let second = write_leaf(&authority, &dir, "second");
    let mut rotated = false;
    for _ in 0..40 {
        if https_get(&client, node.addr, "/healthz").await.1 == second {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(rotated, "the new certificate is served within 10 s");
    // …and the live session is still there and still receives, in order.
    publish(&node, r#"{"n":2}"#).await;
    let ev = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(ev.to_text().unwrap().contains(r#"{"n":2}"#), "{ev:?}");
}

/// The real binary reloads its certificate on SIGHUP at once (its file poll runs every
/// 5 s; the reload here must come well before that, and its log names SIGHUP).
#[tokio::test]
async fn sighup_makes_the_binary_serve_a_replaced_certificate_at_once() {
    use weft_testkit::bin;
    let work = bin::Workdir::new("tls", "sighup");
    let dir = work.root().to_owned();
    let authority = ca();
    let first = write_leaf(&authority, &dir, "first");
    let config = dir.join("node.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            dir.join("tls.crt").display(),
            dir.join("tls.key").display()
        ),
    )
    .unwrap();
    let log = work.log("node", "node.log");
    let out = bin::log_file(&log);
    let ready = dir.join("ready.json");
    let mut child = bin::loopback_node(&dir)
        .args(["--config", config.to_str().unwrap()])
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("spawn weft-node");
    let info = bin::await_ready_file(&mut child, &ready, "weft-node").await;
    let node = bin::Proc(child);
    let addr: std::net::SocketAddr = info["http"].as_str().unwrap().parse().unwrap();
    let client = connector(&authority);
    let (status, peer) = https_get(&client, addr, "/healthz").await;
    assert_eq!((status.as_str(), peer), ("HTTP/1.1 200 OK", first));

    let second = write_leaf(&authority, &dir, "second");
    let sent = std::time::Instant::now();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &node.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    loop {
        let (_, peer) = https_get(&client, addr, "/healthz").await;
        if peer == second {
            break;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(3),
            "still the old certificate {:?} after SIGHUP",
            sent.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines()
            .any(|l| l.contains("TLS certificate reloaded") && l.contains("SIGHUP")),
        "the reload is logged as SIGHUP's:\n{text}"
    );
    drop(node);
}
