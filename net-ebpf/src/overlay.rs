//! The cross-host overlay: VXLAN through the host's collect-metadata VXLAN device.
//!
//! - [`encapsulate`] (called by `tc_from_endpoint`): a packet from an overlay endpoint to an
//!   address in another host's subnet gets a tunnel key (the VTEP of that subnet's lease holder
//!   and the network's VNI) and is redirected to the VXLAN device, which adds the outer headers.
//! - [`tc_from_overlay`] (tcx ingress of the VXLAN device): a decapsulated packet is accepted
//!   only from the lease holder of its source's subnet, with that subnet's VNI, and goes straight
//!   into its endpoint's namespace.

use aya_ebpf::{
    bindings::{BPF_F_DONT_FRAGMENT, BPF_F_ZERO_CSUM_TX, TC_ACT_REDIRECT, bpf_tunnel_key},
    helpers::generated::{bpf_redirect, bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key},
    macros::classifier,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use net_ebpf_common::{
    DropReason, EndpointInfo, EndpointKey, OVERLAY_NETWORK_ID, RouteInfo, RouteKey, overlay_slot,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    counters::{Direction, count_traffic, drop_packet},
    deliver::{self, Hop},
    maps::{ENDPOINTS, OVERLAY, REMOTE_ROUTES},
    parse::{ETH_P_IP, ifindex, ptr_at},
};

/// TTL of the outer header.
const OUTER_TTL: u8 = 64;

/// The route of `addr` in the overlay pools, if it is in one.
#[inline(always)]
fn route_of(addr: [u8; 4]) -> Option<RouteInfo> {
    REMOTE_ROUTES.get(Key::new(32, RouteKey { addr })).copied()
}

/// Sends a packet from the overlay endpoint `source` to `daddr` through the tunnel, if `daddr` is
/// in an overlay pool (`Ok(None)` otherwise: the host stack's). Dropped when `daddr` is on
/// another overlay network than the source's, or no host holds its subnet.
#[inline(always)]
pub fn encapsulate(
    ctx: &TcContext,
    source: &EndpointInfo,
    daddr: [u8; 4],
) -> Result<Option<i32>, DropReason> {
    let Some(route) = route_of(daddr) else {
        return Ok(None);
    };
    // This host's own subnet (its gateway, a free address): the host stack's, as on a bridge
    // network.
    if route.vtep != [0; 4] && route.vtep == crate::config::host_ipv4() {
        return Ok(None);
    }
    if route.vni | OVERLAY_NETWORK_ID != source.network_id {
        return Err(DropReason::NetworkIsolation);
    }
    let vxlan = OVERLAY
        .get(overlay_slot::VXLAN_IFINDEX)
        .copied()
        .unwrap_or(0);
    if route.vtep == [0; 4] || vxlan == 0 {
        return Err(DropReason::OverlayNoRoute);
    }
    // SAFETY: plain old data; all zeros is a valid (empty) key.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = route.vni;
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be_bytes(route.vtep);
    key.tunnel_ttl = OUTER_TTL;
    // No outer UDP checksum (the inner packet carries its own; RFC 7348 allows zero); DF set, so
    // an outer packet too big for the underlay is refused rather than fragmented (the agent
    // sizes overlay MTUs so that none is).
    let flags = u64::from(BPF_F_ZERO_CSUM_TX | BPF_F_DONT_FRAGMENT);
    // SAFETY: the skb is the context's; the key is ours, with its size.
    let set = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            &mut key,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            flags,
        )
    };
    if set < 0 {
        return Err(DropReason::RedirectFailed);
    }
    // SAFETY: plain helper call.
    let verdict = unsafe { bpf_redirect(vxlan, 0) } as i32;
    if verdict != TC_ACT_REDIRECT {
        return Err(DropReason::RedirectFailed);
    }
    count_traffic(source.ifindex, Direction::FromEndpoint, ctx.len());
    Ok(Some(verdict))
}

/// Hook: tcx ingress of the host's VXLAN device.
#[classifier]
pub fn tc_from_overlay(ctx: TcContext) -> i32 {
    match try_from_overlay(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => drop_packet(ifindex(&ctx), reason, ctx.len()),
    }
}

fn try_from_overlay(ctx: &TcContext) -> Result<i32, DropReason> {
    // SAFETY: plain old data; the helper fills it.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    // SAFETY: the skb is the context's; the key is ours, with its size.
    let got = unsafe {
        bpf_skb_get_tunnel_key(
            ctx.skb.skb,
            &mut key,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            0,
        )
    };
    if got < 0 {
        return Err(DropReason::OverlayBadSource);
    }
    // SAFETY: the helper filled the IPv4 member (no BPF_F_TUNINFO_IPV6 asked).
    let vtep = unsafe { key.__bindgen_anon_1.remote_ipv4 }.to_be_bytes();
    let vni = key.tunnel_id;

    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds-checked.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return Err(DropReason::UnsupportedProtocol);
    }
    let ip = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN)?;
    // SAFETY: bounds-checked.
    let (saddr, daddr) = unsafe { ((*ip).src_addr, (*ip).dst_addr) };
    // Only the host holding the lease of the source's subnet may send from it, and only on
    // that subnet's network.
    match route_of(saddr) {
        Some(route) if route.vtep == vtep && route.vni == vni => {}
        _ => return Err(DropReason::OverlayBadSource),
    }
    // SAFETY: read-only use of a map value.
    match unsafe { ENDPOINTS.get(EndpointKey { addr: daddr }) } {
        Some(endpoint) if endpoint.network_id == vni | OVERLAY_NETWORK_ID => {
            deliver::to(ctx, endpoint, Hop::Routed)
        }
        _ => Err(DropReason::OverlayNoEndpoint),
    }
}
