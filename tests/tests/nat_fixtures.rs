//! Packet fixtures for translation in the data plane, run through `BPF_PROG_TEST_RUN`:
//! masquerading at the uplink (`tc_to_netdev`, `tc_from_netdev`) and published ports, reached
//! from outside (`tc_from_netdev`, replies at `tc_to_netdev`, or translated and routed out of
//! the uplink by `tc_from_endpoint` when the uplink's ifindex is set), from the host itself
//! (`tc_from_host` on the loopback, replies at `tc_from_endpoint`) and from endpoints on the
//! host (hairpin, both directions at `tc_from_endpoint`).
//!
//! Each row of [`cases`] loads a fresh object with its own NAT settings (host address, port
//! range, conntrack size), fills ENDPOINTS and the case's published ports (with their allow
//! lists, through the agent's own `Maps::publish`), then runs a sequence of packets through the
//! programs. Every step states its verdict and the exact frame the program must leave behind;
//! the case then states what CONNTRACK must hold (every entry: key, translated tuple, kind,
//! flags, direction, ifindex, TCP state, packets and bytes), the NAT_STATS counters, and,
//! derived from the steps, the drop and traffic counters.
//!
//! Expected frames are built from scratch from a description of the packet, with every checksum
//! (IPv4 header, TCP/UDP over the pseudo-header, ICMP over the whole message, the IPv4 header
//! quoted in an ICMP error) computed in full (RFC 1071) over the expected bytes, never derived
//! from what the program wrote.
//!
//! How `BPF_PROG_TEST_RUN` models these packets:
//! - Without a context, `skb->dev` is loopback, so the uplink and loopback programs run on
//!   ifindex 1 and their drops are counted under it. `tc_from_endpoint` checks that a packet's
//!   source endpoint lives behind the interface the packet came in on, so its steps pass a
//!   `__sk_buff` context naming the sender's host veth. The kernel wants a real device for such
//!   an ifindex: the suite runs in a private network namespace holding a veth at each
//!   endpoint's (made-up) ifindex. The endpoints' ifindexes (42 and up) keep the conntrack
//!   entries and redirects that name an endpoint's veth apart from the uplink's drop counters.
//! - The skb has CHECKSUM_NONE: checksum helpers update the checksum fields in place, so inputs
//!   carry correct checksums and outputs must too.
//! - `bpf_redirect_peer` and `bpf_redirect` return `TC_ACT_REDIRECT` and send nothing; the
//!   output buffer holds the rewritten frame.
//!
//! Needs root (CAP_BPF + CAP_NET_ADMIN, and CAP_SYS_ADMIN for the namespace); without it the
//! test says why and passes.

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr};

use aya::{
    Ebpf,
    maps::{MapData, MapError, PerCpuArray},
    programs::{ProgramError, TestRun as _, TestRunOptions},
};
use net_agent::datapath::{self, LoadSettings, Maps, PublishedEntry};
use net_ebpf_common::{
    CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_F_AT_ENDPOINT, CT_KIND_MASQUERADE, CT_KIND_PUBLISHED,
    CT_STATE_ESTABLISHED, CT_STATE_FIN_ORIGINAL, CT_STATE_FIN_REPLY, CT_STATE_RST, CtEntry, CtKey,
    DropReason, ENDPOINT_F_MASQUERADE, ENDPOINT_F_PUBLISHED, EndpointInfo, PublishKey,
    PublishTarget, nat_stat, program_names,
};
use net_tests::fixture::{
    TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, in_private_netns_with_veths, internet_checksum,
    l4_checksum, mac_text, skb_context, verdict_name,
};

// Verdicts from include/uapi/linux/pkt_cls.h.

/// The ifindex the programs see under `BPF_PROG_TEST_RUN`: loopback's.
const TEST_RUN_IFINDEX: u32 = 1;

const ETH_P_IP: u16 = 0x0800;
const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_GRE: u8 = 47;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAM_PROBLEM: u8 = 12;
const ICMP_TIMESTAMP: u8 = 13;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;

/// IPv4 flags/fragment-offset field values.
const IP_DF: u16 = 0x4000;
const IP_MF: u16 = 0x2000;

/// The uplink's address: masqueraded flows leave with it.
const HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// A server outside, and a second one.
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
const REMOTE2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 253);
/// A router on the path that sends ICMP errors.
const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 99);

/// The uplink's MAC and the next hop's: what the host stack puts on frames leaving the uplink.
const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
const NEXT_HOP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0xfe];

const EP_PORT: u16 = 40_000;
const REMOTE_PORT: u16 = 80;
/// The single port of the one-port ranges: deterministic translations.
const NAT_PORT: u16 = 61_000;
/// ICMP echo identifier the endpoint uses.
const EP_ECHO_ID: u16 = 7;

/// Another address of the host than the uplink's: the data plane only knows the uplink's, so
/// only ports published on this very address (not on 0.0.0.0) apply to it.
const HOST2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The gateway of the endpoints' network (an address of the host).
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;
/// A client outside, inside [`CLIENTS_NET`], and one just outside it (the two differ only in the
/// 24th bit, so a wrong prefix length in the allow list shows).
const CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const STRANGER: Ipv4Addr = Ipv4Addr::new(203, 0, 112, 7);
const CLIENTS_NET: &str = "203.0.113.0/24";
const STRANGERS_NET: &str = "203.0.112.0/24";
const CLIENT_PORT: u16 = 50_000;
/// Published host ports and the endpoint ports behind them.
const WEB_HOST_PORT: u16 = 8080;
const WEB_PORT: u16 = 80;
const DNS_HOST_PORT: u16 = 5353;
const DNS_PORT: u16 = 53;
/// Another port of WEB, for a second entry on the same host port.
const WEB_ALT_PORT: u16 = 8000;
const ADMIN_HOST_PORT: u16 = 9090;
const ADMIN_PORT: u16 = 90;
/// Source port of the host's own connections: in the host's ephemeral range (32768-60999 by
/// default), where a published port may be too.
const HOST_CLIENT_PORT: u16 = 40_000;
/// A service of the host's own, not published.
const HOST_SERVICE_PORT: u16 = 5432;
/// Neither published nor anything the programs know of.
const SSH_PORT: u16 = 22;

/// An endpoint as the agent would describe it in ENDPOINTS.
struct Endpoint {
    ip: Ipv4Addr,
    mac: [u8; 6],
    host_mac: [u8; 6],
    ifindex: u32,
    flags: u32,
}

impl Endpoint {
    fn info(&self) -> EndpointInfo {
        EndpointInfo {
            ifindex: self.ifindex,
            network_id: 1,
            gateway: GATEWAY.octets(),
            mac: self.mac,
            host_mac: self.host_mac,
            flags: self.flags,
            // Handed out by `Maps::upsert_endpoint`.
            slot: 0,
        }
    }
}

/// The masquerading endpoint every flow comes from.
const EP: Endpoint = Endpoint {
    ip: Ipv4Addr::new(10, 1, 0, 2),
    mac: [0x02, 0, 0, 0, 0x0a, 0x02],
    host_mac: [0x02, 0, 0, 0, 0xaa, 0x02],
    ifindex: 42,
    flags: ENDPOINT_F_MASQUERADE,
};

/// An endpoint on a network without masquerading.
const PLAIN: Endpoint = Endpoint {
    ip: Ipv4Addr::new(10, 1, 0, 5),
    mac: [0x02, 0, 0, 0, 0x0a, 0x05],
    host_mac: [0x02, 0, 0, 0, 0xaa, 0x05],
    ifindex: 44,
    flags: 0,
};

/// The endpoint behind the published ports, on EP's (masquerading) network. Its flag
/// `ENDPOINT_F_PUBLISHED` tells `tc_from_endpoint` that what it sends may be a reply to translate
/// even when it is not addressed to a host address.
const WEB: Endpoint = Endpoint {
    ip: Ipv4Addr::new(10, 1, 0, 3),
    mac: [0x02, 0, 0, 0, 0x0a, 0x03],
    host_mac: [0x02, 0, 0, 0, 0xaa, 0x03],
    ifindex: 43,
    flags: ENDPOINT_F_MASQUERADE | ENDPOINT_F_PUBLISHED,
};

const ENDPOINTS: &[&Endpoint] = &[&EP, &WEB, &PLAIN];

/// An address published to that no endpoint has (a stale port).
const GONE: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 9);

// ---------------------------------------------------------------------------------------------
// Checksums and frames. Every byte is built here; checksums are always computed in full.

/// What rides in the IPv4 packet.
#[derive(Clone, Debug)]
enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        payload: Vec<u8>,
    },
    Udp {
        sport: u16,
        dport: u16,
        payload: Vec<u8>,
        /// false: checksum 0 ("none").
        checksum: bool,
    },
    /// Any ICMP message: `rest` is the second 32-bit word (echo: identifier and sequence; errors:
    /// unused / next-hop MTU), `body` what follows (echo data, or the quoted packet).
    Icmp {
        kind: u8,
        code: u8,
        rest: [u8; 4],
        body: Vec<u8>,
    },
    /// Another protocol, carried as it is.
    Raw { proto: u8, bytes: Vec<u8> },
}

/// An Ethernet + IPv4 packet described field by field; [`Packet::frame`] builds the bytes.
#[derive(Clone, Debug)]
struct Packet {
    eth_dst: [u8; 6],
    eth_src: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ttl: u8,
    /// Flags and fragment offset (in 8-byte units), as the 16-bit field.
    frag: u16,
    /// IPv4 options, a multiple of 4 bytes.
    options: Vec<u8>,
    l4: L4,
}

impl Packet {
    /// A packet leaving through the uplink (as the host stack hands it to the egress hook).
    fn leaving(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Packet {
        Packet {
            eth_dst: NEXT_HOP_MAC,
            eth_src: UPLINK_MAC,
            src,
            dst,
            ttl: 64,
            frag: IP_DF,
            options: Vec::new(),
            l4,
        }
    }

    /// A packet arriving at the uplink from the next hop.
    fn arriving(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Packet {
        Packet {
            eth_dst: UPLINK_MAC,
            eth_src: NEXT_HOP_MAC,
            ..Packet::leaving(src, dst, l4)
        }
    }

    fn proto(&self) -> u8 {
        match &self.l4 {
            L4::Tcp { .. } => IPPROTO_TCP,
            L4::Udp { .. } => IPPROTO_UDP,
            L4::Icmp { .. } => IPPROTO_ICMP,
            L4::Raw { proto, .. } => *proto,
        }
    }

    /// The L4 bytes with their checksum computed over this packet's addresses.
    fn l4_bytes(&self) -> Vec<u8> {
        match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                seq,
                ack,
                flags,
                payload,
            } => {
                let mut tcp = Vec::with_capacity(20 + payload.len());
                tcp.extend_from_slice(&sport.to_be_bytes());
                tcp.extend_from_slice(&dport.to_be_bytes());
                tcp.extend_from_slice(&seq.to_be_bytes());
                tcp.extend_from_slice(&ack.to_be_bytes());
                tcp.push(5 << 4); // data offset 5
                tcp.push(*flags);
                tcp.extend_from_slice(&64_240u16.to_be_bytes()); // window
                tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
                tcp.extend_from_slice(payload);
                let check = l4_checksum(self.src, self.dst, IPPROTO_TCP, &tcp);
                tcp[16..18].copy_from_slice(&check.to_be_bytes());
                tcp
            }
            L4::Udp {
                sport,
                dport,
                payload,
                checksum,
            } => {
                let len = u16::try_from(8 + payload.len()).expect("test datagram fits in UDP");
                let mut udp = Vec::with_capacity(usize::from(len));
                udp.extend_from_slice(&sport.to_be_bytes());
                udp.extend_from_slice(&dport.to_be_bytes());
                udp.extend_from_slice(&len.to_be_bytes());
                udp.extend_from_slice(&[0, 0]);
                udp.extend_from_slice(payload);
                if *checksum {
                    // RFC 768: a computed zero is sent as all ones.
                    let check = match l4_checksum(self.src, self.dst, IPPROTO_UDP, &udp) {
                        0 => 0xffff,
                        c => c,
                    };
                    udp[6..8].copy_from_slice(&check.to_be_bytes());
                }
                udp
            }
            L4::Icmp {
                kind,
                code,
                rest,
                body,
            } => {
                let mut icmp = vec![*kind, *code, 0, 0];
                icmp.extend_from_slice(rest);
                icmp.extend_from_slice(body);
                let check = internet_checksum(&[&icmp]);
                icmp[2..4].copy_from_slice(&check.to_be_bytes());
                icmp
            }
            L4::Raw { bytes, .. } => bytes.clone(),
        }
    }

    fn header_len(&self) -> usize {
        assert!(
            self.options.len().is_multiple_of(4) && self.options.len() <= 40,
            "IPv4 options must be a multiple of 4 bytes, at most 40"
        );
        IPV4_LEN + self.options.len()
    }

    /// The IPv4 packet: header (with options and a computed checksum) and L4.
    fn ip_bytes(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        let header_len = self.header_len();
        let total_len =
            u16::try_from(header_len + l4.len()).expect("test packet fits in an IPv4 packet");
        let mut ip = Vec::with_capacity(usize::from(total_len));
        ip.push(0x40 | (header_len / 4) as u8);
        ip.push(0); // TOS
        ip.extend_from_slice(&total_len.to_be_bytes());
        ip.extend_from_slice(&0x1234u16.to_be_bytes()); // id
        ip.extend_from_slice(&self.frag.to_be_bytes());
        ip.push(self.ttl);
        ip.push(self.proto());
        ip.extend_from_slice(&[0, 0]); // checksum, filled below
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        ip.extend_from_slice(&self.options);
        let check = internet_checksum(&[&ip]);
        ip[10..12].copy_from_slice(&check.to_be_bytes());
        ip.extend_from_slice(&l4);
        ip
    }

    fn frame(&self) -> Vec<u8> {
        let ip = self.ip_bytes();
        let mut frame = Vec::with_capacity(ETH_LEN + ip.len());
        frame.extend_from_slice(&self.eth_dst);
        frame.extend_from_slice(&self.eth_src);
        frame.extend_from_slice(&ETH_P_IP.to_be_bytes());
        frame.extend_from_slice(&ip);
        frame
    }

