//! The endpoints and frames of the program paths, as in the packet fixtures
//! (`tests/tests/bpf_fixtures.rs`, `tests/tests/nat_fixtures.rs`): A behind the test run's
//! ifindex (1, loopback), its peer B and C on another network; and for NAT, the host's uplink
//! address and a client outside.

use std::net::{Ipv4Addr, SocketAddrV4};

use net_ebpf_common::{
    CtKey, ENDPOINT_F_INTERNAL, ENDPOINT_F_MASQUERADE, ENDPOINT_F_NO_ICC, ENDPOINT_F_PUBLISHED,
    EndpointInfo, PublishKey, PublishTarget,
};

/// The ifindex the program sees under `BPF_PROG_TEST_RUN`: the loopback of the caller's namespace.
pub const TEST_RUN_IFINDEX: u32 = 1;

pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    pub host_mac: [u8; 6],
    pub ifindex: u32,
    pub network_id: u32,
    pub gateway: Ipv4Addr,
    /// `ENDPOINT_F_*`.
    pub flags: u32,
    /// The traffic counter slot of its veth (`ENDPOINT_SLOTS[ifindex]`).
    pub slot: u32,
}

impl Endpoint {
    pub fn info(&self) -> EndpointInfo {
        EndpointInfo {
            ifindex: self.ifindex,
            network_id: self.network_id,
            gateway: self.gateway.octets(),
            mac: self.mac,
            host_mac: self.host_mac,
            flags: self.flags,
            slot: self.slot,
        }
    }
}

/// The sender: behind the interface the test run uses. Its network masquerades (the endpoint
/// programs do not read the flag; the uplink's do).
pub const A: Endpoint = Endpoint {
    ip: Ipv4Addr::new(10, 1, 0, 2),
    mac: [0x02, 0, 0, 0, 0x0a, 0x02],
    host_mac: [0x02, 0, 0, 0, 0xaa, 0x02],
    ifindex: TEST_RUN_IFINDEX,
    network_id: 1,
    gateway: Ipv4Addr::new(10, 1, 0, 1),
    flags: ENDPOINT_F_MASQUERADE,
    slot: 0,
};

/// A's peer on the same network (a made-up ifindex: the redirect is only recorded); the
/// published port goes to it.
pub const B: Endpoint = Endpoint {
    ip: Ipv4Addr::new(10, 1, 0, 3),
    mac: [0x02, 0, 0, 0, 0x0b, 0x03],
    host_mac: [0x02, 0, 0, 0, 0xbb, 0x03],
    ifindex: 42,
    network_id: 1,
    gateway: Ipv4Addr::new(10, 1, 0, 1),
    flags: ENDPOINT_F_MASQUERADE | ENDPOINT_F_PUBLISHED,
    slot: 1,
};

/// On another network: A must not reach it.
pub const C: Endpoint = Endpoint {
    ip: Ipv4Addr::new(10, 2, 0, 2),
    mac: [0x02, 0, 0, 0, 0x0c, 0x02],
    host_mac: [0x02, 0, 0, 0, 0xcc, 0x02],
    ifindex: 43,
    network_id: 2,
    gateway: Ipv4Addr::new(10, 2, 0, 1),
    flags: 0,
    slot: 2,
};

/// A second address behind A's interface, on a network whose endpoints may not talk to each
/// other (`--no-icc`): the agent gives each interface a veth of its own, but the test run has
/// one ingress device, so Q shares A's (and its counter slot).
pub const Q: Endpoint = Endpoint {
    ip: Ipv4Addr::new(10, 3, 0, 2),
    network_id: 3,
    gateway: Ipv4Addr::new(10, 3, 0, 1),
    flags: ENDPOINT_F_NO_ICC,
    ..A
};

/// Q's peer on that network.
pub const R: Endpoint = Endpoint {
    ip: Ipv4Addr::new(10, 3, 0, 3),
    mac: [0x02, 0, 0, 0, 0x0d, 0x03],
    host_mac: [0x02, 0, 0, 0, 0xdd, 0x03],
    ifindex: 44,
    network_id: 3,
    gateway: Ipv4Addr::new(10, 3, 0, 1),
    flags: ENDPOINT_F_NO_ICC,
    slot: 3,
};

/// A third address behind A's interface (see Q), on an internal network.
pub const I: Endpoint = Endpoint {
    ip: Ipv4Addr::new(10, 4, 0, 2),
    network_id: 4,
    gateway: Ipv4Addr::new(10, 4, 0, 1),
    flags: ENDPOINT_F_INTERNAL,
    ..A
};

