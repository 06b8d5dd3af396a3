//! Generates the gRPC code from `proto/` with `protoc` (Debian package `protobuf-compiler`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/meshauth/v1/node.proto",
        "proto/meshauth/v1/admin.proto",
        "proto/meshauth/v1/agent.proto",
        "proto/spiffe/workload.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    if std::process::Command::new(std::env::var("PROTOC").unwrap_or_else(|_| "protoc".into()))
        .arg("--version")
        .output()
        .is_err()
    {
        return Err("protoc not found: install the Debian package `protobuf-compiler` \
                    (and `libprotobuf-dev` for the well-known types; scripts/setup.sh installs both) or set PROTOC"
            .into());
    }
    tonic_prost_build::configure().compile_protos(&protos, &["proto"])?;
    Ok(())
}
