//! `cargo xtask bench`: the data plane measured against the kernel's own paths, side by side in
//! one run on this machine, so that the ratios mean something even though absolute figures on a
//! small shared VM are noisy.
//!
//! 1. Program cost ([`programs`]): every path of the shipped programs through
//!    `BPF_PROG_TEST_RUN`, ns per packet, next to an empty classifier measured the same way.
//! 2. End to end ([`lab`], [`traffic`]): fresh, identical client/server namespace pairs joined by
//!    (a) a veth pair, (b) Docker's bridge + iptables (and, where the kernel has br_netfilter,
//!    (b+nf) the same with bridged packets through iptables), (c) net-agent. TCP_RR (blocking, as
//!    netperf, and busy-polling, which takes the CPU wake-ups out), TCP_CRR, and iperf3
//!    throughput with CPU per Gbit, in rounds that interleave the setups.
//!
//! Results go to `<target dir>/bench/results.{md,csv}`; the Markdown is printed at the end.
//! `--smoke` runs everything with tiny counts so the bench cannot rot; `cargo xtask test` runs it.

mod lab;
mod programs;
mod report;
mod sys;
mod traffic;

use std::{
    fs,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use cargo_metadata::Message;

use self::{
    lab::{Lab, Setup},
    programs::{PathCost, Plan},
    report::{Context, Metric, Report, Sample, SetupName},
    traffic::{Cpus, Wait},
};
use crate::{
    EBPF_PACKAGE, Workspace,
    exec::{cmd, exec_output, probe},
};

/// The bench's options; defaults are the full run, `--smoke` the quick check.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Tiny counts (1 round, 0.3 s per measurement, 300 test runs per path) on the dev build:
    /// proves the bench still works, in well under a minute. `cargo xtask test` runs it.
    #[arg(long)]
    pub smoke: bool,
    /// Rounds; each measures every setup once per metric, in an order that rotates by round.
    #[arg(long, value_name = "N")]
    pub rounds: Option<u32>,
    /// Seconds per end-to-end measurement (iperf3 rounds it up to whole seconds).
    #[arg(long, value_name = "SECONDS")]
    pub duration: Option<f64>,
    /// BPF_PROG_TEST_RUN calls per program path per round.
    #[arg(long, value_name = "N")]
    pub calls: Option<u32>,
}

impl Options {
    /// What `cargo xtask test` runs.
    pub fn smoke() -> Self {
        Self {
            smoke: true,
            rounds: None,
            duration: None,
            calls: None,
        }
    }
}

struct Settings {
    rounds: u32,
    duration: Duration,
    calls: u32,
    /// The agent's build profile: release for real numbers; the smoke run takes the dev build
    /// `cargo xtask test` has just made rather than spend minutes on a release build.
    release: bool,
}

impl Settings {
    fn from(options: &Options) -> Result<Self> {
        let (rounds, duration, calls) = if options.smoke {
            (1, 0.3, 300)
        } else {
            (5, 3.0, 50_000)
        };
        let settings = Self {
            rounds: options.rounds.unwrap_or(rounds),
            duration: Duration::try_from_secs_f64(options.duration.unwrap_or(duration))
                .context("--duration must be a number of seconds")?,
            calls: options.calls.unwrap_or(calls),
            release: !options.smoke,
        };
        if settings.rounds == 0 {
            bail!("--rounds must be at least 1");
        }
        if settings.duration < Duration::from_millis(100) || settings.duration.as_secs() > 600 {
            bail!("--duration must be between 0.1 and 600 seconds");
        }
        if settings.calls < 10 {
            bail!("--calls must be at least 10");
        }
        Ok(settings)
    }

    /// iperf3 3.12 takes `-t` in whole seconds (and `-t 0` means forever).
    fn iperf_seconds(&self) -> u32 {
        self.duration.as_secs_f64().ceil().max(1.0) as u32
    }

