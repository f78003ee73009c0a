//! The NAT paths: published ports (DNAT at the uplink's ingress, the reply's reverse translation
//! at its egress, hairpin at an endpoint, the host's own connections at its loopback),
//! masquerade (at the uplink's egress, replies at its ingress), the packets the uplink programs
//! leave to the host, and the drops only they make.
//!
//! The maps hold [`PUBLISHED_PORT`] on every host address and [`ALLOW_LISTED_PORT`] with an
//! allow list, both to B:80, as `--publish 8080:80` and `--publish 8081:80 --allow
//! 203.0.113.0/24` would.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context as _, Result};
use net_ebpf_common::{DropReason, PUBLISH_F_ALLOW_LIST, PublishKey, PublishTarget, program_names};

use super::{
    Before, Case, Counted, Maps, Packet, Program, TC_ACT_OK, TC_ACT_REDIRECT,
    frames::{
        A, ALLOW_LISTED_PORT, B, CLIENT_PORT, HOST_IP, LOOPBACK_MAC, NAT_PORT, OUTSIDE_IP,
        PUBLISHED_PORT, ROUTED_PORT, ROUTER_MAC, SERVER_PORT, TCP_ACK, TCP_SYN, TEST_RUN_IFINDEX,
        UNKNOWN_IP, UPLINK_MAC, ct_key, first_fragment, forwarded, published, published_to,
        tcp_segment, with_protocol, with_ttl,
    },
};
use crate::bench::report::ScaleQuantity;

const FROM_NETDEV: Program = Program::Named(program_names::TC_FROM_NETDEV);
const TO_NETDEV: Program = Program::Named(program_names::TC_TO_NETDEV);
const FROM_ENDPOINT: Program = Program::Named(program_names::TC_FROM_ENDPOINT);
const FROM_HOST: Program = Program::Named(program_names::TC_FROM_HOST);

/// Frames arriving through the uplink, and leaving through it.
const INBOUND: ([u8; 6], [u8; 6]) = (ROUTER_MAC, UPLINK_MAC);
const OUTBOUND: ([u8; 6], [u8; 6]) = (UPLINK_MAC, ROUTER_MAC);
/// Frames delivered into B and A (as `deliver::to_endpoint` rewrites them).
const INTO_B: ([u8; 6], [u8; 6]) = (B.host_mac, B.mac);
const INTO_A: ([u8; 6], [u8; 6]) = (A.host_mac, A.mac);

/// The allow list of [`ALLOW_LISTED_PORT`]: the outside client is not on it.
const ALLOWED: (Ipv4Addr, u8) = (Ipv4Addr::new(203, 0, 113, 0), 24);
const ALLOW_LISTED_ID: u32 = 2;
const ROUTED_ID: u32 = 3;

/// Published on every host address to an address no endpoint holds: a stale entry. The agent
/// never leaves one (it removes a port before its endpoint), but the data plane must not make
/// a flow for it.
const STALE_PORT: u16 = 8083;
const STALE_ID: u32 = 4;

/// IP protocol 47, GRE: no ports, so nothing masquerade could translate.
const IPPROTO_GRE: u8 = 47;

fn stale() -> (PublishKey, PublishTarget) {
    let (key, mut target) = published(STALE_PORT, STALE_ID, 0);
    target.addr = UNKNOWN_IP.octets();
    (key, target)
}

/// Installs the published ports every NAT path expects.
pub(super) fn publish(maps: &mut Maps) -> Result<()> {
    for (key, target) in [
        published(PUBLISHED_PORT, 1, 0),
        published(ALLOW_LISTED_PORT, ALLOW_LISTED_ID, PUBLISH_F_ALLOW_LIST),
        published_to(&A, Ipv4Addr::UNSPECIFIED, ROUTED_PORT, ROUTED_ID, 0),
        stale(),
    ] {
        maps.published
            .insert(key, target, 0)
            .context("filling PUBLISHED")?;
    }
    maps.allow(ALLOW_LISTED_ID, ALLOWED)
}