    /// What an ICMP error quotes of this packet: its IPv4 header and the first 8 bytes of L4.
    fn quote(&self) -> Vec<u8> {
        let mut ip = self.ip_bytes();
        ip.truncate(self.header_len() + 8);
        ip
    }

    fn saddr(mut self, addr: Ipv4Addr) -> Packet {
        self.src = addr;
        self
    }

    fn daddr(mut self, addr: Ipv4Addr) -> Packet {
        self.dst = addr;
        self
    }

    /// Sets the source port (TCP/UDP) or the echo identifier (ICMP).
    fn sport(mut self, port: u16) -> Packet {
        match &mut self.l4 {
            L4::Tcp { sport, .. } | L4::Udp { sport, .. } => *sport = port,
            L4::Icmp { rest, .. } => rest[0..2].copy_from_slice(&port.to_be_bytes()),
            L4::Raw { .. } => panic!("a raw packet has no ports"),
        }
        self
    }

    /// Sets the destination port (TCP/UDP) or the echo identifier (ICMP).
    fn dport(mut self, port: u16) -> Packet {
        match &mut self.l4 {
            L4::Tcp { dport, .. } | L4::Udp { dport, .. } => *dport = port,
            L4::Icmp { rest, .. } => rest[0..2].copy_from_slice(&port.to_be_bytes()),
            L4::Raw { .. } => panic!("a raw packet has no ports"),
        }
        self
    }

    /// Sets both addresses and both ports (TCP/UDP).
    fn with_tuple(self, tuple: Tuple) -> Packet {
        self.saddr(tuple.src.0)
            .sport(tuple.src.1)
            .daddr(tuple.dst.0)
            .dport(tuple.dst.1)
    }

    fn macs(mut self, eth_dst: [u8; 6], eth_src: [u8; 6]) -> Packet {
        self.eth_dst = eth_dst;
        self.eth_src = eth_src;
        self
    }

    /// Delivered to `endpoint`: its MAC as destination, its host veth's MAC as source.
    fn delivered_to(self, endpoint: &Endpoint) -> Packet {
        self.macs(endpoint.mac, endpoint.host_mac)
    }

    /// One hop less, as the host forwards it (from outside, or from an endpoint through a host
    /// address): TTL one lower; `frame` recomputes the header checksum from scratch.
    fn forwarded(self) -> Packet {
        Packet {
            ttl: self.ttl - 1,
            ..self
        }
    }

    /// Sent by `endpoint` into its host veth: the endpoint knows the host veth's MAC as its
    /// gateway's (and every peer's).
    fn sent_by(self, endpoint: &Endpoint) -> Packet {
        self.macs(endpoint.host_mac, endpoint.mac)
    }

    /// As the loopback carries it: all-zero MACs.
    fn on_loopback(self) -> Packet {
        self.macs([0; 6], [0; 6])
    }

    /// As it arrives at the uplink from the next hop.
    fn at_uplink_ingress(self) -> Packet {
        self.macs(UPLINK_MAC, NEXT_HOP_MAC)
    }
}

/// TCP from `src` to `dst` with `flags`, leaving through the uplink.
fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Packet {
    Packet::leaving(
        src.0,
        dst.0,
        L4::Tcp {
            sport: src.1,
            dport: dst.1,
            seq: 0x0102_0304,
            ack: if flags & TCP_ACK != 0 { 0x0a0b_0c0d } else { 0 },
            flags,
            payload: Vec::new(),
        },
    )
}

/// UDP from `src` to `dst` with a 5-byte payload (odd length: exercises the checksum's last
/// byte), leaving through the uplink.
fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), checksum: bool) -> Packet {
    udp_carrying(src, dst, b"query".to_vec(), checksum)
}

fn udp_carrying(
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    payload: Vec<u8>,
    checksum: bool,
) -> Packet {
    Packet::leaving(
        src.0,
        dst.0,
        L4::Udp {
            sport: src.1,
            dport: dst.1,
            payload,
            checksum,
        },
    )
}

/// A UDP datagram addressed as `from` whose checksum, once translated to `to`, computes to
/// zero (and must then be sent as 0xffff): two payload bytes cancel the rest of the sum.
fn udp_zero_sum_after_translation(from: Tuple, to: Tuple) -> Packet {
    let probe = udp_carrying(to.src, to.dst, vec![0, 0], false);
    let canceller = l4_checksum(to.src.0, to.dst.0, IPPROTO_UDP, &probe.l4_bytes());
    udp_carrying(from.src, from.dst, canceller.to_be_bytes().to_vec(), true)
}

/// An ICMP echo request or reply with identifier `id`, sequence 1 and 8 bytes of data.
fn echo(kind: u8, src: Ipv4Addr, dst: Ipv4Addr, id: u16) -> Packet {
    let [id_hi, id_lo] = id.to_be_bytes();
    Packet::leaving(
        src,
        dst,
        L4::Icmp {
            kind,
            code: 0,
            rest: [id_hi, id_lo, 0, 1],
            body: b"fixture!".to_vec(),
        },
    )
}

/// An ICMP error from `src` to `dst` quoting `quoted` (IPv4 header + 8 bytes), arriving.
fn icmp_error(src: Ipv4Addr, dst: Ipv4Addr, kind: u8, code: u8, quoted: Vec<u8>) -> Packet {
    // Fragmentation needed carries the next-hop MTU in the low half of the second word.
    let rest = if kind == ICMP_DEST_UNREACH && code == ICMP_FRAG_NEEDED {
        [0, 0, 0x05, 0x78] // 1400
    } else {
        [0; 4]
    };
    Packet::arriving(
        src,
        dst,
        L4::Icmp {
            kind,
            code,
            rest,
            body: quoted,
        },
    )
}

/// `quote` with `len` bytes at `offset` taken from `from`: a quoted field the translation leaves
/// as the router quoted it.
fn splice(mut quote: Vec<u8>, from: &[u8], offset: usize, len: usize) -> Vec<u8> {
    quote[offset..offset + len].copy_from_slice(&from[offset..offset + len]);
    quote
}

// ---------------------------------------------------------------------------------------------
// The table.

/// The chosen NAT port: known in advance (one-port ranges) or learned from the first
/// translated packet of the case (wider ranges: the program picks at random).
#[derive(Clone, Copy, Debug)]
enum NatPort {
    Fixed(u16),
    Learned,
}

/// A frame a step must leave in the buffer.
enum Frame {
    /// The input, untouched.
    Unchanged,
    Exact(Vec<u8>),
    /// The translation's source port is read from the output at `offset` and must lie in
    /// `range`; the output must then equal `build(port)`, and the port is remembered for the
    /// case's [`NatPort::Learned`] and [`Frame::WithLearnedPort`].
    LearnPort {
        offset: usize,
        range: (u16, u16),
        build: Box<dyn Fn(u16) -> Vec<u8>>,
    },
    /// `build(port)` with the port learned by an earlier step.
    WithLearnedPort(Box<dyn Fn(u16) -> Vec<u8>>),
}

/// What one step must do.
enum Expect {
    /// `TC_ACT_OK`, leaving this frame.
    Passed(Frame),
    /// `TC_ACT_REDIRECT` to `ifindex` (counted as traffic to that endpoint), leaving this frame.
    Redirected { ifindex: u32, frame: Frame },
    /// `TC_ACT_REDIRECT` to the loopback's ingress (into the host's own stack; no endpoint
    /// counts it), leaving this frame.
    ToHost(Frame),
    /// `TC_ACT_REDIRECT` out of the uplink (`bpf_redirect_neigh` puts the MACs on after the
    /// program), leaving this frame.
    RoutedOut(Frame),
    /// `TC_ACT_SHOT`, counted under the program's ifindex and `reason`.
    Dropped(DropReason),
    /// `BPF_PROG_TEST_RUN` may refuse the input with `errno` before the program runs (kernels
    /// that check the header); otherwise the program drops it like [`Expect::Dropped`].
    DroppedUnlessRefused { reason: DropReason, errno: i32 },
}

struct Step {
    program: &'static str,
    /// The interface the packet comes in on: [`TEST_RUN_IFINDEX`] for the uplink and loopback
    /// programs, the sender's host veth for `tc_from_endpoint`.
    ifindex: u32,
    input: Vec<u8>,
    expect: Expect,
}

/// Packets and bytes seen in one direction of a flow, and its TCP state bits.
#[derive(Clone, Copy, Debug, Default)]
struct DirState {
    packets: u64,
    bytes: u64,
    state: u8,
}

/// Packets `seen` in a direction, with the state they must leave.
fn seen(packets: &[&Packet], state: u8) -> DirState {
    DirState {
        packets: packets.len() as u64,
        bytes: packets.iter().map(|p| p.frame().len() as u64).sum(),
        state,
    }
}

/// A direction no packet went (its entry was made by the other direction's first packet).
const UNSEEN: DirState = DirState {
    packets: 0,
    bytes: 0,
    state: 0,
};

/// One masqueraded flow: the two CONNTRACK entries it must have.
struct FlowState {
    proto: u8,
    endpoint: &'static Endpoint,
    /// TCP/UDP source port, or the ICMP echo identifier.
    endpoint_port: u16,
    remote: Ipv4Addr,
    /// TCP/UDP destination port; unused for ICMP (the identifier stands in both fields).
    remote_port: u16,
    nat_port: NatPort,
    original: DirState,
    reply: DirState,
}

impl FlowState {
    /// The two entries, independently of the program: original {endpoint, remote, ports} ->
    /// host:nat port; reply {remote, host, remote port, nat port} -> endpoint:port. For ICMP the
    /// identifier (endpoint's / translated) is both ports of a key.
    fn entries(&self, host: Ipv4Addr, nat_port: u16) -> [(CtKey, CtEntry); 2] {
        let icmp = self.proto == IPPROTO_ICMP;
        let original_dport = if icmp {
            self.endpoint_port
        } else {
            self.remote_port
        };
        let translated_dport = if icmp { nat_port } else { self.remote_port };
        TranslatedFlow {
            proto: self.proto,
            original: Tuple::new(
                (self.endpoint.ip, self.endpoint_port),
                (self.remote, original_dport),
            ),
            translated: Tuple::new((host, nat_port), (self.remote, translated_dport)),
            kind: CT_KIND_MASQUERADE,
            flags: [0, 0],
            ifindex: self.endpoint.ifindex,
            seen: [self.original, self.reply],
        }
        .entries()
    }
}

/// One direction's addressing: source and destination, address and port.
#[derive(Clone, Copy, Debug)]
struct Tuple {
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
}

impl Tuple {
    const fn new(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Tuple {
        Tuple { src, dst }
    }

    const fn reversed(self) -> Tuple {
        Tuple::new(self.dst, self.src)
    }

    fn key(self, proto: u8) -> CtKey {
        CtKey {
            saddr: self.src.0.octets(),
            daddr: self.dst.0.octets(),
            sport: self.src.1.to_be_bytes(),
            dport: self.dst.1.to_be_bytes(),
            proto,
            _pad: [0; 3],
        }
    }
}

/// What the two CONNTRACK entries of any translated flow are made of.
struct TranslatedFlow {
    proto: u8,
    /// As the flow's first packet carried it: the original direction's key.
    original: Tuple,
    /// What that packet was rewritten to. Replies carry it reversed: the reply direction's key.
    translated: Tuple,
    kind: u8,
    /// `CT_F_*` of the original and of the reply direction.
    flags: [u8; 2],
    ifindex: u32,
    /// What the original and the reply direction have seen.
    seen: [DirState; 2],
}

impl TranslatedFlow {
    /// Each direction is rewritten to the other direction's key, reversed.
    fn entries(&self) -> [(CtKey, CtEntry); 2] {
        let entry = |seen: &DirState, to: Tuple, direction: u8, flags: u8| CtEntry {
            last_seen_ns: 0, // checked separately: it is a clock reading
            packets: seen.packets,
            bytes: seen.bytes,
            new_saddr: to.src.0.octets(),
            new_daddr: to.dst.0.octets(),
            new_sport: to.src.1.to_be_bytes(),
            new_dport: to.dst.1.to_be_bytes(),
            direction,
            state: seen.state,
            kind: self.kind,
            flags,
            ifindex: self.ifindex,
            _pad: 0,
        };
        [
            (
                self.original.key(self.proto),
                entry(
                    &self.seen[0],
                    self.translated,
                    CT_DIR_ORIGINAL,
                    self.flags[0],
                ),
            ),
            (
                self.translated.reversed().key(self.proto),
                entry(
                    &self.seen[1],
                    self.original.reversed(),
                    CT_DIR_REPLY,
                    self.flags[1],
                ),
            ),
        ]
    }
}

/// Where a connection to a published port comes from, which says where each direction is
/// translated.
#[derive(Clone, Copy)]
enum Via {
    /// A client outside, through the uplink: requests are translated at its ingress
    /// (`tc_from_netdev`), replies at its egress (`tc_to_netdev`), after the host stack routed
    /// them; or, with the uplink's ifindex set, where they leave the endpoint (see case 2b).
    Uplink,
    /// The host itself, through its loopback (`tc_from_host`). Replies must come back into the
    /// host's stack without being taken for martians, so they are translated where they leave
    /// the endpoint (`tc_from_endpoint`) and handed to the loopback.
    Loopback,
    /// This endpoint, connecting to a host address (hairpin): both directions enter the host at
    /// an endpoint's veth (`tc_from_endpoint`) and are delivered from there.
    Hairpin(&'static Endpoint),
}

impl Via {
    /// `CT_F_*` of the original and of the reply direction: `CT_F_AT_ENDPOINT` where
    /// `tc_from_endpoint` translates.
    fn flags(self) -> [u8; 2] {
        match self {
            Via::Uplink => [0, 0],
            Via::Loopback => [0, CT_F_AT_ENDPOINT],
            Via::Hairpin(_) => [CT_F_AT_ENDPOINT, CT_F_AT_ENDPOINT],
        }
    }
}

/// A connection to a published port: how its first packet came (`from`), what the program
/// must make of it (`to`, stated in full: which source the endpoint sees, and which source
/// port when the client's would clash), and the endpoint behind the port.
#[derive(Clone, Copy)]
struct Conn {
    proto: u8,
    via: Via,
    endpoint: &'static Endpoint,
    from: Tuple,
    to: Tuple,
}

impl Conn {
    fn new(proto: u8, via: Via, endpoint: &'static Endpoint, from: Tuple, to: Tuple) -> Conn {
        Conn {
            proto,
            via,
            endpoint,
            from,
            to,
        }
    }

