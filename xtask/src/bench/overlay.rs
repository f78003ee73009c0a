//! Cross-host rows: an endpoint on one simulated host to an endpoint on another, through VXLAN,
//! Flannel's way against ours, side by side in rounds of their own.
//!
//! Two host namespaces per setup, joined by one veth pair (the underlay, MTU 1500, each host's
//! `eth0` on a /24 of its own setup); a client endpoint on host 1 and a server endpoint on host 2
//! (the same endpoint namespaces as the single-host rows: IPv6 off, `tcp_max_tw_buckets = 0` in
//! the server's); endpoint MTU 1450, the underlay's less VXLAN's 50 bytes, in both setups.
//!
//! ```text
//! (d) client eth0 ==veth== cni0 (bridge, gateway) -> route -> flannel.1 (kernel vxlan) ==eth0==
//!     ==eth0== flannel.1 -> route -> cni0 ==veth== eth0 server
//! (e) client eth0 ==veth== [tcx: tc_from_endpoint, tunnel key, bpf_redirect] -> <prefix>-vxlan
//!     (collect metadata) ==eth0== ==eth0== [tcx: tc_from_netdev, decapsulated,
//!     bpf_redirect_peer] ==veth== eth0 server
//! ```
//! (The receiving host's `<prefix>-vxlan` takes only what its uplink leaves to it: none of the
//! bench's traffic.)
//!
//! (a), the veth pair of the single-host rows, client straight to server, is measured in the
//! same rounds for the request/response metrics: no path through two hosts can beat it, so its
//! ratio to (d) in a round is the most any overlay could show against (d) there.
//!
//! (d) is what Flannel's vxlan backend programs into the kernel (`pkg/backend/vxlan`): a VXLAN
//! device `flannel.1` (VNI 1, the uplink's address and device, port 8472, no learning, MTU of the
//! uplink less 50, the subnet's `.0/32` as its address), and for the other host's lease a route
//! to its subnet via its `.0` on `flannel.1` (onlink), a permanent neighbour entry for that `.0`
//! with the other `flannel.1`'s MAC and a permanent FDB entry sending that MAC to the other
//! host's uplink address; the endpoint sits on a `cni0` bridge holding the subnet's gateway, as
//! Flannel's CNI plugin (the bridge plugin underneath) sets it up. Forwarding is on; bridged
//! packets skip iptables (`bridge-nf-call-iptables = 0`) and no rule is loaded, so (d) is the
//! kernel path alone, without the masquerade and FORWARD rules flanneld also installs.
//!
//! (e) is two `net-agent`s, one per host namespace, sharing an embedded cluster store (a
//! directory under the bench's temporary directory), with an overlay network created on host 1
//! and reaching host 2 through the store, and the two endpoint namespaces adopted as endpoints
//! of it, one on each host.
//!
//! Everything lives in namespaces named by [`Lab::netns`] (`bench-<pid>-*`), which the lab
//! deletes at the end; the agents' pins go under the lab's pin directory and their state, logs
//! and the cluster store under its temporary directory, which the lab removes too. The agents
//! themselves, and what they made, are removed by [`Cluster::cleanup`] before the lab cleans up,
//! on every exit path.

use std::{
    ffi::OsStr,
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use net_ebpf_common::program_names;

use super::{
    Built, Pressure, Settings,
    lab::{Lab, PIN_PREFIX, UNUSED_DNS_UPSTREAM},
    live::{self, Account, Watched},
    report::{Metric, Spread, csv_row, ratio_cell, thousands},
    section,
    sys::{self, ChildGuard, NETNS_DIR},
    traffic::{self, Cpus, Pair, Wait},
};
use crate::{
    cleanup::Failures,
    exec::{cmd, display, exec, exec_output, probe},
    sim_agent::{AgentLaunch, show_log_tail},
};

/// The pool both setups take their hosts' /24s from (RFC 2544, never routed anywhere real):
/// Flannel's `Network`, our overlay network's `--subnet`.
const POOL: &str = "198.18.0.0/16";
/// The endpoints' MTU: the underlay's 1500 less VXLAN's 50 bytes.
const ENDPOINT_MTU: &str = "1450";
/// Flannel's VNI and UDP port (the Linux kernel's VXLAN port, Flannel's default).
const FLANNEL_VNI: &str = "1";
const FLANNEL_PORT: &str = "8472";
const FLANNEL_DEV: &str = "flannel.1";
const CNI_BRIDGE: &str = "cni0";
/// Every host's underlay interface, in its own namespace.
const UPLINK: &str = "eth0";
/// Our overlay network.
const OVERLAY: &str = "ov";
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the overlay network and the routes may take to reach a host: agents follow the
/// store within a second; generous for a loaded two-core machine.
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(15);
/// The server namespace's setting that every setup has (see `traffic::tcp_crr`).
const NO_TIME_WAIT: &str = "net.ipv4.tcp_max_tw_buckets=0";

/// What the cross-host rows measure, in table order.
const METRICS: [Metric; 7] = [
    Metric::Rr,
    Metric::RrSpin,
    Metric::Crr,
    Metric::Throughput,
    Metric::CpuPerGbit,
    Metric::Retransmits,
    Metric::ThroughputOneCpu,
];

/// The setup the ratios are taken against.
const BASELINE: &str = "d";
/// The veth pair, no host between client and server: the limit.
const LIMIT: &str = "a";
/// The underlay /24s (198.19.`n`.0) of (d) and (e), and the veth pair's subnet.
const FLANNEL_NET: u8 = 20;
const OURS_NET: u8 = 21;
const LIMIT_NET: u8 = 22;

/// One cross-host setup: a client namespace on host 1, a server namespace on host 2.
struct CrossSetup {
    key: &'static str,
    label: &'static str,
    client_ns: String,
    server_ns: String,
    server_ip: Ipv4Addr,
}

impl CrossSetup {
    /// Whether the setup is measured for `metric`: the limit only for request/response, which
    /// is what it bounds (throughput through two hosts already beats Flannel's way).
    fn measures(&self, metric: Metric) -> bool {
        self.key != LIMIT || matches!(metric, Metric::Rr | Metric::RrSpin | Metric::Crr)
    }

    fn pair(&self) -> Pair<'_> {
        Pair {
            client_ns: &self.client_ns,
            server_ns: &self.server_ns,
            server_ip: self.server_ip,
            via: traffic::Via::Direct,
        }
    }
}

