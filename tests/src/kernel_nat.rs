//! Docker's way of publishing ports, built inside one simulated host, as the reference that our
//! eBPF published ports and masquerade are compared with (`tests/tests/nat_differential.rs`).
//!
//! ```text
//!   <tag>-h1: uplink0 198.18.0.1/24          kbr0 10.30.0.1/24 (Linux bridge, the gateway)
//!             iptables: DNAT, MASQUERADE       |-- kveth0 (hairpin on) ==veth== eth0 in <tag>-h1-kweb
//!             ip_forward=1                     `-- kveth1 (hairpin on) ==veth== eth0 in <tag>-h1-kclient
//! ```
//!
//! The rules are the ones `dockerd --userland-proxy=false` (Docker 20.10 to 27) installs for a
//! bridge network with published ports; see moby's generated
//! `integration/network/bridge/iptablesdoc/generated/usernet-portmap-noproxy.md`. That mode,
//! not Docker's default, is the reference because it is the one where the kernel does all the
//! translation: with the userland proxy, a container reaching a published port of its own host
//! (hairpin) is served by `docker-proxy`, a user-space process, not by NAT. Compared with the
//! proxy mode:
//!
//! - the `DNAT` rule has no `! -i <bridge>` and the DOCKER chain has no `-i <bridge> -j RETURN`,
//!   so connections from the bridge's own endpoints to `HOSTIP:HOSTPORT` are translated too;
//! - `POSTROUTING` masquerades connections the host makes from one of its own addresses into
//!   the bridge (`-o <bridge> -m addrtype --src-type LOCAL`), so an endpoint sees the gateway as
//!   the peer of the host's own connections to a published port;
//! - a per-port `-s EP/32 -d EP/32 --dport PORT -j MASQUERADE` makes an endpoint's connection to
//!   its own published port come from the gateway: without it the connection would arrive with
//!   the endpoint's own address as its source, which the endpoint drops as a martian (and would
//!   answer over `lo`, past the reverse translation, if it took it);
//! - the bridge ports are in hairpin mode and bridged frames go through iptables
//!   (`net.bridge.bridge-nf-call-iptables=1`, br_netfilter, which this kernel has built in):
//!   a connection from an endpoint to a published port is translated in the *bridge's*
//!   PREROUTING hook and, its new destination being on the same bridge, bridged back out
//!   (br_netfilter's "bridged DNAT"); when that destination is the sender itself the frame leaves
//!   through the port it came in on, which a bridge does only in hairpin mode. Replies between two
//!   endpoints on the bridge are bridged, never routed, so only br_netfilter lets conntrack undo
//!   the translation on them.
//!
//! Everything is made inside the host's namespace and the endpoint namespaces, which carry the
//! topology's tag: the topology deletes them even when the test panics. Dropping a
//! [`KernelNatHost`] earlier removes what it made (endpoint namespaces, bridge, rules, sysctls).

use std::{fmt::Write as _, net::Ipv4Addr, process::Command};

use crate::{
    api::Proto,
    cmd::{COMMAND_TIMEOUT, CmdOutput, cmdline, run, run_command_input},
    netns::{
        add_netns, del_netns, exec_in, exec_in_ok, ip_json, kill_processes_in, netns_id, set_netns,
    },
    topology::Host,
    wait::{TIMEOUT, wait_until},
};

/// Name of the bridge in the host's namespace (Docker's `docker0`).
pub const BRIDGE: &str = "kbr0";

/// The sysctls the setup turns on in the host's namespace (value while it exists); the values
/// found before are put back on drop.
const HOST_SYSCTLS: &[&str] = &[
    // Docker turns forwarding on when it starts.
    "net.ipv4.ip_forward",
    // Docker loads br_netfilter and turns this on for --userland-proxy=false (see module docs).
    "net.bridge.bridge-nf-call-iptables",
];

/// One published port as Docker writes it into iptables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelPublished {
    pub host_port: u16,
    pub ip: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
}

/// An endpoint on the bridge: a namespace whose `eth0` is a veth into the bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelEndpoint {
    pub name: String,
    pub ip: Ipv4Addr,
    /// The endpoint's namespace name (under `/run/netns`).
    pub netns: String,
    /// The host-side veth (a port of [`BRIDGE`]).
    pub host_veth: String,
}