    /// The client's packet made by `make(source, destination)`, as it reaches the program
    /// that opens the flow.
    fn request(&self, make: impl FnOnce((Ipv4Addr, u16), (Ipv4Addr, u16)) -> Packet) -> Packet {
        let packet = make(self.from.src, self.from.dst);
        match self.via {
            Via::Uplink => packet.at_uplink_ingress(),
            Via::Loopback => packet.on_loopback(),
            Via::Hairpin(client) => packet.sent_by(client),
        }
    }

    /// The endpoint's reply made by `make(source, destination)`, as it reaches the program
    /// that translates it: leaving through the uplink (as `make` builds it), or leaving the
    /// endpoint.
    fn reply(&self, make: impl FnOnce((Ipv4Addr, u16), (Ipv4Addr, u16)) -> Packet) -> Packet {
        let packet = make(self.to.dst, self.to.src);
        match self.via {
            Via::Uplink => packet,
            Via::Loopback | Via::Hairpin(_) => packet.sent_by(self.endpoint),
        }
    }

    /// `packet` of the client through the program where it enters: rewritten to `to` and
    /// delivered into the endpoint.
    fn request_step(&self, packet: &Packet) -> Step {
        let (program, ifindex) = match self.via {
            Via::Uplink => (program_names::TC_FROM_NETDEV, TEST_RUN_IFINDEX),
            Via::Loopback => (program_names::TC_FROM_HOST, TEST_RUN_IFINDEX),
            Via::Hairpin(client) => (program_names::TC_FROM_ENDPOINT, client.ifindex),
        };
        let out = packet.clone().with_tuple(self.to);
        // The host forwards what comes from outside or from an endpoint; its own packets it
        // sends.
        let out = match self.via {
            Via::Uplink | Via::Hairpin(_) => out.forwarded(),
            Via::Loopback => out,
        }
        .delivered_to(self.endpoint);
        Step {
            program,
            ifindex,
            input: packet.frame(),
            expect: Expect::Redirected {
                ifindex: self.endpoint.ifindex,
                frame: Frame::Exact(out.frame()),
            },
        }
    }

    /// The endpoint's reply `packet` once translated: from the address and port the client
    /// connected to, with the MACs of where it goes next.
    fn reply_translated(&self, packet: &Packet) -> Packet {
        let out = packet.clone().with_tuple(self.from.reversed());
        match self.via {
            Via::Uplink => out,
            Via::Loopback => out.on_loopback(),
            Via::Hairpin(client) => out.forwarded().delivered_to(client),
        }
    }

    /// `packet` of the endpoint through the program that translates replies: rewritten by
    /// [`Conn::reply_translated`] and sent on towards the client.
    fn reply_step(&self, packet: &Packet) -> Step {
        let out = Frame::Exact(self.reply_translated(packet).frame());
        let (program, ifindex, expect) = match self.via {
            Via::Uplink => (
                program_names::TC_TO_NETDEV,
                TEST_RUN_IFINDEX,
                Expect::Passed(out),
            ),
            Via::Loopback => (
                program_names::TC_FROM_ENDPOINT,
                self.endpoint.ifindex,
                Expect::ToHost(out),
            ),
            Via::Hairpin(client) => (
                program_names::TC_FROM_ENDPOINT,
                self.endpoint.ifindex,
                Expect::Redirected {
                    ifindex: client.ifindex,
                    frame: out,
                },
            ),
        };
        Step {
            program,
            ifindex,
            input: packet.frame(),
            expect,
        }
    }

    /// The flow's entries once its directions have seen `original` and `reply`.
    fn flow(&self, original: DirState, reply: DirState) -> ExpectedFlow {
        ExpectedFlow::Published(TranslatedFlow {
            proto: self.proto,
            original: self.from,
            translated: self.to,
            kind: CT_KIND_PUBLISHED,
            flags: self.via.flags(),
            ifindex: self.endpoint.ifindex,
            seen: [original, reply],
        })
    }
}

/// A flow CONNTRACK must hold after a case.
enum ExpectedFlow {
    /// Its NAT port may only be known once a step has learned it.
    Masquerade(FlowState),
    Published(TranslatedFlow),
}

impl From<FlowState> for ExpectedFlow {
    fn from(flow: FlowState) -> Self {
        ExpectedFlow::Masquerade(flow)
    }
}

/// The key of the reply entry of a TCP flow to REMOTE:80 masqueraded to HOST:`nat_port`.
fn masquerade_reply_key(nat_port: u16) -> CtKey {
    Tuple::new((REMOTE, REMOTE_PORT), (HOST, nat_port)).key(IPPROTO_TCP)
}

/// The TCP flow EP:40000 -> REMOTE:80.
fn tcp_flow(nat_port: NatPort, original: DirState, reply: DirState) -> FlowState {
    FlowState {
        proto: IPPROTO_TCP,
        endpoint: &EP,
        endpoint_port: EP_PORT,
        remote: REMOTE,
        remote_port: REMOTE_PORT,
        nat_port,
        original,
        reply,
    }
}

/// NAT_STATS, summed over CPUs, by `nat_stat` index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct NatStats {
    flows_created: u64,
    port_retries: u64,
    ports_exhausted: u64,
    table_full: u64,
    published_flows: u64,
}

struct Case {
    name: &'static str,
    settings: LoadSettings,
    /// Installed with `Maps::publish`, as the agent installs them (allow list first, and the
    /// allow-list flag set from it).
    published: Vec<PublishedEntry>,
    steps: Vec<Step>,
    /// Entries removed from CONNTRACK before the step at each index, as the agent's collector
    /// removes them (racing the data plane, see `Datapath::conntrack_gc`).
    removals: Vec<(usize, CtKey)>,
    /// Every flow CONNTRACK must hold after the steps, and nothing else.
    flows: Vec<ExpectedFlow>,
    nat_stats: NatStats,
}

impl Case {
    fn new(name: &'static str, settings: LoadSettings) -> Case {
        Case {
            name,
            settings,
            published: Vec::new(),
            steps: Vec::new(),
            removals: Vec::new(),
            flows: Vec::new(),
            nat_stats: NatStats::default(),
        }
    }

    fn publish(mut self, entry: PublishedEntry) -> Case {
        self.published.push(entry);
        self
    }

    fn step(mut self, step: Step) -> Case {
        self.steps.push(step);
        self
    }

    /// The entry at `key` goes before the next step, behind the data plane's back.
    fn removed(mut self, key: CtKey) -> Case {
        self.removals.push((self.steps.len(), key));
        self
    }

    /// `packet` through `tc_to_netdev` (uplink egress).
    fn egress(self, packet: &Packet, expect: Expect) -> Case {
        self.raw(program_names::TC_TO_NETDEV, packet.frame(), expect)
    }

    /// `packet` through `tc_from_netdev` (uplink ingress).
    fn ingress(self, packet: &Packet, expect: Expect) -> Case {
        self.raw(program_names::TC_FROM_NETDEV, packet.frame(), expect)
    }

    /// `packet` sent by `endpoint` through `tc_from_endpoint` on its host veth.
    fn at_endpoint(self, endpoint: &Endpoint, packet: &Packet, expect: Expect) -> Case {
        self.step(Step {
            program: program_names::TC_FROM_ENDPOINT,
            ifindex: endpoint.ifindex,
            input: packet.frame(),
            expect,
        })
    }

    /// `packet` through `tc_from_host` (loopback ingress).
    fn at_loopback(self, packet: &Packet, expect: Expect) -> Case {
        self.raw(program_names::TC_FROM_HOST, packet.frame(), expect)
    }

    /// Raw bytes (for truncated frames) through the uplink or loopback `program`.
    fn raw(self, program: &'static str, input: Vec<u8>, expect: Expect) -> Case {
        self.step(Step {
            program,
            ifindex: TEST_RUN_IFINDEX,
            input,
            expect,
        })
    }

    /// The client's `packet` of `conn`, which must open or continue it.
    fn request(self, conn: &Conn, packet: &Packet) -> Case {
        self.step(conn.request_step(packet))
    }

    /// The endpoint's `packet` of `conn`, which must go back to the client.
    fn reply(self, conn: &Conn, packet: &Packet) -> Case {
        self.step(conn.reply_step(packet))
    }

    fn flow(mut self, flow: impl Into<ExpectedFlow>) -> Case {
        self.flows.push(flow.into());
        self
    }

