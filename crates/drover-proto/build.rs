//! Compiles `proto/drover/v1/drover.proto` with protox (a pure-Rust protobuf compiler,
//! so no system `protoc` is needed) and generates prost messages, plus the tonic
//! client and server when the `grpc` feature is on. Also writes the encoded file
//! descriptor set, which the controller serves through gRPC reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let proto = root.join("drover/v1/drover.proto");
    println!("cargo:rerun-if-changed={}", proto.display());

    let fds = protox::compile([&proto], [&root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("drover_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;

    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    let mut config = tonic_prost_build::Config::new();
    config.enable_type_names();
    config.type_name_domain(["."], "type.googleapis.com");
    tonic_prost_build::configure()
        .build_server(grpc)
        .build_client(grpc)
        .build_transport(grpc)
        .compile_fds_with_config(fds, config)?;
    Ok(())
}
