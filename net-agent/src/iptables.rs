//! NAT rules to and from `iptables-save` text, for moving a host's NAT (Docker's, kube-proxy's or
//! hand-written) onto the data plane and for showing the data plane's NAT in a form every Linux
//! administrator reads. Pure logic: the caller runs `iptables-save -t nat` and applies the plan.
//!
//! The data plane expresses two things: published ports (one host address, or all of them, and a
//! port, to an address and port, optionally for some sources only) and masquerade of a network's
//! traffic leaving through the uplink. [`parse_iptables_save`] reads the `*nat` table, follows the
//! jumps from PREROUTING, OUTPUT and POSTROUTING, and turns each rule into one of those or says
//! why not; [`render_iptables_save`] writes the data plane's state back as a `*nat` table in
//! Docker's shape, which [`parse_iptables_save`] reads back to the same plan.

use std::{collections::HashMap, fmt, net::Ipv4Addr};

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::api::{Proto, PublishedPort};

/// The chain the export puts published ports in (Docker's is `DOCKER`).
pub const EXPORT_CHAIN: &str = "NET-AGENT";

/// What an import would install, and what it would not, rule by rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportPlan {
    pub publish: Vec<PlannedPublish>,
    pub masquerade: Vec<PlannedMasquerade>,
    /// Rules with nothing left to install: the data plane does it itself (hairpin NAT), or an
    /// earlier rule already gave the same port or masquerade.
    pub covered: Vec<SkippedRule>,
    /// Every other rule of the nat table that was not turned into the above, with why. Nothing
    /// is dropped silently: only jumps and RETURNs are not listed, as they steer rather than
    /// NAT; what they do shows in the reasons of the rules they lead to or hold back.
    pub skipped: Vec<SkippedRule>,
}

/// A published port (DNAT) to install.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedPublish {
    /// From `-d ADDR/32`; `None`: every address of the host.
    pub host_ip: Option<Ipv4Addr>,
    /// From `--dport N` or `N:M` (or one `--dports` entry); equal for one port.
    pub host_ports: (u16, u16),
    pub proto: Proto,
    /// From `--to-destination`; the agent resolves it to one of its endpoints.
    pub to: Ipv4Addr,
    /// Destination port(s), position by position with `host_ports`.
    pub ports: (u16, u16),
    /// From `-s CIDR`; empty: anyone.
    pub allow: Vec<Ipv4Network>,
    /// The rule as written, for the plan printout.
    pub rule: String,
    /// 1-based line of the rule in the input.
    pub line: usize,
    /// Where the data plane's port differs from what the rule did, or the rule was only partly
    /// imported.
    pub note: Option<String>,
}

/// Masquerade to install for the network with this subnet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedMasquerade {
    /// From `-s CIDR`; the agent maps it to one of its networks.
    pub source: Ipv4Network,
    pub rule: String,
    pub line: usize,
    /// Where the data plane's masquerade differs from what the rule did.
    pub note: Option<String>,
}

/// A rule left out of the plan (or covered without needing anything), with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedRule {
    pub line: usize,
    pub rule: String,
    pub reason: String,
}

/// The input is not `iptables-save` output (or not a part of it `iptables-restore` would take).
#[derive(Debug, Error, PartialEq, Eq)]
#[error("line {line}: {reason}")]
pub struct ParseError {
    pub line: usize,
    pub reason: String,
}

/// Reads `iptables-save` output and plans its `*nat` table for the data plane; other tables are
/// read past. `host_ip` is the uplink address, if known: SNAT to it is masquerade, and DNAT to it
/// needs no "may not be a host address" note. Input without a nat table gives an empty plan.
pub fn parse_iptables_save(
    text: &str,
    host_ip: Option<Ipv4Addr>,
) -> Result<ImportPlan, ParseError> {
    let Some(table) = read_nat_table(text)? else {
        return Ok(ImportPlan::default());
    };
    let mut walker = Walker {
        table: &table,
        host_ip,
        visits: Vec::new(),
        stack: Vec::new(),
    };
    for hook in [Hook::Prerouting, Hook::Output, Hook::Postrouting] {
        walker.walk(hook.chain(), &Path::entry(hook));
    }
    Ok(assemble(&table, walker.visits))
}

/// Writes published ports and masquerading networks as an `iptables-save` nat table in Docker's
/// shape (`NET-AGENT` in place of `DOCKER`): PREROUTING and OUTPUT jump to it for packets to the
/// host's own addresses, one DNAT rule per port and allowed source, one MASQUERADE per network.
pub fn render_iptables_save(
    ports: &[PublishedPort],
    masquerade: &[Ipv4Network],
    generated_by: &str,
) -> String {
    // A line break in the name would end the comment and start a line iptables-restore reads.
    let generated_by = generated_by.replace(['\r', '\n'], " ");
    let mut lines = vec![
        format!("# Generated by {generated_by}"),
        "*nat".to_string(),
        ":PREROUTING ACCEPT [0:0]".to_string(),
        ":INPUT ACCEPT [0:0]".to_string(),
        ":OUTPUT ACCEPT [0:0]".to_string(),
        ":POSTROUTING ACCEPT [0:0]".to_string(),
        format!(":{EXPORT_CHAIN} - [0:0]"),
        format!("-A PREROUTING -m addrtype --dst-type LOCAL -j {EXPORT_CHAIN}"),
        // As Docker: the host's own connections too, except over loopback.
        format!("-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j {EXPORT_CHAIN}"),
    ];
    lines.extend(
        masquerade
            .iter()
            .map(|net| format!("-A POSTROUTING -s {} -j MASQUERADE", normalise(*net))),
    );
    lines.extend(ports.iter().flat_map(dnat_rules));
    lines.push("COMMIT".to_string());
    lines.push("# Completed".to_string());
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

/// The DNAT rules of one published port: one per allowed source, as a rule has one `-s`.
fn dnat_rules(port: &PublishedPort) -> Vec<String> {
    let host = port
        .host_ip
        .map(|ip| format!(" -d {ip}/32"))
        .unwrap_or_default();
    let proto = port.proto.name();
    let rest = format!(
        "{host} -p {proto} -m {proto} --dport {} -j DNAT --to-destination {}:{}",
        port.host_port, port.ip, port.port
    );
    if port.allow.is_empty() {
        return vec![format!("-A {EXPORT_CHAIN}{rest}")];
    }
    port.allow
        .iter()
        .map(|cidr| {
            // The agent stores validated CIDRs; anything else is written as it is, so that
            // iptables-restore names it rather than this function hiding it.
            let cidr = cidr
                .parse()
                .map(|net| normalise(net).to_string())
                .unwrap_or_else(|_| cidr.clone());
            format!("-A {EXPORT_CHAIN} -s {cidr}{rest}")
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Reading the text: tables, chain declarations, rules.

/// The nat table as read.
struct NatTable {
    /// Every rule, in input order.
    rules: Vec<Rule>,
    /// Each chain's rules (indices into `rules`), in order; declared chains are here even when
    /// empty.
    chains: HashMap<String, Vec<usize>>,
}

impl NatTable {
    fn new() -> Self {
        // Built-in chains exist without a declaration (iptables-restore takes rules for them
        // either way).
        let chains = ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"]
            .into_iter()
            .map(|chain| (chain.to_string(), Vec::new()))
            .collect();
        NatTable {
            rules: Vec::new(),
            chains,
        }
    }
}

enum Reading {
    /// Between tables: only `*TABLE` and comments may come.
    Between,
    Nat {
        table: NatTable,
    },
    Other {
        name: String,
    },
}

fn read_nat_table(text: &str) -> Result<Option<NatTable>, ParseError> {
    let mut state = Reading::Between;
    // Where the open table started, for "not closed" errors.
    let mut opened_at = 0;
    let mut nat = None;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let fail = |reason: String| ParseError { line, reason };
        let content = raw.trim();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        if let Some(name) = content.strip_prefix('*') {
            if let Some(open) = state.name() {
                return Err(fail(format!(
                    "table {name} starts before table {open} (line {opened_at}) ends with COMMIT"
                )));
            }
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Err(fail(format!("{content:?} is not a table name")));
            }
            state = if name == "nat" {
                if nat.is_some() {
                    return Err(fail("a second nat table".to_string()));
                }
                Reading::Nat {
                    table: NatTable::new(),
                }
            } else {
                Reading::Other {
                    name: name.to_string(),
                }
            };
            opened_at = line;
            continue;
        }
        if content == "COMMIT" {
            match std::mem::replace(&mut state, Reading::Between) {
                Reading::Nat { table } => nat = Some(table),
                Reading::Other { .. } => {}
                Reading::Between => return Err(fail("COMMIT outside any table".to_string())),
            }
            continue;
        }
        match &mut state {
            Reading::Between => {
                return Err(fail(format!(
                    "{content:?} is outside any table (iptables-save output opens each table \
                     with *TABLE)"
                )));
            }
            // Not imported; only check that the line has iptables-save's shape.
            Reading::Other { .. } => {
                if !content.starts_with([':', '-', '[']) {
                    return Err(fail(format!(
                        "expected a chain (:CHAIN ...) or a rule (-A CHAIN ...), found {content:?}"
                    )));
                }
            }
            Reading::Nat { table } => {
                if let Some(declaration) = content.strip_prefix(':') {
                    let chain = parse_chain_declaration(declaration).map_err(fail)?;
                    table.chains.entry(chain).or_default();
                } else {
                    let rule = parse_rule(line, content, &table.chains)?;
                    let id = table.rules.len();
                    table.chains.entry(rule.chain.clone()).or_default().push(id);
                    table.rules.push(rule);
                }
            }
        }
    }
    if let Some(open) = state.name() {
        return Err(ParseError {
            line: opened_at,
            reason: format!("table {open} is not closed with COMMIT"),
        });
    }
    Ok(nat)
}

impl Reading {
    fn name(&self) -> Option<&str> {
        match self {
            Reading::Between => None,
            Reading::Nat { .. } => Some("nat"),
            Reading::Other { name } => Some(name),
        }
    }
}

/// `CHAIN POLICY [PACKETS:BYTES]` (after the `:`); the counters may be left out.
fn parse_chain_declaration(declaration: &str) -> Result<String, String> {
    let fields: Vec<&str> = declaration.split_whitespace().collect();
    let policy_ok = |policy: &str| {
        policy == "-" || (!policy.is_empty() && policy.chars().all(|c| c.is_ascii_uppercase()))
    };
    match fields.as_slice() {
        [chain, policy] if policy_ok(policy) => Ok(chain.to_string()),
        [chain, policy, counters] if policy_ok(policy) && is_counters(counters) => {
            Ok(chain.to_string())
        }
        _ => Err(format!(
            ":{declaration} is not a chain declaration (expected :CHAIN POLICY [PACKETS:BYTES])"
        )),
    }
}

/// `[PACKETS:BYTES]`, as on chain declarations and before rules in `iptables-save -c` output.
fn is_counters(word: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
    word.strip_prefix('[')
        .and_then(|w| w.strip_suffix(']'))
        .and_then(|w| w.split_once(':'))
        .is_some_and(|(packets, bytes)| digits(packets) && digits(bytes))
}

/// Splits a rule into words as iptables-restore does: on whitespace, with double quotes around
/// words that contain spaces (`--comment "kube-proxy rule"`) and a backslash escaping the next
/// character inside them.
fn split_words(text: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(escaped) => word.push(escaped),
                            None => return Err("unterminated quote".to_string()),
                        },
                        Some(other) => word.push(other),
                        None => return Err("unterminated quote".to_string()),
                    }
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// One `-A` rule of the nat table.
#[derive(Debug)]
struct Rule {
    line: usize,
    /// As written (trimmed).
    text: String,
    chain: String,
    matches: Match,
    target: Target,
}

/// What a rule matches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Match {
    cond: Conditions,
    /// `! -i` and `! -o` are Docker's "not from/to the bridge" forms; a published port or a
    /// masquerade ignores them (the data plane does hairpin NAT itself), so they stay out of
    /// `cond`. They are kept so that a RETURN with them is not taken for a plain one.
    not_in_iface: Option<String>,
    not_out_iface: Option<String>,
    /// `-m statistic`: the rule takes a share of the packets (kube-proxy's load balancing).
    statistic: bool,
    /// Matches the data plane has no counterpart for, as "X is not supported".
    problems: Vec<String>,
}

