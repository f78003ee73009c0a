//! Plain-old-data types shared by the eBPF programs (`net-ebpf`) and user space (`net-agent`).
//!
//! Everything here is `#[repr(C)]`, `Copy`, built from fixed-width integers and byte arrays, with
//! explicit padding fields so that no byte of a map key or value is left uninitialised (the kernel
//! hashes and compares every byte of a key). Byte order is stated on every field that carries an
//! address or port. Each map type has a compile-time size assertion: a change of layout must be a
//! deliberate change of [`PIN_LAYOUT_VERSION`], since pinned maps are reused across agent restarts.
#![no_std]

/// Version of the layout of every pinned map. Pinned maps are reused as they are on agent start,
/// with no layout check by the kernel, so the agent pins under a directory named after this
/// version: a layout change must bump it, and the new agent then starts from fresh maps.
pub const PIN_LAYOUT_VERSION: u32 = 5;

/// Names of the maps, as declared in `net-ebpf` and pinned by the agent under
/// `<bpffs dir>/v<PIN_LAYOUT_VERSION>/maps/<name>`.
pub mod map_names {
    pub const ENDPOINTS: &str = "ENDPOINTS";
    pub const ENDPOINT_TRAFFIC: &str = "ENDPOINT_TRAFFIC";
    pub const ENDPOINT_SLOTS: &str = "ENDPOINT_SLOTS";
    pub const ENDPOINT_DROPS: &str = "ENDPOINT_DROPS";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const NAT_STATS: &str = "NAT_STATS";
    pub const PUBLISHED: &str = "PUBLISHED";
    pub const PUBLISHED_ALLOW: &str = "PUBLISHED_ALLOW";
    pub const REMOTE_ROUTES: &str = "REMOTE_ROUTES";
    pub const OVERLAY: &str = "OVERLAY";
    /// Every map the agent pins, in one list so nothing is forgotten.
    pub const ALL: &[&str] = &[
        ENDPOINTS,
        ENDPOINT_TRAFFIC,
        ENDPOINT_SLOTS,
        ENDPOINT_DROPS,
        CONNTRACK,
        NAT_STATS,
        PUBLISHED,
        PUBLISHED_ALLOW,
        REMOTE_ROUTES,
        OVERLAY,
    ];
}

/// Names of the programs, each named by hook and direction as seen from the endpoint.
pub mod program_names {
    /// tcx ingress of an endpoint's host-side veth: everything the endpoint sends.
    pub const TC_FROM_ENDPOINT: &str = "tc_from_endpoint";
    /// tcx egress of an endpoint's host-side veth: what the host stack sends to the endpoint
    /// (endpoint-to-endpoint traffic skips it through `bpf_redirect_peer`).
    pub const TC_TO_ENDPOINT: &str = "tc_to_endpoint";
    /// tcx ingress of the host's uplink: connections to published ports are translated to
    /// their endpoint, replies to masqueraded flows (and the ICMP errors about them) are
    /// translated back; both are delivered straight to the endpoint.
    pub const TC_FROM_NETDEV: &str = "tc_from_netdev";
    /// tcx egress of the host's uplink: endpoint traffic leaving the host is masqueraded, and
    /// replies from published ports get the host's address back as their source.
    pub const TC_TO_NETDEV: &str = "tc_to_netdev";
    /// tcx ingress of the host's loopback: the host's own connections to published ports.
    pub const TC_FROM_HOST: &str = "tc_from_host";
    /// tcx ingress of the host's VXLAN device (collect-metadata): decapsulated overlay
    /// traffic, checked against the leases and delivered to its endpoint.
    pub const TC_FROM_OVERLAY: &str = "tc_from_overlay";
    pub const ALL: &[&str] = &[
        TC_FROM_ENDPOINT,
        TC_TO_ENDPOINT,
        TC_FROM_NETDEV,
        TC_TO_NETDEV,
        TC_FROM_HOST,
        TC_FROM_OVERLAY,
    ];
    /// What every endpoint veth gets.
    pub const ENDPOINT: &[&str] = &[TC_FROM_ENDPOINT, TC_TO_ENDPOINT];
    /// What the uplink gets when NAT is on.
    pub const UPLINK: &[&str] = &[TC_FROM_NETDEV, TC_TO_NETDEV];
    /// What the host's loopback gets.
    pub const LOOPBACK: &[&str] = &[TC_FROM_HOST];
    /// What the host's VXLAN device gets.
    pub const OVERLAY: &[&str] = &[TC_FROM_OVERLAY];
}

