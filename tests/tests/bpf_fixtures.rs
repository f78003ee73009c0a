//! Packet fixtures for the endpoint programs, run through `BPF_PROG_TEST_RUN`.
//!
//! Each case is one row of [`cases`]: the ENDPOINTS entries, one hand-built input frame, the
//! verdict, the frame the program must leave behind and what must be counted. Every case runs
//! against a freshly loaded object (private, unpinned maps), because map side effects of a test
//! run are real and a counter left by one case would blur the next.
//!
//! How `BPF_PROG_TEST_RUN` models a tc packet, and how the table follows it:
//! - `skb->dev` is the loopback device (no `ctx_in`), so the program's `ifindex` is 1. The source
//!   endpoint A therefore lives behind ifindex 1; the other endpoints get made-up ifindexes, which
//!   is fine because a redirect is only recorded, never carried out.
//! - Redirects return `TC_ACT_REDIRECT` and send nothing; the output buffer holds the frame as the
//!   program left it.
//!
//! The overlay cases ([`overlay_cases`]) need packets on other devices than the loopback: the
//! overlay endpoint's own host veth, so that it is told apart from the bridge endpoint A behind
//! the loopback, and the VXLAN device, where `tc_from_overlay` runs and counts its drops. They
//! pass a `__sk_buff` context naming the device, which must exist in the caller's namespace, so
//! they run in a private network namespace holding a veth at each of those ifindexes.
//!
//! Needs root (CAP_BPF + CAP_NET_ADMIN, and CAP_SYS_ADMIN for the overlay cases' namespace);
//! without it the tests say why and pass.

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr};

use aya::programs::{ProgramError, TestRun as _, TestRunOptions};
use net_agent::{
    cluster::Ipv4Network,
    datapath::{self, Maps},
};
use net_ebpf_common::{
    DropCounters, DropReason, ENDPOINT_F_INTERNAL, ENDPOINT_F_NO_ICC, ENDPOINT_F_OVERLAY,
    EndpointInfo, OVERLAY_NETWORK_ID, RouteInfo, TrafficCounters, program_names,
};
use net_tests::{
    fixture::{
        TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, forwarded_skb_context,
        in_private_netns_with_veths, internet_checksum, l4_checksum, mac_text, verdict_name,
    },
    run_ok,
};

// Verdicts from include/uapi/linux/pkt_cls.h.

/// The ifindex the program sees under `BPF_PROG_TEST_RUN`: loopback's.
const TEST_RUN_IFINDEX: u32 = 1;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const ARP_OP_REQUEST: u16 = 1;
const ARP_OP_REPLY: u16 = 2;
const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const ARP_LEN: usize = 28;
const BROADCAST_MAC: [u8; 6] = [0xff; 6];

/// An endpoint as the agent would describe it in ENDPOINTS.
struct Endpoint {
    ip: Ipv4Addr,
    mac: [u8; 6],
    host_mac: [u8; 6],
    ifindex: u32,
    network_id: u32,
    gateway: Ipv4Addr,
    /// `ENDPOINT_F_*` bits.
    flags: u32,
}

impl Endpoint {
    fn info(&self) -> EndpointInfo {
        EndpointInfo {
            ifindex: self.ifindex,
            network_id: self.network_id,
            gateway: self.gateway.octets(),
            mac: self.mac,
            host_mac: self.host_mac,
            flags: self.flags,
            // Handed out by `Maps::upsert_endpoint`.
            slot: 0,
        }
    }
}

/// The sender in every from-endpoint case: behind the interface the test run uses.
const A: Endpoint = Endpoint {
    ip: Ipv4Addr::new(10, 1, 0, 2),
    mac: [0x02, 0, 0, 0, 0x0a, 0x02],
    host_mac: [0x02, 0, 0, 0, 0xaa, 0x02],
    ifindex: TEST_RUN_IFINDEX,
    network_id: 1,
    gateway: Ipv4Addr::new(10, 1, 0, 1),
    flags: 0,
};

/// A peer of A on the same network.
const B: Endpoint = Endpoint {
    ip: Ipv4Addr::new(10, 1, 0, 3),
    mac: [0x02, 0, 0, 0, 0x0b, 0x03],
    host_mac: [0x02, 0, 0, 0, 0xbb, 0x03],
    ifindex: 42,
    network_id: 1,
    gateway: Ipv4Addr::new(10, 1, 0, 1),
    flags: 0,
};

/// An endpoint on another network: A must not reach it.
const C: Endpoint = Endpoint {
    ip: Ipv4Addr::new(10, 2, 0, 2),
    mac: [0x02, 0, 0, 0, 0x0c, 0x02],
    host_mac: [0x02, 0, 0, 0, 0xcc, 0x02],
    ifindex: 43,
    network_id: 2,
    gateway: Ipv4Addr::new(10, 2, 0, 1),
    flags: 0,
};

/// The usual map content: A, its peer B and the isolated C.
const ABC: &[&Endpoint] = &[&A, &B, &C];

/// A on a network whose endpoints may not talk to each other (`--no-icc`): its entry carries
/// the flag, as every entry of that network does.
const A_NO_ICC: Endpoint = Endpoint {
    flags: ENDPOINT_F_NO_ICC,
    ..A
};
const B_NO_ICC: Endpoint = Endpoint {
    flags: ENDPOINT_F_NO_ICC,
    ..B
};
const ABC_NO_ICC: &[&Endpoint] = &[&A_NO_ICC, &B_NO_ICC, &C];

/// A MAC nobody owns, for spoofing.
const STRANGER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x66, 0x66];
/// An address in A's subnet that no endpoint owns.
const UNKNOWN_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 99);
/// Outside every endpoint network.
const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

// The overlay, as the agent sets it up on a host of a two-host cluster: overlay network VNI 7
// (pool 10.244.0.0/16) and VNI 8 (pool 10.245.0.0/16); this host leases 10.244.0.0/24 of VNI 7,
// the other host (REMOTE_VTEP) 10.244.1.0/24 of VNI 7 and 10.245.1.0/24 of VNI 8.

const VNI: u32 = 7;
const OTHER_VNI: u32 = 8;
/// The other host's underlay address.
const REMOTE_VTEP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// This host's underlay address: where VXLAN packets for it arrive.
const LOCAL_VTEP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The overlay's VXLAN port (IANA's).
const VXLAN_PORT: u16 = 4789;
/// The VXLAN device: where encapsulated packets are redirected, and where `tc_from_overlay`
/// runs. A veth stands in for it: the redirect is only recorded, never carried out, and the
/// tunnel key is attached to the skb whatever device comes next.
const VXLAN_IFINDEX: u32 = 60;

/// An endpoint on overlay network VNI 7, in this host's subnet. Its host veth is a device of the
/// overlay suite's namespace, away from A's (the loopback), so that counters show which
/// interface they were taken on.
const O: Endpoint = Endpoint {
    ip: Ipv4Addr::new(10, 244, 0, 2),
    mac: [0x02, 0, 0, 0, 0x0e, 0x02],
    host_mac: [0x02, 0, 0, 0, 0xee, 0x02],
    ifindex: 50,
    network_id: OVERLAY_NETWORK_ID | VNI,
    gateway: Ipv4Addr::new(10, 244, 0, 1),
    flags: ENDPOINT_F_OVERLAY,
};

/// O's peer on the other host, in that host's subnet: never in this host's maps (its ifindex
/// would be one of the other host's).
const REMOTE_PEER: Endpoint = Endpoint {
    ip: Ipv4Addr::new(10, 244, 1, 5),
    mac: [0x02, 0, 0, 0, 0x0f, 0x05],
    host_mac: [0x02, 0, 0, 0, 0xff, 0x05],
    ifindex: 0,
    network_id: OVERLAY_NETWORK_ID | VNI,
    gateway: Ipv4Addr::new(10, 244, 1, 1),
    flags: ENDPOINT_F_OVERLAY,
};

/// The endpoints on the overlay suite's host: the bridge endpoint A and the overlay endpoint O.
const OVERLAY_HOST: &[&Endpoint] = &[&A, &O];

/// An endpoint of an internal network, behind a host veth of the internal suite's namespace.
const I: Endpoint = Endpoint {
    ip: Ipv4Addr::new(10, 40, 0, 2),
    mac: [0x02, 0, 0, 0, 0x1a, 0x02],
    host_mac: [0x02, 0, 0, 0, 0x1b, 0x02],
    ifindex: 70,
    network_id: 4,
    gateway: Ipv4Addr::new(10, 40, 0, 1),
    flags: ENDPOINT_F_INTERNAL,
};

