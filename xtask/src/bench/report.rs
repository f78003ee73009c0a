//! Medians, spreads and ratios, and the Markdown and CSV they are written as.
//!
//! Ratios are paired: each round's value divided by the baseline's value in the same round, then
//! the median and range of those per-round ratios. Rounds are interleaved, so a ratio compares
//! measurements taken seconds apart; that is what keeps it meaningful when the absolute figures
//! of this machine drift by more than the effect between rounds.

mod nat;

use std::fmt::Write as _;

pub use self::nat::{Backend, ScaleQuantity, ScaleSample};
use super::{
    live::{self, Accounted},
    programs::PathCost,
};

/// Which traffic an end-to-end sample is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Client endpoint to server endpoint on one host.
    Forward,
    /// From a namespace outside the host to a published port, DNAT to an endpoint.
    Published,
    /// From an endpoint to a server outside the host, masqueraded.
    Masquerade,
}

impl Scenario {
    /// The NAT scenarios, in table order.
    pub const NAT: [Scenario; 2] = [Scenario::Published, Scenario::Masquerade];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Forward => "forward",
            Scenario::Published => "published",
            Scenario::Masquerade => "masquerade",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Scenario::Forward => "endpoint to endpoint",
            Scenario::Published => "outside to a published port (DNAT)",
            Scenario::Masquerade => "endpoint to a server outside (masquerade)",
        }
    }

    /// The CSV's `part` column.
    fn part(self) -> &'static str {
        match self {
            Scenario::Forward => "e2e",
            Scenario::Published => "e2e_published",
            Scenario::Masquerade => "e2e_masquerade",
        }
    }
}

/// What part 2 measures, per setup and round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    Rr,
    RrSpin,
    Crr,
    CrrSpin,
    Throughput,
    CpuPerGbit,
    Retransmits,
    /// Throughput with the client, the server and so all the forwarding on one CPU: the paths'
    /// cost per byte, without the packet reordering that two CPUs sending bring.
    ThroughputOneCpu,
}

impl Metric {
    pub const ALL: [Metric; 8] = [
        Metric::Rr,
        Metric::RrSpin,
        Metric::Crr,
        Metric::CrrSpin,
        Metric::Throughput,
        Metric::CpuPerGbit,
        Metric::Retransmits,
        Metric::ThroughputOneCpu,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Metric::Rr => "tcp_rr",
            Metric::RrSpin => "tcp_rr_spin",
            Metric::Crr => "tcp_crr",
            Metric::CrrSpin => "tcp_crr_spin",
            Metric::Throughput => "throughput",
            Metric::CpuPerGbit => "cpu_per_gbit",
            Metric::Retransmits => "retransmits_per_gb",
            Metric::ThroughputOneCpu => "throughput_one_cpu",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Metric::Rr => "TCP_RR, 1-byte request/response per s",
            Metric::RrSpin => "TCP_RR, client and server busy-polling (no CPU wake-ups), per s",
            Metric::Crr => "TCP_CRR, connect + 1-byte request/response + close per s",
            Metric::CrrSpin => "TCP_CRR, client and server busy-polling (no CPU wake-ups), per s",
            Metric::Throughput => "TCP throughput (iperf3, 1 stream), Gbit/s",
            Metric::CpuPerGbit => "CPU time per Gbit moved (whole machine), ms (lower is better)",
            Metric::Retransmits => {
                "TCP retransmissions by the iperf3 sender, per GB sent (lower is better)"
            }
            Metric::ThroughputOneCpu => {
                "TCP throughput, client, server and all forwarding on one CPU (iperf3), Gbit/s"
            }
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Metric::Rr | Metric::RrSpin => "transactions/s",
            Metric::Crr | Metric::CrrSpin => "connections/s",
            Metric::Throughput | Metric::ThroughputOneCpu => "Gbit/s",
            Metric::CpuPerGbit => "CPU ms/Gbit",
            Metric::Retransmits => "retransmits/GB",
        }
    }

    pub fn format(self, value: f64) -> String {
        match self {
            Metric::Rr | Metric::RrSpin | Metric::Crr | Metric::CrrSpin | Metric::Retransmits => {
                thousands(value)
            }
            Metric::Throughput | Metric::ThroughputOneCpu => format!("{value:.2}"),
            Metric::CpuPerGbit => format!("{value:.0}"),
        }
    }
}

/// One measurement of part 2.
pub struct Sample {
    pub scenario: Scenario,
    pub metric: Metric,
    pub setup: &'static str,
    pub round: u32,
    pub value: f64,
}

