//! Compiles `proto/secureops/v1/*.proto` with protox (pure Rust: no system
//! `protoc`) and generates tonic/prost code plus the file descriptor set used
//! for gRPC reflection.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/secureops/v1/common.proto",
        "proto/secureops/v1/pdp.proto",
        "proto/secureops/v1/context.proto",
        "proto/secureops/v1/admin.proto",
        "proto/secureops/v1/audit.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out.join("secureops_descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