/// I's peer on the internal network (a redirect to it is only recorded: no device needed).
const J: Endpoint = Endpoint {
    ip: Ipv4Addr::new(10, 40, 0, 3),
    mac: [0x02, 0, 0, 0, 0x1a, 0x03],
    host_mac: [0x02, 0, 0, 0, 0x1b, 0x03],
    ifindex: 72,
    ..I
};

/// An endpoint of a network that is not internal, on the internal suite's host.
const N: Endpoint = Endpoint {
    ip: Ipv4Addr::new(10, 41, 0, 2),
    mac: [0x02, 0, 0, 0, 0x1c, 0x02],
    host_mac: [0x02, 0, 0, 0, 0x1d, 0x02],
    ifindex: 73,
    network_id: 5,
    gateway: Ipv4Addr::new(10, 41, 0, 1),
    flags: 0,
};

/// The internal suite's host: its uplink, with the host's address and the outside on link
/// (`OUTSIDE_IP` is in the uplink's subnet), and IP forwarding on.
const INTERNAL_SUITE_UPLINK: u32 = 71;
const INTERNAL_SUITE_HOST_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const INTERNAL_SUITE_HOST: &[&Endpoint] = &[&I, &J, &N, &C];
/// The internal suite's programs, loaded with the uplink's address (the uplink program needs
/// it to run at all).
const INTERNAL_SUITE_SETTINGS: Overlay = Overlay {
    routes: &[],
    vxlan_ifindex: 0,
    host_ipv4: Some(INTERNAL_SUITE_HOST_IP),
};

/// In VNI 7's pool, in a subnet no host leases.
const UNLEASED_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 9, 9);
/// On the other overlay network: in the other host's subnet, and in no host's.
const OTHER_NETWORK_IP: Ipv4Addr = Ipv4Addr::new(10, 245, 1, 5);
const OTHER_NETWORK_UNLEASED_IP: Ipv4Addr = Ipv4Addr::new(10, 245, 9, 9);

/// `addr/prefix`, for constants (a prefix over 32 fails the build).
const fn subnet(addr: Ipv4Addr, prefix: u8) -> Ipv4Network {
    Ipv4Network::new_checked(addr, prefix).expect("an IPv4 prefix of at most 32 bits")
}

/// REMOTE_ROUTES as the agent derives them from the leases: each pool unreachable (VTEP
/// 0.0.0.0), each subnet of another host to that host. This host's own subnet has no route of
/// its own (the pool's covers it): its addresses are endpoints here, or unreachable.
const CLUSTER_ROUTES: &[(Ipv4Network, RouteInfo)] = &[
    (
        subnet(Ipv4Addr::new(10, 244, 0, 0), 16),
        RouteInfo {
            vtep: [0; 4],
            vni: VNI,
        },
    ),
    (
        subnet(Ipv4Addr::new(10, 244, 1, 0), 24),
        RouteInfo {
            vtep: REMOTE_VTEP.octets(),
            vni: VNI,
        },
    ),
    (
        subnet(Ipv4Addr::new(10, 245, 0, 0), 16),
        RouteInfo {
            vtep: [0; 4],
            vni: OTHER_VNI,
        },
    ),
    (
        subnet(Ipv4Addr::new(10, 245, 1, 0), 24),
        RouteInfo {
            vtep: REMOTE_VTEP.octets(),
            vni: OTHER_VNI,
        },
    ),
];

/// What the agent has told the data plane about the overlay.
struct Overlay {
    /// REMOTE_ROUTES, written through the agent's `Maps::sync_routes`.
    routes: &'static [(Ipv4Network, RouteInfo)],
    /// OVERLAY's VXLAN device slot; 0: the agent has not made the device yet.
    vxlan_ifindex: u32,
    /// The uplink's address as the agent loads the programs with it (`LoadSettings::host_ipv4`):
    /// what `tc_from_netdev` needs to take packets for this host.
    host_ipv4: Option<Ipv4Addr>,
}

/// No overlay network: the maps as a host without one leaves them.
const NO_OVERLAY: Overlay = Overlay {
    routes: &[],
    vxlan_ifindex: 0,
    host_ipv4: None,
};

/// The cluster above, VXLAN device up.
const CLUSTER: Overlay = Overlay {
    routes: CLUSTER_ROUTES,
    vxlan_ifindex: VXLAN_IFINDEX,
    host_ipv4: None,
};

/// The cluster above, with the uplink's address loaded: what the uplink program runs with.
const CLUSTER_AT_UPLINK: Overlay = Overlay {
    routes: CLUSTER_ROUTES,
    vxlan_ifindex: VXLAN_IFINDEX,
    host_ipv4: Some(LOCAL_VTEP),
};

/// The routes are in, but the VXLAN device is not known yet (the agent writes routes and the
/// device's ifindex in separate steps).
const CLUSTER_WITHOUT_VXLAN: Overlay = Overlay {
    routes: CLUSTER_ROUTES,
    vxlan_ifindex: 0,
    host_ipv4: None,
};

// ---------------------------------------------------------------------------------------------
// Frame builders. Everything is built by hand so that each byte on the wire is visible here.

/// An Ethernet II frame around `payload`.
fn ethernet_frame(dst: [u8; 6], src: [u8; 6], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(ETH_LEN + payload.len());
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// An IPv4 packet (no options, DF, TTL 64) with a valid header checksum.
fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let total_len = u16::try_from(IPV4_LEN + l4.len()).expect("test packet fits in an IPv4 packet");
    let mut packet = Vec::with_capacity(IPV4_LEN + l4.len());
    packet.push(0x45); // version 4, IHL 5
    packet.push(0); // TOS
    packet.extend_from_slice(&total_len.to_be_bytes());
    packet.extend_from_slice(&0x1234u16.to_be_bytes()); // id
    packet.extend_from_slice(&0x4000u16.to_be_bytes()); // DF
    packet.push(64); // TTL
    packet.push(proto);
    packet.extend_from_slice(&[0, 0]); // checksum, filled below
    packet.extend_from_slice(&src.octets());
    packet.extend_from_slice(&dst.octets());
    let check = internet_checksum(&[&packet]);
    packet[10..12].copy_from_slice(&check.to_be_bytes());
    packet.extend_from_slice(l4);
    packet
}

/// A TCP SYN from `src:40000` to `dst:80` with a valid checksum, as an IPv4 packet.
fn ipv4_tcp_syn(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20);
    tcp.extend_from_slice(&40000u16.to_be_bytes());
    tcp.extend_from_slice(&80u16.to_be_bytes());
    tcp.extend_from_slice(&1u32.to_be_bytes()); // seq
    tcp.extend_from_slice(&0u32.to_be_bytes()); // ack
    tcp.push(5 << 4); // data offset 5
    tcp.push(0x02); // SYN
    tcp.extend_from_slice(&64240u16.to_be_bytes()); // window
    tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    let check = l4_checksum(src, dst, IPPROTO_TCP, &tcp);
    tcp[16..18].copy_from_slice(&check.to_be_bytes());
    ipv4_packet(src, dst, IPPROTO_TCP, &tcp)
}

/// A UDP datagram from `src:5000` to `dst:53` carrying `payload`, as an IPv4 packet.
fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + payload.len()).expect("test datagram fits in UDP");
    let mut udp = Vec::with_capacity(usize::from(len));
    udp.extend_from_slice(&5000u16.to_be_bytes());
    udp.extend_from_slice(&53u16.to_be_bytes());
    udp.extend_from_slice(&len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let check = l4_checksum(src, dst, IPPROTO_UDP, &udp);
    udp[6..8].copy_from_slice(&check.to_be_bytes());
    ipv4_packet(src, dst, IPPROTO_UDP, &udp)
}

/// An ICMP echo request (id 7, seq 1, 8 bytes of data), as an IPv4 packet.
fn ipv4_icmp_echo(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0, 0, 7, 0, 1];
    icmp.extend_from_slice(b"fixture!");
    let check = internet_checksum(&[&icmp]);
    icmp[2..4].copy_from_slice(&check.to_be_bytes());
    ipv4_packet(src, dst, IPPROTO_ICMP, &icmp)
}

/// A TCP SYN from `src` to `dst` in an Ethernet frame from `src_mac` to `dst_mac`.
fn tcp_frame(src_mac: [u8; 6], dst_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    ethernet_frame(dst_mac, src_mac, ETH_P_IP, &ipv4_tcp_syn(src, dst))
}

