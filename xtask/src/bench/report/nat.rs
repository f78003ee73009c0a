//! The NAT scale rows (1 to 100,000 mappings, ours against iptables and nftables) and the
//! targets of issue 6, checked against what was measured.

use std::fmt::Write as _;

use super::{Metric, Report, Scenario, Spread, ratio_cell, thousands};

/// Whose NAT a scale row measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Ours,
    /// Docker's way: one DNAT rule per mapping in the nat `DOCKER` chain.
    Iptables,
    /// One nftables map of every mapping, looked up once.
    Nft,
}

impl Backend {
    const ALL: [Backend; 3] = [Backend::Ours, Backend::Iptables, Backend::Nft];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Ours => "ours",
            Backend::Iptables => "iptables",
            Backend::Nft => "nft",
        }
    }
}

/// What a scale row measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleQuantity {
    /// Kernel ns of `tc_from_netdev` for a new connection to a published port.
    FirstPacketNs,
    /// The same for a packet of an established connection.
    EstablishedNs,
    /// New connections per second from outside to the last mapping (CRR).
    Crr,
    /// Wall time of the command that adds one mapping, and of the one that removes it.
    AddMs,
    RemoveMs,
    /// One update of the pinned `PUBLISHED` map (the bpf syscall), add and remove.
    MapAddUs,
    MapRemoveUs,
    /// A `netctl` round trip that changes nothing: what any `netctl` command costs.
    ApiMs,
    /// The request of `netctl port publish/unpublish` sent to the agent's socket directly: the
    /// agent's own cost, without netctl's process.
    AgentAddMs,
    AgentRemoveMs,
    /// Installing all N mappings at once.
    LoadS,
}