    fn describe(&self) -> String {
        format!(
            "{} round(s), setups interleaved in rotating order; {} s per RR/CRR measurement \
             (plus a tenth unmeasured), {} s per iperf3 run; {} test runs per program path per \
             round; net-agent {} build",
            self.rounds,
            self.duration.as_secs_f64(),
            self.iperf_seconds(),
            self.calls,
            if self.release { "release" } else { "dev" }
        )
    }
}

/// What the bench runs: the agent binaries and the eBPF object they embed.
struct Built {
    agent: PathBuf,
    netctl: PathBuf,
    object: PathBuf,
}

/// Builds the agent and finds the object its build script made (the one it embeds) from cargo's
/// messages.
fn build(ws: &Workspace, release: bool) -> Result<Built> {
    let mut cargo = ws.cargo();
    if release {
        cargo.args(["build", "--release", "-p", "net-agent", "--bins"]);
    } else {
        // The same selection as `Workspace::build_bins`, so the smoke run inside `cargo xtask
        // test` reuses that build instead of resolving features differently and rebuilding.
        cargo.args(["build", "--workspace", "--exclude", EBPF_PACKAGE, "--bins"]);
    }
    cargo.arg("--message-format=json-render-diagnostics");
    let messages = exec_output(&mut cargo)?;
    let mut agent = None;
    let mut netctl = None;
    let mut out_dirs = Vec::new();
    for message in Message::parse_stream(messages.as_bytes()) {
        match message.context("reading cargo's build messages")? {
            Message::CompilerArtifact(artifact) => {
                let Some(executable) = artifact.executable else {
                    continue;
                };
                match artifact.target.name.as_str() {
                    "net-agent" => agent = Some((artifact.package_id, executable)),
                    "netctl" => netctl = Some(executable),
                    _ => {}
                }
            }
            Message::BuildScriptExecuted(script) => {
                out_dirs.push((script.package_id, script.out_dir));
            }
            _ => {}
        }
    }
    let (package, agent) = agent.context("cargo built no net-agent binary")?;
    let netctl = netctl.context("cargo built no netctl binary")?;
    let out_dir = out_dirs
        .into_iter()
        .find(|(id, _)| *id == package)
        .map(|(_, dir)| dir)
        .context("cargo reported no build script run for net-agent, which builds the programs")?;
    let object = out_dir.join("net-ebpf").into_std_path_buf();
    if !object.is_file() {
        bail!(
            "{} is missing: net-agent's build script should have left the eBPF object there",
            object.display()
        );
    }
    Ok(Built {
        agent: agent.into_std_path_buf(),
        netctl: netctl.into_std_path_buf(),
        object,
    })
}

fn section(title: &str) {
    println!("\n== bench: {title}");
}

