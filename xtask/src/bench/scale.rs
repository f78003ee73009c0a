//! NAT scale: what 1 to 100,000 published ports cost, ours against the kernel's NAT.
//!
//! - Per packet, ours: the DNAT paths of `tc_from_netdev` through `BPF_PROG_TEST_RUN` with N
//!   entries in `PUBLISHED` ([`super::programs`]).
//! - Per new connection, by real packets: connections/s from the outside namespace to the last
//!   of N mappings, through iptables (N DNAT rules in Docker's chain, walked one by one),
//!   nftables (one map of N elements) and ours (N entries in the agent's pinned map), measured
//!   in the same rounds as the other end-to-end rows, mapping counts interleaved.
//! - Adding and removing one mapping with N installed: `iptables -t nat -A/-D`,
//!   `nft add/delete element`, `netctl port publish/unpublish` (each a process and, for ours,
//!   a round trip through the agent, which records the port in its store), the same request
//!   to the agent's socket without the process, and the map update itself; and installing all
//!   N at once.
//!
//! For the update rows the agent holds all N as a user's ports: published through it (one
//! request per 50,000, host port ranges), so its store, map and reserved ports have them all.
//! For the connection-rate rows, which switch N every measurement, the fillers go into the map
//! directly: what they measure is the data plane's lookup. The kernel's come in one
//! `iptables-restore` or `nft -f`.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{HashMap, Map, MapData};
use net_ebpf_common::{PublishKey, PublishTarget, map_names};

use super::{
    lab::{
        Firewall, Lab,
        nat::{NFT_MAP, NFT_TABLE, NatSetup, PORT},
    },
    report::{Backend, ScaleQuantity, ScaleSample, Spread},
    rotation, sys,
    traffic::{self, Cpus, Wait},
};
use crate::exec::display;

/// The most mappings a scale row can have: `PUBLISHED`'s room, less a few for the bench's own
/// ports.
pub const MAX_MAPPINGS: u32 = net_ebpf_common::MAX_PUBLISHED - 16;

/// Host ports of the filler mappings per address, from [`FIRST_FILLER_PORT`]: clear of the
/// published port ([`PORT`]), of the probe's and of the masquerade range (61000 and up), so
/// that the agent takes them as it would a user's.
const FILLERS_PER_ADDRESS: u32 = 50_000;
const FIRST_FILLER_PORT: u32 = 10_000;

/// The host side of the `i`-th filler mapping: an address no packet is sent to
/// (198.19.250.0/24 and up, RFC 2544) and a port. 100,000 mappings need two addresses.
pub fn filler(i: u32) -> (Ipv4Addr, u16) {
    let address = 1 + i / FILLERS_PER_ADDRESS;
    let [_, _, high, low] = address.to_be_bytes();
    (
        Ipv4Addr::new(198, 19, 250 + high, low),
        (FIRST_FILLER_PORT + i % FILLERS_PER_ADDRESS) as u16,
    )
}

/// The first `n` fillers as ranges of host ports on one address each: what the agent is asked
/// to publish (one request per address).
fn filler_ranges(n: u32) -> Vec<(Ipv4Addr, u16, u16)> {
    (0..n)
        .step_by(FILLERS_PER_ADDRESS as usize)
        .map(|first| {
            let last = (first + FILLERS_PER_ADDRESS).min(n) - 1;
            let (address, first_port) = filler(first);
            (address, first_port, filler(last).1)
        })
        .collect()
}

/// The `i`-th filler mapping as a `PUBLISHED` entry to `to`:`port`.
pub fn filler_entry(i: u32, to: Ipv4Addr, port: u16) -> (PublishKey, PublishTarget) {
    let (addr, host_port) = filler(i);
    entry(addr, host_port, to, port, i + 1_000_000)
}

fn entry(
    addr: Ipv4Addr,
    host_port: u16,
    to: Ipv4Addr,
    port: u16,
    id: u32,
) -> (PublishKey, PublishTarget) {
    (
        PublishKey {
            addr: addr.octets(),
            port: host_port.to_be_bytes(),
            proto: 6,
            _pad: 0,
        },
        PublishTarget {
            addr: to.octets(),
            port: port.to_be_bytes(),
            flags: 0,
            _pad: 0,
            id,
        },
    )
}

