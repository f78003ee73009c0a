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
//! another), and the agent is started in its host namespace with `nsenter --net`.

use std::{
    fs,
    net::Ipv4Addr,
    os::unix::{fs::DirBuilderExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use super::{
    sys::{self, ChildGuard, NETNS_DIR, process_identity},
    traffic::Pair,
};
use crate::exec::{cmd, display, exec, exec_output, probe};

const TMP_PREFIX: &str = "/tmp/net-bench-";
const PIN_PREFIX: &str = "/sys/fs/bpf/net-bench-";
const NETNS_PREFIX: &str = "bench-";
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(30);
const NETWORK: &str = "bench";
/// In the RFC 2544 range of the setups' subnets, assigned to nothing.
const UNUSED_DNS_UPSTREAM: &str = "198.19.0.254";
const BR_NETFILTER_SYSCTL: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

/// One way of joining the client and server namespaces.
pub struct Setup {
    /// Short name used in tables and CSV: `a`, `b`, `b+nf`, `c`.
    pub key: &'static str,
    pub label: &'static str,
    pub client_ns: String,
    pub server_ns: String,
    pub server_ip: Ipv4Addr,
}

impl Setup {
    pub fn pair(&self) -> Pair<'_> {
        Pair {
            client_ns: &self.client_ns,
            server_ns: &self.server_ns,
            server_ip: self.server_ip,
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

/// The agent the bench runs for setup (c), with what it was asked to make.
struct AgentRun {
    process: ChildGuard,
    netctl: PathBuf,
    socket: PathBuf,
    network: bool,
    endpoints: Vec<String>,
}

/// Everything the bench makes on the machine.
pub struct Lab {
    pid: u32,
    tmp_dir: PathBuf,
    tmp_dir_made: bool,
    pin_dir: PathBuf,
    namespaces: Vec<String>,
    agent: Option<AgentRun>,
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
            agent: None,
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
        let subnet = Subnet(1);
        let (client, server) = self.endpoint_namespaces("a")?;
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
        let nf = if br_netfilter { "1" } else { "0" };
        let mut sysctls = vec!["net.ipv4.ip_forward=1".to_owned()];
        if Self::br_netfilter_available() {
            for family in ["iptables", "ip6tables", "arptables"] {
                sysctls.push(format!("net.bridge.bridge-nf-call-{family}={nf}"));
            }
        } else if br_netfilter {
            bail!(
                "setup {key} needs br_netfilter ({BR_NETFILTER_SYSCTL} is missing): \
                 `modprobe br_netfilter`"
            );
        }
        let sysctls: Vec<&str> = sysctls.iter().map(String::as_str).collect();
        let host = self.netns(&format!("{ns_key}-host"), &sysctls)?;
        let (client, server) = self.endpoint_namespaces(ns_key)?;
        let gateway = subnet.gateway();
        exec(cmd("ip").args(["-n", &host, "link", "add", "br0", "type", "bridge"]))?;
        exec(cmd("ip").args([
            "-n",
            &host,
            "addr",
            "add",
            &format!("{gateway}/24"),
            "dev",
            "br0",
        ]))?;
        exec(cmd("ip").args(["-n", &host, "link", "set", "br0", "up"]))?;
        for (port, ns, ip) in [
            ("veth-cli", &client, subnet.client()),
            ("veth-srv", &server, subnet.server()),
        ] {
            exec(cmd("ip").args([
                "-n", &host, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns",
                ns,
            ]))?;
            exec(cmd("ip").args(["-n", &host, "link", "set", port, "master", "br0", "up"]))?;
            configure_endpoint(ns, ip, Some(gateway))?;
        }
        let rules = self.tmp_dir.join(format!("iptables-{ns_key}.rules"));
        fs::write(&rules, docker_rules("br0", &subnet.cidr()))
            .with_context(|| format!("writing {}", rules.display()))?;
        exec(
            cmd("ip")
                .args(["netns", "exec", &host, "iptables-restore"])
                .arg(&rules),
        )?;
        Ok(Setup {
            key,
            label,
            client_ns: client,
            server_ns: server,
            server_ip: subnet.server(),
        })
    }

    /// (c) Ours: net-agent in a host namespace, a network, and the two namespaces adopted as its
    /// endpoints (the agent makes their veths, addresses and routes and attaches the programs).
    pub fn ours(&mut self, agent_bin: &Path, netctl_bin: &Path) -> Result<Setup> {
        let subnet = Subnet(4);
        let host = self.netns("c-host", &[])?;
        let (client, server) = self.endpoint_namespaces("c")?;
        self.start_agent(agent_bin, netctl_bin, &host)?;
        self.netctl(&["status"])?;
        self.netctl(&["network", "create", NETWORK, "--subnet", &subnet.cidr()])?;
        if let Some(agent) = self.agent.as_mut() {
            agent.network = true;
        }
        for (name, ns, ip) in [
            ("client", &client, subnet.client()),
            ("server", &server, subnet.server()),
        ] {
            let netns = Path::new(NETNS_DIR).join(ns);
            let netns = netns.to_string_lossy();
            let ip = ip.to_string();
            self.netctl(&[
                "endpoint",
                "create",
                name,
                "--network",
                NETWORK,
                "--netns",
                &netns,
                "--ip",
                &ip,
            ])?;
            if let Some(agent) = self.agent.as_mut() {
                agent.endpoints.push(name.to_owned());
            }
        }
        Ok(Setup {
            key: "c",
            label: "ours: net-agent, tcx + bpf_redirect_peer",
            client_ns: client,
            server_ns: server,
            server_ip: subnet.server(),
        })
    }

    fn agent_log(&self) -> PathBuf {
        self.tmp_dir.join("agent.log")
    }

    fn start_agent(&mut self, agent_bin: &Path, netctl_bin: &Path, host: &str) -> Result<()> {
        let log_path = self.agent_log();
        let log = fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let err_log = log
            .try_clone()
            .with_context(|| format!("reopening {}", log_path.display()))?;
        let socket = self.tmp_dir.join("agent.sock");
        // nsenter switches only the network namespace: `ip netns exec` would also give the agent
        // a fresh /sys, which hides the bpffs where it pins.
        let mut agent = cmd("nsenter");
        agent
            .arg(format!(
                "--net={}",
                Path::new(NETNS_DIR).join(host).display()
            ))
            .arg(agent_bin)
            .arg("--state-dir")
            .arg(self.tmp_dir.join("state"))
            .arg("--bpffs-dir")
            .arg(&self.pin_dir)
            .arg("--socket")
            .arg(&socket)
            .args(["--name-prefix", &agent_prefix(self.pid)])
            // An address nothing answers on, rather than the machine's resolvers: nothing the
            // bench makes may send traffic out of its namespaces (no query is made anyway).
            .args(["--dns-upstream", UNUSED_DNS_UPSTREAM])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log)
            // Its own process group: Ctrl-C reaches only xtask, which then removes the endpoints
            // through the still-running agent before stopping it.
            .process_group(0);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            agent.pre_exec(|| {
                // If xtask dies without cleaning up (SIGKILL), the agent goes too; its
                // namespaces are then swept by the next bench.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let line = display(&agent);
        println!("$ {line} &  # log: {}", log_path.display());
        let child = agent
            .spawn()
            .with_context(|| format!("could not start `{line}`"))?;
        self.agent = Some(AgentRun {
            process: ChildGuard::new("net-agent", child),
            netctl: netctl_bin.to_owned(),
            socket: socket.clone(),
            network: false,
            endpoints: Vec::new(),
        });

        let mut status = self.netctl_cmd(&["status"])?;
        let agent = self.agent.as_mut().context("the agent went missing")?;
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
        )
    }

    fn netctl_cmd(&self, args: &[&str]) -> Result<Command> {
        let agent = self
            .agent
            .as_ref()
            .context("netctl needs the bench's agent, which is not running")?;
        let mut netctl = cmd(&agent.netctl);
        netctl
            .arg("--socket")
            .arg(&agent.socket)
            .arg("--bpffs-dir")
            .arg(&self.pin_dir)
            .args(args);
        Ok(netctl)
    }

    fn netctl(&self, args: &[&str]) -> Result<()> {
        exec(&mut self.netctl_cmd(args)?)
    }

    /// The traffic of setup (c) must have gone through the programs: counted on the server's
    /// host veth in both directions. Otherwise (c) measured the host stack, not the data plane.
    pub fn check_agent_forwarded(&self) -> Result<()> {
        self.netctl(&["endpoint", "stats", "server"])?;
        let json =
            exec_output(&mut self.netctl_cmd(&["-o", "json", "endpoint", "stats", "server"])?)?;
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
                "setup c exchanged traffic but the programs counted {to} packets to its server \
                 and {from} from it: the measurement did not go through the data plane"
            );
        }
        Ok(())
    }

    /// Prints the last lines of the agent's log (after a failure).
    pub fn show_agent_log(&self) {
        if self.agent.is_none() {
            return;
        }
        let path = self.agent_log();
        let Ok(log) = fs::read_to_string(&path) else {
            return;
        };
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(30)..];
        println!("--- last {} lines of {}", tail.len(), path.display());
        for line in tail {
            println!("{line}");
        }
        println!("---");
    }

    /// Undoes everything, step by step, going on past failures; fails if any step failed.
    pub fn cleanup(&mut self) -> Result<()> {
        if self.cleaned {
            return Ok(());
        }
        self.cleaned = true;
        println!("\n== bench: cleaning up");
        let mut failures: Vec<String> = Vec::new();
        let mut note = |result: Result<()>| {
            if let Err(e) = result {
                println!("cleanup: {e:#}");
                failures.push(format!("{e:#}"));
            }
        };

        if let Some(mut agent) = self.agent.take() {
            let running = matches!(agent.process.try_wait(), Ok(None));
            if running {
                // Through the agent, so it removes the veths and map entries it made.
                let netctl = |args: &[&str]| {
                    let mut c = cmd(&agent.netctl);
                    c.arg("--socket")
                        .arg(&agent.socket)
                        .arg("--bpffs-dir")
                        .arg(&self.pin_dir)
                        .args(args);
                    exec(&mut c)
                };
                for name in agent.endpoints.iter().rev() {
                    note(netctl(&["endpoint", "rm", name]));
                }
                if agent.network {
                    note(netctl(&["network", "rm", NETWORK]));
                }
            }
            note(agent.process.stop());
        }
        // Deleting a namespace deletes its interfaces, so the tcx links on the agent's host
        // veths go with the host namespace.
        for ns in self.namespaces.drain(..).rev() {
            note(exec(cmd("ip").args(["netns", "del", &ns])));
        }
        // The pin directory is the agent's (it may never have made it); the temporary directory
        // is removed only if this run made it, not another run's with the same pid.
        for (dir, what, ours) in [
            (&self.pin_dir, "the pins", self.pin_dir.exists()),
            (&self.tmp_dir, "the files", self.tmp_dir_made),
        ] {
            if ours {
                println!("$ rm -r {}", dir.display());
                note(
                    fs::remove_dir_all(dir)
                        .with_context(|| format!("removing {what} under {}", dir.display())),
                );
            }
        }
        if !failures.is_empty() {
            bail!(
                "{} cleanup step(s) failed:\n  - {}",
                failures.len(),
                failures.join("\n  - ")
            );
        }
        Ok(())
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
    exec(cmd("ip").args(["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"]))?;
    exec(cmd("ip").args(["-n", ns, "link", "set", "eth0", "up"]))?;
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

/// The rules Docker (20.10 to 27) installs for one bridge network, for `iptables-restore`: the
/// FORWARD chain with its user, isolation and established-flow rules, the DOCKER chains, and the
/// MASQUERADE rule for traffic from the subnet leaving the bridge.
fn docker_rules(bridge: &str, subnet: &str) -> String {
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
-A DOCKER-ISOLATION-STAGE-1 -i {bridge} ! -o {bridge} -j DOCKER-ISOLATION-STAGE-2
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
-A DOCKER -i {bridge} -j RETURN
COMMIT
"
    )
}

/// The agent's name prefix: "bn" and the pid in base 36, within the agent's 8 characters for any
/// pid, and unlike the tests' "nt" and the demo's "dm".
fn agent_prefix(pid: u32) -> String {
    let mut digits = Vec::new();
    let mut n = pid;
    loop {
        digits.push(char::from_digit(n % 36, 36).unwrap_or('0'));
        n /= 36;
        if n == 0 {
            break;
        }
    }
    format!("bn{}", digits.iter().rev().collect::<String>())
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
    use super::agent_prefix;

    #[test]
    fn agent_prefix_fits_the_agent_limit_for_any_pid() {
        assert_eq!(agent_prefix(0), "bn0");
        assert_eq!(agent_prefix(36), "bn10");
        // Linux pids are at most 2^22 (PID_MAX_LIMIT): "bn" + 5 digits, within 8.
        assert_eq!(agent_prefix(1 << 22).len(), 7);
    }
}
