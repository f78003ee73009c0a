//! The host's own connections to published ports: the tcx ingress program of the host's
//! loopback, where every packet the host sends to one of its own addresses arrives. Such a
//! connection is translated to its endpoint and delivered straight into the endpoint's
//! namespace; the endpoint's replies are translated back by `tc_from_endpoint` and handed to
//! the loopback (see `deliver::to_host`).

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use net_ebpf_common::DropReason;
use network_types::eth::EthHdr;

use crate::{
    counters::drop_packet,
    deliver::{self, Hop},
    nat,
    parse::{ETH_P_IP, ifindex, ptr_at},
    published,
};

/// Hook: tcx ingress of the host's loopback.
#[classifier]
pub fn tc_from_host(ctx: TcContext) -> i32 {
    match try_from_host(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => drop_packet(ifindex(&ctx), reason, ctx.len()),
    }
}

fn try_from_host(ctx: &TcContext) -> Result<i32, DropReason> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds-checked.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return Ok(TC_ACT_OK);
    }
    let (ip, off, fragment) = nat::ipv4_at(ctx, nat::IP_OFF)?;
    if fragment {
        return Ok(TC_ACT_OK);
    }
    let Some(flow) = nat::flow_at(ctx, ip, off, nat::EchoDirection::Outgoing)? else {
        return Ok(TC_ACT_OK);
    };
    if let Some(new) = nat::lookup(ctx, &flow) {
        nat::translate(ctx, off, &flow, &new)?;
        return deliver::to_endpoint(ctx, new.daddr, Hop::FromHost);
    }
    // Whatever arrives on the loopback is addressed to the host.
    let Some(target) = published::target(&flow, true) else {
        return Ok(TC_ACT_OK);
    };
    let new = published::connect(ctx, &flow, &target, published::Client::Host)?;
    nat::translate(ctx, off, &flow, &new)?;
    deliver::to_endpoint(ctx, new.daddr, Hop::FromHost)
}
