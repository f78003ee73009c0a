//! The overlay's paths: encapsulation in `tc_from_endpoint` (a tunnel key set and a redirect to
//! the VXLAN device, which a test run records and does not perform), decapsulation at the
//! uplink in `tc_from_netdev` and the drops of both overlay programs. `tc_from_overlay`'s
//! delivery path (what the VXLAN device still decapsulates) needs tunnel metadata on the skb,
//! which a test run cannot attach.

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result};
use aya::maps::{Array, LpmTrie, MapData, lpm_trie::Key as LpmKey};
use net_ebpf_common::{
    DropReason, ENDPOINT_F_OVERLAY, OVERLAY_NETWORK_ID, RouteInfo, RouteKey, map_names,
    overlay_slot, program_names,
};

use super::{
    Case, Counted, Program, TC_ACT_REDIRECT,
    frames::{Endpoint, TEST_RUN_IFINDEX, forwarded, tcp_frame, vxlan_frame},
};

const VNI: u32 = 7;

/// An endpoint of overlay network VNI 7 on this host's subnet 10.244.0.0/24, behind the test
/// run's interface.
const O: Endpoint = Endpoint {
    ip: Ipv4Addr::new(10, 244, 0, 2),
    mac: [0x02, 0, 0, 0, 0x0b, 0x02],
    host_mac: [0x02, 0, 0, 0, 0xbb, 0x02],
    ifindex: TEST_RUN_IFINDEX,
    network_id: OVERLAY_NETWORK_ID | VNI,
    gateway: Ipv4Addr::new(10, 244, 0, 1),
    flags: ENDPOINT_F_OVERLAY,
    // A's: the counters are the veth's, and both sit behind the test run's.
    slot: super::frames::A.slot,
};
/// On another host's subnet, 10.244.1.0/24 at VTEP 198.18.0.2.
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const REMOTE_VTEP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// A MAC of REMOTE's (its frames keep their MACs through the tunnel).
const REMOTE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0f, 0x05];
/// In the pool, on no host's subnet.
const UNLEASED: Ipv4Addr = Ipv4Addr::new(10, 244, 9, 9);

/// Puts O, the pool and the remote subnet in place, as an agent of an overlay network does.
pub fn install(ebpf: &mut aya::Ebpf, maps: &mut super::Maps) -> Result<()> {
    maps.add_endpoint(&O)?;
    let mut routes: LpmTrie<MapData, RouteKey, RouteInfo> = ebpf
        .take_map(map_names::REMOTE_ROUTES)
        .context("map REMOTE_ROUTES is not in the eBPF object")?
        .try_into()
        .context("map REMOTE_ROUTES has an unexpected type")?;
    for (addr, prefix, vtep) in [
        ([10, 244, 0, 0], 16, [0, 0, 0, 0]),
        ([10, 244, 1, 0], 24, REMOTE_VTEP.octets()),
    ] {
        routes
            .insert(
                &LpmKey::new(prefix, RouteKey { addr }),
                RouteInfo { vtep, vni: VNI },
                0,
            )
            .context("filling REMOTE_ROUTES")?;
    }
    let mut overlay: Array<MapData, u32> = ebpf
        .take_map(map_names::OVERLAY)
        .context("map OVERLAY is not in the eBPF object")?
        .try_into()
        .context("map OVERLAY has an unexpected type")?;
    // Any existing device will do: the redirect is only recorded.
    overlay
        .set(overlay_slot::VXLAN_IFINDEX, TEST_RUN_IFINDEX, 0)
        .context("filling OVERLAY")
}

pub fn cases() -> Vec<Case> {
    let from = Program::Named(program_names::TC_FROM_ENDPOINT);
    let to_remote = tcp_frame(O.mac, O.host_mac, O.ip, REMOTE);
    let from_remote = tcp_frame(REMOTE_MAC, O.host_mac, REMOTE, O.ip);
    vec![
        Case::plain(
            "overlay_encap",
            "overlay endpoint to another host's subnet (tunnel key, redirect to the VXLAN device)",
            from,
            to_remote.clone(),
            TC_ACT_REDIRECT,
            Some(to_remote.clone()),
            Counted::Traffic {
                from: &[TEST_RUN_IFINDEX],
                to: &[],
            },
        ),
        Case::plain(
            "overlay_decap",
            "VXLAN packet from another host decapsulated at the uplink, into its endpoint",
            Program::Named(program_names::TC_FROM_NETDEV),
            vxlan_frame(REMOTE_VTEP, VNI, &from_remote),
            TC_ACT_REDIRECT,
            Some(forwarded(&tcp_frame(O.host_mac, O.mac, REMOTE, O.ip))),
            Counted::Traffic {
                from: &[],
                to: &[TEST_RUN_IFINDEX],
            },
        ),
        Case::drop(
            "drop_overlay_no_route",
            "drop: an overlay address no host leases",
            from,
            tcp_frame(O.mac, O.host_mac, O.ip, UNLEASED),
            DropReason::OverlayNoRoute,
        ),
        Case::drop(
            "drop_overlay_bad_source",
            "drop: at the VXLAN device, a packet that did not come through the tunnel",
            Program::Named(program_names::TC_FROM_OVERLAY),
            tcp_frame(O.host_mac, O.mac, REMOTE, O.ip),
            DropReason::OverlayBadSource,
        ),
    ]
}
