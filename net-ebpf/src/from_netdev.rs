//! What arrives at the host through its uplink: the tcx ingress program of the uplink. Replies
//! to masqueraded flows, and ICMP errors about them, are translated back and delivered straight
//! into their endpoint's namespace; everything else is the host's.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_REDIRECT},
    helpers::generated::bpf_redirect_peer,
    macros::classifier,
    programs::TcContext,
};
use net_ebpf_common::{DropReason, EndpointKey};
use network_types::eth::EthHdr;

use crate::{
    counters::{Direction, count_traffic, drop_packet},
    maps::ENDPOINTS,
    nat::{self, Delivery, IPPROTO_ICMP},
    parse::{ifindex, ptr_at},
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
    // SAFETY: bounds-checked.
    let daddr = unsafe { (*ip).dst_addr };
    if daddr != host || fragment {
        // Not for the host's address, or a fragment (no ports to look up): the host stack's.
        return Ok(TC_ACT_OK);
    }
    let delivery = match nat::flow_at(ctx, ip, off, nat::EchoDirection::Incoming)? {
        Some(flow) => nat::unmasquerade(ctx, off, &flow)?,
        None => {
            // SAFETY: bounds-checked.
            if unsafe { (*ip).proto } == IPPROTO_ICMP {
                nat::unmasquerade_icmp_error(ctx, off, daddr)?
            } else {
                None
            }
        }
    };
    match delivery {
        Some(delivery) => deliver(ctx, delivery),
        None => Ok(TC_ACT_OK),
    }
}

/// Hands a translated reply to its endpoint, as endpoint-to-endpoint forwarding does.
fn deliver(ctx: &TcContext, delivery: Delivery) -> Result<i32, DropReason> {
    // SAFETY: read-only use of a map value.
    let Some(endpoint) = (unsafe {
        ENDPOINTS.get(EndpointKey {
            addr: delivery.addr,
        })
    }) else {
        // The endpoint went away while its flow was still recorded.
        return Err(DropReason::RedirectFailed);
    };
    // The helpers above changed the packet: reload the Ethernet header.
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
    count_traffic(ifindex, Direction::ToEndpoint, ctx.len());
    Ok(verdict)
}
