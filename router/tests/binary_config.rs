//! The `weft-router` binary's configuration contract: exit 64 with one line on bad
//! config, `--print-config` showing the effective layers (flags and `WEFT_*` env).

use std::process::Command;

fn router() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_weft-router"));
    c.env_remove("WEFT_ID").env_remove("WEFT_PEERS");
    c
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
        let out = router().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("weft-router: invalid config"), "{err}");
    }
}

#[test]
fn print_config_shows_flags_over_env_over_defaults() {
    let out = router()
        .args(["--id", "2", "--print-config"])
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