/// A TCP SYN that `endpoint` sends to `dst` (its frames always go to its host veth's MAC).
fn tcp_frame_from(endpoint: &Endpoint, dst: Ipv4Addr) -> Vec<u8> {
    tcp_frame(endpoint.mac, endpoint.host_mac, endpoint.ip, dst)
}

fn tcp_frame_from_a(dst: Ipv4Addr) -> Vec<u8> {
    tcp_frame_from(&A, dst)
}

/// An Ethernet/IPv4 ARP packet.
fn arp_frame(
    eth_dst: [u8; 6],
    eth_src: [u8; 6],
    op: u16,
    (sha, spa): ([u8; 6], Ipv4Addr),
    (tha, tpa): ([u8; 6], Ipv4Addr),
) -> Vec<u8> {
    let mut arp = Vec::with_capacity(ARP_LEN);
    arp.extend_from_slice(&1u16.to_be_bytes()); // htype Ethernet
    arp.extend_from_slice(&ETH_P_IP.to_be_bytes()); // ptype IPv4
    arp.push(6);
    arp.push(4);
    arp.extend_from_slice(&op.to_be_bytes());
    arp.extend_from_slice(&sha);
    arp.extend_from_slice(&spa.octets());
    arp.extend_from_slice(&tha);
    arp.extend_from_slice(&tpa.octets());
    ethernet_frame(eth_dst, eth_src, ETH_P_ARP, &arp)
}

/// A broadcast "who has `tpa`, tell `spa`" from `eth_src`, as Linux sends it (tha zero).
fn arp_request_frame(eth_src: [u8; 6], sha: [u8; 6], spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
    arp_frame(
        BROADCAST_MAC,
        eth_src,
        ARP_OP_REQUEST,
        (sha, spa),
        ([0; 6], tpa),
    )
}

/// The reply A must get to "who has `addr`": `addr` is at A's host veth MAC.
fn arp_reply_to_a(addr: Ipv4Addr) -> Vec<u8> {
    arp_frame(
        A.mac,
        A.host_mac,
        ARP_OP_REPLY,
        (A.host_mac, addr),
        (A.mac, A.ip),
    )
}

/// `frame` with its Ethernet addresses replaced: what forwarding must produce.
fn with_eth_addrs(frame: &[u8], dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[0..6].copy_from_slice(&dst);
    out[6..12].copy_from_slice(&src);
    out
}

/// `frame` with the IPv4 header at `ip_off` edited by `edit` (the 20 bytes of the header, no
/// options) and its checksum made valid again.
fn with_ipv4_header(frame: &[u8], ip_off: usize, edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let mut out = frame.to_vec();
    let header = &mut out[ip_off..ip_off + IPV4_LEN];
    edit(header);
    header[10..12].copy_from_slice(&[0, 0]);
    let check = internet_checksum(&[header]);
    header[10..12].copy_from_slice(&check.to_be_bytes());
    out
}

/// The byte offset of a VXLAN packet's inner frame in the frames [`vxlan_frame`] builds.
const VXLAN_INNER_OFF: usize = ETH_LEN + IPV4_LEN + 8 + 8;

/// `inner` (an Ethernet frame) as the VXLAN packet the host at `vtep` sends to this host's
/// uplink on `vni`: outer IPv4 (DF, TTL 64, TOS `tos`), UDP to the VXLAN port without a
/// checksum, as the overlay's devices send it, and a VXLAN header with only the I flag.
fn vxlan_frame(vtep: Ipv4Addr, tos: u8, vni: u32, inner: &[u8]) -> Vec<u8> {
    let udp_len = u16::try_from(8 + 8 + inner.len()).expect("test packet fits in UDP");
    let mut udp = Vec::with_capacity(usize::from(udp_len));
    udp.extend_from_slice(&49152u16.to_be_bytes());
    udp.extend_from_slice(&VXLAN_PORT.to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]); // no checksum
    udp.extend_from_slice(&[0x08, 0, 0, 0]); // flags: I
    udp.extend_from_slice(&(vni << 8).to_be_bytes()); // VNI, reserved byte
    udp.extend_from_slice(inner);
    let frame = ethernet_frame(
        UPLINK_MAC,
        UNDERLAY_ROUTER_MAC,
        ETH_P_IP,
        &ipv4_packet(vtep, LOCAL_VTEP, IPPROTO_UDP, &udp),
    );
    with_ipv4_header(&frame, ETH_LEN, |h| h[1] = tos)
}

/// The uplink's MAC and the underlay neighbour's: what a VXLAN packet arrives with.
const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
const UNDERLAY_ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0xfe];

/// What O must receive of `inner` after decapsulation: the inner IP packet, one hop further
/// (TTL 63), with TOS `tos`, from O's gateway MAC to O's.
fn decapsulated_for_o(inner: &[u8], tos: u8) -> Vec<u8> {
    let routed = with_ipv4_header(inner, ETH_LEN, |h| {
        h[1] = tos;
        h[8] -= 1;
    });
    with_eth_addrs(&routed, O.mac, O.host_mac)
}

/// An IPv6 frame (fixed header only, no next header payload) from A.
fn ipv6_frame_from_a() -> Vec<u8> {
    let mut ipv6 = vec![0x60, 0, 0, 0, 0, 0, 59, 64]; // no payload, next header "none", hop 64
    ipv6.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    ipv6.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    ethernet_frame(A.host_mac, A.mac, ETH_P_IPV6, &ipv6)
}

/// A's TCP SYN to B inside an 802.1Q tag (VLAN 5).
fn vlan_tagged_frame_from_a() -> Vec<u8> {
    let mut tagged = Vec::new();
    tagged.extend_from_slice(&5u16.to_be_bytes());
    tagged.extend_from_slice(&ETH_P_IP.to_be_bytes());
    tagged.extend_from_slice(&ipv4_tcp_syn(A.ip, B.ip));
    ethernet_frame(A.host_mac, A.mac, ETH_P_8021Q, &tagged)
}

// ---------------------------------------------------------------------------------------------
// The table.

/// What a case must leave in the counter maps. Everything not named must stay zero.
enum Counted {
    /// Traffic counters got one packet of the input's size: `from_endpoint` on each ifindex of
    /// `from`, `to_endpoint` on each of `to`.
    Traffic {
        from: &'static [u32],
        to: &'static [u32],
    },
    /// ENDPOINT_DROPS {ifindex, reason} got one packet of the input's size.
    Drop { ifindex: u32, reason: DropReason },
}

/// What the kernel and the program must do with the input.
enum Expected {
    Ran {
        verdict: u32,
        /// The frame left in the buffer, or None where it does not matter (dropped packets).
        output: Option<Vec<u8>>,
        counted: Counted,
    },
    /// `BPF_PROG_TEST_RUN` itself refuses the input with this errno: the program never runs.
    KernelRejects { errno: i32 },
    /// Kernels that check this header before running the program (6.18 here) refuse the input
    /// with `errno`; kernels that do not run the program, which must then do `otherwise`.
    KernelMayReject {
        errno: i32,
        otherwise: Box<Expected>,
    },
}

struct Case {
    name: &'static str,
    program: &'static str,
    /// The device the packet is on; [`TEST_RUN_IFINDEX`] needs no context (and no namespace).
    ifindex: u32,
    /// The device the packet entered the host on, for a packet the host forwards; 0 for one
    /// the host made.
    ingress_ifindex: u32,
    endpoints: &'static [&'static Endpoint],
    overlay: &'static Overlay,
    input: Vec<u8>,
    expected: Expected,
}

/// A case for `tc_from_endpoint` with A, B and C in the map.
fn from_a(name: &'static str, input: Vec<u8>, expected: Expected) -> Case {
    Case {
        name,
        program: program_names::TC_FROM_ENDPOINT,
        ifindex: TEST_RUN_IFINDEX,
        ingress_ifindex: 0,
        endpoints: ABC,
        overlay: &NO_OVERLAY,
        input,
        expected,
    }
}

/// A case for `tc_from_endpoint` with A and B on a network without inter-endpoint traffic.
fn from_a_no_icc(name: &'static str, input: Vec<u8>, expected: Expected) -> Case {
    Case {
        endpoints: ABC_NO_ICC,
        ..from_a(name, input, expected)
    }
}

/// A case for `tc_from_endpoint` on O's host veth, on the overlay suite's host with `overlay`.
fn from_o(
    name: &'static str,
    overlay: &'static Overlay,
    input: Vec<u8>,
    expected: Expected,
) -> Case {
    Case {
        name,
        program: program_names::TC_FROM_ENDPOINT,
        ifindex: O.ifindex,
        ingress_ifindex: 0,
        endpoints: OVERLAY_HOST,
        overlay,
        input,
        expected,
    }
}

