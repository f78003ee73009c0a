use which::which;

/// The eBPF binary is linked by `bpf-linker`, a dependency cargo cannot see. Rebuild when the
/// linker on PATH changes (for example after `cargo xtask setup` rebuilt it for a new LLVM).
fn main() {
    // bpf-linker asks LLVM for `--bpf-expand-memcpy-in-order` by default, which also turns off
    // LLVM's inline expansion of `memset`: every zeroed struct or padding field then becomes a
    // call to compiler_builtins' `memset`, a loop of single-byte stores (64 iterations to clear
    // a `bpf_fib_lookup`). Without it, LLVM writes small constant-size memsets and memcpys as
    // plain stores, as clang does for C programs.
    println!("cargo:rustc-link-arg=--disable-expand-memcpy-in-order");
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => {
            println!("cargo:warning=bpf-linker not on PATH ({err}); run `cargo xtask setup`")
        }
    }
}
