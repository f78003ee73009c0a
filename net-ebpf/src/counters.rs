//! Per-endpoint traffic counters and the one exit every dropped packet takes.

use aya_ebpf::bindings::TC_ACT_SHOT;
use net_ebpf_common::{DropCounters, DropKey, DropReason, TrafficSlot};

use crate::maps::{ENDPOINT_DROPS, ENDPOINT_SLOTS, ENDPOINT_TRAFFIC};

/// Direction as seen from the endpoint.
#[derive(Clone, Copy)]
pub enum Direction {
    FromEndpoint,
    ToEndpoint,
}

/// Counts a packet on the endpoint whose counter slot is `slot` (`EndpointInfo::slot`).
#[inline(always)]
pub fn count_traffic(slot: TrafficSlot, direction: Direction, bytes: u32) {
    let Some(counters) = ENDPOINT_TRAFFIC.get_ptr_mut(slot) else {
        // Out of range: the agent hands out slots below the array's size.
        return;
    };
    // SAFETY: per-CPU value of a live entry; no other CPU writes it.
    let counters = unsafe { &mut *counters };
    match direction {
        Direction::FromEndpoint => {
            counters.from_endpoint_packets += 1;
            counters.from_endpoint_bytes += u64::from(bytes);
        }
        Direction::ToEndpoint => {
            counters.to_endpoint_packets += 1;
            counters.to_endpoint_bytes += u64::from(bytes);
        }
    }
}

/// Counts a packet on the endpoint behind host-side veth `ifindex`, for a program that has no
/// endpoint entry at hand. A veth without a slot is one the agent is still setting up or
/// tearing down: nothing to count on.
#[inline(always)]
pub fn count_traffic_of(ifindex: u32, direction: Direction, bytes: u32) {
    // SAFETY: read-only use of a map value.
    if let Some(slot) = unsafe { ENDPOINT_SLOTS.get(ifindex) } {
        count_traffic(*slot, direction, bytes);
    }
}

/// The single drop exit: counts the packet under its reason and returns the drop verdict.
#[inline(always)]
pub fn drop_packet(ifindex: u32, reason: DropReason, bytes: u32) -> i32 {
    let key = DropKey {
        ifindex,
        reason: reason as u32,
    };
    let counters = match ENDPOINT_DROPS.get_ptr_mut(key) {
        Some(counters) => Some(counters),
        None => {
            let _ = ENDPOINT_DROPS.insert(key, DropCounters::default(), 0);
            ENDPOINT_DROPS.get_ptr_mut(key)
        }
    };
    if let Some(counters) = counters {
        // SAFETY: per-CPU value of a live entry; no other CPU writes it.
        let counters = unsafe { &mut *counters };
        counters.packets += 1;
        counters.bytes += u64::from(bytes);
    }
    TC_ACT_SHOT
}