    fn stats(mut self, nat_stats: NatStats) -> Case {
        self.nat_stats = nat_stats;
        self
    }
}

/// NAT on with `ports` and room for plenty of flows.
fn nat(ports: (u16, u16)) -> LoadSettings {
    LoadSettings {
        host_ipv4: Some(HOST),
        uplink_ifindex: None,
        nat_ports: ports,
        conntrack_entries: 1024,
    }
}

/// NAT on with the one port [`NAT_PORT`]: every new flow gets it.
fn nat_one_port() -> LoadSettings {
    nat((NAT_PORT, NAT_PORT))
}

/// As [`nat_one_port`], with the uplink's ifindex given: `tc_from_endpoint` routes the packets
/// of flows translated at the uplink out of it (see [`add_uplink`]).
fn routed_one_port() -> LoadSettings {
    LoadSettings {
        uplink_ifindex: Some(UPLINK_IFINDEX),
        ..nat_one_port()
    }
}

/// The uplink's (made-up) ifindex in the suite's namespace.
const UPLINK_IFINDEX: u32 = 60;

/// Makes the veth at [`UPLINK_IFINDEX`] the uplink of the suite's namespace, as
/// `bpf_fib_lookup` needs it: up, with [`HOST`]/24 on it, a default route through [`ROUTER`],
/// and forwarding on (the lookup is made as for a packet arriving on the endpoint's veth).
/// Under a test run the redirect is only recorded: nothing is sent.
fn add_uplink() {
    let uplink = format!("h{UPLINK_IFINDEX}");
    let peer = format!("e{UPLINK_IFINDEX}");
    let (address, router) = (format!("{HOST}/24"), ROUTER.to_string());
    for args in [
        vec!["link", "set", &peer, "up"],
        vec!["link", "set", &uplink, "up"],
        vec!["addr", "add", &address, "dev", &uplink],
        vec!["route", "add", "default", "via", &router, "dev", &uplink],
    ] {
        net_tests::cmd::run_ok("ip", &args);
    }
    std::fs::write("/proc/sys/net/ipv4/conf/all/forwarding", "1")
        .expect("turning forwarding on in the suite's namespace");
}

fn passed(packet: &Packet) -> Expect {
    Expect::Passed(Frame::Exact(packet.frame()))
}

fn unchanged() -> Expect {
    Expect::Passed(Frame::Unchanged)
}

/// `packet`, forwarded by the host into EP.
fn redirected(packet: &Packet) -> Expect {
    Expect::Redirected {
        ifindex: EP.ifindex,
        frame: Frame::Exact(packet.clone().forwarded().delivered_to(&EP).frame()),
    }
}

const ONE_FLOW: NatStats = NatStats {
    flows_created: 1,
    port_retries: 0,
    ports_exhausted: 0,
    table_full: 0,
    published_flows: 0,
};

/// `n` connections to published ports, none of which needed another source port.
fn published_flows(n: u64) -> NatStats {
    NatStats {
        published_flows: n,
        ..NatStats::default()
    }
}

/// `host:port/proto` published to `to` as port `id`, open to the prefixes in `allow` (none:
/// to anyone).
fn published(
    proto: u8,
    host: (Ipv4Addr, u16),
    to: (Ipv4Addr, u16),
    id: u32,
    allow: &[&str],
) -> PublishedEntry {
    PublishedEntry {
        key: PublishKey {
            addr: host.0.octets(),
            port: host.1.to_be_bytes(),
            proto,
            _pad: 0,
        },
        target: PublishTarget {
            addr: to.0.octets(),
            port: to.1.to_be_bytes(),
            // `Maps::publish` sets PUBLISH_F_ALLOW_LIST from `allow`.
            flags: 0,
            _pad: 0,
            id,
        },
        allow: allow
            .iter()
            .map(|net| {
                net.parse()
                    .unwrap_or_else(|e| panic!("allow-list prefix {net}: {e}"))
            })
            .collect(),
    }
}

/// Port 8080 of every host address published to WEB:80, open to anyone.
fn web_published() -> PublishedEntry {
    published(
        IPPROTO_TCP,
        (Ipv4Addr::UNSPECIFIED, WEB_HOST_PORT),
        (WEB.ip, WEB_PORT),
        1,
        &[],
    )
}

fn cases() -> Vec<Case> {
    let ep = (EP.ip, EP_PORT);
    let remote = (REMOTE, REMOTE_PORT);

    // The TCP flow and its translations.
    let syn = tcp(ep, remote, TCP_SYN);
    let syn_out = syn.clone().saddr(HOST).sport(NAT_PORT);
    let ack = tcp(ep, remote, TCP_ACK);
    let syn_ack_in = Packet::arriving(
        REMOTE,
        HOST,
        L4::Tcp {
            sport: REMOTE_PORT,
            dport: NAT_PORT,
            seq: 0x5000_0000,
            ack: 0x0102_0305,
            flags: TCP_SYN | TCP_ACK,
            payload: Vec::new(),
        },
    );
    let syn_ack_delivered = syn_ack_in.clone().daddr(EP.ip).dport(EP_PORT);

    // UDP, with and without a checksum.
    let udp_ep = (EP.ip, 5000);
    let udp_remote = (REMOTE, 53);
    let udp_csum = udp(udp_ep, udp_remote, true);
    let udp_csum_out = udp_csum.clone().saddr(HOST).sport(NAT_PORT);
    let udp_zero = udp(udp_ep, udp_remote, false);
    let udp_zero_out = udp_zero.clone().saddr(HOST).sport(NAT_PORT);

    // ICMP echo.
    let ping = echo(ICMP_ECHO_REQUEST, EP.ip, REMOTE, EP_ECHO_ID);
    let ping_out = ping.clone().saddr(HOST).sport(NAT_PORT);
    let pong_in = Packet {
        eth_dst: UPLINK_MAC,
        eth_src: NEXT_HOP_MAC,
        ..echo(ICMP_ECHO_REPLY, REMOTE, HOST, NAT_PORT)
    };
    let pong_delivered = pong_in.clone().daddr(EP.ip).dport(EP_ECHO_ID);

    // ICMP errors about each kind of flow, and what the endpoint must get. The quoted header's
    // source and port (identifier) go back to the endpoint's and the quoted IPv4 checksum is
    // valid again; a quoted L4 checksum (UDP's and ICMP's are within the 8 quoted bytes) is left
    // as the router quoted it: the endpoint's stack matches the quote to a socket by addresses
    // and ports and never verifies the quoted L4 checksum.
    let frag_needed = icmp_error(
        ROUTER,
        HOST,
        ICMP_DEST_UNREACH,
        ICMP_FRAG_NEEDED,
        syn_out.quote(),
    );
    let frag_needed_delivered = icmp_error(
        ROUTER,
        EP.ip,
        ICMP_DEST_UNREACH,
        ICMP_FRAG_NEEDED,
        syn.quote(),
    );
    let port_unreach = icmp_error(
        REMOTE,
        HOST,
        ICMP_DEST_UNREACH,
        ICMP_PORT_UNREACH,
        udp_csum_out.quote(),
    );
    let port_unreach_delivered = icmp_error(
        REMOTE,
        EP.ip,
        ICMP_DEST_UNREACH,
        ICMP_PORT_UNREACH,
        splice(udp_csum.quote(), &udp_csum_out.quote(), IPV4_LEN + 6, 2),
    );
    let ttl_exceeded = icmp_error(ROUTER, HOST, ICMP_TIME_EXCEEDED, 0, ping_out.quote());
    let ttl_exceeded_delivered = icmp_error(
        ROUTER,
        EP.ip,
        ICMP_TIME_EXCEEDED,
        0,
        splice(ping.quote(), &ping_out.quote(), IPV4_LEN + 2, 2),
    );
    // An error quoting a flow nobody masqueraded (the host's own).
    let host_flow_error = icmp_error(
        ROUTER,
        HOST,
        ICMP_DEST_UNREACH,
        ICMP_FRAG_NEEDED,
        tcp((HOST, 33_000), remote, TCP_SYN).quote(),
    );

    // Malformed and untranslatable.
    let mut with_options = syn.clone();
    with_options.options = vec![0x94, 0x04, 0x00, 0x00]; // Router Alert
    let with_options_out = with_options.clone().saddr(HOST).sport(NAT_PORT);
    let first_fragment = Packet {
        frag: IP_MF,
        ..udp(udp_ep, udp_remote, true)
    };
    let later_fragment = Packet {
        frag: 185, // offset 1480 bytes, last fragment
        l4: L4::Raw {
            proto: IPPROTO_UDP,
            bytes: b"the rest of a datagram".to_vec(),
        },
        ..udp(udp_ep, udp_remote, true)
    };
    // Ethernet + IPv4 + the first 10 bytes of a TCP header (IPv4 total length matches).
    let truncated_tcp_10 = truncated_tcp(&syn, 10);
    // 16 bytes: ports, sequence, acknowledgement, offset, flags and window are there, the
    // checksum is not.
    let truncated_tcp_16 = truncated_tcp(&syn, 16);
    let gre = Packet::leaving(
        EP.ip,
        REMOTE,
        L4::Raw {
            proto: IPPROTO_GRE,
            bytes: vec![0, 0, 0x08, 0x00, 0x45, 0, 0, 0],
        },
    );
    let timestamp_request = Packet::leaving(
        EP.ip,
        REMOTE,
        L4::Icmp {
            kind: ICMP_TIMESTAMP,
            code: 0,
            rest: [0, 9, 0, 1],
            body: vec![0; 12],
        },
    );
    let plain_syn = tcp((PLAIN.ip, EP_PORT), remote, TCP_SYN);
    let host_syn = tcp((HOST, 33_000), remote, TCP_SYN);

    // A second flow of EP: another source port to the same server, or the same port elsewhere.
    let second_port_syn = tcp((EP.ip, EP_PORT + 1), remote, TCP_SYN);
    let other_server_syn = tcp((EP.ip, EP_PORT + 1), (REMOTE2, REMOTE_PORT), TCP_SYN);
    let other_server_syn_out = other_server_syn.clone().saddr(HOST).sport(NAT_PORT);

    // UDP whose translated checksum computes to zero.
    let udp_zero_sum = udp_zero_sum_after_translation(
        Tuple::new(udp_ep, udp_remote),
        Tuple::new((HOST, NAT_PORT), udp_remote),
    );
    let udp_zero_sum_out = udp_zero_sum.clone().saddr(HOST).sport(NAT_PORT);

    // An ICMP error quoting a packet that has IP options.
    let frag_needed_options = icmp_error(
        ROUTER,
        HOST,
        ICMP_DEST_UNREACH,
        ICMP_FRAG_NEEDED,
        with_options_out.quote(),
    );
    let frag_needed_options_delivered = icmp_error(
        ROUTER,
        EP.ip,
        ICMP_DEST_UNREACH,
        ICMP_FRAG_NEEDED,
        with_options.quote(),
    );

    // An echo request from the remote to the host that happens to use the NAT identifier of
    // the endpoint's ping to that remote: the host's to answer, not a reply of the flow.
    let ping_from_remote = Packet {
        eth_dst: UPLINK_MAC,
        eth_src: NEXT_HOP_MAC,
        ..echo(ICMP_ECHO_REQUEST, REMOTE, HOST, NAT_PORT)
    };

    // TCP teardown.
    let fin_out_from_ep = tcp(ep, remote, TCP_FIN | TCP_ACK);
    let rst_from_ep = tcp(ep, remote, TCP_RST | TCP_ACK);
    let reply_with = |flags: u8| Packet {
        l4: L4::Tcp {
            sport: REMOTE_PORT,
            dport: NAT_PORT,
            seq: 0x5000_0001,
            ack: 0x0102_0305,
            flags,
            payload: b"bye".to_vec(),
        },
        ..syn_ack_in.clone()
    };
    let fin_in = reply_with(TCP_FIN | TCP_ACK | TCP_PSH);
    let rst_in = reply_with(TCP_RST);
    let out = |p: &Packet| p.clone().saddr(HOST).sport(NAT_PORT);
    let delivered = |p: &Packet| p.clone().daddr(EP.ip).dport(EP_PORT);

    let wide = (61_000, 61_999);
    let learn_syn = syn.clone();
    let learned_ack = ack.clone();

    let mut cases = vec![
        // 1. A new TCP flow: source rewritten to host:61000, both entries recorded.
        Case::new("snat-tcp-syn", nat_one_port())
            .egress(&syn, passed(&syn_out))
            .flow(tcp_flow(NatPort::Fixed(NAT_PORT), seen(&[&syn], 0), UNSEEN))
            .stats(ONE_FLOW),
        // 2. The second packet of a flow keeps the port its first packet got (random in a range
        //    of 1000).
        Case::new("snat-established-flow-reuses-port", nat(wide))
            .egress(
                &syn,
                Expect::Passed(Frame::LearnPort {
                    offset: ETH_LEN + IPV4_LEN,
                    range: wide,
                    build: Box::new(move |port| learn_syn.clone().saddr(HOST).sport(port).frame()),
                }),
            )
            .egress(
                &ack,
                Expect::Passed(Frame::WithLearnedPort(Box::new(move |port| {
                    learned_ack.clone().saddr(HOST).sport(port).frame()
                }))),
            )
            .flow(tcp_flow(NatPort::Learned, seen(&[&syn, &ack], 0), UNSEEN))
            .stats(ONE_FLOW),
        // 3. UDP: the checksum follows the new address and port; a zero checksum stays zero.
        Case::new("snat-udp-with-checksum", nat_one_port())
            .egress(&udp_csum, passed(&udp_csum_out))
            .flow(udp_flow(seen(&[&udp_csum], 0), UNSEEN))
            .stats(ONE_FLOW),
        Case::new("snat-udp-zero-checksum-stays-zero", nat_one_port())
            .egress(&udp_zero, passed(&udp_zero_out))
            .flow(udp_flow(seen(&[&udp_zero], 0), UNSEEN))
            .stats(ONE_FLOW),
        Case::new(
            "snat-udp-checksum-becoming-zero-sent-as-ffff",
            nat_one_port(),
        )
        .egress(&udp_zero_sum, passed(&udp_zero_sum_out))
        .flow(udp_flow(seen(&[&udp_zero_sum], 0), UNSEEN))
        .stats(ONE_FLOW),
        // 4. ICMP echo: the identifier is the port; the reply comes back to the endpoint with
        //    its own identifier.
        Case::new("snat-icmp-echo-and-reply", nat_one_port())
            .egress(&ping, passed(&ping_out))
            .ingress(&pong_in, redirected(&pong_delivered))
            .flow(FlowState {
                proto: IPPROTO_ICMP,
                endpoint: &EP,
                endpoint_port: EP_ECHO_ID,
                remote: REMOTE,
                remote_port: 0,
                nat_port: NatPort::Fixed(NAT_PORT),
                original: seen(&[&ping], 0),
                reply: seen(&[&pong_in], CT_STATE_ESTABLISHED),
            })
            .stats(ONE_FLOW),
        // 5 and 10. Reverse NAT of a TCP reply: destination, port and MACs go back to the
        //    endpoint; the SYN-ACK marks the reply entry established.
        Case::new("rnat-tcp-syn-ack-establishes", nat_one_port())
            .egress(&syn, passed(&syn_out))
            .ingress(&syn_ack_in, redirected(&syn_ack_delivered))
            .flow(tcp_flow(
                NatPort::Fixed(NAT_PORT),
                seen(&[&syn], 0),
                seen(&[&syn_ack_in], CT_STATE_ESTABLISHED),
            ))
            .stats(ONE_FLOW),
        Case::new(
            "echo-request-from-remote-with-nat-id-is-the-hosts",
            nat_one_port(),
        )
        .egress(&ping, passed(&ping_out))
        .ingress(&ping_from_remote, unchanged())
        .flow(FlowState {
            proto: IPPROTO_ICMP,
            endpoint: &EP,
            endpoint_port: EP_ECHO_ID,
            remote: REMOTE,
            remote_port: 0,
            nat_port: NatPort::Fixed(NAT_PORT),
            original: seen(&[&ping], 0),
            reply: UNSEEN,
        })
        .stats(ONE_FLOW),
        Case::new("rnat-unknown-flow-passes-unchanged", nat_one_port())
            .ingress(&syn_ack_in, unchanged()),
        Case::new("rnat-reply-to-other-address-passes", nat_one_port())
            .egress(&syn, passed(&syn_out))
            .ingress(&syn_ack_in.clone().daddr(REMOTE2), unchanged())
            .flow(tcp_flow(NatPort::Fixed(NAT_PORT), seen(&[&syn], 0), UNSEEN))
            .stats(ONE_FLOW),
        // 6. ICMP errors about masqueraded flows reach the endpoint with the quoted packet
        //    translated back (so path-MTU discovery works through NAT). An error is related to
        //    its flow but is not one of its packets: the reply entry is not counted or touched.
        Case::new("icmp-frag-needed-about-tcp", nat_one_port())
            .egress(&syn, passed(&syn_out))
            .ingress(&frag_needed, redirected(&frag_needed_delivered))
            .flow(tcp_flow(NatPort::Fixed(NAT_PORT), seen(&[&syn], 0), UNSEEN))
            .stats(ONE_FLOW),
        Case::new("icmp-port-unreachable-about-udp", nat_one_port())
            .egress(&udp_csum, passed(&udp_csum_out))
            .ingress(&port_unreach, redirected(&port_unreach_delivered))
            .flow(udp_flow(seen(&[&udp_csum], 0), UNSEEN))
            .stats(ONE_FLOW),
        Case::new("icmp-time-exceeded-about-echo", nat_one_port())
            .egress(&ping, passed(&ping_out))
            .ingress(&ttl_exceeded, redirected(&ttl_exceeded_delivered))
            .flow(FlowState {
                proto: IPPROTO_ICMP,
                endpoint: &EP,
                endpoint_port: EP_ECHO_ID,
                remote: REMOTE,
                remote_port: 0,
                nat_port: NatPort::Fixed(NAT_PORT),
                original: seen(&[&ping], 0),
                reply: UNSEEN,
            })
            .stats(ONE_FLOW),
        Case::new("icmp-frag-needed-about-tcp-with-ip-options", nat_one_port())
            .egress(&with_options, passed(&with_options_out))
            .ingress(
                &frag_needed_options,
                redirected(&frag_needed_options_delivered),
            )
            .flow(tcp_flow(
                NatPort::Fixed(NAT_PORT),
                seen(&[&with_options], 0),
                UNSEEN,
            ))
            .stats(ONE_FLOW),
        Case::new("icmp-error-about-host-flow-passes", nat_one_port())
            .ingress(&host_flow_error, unchanged()),
        // 7. One port: a second flow to the same server and port has none left; a flow to
        //    another server can have it.
        Case::new(
            "ports-exhausted-then-other-server-reuses-port",
            nat_one_port(),
        )
        .egress(&syn, passed(&syn_out))
        .egress(
            &second_port_syn,
            Expect::Dropped(DropReason::NatPortsExhausted),
        )
        .egress(&other_server_syn, passed(&other_server_syn_out))
        .flow(tcp_flow(NatPort::Fixed(NAT_PORT), seen(&[&syn], 0), UNSEEN))
        .flow(FlowState {
            proto: IPPROTO_TCP,
            endpoint: &EP,
            endpoint_port: EP_PORT + 1,
            remote: REMOTE2,
            remote_port: REMOTE_PORT,
            nat_port: NatPort::Fixed(NAT_PORT),
            original: seen(&[&other_server_syn], 0),
            reply: UNSEEN,
        })
        .stats(NatStats {
            flows_created: 2,
            ports_exhausted: 1,
            ..NatStats::default()
        }),
        // 8. A full table refuses new flows and keeps translating the ones it has. With room
        //    for 2 entries the new flow's reply entry does not fit; with 3 it does, and must be
        //    taken back when the original entry does not.
        table_full_case("conntrack-full-no-room-for-reply-entry", 2, &syn, &ack),
        table_full_case("conntrack-full-no-room-for-original-entry", 3, &syn, &ack),
        // 9. Malformed and untranslatable packets are never sent out untranslated.
        Case::new("ip-options-translated-after-options", nat_one_port())
            .egress(&with_options, passed(&with_options_out))
            .flow(tcp_flow(
                NatPort::Fixed(NAT_PORT),
                seen(&[&with_options], 0),
                UNSEEN,
            ))
            .stats(ONE_FLOW),
        Case::new("first-fragment-dropped", nat_one_port())
            .egress(&first_fragment, Expect::Dropped(DropReason::Fragment)),
        Case::new("later-fragment-dropped", nat_one_port())
            .egress(&later_fragment, Expect::Dropped(DropReason::Fragment)),
        Case::new("truncated-tcp-ports-only-dropped", nat_one_port()).raw(
            program_names::TC_TO_NETDEV,
            truncated_tcp_10,
            Expect::DroppedUnlessRefused {
                reason: DropReason::Malformed,
                errno: libc::EINVAL,
            },
        ),
        // The flow can be read but the checksum cannot be fixed: dropped, and no flow may be
        // left behind for a packet that never left.
        Case::new(
            "truncated-tcp-no-checksum-dropped-without-state",
            nat_one_port(),
        )
        .raw(
            program_names::TC_TO_NETDEV,
            truncated_tcp_16,
            Expect::DroppedUnlessRefused {
                reason: DropReason::Malformed,
                errno: libc::EINVAL,
            },
        ),
        Case::new("gre-from-endpoint-dropped", nat_one_port())
            .egress(&gre, Expect::Dropped(DropReason::UnsupportedProtocol)),
        Case::new("icmp-timestamp-from-endpoint-dropped", nat_one_port()).egress(
            &timestamp_request,
            Expect::Dropped(DropReason::UnsupportedProtocol),
        ),
        Case::new("non-masquerading-endpoint-passes", nat_one_port())
            .egress(&plain_syn, unchanged()),
        Case::new("host-own-traffic-passes", nat_one_port()).egress(&host_syn, unchanged()),
        Case::new("nat-off-passes-both-ways", LoadSettings::default())
            .egress(&syn, unchanged())
            .ingress(&syn_ack_in, unchanged())
            .ingress(&frag_needed, unchanged()),
        // 10. TCP state bits.
        Case::new("tcp-state-fin-from-endpoint", nat_one_port())
            .egress(&syn, passed(&syn_out))
            .egress(&fin_out_from_ep, passed(&out(&fin_out_from_ep)))
            .flow(tcp_flow(
                NatPort::Fixed(NAT_PORT),
                seen(&[&syn, &fin_out_from_ep], CT_STATE_FIN_ORIGINAL),
                UNSEEN,
            ))
            .stats(ONE_FLOW),
        Case::new("tcp-state-fin-from-remote", nat_one_port())
            .egress(&syn, passed(&syn_out))
            .ingress(&syn_ack_in, redirected(&syn_ack_delivered))
            .ingress(&fin_in, redirected(&delivered(&fin_in)))
            .flow(tcp_flow(
                NatPort::Fixed(NAT_PORT),
                seen(&[&syn], 0),
                seen(
                    &[&syn_ack_in, &fin_in],
                    CT_STATE_ESTABLISHED | CT_STATE_FIN_REPLY,
                ),
            ))
            .stats(ONE_FLOW),
        Case::new("tcp-state-rst-from-endpoint", nat_one_port())
            .egress(&syn, passed(&syn_out))
            .egress(&rst_from_ep, passed(&out(&rst_from_ep)))
            .flow(tcp_flow(
                NatPort::Fixed(NAT_PORT),
                seen(&[&syn, &rst_from_ep], CT_STATE_RST),
                UNSEEN,
            ))
            .stats(ONE_FLOW),
        Case::new("tcp-state-rst-from-remote", nat_one_port())
            .egress(&syn, passed(&syn_out))
            .ingress(&syn_ack_in, redirected(&syn_ack_delivered))
            .ingress(&rst_in, redirected(&delivered(&rst_in)))
            .flow(tcp_flow(
                NatPort::Fixed(NAT_PORT),
                seen(&[&syn], 0),
                seen(&[&syn_ack_in, &rst_in], CT_STATE_ESTABLISHED | CT_STATE_RST),
            ))
            .stats(ONE_FLOW),
        // The endpoint reuses a closed flow's 4-tuple: its new SYN starts the state over.
        Case::new("tcp-state-new-syn-reopens-closed-flow", nat_one_port())
            .egress(&syn, passed(&syn_out))
            .egress(&fin_out_from_ep, passed(&out(&fin_out_from_ep)))
            .egress(&syn, passed(&syn_out))
            .flow(tcp_flow(
                NatPort::Fixed(NAT_PORT),
                seen(&[&syn, &fin_out_from_ep, &syn], 0),
                UNSEEN,
            ))
            .stats(ONE_FLOW),
        // A new connection on the tuple of a reset one starts over on both entries: the RST
        // the reply entry saw must not make the new connection look closed, or a flow that
        // needs the port would take it over while the connection runs.
        Case::new(
            "tcp-state-new-syn-after-reset-keeps-the-port",
            nat_one_port(),
        )
        .egress(&syn, passed(&syn_out))
        .ingress(&rst_in, redirected(&delivered(&rst_in)))
        .egress(&syn, passed(&syn_out))
        .egress(
            &second_port_syn,
            Expect::Dropped(DropReason::NatPortsExhausted),
        )
        .flow(tcp_flow(
            NatPort::Fixed(NAT_PORT),
            seen(&[&syn, &syn], 0),
            seen(&[&rst_in], 0),
        ))
        .stats(NatStats {
            flows_created: 1,
            ports_exhausted: 1,
            ..NatStats::default()
        }),
        // The collector removed a flow's reply entry just as its port was taken up again (a
        // race between the collector and the data plane): another flow then got the port.
        // The orphaned original entry must not translate a new connection on its tuple to that
        // port, whose replies go to the other flow; it goes, and the new connection is a new
        // flow (here: no port is left for it).
        Case::new("orphaned-original-entry-is-not-used", nat_one_port())
            .egress(&syn, passed(&syn_out))
            .removed(masquerade_reply_key(NAT_PORT))
            .egress(&second_port_syn, passed(&out(&second_port_syn)))
            .egress(&syn, Expect::Dropped(DropReason::NatPortsExhausted))
            .ingress(
                &syn_ack_in,
                redirected(&syn_ack_delivered.clone().dport(EP_PORT + 1)),
            )
            .flow(FlowState {
                proto: IPPROTO_TCP,
                endpoint: &EP,
                endpoint_port: EP_PORT + 1,
                remote: REMOTE,
                remote_port: REMOTE_PORT,
                nat_port: NatPort::Fixed(NAT_PORT),
                original: seen(&[&second_port_syn], 0),
                reply: seen(&[&syn_ack_in], CT_STATE_ESTABLISHED),
            })
            .stats(NatStats {
                flows_created: 2,
                ports_exhausted: 1,
                ..NatStats::default()
            }),
        // A RST that opens a flow (its entries expired while the endpoint still held the
        // connection) is a packet like any other: its flags count too.
        Case::new("tcp-state-rst-as-first-packet", nat_one_port())
            .egress(&rst_from_ep, passed(&out(&rst_from_ep)))
            .flow(tcp_flow(
                NatPort::Fixed(NAT_PORT),
                seen(&[&rst_from_ep], CT_STATE_RST),
                UNSEEN,
            ))
            .stats(ONE_FLOW),
    ];
    cases.extend(published_cases());
    cases
}

/// Published ports: connections from outside, from the host itself and from endpoints
/// (hairpin); wildcard and specific host addresses; allow lists; translated tuples that clash.
/// Every case runs with the one-port NAT range, so a clash has exactly one way out.
fn published_cases() -> Vec<Case> {
    let client = (CLIENT, CLIENT_PORT);
    let web = (WEB.ip, WEB_PORT);
    let web_on = |addr: Ipv4Addr| (addr, WEB_HOST_PORT);
    let syn = |src, dst| tcp(src, dst, TCP_SYN);
    let syn_ack = |src, dst| tcp(src, dst, TCP_SYN | TCP_ACK);
    let ack = |src, dst| tcp(src, dst, TCP_ACK);

    // From outside to the uplink's port 8080: the endpoint sees the client as it is.
    let outside = Conn::new(
        IPPROTO_TCP,
        Via::Uplink,
        &WEB,
        Tuple::new(client, web_on(HOST)),
        Tuple::new(client, web),
    );
    let outside_syn = outside.request(syn);
    let outside_syn_ack = outside.reply(syn_ack);
    let outside_ack = outside.request(ack);

    // UDP 5353 -> WEB:53, without and with a checksum, and with one that computes to zero
    // once translated.
    let dns = Conn::new(
        IPPROTO_UDP,
        Via::Uplink,
        &WEB,
        Tuple::new(client, (HOST, DNS_HOST_PORT)),
        Tuple::new(client, (WEB.ip, DNS_PORT)),
    );
    let dns_case = |name, query: Packet, answer: Packet| {
        Case::new(name, nat_one_port())
            .publish(published(
                IPPROTO_UDP,
                (Ipv4Addr::UNSPECIFIED, DNS_HOST_PORT),
                (WEB.ip, DNS_PORT),
                1,
                &[],
            ))
            .request(&dns, &query)
            .reply(&dns, &answer)
            .flow(dns.flow(seen(&[&query], 0), seen(&[&answer], CT_STATE_ESTABLISHED)))
            .stats(published_flows(1))
    };
    let dns_zero_sum_query =
        dns.request(|src, dst| udp_zero_sum_after_translation(Tuple::new(src, dst), dns.to));

    // The same host port published on every address (to WEB:80) and on one address (to
    // WEB:8000): the specific entry wins for its address, the wildcard serves the uplink's.
    let to_alt_port = |host: Ipv4Addr| {
        Conn::new(
            IPPROTO_TCP,
            Via::Uplink,
            &WEB,
            Tuple::new(client, web_on(host)),
            Tuple::new(client, (WEB.ip, WEB_ALT_PORT)),
        )
    };
    let specific_on =
        |host: Ipv4Addr| published(IPPROTO_TCP, web_on(host), (WEB.ip, WEB_ALT_PORT), 2, &[]);
    let (uplink_specific, host2_specific) = (to_alt_port(HOST), to_alt_port(HOST2));
    let uplink_specific_syn = uplink_specific.request(syn);
    let host2_specific_syn = host2_specific.request(syn);
    // A port published on every address only, reached at HOST2: the data plane knows only the
    // uplink's address as the host's, so it leaves the packet to the host.
    let admin_published = |allow: &[&str]| {
        published(
            IPPROTO_TCP,
            (Ipv4Addr::UNSPECIFIED, ADMIN_HOST_PORT),
            (WEB.ip, ADMIN_PORT),
            3,
            allow,
        )
    };
    let admin_on_host2 = syn(client, (HOST2, ADMIN_HOST_PORT)).at_uplink_ingress();

    // Allow lists: port 8080 open to CLIENTS_NET only, port 9090 to STRANGERS_NET only.
    let web_allowing_clients = || {
        published(
            IPPROTO_TCP,
            web_on(Ipv4Addr::UNSPECIFIED),
            web,
            1,
            &[CLIENTS_NET],
        )
    };
    let stranger = (STRANGER, CLIENT_PORT);
    let stranger_web_syn = syn(stranger, web_on(HOST)).at_uplink_ingress();
    let stranger_admin = Conn::new(
        IPPROTO_TCP,
        Via::Uplink,
        &WEB,
        Tuple::new(stranger, (HOST, ADMIN_HOST_PORT)),
        Tuple::new(stranger, (WEB.ip, ADMIN_PORT)),
    );
    let stranger_admin_syn = stranger_admin.request(syn);

    // Nothing published there: a port, or a protocol.
    let ssh_syn = syn(client, (HOST, SSH_PORT)).at_uplink_ingress();
    let udp_to_web_port = udp(client, web_on(HOST), true).at_uplink_ingress();

    // Hairpin: EP connects to its host's address (or its gateway's); WEB sees its gateway as
    // the source (as behind Docker's default proxy), so that its replies come back through the
    // host to be translated.
    let hairpin_to = |host: Ipv4Addr| {
        Conn::new(
            IPPROTO_TCP,
            Via::Hairpin(&EP),
            &WEB,
            Tuple::new((EP.ip, EP_PORT), web_on(host)),
            Tuple::new((GATEWAY, EP_PORT), web),
        )
    };
    let (hairpin, hairpin_gateway) = (hairpin_to(HOST), hairpin_to(GATEWAY));
    let hairpin_syn = hairpin.request(syn);
    let hairpin_syn_ack = hairpin.reply(syn_ack);
    let hairpin_ack = hairpin.request(ack);
    let hairpin_gateway_syn = hairpin_gateway.request(syn);
    let hairpin_gateway_syn_ack = hairpin_gateway.reply(syn_ack);

    // The host's own connections, through its loopback: a loopback source (which WEB would take
    // as itself) becomes the gateway; any other source address of the host is kept.
    let from_host = |src: Ipv4Addr, dst: Ipv4Addr, seen_as: Ipv4Addr| {
        Conn::new(
            IPPROTO_TCP,
            Via::Loopback,
            &WEB,
            Tuple::new((src, HOST_CLIENT_PORT), web_on(dst)),
            Tuple::new((seen_as, HOST_CLIENT_PORT), web),
        )
    };
    let local = from_host(LOCALHOST, LOCALHOST, GATEWAY);
    let local_syn = local.request(syn);
    let local_syn_ack = local.reply(syn_ack);
    let local_ack = local.request(ack);
    let host_case = |name, conn: Conn| {
        let (request, reply) = (conn.request(syn), conn.reply(syn_ack));
        Case::new(name, nat_one_port())
            .publish(web_published())
            .request(&conn, &request)
            .reply(&conn, &reply)
            .flow(conn.flow(seen(&[&request], 0), seen(&[&reply], CT_STATE_ESTABLISHED)))
            .stats(published_flows(1))
    };

    // Clashes: a second flow whose translated tuple would be the first one's gets the NAT
    // port. Two endpoints using the same source port towards the host's 8080 both become
    // GATEWAY:40000 -> WEB:80; one outside client port to two host ports published to the same
    // endpoint port both become CLIENT:50000 -> WEB:80.
    let hairpin_plain = Conn::new(
        IPPROTO_TCP,
        Via::Hairpin(&PLAIN),
        &WEB,
        Tuple::new((PLAIN.ip, EP_PORT), web_on(HOST)),
        Tuple::new((GATEWAY, NAT_PORT), web),
    );
    let hairpin_plain_syn = hairpin_plain.request(syn);
    let hairpin_plain_syn_ack = hairpin_plain.reply(syn_ack);
    let outside_8081 = Conn::new(
        IPPROTO_TCP,
        Via::Uplink,
        &WEB,
        Tuple::new(client, (HOST, WEB_HOST_PORT + 1)),
        Tuple::new((CLIENT, NAT_PORT), web),
    );
    let outside_8081_syn = outside_8081.request(syn);
    let outside_8081_syn_ack = outside_8081.reply(syn_ack);
    let clash_stats = NatStats {
        port_retries: 1,
        ..published_flows(2)
    };

    // The host's own flows from a source port that is also published (the host picks its
    // source ports among ports no socket holds, and a published port has none): to REMOTE
    // through the uplink, and to a service of its own through the loopback (where both
    // directions pass tc_from_host).
    let hosts_port_published =
        |proto, to| published(proto, (Ipv4Addr::UNSPECIFIED, HOST_CLIENT_PORT), to, 1, &[]);
    let host_client = (HOST, HOST_CLIENT_PORT);
    let remote = (REMOTE, REMOTE_PORT);
    let local_client = (LOCALHOST, HOST_CLIENT_PORT);
    let local_service = (LOCALHOST, HOST_SERVICE_PORT);
    let on_loopback = |src, dst, flags| tcp(src, dst, flags).on_loopback();

    vec![
        // 1. A SYN from outside to HOST:8080 goes to WEB:80 with the client's address and port;
        //    both entries are recorded, to be translated at the uplink.
        Case::new("published-tcp-syn-from-outside", nat_one_port())
            .publish(web_published())
            .request(&outside, &outside_syn)
            .flow(outside.flow(seen(&[&outside_syn], 0), UNSEEN))
            .stats(published_flows(1)),
        // 2. WEB's reply is left alone where it leaves WEB (the host stack routes it) and gets
        //    HOST:8080 back at the uplink; the client's next packet uses the entry.
        Case::new(
            "published-tcp-reply-and-established-from-outside",
            nat_one_port(),
        )
        .publish(web_published())
        .request(&outside, &outside_syn)
        .at_endpoint(&WEB, &outside_syn_ack.clone().sent_by(&WEB), unchanged())
        .reply(&outside, &outside_syn_ack)
        .request(&outside, &outside_ack)
        .flow(outside.flow(
            seen(&[&outside_syn, &outside_ack], 0),
            seen(&[&outside_syn_ack], CT_STATE_ESTABLISHED),
        ))
        .stats(published_flows(1)),
        // 2b. With the uplink known, WEB's reply is translated where it leaves WEB and routed
        //     out of the uplink from there, one hop less; the uplink never sees it, so it is
        //     accounted once. A reply whose TTL would run out is left to the host stack (which
        //     answers it), untranslated and unaccounted.
        Case::new(
            "published-tcp-reply-routed-out-of-the-uplink-from-the-endpoint",
            routed_one_port(),
        )
        .publish(web_published())
        .request(&outside, &outside_syn)
        .at_endpoint(
            &WEB,
            &outside_syn_ack.clone().sent_by(&WEB),
            Expect::RoutedOut(Frame::Exact(
                outside
                    .reply_translated(&outside_syn_ack)
                    .forwarded()
                    .sent_by(&WEB)
                    .frame(),
            )),
        )
        .request(&outside, &outside_ack)
        .flow(outside.flow(
            seen(&[&outside_syn, &outside_ack], 0),
            seen(&[&outside_syn_ack], CT_STATE_ESTABLISHED),
        ))
        .stats(published_flows(1)),
        Case::new(
            "published-tcp-reply-with-ttl-1-left-to-the-host-stack",
            routed_one_port(),
        )
        .publish(web_published())
        .request(&outside, &outside_syn)
        .at_endpoint(
            &WEB,
            &Packet {
                ttl: 1,
                ..outside_syn_ack.clone()
            }
            .sent_by(&WEB),
            unchanged(),
        )
        .flow(outside.flow(seen(&[&outside_syn], 0), UNSEEN))
        .stats(published_flows(1)),
        // 2c. The host forwards a connection from outside, so the endpoint gets it one hop less
        //     (every delivery above has TTL 63); one that arrives with TTL 1 may not be
        //     forwarded, and is dropped before any flow is made.
        Case::new(
            "published-tcp-syn-with-ttl-1-dropped-without-state",
            nat_one_port(),
        )
        .publish(web_published())
        .ingress(
            &Packet {
                ttl: 1,
                ..outside_syn.clone()
            },
            Expect::Dropped(DropReason::TtlExpired),
        ),
        // 3. UDP: a zero checksum stays zero; a checksum follows the new address and port, and
        //    one that computes to zero is sent as 0xffff.
        dns_case(
            "published-udp-zero-checksum-stays-zero",
            dns.request(|src, dst| udp(src, dst, false)),
            dns.reply(|src, dst| udp(src, dst, false)),
        ),
        dns_case(
            "published-udp-with-checksum",
            dns.request(|src, dst| udp(src, dst, true)),
            dns.reply(|src, dst| udp(src, dst, true)),
        ),
        dns_case(
            "published-udp-checksum-becoming-zero-sent-as-ffff",
            dns_zero_sum_query,
            dns.reply(|src, dst| udp(src, dst, true)),
        ),
        // 4. Wildcard and specific host addresses.
        Case::new(
            "published-specific-address-wins-over-wildcard",
            nat_one_port(),
        )
        .publish(web_published())
        .publish(specific_on(HOST))
        .request(&uplink_specific, &uplink_specific_syn)
        .flow(uplink_specific.flow(seen(&[&uplink_specific_syn], 0), UNSEEN))
        .stats(published_flows(1)),
        Case::new(
            "published-other-host-address-matches-only-its-own-entry",
            nat_one_port(),
        )
        .publish(web_published())
        .publish(specific_on(HOST2))
        .publish(admin_published(&[]))
        .request(&host2_specific, &host2_specific_syn)
        .request(&outside, &outside_syn)
        .ingress(&admin_on_host2, unchanged())
        .flow(host2_specific.flow(seen(&[&host2_specific_syn], 0), UNSEEN))
        .flow(outside.flow(seen(&[&outside_syn], 0), UNSEEN))
        .stats(published_flows(2)),
        // 5. Allow lists are checked before anything is translated or recorded.
        Case::new(
            "published-allow-list-admits-client-in-prefix",
            nat_one_port(),
        )
        .publish(web_allowing_clients())
        .request(&outside, &outside_syn)
        .flow(outside.flow(seen(&[&outside_syn], 0), UNSEEN))
        .stats(published_flows(1)),
        Case::new(
            "published-allow-list-drops-client-outside-prefix-without-state",
            nat_one_port(),
        )
        .publish(web_allowing_clients())
        .ingress(&stranger_web_syn, Expect::Dropped(DropReason::NotAllowed)),
        // Every port has its own list (the port's id leads the trie key).
        Case::new("published-allow-lists-are-per-port", nat_one_port())
            .publish(web_allowing_clients())
            .publish(admin_published(&[STRANGERS_NET]))
            .request(&stranger_admin, &stranger_admin_syn)
            .ingress(&stranger_web_syn, Expect::Dropped(DropReason::NotAllowed))
            .flow(stranger_admin.flow(seen(&[&stranger_admin_syn], 0), UNSEEN))
            .stats(published_flows(1)),
        // 6. What is not published is the host's.
        Case::new(
            "published-unpublished-port-or-protocol-passes-untouched",
            nat_one_port(),
        )
        .publish(web_published())
        .ingress(&ssh_syn, unchanged())
        .ingress(&udp_to_web_port, unchanged()),
        // A port whose endpoint is gone must not let the flow through to the host, nor record
        // it.
        Case::new(
            "published-to-missing-endpoint-dropped-without-state",
            nat_one_port(),
        )
        .publish(published(
            IPPROTO_TCP,
            web_on(Ipv4Addr::UNSPECIFIED),
            (GONE, WEB_PORT),
            1,
            &[],
        ))
        .ingress(&outside_syn, Expect::Dropped(DropReason::RedirectFailed)),
        // 7. Hairpin: both directions translated and delivered at tc_from_endpoint.
        Case::new("published-hairpin-from-endpoint", nat_one_port())
            .publish(web_published())
            .request(&hairpin, &hairpin_syn)
            .reply(&hairpin, &hairpin_syn_ack)
            .request(&hairpin, &hairpin_ack)
            .flow(hairpin.flow(
                seen(&[&hairpin_syn, &hairpin_ack], 0),
                seen(&[&hairpin_syn_ack], CT_STATE_ESTABLISHED),
            ))
            .stats(published_flows(1)),
        Case::new("published-hairpin-through-gateway-address", nat_one_port())
            .publish(web_published())
            .request(&hairpin_gateway, &hairpin_gateway_syn)
            .reply(&hairpin_gateway, &hairpin_gateway_syn_ack)
            .flow(hairpin_gateway.flow(
                seen(&[&hairpin_gateway_syn], 0),
                seen(&[&hairpin_gateway_syn_ack], CT_STATE_ESTABLISHED),
            ))
            .stats(published_flows(1)),
        // 8. The host's own connections: in through the loopback, replies handed back to it
        //    with zeroed MACs. A reply redirected to the loopback's ingress meets tc_from_host
        //    again there, which must leave it alone.
        Case::new("published-host-local-from-loopback", nat_one_port())
            .publish(web_published())
            .request(&local, &local_syn)
            .reply(&local, &local_syn_ack)
            .at_loopback(&local.reply_translated(&local_syn_ack), unchanged())
            .request(&local, &local_ack)
            .flow(local.flow(
                seen(&[&local_syn, &local_ack], 0),
                seen(&[&local_syn_ack], CT_STATE_ESTABLISHED),
            ))
            .stats(published_flows(1)),
        host_case(
            "published-host-local-from-uplink-address-keeps-source",
            from_host(HOST, HOST, HOST),
        ),
        // The reply goes to an address that is neither the gateway nor the uplink's: only
        // WEB's ENDPOINT_F_PUBLISHED makes tc_from_endpoint look it up.
        host_case(
            "published-host-local-from-other-host-address",
            from_host(HOST2, HOST2, HOST2),
        ),
        // 9. Clashing translated tuples.
        Case::new(
            "published-hairpin-clash-second-client-gets-nat-port",
            nat_one_port(),
        )
        .publish(web_published())
        .request(&hairpin, &hairpin_syn)
        .request(&hairpin_plain, &hairpin_plain_syn)
        .reply(&hairpin_plain, &hairpin_plain_syn_ack)
        .flow(hairpin.flow(seen(&[&hairpin_syn], 0), UNSEEN))
        .flow(hairpin_plain.flow(
            seen(&[&hairpin_plain_syn], 0),
            seen(&[&hairpin_plain_syn_ack], CT_STATE_ESTABLISHED),
        ))
        .stats(clash_stats),
        Case::new(
            "published-outside-clash-second-port-gets-nat-port",
            nat_one_port(),
        )
        .publish(web_published())
        .publish(published(
            IPPROTO_TCP,
            (Ipv4Addr::UNSPECIFIED, WEB_HOST_PORT + 1),
            web,
            2,
            &[],
        ))
        .request(&outside, &outside_syn)
        .request(&outside_8081, &outside_8081_syn)
        .reply(&outside_8081, &outside_8081_syn_ack)
        .flow(outside.flow(seen(&[&outside_syn], 0), UNSEEN))
        .flow(outside_8081.flow(
            seen(&[&outside_8081_syn], 0),
            seen(&[&outside_8081_syn_ack], CT_STATE_ESTABLISHED),
        ))
        .stats(clash_stats),
        // 10. Replies to the host's own connections are the host's, also when they come to a
        //     published port: nothing about them makes them a connection to that port (the
        //     host sent the first packet), and taking them would break the host's connection.
        Case::new(
            "published-port-not-opened-by-replies-to-hosts-own-tcp",
            nat_one_port(),
        )
        .publish(hosts_port_published(IPPROTO_TCP, web))
        .egress(&tcp(host_client, remote, TCP_SYN), unchanged())
        .ingress(
            &tcp(remote, host_client, TCP_SYN | TCP_ACK).at_uplink_ingress(),
            unchanged(),
        )
        .ingress(
            &tcp(remote, host_client, TCP_ACK | TCP_PSH).at_uplink_ingress(),
            unchanged(),
        )
        .at_loopback(
            &on_loopback(local_client, local_service, TCP_SYN),
            unchanged(),
        )
        .at_loopback(
            &on_loopback(local_service, local_client, TCP_SYN | TCP_ACK),
            unchanged(),
        )
        .at_loopback(
            &on_loopback(local_service, local_client, TCP_ACK | TCP_PSH),
            unchanged(),
        ),
        // UDP carries nothing that tells a reply from a first datagram; there the agent
        // reserves published ports (net.ipv4.ip_local_reserved_ports) so the host never
        // picks one as the source port of its own flows (tests/tests/published.rs).
    ]
}

/// The UDP flow EP:5000 -> REMOTE:53 on the one port.
fn udp_flow(original: DirState, reply: DirState) -> FlowState {
    FlowState {
        proto: IPPROTO_UDP,
        endpoint: &EP,
        endpoint_port: 5000,
        remote: REMOTE,
        remote_port: 53,
        nat_port: NatPort::Fixed(NAT_PORT),
        original,
        reply,
    }
}

/// `packet`'s frame cut to `l4_len` bytes of TCP header, with the IPv4 total length (and
/// header checksum) saying so: only the TCP header is short.
fn truncated_tcp(packet: &Packet, l4_len: usize) -> Vec<u8> {
    let mut frame = packet.frame();
    frame.truncate(ETH_LEN + IPV4_LEN + l4_len);
    let total = u16::try_from(IPV4_LEN + l4_len).expect("fits");
    frame[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&total.to_be_bytes());
    frame[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&[0, 0]);
    let check = internet_checksum(&[&frame[ETH_LEN..ETH_LEN + IPV4_LEN]]);
    frame[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&check.to_be_bytes());
    frame
}

/// A table with room for `entries` entries holds the first flow; a second flow (to another
/// server, so ports are not the limit) is refused; the first flow's next packet still goes out
/// translated.
fn table_full_case(name: &'static str, entries: u32, syn: &Packet, ack: &Packet) -> Case {
    let other = tcp((EP.ip, EP_PORT + 1), (REMOTE2, REMOTE_PORT), TCP_SYN);
    Case::new(
        name,
        LoadSettings {
            conntrack_entries: entries,
            ..nat_one_port()
        },
    )
    .egress(syn, passed(&syn.clone().saddr(HOST).sport(NAT_PORT)))
    .egress(&other, Expect::Dropped(DropReason::ConntrackFull))
    .egress(ack, passed(&ack.clone().saddr(HOST).sport(NAT_PORT)))
    .flow(tcp_flow(
        NatPort::Fixed(NAT_PORT),
        seen(&[syn, ack], 0),
        UNSEEN,
    ))
    .stats(NatStats {
        flows_created: 1,
        table_full: 1,
        ..NatStats::default()
    })
}

// ---------------------------------------------------------------------------------------------
// Running a case.

/// The maps a case inspects.
struct CaseMaps {
    maps: Maps,
}

fn load_case(case: &Case) -> (Ebpf, CaseMaps) {
    let mut ebpf = datapath::load(None, &case.settings)
        .unwrap_or_else(|e| panic!("case {}: load the embedded eBPF object: {e}", case.name));
    let maps =
        Maps::take(&mut ebpf).unwrap_or_else(|e| panic!("case {}: take the maps: {e}", case.name));
    (ebpf, CaseMaps { maps })
}

/// What happened to one step's input.
enum Outcome {
    Ran { verdict: u32, output: Vec<u8> },
    Refused { errno: Option<i32>, message: String },
}

fn run_step(ebpf: &mut Ebpf, case: &str, step: &Step) -> Outcome {
    let program = datapath::program(ebpf, step.program)
        .unwrap_or_else(|e| panic!("case {case}: find program {}: {e}", step.program));
    // Room for growth: a length change shows as an output difference, not as ENOSPC.
    let mut data_out = vec![0u8; step.input.len() + 256];
    // Without a context the packet is on the loopback already.
    let ctx = (step.ifindex != TEST_RUN_IFINDEX).then(|| skb_context(step.ifindex));
    match program.test_run(TestRunOptions {
        data_in: Some(&step.input),
        data_out: Some(&mut data_out),
        ctx_in: ctx.as_deref(),
        ..TestRunOptions::default()
    }) {
        Ok(result) => {
            data_out.truncate(usize::try_from(result.data_size_out).expect("u32 fits in usize"));
            Outcome::Ran {
                verdict: result.return_value,
                output: data_out,
            }
        }
        Err(ProgramError::SyscallError(e)) => Outcome::Refused {
            errno: e.io_error.raw_os_error(),
            message: format!("{e}: {}", e.io_error),
        },
        Err(e) => panic!("case {case}: BPF_PROG_TEST_RUN of {}: {e}", step.program),
    }
}

/// Counters as the steps that ran imply them: (ifindex, reason) -> (packets, bytes) and
/// ifindex -> (packets, bytes) to and from each endpoint.
#[derive(Debug, Default, PartialEq, Eq)]
struct Counters {
    drops: BTreeMap<(u32, u32), (u64, u64)>,
    to_endpoint: BTreeMap<u32, (u64, u64)>,
    /// Counted by `tc_from_endpoint` for every packet it does not drop; the uplink and loopback
    /// programs count none.
    from_endpoint: BTreeMap<u32, (u64, u64)>,
}

impl Counters {
    fn read(maps: &Maps) -> Result<Self, Box<dyn std::error::Error>> {
        let mut counters = Self::default();
        for entry in maps.drops.iter() {
            let (key, per_cpu) = entry?;
            let sum = per_cpu
                .iter()
                .fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes));
            if sum != (0, 0) {
                counters.drops.insert((key.ifindex, key.reason), sum);
            }
        }
        for (ifindex, c) in maps.traffic_by_veth()? {
            let to = (c.to_endpoint_packets, c.to_endpoint_bytes);
            let from = (c.from_endpoint_packets, c.from_endpoint_bytes);
            if to != (0, 0) {
                counters.to_endpoint.insert(ifindex, to);
            }
            if from != (0, 0) {
                counters.from_endpoint.insert(ifindex, from);
            }
        }
        Ok(counters)
    }

    fn describe(&self) -> String {
        let mut text = String::new();
        if *self == Self::default() {
            text.push_str("      (nothing counted)\n");
        }
        for ((ifindex, reason), (p, b)) in &self.drops {
            let _ = writeln!(
                text,
                "      drop ifindex {ifindex} reason {}: {p}p/{b}B",
                datapath::drop_reason_name(*reason)
            );
        }
        for (ifindex, (p, b)) in &self.to_endpoint {
            let _ = writeln!(text, "      to_endpoint ifindex {ifindex}: {p}p/{b}B");
        }
        for (ifindex, (p, b)) in &self.from_endpoint {
            let _ = writeln!(text, "      from_endpoint ifindex {ifindex}: {p}p/{b}B");
        }
        text
    }
}