/// Redirected with `output` left in the buffer.
fn redirected(output: Vec<u8>, counted: Counted) -> Expected {
    Expected::Ran {
        verdict: TC_ACT_REDIRECT,
        output: Some(output),
        counted,
    }
}

/// Let through untouched (`TC_ACT_OK`: on to the host stack, or on out to the endpoint).
fn passed_unchanged(input: &[u8], counted: Counted) -> Expected {
    Expected::Ran {
        verdict: TC_ACT_OK,
        output: Some(input.to_vec()),
        counted,
    }
}

/// Dropped on interface `ifindex` and counted under `reason`.
fn dropped_on(ifindex: u32, reason: DropReason) -> Expected {
    Expected::Ran {
        verdict: TC_ACT_SHOT,
        output: None,
        counted: Counted::Drop { ifindex, reason },
    }
}

/// Dropped on A's interface and counted under `reason`.
fn dropped_from_a(reason: DropReason) -> Expected {
    dropped_on(TEST_RUN_IFINDEX, reason)
}

/// From A's interface only.
const FROM_A: Counted = Counted::Traffic {
    from: &[TEST_RUN_IFINDEX],
    to: &[],
};

/// Counted nowhere: a packet left to the host stack (or a device) untouched.
const NOT_COUNTED: Counted = Counted::Traffic { from: &[], to: &[] };

/// Into O's namespace.
const TO_O: Counted = Counted::Traffic {
    from: &[],
    to: &[O.ifindex],
};

/// From O's interface only: what it sends through the tunnel is counted where it leaves O, as
/// anything it sends to the host.
const FROM_O: Counted = Counted::Traffic {
    from: &[O.ifindex],
    to: &[],
};

/// Forwarded from A to B: counted leaving A and entering B, since `bpf_redirect_peer` skips B's
/// egress hook where `tc_to_endpoint` would count it.
const FROM_A_TO_B: Counted = Counted::Traffic {
    from: &[TEST_RUN_IFINDEX],
    to: &[B.ifindex],
};

fn cases() -> Vec<Case> {
    let a_to_b_tcp = tcp_frame_from_a(B.ip);
    let a_to_b_udp = ethernet_frame(A.host_mac, A.mac, ETH_P_IP, &ipv4_udp(A.ip, B.ip, b"query"));
    let a_to_b_icmp = ethernet_frame(A.host_mac, A.mac, ETH_P_IP, &ipv4_icmp_echo(A.ip, B.ip));
    let a_to_outside = tcp_frame_from_a(OUTSIDE_IP);
    let a_to_gateway = ethernet_frame(
        A.host_mac,
        A.mac,
        ETH_P_IP,
        &ipv4_icmp_echo(A.ip, A.gateway),
    );
    let a_arp_reply_to_host = arp_frame(
        A.host_mac,
        A.mac,
        ARP_OP_REPLY,
        (A.mac, A.ip),
        (A.host_mac, A.gateway),
    );
    let a_gratuitous_arp = arp_request_frame(A.mac, A.mac, A.ip, A.ip);
    let host_to_a = tcp_frame(A.host_mac, A.mac, OUTSIDE_IP, A.ip);
    // The Ethernet header and the first 10 bytes of an IPv4 header.
    let truncated_ipv4 = tcp_frame_from_a(B.ip)[..ETH_LEN + 10].to_vec();
    // The Ethernet header and 20 of the 28 bytes of an ARP request.
    let truncated_arp = arp_request_frame(A.mac, A.mac, A.ip, A.gateway)[..ETH_LEN + 20].to_vec();

    vec![
        // Forwarding between endpoints of one network: both MACs rewritten, redirected to B.
        from_a(
            "forward-tcp-a-to-b",
            a_to_b_tcp.clone(),
            redirected(with_eth_addrs(&a_to_b_tcp, B.mac, B.host_mac), FROM_A_TO_B),
        ),
        from_a(
            "forward-udp-a-to-b",
            a_to_b_udp.clone(),
            redirected(with_eth_addrs(&a_to_b_udp, B.mac, B.host_mac), FROM_A_TO_B),
        ),
        from_a(
            "forward-icmp-a-to-b",
            a_to_b_icmp.clone(),
            redirected(with_eth_addrs(&a_to_b_icmp, B.mac, B.host_mac), FROM_A_TO_B),
        ),
        // Not an endpoint: the host stack routes it, the program leaves it alone.
        from_a(
            "to-outside-passes-to-host",
            a_to_outside.clone(),
            passed_unchanged(&a_to_outside, FROM_A),
        ),
        from_a(
            "to-gateway-passes-to-host",
            a_to_gateway.clone(),
            passed_unchanged(&a_to_gateway, FROM_A),
        ),
        // ARP is answered in place and sent back out of A's interface.
        from_a(
            "arp-request-for-gateway-answered",
            arp_request_frame(A.mac, A.mac, A.ip, A.gateway),
            redirected(arp_reply_to_a(A.gateway), FROM_A),
        ),
        from_a(
            "arp-request-for-peer-answered-with-host-mac",
            arp_request_frame(A.mac, A.mac, A.ip, B.ip),
            redirected(arp_reply_to_a(B.ip), FROM_A),
        ),
        from_a(
            "arp-request-for-unknown-address",
            arp_request_frame(A.mac, A.mac, A.ip, UNKNOWN_IP),
            dropped_from_a(DropReason::ArpTargetUnknown),
        ),
        from_a(
            "arp-request-for-other-network",
            arp_request_frame(A.mac, A.mac, A.ip, C.ip),
            dropped_from_a(DropReason::NetworkIsolation),
        ),
        from_a(
            "arp-reply-passes-to-host",
            a_arp_reply_to_host.clone(),
            passed_unchanged(&a_arp_reply_to_host, FROM_A),
        ),
        // An RFC 5227 probe (sender address 0.0.0.0): dropped. The prober hears no answer and
        // takes its address as free, which is right, but the drop is counted as spoofing.
        from_a(
            "arp-probe-dropped",
            arp_request_frame(A.mac, A.mac, Ipv4Addr::UNSPECIFIED, A.ip),
            dropped_from_a(DropReason::SpoofedSourceIp),
        ),
        // A gratuitous ARP (RFC 5227 announcement: sender = target = A's own address) asks
        // nobody anything; answering it tells A that its own address is at another MAC, which
        // an address-conflict detector in A reads as a conflict. Linux proxy ARP does not answer
        // it either (no proxying back out of the interface the request came in on). Left to the
        // host like an ARP reply.
        from_a(
            "arp-gratuitous-not-answered",
            a_gratuitous_arp.clone(),
            passed_unchanged(&a_gratuitous_arp, FROM_A),
        ),
        from_a(
            "arp-unknown-operation",
            arp_frame(BROADCAST_MAC, A.mac, 3, (A.mac, A.ip), ([0; 6], A.gateway)),
            dropped_from_a(DropReason::UnsupportedProtocol),
        ),
        // Isolation between networks.
        from_a(
            "isolation-tcp-a-to-c",
            tcp_frame_from_a(C.ip),
            dropped_from_a(DropReason::NetworkIsolation),
        ),
        // A network without inter-endpoint traffic: the peer is refused, the gateway (and so the
        // host and beyond) is not; ARP still answers, as on a bridge with `enable_icc=false`.
        from_a_no_icc(
            "no-icc-tcp-a-to-b",
            a_to_b_tcp.clone(),
            dropped_from_a(DropReason::IccDisabled),
        ),
        from_a_no_icc(
            "no-icc-to-gateway-passes-to-host",
            a_to_gateway.clone(),
            passed_unchanged(&a_to_gateway, FROM_A),
        ),
        from_a_no_icc(
            "no-icc-arp-request-for-peer-answered",
            arp_request_frame(A.mac, A.mac, A.ip, B.ip),
            redirected(arp_reply_to_a(B.ip), FROM_A),
        ),
        from_a_no_icc(
            "no-icc-isolation-tcp-a-to-c",
            tcp_frame_from_a(C.ip),
            dropped_from_a(DropReason::NetworkIsolation),
        ),
        // Anti-spoofing.
        from_a(
            "spoof-unknown-source-ip",
            tcp_frame(A.mac, A.host_mac, UNKNOWN_IP, B.ip),
            dropped_from_a(DropReason::SpoofedSourceIp),
        ),
        from_a(
            "spoof-source-ip-of-endpoint-on-other-interface",
            tcp_frame(A.mac, A.host_mac, B.ip, OUTSIDE_IP),
            dropped_from_a(DropReason::SpoofedSourceIp),
        ),
        from_a(
            "spoof-source-mac",
            tcp_frame(STRANGER_MAC, A.host_mac, A.ip, B.ip),
            dropped_from_a(DropReason::SpoofedSourceMac),
        ),
        from_a(
            "spoof-arp-sha-differs-from-eth-src",
            arp_request_frame(A.mac, STRANGER_MAC, A.ip, A.gateway),
            dropped_from_a(DropReason::SpoofedSourceMac),
        ),
        from_a(
            "spoof-arp-sender-mac-not-endpoint-mac",
            arp_request_frame(STRANGER_MAC, STRANGER_MAC, A.ip, A.gateway),
            dropped_from_a(DropReason::SpoofedSourceMac),
        ),
        from_a(
            "spoof-arp-sender-ip-of-peer",
            arp_request_frame(A.mac, A.mac, B.ip, A.gateway),
            dropped_from_a(DropReason::SpoofedSourceIp),
        ),
        Case {
            name: "endpoint-not-in-map-yet",
            program: program_names::TC_FROM_ENDPOINT,
            ifindex: TEST_RUN_IFINDEX,
            ingress_ifindex: 0,
            endpoints: &[],
            overlay: &NO_OVERLAY,
            input: tcp_frame_from_a(OUTSIDE_IP),
            expected: dropped_from_a(DropReason::SpoofedSourceIp),
        },
        // Malformed and unsupported frames.
        //
        // Linux 6.18's bpf_prog_test_run_skb() refuses (EINVAL) an IPv4 or IPv6 frame shorter
        // than its network header before the program runs (measured: eth + 19 bytes of IPv4 is
        // refused, eth + 20 runs), so the program's IPv4 bounds check is only reachable here on
        // older kernels. ARP frames are not checked by the kernel: the ARP cases below are what
        // exercises the program's `Malformed` exit on this machine.
        from_a(
            "malformed-truncated-ipv4-header",
            truncated_ipv4,
            Expected::KernelMayReject {
                errno: libc::EINVAL,
                otherwise: Box::new(dropped_from_a(DropReason::Malformed)),
            },
        ),
        from_a(
            "malformed-truncated-arp",
            truncated_arp,
            dropped_from_a(DropReason::Malformed),
        ),
        from_a(
            "malformed-arp-header-missing",
            ethernet_frame(BROADCAST_MAC, A.mac, ETH_P_ARP, &[]),
            dropped_from_a(DropReason::Malformed),
        ),
        // bpf_prog_test_run_skb() refuses data shorter than ETH_HLEN with EINVAL, so the
        // program's own Ethernet bounds check cannot be reached from here; the case pins down
        // that fact instead of silently leaving the frame out.
        from_a(
            "truncated-ethernet-refused-by-kernel",
            tcp_frame_from_a(B.ip)[..10].to_vec(),
            Expected::KernelRejects {
                errno: libc::EINVAL,
            },
        ),
        from_a(
            "unsupported-ipv6",
            ipv6_frame_from_a(),
            dropped_from_a(DropReason::UnsupportedProtocol),
        ),
        from_a(
            "unsupported-vlan-tag",
            vlan_tagged_frame_from_a(),
            dropped_from_a(DropReason::UnsupportedProtocol),
        ),
        // What the host sends to an endpoint: only counted.
        Case {
            name: "to-endpoint-counts-and-passes",
            program: program_names::TC_TO_ENDPOINT,
            ifindex: TEST_RUN_IFINDEX,
            ingress_ifindex: 0,
            endpoints: ABC,
            overlay: &NO_OVERLAY,
            input: host_to_a.clone(),
            expected: passed_unchanged(
                &host_to_a,
                Counted::Traffic {
                    from: &[],
                    to: &[TEST_RUN_IFINDEX],
                },
            ),
        },
    ]
}