/// Names of the read-only globals the agent sets at load (`EbpfLoader::set_global`).
pub mod global_names {
    /// The uplink's IPv4 address (network byte order, as `u32::from_ne_bytes(octets)`):
    /// masqueraded flows leave with it as their source.
    pub const HOST_IPV4: &str = "HOST_IPV4";
    /// The uplink's ifindex (host byte order): replies of flows translated at the uplink are
    /// sent straight out of it from `tc_from_endpoint`. Zero: they go through the host stack.
    pub const UPLINK_IFINDEX: &str = "UPLINK_IFINDEX";
    /// First and last source port handed to masqueraded flows (host byte order). Kept out of
    /// the host's own ephemeral range so the host's sockets and NAT never pick the same port.
    pub const NAT_PORT_MIN: &str = "NAT_PORT_MIN";
    pub const NAT_PORT_MAX: &str = "NAT_PORT_MAX";
}

/// Capacity of the maps keyed by endpoint. One entry per endpoint address (ENDPOINTS) or per
/// endpoint interface (the counters and their slots).
pub const MAX_ENDPOINTS: u32 = 16_384;
/// One entry per endpoint interface and drop reason seen.
pub const MAX_DROP_COUNTERS: u32 = MAX_ENDPOINTS * 4;
/// Default conntrack capacity (entries; two per flow). The agent can size it at load.
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 131_072;
/// Capacity of `PUBLISHED` (one entry per published host port and protocol) and of
/// `PUBLISHED_ALLOW` (one entry per allowed prefix of a port).
pub const MAX_PUBLISHED: u32 = 131_072;
pub const MAX_PUBLISHED_ALLOW: u32 = 65_536;
/// Capacity of `REMOTE_ROUTES`: one entry per remote host's subnet and per overlay pool.
pub const MAX_REMOTE_ROUTES: u32 = 16_384;
/// Default masquerade source ports: above Linux's default ephemeral range (32768-60999).
pub const DEFAULT_NAT_PORT_MIN: u16 = 61_000;
pub const DEFAULT_NAT_PORT_MAX: u16 = 65_535;

/// Key of `ENDPOINTS`: an endpoint's IPv4 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    /// IPv4 address, network byte order (as it stands in the packet).
    pub addr: [u8; 4],
}

/// Value of `ENDPOINTS`: where an endpoint lives and what it may send.
///
/// The same entry serves both directions: as a destination (where to redirect, which MACs to
/// write) and as a source (the packet's source IP must map to an entry whose `ifindex` is the
/// interface the packet came in on and whose `mac` is the packet's source MAC).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    /// ifindex of the endpoint's host-side veth (in the agent's network namespace).
    pub ifindex: u32,
    /// The network the endpoint is on; traffic between different ids is dropped.
    pub network_id: u32,
    /// The network's gateway address, network byte order; the program answers ARP for it.
    pub gateway: [u8; 4],
    /// The endpoint's own MAC (its namespace-side veth).
    pub mac: [u8; 6],
    /// MAC of the host-side veth: the endpoint sees it as the gateway's (and every peer's) MAC.
    pub host_mac: [u8; 6],
    /// `ENDPOINT_F_*` bits.
    pub flags: u32,
    /// The index of the traffic counters of the endpoint's host-side veth in `ENDPOINT_TRAFFIC`
    /// (below [`MAX_ENDPOINTS`]), handed out by the agent, which also records it by ifindex in
    /// `ENDPOINT_SLOTS`.
    pub slot: u32,
}