fn read_nat_stats(map: &PerCpuArray<MapData, u64>) -> Result<NatStats, MapError> {
    let sum = |index: u32| -> Result<u64, MapError> { Ok(map.get(&index, 0)?.iter().sum()) };
    Ok(NatStats {
        flows_created: sum(nat_stat::FLOWS_CREATED)?,
        port_retries: sum(nat_stat::PORT_RETRIES)?,
        ports_exhausted: sum(nat_stat::PORTS_EXHAUSTED)?,
        table_full: sum(nat_stat::TABLE_FULL)?,
        published_flows: sum(nat_stat::PUBLISHED_FLOWS)?,
    })
}

/// CLOCK_MONOTONIC_COARSE in ns: the clock `bpf_ktime_get_coarse_ns` reads, which the programs
/// stamp flows with.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC_COARSE)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Runs every step and compares everything: notes on how it went (steps the kernel refused),
/// or the failure report.
fn run_case(case: &Case) -> Result<Vec<String>, String> {
    let (mut ebpf, mut maps) = load_case(case);
    for endpoint in ENDPOINTS {
        maps.maps
            .upsert_endpoint(endpoint.ip, endpoint.info())
            .unwrap_or_else(|e| panic!("case {}: insert endpoint {}: {e}", case.name, endpoint.ip));
    }
    for entry in &case.published {
        maps.maps
            .publish(entry)
            .unwrap_or_else(|e| panic!("case {}: publish {entry:?}: {e}", case.name));
    }
    let mut problems = Vec::new();
    let mut want_counters = Counters::default();
    let mut learned_port: Option<u16> = None;
    let mut notes = Vec::new();
    let started_ns = monotonic_ns();
    for (index, step) in case.steps.iter().enumerate() {
        for (_, key) in case.removals.iter().filter(|(at, _)| *at == index) {
            maps.maps.conntrack_remove(std::slice::from_ref(key));
        }
        let outcome = run_step(&mut ebpf, case.name, step);
        if let Outcome::Refused { message, .. } = &outcome {
            notes.push(format!(
                "step {} refused by BPF_PROG_TEST_RUN: {message}",
                index + 1
            ));
        }
        let step_problems = check_step(step, &outcome, &mut learned_port, &mut want_counters);
        if !step_problems.is_empty() {
            let mut report = format!(
                "step {} ({}) input:\n{}",
                index + 1,
                step.program,
                describe_frame(&step.input)
            );
            for problem in step_problems {
                let _ = writeln!(report, "    {problem}");
            }
            problems.push(report);
        }
    }
    let finished_ns = monotonic_ns();

    // CONNTRACK: exactly the expected entries.
    let host = case.settings.host_ipv4.unwrap_or(Ipv4Addr::UNSPECIFIED);
    let mut want_entries = Vec::new();
    for flow in &case.flows {
        let flow = match flow {
            ExpectedFlow::Published(flow) => {
                want_entries.extend(flow.entries());
                continue;
            }
            ExpectedFlow::Masquerade(flow) => flow,
        };
        let port = match (flow.nat_port, learned_port) {
            (NatPort::Fixed(port), _) | (NatPort::Learned, Some(port)) => port,
            (NatPort::Learned, None) => {
                problems.push("no step learned the NAT port the flows refer to".to_owned());
                continue;
            }
        };
        want_entries.extend(flow.entries(host, port));
    }
    let actual_entries: Vec<(CtKey, CtEntry)> = maps
        .maps
        .conntrack
        .iter()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("case {}: read CONNTRACK: {e}", case.name));
    let ct_problems = compare_conntrack(&want_entries, &actual_entries, started_ns, finished_ns);
    if !ct_problems.is_empty() {
        let mut report = String::from("CONNTRACK differs:\n");
        for p in ct_problems {
            let _ = writeln!(report, "    {p}");
        }
        let _ = write!(
            report,
            "  expected:\n{}  actual:\n{}",
            describe_entries(&want_entries),
            describe_entries(&actual_entries)
        );
        problems.push(report);
    }

    let stats = read_nat_stats(&maps.maps.nat_stats)
        .unwrap_or_else(|e| panic!("case {}: read NAT_STATS: {e}", case.name));
    if stats != case.nat_stats {
        problems.push(format!(
            "NAT_STATS differ: expected {:?}, got {stats:?}",
            case.nat_stats
        ));
    }
    let counters = Counters::read(&maps.maps)
        .unwrap_or_else(|e| panic!("case {}: read the counter maps: {e}", case.name));
    if counters != want_counters {
        problems.push(format!(
            "counters differ\n  expected:\n{}  actual:\n{}",
            want_counters.describe(),
            counters.describe()
        ));
    }

    if problems.is_empty() {
        return Ok(notes);
    }
    let mut report = format!("case {} FAILED ({:?})\n", case.name, case.settings);
    for p in problems.into_iter().chain(notes) {
        let _ = writeln!(report, "  {p}");
    }
    Err(report)
}

