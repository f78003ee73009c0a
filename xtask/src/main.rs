//! `cargo xtask <command>`: the project's one door. Each command first runs setup's checks
//! (seconds when everything is in place), so a fresh clone needs nothing done by hand.

mod bench;
mod cleanup;
mod demo;
mod exec;
mod interrupt;
mod setup;
mod sim_agent;

use std::{
    path::PathBuf,
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

use crate::{
    exec::{cmd, exec},
    setup::RootSteps,
};

#[derive(Debug, Parser)]
#[command(
    bin_name = "cargo xtask",
    about = "Set up, build, lint, test and demo the data plane"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install the eBPF toolchain, mount bpffs and install the Debian packages the tests use.
    Setup,
    /// Build every crate and target (the eBPF programs through the agent's build script).
    Build,
    /// rustfmt and clippy on the host crates, clippy on the eBPF crate for the BPF target.
    Lint,
    /// Lint, then run every test (as root: the tests make namespaces and load programs).
    Test {
        /// Passed on to `cargo test --workspace ...` (e.g. `-- --test single_host -- --nocapture`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Two simulated hosts with an agent each: endpoints talking, NAT and the overlay (as root).
    Demo,
    /// Measure the data plane against a veth pair and Docker's bridge, side by side (as root).
    Bench(bench::Options),
}

/// Host builds leave this package out of `--workspace`: it only compiles for
/// `bpfel-unknown-none` (no_std, no_main, its own panic handler), which the agent's build script
/// and `lint` take care of.
const EBPF_PACKAGE: &str = "net-ebpf";

/// Where the workspace is and where cargo puts its output (honouring `CARGO_TARGET_DIR` and
/// `build.target-dir`).
pub struct Workspace {
    pub root: PathBuf,
    pub target_dir: PathBuf,
}

impl Workspace {
    fn locate() -> Result<Self> {
        let metadata = cargo_metadata::MetadataCommand::new()
            .no_deps()
            .exec()
            .context("`cargo metadata --no-deps` failed: run cargo xtask inside the workspace")?;
        Ok(Self {
            root: metadata.workspace_root.into_std_path_buf(),
            target_dir: metadata.target_directory.into_std_path_buf(),
        })
    }

    /// `cargo` run from the workspace root.
    pub fn cargo(&self) -> Command {
        let mut cargo = cmd("cargo");
        cargo.current_dir(&self.root);
        cargo
    }

    /// A binary of the dev profile, checked to exist.
    pub fn debug_bin(&self, name: &str) -> Result<PathBuf> {
        let path = self.target_dir.join("debug").join(name);
        if !path.is_file() {
            bail!(
                "{} does not exist after the build: is the `{name}` binary declared in the \
                 workspace?",
                path.display()
            );
        }
        Ok(path)
    }

    /// `cargo build --workspace --bins` (without the eBPF package), for the test and the demo.
    pub fn build_bins(&self) -> Result<()> {
        exec(
            self.cargo()
                .args(["build", "--workspace", "--exclude", EBPF_PACKAGE, "--bins"]),
        )
    }
}

fn require_root(why: &str, rerun: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("{why}: run as root ({rerun})");
    }
    Ok(())
}

fn build(ws: &Workspace) -> Result<()> {
    exec(ws.cargo().args([
        "build",
        "--workspace",
        "--exclude",
        EBPF_PACKAGE,
        "--all-targets",
    ]))
}

/// Runs every linter, even after one fails, so one run reports everything to fix.
fn lint(ws: &Workspace) -> Result<()> {
    let mut fmt = ws.cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    let mut clippy = ws.cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--exclude",
        EBPF_PACKAGE,
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    let mut clippy_ebpf = ws.cargo();
    clippy_ebpf.args([
        "+nightly",
        "clippy",
        "-p",
        EBPF_PACKAGE,
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]);
    let failures: Vec<String> = [fmt, clippy, clippy_ebpf]
        .iter_mut()
        .filter_map(|c| exec(c).err().map(|e| format!("\n  - {e:#}")))
        .collect();
    if !failures.is_empty() {
        bail!("lint failed:{}", failures.concat());
    }
    Ok(())
}