/// The conditions the data plane can express, positive ones only, as they add up along the
/// jumps from a built-in chain to a rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Conditions {
    /// Lowercase name (`tcp`, `udp`, ...); `None`: every protocol.
    proto: Option<String>,
    src: Option<Ipv4Network>,
    dst: Option<Ipv4Network>,
    /// `! -d`: accepted where it cannot matter (Docker's `! -d 127.0.0.0/8`), refused elsewhere.
    not_dst: Vec<Ipv4Network>,
    in_iface: Option<String>,
    out_iface: Option<String>,
    /// Destination port ranges (one for `--dport`, several for `--dports`); `None`: every port.
    dports: Option<Vec<(u16, u16)>>,
    /// `-m addrtype --dst-type LOCAL`: to one of the host's own addresses.
    dst_local: bool,
}

impl Conditions {
    /// Both sets at once; `Err` names a pair that cannot hold together.
    fn and(&self, other: &Conditions) -> Result<Conditions, String> {
        let proto = same(&self.proto, &other.proto, "-p")?;
        let in_iface = same(&self.in_iface, &other.in_iface, "-i")?;
        let out_iface = same(&self.out_iface, &other.out_iface, "-o")?;
        let src = narrower(self.src, other.src, "-s")?;
        let dst = narrower(self.dst, other.dst, "-d")?;
        let not_dst: Vec<Ipv4Network> =
            self.not_dst.iter().chain(&other.not_dst).copied().collect();
        if let Some(dst) = dst
            && let Some(excluded) = not_dst.iter().find(|n| dst.is_subnet_of(**n))
        {
            return Err(format!("-d {dst} and ! -d {excluded}"));
        }
        let dports = match (&self.dports, &other.dports) {
            (Some(a), Some(b)) => {
                let both = intersect_ranges(a, b);
                if both.is_empty() {
                    return Err(format!("--dport {} and --dport {}", Ports(a), Ports(b)));
                }
                Some(both)
            }
            (a, b) => a.clone().or_else(|| b.clone()),
        };
        Ok(Conditions {
            proto,
            src,
            dst,
            not_dst,
            in_iface,
            out_iface,
            dports,
            dst_local: self.dst_local || other.dst_local,
        })
    }
}

fn same<T: Clone + PartialEq + fmt::Display>(
    a: &Option<T>,
    b: &Option<T>,
    option: &str,
) -> Result<Option<T>, String> {
    match (a, b) {
        (Some(x), Some(y)) if x != y => Err(format!("{option} {x} and {option} {y}")),
        _ => Ok(a.clone().or_else(|| b.clone())),
    }
}

/// Two CIDRs either nest (both hold in the smaller) or are disjoint (nothing matches).
fn narrower(
    a: Option<Ipv4Network>,
    b: Option<Ipv4Network>,
    option: &str,
) -> Result<Option<Ipv4Network>, String> {
    match (a, b) {
        (Some(x), Some(y)) if x.is_subnet_of(y) => Ok(Some(x)),
        (Some(x), Some(y)) if y.is_subnet_of(x) => Ok(Some(y)),
        (Some(x), Some(y)) => Err(format!("{option} {x} and {option} {y}")),
        (x, y) => Ok(x.or(y)),
    }
}

fn intersect_ranges(a: &[(u16, u16)], b: &[(u16, u16)]) -> Vec<(u16, u16)> {
    a.iter()
        .flat_map(|&(a0, a1)| {
            b.iter()
                .map(move |&(b0, b1)| (a0.max(b0), a1.min(b1)))
                .filter(|(first, last)| first <= last)
        })
        .collect()
}

/// Port ranges as iptables writes them: `80`, `8000:8010`, `80,443`.
struct Ports<'a>(&'a [(u16, u16)]);

impl fmt::Display for Ports<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(first, last)) in self.0.iter().enumerate() {
            let comma = if i > 0 { "," } else { "" };
            if first == last {
                write!(f, "{comma}{first}")?;
            } else {
                write!(f, "{comma}{first}:{last}")?;
            }
        }
        Ok(())
    }
}

/// Where a rule sends matching packets.
#[derive(Debug)]
enum Target {
    /// `-j CHAIN` (or `-g CHAIN`, which is refused through [`Match::problems`]).
    Chain(String),
    Return,
    Effect(Effect),
}

/// What a rule that does not jump does to packets.
#[derive(Debug)]
enum Effect {
    Dnat(Vec<NatTo>),
    Snat(Vec<NatTo>),
    Masquerade,
    /// No counterpart in the data plane, with why.
    Unsupported(String),
}

/// One `--to-destination` / `--to-source`: `[ADDR[-ADDR]][:PORT[-PORT[/BASE]]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NatTo {
    text: String,
    /// First and last address; `None`: the address is kept.
    addresses: Option<(Ipv4Addr, Ipv4Addr)>,
    ports: Option<PortMap>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PortMap {
    first: u16,
    last: u16,
    /// `/BASE` (shifted port mapping): host port BASE+i goes to `first`+i.
    base: Option<u16>,
}

impl NatTo {
    fn parse(text: &str) -> Result<NatTo, String> {
        let (addresses, ports) = match text.split_once(':') {
            Some((addresses, ports)) => (addresses, Some(ports)),
            None => (text, None),
        };
        let address = |s: &str| {
            s.parse::<Ipv4Addr>()
                .map_err(|_| format!("{s:?} is not an IPv4 address"))
        };
        let addresses = match addresses.split_once('-') {
            _ if addresses.is_empty() => None,
            Some((first, last)) => Some((address(first)?, address(last)?)),
            None => Some((address(addresses)?, address(addresses)?)),
        };
        let ports = ports
            .map(|ports| {
                let (range, base) = match ports.split_once('/') {
                    Some((range, base)) => (range, Some(port_number(base)?)),
                    None => (ports, None),
                };
                let (first, last) = match range.split_once('-') {
                    Some((first, last)) => (port_number(first)?, port_number(last)?),
                    None => (port_number(range)?, port_number(range)?),
                };
                Ok::<_, String>(PortMap { first, last, base })
            })
            .transpose()?;
        Ok(NatTo {
            text: text.to_string(),
            addresses,
            ports,
        })
    }
}

fn port_number(s: &str) -> Result<u16, String> {
    s.parse().map_err(|_| format!("{s:?} is not a port number"))
}

/// `N` or `N:M`.
fn port_range(s: &str) -> Result<(u16, u16), String> {
    match s.split_once(':') {
        Some((first, last)) => Ok((port_number(first)?, port_number(last)?)),
        None => port_number(s).map(|port| (port, port)),
    }
}

/// A CIDR as iptables-save writes it, normalised to its network address.
fn cidr(option: &str, s: &str) -> Result<Ipv4Network, String> {
    s.parse()
        .map(normalise)
        .map_err(|_| format!("{option} {s}: not an IPv4 address or CIDR"))
}

fn normalise(net: Ipv4Network) -> Ipv4Network {
    Ipv4Network::new_checked(net.network(), net.prefix()).unwrap_or(net)
}

/// The words of a rule, consumed left to right.
struct Words(std::iter::Peekable<std::vec::IntoIter<String>>);

impl Words {
    fn value(&mut self, option: &str) -> Result<String, String> {
        self.0
            .next()
            .ok_or_else(|| format!("{option} needs a value"))
    }

    /// The values of an option that is not interpreted: every word up to the next option.
    fn rest_of_option(&mut self) -> Vec<String> {
        let mut values = Vec::new();
        while let Some(value) = self.0.next_if(|w| !w.starts_with('-') && w != "!") {
            values.push(value);
        }
        values
    }
}

/// Match modules whose options are read below; the options of any other module are skipped
/// over, the module itself having been reported.
const KNOWN_MODULES: [&str; 6] = [
    "comment",
    "tcp",
    "udp",
    "multiport",
    "addrtype",
    "statistic",
];

