//! Generates the gRPC code of `proto/weft/v1/*.proto` into OUT_DIR.
//!
//! The `.proto` files are parsed by `protox` (pure Rust), so building needs no system
//! `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/weft/v1/router.proto", "proto/weft/v1/raft.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
