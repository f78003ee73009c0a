//! Every map of the data plane. The agent pins each one by name (see
//! `net_ebpf_common::map_names`) so that forwarding state and counters outlive the agent process.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuHashMap},
};
use net_ebpf_common::{
    DropCounters, DropKey, EndpointInfo, EndpointKey, MAX_DROP_COUNTERS, MAX_ENDPOINTS,
    TrafficCounters, TrafficKey,
};

/// Endpoint address -> where the endpoint lives. Read on every packet for both the source check
/// and the destination lookup; written only by the agent. A plain hash: exact-match lookups,
/// entries removed explicitly when an endpoint goes.
#[map(name = "ENDPOINTS")]
pub static ENDPOINTS: HashMap<EndpointKey, EndpointInfo> =
    HashMap::with_max_entries(MAX_ENDPOINTS, 0);

/// Host-side veth ifindex -> packets and bytes per direction. Per-CPU so the hot path never
/// contends on a shared cache line; user space sums the CPUs.
#[map(name = "ENDPOINT_TRAFFIC")]
pub static ENDPOINT_TRAFFIC: PerCpuHashMap<TrafficKey, TrafficCounters> =
    PerCpuHashMap::with_max_entries(MAX_ENDPOINTS, 0);

/// {host-side veth ifindex, drop reason} -> packets and bytes dropped. Per-CPU, as above.
#[map(name = "ENDPOINT_DROPS")]
pub static ENDPOINT_DROPS: PerCpuHashMap<DropKey, DropCounters> =
    PerCpuHashMap::with_max_entries(MAX_DROP_COUNTERS, 0);
