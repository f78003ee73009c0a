//! `cargo xtask setup`: everything the build, the tests and the demo need on a Debian machine of
//! the kind described in `TOOLCHAIN.md`, installed idempotently. Every check is cheap (a few
//! `rustc`/`dpkg-query` calls and file reads), so each subcommand runs them first and a fresh clone
//! needs nothing done by hand.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::exec::{cargo_bin_dir, cmd, exec, home_dir, probe};

/// Debian packages the build, the tests, the demo and the benchmarks run. `protobuf-compiler` is
/// for the build: etcd-client's build script compiles etcd's gRPC definitions with `protoc`.
pub const PACKAGES: &[&str] = &[
    "iproute2",
    "iperf3",
    "iptables",
    "nftables",
    "conntrack",
    "tcpdump",
    "bpftool",
    "ethtool",
    "iputils-ping",
    "dnsutils",
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
    "util-linux",
];

const BPFFS: &str = "/sys/fs/bpf";

/// Whether the steps that need root (mounting bpffs, apt-get) must succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootSteps {
    /// `setup`, `test`, `demo`: without them nothing can run, so stop.
    Required,
    /// `build`, `lint`: compiling needs neither bpffs nor the packages, so only warn.
    Optional,
}

/// Checks everything and installs what is missing.
pub fn ensure(root_steps: RootSteps) -> Result<()> {
    let started = Instant::now();
    let is_root = nix::unistd::geteuid().is_root();

    // The root-only checks come first so that a non-root run stops before spending minutes on
    // the user-level steps, then fails anyway.
    let bpffs_mounted = bpffs_mounted()?;
    let missing_packages = missing_packages()?;
    let mut root_todo = Vec::new();
    if !bpffs_mounted {
        root_todo.push(format!("mount bpffs: mount -t bpf bpf {BPFFS}"));
    }
    if !missing_packages.is_empty() {
        root_todo.push(format!(
            "install Debian packages: apt-get install {}",
            missing_packages.join(" ")
        ));
    }
    let mut skipped = false;
    if !root_todo.is_empty() && !is_root {
        let list = root_todo
            .iter()
            .map(|s| format!("\n  - {s}"))
            .collect::<String>();
        match root_steps {
            RootSteps::Required => bail!(
                "these setup steps need root:{list}\nrun as root: sudo -E cargo xtask setup \
                 (or the subcommand you ran, under sudo -E)"
            ),
            RootSteps::Optional => {
                eprintln!(
                    "warning: setup skipped steps that need root (the build does not need them; \
                     tests and the demo do):{list}"
                );
                skipped = true;
            }
        }
    }
    if is_root {
        if !bpffs_mounted {
            exec(cmd("mount").args(["-t", "bpf", "bpf", BPFFS]))
                .with_context(|| format!("mounting bpffs at {BPFFS}"))?;
        }
        if !missing_packages.is_empty() {
            install_packages(&missing_packages)?;
        }
    }

    ensure_host_components()?;
    let nightly = ensure_nightly()?;
    let linker = ensure_bpf_linker(&nightly)?;

    let system = if skipped {
        "bpffs and Debian packages skipped (need root)".to_owned()
    } else {
        format!("bpffs at {BPFFS}, {} Debian packages", PACKAGES.len())
    };
    println!(
        "setup: {} with rust-src, {linker} (LLVM {}), {system}: in place ({:.1}s)",
        nightly.release,
        nightly.llvm_major,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn bpffs_mounted() -> Result<bool> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    Ok(mounts.lines().any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        fields.next() == Some(BPFFS) && fields.next() == Some("bpf")
    }))
}

fn missing_packages() -> Result<Vec<&'static str>> {
    // One dpkg-query for all of them. It exits 1 when it knows nothing about a package and
    // prints no line for it, so the status is not an error here: a package without an
    // "install ok installed" line is missing.
    let output = cmd("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\\n"])
        .args(PACKAGES)
        .output()
        .context(
            "could not run dpkg-query: setup installs packages on Debian only; elsewhere install \
             the equivalents of these by hand",
        )?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let installed: Vec<&str> = stdout
        .lines()
        .filter_map(|line| line.strip_suffix(" install ok installed"))
        .map(|pkg| pkg.split(':').next().unwrap_or(pkg))
        .collect();
    Ok(PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed.contains(p))
        .collect())
}