struct CrossSample {
    metric: Metric,
    setup: &'static str,
    round: u32,
    value: f64,
}

/// The cross-host rows: measured by [`CrossHost::measure`], written as a Markdown section and
/// CSV rows of their own (their ratios are to (d), not to the single-host baselines).
#[derive(Default)]
pub struct CrossHost {
    setups: Vec<(&'static str, &'static str)>,
    samples: Vec<CrossSample>,
    /// What (e)'s programs cost in live traffic, medians over the rounds (see [`live_costs`]).
    live: Option<Account>,
    notes: Vec<String>,
}

/// The programs whose live cost the cross-host part reports: all that run on (e)'s path.
const LIVE_PROGRAMS: [Watched; 3] = [
    Watched {
        program: program_names::TC_FROM_ENDPOINT,
        what: "the endpoint's packet to another host: tunnel key, redirect to the VXLAN device",
    },
    Watched {
        program: program_names::TC_TO_NETDEV,
        what: "the VXLAN packet leaving the uplink (the host's own traffic: passed)",
    },
    Watched {
        program: program_names::TC_FROM_NETDEV,
        what: "the VXLAN packet arriving at the uplink: source and VNI checked, decapsulated, \
               bpf_redirect_peer into the endpoint",
    },
];

/// The VXLAN device's program: it must not run in live traffic, every packet being
/// decapsulated at the uplink already.
const BYPASSED_PROGRAM: Watched = Watched {
    program: program_names::TC_FROM_OVERLAY,
    what: "packets the uplink should have decapsulated went through the VXLAN device",
};

impl CrossHost {
    /// Builds (a), (d) and (e), measures them in interleaved rounds, checks that (d) went through
    /// `flannel.1` and (e) through the programs, and removes the agents. The namespaces are
    /// `lab`'s, which its cleanup deletes. Runs after the single-host part, whose result
    /// `before` it hands back, so that the caller's error handling and cleanup cover both.
    pub fn measure<T>(
        &mut self,
        lab: &mut Lab,
        built: &Built,
        settings: &Settings,
        cpus: Cpus,
        before: T,
    ) -> Result<T> {
        let mut cluster = Cluster::new(lab.tmp_dir(), &built.netctl);
        let measured = self.measure_in(lab, built, settings, cpus, &mut cluster);
        if let Err(e) = &measured {
            println!("\ncross-host rows failed: {e:#}");
            cluster.show_logs();
        }
        let cleanup = cluster.cleanup();
        match (measured, cleanup) {
            (Ok(()), Ok(())) => Ok(before),
            (Err(e), Ok(())) => Err(e),
            (Ok(()), Err(c)) => {
                Err(c.context("the cross-host rows ran, but removing the agents failed"))
            }
            (Err(e), Err(c)) => {
                Err(e.context(format!("and removing the agents failed too: {c:#}")))
            }
        }
    }

