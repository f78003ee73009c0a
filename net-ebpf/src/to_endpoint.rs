//! What the host stack sends to an endpoint: the tcx egress program of its host-side veth.
//! Endpoint-to-endpoint traffic never passes here (`bpf_redirect_peer` skips this hook; it is
//! counted where it is redirected), so this only counts.

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};

use crate::{
    counters::{Direction, count_traffic_of},
    parse::ifindex,
};

/// Hook: tcx egress of an endpoint's host-side veth.
#[classifier]
pub fn tc_to_endpoint(ctx: TcContext) -> i32 {
    count_traffic_of(ifindex(&ctx), Direction::ToEndpoint, ctx.len());
    TC_ACT_OK
}