impl ScaleQuantity {
    pub const ALL: [ScaleQuantity; 11] = [
        ScaleQuantity::FirstPacketNs,
        ScaleQuantity::EstablishedNs,
        ScaleQuantity::Crr,
        ScaleQuantity::MapAddUs,
        ScaleQuantity::MapRemoveUs,
        ScaleQuantity::AgentAddMs,
        ScaleQuantity::AddMs,
        ScaleQuantity::AgentRemoveMs,
        ScaleQuantity::RemoveMs,
        ScaleQuantity::ApiMs,
        ScaleQuantity::LoadS,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ScaleQuantity::FirstPacketNs => "dnat_first_packet",
            ScaleQuantity::EstablishedNs => "dnat_established",
            ScaleQuantity::Crr => "crr_to_last_mapping",
            ScaleQuantity::AddMs => "add_one",
            ScaleQuantity::RemoveMs => "remove_one",
            ScaleQuantity::MapAddUs => "map_add_one",
            ScaleQuantity::MapRemoveUs => "map_remove_one",
            ScaleQuantity::ApiMs => "netctl_round_trip",
            ScaleQuantity::AgentAddMs => "agent_add_one",
            ScaleQuantity::AgentRemoveMs => "agent_remove_one",
            ScaleQuantity::LoadS => "load_all",
        }
    }

    /// Whether the value at the largest N against the smallest says something: installing N
    /// mappings takes N times longer by nature.
    fn compared_across_counts(self) -> bool {
        self != ScaleQuantity::LoadS
    }

    /// Measured once a round, interleaved with the other mapping counts (per-round ratios
    /// apply); the others are repeated timings of one-off operations.
    fn in_rounds(self) -> bool {
        matches!(
            self,
            ScaleQuantity::FirstPacketNs | ScaleQuantity::EstablishedNs | ScaleQuantity::Crr
        )
    }

    pub fn unit(self) -> &'static str {
        match self {
            ScaleQuantity::FirstPacketNs | ScaleQuantity::EstablishedNs => "ns",
            ScaleQuantity::Crr => "connections/s",
            ScaleQuantity::AddMs
            | ScaleQuantity::RemoveMs
            | ScaleQuantity::ApiMs
            | ScaleQuantity::AgentAddMs
            | ScaleQuantity::AgentRemoveMs => "ms",
            ScaleQuantity::MapAddUs | ScaleQuantity::MapRemoveUs => "us",
            ScaleQuantity::LoadS => "s",
        }
    }

    fn label(self, backend: Backend) -> &'static str {
        match (self, backend) {
            (ScaleQuantity::FirstPacketNs, _) => {
                "ns per packet, DNAT first packet (`tc_from_netdev`, BPF_PROG_TEST_RUN)"
            }
            (ScaleQuantity::EstablishedNs, _) => {
                "ns per packet, DNAT established (`tc_from_netdev`, BPF_PROG_TEST_RUN)"
            }
            (ScaleQuantity::Crr, Backend::Ours) => "connections/s to the last mapping: ours",
            (ScaleQuantity::Crr, Backend::Iptables) => {
                "connections/s to the last mapping: iptables, N DNAT rules (Docker)"
            }
            (ScaleQuantity::Crr, Backend::Nft) => {
                "connections/s to the last mapping: nftables, a map of N elements"
            }
            (ScaleQuantity::MapAddUs, _) => "add one mapping, us: one `PUBLISHED` map update",
            (ScaleQuantity::MapRemoveUs, _) => "remove one mapping, us: one `PUBLISHED` map delete",
            (ScaleQuantity::AddMs, Backend::Ours) => {
                "add one mapping, ms: `netctl port publish` (round trip through the agent)"
            }
            (ScaleQuantity::AddMs, Backend::Iptables) => {
                "add one mapping, ms: `iptables -t nat -A`"
            }
            (ScaleQuantity::AddMs, Backend::Nft) => "add one mapping, ms: `nft add element`",
            (ScaleQuantity::RemoveMs, Backend::Ours) => {
                "remove one mapping, ms: `netctl port unpublish` (round trip through the agent)"
            }
            (ScaleQuantity::RemoveMs, Backend::Iptables) => {
                "remove one mapping, ms: `iptables -t nat -D`"
            }
            (ScaleQuantity::RemoveMs, Backend::Nft) => {
                "remove one mapping, ms: `nft delete element`"
            }
            (ScaleQuantity::AgentAddMs, _) => {
                "add one mapping, ms: the agent's request alone (`port_publish` on its socket)"
            }
            (ScaleQuantity::AgentRemoveMs, _) => {
                "remove one mapping, ms: the agent's request alone (`port_unpublish` on its socket)"
            }
            (ScaleQuantity::ApiMs, _) => {
                "for comparison, ms: `netctl network ls` (process, socket, store read)"
            }
            (ScaleQuantity::LoadS, Backend::Ours) => {
                "install N mappings, s: `port_publish` requests to the agent, one per 50,000 ports"
            }
            (ScaleQuantity::LoadS, Backend::Iptables) => {
                "install N mappings, s: one `iptables-restore`"
            }
            (ScaleQuantity::LoadS, Backend::Nft) => "install N mappings, s: one `nft -f`",
        }
    }

    fn format(self, value: f64) -> String {
        match self {
            ScaleQuantity::Crr => thousands(value),
            ScaleQuantity::FirstPacketNs
            | ScaleQuantity::EstablishedNs
            | ScaleQuantity::MapAddUs
            | ScaleQuantity::MapRemoveUs => format!("{value:.1}"),
            ScaleQuantity::AddMs
            | ScaleQuantity::RemoveMs
            | ScaleQuantity::ApiMs
            | ScaleQuantity::AgentAddMs
            | ScaleQuantity::AgentRemoveMs
            | ScaleQuantity::LoadS => {
                if value >= 100.0 {
                    format!("{value:.0}")
                } else {
                    format!("{value:.2}")
                }
            }
        }
    }
}

/// One scale measurement: a quantity of a back end with `mappings` installed, in a round.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaleSample {
    pub quantity: ScaleQuantity,
    pub backend: Backend,
    pub mappings: u32,
    pub round: u32,
    pub value: f64,
}

/// The scale samples, grouped.
struct Scale<'a> {
    samples: &'a [ScaleSample],
}

