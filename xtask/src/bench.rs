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
//! 3. NAT end to end ([`lab::nat`]): a client outside the host to a published port, and an
//!    endpoint to a server outside, (b) Docker's way (iptables DNAT and MASQUERADE) against (c)
//!    ours; TCP_RR both ways and TCP_CRR, in the same rounds.
//! 4. NAT scale ([`scale`]): 1 to 100,000 published ports, ours against iptables and nftables:
//!    per packet, per new connection, and per added or removed mapping.
//! 5. Where (c)'s time goes ([`live`]): after the rounds, (c)'s busy-polling paths once more with
//!    the kernel's run-time accounting on, each program's time per transaction, against how
//!    much longer than (a) (c) takes per transaction.
//! 6. Cross host ([`overlay`]): Flannel's kernel VXLAN path against ours, two simulated hosts,
//!    in rounds of their own, with the same live accounting of (e)'s programs.
//!
//! Results go to `<target dir>/bench/results.{md,csv}`; the Markdown is printed at the end.
//! `--smoke` runs everything with tiny counts so the bench cannot rot; `cargo xtask test` runs it.

mod lab;
mod live;
mod overlay;
mod programs;
mod report;
mod scale;
mod sys;
mod traffic;

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use cargo_metadata::Message;
use net_ebpf_common::program_names;

use self::{
    lab::{
        Firewall, Lab, Setup,
        nat::{DockerNat, NatSetup},
    },
    live::{Accounted, Watched},
    programs::{PathCost, Plan},
    report::{Backend, Context, Metric, Report, Sample, ScaleSample, Scenario, SetupName},
    scale::{AgentPublished, Variant},
    traffic::{Cpus, Pair},
};
use crate::{
    EBPF_PACKAGE, Workspace,
    exec::{cmd, exec_output, probe},
};

/// The bench's options; defaults are the full run, `--smoke` the quick check.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Tiny counts (1 round, 0.3 s per measurement, 300 test runs per path, 1 and 10 published
    /// ports for the NAT scale rows) on the dev build: proves the bench still works, in well under
    /// a minute. `cargo xtask test` runs it.
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
    /// Numbers of published ports the NAT scale rows compare, comma-separated (default
    /// 1,1000,10000,100000; smoke 1,10).
    #[arg(long, value_name = "N,N,...", value_delimiter = ',')]
    pub nat_mappings: Option<Vec<u32>>,
    /// Leaves out the NAT scale rows (about 45 s of the full run).
    #[arg(long, conflicts_with = "nat_mappings")]
    pub no_nat_scale: bool,
    /// Runs one part of the bench only: `single-host` (program cost, end to end, NAT, NAT scale)
    /// or `cross-host` (the overlay against Flannel's way, about 4 minutes).
    #[arg(long, value_enum, value_name = "PART")]
    pub only: Option<Part>,
}

/// A part of the bench, for `--only`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    SingleHost,
    CrossHost,
}

impl Options {
    /// What `cargo xtask test` runs.
    pub fn smoke() -> Self {
        Self {
            smoke: true,
            rounds: None,
            duration: None,
            calls: None,
            nat_mappings: None,
            no_nat_scale: false,
            only: None,
        }
    }
}

struct Settings {
    rounds: u32,
    duration: Duration,
    calls: u32,
    /// Mapping counts of the NAT scale rows, ascending; empty: none.
    mappings: Vec<u32>,
    /// Per CRR measurement of a scale row: a sixth of `duration`.
    scale_duration: Duration,
    /// Times each add/remove of one mapping is timed.
    update_reps: u32,
    /// The agent's build profile: release for real numbers; the smoke run takes the dev build
    /// `cargo xtask test` has just made rather than spend minutes on a release build.
    release: bool,
    /// `--only`: the one part to run; `None`, all of them.
    only: Option<Part>,
}

