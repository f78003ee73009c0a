//! The agent's API: one JSON request per connection line on a root-only Unix socket, one JSON
//! reply line back. These types are also what `netctl ... -o json` prints, so scripts and tests
//! see exactly what the agent answered.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// Where `net-agent` listens and `netctl` connects unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/net-agent/agent.sock";
/// Where the agent pins its maps and links unless told otherwise.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/net-agent";
/// Where the agent keeps its store unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/net-agent";
/// Prefix of the names the agent gives host-side veths and the namespaces it makes.
pub const DEFAULT_NAME_PREFIX: &str = "nd";
/// The network the agent creates on first start, as Docker's `bridge`; it has no name
/// resolution, as in Docker.
pub const DEFAULT_NETWORK: &str = "default";
pub const DEFAULT_NETWORK_SUBNET: &str = "172.17.0.0/16";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    NetworkCreate {
        name: String,
        /// The subnet; for an overlay network, the cluster-wide pool.
        subnet: String,
        /// `bridge` (default: this host only) or `overlay` (across the cluster).
        #[serde(default)]
        driver: Option<String>,
        /// Overlay networks: the prefix length of each host's subnet (default 24).
        #[serde(default)]
        subnet_len: Option<u8>,
        gateway: Option<String>,
        mtu: Option<u32>,
        /// Masquerade traffic leaving through the uplink (default: yes).
        #[serde(default)]
        masquerade: Option<bool>,
        /// Endpoints may talk to each other (default: yes); bridge networks only.
        #[serde(default)]
        icc: Option<bool>,
        /// Internal: endpoints reach each other and the host, nothing beyond (default: no);
        /// bridge networks only.
        #[serde(default)]
        internal: Option<bool>,
    },
    NetworkList,
    NetworkInspect {
        name: String,
    },
    NetworkRemove {
        name: String,
    },
    EndpointCreate {
        name: String,
        /// `bridge` (the default), `none`, `host` or `container:<endpoint>`.
        #[serde(default)]
        mode: Option<String>,
        /// The network of a bridge-mode endpoint (default: `default`).
        #[serde(default)]
        network: Option<String>,
        #[serde(default)]
        ip: Option<String>,
        /// Adopt this existing namespace instead of making one.
        #[serde(default)]
        netns: Option<String>,
        #[serde(default)]
        aliases: Vec<String>,
        /// Ports to publish, as `netctl` parsed them from `--publish`.
        #[serde(default)]
        publish: Vec<PortSpec>,
        /// Who may reach those ports (CIDRs); empty: anyone.
        #[serde(default)]
        allow: Vec<String>,
    },
    EndpointList,
    EndpointInspect {
        name: String,
    },
    EndpointRemove {
        name: String,
        /// Also when other endpoints share its namespace (their records go with it).
        #[serde(default)]
        force: bool,
    },
    EndpointStats {
        name: String,
    },
    /// Give a running endpoint a further interface on `network`.
    NetworkConnect {
        network: String,
        endpoint: String,
        #[serde(default)]
        ip: Option<String>,
        #[serde(default)]
        aliases: Vec<String>,
    },
    NetworkDisconnect {
        network: String,
        endpoint: String,
    },
    /// Publish further ports of a running endpoint. All or nothing.
    PortPublish {
        endpoint: String,
        ports: Vec<PortSpec>,
        #[serde(default)]
        allow: Vec<String>,
    },
    /// Withdraw published ports (matched by host address, host port and protocol). All or
    /// nothing.
    PortUnpublish {
        endpoint: String,
        ports: Vec<PortSpec>,
    },
    /// Published ports, of one endpoint or of all.
    PortList {
        #[serde(default)]
        endpoint: Option<String>,
    },
    /// Import an `iptables-save` nat table (the text itself: the agent reads no files).
    NatImport {
        rules: String,
        #[serde(default)]
        dry_run: bool,
    },
    /// The data plane's NAT as an `iptables-save` nat table.
    NatExport,
    /// Every host's subnet leases on the overlay networks.
    HostList,
}

/// One host's lease on one overlay network (`netctl host ls`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostLease {
    pub host: String,
    /// The lease is this agent's.
    pub this_host: bool,
    pub network: String,
    pub subnet: String,
    pub vtep: Ipv4Addr,
    pub expires_in_secs: u64,
}

/// One decoded entry of the pinned REMOTE_ROUTES map (`netctl bpf routes list`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BpfRouteEntry {
    pub subnet: String,
    /// `None`: the part of a pool no host leases, which is unreachable.
    pub vtep: Option<Ipv4Addr>,
    pub vni: u32,
}

/// IP protocol of a published port.
#[derive(
    Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    #[default]
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }
}