/// Parses `[PACKETS:BYTES] -A CHAIN MATCHES -j TARGET [TARGET OPTIONS]`. A jump names a chain
/// declared above it, as iptables-restore requires.
fn parse_rule(
    line: usize,
    text: &str,
    chains: &HashMap<String, Vec<usize>>,
) -> Result<Rule, ParseError> {
    let fail = |reason: String| ParseError { line, reason };
    let body = match text.split_once(char::is_whitespace) {
        Some((counters, rest)) if counters.starts_with('[') => {
            if !is_counters(counters) {
                return Err(fail(format!("{counters} is not [PACKETS:BYTES]")));
            }
            rest
        }
        _ => text,
    };
    let mut words = Words(split_words(body).map_err(fail)?.into_iter().peekable());
    if !matches!(words.0.next().as_deref(), Some("-A" | "--append")) {
        return Err(fail(format!(
            "expected a rule (-A CHAIN ...) or a chain (:CHAIN ...), found {text:?}"
        )));
    }
    let chain = words.value("-A").map_err(fail)?;
    if !chains.contains_key(&chain) {
        return Err(fail(format!(
            "chain {chain} is not declared (expected :{chain} - [0:0] before its rules)"
        )));
    }
    let mut problems = Vec::new();
    let mut unsupported = |what: String| problems.push(format!("{what} is not supported"));
    let mut cond = Conditions::default();
    let (mut not_in_iface, mut not_out_iface, mut statistic) = (None, None, false);
    let mut target: Option<String> = None;
    let mut target_options: Vec<(String, Vec<String>)> = Vec::new();
    let mut negate = false;
    // Set while reading the options of a match module that is not understood.
    let mut in_unknown_module = false;
    while let Some(word) = words.0.next() {
        if target.is_some() {
            if word.starts_with("--") {
                let values = words.rest_of_option();
                target_options.push((word, values));
            } else if let Some((_, values)) = target_options.last_mut() {
                // A quoted value that looks like an option (`--log-prefix "-x"`) was cut
                // short; what follows belongs to it too.
                values.push(word);
            } else {
                return Err(fail(format!("unexpected {word:?} after the target")));
            }
            continue;
        }
        if word == "!" {
            negate = true;
            continue;
        }
        let negated = std::mem::take(&mut negate);
        let not = if negated { "! " } else { "" };
        match word.as_str() {
            "-p" | "--protocol" => {
                let value = words.value(&word).map_err(fail)?;
                if negated {
                    unsupported(format!("! -p {value}"));
                } else {
                    cond.proto = protocol(&value);
                }
            }
            "-s" | "--source" | "-d" | "--destination" => {
                let value = words.value(&word).map_err(fail)?;
                let net = cidr(&word, &value).map_err(fail)?;
                let source = matches!(word.as_str(), "-s" | "--source");
                match (source, negated) {
                    (true, true) => unsupported(format!("! -s {net} (every source but {net})")),
                    (false, true) => cond.not_dst.push(net),
                    // 0.0.0.0/0 matches everything: no condition.
                    (true, false) => cond.src = Some(net).filter(|n| n.prefix() > 0),
                    (false, false) => cond.dst = Some(net).filter(|n| n.prefix() > 0),
                }
            }
            "-i" | "--in-interface" => {
                let value = words.value(&word).map_err(fail)?;
                if negated {
                    not_in_iface = Some(value);
                } else {
                    cond.in_iface = Some(value);
                }
            }
            "-o" | "--out-interface" => {
                let value = words.value(&word).map_err(fail)?;
                if negated {
                    not_out_iface = Some(value);
                } else {
                    cond.out_iface = Some(value);
                }
            }
            "-m" | "--match" => {
                let module = words.value(&word).map_err(fail)?;
                in_unknown_module = !KNOWN_MODULES.contains(&module.as_str());
                if in_unknown_module {
                    unsupported(format!("-m {module}"));
                }
                statistic |= module == "statistic";
            }
            "-j" | "--jump" => target = Some(words.value(&word).map_err(fail)?),
            "-g" | "--goto" => {
                let chain = words.value(&word).map_err(fail)?;
                unsupported(format!("-g {chain} (goto)"));
                target = Some(chain);
            }
            "--dport" | "--destination-port" => {
                let value = words.value(&word).map_err(fail)?;
                let range = port_range(&value).map_err(|e| fail(format!("{word} {e}")))?;
                if negated {
                    unsupported(format!("! --dport {value}"));
                } else {
                    cond.dports = Some(vec![range]);
                }
            }
            "--dports" | "--destination-ports" => {
                let value = words.value(&word).map_err(fail)?;
                let ranges = value
                    .split(',')
                    .map(port_range)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| fail(format!("{word} {e}")))?;
                if negated {
                    unsupported(format!("! --dports {value}"));
                } else {
                    cond.dports = Some(ranges);
                }
            }
            "--dst-type" => {
                let value = words.value(&word).map_err(fail)?;
                if value == "LOCAL" && !negated {
                    cond.dst_local = true;
                } else {
                    unsupported(format!("{not}--dst-type {value}"));
                }
            }
            // Comments, and how much of the traffic -m statistic takes (the flag says enough).
            "--comment" | "--mode" | "--probability" | "--every" | "--packet" => {
                words.value(&word).map_err(fail)?;
            }
            option if option.starts_with('-') => {
                let values = words.rest_of_option();
                if !in_unknown_module {
                    let values: String = values.iter().map(|v| format!(" {v}")).collect();
                    unsupported(format!("{not}{option}{values}"));
                }
            }
            other => return Err(fail(format!("unexpected {other:?} (not an option)"))),
        }
    }
    if negate {
        return Err(fail("a rule ends with \"!\"".to_string()));
    }
    let target = resolve_target(target, &target_options, chains).map_err(fail)?;
    Ok(Rule {
        line,
        text: text.to_string(),
        chain,
        matches: Match {
            cond,
            not_in_iface,
            not_out_iface,
            statistic,
            problems,
        },
        target,
    })
}

fn protocol(name: &str) -> Option<String> {
    match name.to_ascii_lowercase().as_str() {
        "all" | "0" => None,
        "6" => Some("tcp".to_string()),
        "17" => Some("udp".to_string()),
        other => Some(other.to_string()),
    }
}

fn resolve_target(
    name: Option<String>,
    options: &[(String, Vec<String>)],
    chains: &HashMap<String, Vec<usize>>,
) -> Result<Target, String> {
    let unsupported = |why: String| Ok(Target::Effect(Effect::Unsupported(why)));
    let Some(name) = name else {
        return unsupported("the rule has no target (it only counts packets)".to_string());
    };
    if chains.contains_key(&name) {
        return Ok(Target::Chain(name));
    }
    // For each NAT target: the option giving the new address, and the options that only
    // choose among addresses or ports, which the data plane does its own way.
    let (address_option, harmless): (&str, &[&str]) = match name.as_str() {
        "RETURN" => return Ok(Target::Return),
        "DNAT" => ("--to-destination", &["--random", "--persistent"]),
        "SNAT" => (
            "--to-source",
            &["--random", "--random-fully", "--persistent"],
        ),
        "MASQUERADE" => ("", &["--random", "--random-fully"]),
        "REDIRECT" => {
            return unsupported(
                "-j REDIRECT (to a port of the host itself) is not supported: published ports \
                 lead to endpoints"
                    .to_string(),
            );
        }
        "MARK" | "CONNMARK" => {
            return unsupported(format!(
                "-j {name} is not supported (the data plane has no packet marks; it \
                 masquerades per network)"
            ));
        }
        "ACCEPT" => {
            return unsupported(
                "-j ACCEPT in the nat table (no NAT for matching packets) is not supported"
                    .to_string(),
            );
        }
        "LOG" | "NFLOG" | "TRACE" => {
            return unsupported(format!(
                "-j {name} (logging from the nat table) is not supported"
            ));
        }
        other => return unsupported(format!("target {other} is not supported")),
    };
    let mut to = Vec::new();
    for (option, values) in options {
        if option == address_option {
            for value in values {
                to.push(NatTo::parse(value).map_err(|e| format!("{option} {value}: {e}"))?);
            }
        } else if !harmless.contains(&option.as_str()) {
            return unsupported(format!("-j {name} {option} is not supported"));
        }
    }
    Ok(Target::Effect(match name.as_str() {
        "DNAT" => Effect::Dnat(to),
        "SNAT" => Effect::Snat(to),
        _ => Effect::Masquerade,
    }))
}

// ---------------------------------------------------------------------------------------------
// Following the jumps.

/// The built-in chains a connection's first packet runs through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hook {
    Prerouting,
    Output,
    Postrouting,
}

impl Hook {
    fn chain(self) -> &'static str {
        match self {
            Hook::Prerouting => "PREROUTING",
            Hook::Output => "OUTPUT",
            Hook::Postrouting => "POSTROUTING",
        }
    }
}

/// The way from a built-in chain to a rule: which hook, the conditions of the jumps taken, and
/// whether something on the way already rules out importing what lies beyond.
#[derive(Debug, Clone)]
struct Path {
    hook: Hook,
    cond: Conditions,
    block: Option<Block>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Block {
    /// Rules beyond are not imported along this way, for this reason.
    Skip(String),
    /// No packet gets beyond along this way, for this reason.
    Unreachable(String),
}

impl Path {
    fn entry(hook: Hook) -> Path {
        Path {
            hook,
            cond: Conditions::default(),
            block: None,
        }
    }