/// One packet of `len` bytes more under `key`.
fn count_packet<K: Ord>(counters: &mut BTreeMap<K, (u64, u64)>, key: K, len: u64) {
    let count = counters.entry(key).or_default();
    count.0 += 1;
    count.1 += len;
}

/// Compares one step's outcome with its expectation, adding the counts it implies.
fn check_step(
    step: &Step,
    outcome: &Outcome,
    learned_port: &mut Option<u16>,
    counters: &mut Counters,
) -> Vec<String> {
    let mut problems = Vec::new();
    let (verdict, output) = match outcome {
        Outcome::Ran { verdict, output } => (*verdict, output),
        Outcome::Refused { errno, message } => {
            match &step.expect {
                Expect::DroppedUnlessRefused { errno: want, .. } if *errno == Some(*want) => {}
                _ => problems.push(format!("BPF_PROG_TEST_RUN refused the input: {message}")),
            }
            return problems;
        }
    };
    let len = step.input.len() as u64;
    let (want_verdict, frame) = match &step.expect {
        Expect::Passed(frame) => (TC_ACT_OK, Some(frame)),
        Expect::Redirected { ifindex, frame } => {
            count_packet(&mut counters.to_endpoint, *ifindex, len);
            (TC_ACT_REDIRECT, Some(frame))
        }
        Expect::ToHost(frame) | Expect::RoutedOut(frame) => (TC_ACT_REDIRECT, Some(frame)),
        Expect::Dropped(reason) | Expect::DroppedUnlessRefused { reason, .. } => {
            count_packet(&mut counters.drops, (step.ifindex, *reason as u32), len);
            (TC_ACT_SHOT, None)
        }
    };
    if step.program == program_names::TC_FROM_ENDPOINT && want_verdict != TC_ACT_SHOT {
        count_packet(&mut counters.from_endpoint, step.ifindex, len);
    }
    if verdict != want_verdict {
        problems.push(format!(
            "verdict: expected {}, got {}",
            verdict_name(want_verdict),
            verdict_name(verdict)
        ));
    }
    let want_output = match frame {
        None => None,
        Some(Frame::Unchanged) => Some(step.input.clone()),
        Some(Frame::Exact(bytes)) => Some(bytes.clone()),
        Some(Frame::LearnPort {
            offset,
            range,
            build,
        }) => match output.get(*offset..*offset + 2) {
            Some(bytes) => {
                let port = u16::from_be_bytes([bytes[0], bytes[1]]);
                if !(range.0..=range.1).contains(&port) {
                    problems.push(format!(
                        "translated source port {port} is outside the NAT range {}-{}",
                        range.0, range.1
                    ));
                }
                *learned_port = Some(port);
                Some(build(port))
            }
            None => {
                problems.push(format!(
                    "output of {} bytes has no source port at offset {offset}",
                    output.len()
                ));
                None
            }
        },
        Some(Frame::WithLearnedPort(build)) => match learned_port {
            Some(port) => Some(build(*port)),
            None => {
                problems.push("no earlier step learned the NAT port".to_owned());
                None
            }
        },
    };
    if let Some(want) = want_output
        && *output != want
    {
        problems.push(format!(
            "output frame differs{}\n    expected:\n{}    actual:\n{}",
            first_difference(&want, output),
            describe_frame(&want),
            describe_frame(output)
        ));
    }
    problems
}

