//! What the host stack sends to an endpoint: the tcx egress program of its host-side veth.
//! Endpoint-to-endpoint traffic never passes here (`bpf_redirect_peer` skips this hook; it is
//! counted where it is redirected), so this counts, and keeps what the host forwards (rather
//! than sends itself) away from the endpoints of internal networks, both into them and from
//! them into another endpoint.

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use net_ebpf_common::{DropReason, ENDPOINT_F_INTERNAL, EndpointKey};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    counters::{Direction, count_traffic_of, drop_packet},
    maps::ENDPOINTS,
    parse::{ETH_P_IP, ifindex, ingress_ifindex, ptr_at},
};

/// Hook: tcx egress of an endpoint's host-side veth.
#[classifier]
pub fn tc_to_endpoint(ctx: TcContext) -> i32 {
    let ifindex = ifindex(&ctx);
    // The host's own packets have no ingress device: only a packet that entered the host
    // somewhere can have been forwarded, so only those pay the lookups.
    if ingress_ifindex(&ctx) != 0 && internal_endpoint_involved(&ctx) {
        return drop_packet(ifindex, DropReason::InternalNetwork, ctx.len());
    }
    count_traffic_of(ifindex, Direction::ToEndpoint, ctx.len());
    TC_ACT_OK
}

/// Whether the packet is IPv4 to or from an endpoint of an internal network. From one: the
/// host routes nothing from its veth beyond itself (the agent's rule and settings); should it
/// anyway, not into another endpoint.
#[inline(always)]
fn internal_endpoint_involved(ctx: &TcContext) -> bool {
    let (Ok(eth), Ok(ip)) = (
        ptr_at::<EthHdr>(ctx, 0),
        ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN),
    ) else {
        return false;
    };
    // SAFETY: both bounds-checked by `ptr_at`.
    let (ether_type, src_addr, dst_addr) = unsafe {
        (
            u16::from_be((*eth).ether_type),
            (*ip).src_addr,
            (*ip).dst_addr,
        )
    };
    if ether_type != ETH_P_IP {
        return false;
    }
    let internal = |addr| {
        // SAFETY: read-only use of a map value.
        unsafe { ENDPOINTS.get(EndpointKey { addr }) }
            .is_some_and(|endpoint| endpoint.flags & ENDPOINT_F_INTERNAL != 0)
    };
    internal(dst_addr) || internal(src_addr)
}