pub const STRANGER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x66, 0x66];
pub const UNKNOWN_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 99);
/// A client or server outside the host.
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// The host's uplink address (HOST_IPV4 of the loaded object).
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xee, 0x01];
/// The uplink's device in the bench's namespace (UPLINK_IFINDEX of the loaded object).
pub const UPLINK_NAME: &str = "uplink";
/// The next hop towards the outside, on the uplink's subnet.
pub const ROUTER_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);
pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xee, 0xfe];
pub const BROADCAST_MAC: [u8; 6] = [0xff; 6];
pub const LOOPBACK_MAC: [u8; 6] = [0; 6];
/// The ports a client and a server use.
pub const CLIENT_PORT: u16 = 40000;
pub const SERVER_PORT: u16 = 80;
/// Published on every host address to B:SERVER_PORT, as `--publish 8080:80`.
pub const PUBLISHED_PORT: u16 = 8080;
/// Published to B:SERVER_PORT with an allow list the outside client is not on.
pub const ALLOW_LISTED_PORT: u16 = 8081;
/// Published on every host address to A:SERVER_PORT: A sits behind the test run's interface,
/// so its replies can be run through `tc_from_endpoint`.
pub const ROUTED_PORT: u16 = 8082;
/// The loaded object's whole masquerade range: one port, so translated frames are known in
/// advance (the choice among more ports costs the same arithmetic).
pub const NAT_PORT: u16 = 61000;

pub const ETH_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
pub const ARP_OP_REQUEST: u16 = 1;
pub const ARP_OP_REPLY: u16 = 2;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// The `PUBLISHED` entry of a TCP port on every host address, to B:SERVER_PORT.
pub fn published(port: u16, id: u32, flags: u8) -> (PublishKey, PublishTarget) {
    published_on(Ipv4Addr::UNSPECIFIED, port, id, flags)
}

/// The `PUBLISHED` entry of a TCP port on `addr`, to B:SERVER_PORT.
pub fn published_on(addr: Ipv4Addr, port: u16, id: u32, flags: u8) -> (PublishKey, PublishTarget) {
    published_to(&B, addr, port, id, flags)
}

/// The `PUBLISHED` entry of a TCP port on `addr`, to `endpoint`:SERVER_PORT.
pub fn published_to(
    endpoint: &Endpoint,
    addr: Ipv4Addr,
    port: u16,
    id: u32,
    flags: u8,
) -> (PublishKey, PublishTarget) {
    (
        PublishKey {
            addr: addr.octets(),
            port: port.to_be_bytes(),
            proto: IPPROTO_TCP,
            _pad: 0,
        },
        PublishTarget {
            addr: endpoint.ip.octets(),
            port: SERVER_PORT.to_be_bytes(),
            flags,
            _pad: 0,
            id,
        },
    )
}

/// The conntrack key of a TCP packet from `src` to `dst`.
pub fn ct_key(src: SocketAddrV4, dst: SocketAddrV4) -> CtKey {
    CtKey {
        saddr: src.ip().octets(),
        daddr: dst.ip().octets(),
        sport: src.port().to_be_bytes(),
        dport: dst.port().to_be_bytes(),
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    }
}

pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ethernet(dst: [u8; 6], src: [u8; 6], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(ETH_LEN + payload.len());
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A TCP SYN from `src:40000` to `dst:80` (valid IPv4 and TCP checksums) in an Ethernet frame:
/// 54 bytes, the size of the packets request/response traffic is made of.
pub fn tcp_frame(src_mac: [u8; 6], dst_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    tcp_segment(
        (src_mac, dst_mac),
        SocketAddrV4::new(src, CLIENT_PORT),
        SocketAddrV4::new(dst, SERVER_PORT),
        TCP_SYN,
    )
}

/// A 54-byte TCP segment with `flags` from `src` to `dst`, MACs (source, destination), valid
/// IPv4 and TCP checksums.
pub fn tcp_segment(
    (src_mac, dst_mac): ([u8; 6], [u8; 6]),
    src: SocketAddrV4,
    dst: SocketAddrV4,
    flags: u8,
) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20);
    tcp.extend_from_slice(&src.port().to_be_bytes());
    tcp.extend_from_slice(&dst.port().to_be_bytes());
    tcp.extend_from_slice(&1u32.to_be_bytes());
    tcp.extend_from_slice(&if flags & TCP_ACK != 0 { 1u32 } else { 0 }.to_be_bytes());
    tcp.extend_from_slice(&[5 << 4, flags]); // data offset 5
    tcp.extend_from_slice(&64240u16.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]);
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, IPPROTO_TCP, 0, 20]);
    pseudo.extend_from_slice(&tcp);
    tcp[16..18].copy_from_slice(&checksum(&pseudo).to_be_bytes());

    let mut ip = vec![0x45, 0, 0, 40, 0x12, 0x34, 0x40, 0, 64, IPPROTO_TCP, 0, 0];
    ip.extend_from_slice(&src.ip().octets());
    ip.extend_from_slice(&dst.ip().octets());
    let check = checksum(&ip);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    ip.extend_from_slice(&tcp);
    ethernet(dst_mac, src_mac, ETH_P_IP, &ip)
}

/// The overlay's VXLAN port.
const VXLAN_PORT: u16 = 4789;