/// Every difference between the expected and the actual CONNTRACK entries. `last_seen_ns` must
/// be a reading of the monotonic clock taken while the case ran.
fn compare_conntrack(
    want: &[(CtKey, CtEntry)],
    actual: &[(CtKey, CtEntry)],
    started_ns: u64,
    finished_ns: u64,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (key, want_entry) in want {
        match actual.iter().find(|(k, _)| k == key) {
            None => problems.push(format!("missing {}", describe_key(key))),
            Some((_, entry)) => {
                let comparable = CtEntry {
                    last_seen_ns: 0,
                    ..*entry
                };
                if comparable != *want_entry {
                    problems.push(format!(
                        "{}: expected {}, got {}",
                        describe_key(key),
                        describe_entry(want_entry),
                        describe_entry(entry)
                    ));
                }
                if !(started_ns..=finished_ns).contains(&entry.last_seen_ns) {
                    problems.push(format!(
                        "{}: last_seen_ns {} is not within the run ({started_ns}..={finished_ns})",
                        describe_key(key),
                        entry.last_seen_ns
                    ));
                }
            }
        }
    }
    for (key, entry) in actual {
        if !want.iter().any(|(k, _)| k == key) {
            problems.push(format!(
                "unexpected {} => {}",
                describe_key(key),
                describe_entry(entry)
            ));
        }
    }
    problems
}