impl Scale<'_> {
    /// Mapping counts measured, ascending.
    fn counts(&self) -> Vec<u32> {
        let mut counts: Vec<u32> = self.samples.iter().map(|s| s.mappings).collect();
        counts.sort_unstable();
        counts.dedup();
        counts
    }

    fn values(&self, quantity: ScaleQuantity, backend: Backend, n: u32) -> Vec<f64> {
        self.samples
            .iter()
            .filter(|s| s.quantity == quantity && s.backend == backend && s.mappings == n)
            .map(|s| s.value)
            .collect()
    }

    /// Per-round ratios of the value at `n` to the value at `base` for quantities measured
    /// once a round; the ratio of the medians for the others (repeated timings).
    fn ratios(&self, quantity: ScaleQuantity, backend: Backend, n: u32, base: u32) -> Vec<f64> {
        let of = |s: &&ScaleSample| s.quantity == quantity && s.backend == backend;
        if quantity.in_rounds() {
            return self
                .samples
                .iter()
                .filter(|s| of(s) && s.mappings == n)
                .filter_map(|s| {
                    self.samples
                        .iter()
                        .filter(of)
                        .find(|b| b.mappings == base && b.round == s.round)
                        .filter(|b| b.value != 0.0)
                        .map(|b| s.value / b.value)
                })
                .collect();
        }
        match (
            Spread::of(&self.values(quantity, backend, n)),
            Spread::of(&self.values(quantity, backend, base)),
        ) {
            (Some(v), Some(b)) if b.median != 0.0 => vec![v.median / b.median],
            _ => Vec::new(),
        }
    }

    fn median(&self, quantity: ScaleQuantity, backend: Backend, n: u32) -> Option<f64> {
        Spread::of(&self.values(quantity, backend, n)).map(|s| s.median)
    }
}

pub(super) fn markdown(report: &Report<'_>, md: &mut String) {
    let scale = Scale {
        samples: report.scale,
    };
    let counts = scale.counts();
    if let (Some(&first), Some(&last)) = (counts.first(), counts.last()) {
        let _ = writeln!(
            md,
            "\n**NAT scale**: N published ports (DNAT mappings) installed, the one measured among \
             them: last in the iptables chain, where a new connection walks every rule before \
             it; an element of the nftables map; an entry of our hash map. Fillers are on \
             addresses no packet goes to (median and min-max; the last column: the value at \
             N={} against N={}, per round where measured in rounds)\n",
            thousands(f64::from(last)),
            thousands(f64::from(first)),
        );
        let mut header = "| what | ".to_owned();
        let mut rule = "|---|".to_owned();
        for n in &counts {
            let _ = write!(header, "N={} | ", thousands(f64::from(*n)));
            rule.push_str("---:|");
        }
        let _ = writeln!(
            md,
            "{header}N={} vs N={} |\n{rule}---:|",
            thousands(f64::from(last)),
            thousands(f64::from(first))
        );
        for quantity in ScaleQuantity::ALL {
            for backend in Backend::ALL {
                if !report
                    .scale
                    .iter()
                    .any(|s| s.quantity == quantity && s.backend == backend)
                {
                    continue;
                }
                let mut row = format!("| {} |", quantity.label(backend));
                for n in &counts {
                    let cell = match Spread::of(&scale.values(quantity, backend, *n)) {
                        Some(s) if s.min == s.max => quantity.format(s.median),
                        Some(s) => format!(
                            "{} ({}-{})",
                            quantity.format(s.median),
                            quantity.format(s.min),
                            quantity.format(s.max)
                        ),
                        None => "-".to_owned(),
                    };
                    let _ = write!(row, " {cell} |");
                }
                let ratio = if first == last || !quantity.compared_across_counts() {
                    "-".to_owned()
                } else {
                    ratio_cell(&scale.ratios(quantity, backend, last, first))
                };
                let _ = writeln!(md, "{row} {ratio} |");
            }
        }
    }
    targets(report, &scale, md);
}

/// A target line's ratio: two decimals, or four where two would round it onto the other side
/// of the target (a median of 1.2999 is "1.2999x", not a "1.30x" reported as missed).
fn ratio_against(value: f64, target: f64) -> String {
    let rounded = (value * 100.0).round() / 100.0;
    if (rounded >= target) == (value >= target) {
        format!("{value:.2}x")
    } else {
        format!("{value:.4}x")
    }
}