    fn measure_in(
        &mut self,
        lab: &mut Lab,
        built: &Built,
        settings: &Settings,
        cpus: Cpus,
        cluster: &mut Cluster,
    ) -> Result<()> {
        section("cross host: building the setups");
        let (flannel, flannel_hosts) = flannel(lab)?;
        let setups = [veth_pair(lab)?, flannel, ours(lab, &built.agent, cluster)?];
        for setup in &setups {
            traffic::wait_reachable(setup.pair(), cpus, Duration::from_secs(10)).with_context(
                || {
                    format!(
                        "cross-host setup ({}) {} does not forward",
                        setup.key, setup.label
                    )
                },
            )?;
        }
        self.setups = setups.iter().map(|s| (s.key, s.label)).collect();

        let mut pressure = Pressure::default();
        let mut live_rounds = Vec::new();
        let [_, _, ours] = &setups;
        for round in 0..settings.rounds {
            section(&format!(
                "cross host, round {}/{}",
                round + 1,
                settings.rounds
            ));
            for kind in [
                Metric::Rr,
                Metric::RrSpin,
                Metric::Crr,
                Metric::Throughput,
                Metric::ThroughputOneCpu,
            ] {
                let start = round as usize % setups.len();
                for setup in (0..setups.len()).map(|i| &setups[(start + i) % setups.len()]) {
                    if !setup.measures(kind) {
                        continue;
                    }
                    sys::check_interrupted()?;
                    let what = || format!("{} over ({}) {}", kind.name(), setup.key, setup.label);
                    let pair = setup.pair();
                    if matches!(kind, Metric::Throughput | Metric::ThroughputOneCpu) {
                        // One CPU: the server on the client's, so every packet of both
                        // directions is sent, forwarded and received there, in order.
                        let cpus = if kind == Metric::Throughput {
                            cpus
                        } else {
                            Cpus {
                                client: cpus.client,
                                server: cpus.client,
                            }
                        };
                        let t = pressure
                            .over(|| {
                                traffic::throughput(
                                    pair,
                                    cpus,
                                    settings.iperf_seconds(),
                                    lab.tmp_dir(),
                                )
                            })
                            .with_context(what)?;
                        self.record(round, setup, kind, t.gbit_per_s);
                        if kind == Metric::Throughput {
                            self.record(round, setup, Metric::CpuPerGbit, t.cpu_ms_per_gbit);
                            self.record(round, setup, Metric::Retransmits, t.retransmits_per_gb);
                        }
                        continue;
                    }
                    let value = pressure
                        .over(|| traffic::transactions(kind, pair, cpus, settings.duration))
                        .with_context(what)?;
                    self.record(round, setup, kind, value.per_second);
                }
            }
            // After the round's own measurements, so that the accounting's clock reads slow
            // none of them.
            live_rounds.push(live_costs(ours.pair(), cpus, settings.duration)?);
        }
        self.live = Some(live::merge(&live_rounds.iter().collect::<Vec<_>>())?);

        section("cross host: did (d) go through flannel.1 and (e) through the programs?");
        check_vxlan_carried(&flannel_hosts[1], "host 2 of (d)")?;
        cluster.check_forwarded()?;
        self.notes
            .extend(pressure.note().map(|n| format!("Cross host: {n}")));
        Ok(())
    }

    fn record(&mut self, round: u32, setup: &CrossSetup, metric: Metric, value: f64) {
        println!(
            "round {} {:<12} {:<6} {:<50} {value:>12.2} {}",
            round + 1,
            metric.name(),
            format!("({})", setup.key),
            setup.label,
            metric.unit()
        );
        self.samples.push(CrossSample {
            metric,
            setup: setup.key,
            round,
            value,
        });
    }

    fn values(&self, metric: Metric, setup: &str) -> Vec<f64> {
        self.samples
            .iter()
            .filter(|s| s.metric == metric && s.setup == setup)
            .map(|s| s.value)
            .collect()
    }

    /// Per-round ratios of `setup` to `baseline`, over the rounds both were measured in.
    fn ratios(&self, metric: Metric, setup: &str, baseline: &str) -> Vec<f64> {
        self.samples
            .iter()
            .filter(|s| s.metric == metric && s.setup == setup)
            .filter_map(|s| {
                self.samples
                    .iter()
                    .find(|b| b.metric == metric && b.setup == baseline && b.round == s.round)
                    .filter(|b| b.value != 0.0)
                    .map(|b| s.value / b.value)
            })
            .collect()
    }

