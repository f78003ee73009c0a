use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Builds the `net-ebpf` programs for the BPF target (on the nightly toolchain, through
/// bpf-linker) so that `src/datapath.rs` can embed the object with `include_bytes_aligned!`.
fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "net-ebpf")
        .ok_or_else(|| anyhow!("net-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("net-ebpf manifest has no parent directory"))?
        .as_str();
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
