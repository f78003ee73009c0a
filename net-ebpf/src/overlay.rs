//! The cross-host overlay: VXLAN through the host's collect-metadata VXLAN device.
//!
//! - [`encapsulate`] (called by `tc_from_endpoint`): a packet from an overlay endpoint to an
//!   address in another host's subnet gets a tunnel key (the VTEP of that subnet's lease holder
//!   and the network's VNI) and is redirected to the VXLAN device, which adds the outer headers.
//! - [`decapsulate`] (called by `tc_from_netdev`, at the uplink): a VXLAN packet for an endpoint
//!   here loses its outer headers at once and goes straight into its endpoint's namespace, without
//!   the VXLAN device's receive path (outer IP and UDP, the device, its GRO queue). It takes only
//!   packets [`admit`] lets through; everything else it leaves to the VXLAN device.
//! - [`tc_from_overlay`] (tcx ingress of the VXLAN device): what the device decapsulated, under
//!   the same [`admit`]: a packet is accepted only from the lease holder of its source's subnet,
//!   with that subnet's VNI, and goes straight into its endpoint's namespace.

use aya_ebpf::{
    bindings::{
        BPF_CSUM_LEVEL_DEC, BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_ADJ_ROOM_NO_CSUM_RESET,
        BPF_F_DONT_FRAGMENT, BPF_F_ZERO_CSUM_TX, TC_ACT_REDIRECT, bpf_adj_room_mode,
        bpf_tunnel_key,
    },
    helpers::generated::{
        bpf_csum_level, bpf_redirect, bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key,
    },
    macros::classifier,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use net_ebpf_common::{
    DropReason, EndpointInfo, EndpointKey, OVERLAY_NETWORK_ID, RouteInfo, RouteKey, overlay_slot,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, udp::UdpHdr};

use crate::{
    counters::{Direction, count_traffic, drop_packet},
    csum,
    deliver::{self, Hop},
    maps::{ENDPOINTS, OVERLAY, REMOTE_ROUTES},
    nat::{IPPROTO_TCP, Ipv4Offsets},
    parse::{ETH_P_IP, ifindex, ptr_at},
    route,
};

/// TTL of the outer header.
const OUTER_TTL: u8 = 64;

/// A VXLAN header (RFC 7348): flags (only I, "VNI valid", may be set), the VNI in the top 24
/// bits of the second word, the rest reserved (zero).
#[repr(C)]
struct VxlanHdr {
    flags: [u8; 4],
    vni: [u8; 4],
}

/// The flags word of every VXLAN header the overlay's devices send: I set, nothing else.
const VXLAN_FLAGS: [u8; 4] = [0x08, 0, 0, 0];

/// What a VXLAN packet carries in front of its inner frame's IP header, after its own Ethernet
/// header: outer IPv4 (no options), UDP, VXLAN and the inner Ethernet header.
const VXLAN_OVERHEAD: usize =
    Ipv4Hdr::LEN + UdpHdr::LEN + core::mem::size_of::<VxlanHdr>() + EthHdr::LEN;

/// ECN codepoints (the low two bits of the TOS byte, RFC 3168).
const ECN_MASK: u8 = 0b11;
const ECN_NOT_ECT: u8 = 0b00;
const ECN_CE: u8 = 0b11;

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
    count_traffic(source.slot, Direction::FromEndpoint, ctx.len());
    Ok(Some(verdict))
}

/// Whether an overlay packet from `saddr` to `daddr`, which came through the tunnel from `vtep`
/// with `vni`, may enter this host: only the host holding the lease of the source's subnet may
/// send from it, and only on that subnet's network; its destination must be an endpoint here on
/// that network. The endpoint it goes to, or why not.
#[inline(always)]
fn admit(
    vtep: [u8; 4],
    vni: u32,
    saddr: [u8; 4],
    daddr: [u8; 4],
) -> Result<&'static EndpointInfo, DropReason> {
    match route_of(saddr) {
        Some(route) if route.vtep == vtep && route.vni == vni => {}
        _ => return Err(DropReason::OverlayBadSource),
    }
    // SAFETY: read-only use of a map value.
    match unsafe { ENDPOINTS.get(EndpointKey { addr: daddr }) } {
        Some(endpoint) if endpoint.network_id == vni | OVERLAY_NETWORK_ID => Ok(endpoint),
        _ => Err(DropReason::OverlayNoEndpoint),
    }
}

