//! Compiles the vendored Envoy rate limit service protos (see `proto/README.md`) with a protoc
//! binary from crates.io, so a build needs nothing installed but the Rust toolchain.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    // SAFETY: set_var is unsound only while another thread reads the environment; this build
    // script has no other threads. prost-build reads PROTOC from the environment.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let roots = [
        "proto/data-plane-api",
        "proto/xds",
        "proto/protoc-gen-validate",
    ];
    let mut includes: Vec<std::path::PathBuf> = roots.iter().map(Into::into).collect();
    includes.push(well_known);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .include_file("envoy_rls.rs")
        .file_descriptor_set_path(out_dir.join("envoy_rls_descriptor.bin"))
        .compile_protos(
            &[std::path::PathBuf::from(
                "proto/data-plane-api/envoy/service/ratelimit/v3/rls.proto",
            )],
            &includes,
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
