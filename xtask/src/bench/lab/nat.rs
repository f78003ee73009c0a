//! The NAT setups: a host namespace with an uplink to an "outside" namespace and endpoints
//! behind it, translated Docker's way or ours.
//!
//! ```text
//! outside eth0 .2 ==veth== up0 .1 [host] -- web .3  (HOST_PORT published to PORT)
//!                                        `- app .2  (connects out, masqueraded)
//! (b) host: Linux bridge br0 (the gateway) + Docker's iptables rules: DNAT for the published
//!     port in the nat DOCKER chain, MASQUERADE for the subnet; bridged packets skip iptables as
//!     in (b) of the forwarding rows. Variants for the scale rows put N DNAT rules in the chain
//!     (the measured mapping last), or leave the DNAT to an nftables map of N elements.
//! (c) host: net-agent with `--uplink up0`; web is created with `--publish HOST_PORT:PORT`.
//! ```
//!
//! Outside reaches the published port at the host's uplink address; the endpoints reach the
//! outside through their default route, masqueraded to the same address. Nothing outside the
//! bench's namespaces is involved: the outside namespace has no other link.

use std::{net::Ipv4Addr, path::Path, time::Duration};

use anyhow::Result;

use super::{
    AgentId, BRIDGE, DockerPorts, Firewall, Lab, Subnet, bridge, bridge_port, configure_link,
    docker_rules,
};
use crate::{
    bench::{
        scale::filler,
        traffic::{Pair, Via},
    },
    exec::{cmd, exec},
};

/// The host port published, and the endpoint port it goes to (`--publish 8080:80`).
pub const HOST_PORT: u16 = 8080;
pub const PORT: u16 = 80;
/// The uplink's name in every NAT host.
const UPLINK: &str = "up0";
/// A host with an uplink, a published endpoint and (for the main rows) an endpoint that
/// connects out.
pub struct NatSetup {
    pub key: &'static str,
    pub label: &'static str,
    pub host_ns: String,
    pub host_ip: Ipv4Addr,
    pub outside_ns: String,
    pub outside_ip: Ipv4Addr,
    pub web_ns: String,
    pub web_ip: Ipv4Addr,
    /// The endpoint whose connections to the outside are masqueraded.
    pub app: Option<(String, Ipv4Addr)>,
    /// The agent, for ours.
    pub agent: Option<AgentId>,
    /// How a Docker-style host translates, and how long loading its rules took.
    pub firewall: Option<(Firewall, Duration)>,
}

impl NatSetup {
    /// Outside to the published port.
    pub fn published(&self) -> Pair<'_> {
        Pair {
            client_ns: &self.outside_ns,
            server_ns: &self.web_ns,
            server_ip: self.web_ip,
            via: Via::Published {
                host: self.host_ip,
                host_port: HOST_PORT,
                port: PORT,
            },
        }
    }

    /// The app endpoint to a server outside.
    pub fn masquerade(&self) -> Option<Pair<'_>> {
        self.app.as_ref().map(|(ns, _)| Pair {
            client_ns: ns,
            server_ns: &self.outside_ns,
            server_ip: self.outside_ip,
            via: Via::Direct,
        })
    }
}

/// What a Docker-style NAT host gets.
pub struct DockerNat<'a> {
    /// Names its namespaces.
    pub name: &'a str,
    /// Its key and label in the report.
    pub key: &'static str,
    pub label: &'static str,
    /// Picks its two subnets; unique per setup.
    pub index: u8,
    pub firewall: Firewall,
    /// Mappings installed before the measured one.
    pub fillers: u32,
    /// Whether to add the app endpoint (masquerade rows).
    pub app: bool,
}

impl Lab {
    /// The uplink of `host` (`up0`, the subnet's first address) and the outside namespace
    /// behind it (the second), where the TIME_WAIT sockets of the servers it runs are not kept
    /// (see `traffic::tcp_crr`).
    fn uplink(&mut self, key: &str, host: &str, subnet: &Subnet) -> Result<String> {
        let outside = self.netns(&format!("{key}-out"), &["net.ipv4.tcp_max_tw_buckets=0"])?;
        exec(cmd("ip").args([
            "-n", host, "link", "add", UPLINK, "type", "veth", "peer", "name", "eth0", "netns",
            &outside,
        ]))?;
        configure_link(host, UPLINK, subnet.gateway(), None)?;
        configure_link(&outside, "eth0", subnet.host(2), None)?;
        Ok(outside)
    }

    /// The published endpoint (a server) and, if asked, the app endpoint (a client).
    fn nat_endpoints(&mut self, key: &str, app: bool) -> Result<(String, Option<String>)> {
        let web = self.netns(&format!("{key}-web"), &["net.ipv4.tcp_max_tw_buckets=0"])?;
        let app = if app {
            Some(self.netns(&format!("{key}-app"), &[])?)
        } else {
            None
        };
        Ok((web, app))
    }

