//! The data plane. Programs are named by hook and direction as seen from the endpoint:
//!
//! - [`from_endpoint::tc_from_endpoint`]: tcx ingress of an endpoint's host-side veth.
//! - [`to_endpoint::tc_to_endpoint`]: tcx egress of an endpoint's host-side veth.
//! - [`from_netdev::tc_from_netdev`]: tcx ingress of the host's uplink.
//! - [`to_netdev::tc_to_netdev`]: tcx egress of the host's uplink.
//! - [`from_host::tc_from_host`]: tcx ingress of the host's loopback.
//! - [`overlay::tc_from_overlay`]: tcx ingress of the host's VXLAN device.
//!
//! Shared logic: [`parse`] (bounds-checked header access), [`maps`] (every map, in one place),
//! [`counters`] (traffic counters and the single drop exit), [`nat`] (connection tracking,
//! translation, masquerade), [`published`] (published ports and their allow lists),
//! [`deliver`] (redirects into endpoints and the host), [`overlay`] (VXLAN encapsulation and
//! its checks), [`route`] (forwarding out of the uplink from BPF), [`csum`] (checksum fix-ups),
//! [`config`] (load-time settings).
#![no_std]
#![no_main]

mod config;
mod counters;
mod csum;
mod deliver;
mod from_endpoint;
mod from_host;
mod from_netdev;
mod maps;
mod nat;
mod overlay;
mod parse;
mod published;
mod route;
mod to_endpoint;
mod to_netdev;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here, so this is never executed.
    loop {}
}
