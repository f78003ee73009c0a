//! Part 2's topologies, built fresh for each run in network namespaces named
//! `bench-<pid>-<what>`, and everything else the bench makes (agent, pins, temporary directory),
//! removed by [`Lab::cleanup`] on every exit path: success, error, Ctrl-C (the caller checks the
//! interrupt flag between steps) and panic (`Drop`).
//!
//! Every setup has the same two endpoint namespaces, a client and a server, each with an `eth0`
//! on a /24 (RFC 2544 benchmarking addresses, never routed anywhere real), IPv6 off as the agent
//! leaves its endpoints, and `tcp_max_tw_buckets = 0` in the server's. What differs is only what
//! joins the two `eth0`s:
//!
//! ```text
//! (a)    client eth0 ==veth== eth0 server
//! (b)    client eth0 ==veth== br0 (+ Docker's iptables rules) ==veth== eth0 server
//! (b+nf) the same with bridged packets through iptables (bridge-nf-call-iptables = 1)
//! (c)    client eth0 ==veth== [tcx: tc_from_endpoint, bpf_redirect_peer] ==veth== eth0 server
//! ```
//!
//! (b), (b+nf) and (c) have a "host" namespace in the middle; nothing is ever created in the
//! machine's own namespace (veths are created inside one bench namespace with the peer born in
//! another), and each agent is started in its host namespace with `nsenter --net`.
//!
//! The NAT setups ([`nat`]) add an "outside" namespace behind the host's uplink.

use std::{
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use super::{
    sys::{self, ChildGuard, NETNS_DIR, process_identity},
    traffic::{Pair, Via},
};
use crate::{
    cleanup::Failures,
    exec::{cmd, exec, exec_output, probe},
    sim_agent::{AgentLaunch, show_log_tail},
};

pub mod nat;

const TMP_PREFIX: &str = "/tmp/net-bench-";
pub(crate) const PIN_PREFIX: &str = "/sys/fs/bpf/net-bench-";
const NETNS_PREFIX: &str = "bench-";
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(30);
const NETWORK: &str = "bench";
/// In the RFC 2544 range of the setups' subnets, assigned to nothing.
pub(crate) const UNUSED_DNS_UPSTREAM: &str = "198.19.0.254";
const BR_NETFILTER_SYSCTL: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

/// One way of joining the client and server namespaces.
pub struct Setup {
    /// Short name used in tables and CSV: `a`, `b`, `b+nf`, `c`.
    pub key: &'static str,
    pub label: &'static str,
    pub client_ns: String,
    pub server_ns: String,
    pub server_ip: Ipv4Addr,
    /// The agent that forwards, for (c).
    pub agent: Option<AgentId>,
}

impl Setup {
    pub fn pair(&self) -> Pair<'_> {
        Pair {
            client_ns: &self.client_ns,
            server_ns: &self.server_ns,
            server_ip: self.server_ip,
            via: Via::Direct,
        }
    }
}

/// A /24 of 198.19.0.0/16 (RFC 2544): gateway .1, client .2, server .3.
struct Subnet(u8);

impl Subnet {
    fn host(&self, n: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, self.0, n)
    }
    fn gateway(&self) -> Ipv4Addr {
        self.host(1)
    }
    fn client(&self) -> Ipv4Addr {
        self.host(2)
    }
    fn server(&self) -> Ipv4Addr {
        self.host(3)
    }
    fn cidr(&self) -> String {
        format!("198.19.{}.0/24", self.0)
    }
}

/// An agent the bench runs (for setup (c) and for the NAT setups), with what it was asked to
/// make.
struct AgentRun {
    /// Names its files and pins.
    key: &'static str,
    process: ChildGuard,
    netctl: PathBuf,
    socket: PathBuf,
    bpffs_dir: PathBuf,
    network: bool,
    endpoints: Vec<String>,
}

/// One of the agents the bench started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentId(usize);

