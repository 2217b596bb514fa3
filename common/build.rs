//! Compiles the .proto files in ../proto with protox (no system protoc) into tonic code, and
//! keeps the encoded descriptor set for server reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTO_ROOT: &str = "../proto";
const PROTO_FILES: &[&str] = &[
    "kowalski/exo/v1/runtime.proto",
    "kowalski/exo/v1/execution.proto",
    "kowalski/exo/v1/inference.proto",
    "kowalski/exo/v1/session.proto",
    "kowalski/exo/v1/node_agent.proto",
    "kowalski/exo/v1/registry.proto",
    "kowalski/exo/v1/coordinator.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    let fds = protox::compile(PROTO_FILES, [PROTO_ROOT])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("kowalski_exo_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .emit_rerun_if_changed(false)
        .compile_fds(fds)?;
    Ok(())
}