    /// The way on through `rule`'s jump; `extra` is a reason the jump itself is not imported.
    fn through(&self, rule: &Rule, extra: Option<Block>) -> Path {
        match self.cond.and(&rule.matches.cond) {
            Ok(cond) => {
                let problems = (!rule.matches.problems.is_empty()).then(|| {
                    Block::Skip(format!(
                        "reached through line {}, where {}",
                        rule.line,
                        rule.matches.problems.join("; ")
                    ))
                });
                Path {
                    hook: self.hook,
                    cond,
                    block: self.block.clone().or(extra).or(problems),
                }
            }
            Err(conflict) => Path {
                block: self.block.clone().or(Some(Block::Unreachable(format!(
                    "{conflict} (line {} on the way from {})",
                    rule.line,
                    self.hook.chain()
                )))),
                ..self.clone()
            },
        }
    }
}

/// One arrival of the walk at a rule that does something other than jump.
struct Visit {
    rule: usize,
    hook: Hook,
    verdict: Verdict,
}

enum Verdict {
    /// One per destination port range (several with `--dports`).
    Publish(Vec<PlannedPublish>),
    Masquerade(PlannedMasquerade),
    Covered(String),
    Skipped(String),
    Unreachable(String),
}

const HAIRPIN: &str = "hairpin masquerade (an endpoint reaching itself through a published \
                       port): the data plane does this itself";

struct Walker<'a> {
    table: &'a NatTable,
    host_ip: Option<Ipv4Addr>,
    visits: Vec<Visit>,
    /// Chains being walked, innermost last.
    stack: Vec<&'a str>,
}

impl<'a> Walker<'a> {
    /// Walks `chain` as a packet arriving along `path` would, and every chain it jumps to.
    fn walk(&mut self, chain: &'a str, path: &Path) {
        let table = self.table;
        // iptables-restore refuses loops; this only keeps input it would refuse from hanging us.
        if self.stack.contains(&chain) {
            return;
        }
        let Some(rules) = table.chains.get(chain) else {
            return;
        };
        self.stack.push(chain);
        // Set once a rule makes the rest of this chain conditional in a way that cannot be
        // expressed.
        let mut barrier: Option<Block> = None;
        for (position, &id) in rules.iter().enumerate() {
            let rule = &table.rules[id];
            let here = Path {
                block: path.block.clone().or_else(|| barrier.clone()),
                ..path.clone()
            };
            match &rule.target {
                Target::Chain(next) => {
                    // A jump with -m statistic takes a share of the packets to one endpoint;
                    // the jumps after it take the rest: load balancing.
                    let balancing = rule.matches.statistic.then(|| {
                        let endpoints = rules[position..]
                            .iter()
                            .filter(|&&id| matches!(table.rules[id].target, Target::Chain(_)))
                            .count();
                        Block::Skip(format!(
                            "load balancing over {endpoints} endpoints (-m statistic) is not \
                             supported"
                        ))
                    });
                    self.walk(next, &here.through(rule, balancing.clone()));
                    barrier = barrier.or(balancing);
                }
                Target::Return => barrier = barrier.or_else(|| after_return(rule)),
                Target::Effect(effect) => {
                    let verdict = self.evaluate(rule, effect, &here);
                    self.visits.push(Visit {
                        rule: id,
                        hook: path.hook,
                        verdict,
                    });
                }
            }
        }
        self.stack.pop();
    }

    fn evaluate(&self, rule: &Rule, effect: &Effect, path: &Path) -> Verdict {
        if let Some(Block::Unreachable(why)) = &path.block {
            return Verdict::Unreachable(why.clone());
        }
        if let Effect::Unsupported(why) = effect {
            return Verdict::Skipped(why.clone());
        }
        if let Some(Block::Skip(why)) = &path.block {
            return Verdict::Skipped(why.clone());
        }
        if !rule.matches.problems.is_empty() {
            return Verdict::Skipped(rule.matches.problems.join("; "));
        }
        if rule.matches.statistic {
            return Verdict::Skipped(
                "-m statistic (a share of the packets) is not supported".to_string(),
            );
        }
        let cond = match path.cond.and(&rule.matches.cond) {
            Ok(cond) => cond,
            Err(conflict) => {
                return Verdict::Unreachable(format!(
                    "{conflict} (on the way from {})",
                    path.hook.chain()
                ));
            }
        };
        let result = match effect {
            Effect::Dnat(to) => {
                publish(rule, &cond, path.hook, to, self.host_ip).map(Verdict::Publish)
            }
            Effect::Snat(to) => masquerade(rule, &cond, path.hook, Some(to), self.host_ip),
            Effect::Masquerade => masquerade(rule, &cond, path.hook, None, self.host_ip),
            Effect::Unsupported(why) => Err(why.clone()),
        };
        result.unwrap_or_else(Verdict::Skipped)
    }
}

/// What a RETURN does to the rest of its chain: nothing that matters for Docker's
/// `-i BRIDGE -j RETURN` (the bridge's own traffic skips the published ports; the data plane
/// handles that hairpin case itself); everything after an unconditional one is unreachable; after
/// any other, the rest applies only when the RETURN does not match, which cannot be expressed.
fn after_return(rule: &Rule) -> Option<Block> {
    let bare = Match::default();
    let without_interface = Match {
        cond: Conditions {
            in_iface: None,
            ..rule.matches.cond.clone()
        },
        ..rule.matches.clone()
    };
    if rule.matches == bare {
        Some(Block::Unreachable(format!(
            "it follows the unconditional RETURN on line {}",
            rule.line
        )))
    } else if without_interface == bare {
        None
    } else {
        let detail = if rule.matches.problems.is_empty() {
            String::new()
        } else {
            format!(": {}", rule.matches.problems.join("; "))
        };
        Some(Block::Skip(format!(
            "it follows the conditional RETURN on line {}, whose exception the data plane \
             cannot express{detail}",
            rule.line
        )))
    }
}

/// The published ports of a DNAT rule, one per destination port range.
fn publish(
    rule: &Rule,
    cond: &Conditions,
    hook: Hook,
    to: &[NatTo],
    host_ip: Option<Ipv4Addr>,
) -> Result<Vec<PlannedPublish>, String> {
    if hook == Hook::Postrouting {
        return Err("-j DNAT in POSTROUTING is not valid".to_string());
    }
    let proto = match cond.proto.as_deref() {
        Some("tcp") => Proto::Tcp,
        Some("udp") => Proto::Udp,
        Some(other) => {
            return Err(format!(
                "DNAT of protocol {other}: only tcp and udp ports can be published"
            ));
        }
        None => {
            return Err(
                "DNAT without -p tcp or -p udp (every protocol) cannot be published as a port"
                    .to_string(),
            );
        }
    };
    if let Some(iface) = &cond.in_iface {
        return Err(format!(
            "DNAT only for packets from interface {iface}: a published port takes packets \
             from every interface"
        ));
    }
    if let Some(iface) = &cond.out_iface {
        return Err(format!(
            "DNAT only for packets leaving through {iface} is not supported"
        ));
    }
    let Some(dports) = &cond.dports else {
        return Err("DNAT without --dport (every port) cannot be published as a port".to_string());
    };
    let host = match cond.dst {
        None => None,
        Some(net) if net.prefix() == 32 => Some(net.ip()),
        Some(net) => {
            return Err(format!(
                "DNAT of every address in {net} is not supported: a published port has one \
                 host address or all of them"
            ));
        }
    };
    // Docker's OUTPUT jump leaves out loopback, which a published port does not take anyway.
    if host.is_none()
        && let Some(net) = cond.not_dst.iter().find(|net| !net.ip().is_loopback())
    {
        return Err(format!("DNAT to every address but {net} is not supported"));
    }
    let [to] = to else {
        return Err(if to.is_empty() {
            "DNAT without --to-destination".to_string()
        } else {
            format!(
                "DNAT to {} destinations (load balancing) is not supported",
                to.len()
            )
        });
    };
    let Some((address, last)) = to.addresses else {
        return Err(format!(
            "--to-destination {} keeps the address and changes only the port, which is not \
             supported",
            to.text
        ));
    };
    if address != last {
        return Err(format!(
            "--to-destination {}: a range of addresses (load balancing) is not supported",
            to.text
        ));
    }
    let note = destination_note(cond, host, host_ip);
    let allow: Vec<Ipv4Network> = cond.src.into_iter().collect();
    dports
        .iter()
        .map(|&host_ports| {
            Ok(PlannedPublish {
                host_ip: host,
                host_ports,
                proto,
                to: address,
                ports: map_ports(host_ports, to)?,
                allow: allow.clone(),
                rule: rule.text.clone(),
                line: rule.line,
                note: note.clone(),
            })
        })
        .collect()
}

/// Where a DNAT took more or other packets than a published port does.
fn destination_note(
    cond: &Conditions,
    host: Option<Ipv4Addr>,
    host_ip: Option<Ipv4Addr>,
) -> Option<String> {
    // -m addrtype --dst-type LOCAL: the host's own addresses, which is what a published port is.
    if cond.dst_local {
        return None;
    }
    match host {
        None => Some(
            "the rule took packets to every destination, forwarded ones too; the data plane \
             publishes the port on the host's own addresses only"
                .to_string(),
        ),
        Some(addr) if addr.is_loopback() || Some(addr) == host_ip => None,
        Some(addr) => Some(format!(
            "{addr} may not be an address of this host (a kube-proxy ClusterIP, for example): \
             the data plane matches it only where packets to it reach this host"
        )),
    }
}

/// Where host ports go under `--to-destination`. iptables keeps the port when none is given, or
/// when it already lies in the given range; maps by offset with a base port (`A-B/BASE`); and
/// otherwise spreads connections over the range, which the data plane does not do: it maps port
/// to port.
fn map_ports(host: (u16, u16), to: &NatTo) -> Result<(u16, u16), String> {
    let Some(ports) = to.ports else {
        return Ok(host);
    };
    let same_length = ports.last.checked_sub(ports.first) == host.1.checked_sub(host.0);
    let offset_kept = match ports.base {
        Some(base) => base == host.0,
        None => ports.first == ports.last || (ports.first, ports.last) == host,
    };
    if same_length && offset_kept {
        return Ok((ports.first, ports.last));
    }
    let (host_text, to_text) = (dashed(host), dashed((ports.first, ports.last)));
    let why = if ports.first == ports.last {
        format!("sends host ports {host_text} all to port {to_text}")
    } else if same_length && ports.base.is_none() {
        // The rule could say what it means with a base port; the data plane then takes it.
        format!(
            "spreads host ports {host_text} over ports {to_text} (iptables picks one per \
             connection; a base port, {to_text}/{}, would map them in order)",
            host.0
        )
    } else {
        format!("takes host ports {host_text} to ports {to_text}")
    };
    Err(format!(
        "--to-destination {} {why}; a published range maps port to port",
        to.text
    ))
}

