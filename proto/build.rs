//! Compiles the `.proto` files with `protox` (a Rust protobuf compiler), so that building tally
//! never needs `protoc` installed, and keeps the file descriptor set for gRPC reflection.

use std::path::PathBuf;

const PROTO_FILES: &[&str] = &["tally/v1/ledger.proto", "tally/v1/cluster.proto", "tally/v1/raft.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for file in PROTO_FILES {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(PROTO_FILES, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_bytes = prost::Message::encode_to_vec(&descriptors);
    std::fs::write(out_dir.join("tally_descriptor.bin"), descriptor_bytes)?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptors)?;
    Ok(())
}