    /// The section appended to the report's Markdown; empty when nothing was measured.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        if self.samples.is_empty() {
            return md;
        }
        let _ = writeln!(
            md,
            "\n**Cross host**: an endpoint on one simulated host to an endpoint on another, \
             through VXLAN over a veth underlay (MTU 1500; endpoints 1450), in rounds of their \
             own (median and min-max over rounds; ratios are per-round ratios to ({BASELINE}), \
             median and min-max)\n"
        );
        let _ = writeln!(
            md,
            "| metric | setup | median | min-max | vs ({BASELINE}) |\n|---|---|---:|---:|---:|"
        );
        for metric in METRICS {
            let label = metric.label();
            let mut first = true;
            for (key, setup_label) in &self.setups {
                let Some(spread) = Spread::of(&self.values(metric, key)) else {
                    continue;
                };
                let cell = if *key == BASELINE {
                    "baseline".to_owned()
                } else {
                    ratio_cell(&self.ratios(metric, key, BASELINE))
                };
                let _ = writeln!(
                    md,
                    "| {} | ({key}) {setup_label} | {} | {}-{} | {cell} |",
                    if first { label } else { "" },
                    metric.format(spread.median),
                    metric.format(spread.min),
                    metric.format(spread.max),
                );
                first = false;
            }
        }
        let median = |metric, setup| {
            Spread::of(&self.ratios(metric, setup, BASELINE))
                .map_or_else(|| "-".to_owned(), |r| format!("{:.2}x", r.median))
        };
        let _ = writeln!(
            md,
            "\nIssue 6's target, (e) against (d): TCP_RR at least 1.20x, throughput at least \
             1.00x. Here: TCP_RR {}, busy-polling {}, TCP_CRR {}, throughput {}, on one CPU {} \
             (medians of the per-round ratios). The limit, ({LIMIT}) against (d): TCP_RR {}, \
             busy-polling {}, TCP_CRR {}.",
            median(Metric::Rr, "e"),
            median(Metric::RrSpin, "e"),
            median(Metric::Crr, "e"),
            median(Metric::Throughput, "e"),
            median(Metric::ThroughputOneCpu, "e"),
            median(Metric::Rr, LIMIT),
            median(Metric::RrSpin, LIMIT),
            median(Metric::Crr, LIMIT),
        );
        if let Some(live) = &self.live {
            let by_round = match Spread::of(&live.round_totals) {
                Some(s) if live.round_totals.len() > 1 => format!(
                    " All of them together: {:.0} ns per transaction ({:.0}-{:.0} by round).",
                    live.ns_per_transaction(),
                    s.min,
                    s.max
                ),
                _ => format!(
                    " All of them together: {:.0} ns per transaction.",
                    live.ns_per_transaction()
                ),
            };
            let _ = writeln!(
                md,
                "\n**Programs in live traffic**: (e)'s programs during one more busy-polling \
                 TCP_RR over (e) in every round, after the round's measurements, by the kernel's \
                 own run-time accounting (`BPF_ENABLE_STATS`, which adds a clock read to every \
                 run), the packets of the path as it runs, GSO and all; medians over the rounds. \
                 `tc_from_overlay`, at the VXLAN device, did not run: every packet was \
                 decapsulated at the uplink. Over both hosts; a transaction is one request and \
                 its response.{by_round}\n"
            );
            let _ = writeln!(
                md,
                "| program | path | runs | runs per transaction | ns/run | ns per transaction |"
            );
            let _ = writeln!(md, "|---|---|---:|---:|---:|---:|");
            for cost in &live.costs {
                let _ = writeln!(
                    md,
                    "| `{}` | {} | {} | {:.2} | {:.1} | {:.0} |",
                    cost.program,
                    cost.what,
                    thousands(cost.runs as f64),
                    cost.runs_per_transaction,
                    cost.ns_per_run,
                    cost.ns_per_transaction()
                );
            }
        }
        for note in &self.notes {
            let _ = writeln!(md, "{note}");
        }
        md
    }

    /// CSV rows in the report's columns (part `e2e_cross_host`), to append to its CSV.
    pub fn csv(&self) -> String {
        let mut csv = String::new();
        let mut row = |subject: &str,
                       label: &str,
                       metric: Metric,
                       unit: &str,
                       quantity: &str,
                       values: &[f64]| {
            csv_row(
                &mut csv,
                [
                    "e2e_cross_host",
                    subject,
                    label,
                    metric.name(),
                    unit,
                    quantity,
                ],
                values,
            );
        };
        for metric in METRICS {
            for (key, label) in &self.setups {
                row(
                    key,
                    label,
                    metric,
                    metric.unit(),
                    "value",
                    &self.values(metric, key),
                );
                if *key != BASELINE {
                    row(
                        key,
                        label,
                        metric,
                        "x",
                        &format!("ratio_vs_{BASELINE}"),
                        &self.ratios(metric, key, BASELINE),
                    );
                }
            }
        }
        if let Some(live) = &self.live {
            live::csv(&mut csv, "e2e_cross_host_live", &live.costs);
            csv_row(
                &mut csv,
                [
                    "e2e_cross_host_live",
                    "e",
                    "all programs",
                    "programs_ns_per_transaction",
                    "ns",
                    "value",
                ],
                &live.round_totals,
            );
        }
        csv
    }
}

/// What each of [`LIVE_PROGRAMS`] costs during one more busy-polling TCP_RR over `pair`, (e)'s
/// (see [`live::account`]); [`BYPASSED_PROGRAM`] running fails the bench.
fn live_costs(pair: Pair<'_>, cpus: Cpus, duration: Duration) -> Result<Account> {
    let account = live::account(&LIVE_PROGRAMS, &[BYPASSED_PROGRAM], || {
        traffic::tcp_rr(pair, cpus, duration, Wait::Spin)
    })
    .context("TCP_RR over (e) with the programs' run-time accounting on")?;
    println!(
        "TCP_RR (busy-polling) over (e) with run-time accounting on: {:.0} transactions/s",
        account.per_second
    );
    Ok(account)
}

/// Host `n` (1 or 2) of a setup whose underlay is 198.19.`net`.0/24.
fn underlay_ip(net: u8, n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, net, n)
}

/// The two host namespaces of setup `key`, with `sysctls`, joined by a veth pair: each end is
/// `eth0`, host `n` at 198.19.`net`.`n`/24.
fn host_pair(lab: &mut Lab, key: &str, net: u8, sysctls: &[&str]) -> Result<[String; 2]> {
    let hosts = [
        lab.netns(&format!("{key}-h1"), sysctls)?,
        lab.netns(&format!("{key}-h2"), sysctls)?,
    ];
    let [h1, h2] = &hosts;
    ip(
        h1,
        &format!("link add {UPLINK} type veth peer name {UPLINK} netns {h2}"),
    )?;
    for (n, host) in [(1, h1), (2, h2)] {
        ip(
            host,
            &format!("addr add {}/24 dev {UPLINK}", underlay_ip(net, n)),
        )?;
        ip(host, &format!("link set {UPLINK} up"))?;
    }
    Ok(hosts)
}

/// The client (on host 1) and server (on host 2) namespaces of setup `key`.
fn endpoints(lab: &mut Lab, key: &str) -> Result<(String, String)> {
    Ok((
        lab.netns(&format!("{key}-cli"), &[])?,
        lab.netns(&format!("{key}-srv"), &[NO_TIME_WAIT])?,
    ))
}

/// Address `last` of host `n`'s /24 of [`POOL`] in (d), as Flannel would lease it:
/// 198.18.`n`.0/24.
fn flannel_subnet(n: u8, last: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, n, last)
}

/// (a) The veth pair, client straight to server, in namespaces of its own; see the module
/// comment.
fn veth_pair(lab: &mut Lab) -> Result<CrossSetup> {
    let setup = lab.veth_pair_on("xa", LIMIT_NET)?;
    Ok(CrossSetup {
        key: LIMIT,
        label: super::LIMIT_LABEL,
        client_ns: setup.client_ns,
        server_ns: setup.server_ns,
        server_ip: setup.server_ip,
    })
}