fn test(ws: &Workspace, args: &[String]) -> Result<()> {
    lint(ws)?;
    ws.build_bins()?;
    let agent = ws.debug_bin("net-agent")?;
    let netctl = ws.debug_bin("netctl")?;
    let totals = run_tests(
        ws.cargo()
            // The integration tests run these binaries as the agent and the CLI under test.
            .env("NET_AGENT_BIN", agent)
            .env("NETCTL_BIN", netctl)
            .args([
                "test",
                "--workspace",
                "--exclude",
                EBPF_PACKAGE,
                "--no-fail-fast",
            ])
            .args(args),
    );
    // The bench's smoke run keeps `cargo xtask bench` from rotting. A run narrowed to some tests
    // (`-- <args>`) is someone iterating on those tests, so it is left out there.
    let bench = match (&totals, args.is_empty()) {
        (Ok(_), true) => bench::run(ws, &bench::Options::smoke()),
        _ => Ok(()),
    };
    let totals = totals?;
    // One plain closing line for the whole run: cargo prints a result line per test binary,
    // the last of which is often a doc-test binary with nothing in it.
    println!(
        "{} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    bench
}

/// Test counts summed over every `test result:` line cargo printed.
#[derive(Debug, Default)]
struct TestTotals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

/// Runs `cargo test`, passing its output through while summing its result lines; fails (after
/// the output) when cargo does.
fn run_tests(cmd: &mut Command) -> Result<TestTotals> {
    use std::io::{BufRead as _, BufReader};
    let line = exec::display(cmd);
    println!("$ {line}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{line}`"))?;
    let mut totals = TestTotals::default();
    let stdout = child.stdout.take().context("cargo test's stdout")?;
    for out in BufReader::new(stdout).lines() {
        let out = out.context("reading cargo test's output")?;
        println!("{out}");
        if let Some(result) = out.strip_prefix("test result: ") {
            for part in result.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(label), Some(count)) = (words.next(), words.next()) else {
                    continue;
                };
                let Ok(count) = count.parse::<u64>() else {
                    continue;
                };
                match label {
                    "passed" => totals.passed += count,
                    "failed" => totals.failed += count,
                    "ignored" => totals.ignored += count,
                    _ => {}
                }
            }
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{line}`"))?;
    if !status.success() {
        println!(
            "{} passed, {} failed, {} skipped",
            totals.passed, totals.failed, totals.ignored
        );
        bail!("`{line}` failed ({status})");
    }
    Ok(totals)
}

/// Errors are printed as their chain of contexts: the backtrace anyhow would add from `main`
/// (with RUST_BACKTRACE set) only buries the failed command and the remedy.
fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Task::Setup => setup::ensure(RootSteps::Required),
        Task::Build => {
            setup::ensure(RootSteps::Optional)?;
            build(&Workspace::locate()?)
        }
        Task::Lint => {
            setup::ensure(RootSteps::Optional)?;
            lint(&Workspace::locate()?)
        }
        Task::Test { args } => {
            require_root(
                "the tests build network namespaces and load eBPF programs",
                "sudo -E cargo xtask test",
            )?;
            setup::ensure(RootSteps::Required)?;
            test(&Workspace::locate()?, &args)
        }
        Task::Demo => {
            require_root(
                "the demo builds network namespaces and loads eBPF programs",
                "sudo -E cargo xtask demo",
            )?;
            setup::ensure(RootSteps::Required)?;
            demo::run(&Workspace::locate()?)
        }
        Task::Bench(options) => {
            require_root(
                "the bench builds network namespaces and loads eBPF programs",
                "sudo -E cargo xtask bench",
            )?;
            setup::ensure(RootSteps::Required)?;
            bench::run(&Workspace::locate()?, &options)
        }
    }
}
