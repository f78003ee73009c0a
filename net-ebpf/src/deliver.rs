//! Handing a translated packet on without the host stack: into an endpoint's namespace, or
//! into the host's own stack through its loopback.

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, TC_ACT_REDIRECT},
    helpers::generated::{bpf_redirect, bpf_redirect_peer},
    programs::TcContext,
};
use net_ebpf_common::{DropReason, ENDPOINT_F_INTERNAL, EndpointInfo, EndpointKey};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    counters::{Direction, count_traffic},
    maps::ENDPOINTS,
    parse::ptr_at,
    route,
};

/// The loopback's ifindex, the same in every network namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// How a packet reaches an endpoint: whether the host forwards it, which costs it a hop.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// Forwarded by the host as its IP forwarding would: from outside, from another host, or
    /// from an endpoint through one of the host's addresses (hairpin). The TTL goes down by one,
    /// and a packet that would arrive with none left is dropped (`ttl-expired`), so that a
    /// routing loop through the host ends.
    Routed,
    /// Sent by the host itself, through its loopback: no forwarding, no hop.
    FromHost,
}

/// Redirects into the namespace of the endpoint that owns `addr` (the endpoint sees its
/// gateway's MAC as the sender, as with endpoint-to-endpoint forwarding).
#[inline(always)]
pub fn to_endpoint(ctx: &TcContext, addr: [u8; 4], hop: Hop) -> Result<i32, DropReason> {
    // SAFETY: read-only use of a map value.
    let Some(endpoint) = (unsafe { ENDPOINTS.get(EndpointKey { addr }) }) else {
        // The endpoint went away while its flow was still recorded.
        return Err(DropReason::RedirectFailed);
    };
    to(ctx, endpoint, hop)
}

/// [`to_endpoint`] for a caller that has looked the endpoint up already.
#[inline(always)]
pub fn to(ctx: &TcContext, endpoint: &EndpointInfo, hop: Hop) -> Result<i32, DropReason> {
    if hop == Hop::Routed {
        // Nothing the host forwards enters an internal network's endpoint. The agent publishes
        // no port to one and masquerades none of its flows, so only a stale or foreign entry
        // could lead here.
        if endpoint.flags & ENDPOINT_F_INTERNAL != 0 {
            return Err(DropReason::InternalNetwork);
        }
        // The caller's helpers changed the packet: reload the headers.
        let ip = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN)?;
        // SAFETY: bounds-checked just above.
        unsafe {
            if !route::forwardable(ip) {
                return Err(DropReason::TtlExpired);
            }
            route::take_hop(ip);
        }
    }
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds-checked.
    unsafe {
        (*eth).dst_addr = endpoint.mac;
        (*eth).src_addr = endpoint.host_mac;
    }
    // Deliver where the address lives now (ENDPOINTS), not where it lived when the flow
    // began: the two differ only if the endpoint was replaced, and then the flow is stale.
    let ifindex = endpoint.ifindex;
    // SAFETY: plain helper call.
    let verdict = unsafe { bpf_redirect_peer(ifindex, 0) } as i32;
    if verdict != TC_ACT_REDIRECT {
        return Err(DropReason::RedirectFailed);
    }
    count_traffic(endpoint.slot, Direction::ToEndpoint, ctx.len());
    Ok(verdict)
}

/// Redirects into the host's own stack through the loopback's ingress: a reply to one of the
/// host's connections to a published port, whose source is now one of the host's addresses.
/// Through the endpoint's veth the stack would drop it as a martian (a local source arriving
/// from outside); on the loopback it is at home.
#[inline(always)]
pub fn to_host(ctx: &TcContext) -> Result<i32, DropReason> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds-checked. The loopback's address is all zeros; any other destination
    // MAC would mark the frame as for another host.
    unsafe {
        (*eth).dst_addr = [0; 6];
        (*eth).src_addr = [0; 6];
    }
    // SAFETY: plain helper call.
    let verdict = unsafe { bpf_redirect(LOOPBACK_IFINDEX, u64::from(BPF_F_INGRESS)) } as i32;
    if verdict != TC_ACT_REDIRECT {
        return Err(DropReason::RedirectFailed);
    }
    Ok(verdict)
}