/// (d) Flannel's way, and its two host namespaces; see the module comment.
fn flannel(lab: &mut Lab) -> Result<(CrossSetup, [String; 2])> {
    let mut sysctls = vec!["net.ipv4.ip_forward=1"];
    if Lab::br_netfilter_available() {
        sysctls.extend([
            "net.bridge.bridge-nf-call-iptables=0",
            "net.bridge.bridge-nf-call-ip6tables=0",
            "net.bridge.bridge-nf-call-arptables=0",
        ]);
    }
    let hosts = host_pair(lab, "d", FLANNEL_NET, &sysctls)?;
    let (client, server) = endpoints(lab, "d")?;
    let mtu = ENDPOINT_MTU;
    for (n, host, endpoint) in [(1, &hosts[0], &client), (2, &hosts[1], &server)] {
        // The CNI bridge plugin: the bridge holds the gateway, the endpoint's veth is a port in
        // hairpin mode, the endpoint routes everything through the gateway.
        let gateway = flannel_subnet(n, 1);
        ip(
            host,
            &format!("link add {CNI_BRIDGE} mtu {mtu} type bridge"),
        )?;
        ip(host, &format!("addr add {gateway}/24 dev {CNI_BRIDGE}"))?;
        ip(host, &format!("link set {CNI_BRIDGE} up"))?;
        ip(
            host,
            &format!(
                "link add veth0 mtu {mtu} type veth peer name eth0 mtu {mtu} netns {endpoint}"
            ),
        )?;
        ip(host, &format!("link set veth0 master {CNI_BRIDGE} up"))?;
        ip(host, "link set veth0 type bridge_slave hairpin on")?;
        ip(
            endpoint,
            &format!("addr add {}/24 dev eth0", flannel_subnet(n, 2)),
        )?;
        ip(endpoint, "link set eth0 up")?;
        ip(endpoint, &format!("route add default via {gateway}"))?;

        // Flannel's vxlan backend: the device, with the subnet's .0/32 as its address.
        ip(
            host,
            &format!(
                "link add {FLANNEL_DEV} mtu {mtu} type vxlan id {FLANNEL_VNI} local {} dev \
                 {UPLINK} dstport {FLANNEL_PORT} nolearning",
                underlay_ip(FLANNEL_NET, n)
            ),
        )?;
        ip(
            host,
            &format!("addr add {}/32 dev {FLANNEL_DEV}", flannel_subnet(n, 0)),
        )?;
        ip(host, &format!("link set {FLANNEL_DEV} up"))?;
    }
    // And what it programs for the other host's lease: a route to its subnet through its VTEP
    // address (the subnet's .0), onlink; that address's MAC (its flannel.1's), permanent; and
    // where that MAC is (its uplink address), permanent.
    let macs = [
        link_mac(&hosts[0], FLANNEL_DEV)?,
        link_mac(&hosts[1], FLANNEL_DEV)?,
    ];
    for (host, there, mac) in [(&hosts[0], 2, &macs[1]), (&hosts[1], 1, &macs[0])] {
        let vtep = flannel_subnet(there, 0);
        let uplink = underlay_ip(FLANNEL_NET, there);
        ip(
            host,
            &format!("route add {vtep}/24 via {vtep} dev {FLANNEL_DEV} onlink"),
        )?;
        ip(
            host,
            &format!("neigh add {vtep} lladdr {mac} dev {FLANNEL_DEV} nud permanent"),
        )?;
        exec(
            cmd("bridge").args(["-n", host]).args(
                format!("fdb append {mac} dev {FLANNEL_DEV} dst {uplink} self permanent")
                    .split_whitespace(),
            ),
        )?;
    }
    let setup = CrossSetup {
        key: "d",
        label: "Flannel's way: cni0 bridge, routes to flannel.1 (kernel vxlan)",
        client_ns: client,
        server_ns: server,
        server_ip: flannel_subnet(2, 2),
    };
    Ok((setup, hosts))
}

/// (e) Ours: an agent per host in one cluster, an overlay network, an endpoint on each host.
fn ours(lab: &mut Lab, agent_bin: &Path, cluster: &mut Cluster) -> Result<CrossSetup> {
    let hosts = host_pair(lab, "e", OURS_NET, &[])?;
    let (client, server) = endpoints(lab, "e")?;
    cluster.start(agent_bin, "h1", &hosts[0], underlay_ip(OURS_NET, 1))?;
    cluster.start(agent_bin, "h2", &hosts[1], underlay_ip(OURS_NET, 2))?;
    for agent in &mut cluster.agents {
        agent.wait_ready()?;
    }
    let [a1, a2] = cluster.pair()?;
    a1.netctl(&[
        "network", "create", OVERLAY, "--driver", "overlay", "--subnet", POOL,
    ])?;
    a1.network = true;
    a2.wait_for_network(OVERLAY)?;
    a1.adopt_endpoint("client", &client)?;
    a2.adopt_endpoint("server", &server)?;
    let server_ip = a2.endpoint_ip("server")?;
    let (v1, v2) = (a1.vtep, a2.vtep);
    a1.wait_for_route_to(v2)?;
    a2.wait_for_route_to(v1)?;
    Ok(CrossSetup {
        key: "e",
        label: "ours: net-agent per host, overlay network (tcx, collect-metadata vxlan)",
        client_ns: client,
        server_ns: server,
        server_ip,
    })
}

