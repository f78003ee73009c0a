use which::which;

/// The eBPF binary is linked by `bpf-linker`, a dependency cargo cannot see. Rebuild when the
/// linker on PATH changes (for example after `cargo xtask setup` rebuilt it for a new LLVM).
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => {
            println!("cargo:warning=bpf-linker not on PATH ({err}); run `cargo xtask setup`")
        }
    }
}