fn install_packages(missing: &[&str]) -> Result<()> {
    exec(cmd("apt-get").arg("update"))?;
    exec(
        cmd("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y"])
            .args(missing),
    )?;
    let still = missing_packages()?;
    if !still.is_empty() {
        bail!(
            "apt-get reported success but these packages are still not installed: {}",
            still.join(" ")
        );
    }
    Ok(())
}

/// The workspace's own toolchain (stable) needs clippy and rustfmt for `cargo xtask lint`.
fn ensure_host_components() -> Result<()> {
    let sysroot = probe(cmd("rustc").args(["--print", "sysroot"]))
        .map(|s| PathBuf::from(s.trim()))
        .context(
            "`rustc --print sysroot` failed: install Rust through rustup (https://rustup.rs) and \
             check that the toolchain this workspace uses is installed",
        )?;
    let missing: Vec<&str> = [("clippy", "cargo-clippy"), ("rustfmt", "rustfmt")]
        .into_iter()
        .filter(|(_, bin)| !sysroot.join("bin").join(bin).is_file())
        .map(|(component, _)| component)
        .collect();
    if !missing.is_empty() {
        exec(cmd("rustup").args(["component", "add"]).args(&missing))?;
    }
    Ok(())
}

struct Nightly {
    sysroot: PathBuf,
    /// `rustc 1.97.0-nightly (e50aa6fba 2026-05-19)`.
    release: String,
    llvm_major: u32,
}

fn nightly_sysroot() -> Option<PathBuf> {
    probe(cmd("rustc").args(["+nightly", "--print", "sysroot"])).map(|s| PathBuf::from(s.trim()))
}

/// The nightly builds the eBPF crate (`-Z build-std=core` needs its rust-src) and lints it
/// (clippy); its LLVM is the one bpf-linker must link.
fn ensure_nightly() -> Result<Nightly> {
    let sysroot = match nightly_sysroot() {
        Some(sysroot) => sysroot,
        None => {
            exec(cmd("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "-c",
                "rust-src",
                "-c",
                "clippy",
            ]))?;
            nightly_sysroot().context(
                "rustup installed the nightly toolchain but `rustc +nightly --print sysroot` \
                 still fails",
            )?
        }
    };
    let mut missing = Vec::new();
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        missing.push("rust-src");
    }
    if !sysroot.join("bin/cargo-clippy").is_file() {
        missing.push("clippy");
    }
    if !missing.is_empty() {
        exec(
            cmd("rustup")
                .args(["component", "add"])
                .args(&missing)
                .args(["--toolchain", "nightly"]),
        )?;
    }

    let verbose = probe(cmd("rustc").args(["+nightly", "-vV"]))
        .context("`rustc +nightly -vV` failed although the nightly toolchain is installed")?;
    let release = verbose.lines().next().unwrap_or_default().to_owned();
    let llvm_major = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.trim().parse().ok())
        .with_context(|| {
            format!("no \"LLVM version: N.x\" line in `rustc +nightly -vV`:\n{verbose}")
        })?;
    Ok(Nightly {
        sysroot,
        release,
        llvm_major,
    })
}

/// `~/.cache/net-ebpf`: outside any checkout, because bpf-linker records an rpath to the libLLVM
/// symlinks kept here and must keep starting after `cargo clean` or in a fresh clone.
fn cache_dir() -> Result<PathBuf> {
    Ok(home_dir()?.join(".cache").join("net-ebpf"))
}