/// The mapping added and removed with N installed: on no filler's address.
const PROBE: (Ipv4Addr, u16) = (Ipv4Addr::new(198, 19, 249, 1), 9000);

/// The first `installed` filler entries of a `PUBLISHED` map, all to one target.
pub struct Fillers {
    installed: u32,
    to: Ipv4Addr,
    port: u16,
}

impl Fillers {
    pub fn new(to: Ipv4Addr, port: u16) -> Self {
        Self {
            installed: 0,
            to,
            port,
        }
    }

    /// Adds or removes fillers until `n` are installed.
    pub fn set(
        &mut self,
        map: &mut HashMap<MapData, PublishKey, PublishTarget>,
        n: u32,
    ) -> Result<()> {
        while self.installed < n {
            let (key, target) = filler_entry(self.installed, self.to, self.port);
            map.insert(key, target, 0)
                .with_context(|| format!("adding filler {} to PUBLISHED", self.installed))?;
            self.installed += 1;
        }
        while self.installed > n {
            let (key, _) = filler_entry(self.installed - 1, self.to, self.port);
            map.remove(&key)
                .with_context(|| format!("removing filler {} from PUBLISHED", self.installed))?;
            self.installed -= 1;
        }
        Ok(())
    }
}

/// One back end with one mapping count, and the NAT setup that has them.
#[derive(Clone, Copy, Debug)]
pub struct Variant {
    pub backend: Backend,
    pub mappings: u32,
    /// Index into the bench's NAT setups.
    pub setup: usize,
}

/// The agent's pinned `PUBLISHED` map, with the fillers this bench put there.
pub struct AgentPublished {
    map: HashMap<MapData, PublishKey, PublishTarget>,
    fillers: Fillers,
}

impl AgentPublished {
    pub fn open(lab: &Lab, setup: &NatSetup) -> Result<Self> {
        let agent = setup
            .agent
            .context("the scale rows of ours need the NAT setup with the agent")?;
        let path = lab.agent_maps_dir(agent).join(map_names::PUBLISHED);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening the agent's pinned map {}", path.display()))?;
        let map = HashMap::try_from(Map::HashMap(data))
            .with_context(|| format!("{} is not the PUBLISHED hash map", path.display()))?;
        Ok(Self {
            map,
            fillers: Fillers::new(setup.web_ip, PORT),
        })
    }

    /// Makes the map hold `mappings` published ports: the agent's own one and fillers.
    pub fn hold(&mut self, mappings: u32) -> Result<()> {
        self.fillers.set(&mut self.map, mappings.saturating_sub(1))
    }
}

/// One round of the connection-rate rows: TCP_CRR from the outside to the last mapping of every
/// variant, in an order that rotates by round. Ours gets its N by filling the agent's map,
/// which is left holding the agent's own port only, as (b) has one DNAT rule, for the NAT rows
/// of the next round.
pub fn connection_rates(
    round: u32,
    setups: &[NatSetup],
    variants: &[Variant],
    agent_map: &mut Option<AgentPublished>,
    cpus: Cpus,
    duration: Duration,
) -> Result<Vec<ScaleSample>> {
    let mut samples = Vec::new();
    for index in rotation(round, variants.len()) {
        sys::check_interrupted()?;
        let variant = variants[index];
        if let (Backend::Ours, Some(map)) = (variant.backend, agent_map.as_mut()) {
            map.hold(variant.mappings)?;
        }
        let setup = &setups[variant.setup];
        let value = traffic::tcp_crr(setup.published(), cpus, duration, Wait::Block)
            .with_context(|| {
                format!(
                    "TCP_CRR to the last of {} mappings ({})",
                    variant.mappings,
                    variant.backend.name()
                )
            })?
            .per_second;
        println!(
            "round {} scale {:<8} n={:<6} {value:>12.2} connections/s",
            round + 1,
            variant.backend.name(),
            variant.mappings
        );
        samples.push(ScaleSample {
            quantity: ScaleQuantity::Crr,
            backend: variant.backend,
            mappings: variant.mappings,
            round,
            value,
        });
    }
    if let Some(map) = agent_map.as_mut() {
        map.hold(1)?;
    }
    Ok(samples)
}