/// `ip -n <ns> <line>`; `line` is split at spaces (no argument here has one).
fn ip(ns: &str, line: &str) -> Result<()> {
    exec(cmd("ip").args(["-n", ns]).args(line.split_whitespace()))
}

/// `ip -j link show` of one interface, as JSON.
fn link_json(ns: &str, dev: &str, stats: bool) -> Result<serde_json::Value> {
    let mut c = cmd("ip");
    c.args(["-n", ns, "-j"]);
    if stats {
        c.arg("-s");
    }
    c.args(["link", "show", "dev", dev]);
    let json = exec_output(&mut c)?;
    let value: serde_json::Value = serde_json::from_str(&json)
        .with_context(|| format!("`{}` is not JSON: {json}", display(&c)))?;
    value
        .get(0)
        .cloned()
        .with_context(|| format!("`{}` listed no interface: {json}", display(&c)))
}

fn link_mac(ns: &str, dev: &str) -> Result<String> {
    let link = link_json(ns, dev, false)?;
    link.get("address")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
        .with_context(|| format!("no address for {dev} in {ns}: {link}"))
}

/// The traffic of (d) must have crossed `flannel.1`: packets both ways on host 2's (`host`).
fn check_vxlan_carried(host: &str, what: &str) -> Result<()> {
    let link = link_json(host, FLANNEL_DEV, true)?;
    let packets = |direction: &str| {
        link.pointer(&format!("/stats64/{direction}/packets"))
            .and_then(serde_json::Value::as_u64)
            .with_context(|| format!("no stats64.{direction}.packets for {FLANNEL_DEV}: {link}"))
    };
    let (rx, tx) = (packets("rx")?, packets("tx")?);
    println!("{what}: {FLANNEL_DEV} received {rx} and sent {tx} packets");
    if rx == 0 || tx == 0 {
        bail!(
            "{what}: {FLANNEL_DEV} received {rx} and sent {tx} packets: the traffic did not \
             take Flannel's path"
        );
    }
    Ok(())
}

/// An agent of setup (e), in its host namespace.
struct ClusterAgent {
    host: &'static str,
    vtep: Ipv4Addr,
    /// Socket, log and state.
    dir: PathBuf,
    pin_dir: PathBuf,
    netctl_bin: PathBuf,
    process: ChildGuard,
    /// Whether the overlay network was created through this agent.
    network: bool,
    endpoints: Vec<String>,
}

/// The agents of setup (e) and the cluster store they share; [`Cluster::cleanup`] (also run on
/// drop) removes what they made through them, then stops them.
struct Cluster {
    tmp_dir: PathBuf,
    netctl_bin: PathBuf,
    agents: Vec<ClusterAgent>,
    cleaned: bool,
}

impl Cluster {
    fn new(tmp_dir: &Path, netctl_bin: &Path) -> Self {
        Self {
            tmp_dir: tmp_dir.to_owned(),
            netctl_bin: netctl_bin.to_owned(),
            agents: Vec::new(),
            cleaned: false,
        }
    }

    fn pair(&mut self) -> Result<[&mut ClusterAgent; 2]> {
        match self.agents.as_mut_slice() {
            [a1, a2] => Ok([a1, a2]),
            agents => bail!("setup (e) needs two agents, it has {}", agents.len()),
        }
    }

    /// Starts an agent in `ns`, whose uplink address (its VTEP) is `vtep`.
    fn start(
        &mut self,
        agent_bin: &Path,
        host: &'static str,
        ns: &str,
        vtep: Ipv4Addr,
    ) -> Result<()> {
        let dir = self.tmp_dir.join(format!("e-{host}"));
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // Under the lab's pin directory, which its cleanup (and the next bench's sweep after a
        // SIGKILL) removes with everything in it.
        let pin_dir =
            PathBuf::from(format!("{PIN_PREFIX}{}", std::process::id())).join(format!("e-{host}"));
        let prefix = agent_prefix(std::process::id(), host);
        let cluster_dir = self.tmp_dir.join("cluster");
        let child = AgentLaunch {
            agent_bin,
            netns: ns,
            state_dir: dir.join("state"),
            bpffs_dir: &pin_dir,
            socket: &dir.join("agent.sock"),
            log: &dir.join("agent.log"),
            die_with_parent: true,
        }
        .spawn(&[
            OsStr::new("--name-prefix"),
            OsStr::new(&prefix),
            OsStr::new("--uplink"),
            OsStr::new(UPLINK),
            OsStr::new("--host-name"),
            OsStr::new(host),
            OsStr::new("--store"),
            OsStr::new("embedded"),
            OsStr::new("--cluster-dir"),
            cluster_dir.as_os_str(),
            // An address nothing answers on, rather than the machine's resolvers: nothing the
            // bench makes may send traffic out of its namespaces (no query is made anyway).
            OsStr::new("--dns-upstream"),
            OsStr::new(UNUSED_DNS_UPSTREAM),
        ])?;
        self.agents.push(ClusterAgent {
            host,
            vtep,
            dir,
            pin_dir,
            netctl_bin: self.netctl_bin.clone(),
            process: ChildGuard::new(format!("{host}'s net-agent"), child),
            network: false,
            endpoints: Vec::new(),
        });
        Ok(())
    }