/// A setup as the report names it.
pub struct SetupName {
    pub key: &'static str,
    pub label: &'static str,
}

/// How and where the run happened, for the report's heading.
pub struct Context {
    pub date: String,
    pub machine: String,
    pub settings: String,
    pub notes: Vec<String>,
}

pub struct Report<'a> {
    pub context: &'a Context,
    pub programs: &'a [PathCost],
    pub setups: &'a [SetupName],
    pub samples: &'a [Sample],
    /// Setup keys the ratios are taken against, in column order.
    pub baselines: &'a [&'static str],
    /// The NAT setups and the key of their baseline.
    pub nat_setups: &'a [SetupName],
    pub nat_baseline: &'static str,
    pub scale: &'a [ScaleSample],
    /// Ours measured once more with the programs' run-time accounting on.
    pub live: &'a [Accounted],
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: sorted[0],
            max: sorted[n - 1],
        })
    }
}

impl Report<'_> {
    fn values(&self, scenario: Scenario, metric: Metric, setup: &str) -> Vec<f64> {
        self.samples
            .iter()
            .filter(|s| s.scenario == scenario && s.metric == metric && s.setup == setup)
            .map(|s| s.value)
            .collect()
    }

    /// Per-round ratios of `setup` to `baseline`, over the rounds both were measured in.
    pub fn ratios(
        &self,
        scenario: Scenario,
        metric: Metric,
        setup: &str,
        baseline: &str,
    ) -> Vec<f64> {
        let of = |s: &&Sample| s.scenario == scenario && s.metric == metric;
        self.samples
            .iter()
            .filter(|s| of(s) && s.setup == setup)
            .filter_map(|s| {
                self.samples
                    .iter()
                    .filter(of)
                    .find(|b| b.setup == baseline && b.round == s.round)
                    .filter(|b| b.value != 0.0)
                    .map(|b| s.value / b.value)
            })
            .collect()
    }

    fn noop(&self) -> Option<Spread> {
        self.programs
            .iter()
            .find(|p| p.name == "noop")
            .and_then(|p| Spread::of(&p.ns_per_packet))
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let c = self.context;
        let _ = writeln!(md, "Run {} on {}.", c.date, c.machine);
        let _ = writeln!(md, "{}.", c.settings);
        for note in &c.notes {
            let _ = writeln!(md, "{note}");
        }
        if self.programs.is_empty() && self.samples.is_empty() && self.scale.is_empty() {
            // `--only cross-host`: nothing on the single host was measured.
            return md;
        }

        let _ = writeln!(
            md,
            "\n**Program cost**: BPF_PROG_TEST_RUN, kernel-reported ns per packet (mean of the \
             calls of a round; median and min-max over rounds)\n"
        );
        let _ = writeln!(
            md,
            "| path | program | verdict | ns/packet | min-max | over no-op |"
        );
        let _ = writeln!(md, "|---|---|---|---:|---:|---:|");
        let noop = self.noop();
        for path in self.programs {
            let Some(spread) = Spread::of(&path.ns_per_packet) else {
                continue;
            };
            let over = match noop {
                Some(noop) if path.name != "noop" => {
                    format!("{:+.1}", spread.median - noop.median)
                }
                _ => "-".to_owned(),
            };
            let _ = writeln!(
                md,
                "| {} | `{}` | {} | {:.1} | {:.1}-{:.1} | {over} |",
                path.what, path.program, path.verdict, spread.median, spread.min, spread.max
            );
        }

        let _ = writeln!(
            md,
            "\n**End to end**: client to server between two namespaces (median and min-max over \
             rounds; ratios are per-round ratios to the baseline, median and min-max)\n"
        );
        self.e2e_table(&mut md, &[Scenario::Forward], self.setups, self.baselines);
        if !self.nat_setups.is_empty() {
            let _ = writeln!(
                md,
                "\n**NAT end to end**: a client outside the host to a port the host publishes for \
                 an endpoint, and an endpoint to a server outside, through the host's uplink; the \
                 same measurement rounds as above\n"
            );
            self.e2e_table(
                &mut md,
                &Scenario::NAT,
                self.nat_setups,
                &[self.nat_baseline],
            );
        }
        self.live_table(&mut md);
        nat::markdown(self, &mut md);
        md
    }

    /// What (c)'s programs took per transaction in live traffic, and how that compares with what
    /// (c) takes per transaction more than (a), the veth pair, in the rounds.
    fn live_table(&self, md: &mut String) {
        if self.live.is_empty() {
            return;
        }
        let _ = writeln!(
            md,
            "\n**Where (c)'s time goes**: in every round, after its measurements, one more \
             measurement of each with the kernel's run-time accounting on (`BPF_ENABLE_STATS`, \
             which adds a clock read to every run): runs and run time of each program over it, \
             per transaction (a request and its response, or a whole connection), medians over \
             the rounds. A program's run time is its own; the redirect it asks for and the \
             device hops come after it.\n"
        );
        let _ = writeln!(
            md,
            "| traffic | metric | program | packets | runs per transaction | ns/run | ns per \
             transaction |"
        );
        let _ = writeln!(md, "|---|---|---|---|---:|---:|---:|");
        let mut gaps = Vec::new();
        for accounted in self.live {
            for (i, cost) in accounted.account.costs.iter().enumerate() {
                let (traffic, metric) = if i == 0 {
                    (accounted.scenario.label(), accounted.metric.label())
                } else {
                    ("", "")
                };
                let _ = writeln!(
                    md,
                    "| {traffic} | {metric} | `{}` | {} | {:.2} | {:.1} | {:.0} |",
                    cost.program,
                    cost.what,
                    cost.runs_per_transaction,
                    cost.ns_per_run,
                    cost.ns_per_transaction()
                );
            }
            let programs = accounted.account.ns_per_transaction();
            let by_round = match Spread::of(&accounted.account.round_totals) {
                Some(s) if accounted.account.round_totals.len() > 1 => {
                    format!(" ({:.0}-{:.0} by round)", s.min, s.max)
                }
                _ => String::new(),
            };
            let line = match self.gap_to_limit(accounted) {
                Some(gap) => format!(
                    "{}, {}: the programs take {programs:.0} ns of each transaction{by_round}; \
                     (c) takes {gap:.0} ns per transaction more than (a), the veth pair \
                     (medians of the rounds), so {}",
                    accounted.scenario.label(),
                    accounted.metric.label(),
                    if gap >= programs {
                        format!("{:.0} ns of that are outside the programs", gap - programs)
                    } else {
                        // Two medians' difference against a time that includes the
                        // accounting's own clock reads: within noise, nothing is left over.
                        "the programs account for all of it (their time includes the \
                         accounting's clock reads)"
                            .to_owned()
                    }
                ),
                None => format!(
                    "{}, {}: the programs take {programs:.0} ns of each transaction{by_round}",
                    accounted.scenario.label(),
                    accounted.metric.label()
                ),
            };
            gaps.push(line);
        }
        let _ = writeln!(md);
        for line in gaps {
            let _ = writeln!(md, "- {line}.");
        }
    }

    /// How many ns per transaction (c) takes more than (a) in `accounted`'s scenario and metric:
    /// the difference of the inverse medians over the rounds.
    pub fn gap_to_limit(&self, accounted: &Accounted) -> Option<f64> {
        let median = |setup: &str| {
            Spread::of(&self.values(accounted.scenario, accounted.metric, setup))
                .map(|s| s.median)
                .filter(|m| *m > 0.0)
        };
        Some(1e9 / median("c")? - 1e9 / median("a")?)
    }

    /// The rows of `scenarios` x every metric x `setups`, with ratios to `baselines`.
    fn e2e_table(
        &self,
        md: &mut String,
        scenarios: &[Scenario],
        setups: &[SetupName],
        baselines: &[&str],
    ) {
        let many = scenarios.len() > 1;
        let mut header = String::from(if many { "| traffic " } else { "" });
        let mut rule = String::from(if many { "|---" } else { "" });
        header.push_str("| metric | setup | median | min-max |");
        rule.push_str("|---|---|---:|---:|");
        for baseline in baselines {
            let _ = write!(header, " vs ({baseline}) |");
            rule.push_str("---:|");
        }
        let _ = writeln!(md, "{header}\n{rule}");
        for scenario in scenarios {
            let mut first_of_scenario = true;
            for metric in Metric::ALL {
                let mut first = true;
                for setup in setups {
                    let Some(spread) = Spread::of(&self.values(*scenario, metric, setup.key))
                    else {
                        continue;
                    };
                    let label = if first { metric.label() } else { "" };
                    first = false;
                    let mut row = String::new();
                    if many {
                        let traffic = if first_of_scenario {
                            scenario.label()
                        } else {
                            ""
                        };
                        first_of_scenario = false;
                        let _ = write!(row, "| {traffic} ");
                    }
                    let _ = write!(
                        row,
                        "| {label} | ({}) {} | {} | {}-{} |",
                        setup.key,
                        setup.label,
                        metric.format(spread.median),
                        metric.format(spread.min),
                        metric.format(spread.max)
                    );
                    for baseline in baselines {
                        let cell = if *baseline == setup.key {
                            "baseline".to_owned()
                        } else {
                            ratio_cell(&self.ratios(*scenario, metric, setup.key, baseline))
                        };
                        let _ = write!(row, " {cell} |");
                    }
                    let _ = writeln!(md, "{row}");
                }
            }
        }
    }

    pub fn csv(&self) -> String {
        let mut csv = "part,subject,label,metric,unit,quantity,median,min,max,samples\n".to_owned();
        let mut row = |part: &str,
                       subject: &str,
                       label: &str,
                       metric: &str,
                       unit: &str,
                       quantity: &str,
                       values: &[f64]| {
            csv_row(
                &mut csv,
                [part, subject, label, metric, unit, quantity],
                values,
            );
        };
        let noop = self
            .programs
            .iter()
            .find(|p| p.name == "noop")
            .map(|p| p.ns_per_packet.clone())
            .unwrap_or_default();
        for path in self.programs {
            row(
                "program",
                path.name,
                path.what,
                "ns_per_packet",
                "ns",
                "value",
                &path.ns_per_packet,
            );
            if path.name != "noop" && noop.len() == path.ns_per_packet.len() {
                let paired = |f: fn(f64, f64) -> f64| -> Vec<f64> {
                    path.ns_per_packet
                        .iter()
                        .zip(&noop)
                        .map(|(v, n)| f(*v, *n))
                        .collect()
                };
                row(
                    "program",
                    path.name,
                    path.what,
                    "ns_per_packet",
                    "ns",
                    "minus_noop",
                    &paired(|v, n| v - n),
                );
                row(
                    "program",
                    path.name,
                    path.what,
                    "ns_per_packet",
                    "x",
                    "ratio_vs_noop",
                    &paired(|v, n| v / n),
                );
            }
        }
        let nat_baselines = [self.nat_baseline];
        let groups: [(&[Scenario], &[SetupName], &[&str]); 2] = [
            (&[Scenario::Forward], self.setups, self.baselines),
            (&Scenario::NAT, self.nat_setups, &nat_baselines),
        ];
        for (scenarios, setups, baselines) in groups {
            for scenario in scenarios {
                for metric in Metric::ALL {
                    for setup in setups {
                        row(
                            scenario.part(),
                            setup.key,
                            setup.label,
                            metric.name(),
                            metric.unit(),
                            "value",
                            &self.values(*scenario, metric, setup.key),
                        );
                        for baseline in baselines {
                            if *baseline != setup.key {
                                row(
                                    scenario.part(),
                                    setup.key,
                                    setup.label,
                                    metric.name(),
                                    "x",
                                    &format!("ratio_vs_{baseline}"),
                                    &self.ratios(*scenario, metric, setup.key, baseline),
                                );
                            }
                        }
                    }
                }
            }
        }
        nat::csv(self, &mut row);
        for accounted in self.live {
            let part = format!(
                "e2e_live_{}_{}",
                accounted.scenario.name(),
                accounted.metric.name()
            );
            live::csv(&mut csv, &part, &accounted.account.costs);
            let mut totals = vec![(
                "programs_ns_per_transaction",
                accounted.account.round_totals.clone(),
            )];
            if let Some(gap) = self.gap_to_limit(accounted) {
                totals.push(("c_minus_a_ns_per_transaction", vec![gap]));
            }
            for (metric, values) in totals {
                csv_row(
                    &mut csv,
                    [&part, "c", "all programs", metric, "ns", "value"],
                    &values,
                );
            }
        }
        csv
    }
}