/// The masquerade of a MASQUERADE rule, or of an SNAT rule to the host's uplink address.
fn masquerade(
    rule: &Rule,
    cond: &Conditions,
    hook: Hook,
    snat_to: Option<&[NatTo]>,
    host_ip: Option<Ipv4Addr>,
) -> Result<Verdict, String> {
    if hook != Hook::Postrouting {
        let target = if snat_to.is_some() {
            "SNAT"
        } else {
            "MASQUERADE"
        };
        return Err(format!("-j {target} in {} is not valid", hook.chain()));
    }
    if let (Some(src), Some(dst)) = (cond.src, cond.dst)
        && src.prefix() == 32
        && src == dst
    {
        return Ok(Verdict::Covered(HAIRPIN.to_string()));
    }
    if let Some(to) = snat_to {
        let to_host = matches!(
            to,
            [NatTo { addresses: Some((first, last)), ports: None, .. }]
                if first == last && Some(*first) == host_ip
        );
        if !to_host {
            let addresses: Vec<&str> = to.iter().map(|t| t.text.as_str()).collect();
            return Err(format!(
                "SNAT to a fixed address ({}): only masquerade to the uplink address is \
                 supported; use MASQUERADE",
                addresses.join(", ")
            ));
        }
    }
    let Some(source) = cond.src else {
        return Err("masquerade of every source is not per network: give -s SUBNET".to_string());
    };
    if let Some(dst) = cond.dst {
        return Err(format!(
            "masquerade only towards {dst} is not supported: the data plane masquerades all \
             of a network's traffic leaving through the uplink"
        ));
    }
    if let Some(net) = cond.not_dst.first() {
        return Err(format!("masquerade except towards {net} is not supported"));
    }
    if cond.proto.is_some() || cond.dports.is_some() {
        return Err(
            "masquerade of only some protocols or ports is not supported: the data plane \
             masquerades all of a network's traffic"
                .to_string(),
        );
    }
    if cond.dst_local {
        return Err(
            "masquerade of packets to the host's own addresses is not supported".to_string(),
        );
    }
    if let Some(iface) = &cond.in_iface {
        return Err(format!(
            "masquerade only of packets from interface {iface} is not supported"
        ));
    }
    let note = cond.out_iface.as_ref().map(|iface| {
        format!(
            "the rule masqueraded packets leaving through {iface}; the data plane masquerades \
             on its uplink only"
        )
    });
    Ok(Verdict::Masquerade(PlannedMasquerade {
        source,
        rule: rule.text.clone(),
        line: rule.line,
        note,
    }))
}

// ---------------------------------------------------------------------------------------------
// From visits to the plan.

/// What became of one rule over all the ways the walk reached it.
#[derive(Debug, Clone, Default)]
struct Fate {
    visited: bool,
    /// Something of it is in the plan.
    imported: bool,
    covered: Vec<String>,
    skipped: Vec<String>,
    unreachable: Vec<String>,
}

fn assemble(table: &NatTable, visits: Vec<Visit>) -> ImportPlan {
    let mut plan = ImportPlan::default();
    let mut fates = vec![Fate::default(); table.rules.len()];
    // Per planned port: whether a way from PREROUTING (packets from elsewhere) led to it.
    let mut from_outside: Vec<bool> = Vec::new();
    for Visit {
        rule,
        hook,
        verdict,
    } in visits
    {
        let fate = &mut fates[rule];
        fate.visited = true;
        match verdict {
            Verdict::Publish(ports) => {
                for port in ports {
                    add_publish(&mut plan, &mut from_outside, port, hook, fate);
                }
            }
            Verdict::Masquerade(masquerade) => add_masquerade(&mut plan, masquerade, fate),
            Verdict::Covered(why) => fate.covered.push(why),
            Verdict::Skipped(why) => fate.skipped.push(why),
            Verdict::Unreachable(why) => fate.unreachable.push(why),
        }
    }
    for (port, outside) in plan.publish.iter_mut().zip(from_outside) {
        if !outside {
            add_note(
                &mut port.note,
                "reached only from OUTPUT (connections the host makes itself); the data plane \
                 publishes the port to every client"
                    .to_string(),
            );
        }
    }
    for (rule, fate) in table.rules.iter().zip(fates) {
        let entry = |reason: String| SkippedRule {
            line: rule.line,
            rule: rule.text.clone(),
            reason,
        };
        if fate.imported {
            if !fate.skipped.is_empty() {
                let note = format!(
                    "part of this rule was not imported: {}",
                    distinct(&fate.skipped)
                );
                for port in plan.publish.iter_mut().filter(|p| p.line == rule.line) {
                    add_note(&mut port.note, note.clone());
                }
                for masquerade in plan.masquerade.iter_mut().filter(|m| m.line == rule.line) {
                    add_note(&mut masquerade.note, note.clone());
                }
            }
        } else if !fate.covered.is_empty() {
            plan.covered.push(entry(distinct(&fate.covered)));
        } else if !fate.skipped.is_empty() {
            plan.skipped.push(entry(distinct(&fate.skipped)));
        } else if !fate.unreachable.is_empty() {
            plan.skipped.push(entry(format!(
                "never applies: {}",
                distinct(&fate.unreachable)
            )));
        } else if !fate.visited && matches!(rule.target, Target::Effect(_)) {
            // Jumps and RETURNs only steer; a rule that does something and is never reached
            // is listed.
            plan.skipped.push(entry(if rule.chain == "INPUT" {
                "the nat INPUT chain (source NAT of packets to the host itself) is not supported"
                    .to_string()
            } else {
                format!(
                    "chain {} is not reached from PREROUTING, OUTPUT or POSTROUTING",
                    rule.chain
                )
            }));
        }
    }
    plan
}

/// Adds a published port, or folds it into an equal one already planned (the same rule along
/// another way, or another rule for the same port: its sources join the allow list).
fn add_publish(
    plan: &mut ImportPlan,
    from_outside: &mut Vec<bool>,
    port: PlannedPublish,
    hook: Hook,
    fate: &mut Fate,
) {
    let outside = hook == Hook::Prerouting;
    if let Some(i) = plan.publish.iter().position(|p| same_mapping(p, &port)) {
        from_outside[i] |= outside;
        let earlier = &mut plan.publish[i];
        let widened = merge_allow(&mut earlier.allow, &port.allow);
        if earlier.line == port.line {
            fate.imported = true;
        } else {
            let sources = if widened {
                " (its sources are added to that port's allow list)"
            } else {
                ""
            };
            fate.covered.push(format!(
                "line {} already publishes this port{sources}",
                earlier.line
            ));
        }
    } else if let Some(earlier) = plan.publish.iter().find(|p| host_sides_overlap(p, &port)) {
        fate.skipped.push(format!(
            "line {} already publishes {} to {}:{}; iptables uses the first rule that matches",
            earlier.line,
            host_side(earlier),
            earlier.to,
            dashed(earlier.ports)
        ));
    } else {
        plan.publish.push(port);
        from_outside.push(outside);
        fate.imported = true;
    }
}

fn add_masquerade(plan: &mut ImportPlan, masquerade: PlannedMasquerade, fate: &mut Fate) {
    match plan
        .masquerade
        .iter()
        .find(|m| m.source == masquerade.source)
    {
        Some(earlier) if earlier.line == masquerade.line => fate.imported = true,
        Some(earlier) => fate.covered.push(format!(
            "line {} already masquerades {}",
            earlier.line, earlier.source
        )),
        None => {
            plan.masquerade.push(masquerade);
            fate.imported = true;
        }
    }
}

fn same_mapping(a: &PlannedPublish, b: &PlannedPublish) -> bool {
    (a.host_ip, a.host_ports, a.proto, a.to, a.ports)
        == (b.host_ip, b.host_ports, b.proto, b.to, b.ports)
}

/// Whether two ports take some of the same packets: same protocol, overlapping port ranges,
/// and addresses that overlap (`None`, every address, overlaps any).
fn host_sides_overlap(a: &PlannedPublish, b: &PlannedPublish) -> bool {
    a.proto == b.proto
        && a.host_ports.0 <= b.host_ports.1
        && b.host_ports.0 <= a.host_ports.1
        && match (a.host_ip, b.host_ip) {
            (Some(x), Some(y)) => x == y,
            _ => true,
        }
}

/// `[ADDR:]PORT[-END]/PROTO`, as `--publish` writes the host side.
fn host_side(port: &PlannedPublish) -> String {
    let address = port.host_ip.map(|ip| format!("{ip}:")).unwrap_or_default();
    format!("{address}{}/{}", dashed(port.host_ports), port.proto.name())
}

/// A port range as `--publish` writes it: `80` or `8000-8010`.
fn dashed((first, last): (u16, u16)) -> String {
    if first == last {
        first.to_string()
    } else {
        format!("{first}-{last}")
    }
}

/// Adds sources to an allow list; an empty list (anyone) stays empty and an empty `more` empties
/// it. Returns whether the list changed.
fn merge_allow(allow: &mut Vec<Ipv4Network>, more: &[Ipv4Network]) -> bool {
    if allow.is_empty() {
        return false;
    }
    if more.is_empty() {
        allow.clear();
        return true;
    }
    let before = allow.len();
    for net in more {
        if !allow.contains(net) {
            allow.push(*net);
        }
    }
    allow.len() != before
}

fn add_note(note: &mut Option<String>, more: String) {
    *note = Some(match note.take() {
        Some(earlier) => format!("{earlier}; {more}"),
        None => more,
    });
}