pub fn run(ws: &Workspace, options: &Options) -> Result<()> {
    let settings = Settings::from(options)?;
    let built = build(ws, settings.release)?;
    sys::catch_interrupts()?;
    let cpus = sys::allowed_cpus()?;
    let pinning = Cpus {
        client: cpus[0],
        server: cpus[1 % cpus.len()],
    };

    let mut notes = Vec::new();
    let before = Machine::read();
    if before.bpf_stats_enabled {
        let note = "kernel.bpf_stats_enabled was 1: every program run also paid for run-time \
                    accounting, which slows (c) and the program rows; set it to 0 for real \
                    numbers.";
        println!("warning: {note}");
        notes.push(format!("Note: {note}"));
    }
    if cpus.len() < 2 {
        notes.push(format!(
            "Note: only CPU {} was available, so client and server shared it.",
            cpus[0]
        ));
    }

    let mut lab = Lab::new()?;
    let measured = measure(&mut lab, &built, &settings, pinning);
    if let Err(e) = &measured {
        println!("\nbench failed: {e:#}");
        lab.show_agent_log();
    }
    let cleanup = lab.cleanup();
    let (programs, setups, samples, measure_notes) = match (measured, cleanup) {
        (Ok(measured), Ok(())) => measured,
        (Err(e), Ok(())) => return Err(e),
        (Ok(_), Err(c)) => return Err(c.context("the bench ran, but cleaning up failed")),
        (Err(e), Err(c)) => return Err(e.context(format!("and cleaning up failed too: {c:#}"))),
    };
    notes.extend(measure_notes);
    let after = Machine::read();
    notes.push(format!(
        "Load average (1, 5, 15 min) before: {}; after: {}.",
        before.loadavg, after.loadavg
    ));

    let context = Context {
        date: before.date.clone(),
        machine: before.describe(cpus.len()),
        settings: settings.describe(),
        notes,
    };
    let report = Report {
        context: &context,
        programs: &programs,
        setups: &setups,
        samples: &samples,
        baselines: &["a", "b"],
    };
    let dir = ws.target_dir.join("bench");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let markdown = report.markdown();
    let md_path = dir.join("results.md");
    let csv_path = dir.join("results.csv");
    fs::write(&md_path, &markdown).with_context(|| format!("writing {}", md_path.display()))?;
    fs::write(&csv_path, report.csv())
        .with_context(|| format!("writing {}", csv_path.display()))?;
    section("results");
    println!("{markdown}");
    println!(
        "written to {} and {}{}",
        md_path.display(),
        csv_path.display(),
        if options.smoke {
            " (smoke run: the numbers only show that every step works)"
        } else {
            ""
        }
    );
    Ok(())
}

/// Part 1's rows, part 2's setups and samples, and notes for the report.
type Measured = (Vec<PathCost>, Vec<SetupName>, Vec<Sample>, Vec<String>);

/// The share of each end-to-end measurement's time during which some task waited for a CPU.
#[derive(Default)]
struct Pressure {
    shares: Vec<f64>,
}

impl Pressure {
    /// Runs `measure`, recording the CPU pressure over it.
    fn over<T>(&mut self, measure: impl FnOnce() -> Result<T>) -> Result<T> {
        let before = sys::cpu_pressure_us();
        let start = Instant::now();
        let value = measure()?;
        let elapsed = start.elapsed().as_secs_f64() * 1e6;
        if let (Some(before), Some(after)) = (before, sys::cpu_pressure_us())
            && elapsed > 0.0
        {
            self.shares
                .push(after.saturating_sub(before) as f64 / elapsed);
        }
        Ok(value)
    }

    fn note(&self) -> Option<String> {
        let spread = report::Spread::of(&self.shares)?;
        Some(format!(
            "CPU pressure while measuring end to end (PSI `some`: share of the time a task waited \
             for a CPU), over {} measurements: median {:.1}%, max {:.1}%; more than a few % means \
             other work competed for the CPUs.",
            self.shares.len(),
            spread.median * 100.0,
            spread.max * 100.0
        ))
    }
}

