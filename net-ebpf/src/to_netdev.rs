//! What leaves the host through its uplink: the tcx egress program of the uplink. Packets from
//! endpoints on masquerading networks get the host's address as their source.

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use net_ebpf_common::{DropReason, ENDPOINT_F_MASQUERADE, EndpointKey};
use network_types::eth::EthHdr;

use crate::{
    config,
    counters::drop_packet,
    maps::ENDPOINTS,
    nat::{self, IP_OFF},
    parse::{ETH_P_IP, ifindex, ptr_at},
};

/// Hook: tcx egress of the host's uplink.
#[classifier]
pub fn tc_to_netdev(ctx: TcContext) -> i32 {
    match try_to_netdev(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => drop_packet(ifindex(&ctx), reason, ctx.len()),
    }
}

fn try_to_netdev(ctx: &TcContext) -> Result<i32, DropReason> {
    let host = config::host_ipv4();
    if host == [0; 4] {
        return Ok(TC_ACT_OK);
    }
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds-checked.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return Ok(TC_ACT_OK);
    }
    let (ip, off, fragment) = nat::ipv4_at(ctx, IP_OFF)?;
    // SAFETY: bounds-checked.
    let saddr = unsafe { (*ip).src_addr };
    // SAFETY: read-only use of a map value.
    let Some(endpoint) = (unsafe { ENDPOINTS.get(EndpointKey { addr: saddr }) }) else {
        // The host's own traffic.
        return Ok(TC_ACT_OK);
    };
    if endpoint.flags & ENDPOINT_F_MASQUERADE == 0 {
        return Ok(TC_ACT_OK);
    }
    let ifindex = endpoint.ifindex;
    // An endpoint's private address must never leave untranslated: what cannot be translated
    // (fragments carry no ports after the first; protocols without ports) is dropped.
    if fragment {
        return Err(DropReason::Fragment);
    }
    let Some(flow) = nat::flow_at(ctx, ip, off, nat::EchoDirection::Outgoing)? else {
        return Err(DropReason::UnsupportedProtocol);
    };
    let (port_min, port_max) = config::nat_ports();
    nat::masquerade(ctx, off, &flow, host, ifindex, port_min, port_max)?;
    Ok(TC_ACT_OK)
}