/// Issue 6's targets, each with where it stands.
fn targets(report: &Report<'_>, scale: &Scale<'_>, md: &mut String) {
    let mut lines: Vec<String> = Vec::new();
    let verdict = |met: bool| if met { "met" } else { "**missed**" };
    // Endpoint to endpoint, against the veth pair and against Docker's bridge (as the kernel
    // runs it with and without br_netfilter), blocking and busy-polling.
    for (baseline, name, target) in [
        ("a", "the veth pair (a)", 0.95),
        ("b", "Docker's bridge + iptables (b)", 1.25),
        (
            "b+nf",
            "Docker's bridge + iptables with br_netfilter (b+nf)",
            1.25,
        ),
    ] {
        for (metric, how) in [(Metric::RrSpin, "busy-polling"), (Metric::Rr, "blocking")] {
            if let Some(r) = Spread::of(&report.ratios(Scenario::Forward, metric, "c", baseline)) {
                lines.push(format!(
                    "endpoint-to-endpoint TCP_RR, {how}, ours vs {name} >= {target:.2}x: {} \
                     ({:.2}-{:.2} by round): {}",
                    ratio_against(r.median, target),
                    r.min,
                    r.max,
                    verdict(r.median >= target)
                ));
            }
        }
    }
    let nat_ratio = |metric: Metric| {
        Spread::of(&report.ratios(Scenario::Published, metric, "c", report.nat_baseline))
    };
    for (metric, what, target) in [
        (
            Metric::RrSpin,
            "published-port TCP_RR, busy-polling, ours vs iptables DNAT",
            1.3,
        ),
        (
            Metric::CrrSpin,
            "published-port connection rate, busy-polling TCP_CRR, ours vs iptables DNAT",
            1.5,
        ),
        (
            Metric::Crr,
            "published-port connection rate, blocking TCP_CRR (bound by CPU wake-ups)",
            1.5,
        ),
    ] {
        if let Some(r) = nat_ratio(metric) {
            // What no data plane can beat: the bare veth pair, against the same baseline.
            let limit =
                Spread::of(&report.ratios(Scenario::Published, metric, "a", report.nat_baseline))
                    .map(|a| format!("; the veth pair (a), no host between, {:.2}x", a.median))
                    .unwrap_or_default();
            lines.push(format!(
                "{what} >= {target:.1}x: {} ({:.2}-{:.2} by round): {}{limit}",
                ratio_against(r.median, target),
                r.min,
                r.max,
                verdict(r.median >= target)
            ));
        }
    }
    let counts = scale.counts();
    if let (Some(&first), Some(&last)) = (counts.first(), counts.last())
        && first != last
    {
        for quantity in [ScaleQuantity::FirstPacketNs, ScaleQuantity::EstablishedNs] {
            if let Some(r) = Spread::of(&scale.ratios(quantity, Backend::Ours, last, first)) {
                lines.push(format!(
                    "our per-packet cost ({}) flat within 10% from N={} to N={}: {:.2}x \
                     ({:.2}-{:.2} by round): {}",
                    quantity.name().replace('_', " "),
                    thousands(f64::from(first)),
                    thousands(f64::from(last)),
                    r.median,
                    r.min,
                    r.max,
                    verdict((r.median - 1.0).abs() <= 0.10)
                ));
            }
        }
        let crr = |backend: Backend| {
            Spread::of(&scale.ratios(ScaleQuantity::Crr, backend, last, first))
                .map(|r| format!("{} {:.2}x", backend.name(), r.median))
        };
        let shown: Vec<String> = Backend::ALL.into_iter().filter_map(crr).collect();
        if !shown.is_empty() {
            lines.push(format!(
                "connections/s to the last mapping at N={} against N={}: {}",
                thousands(f64::from(last)),
                thousands(f64::from(first)),
                shown.join(", ")
            ));
        }
        if let (Some(ours), Some(add), Some(remove)) = (
            scale.median(ScaleQuantity::MapAddUs, Backend::Ours, last),
            scale.median(ScaleQuantity::AddMs, Backend::Ours, last),
            scale.median(ScaleQuantity::RemoveMs, Backend::Ours, last),
        ) {
            let agent = match (
                scale.median(ScaleQuantity::AgentAddMs, Backend::Ours, last),
                scale.median(ScaleQuantity::AgentRemoveMs, Backend::Ours, last),
            ) {
                (Some(add), Some(remove)) => format!(
                    "; the agent's request alone {add:.2} ms: {} (removing: {remove:.2} ms)",
                    verdict(add < 1.0)
                ),
                _ => String::new(),
            };
            lines.push(format!(
                "adding one mapping with N={} installed in under 1 ms: the map update {ours:.1} us: \
                 {}; through the agent (`netctl port publish`, a process and a round trip) \
                 {add:.2} ms: {} (removing: {remove:.2} ms){agent}",
                thousands(f64::from(last)),
                verdict(ours < 1000.0),
                verdict(add < 1.0),
            ));
        }
    }
    if lines.is_empty() {
        return;
    }
    let _ = writeln!(md, "\n**Targets (issue 6)**\n");
    for line in lines {
        let _ = writeln!(md, "- {line}");
    }
}