/// The reasons, each once, in the order first given.
fn distinct(reasons: &[String]) -> String {
    let mut seen: Vec<&str> = Vec::new();
    for reason in reasons {
        if !seen.contains(&reason.as_str()) {
            seen.push(reason.as_str());
        }
    }
    seen.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `iptables-save` of a Docker host: `docker run -p 8080:80 nginx` on the default bridge and
    /// `docker run -p 127.0.0.1:5432:5432 postgres` on a user-defined network. The filter table
    /// is there to be read past.
    const DOCKER: &str = r#"# Generated by iptables-save v1.8.7 on Tue Mar 12 10:14:03 2024
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-ISOLATION-STAGE-2 - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o br-3f2a9c1d7e4b -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o br-3f2a9c1d7e4b -j DOCKER
-A FORWARD -i br-3f2a9c1d7e4b ! -o br-3f2a9c1d7e4b -j ACCEPT
-A FORWARD -i br-3f2a9c1d7e4b -o br-3f2a9c1d7e4b -j ACCEPT
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o docker0 -j DOCKER
-A FORWARD -i docker0 ! -o docker0 -j ACCEPT
-A FORWARD -i docker0 -o docker0 -j ACCEPT
-A DOCKER -d 172.17.0.2/32 ! -i docker0 -o docker0 -p tcp -m tcp --dport 80 -j ACCEPT
-A DOCKER -d 172.18.0.2/32 ! -i br-3f2a9c1d7e4b -o br-3f2a9c1d7e4b -p tcp -m tcp --dport 5432 -j ACCEPT
-A DOCKER-ISOLATION-STAGE-1 -i br-3f2a9c1d7e4b ! -o br-3f2a9c1d7e4b -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-1 -i docker0 ! -o docker0 -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-ISOLATION-STAGE-2 -o br-3f2a9c1d7e4b -j DROP
-A DOCKER-ISOLATION-STAGE-2 -o docker0 -j DROP
-A DOCKER-ISOLATION-STAGE-2 -j RETURN
-A DOCKER-USER -j RETURN
COMMIT
# Completed on Tue Mar 12 10:14:03 2024
# Generated by iptables-save v1.8.7 on Tue Mar 12 10:14:03 2024
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 172.18.0.0/16 ! -o br-3f2a9c1d7e4b -j MASQUERADE
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A POSTROUTING -s 172.17.0.2/32 -d 172.17.0.2/32 -p tcp -m tcp --dport 80 -j MASQUERADE
-A POSTROUTING -s 172.18.0.2/32 -d 172.18.0.2/32 -p tcp -m tcp --dport 5432 -j MASQUERADE
-A DOCKER -i br-3f2a9c1d7e4b -j RETURN
-A DOCKER -i docker0 -j RETURN
-A DOCKER ! -i docker0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.2:80
-A DOCKER -d 127.0.0.1/32 ! -i br-3f2a9c1d7e4b -p tcp -m tcp --dport 5432 -j DNAT --to-destination 172.18.0.2:5432
COMMIT
# Completed on Tue Mar 12 10:14:03 2024
"#;

    /// `iptables-save -t nat` of a kube-proxy (iptables mode) node: the `kubernetes` service
    /// (one endpoint), `default/web` as a NodePort (one endpoint) and kube-dns (two endpoints).
    const KUBE_PROXY: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables) on Mon Jun  3 09:12:44 2024
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-EXT-QKLXW6UJ3PTTMZ3T - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-SEP-2ZR6DVYKD4B6XQ5N - [0:0]
:KUBE-SEP-IT2ZTR26TO4XFPTO - [0:0]
:KUBE-SEP-N4G2XR5TDX7PQE7P - [0:0]
:KUBE-SEP-YIL6JZP7A3QYXJU2 - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-NPX46M4PTMTKRN6Y - [0:0]
:KUBE-SVC-QKLXW6UJ3PTTMZ3T - [0:0]
:KUBE-SVC-TCOU7JCQXEZGVUNU - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-EXT-QKLXW6UJ3PTTMZ3T -m comment --comment "masquerade traffic for default/web external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-QKLXW6UJ3PTTMZ3T -j KUBE-SVC-QKLXW6UJ3PTTMZ3T
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-NODEPORTS -p tcp -m comment --comment "default/web" -m tcp --dport 30080 -j KUBE-EXT-QKLXW6UJ3PTTMZ3T
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-SEP-2ZR6DVYKD4B6XQ5N -s 10.244.0.3/32 -m comment --comment "kube-system/kube-dns:dns" -j KUBE-MARK-MASQ
-A KUBE-SEP-2ZR6DVYKD4B6XQ5N -p udp -m comment --comment "kube-system/kube-dns:dns" -m udp -j DNAT --to-destination 10.244.0.3:53
-A KUBE-SEP-IT2ZTR26TO4XFPTO -s 10.244.0.2/32 -m comment --comment "kube-system/kube-dns:dns" -j KUBE-MARK-MASQ
-A KUBE-SEP-IT2ZTR26TO4XFPTO -p udp -m comment --comment "kube-system/kube-dns:dns" -m udp -j DNAT --to-destination 10.244.0.2:53
-A KUBE-SEP-N4G2XR5TDX7PQE7P -s 10.244.1.5/32 -m comment --comment "default/web" -j KUBE-MARK-MASQ
-A KUBE-SEP-N4G2XR5TDX7PQE7P -p tcp -m comment --comment "default/web" -m tcp -j DNAT --to-destination 10.244.1.5:8080
-A KUBE-SEP-YIL6JZP7A3QYXJU2 -s 192.168.49.2/32 -m comment --comment "default/kubernetes:https" -j KUBE-MARK-MASQ
-A KUBE-SEP-YIL6JZP7A3QYXJU2 -p tcp -m comment --comment "default/kubernetes:https" -m tcp -j DNAT --to-destination 192.168.49.2:8443
-A KUBE-SERVICES -d 10.96.0.10/32 -p udp -m comment --comment "kube-system/kube-dns:dns cluster IP" -m udp --dport 53 -j KUBE-SVC-TCOU7JCQXEZGVUNU
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment "default/kubernetes:https cluster IP" -m tcp --dport 443 -j KUBE-SVC-NPX46M4PTMTKRN6Y
-A KUBE-SERVICES -d 10.96.45.12/32 -p tcp -m comment --comment "default/web cluster IP" -m tcp --dport 80 -j KUBE-SVC-QKLXW6UJ3PTTMZ3T
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-SVC-NPX46M4PTMTKRN6Y ! -s 10.244.0.0/16 -d 10.96.0.1/32 -p tcp -m comment --comment "default/kubernetes:https cluster IP" -m tcp --dport 443 -j KUBE-MARK-MASQ
-A KUBE-SVC-NPX46M4PTMTKRN6Y -m comment --comment "default/kubernetes:https -> 192.168.49.2:8443" -j KUBE-SEP-YIL6JZP7A3QYXJU2
-A KUBE-SVC-QKLXW6UJ3PTTMZ3T ! -s 10.244.0.0/16 -d 10.96.45.12/32 -p tcp -m comment --comment "default/web cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-QKLXW6UJ3PTTMZ3T -m comment --comment "default/web -> 10.244.1.5:8080" -j KUBE-SEP-N4G2XR5TDX7PQE7P
-A KUBE-SVC-TCOU7JCQXEZGVUNU ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p udp -m comment --comment "kube-system/kube-dns:dns cluster IP" -m udp --dport 53 -j KUBE-MARK-MASQ
-A KUBE-SVC-TCOU7JCQXEZGVUNU -m comment --comment "kube-system/kube-dns:dns -> 10.244.0.2:53" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-IT2ZTR26TO4XFPTO
-A KUBE-SVC-TCOU7JCQXEZGVUNU -m comment --comment "kube-system/kube-dns:dns -> 10.244.0.3:53" -j KUBE-SEP-2ZR6DVYKD4B6XQ5N
COMMIT
# Completed on Mon Jun  3 09:12:44 2024
"#;

    /// Hand-written: one rule per reason a rule is not imported.
    const UNSUPPORTED: &str = r#"*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER-INGRESS - [0:0]
