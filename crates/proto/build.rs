//! Compiles `proto/nightshift/v1/*.proto` once for the whole workspace, with a vendored protoc
//! so that no system install is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let protos = ["nightshift/v1/control.proto", "nightshift/v1/queue.proto"].map(|p| root.join(p));
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().compile_with_config(config, &protos, &[root])?;
    Ok(())
}
