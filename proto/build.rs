//! Generates the gRPC code of `proto/weft/v1/*.proto` into OUT_DIR.
//!
//! The `.proto` files are parsed by `protox` (pure Rust), so building needs no system
//! `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/weft/v1/router.proto",
        "proto/weft/v1/raft.proto",
        "proto/weft/v1/relay.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Relay payloads stay `Bytes`: frames and event data are shared, not copied.
        .bytes(".weft.v1.RelayBatch")
        .bytes(".weft.v1.RelayEvent")
        .bytes(".weft.v1.RelayPublish")
        .compile_fds(fds)?;
    Ok(())
}