pub(super) fn csv(
    report: &Report<'_>,
    row: &mut impl FnMut(&str, &str, &str, &str, &str, &str, &[f64]),
) {
    let scale = Scale {
        samples: report.scale,
    };
    let counts = scale.counts();
    for quantity in ScaleQuantity::ALL {
        for backend in Backend::ALL {
            let label = quantity.label(backend);
            for n in &counts {
                row(
                    "scale",
                    backend.name(),
                    label,
                    quantity.name(),
                    quantity.unit(),
                    &format!("n={n}"),
                    &scale.values(quantity, backend, *n),
                );
            }
            if let (Some(&first), Some(&last)) = (counts.first(), counts.last())
                && first != last
                && quantity.compared_across_counts()
            {
                row(
                    "scale",
                    backend.name(),
                    label,
                    quantity.name(),
                    "x",
                    &format!("ratio_n{last}_vs_n{first}"),
                    &scale.ratios(quantity, backend, last, first),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::{
        Sample,
        tests::{self as report_tests, context, report},
    };

    fn sample(backend: Backend, mappings: u32, round: u32, value: f64) -> ScaleSample {
        ScaleSample {
            quantity: ScaleQuantity::Crr,
            backend,
            mappings,
            round,
            value,
        }
    }

    #[test]
    fn scale_ratios_pair_rounds_and_fall_back_to_medians() {
        let samples = [
            sample(Backend::Iptables, 1, 0, 100.0),
            sample(Backend::Iptables, 10, 0, 50.0),
            sample(Backend::Iptables, 1, 1, 200.0),
            sample(Backend::Iptables, 10, 1, 20.0),
            // A round where N=1 was not measured is left out.
            sample(Backend::Iptables, 10, 2, 1.0),
            ScaleSample {
                quantity: ScaleQuantity::AddMs,
                ..sample(Backend::Nft, 1, 0, 2.0)
            },
            ScaleSample {
                quantity: ScaleQuantity::AddMs,
                ..sample(Backend::Nft, 10, 3, 4.0)
            },
        ];
        let scale = Scale { samples: &samples };
        assert_eq!(scale.counts(), vec![1, 10]);
        assert_eq!(
            scale.ratios(ScaleQuantity::Crr, Backend::Iptables, 10, 1),
            vec![0.5, 0.1]
        );
        assert_eq!(
            scale.ratios(ScaleQuantity::AddMs, Backend::Nft, 10, 1),
            vec![2.0]
        );
        assert!(
            scale
                .ratios(ScaleQuantity::Crr, Backend::Ours, 10, 1)
                .is_empty()
        );
    }

    #[test]
    fn a_ratio_rounded_onto_the_target_shows_more_decimals() {
        assert_eq!(ratio_against(1.2999, 1.3), "1.2999x");
        assert_eq!(ratio_against(0.9466, 0.95), "0.9466x");
        assert_eq!(ratio_against(1.32, 1.3), "1.32x");
        assert_eq!(ratio_against(0.93, 0.95), "0.93x");
        assert_eq!(ratio_against(1.3, 1.3), "1.30x");
    }

    #[test]
    fn endpoint_targets_are_stated_against_each_baseline() {
        let forward = |setup, round, value| Sample {
            metric: Metric::RrSpin,
            ..report_tests::sample(setup, round, value)
        };
        // (c) at 0.97x and 0.95x of (a) in two rounds, ~1.20x of (b); (b+nf) not measured.
        let samples = [
            forward("a", 0, 100.0),
            forward("b", 0, 80.0),
            forward("c", 0, 97.0),
            forward("a", 1, 100.0),
            forward("b", 1, 80.0),
            forward("c", 1, 95.0),
        ];
        let context = context();
        let report = report(&context, &samples, &[]);
        let mut md = String::new();
        targets(&report, &Scale { samples: &[] }, &mut md);
        assert!(
            md.contains(
                "endpoint-to-endpoint TCP_RR, busy-polling, ours vs the veth pair (a) >= 0.95x: \
                 0.96x (0.95-0.97 by round): met"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "ours vs Docker's bridge + iptables (b) >= 1.25x: 1.20x (1.19-1.21 by round): \
                 **missed**"
            ),
            "{md}"
        );
        assert!(!md.contains("(b+nf)"), "{md}");
        assert!(!md.contains("blocking"), "{md}");
    }
}