/// A host whose endpoints sit on a Linux bridge and whose published ports and masquerade are
/// iptables rules, as Docker without its userland proxy sets them up (see module docs).
pub struct KernelNatHost<'h> {
    host: &'h Host,
    subnet: Ipv4Addr,
    prefix_len: u8,
    gateway: Ipv4Addr,
    endpoints: Vec<KernelEndpoint>,
    published: Vec<KernelPublished>,
    /// `(name, value before)` of every sysctl changed in the host's namespace.
    saved_sysctls: Vec<(String, String)>,
}

impl<'h> KernelNatHost<'h> {
    /// Turns `host` into a Docker host with one bridge network: [`BRIDGE`] holding `gateway`
    /// on `subnet` (a CIDR such as `10.30.0.0/24`), forwarding on, bridged frames through
    /// iptables, and Docker's rules for the network loaded (no published port yet).
    pub fn new(host: &'h Host, subnet: &str, gateway: Ipv4Addr) -> KernelNatHost<'h> {
        let (subnet, prefix_len) = parse_cidr(subnet);
        assert!(
            in_subnet(gateway, subnet, prefix_len),
            "gateway {gateway} is outside {subnet}/{prefix_len}"
        );
        let mut kernel = KernelNatHost {
            host,
            subnet,
            prefix_len,
            gateway,
            endpoints: Vec::new(),
            published: Vec::new(),
            saved_sysctls: Vec::new(),
        };
        let netns = host.netns();
        assert!(
            std::path::Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables").exists(),
            "this kernel has no br_netfilter (`modprobe br_netfilter`): without it, Docker's \
             hairpin between endpoints of one bridge cannot work"
        );
        for name in HOST_SYSCTLS {
            let before = exec_in_ok(netns, &["sysctl", "-n", name]).trim().to_owned();
            kernel.saved_sysctls.push((name.to_string(), before));
            exec_in_ok(netns, &["sysctl", "-qw", &format!("{name}=1")]);
        }
        // A fixed MAC, as Docker gives its bridges: otherwise the bridge takes the lowest MAC
        // of its ports and changes it as ports come and go, under the endpoints' ARP caches.
        let [a, b, c, d] = gateway.octets();
        let mac = format!("02:42:{a:02x}:{b:02x}:{c:02x}:{d:02x}");
        ip(
            netns,
            &[
                "link", "add", "name", BRIDGE, "address", &mac, "type", "bridge",
            ],
        );
        ip(
            netns,
            &[
                "addr",
                "add",
                &format!("{gateway}/{prefix_len}"),
                "dev",
                BRIDGE,
            ],
        );
        ip(netns, &["link", "set", BRIDGE, "up"]);
        kernel.load_rules();
        kernel
    }

    /// Makes an endpoint namespace `<host netns>-k<name>` with `eth0` = `ip` on the bridge and
    /// a default route through the gateway, its bridge port in hairpin mode (as Docker sets it
    /// without the userland proxy). Returns the namespace's name.
    pub fn add_endpoint(&mut self, name: &str, ip_addr: Ipv4Addr) -> String {
        assert!(
            in_subnet(ip_addr, self.subnet, self.prefix_len) && ip_addr != self.gateway,
            "endpoint {name}: {ip_addr} is not a free address of {}/{}",
            self.subnet,
            self.prefix_len
        );
        assert!(
            self.endpoints
                .iter()
                .all(|e| e.name != name && e.ip != ip_addr),
            "endpoint {name} ({ip_addr}) clashes with {:?}",
            self.endpoints
        );
        let host = self.host.netns();
        // Starts with the host's namespace name, so with the topology's tag: deleted with it.
        let netns = format!("{host}-k{name}");
        let host_veth = format!("kveth{}", self.endpoints.len());
        add_netns(&netns);
        ip(
            host,
            &[
                "link", "add", "name", &host_veth, "type", "veth", "peer", "name", "eth0", "netns",
                &netns,
            ],
        );
        ip(host, &["link", "set", &host_veth, "master", BRIDGE]);
        ip(
            host,
            &[
                "link",
                "set",
                &host_veth,
                "type",
                "bridge_slave",
                "hairpin",
                "on",
            ],
        );
        ip(host, &["link", "set", &host_veth, "up"]);
        let cidr = format!("{ip_addr}/{}", self.prefix_len);
        ip(&netns, &["addr", "add", &cidr, "dev", "eth0"]);
        ip(&netns, &["link", "set", "eth0", "up"]);
        ip(
            &netns,
            &["route", "add", "default", "via", &self.gateway.to_string()],
        );
        // A link is usable only once the kernel's link watcher has seen its carrier (until
        // then its queue drops what it is given), and a bridge port passes frames only in the
        // forwarding state: wait for both rather than let a probe's first packet vanish.
        wait_link_ready(host, BRIDGE, None);
        wait_link_ready(host, &host_veth, Some("forwarding"));
        wait_link_ready(&netns, "eth0", None);
        self.endpoints.push(KernelEndpoint {
            name: name.to_owned(),
            ip: ip_addr,
            netns: netns.clone(),
            host_veth,
        });
        netns
    }

    /// Publishes `host_port`/`proto` on every address of the host to `ip`:`port` (which must
    /// be one of the endpoints), as `docker run -p host_port:port/proto` does, and reloads the
    /// rules.
    pub fn publish(&mut self, host_port: u16, ip_addr: Ipv4Addr, port: u16, proto: Proto) {
        assert!(
            self.endpoints.iter().any(|e| e.ip == ip_addr),
            "publishing {host_port}/{} to {ip_addr}: no endpoint has that address ({:?})",
            proto.name(),
            self.endpoints
        );
        assert!(
            !self
                .published
                .iter()
                .any(|p| p.host_port == host_port && p.proto == proto),
            "{host_port}/{} is published already",
            proto.name()
        );
        self.published.push(KernelPublished {
            host_port,
            ip: ip_addr,
            port,
            proto,
        });
        self.load_rules();
    }

    pub fn host(&self) -> &'h Host {
        self.host
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    pub fn endpoints(&self) -> &[KernelEndpoint] {
        &self.endpoints
    }

    /// The endpoint called `name`; panics listing the endpoints if there is none.
    pub fn endpoint(&self, name: &str) -> &KernelEndpoint {
        self.endpoints
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("no kernel endpoint {name}: {:?}", self.endpoints))
    }