/// The overlay: encapsulation in `tc_from_endpoint` and the checks of `tc_from_overlay`.
///
/// `BPF_PROG_TEST_RUN` shows the verdict, the frame and the maps, but not what a redirect or a
/// tunnel key left on the skb: neither the VXLAN ifindex redirected to nor the tunnel key set
/// (VTEP, VNI, TTL, flags) can be read back (the output context carries none of it, and the skb
/// is freed when the run ends). That the VTEP and VNI reach the wire is what the two-host tests
/// in `overlay.rs` show, through a real VXLAN device; here, `overlay-vxlan-device-unknown` shows
/// at least that the OVERLAY slot is read. For the same reason no input can carry tunnel metadata
/// into `tc_from_overlay`, so only its refusal of packets without it is reachable here.
/// A case on the internal suite's host: `program` on the host veth `ifindex`, for a packet
/// that entered the host on `ingress_ifindex` (0: one the host made).
fn on_internal_suite_host(
    name: &'static str,
    program: &'static str,
    (ifindex, ingress_ifindex): (u32, u32),
    input: Vec<u8>,
    expected: Expected,
) -> Case {
    Case {
        name,
        program,
        ifindex,
        ingress_ifindex,
        endpoints: INTERNAL_SUITE_HOST,
        overlay: &INTERNAL_SUITE_SETTINGS,
        input,
        expected,
    }
}

/// An internal network: its endpoints reach each other and what the host keeps (its own
/// addresses, by the host's FIB), nothing the host would forward, either way.
fn internal_cases() -> Vec<Case> {
    use program_names::{TC_FROM_ENDPOINT, TC_TO_ENDPOINT, TC_TO_NETDEV};
    let from_i = |name, input, expected| {
        on_internal_suite_host(name, TC_FROM_ENDPOINT, (I.ifindex, 0), input, expected)
    };
    let i_to_j = tcp_frame_from(&I, J.ip);
    let i_to_host = tcp_frame_from(&I, INTERNAL_SUITE_HOST_IP);
    let outside_to_i = tcp_frame(I.host_mac, I.mac, OUTSIDE_IP, I.ip);
    let host_to_i = tcp_frame(I.host_mac, I.mac, INTERNAL_SUITE_HOST_IP, I.ip);
    let outside_to_n = tcp_frame(N.host_mac, N.mac, OUTSIDE_IP, N.ip);
    // As the host would send them on out of its uplink (the MACs do not matter there).
    let n_leaving = tcp_frame(N.mac, N.host_mac, N.ip, OUTSIDE_IP);
    vec![
        from_i(
            "internal-to-peer-forwarded",
            i_to_j.clone(),
            redirected(
                with_eth_addrs(&i_to_j, J.mac, J.host_mac),
                Counted::Traffic {
                    from: &[I.ifindex],
                    to: &[J.ifindex],
                },
            ),
        ),
        from_i(
            "internal-to-host-address-passes-to-host",
            i_to_host.clone(),
            passed_unchanged(
                &i_to_host,
                Counted::Traffic {
                    from: &[I.ifindex],
                    to: &[],
                },
            ),
        ),
        // On link from the host's uplink, with forwarding on: the host would forward it.
        from_i(
            "internal-to-outside-dropped",
            tcp_frame_from(&I, OUTSIDE_IP),
            dropped_on(I.ifindex, DropReason::InternalNetwork),
        ),
        from_i(
            "internal-isolation-to-other-network",
            tcp_frame_from(&I, C.ip),
            dropped_on(I.ifindex, DropReason::NetworkIsolation),
        ),
        // Into I: what the host forwards is dropped, what it makes itself is not.
        on_internal_suite_host(
            "forwarded-into-internal-dropped",
            TC_TO_ENDPOINT,
            (I.ifindex, INTERNAL_SUITE_UPLINK),
            outside_to_i,
            dropped_on(I.ifindex, DropReason::InternalNetwork),
        ),
        on_internal_suite_host(
            "host-into-internal-passes",
            TC_TO_ENDPOINT,
            (I.ifindex, 0),
            host_to_i.clone(),
            passed_unchanged(
                &host_to_i,
                Counted::Traffic {
                    from: &[],
                    to: &[I.ifindex],
                },
            ),
        ),
        // Should the host forward from I's veth after all (its `forwarding` turned on again,
        // and a DNAT rule of the host's own): not into another endpoint, not out of the uplink.
        on_internal_suite_host(
            "forwarded-from-internal-into-other-endpoint-dropped",
            TC_TO_ENDPOINT,
            (N.ifindex, I.ifindex),
            tcp_frame(N.host_mac, N.mac, I.ip, N.ip),
            dropped_on(N.ifindex, DropReason::InternalNetwork),
        ),
        on_internal_suite_host(
            "internal-leaving-uplink-dropped",
            TC_TO_NETDEV,
            (INTERNAL_SUITE_UPLINK, I.ifindex),
            tcp_frame(I.mac, I.host_mac, I.ip, OUTSIDE_IP),
            dropped_on(INTERNAL_SUITE_UPLINK, DropReason::InternalNetwork),
        ),
        on_internal_suite_host(
            "other-network-leaving-uplink-passes",
            TC_TO_NETDEV,
            (INTERNAL_SUITE_UPLINK, N.ifindex),
            n_leaving.clone(),
            passed_unchanged(&n_leaving, NOT_COUNTED),
        ),
        on_internal_suite_host(
            "forwarded-into-other-network-passes",
            TC_TO_ENDPOINT,
            (N.ifindex, INTERNAL_SUITE_UPLINK),
            outside_to_n.clone(),
            passed_unchanged(
                &outside_to_n,
                Counted::Traffic {
                    from: &[],
                    to: &[N.ifindex],
                },
            ),
        ),
    ]
}