/// Everything the bench makes on the machine.
pub struct Lab {
    pid: u32,
    tmp_dir: PathBuf,
    tmp_dir_made: bool,
    /// Every agent pins under its own directory in here.
    pin_dir: PathBuf,
    namespaces: Vec<String>,
    agents: Vec<AgentRun>,
    cleaned: bool,
}

impl Lab {
    /// Sweeps what a killed earlier bench left, then claims this run's temporary directory.
    pub fn new() -> Result<Self> {
        sweep_stale()?;
        let pid = std::process::id();
        let tmp_dir = PathBuf::from(format!("{TMP_PREFIX}{pid}"));
        let mut lab = Self {
            pid,
            tmp_dir,
            tmp_dir_made: false,
            pin_dir: PathBuf::from(format!("{PIN_PREFIX}{pid}")),
            namespaces: Vec::new(),
            agents: Vec::new(),
            cleaned: false,
        };
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&lab.tmp_dir)
            .with_context(|| {
                format!(
                    "creating {}: if it exists, a bench with this pid was killed; remove it",
                    lab.tmp_dir.display()
                )
            })?;
        lab.tmp_dir_made = true;
        let owner = process_identity(pid).context("reading this process's start time")?;
        fs::write(lab.tmp_dir.join("owner"), owner)
            .with_context(|| format!("writing {}/owner", lab.tmp_dir.display()))?;
        Ok(lab)
    }

    pub fn tmp_dir(&self) -> &Path {
        &self.tmp_dir
    }

    fn ns_name(&self, what: &str) -> String {
        format!("{NETNS_PREFIX}{}-{what}", self.pid)
    }

    /// A fresh namespace with loopback up, IPv6 off and `sysctls` set.
    pub fn netns(&mut self, what: &str, sysctls: &[&str]) -> Result<String> {
        let name = self.ns_name(what);
        exec(cmd("ip").args(["netns", "add", &name]))?;
        self.namespaces.push(name.clone());
        exec(cmd("ip").args(["-n", &name, "link", "set", "lo", "up"]))?;
        let mut all: Vec<&str> = Vec::new();
        if Path::new("/proc/sys/net/ipv6").exists() {
            all.extend([
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ]);
        }
        all.extend_from_slice(sysctls);
        set_sysctls(&name, &all)?;
        Ok(name)
    }

    /// The client and server namespaces every setup has.
    fn endpoint_namespaces(&mut self, key: &str) -> Result<(String, String)> {
        let client = self.netns(&format!("{key}-cli"), &[])?;
        // See traffic::tcp_crr: the server closes first, so its TIME_WAIT sockets must not pile
        // up and meet reused client ports.
        let server = self.netns(&format!("{key}-srv"), &["net.ipv4.tcp_max_tw_buckets=0"])?;
        Ok((client, server))
    }

    /// (a) The two namespaces joined by one veth pair: the limit of this machine.
    pub fn veth_pair(&mut self) -> Result<Setup> {
        self.veth_pair_on("a", 1)
    }

    /// (a) with namespaces named after `ns_key`, on 198.19.`subnet`.0/24: for a part of the
    /// bench that measures the limit in rounds of its own, next to the single-host (a).
    pub fn veth_pair_on(&mut self, ns_key: &str, subnet: u8) -> Result<Setup> {
        let subnet = Subnet(subnet);
        let (client, server) = self.endpoint_namespaces(ns_key)?;
        exec(cmd("ip").args([
            "-n", &client, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
            &server,
        ]))?;
        configure_endpoint(&client, subnet.client(), None)?;
        configure_endpoint(&server, subnet.server(), None)?;
        Ok(Setup {
            key: "a",
            label: "veth pair",
            client_ns: client,
            server_ns: server,
            server_ip: subnet.server(),
            agent: None,
        })
    }

    /// Whether bridged packets can be sent through iptables at all on this kernel.
    pub fn br_netfilter_available() -> bool {
        Path::new(BR_NETFILTER_SYSCTL).exists()
    }

    /// (b) Docker's way: both endpoints on a Linux bridge that holds the gateway address, in a
    /// host namespace with forwarding on and the iptables rules Docker installs for a bridge
    /// network. With `br_netfilter` false, bridged packets skip iptables, as with Docker 27.3 and
    /// later on a host where nothing loaded br_netfilter (Docker loads it only for icc=false or
    /// userland-proxy=false); true is Docker on a kernel where it is on, as it is by default when
    /// br_netfilter is built in (this machine) or loaded by something else.
    pub fn docker_bridge(&mut self, br_netfilter: bool) -> Result<Setup> {
        let (key, subnet, label) = if br_netfilter {
            (
                "b+nf",
                Subnet(3),
                "Docker bridge + iptables, br_netfilter on",
            )
        } else {
            ("b", Subnet(2), "Docker bridge + iptables")
        };
        let ns_key = if br_netfilter { "bnf" } else { "b" };
        let host = self.docker_host(&format!("{ns_key}-host"), br_netfilter)?;
        let (client, server) = self.endpoint_namespaces(ns_key)?;
        bridge(&host, &subnet)?;
        for (port, ns, ip) in [
            ("veth-cli", &client, subnet.client()),
            ("veth-srv", &server, subnet.server()),
        ] {
            bridge_port(&host, port, ns, ip, &subnet)?;
        }
        self.load_rules(
            &host,
            &format!("iptables-{ns_key}"),
            Firewall::Iptables,
            &docker_rules(BRIDGE, &subnet.cidr(), &DockerPorts::default()),
        )?;
        Ok(Setup {
            key,
            label,
            client_ns: client,
            server_ns: server,
            server_ip: subnet.server(),
            agent: None,
        })
    }

    /// A host namespace as Docker leaves it: forwarding on and, where the kernel has
    /// br_netfilter, bridged packets through iptables or not as asked.
    fn docker_host(&mut self, what: &str, br_netfilter: bool) -> Result<String> {
        let nf = if br_netfilter { "1" } else { "0" };
        let mut sysctls = vec!["net.ipv4.ip_forward=1".to_owned()];
        if Self::br_netfilter_available() {
            for family in ["iptables", "ip6tables", "arptables"] {
                sysctls.push(format!("net.bridge.bridge-nf-call-{family}={nf}"));
            }
        } else if br_netfilter {
            bail!(
                "{what} needs br_netfilter ({BR_NETFILTER_SYSCTL} is missing): \
                 `modprobe br_netfilter`"
            );
        }
        let sysctls: Vec<&str> = sysctls.iter().map(String::as_str).collect();
        self.netns(what, &sysctls)
    }

    /// Loads a ruleset into `ns` from a file named after `what` in the bench's temporary
    /// directory (`iptables-restore` replaces the tables it names; `nft -f` adds); returns how
    /// long the load took.
    fn load_rules(
        &self,
        ns: &str,
        what: &str,
        firewall: Firewall,
        rules: &str,
    ) -> Result<Duration> {
        let path = self.tmp_dir.join(format!("{what}.rules"));
        fs::write(&path, rules).with_context(|| format!("writing {}", path.display()))?;
        let mut load = sys::in_netns(ns, firewall.loader());
        if firewall == Firewall::Nft {
            load.arg("-f");
        }
        load.arg(&path);
        let start = std::time::Instant::now();
        exec(&mut load)?;
        Ok(start.elapsed())
    }

    /// (c) Ours: net-agent in a host namespace, a network, and the two namespaces adopted as its
    /// endpoints (the agent makes their veths, addresses and routes and attaches the programs).
    pub fn ours(&mut self, agent_bin: &Path, netctl_bin: &Path) -> Result<Setup> {
        let subnet = Subnet(4);
        let host = self.netns("c-host", &[])?;
        let (client, server) = self.endpoint_namespaces("c")?;
        let agent = self.start_agent("c", agent_bin, netctl_bin, &host, &[])?;
        self.create_network(agent, &subnet)?;
        for (name, ns, ip) in [
            ("client", &client, subnet.client()),
            ("server", &server, subnet.server()),
        ] {
            self.adopt_endpoint(agent, name, ns, ip, &[])?;
        }
        Ok(Setup {
            key: "c",
            label: "ours: net-agent, tcx + bpf_redirect_peer",
            client_ns: client,
            server_ns: server,
            server_ip: subnet.server(),
            agent: Some(agent),
        })
    }

    /// The agent's network [`NETWORK`] on `subnet`.
    fn create_network(&mut self, agent: AgentId, subnet: &Subnet) -> Result<()> {
        self.netctl(agent, &["status"])?;
        self.netctl(
            agent,
            &["network", "create", NETWORK, "--subnet", &subnet.cidr()],
        )?;
        self.agents[agent.0].network = true;
        Ok(())
    }

    /// Makes the existing namespace `ns` the agent's endpoint `name` on [`NETWORK`] with
    /// address `ip`, with `extra` arguments (`--publish ...`).
    fn adopt_endpoint(
        &mut self,
        agent: AgentId,
        name: &str,
        ns: &str,
        ip: Ipv4Addr,
        extra: &[&str],
    ) -> Result<()> {
        let netns = Path::new(NETNS_DIR).join(ns);
        let netns = netns.to_string_lossy();
        let ip = ip.to_string();
        let mut args = vec![
            "endpoint",
            "create",
            name,
            "--network",
            NETWORK,
            "--netns",
            &netns,
            "--ip",
            &ip,
        ];
        args.extend_from_slice(extra);
        self.netctl(agent, &args)?;
        self.agents[agent.0].endpoints.push(name.to_owned());
        Ok(())
    }

    fn agent_log(&self, key: &str) -> PathBuf {
        self.tmp_dir.join(format!("agent-{key}.log"))
    }

    /// Starts net-agent in the namespace `host` with `extra` arguments and waits until it
    /// answers. `key` names its files and pins; its name prefix ends in a letter of its own.
    fn start_agent(
        &mut self,
        key: &'static str,
        agent_bin: &Path,
        netctl_bin: &Path,
        host: &str,
        extra: &[&str],
    ) -> Result<AgentId> {
        let log_path = self.agent_log(key);
        let socket = self.tmp_dir.join(format!("agent-{key}.sock"));
        let bpffs_dir = self.pin_dir.join(key);
        let prefix = agent_prefix(self.pid, self.agents.len());
        let mut args = vec![
            "--name-prefix",
            &prefix,
            // An address nothing answers on, rather than the machine's resolvers: nothing the
            // bench makes may send traffic out of its namespaces (no query is made anyway).
            "--dns-upstream",
            UNUSED_DNS_UPSTREAM,
        ];
        args.extend_from_slice(extra);
        let child = AgentLaunch {
            agent_bin,
            netns: host,
            state_dir: self.tmp_dir.join(format!("state-{key}")),
            bpffs_dir: &bpffs_dir,
            socket: &socket,
            log: &log_path,
            die_with_parent: true,
        }
        .spawn(&args)?;
        let id = AgentId(self.agents.len());
        self.agents.push(AgentRun {
            key,
            process: ChildGuard::new(format!("net-agent ({key})"), child),
            netctl: netctl_bin.to_owned(),
            socket: socket.clone(),
            bpffs_dir,
            network: false,
            endpoints: Vec::new(),
        });

        let mut status = self.netctl_cmd(id, &["status"]);
        let agent = &mut self.agents[id.0];
        sys::wait_for(
            "the agent to answer `netctl status`",
            AGENT_READY_TIMEOUT,
            || {
                if let Some(exit) = agent.process.try_wait()? {
                    bail!(
                        "net-agent exited ({exit}) before it answered on {}; its log: {}",
                        socket.display(),
                        log_path.display()
                    );
                }
                Ok(probe(&mut status).map(|_| ()))
            },
        )?;
        Ok(id)
    }

    /// Where the agent pins its maps.
    pub fn agent_maps_dir(&self, agent: AgentId) -> PathBuf {
        self.agents[agent.0]
            .bpffs_dir
            .join(format!("v{}", net_ebpf_common::PIN_LAYOUT_VERSION))
            .join("maps")
    }

    /// The agent's API socket.
    pub fn agent_socket(&self, agent: AgentId) -> &Path {
        &self.agents[agent.0].socket
    }

    pub fn netctl_cmd(&self, agent: AgentId, args: &[&str]) -> Command {
        let agent = &self.agents[agent.0];
        let mut netctl = cmd(&agent.netctl);
        netctl
            .arg("--socket")
            .arg(&agent.socket)
            .arg("--bpffs-dir")
            .arg(&agent.bpffs_dir)
            .args(args);
        netctl
    }

    pub fn netctl(&self, agent: AgentId, args: &[&str]) -> Result<()> {
        exec(&mut self.netctl_cmd(agent, args))
    }

    /// `netctl -o json <args>`, parsed.
    pub fn netctl_json(&self, agent: AgentId, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let json = exec_output(&mut self.netctl_cmd(agent, &all))?;
        serde_json::from_str(&json)
            .with_context(|| format!("`netctl -o json {}` is not JSON: {json}", args.join(" ")))
    }

    /// The traffic of a setup of `agent` must have gone through the programs: counted on the
    /// host veth of `endpoint` in both directions. Otherwise it measured the host stack, not
    /// the data plane.
    pub fn check_agent_forwarded(&self, agent: AgentId, endpoint: &str) -> Result<()> {
        self.netctl(agent, &["endpoint", "stats", endpoint])?;
        let stats = self.netctl_json(agent, &["endpoint", "stats", endpoint])?;
        let packets = |direction: &str| {
            stats
                .pointer(&format!("/{direction}/packets"))
                .and_then(serde_json::Value::as_u64)
                .with_context(|| {
                    format!("no {direction}.packets in the stats of {endpoint}: {stats}")
                })
        };
        let (to, from) = (packets("to_endpoint")?, packets("from_endpoint")?);
        if to == 0 || from == 0 {
            bail!(
                "agent {} exchanged traffic with {endpoint} but the programs counted {to} \
                 packets to it and {from} from it: the measurement did not go through the data \
                 plane",
                self.agents[agent.0].key
            );
        }
        Ok(())
    }

    /// Prints the last lines of each agent's log (after a failure).
    pub fn show_agent_log(&self) {
        for agent in &self.agents {
            show_log_tail(&self.agent_log(agent.key));
        }
    }

    /// Undoes everything, step by step, going on past failures; fails if any step failed.
    pub fn cleanup(&mut self) -> Result<()> {
        if self.cleaned {
            return Ok(());
        }
        self.cleaned = true;
        println!("\n== bench: cleaning up");
        let mut failures = Failures::default();

        for mut agent in self.agents.drain(..).rev() {
            let running = matches!(agent.process.try_wait(), Ok(None));
            if running {
                // Through the agent, so it removes the veths and map entries it made.
                let netctl = |args: &[&str]| {
                    let mut c = cmd(&agent.netctl);
                    c.arg("--socket")
                        .arg(&agent.socket)
                        .arg("--bpffs-dir")
                        .arg(&agent.bpffs_dir)
                        .args(args);
                    exec(&mut c)
                };
                for name in agent.endpoints.iter().rev() {
                    failures.note(netctl(&["endpoint", "rm", name]));
                }
                if agent.network {
                    failures.note(netctl(&["network", "rm", NETWORK]));
                }
            }
            failures.note(agent.process.stop());
        }
        // Deleting a namespace deletes its interfaces, so the tcx links on the agents' host
        // veths and uplinks go with the host namespaces, and the rules of a namespace with it.
        for ns in self.namespaces.drain(..).rev() {
            failures.note(exec(cmd("ip").args(["netns", "del", &ns])));
        }
        // The pin directory is the agents' (they may never have made it); the temporary
        // directory is removed only if this run made it, not another run's with the same pid.
        for (dir, what, ours) in [
            (&self.pin_dir, "the pins", self.pin_dir.exists()),
            (&self.tmp_dir, "the files", self.tmp_dir_made),
        ] {
            if ours {
                println!("$ rm -r {}", dir.display());
                failures.note(
                    fs::remove_dir_all(dir)
                        .with_context(|| format!("removing {what} under {}", dir.display())),
                );
            }
        }
        failures.into_result()
    }
}

