//! Per-endpoint traffic counters and the one exit every dropped packet takes.

use aya_ebpf::bindings::TC_ACT_SHOT;
use net_ebpf_common::{DropCounters, DropKey, DropReason, TrafficCounters};

use crate::maps::{ENDPOINT_DROPS, ENDPOINT_TRAFFIC};

/// Direction as seen from the endpoint.
#[derive(Clone, Copy)]
pub enum Direction {
    FromEndpoint,
    ToEndpoint,
}

#[inline(always)]
pub fn count_traffic(ifindex: u32, direction: Direction, bytes: u32) {
    let counters = match ENDPOINT_TRAFFIC.get_ptr_mut(ifindex) {
        Some(counters) => counters,
        None => {
            // First packet on this CPU: create the entry. A failed insert (map full) loses only
            // this packet's count, never the packet.
            let _ = ENDPOINT_TRAFFIC.insert(ifindex, TrafficCounters::default(), 0);
            match ENDPOINT_TRAFFIC.get_ptr_mut(ifindex) {
                Some(counters) => counters,
                None => return,
            }
        }
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
