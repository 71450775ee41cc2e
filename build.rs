//! Compiles the node-to-node wire (`proto/mesh.proto`) with a protoc shipped inside a crate,
//! so a fresh machine needs no system protoc, and the example service with `clustergo-build`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // `bytes::Bytes` for every bytes field: payloads are sliced out of the received batch,
    // never copied.
    config.bytes(["."]);
    // A batch is decoded by hand, so what it may cost in memory is bounded (`proto::batch`).
    config.extern_path(".clustergo.mesh.v1.Batch", "crate::proto::Batch");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Same protobuf wire, decoded from one contiguous buffer (see `proto::codec`).
        .codec_path("crate::proto::codec::LinkCodec")
        .compile_with_config(config, &["proto/mesh.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/mesh.proto");
    // The example service, through the same generator users run (`examples/` include it).
    clustergo_build::compile(&["proto/examples/echo.proto"], &["proto/examples"])?;
    Ok(())
}