/// One `--publish [HOSTIP:]HOSTPORT[-END]:PORT[-END][/PROTO]` as given (see
/// [`crate::publish::parse_spec`]); a range publishes one port per position.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortSpec {
    /// `None`: every address of the host.
    pub host_ip: Option<Ipv4Addr>,
    /// First and last host port (equal for one port).
    pub host_ports: (u16, u16),
    /// First and last endpoint port; for unpublishing, ignored.
    pub ports: (u16, u16),
    pub proto: Proto,
}

/// One published port: `host_ip:host_port/proto` on the host goes to `ip:port` of `endpoint`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PublishedPort {
    pub endpoint: String,
    /// `None`: every address of the host.
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub proto: Proto,
    /// The endpoint's address (on its first interface) and port.
    pub ip: Ipv4Addr,
    pub port: u16,
    /// Sources allowed to reach it (CIDRs); empty: anyone.
    pub allow: Vec<String>,
}

/// One reply line: exactly one of the two fields is present.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Network {
    pub name: String,
    /// Stable id carried in the data plane's endpoint entries (isolation compares it); for an
    /// overlay network, its VNI with the top bit set, the same on every host.
    pub id: u32,
    /// `bridge` or `overlay`.
    #[serde(default)]
    pub driver: String,
    /// This host's subnet (of an overlay network: its lease).
    pub subnet: String,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
    pub masquerade: bool,
    /// Its endpoints may talk to each other (`--no-icc`: no).
    #[serde(default = "yes")]
    pub icc: bool,
    /// Its endpoints reach each other and the host, nothing beyond (`--internal`).
    #[serde(default)]
    pub internal: bool,
    /// Overlay networks: the cluster-wide pool and the VNI.
    #[serde(default)]
    pub pool: Option<String>,
    #[serde(default)]
    pub vni: Option<u32>,
    /// Names of the endpoints on this network, sorted.
    pub endpoints: Vec<String>,
    /// Overlay networks: the other hosts' endpoints on it that this host's DNS resolves (those
    /// of current lease holders, in their subnets), by host then name.
    #[serde(default)]
    pub remote_endpoints: Vec<RemoteEndpoint>,
}

/// An endpoint of another host on an overlay network, as that host published it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RemoteEndpoint {
    pub name: String,
    pub ip: Ipv4Addr,
    pub aliases: Vec<String>,
    pub host: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Endpoint {
    pub name: String,
    pub id: u32,
    /// `bridge`, `none`, `host` or `container:<owner>`.
    pub mode: String,
    /// Path of the endpoint's network namespace (empty in host mode).
    pub netns: String,
    /// True when the agent made the namespace (and so deletes it with the endpoint).
    pub netns_owned: bool,
    /// One per connected network, eth0 first.
    pub interfaces: Vec<Interface>,
    /// Its published ports.
    #[serde(default)]
    pub published: Vec<PublishedPort>,
}