/// How many times each add/remove is timed; iptables' removal with many rules takes seconds
/// (KERNEL-NOTES: 7.8 s at 100,000 with the nft back end), so those are timed once.
fn repeats(backend: Backend, mappings: u32, reps: u32) -> u32 {
    if backend == Backend::Iptables && mappings >= 50_000 {
        1
    } else {
        reps
    }
}

/// Adding and removing one mapping (`reps` times each), and installing them all, for every
/// variant: round `round`'s timings.
pub fn updates(
    lab: &Lab,
    setups: &[NatSetup],
    variants: &[Variant],
    agent_map: &mut Option<AgentPublished>,
    reps: u32,
    round: u32,
) -> Result<Vec<ScaleSample>> {
    let mut samples = Vec::new();
    for variant in variants {
        sys::check_interrupted()?;
        let setup = &setups[variant.setup];
        let n = variant.mappings;
        let mut timings: Vec<(ScaleQuantity, f64)> = Vec::new();
        match variant.backend {
            Backend::Ours => {
                let map = agent_map
                    .as_mut()
                    .context("the agent's PUBLISHED map is not open")?;
                let agent = setup.agent.context("ours has no agent")?;
                let socket = lab.agent_socket(agent).to_owned();
                // The agent holds all N as a user's ports: its own one and N - 1 fillers,
                // published through it (store, map, reserved ports) in one request per
                // address, and removed the same way at the end.
                map.hold(1)?;
                let fillers = filler_ranges(n - 1);
                let start = Instant::now();
                for &(address, first, last) in &fillers {
                    timed_request(&socket, &publish_request(Some(address), (first, last)))?;
                }
                timings.push((ScaleQuantity::LoadS, start.elapsed().as_secs_f64()));
                let (key, target) = entry(PROBE.0, PROBE.1, setup.web_ip, PORT, 999);
                for _ in 0..reps * 10 {
                    let start = Instant::now();
                    map.map
                        .insert(key, target, 0)
                        .context("adding one entry to PUBLISHED")?;
                    timings.push((ScaleQuantity::MapAddUs, micros(start.elapsed())));
                    let start = Instant::now();
                    map.map
                        .remove(&key)
                        .context("removing one entry from PUBLISHED")?;
                    timings.push((ScaleQuantity::MapRemoveUs, micros(start.elapsed())));
                }
                let spec = format!("{}:{PORT}", PROBE.1);
                let port = PROBE.1.to_string();
                let probe = (PROBE.1, PROBE.1);
                let (publish, unpublish) =
                    (publish_request(None, probe), unpublish_request(None, probe));
                for _ in 0..repeats(variant.backend, n, reps) {
                    let add = timed(lab.netctl_cmd(agent, &["port", "publish", "web", &spec]))?;
                    timings.push((ScaleQuantity::AddMs, millis(add)));
                    let remove =
                        timed(lab.netctl_cmd(agent, &["port", "unpublish", "web", &port]))?;
                    timings.push((ScaleQuantity::RemoveMs, millis(remove)));
                    let read = timed(lab.netctl_cmd(agent, &["network", "ls"]))?;
                    timings.push((ScaleQuantity::ApiMs, millis(read)));
                    let add = timed_request(&socket, &publish)?;
                    timings.push((ScaleQuantity::AgentAddMs, millis(add)));
                    let remove = timed_request(&socket, &unpublish)?;
                    timings.push((ScaleQuantity::AgentRemoveMs, millis(remove)));
                }
                for &(address, first, last) in &fillers {
                    timed_request(&socket, &unpublish_request(Some(address), (first, last)))?;
                }
            }
            Backend::Iptables | Backend::Nft => {
                if let Some((_, load)) = setup.firewall {
                    timings.push((ScaleQuantity::LoadS, load.as_secs_f64()));
                }
                let (add, remove) = firewall_commands(variant.backend, setup);
                for _ in 0..repeats(variant.backend, n, reps) {
                    timings.push((ScaleQuantity::AddMs, millis(timed(add())?)));
                    timings.push((ScaleQuantity::RemoveMs, millis(timed(remove())?)));
                }
            }
        }
        let mut shown: Vec<String> = Vec::new();
        for quantity in ScaleQuantity::ALL {
            let values: Vec<f64> = timings
                .iter()
                .filter(|(q, _)| *q == quantity)
                .map(|(_, v)| *v)
                .collect();
            if let Some(spread) = Spread::of(&values) {
                shown.push(format!(
                    "{} {:.3} {} (median of {})",
                    quantity.name(),
                    spread.median,
                    quantity.unit(),
                    values.len()
                ));
            }
            samples.extend(values.iter().map(|value| ScaleSample {
                quantity,
                backend: variant.backend,
                mappings: n,
                round,
                value: *value,
            }));
        }
        println!(
            "scale {} n={n}, round {}: {}",
            variant.backend.name(),
            round + 1,
            shown.join(", ")
        );
    }
    if let Some(map) = agent_map {
        map.hold(1)?;
    }
    Ok(samples)
}