/// Decapsulates the VXLAN packet (UDP at `off.l4`, addressed to this host's VXLAN port) at the
/// uplink and delivers its inner packet into its endpoint's namespace, as the VXLAN device and
/// `tc_from_overlay` would have. `Ok(None)`: left to the VXLAN device, unchanged (at most its
/// headers pulled into the linear data); the packet is one this path does not take, or one
/// `tc_from_overlay` refuses (it counts the refusal where `netctl status` shows it).
///
/// Taken: outer IPv4 without options, its length the packet's, no outer UDP checksum (the
/// overlay's devices send none; verifying one here would cost a pass over the payload), a plain
/// VXLAN header, an inner IPv4 packet that [`admit`] lets in and that may take a hop.
/// A flow's packets all meet these or all do not, so a flow never has packets on both paths,
/// which would let the fast one overtake those queued in the device.
///
/// GSO packets of TCP (whole segments of up to 64 KB, as veths and GRO hand them over) are taken
/// too: their `gso_size` stays (FIXED_GSO: it is the inner MSS already), the kernel marks their
/// headers for checking (DODGY) should they ever be segmented. Their tunnel GSO type and
/// `skb->encapsulation` stay set (no helper clears them; `bpf_skb_adjust_room`'s
/// BPF_F_ADJ_ROOM_DECAP_L4_UDP, which will, came to bpf-next after 6.18): harmless for TCP,
/// since the packet's inner header offsets, which those point the kernel to, now fall exactly
/// on its Ethernet, IP and TCP headers (the outer Ethernet header moves up onto the inner one's
/// place). Not so for a GSO packet of UDP,
/// which the receiving socket may have to segment: the stale tunnel type would have it
/// segmented as a tunnel. Those few (UDP_SEGMENT senders) are left to the device, at the price
/// of their flow's GSO and plain packets taking different paths; UDP promises no order.
#[inline(always)]
pub fn decapsulate(ctx: &TcContext, off: Ipv4Offsets) -> Result<Option<i32>, DropReason> {
    if off.l4 != EthHdr::LEN + Ipv4Hdr::LEN {
        return Ok(None);
    }
    // Every header up to the inner IPv4 one must be in the linear data; a device may have left
    // part of them in pages (GRO, some NICs), so they are pulled in if need be. A packet too
    // short to hold them is the device's.
    let headers = EthHdr::LEN + VXLAN_OVERHEAD + Ipv4Hdr::LEN;
    if ctx.data() + headers > ctx.data_end() && ctx.pull_data(headers as u32).is_err() {
        return Ok(None);
    }
    let inner_eth_off = off.l4 + UdpHdr::LEN + core::mem::size_of::<VxlanHdr>();
    let (Ok(outer), Ok(udp), Ok(vxlan), Ok(inner_eth), Ok(inner)) = (
        ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN),
        ptr_at::<UdpHdr>(ctx, off.l4),
        ptr_at::<VxlanHdr>(ctx, off.l4 + UdpHdr::LEN),
        ptr_at::<EthHdr>(ctx, inner_eth_off),
        ptr_at::<Ipv4Hdr>(ctx, inner_eth_off + EthHdr::LEN),
    ) else {
        return Ok(None);
    };
    // SAFETY: all five bounds-checked just above.
    let (outer_len, outer_tos, vtep) =
        unsafe { ((*outer).tot_len, (*outer).tos, (*outer).src_addr) };
    if usize::from(u16::from_be_bytes(outer_len)) + EthHdr::LEN != ctx.len() as usize {
        return Ok(None);
    }
    // SAFETY: as above.
    let (udp_check, flags, vni, inner_type, inner_tos, inner_proto, saddr, daddr) = unsafe {
        (
            (*udp).check,
            (*vxlan).flags,
            (*vxlan).vni,
            (*inner_eth).ether_type,
            (*inner).tos,
            (*inner).proto,
            (*inner).src_addr,
            (*inner).dst_addr,
        )
    };
    // SAFETY: the context's skb, a plain field read.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    if udp_check != [0; 2]
        || flags != VXLAN_FLAGS
        || vni[3] != 0
        || u16::from_be(inner_type) != ETH_P_IP
        || (gso && inner_proto != IPPROTO_TCP)
        // SAFETY: bounds-checked.
        || !unsafe { route::forwardable(inner) }
    {
        return Ok(None);
    }
    let vni = u32::from_be_bytes([0, vni[0], vni[1], vni[2]]);
    let Ok(endpoint) = admit(vtep, vni, saddr, daddr) else {
        return Ok(None);
    };
    // Congestion experienced on the underlay reaches the inner packet (RFC 6040). An inner
    // packet that cannot carry the mark is the device's to drop.
    let mark_ce = outer_tos & ECN_MASK == ECN_CE;
    if mark_ce && inner_tos & ECN_MASK == ECN_NOT_ECT {
        return Ok(None);
    }
    // Out go the outer IPv4, UDP and VXLAN headers and the inner Ethernet header; the outer
    // Ethernet header moves up in front of the inner IP header. NO_CSUM_RESET: a packet whose
    // checksums the NIC verified (CHECKSUM_UNNECESSARY) keeps that (GRO-merged packets must:
    // their TCP checksum is not the merged payload's), less the outer UDP level just below.
    let flags = u64::from(BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_NO_CSUM_RESET);
    if ctx
        .adjust_room(
            -(VXLAN_OVERHEAD as i32),
            bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
            flags,
        )
        .is_err()
    {
        // Refused before anything changed (a GSO type it cannot resize, no memory).
        return Ok(None);
    }
    // The outer UDP header counted as one verified checksum level, as the kernel's UDP receive
    // path takes it off (a no-op for any other checksum state).
    // SAFETY: the skb is the context's.
    unsafe { bpf_csum_level(ctx.skb.skb, u64::from(BPF_CSUM_LEVEL_DEC)) };
    if mark_ce {
        let ip = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN)?;
        // SAFETY: bounds-checked.
        unsafe {
            let (vihl, tos) = ((*ip).vihl, (*ip).tos);
            (*ip).check = csum::incremental16((*ip).check, [vihl, tos], [vihl, tos | ECN_CE]);
            (*ip).tos = tos | ECN_CE;
        }
    }
    deliver::to(ctx, endpoint, Hop::Routed).map(Some)
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
    let endpoint = admit(vtep, vni, saddr, daddr)?;
    deliver::to(ctx, endpoint, Hop::Routed)
}