/// Removes [`ALLOW_LISTED_PORT`], [`ROUTED_PORT`] and [`STALE_PORT`]: the scale rows count
/// every published port in the map.
pub(super) fn unpublish_extras(maps: &mut Maps) -> Result<()> {
    for (key, _) in [
        published(ALLOW_LISTED_PORT, ALLOW_LISTED_ID, PUBLISH_F_ALLOW_LIST),
        published_to(&A, Ipv4Addr::UNSPECIFIED, ROUTED_PORT, ROUTED_ID, 0),
        stale(),
    ] {
        maps.published
            .remove(&key)
            .context("removing the extra ports from PUBLISHED")?;
    }
    Ok(())
}

/// Addresses of the flows.
struct Flows {
    /// The outside client, and the published port it connects to.
    client: SocketAddrV4,
    published: SocketAddrV4,
    /// The endpoint behind the published port.
    web: SocketAddrV4,
    /// The port published to A, and A behind it.
    routed: SocketAddrV4,
    routed_web: SocketAddrV4,
    /// A connecting endpoint as B sees it after hairpin translation: from its gateway.
    via_gateway: SocketAddrV4,
    /// A, connecting out, the server it connects to, and A as the server sees it.
    app: SocketAddrV4,
    server: SocketAddrV4,
    masqueraded: SocketAddrV4,
}

const FLOWS: Flows = Flows {
    client: SocketAddrV4::new(OUTSIDE_IP, CLIENT_PORT),
    published: SocketAddrV4::new(HOST_IP, PUBLISHED_PORT),
    web: SocketAddrV4::new(B.ip, SERVER_PORT),
    routed: SocketAddrV4::new(HOST_IP, ROUTED_PORT),
    routed_web: SocketAddrV4::new(A.ip, SERVER_PORT),
    via_gateway: SocketAddrV4::new(B.gateway, CLIENT_PORT),
    app: SocketAddrV4::new(A.ip, CLIENT_PORT),
    server: SocketAddrV4::new(OUTSIDE_IP, SERVER_PORT),
    masqueraded: SocketAddrV4::new(HOST_IP, NAT_PORT),
};

/// A SYN from the outside client to the published port, at the uplink.
fn dnat_syn() -> Vec<u8> {
    tcp_segment(INBOUND, FLOWS.client, FLOWS.published, TCP_SYN)
}

/// A SYN from the outside client to the port published to A, at the uplink.
fn routed_syn() -> Vec<u8> {
    tcp_segment(INBOUND, FLOWS.client, FLOWS.routed, TCP_SYN)
}

/// An endpoint's SYN to the outside server as it leaves the uplink.
fn masquerade_syn(from: SocketAddrV4) -> Vec<u8> {
    tcp_segment(OUTBOUND, from, FLOWS.server, TCP_SYN)
}

fn prepared_by(program: Program, frame: Vec<u8>, verdict: u32) -> Before {
    Before {
        packets: vec![Packet {
            program,
            frame,
            verdict,
        }],
        full_conntrack: false,
    }
}

/// The first packet of a connection to the published port from outside: looked up, allowed,
/// recorded (two entries), rewritten and delivered. Each call is a first packet.
fn dnat_first() -> Case {
    let f = &FLOWS;
    Case {
        creates: vec![ct_key(f.client, f.published), ct_key(f.web, f.client)],
        ..Case::plain(
            "dnat_first",
            "DNAT, first packet: SYN from outside to a published port (port looked up, flow \
             created, rewritten, bpf_redirect_peer; the flow removed between calls)",
            FROM_NETDEV,
            dnat_syn(),
            TC_ACT_REDIRECT,
            Some(forwarded(&tcp_segment(INTO_B, f.client, f.web, TCP_SYN))),
            Counted::Traffic {
                from: &[],
                to: &[B.ifindex],
            },
        )
    }
}

/// A packet of an established connection to the published port.
fn dnat_established() -> Case {
    let f = &FLOWS;
    Case {
        before: prepared_by(FROM_NETDEV, dnat_syn(), TC_ACT_REDIRECT),
        ..Case::plain(
            "dnat_established",
            "DNAT, established: a packet of a flow to a published port (flow found, rewritten, \
             bpf_redirect_peer)",
            FROM_NETDEV,
            tcp_segment(INBOUND, f.client, f.published, TCP_ACK),
            TC_ACT_REDIRECT,
            Some(forwarded(&tcp_segment(INTO_B, f.client, f.web, TCP_ACK))),
            Counted::Traffic {
                from: &[],
                to: &[B.ifindex],
            },
        )
    }
}

