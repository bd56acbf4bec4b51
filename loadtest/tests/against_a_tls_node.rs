//! The harness against a node that serves HTTPS and WSS (`tls.cert_file`/`tls.key_file`)
//! with a certificate from a CA the test makes: with `--ca-file` every transport runs
//! clean over TLS, in one process, as `--workers` child processes and as a coordinator's
//! remote workers; without it (or with the wrong CA, or a certificate that does not name
//! the target's IP address) the run fails at once with an error that says why (naming
//! `--ca-file` for an untrusted CA), a coordinator's included.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use weft_loadtest::app;
use weft_loadtest::cli::Cli;
use weft_loadtest::report::Report;
use weft_testkit::TestNode;

mod common;
use common::exec;

/// A directory of PEM files, removed when dropped.
struct Dir(PathBuf);

impl Dir {
    fn new(test: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("weft-loadtest-tls-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert!(
            !dir.to_string_lossy().contains(char::is_whitespace),
            "paths go into command lines"
        );
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

type Ca = CertifiedIssuer<'static, KeyPair>;

/// A CA, its certificate written to `dir/<name>.crt`.
fn ca(dir: &Dir, name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} test CA"));
    let ca = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.path(&format!("{name}.crt")), ca.pem()).unwrap();
    ca
}

/// A server certificate for `names` (an IP address becomes an IP SAN), signed by `ca`,
/// as `dir/<file>.{crt,key}`.
fn leaf(ca: &Ca, dir: &Dir, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let p =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    let cert = p.signed_by(&key, ca).unwrap();
    let (crt, keyf) = (
        dir.path(&format!("{file}.crt")),
        dir.path(&format!("{file}.key")),
    );
    std::fs::write(&keyf, key.serialize_pem()).unwrap();
    std::fs::write(&crt, cert.pem()).unwrap();
    (crt, keyf)
}

/// A node serving TLS with `cert` and `key`.
async fn tls_node(cert: PathBuf, key: PathBuf) -> TestNode {
    TestNode::start_with(|c| {
        c.timing.shutdown_grace_ms = 1000;
        c.tls.cert_file = Some(cert);
        c.tls.key_file = Some(key);
    })
    .await
}

fn https(node: &TestNode) -> String {
    format!("https://{}", node.addr)
}