/// Both parts; everything they make is registered with `lab`, which the caller cleans up.
fn measure(lab: &mut Lab, built: &Built, settings: &Settings, cpus: Cpus) -> Result<Measured> {
    section("program cost (BPF_PROG_TEST_RUN)");
    let prog_ns = lab.netns("prog", &[])?;
    let programs = programs::measure(&Plan {
        object: &built.object,
        netns: &prog_ns,
        cpu: cpus.server,
        rounds: settings.rounds,
        calls: settings.calls,
    })?;
    sys::check_interrupted()?;
    let mut notes = vec![programs::not_measured()];

    section("end to end: building the setups");
    let mut setups: Vec<Setup> = vec![lab.veth_pair()?, lab.docker_bridge(false)?];
    if Lab::br_netfilter_available() {
        setups.push(lab.docker_bridge(true)?);
    } else {
        notes.push(
            "Not measured: (b+nf), Docker's bridge with bridged packets through iptables: this \
             kernel has no br_netfilter loaded."
                .to_owned(),
        );
    }
    setups.push(lab.ours(&built.agent, &built.netctl)?);
    for setup in &setups {
        traffic::wait_reachable(setup.pair(), cpus, Duration::from_secs(10))
            .with_context(|| format!("setup ({}) {} does not forward", setup.key, setup.label))?;
    }

    let mut samples = Vec::new();
    let mut pressure = Pressure::default();
    for round in 0..settings.rounds {
        section(&format!(
            "end to end, round {}/{}",
            round + 1,
            settings.rounds
        ));
        for kind in [Metric::Rr, Metric::RrSpin, Metric::Crr, Metric::Throughput] {
            let start = round as usize % setups.len();
            for index in (0..setups.len()).map(|i| (start + i) % setups.len()) {
                sys::check_interrupted()?;
                let setup = &setups[index];
                let mut record = |metric: Metric, value: f64| {
                    println!(
                        "round {} {:<12} {:<6} {:<50} {value:>12.2} {}",
                        round + 1,
                        metric.name(),
                        format!("({})", setup.key),
                        setup.label,
                        metric.unit()
                    );
                    samples.push(Sample {
                        metric,
                        setup: setup.key,
                        round,
                        value,
                    });
                };
                let what = || format!("{} over ({}) {}", kind.name(), setup.key, setup.label);
                match kind {
                    Metric::Rr | Metric::RrSpin => {
                        let wait = if kind == Metric::Rr {
                            Wait::Block
                        } else {
                            Wait::Spin
                        };
                        record(
                            kind,
                            pressure
                                .over(|| {
                                    traffic::tcp_rr(setup.pair(), cpus, settings.duration, wait)
                                })
                                .with_context(what)?,
                        )
                    }
                    Metric::Crr => record(
                        kind,
                        pressure
                            .over(|| traffic::tcp_crr(setup.pair(), cpus, settings.duration))
                            .with_context(what)?,
                    ),
                    Metric::Throughput | Metric::CpuPerGbit => {
                        let t = pressure
                            .over(|| {
                                traffic::throughput(
                                    setup.pair(),
                                    cpus,
                                    settings.iperf_seconds(),
                                    lab.tmp_dir(),
                                )
                            })
                            .with_context(what)?;
                        record(Metric::Throughput, t.gbit_per_s);
                        record(Metric::CpuPerGbit, t.cpu_ms_per_gbit);
                    }
                }
            }
        }
    }
    section("end to end: did (c) go through the programs?");
    lab.check_agent_forwarded()?;
    notes.extend(pressure.note());
    let names = setups
        .iter()
        .map(|s| SetupName {
            key: s.key,
            label: s.label,
        })
        .collect();
    Ok((programs, names, samples, notes))
}

/// The machine as the report describes it.
struct Machine {
    date: String,
    kernel: String,
    cpu_model: String,
    loadavg: String,
    bpf_jit: String,
    bpf_stats_enabled: bool,
}

impl Machine {
    fn read() -> Self {
        let read = |path: &str| {
            fs::read_to_string(path)
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "?".to_owned())
        };
        let cpu_model = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|rest| rest.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            })
            .unwrap_or_else(|| "?".to_owned());
        let loadavg = read("/proc/loadavg")
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ");
        Self {
            date: probe(cmd("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
                .map(|d| d.trim().to_owned())
                .unwrap_or_else(|| "?".to_owned()),
            kernel: read("/proc/sys/kernel/osrelease"),
            cpu_model,
            loadavg,
            bpf_jit: read("/proc/sys/net/core/bpf_jit_enable"),
            bpf_stats_enabled: read("/proc/sys/kernel/bpf_stats_enabled") == "1",
        }
    }

    fn describe(&self, cpus: usize) -> String {
        format!(
            "{cpus} CPUs ({}), Linux {}, bpf_jit_enable={}",
            self.cpu_model, self.kernel, self.bpf_jit
        )
    }
}