/// Makes sure `bpf-linker` starts and was built against the nightly's LLVM major; returns its
/// `--version` line.
fn ensure_bpf_linker(nightly: &Nightly) -> Result<String> {
    let major = nightly.llvm_major;
    let cache = cache_dir()?;
    let stamp = cache.join("bpf-linker.llvm-major");
    let running = probe(cmd("bpf-linker").arg("--version")).map(|v| v.trim().to_owned());
    let built_for = match fs::read_to_string(&stamp) {
        Ok(s) => s.trim().parse::<u32>().ok(),
        // Installed by hand (the TOOLCHAIN.md recipe) or by an xtask before the stamp existed:
        // cargo's install record names the llvm-N feature it was built with.
        Err(_) => llvm_feature_from_install_record(),
    };

    if let Some(version) = &running
        && built_for == Some(major)
    {
        if !stamp.exists() {
            write_stamp(&stamp, major)?;
        }
        return Ok(version.clone());
    }

    let reason = match (&running, built_for) {
        (None, _) if cargo_bin_dir()?.join("bpf-linker").exists() => {
            "it is installed but does not start (its libLLVM is gone?)".to_owned()
        }
        (None, _) => "it is not installed".to_owned(),
        (Some(_), Some(old)) => format!("it was built for LLVM {old}"),
        (Some(_), None) => "nothing records which LLVM it was built for".to_owned(),
    };
    println!(
        "setup: building bpf-linker against the nightly's LLVM {major} ({reason}); this takes \
         about 75 s"
    );

    let library = nightly_libllvm(&nightly.sysroot)?;
    let prefix = cache.join(format!("llvm-{major}"));
    let lib_dir = prefix.join("lib");
    fs::create_dir_all(&lib_dir).with_context(|| format!("creating {}", lib_dir.display()))?;
    let file_name = library
        .file_name()
        .with_context(|| format!("{} has no file name", library.display()))?;
    // bpf-linker's build looks for `$LLVM_PREFIX/lib/libLLVM.so`; the binary then loads the
    // library by its own name (its soname) through the rpath to this directory.
    for link in [lib_dir.join("libLLVM.so"), lib_dir.join(file_name)] {
        replace_symlink(&library, &link)?;
    }

    let mut install = cmd("cargo");
    install
        .env("LLVM_PREFIX", &prefix)
        .args([
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}"))
        // Away from this workspace, so that its `.cargo/config.toml` plays no part.
        .current_dir(&cache);
    if cargo_bin_dir()?.join("bpf-linker").exists() {
        // Otherwise cargo says "already installed" and keeps the broken or outdated binary.
        install.arg("--force");
    }
    exec(&mut install)?;

    let version = probe(cmd("bpf-linker").arg("--version"))
        .map(|v| v.trim().to_owned())
        .with_context(|| {
            format!(
                "bpf-linker was installed but `bpf-linker --version` fails; check that {} \
                 resolves to the nightly's libLLVM",
                lib_dir.join(file_name).display()
            )
        })?;
    write_stamp(&stamp, major)?;
    Ok(version)
}

fn write_stamp(stamp: &Path, major: u32) -> Result<()> {
    if let Some(dir) = stamp.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(stamp, format!("{major}\n")).with_context(|| format!("writing {}", stamp.display()))
}

/// The LLVM major of the `llvm-N` feature bpf-linker was installed with, from cargo's record of
/// installed crates.
fn llvm_feature_from_install_record() -> Option<u32> {
    let record = cargo_bin_dir().ok()?.parent()?.join(".crates2.json");
    let record: serde_json::Value = serde_json::from_slice(&fs::read(record).ok()?).ok()?;
    let (_, install) = record
        .get("installs")?
        .as_object()?
        .iter()
        .find(|(id, _)| id.starts_with("bpf-linker "))?;
    install
        .get("features")?
        .as_array()?
        .iter()
        .filter_map(|f| f.as_str()?.strip_prefix("llvm-")?.parse().ok())
        .next()
}

/// The nightly's LLVM shared library: `lib/libLLVM.so.<ver>-rust-<ver>-nightly` (newer layout)
/// or `lib/libLLVM-<major>-rust-<ver>-nightly.so`.
fn nightly_libllvm(sysroot: &Path) -> Result<PathBuf> {
    let lib = sysroot.join("lib");
    let names: Vec<String> = fs::read_dir(&lib)
        .with_context(|| format!("listing {}", lib.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    let preferred = names.iter().find(|n| n.starts_with("libLLVM.so."));
    let fallback = names
        .iter()
        .find(|n| n.starts_with("libLLVM-") && n.ends_with(".so"));
    preferred
        .or(fallback)
        .map(|n| lib.join(n))
        .with_context(|| {
            format!(
                "no libLLVM shared library in {}: this nightly cannot host bpf-linker; try \
                 `rustup update nightly`",
                lib.display()
            )
        })
}

fn replace_symlink(target: &Path, link: &Path) -> Result<()> {
    if link.symlink_metadata().is_ok() {
        fs::remove_file(link).with_context(|| format!("removing {}", link.display()))?;
    }
    symlink(target, link)
        .with_context(|| format!("linking {} -> {}", link.display(), target.display()))
}
