//! Everything an endpoint sends: the tcx ingress program of its host-side veth.
//!
//! - IPv4 to another endpoint on the same network: rewrite both MACs and `bpf_redirect_peer`
//!   straight into the destination's namespace (no bridge, no host stack).
//! - Connections to published ports through a host address (hairpin), and replies that must go
//!   back through the host (to hairpin clients, or to the host's own connections): translated
//!   and delivered here (see `nat`).
//! - Packets of flows translated at the uplink (replies to outside clients of published ports,
//!   masqueraded flows under way): translated here and routed out of the uplink (see `route`).
//! - IPv4 from an overlay endpoint to another host's subnet: encapsulated (see `overlay`).
//! - IPv4 to anything else (the host, the outside): handed to the host stack; from an endpoint
//!   of an internal network, only what the host keeps (its own addresses), by its FIB.
//! - ARP requests for the gateway or a same-network endpoint: answered here with the host-side
//!   veth's MAC, so every frame an endpoint sends comes through this program.
//! - Packets whose source IP or MAC is not the endpoint's own, and packets to endpoints on other
//!   networks, are dropped and counted.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_REDIRECT},
    helpers::generated::{bpf_redirect, bpf_redirect_peer},
    macros::classifier,
    programs::TcContext,
};
use net_ebpf_common::{
    DropReason, ENDPOINT_F_INTERNAL, ENDPOINT_F_MASQUERADE, ENDPOINT_F_NO_ICC, ENDPOINT_F_OVERLAY,
    ENDPOINT_F_PUBLISHED, EndpointInfo, EndpointKey,
};
use network_types::{arp::ArpHdr, eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    config,
    counters::{Direction, count_traffic, drop_packet},
    deliver::{self, Hop},
    maps::ENDPOINTS,
    nat, overlay,
    parse::{ARP_OP_REPLY, ARP_OP_REQUEST, ETH_P_ARP, ETH_P_IP, ifindex, ptr_at},
    published, route,
};

/// Hook: tcx ingress of an endpoint's host-side veth.
#[classifier]
pub fn tc_from_endpoint(ctx: TcContext) -> i32 {
    let ifindex = ifindex(&ctx);
    match try_from_endpoint(&ctx, ifindex) {
        Ok(verdict) => verdict,
        Err(reason) => drop_packet(ifindex, reason, ctx.len()),
    }
}

/// The longest header run the program reads: Ethernet + ARP (28) > Ethernet + IPv4 (20).
const HEADERS_LEN: usize = EthHdr::LEN + ArpHdr::LEN;

fn try_from_endpoint(ctx: &TcContext, ifindex: u32) -> Result<i32, DropReason> {
    // Headers of a valid packet may sit partly outside the linear area (GRO, some drivers);
    // pull them in rather than mistake the packet for a truncated one.
    if ctx.data() + HEADERS_LEN > ctx.data_end() && ctx.len() as usize >= HEADERS_LEN {
        let _ = ctx.pull_data(HEADERS_LEN as u32);
    }
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: `ptr_at` checked the header lies inside the packet.
    let ether_type = u16::from_be(unsafe { (*eth).ether_type });
    match ether_type {
        ETH_P_IP => from_endpoint_ipv4(ctx, ifindex, eth),
        ETH_P_ARP => from_endpoint_arp(ctx, ifindex, eth),
        _ => Err(DropReason::UnsupportedProtocol),
    }
}

/// The endpoint that owns `addr`, provided it sits behind `ifindex` and uses `mac`: the
/// anti-spoofing check shared by IPv4 and ARP.
#[inline(always)]
fn source_endpoint(
    addr: [u8; 4],
    mac: [u8; 6],
    ifindex: u32,
) -> Result<&'static EndpointInfo, DropReason> {
    // SAFETY: map values are only read here; the agent replaces entries whole.
    let source =
        unsafe { ENDPOINTS.get(EndpointKey { addr }) }.ok_or(DropReason::SpoofedSourceIp)?;
    if source.ifindex != ifindex {
        return Err(DropReason::SpoofedSourceIp);
    }
    if source.mac != mac {
        return Err(DropReason::SpoofedSourceMac);
    }
    Ok(source)
}

