//! The Helm chart (`helm/weft`), proved without a Kubernetes API server but with the
//! real tools: `helm lint` and `helm template` over the values matrix in
//! `helm/tests/values/`, every rendered manifest validated by `kubernetes-validate`
//! against the API schemas of a current Kubernetes release, `values.schema.json` and
//! the chart's own checks rejecting every file in `helm/tests/bad/` with the error it
//! names, the rendered node configuration accepted by the real `weft-node`, the
//! rendered preStop hook draining a real node, and `hadolint` on the Dockerfile.
//!
//! A missing tool skips its check loudly, and fails it when `CI` is set
//! (`deploy/mod.rs`).

mod deploy;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use deploy::{block_scalar, document, render, root, run, text, tool, yaml_files};

const NODE_BIN: &str = env!("CARGO_BIN_EXE_weft-node");
/// The release of the Kubernetes API schemas the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.35.0";

fn helm() -> Option<std::path::PathBuf> {
    tool("helm", "HELM")
}

fn temp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("weft-helm-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn every_values_file_lints_renders_and_validates() {
    let Some(helm) = helm() else { return };
    let Some(validate) = tool("kubernetes-validate", "KUBERNETES_VALIDATE") else {
        return;
    };
    let dir = temp("matrix");
    let files = yaml_files("helm/tests/values");
    assert!(files.len() >= 9, "the matrix lost files: {files:?}");
    for values in &files {
        let name = values.file_stem().unwrap().to_string_lossy();
        let lint = run(Command::new(&helm)
            .args(["lint", "--strict", deploy::chart().to_str().unwrap(), "-f"])
            .arg(values));
        assert!(
            lint.status.success(),
            "helm lint -f {name}:\n{}{}",
            text(&lint.stdout),
            text(&lint.stderr)
        );
        let manifests = render(&helm, Some(values), &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
        let file = dir.join(format!("{name}.yaml"));
        std::fs::write(&file, &manifests).unwrap();
        let out = run(Command::new(&validate)
            .args(["--strict", "--quiet", "-k", KUBERNETES_VERSION])
            .arg(&file));
        assert!(
            out.status.success(),
            "kubernetes-validate {name}:\n{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        // Both StatefulSets are always there.
        document(&manifests, "StatefulSet", "-router");
        document(&manifests, "StatefulSet", "-node");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn schema_and_chart_checks_reject_every_bad_values_file() {
    let Some(helm) = helm() else { return };
    let files = yaml_files("helm/tests/bad");
    assert!(files.len() >= 8, "the bad values lost files: {files:?}");
    for values in &files {
        let body = std::fs::read_to_string(values).unwrap();
        let expect = body
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no `# expect:` line", values.display()));
        match render(&helm, Some(values), &[]) {
            Ok(_) => panic!("{} was accepted", values.display()),
            Err(e) => assert!(
                e.contains(expect),
                "{}: expected an error naming `{expect}`, got:\n{e}",
                values.display()
            ),
        }
    }
}

fn values(name: &str) -> std::path::PathBuf {
    root()
        .join("helm/tests/values")
        .join(format!("{name}.yaml"))
}

#[test]
fn rendered_objects_carry_what_the_lifecycle_needs() {
    let Some(helm) = helm() else { return };
    let m = render(&helm, Some(&values("default")), &[]).unwrap();
    let router = document(&m, "StatefulSet", "-router");
    assert!(router.contains("replicas: 3"), "{router}");
    assert!(router.contains("podManagementPolicy: Parallel"));
    assert!(router.contains("fieldPath: metadata.labels['apps.kubernetes.io/pod-index']"));
    assert!(router.contains("volumeClaimTemplates:"));
    // Peers are named by their Raft port, which has a listener of its own.
    let peers = "0=weft-router-0.weft-router-peers.rt.svc:9401,\
                 1=weft-router-1.weft-router-peers.rt.svc:9401,\
                 2=weft-router-2.weft-router-peers.rt.svc:9401";
    assert!(router.contains(peers), "{router}");
    assert!(router.contains("value: \"0.0.0.0:9401\""), "{router}");
    // Only routers may reach the Raft port.
    let policy = document(&m, "NetworkPolicy", "-router");
    let raft_rule = policy
        .split("- ports:")
        .find(|r| r.contains("port: 9401"))
        .expect("a rule for the Raft port");
    assert!(
        raft_rule.contains("app.kubernetes.io/component: router"),
        "{policy}"
    );
    let node = document(&m, "StatefulSet", "-node");
    // 10 s handoff + 10 s shutdown grace + 5 s margin.
    assert!(node.contains("terminationGracePeriodSeconds: 25"), "{node}");
    assert!(node.contains("path: /readyz") && node.contains("path: /healthz"));
    assert!(node.contains("command: [\"/bin/bash\", \"/etc/weft/config/prestop.sh\"]"));
    assert!(
        node.contains("value: \"$(POD_NAME).weft-cluster.rt.svc:9100\""),
        "{node}"
    );
    // The routers' ops listener: probes, a ServiceMonitor, the no-leader alert on
    // the routers' own metric.
    assert!(router.contains("value: \"0.0.0.0:9090\""), "{router}");
    assert!(router.contains("path: /readyz") && router.contains("path: /healthz"));
    document(&m, "ServiceMonitor", "-router");
    assert!(document(&m, "Service", "-router-ops").contains("weft.io/ops: \"true\""));
    let rule = document(&m, "PrometheusRule", "weft");
    assert!(
        rule.contains(
            "sum(weft_router_is_leader{namespace=\"rt\", service=\"weft-router-ops\"}) < 1"
        ),
        "{rule}"
    );
    // The node's ops listener is the default: probes, /metrics and the admin route the
    // preStop drain calls are on the ops port, which neither the client Service nor
    // the Ingress reaches.
    assert_ops_on(&m, "ops", 9090);
    // The gRPC port is reserved, not bound: nothing routes or admits traffic to it.
    let cluster_svc = document(&m, "Service", "weft-cluster");
    assert!(
        cluster_svc.contains("port: 9100\n      targetPort: cluster")
            && !cluster_svc.contains("9000"),
        "{cluster_svc}"
    );
    assert!(!document(&m, "NetworkPolicy", "-node").contains("9000"));
    assert!(!document(&m, "StatefulSet", "-node").contains("containerPort: 9000"));
    document(&m, "PodDisruptionBudget", "-router");
    // Secure by default: client auth with generated keys, cluster mTLS from the
    // chart's CA, each pod's certificate signed by its init container.
    for sts in [node, router] {
        assert!(sts.contains("command: [\"/usr/local/bin/weft-node\", \"cluster-cert\"]"));
        assert!(sts.contains("value: /etc/weft/cluster/tls.crt"), "{sts}");
        assert!(!sts.contains("WEFT_CLUSTER_INSECURE") && !sts.contains("ALLOW_ANONYMOUS"));
        assert!(sts.contains("secretName: weft-cluster-signer"));
    }
    assert!(
        node.contains("- weft://node/$(POD_NAME)") && router.contains("- weft://router/$(WEFT_ID)")
    );
    assert!(
        node.contains("WEFT_AUTH_HMAC_SECRET_FILE") && node.contains("mountPath: /etc/weft/admin")
    );
    document(&m, "Secret", "-cluster-signer");
    let test_pod = document(&m, "Pod", "-loadtest");
    assert!(test_pod.contains("name: weft-auth") && test_pod.contains("key: loadtest-key"));

    let m = render(&helm, Some(&values("development")), &[]).unwrap();
    let node = document(&m, "StatefulSet", "-node");
    assert!(node.contains("WEFT_CLUSTER_INSECURE") && node.contains("WEFT_AUTH_ALLOW_ANONYMOUS"));
    assert!(!node.contains("initContainers:") && !m.contains("kind: Secret"));

    // The grace period follows the node's shutdown grace.
    let m = render(&helm, None, &["node.config.timing.shutdown_grace_ms=30500"]).unwrap();
    assert!(document(&m, "StatefulSet", "-node").contains("terminationGracePeriodSeconds: 46"));

    let m = render(&helm, Some(&values("five-routers")), &[]).unwrap();
    let router = document(&m, "StatefulSet", "-router");
    assert!(router.contains("4=weft-router-4.weft-router-peers.rt.svc:9401"));
    assert!(router.contains("requiredDuringSchedulingIgnoredDuringExecution"));

    let m = render(&helm, Some(&values("cert-manager")), &[]).unwrap();
    for i in 0..3 {
        let cert = document(&m, "Certificate", &format!("-router-{i}"));
        assert!(cert.contains(&format!("- weft://router/{i}")), "{cert}");
    }
    let node = document(&m, "StatefulSet", "-node");
    assert!(node.contains("csi.cert-manager.io/uri-sans: \"weft://node/${POD_NAME}\""));
    assert!(node.contains("WEFT_CLUSTER_CERT_FILE") && !node.contains("WEFT_CLUSTER_INSECURE"));

    let m = render(&helm, Some(&values("cert-manager-secrets")), &[]).unwrap();
    // One certificate per possible node pod (HPA maximum 5).
    let cert = document(&m, "Certificate", "-node-4");
    assert!(cert.contains("- weft://node/weft-node-4"), "{cert}");

    let m = render(&helm, Some(&values("hpa-custom-metric")), &[]).unwrap();
    let hpa = document(&m, "HorizontalPodAutoscaler", "-node");
    assert!(
        hpa.contains("name: weft_connections_per_pod") && hpa.contains("averageUtilization: 70")
    );
    let node = document(&m, "StatefulSet", "-node");
    assert!(
        !node.lines().any(|l| l.starts_with("  replicas:")),
        "the HPA owns the replica count"
    );

    let m = render(&helm, Some(&values("ingress")), &[]).unwrap();
    let ingress = document(&m, "Ingress", "weft");
    assert!(ingress.contains("nginx.ingress.kubernetes.io/proxy-buffering: \"off\""));
    assert!(ingress.contains("nginx.ingress.kubernetes.io/proxy-read-timeout: \"3600\""));
    assert!(document(&m, "HTTPRoute", "weft").contains("request: \"0s\""));

    let m = render(&helm, Some(&values("tls")), &[]).unwrap();
    let node = document(&m, "StatefulSet", "-node");
    assert!(node.contains("WEFT_TLS_CERT_FILE") && node.contains("port: ops"));
    assert!(node.contains("value: /etc/weft/cluster/$(POD_NAME).crt"));

    let m = render(&helm, Some(&values("minimal")), &[]).unwrap();
    assert!(!m.contains("kind: NetworkPolicy") && !m.contains("kind: PodDisruptionBudget"));

    // Without a separate ops listener everything ops follows to the HTTP port.
    let m = render(&helm, Some(&values("shared-port")), &[]).unwrap();
    assert_ops_on(&m, "http", 8080);
}

/// Where a render puts the node's ops surface: the probes, the ops Service (and its
/// ServiceMonitor), the NetworkPolicy's ops rule and the preStop drain call all on
/// container port `port_name` (`port`); `WEFT_OPS_LISTEN` is set only for `ops`.
fn assert_ops_on(m: &str, port_name: &str, port: u16) {
    let node = document(m, "StatefulSet", "-node");
    let separate = port_name == "ops";
    assert_eq!(
        node.contains(&format!(
            "- name: WEFT_OPS_LISTEN\n              value: \"0.0.0.0:{port}\""
        )),
        separate,
        "{node}"
    );
    assert_eq!(
        node.contains(&format!("- name: ops\n              containerPort: {port}")),
        separate,
        "{node}"
    );
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let at = node
            .find(&format!("{probe}:"))
            .unwrap_or_else(|| panic!("no {probe}"));
        let port_line = node[at..]
            .lines()
            .find(|l| l.trim_start().starts_with("port: "));
        assert_eq!(
            port_line.map(str::trim),
            Some(format!("port: {port_name}").as_str()),
            "{probe}"
        );
    }
    let ops = document(m, "Service", "weft-ops");
    assert!(
        ops.contains(&format!("port: {port}\n      targetPort: {port_name}")),
        "{ops}"
    );
    // The ServiceMonitor scrapes the ops Service's port by its name.
    assert!(ops.contains("- name: ops") && ops.contains("weft.io/ops: \"true\""));
    if m.contains("kind: ServiceMonitor") {
        assert!(document(m, "ServiceMonitor", "-node").contains("- port: ops"));
    }
    let client = deploy::documents(m)
        .into_iter()
        .find(|d| d.lines().any(|l| l == "kind: Service") && d.lines().any(|l| l == "  name: weft"))
        .expect("the client Service");
    assert!(client.contains("targetPort: http") && !client.contains("targetPort: ops"));
    let script = block_scalar(document(m, "ConfigMap", "-node-config"), "prestop.sh");
    assert!(
        script.contains(&format!("/dev/tcp/127.0.0.1/{port};")),
        "the drain call must go to {port}:\n{script}"
    );
    let policy = document(m, "NetworkPolicy", "-node");
    let has_ops_rule = policy.contains("- port: 9090");
    assert_eq!(has_ops_rule, separate, "{policy}");
}

/// NOTES.txt as `helm install` prints it (`--dry-run=client`: no API server).
fn notes(helm: &Path, values: Option<&Path>, set: &[&str]) -> String {
    let mut cmd = Command::new(helm);
    cmd.args(["install", "weft", deploy::chart().to_str().unwrap()])
        .args(["--namespace", "rt", "--dry-run=client"]);
    if let Some(v) = values {
        cmd.arg("-f").arg(v);
    }
    for s in set {
        cmd.args(["--set", s]);
    }
    let out = run(&mut cmd);
    assert!(
        out.status.success(),
        "helm install --dry-run: {}",
        text(&out.stderr)
    );
    let all = text(&out.stdout);
    all.split_once("\nNOTES:\n")
        .unwrap_or_else(|| panic!("no NOTES in\n{all}"))
        .1
        .to_owned()
}

/// With `tls.enabled` the client port speaks HTTPS only: the `helm test` pod and the
/// load Job's coordinator and workers target `https://` and trust the CA from the TLS
/// Secret (or `tls.ca.existingSecret`) through `--ca-file`, NOTES.txt shows https://
/// and wss://, and the Service and Ingress say the backend is HTTPS. Without TLS,
/// none of it.
#[test]
fn tls_values_make_the_load_tests_and_notes_speak_https() {
    let Some(helm) = helm() else { return };
    let Some(python) = tool("python3", "PYTHON3") else {
        return;
    };
    let pods = |set: &[&str], tls: bool| -> Vec<(String, serde_json::Value)> {
        let file = tls.then(|| values("tls"));
        let mut all = vec!["loadJob.enabled=true"];
        all.extend_from_slice(set);
        let yaml = render(&helm, file.as_deref(), &all).unwrap();
        deploy::manifests_json(&python, &yaml)
            .into_iter()
            .filter_map(|d| {
                let name = d["metadata"]["name"].as_str()?.to_owned();
                match d["kind"].as_str()? {
                    "Pod" => Some((name, d["spec"].clone())),
                    "Job" => Some((name, d["spec"]["template"]["spec"].clone())),
                    _ => None,
                }
            })
            .collect()
    };
    let tls_pods = pods(&[], true);
    assert_eq!(tls_pods.len(), 3, "test pod, coordinator, workers");
    for (name, spec) in &tls_pods {
        let args = deploy::strings(&spec["containers"][0]["args"]);
        let target = args.windows(2).find(|w| w[0] == "--target").map(|w| &w[1]);
        assert_eq!(
            target.map(String::as_str),
            Some("https://weft.rt.svc:80"),
            "{name}: {args:?}"
        );
        let ca = args
            .windows(2)
            .find(|w| w[0] == "--ca-file")
            .map(|w| w[1].clone())
            .unwrap_or_else(|| panic!("{name}: no --ca-file in {args:?}"));
        // The file is where a mounted volume puts the Secret's ca.crt.
        let mount = spec["containers"][0]["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| ca.starts_with(m["mountPath"].as_str().unwrap()))
            .unwrap_or_else(|| panic!("{name}: {ca} is on no mount"));
        let vol = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap();
        assert_eq!(vol["secret"]["secretName"], "weft-https", "{name}: {vol}");
        let item = &vol["secret"]["items"][0];
        assert_eq!(item["key"], "ca.crt");
        assert_eq!(
            format!(
                "{}/{}",
                mount["mountPath"].as_str().unwrap(),
                item["path"].as_str().unwrap()
            ),
            ca
        );
    }
    // A CA of its own, or the platform's roots only.
    for (name, spec) in pods(
        &["tls.ca.existingSecret=corp-ca", "tls.ca.key=root.pem"],
        true,
    ) {
        let vol = &spec["volumes"][0]["secret"];
        assert_eq!(
            (&vol["secretName"], &vol["items"][0]["key"]),
            (&"corp-ca".into(), &"root.pem".into()),
            "{name}"
        );
    }
    for (name, spec) in pods(&["tls.ca.key="], true) {
        let args = deploy::strings(&spec["containers"][0]["args"]);
        assert!(
            !args.contains(&"--ca-file".to_owned()) && spec["volumes"].is_null(),
            "{name}: {args:?}"
        );
        assert!(
            args.contains(&"https://weft.rt.svc:80".to_owned()),
            "{name}: {args:?}"
        );
    }
    for (name, spec) in pods(&[], false) {
        let args = deploy::strings(&spec["containers"][0]["args"]);
        assert!(
            args.contains(&"http://weft.rt.svc:80".to_owned()),
            "{name}: {args:?}"
        );
        assert!(
            !args.contains(&"--ca-file".to_owned()) && spec["volumes"].is_null(),
            "{name}"
        );
    }

    let said = notes(&helm, Some(&values("tls")), &[]);
    assert!(
        said.contains("https://localhost:8080/v1/topics/chat.lobby/events")
            && said.contains("wss://localhost:8080/v1/ws")
            && said.contains("--cacert weft-ca.crt"),
        "{said}"
    );
    assert!(
        !said.contains("http://") && !said.contains("ws://"),
        "{said}"
    );
    let plain = notes(&helm, None, &[]);
    assert!(
        plain.contains("http://localhost:8080") && plain.contains("ws://localhost:8080"),
        "{plain}"
    );
    assert!(
        !plain.contains("https://") && !plain.contains("wss://"),
        "{plain}"
    );

    let m = render(&helm, Some(&values("tls")), &["ingress.enabled=true"]).unwrap();
    assert!(m.contains("appProtocol: https"));
    let ingress = document(&m, "Ingress", "weft");
    assert!(
        ingress.contains("nginx.ingress.kubernetes.io/backend-protocol: \"HTTPS\""),
        "{ingress}"
    );
    let m = render(&helm, Some(&values("ingress")), &[]).unwrap();
    assert!(!document(&m, "Ingress", "weft").contains("backend-protocol"));
}

/// The rendered `weft.toml` of the values files that use no setting newer than this
/// build is accepted by the real binary, and means what the values say.
#[test]
fn rendered_node_config_is_accepted_by_weft_node() {
    let Some(helm) = helm() else { return };
    let dir = temp("config");
    let namespaces = [
        "node.config.namespaces[0].pattern=prices.>",
        "node.config.namespaces[0].slow_consumer=conflate",
        "node.config.namespaces[0].history_size=100",
        "node.config.limits.max_connections=250000",
    ];
    for (name, file, set) in [
        ("default", Some(values("default")), &[][..]),
        ("minimal", Some(values("minimal")), &[][..]),
        ("namespaces", None, &namespaces[..]),
    ] {
        let m = render(&helm, file.as_deref(), set).unwrap();
        let toml = block_scalar(document(&m, "ConfigMap", "-node-config"), "weft.toml");
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, &toml).unwrap();
        let out = run(Command::new(NODE_BIN)
            .env_clear()
            .arg("--config")
            .arg(&path)
            .arg("--print-config"));
        assert!(
            out.status.success(),
            "{name}: weft-node refused the rendered config:\n{toml}\n{}",
            text(&out.stderr)
        );
        let printed = text(&out.stdout);
        assert!(printed.contains("shutdown_grace_ms = 10000"), "{printed}");
        if name == "namespaces" {
            assert!(printed.contains("max_connections = 250000"), "{printed}");
            assert!(
                printed.contains("slow_consumer = \"conflate\""),
                "{printed}"
            );
            assert!(printed.contains("pattern = \"prices.>\""), "{printed}");
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// The node's top-level configuration keys the chart sets itself, from the value
/// named here (env in the pod spec, or tables it writes into `weft.toml`): they are
/// not part of `node.config`, and the schema rejects them there.
const CHART_OWNED_CONFIG: &[(&str, &str)] = &[
    ("http_listen", "node.ports.http"),
    ("grpc_listen", "node.ports.grpc"),
    ("cluster_listen", "node.ports.cluster"),
    ("quic_listen", "nothing (not bound by this build)"),
    ("advertise", "the pod's DNS name in the cluster Service"),
    ("node_id", "the pod's name"),
    ("router", "the router pods"),
    ("data_dir", "the pod's data volume"),
    ("log_format", "logging.format"),
    ("ready_file", "nothing (tests and scripts only)"),
    ("auth", "auth.*"),
    ("http", "http.allowedOrigins"),
    ("tls", "tls.*"),
    ("ops", "node.separateOpsListener, node.ports.ops"),
    ("cluster", "cluster.tls.*"),
];

/// The keys a schema object allows, after checking that it refuses any other.
fn strict<'a>(
    s: &'a serde_json::Value,
    at: &str,
) -> &'a serde_json::Map<String, serde_json::Value> {
    assert_eq!(
        s["additionalProperties"],
        serde_json::Value::Bool(false),
        "node.config{at} accepts unknown keys"
    );
    s["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("node.config{at} lists no properties"))
}

/// Whether a schema node admits a TOML value of that kind (type, enum, minimum).
fn schema_admits(schema: &serde_json::Value, v: &toml::Value) -> bool {
    if let Some(choices) = schema["enum"].as_array() {
        return v.as_str().is_some_and(|s| choices.iter().any(|c| c == s));
    }
    match (schema["type"].as_str(), v) {
        (Some("integer"), toml::Value::Integer(i)) => {
            schema["minimum"].as_i64().is_none_or(|min| *i >= min)
        }
        (Some("boolean"), toml::Value::Boolean(_)) => true,
        (Some("string"), toml::Value::String(_)) => true,
        _ => false,
    }
}

/// `values.schema.json` under `node.config` and the node agree: every key the real
/// `weft-node --print-config` prints is either allowed there (with a schema that
/// admits the printed default) or set by the chart from another value
/// ([`CHART_OWNED_CONFIG`]); the schema allows no key the node lacks; every level
/// refuses unknown keys, so a misspelt key fails `helm install`
/// (`helm/tests/bad/config-key-misspelt.yaml`) instead of crash-looping the pod.
#[test]
fn node_config_schema_matches_the_nodes_printed_config() {
    let dir = temp("schema-sync");
    // One namespace, so that its keys are printed; every optional top-level key set,
    // so that the printed config names them all.
    let file = dir.join("ns.toml");
    std::fs::write(&file, "[[namespaces]]\npattern = \"a.>\"\n").unwrap();
    let out = run(Command::new(NODE_BIN)
        .env_clear()
        .arg("--config")
        .arg(&file)
        .args([
            "--cluster-listen",
            "127.0.0.1:0",
            "--advertise",
            "127.0.0.1:1",
        ])
        .args(["--router", "127.0.0.1:9400", "--cluster-insecure"])
        .args(["--ops-listen", "127.0.0.1:0", "--ready-file"])
        .arg(dir.join("ready.json"))
        .arg("--print-config"));
    assert!(
        out.status.success(),
        "--print-config: {}",
        text(&out.stderr)
    );
    let printed: toml::Table = toml::from_str(&text(&out.stdout))
        .unwrap_or_else(|e| panic!("--print-config is not TOML ({e}):\n{}", text(&out.stdout)));
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy::chart().join("values.schema.json")).unwrap(),
    )
    .unwrap();
    let config = &schema["properties"]["node"]["properties"]["config"];
    let allowed = strict(config, "");
    let owned: Vec<&str> = CHART_OWNED_CONFIG.iter().map(|(k, _)| *k).collect();
    for key in printed.keys() {
        assert!(
            allowed.contains_key(key) != owned.contains(&key.as_str()),
            "`{key}`: weft-node has it, and the schema must allow it under node.config \
             or CHART_OWNED_CONFIG must name the value that sets it (not both)"
        );
    }
    for key in owned
        .iter()
        .copied()
        .chain(allowed.keys().map(String::as_str))
    {
        assert!(
            printed.contains_key(key),
            "`{key}` is not a key of weft-node's config:\n{}",
            text(&out.stdout)
        );
    }
    // Each section: the same keys, each printed default admitted.
    let same_keys = |at: &str, schema: &serde_json::Value, node: &toml::Table| {
        let props = strict(schema, at);
        let mut theirs: Vec<&String> = node.keys().collect();
        let mut ours: Vec<&String> = props.keys().collect();
        theirs.sort();
        ours.sort();
        assert_eq!(ours, theirs, "node.config{at}: schema keys vs weft-node's");
        for (k, v) in node {
            assert!(
                schema_admits(&props[k], v),
                "node.config{at}.{k}: the schema {} refuses the node's default {v}",
                props[k]
            );
        }
    };
    for (section, s) in allowed {
        let at = format!(".{section}");
        match &printed[section] {
            toml::Value::Table(t) => same_keys(&at, s, t),
            toml::Value::Array(items) => {
                assert_eq!(s["type"], "array", "{at}");
                let first = items[0].as_table().expect("an array of tables");
                same_keys(&format!("{at}[]"), &s["items"], first);
            }
            other => panic!("{at}: a scalar section {other}"),
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The rendered preStop script, run against a real node in both settings of
/// `node.separateOpsListener` (the default ops listener, and the shared HTTP port):
/// it starts the drain over HTTP on the port the render names, and returns only once
/// the node has exited, within the rendered grace.
#[test]
fn prestop_hook_drains_a_real_node_and_waits_for_its_exit() {
    let Some(helm) = helm() else { return };
    for separate in [true, false] {
        prestop_drains(&helm, separate);
    }
}

fn prestop_drains(helm: &Path, separate: bool) {
    let dir = temp(&format!("prestop-{separate}"));
    let (http, ops) = (free_port(), free_port());
    let m = render(
        helm,
        None,
        &[
            &format!("node.ports.http={http}"),
            &format!("node.ports.ops={ops}"),
            &format!("node.separateOpsListener={separate}"),
            "node.config.timing.shutdown_grace_ms=2000",
        ],
    )
    .unwrap();
    let script = block_scalar(document(&m, "ConfigMap", "-node-config"), "prestop.sh");
    let drain_port = if separate { ops } else { http };
    assert!(
        script.contains(&format!("/dev/tcp/127.0.0.1/{drain_port};")),
        "separateOpsListener={separate}: the hook does not call {drain_port}:\n{script}"
    );
    let script_path = dir.join("prestop.sh");
    std::fs::write(&script_path, &script).unwrap();
    let ready = dir.join("ready.json");
    // The listeners the rendered env asks for.
    let sts = document(&m, "StatefulSet", "-node");
    assert_eq!(sts.contains("WEFT_OPS_LISTEN"), separate, "{sts}");
    let mut cmd = Command::new(NODE_BIN);
    cmd.env_clear()
        .args(["--http-listen", &format!("127.0.0.1:{http}")])
        .args([
            "--cluster-listen",
            "127.0.0.1:0",
            "--shutdown-grace-ms",
            "2000",
        ])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--ready-file")
        .arg(&ready)
        .stderr(Stdio::piped());
    if separate {
        cmd.args(["--ops-listen", &format!("127.0.0.1:{ops}")]);
    }
    let mut node = cmd.spawn().expect("start weft-node");
    weft_testkit::bin::wait_ready_file(&mut node, &ready, "weft-node");
    let pid = node.id();
    // Reap the node as soon as it exits, so `kill -0` in the hook sees it gone.
    let waiter = std::thread::spawn(move || {
        let status = node.wait().unwrap();
        let mut err = String::new();
        use std::io::Read;
        let _ = node.stderr.take().unwrap().read_to_string(&mut err);
        (status, err, Instant::now())
    });
    let started = Instant::now();
    let hook = run(Command::new("bash")
        .arg(&script_path)
        .env("WEFT_PID", pid.to_string()));
    let hook_done = Instant::now();
    let (status, stderr, exited) = waiter.join().unwrap();
    let said = text(&hook.stdout);
    assert!(
        hook.status.success(),
        "preStop failed: {said}{}",
        text(&hook.stderr)
    );
    assert!(
        said.contains("drain started"),
        "separateOpsListener={separate}: the hook did not start the drain over HTTP: {said}"
    );
    assert!(
        status.success(),
        "the drained node exited with {status}:\n{stderr}"
    );
    assert!(
        hook_done >= exited,
        "the hook returned before the node exited"
    );
    // Rendered terminationGracePeriodSeconds: 10 + 2 + 5.
    assert!(sts.contains("terminationGracePeriodSeconds: 17"));
    assert!(
        hook_done - started < Duration::from_secs(17),
        "the drain outlived the grace period"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn dockerfile_passes_hadolint() {
    let Some(hadolint) = tool("hadolint", "HADOLINT") else {
        return;
    };
    let dockerfile = root().join("Dockerfile");
    let out = run(Command::new(hadolint).arg(&dockerfile));
    assert!(
        out.status.success(),
        "hadolint {}:\n{}{}",
        Path::new(&dockerfile).display(),
        text(&out.stdout),
        text(&out.stderr)
    );
    let body = std::fs::read_to_string(&dockerfile).unwrap();
    assert!(
        !body.lines().any(|l| l.starts_with("HEALTHCHECK")),
        "probes belong to Kubernetes"
    );
    assert!(
        body.contains("USER 10001"),
        "the runtime image runs as non-root"
    );
}

/// One instruction of a Dockerfile: its keyword (upper case) and its arguments, with
/// line continuations joined and comments dropped.
fn dockerfile_instructions(body: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in body.lines() {
        let t = line.trim();
        if current.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if t.starts_with('#') {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(t);
                let (kw, rest) = current
                    .split_once(char::is_whitespace)
                    .unwrap_or((&current, ""));
                out.push((kw.to_ascii_uppercase(), rest.trim().to_owned()));
                current.clear();
            }
        }
    }
    out
}

/// The stages of a Dockerfile: each `FROM` and the instructions up to the next one.
fn dockerfile_stages(body: &str) -> Vec<Vec<(String, String)>> {
    let mut stages: Vec<Vec<(String, String)>> = Vec::new();
    for ins in dockerfile_instructions(body) {
        if ins.0 == "FROM" {
            stages.push(Vec::new());
        }
        if let Some(stage) = stages.last_mut() {
            stage.push(ins);
        }
    }
    stages
}

/// The workspace members of the root `Cargo.toml`.
fn workspace_members() -> Vec<String> {
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(root().join("Cargo.toml")).unwrap()).unwrap();
    manifest["workspace"]["members"]
        .as_array()
        .expect("[workspace] members")
        .iter()
        .map(|m| m.as_str().unwrap().to_owned())
        .collect()
}

/// What the stage that runs `cargo build` fails to copy into place before that build:
/// each workspace member (a directory, `COPY m m`) and the manifest and lock file
/// (`COPY Cargo.toml Cargo.lock ./`). Empty when nothing is missing.
fn missing_from_build_stage(dockerfile: &str, members: &[String]) -> Vec<String> {
    let stages = dockerfile_stages(dockerfile);
    let Some(build) = stages.iter().find(|s| {
        s.iter()
            .any(|(k, a)| k == "RUN" && a.contains("cargo build"))
    }) else {
        return vec!["a stage that runs `cargo build`".into()];
    };
    // (source, where it lands relative to WORKDIR), for COPYs before `cargo build`.
    let mut copied: Vec<(String, String)> = Vec::new();
    for (kw, args) in build {
        if kw == "RUN" && args.contains("cargo build") {
            break;
        }
        if kw != "COPY" || args.contains("--from") {
            continue;
        }
        let words: Vec<&str> = args
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        let Some((dest, sources)) = words.split_last() else {
            continue;
        };
        let norm = |p: &str| p.trim_start_matches("./").trim_end_matches('/').to_owned();
        let into_dir = dest.ends_with('/') || sources.len() > 1;
        for src in sources {
            let src = norm(src);
            let lands = if into_dir {
                let dir = norm(dest);
                if dir.is_empty() || dir == "." {
                    src.clone()
                } else {
                    format!("{dir}/{src}")
                }
            } else {
                norm(dest)
            };
            copied.push((src, lands));
        }
    }
    let wanted = members
        .iter()
        .cloned()
        .chain(["Cargo.toml".to_owned(), "Cargo.lock".to_owned()]);
    wanted
        .filter(|m| !copied.iter().any(|(src, lands)| src == m && lands == m))
        .collect()
}

/// The workspace cannot load in the image unless every member is in the build stage:
/// cargo reads every member's manifest (weft-testkit is only a dev-dependency, and is
/// still needed) and `--locked` needs Cargo.lock. No container runtime here, so this
/// is the guard that the image builds: the members come from Cargo.toml, not from a
/// list in this test.
#[test]
fn dockerfile_copies_every_workspace_member_into_the_build_stage() {
    let members = workspace_members();
    assert!(
        members.iter().any(|m| m == "testkit") && members.len() >= 5,
        "{members:?}"
    );
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let missing = missing_from_build_stage(&dockerfile, &members);
    assert!(
        missing.is_empty(),
        "the Dockerfile's build stage does not COPY {missing:?} (workspace members: {members:?})"
    );
    // The check itself: without a member's COPY, or after the build, it is missed.
    let without: String = dockerfile
        .lines()
        .filter(|l| l.trim() != "COPY testkit testkit")
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(missing_from_build_stage(&without, &members), ["testkit"]);
    let late = format!("{without}RUN cargo build\nCOPY testkit testkit\n");
    assert_eq!(missing_from_build_stage(&late, &members), ["testkit"]);
    // And the build context holds them: .dockerignore leaves out none of them.
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    for m in members
        .iter()
        .map(String::as_str)
        .chain(["Cargo.toml", "Cargo.lock"])
    {
        for pattern in ignore.lines().map(str::trim) {
            let p = pattern.trim_end_matches("/**").trim_end_matches('/');
            assert!(
                p != m && p != "*.lock" && p != "*.toml",
                ".dockerignore `{pattern}` leaves {m} out of the build context"
            );
        }
    }
}

/// The value of `ARG name=default` in a stage, `${OTHER}` expanded from the ARGs
/// before it.
fn arg_default(stage: &[(String, String)], name: &str) -> Option<String> {
    let mut seen: Vec<(String, String)> = Vec::new();
    for (kw, args) in stage {
        if kw != "ARG" {
            continue;
        }
        let (k, v) = args.split_once('=').unwrap_or((args, ""));
        let mut v = v.trim_matches('"').to_owned();
        for (pk, pv) in &seen {
            v = v.replace(&format!("${{{pk}}}"), pv);
        }
        seen.push((k.to_owned(), v));
    }
    seen.into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

/// The runtime image: a CA bundle for outgoing TLS (an https:// `auth.jwks`, https://
/// load-test targets), and OCI labels with absolute URLs and a version that is the
/// workspace's.
#[test]
fn runtime_image_has_ca_certificates_and_oci_labels() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let stages = dockerfile_stages(&dockerfile);
    let runtime = stages.last().expect("a runtime stage");
    assert!(
        runtime.iter().any(|(k, a)| k == "COPY"
            && a.contains("--from=build")
            && a.ends_with("/etc/ssl/certs/ca-certificates.crt")),
        "the runtime image has no CA bundle: {runtime:?}"
    );
    let labels: String = runtime
        .iter()
        .filter(|(k, _)| k == "LABEL")
        .map(|(_, a)| a.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    let label = |name: &str| -> String {
        let at = labels
            .find(&format!("org.opencontainers.image.{name}="))
            .unwrap_or_else(|| panic!("no label org.opencontainers.image.{name}: {labels}"));
        let v = labels[at..].split_once('=').unwrap().1;
        let v = v.split_whitespace().next().unwrap().trim_matches('"');
        // `${ARG}`: that ARG's default.
        match v.strip_prefix("${").and_then(|a| a.strip_suffix('}')) {
            Some(arg) => arg_default(runtime, arg)
                .unwrap_or_else(|| panic!("label {name} uses ${{{arg}}}, which has no ARG")),
            None => v.to_owned(),
        }
    };
    for name in ["source", "documentation"] {
        let url = label(name);
        assert!(
            url.starts_with("https://") && !url.contains("${"),
            "label {name} is not an absolute URL: {url}"
        );
    }
    let chart = std::fs::read_to_string(root().join("helm/weft/Chart.yaml")).unwrap();
    let home = chart
        .lines()
        .find_map(|l| l.strip_prefix("home: "))
        .unwrap();
    assert_eq!(
        label("source"),
        home,
        "the image's source is the chart's home"
    );
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(root().join("Cargo.toml")).unwrap()).unwrap();
    let version = manifest["workspace"]["package"]["version"]
        .as_str()
        .unwrap();
    assert_eq!(
        label("version"),
        version,
        "VERSION's default is the workspace's"
    );
    assert!(
        chart.contains(&format!("appVersion: \"{version}\"")),
        "{chart}"
    );
    assert_eq!(label("revision"), "unknown");
}

/// Label names by series name on a Prometheus text page.
fn labels_by_series(page: &str) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for line in page
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = out.entry(line[..name_end].to_owned()).or_default();
        if let Some(body) = line[name_end..]
            .strip_prefix('{')
            .and_then(|b| b.split_once('}'))
        {
            for pair in body.0.split(',').filter(|p| !p.is_empty()) {
                let k = pair.split_once('=').unwrap().0.to_owned();
                if !labels.contains(&k) {
                    labels.push(k);
                }
            }
        }
    }
    out
}

/// The label matchers of each `metric{...}` selector in a PromQL expression.
fn selectors(expr: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(open) = rest.find('{') {
        let name: String = rest[..open]
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let close = rest[open..].find('}').expect("a closed selector") + open;
        let labels = rest[open + 1..close]
            .split(',')
            .filter_map(|m| {
                let end = m.find(['=', '!'])?;
                Some(m[..end].trim().to_owned())
            })
            .collect();
        if !name.is_empty() {
            out.push((name, labels));
        }
        rest = &rest[close + 1..];
    }
    out
}

/// Every label a dashboard query filters a Weft metric on is a label that metric has
/// (or one Prometheus adds when it scrapes the pod): a matcher on a label the series
/// lacks selects nothing, and the panel shows "No data" for ever. Checked against a
/// live node's `/metrics`.
#[test]
fn dashboard_filters_only_on_labels_the_metrics_have() {
    let dir = temp("dashboard-labels");
    let mut node = weft_testkit::bin::loopback_node(&dir)
        .stderr(Stdio::null())
        .spawn()
        .expect("start weft-node");
    let bound = weft_testkit::bin::wait_ready_file(&mut node, &dir.join("ready.json"), "weft-node");
    let addr = bound["http"].as_str().unwrap().to_owned();
    let get = |path: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body
    };
    // A request's series appear once it has been answered, so a fresh node's first page
    // has no HTTP families at all: answer two requests before the page that is checked.
    get("/healthz");
    get("/metrics");
    let page = get("/metrics");
    let _ = node.kill();
    let _ = node.wait();
    let exported = labels_by_series(&page);
    assert!(
        exported["weft_build_info"].contains(&"version".to_owned()),
        "{page}"
    );
    assert!(
        exported.contains_key("weft_http_requests_total"),
        "the answered requests left no HTTP series: {page}"
    );
    // Added by Prometheus (prometheus-operator) to every scraped series.
    let scrape = [
        "namespace",
        "pod",
        "service",
        "job",
        "instance",
        "container",
        "endpoint",
    ];
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy::chart().join("files/dashboards/weft.json")).unwrap(),
    )
    .unwrap();
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            for (metric, labels) in selectors(expr) {
                // Only what this page shows series of (a family may have none yet).
                let Some(has) = exported.get(&metric) else {
                    continue;
                };
                for l in labels {
                    assert!(
                        has.contains(&l) || scrape.contains(&l.as_str()),
                        "panel {}: {metric} has no label `{l}` (it has {has:?}): {expr}",
                        panel["title"]
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 50, "only {checked} matchers checked");
    let _ = std::fs::remove_dir_all(dir);
}

/// A Secret's value in a rendered manifest stream, decoded (`base64 -d`).
fn secret_value(manifests: &str, name: &str, key: &str) -> Vec<u8> {
    let doc = document(manifests, "Secret", name);
    let b64 = doc
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(&format!("{key}: ")))
        .unwrap_or_else(|| panic!("no {key} in\n{doc}"));
    let out = deploy::run_with_input(Command::new("base64").arg("-d"), b64.as_bytes());
    assert!(out.status.success(), "base64 -d: {}", text(&out.stderr));
    out.stdout
}

/// The default install's secrets hang together: the CA Helm generates (`genCA`, an
/// RSA PKCS#1 key) signs, through the rendered init container's command, certificates
/// that the real TLS loader accepts as the member they name; and the hashes in
/// `weft.toml` are those of the generated keys in the Secret (one value per render,
/// shared by every template).
#[test]
fn generated_secrets_sign_member_certificates_and_match_the_config() {
    let Some(helm) = helm() else { return };
    let dir = temp("generated");
    let m = render(&helm, None, &[]).unwrap();
    let signer = dir.join("signer");
    std::fs::create_dir_all(&signer).unwrap();
    for key in ["ca.crt", "ca.key"] {
        std::fs::write(signer.join(key), secret_value(&m, "-cluster-signer", key)).unwrap();
    }
    for (identity, peer) in [
        (
            "weft://router/1",
            weft_router::identity::Peer::Router("1".into()),
        ),
        (
            "weft://node/weft-node-2",
            weft_router::identity::Peer::Node("weft-node-2".into()),
        ),
    ] {
        let out_dir = dir.join(identity.replace('/', "_"));
        let out = run(Command::new(NODE_BIN)
            .env_clear()
            .args(["cluster-cert", "--ca-cert"])
            .arg(signer.join("ca.crt"))
            .arg("--ca-key")
            .arg(signer.join("ca.key"))
            .args(["--identity", identity, "--days", "30", "--out"])
            .arg(&out_dir));
        assert!(out.status.success(), "cluster-cert: {}", text(&out.stderr));
        let certs = weft_router::tls::Certs::load_member(weft_router::tls::TlsFiles {
            ca_file: out_dir.join("ca.crt"),
            cert_file: out_dir.join("tls.crt"),
            key_file: out_dir.join("tls.key"),
        })
        .unwrap_or_else(|e| panic!("{identity}: {e}"));
        assert_eq!(certs.identity(), peer);
    }

    let toml = block_scalar(document(&m, "ConfigMap", "-node-config"), "weft.toml");
    for key in ["admin-key", "loadtest-key"] {
        use sha2::Digest;
        let value = secret_value(&m, "weft-auth", key);
        assert!(value.len() >= 32, "{key} is too short");
        let hash: String = sha2::Sha256::digest(&value)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(
            toml.contains(&format!("sha256 = \"{hash}\"")),
            "{key}:\n{toml}"
        );
    }
    assert!(secret_value(&m, "weft-auth", "hmac-secret").len() >= 32);
    let _ = std::fs::remove_dir_all(dir);
}

/// The distributed load test as rendered: a coordinator Job behind a Service, and an
/// Indexed Job of workers that dial that Service, all with the same run id and load.
/// The rendered commands, run as local processes against a real node (the Service's
/// DNS name mapped to 127.0.0.1, each pod's completion index as its slot), make one
/// coordinated run whose merged report passes the rendered SLO gate.
#[test]
fn load_job_is_a_coordinator_and_workers_that_make_one_run() {
    let Some(helm) = helm() else { return };
    let Some(python) = tool("python3", "PYTHON3") else {
        return;
    };
    let dir = temp("load-job");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let values = dir.join("load.yaml");
    std::fs::write(
        &values,
        format!(
            "auth: {{enabled: false}}\n\
             loadJob:\n  enabled: true\n  workers: 2\n  port: {port}\n  runId: chart-load\n\
             \x20 args: [\"--subscribers\", \"10\", \"--topics\", \"2\", \"--rate\", \"100\", \"--duration\", \"2s\"]\n"
        ),
    )
    .unwrap();
    let yaml = render(&helm, Some(&values), &[]).unwrap();
    let docs = deploy::manifests_json(&python, &yaml);
    let named = |kind: &str, suffix: &str| {
        docs.iter()
            .find(|d| {
                d["kind"] == kind && d["metadata"]["name"].as_str().unwrap().ends_with(suffix)
            })
            .unwrap_or_else(|| panic!("no {kind} *{suffix}"))
    };
    let service = named("Service", "-load-1");
    let coordinator = named("Job", "-load-1-coordinator");
    let workers = named("Job", "-load-1-workers");
    assert_eq!(workers["spec"]["completionMode"], "Indexed");
    assert_eq!(workers["spec"]["completions"], 2);
    assert_eq!(service["spec"]["ports"][0]["port"], port);
    let pod_labels = &coordinator["spec"]["template"]["metadata"]["labels"];
    for (k, v) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&pod_labels[k], v, "the Service selects the coordinator pod");
    }
    let svc_host = format!("{}.rt.svc", service["metadata"]["name"].as_str().unwrap());
    let coordinator_args =
        deploy::strings(&coordinator["spec"]["template"]["spec"]["containers"][0]["args"]);
    let worker_args =
        deploy::strings(&workers["spec"]["template"]["spec"]["containers"][0]["args"]);
    assert!(coordinator_args.windows(2).any(|w| w == ["--workers", "2"]));
    assert!(worker_args
        .windows(2)
        .any(|w| w[0] == "--coordinator" && w[1] == format!("{svc_host}:{port}")));
    for args in [&coordinator_args, &worker_args] {
        assert!(args.windows(2).any(|w| w == ["--run-id", "chart-load"]));
        assert!(args.windows(2).any(|w| w == ["--subscribers", "10"]));
    }

    // A node for the run, in development mode on loopback (the render has auth off).
    let mut node = weft_testkit::bin::loopback_node(&dir)
        .stderr(Stdio::null())
        .spawn()
        .expect("start weft-node");
    let bound = weft_testkit::bin::wait_ready_file(&mut node, &dir.join("ready.json"), "weft-node");
    let target = format!("http://{}", bound["http"].as_str().unwrap());
    let report = dir.join("report.json");
    let localise = |args: &[String], slot: Option<usize>| -> Vec<String> {
        args.iter()
            .map(|a| {
                let a = if a.starts_with("http://weft.rt.svc") {
                    target.clone()
                } else {
                    a.replace(&svc_host, "127.0.0.1")
                        .replace("0.0.0.0:", "127.0.0.1:")
                };
                let a = match slot {
                    Some(i) => a.replace("$(SLOT)", &i.to_string()),
                    None => a,
                };
                if a == "/dev/stderr" {
                    report.display().to_string()
                } else {
                    a
                }
            })
            .collect()
    };
    let loadtest = weft_testkit::bin::path("weft-loadtest");
    let spawn = |args: Vec<String>| {
        Command::new(&loadtest)
            .env_clear()
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start weft-loadtest")
    };
    let mut procs = vec![spawn(localise(&coordinator_args, None))];
    for i in 0..2 {
        procs.push(spawn(localise(&worker_args, Some(i))));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut outs = Vec::new();
    for mut p in procs {
        while p.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = p.kill();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        outs.push(p.wait_with_output().unwrap());
    }
    let _ = node.kill();
    let _ = node.wait();
    for (i, out) in outs.iter().enumerate() {
        assert!(
            out.status.success(),
            "process {i} (0 = coordinator) exited {}:\n{}{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["processes"], 2, "{r}");
    assert!(
        r["delivered"].as_u64().unwrap() > 0 && r["delivered"] == r["expected"],
        "{r}"
    );
    assert_eq!(
        (r["lost"].as_u64(), r["duplicates"].as_u64()),
        (Some(0), Some(0))
    );
    let _ = std::fs::remove_dir_all(dir);
}