/// Traffic from this endpoint that leaves through the uplink is masqueraded.
pub const ENDPOINT_F_MASQUERADE: u32 = 1;
/// The endpoint has published ports: what it sends may be a reply that has to be translated
/// where it enters the host (hairpin and host-local connections).
pub const ENDPOINT_F_PUBLISHED: u32 = 2;

/// The endpoint is on an overlay network: destinations in other hosts' subnets are looked up
/// in `REMOTE_ROUTES` and encapsulated.
pub const ENDPOINT_F_OVERLAY: u32 = 4;

/// The endpoint's network does not let its endpoints talk to each other (Docker's
/// `enable_icc=false`): packets to another endpoint of the network are dropped; the gateway,
/// the host, the outside and published ports stay reachable.
pub const ENDPOINT_F_NO_ICC: u32 = 8;

/// The endpoint's network is internal (Docker's `--internal`): its endpoints reach each other
/// and the host itself, nothing the host would forward; and nothing forwarded reaches them.
pub const ENDPOINT_F_INTERNAL: u32 = 16;

/// Network ids of overlay networks: the VNI with this bit set, the same on every host (local
/// networks count up from 1 and never reach it), so that isolation holds across hosts.
pub const OVERLAY_NETWORK_ID: u32 = 1 << 31;

/// Data of a `REMOTE_ROUTES` LPM-trie key (the prefix length is that of the subnet).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RouteKey {
    /// Network byte order.
    pub addr: [u8; 4],
}

/// Value of `REMOTE_ROUTES`: where a remote subnet of an overlay network lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteInfo {
    /// The VTEP (underlay address) of the host holding the subnet's lease, network byte order;
    /// `0.0.0.0` for a whole pool: the part of it no host holds, which is unreachable.
    pub vtep: [u8; 4],
    /// The overlay network's VNI.
    pub vni: u32,
}

/// Index of the `OVERLAY` array: the host's VXLAN device, where encapsulated packets go.
pub mod overlay_slot {
    pub const VXLAN_IFINDEX: u32 = 0;
    pub const COUNT: u32 = 1;
}

/// The UDP port of VXLAN (IANA).
pub const VXLAN_PORT: u16 = 4789;
/// Bytes VXLAN adds in front of an inner Ethernet frame over IPv4: outer IPv4 (20), UDP (8),
/// VXLAN (8) and the inner Ethernet header (14).
pub const VXLAN_OVERHEAD: u32 = 50;

/// Key of `PUBLISHED`: a host address, port and protocol as a packet to the host carries them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PublishKey {
    /// Network byte order; `0.0.0.0` for "every address of the host".
    pub addr: [u8; 4],
    /// Network byte order.
    pub port: [u8; 2],
    /// 6 (TCP) or 17 (UDP).
    pub proto: u8,
    pub _pad: u8,
}

/// Value of `PUBLISHED`: where connections to the key go.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublishTarget {
    /// The endpoint's address and port, network byte order.
    pub addr: [u8; 4],
    pub port: [u8; 2],
    /// `PUBLISH_F_*` bits.
    pub flags: u8,
    pub _pad: u8,
    /// Names this port's prefixes in `PUBLISHED_ALLOW`.
    pub id: u32,
}

/// Only sources in the port's `PUBLISHED_ALLOW` prefixes may connect.
pub const PUBLISH_F_ALLOW_LIST: u8 = 1;

/// Data of a `PUBLISHED_ALLOW` LPM-trie key, whose prefix length counts the 32 bits of `id`
/// plus the prefix length of the allowed source CIDR: one trie holds every port's list.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AllowKey {
    /// `PublishTarget::id`, big-endian so that it is the leading bits of the prefix.
    pub id: [u8; 4],
    /// Source address, network byte order.
    pub addr: [u8; 4],
}

