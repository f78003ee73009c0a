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
pub const PIN_LAYOUT_VERSION: u32 = 1;

/// Names of the maps, as declared in `net-ebpf` and pinned by the agent under
/// `<bpffs dir>/v<PIN_LAYOUT_VERSION>/maps/<name>`.
pub mod map_names {
    pub const ENDPOINTS: &str = "ENDPOINTS";
    pub const ENDPOINT_TRAFFIC: &str = "ENDPOINT_TRAFFIC";
    pub const ENDPOINT_DROPS: &str = "ENDPOINT_DROPS";
    /// Every map the agent pins, in one list so nothing is forgotten.
    pub const ALL: &[&str] = &[ENDPOINTS, ENDPOINT_TRAFFIC, ENDPOINT_DROPS];
}

/// Names of the programs, each named by hook and direction as seen from the endpoint.
pub mod program_names {
    /// tcx ingress of an endpoint's host-side veth: everything the endpoint sends.
    pub const TC_FROM_ENDPOINT: &str = "tc_from_endpoint";
    /// tcx egress of an endpoint's host-side veth: what the host stack sends to the endpoint
    /// (endpoint-to-endpoint traffic skips it through `bpf_redirect_peer`).
    pub const TC_TO_ENDPOINT: &str = "tc_to_endpoint";
    pub const ALL: &[&str] = &[TC_FROM_ENDPOINT, TC_TO_ENDPOINT];
}

/// Capacity of the maps keyed by endpoint. One entry per endpoint address (ENDPOINTS) or per
/// endpoint interface (the counters).
pub const MAX_ENDPOINTS: u32 = 16_384;
/// One entry per endpoint interface and drop reason seen.
pub const MAX_DROP_COUNTERS: u32 = MAX_ENDPOINTS * 4;

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
}

/// Key of `ENDPOINT_TRAFFIC`: ifindex of an endpoint's host-side veth.
pub type TrafficKey = u32;

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
        }
    }
}

// Layouts are part of the pinned-map ABI: see PIN_LAYOUT_VERSION.
const _: () = assert!(core::mem::size_of::<EndpointKey>() == 4);
const _: () = assert!(core::mem::size_of::<EndpointInfo>() == 24);
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
}