    pub fn published(&self) -> &[KernelPublished] {
        &self.published
    }

    /// The rules as loaded, in `iptables-save` syntax (see [`docker_rules`]).
    pub fn rules(&self) -> String {
        docker_rules(
            BRIDGE,
            &format!("{}/{}", self.subnet, self.prefix_len),
            &self.published,
        )
    }

    /// What the kernel has, for failure messages: the rules with their packet counters, the
    /// conntrack table and the bridge ports' flags, all of the host's namespace.
    pub fn diagnostics(&self) -> String {
        let netns = self.host.netns();
        let mut text = String::new();
        for args in [
            &["iptables-save", "-c"][..],
            &["conntrack", "-L"],
            &["bridge", "-d", "link", "show"],
        ] {
            let out = exec_in(netns, args);
            let _ = writeln!(text, "$ {} (in {netns})", args.join(" "));
            let _ = writeln!(text, "{}{}", out.stdout, out.stderr);
        }
        text
    }

    /// Loads [`Self::rules`] with `iptables-restore` in the host's namespace, replacing the
    /// `filter` and `nat` tables there (as a whole, as Docker's rules are meant to be read).
    fn load_rules(&self) {
        let out = iptables_restore(self.host.netns(), &self.rules());
        assert!(
            out.success(),
            "loading Docker's rules into {}\n{out}\nrules:\n{}",
            self.host.netns(),
            self.rules()
        );
    }
}

impl Drop for KernelNatHost<'_> {
    /// Best effort and quiet (this may run while a test panics): the topology deletes the
    /// namespaces anyway; this only makes an early drop leave the host as it found it.
    fn drop(&mut self) {
        let host = self.host.netns();
        for endpoint in &self.endpoints {
            // A process left in a namespace would keep it alive after its name is gone.
            if let Some(id) = netns_id(&endpoint.netns) {
                kill_processes_in(id);
            }
            // The veth pair first, by its host end: that is synchronous. Deleting the namespace
            // would delete the pair too, but in the kernel's namespace clean-up, which runs
            // later, so the host end could still be listed after this drop.
            let _ = run("ip", &["-n", host, "link", "del", &endpoint.host_veth]);
            if let Some(problem) = del_netns(&endpoint.netns) {
                eprintln!("removing kernel endpoint {}: {problem}", endpoint.name);
            }
        }
        let _ = run("ip", &["-n", host, "link", "del", BRIDGE]);
        let _ = iptables_restore(host, EMPTY_TABLES);
        for (name, before) in &self.saved_sysctls {
            let _ = exec_in(host, &["sysctl", "-qw", &format!("{name}={before}")]);
        }
    }
}