/// Index of `ENDPOINT_TRAFFIC`: the counter slot of an endpoint's host-side veth
/// ([`EndpointInfo::slot`]). A per-CPU array rather than a hash keyed by ifindex: the programs
/// that count have the endpoint's entry at hand already, and an array element is found without
/// hashing (the verifier inlines the lookup into an address computation), which matters on a
/// path that counts twice per packet.
pub type TrafficSlot = u32;

/// Key of `ENDPOINT_SLOTS`: ifindex of an endpoint's host-side veth; its value is the veth's
/// [`TrafficSlot`], for the one program that has only the ifindex (`tc_to_endpoint`).
pub type SlotKey = u32;

/// Value of the per-CPU `ENDPOINT_TRAFFIC`: packets and bytes that passed, per direction as seen
/// from the endpoint. User space sums the per-CPU values.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    pub from_endpoint_packets: u64,
    pub from_endpoint_bytes: u64,
    pub to_endpoint_packets: u64,
    pub to_endpoint_bytes: u64,
}

/// Key of the per-CPU `ENDPOINT_DROPS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DropKey {
    /// ifindex of the host-side veth of the endpoint the packet came from or was going to.
    pub ifindex: u32,
    /// A [`DropReason`] number.
    pub reason: u32,
}

/// Value of `ENDPOINT_DROPS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropCounters {
    pub packets: u64,
    pub bytes: u64,
}

/// Why a packet was dropped. The numbers are stable: they are stored in maps that outlive the
/// agent and are shown to users, so a number is never reused or renumbered; new reasons get new
/// numbers. User space shows an unknown number as the number.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// A header was shorter than its type requires.
    Malformed = 1,
    /// The source MAC is not the MAC of the endpoint that owns the source address.
    SpoofedSourceMac = 2,
    /// The source IPv4 address (or ARP sender address) does not belong to the endpoint on the
    /// interface the packet came from.
    SpoofedSourceIp = 3,
    /// The destination endpoint is on another network.
    NetworkIsolation = 4,
    /// An ARP request for an address that is neither the gateway nor an endpoint on the same
    /// network.
    ArpTargetUnknown = 5,
    /// Neither IPv4 nor ARP (IPv6 is switched off on endpoints the agent makes).
    UnsupportedProtocol = 6,
    /// `bpf_redirect_peer` / `bpf_redirect` refused the packet.
    RedirectFailed = 7,
    /// The conntrack table is full: a new masqueraded flow could not be recorded.
    ConntrackFull = 8,
    /// Every masquerade source port towards this destination is in use.
    NatPortsExhausted = 9,
    /// A fragment of a masqueraded flow: ports are only in the first fragment, so it cannot be
    /// translated safely.
    Fragment = 10,
    /// A connection to a published port from a source outside the port's allow list.
    NotAllowed = 11,
    /// An overlay packet to an address of the pool that no host holds a lease for.
    OverlayNoRoute = 12,
    /// A VXLAN packet whose outer source is not the lease holder of its inner source's subnet,
    /// or whose VNI is not that subnet's network.
    OverlayBadSource = 13,
    /// A decapsulated packet for an address with no endpoint on this host, or on another
    /// overlay network than its VNI.
    OverlayNoEndpoint = 14,
    /// A packet to be routed into an endpoint (from outside, from another host, or from an
    /// endpoint through a host address) that arrived with a TTL of 1 or 0: a router may not
    /// forward it.
    TtlExpired = 15,
    /// A packet to another endpoint of the same network, on a network that does not let its
    /// endpoints talk to each other (`--no-icc`).
    IccDisabled = 16,
    /// A packet between an endpoint of an internal network and anything but the network's
    /// endpoints and the host itself.
    InternalNetwork = 17,
}

