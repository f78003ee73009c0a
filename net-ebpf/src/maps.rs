//! Every map of the data plane. The agent pins each one by name (see
//! `net_ebpf_common::map_names`) so that forwarding state and counters outlive the agent process.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, PerCpuHashMap},
};
use net_ebpf_common::{
    AllowKey, CtEntry, CtKey, DEFAULT_CONNTRACK_ENTRIES, DropCounters, DropKey, EndpointInfo,
    EndpointKey, MAX_DROP_COUNTERS, MAX_ENDPOINTS, MAX_PUBLISHED, MAX_PUBLISHED_ALLOW,
    MAX_REMOTE_ROUTES, PublishKey, PublishTarget, RouteInfo, RouteKey, SlotKey, TrafficCounters,
    TrafficSlot, nat_stat, overlay_slot,
};

/// Endpoint address -> where the endpoint lives. Read on every packet for both the source check
/// and the destination lookup; written only by the agent. A plain hash: exact-match lookups,
/// entries removed explicitly when an endpoint goes.
#[map(name = "ENDPOINTS")]
pub static ENDPOINTS: HashMap<EndpointKey, EndpointInfo> =
    HashMap::with_max_entries(MAX_ENDPOINTS, 0);

/// Counter slot of an endpoint's host-side veth (`EndpointInfo::slot`) -> packets and bytes per
/// direction. Per-CPU so the hot path never contends on a shared cache line; user space sums
/// the CPUs.
#[map(name = "ENDPOINT_TRAFFIC")]
pub static ENDPOINT_TRAFFIC: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(MAX_ENDPOINTS, 0);

/// Host-side veth ifindex -> its counter slot, for `tc_to_endpoint`, which has no endpoint
/// entry at hand. Written by the agent with the endpoint's `ENDPOINTS` entry.
#[map(name = "ENDPOINT_SLOTS")]
pub static ENDPOINT_SLOTS: HashMap<SlotKey, TrafficSlot> =
    HashMap::with_max_entries(MAX_ENDPOINTS, 0);

/// {host-side veth ifindex, drop reason} -> packets and bytes dropped. Per-CPU, as above.
#[map(name = "ENDPOINT_DROPS")]
pub static ENDPOINT_DROPS: PerCpuHashMap<DropKey, DropCounters> =
    PerCpuHashMap::with_max_entries(MAX_DROP_COUNTERS, 0);

/// One entry per direction of every translated flow (see `CtKey`). A plain hash, not LRU:
/// under pressure an LRU would silently evict live flows; a full table must instead refuse new
/// flows (counted) while the agent's garbage collector removes expired ones.
#[map(name = "CONNTRACK")]
pub static CONNTRACK: HashMap<CtKey, CtEntry> =
    HashMap::with_max_entries(DEFAULT_CONNTRACK_ENTRIES, 0);

/// Published ports: {host address or 0.0.0.0, port, protocol} -> endpoint address and port.
/// A hash: one exact-match lookup per new connection, whatever the number of ports (iptables
/// walks its DNAT rules one by one).
#[map(name = "PUBLISHED")]
pub static PUBLISHED: HashMap<PublishKey, PublishTarget> =
    HashMap::with_max_entries(MAX_PUBLISHED, 0);

/// The allow lists of published ports that have one: {port id, source prefix}, longest-prefix
/// matched; present means allowed. (aya adds the `BPF_F_NO_PREALLOC` the kernel requires.)
#[map(name = "PUBLISHED_ALLOW")]
pub static PUBLISHED_ALLOW: LpmTrie<AllowKey, u8> =
    LpmTrie::with_max_entries(MAX_PUBLISHED_ALLOW, 0);

/// Remote subnets of overlay networks -> the VTEP of the host holding each one's lease, and
/// whole pools -> "unreachable" (VTEP 0.0.0.0). Longest-prefix matched, so a host's /24 wins
/// over its pool; written by the agent as leases come and go.
#[map(name = "REMOTE_ROUTES")]
pub static REMOTE_ROUTES: LpmTrie<RouteKey, RouteInfo> =
    LpmTrie::with_max_entries(MAX_REMOTE_ROUTES, 0);

/// Overlay settings the agent learns after load (`overlay_slot::*`): the VXLAN device's
/// ifindex, which exists only once an overlay network does.
#[map(name = "OVERLAY")]
pub static OVERLAY: Array<u32> = Array::with_max_entries(overlay_slot::COUNT, 0);

/// NAT event counters (`nat_stat::*` indexes). Per-CPU: bumped on the hot path.
#[map(name = "NAT_STATS")]
pub static NAT_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(nat_stat::COUNT, 0);

/// Adds one to a NAT event counter.
#[inline(always)]
pub fn count_nat(stat: u32) {
    if let Some(counter) = NAT_STATS.get_ptr_mut(stat) {
        // SAFETY: per-CPU slot; no other CPU writes it.
        unsafe { *counter += 1 };
    }
}
