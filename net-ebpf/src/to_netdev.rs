//! What leaves the host through its uplink: the tcx egress program of the uplink. Packets from
//! endpoints on masquerading networks get the host's address as their source, and replies from
//! published ports get back the host address and port the client connected to.

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use net_ebpf_common::{
    DropReason, ENDPOINT_F_INTERNAL, ENDPOINT_F_MASQUERADE, ENDPOINT_F_PUBLISHED, EndpointKey,
};

use crate::{counters::drop_packet, maps::ENDPOINTS, nat, parse::ifindex};

/// Hook: tcx egress of the host's uplink.
#[classifier]
pub fn tc_to_netdev(ctx: TcContext) -> i32 {
    match try_to_netdev(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => drop_packet(ifindex(&ctx), reason, ctx.len()),
    }
}

fn try_to_netdev(ctx: &TcContext) -> Result<i32, DropReason> {
    let Some(nat::UplinkPacket {
        host,
        ip,
        off,
        fragment,
    }) = nat::uplink_packet(ctx)?
    else {
        return Ok(TC_ACT_OK);
    };
    // SAFETY: bounds-checked.
    let saddr = unsafe { (*ip).src_addr };
    // The host's own traffic, and what `tc_from_endpoint` translated and routed out already
    // (a published port's replies, masqueraded flows under way): nothing to look up.
    if saddr == host {
        return Ok(TC_ACT_OK);
    }
    // SAFETY: read-only use of a map value.
    let Some(endpoint) = (unsafe { ENDPOINTS.get(EndpointKey { addr: saddr }) }) else {
        // The host's own traffic.
        return Ok(TC_ACT_OK);
    };
    // An internal network's endpoint never leaves the host: the host routes nothing from its
    // veth beyond itself (the agent's rule and settings); should it anyway, not out of here.
    if endpoint.flags & ENDPOINT_F_INTERNAL != 0 {
        return Err(DropReason::InternalNetwork);
    }
    let masquerade = endpoint.flags & ENDPOINT_F_MASQUERADE != 0;
    if !masquerade && endpoint.flags & ENDPOINT_F_PUBLISHED == 0 {
        // Routed as it is: nothing of this endpoint is translated.
        return Ok(TC_ACT_OK);
    }
    let ifindex = endpoint.ifindex;
    // An endpoint's private address must never leave untranslated: what cannot be translated
    // (fragments carry no ports after the first; protocols without ports) is dropped.
    if fragment {
        return if masquerade {
            Err(DropReason::Fragment)
        } else {
            Ok(TC_ACT_OK)
        };
    }
    let Some(flow) = nat::flow_at(ctx, ip, off, nat::EchoDirection::Outgoing)? else {
        return if masquerade {
            Err(DropReason::UnsupportedProtocol)
        } else {
            Ok(TC_ACT_OK)
        };
    };
    // A reply from a published port, or a masqueraded flow already under way.
    if let Some(new) = nat::lookup(ctx, &flow) {
        nat::translate(ctx, off, &flow, &new)?;
        return Ok(TC_ACT_OK);
    }
    if masquerade {
        nat::masquerade(ctx, off, &flow, host, ifindex)?;
    }
    Ok(TC_ACT_OK)
}
