//! The data plane. Programs are named by hook and direction as seen from the endpoint:
//!
//! - [`from_endpoint::tc_from_endpoint`]: tcx ingress of an endpoint's host-side veth.
//! - [`to_endpoint::tc_to_endpoint`]: tcx egress of an endpoint's host-side veth.
//!
//! Shared logic: [`parse`] (bounds-checked header access), [`maps`] (every map, in one place),
//! [`counters`] (traffic counters and the single drop exit).
#![no_std]
#![no_main]

mod counters;
mod from_endpoint;
mod maps;
mod parse;
mod to_endpoint;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here, so this is never executed.
    loop {}
}