fn describe_key(key: &CtKey) -> String {
    format!(
        "key {{{} {}:{} -> {}:{}{}}}",
        proto_name(key.proto),
        Ipv4Addr::from(key.saddr),
        u16::from_be_bytes(key.sport),
        Ipv4Addr::from(key.daddr),
        u16::from_be_bytes(key.dport),
        if key._pad == [0; 3] {
            String::new()
        } else {
            format!(" pad {:?}", key._pad)
        }
    )
}

fn describe_entry(entry: &CtEntry) -> String {
    format!(
        "{{{} kind {} flags {:#04x} to {}:{} -> {}:{} ifindex {} state {:#04x} {}p/{}B pad {}}}",
        match entry.direction {
            CT_DIR_ORIGINAL => "original".to_owned(),
            CT_DIR_REPLY => "reply".to_owned(),
            other => format!("direction {other}"),
        },
        entry.kind,
        entry.flags,
        Ipv4Addr::from(entry.new_saddr),
        u16::from_be_bytes(entry.new_sport),
        Ipv4Addr::from(entry.new_daddr),
        u16::from_be_bytes(entry.new_dport),
        entry.ifindex,
        entry.state,
        entry.packets,
        entry.bytes,
        entry._pad,
    )
}

fn describe_entries(entries: &[(CtKey, CtEntry)]) -> String {
    if entries.is_empty() {
        return "      (empty)\n".to_owned();
    }
    entries
        .iter()
        .map(|(k, e)| format!("      {} => {}\n", describe_key(k), describe_entry(e)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Decoding frames for failure reports.

fn proto_name(proto: u8) -> String {
    match proto {
        IPPROTO_ICMP => "icmp".to_owned(),
        IPPROTO_TCP => "tcp".to_owned(),
        IPPROTO_UDP => "udp".to_owned(),
        other => format!("proto {other}"),
    }
}

fn addr_at(bytes: &[u8], offset: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        bytes[offset],
        bytes[offset + 1],
        bytes[offset + 2],
        bytes[offset + 3],
    )
}

fn valid(checksum_of_covered_bytes: u16) -> &'static str {
    if checksum_of_covered_bytes == 0 {
        "valid"
    } else {
        "INVALID"
    }
}

/// Decodes an IPv4 packet (or the quoted start of one) into `text`, one header a line.
fn describe_ipv4(text: &mut String, ip: &[u8], indent: &str, quoted: bool) {
    if ip.len() < IPV4_LEN {
        let _ = writeln!(text, "{indent}truncated IPv4: {} bytes", ip.len());
        return;
    }
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    let (src, dst, proto) = (addr_at(ip, 12), addr_at(ip, 16), ip[9]);
    let header_ok = ip
        .get(..header_len.max(IPV4_LEN))
        .map_or("TRUNCATED", |h| valid(internet_checksum(&[h])));
    let _ = writeln!(
        text,
        "{indent}ipv4 {src} -> {dst} {} ihl {} len {} frag {frag:#06x} ttl {} checksum {:#06x} ({header_ok})",
        proto_name(proto),
        header_len / 4,
        u16::from_be_bytes([ip[2], ip[3]]),
        ip[8],
        u16::from_be_bytes([ip[10], ip[11]]),
    );
    let Some(l4) = ip.get(header_len..) else {
        return;
    };
    if frag & 0x1fff != 0 {
        let _ = writeln!(text, "{indent}  (non-first fragment: {} bytes)", l4.len());
        return;
    }
    match proto {
        IPPROTO_TCP if l4.len() >= 20 || (quoted && l4.len() >= 8) => {
            let mut line = format!(
                "{indent}  tcp {}:{} -> {}:{}",
                src,
                u16::from_be_bytes([l4[0], l4[1]]),
                dst,
                u16::from_be_bytes([l4[2], l4[3]])
            );
            if l4.len() >= 20 {
                let _ = write!(
                    line,
                    " flags {:#04x} checksum {:#06x} ({})",
                    l4[13],
                    u16::from_be_bytes([l4[16], l4[17]]),
                    if quoted {
                        "quoted"
                    } else {
                        valid(l4_checksum(src, dst, IPPROTO_TCP, l4))
                    }
                );
            }
            let _ = writeln!(text, "{line}");
        }
        IPPROTO_UDP if l4.len() >= 8 => {
            let check = u16::from_be_bytes([l4[6], l4[7]]);
            let state = if check == 0 {
                "none"
            } else if quoted {
                "quoted"
            } else {
                valid(l4_checksum(src, dst, IPPROTO_UDP, l4))
            };
            let _ = writeln!(
                text,
                "{indent}  udp {}:{} -> {}:{} checksum {check:#06x} ({state})",
                src,
                u16::from_be_bytes([l4[0], l4[1]]),
                dst,
                u16::from_be_bytes([l4[2], l4[3]]),
            );
        }
        IPPROTO_ICMP if l4.len() >= 8 => {
            let _ = writeln!(
                text,
                "{indent}  icmp type {} code {} checksum {:#06x} ({}) word {:02x}{:02x}{:02x}{:02x}{}",
                l4[0],
                l4[1],
                u16::from_be_bytes([l4[2], l4[3]]),
                if quoted {
                    "quoted"
                } else {
                    valid(internet_checksum(&[l4]))
                },
                l4[4],
                l4[5],
                l4[6],
                l4[7],
                if matches!(l4[0], ICMP_ECHO_REQUEST | ICMP_ECHO_REPLY) {
                    format!(" (echo id {})", u16::from_be_bytes([l4[4], l4[5]]))
                } else {
                    String::new()
                }
            );
            if !quoted
                && matches!(
                    l4[0],
                    ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAM_PROBLEM
                )
            {
                let _ = writeln!(text, "{indent}  quoting:");
                describe_ipv4(text, &l4[8..], &format!("{indent}    "), true);
            }
        }
        _ => {
            let _ = writeln!(
                text,
                "{indent}  {} bytes of {}",
                l4.len(),
                proto_name(proto)
            );
        }
    }
}

/// The frame's headers, decoded as far as its length allows, then a hex dump.
fn describe_frame(frame: &[u8]) -> String {
    let mut text = String::new();
    if frame.len() < ETH_LEN {
        let _ = writeln!(
            text,
            "      {} bytes: shorter than an Ethernet header",
            frame.len()
        );
    } else {
        let ether_type = u16::from_be_bytes([frame[12], frame[13]]);
        let _ = writeln!(
            text,
            "      {} bytes, eth dst {} src {} type {ether_type:#06x}",
            frame.len(),
            mac_text(&frame[0..6]),
            mac_text(&frame[6..12]),
        );
        if ether_type == ETH_P_IP {
            describe_ipv4(&mut text, &frame[ETH_LEN..], "      ", false);
        }
    }
    for (line, chunk) in frame.chunks(16).enumerate() {
        let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
        let _ = writeln!(text, "      {:04x}  {}", line * 16, hex.join(" "));
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
    let offsets: Vec<String> = expected
        .iter()
        .zip(actual)
        .enumerate()
        .filter(|(_, (e, a))| e != a)
        .map(|(offset, _)| format!("{offset:#06x}"))
        .collect();
    format!(" (at bytes {})", offsets.join(" "))
}

fn running_as_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

#[test]
fn nat_program_fixtures() {
    if !running_as_root() {
        eprintln!(
            "SKIPPED nat_program_fixtures: BPF_PROG_TEST_RUN needs root (CAP_BPF and \
             CAP_NET_ADMIN); CI runs this as root"
        );
        return;
    }
    // `tc_from_endpoint` steps name their sender's host veth (see `skb_context`).
    let mut veths: Vec<u32> = ENDPOINTS.iter().map(|e| e.ifindex).collect();
    veths.push(UPLINK_IFINDEX);
    let (failures, total) = in_private_netns_with_veths(&veths, || {
        add_uplink();
        let cases = cases();
        let mut failures = Vec::new();
        for case in &cases {
            match run_case(case) {
                Err(report) => failures.push(report),
                Ok(notes) if notes.is_empty() => eprintln!("ok   {}", case.name),
                Ok(notes) => eprintln!("ok   {} ({})", case.name, notes.join("; ")),
            }
        }
        (failures, cases.len())
    });
    assert!(
        failures.is_empty(),
        "{} of {} NAT fixtures failed:\n\n{}",
        failures.len(),
        total,
        failures.join("\n")
    );
}

/// The collector's removal of an expired entry: an entry the data plane changed after the
/// collector read it (a new connection on the tuple, its port taken over) stays as it is now.
#[test]
fn the_collector_removes_only_entries_still_as_read() {
    if !running_as_root() {
        eprintln!("SKIPPED the_collector_removes_only_entries_still_as_read: needs root");
        return;
    }
    let mut ebpf = datapath::load(None, &nat_one_port()).expect("load the eBPF object");
    let mut maps = Maps::take(&mut ebpf).expect("take the maps");
    let key = masquerade_reply_key(NAT_PORT);
    let read = CtEntry {
        last_seen_ns: 1,
        packets: 3,
        bytes: 180,
        new_saddr: EP.ip.octets(),
        new_daddr: REMOTE.octets(),
        new_sport: EP_PORT.to_be_bytes(),
        new_dport: REMOTE_PORT.to_be_bytes(),
        direction: CT_DIR_REPLY,
        state: CT_STATE_FIN_ORIGINAL | CT_STATE_FIN_REPLY,
        kind: CT_KIND_MASQUERADE,
        flags: 0,
        ifindex: EP.ifindex,
        _pad: 0,
    };
    // Taken up again since it was read: one more packet, the state started over.
    let now = CtEntry {
        last_seen_ns: 2,
        packets: 4,
        state: 0,
        ..read
    };
    maps.conntrack.insert(key, now, 0).expect("insert");
    assert!(!maps.conntrack_remove_unchanged(key, read));
    assert_eq!(
        maps.conntrack.get(&key, 0).ok(),
        Some(now),
        "kept, as it is now"
    );
    assert!(maps.conntrack_remove_unchanged(key, now));
    assert!(maps.conntrack.get(&key, 0).is_err(), "removed");
    assert!(!maps.conntrack_remove_unchanged(key, now), "gone already");
}

/// The builders themselves: a wrong checksum helper would make every fixture lie.
#[test]
fn frame_builders_produce_valid_checksums() {
    let syn = tcp((EP.ip, EP_PORT), (REMOTE, REMOTE_PORT), TCP_SYN);
    let ip = syn.ip_bytes();
    assert_eq!(internet_checksum(&[&ip[..IPV4_LEN]]), 0, "IPv4 header");
    assert_eq!(
        l4_checksum(EP.ip, REMOTE, IPPROTO_TCP, &ip[IPV4_LEN..]),
        0,
        "TCP over the pseudo-header"
    );
    let mut with_options = syn.clone();
    with_options.options = vec![0x94, 0x04, 0, 0];
    let ip = with_options.ip_bytes();
    assert_eq!(ip[0], 0x46, "IHL 6");
    assert_eq!(
        internet_checksum(&[&ip[..24]]),
        0,
        "IPv4 header with options"
    );
    assert_eq!(
        l4_checksum(EP.ip, REMOTE, IPPROTO_TCP, &ip[24..]),
        0,
        "TCP after options"
    );
    let ip = udp((EP.ip, 5000), (REMOTE, 53), true).ip_bytes();
    assert_eq!(
        l4_checksum(EP.ip, REMOTE, IPPROTO_UDP, &ip[IPV4_LEN..]),
        0,
        "UDP with an odd-length payload"
    );
    let ip = udp((EP.ip, 5000), (REMOTE, 53), false).ip_bytes();
    assert_eq!(
        &ip[IPV4_LEN + 6..IPV4_LEN + 8],
        &[0, 0],
        "UDP without checksum"
    );
    let ip = echo(ICMP_ECHO_REQUEST, EP.ip, REMOTE, EP_ECHO_ID).ip_bytes();
    assert_eq!(internet_checksum(&[&ip[IPV4_LEN..]]), 0, "ICMP echo");
    let error = icmp_error(
        ROUTER,
        HOST,
        ICMP_DEST_UNREACH,
        ICMP_FRAG_NEEDED,
        syn.quote(),
    );
    let ip = error.ip_bytes();
    assert_eq!(
        ip.len(),
        IPV4_LEN + 8 + IPV4_LEN + 8,
        "ICMP error quoting header + 8"
    );
    assert_eq!(internet_checksum(&[&ip[IPV4_LEN..]]), 0, "ICMP error");
    assert_eq!(
        internet_checksum(&[&ip[IPV4_LEN + 8..IPV4_LEN + 8 + IPV4_LEN]]),
        0,
        "quoted IPv4 header"
    );
    let zero_sum = udp_zero_sum_after_translation(
        Tuple::new((EP.ip, 5000), (REMOTE, 53)),
        Tuple::new((HOST, NAT_PORT), (REMOTE, 53)),
    );
    let translated = zero_sum.clone().saddr(HOST).sport(NAT_PORT).ip_bytes();
    assert_eq!(
        &translated[IPV4_LEN + 6..IPV4_LEN + 8],
        &[0xff, 0xff],
        "a UDP checksum computing to zero is sent as all ones"
    );
    assert_ne!(
        &zero_sum.ip_bytes()[IPV4_LEN + 6..IPV4_LEN + 8],
        &[0xff, 0xff],
        "only the translated datagram sums to zero"
    );
    // The example from RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
    assert_eq!(
        internet_checksum(&[&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]]),
        !0xddf2
    );
}