    /// The traffic of (e) must have gone through the programs: counted on the server's host
    /// veth both ways. Otherwise (e) measured something else than the data plane.
    fn check_forwarded(&self) -> Result<()> {
        let Some(agent) = self
            .agents
            .iter()
            .find(|a| a.endpoints.iter().any(|e| e == "server"))
        else {
            bail!("no agent of setup (e) holds the server endpoint");
        };
        agent.netctl(&["endpoint", "stats", "server"])?;
        let json =
            exec_output(&mut agent.netctl_cmd(&["-o", "json", "endpoint", "stats", "server"]))?;
        let stats: serde_json::Value = serde_json::from_str(&json).with_context(|| {
            format!("`netctl -o json endpoint stats server` is not JSON: {json}")
        })?;
        let packets = |direction: &str| {
            stats
                .pointer(&format!("/{direction}/packets"))
                .and_then(serde_json::Value::as_u64)
                .with_context(|| format!("no {direction}.packets in the server's stats: {json}"))
        };
        let (to, from) = (packets("to_endpoint")?, packets("from_endpoint")?);
        if to == 0 || from == 0 {
            bail!(
                "setup (e) exchanged traffic but the programs counted {to} packets to its server \
                 and {from} from it: the measurement did not go through the data plane"
            );
        }
        Ok(())
    }

    fn show_logs(&self) {
        for agent in &self.agents {
            show_log_tail(&agent.dir.join("agent.log"));
        }
    }

    /// Through the agents that still run: every host's endpoints first (an overlay network
    /// leaves the cluster only once no endpoint of the removing host uses it), then the
    /// network; then stops the agents. Goes on past failures; fails if any step failed.
    fn cleanup(&mut self) -> Result<()> {
        if self.cleaned {
            return Ok(());
        }
        self.cleaned = true;
        if self.agents.is_empty() {
            return Ok(());
        }
        println!("\n== bench: cross host: removing the agents");
        let mut failures = Failures::default();
        let running: Vec<bool> = self
            .agents
            .iter_mut()
            .map(|a| matches!(a.process.try_wait(), Ok(None)))
            .collect();
        for (agent, &running) in self.agents.iter_mut().zip(&running) {
            let endpoints = std::mem::take(&mut agent.endpoints);
            if running {
                for name in endpoints.iter().rev() {
                    failures.note(agent.netctl(&["endpoint", "rm", name]));
                }
            }
        }
        for (agent, &running) in self.agents.iter_mut().zip(&running) {
            if running && std::mem::take(&mut agent.network) {
                failures.note(agent.netctl(&["network", "rm", OVERLAY]));
            }
        }
        for agent in self.agents.iter_mut().rev() {
            failures.note(agent.process.stop());
        }
        failures.into_result()
    }
}

impl Drop for Cluster {
    /// A panic or an early return still removes what the agents made, before the lab deletes
    /// their namespaces.
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            eprintln!("bench cleanup: {e:#}");
        }
    }
}

impl ClusterAgent {
    fn netctl_cmd(&self, args: &[&str]) -> Command {
        let mut netctl = cmd(&self.netctl_bin);
        netctl
            .arg("--socket")
            .arg(self.dir.join("agent.sock"))
            .arg("--bpffs-dir")
            .arg(&self.pin_dir)
            .args(args);
        netctl
    }

    fn netctl(&self, args: &[&str]) -> Result<()> {
        exec(&mut self.netctl_cmd(args))
    }