:EDGE - [0:0]
:ORPHAN - [0:0]
-A PREROUTING -i eth1 -p tcp -m tcp --dport 2222 -j DNAT --to-destination 10.0.0.2:22
-A PREROUTING -p tcp -j DNAT --to-destination 10.0.0.2
-A PREROUTING -d 192.0.2.10/32 -j DNAT --to-destination 10.0.0.2
-A PREROUTING -p udp -m udp --dport 5000 -j DNAT --to-destination 10.0.0.2-10.0.0.4
-A PREROUTING -p tcp -m tcp --dport 8000:8010 -j DNAT --to-destination 10.0.0.2:80
-A PREROUTING -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 8080
-A PREROUTING -p tcp -m conntrack --ctstate NEW -m tcp --dport 443 -j DNAT --to-destination 10.0.0.3:443
-A PREROUTING -p tcp -m tcp --sport 1024 --dport 8443 -j DNAT --to-destination 10.0.0.3:443
-A PREROUTING -j LOG --log-prefix "-nat- "
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER-INGRESS
-A PREROUTING -m addrtype --dst-type LOCAL -j EDGE
-A INPUT -s 10.0.0.0/24 -j SNAT --to-source 10.0.0.1
-A POSTROUTING -s 10.0.0.0/24 -j SNAT --to-source 203.0.113.7
-A POSTROUTING -s 10.1.0.0/24 -o eth0 -j MASQUERADE
-A POSTROUTING -s 10.2.0.0/24 -j ACCEPT
-A POSTROUTING -s 10.3.0.0/24 -m mark --mark 0x1 -j MASQUERADE
-A POSTROUTING -s 10.4.0.0/24 -d 10.5.0.0/16 -j MASQUERADE
-A POSTROUTING -j MASQUERADE
-A DOCKER-INGRESS -j RETURN
-A DOCKER-INGRESS -p tcp -m tcp --dport 7946 -j DNAT --to-destination 172.19.0.2:7946
-A EDGE -s 198.51.100.0/24 -j RETURN
-A EDGE -p tcp -m tcp --dport 9443 -j DNAT --to-destination 10.0.0.5:443
-A ORPHAN -p tcp -m tcp --dport 9000 -j DNAT --to-destination 10.0.0.9:9000
COMMIT
"#;

    /// The 1-based number of the one line of `text` that contains `needle`.
    fn line_of(text: &str, needle: &str) -> usize {
        let lines: Vec<usize> = text
            .lines()
            .enumerate()
            .filter(|(_, line)| line.contains(needle))
            .map(|(index, _)| index + 1)
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "{needle:?} should be on one line: {lines:?}"
        );
        lines[0]
    }

    fn parse(text: &str, host_ip: Option<Ipv4Addr>) -> ImportPlan {
        parse_iptables_save(text, host_ip).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    /// A published port as `[HOST:]PORT/PROTO -> TO:PORT [from CIDR,...]`, for comparing plans.
    fn summary(port: &PlannedPublish) -> String {
        let from = if port.allow.is_empty() {
            String::new()
        } else {
            let allow: Vec<String> = port.allow.iter().map(|net| net.to_string()).collect();
            format!(" from {}", allow.join(","))
        };
        format!(
            "{} -> {}:{}{from}",
            host_side(port),
            port.to,
            dashed(port.ports)
        )
    }

    fn summaries(plan: &ImportPlan) -> Vec<String> {
        plan.publish.iter().map(summary).collect()
    }

    fn sources(plan: &ImportPlan) -> Vec<String> {
        plan.masquerade
            .iter()
            .map(|m| m.source.to_string())
            .collect()
    }

    /// Asserts that the rule on the line containing `needle` is in `list` with a reason that
    /// contains `reason`.
    fn assert_listed(list: &[SkippedRule], text: &str, needle: &str, reason: &str) {
        let line = line_of(text, needle);
        let entry = list
            .iter()
            .find(|entry| entry.line == line)
            .unwrap_or_else(|| panic!("line {line} ({needle}) is not listed in {list:#?}"));
        assert!(
            entry.reason.contains(reason),
            "line {line} ({needle}): expected a reason with {reason:?}, got {:?}",
            entry.reason
        );
    }

    #[test]
    fn docker_published_ports_become_plans() {
        let plan = parse(DOCKER, None);
        assert_eq!(
            summaries(&plan),
            [
                "8080/tcp -> 172.17.0.2:80",
                "127.0.0.1:5432/tcp -> 172.18.0.2:5432"
            ]
        );
        assert_eq!(
            plan.publish[1].line,
            line_of(DOCKER, "--dport 5432 -j DNAT")
        );
        assert!(
            plan.publish[1]
                .rule
                .starts_with("-A DOCKER -d 127.0.0.1/32")
        );
        assert_eq!(sources(&plan), ["172.18.0.0/16", "172.17.0.0/16"]);
        // Docker's own forms (`! -o BRIDGE`, host addresses by addrtype) need no notes.
        assert!(plan.publish.iter().all(|p| p.note.is_none()), "{plan:#?}");
        assert!(
            plan.masquerade.iter().all(|m| m.note.is_none()),
            "{plan:#?}"
        );
        assert_listed(&plan.covered, DOCKER, "-d 172.17.0.2/32 -p tcp", "hairpin");
        assert_listed(&plan.covered, DOCKER, "-d 172.18.0.2/32 -p tcp", "hairpin");
        assert_eq!(plan.covered.len(), 2, "{:#?}", plan.covered);
        assert_eq!(plan.skipped, [], "the bridge RETURNs are folded away");
    }

    #[test]
    fn iptables_save_counters_are_read_past() {
        let with_counters: String = DOCKER
            .lines()
            .map(|line| match line.strip_prefix("-A ") {
                Some(rest) => format!("[12:720] -A {rest}\n"),
                None => format!("{line}\n"),
            })
            .collect();
        let plain = parse(DOCKER, None);
        let counted = parse(&with_counters, None);
        assert_eq!(summaries(&counted), summaries(&plain));
        assert_eq!(sources(&counted), sources(&plain));
        assert_eq!(counted.covered.len(), plain.covered.len());
        assert!(counted.publish[0].rule.starts_with("[12:720] -A DOCKER"));
    }

    #[test]
    fn kube_proxy_services_with_one_endpoint_are_published() {
        let plan = parse(KUBE_PROXY, None);
        assert_eq!(
            summaries(&plan),
            [
                "10.96.0.1:443/tcp -> 192.168.49.2:8443",
                "10.96.45.12:80/tcp -> 10.244.1.5:8080",
                "30080/tcp -> 10.244.1.5:8080",
            ]
        );
        // A NodePort is on the host's own addresses; a ClusterIP is not, and the plan says so.
        let [kubernetes, web_cluster_ip, web_node_port] = &plan.publish[..] else {
            panic!("{plan:#?}");
        };
        assert_eq!(web_node_port.note, None);
        for cluster_ip in [kubernetes, web_cluster_ip] {
            let note = cluster_ip.note.as_deref().unwrap_or_default();
            assert!(
                note.contains("may not be an address of this host"),
                "{note}"
            );
        }
        assert_eq!(
            web_node_port.line,
            line_of(KUBE_PROXY, "--to-destination 10.244.1.5:8080")
        );
    }

    #[test]
    fn kube_proxy_load_balancing_and_marks_are_skipped_with_reasons() {
        let plan = parse(KUBE_PROXY, None);
        let return_line = line_of(KUBE_PROXY, "! --mark 0x4000/0x4000 -j RETURN");
        let after_return = format!("conditional RETURN on line {return_line}");
        let expected = [
            (
                "--to-destination 10.244.0.2:53",
                "load balancing over 2 endpoints",
            ),
            (
                "--to-destination 10.244.0.3:53",
                "load balancing over 2 endpoints",
            ),
            ("-A KUBE-MARK-MASQ -j MARK", "packet marks"),
            ("-A KUBE-POSTROUTING -j MARK", "packet marks"),
            ("-j MASQUERADE --random-fully", &after_return),
        ];
        for (needle, reason) in expected {
            assert_listed(&plan.skipped, KUBE_PROXY, needle, reason);
        }
        assert_listed(
            &plan.skipped,
            KUBE_PROXY,
            "-j MASQUERADE --random-fully",
            "-m mark is not supported",
        );
        assert_eq!(plan.skipped.len(), expected.len(), "{:#?}", plan.skipped);
        assert_eq!(plan.masquerade, []);
        assert_eq!(plan.covered, []);
    }

    #[test]
    fn every_unsupported_rule_is_skipped_with_its_reason() {
        let plan = parse(UNSUPPORTED, None);
        let edge_return = line_of(UNSUPPORTED, "-A EDGE -s 198.51.100.0/24 -j RETURN");
        let ingress_return = line_of(UNSUPPORTED, "-A DOCKER-INGRESS -j RETURN");
        let expected = [
            ("-i eth1", "DNAT only for packets from interface eth1"),
            ("-A PREROUTING -p tcp -j DNAT", "DNAT without --dport"),
            ("-d 192.0.2.10/32", "DNAT without -p tcp or -p udp"),
            ("10.0.0.2-10.0.0.4", "a range of addresses (load balancing)"),
            (
                "--dport 8000:8010",
                "sends host ports 8000-8010 all to port 80",
            ),
            ("-j REDIRECT", "-j REDIRECT"),
            ("-m conntrack", "-m conntrack is not supported"),
            ("--sport 1024", "--sport 1024 is not supported"),
            ("-j LOG", "-j LOG (logging from the nat table)"),
            ("-A INPUT", "the nat INPUT chain"),
            (
                "--to-source 203.0.113.7",
                "SNAT to a fixed address (203.0.113.7): only masquerade to the uplink address \
                 is supported; use MASQUERADE",
            ),
            ("-j ACCEPT", "-j ACCEPT in the nat table"),
            ("-m mark --mark 0x1", "-m mark is not supported"),
            ("-d 10.5.0.0/16", "masquerade only towards 10.5.0.0/16"),
            (
                "-A POSTROUTING -j MASQUERADE",
                "masquerade of every source is not per network",
            ),
            (
                "--dport 7946",
                &format!(
                    "never applies: it follows the unconditional RETURN on line {ingress_return}"
                ),
            ),
            (
                "--dport 9443",
                &format!("it follows the conditional RETURN on line {edge_return}"),
            ),
            (
                "--dport 9000",
                "chain ORPHAN is not reached from PREROUTING",
            ),
        ];
        for (needle, reason) in expected {
            assert_listed(&plan.skipped, UNSUPPORTED, needle, reason);
        }
        assert_eq!(plan.skipped.len(), expected.len(), "{:#?}", plan.skipped);
        // The one rule that does import: masquerade with a positive -o, noted.
        assert_eq!(sources(&plan), ["10.1.0.0/24"]);
        let note = plan.masquerade[0].note.as_deref().unwrap_or_default();
        assert!(note.contains("leaving through eth0"), "{note}");
        assert!(note.contains("uplink only"), "{note}");
        assert_eq!(plan.publish, []);
    }

    #[test]
    fn snat_to_the_host_address_is_masquerade() {
        let text = "*nat\n\
                    -A POSTROUTING -s 10.0.0.0/24 -j SNAT --to-source 203.0.113.7 --random-fully\n\
                    COMMIT\n";
        let uplink = Ipv4Addr::new(203, 0, 113, 7);
        let plan = parse(text, Some(uplink));
        assert_eq!(sources(&plan), ["10.0.0.0/24"]);
        assert_eq!(plan.skipped, []);
        let elsewhere = parse(text, Some(Ipv4Addr::new(203, 0, 113, 8)));
        assert_eq!(elsewhere.masquerade, []);
        assert_listed(&elsewhere.skipped, text, "SNAT", "SNAT to a fixed address");
    }

    #[test]
    fn multiport_and_port_ranges_publish_port_to_port() {
        let text = "\
*nat
:PREROUTING ACCEPT [0:0]
-A PREROUTING -p tcp -m addrtype --dst-type LOCAL -m multiport --dports 80,443 -j DNAT --to-destination 10.0.0.2
-A PREROUTING -s 192.0.2.0/24 -p udp -m addrtype --dst-type LOCAL -m udp --dport 6000:6010 -j DNAT --to-destination 10.0.0.3:7000-7010/6000
-A PREROUTING -p udp -m addrtype --dst-type LOCAL -m udp --dport 5000:5010 -j DNAT --to-destination 10.0.0.3:5000-5010
-A PREROUTING -p tcp -m addrtype --dst-type LOCAL -m tcp --dport 3000:3010 -j DNAT --to-destination 10.0.0.4:4000-4010
COMMIT
";
        let plan = parse(text, None);
        assert_eq!(
            summaries(&plan),
            [
                "80/tcp -> 10.0.0.2:80",
                "443/tcp -> 10.0.0.2:443",
                "6000-6010/udp -> 10.0.0.3:7000-7010 from 192.0.2.0/24",
                "5000-5010/udp -> 10.0.0.3:5000-5010",
            ]
        );
        // Without a base port iptables picks any free port of 4000-4010 per connection.
        assert_listed(
            &plan.skipped,
            text,
            "--dport 3000:3010",
            "spreads host ports 3000-3010 over ports 4000-4010",
        );
        assert_eq!(plan.skipped.len(), 1, "{:#?}", plan.skipped);
    }

    #[test]
    fn duplicates_are_planned_once() {
        let text = r#"*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 172.17.0.0/16 -j MASQUERADE
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A DOCKER -s 10.0.0.0/8 -p tcp -m comment --comment "first" -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.2:80
-A DOCKER -s 192.0.2.0/24 -p tcp -m comment --comment "again" -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.2:80
-A DOCKER -p tcp -m comment --comment "elsewhere" -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.9:80
COMMIT
"#;
        let plan = parse(text, None);
        // Reached from both PREROUTING and OUTPUT, planned once; the second rule's sources
        // join the first's.
        assert_eq!(
            summaries(&plan),
            ["8080/tcp -> 172.17.0.2:80 from 10.0.0.0/8,192.0.2.0/24"]
        );
        assert_eq!(sources(&plan), ["172.17.0.0/16"]);
        let first = line_of(text, "\"first\"");
        let masquerade = line_of(text, "-s 172.17.0.0/16 -j MASQUERADE");
        assert_listed(
            &plan.covered,
            text,
            "\"again\"",
            &format!("line {first} already publishes this port (its sources are added"),
        );
        assert_listed(
            &plan.covered,
            text,
            "! -o docker0",
            &format!("line {masquerade} already masquerades 172.17.0.0/16"),
        );
        assert_listed(
            &plan.skipped,
            text,
            "\"elsewhere\"",
            &format!("line {first} already publishes 8080/tcp to 172.17.0.2:80"),
        );
    }

    #[test]
    fn notes_say_where_a_port_differs_from_its_rule() {
        let text = "\
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A PREROUTING -p tcp -m tcp --dport 81 -j DNAT --to-destination 10.0.0.2:81
-A OUTPUT -d 203.0.113.7/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.0.2:8080
COMMIT
";
        let plan = parse(text, Some(Ipv4Addr::new(203, 0, 113, 7)));
        let notes: Vec<&str> = plan
            .publish
            .iter()
            .map(|p| p.note.as_deref().unwrap_or_default())
            .collect();
        let [every_destination, own_connections] = notes[..] else {
            panic!("{plan:#?}");
        };
        assert!(every_destination.contains("every destination, forwarded ones too"));
        assert!(own_connections.starts_with("reached only from OUTPUT"));
    }

    #[test]
    fn malformed_input_is_refused_naming_the_line() {
        for (input, line, needle) in [
            ("hello world\n", 1, "outside any table"),
            (
                "# iptables rules\n-A PREROUTING -j ACCEPT\n",
                2,
                "outside any table",
            ),
            (
                "*nat\n:PREROUTING ACCEPT [0:0\nCOMMIT\n",
                2,
                "not a chain declaration",
            ),
            ("*nat\n:PREROUTING\nCOMMIT\n", 2, "not a chain declaration"),
            (
                "*nat\n-A PREROUTING -m comment --comment \"open -j ACCEPT\nCOMMIT\n",
                2,
                "unterminated quote",
            ),
            (
                "*nat\n:PREROUTING ACCEPT [0:0]\n",
                1,
                "not closed with COMMIT",
            ),
            (
                "*filter\n:INPUT ACCEPT [0:0]\n*nat\nCOMMIT\n",
                3,
                "before table filter",
            ),
            ("COMMIT\n", 1, "COMMIT outside any table"),
            (
                "*nat\n-A NOWHERE -j RETURN\nCOMMIT\n",
                2,
                "chain NOWHERE is not declared",
            ),
            (
                "*nat\n-I PREROUTING -j RETURN\nCOMMIT\n",
                2,
                "expected a rule",
            ),
            (
                "*nat\n[1:2 -A PREROUTING -j RETURN\nCOMMIT\n",
                2,
                "is not [PACKETS:BYTES]",
            ),
            (
                "*nat\n-A POSTROUTING -s fd00::/64 -j MASQUERADE\nCOMMIT\n",
                2,
                "not an IPv4 address",
            ),
            (
                "*nat\n-A PREROUTING -p tcp --dport http -j RETURN\nCOMMIT\n",
                2,
                "not a port number",
            ),
            (
                "*nat\n-A PREROUTING -p tcp --dport 80 -j DNAT --to-destination web:80\nCOMMIT\n",
                2,
                "\"web\" is not an IPv4 address",
            ),
            ("*nat\n-A PREROUTING -s\nCOMMIT\n", 2, "-s needs a value"),
        ] {
            let error = parse_iptables_save(input, None).expect_err(input);
            assert_eq!(error.line, line, "{input:?}: {error}");
            assert!(error.to_string().contains(needle), "{input:?}: {error}");
        }
    }

    #[test]
    fn input_without_a_nat_table_plans_nothing() {
        let filter_only = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -i lo -j ACCEPT\nCOMMIT\n";
        assert_eq!(parse(filter_only, None), ImportPlan::default());
        assert_eq!(parse("", None), ImportPlan::default());
    }

    #[test]
    fn quoted_words_are_split_as_iptables_restore_does() {
        let words = split_words(
            r#"-A X -m comment --comment "kube-system/kube-dns:dns cluster IP" --comment "say \"hi\" \\o/" --comment """#,
        )
        .unwrap();
        assert_eq!(
            words,
            [
                "-A",
                "X",
                "-m",
                "comment",
                "--comment",
                "kube-system/kube-dns:dns cluster IP",
                "--comment",
                r#"say "hi" \o/"#,
                "--comment",
                "",
            ]
        );
    }

    fn published(
        host_ip: Option<[u8; 4]>,
        host_port: u16,
        proto: Proto,
        to: [u8; 4],
        port: u16,
        allow: &[&str],
    ) -> PublishedPort {
        PublishedPort {
            endpoint: "e".to_string(),
            host_ip: host_ip.map(Ipv4Addr::from),
            host_port,
            proto,
            ip: Ipv4Addr::from(to),
            port,
            allow: allow.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn export_reads_back_as_the_same_plan() {
        let ports = [
            published(None, 8080, Proto::Tcp, [172, 17, 0, 2], 80, &[]),
            published(
                Some([127, 0, 0, 1]),
                5432,
                Proto::Tcp,
                [172, 18, 0, 2],
                5432,
                &["10.0.0.0/8", "192.0.2.7/32"],
            ),
            published(
                Some([203, 0, 113, 7]),
                53,
                Proto::Udp,
                [172, 17, 0, 3],
                53,
                &[],
            ),
        ];
        let networks: [Ipv4Network; 2] = [
            "172.17.0.0/16".parse().unwrap(),
            "172.18.0.0/16".parse().unwrap(),
        ];
        let text = render_iptables_save(&ports, &networks, "net-agent 0.1.0");
        let plan = parse(&text, None);
        assert_eq!(
            summaries(&plan),
            [
                "8080/tcp -> 172.17.0.2:80",
                "127.0.0.1:5432/tcp -> 172.18.0.2:5432 from 10.0.0.0/8,192.0.2.7/32",
                "203.0.113.7:53/udp -> 172.17.0.3:53",
            ],
            "{text}"
        );
        assert_eq!(sources(&plan), ["172.17.0.0/16", "172.18.0.0/16"]);
        assert!(plan.publish.iter().all(|p| p.note.is_none()), "{plan:#?}");
        assert!(
            plan.masquerade.iter().all(|m| m.note.is_none()),
            "{plan:#?}"
        );
        assert_eq!(plan.skipped, [], "{text}");
        // The second allowed source's rule adds to the first's, which the plan shows.
        assert_listed(
            &plan.covered,
            &text,
            "-s 192.0.2.7/32",
            "already publishes this port",
        );
        assert_eq!(plan.covered.len(), 1, "{:#?}", plan.covered);
    }

    #[test]
    fn export_has_dockers_shape() {
        let ports = [published(
            Some([127, 0, 0, 1]),
            5432,
            Proto::Tcp,
            [172, 18, 0, 2],
            5432,
            &["10.0.0.0/8", "192.0.2.7"],
        )];
        let text = render_iptables_save(
            &ports,
            &["172.18.0.0/16".parse().unwrap()],
            "net-agent 0.1.0",
        );
        assert_eq!(
            text,
            "\
# Generated by net-agent 0.1.0
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:NET-AGENT - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j NET-AGENT
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j NET-AGENT
-A POSTROUTING -s 172.18.0.0/16 -j MASQUERADE
-A NET-AGENT -s 10.0.0.0/8 -d 127.0.0.1/32 -p tcp -m tcp --dport 5432 -j DNAT --to-destination 172.18.0.2:5432
-A NET-AGENT -s 192.0.2.7/32 -d 127.0.0.1/32 -p tcp -m tcp --dport 5432 -j DNAT --to-destination 172.18.0.2:5432
COMMIT
# Completed
"
        );
        // A line break in the name cannot smuggle a rule in.
        let text = render_iptables_save(&[], &[], "x\n-A PREROUTING -j ACCEPT");
        assert_eq!(
            text.lines().next(),
            Some("# Generated by x -A PREROUTING -j ACCEPT")
        );
        assert_eq!(parse(&text, None), ImportPlan::default());
    }
}