/// "1.23x (1.10-1.30)" for a list of ratios, "-" for none.
pub(crate) fn ratio_cell(ratios: &[f64]) -> String {
    match Spread::of(ratios) {
        Some(r) => format!("{:.2}x ({:.2}-{:.2})", r.median, r.min, r.max),
        None => "-".to_owned(),
    }
}

/// One CSV row in the report's columns: `key` holds part, subject, label, metric, unit and
/// quantity; the median, min and max of `values` and every value follow. No row for no values.
pub(crate) fn csv_row(csv: &mut String, key: [&str; 6], values: &[f64]) {
    let Some(spread) = Spread::of(values) else {
        return;
    };
    let [part, subject, label, metric, unit, quantity] = key;
    let samples: Vec<String> = values.iter().map(|v| format!("{v:.4}")).collect();
    let _ = writeln!(
        csv,
        "{part},{subject},{},{metric},{unit},{quantity},{:.4},{:.4},{:.4},{}",
        csv_field(label),
        spread.median,
        spread.min,
        spread.max,
        samples.join(";")
    );
}

pub(crate) fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

/// 35123.4 -> "35,123".
pub(crate) fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if value < 0.0 { format!("-{out}") } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::live::{Account, LiveCost};

    #[test]
    fn spread_takes_the_middle() {
        let odd = Spread::of(&[3.0, 1.0, 2.0]).expect("values");
        assert_eq!((odd.median, odd.min, odd.max), (2.0, 1.0, 3.0));
        let even = Spread::of(&[4.0, 1.0, 3.0, 2.0]).expect("values");
        assert_eq!(even.median, 2.5);
        assert!(Spread::of(&[]).is_none());
    }

    pub(super) fn context() -> Context {
        Context {
            date: String::new(),
            machine: String::new(),
            settings: String::new(),
            notes: Vec::new(),
        }
    }

    /// A report of `samples` and `live` alone.
    pub(super) fn report<'a>(
        context: &'a Context,
        samples: &'a [Sample],
        live: &'a [Accounted],
    ) -> Report<'a> {
        Report {
            context,
            programs: &[],
            setups: &[],
            samples,
            baselines: &["a"],
            nat_setups: &[],
            nat_baseline: "b",
            scale: &[],
            live,
        }
    }

    pub(super) fn sample(setup: &'static str, round: u32, value: f64) -> Sample {
        Sample {
            scenario: Scenario::Forward,
            metric: Metric::Rr,
            setup,
            round,
            value,
        }
    }

    #[test]
    fn ratios_pair_rounds() {
        let samples = [
            sample("a", 0, 100.0),
            sample("c", 0, 90.0),
            sample("a", 1, 50.0),
            sample("c", 1, 55.0),
            // A round where the baseline failed is left out, not paired with another round.
            sample("c", 2, 1.0),
        ];
        let context = context();
        let report = report(&context, &samples, &[]);
        assert_eq!(
            report.ratios(Scenario::Forward, Metric::Rr, "c", "a"),
            vec![0.9, 1.1]
        );
        assert!(
            report
                .ratios(Scenario::Published, Metric::Rr, "c", "a")
                .is_empty()
        );
    }

    #[test]
    fn the_gap_to_the_limit_is_per_transaction_from_the_medians() {
        // (a) 100,000/s (10 us), (c) 80,000/s (12.5 us) by their medians; the programs 1.5 us.
        let samples = [
            sample("a", 0, 100_000.0),
            sample("a", 1, 90_000.0),
            sample("a", 2, 110_000.0),
            sample("c", 0, 80_000.0),
            sample("c", 1, 70_000.0),
            sample("c", 2, 90_000.0),
        ];
        let cost = |program, runs_per_transaction, ns_per_run| LiveCost {
            program,
            what: "",
            runs: 1,
            ns_per_run,
            runs_per_transaction,
        };
        let accounted = |scenario| Accounted {
            scenario,
            metric: Metric::Rr,
            account: Account {
                per_second: 0.0,
                costs: vec![cost("x", 2.0, 500.0), cost("y", 1.0, 500.0)],
                round_totals: vec![1_400.0, 1_500.0, 1_600.0],
            },
        };
        let live = [accounted(Scenario::Forward), accounted(Scenario::Published)];
        let context = context();
        let report = report(&context, &samples, &live);
        let gap = report.gap_to_limit(&live[0]).expect("both measured");
        assert!((gap - 2_500.0).abs() < 1e-6, "{gap}");
        assert_eq!(live[0].account.ns_per_transaction(), 1_500.0);
        // No samples of that scenario: no gap to state.
        assert_eq!(report.gap_to_limit(&live[1]), None);
        let mut md = String::new();
        report.live_table(&mut md);
        assert!(
            md.contains(
                "the programs take 1500 ns of each transaction (1400-1600 by round); (c) takes \
                 2500 ns"
            ),
            "{md}"
        );
        assert!(
            md.contains("so 1000 ns of that are outside the programs"),
            "{md}"
        );
        // A gap below the programs' accounted time leaves nothing outside them, not a negative.
        let close = [sample("a", 0, 100_000.0), sample("c", 0, 90_000.0)];
        let report = super::tests::report(&context, &close, &live[..1]);
        let mut md = String::new();
        report.live_table(&mut md);
        assert!(md.contains("so the programs account for all of it"), "{md}");
    }

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(35123.4), "35,123");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1_000_000.0), "1,000,000");
    }

    #[test]
    fn csv_fields_with_commas_are_quoted() {
        assert_eq!(csv_field("a, b"), "\"a, b\"");
        assert_eq!(csv_field("plain"), "plain");
    }
}