fn overlay_cases() -> Vec<Case> {
    let o_to_remote_peer = tcp_frame_from(&O, REMOTE_PEER.ip);
    let o_to_outside = tcp_frame_from(&O, OUTSIDE_IP);
    let a_to_remote_peer = tcp_frame_from_a(REMOTE_PEER.ip);
    vec![
        // To the other host's subnet: the tunnel key is set and the packet goes to the VXLAN
        // device as it came (the device adds the outer headers; the inner frame keeps O's MACs).
        from_o(
            "overlay-to-remote-subnet-encapsulated",
            &CLUSTER,
            o_to_remote_peer.clone(),
            redirected(o_to_remote_peer.clone(), FROM_O),
        ),
        // Outside every pool: the host stack's, as from a bridge endpoint.
        from_o(
            "overlay-to-outside-passes-to-host",
            &CLUSTER,
            o_to_outside.clone(),
            passed_unchanged(&o_to_outside, FROM_O),
        ),
        // In the pool, but no host holds that subnet: the pool's route says unreachable.
        from_o(
            "overlay-to-unleased-pool-address",
            &CLUSTER,
            tcp_frame_from(&O, UNLEASED_IP),
            dropped_on(O.ifindex, DropReason::OverlayNoRoute),
        ),
        // Another overlay network's subnet, reachable on its own network: isolation holds
        // across hosts as it does on one.
        from_o(
            "overlay-to-other-overlay-network",
            &CLUSTER,
            tcp_frame_from(&O, OTHER_NETWORK_IP),
            dropped_on(O.ifindex, DropReason::NetworkIsolation),
        ),
        // ... and checked before reachability: an address of the other network no host holds
        // is isolation too, not "no route".
        from_o(
            "overlay-to-other-overlay-pool-unleased",
            &CLUSTER,
            tcp_frame_from(&O, OTHER_NETWORK_UNLEASED_IP),
            dropped_on(O.ifindex, DropReason::NetworkIsolation),
        ),
        // The routes are in but the VXLAN device is not known yet: nowhere to send it.
        from_o(
            "overlay-vxlan-device-unknown",
            &CLUSTER_WITHOUT_VXLAN,
            o_to_remote_peer.clone(),
            dropped_on(O.ifindex, DropReason::OverlayNoRoute),
        ),
        // A bridge endpoint's packet to an overlay address is not encapsulated: only overlay
        // endpoints use the tunnel. The host stack gets it, like any non-endpoint address.
        Case {
            name: "bridge-endpoint-to-overlay-subnet-not-encapsulated",
            program: program_names::TC_FROM_ENDPOINT,
            ifindex: TEST_RUN_IFINDEX,
            ingress_ifindex: 0,
            endpoints: OVERLAY_HOST,
            overlay: &CLUSTER,
            input: a_to_remote_peer.clone(),
            expected: passed_unchanged(&a_to_remote_peer, FROM_A),
        },
        // What the remote peer sent, as the VXLAN device would hand it over decapsulated, but
        // without the tunnel metadata: everything else (the route of its source, O in
        // ENDPOINTS) would let it through, so the drop documents that the program takes only
        // what came through the tunnel. Counted on the VXLAN device, as `netctl status` shows.
        Case {
            name: "overlay-ingress-without-tunnel-metadata",
            program: program_names::TC_FROM_OVERLAY,
            ifindex: VXLAN_IFINDEX,
            ingress_ifindex: 0,
            endpoints: OVERLAY_HOST,
            overlay: &CLUSTER,
            input: tcp_frame_from(&REMOTE_PEER, O.ip),
            expected: dropped_on(VXLAN_IFINDEX, DropReason::OverlayBadSource),
        },
    ]
}