fn from_endpoint_ipv4(ctx: &TcContext, ifindex: u32, eth: *mut EthHdr) -> Result<i32, DropReason> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN)?;
    // SAFETY: both headers were bounds-checked by `ptr_at`.
    let (src_mac, src_addr, dst_addr) =
        unsafe { ((*eth).src_addr, (*ip).src_addr, (*ip).dst_addr) };
    let source = source_endpoint(src_addr, src_mac, ifindex)?;

    // SAFETY: read-only use of a map value.
    let Some(destination) = (unsafe { ENDPOINTS.get(EndpointKey { addr: dst_addr }) }) else {
        if source.flags & ENDPOINT_F_INTERNAL != 0 {
            return from_internal_endpoint(ctx, source, ip);
        }
        // Not an endpoint of this host. An endpoint on another host, through the overlay: never
        // translated, so it skips the conntrack lookup below.
        let host = config::host_ipv4();
        let to_host = dst_addr == source.gateway || (dst_addr == host && host != [0; 4]);
        if !to_host
            && source.flags & ENDPOINT_F_OVERLAY != 0
            && let Some(verdict) = overlay::encapsulate(ctx, source, dst_addr)?
        {
            return Ok(verdict);
        }
        // A connection to a published port through a host address (hairpin), a reply that must
        // go back through one, or a packet of a flow the uplink translates (a published port's
        // reply to an outside client, a masqueraded flow). Only packets to the host's addresses
        // and from endpoints with published ports or masquerade can be any of these; the others
        // skip the lookups.
        if (to_host || source.flags & (ENDPOINT_F_PUBLISHED | ENDPOINT_F_MASQUERADE) != 0)
            && let Some(verdict) = translate(ctx, source, to_host)?
        {
            return Ok(verdict);
        }
        // The host itself, or beyond it. The host stack decides.
        count_traffic(source.slot, Direction::FromEndpoint, ctx.len());
        return Ok(TC_ACT_OK);
    };
    if destination.network_id != source.network_id {
        return Err(DropReason::NetworkIsolation);
    }
    if source.flags & ENDPOINT_F_NO_ICC != 0 {
        return Err(DropReason::IccDisabled);
    }

    // Endpoints on one network share a subnet, so this is L2 forwarding as a bridge would do it:
    // the destination sees its gateway's MAC (its own host veth) as the sender.
    // SAFETY: bounds-checked above, and no helper has changed the packet since.
    unsafe {
        (*eth).dst_addr = destination.mac;
        (*eth).src_addr = destination.host_mac;
    }
    // SAFETY: plain helper call; it only records the target for after the program returns.
    let verdict = unsafe { bpf_redirect_peer(destination.ifindex, 0) } as i32;
    if verdict != TC_ACT_REDIRECT {
        return Err(DropReason::RedirectFailed);
    }
    count_traffic(source.slot, Direction::FromEndpoint, ctx.len());
    count_traffic(destination.slot, Direction::ToEndpoint, ctx.len());
    Ok(verdict)
}

/// A packet from an endpoint of an internal network to something other than an endpoint of
/// this host: to the host stack if the host keeps it (one of its own addresses), else dropped.
/// Nothing is translated: an internal network has no masquerade, and a published port reached
/// through a host address would carry the packet on to another network. The host routes
/// nothing from the endpoint's veth beyond itself either (the agent's `unreachable` rule for
/// the network, and the veth's `forwarding` off), also not what its own netfilter rewrites
/// after this; this drops and counts early what it would route.
#[inline(never)]
fn from_internal_endpoint(
    ctx: &TcContext,
    source: &EndpointInfo,
    ip: *const Ipv4Hdr,
) -> Result<i32, DropReason> {
    // SAFETY: bounds-checked by the caller; no helper has changed the packet since.
    let (dst_addr, tos) = unsafe { ((*ip).dst_addr, (*ip).tos) };
    if route::host_would_route_on(ctx.skb.skb, u32::from_ne_bytes(dst_addr), tos) {
        return Err(DropReason::InternalNetwork);
    }
    count_traffic(source.slot, Direction::FromEndpoint, ctx.len());
    Ok(TC_ACT_OK)
}

/// Translates and delivers a packet whose flow is translated here (`CT_F_AT_ENDPOINT`), or that
/// opens one: a connection to a published port through a host address; or sends a packet of a
/// flow translated at the uplink out of it (see `to_uplink`). `Ok(None)`: none of these; the
/// packet goes on as usual.
#[inline(always)]
fn translate(
    ctx: &TcContext,
    source: &EndpointInfo,
    to_host: bool,
) -> Result<Option<i32>, DropReason> {
    let (ip, off, fragment) = nat::ipv4_at(ctx, nat::IP_OFF)?;
    if fragment {
        return Ok(None);
    }
    let Some(flow) = nat::flow_at(ctx, ip, off, nat::EchoDirection::Outgoing)? else {
        return Ok(None);
    };
    let new = match nat::find(&flow) {
        Some(found) if found.at_endpoint => {
            found.account(ctx, &flow);
            found.new
        }
        Some(found) => return to_uplink(ctx, source, ip, off, &flow, &found),
        None if to_host => {
            let Some(target) = published::target(&flow, to_host) else {
                return Ok(None);
            };
            published::connect(ctx, &flow, &target, published::Client::Endpoint)?
        }
        None => return Ok(None),
    };
    nat::translate(ctx, off, &flow, &new)?;
    count_traffic(source.slot, Direction::FromEndpoint, ctx.len());
    // To another endpoint (or back to this one), or a reply to one of the host's own
    // connections.
    // SAFETY: read-only use of a map value.
    let verdict = match unsafe { ENDPOINTS.get(EndpointKey { addr: new.daddr }) } {
        // Hairpin: from an endpoint through a host address, forwarded by the host.
        Some(endpoint) => deliver::to(ctx, endpoint, Hop::Routed)?,
        None => deliver::to_host(ctx)?,
    };
    Ok(Some(verdict))
}