type CommandFn<'a> = Box<dyn Fn() -> Command + 'a>;

/// The commands that add and remove the probe mapping in a kernel-NAT host, in its namespace.
fn firewall_commands(backend: Backend, setup: &NatSetup) -> (CommandFn<'_>, CommandFn<'_>) {
    let (probe, port) = PROBE;
    let target = format!("{}:{PORT}", setup.web_ip);
    let ns = setup.host_ns.as_str();
    match backend {
        Backend::Iptables => {
            let rule = move |op: &'static str| -> CommandFn<'_> {
                let target = target.clone();
                Box::new(move || {
                    let mut c = sys::in_netns(ns, Firewall::Iptables.command());
                    c.args(["-t", "nat", op, "DOCKER", "-d", &format!("{probe}/32")])
                        .args(["!", "-i", "br0", "-p", "tcp", "-m", "tcp", "--dport"])
                        .arg(port.to_string())
                        .args(["-j", "DNAT", "--to-destination", &target]);
                    c
                })
            };
            (rule("-A"), rule("-D"))
        }
        Backend::Nft | Backend::Ours => {
            let element = move |op: &'static str, value: String| -> CommandFn<'_> {
                Box::new(move || {
                    let mut c = sys::in_netns(ns, Firewall::Nft.command());
                    c.args([op, "element", "ip", NFT_TABLE, NFT_MAP])
                        .arg(format!("{{ {probe} . {port}{value} }}"));
                    c
                })
            };
            (
                element("add", format!(" : {} . {PORT}", setup.web_ip)),
                element("delete", String::new()),
            )
        }
    }
}

/// Runs `command` to completion, quietly, and returns how long it took from spawn to exit.
fn timed(mut command: Command) -> Result<Duration> {
    let line = display(&command);
    let start = Instant::now();
    let output = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    let elapsed = start.elapsed();
    println!("$ {line}  # {:.2} ms", millis(elapsed));
    if !output.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(elapsed)
}

/// The request `netctl port publish web [HOSTIP:]FIRST-LAST:80-...` sends for the host ports
/// `host_ports` (endpoint ports from [`PORT`] on): one JSON line, byte for byte (the agent's
/// `api::Request` as serde writes it; the test below holds it to what netctl sent).
fn publish_request(host_ip: Option<Ipv4Addr>, host_ports: (u16, u16)) -> String {
    format!(
        concat!(
            r#"{{"op":"port_publish","endpoint":"web","ports":[{{"host_ip":{ip},"#,
            r#""host_ports":[{first},{last}],"ports":[{port},{port_last}],"proto":"tcp"}}],"#,
            r#""allow":[]}}"#,
        ),
        ip = json_ip(host_ip),
        first = host_ports.0,
        last = host_ports.1,
        port = PORT,
        port_last = PORT + (host_ports.1 - host_ports.0),
    )
}

/// The request `netctl port unpublish web [HOSTIP:]FIRST-LAST` sends (its endpoint side is the
/// host side, as netctl's parser sets it; the agent ignores it).
fn unpublish_request(host_ip: Option<Ipv4Addr>, host_ports: (u16, u16)) -> String {
    format!(
        concat!(
            r#"{{"op":"port_unpublish","endpoint":"web","ports":[{{"host_ip":{ip},"#,
            r#""host_ports":[{first},{last}],"ports":[{first},{last}],"proto":"tcp"}}]}}"#,
        ),
        ip = json_ip(host_ip),
        first = host_ports.0,
        last = host_ports.1,
    )
}