/// `filter` and `nat` with nothing in them: loading this removes Docker's rules and chains.
const EMPTY_TABLES: &str = "*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
COMMIT
";

/// The `filter` and `nat` tables `dockerd --userland-proxy=false` installs for one bridge
/// network `bridge` on `subnet` with the ports in `published`, in `iptables-save` syntax.
///
/// `filter` is Docker 27's (FORWARD policy DROP, the DOCKER-USER and isolation chains, one
/// ACCEPT per published port for traffic coming from outside the bridge); Docker 28 only
/// regrouped the same decisions with an ipset. `nat` is the no-proxy variant described in the
/// module docs. Loopback addresses are left out of the OUTPUT jump (Docker 27 and earlier): no
/// probe uses them, and they would need `route_localnet` besides.
pub fn docker_rules(bridge: &str, subnet: &str, published: &[KernelPublished]) -> String {
    let mut filter_ports = String::new();
    let mut dnat = String::new();
    let mut self_masquerade = String::new();
    for p in published {
        let proto = p.proto.name();
        let _ = writeln!(
            filter_ports,
            "-A DOCKER -d {ip}/32 ! -i {bridge} -o {bridge} -p {proto} -m {proto} --dport {port} \
             -j ACCEPT",
            ip = p.ip,
            port = p.port,
        );
        let _ = writeln!(
            dnat,
            "-A DOCKER -p {proto} -m {proto} --dport {host_port} -j DNAT --to-destination \
             {ip}:{port}",
            host_port = p.host_port,
            ip = p.ip,
            port = p.port,
        );
        let _ = writeln!(
            self_masquerade,
            "-A POSTROUTING -s {ip}/32 -d {ip}/32 -p {proto} -m {proto} --dport {port} \
             -j MASQUERADE",
            ip = p.ip,
            port = p.port,
        );
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
{filter_ports}-A DOCKER-ISOLATION-STAGE-1 -i {bridge} ! -o {bridge} -j DOCKER-ISOLATION-STAGE-2
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
-A POSTROUTING -o {bridge} -m addrtype --src-type LOCAL -j MASQUERADE
-A POSTROUTING -s {subnet} ! -o {bridge} -j MASQUERADE
{self_masquerade}{dnat}COMMIT
"
    )
}

/// `iptables-restore` with `rules` on its stdin, run in `netns` only: the child switches its
/// network namespace before exec (and fails to start if it cannot), so the rules can never
/// land in the machine's own tables.
fn iptables_restore(netns: &str, rules: &str) -> CmdOutput {
    let mut command = Command::new("iptables-restore");
    set_netns(&mut command, netns);
    let line = format!(
        "(in {netns}) {}",
        cmdline("iptables-restore", &[] as &[&str])
    );
    run_command_input(&mut command, line, COMMAND_TIMEOUT, Some(rules.as_bytes()))
}

/// Waits until `dev` in `netns` is operationally up and, for a bridge port, in `bridge_state`.
fn wait_link_ready(netns: &str, dev: &str, bridge_state: Option<&str>) {
    let what = match bridge_state {
        Some(state) => format!("bridge port {dev} in {netns} to be up and {state}"),
        None => format!("{dev} in {netns} to be up"),
    };
    wait_until(TIMEOUT, what, || {
        let json = ip_json(netns, &["-d", "link", "show", "dev", dev]);
        let link = &json[0];
        link["operstate"] == "UP"
            && bridge_state
                .is_none_or(|state| link["linkinfo"]["info_slave_data"]["state"] == state)
    });
}

/// `ip -n <netns> <args>`, panicking with the output unless it succeeded.
fn ip(netns: &str, args: &[&str]) {
    let mut full = vec!["-n", netns];
    full.extend_from_slice(args);
    let out = run("ip", &full);
    assert!(
        out.success(),
        "building the kernel NAT host: command failed\n{out}"
    );
}