/// A packet of a flow that `tc_to_netdev` translates (a published port's reply to an outside
/// client, a masqueraded flow under way): translated here and routed straight out of the
/// uplink, one hop less, as the host would forward it (see `route`). `Ok(None)`: the route is
/// not this simple; the packet goes to the host stack as it is, and the uplink translates and
/// accounts it.
///
/// Not inlined: inlined, its code costs the forwarding path every packet takes (~12 ns by the
/// bench's program rows), though that path never runs it.
#[inline(never)]
fn to_uplink(
    ctx: &TcContext,
    source: &EndpointInfo,
    ip: *mut Ipv4Hdr,
    off: nat::Ipv4Offsets,
    flow: &nat::Flow,
    found: &nat::Found,
) -> Result<Option<i32>, DropReason> {
    // SAFETY: bounds-checked by `ipv4_at`; no helper has changed the packet since.
    let (forwardable, tos) = unsafe { (route::forwardable(ip), (*ip).tos) };
    if !forwardable
        || !route::redirect_out_of_uplink(
            ctx.skb.skb,
            source.ifindex,
            u32::from_ne_bytes(found.new.saddr),
            u32::from_ne_bytes(found.new.daddr),
            tos,
        )
    {
        return Ok(None);
    }
    // One hop less, before `translate`, whose helper calls end the header pointer's validity.
    // SAFETY: bounds-checked by `ipv4_at`; no helper has changed the packet since.
    unsafe { route::take_hop(ip) };
    nat::translate(ctx, off, flow, &found.new)?;
    found.account(ctx, flow);
    count_traffic(source.slot, Direction::FromEndpoint, ctx.len());
    Ok(Some(TC_ACT_REDIRECT))
}

fn from_endpoint_arp(ctx: &TcContext, ifindex: u32, eth: *mut EthHdr) -> Result<i32, DropReason> {
    let arp = ptr_at::<ArpHdr>(ctx, EthHdr::LEN)?;
    // SAFETY: both headers were bounds-checked by `ptr_at`.
    let (eth_src, oper, sender_mac, sender_addr, target_addr) = unsafe {
        (
            (*eth).src_addr,
            (*arp).oper(),
            (*arp).sha,
            (*arp).spa,
            (*arp).tpa,
        )
    };
    if sender_mac != eth_src {
        return Err(DropReason::SpoofedSourceMac);
    }
    let source = source_endpoint(sender_addr, sender_mac, ifindex)?;

    if oper != ARP_OP_REQUEST {
        // Replies (to the host's own requests for the endpoint) go to the host stack.
        if oper == ARP_OP_REPLY {
            count_traffic(source.slot, Direction::FromEndpoint, ctx.len());
            return Ok(TC_ACT_OK);
        }
        return Err(DropReason::UnsupportedProtocol);
    }

    if target_addr == sender_addr {
        // Gratuitous ARP (an announcement, RFC 5227): answering it would tell the endpoint
        // another MAC owns its address, which conflict detection takes as a duplicate.
        count_traffic(source.slot, Direction::FromEndpoint, ctx.len());
        return Ok(TC_ACT_OK);
    }
    if target_addr != source.gateway {
        // SAFETY: read-only use of a map value.
        match unsafe { ENDPOINTS.get(EndpointKey { addr: target_addr }) } {
            Some(target) if target.network_id == source.network_id => {}
            Some(_) => return Err(DropReason::NetworkIsolation),
            None => return Err(DropReason::ArpTargetUnknown),
        }
    }

    // Turn the request into the reply in place and send it back out of the same veth: the
    // gateway and every peer resolve to the host-side veth's MAC, where this program forwards.
    let host_mac = source.host_mac;
    // SAFETY: bounds-checked above, and no helper has changed the packet since.
    unsafe {
        (*eth).dst_addr = sender_mac;
        (*eth).src_addr = host_mac;
        (*arp).set_oper(ARP_OP_REPLY);
        (*arp).tha = sender_mac;
        (*arp).tpa = sender_addr;
        (*arp).sha = host_mac;
        (*arp).spa = target_addr;
    }
    // SAFETY: plain helper call.
    let verdict = unsafe { bpf_redirect(ifindex, 0) } as i32;
    if verdict != TC_ACT_REDIRECT {
        return Err(DropReason::RedirectFailed);
    }
    count_traffic(source.slot, Direction::FromEndpoint, ctx.len());
    Ok(verdict)
}