fn json_ip(ip: Option<Ipv4Addr>) -> String {
    ip.map_or("null".to_owned(), |ip| format!("\"{ip}\""))
}

/// Sends `request` to the agent's socket as `netctl` does (net-agent's `client::call`: connect,
/// one JSON line, one JSON line back) and returns the time from connect to the whole reply:
/// the agent's own cost, without a process start. A reply with an error fails the bench.
fn timed_request(socket: &Path, request: &str) -> Result<Duration> {
    let start = Instant::now();
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to the agent at {}", socket.display()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .context("setting the API timeout")?;
    stream
        .write_all(format!("{request}\n").as_bytes())
        .with_context(|| format!("sending {request} to {}", socket.display()))?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .with_context(|| format!("reading the reply to {request} from {}", socket.display()))?;
    let elapsed = start.elapsed();
    let decoded: serde_json::Value = serde_json::from_str(&reply)
        .with_context(|| format!("the agent's reply to {request} is not JSON: {reply:?}"))?;
    if let Some(error) = decoded.get("error") {
        bail!("the agent refused {request}: {error}");
    }
    println!(
        "request to {}: {request}  # {:.2} ms",
        socket.display(),
        millis(elapsed)
    );
    Ok(elapsed)
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fillers_fit_in_ports_and_spread_over_addresses() {
        assert_eq!(filler(0), (Ipv4Addr::new(198, 19, 250, 1), 10_000));
        assert_eq!(filler(49_999), (Ipv4Addr::new(198, 19, 250, 1), 59_999));
        assert_eq!(filler(50_000), (Ipv4Addr::new(198, 19, 250, 2), 10_000));
        assert_eq!(filler(99_999), (Ipv4Addr::new(198, 19, 250, 2), 59_999));
        assert_ne!(filler(0).0, PROBE.0);
        assert!(!(10_000..=59_999).contains(&PROBE.1) && !(10_000..=59_999).contains(&PORT));
    }

    /// The requests as `netctl port publish web 9000:80` and `netctl port unpublish web 9000`
    /// sent them to a socket they were pointed at (captured by hand; `api::Request` is what
    /// they serialize).
    #[test]
    fn requests_are_what_netctl_sends() {
        assert_eq!(
            publish_request(None, (9000, 9000)),
            r#"{"op":"port_publish","endpoint":"web","ports":[{"host_ip":null,"host_ports":[9000,9000],"ports":[80,80],"proto":"tcp"}],"allow":[]}"#
        );
        assert_eq!(
            unpublish_request(None, (9000, 9000)),
            r#"{"op":"port_unpublish","endpoint":"web","ports":[{"host_ip":null,"host_ports":[9000,9000],"ports":[9000,9000],"proto":"tcp"}]}"#
        );
        // `netctl port publish web 198.19.250.1:10000-10002:80-82` and its unpublish.
        assert_eq!(
            publish_request(Some(Ipv4Addr::new(198, 19, 250, 1)), (10000, 10002)),
            r#"{"op":"port_publish","endpoint":"web","ports":[{"host_ip":"198.19.250.1","host_ports":[10000,10002],"ports":[80,82],"proto":"tcp"}],"allow":[]}"#
        );
        assert_eq!(
            unpublish_request(Some(Ipv4Addr::new(198, 19, 250, 1)), (10000, 10002)),
            r#"{"op":"port_unpublish","endpoint":"web","ports":[{"host_ip":"198.19.250.1","host_ports":[10000,10002],"ports":[10000,10002],"proto":"tcp"}]}"#
        );
    }

    #[test]
    fn filler_ranges_cover_the_fillers_one_address_each() {
        assert!(filler_ranges(0).is_empty());
        let one = Ipv4Addr::new(198, 19, 250, 1);
        let two = Ipv4Addr::new(198, 19, 250, 2);
        assert_eq!(filler_ranges(1), [(one, 10_000, 10_000)]);
        assert_eq!(filler_ranges(50_000), [(one, 10_000, 59_999)]);
        assert_eq!(
            filler_ranges(99_999),
            [(one, 10_000, 59_999), (two, 10_000, 59_998)]
        );
    }
}