impl Drop for Lab {
    /// A panic or an early return still removes what the bench made.
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            eprintln!("bench cleanup: {e:#}");
        }
    }
}

/// Sets `key=value` sysctls of the namespace `ns`. Written to /proc/sys from a thread inside the
/// namespace (/proc/sys/net shows the namespace of the thread that opens it), which spares a
/// dependency on procps's `sysctl`.
fn set_sysctls(ns: &str, sysctls: &[&str]) -> Result<()> {
    if sysctls.is_empty() {
        return Ok(());
    }
    println!("sysctl in {ns}: {}", sysctls.join(" "));
    thread::scope(|s| {
        let handle = s.spawn(|| -> Result<()> {
            sys::enter(ns, None)?;
            for sysctl in sysctls {
                let (key, value) = sysctl
                    .split_once('=')
                    .with_context(|| format!("sysctl {sysctl} is not key=value"))?;
                let path = Path::new("/proc/sys").join(key.replace('.', "/"));
                fs::write(&path, value)
                    .with_context(|| format!("writing {value} to {} in {ns}", path.display()))?;
            }
            Ok(())
        });
        sys::joined(&format!("setting sysctls in {ns}"), handle)
    })
}

/// Address, link up and (for a routed setup) the default route of an endpoint's `eth0`.
fn configure_endpoint(ns: &str, ip: Ipv4Addr, gateway: Option<Ipv4Addr>) -> Result<()> {
    configure_link(ns, "eth0", ip, gateway)
}