    /// (b) and the kernel rows of the scale section: Docker's bridge and rules, with the
    /// published port's DNAT done by iptables (N rules, the measured one last) or by an nftables
    /// map of N elements.
    pub fn docker_nat(&mut self, spec: &DockerNat<'_>) -> Result<NatSetup> {
        let (uplink, network) = subnets(spec.index);
        let key = spec.name;
        let host = self.docker_host(&format!("{key}-host"), false)?;
        let outside = self.uplink(key, &host, &uplink)?;
        let (web, app) = self.nat_endpoints(key, spec.app)?;
        bridge(&host, &network)?;
        bridge_port(&host, "veth-web", &web, network.server(), &network)?;
        if let Some(app) = &app {
            bridge_port(&host, "veth-app", app, network.client(), &network)?;
        }
        let target = (network.server(), PORT);
        let mut dnat: Vec<(Option<Ipv4Addr>, u16)> = Vec::new();
        if spec.firewall == Firewall::Iptables {
            dnat.reserve(spec.fillers as usize + 1);
            dnat.extend((0..spec.fillers).map(|i| {
                let (address, port) = filler(i);
                (Some(address), port)
            }));
            dnat.push((None, HOST_PORT));
        }
        let rules = docker_rules(
            BRIDGE,
            &network.cidr(),
            &DockerPorts {
                target: Some(target),
                dnat: &dnat,
            },
        );
        let mut load = self.load_rules(
            &host,
            &format!("{key}-iptables"),
            Firewall::Iptables,
            &rules,
        )?;
        if spec.firewall == Firewall::Nft {
            let rules = nft_map_rules(spec.fillers, (uplink.gateway(), HOST_PORT), target);
            load = self.load_rules(&host, &format!("{key}-nft"), Firewall::Nft, &rules)?;
        }
        Ok(NatSetup {
            key: spec.key,
            label: spec.label,
            host_ns: host,
            host_ip: uplink.gateway(),
            outside_ns: outside,
            outside_ip: uplink.host(2),
            web_ns: web,
            web_ip: network.server(),
            app: app.map(|ns| (ns, network.client())),
            agent: None,
            firewall: Some((spec.firewall, load)),
        })
    }

    /// (c) Ours: net-agent told its uplink, the web endpoint created with `--publish`.
    pub fn ours_nat(&mut self, agent_bin: &Path, netctl_bin: &Path, index: u8) -> Result<NatSetup> {
        let (uplink, network) = subnets(index);
        let key = "cnat";
        let host = self.netns(&format!("{key}-host"), &[])?;
        let outside = self.uplink(key, &host, &uplink)?;
        let (web, app) = self.nat_endpoints(key, true)?;
        let agent = self.start_agent(key, agent_bin, netctl_bin, &host, &["--uplink", UPLINK])?;
        self.create_network(agent, &network)?;
        let publish = format!("{HOST_PORT}:{PORT}");
        self.adopt_endpoint(
            agent,
            "web",
            &web,
            network.server(),
            &["--publish", &publish],
        )?;
        if let Some(app) = &app {
            self.adopt_endpoint(agent, "app", app, network.client(), &[])?;
        }
        Ok(NatSetup {
            key: "c",
            label: "ours: net-agent, DNAT / masquerade in tcx + bpf_redirect_peer",
            host_ns: host,
            host_ip: uplink.gateway(),
            outside_ns: outside,
            outside_ip: uplink.host(2),
            web_ns: web,
            web_ip: network.server(),
            app: app.map(|ns| (ns, network.client())),
            agent: Some(agent),
            firewall: None,
        })
    }
}

/// The uplink subnet and the endpoints' subnet of NAT setup `index`.
fn subnets(index: u8) -> (Subnet, Subnet) {
    (Subnet(10 + 2 * index), Subnet(11 + 2 * index))
}

/// An nftables table whose map sends `fillers` filler mappings and then `published` to
/// `target`, for `nft -f`: one lookup per new connection, whatever the number of elements.
/// Docker's `! -i <bridge>` is kept; the filter side stays Docker's iptables rules.
pub fn nft_map_rules(
    fillers: u32,
    published: (Ipv4Addr, u16),
    (ip, port): (Ipv4Addr, u16),
) -> String {
    let mut elements: Vec<String> = (0..fillers)
        .map(|i| {
            let (address, host_port) = filler(i);
            format!("{address} . {host_port} : {ip} . {port}")
        })
        .collect();
    elements.push(format!("{} . {} : {ip} . {port}", published.0, published.1));
    format!(
        "table ip {NFT_TABLE} {{
  map {NFT_MAP} {{
    type ipv4_addr . inet_service : ipv4_addr . inet_service
    elements = {{ {} }}
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname != \"{BRIDGE}\" dnat ip addr . port to ip daddr . tcp dport map @{NFT_MAP}
  }}
}}
",
        elements.join(", ")
    )
}

pub const NFT_TABLE: &str = "bench_dnat";
pub const NFT_MAP: &str = "published";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nft_map_holds_the_fillers_then_the_published_port() {
        let rules = nft_map_rules(
            2,
            (Ipv4Addr::new(198, 19, 10, 1), HOST_PORT),
            (Ipv4Addr::new(198, 19, 11, 3), PORT),
        );
        assert!(rules.contains(
            "elements = { 198.19.250.1 . 10000 : 198.19.11.3 . 80, 198.19.250.1 . 10001 : \
             198.19.11.3 . 80, 198.19.10.1 . 8080 : 198.19.11.3 . 80 }"
        ));
    }
}