impl Endpoint {
    /// The first interface (eth0), which carries the default route.
    pub fn primary(&self) -> Option<&Interface> {
        self.interfaces.first()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Interface {
    pub network: String,
    pub ip: Ipv4Addr,
    /// Prefix length of the network, as configured on the interface.
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    pub mac: String,
    /// Interface name inside the namespace.
    pub ifname: String,
    /// Host-side veth.
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub host_mac: String,
    pub aliases: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DropCount {
    /// Stable reason name, or `"unknown-<code>"` for a code this build does not know.
    pub reason: String,
    pub code: u32,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointStats {
    pub name: String,
    /// Sent by the endpoint and let through.
    pub from_endpoint: Counter,
    /// Delivered to the endpoint (by another endpoint or by the host).
    pub to_endpoint: Counter,
    /// Dropped, per reason, both directions.
    pub drops: Vec<DropCount>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    pub version: String,
    pub networks: usize,
    pub endpoints: usize,
    pub state_dir: String,
    pub bpffs_dir: String,
    pub programs: Vec<String>,
    /// Masquerade through the uplink; absent when NAT is off (no uplink).
    pub nat: Option<NatStatus>,
    /// The overlay: this host's name in the cluster, the cluster store, and what the VXLAN
    /// device's program dropped (overlay-bad-source: VXLAN from a host that holds no lease for
    /// the source's subnet, ...).
    #[serde(default)]
    pub overlay: Option<OverlayStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OverlayStatus {
    pub host_name: String,
    pub store: String,
    /// This host's VXLAN device, once an overlay network needed it.
    pub vxlan: Option<String>,
    /// Packets that device has received: those the uplink left to it rather than decapsulating
    /// them itself (see `tc_from_netdev`), refused ones included.
    #[serde(default)]
    pub vxlan_rx_packets: Option<u64>,
    pub drops: Vec<DropCount>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NatStatus {
    pub uplink: String,
    pub host_ip: Ipv4Addr,
    pub port_min: u16,
    pub port_max: u16,
    /// Conntrack entries in use (two per flow) and the table's capacity.
    pub conntrack_entries: usize,
    pub conntrack_capacity: u32,
    pub flows_created: u64,
    /// New flows whose first port choice collided (a free one was found after).
    pub port_retries: u64,
    /// New flows dropped: no free port towards their destination.
    pub ports_exhausted: u64,
    /// New flows dropped: the conntrack table was full.
    pub table_full: u64,
    /// Packets the uplink programs dropped, by reason (conntrack-full, nat-ports-exhausted,
    /// fragment, not-allowed, ...).
    pub uplink_drops: Vec<DropCount>,
    /// Published ports installed in the data plane.
    #[serde(default)]
    pub published_ports: usize,
    /// New connections to published ports.
    #[serde(default)]
    pub published_flows: u64,
    /// New TCP connections that took over the translated tuple of a closed one.
    #[serde(default)]
    pub closed_reused: u64,
    /// Packets the loopback program dropped (the host's own connections to published ports:
    /// not-allowed, conntrack-full, ...).
    #[serde(default)]
    pub loopback_drops: Vec<DropCount>,
}

/// One decoded entry of the pinned ENDPOINTS map (`netctl bpf endpoints list`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BpfEndpointEntry {
    pub ip: Ipv4Addr,
    pub ifindex: u32,
    pub network_id: u32,
    pub gateway: Ipv4Addr,
    pub mac: String,
    pub host_mac: String,
    /// Where its veth's traffic counters are in ENDPOINT_TRAFFIC (the veth's ENDPOINT_SLOTS
    /// entry).
    pub slot: u32,
    /// The `ENDPOINT_F_*` bits set, by name (`masquerade`, `published`, `overlay`, `no-icc`;
    /// `unknown-0x..` for bits this build does not know).
    #[serde(default)]
    pub flags: Vec<String>,
}

/// The decoded counter maps (`netctl bpf counters list`): ENDPOINT_TRAFFIC through
/// ENDPOINT_SLOTS, ENDPOINT_DROPS, NAT_STATS and OVERLAY, all summed over CPUs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BpfCounters {
    /// Each endpoint veth that holds a counter slot, by ifindex.
    pub traffic: Vec<BpfTraffic>,
    /// By the interface that dropped (an endpoint veth, the uplink, the loopback, the VXLAN
    /// device), then reason.
    pub drops: Vec<BpfDrops>,
    /// NAT events, by name (as `netctl status` names them).
    pub nat: Vec<BpfNatEvent>,
    /// The VXLAN device's ifindex; 0 until an overlay network needs one.
    pub vxlan_ifindex: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BpfTraffic {
    /// Host-side veth.
    pub ifindex: u32,
    pub slot: u32,
    pub from_endpoint: Counter,
    pub to_endpoint: Counter,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BpfDrops {
    pub ifindex: u32,
    pub reason: String,
    pub code: u32,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BpfNatEvent {
    pub name: String,
    pub count: u64,
}

/// What `nat import` did (or, with `dry_run`, would do), rule by rule.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NatImport {
    pub dry_run: bool,
    /// Ports published, one line per port.
    pub publish: Vec<NatImportLine>,
    /// Networks switched to masquerade.
    pub masquerade: Vec<NatImportLine>,
    /// Rules that needed nothing: the data plane does it already (hairpin NAT, a port or a
    /// masquerade in place).
    pub covered: Vec<crate::iptables::SkippedRule>,
    /// Rules left out, with why.
    pub skipped: Vec<crate::iptables::SkippedRule>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NatImportLine {
    /// Where the rule is in the input (1-based), and the rule.
    pub line: usize,
    pub rule: String,
    /// What the data plane got for it.
    pub action: String,
    /// Where that differs from what the rule did.
    pub note: Option<String>,
}

/// One decoded entry of the pinned PUBLISHED map, with its allow list (`netctl bpf nat list`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BpfPublishedEntry {
    /// `None`: every address of the host.
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub proto: String,
    pub ip: Ipv4Addr,
    pub port: u16,
    pub id: u32,
    pub allow: Vec<String>,
}

impl From<&crate::datapath::PublishedEntry> for BpfPublishedEntry {
    fn from(e: &crate::datapath::PublishedEntry) -> Self {
        Self {
            host_ip: Some(Ipv4Addr::from(e.key.addr)).filter(|ip| !ip.is_unspecified()),
            host_port: u16::from_be_bytes(e.key.port),
            proto: crate::conntrack::proto_name(e.key.proto),
            ip: Ipv4Addr::from(e.target.addr),
            port: u16::from_be_bytes(e.target.port),
            id: e.target.id,
            allow: e.allow.iter().map(|n| n.to_string()).collect(),
        }
    }
}

/// Serde's default for flags that are on unless a peer says otherwise.
fn yes() -> bool {
    true
}

pub fn format_mac(mac: [u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}