/// The overlay's VXLAN packets at the uplink (`tc_from_netdev`): decapsulated on the spot and
/// delivered into their endpoint, or left to the VXLAN device untouched, whose
/// `tc_from_overlay` refuses what it must and counts it. A test run shows all of it: these
/// packets need no tunnel metadata.
fn decapsulation_cases() -> Vec<Case> {
    let peer_to_o = tcp_frame_from(&REMOTE_PEER, O.ip);
    let at_uplink = |name, input: Vec<u8>, expected| Case {
        name,
        program: program_names::TC_FROM_NETDEV,
        ifindex: TEST_RUN_IFINDEX,
        ingress_ifindex: 0,
        endpoints: OVERLAY_HOST,
        overlay: &CLUSTER_AT_UPLINK,
        input,
        expected,
    };
    let left_to_device = |name, input: Vec<u8>| {
        let expected = passed_unchanged(&input, NOT_COUNTED);
        at_uplink(name, input, expected)
    };
    // ECN codepoints in the TOS byte.
    let (not_ect, ect0, ce) = (0b00, 0b10, 0b11);
    let ect0_peer_to_o = with_ipv4_header(&peer_to_o, ETH_LEN, |h| h[1] = ect0);
    let mut unknown_flags = vxlan_frame(REMOTE_VTEP, 0, VNI, &peer_to_o);
    unknown_flags[VXLAN_INNER_OFF - 8] |= 0x04;
    let mut with_udp_checksum = vxlan_frame(REMOTE_VTEP, 0, VNI, &peer_to_o);
    with_udp_checksum[ETH_LEN + IPV4_LEN + 6..ETH_LEN + IPV4_LEN + 8]
        .copy_from_slice(&0x1234u16.to_be_bytes());
    let mut padded = vxlan_frame(REMOTE_VTEP, 0, VNI, &peer_to_o);
    padded.extend_from_slice(&[0; 4]);
    vec![
        // From the lease holder of the source's subnet, on its VNI, to an endpoint here: the
        // outer headers and the inner Ethernet header go, and the inner packet enters O one hop
        // further, as the VXLAN device and tc_from_overlay would have delivered it.
        at_uplink(
            "vxlan-decapsulated-at-uplink-into-endpoint",
            vxlan_frame(REMOTE_VTEP, 0, VNI, &peer_to_o),
            redirected(decapsulated_for_o(&peer_to_o, not_ect), TO_O),
        ),
        // Congestion met on the underlay reaches the inner packet (RFC 6040)...
        at_uplink(
            "vxlan-congestion-mark-reaches-inner-packet",
            vxlan_frame(REMOTE_VTEP, ce, VNI, &ect0_peer_to_o),
            redirected(decapsulated_for_o(&ect0_peer_to_o, ce), TO_O),
        ),
        // ... and an inner packet that cannot carry it is the device's to drop.
        left_to_device(
            "vxlan-congestion-on-not-ect-inner-left-to-device",
            vxlan_frame(REMOTE_VTEP, ce, VNI, &peer_to_o),
        ),
        // What tc_from_overlay refuses stays its to refuse and count: a host that does not
        // hold the source's subnet, the subnet's other VNI, an address with no endpoint here.
        left_to_device(
            "vxlan-from-another-host-left-to-device",
            vxlan_frame(Ipv4Addr::new(198, 18, 0, 99), 0, VNI, &peer_to_o),
        ),
        left_to_device(
            "vxlan-on-another-vni-left-to-device",
            vxlan_frame(REMOTE_VTEP, 0, OTHER_VNI, &peer_to_o),
        ),
        left_to_device(
            "vxlan-for-no-endpoint-here-left-to-device",
            vxlan_frame(
                REMOTE_VTEP,
                0,
                VNI,
                &tcp_frame_from(&REMOTE_PEER, Ipv4Addr::new(10, 244, 0, 77)),
            ),
        ),
        // An inner packet whose TTL runs out here: the device's program drops it.
        left_to_device(
            "vxlan-inner-ttl-expiring-left-to-device",
            vxlan_frame(
                REMOTE_VTEP,
                0,
                VNI,
                &with_ipv4_header(&peer_to_o, ETH_LEN, |h| h[8] = 1),
            ),
        ),
        // What this path does not parse: VXLAN flags it does not know, an outer UDP checksum
        // to verify, an inner frame that is not IPv4, a frame longer than its outer packet.
        left_to_device("vxlan-unknown-flags-left-to-device", unknown_flags),
        left_to_device("vxlan-with-udp-checksum-left-to-device", with_udp_checksum),
        left_to_device(
            "vxlan-inner-arp-left-to-device",
            vxlan_frame(
                REMOTE_VTEP,
                0,
                VNI,
                &arp_request_frame(REMOTE_PEER.mac, REMOTE_PEER.mac, REMOTE_PEER.ip, O.ip),
            ),
        ),
        left_to_device("vxlan-padded-frame-left-to-device", padded),
        // Too short to hold an inner IPv4 header: not this path's to judge, nor to drop.
        left_to_device(
            "vxlan-truncated-inner-frame-left-to-device",
            vxlan_frame(REMOTE_VTEP, 0, VNI, &peer_to_o[..ETH_LEN + 10]),
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// Running a case.

/// Per-ifindex traffic and per-{ifindex, reason} drops, summed over CPUs, zero entries left out
/// (a per-CPU entry the program created but never counted into means nothing).
#[derive(Debug, Default, PartialEq, Eq)]
struct CounterSnapshot {
    traffic: BTreeMap<u32, TrafficCounters>,
    drops: BTreeMap<(u32, u32), DropCounters>,
}

impl CounterSnapshot {
    fn read(maps: &Maps) -> Result<Self, Box<dyn std::error::Error>> {
        let mut snapshot = Self::default();
        for (ifindex, sum) in maps.traffic_by_veth()? {
            if sum != TrafficCounters::default() {
                snapshot.traffic.insert(ifindex, sum);
            }
        }
        for entry in maps.drops.iter() {
            let (key, per_cpu) = entry?;
            let mut sum = DropCounters::default();
            for c in per_cpu.iter() {
                sum.packets += c.packets;
                sum.bytes += c.bytes;
            }
            if sum != DropCounters::default() {
                snapshot.drops.insert((key.ifindex, key.reason), sum);
            }
        }
        Ok(snapshot)
    }

    /// What `counted` means for one packet of `bytes` bytes.
    fn expected(counted: &Counted, bytes: u64) -> Self {
        let mut snapshot = Self::default();
        match counted {
            Counted::Traffic { from, to } => {
                for ifindex in from.iter() {
                    let entry = snapshot.traffic.entry(*ifindex).or_default();
                    entry.from_endpoint_packets += 1;
                    entry.from_endpoint_bytes += bytes;
                }
                for ifindex in to.iter() {
                    let entry = snapshot.traffic.entry(*ifindex).or_default();
                    entry.to_endpoint_packets += 1;
                    entry.to_endpoint_bytes += bytes;
                }
            }
            Counted::Drop { ifindex, reason } => {
                snapshot.drops.insert(
                    (*ifindex, *reason as u32),
                    DropCounters { packets: 1, bytes },
                );
            }
        }
        snapshot
    }

    fn describe(&self) -> String {
        let mut text = String::new();
        if self.traffic.is_empty() && self.drops.is_empty() {
            text.push_str("    (nothing counted)\n");
        }
        for (ifindex, c) in &self.traffic {
            let _ = writeln!(
                text,
                "    traffic ifindex {ifindex}: from_endpoint {}p/{}B, to_endpoint {}p/{}B",
                c.from_endpoint_packets,
                c.from_endpoint_bytes,
                c.to_endpoint_packets,
                c.to_endpoint_bytes
            );
        }
        for ((ifindex, reason), c) in &self.drops {
            let _ = writeln!(
                text,
                "    drop ifindex {ifindex} reason {}: {}p/{}B",
                datapath::drop_reason_name(*reason),
                c.packets,
                c.bytes
            );
        }
        text
    }
}

/// What actually happened to a case's input.
enum Outcome {
    Ran {
        verdict: u32,
        output: Vec<u8>,
        counters: CounterSnapshot,
    },
    KernelRejected {
        errno: Option<i32>,
        message: String,
    },
}

/// Loads a fresh object, fills ENDPOINTS and the overlay maps through the agent's own `Maps`
/// methods, runs the case's program once on its input.
fn run_case(case: &Case) -> Outcome {
    let settings = datapath::LoadSettings {
        host_ipv4: case.overlay.host_ipv4,
        ..datapath::LoadSettings::default()
    };
    let mut ebpf = datapath::load(None, &settings)
        .unwrap_or_else(|e| panic!("case {}: load the embedded eBPF object: {e}", case.name));
    let mut maps =
        Maps::take(&mut ebpf).unwrap_or_else(|e| panic!("case {}: take the maps: {e}", case.name));
    for endpoint in case.endpoints {
        maps.upsert_endpoint(endpoint.ip, endpoint.info())
            .unwrap_or_else(|e| panic!("case {}: insert endpoint {}: {e}", case.name, endpoint.ip));
    }
    maps.sync_routes(case.overlay.routes)
        .unwrap_or_else(|e| panic!("case {}: write REMOTE_ROUTES: {e}", case.name));
    if case.overlay.vxlan_ifindex != 0 {
        maps.set_vxlan_ifindex(case.overlay.vxlan_ifindex)
            .unwrap_or_else(|e| panic!("case {}: write OVERLAY: {e}", case.name));
    }
    let program = datapath::program(&mut ebpf, case.program)
        .unwrap_or_else(|e| panic!("case {}: find program {}: {e}", case.name, case.program));
    // Room for growth: no program here changes the length, and a too-small buffer would turn a
    // length change into ENOSPC instead of a visible output difference.
    let mut data_out = vec![0u8; case.input.len() + 256];
    // Without a context the packet is on the loopback already.
    let ctx = (case.ifindex != TEST_RUN_IFINDEX || case.ingress_ifindex != 0)
        .then(|| forwarded_skb_context(case.ifindex, case.ingress_ifindex));
    let result = program.test_run(TestRunOptions {
        data_in: Some(&case.input),
        data_out: Some(&mut data_out),
        ctx_in: ctx.as_deref(),
        ..TestRunOptions::default()
    });
    match result {
        Ok(result) => {
            let out_len = usize::try_from(result.data_size_out).expect("u32 fits in usize");
            data_out.truncate(out_len);
            let counters = CounterSnapshot::read(&maps)
                .unwrap_or_else(|e| panic!("case {}: read the counter maps: {e}", case.name));
            Outcome::Ran {
                verdict: result.return_value,
                output: data_out,
                counters,
            }
        }
        Err(ProgramError::SyscallError(e)) => Outcome::KernelRejected {
            errno: e.io_error.raw_os_error(),
            message: format!("{e}: {}", e.io_error),
        },
        Err(e) => panic!("case {}: BPF_PROG_TEST_RUN: {e}", case.name),
    }
}

/// Every way `outcome` differs from `expected`; empty when it matches.
fn differences(case: &Case, expected: &Expected, outcome: &Outcome) -> Vec<String> {
    let mut problems = Vec::new();
    match (expected, outcome) {
        (
            Expected::Ran {
                verdict: want_verdict,
                output: want_output,
                counted,
            },
            Outcome::Ran {
                verdict,
                output,
                counters,
            },
        ) => {
            if verdict != want_verdict {
                problems.push(format!(
                    "verdict: expected {}, got {}",
                    verdict_name(*want_verdict),
                    verdict_name(*verdict)
                ));
            }
            if let Some(want_output) = want_output
                && output != want_output
            {
                problems.push(format!(
                    "output frame differs{}\n  expected:\n{}  actual:\n{}",
                    first_difference(want_output, output),
                    describe_frame(want_output),
                    describe_frame(output)
                ));
            }
            // Counted as the program left the packet (decapsulation shortens it).
            let bytes = want_output.as_ref().map_or(case.input.len(), Vec::len);
            let bytes = u64::try_from(bytes).expect("frame length fits in u64");
            let want_counters = CounterSnapshot::expected(counted, bytes);
            if *counters != want_counters {
                problems.push(format!(
                    "counters differ\n  expected:\n{}  actual:\n{}",
                    want_counters.describe(),
                    counters.describe()
                ));
            }
        }
        (Expected::Ran { .. }, Outcome::KernelRejected { message, .. }) => {
            problems.push(format!("BPF_PROG_TEST_RUN refused the input: {message}"));
        }
        (
            Expected::KernelRejects { errno: want } | Expected::KernelMayReject { errno: want, .. },
            Outcome::KernelRejected { errno, message },
        ) => {
            if *errno != Some(*want) {
                problems.push(format!(
                    "BPF_PROG_TEST_RUN refused the input with {message}, expected errno {want}"
                ));
            }
        }
        (Expected::KernelRejects { errno }, Outcome::Ran { verdict, .. }) => {
            problems.push(format!(
                "expected BPF_PROG_TEST_RUN to refuse the input with errno {errno}, but the \
                 program ran and returned {}",
                verdict_name(*verdict)
            ));
        }
        (Expected::KernelMayReject { otherwise, .. }, Outcome::Ran { .. }) => {
            problems = differences(case, otherwise, outcome);
        }
    }
    problems
}

/// A failure report for the case (input decoded, every difference), or None when it passed.
fn check_case(case: &Case, outcome: &Outcome) -> Option<String> {
    let problems = differences(case, &case.expected, outcome);
    if problems.is_empty() {
        return None;
    }
    let mut report = format!(
        "case {} ({} on ifindex {}, endpoints {:?}, {} remote routes, VXLAN ifindex {}) FAILED\n",
        case.name,
        case.program,
        case.ifindex,
        case.endpoints.iter().map(|e| e.ip).collect::<Vec<_>>(),
        case.overlay.routes.len(),
        case.overlay.vxlan_ifindex,
    );
    let _ = write!(report, "  input:\n{}", describe_frame(&case.input));
    for problem in problems {
        let _ = writeln!(report, "  {problem}");
    }
    Some(report)
}

// ---------------------------------------------------------------------------------------------
// Decoding frames for failure reports.

fn ipv4_text(addr: &[u8]) -> String {
    <[u8; 4]>::try_from(addr).map_or_else(|_| "?".to_owned(), |a| Ipv4Addr::from(a).to_string())
}

/// The frame's headers, decoded as far as its length allows, then a hex dump.
fn describe_frame(frame: &[u8]) -> String {
    let mut text = String::new();
    if frame.len() < ETH_LEN {
        let _ = writeln!(
            text,
            "    {} bytes: shorter than an Ethernet header",
            frame.len()
        );
    } else {
        let ether_type = u16::from_be_bytes([frame[12], frame[13]]);
        let _ = writeln!(
            text,
            "    {} bytes, eth dst {} src {} type {ether_type:#06x}",
            frame.len(),
            mac_text(&frame[0..6]),
            mac_text(&frame[6..12]),
        );
        let payload = &frame[ETH_LEN..];
        match ether_type {
            ETH_P_IP if payload.len() >= IPV4_LEN => {
                let _ = writeln!(
                    text,
                    "    ipv4 {} -> {} proto {} ttl {} checksum {:#06x} ({})",
                    ipv4_text(&payload[12..16]),
                    ipv4_text(&payload[16..20]),
                    payload[9],
                    payload[8],
                    u16::from_be_bytes([payload[10], payload[11]]),
                    if internet_checksum(&[&payload[..IPV4_LEN]]) == 0 {
                        "valid"
                    } else {
                        "INVALID"
                    },
                );
            }
            ETH_P_ARP if payload.len() >= ARP_LEN => {
                let _ = writeln!(
                    text,
                    "    arp op {} sha {} spa {} tha {} tpa {}",
                    u16::from_be_bytes([payload[6], payload[7]]),
                    mac_text(&payload[8..14]),
                    ipv4_text(&payload[14..18]),
                    mac_text(&payload[18..24]),
                    ipv4_text(&payload[24..28]),
                );
            }
            ETH_P_IP | ETH_P_ARP => {
                let _ = writeln!(
                    text,
                    "    truncated: {} bytes after Ethernet",
                    payload.len()
                );
            }
            _ => {}
        }
    }
    text.push_str(&hex_dump(frame));
    text
}

fn hex_dump(bytes: &[u8]) -> String {
    let mut text = String::new();
    for (line, chunk) in bytes.chunks(16).enumerate() {
        let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
        let _ = writeln!(text, "    {:04x}  {}", line * 16, hex.join(" "));
    }
    text
}

fn first_difference(expected: &[u8], actual: &[u8]) -> String {
    if expected.len() != actual.len() {
        return format!(
            " (length {} expected, {} actual)",
            expected.len(),
            actual.len()
        );
    }
    match expected.iter().zip(actual).position(|(e, a)| e != a) {
        Some(offset) => format!(" (first at byte {offset:#06x})"),
        None => String::new(),
    }
}

fn running_as_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Runs every case and fails with the report of each one that failed.
fn run_fixtures(cases: &[Case]) {
    let mut failures = Vec::new();
    for case in cases {
        let outcome = run_case(case);
        match check_case(case, &outcome) {
            Some(report) => failures.push(report),
            None => eprintln!("ok   {}", case.name),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} packet fixtures failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// False (after saying why) when `test`, which needs the capabilities `needs`, cannot run here.
fn can_run(test: &str, needs: &str) -> bool {
    if running_as_root() {
        return true;
    }
    eprintln!("SKIPPED {test}: it needs root ({needs}); CI runs this as root");
    false
}

#[test]
fn endpoint_program_fixtures() {
    if can_run(
        "endpoint_program_fixtures",
        "CAP_BPF and CAP_NET_ADMIN for BPF_PROG_TEST_RUN",
    ) {
        run_fixtures(&cases());
    }
}

#[test]
fn overlay_program_fixtures() {
    if !can_run(
        "overlay_program_fixtures",
        "CAP_BPF and CAP_NET_ADMIN for BPF_PROG_TEST_RUN, CAP_SYS_ADMIN for its network namespace",
    ) {
        return;
    }
    // The devices the cases put packets on besides the loopback.
    in_private_netns_with_veths(&[O.ifindex, VXLAN_IFINDEX], || {
        let mut cases = overlay_cases();
        cases.extend(decapsulation_cases());
        run_fixtures(&cases);
    });
}

#[test]
fn internal_network_program_fixtures() {
    if !can_run(
        "internal_network_program_fixtures",
        "CAP_BPF and CAP_NET_ADMIN for BPF_PROG_TEST_RUN, CAP_SYS_ADMIN for its network namespace",
    ) {
        return;
    }
    // `tc_from_endpoint` asks the FIB of the namespace it runs in: this one's is the suite's host.
    in_private_netns_with_veths(&[I.ifindex, INTERNAL_SUITE_UPLINK, N.ifindex], || {
        for ifindex in [I.ifindex, INTERNAL_SUITE_UPLINK, N.ifindex] {
            for dev in [format!("h{ifindex}"), format!("e{ifindex}")] {
                run_ok("ip", &["link", "set", &dev, "up"]);
            }
        }
        let host_address = format!("{INTERNAL_SUITE_HOST_IP}/24");
        let uplink = format!("h{INTERNAL_SUITE_UPLINK}");
        run_ok("ip", &["addr", "add", &host_address, "dev", &uplink]);
        run_ok("sysctl", &["-qw", "net.ipv4.conf.all.forwarding=1"]);
        run_fixtures(&internal_cases());
    });
}

/// The frame builders themselves: a wrong checksum helper would make every fixture lie.
#[test]
fn frame_builders_produce_valid_checksums() {
    let packet = ipv4_tcp_syn(A.ip, B.ip);
    assert_eq!(
        internet_checksum(&[&packet[..IPV4_LEN]]),
        0,
        "IPv4 header checksum"
    );
    assert_eq!(
        l4_checksum(A.ip, B.ip, IPPROTO_TCP, &packet[IPV4_LEN..]),
        0,
        "TCP checksum over the pseudo-header"
    );
    let packet = ipv4_udp(A.ip, B.ip, b"odd");
    assert_eq!(
        l4_checksum(A.ip, B.ip, IPPROTO_UDP, &packet[IPV4_LEN..]),
        0,
        "UDP checksum with an odd-length payload"
    );
    // The example from RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
    assert_eq!(
        internet_checksum(&[&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]]),
        !0xddf2
    );
    let arp = arp_request_frame(A.mac, A.mac, A.ip, A.gateway);
    assert_eq!(arp.len(), ETH_LEN + ARP_LEN, "ARP request length");
}
