//! Shared by the deployment checks (`helm_chart.rs`, `metrics_contract.rs`): finding
//! the external tools, rendering the chart, and reading what a rendered manifest holds.
//!
//! The tools (helm, kubernetes-validate, promtool, hadolint) are installed by `.ci/run`.
//! Where one is missing, a check fails when `CI` is set and otherwise says loudly that
//! it did not run, so a developer without the tools still gets a green suite but never
//! a silent one.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("node/ sits in the workspace")
        .to_path_buf()
}

pub fn chart() -> PathBuf {
    root().join("helm/weft")
}

/// The tool's path, from `$<ENV>` or `PATH`; `None` (after a loud note) when it is not
/// installed and `CI` is not set. Panics in CI: there a missing tool is a broken setup.
pub use weft_testkit::bin::tool;

/// Runs a command, returning its output; panics if it cannot be started.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command with `input` on its stdin, returning its output.
pub fn run_with_input(cmd: &mut Command, input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    child
        .stdin
        .take()
        .expect("a piped stdin")
        .write_all(input)
        .expect("write the input");
    child.wait_with_output().expect("wait for the command")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `helm template` of the chart with one values file (or none); the manifests, or
/// the error text when rendering failed.
pub fn render(helm: &Path, values: Option<&Path>, set: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new(helm);
    cmd.args([
        "template",
        "weft",
        chart().to_str().unwrap(),
        "--namespace",
        "rt",
    ]);
    if let Some(v) = values {
        cmd.arg("-f").arg(v);
    }
    for s in set {
        cmd.args(["--set", s]);
    }
    let out = run(&mut cmd);
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(text(&out.stderr))
    }
}

/// The values files of the render matrix, `helm/tests/values/*.yaml`, sorted.
pub fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(root().join(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

/// The documents of a rendered manifest stream.
pub fn documents(manifests: &str) -> Vec<&str> {
    manifests
        .split("\n---")
        .map(str::trim)
        .filter(|d| d.lines().any(|l| l.starts_with("kind: ")))
        .collect()
}

/// The one document of `kind` (and, if given, whose name contains `name`).
pub fn document<'a>(manifests: &'a str, kind: &str, name: &str) -> &'a str {
    let want = format!("kind: {kind}");
    let found: Vec<_> = documents(manifests)
        .into_iter()
        .filter(|d| d.lines().any(|l| l == want))
        .filter(|d| {
            d.lines()
                .skip_while(|l| *l != "metadata:")
                .find(|l| l.starts_with("  name: "))
                .is_some_and(|l| l.contains(name))
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {kind} named *{name}*, found {}",
        found.len()
    );
    found[0]
}

/// The text of a block scalar (`key: |` or `key: |-`) in a YAML document, dedented.
pub fn block_scalar(doc: &str, key: &str) -> String {
    let mut lines = doc.lines();
    let head = lines
        .by_ref()
        .find(|l| {
            let t = l.trim_start();
            t.starts_with(&format!("{key}: |"))
        })
        .unwrap_or_else(|| panic!("no block scalar {key} in\n{doc}"));
    let key_indent = head.len() - head.trim_start().len();
    let body: Vec<&str> = lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > key_indent)
        .collect();
    let indent = body
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    let mut out = String::new();
    for l in body {
        out.push_str(l.get(indent..).unwrap_or(""));
        out.push('\n');
    }
    out
}

/// The `spec:` of a document, dedented to the top level (a PrometheusRule's groups).
pub fn spec_of(doc: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for l in doc.lines() {
        if l == "spec:" {
            inside = true;
            continue;
        }
        if inside {
            if !l.is_empty() && !l.starts_with(' ') {
                break;
            }
            out.push_str(l.get(2..).unwrap_or(""));
            out.push('\n');
        }
    }
    out
}

/// Every `expr:` of a rendered PrometheusRule.
pub fn alert_exprs(rule_doc: &str) -> Vec<String> {
    rule_doc
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("expr: "))
        .map(str::to_owned)
        .collect()
}

const YAML_TO_JSON: &str = r#"
import sys, json, yaml, base64
docs = [d for d in yaml.safe_load_all(sys.stdin) if d]
for d in docs:
    if d["kind"] == "Secret":
        d["stringData"] = {k: base64.b64decode(v).decode() for k, v in (d.get("data") or {}).items()}
print(json.dumps(docs))
"#;

/// Rendered manifests as JSON values (PyYAML converts; it comes with
/// kubernetes-validate). A Secret's `data` is decoded into `stringData`.
pub fn manifests_json(python: &Path, yaml: &str) -> Vec<serde_json::Value> {
    let out = run_with_input(
        Command::new(python).args(["-c", YAML_TO_JSON]),
        yaml.as_bytes(),
    );
    assert!(out.status.success(), "YAML to JSON: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The strings of a JSON array of strings (a container's `command` or `args`).
pub fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|a| a.as_str().expect("a string").to_owned())
        .collect()
}