/// `inner` (an Ethernet frame) in a VXLAN packet from the host at `vtep` to this host's uplink
/// on `vni`, as the overlay's devices send it: outer IPv4 with DF, UDP without a checksum, a
/// VXLAN header with only the I flag.
pub fn vxlan_frame(vtep: Ipv4Addr, vni: u32, inner: &[u8]) -> Vec<u8> {
    let udp_len = u16::try_from(8 + 8 + inner.len()).expect("a test packet fits in UDP");
    let mut ip = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, IPPROTO_UDP, 0, 0];
    ip[2..4].copy_from_slice(&(20 + udp_len).to_be_bytes());
    ip.extend_from_slice(&vtep.octets());
    ip.extend_from_slice(&HOST_IP.octets());
    let check = checksum(&ip);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    ip.extend_from_slice(&49152u16.to_be_bytes());
    ip.extend_from_slice(&VXLAN_PORT.to_be_bytes());
    ip.extend_from_slice(&udp_len.to_be_bytes());
    ip.extend_from_slice(&[0, 0]);
    ip.extend_from_slice(&[0x08, 0, 0, 0]);
    ip.extend_from_slice(&(vni << 8).to_be_bytes());
    ip.extend_from_slice(inner);
    ethernet(UPLINK_MAC, ROUTER_MAC, ETH_P_IP, &ip)
}

/// `frame` (an IPv4 frame) as a router forwards it: the TTL one less, the header checksum fixed.
pub fn forwarded(frame: &[u8]) -> Vec<u8> {
    with_ttl(frame, frame[ETH_LEN + 8] - 1)
}

/// `frame` (an IPv4 frame) with TTL `ttl`, the header checksum fixed.
pub fn with_ttl(frame: &[u8], ttl: u8) -> Vec<u8> {
    with_ipv4_header(frame, |ip| ip[8] = ttl)
}

/// `frame` (an IPv4 frame) as a packet of IP protocol `proto`, the header checksum fixed (its
/// payload stays as it was: the programs read no further for a protocol without ports).
pub fn with_protocol(frame: &[u8], proto: u8) -> Vec<u8> {
    with_ipv4_header(frame, |ip| ip[9] = proto)
}

/// The first fragment of `frame` (an IPv4 frame): more-fragments set, DF cleared, the header
/// checksum fixed.
pub fn first_fragment(frame: &[u8]) -> Vec<u8> {
    with_ipv4_header(frame, |ip| {
        ip[6..8].copy_from_slice(&0x2000u16.to_be_bytes());
    })
}

/// `frame` (an IPv4 frame) with `edit` applied to its 20-byte IPv4 header and the header
/// checksum made anew.
fn with_ipv4_header(frame: &[u8], edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let mut frame = frame.to_vec();
    let ip = &mut frame[ETH_LEN..ETH_LEN + 20];
    edit(ip);
    ip[10..12].copy_from_slice(&[0, 0]);
    let check = checksum(ip);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    frame
}

pub fn arp_frame(
    eth_dst: [u8; 6],
    eth_src: [u8; 6],
    op: u16,
    (sha, spa): ([u8; 6], Ipv4Addr),
    (tha, tpa): ([u8; 6], Ipv4Addr),
) -> Vec<u8> {
    let mut arp = vec![0, 1, 0x08, 0x00, 6, 4];
    arp.extend_from_slice(&op.to_be_bytes());
    arp.extend_from_slice(&sha);
    arp.extend_from_slice(&spa.octets());
    arp.extend_from_slice(&tha);
    arp.extend_from_slice(&tpa.octets());
    ethernet(eth_dst, eth_src, ETH_P_ARP, &arp)
}

/// An IPv6 fixed header with no payload.
pub fn ipv6_frame(src_mac: [u8; 6], dst_mac: [u8; 6]) -> Vec<u8> {
    let mut ipv6 = vec![0x60, 0, 0, 0, 0, 0, 59, 64];
    ipv6.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    ipv6.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    ethernet(dst_mac, src_mac, ETH_P_IPV6, &ipv6)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(frame: &[u8]) {
        assert_eq!(checksum(&frame[ETH_LEN..ETH_LEN + 20]), 0, "IPv4 header");
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&frame[ETH_LEN + 12..ETH_LEN + 20]);
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        pseudo.extend_from_slice(&frame[ETH_LEN + 20..]);
        assert_eq!(checksum(&pseudo), 0, "TCP over the pseudo-header");
    }

    #[test]
    fn frames_carry_valid_checksums() {
        let frame = tcp_frame(A.mac, A.host_mac, A.ip, B.ip);
        assert_eq!(frame.len(), 54);
        valid(&frame);
        let ack = tcp_segment(
            (ROUTER_MAC, UPLINK_MAC),
            SocketAddrV4::new(OUTSIDE_IP, 1234),
            SocketAddrV4::new(HOST_IP, PUBLISHED_PORT),
            TCP_ACK,
        );
        valid(&ack);
        let fragment = first_fragment(&ack);
        valid(&fragment);
        assert_eq!(fragment[ETH_LEN + 6], 0x20, "more fragments");
    }
}