/// Runs the harness in process; its report, or its error as text (within 30 s: a
/// refused certificate must not hang).
async fn try_run(args: &str) -> Result<Report, String> {
    let mut argv = vec!["weft-loadtest"];
    argv.extend(args.split_whitespace());
    argv.extend(["--quiet", "--drain-timeout", "10s", "--ramp-timeout", "10s"]);
    let cli = Cli::try_parse_from(&argv).expect("arguments parse");
    let out = tokio::time::timeout(Duration::from_secs(30), app::execute(&cli.command))
        .await
        .expect("the run ends by itself");
    match out {
        Ok(r) => Ok(r.expect("a local run returns its report")),
        Err(e) => Err(format!("{e:#}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transport_runs_clean_over_tls_with_ca_file() {
    let dir = Dir::new("clean");
    let authority = ca(&dir, "ca");
    let (crt, key) = leaf(&authority, &dir, "node", &["127.0.0.1"]);
    let node = tls_node(crt, key).await;
    let target = https(&node);
    let ca_file = dir.arg("ca.crt");
    for transport in ["ws", "sse", "longpoll"] {
        let r = try_run(&format!(
            "fanout --target {target} --ca-file {ca_file} --transport {transport} \
             --subscribers 6 --topics 2 --rate 100 --duration 1s --longpoll-wait 1s"
        ))
        .await
        .unwrap_or_else(|e| panic!("{transport} over TLS: {e}"));
        eprintln!("{}", r.table());
        common::assert_clean(&r);
        assert_eq!(r.published, 100, "{transport}");
        assert_eq!(r.expected, 100 * 3, "{transport}: 3 subscribers per topic");
        assert_eq!((r.lost, r.connect_failures), (0, 0), "{transport}");
        assert_eq!(r.transport, transport);
        assert_eq!(r.config["tls"], true, "the report says the run used TLS");
    }
    node.stop_within(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_fails_the_run_at_once_naming_ca_file() {
    let dir = Dir::new("untrusted");
    let authority = ca(&dir, "ca");
    let _other = ca(&dir, "other");
    let (crt, key) = leaf(&authority, &dir, "node", &["127.0.0.1"]);
    let node = tls_node(crt, key).await;
    let target = https(&node);
    let load =
        format!("fanout --target {target} --subscribers 4 --topics 1 --rate 20 --duration 1s");

    for transport in ["ws", "sse"] {
        let started = std::time::Instant::now();
        let e = try_run(&format!("{load} --transport {transport}"))
            .await
            .expect_err("the platform's roots do not hold the test CA");
        assert!(
            e.contains("not trusted") && e.contains("pass the CA that signed it with --ca-file"),
            "{e}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "failed at the first handshake, not after retries ({:?})",
            started.elapsed()
        );
    }
    // Another CA's bundle: still refused, and the message points at the bundle.
    let e = try_run(&format!("{load} --ca-file {}", dir.arg("other.crt")))
        .await
        .expect_err("another CA does not vouch for the node");
    assert!(
        e.contains("not trusted") && e.contains("the --ca-file bundle does not hold"),
        "{e}"
    );

    // The right CA, but a certificate that names a DNS host only: an IP-address
    // target is verified against the certificate's IP addresses.
    let (crt, key) = leaf(&authority, &dir, "dns-only", &["weft.test"]);
    let dns_only = tls_node(crt, key).await;
    let e = try_run(&format!(
        "fanout --target {} --ca-file {} --subscribers 2 --topics 1 --rate 10 --duration 1s",
        https(&dns_only),
        dir.arg("ca.crt")
    ))
    .await
    .expect_err("127.0.0.1 is not a name of the certificate");
    assert!(e.contains("does not name 127.0.0.1"), "{e}");

    // A plain-HTTP target given as https:// is a TLS failure, said as such.
    let plain = TestNode::start().await;
    let e = try_run(&format!(
        "fanout --target https://{} --subscribers 2 --topics 1 --rate 10 --duration 1s",
        plain.addr
    ))
    .await
    .expect_err("the plain node does not speak TLS");
    assert!(e.contains("TLS handshake with 127.0.0.1 failed"), "{e}");
    for n in [node, dns_only, plain] {
        n.stop_within(Duration::from_secs(10)).await;
    }
}

fn report(path: &Path) -> Report {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `--workers 2` (the CA from `WEFT_LOADTEST_CA_FILE`, which the children inherit) and a
/// coordinator with two remote workers each given `--ca-file`, as the Helm chart runs a
/// distributed load against an https Service: one merged report, nothing lost; a
/// remote worker without the CA fails the coordinator with its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_and_remote_workers_run_over_tls() {
    let dir = Dir::new("workers");
    let authority = ca(&dir, "ca");
    let (crt, key) = leaf(&authority, &dir, "node", &["127.0.0.1"]);
    let node = tls_node(crt, key).await;
    let target = https(&node);
    let ca_file = dir.arg("ca.crt");

    let json = dir.path("workers.json");
    let out = exec(
        &format!(
            "fanout --target {target} --workers 2 --subscribers 8 --topics 2 --rate 100 \
             --duration 2s --quiet --json {} --slo loss=0,duplicates=0",
            json.display()
        ),
        &[("WEFT_LOADTEST_CA_FILE", &ca_file)],
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    let r = report(&json);
    assert_eq!(r.processes, 2);
    assert_eq!(r.published, 200);
    assert_eq!((r.expected, r.delivered, r.lost), (800, 800, 0));

    // Without the CA the parent refuses before starting any worker.
    let out = exec(
        &format!(
            "fanout --target {target} --workers 2 --subscribers 4 --topics 1 --duration 1s --quiet"
        ),
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--ca-file") && !stderr.contains("worker"),
        "{stderr}"
    );

    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let json = dir.path("coordinated.json");
    let load = format!(
        "fanout --target {target} --ca-file {ca_file} --run-id tlsrun --subscribers 8 \
         --topics 2 --rate 100 --duration 2s --quiet"
    );
    let coordinator = format!(
        "{load} --coordinate {addr} --workers 2 --json {} --slo loss=0",
        json.display()
    );
    let worker = |slot: &str| format!("{load} --coordinator {addr} --worker-slot {slot}");
    let (w0, w1) = (worker("0/2"), worker("1/2"));
    let (c, a, b) = tokio::join!(exec(&coordinator, &[]), exec(&w0, &[]), exec(&w1, &[]));
    assert_eq!(
        (c.status.code(), a.status.code(), b.status.code()),
        (Some(0), Some(0), Some(0))
    );
    let r = report(&json);
    assert_eq!(r.processes, 2);
    assert_eq!((r.expected, r.delivered, r.lost), (800, 800, 0));

    // A remote worker without the CA: the coordinator's error says why it failed.
    let lone = format!(
        "fanout --target {target} --run-id tlsrun --subscribers 2 --topics 1 --duration 1s \
         --quiet --coordinate {addr} --workers 1"
    );
    let stray = format!(
        "fanout --target {target} --run-id tlsrun --subscribers 2 --topics 1 --duration 1s \
         --quiet --coordinator {addr} --worker-slot 0/1"
    );
    let (c, w) = tokio::join!(exec(&lone, &[]), exec(&stray, &[]));
    assert_eq!((c.status.code(), w.status.code()), (Some(1), Some(1)));
    let stderr = String::from_utf8_lossy(&c.stderr);
    assert!(
        stderr.contains("worker 0 failed: --target https://")
            && stderr.contains("pass the CA that signed it with --ca-file"),
        "{stderr}"
    );
    node.stop_within(Duration::from_secs(10)).await;
}