    fn netctl_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let mut netctl = self.netctl_cmd(&all);
        let json = exec_output(&mut netctl)?;
        serde_json::from_str(&json)
            .with_context(|| format!("`{}` did not print JSON: {json}", display(&netctl)))
    }

    /// Fails if the agent has exited.
    fn check_running(&mut self) -> Result<()> {
        if let Some(exit) = self.process.try_wait()? {
            bail!(
                "{}'s net-agent exited ({exit}); its log: {}",
                self.host,
                self.dir.join("agent.log").display()
            );
        }
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<()> {
        let mut status = self.netctl_cmd(&["status"]);
        let what = format!("{}'s agent to answer `netctl status`", self.host);
        sys::wait_for(&what, AGENT_READY_TIMEOUT, || {
            self.check_running()?;
            Ok(probe(&mut status).map(|_| ()))
        })
    }

    /// Until `netctl network ls` lists `name`: an overlay network defined on the other host.
    fn wait_for_network(&mut self, name: &str) -> Result<()> {
        let start = Instant::now();
        let what = format!("network {name} to reach {}", self.host);
        sys::wait_for(&what, FOLLOW_TIMEOUT, || {
            self.check_running()?;
            let Some(json) = probe(&mut self.netctl_cmd(&["-o", "json", "network", "ls"])) else {
                return Ok(None);
            };
            let networks: serde_json::Value = serde_json::from_str(&json)
                .with_context(|| format!("`netctl -o json network ls` is not JSON: {json}"))?;
            let found = networks
                .as_array()
                .is_some_and(|n| n.iter().any(|n| n["name"] == name));
            Ok(found.then_some(()))
        })?;
        println!(
            "{}: has {name} after {:.1} s",
            self.host,
            start.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Until the data plane routes a subnet to `vtep` (`netctl bpf routes list`).
    fn wait_for_route_to(&mut self, vtep: Ipv4Addr) -> Result<()> {
        let what = format!("{} to route a subnet to VTEP {vtep}", self.host);
        let vtep = vtep.to_string();
        let subnet = sys::wait_for(&what, FOLLOW_TIMEOUT, || {
            self.check_running()?;
            let Some(json) = probe(&mut self.netctl_cmd(&["-o", "json", "bpf", "routes", "list"]))
            else {
                return Ok(None);
            };
            let routes: serde_json::Value = serde_json::from_str(&json)
                .with_context(|| format!("`netctl -o json bpf routes list` is not JSON: {json}"))?;
            Ok(routes.as_array().and_then(|routes| {
                routes
                    .iter()
                    .find(|r| r["vtep"] == vtep.as_str())
                    .and_then(|r| r["subnet"].as_str())
                    .map(str::to_owned)
            }))
        })?;
        println!("{}: {subnet} via VTEP {vtep}", self.host);
        Ok(())
    }

    /// Adopts the namespace `ns` as endpoint `name` of the overlay network.
    fn adopt_endpoint(&mut self, name: &str, ns: &str) -> Result<()> {
        let netns = Path::new(NETNS_DIR).join(ns);
        let netns = netns.to_string_lossy();
        self.netctl(&[
            "endpoint",
            "create",
            name,
            "--network",
            OVERLAY,
            "--netns",
            &netns,
        ])?;
        self.endpoints.push(name.to_owned());
        Ok(())
    }

    /// The address the agent gave endpoint `name` (its first interface's).
    fn endpoint_ip(&self, name: &str) -> Result<Ipv4Addr> {
        let endpoint = self.netctl_json(&["endpoint", "inspect", name])?;
        let ip = endpoint
            .pointer("/interfaces/0/ip")
            .and_then(serde_json::Value::as_str)
            .with_context(|| format!("no interfaces[0].ip in endpoint {name}: {endpoint}"))?;
        ip.parse()
            .with_context(|| format!("endpoint {name}'s address {ip} is not an IPv4 address"))
    }
}

/// The name prefix of host `host`'s agent: "bx", the pid in base 36 and the host's number, at
/// most 8 characters (the agent's limit) for any pid, and unlike the single-host agent's "bn",
/// the tests' "nt" and the demo's "dm".
fn agent_prefix(pid: u32, host: &str) -> String {
    let mut digits = Vec::new();
    let mut n = pid;
    loop {
        digits.push(char::from_digit(n % 36, 36).unwrap_or('0'));
        n /= 36;
        if n == 0 {
            break;
        }
    }
    let number = host.trim_start_matches('h');
    format!("bx{}{number}", digits.iter().rev().collect::<String>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::live::LiveCost;

    #[test]
    fn agent_prefix_fits_the_agent_limit_for_any_pid() {
        assert_eq!(agent_prefix(36, "h2"), "bx102");
        // Linux pids are at most 2^22 (PID_MAX_LIMIT): "bx" + 5 digits + the host's number.
        assert_eq!(agent_prefix(1 << 22, "h1").len(), 8);
    }

    #[test]
    fn ratios_pair_rounds_and_land_in_both_outputs() {
        let sample = |setup, round, value| CrossSample {
            metric: Metric::RrSpin,
            setup,
            round,
            value,
        };
        let cost = |program, ns_per_run| LiveCost {
            program,
            what: "",
            runs: 10,
            ns_per_run,
            runs_per_transaction: 2.0,
        };
        let round = |ns: [f64; 2]| Account {
            per_second: 1.0,
            costs: vec![cost("x", ns[0]), cost("y", ns[1])],
            round_totals: vec![2.0 * (ns[0] + ns[1])],
        };
        let rounds = [
            round([100.0, 50.0]),
            round([140.0, 30.0]),
            round([90.0, 40.0]),
        ];
        let live = live::merge(&rounds.iter().collect::<Vec<_>>()).expect("same programs");
        let cross = CrossHost {
            live: Some(live),
            setups: vec![("a", "veth pair"), ("d", "flannel"), ("e", "ours, tcx")],
            samples: vec![
                sample("a", 0, 150.0),
                sample("d", 0, 100.0),
                sample("e", 0, 125.0),
                sample("d", 1, 80.0),
                sample("e", 1, 120.0),
                sample("a", 1, 128.0),
            ],
            notes: Vec::new(),
        };
        assert_eq!(cross.ratios(Metric::RrSpin, "e", "d"), vec![1.25, 1.5]);
        let md = cross.markdown();
        assert!(
            md.contains("|  | (e) ours, tcx | 122 | 120-125 | 1.38x (1.25-1.50) |"),
            "{md}"
        );
        assert!(md.contains("busy-polling 1.38x"), "{md}");
        // The limit's row and line: its own per-round ratios, the rounds it was measured in.
        assert!(
            md.contains("| (a) veth pair | 139 | 128-150 | 1.55x (1.50-1.60) |"),
            "{md}"
        );
        assert!(
            md.contains("The limit, (a) against (d): TCP_RR -, busy-polling 1.55x"),
            "{md}"
        );
        // The programs: medians per program, every round's total kept.
        assert!(md.contains("| `x` |  | 30 | 2.00 | 100.0 | 200 |"), "{md}");
        assert!(
            md.contains("All of them together: 280 ns per transaction (260-340 by round)."),
            "{md}"
        );
        let csv = cross.csv();
        assert!(
            csv.contains("e2e_cross_host,e,\"ours, tcx\",tcp_rr_spin,x,ratio_vs_d,1.3750"),
            "{csv}"
        );
        assert!(
            csv.contains(
                "e2e_cross_host_live,e,all programs,programs_ns_per_transaction,ns,value,\
                 300.0000,260.0000,340.0000,300.0000;340.0000;260.0000"
            ),
            "{csv}"
        );
    }
}