/// Address (a /24), link up and, if given, the default route through `dev` of `ns`.
fn configure_link(ns: &str, dev: &str, ip: Ipv4Addr, gateway: Option<Ipv4Addr>) -> Result<()> {
    exec(cmd("ip").args(["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", dev]))?;
    exec(cmd("ip").args(["-n", ns, "link", "set", dev, "up"]))?;
    if let Some(gateway) = gateway {
        exec(cmd("ip").args([
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &gateway.to_string(),
        ]))?;
    }
    Ok(())
}

/// The Linux bridge of a Docker-style host, holding the gateway address.
const BRIDGE: &str = "br0";

/// Makes [`BRIDGE`] in `host` with `subnet`'s gateway address.
fn bridge(host: &str, subnet: &Subnet) -> Result<()> {
    exec(cmd("ip").args(["-n", host, "link", "add", BRIDGE, "type", "bridge"]))?;
    exec(cmd("ip").args([
        "-n",
        host,
        "addr",
        "add",
        &format!("{}/24", subnet.gateway()),
        "dev",
        BRIDGE,
    ]))?;
    exec(cmd("ip").args(["-n", host, "link", "set", BRIDGE, "up"]))
}

/// A veth from `host`'s bridge (`port`) to `eth0` of `ns`, which gets `ip` and a default route
/// through the gateway.
fn bridge_port(host: &str, port: &str, ns: &str, ip: Ipv4Addr, subnet: &Subnet) -> Result<()> {
    exec(cmd("ip").args([
        "-n", host, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
    ]))?;
    exec(cmd("ip").args(["-n", host, "link", "set", port, "master", BRIDGE, "up"]))?;
    configure_endpoint(ns, ip, Some(subnet.gateway()))
}