impl DropReason {
    pub const ALL: &'static [DropReason] = &[
        DropReason::Malformed,
        DropReason::SpoofedSourceMac,
        DropReason::SpoofedSourceIp,
        DropReason::NetworkIsolation,
        DropReason::ArpTargetUnknown,
        DropReason::UnsupportedProtocol,
        DropReason::RedirectFailed,
        DropReason::ConntrackFull,
        DropReason::NatPortsExhausted,
        DropReason::Fragment,
        DropReason::NotAllowed,
        DropReason::OverlayNoRoute,
        DropReason::OverlayBadSource,
        DropReason::OverlayNoEndpoint,
        DropReason::TtlExpired,
        DropReason::IccDisabled,
        DropReason::InternalNetwork,
    ];

    pub fn from_u32(n: u32) -> Option<DropReason> {
        DropReason::ALL.iter().copied().find(|r| *r as u32 == n)
    }

    /// Stable, script-friendly name.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::SpoofedSourceMac => "spoofed-source-mac",
            DropReason::SpoofedSourceIp => "spoofed-source-ip",
            DropReason::NetworkIsolation => "network-isolation",
            DropReason::ArpTargetUnknown => "arp-target-unknown",
            DropReason::UnsupportedProtocol => "unsupported-protocol",
            DropReason::RedirectFailed => "redirect-failed",
            DropReason::ConntrackFull => "conntrack-full",
            DropReason::NatPortsExhausted => "nat-ports-exhausted",
            DropReason::Fragment => "fragment",
            DropReason::NotAllowed => "not-allowed",
            DropReason::OverlayNoRoute => "overlay-no-route",
            DropReason::OverlayBadSource => "overlay-bad-source",
            DropReason::OverlayNoEndpoint => "overlay-no-endpoint",
            DropReason::TtlExpired => "ttl-expired",
            DropReason::IccDisabled => "icc-disabled",
            DropReason::InternalNetwork => "internal-network",
        }
    }
}

/// Key of `CONNTRACK`: one direction of a flow, as its packets carry it before translation.
/// Every translated flow has two entries, the original direction (as its first packet came)
/// and the reply direction (as replies come, to the translated addresses). The reply key is the
/// original entry's translated tuple reversed, and the other way round.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey {
    /// Addresses and ports in network byte order, as in the packet. For ICMP echo the
    /// identifier stands in both port fields.
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP).
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Value of `CONNTRACK`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntry {
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC_COARSE) of the last packet in this direction.
    pub last_seen_ns: u64,
    pub packets: u64,
    pub bytes: u64,
    /// The packet's addressing after translation, network byte order: fields equal to the
    /// key's are left alone. For ICMP echo both ports are the identifier.
    pub new_saddr: [u8; 4],
    pub new_daddr: [u8; 4],
    pub new_sport: [u8; 2],
    pub new_dport: [u8; 2],
    /// `CT_DIR_*`.
    pub direction: u8,
    /// `CT_STATE_*` bits this direction has seen; the flow's state is the union of both
    /// entries' bits (the agent's expiry combines them).
    pub state: u8,
    /// `CT_KIND_*`: why the flow is translated.
    pub kind: u8,
    /// `CT_F_*` bits.
    pub flags: u8,
    /// Host-side veth of the endpoint when the flow began (shown by inspection; delivery uses
    /// ENDPOINTS, which follows the endpoint if it is replaced).
    pub ifindex: u32,
    pub _pad: u32,
}

impl CtEntry {
    /// The key of the flow's other entry: this entry's translation, reversed. The two entries of
    /// a flow are each other's partners; an entry whose partner is missing, or is the partner of
    /// another entry, is an orphan (a race between the data plane taking a closed flow's tuple or
    /// port up again and the agent's collector removing it can leave one).
    pub fn partner_key(&self, proto: u8) -> CtKey {
        CtKey {
            saddr: self.new_daddr,
            daddr: self.new_saddr,
            sport: self.new_dport,
            dport: self.new_sport,
            proto,
            _pad: [0; 3],
        }
    }

