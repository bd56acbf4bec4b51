//! The `weft-router` binary's configuration contract: exit 64 with one line on bad
//! config, `--print-config` showing the effective layers (flags and `WEFT_*` env),
//! secure by default (no certificates and no `--cluster-insecure` exits 64), and the
//! `certs` subcommand writing a set a router starts with.

use std::process::Command;

use weft_testkit::bin::usage_error;

fn router() -> Command {
    weft_testkit::bin::command(env!("CARGO_BIN_EXE_weft-router"))
}

/// Runs `cmd`, which must exit 0; its output.
fn succeeds(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn invalid_config_exits_64_with_one_line() {
    for args in [
        vec!["--listen", "0.0.0.0:9400"],                 // no --id
        vec!["--id", "1", "--peers", "1=a:1,2"],          // malformed peers
        vec!["--id", "3", "--peers", "1=a:1,2=b:2"],      // own id missing
        vec!["--id", "1", "--heartbeat-timeout-ms", "0"], // zero timeout
        vec!["--id", "x"],                                // not a u64
    ] {
        let mut args = args;
        args.push("--cluster-insecure");
        let err = usage_error(&router().args(&args).output().unwrap());
        assert!(err.starts_with("weft-router: invalid config"), "{err}");
    }
}

#[test]
fn print_config_shows_flags_over_env_over_defaults() {
    let out = router()
        .args(["--id", "2", "--print-config", "--cluster-insecure"])
        .env("WEFT_HEARTBEAT_TIMEOUT_MS", "1234")
        .env("WEFT_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("id = 2"), "{text}");
    assert!(text.contains("heartbeat_timeout_ms = 1234"), "{text}");
    assert!(text.contains("listen = \"127.0.0.1:0\""), "{text}");
    assert!(text.contains("data_dir = \"./weft-data\""), "{text}");
}

#[test]
fn without_certificates_or_insecure_the_router_exits_64_naming_the_fix() {
    let err = usage_error(&router().args(["--id", "1"]).output().unwrap());
    for fix in ["cluster.ca_file", "weft-router certs", "--cluster-insecure"] {
        assert!(err.contains(fix), "{fix}: {err}");
    }
}

#[test]
fn certs_writes_a_set_a_router_accepts_and_a_mismatched_id_is_refused() {
    let dir = std::env::temp_dir().join(format!("weft-certs-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    succeeds(
        router()
            .args(["certs", "--out", dir.to_str().unwrap()])
            .args(["--routers", "2", "--nodes", "n1,n2"]),
    );
    for f in [
        "ca.crt",
        "ca.key",
        "router-1.crt",
        "router-2.key",
        "node-n1.crt",
        "node-n2.key",
        "admin.crt",
        "admin.key",
    ] {
        assert!(dir.join(f).exists(), "{f}");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("node-n1.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "a key is readable by others: {mode:o}");
    let tls = |member: &str| {
        vec![
            "--cluster-ca-file".to_owned(),
            dir.join("ca.crt").display().to_string(),
            "--cluster-cert-file".to_owned(),
            dir.join(format!("{member}.crt")).display().to_string(),
            "--cluster-key-file".to_owned(),
            dir.join(format!("{member}.key")).display().to_string(),
        ]
    };
    // Router 1 with its own certificate: valid (printed config names the files, no key).
    let out = succeeds(
        router()
            .args(["--id", "1", "--print-config"])
            .args(tls("router-1")),
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("router-1.key") && !text.contains("PRIVATE KEY"),
        "{text}"
    );
    // Router 2 started with router 1's certificate: refused before binding.
    let err = usage_error(
        &router()
            .args(["--id", "2", "--listen", "127.0.0.1:0"])
            .args(tls("router-1"))
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("weft://router/1") && err.contains("weft://router/2"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