/// Which kernel NAT a ruleset is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firewall {
    /// `iptables-restore` (whatever back end `iptables` is here, as Docker would use).
    Iptables,
    /// `nft -f`.
    Nft,
}

impl Firewall {
    /// The program that changes one rule or element.
    pub fn command(self) -> &'static str {
        match self {
            Firewall::Iptables => "iptables",
            Firewall::Nft => "nft",
        }
    }

    /// The program that loads a whole ruleset from a file.
    fn loader(self) -> &'static str {
        match self {
            Firewall::Iptables => "iptables-restore",
            Firewall::Nft => "nft",
        }
    }
}

/// Published ports as Docker (default settings, userland proxy on) writes them into iptables.
#[derive(Default)]
pub struct DockerPorts<'a> {
    /// The endpoint address and port every mapping goes to; `None`: nothing published.
    pub target: Option<(Ipv4Addr, u16)>,
    /// The host side of each mapping, in the order of its DNAT rule in the `DOCKER` chain:
    /// a host address (`None`: every address, as `-p 8080:80`) and port. Empty when the DNAT
    /// is done elsewhere (an nftables map).
    pub dnat: &'a [(Option<Ipv4Addr>, u16)],
}

/// The rules Docker (20.10 to 27) installs for one bridge network, for `iptables-restore`: the
/// FORWARD chain with its user, isolation and established-flow rules, the DOCKER chains, and the
/// MASQUERADE rule for traffic from the subnet leaving the bridge. With a published target, the
/// rules `docker run -p` adds: an ACCEPT in the filter `DOCKER` chain for traffic from outside
/// the bridge to the endpoint port, a MASQUERADE of the endpoint's connections to itself, and
/// one DNAT rule per mapping in the nat `DOCKER` chain (`! -i <bridge>`: the userland proxy
/// serves connections from the bridge). Docker writes the first two once per mapping; every
/// mapping here goes to the same endpoint port, so they are written once, which keeps the
/// chains a new connection walks shorter than Docker's would be.
fn docker_rules(bridge: &str, subnet: &str, ports: &DockerPorts<'_>) -> String {
    let mut accept = String::new();
    let mut masquerade = String::new();
    let mut dnat = String::new();
    if let Some((ip, port)) = ports.target {
        accept = format!(
            "-A DOCKER -d {ip}/32 ! -i {bridge} -o {bridge} -p tcp -m tcp --dport {port} -j ACCEPT\n"
        );
        masquerade = format!(
            "-A POSTROUTING -s {ip}/32 -d {ip}/32 -p tcp -m tcp --dport {port} -j MASQUERADE\n"
        );
        dnat.reserve(ports.dnat.len() * 100);
        for (host, host_port) in ports.dnat {
            let dst = host.map(|h| format!("-d {h}/32 ")).unwrap_or_default();
            let _ = writeln!(
                dnat,
                "-A DOCKER {dst}! -i {bridge} -p tcp -m tcp --dport {host_port} -j DNAT \
                 --to-destination {ip}:{port}"
            );
        }
    }
    format!(
        "*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-ISOLATION-STAGE-2 - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o {bridge} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o {bridge} -j DOCKER
-A FORWARD -i {bridge} ! -o {bridge} -j ACCEPT
-A FORWARD -i {bridge} -o {bridge} -j ACCEPT
{accept}-A DOCKER-ISOLATION-STAGE-1 -i {bridge} ! -o {bridge} -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-ISOLATION-STAGE-2 -o {bridge} -j DROP
-A DOCKER-ISOLATION-STAGE-2 -j RETURN
-A DOCKER-USER -j RETURN
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s {subnet} ! -o {bridge} -j MASQUERADE
{masquerade}-A DOCKER -i {bridge} -j RETURN
{dnat}COMMIT
"
    )
}