/// The two DNAT paths the scale rows repeat with many published ports.
pub(super) fn scale_cases() -> Vec<(ScaleQuantity, Case)> {
    vec![
        (ScaleQuantity::FirstPacketNs, dnat_first()),
        (ScaleQuantity::EstablishedNs, dnat_established()),
    ]
}

pub(super) fn cases() -> Vec<Case> {
    let f = &FLOWS;
    let loopback = SocketAddrV4::new(Ipv4Addr::LOCALHOST, CLIENT_PORT);
    let loopback_published = SocketAddrV4::new(Ipv4Addr::LOCALHOST, PUBLISHED_PORT);
    let to_web = Counted::Traffic {
        from: &[],
        to: &[B.ifindex],
    };
    let host_port = SocketAddrV4::new(HOST_IP, 22);
    let host_client = SocketAddrV4::new(HOST_IP, CLIENT_PORT);
    let to_host_port = tcp_segment(INBOUND, f.client, host_port, TCP_SYN);
    let from_host = tcp_segment(OUTBOUND, host_client, f.server, TCP_SYN);
    let masquerade_flow = vec![ct_key(f.app, f.server), ct_key(f.server, f.masqueraded)];
    let masqueraded_by_syn = || prepared_by(TO_NETDEV, masquerade_syn(f.app), TC_ACT_OK);
    vec![
        dnat_first(),
        dnat_established(),
        Case {
            before: prepared_by(FROM_NETDEV, dnat_syn(), TC_ACT_REDIRECT),
            ..Case::plain(
                "dnat_reply",
                "reverse DNAT: a reply from a published port leaving the uplink (source back to \
                 the host's address and port)",
                TO_NETDEV,
                tcp_segment(OUTBOUND, f.web, f.client, TCP_ACK),
                TC_ACT_OK,
                Some(tcp_segment(OUTBOUND, f.published, f.client, TCP_ACK)),
                Counted::Nothing,
            )
        },
        Case {
            before: prepared_by(FROM_NETDEV, routed_syn(), TC_ACT_REDIRECT),
            ..Case::plain(
                "dnat_reply_routed",
                "reverse DNAT at the endpoint: a reply from a published port, translated and \
                 routed out of the uplink (bpf_fib_lookup, TTL one less, bpf_redirect_neigh)",
                FROM_ENDPOINT,
                tcp_segment((A.mac, A.host_mac), f.routed_web, f.client, TCP_ACK),
                TC_ACT_REDIRECT,
                Some(forwarded(&tcp_segment(
                    (A.mac, A.host_mac),
                    f.routed,
                    f.client,
                    TCP_ACK,
                ))),
                Counted::Traffic {
                    from: &[TEST_RUN_IFINDEX],
                    to: &[],
                },
            )
        },
        Case {
            creates: vec![ct_key(f.app, f.published), ct_key(f.web, f.via_gateway)],
            ..Case::plain(
                "hairpin_first",
                "hairpin, first packet: an endpoint to a published port of its host (flow \
                 created, both addresses rewritten, bpf_redirect_peer)",
                FROM_ENDPOINT,
                tcp_segment((A.mac, A.host_mac), f.app, f.published, TCP_SYN),
                TC_ACT_REDIRECT,
                Some(forwarded(&tcp_segment(
                    INTO_B,
                    f.via_gateway,
                    f.web,
                    TCP_SYN,
                ))),
                Counted::Traffic {
                    from: &[TEST_RUN_IFINDEX],
                    to: &[B.ifindex],
                },
            )
        },
        Case {
            creates: vec![
                ct_key(loopback, loopback_published),
                ct_key(f.web, f.via_gateway),
            ],
            ..Case::plain(
                "host_first",
                "the host to a published port over its loopback, first packet (flow created, \
                 bpf_redirect_peer)",
                FROM_HOST,
                tcp_segment(
                    (LOOPBACK_MAC, LOOPBACK_MAC),
                    loopback,
                    loopback_published,
                    TCP_SYN,
                ),
                TC_ACT_REDIRECT,
                Some(tcp_segment(INTO_B, f.via_gateway, f.web, TCP_SYN)),
                to_web,
            )
        },
        Case::plain(
            "uplink_in_host",
            "uplink in: to a host port nobody published (passed to the host)",
            FROM_NETDEV,
            to_host_port.clone(),
            TC_ACT_OK,
            Some(to_host_port),
            Counted::Nothing,
        ),
        Case {
            creates: masquerade_flow,
            ..Case::plain(
                "masquerade_first",
                "masquerade, first packet: an endpoint's SYN leaving the uplink (port chosen, \
                 flow created, rewritten; the flow removed between calls)",
                TO_NETDEV,
                masquerade_syn(f.app),
                TC_ACT_OK,
                Some(tcp_segment(OUTBOUND, f.masqueraded, f.server, TCP_SYN)),
                Counted::Nothing,
            )
        },
        Case {
            before: masqueraded_by_syn(),
            ..Case::plain(
                "masquerade_established",
                "masquerade, established: an endpoint's packet leaving the uplink",
                TO_NETDEV,
                tcp_segment(OUTBOUND, f.app, f.server, TCP_ACK),
                TC_ACT_OK,
                Some(tcp_segment(OUTBOUND, f.masqueraded, f.server, TCP_ACK)),
                Counted::Nothing,
            )
        },
        Case {
            before: masqueraded_by_syn(),
            ..Case::plain(
                "masquerade_reply",
                "reverse masquerade: a reply from outside to an endpoint (rewritten, \
                 bpf_redirect_peer)",
                FROM_NETDEV,
                tcp_segment(INBOUND, f.server, f.masqueraded, TCP_ACK),
                TC_ACT_REDIRECT,
                Some(forwarded(&tcp_segment(INTO_A, f.server, f.app, TCP_ACK))),
                Counted::Traffic {
                    from: &[],
                    to: &[A.ifindex],
                },
            )
        },
        Case::plain(
            "uplink_out_host",
            "uplink out: the host's own traffic (passed)",
            TO_NETDEV,
            from_host.clone(),
            TC_ACT_OK,
            Some(from_host),
            Counted::Nothing,
        ),
        Case::drop(
            "drop_not_allowed",
            "drop: a source outside a published port's allow list",
            FROM_NETDEV,
            tcp_segment(
                INBOUND,
                f.client,
                SocketAddrV4::new(HOST_IP, ALLOW_LISTED_PORT),
                TCP_SYN,
            ),
            DropReason::NotAllowed,
        ),
        Case::drop(
            "drop_ttl_expired",
            "drop: a SYN from outside to a published port with TTL 1 (not forwarded, no flow)",
            FROM_NETDEV,
            with_ttl(&dnat_syn(), 1),
            DropReason::TtlExpired,
        ),
        Case::drop(
            "drop_published_stale",
            "drop: a SYN to a published port whose endpoint is gone (a stale entry; no flow made)",
            FROM_NETDEV,
            tcp_segment(
                INBOUND,
                f.client,
                SocketAddrV4::new(HOST_IP, STALE_PORT),
                TCP_SYN,
            ),
            DropReason::RedirectFailed,
        ),
        Case::drop(
            "drop_masquerade_no_ports",
            "drop: a masqueraded packet of a protocol without ports (GRE), which cannot be \
             translated",
            TO_NETDEV,
            with_protocol(&masquerade_syn(f.app), IPPROTO_GRE),
            DropReason::UnsupportedProtocol,
        ),
        Case::drop(
            "drop_fragment",
            "drop: a fragment of masqueraded traffic",
            TO_NETDEV,
            first_fragment(&masquerade_syn(f.app)),
            DropReason::Fragment,
        ),
        Case {
            // Another connection of A holds the range's one port towards the server.
            before: prepared_by(
                TO_NETDEV,
                masquerade_syn(SocketAddrV4::new(A.ip, CLIENT_PORT + 1)),
                TC_ACT_OK,
            ),
            ..Case::drop(
                "drop_ports_exhausted",
                "drop: no free masquerade port towards the destination (every try taken)",
                TO_NETDEV,
                masquerade_syn(f.app),
                DropReason::NatPortsExhausted,
            )
        },
        Case {
            before: Before {
                packets: Vec::new(),
                full_conntrack: true,
            },
            ..Case::drop(
                "drop_conntrack_full",
                "drop: a new masqueraded flow with the conntrack table full",
                TO_NETDEV,
                masquerade_syn(f.app),
                DropReason::ConntrackFull,
            )
        },
    ]
}