/// `a.b.c.d/len` as (network address, length); panics unless it is a canonical IPv4 CIDR.
fn parse_cidr(cidr: &str) -> (Ipv4Addr, u8) {
    let parsed = cidr.split_once('/').and_then(|(addr, len)| {
        let addr: Ipv4Addr = addr.parse().ok()?;
        let len: u8 = len.parse().ok().filter(|l| *l <= 32)?;
        Some((addr, len))
    });
    let (addr, len) = parsed.unwrap_or_else(|| panic!("{cidr:?} is not an IPv4 CIDR"));
    assert_eq!(
        u32::from(addr) & mask(len),
        u32::from(addr),
        "{cidr} has host bits set"
    );
    (addr, len)
}

fn mask(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

fn in_subnet(ip_addr: Ipv4Addr, subnet: Ipv4Addr, len: u8) -> bool {
    u32::from(ip_addr) & mask(len) == u32::from(subnet)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        netns::{links, list_netns},
        topology::Topology,
    };

    #[test]
    fn cidr_parsing_and_membership() {
        assert_eq!(
            parse_cidr("10.30.0.0/24"),
            (Ipv4Addr::new(10, 30, 0, 0), 24)
        );
        assert!(in_subnet(
            Ipv4Addr::new(10, 30, 0, 9),
            Ipv4Addr::new(10, 30, 0, 0),
            24
        ));
        assert!(!in_subnet(
            Ipv4Addr::new(10, 30, 1, 9),
            Ipv4Addr::new(10, 30, 0, 0),
            24
        ));
        assert_eq!(mask(0), 0);
        assert_eq!(mask(32), u32::MAX);
    }

    #[test]
    fn rules_have_one_dnat_accept_and_self_masquerade_per_port() {
        let rules = docker_rules(
            "kbr0",
            "10.30.0.0/24",
            &[KernelPublished {
                host_port: 5353,
                ip: Ipv4Addr::new(10, 30, 0, 2),
                port: 53,
                proto: Proto::Udp,
            }],
        );
        for line in [
            "-A DOCKER -p udp -m udp --dport 5353 -j DNAT --to-destination 10.30.0.2:53",
            "-A DOCKER -d 10.30.0.2/32 ! -i kbr0 -o kbr0 -p udp -m udp --dport 53 -j ACCEPT",
            "-A POSTROUTING -s 10.30.0.2/32 -d 10.30.0.2/32 -p udp -m udp --dport 53 -j MASQUERADE",
            "-A POSTROUTING -s 10.30.0.0/24 ! -o kbr0 -j MASQUERADE",
        ] {
            assert!(
                rules.lines().any(|l| l == line),
                "missing {line:?} in\n{rules}"
            );
        }
    }

    #[test]
    fn dropping_removes_what_it_made_and_restores_the_sysctls() {
        let topo = Topology::new(1);
        let host = topo.host(1);
        let sysctls = || {
            HOST_SYSCTLS
                .iter()
                .map(|name| exec_in_ok(host.netns(), &["sysctl", "-n", name]))
                .collect::<Vec<_>>()
        };
        let links_before = links(host.netns());
        let sysctls_before = sysctls();
        {
            let mut kernel = KernelNatHost::new(host, "10.30.0.0/24", Ipv4Addr::new(10, 30, 0, 1));
            let web = kernel.add_endpoint("web", Ipv4Addr::new(10, 30, 0, 2));
            kernel.publish(8080, Ipv4Addr::new(10, 30, 0, 2), 80, Proto::Tcp);
            assert_eq!(list_netns(&format!("{}-k", host.netns())), vec![web]);
            assert!(
                exec_in_ok(host.netns(), &["iptables-save", "-t", "nat"])
                    .contains("--to-destination 10.30.0.2:80"),
                "the DNAT rule was not loaded"
            );
        }
        assert_eq!(
            list_netns(&format!("{}-k", host.netns())),
            Vec::<String>::new()
        );
        assert_eq!(links(host.netns()), links_before);
        assert_eq!(sysctls(), sysctls_before);
        let save = exec_in_ok(host.netns(), &["iptables-save"]);
        assert!(
            !save.contains("DOCKER") && !save.contains("MASQUERADE"),
            "rules left behind:\n{save}"
        );
    }
}
