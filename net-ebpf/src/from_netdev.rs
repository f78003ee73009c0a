//! What arrives at the host through its uplink: the tcx ingress program of the uplink.
//! Connections to published ports are translated to their endpoint, replies to masqueraded
//! flows and the ICMP errors about translated flows are translated back; all of them are
//! delivered straight into their endpoint's namespace, as is the overlay's VXLAN traffic for
//! endpoints here, decapsulated on the spot. Everything else is the host's.

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use net_ebpf_common::{DropReason, VXLAN_PORT};

use crate::{
    counters::drop_packet,
    deliver::{self, Hop},
    nat::{self, IPPROTO_ICMP, IPPROTO_UDP},
    overlay,
    parse::ifindex,
    published,
};

/// Hook: tcx ingress of the host's uplink.
#[classifier]
pub fn tc_from_netdev(ctx: TcContext) -> i32 {
    match try_from_netdev(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => drop_packet(ifindex(&ctx), reason, ctx.len()),
    }
}

fn try_from_netdev(ctx: &TcContext) -> Result<i32, DropReason> {
    let Some(nat::UplinkPacket {
        host,
        ip,
        off,
        fragment,
    }) = nat::uplink_packet(ctx)?
    else {
        return Ok(TC_ACT_OK);
    };
    if fragment {
        // No ports to look up: the host stack's.
        return Ok(TC_ACT_OK);
    }
    // SAFETY: bounds-checked.
    let daddr = unsafe { (*ip).dst_addr };
    let to_host = daddr == host;
    let Some(flow) = nat::flow_at(ctx, ip, off, nat::EchoDirection::Incoming)? else {
        // SAFETY: bounds-checked.
        if to_host
            && unsafe { (*ip).proto } == IPPROTO_ICMP
            && let Some(delivery) = nat::translate_icmp_error(ctx, off)?
        {
            return deliver::to_endpoint(ctx, delivery.addr, Hop::Routed);
        }
        return Ok(TC_ACT_OK);
    };
    // The overlay's VXLAN traffic: decapsulated here, or by the VXLAN device. No flow or
    // published port can use its port: the agent refuses to publish it, and masquerade ports lie
    // elsewhere. Spare every overlay packet the two lookups.
    if to_host && flow.proto == IPPROTO_UDP && flow.dport == VXLAN_PORT.to_be_bytes() {
        return Ok(overlay::decapsulate(ctx, off)?.unwrap_or(TC_ACT_OK));
    }
    if let Some(new) = nat::lookup(ctx, &flow) {
        nat::translate(ctx, off, &flow, &new)?;
        return deliver::to_endpoint(ctx, new.daddr, Hop::Routed);
    }
    let Some(target) = published::target(&flow, to_host) else {
        return Ok(TC_ACT_OK);
    };
    let new = published::connect(ctx, &flow, &target, published::Client::Outside)?;
    nat::translate(ctx, off, &flow, &new)?;
    deliver::to_endpoint(ctx, new.daddr, Hop::Routed)
}