    /// Whether this entry's partner key is `key`. Two entries are a pair when each one's
    /// partner key is the other's key.
    pub fn points_back_to(&self, key: &CtKey) -> bool {
        self.partner_key(key.proto) == *key
    }
}

pub const CT_DIR_ORIGINAL: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;
/// An endpoint's flow to the outside, with the host's address as its source.
pub const CT_KIND_MASQUERADE: u8 = 0;
/// A connection to a published port, with the endpoint as its destination.
pub const CT_KIND_PUBLISHED: u8 = 1;
/// This direction is translated where it leaves an endpoint (`tc_from_endpoint`) and
/// delivered from there: to an endpoint (hairpin) or to the host's loopback (the host's own
/// connections). Without it, translation is the uplink's or the loopback's.
pub const CT_F_AT_ENDPOINT: u8 = 1;
/// The reply direction has been seen (TCP SYN-ACK, any UDP or ICMP reply).
pub const CT_STATE_ESTABLISHED: u8 = 1;
/// A FIN went from the endpoint / from the remote.
pub const CT_STATE_FIN_ORIGINAL: u8 = 2;
pub const CT_STATE_FIN_REPLY: u8 = 4;
/// A RST went either way.
pub const CT_STATE_RST: u8 = 8;

/// Index of the per-CPU `NAT_STATS` array.
pub mod nat_stat {
    /// New flows masqueraded.
    pub const FLOWS_CREATED: u32 = 0;
    /// A free port was found only after a collision.
    pub const PORT_RETRIES: u32 = 1;
    /// No free port towards a destination.
    pub const PORTS_EXHAUSTED: u32 = 2;
    /// CONNTRACK full.
    pub const TABLE_FULL: u32 = 3;
    /// New connections to published ports.
    pub const PUBLISHED_FLOWS: u32 = 4;
    /// New TCP connections that took over the tuple of a closed one.
    pub const CLOSED_REUSED: u32 = 5;
    pub const COUNT: u32 = 6;
}

// Layouts are part of the pinned-map ABI: see PIN_LAYOUT_VERSION.
const _: () = assert!(core::mem::size_of::<EndpointKey>() == 4);
const _: () = assert!(core::mem::size_of::<EndpointInfo>() == 32);
const _: () = assert!(core::mem::size_of::<CtKey>() == 16);
const _: () = assert!(core::mem::size_of::<CtEntry>() == 48);
const _: () = assert!(core::mem::size_of::<PublishKey>() == 8);
const _: () = assert!(core::mem::size_of::<PublishTarget>() == 12);
const _: () = assert!(core::mem::size_of::<AllowKey>() == 8);
const _: () = assert!(core::mem::size_of::<RouteKey>() == 4);
const _: () = assert!(core::mem::size_of::<RouteInfo>() == 8);
const _: () = assert!(core::mem::size_of::<TrafficCounters>() == 32);
const _: () = assert!(core::mem::size_of::<DropKey>() == 8);
const _: () = assert!(core::mem::size_of::<DropCounters>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type below is repr(C), Copy, made only of integers and byte arrays, and has
    // no implicit padding (checked by the size assertions above).
    unsafe impl aya::Pod for super::EndpointKey {}
    unsafe impl aya::Pod for super::EndpointInfo {}
    unsafe impl aya::Pod for super::TrafficCounters {}
    unsafe impl aya::Pod for super::DropKey {}
    unsafe impl aya::Pod for super::DropCounters {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtEntry {}
    unsafe impl aya::Pod for super::PublishKey {}
    unsafe impl aya::Pod for super::PublishTarget {}
    unsafe impl aya::Pod for super::AllowKey {}
    unsafe impl aya::Pod for super::RouteKey {}
    unsafe impl aya::Pod for super::RouteInfo {}
}