/// The agent's name prefix: "bn", the pid in base 36 and a letter per agent of this run: within
/// the agent's 8 characters for any pid, and unlike the tests' "nt" and the demo's "dm".
fn agent_prefix(pid: u32, agent: usize) -> String {
    let mut digits = Vec::new();
    let mut n = pid;
    loop {
        digits.push(char::from_digit(n % 36, 36).unwrap_or('0'));
        n /= 36;
        if n == 0 {
            break;
        }
    }
    let letter = char::from_digit(10 + (agent % 26) as u32, 36).unwrap_or('a');
    format!("bn{}{letter}", digits.iter().rev().collect::<String>())
}

/// Removes what benches that no longer run left behind (killed with SIGKILL, or the machine
/// rebooted mid-run with /tmp kept): their namespaces, pins and temporary directory. A run is
/// identified by the pid and start time in its `owner` file, so a reused pid is not mistaken for
/// it.
fn sweep_stale() -> Result<()> {
    let Ok(entries) = fs::read_dir("/tmp") else {
        return Ok(());
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("net-bench-")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        let owner = fs::read_to_string(dir.join("owner")).unwrap_or_default();
        let alive = process_identity(pid);
        // No owner yet: a bench that has only just made its directory, if its pid runs.
        let running = if owner.trim().is_empty() {
            alive.is_some()
        } else {
            alive.as_deref() == Some(owner.trim())
        };
        if running {
            continue;
        }
        println!(
            "bench: removing what an earlier bench (pid {pid}) left behind; it is no longer \
             running"
        );
        let prefix = format!("{NETNS_PREFIX}{pid}-");
        if let Ok(namespaces) = fs::read_dir(NETNS_DIR) {
            for ns in namespaces.filter_map(Result::ok) {
                let ns = ns.file_name().to_string_lossy().into_owned();
                if ns.starts_with(&prefix) {
                    exec(cmd("ip").args(["netns", "del", &ns]))?;
                }
            }
        }
        for stale in [PathBuf::from(format!("{PIN_PREFIX}{pid}")), dir] {
            if stale.exists() {
                println!("$ rm -r {}", stale.display());
                fs::remove_dir_all(&stale)
                    .with_context(|| format!("removing {}", stale.display()))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_prefix_fits_the_agent_limit_for_any_pid() {
        assert_eq!(agent_prefix(0, 0), "bn0a");
        assert_eq!(agent_prefix(36, 1), "bn10b");
        // Linux pids are at most 2^22 (PID_MAX_LIMIT): "bn" + 5 digits + a letter, within 8.
        assert_eq!(agent_prefix(1 << 22, 25).len(), 8);
    }

    #[test]
    fn docker_rules_put_the_dnat_rules_last_in_order() {
        let target = Ipv4Addr::new(198, 19, 6, 3);
        let filler = Ipv4Addr::new(198, 19, 250, 1);
        let rules = docker_rules(
            "br0",
            "198.19.6.0/24",
            &DockerPorts {
                target: Some((target, 80)),
                dnat: &[(Some(filler), 1), (None, 8080)],
            },
        );
        let dnat: Vec<&str> = rules.lines().filter(|l| l.contains("-j DNAT")).collect();
        assert_eq!(
            dnat,
            [
                "-A DOCKER -d 198.19.250.1/32 ! -i br0 -p tcp -m tcp --dport 1 -j DNAT \
                 --to-destination 198.19.6.3:80",
                "-A DOCKER ! -i br0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination \
                 198.19.6.3:80",
            ]
        );
        let last_nat_rule = rules
            .lines()
            .rev()
            .find(|l| l.starts_with("-A"))
            .unwrap_or("");
        assert!(last_nat_rule.contains("--dport 8080"), "{rules}");
        assert!(rules.contains(
            "-A DOCKER -d 198.19.6.3/32 ! -i br0 -o br0 -p tcp -m tcp --dport 80 -j ACCEPT"
        ));
        let bare = docker_rules("br0", "198.19.2.0/24", &DockerPorts::default());
        assert!(!bare.contains("DNAT") && !bare.contains("-A DOCKER -d"));
    }
}