impl Settings {
    fn from(options: &Options) -> Result<Self> {
        let (rounds, duration, calls, mappings, update_reps) = if options.smoke {
            (1, 0.3, 300, vec![1, 10], 1)
        } else {
            (5, 3.0, 50_000, vec![1, 1_000, 10_000, 100_000], 3)
        };
        let duration = Duration::try_from_secs_f64(options.duration.unwrap_or(duration))
            .context("--duration must be a number of seconds")?;
        let mut mappings = match (&options.nat_mappings, options.no_nat_scale) {
            (_, true) => Vec::new(),
            (Some(list), false) => list.clone(),
            (None, false) => mappings,
        };
        mappings.sort_unstable();
        mappings.dedup();
        let settings = Self {
            rounds: options.rounds.unwrap_or(rounds),
            duration,
            calls: options.calls.unwrap_or(calls),
            scale_duration: (duration / 6).max(Duration::from_millis(100)),
            mappings,
            update_reps,
            release: !options.smoke,
            only: options.only,
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
        if settings
            .mappings
            .iter()
            .any(|n| *n == 0 || *n > scale::MAX_MAPPINGS)
        {
            bail!(
                "--nat-mappings must be between 1 and {} (the PUBLISHED map's room, less the \
                 bench's own ports)",
                scale::MAX_MAPPINGS
            );
        }
        Ok(settings)
    }

    /// iperf3 3.12 takes `-t` in whole seconds (and `-t 0` means forever).
    fn iperf_seconds(&self) -> u32 {
        self.duration.as_secs_f64().ceil().max(1.0) as u32
    }

    fn describe(&self) -> String {
        let scale = if self.mappings.is_empty() {
            "no NAT scale rows".to_owned()
        } else {
            format!(
                "NAT scale with {} mappings, {} s per connection-rate measurement, each add and \
                 remove timed {} time(s) a round (once a round for iptables from 50,000 rules)",
                self.mappings
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                self.scale_duration.as_secs_f64(),
                self.update_reps
            )
        };
        let parts = match self.only {
            Some(Part::CrossHost) => "cross host only".to_owned(),
            Some(Part::SingleHost) => format!(
                "{} test runs per program path per round; {scale}; single host only",
                self.calls
            ),
            None => format!(
                "{} test runs per program path per round; {scale}",
                self.calls
            ),
        };
        format!(
            "{} round(s), setups interleaved in rotating order; {} s per RR/CRR measurement \
             (plus a tenth unmeasured), {} s per iperf3 run; {parts}; net-agent {} build",
            self.rounds,
            self.duration.as_secs_f64(),
            self.iperf_seconds(),
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

/// `0..len` starting at `round`: each round visits the same items in an order that starts one
/// further, so drift within a round (the CPU warming up, a neighbour starting) does not always
/// land on the same ones.
fn rotation(round: u32, len: usize) -> impl Iterator<Item = usize> {
    let start = round as usize % len.max(1);
    (0..len).map(move |i| (start + i) % len)
}

/// Prints a section heading with the time since the bench began.
fn section(title: &str) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let elapsed = START.get_or_init(Instant::now).elapsed();
    println!("\n== bench: {title} [{:.1} s]", elapsed.as_secs_f64());
}

pub fn run(ws: &Workspace, options: &Options) -> Result<()> {
    let settings = Settings::from(options)?;
    section("building");
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
    let mut cross = overlay::CrossHost::default();
    let measured = match options.only {
        Some(Part::CrossHost) => Ok(Measured::default()),
        _ => measure(&mut lab, &built, &settings, pinning),
    }
    .and_then(|m| match options.only {
        Some(Part::SingleHost) => Ok(m),
        _ => cross.measure(&mut lab, &built, &settings, pinning, m),
    });
    if let Err(e) = &measured {
        println!("\nbench failed: {e:#}");
        lab.show_agent_log();
    }
    let cleanup = lab.cleanup();
    let measured = match (measured, cleanup) {
        (Ok(measured), Ok(())) => measured,
        (Err(e), Ok(())) => return Err(e),
        (Ok(_), Err(c)) => return Err(c.context("the bench ran, but cleaning up failed")),
        (Err(e), Err(c)) => return Err(e.context(format!("and cleaning up failed too: {c:#}"))),
    };
    notes.extend(measured.notes);
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
        programs: &measured.programs,
        setups: &measured.setups,
        samples: &measured.samples,
        baselines: &["a", "b"],
        nat_setups: &measured.nat_setups,
        nat_baseline: "b",
        scale: &measured.scale,
        live: &measured.live,
    };
    let dir = ws.target_dir.join("bench");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let markdown = report.markdown() + &cross.markdown();
    let md_path = dir.join("results.md");
    let csv_path = dir.join("results.csv");
    fs::write(&md_path, &markdown).with_context(|| format!("writing {}", md_path.display()))?;
    fs::write(&csv_path, report.csv() + &cross.csv())
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

/// Everything measured, and notes for the report.
#[derive(Default)]
struct Measured {
    programs: Vec<PathCost>,
    setups: Vec<SetupName>,
    nat_setups: Vec<SetupName>,
    samples: Vec<Sample>,
    scale: Vec<ScaleSample>,
    live: Vec<Accounted>,
    notes: Vec<String>,
}

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

/// What the NAT rows measure: TCP_RR busy-polling (blocking TCP_RR is bound by this VM's CPU
/// wake-ups whatever the path, see the forwarding rows, so it is left out to keep the run within
/// ten minutes), TCP_CRR blocking (as netperf) and busy-polling.
const NAT_METRICS: [Metric; 3] = [Metric::RrSpin, Metric::Crr, Metric::CrrSpin];

/// Every part; everything they make is registered with `lab`, which the caller cleans up.
fn measure(lab: &mut Lab, built: &Built, settings: &Settings, cpus: Cpus) -> Result<Measured> {
    section("program cost (BPF_PROG_TEST_RUN)");
    // Forwarding on, and an uplink the programs route replies out of (see `programs`).
    let prog_ns = lab.netns("prog", &["net.ipv4.conf.all.forwarding=1"])?;
    programs::add_uplink(&prog_ns)?;
    let programs = programs::measure(&Plan {
        object: &built.object,
        netns: &prog_ns,
        cpu: cpus.server,
        rounds: settings.rounds,
        calls: settings.calls,
        mappings: &settings.mappings,
    })?;
    let mut scale_samples = programs.scale;
    sys::check_interrupted()?;
    let mut notes = Vec::new();

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

    section("NAT: building the setups");
    let (nat, variants) = build_nat(lab, built, &settings.mappings)?;
    for setup in &nat {
        let pairs = [Some(setup.published()), setup.masquerade()];
        for pair in pairs.into_iter().flatten() {
            traffic::wait_reachable(pair, cpus, Duration::from_secs(10)).with_context(|| {
                format!(
                    "NAT setup {} ({}): {} cannot reach {}",
                    setup.key, setup.label, pair.client_ns, pair.server_ns
                )
            })?;
        }
    }
    let mut agent_map = match variants.iter().find(|v| v.backend == Backend::Ours) {
        Some(v) => Some(AgentPublished::open(lab, &nat[v.setup])?),
        None => None,
    };

    let mut samples = Vec::new();
    let mut live_rounds = Vec::new();
    let mut pressure = Pressure::default();
    let tmp_dir = lab.tmp_dir().to_owned();
    for round in 0..settings.rounds {
        section(&format!(
            "end to end, round {}/{}",
            round + 1,
            settings.rounds
        ));
        let mut e2e = E2e {
            settings,
            cpus,
            tmp_dir: &tmp_dir,
            pressure: &mut pressure,
            samples: &mut samples,
            round,
        };
        for kind in [Metric::Rr, Metric::RrSpin, Metric::Crr, Metric::Throughput] {
            for index in rotation(round, setups.len()) {
                let setup = &setups[index];
                e2e.run(
                    Scenario::Forward,
                    kind,
                    (setup.key, setup.label),
                    setup.pair(),
                )?;
            }
        }
        for scenario in Scenario::NAT {
            let runs = nat_runs(scenario, &setups[0], &nat[..2]);
            for kind in NAT_METRICS {
                for index in rotation(round, runs.len()) {
                    let (name, pair) = runs[index];
                    e2e.run(scenario, kind, name, pair)?;
                }
            }
        }
        section(&format!(
            "end to end: the programs' cost in live traffic (kernel run-time accounting), round \
             {}/{}",
            round + 1,
            settings.rounds
        ));
        live_rounds.push(live_accounts(&setups, &nat[1], settings.duration, cpus)?);
        if !variants.is_empty() {
            section(&format!(
                "NAT scale: connections/s to the last of N mappings, round {}/{}",
                round + 1,
                settings.rounds
            ));
        }
        scale_samples.extend(scale::connection_rates(
            round,
            &nat,
            &variants,
            &mut agent_map,
            cpus,
            settings.scale_duration,
        )?);
        // Timed in every round rather than all at once: the agent's request waits for the
        // disk, whose latency comes and goes in spells longer than one burst of timings.
        if !variants.is_empty() {
            section(&format!(
                "NAT scale: adding and removing one mapping with N installed, round {}/{}",
                round + 1,
                settings.rounds
            ));
        }
        scale_samples.extend(scale::updates(
            lab,
            &nat,
            &variants,
            &mut agent_map,
            settings.update_reps,
            round,
        )?);
    }

    let live = live::merge_rounds(&live_rounds)?;

    section("end to end: did (c) go through the programs?");
    for setup in &setups {
        if let Some(agent) = setup.agent {
            lab.check_agent_forwarded(agent, "server")?;
        }
    }
    if let Some(agent) = nat[1].agent {
        lab.check_agent_forwarded(agent, "web")?;
        lab.check_agent_forwarded(agent, "app")?;
        notes.extend(nat_status(lab, agent)?);
    }
    notes.extend(pressure.note());
    let names = |setups: &mut dyn Iterator<Item = (&'static str, &'static str)>| {
        setups
            .map(|(key, label)| SetupName { key, label })
            .collect::<Vec<_>>()
    };
    Ok(Measured {
        programs: programs.paths,
        setups: names(&mut setups.iter().map(|s| (s.key, s.label))),
        nat_setups: names(
            &mut std::iter::once((setups[0].key, LIMIT_LABEL))
                .chain(nat[..2].iter().map(|s| (s.key, s.label))),
        ),
        samples,
        scale: scale_samples,
        live,
        notes,
    })
}

/// The packets of an endpoint-to-endpoint transaction in (c): both directions alike.
const LIVE_FORWARD: [Watched; 1] = [Watched {
    program: program_names::TC_FROM_ENDPOINT,
    what: "every packet, both ways: source checked, destination looked up, MACs rewritten, \
           bpf_redirect_peer",
}];

/// The packets of a transaction with a published port of (c).
const LIVE_PUBLISHED: [Watched; 3] = [
    Watched {
        program: program_names::TC_FROM_NETDEV,
        what: "the client's packets arriving at the uplink: flow looked up (made for a SYN), \
               DNAT, bpf_redirect_peer into the endpoint",
    },
    Watched {
        program: program_names::TC_FROM_ENDPOINT,
        what: "the endpoint's replies: source checked, flow looked up, reverse DNAT, \
               bpf_fib_lookup, bpf_redirect_neigh out of the uplink",
    },
    Watched {
        program: program_names::TC_TO_NETDEV,
        what: "the replies leaving the uplink, translated already: passed",
    },
];

/// One more busy-polling measurement of each of (c)'s paths that issue 6 sets a target for,
/// with the programs' run-time accounting on (see [`live::account`]); once a round, after the
/// round's own measurements, which the accounting's clock reads must not slow.
fn live_accounts(
    setups: &[Setup],
    ours_nat: &NatSetup,
    duration: Duration,
    cpus: Cpus,
) -> Result<Vec<Accounted>> {
    let ours = setups
        .iter()
        .find(|s| s.agent.is_some())
        .context("no setup of ours to account")?;
    let runs: [(Scenario, Metric, Pair<'_>, &[Watched]); 3] = [
        (
            Scenario::Forward,
            Metric::RrSpin,
            ours.pair(),
            &LIVE_FORWARD,
        ),
        (
            Scenario::Published,
            Metric::RrSpin,
            ours_nat.published(),
            &LIVE_PUBLISHED,
        ),
        (
            Scenario::Published,
            Metric::CrrSpin,
            ours_nat.published(),
            &LIVE_PUBLISHED,
        ),
    ];
    runs.into_iter()
        .map(|(scenario, metric, pair, watched)| {
            sys::check_interrupted()?;
            let account = live::account(watched, &[], || {
                traffic::transactions(metric, pair, cpus, duration)
            })
            .with_context(|| {
                format!(
                    "{} {} over (c) with the programs' run-time accounting on",
                    scenario.name(),
                    metric.name()
                )
            })?;
            println!(
                "{} {} over (c), accounting on: {:.0}/s, programs {:.0} ns per transaction",
                scenario.name(),
                metric.name(),
                account.per_second,
                account.ns_per_transaction()
            );
            Ok(Accounted {
                scenario,
                metric,
                account,
            })
        })
        .collect()
}

/// How (a), the veth pair, is named where another part measures it as its limit: the NAT
/// setups and the cross-host rows.
const LIMIT_LABEL: &str =
    "veth pair: client and server joined directly, no host between them (the limit)";

/// What a NAT scenario measures in each round: (b) and (c) and, for published ports, (a). A
/// connection through a host cannot beat the bare veth pair, so (a)'s ratio to (b) is the most
/// any data plane can reach against (b) in that round; the targets are set against (b).
fn nat_runs<'a>(
    scenario: Scenario,
    veth_pair: &'a Setup,
    main_nat: &'a [NatSetup],
) -> Vec<((&'static str, &'static str), Pair<'a>)> {
    let mut runs = Vec::new();
    if scenario == Scenario::Published {
        debug_assert_eq!(veth_pair.key, "a");
        runs.push(((veth_pair.key, LIMIT_LABEL), veth_pair.pair()));
    }
    for setup in main_nat {
        let pair = match scenario {
            Scenario::Published => Some(setup.published()),
            _ => setup.masquerade(),
        };
        if let Some(pair) = pair {
            runs.push(((setup.key, setup.label), pair));
        }
    }
    runs
}

/// The NAT setups: (b) and (c) first, then the kernel hosts of the scale rows; and the scale
/// rows' variants (ours at N is (c) with fillers; iptables at N=1 is (b)).
fn build_nat(
    lab: &mut Lab,
    built: &Built,
    mappings: &[u32],
) -> Result<(Vec<NatSetup>, Vec<Variant>)> {
    let mut nat = vec![
        lab.docker_nat(&DockerNat {
            name: "bnat",
            key: "b",
            label: "Docker: bridge + iptables DNAT / MASQUERADE",
            index: 0,
            firewall: Firewall::Iptables,
            fillers: 0,
            app: true,
        })?,
        lab.ours_nat(&built.agent, &built.netctl, 1)?,
    ];
    let mut variants = Vec::new();
    for &n in mappings {
        variants.push(Variant {
            backend: Backend::Ours,
            mappings: n,
            setup: 1,
        });
        for (backend, firewall, prefix) in [
            (Backend::Iptables, Firewall::Iptables, "ipt"),
            (Backend::Nft, Firewall::Nft, "nft"),
        ] {
            let setup = if backend == Backend::Iptables && n == 1 {
                0
            } else {
                sys::check_interrupted()?;
                let index = u8::try_from(nat.len()).context("too many NAT setups")?;
                nat.push(lab.docker_nat(&DockerNat {
                    name: &format!("{prefix}{n}"),
                    key: "b",
                    label: "Docker-style host for the scale rows",
                    index,
                    firewall,
                    fillers: n - 1,
                    app: false,
                })?);
                nat.len() - 1
            };
            variants.push(Variant {
                backend,
                mappings: n,
                setup,
            });
        }
    }
    Ok((nat, variants))
}

/// What the NAT agent counted: its flows must be there; refused flows are worth a note.
fn nat_status(lab: &Lab, agent: lab::AgentId) -> Result<Vec<String>> {
    lab.netctl(agent, &["status"])?;
    let status = lab.netctl_json(agent, &["status"])?;
    let count = |field: &str| {
        status
            .pointer(&format!("/nat/{field}"))
            .and_then(serde_json::Value::as_u64)
            .with_context(|| format!("no nat.{field} in `netctl status`: {status}"))
    };
    let (published, masqueraded) = (count("published_flows")?, count("flows_created")?);
    if published == 0 || masqueraded == 0 {
        bail!(
            "the NAT agent recorded {published} connections to published ports and \
             {masqueraded} masqueraded flows: the NAT rows did not go through the data plane"
        );
    }
    let mut notes = Vec::new();
    let (exhausted, full) = (count("ports_exhausted")?, count("table_full")?);
    if exhausted > 0 || full > 0 {
        notes.push(format!(
            "Note: (c)'s agent refused {exhausted} new masqueraded flow(s) for want of a free \
             source port and {full} for a full conntrack table ({masqueraded} masqueraded and \
             {published} published-port flows made); each refused SYN is retried by the client \
             after 1 s."
        ));
    }
    Ok(notes)
}

/// One round's end-to-end measurements and where they go.
struct E2e<'a> {
    settings: &'a Settings,
    cpus: Cpus,
    tmp_dir: &'a Path,
    pressure: &'a mut Pressure,
    samples: &'a mut Vec<Sample>,
    round: u32,
}

impl E2e<'_> {
    /// Measures `kind` over `pair` (iperf3 also gives CPU per Gbit) and records it under
    /// `setup`'s key.
    fn run(
        &mut self,
        scenario: Scenario,
        kind: Metric,
        (key, label): (&'static str, &'static str),
        pair: Pair<'_>,
    ) -> Result<()> {
        sys::check_interrupted()?;
        let (settings, cpus) = (self.settings, self.cpus);
        let what = || format!("{} {} over ({key}) {label}", scenario.name(), kind.name());
        let values: Vec<(Metric, f64)> = match kind {
            Metric::Rr | Metric::RrSpin | Metric::Crr | Metric::CrrSpin => {
                let rate = self
                    .pressure
                    .over(|| traffic::transactions(kind, pair, cpus, settings.duration))
                    .with_context(what)?
                    .per_second;
                vec![(kind, rate)]
            }
            Metric::ThroughputOneCpu => {
                let tmp_dir = self.tmp_dir;
                let one = Cpus {
                    client: cpus.client,
                    server: cpus.client,
                };
                let t = self
                    .pressure
                    .over(|| traffic::throughput(pair, one, settings.iperf_seconds(), tmp_dir))
                    .with_context(what)?;
                vec![(kind, t.gbit_per_s)]
            }
            Metric::Throughput | Metric::CpuPerGbit | Metric::Retransmits => {
                let tmp_dir = self.tmp_dir;
                let t = self
                    .pressure
                    .over(|| traffic::throughput(pair, cpus, settings.iperf_seconds(), tmp_dir))
                    .with_context(what)?;
                vec![
                    (Metric::Throughput, t.gbit_per_s),
                    (Metric::CpuPerGbit, t.cpu_ms_per_gbit),
                    (Metric::Retransmits, t.retransmits_per_gb),
                ]
            }
        };
        for (metric, value) in values {
            println!(
                "round {} {:<10} {:<12} {:<6} {:<50} {value:>12.2} {}",
                self.round + 1,
                scenario.name(),
                metric.name(),
                format!("({key})"),
                label,
                metric.unit()
            );
            self.samples.push(Sample {
                scenario,
                metric,
                setup: key,
                round: self.round,
                value,
            });
        }
        Ok(())
    }
}

/// The machine as the report describes it.
struct Machine {
    date: String,
    kernel: String,
    cpu_model: String,
    loadavg: String,
    bpf_jit: String,
    bpf_stats_enabled: bool,
    /// What every TCP connection of the bench uses: namespaces inherit the host's. The
    /// throughput rows depend on it (how TCP takes reordering for loss).
    congestion_control: String,
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
            congestion_control: read("/proc/sys/net/ipv4/tcp_congestion_control"),
        }
    }

    fn describe(&self, cpus: usize) -> String {
        format!(
            "{cpus} CPUs ({}), Linux {}, bpf_jit_enable={}, TCP congestion control {}",
            self.cpu_model, self.kernel, self.bpf_jit, self.congestion_control
        )
    }
}

#[cfg(test)]
mod tests {
    use super::rotation;

    #[test]
    fn rotation_visits_everything_once_from_a_moving_start() {
        assert_eq!(rotation(1, 3).collect::<Vec<_>>(), vec![1, 2, 0]);
        assert_eq!(rotation(5, 2).collect::<Vec<_>>(), vec![1, 0]);
        assert_eq!(rotation(0, 0).count(), 0);
    }
}
