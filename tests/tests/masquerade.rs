//! Masquerade through the host's uplink, with real packets: endpoints reach the outside as the
//! host's address (TCP, UDP, ICMP echo and ICMP errors, path-MTU discovery), many flows and
//! colliding source ports or echo identifiers stay apart, networks can opt out, fragments never
//! leave untranslated, flows expire by state (UDP, closed and reset TCP) and survive agent
//! restarts, a full table and an exhausted port range refuse new flows without hurting the old,
//! netctl's conntrack listing and flushing act on what they are asked to and keep up with a
//! table of realistic size, and bad NAT flags stop the agent with a message naming them.
//!
//! Hosts in the topology have no default route, so every agent here is told its uplink
//! (`--uplink uplink0`); a test that needs more than the underlay /24 adds the route itself.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    ops::RangeInclusive,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use net_agent::datapath::Maps;
use net_ebpf_common::{CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_KIND_MASQUERADE, CtEntry, CtKey};
use net_tests::{
    Agent, DropReason, EndpointExt, Host, TIMEOUT, Topology,
    agent::run_agent_once,
    api::NatStatus,
    drop_count, exec_in, exec_in_ok,
    nat::{
        Flow, NatExt, close_all_and_check, close_echo, echo_exchange, echo_on_all, flows_text,
        icmp_sniffer, ipv4_sniffer, open_concurrently, peer_echo_server, ping_with_id,
        raise_nofile, route_mtu, tcp_connect_from,
    },
    netns::{add_netns, in_netns, link},
    run_ok,
    topology::{OUTSIDE_IP, UPLINK},
    traffic::{
        CONNECT_TIMEOUT, Digest, IO_TIMEOUT, Pattern, sock, start_stream, tcp_connect,
        udp_echo_server, udp_socket,
    },
    wait::restarting,
    wait_for, wait_until,
};

const TCP_PORT: u16 = 7000;
const UDP_PORT: u16 = 7001;
const STREAM_PORT: u16 = 7100;
const MIB: usize = 1 << 20;
const KIB: u64 = 1024;
/// The agent's default masquerade ports.
const NAT_PORTS: RangeInclusive<u16> = 61_000..=65_535;
/// How long a connection that must fail is given.
const REFUSED_CONNECT: Duration = Duration::from_secs(3);

/// Host 1's agent, masquerading through its uplink, with `extra` arguments.
fn start_masquerading<'t>(host: &'t Host, extra: &[&str]) -> Agent<'t> {
    let mut args = vec!["--uplink", UPLINK];
    args.extend_from_slice(extra);
    host.start_agent_with(&args)
}

fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => panic!("expected an IPv4 socket address, got {a}"),
    }
}

/// The flow of `proto` whose endpoint side is `endpoint`:`port`.
fn find_flow<'f>(
    flows: &'f [Flow],
    proto: &str,
    endpoint: Ipv4Addr,
    port: u16,
) -> Option<&'f Flow> {
    flows
        .iter()
        .find(|f| f.proto == proto && f.source == endpoint && f.source_port == port)
}

/// [`find_flow`] in the agent's current listing, panicking with the listing if it is missing.
fn the_flow(agent: &Agent<'_>, proto: &str, endpoint: Ipv4Addr, port: u16) -> Flow {
    let flows = agent.ct_list(&[]);
    find_flow(&flows, proto, endpoint, port)
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "no {proto} flow from {endpoint}:{port} in `netctl bpf ct list`:\n{}",
                flows_text(&flows)
            )
        })
}

/// Sends `payload` once over `socket` to `to` and waits up to `wait` for it to come back from
/// there.
fn udp_once(socket: &UdpSocket, to: SocketAddr, payload: &[u8], wait: Duration) -> bool {
    if socket.send_to(payload, to).is_err() {
        return false;
    }
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        socket
            .set_read_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ))
            .expect("setting a UDP read timeout");
        match restarting(|| socket.recv_from(&mut buf)) {
            Ok((n, from)) if from == to && buf[..n] == *payload => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}

/// [`udp_once`] up to five times, one second each; panics naming `what` if nothing came back.
fn udp_exchange(socket: &UdpSocket, to: SocketAddr, payload: &[u8], what: &str) {
    let ok = (0..5).any(|_| udp_once(socket, to, payload, Duration::from_secs(1)));
    assert!(ok, "{what}: no UDP reply from {to} in 5 tries");
}

fn local_port(socket: &UdpSocket) -> u16 {
    socket.local_addr().expect("a UDP socket's address").port()
}

/// The uplink's drop counters in the pinned data plane (drops at the uplink are counted under
/// its ifindex, not under an endpoint's).
fn uplink_drops(agent: &Agent<'_>, reason: DropReason) -> u64 {
    let ifindex = link(agent.host().netns(), UPLINK).index;
    let maps = Maps::open_pinned(agent.bpffs_dir()).unwrap_or_else(|e| {
        panic!(
            "opening the pins under {}: {e}",
            agent.bpffs_dir().display()
        )
    });
    let (_, _, drops) = maps
        .endpoint_counters(ifindex)
        .unwrap_or_else(|e| panic!("reading the drop counters of ifindex {ifindex}: {e}"));
    drops
        .iter()
        .filter(|d| d.code == reason as u32)
        .map(|d| d.packets)
        .sum()
}

fn nat_text(nat: &NatStatus) -> String {
    serde_json::to_string_pretty(nat).expect("NAT status as JSON")
}

#[test]
fn endpoint_tcp_and_udp_leave_with_the_host_address() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    let agent = start_masquerading(host, &[]);
    let nat = agent.nat_status();
    assert_eq!(
        (
            nat.uplink.as_str(),
            nat.host_ip,
            nat.port_min..=nat.port_max
        ),
        (UPLINK, host.underlay_ip(), NAT_PORTS),
        "status: {}",
        nat_text(&nat)
    );
    assert_eq!(
        (
            nat.conntrack_entries,
            nat.conntrack_capacity,
            nat.flows_created
        ),
        (0, 131_072, 0),
        "a fresh agent's table: {}",
        nat_text(&nat)
    );
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let a = agent.endpoint_create("a", "blue", &[]);

    // TCP, 1 MiB echoed, the connection kept open while its flow is inspected.
    let server = peer_echo_server(topo.outside(), SocketAddrV4::new(OUTSIDE_IP, TCP_PORT));
    let forwarded = host.forwarded_packets();
    let conn = tcp_connect(&a.netns, server.addr(), CONNECT_TIMEOUT)
        .unwrap_or_else(|e| panic!("TCP from a to {}: {e}", server.addr()));
    let local = conn.local_addr().expect("the client's address");
    let data = Pattern::bytes(0x3a5, MIB);
    let sent = Digest::of(&data);
    let echoed = echo_exchange(&conn, &data).unwrap_or_else(|e| panic!("TCP from a: {e}"));
    assert_eq!(echoed, sent, "the echo differs from what a sent");
    // Only the SYN (and a retransmission of it, if one was lost) goes through the host's
    // forwarding, which takes it to the uplink where its flow is made; the flow's later packets
    // leave straight from `tc_from_endpoint`.
    let forwarded = host.forwarded_packets() - forwarded;
    assert!(
        forwarded <= 2,
        "the host forwarded {forwarded} packets of a masqueraded connection"
    );
    let peers = server.peers();
    assert_eq!(peers.len(), 1, "the server accepted {peers:?}");
    let peer = peers[0];
    assert_eq!(
        peer.ip(),
        host.underlay_ip(),
        "the outside server saw {peer} as the peer, not the host's address"
    );
    assert!(
        NAT_PORTS.contains(&peer.port()),
        "the masqueraded source port {} is outside {NAT_PORTS:?}",
        peer.port()
    );
    let flow = the_flow(&agent, "tcp", a.ip(), local.port());
    assert_eq!(
        (
            flow.destination,
            flow.destination_port,
            flow.new_source,
            flow.new_source_port
        ),
        (OUTSIDE_IP, TCP_PORT, host.underlay_ip(), peer.port()),
        "the TCP flow: {flow:?}"
    );
    assert_eq!(flow.state, "established", "{flow:?}");
    assert!(
        flow.bytes_original >= MIB as u64 && flow.bytes_reply >= MIB as u64,
        "the flow's counters missed the megabyte each way: {flow:?}"
    );
    close_echo(&conn).expect("closing a's connection");
    let (reported_peer, at_server) = server.next_report(IO_TIMEOUT);
    assert_eq!(reported_peer, peer);
    assert_eq!(
        at_server, sent,
        "the server received other bytes than a sent"
    );

    // UDP request and reply.
    let udp = udp_echo_server(topo.outside(), sock(OUTSIDE_IP, UDP_PORT));
    let socket = udp_socket(&a.netns, None);
    udp_exchange(&socket, udp.addr(), b"masquerade me", "UDP from a");
    let senders = udp.senders();
    assert!(
        !senders.is_empty() && senders.iter().all(|s| s.ip() == host.underlay_ip()),
        "the UDP server saw the senders {senders:?}, expected only {}",
        host.underlay_ip()
    );
    let flow = the_flow(&agent, "udp", a.ip(), local_port(&socket));
    assert_eq!(
        (
            flow.destination,
            flow.destination_port,
            flow.new_source,
            flow.state.as_str()
        ),
        (OUTSIDE_IP, UDP_PORT, host.underlay_ip(), "replied"),
        "the UDP flow: {flow:?}"
    );
    assert!(
        senders.iter().all(|s| s.port() == flow.new_source_port)
            && NAT_PORTS.contains(&flow.new_source_port),
        "the UDP server saw {senders:?}; the flow says {flow:?}"
    );

    let nat = agent.nat_status();
    assert!(
        nat.flows_created >= 2 && nat.conntrack_entries >= 4,
        "status after a TCP and a UDP flow: {}",
        nat_text(&nat)
    );
    let text = agent.netctl_ok(&["bpf", "ct", "list"]);
    for needle in [a.ip().to_string(), host.underlay_ip().to_string()] {
        assert!(
            text.contains(&needle),
            "`netctl bpf ct list` does not show {needle}:\n{text}"
        );
    }
}

#[test]
fn a_thousand_concurrent_connections_through_masquerade() {
    const CONNS: usize = 1000;
    const OPENERS: usize = 4;
    const PER_CONN: usize = 8 * 1024;
    // Both ends of every connection live in this process, next to other tests' sockets.
    raise_nofile(4 * CONNS as u64 + 1024);
    let topo = Topology::new(1);
    let host = topo.host(1);
    let agent = start_masquerading(host, &[]);
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let a = agent.endpoint_create("a", "blue", &[]);
    let server = peer_echo_server(topo.outside(), SocketAddrV4::new(OUTSIDE_IP, TCP_PORT));
    let to = server.addr();

    // Opened from several threads at once: flows are created concurrently on both CPUs.
    let conns = open_concurrently(&a.netns, to, CONNS, OPENERS);
    assert_eq!(conns.len(), CONNS);
    let local_ports: BTreeSet<u16> = conns
        .iter()
        .map(|c| c.local_addr().expect("local address").port())
        .collect();
    assert_eq!(
        local_ports.len(),
        CONNS,
        "the client's ports are not distinct"
    );

    // Data on every connection, all of them open, from several threads.
    let sent = echo_on_all(&conns, PER_CONN, OPENERS);

    // While they are all open: 1000 peers as the host, 1000 flows with distinct NAT ports.
    let peers = server.peers();
    let peer_ports: BTreeSet<u16> = peers.iter().map(|p| p.port()).collect();
    assert_eq!(
        peers.len(),
        CONNS,
        "the server accepted {} connections",
        peers.len()
    );
    assert!(
        peers.iter().all(|p| p.ip() == host.underlay_ip()),
        "some peers were not the host's address: {:?}",
        peers
            .iter()
            .filter(|p| p.ip() != host.underlay_ip())
            .collect::<Vec<_>>()
    );
    assert_eq!(
        peer_ports.len(),
        CONNS,
        "two connections shared a masqueraded port"
    );
    let flows: Vec<Flow> = agent
        .ct_list(&["--proto", "tcp", "--port", &TCP_PORT.to_string()])
        .into_iter()
        .filter(|f| f.source == a.ip())
        .collect();
    let flow_ports: BTreeSet<u16> = flows.iter().map(|f| f.source_port).collect();
    let nat_ports: BTreeSet<u16> = flows.iter().map(|f| f.new_source_port).collect();
    assert_eq!(flows.len(), CONNS, "flows listed: {}", flows.len());
    assert_eq!(flow_ports, local_ports, "the flows' endpoint ports");
    assert_eq!(
        nat_ports, peer_ports,
        "the flows' NAT ports against the server's peers"
    );
    assert!(
        nat_ports.iter().all(|p| NAT_PORTS.contains(p)),
        "NAT ports outside {NAT_PORTS:?}"
    );
    let not_established: Vec<&Flow> = flows.iter().filter(|f| f.state != "established").collect();
    assert!(
        not_established.is_empty(),
        "flows not established: {not_established:?}"
    );
    let nat = agent.nat_status();
    assert!(
        nat.flows_created >= CONNS as u64 && nat.conntrack_entries >= 2 * CONNS,
        "status: {}",
        nat_text(&nat)
    );

    // Close them all; the server saw on each exactly what was sent.
    close_all_and_check(&conns, &server, &sent);
}

#[test]
fn two_endpoints_with_the_same_source_port_stay_apart() {
    const SOURCE_PORT: u16 = 40_000;
    let topo = Topology::new(1);
    let host = topo.host(1);
    let agent = start_masquerading(host, &[]);
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let a = agent.endpoint_create("a", "blue", &[]);
    let b = agent.endpoint_create("b", "blue", &[]);
    let server = peer_echo_server(topo.outside(), SocketAddrV4::new(OUTSIDE_IP, TCP_PORT));
    let to = v4(server.addr());

    // Both connect at once from port 40000 of their own address, and carry data at once.
    let data: Vec<Vec<u8>> = (0..2).map(|i| Pattern::bytes(40 + i, 256 * 1024)).collect();
    let conns: Vec<TcpStream> = thread::scope(|s| {
        let handles: Vec<_> = [&a, &b]
            .into_iter()
            .map(|e| {
                s.spawn(move || {
                    tcp_connect_from(
                        &e.netns,
                        SocketAddrV4::new(e.ip(), SOURCE_PORT),
                        to,
                        CONNECT_TIMEOUT,
                    )
                    .unwrap_or_else(|err| panic!("TCP from {}:{SOURCE_PORT}: {err}", e.name))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("connect thread"))
            .collect()
    });
    thread::scope(|s| {
        for (i, (c, d)) in conns.iter().zip(&data).enumerate() {
            s.spawn(move || {
                let echoed = echo_exchange(c, d).unwrap_or_else(|e| panic!("connection {i}: {e}"));
                assert_eq!(echoed, Digest::of(d), "connection {i}: the echo differs");
            });
        }
    });
    let peers: BTreeSet<SocketAddr> = server.peers().into_iter().collect();
    assert_eq!(
        peers.len(),
        2,
        "the server should see two distinct peers, saw {peers:?}"
    );
    assert!(
        peers.iter().all(|p| p.ip() == host.underlay_ip()),
        "peers: {peers:?}"
    );
    let fa = the_flow(&agent, "tcp", a.ip(), SOURCE_PORT);
    let fb = the_flow(&agent, "tcp", b.ip(), SOURCE_PORT);
    assert_ne!(
        fa.new_source_port, fb.new_source_port,
        "a: {fa:?}\nb: {fb:?}"
    );
    let flow_peers: BTreeSet<SocketAddr> = [fa.new_source_port, fb.new_source_port]
        .into_iter()
        .map(|p| sock(host.underlay_ip(), p))
        .collect();
    assert_eq!(
        flow_peers, peers,
        "the flows' NAT ports against the server's peers"
    );
    let mut reports = BTreeMap::new();
    for c in &conns {
        close_echo(c).expect("closing");
    }
    for _ in 0..2 {
        let (peer, d) = server.next_report(IO_TIMEOUT);
        reports.insert(peer.port(), d);
    }
    assert_eq!(
        reports.get(&fa.new_source_port),
        Some(&Digest::of(&data[0]))
    );
    assert_eq!(
        reports.get(&fb.new_source_port),
        Some(&Digest::of(&data[1]))
    );

    // UDP from port 40000 of both, to one server port.
    let udp = udp_echo_server(topo.outside(), sock(OUTSIDE_IP, UDP_PORT));
    for e in [&a, &b] {
        let socket = in_netns(&e.netns, || UdpSocket::bind(sock(e.ip(), SOURCE_PORT)))
            .unwrap_or_else(|err| panic!("binding UDP {}:{SOURCE_PORT}: {err}", e.ip()));
        udp_exchange(
            &socket,
            udp.addr(),
            e.name.as_bytes(),
            &format!("UDP from {}", e.name),
        );
    }
    let senders: BTreeSet<SocketAddr> = udp.senders().into_iter().collect();
    assert_eq!(senders.len(), 2, "the UDP server saw {senders:?}");
    let ua = the_flow(&agent, "udp", a.ip(), SOURCE_PORT);
    let ub = the_flow(&agent, "udp", b.ip(), SOURCE_PORT);
    assert_ne!(
        ua.new_source_port, ub.new_source_port,
        "a: {ua:?}\nb: {ub:?}"
    );
}

#[test]
fn ping_through_masquerade() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    let agent = start_masquerading(host, &[]);
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let a = agent.endpoint_create("a", "blue", &[]);
    let sniffer = icmp_sniffer(topo.outside());

    let out = exec_in(
        &a.netns,
        &[
            "ping",
            "-n",
            "-c",
            "3",
            "-i",
            "0.2",
            "-w",
            "10",
            &OUTSIDE_IP.to_string(),
        ],
    );
    assert!(
        out.success() && out.stdout.contains("3 received"),
        "ping from a to the outside\n{out}"
    );
    let flows: Vec<Flow> = agent
        .ct_list(&["--proto", "icmp"])
        .into_iter()
        .filter(|f| f.source == a.ip())
        .collect();
    assert_eq!(flows.len(), 1, "ICMP flows of a:\n{}", flows_text(&flows));
    let flow = &flows[0];
    assert_eq!(
        (flow.destination, flow.new_source, flow.state.as_str()),
        (OUTSIDE_IP, host.underlay_ip(), "replied"),
        "{flow:?}"
    );
    assert!(
        flow.packets_original >= 3 && flow.packets_reply >= 3,
        "{flow:?}"
    );
    let requests: Vec<_> = sniffer
        .seen()
        .into_iter()
        .filter(|m| m.icmp_type == 8)
        .collect();
    assert!(
        requests.len() >= 3,
        "the outside saw {} echo requests: {requests:?}",
        requests.len()
    );
    assert!(
        requests
            .iter()
            .all(|m| m.src == host.underlay_ip() && m.id == flow.new_source_port),
        "the outside saw echo requests {requests:?}; expected all from {} with identifier {}",
        host.underlay_ip(),
        flow.new_source_port
    );

    // Two endpoints pinging the outside with the same echo identifier: each reply reaches its
    // own sender, and the outside sees two identifiers.
    let b = agent.endpoint_create("b", "blue", &[]);
    const ID: u16 = 4242;
    for e in [&a, &b] {
        exec_in_ok(
            &e.netns,
            &["sysctl", "-qw", "net.ipv4.ping_group_range=0 0"],
        );
        let payload = format!("echo from {}", e.name);
        let reply = ping_with_id(
            &e.netns,
            OUTSIDE_IP,
            ID,
            payload.as_bytes(),
            Duration::from_secs(3),
        );
        assert_eq!(
            reply.as_deref(),
            Some(payload.as_bytes()),
            "{}'s echo request with identifier {ID} got no reply of its own\nflows:\n{}",
            e.name,
            flows_text(&agent.ct_list(&["--proto", "icmp"]))
        );
    }
    let fa = the_flow(&agent, "icmp", a.ip(), ID);
    let fb = the_flow(&agent, "icmp", b.ip(), ID);
    assert_ne!(
        fa.new_source_port, fb.new_source_port,
        "a: {fa:?}\nb: {fb:?}"
    );
    let ids: BTreeSet<u16> = sniffer
        .seen()
        .into_iter()
        .filter(|m| m.icmp_type == 8 && m.id != flow.new_source_port)
        .map(|m| m.id)
        .collect();
    assert_eq!(
        ids,
        BTreeSet::from([fa.new_source_port, fb.new_source_port]),
        "identifiers of the echo requests the outside saw"
    );

    // An ICMP error about a masqueraded UDP flow (port unreachable: nothing listens there)
    // comes back to the endpoint's socket: a connected UDP socket reports it.
    let closed = sock(OUTSIDE_IP, 7999);
    let socket = udp_socket(&a.netns, None);
    socket.connect(closed).expect("connecting a UDP socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("read timeout");
    let mut buf = [0u8; 64];
    let refused = (0..5).any(|_| {
        let _ = socket.send(b"anyone?");
        matches!(restarting(|| socket.recv(&mut buf)), Err(e) if e.kind() == ErrorKind::ConnectionRefused)
    });
    assert!(
        refused,
        "the endpoint's UDP socket never saw the port-unreachable error from {closed}\nflows:\n{}",
        flows_text(&agent.ct_list(&["--proto", "udp"]))
    );
}

#[test]
fn fragmented_udp_never_leaves_with_the_endpoint_address() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    let agent = start_masquerading(host, &[]);
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let a = agent.endpoint_create("a", "blue", &[]);
    let udp = udp_echo_server(topo.outside(), sock(OUTSIDE_IP, UDP_PORT));
    let sniffer = ipv4_sniffer(topo.outside());
    let socket = udp_socket(&a.netns, None);
    udp_exchange(&socket, udp.addr(), b"small", "a small datagram from a");

    // 3000 bytes leave a 1500-byte interface as three IP fragments.
    let big = Pattern::bytes(3, 3000);
    let delivered = (0..3).any(|_| udp_once(&socket, udp.addr(), &big, Duration::from_secs(1)));
    let seen = sniffer.seen();
    assert!(
        seen.iter()
            .any(|p| !p.outgoing && p.src == host.underlay_ip() && p.proto == 17),
        "the sniffer in the outside saw no datagram from the host: {seen:?}"
    );
    let leaked: Vec<_> = seen
        .into_iter()
        .filter(|p| !p.outgoing && p.src == a.ip())
        .collect();
    assert!(
        leaked.is_empty(),
        "packets with the endpoint's private source reached the outside: {leaked:?}"
    );
    if !delivered {
        assert!(
            uplink_drops(&agent, DropReason::Fragment) > 0,
            "the 3000-byte datagram was lost but no fragment drop was counted at the uplink"
        );
        let arrived: Vec<_> = sniffer
            .seen()
            .into_iter()
            .filter(|p| !p.outgoing && p.fragment)
            .collect();
        eprintln!(
            "GAP: a UDP datagram larger than the MTU cannot leave a masquerading endpoint (its \
             fragments are dropped at the uplink as `fragment`); fragments at the outside: \
             {arrived:?}"
        );
    }
    // Small datagrams still work.
    udp_exchange(
        &socket,
        udp.addr(),
        b"small again",
        "a small datagram after the big one",
    );
}

/// A far network beyond the outside namespace, behind a 1280-byte link:
/// `<tag>-out` (router, 203.0.113.1) --MTU 1280-- `<tag>-far` (203.0.113.2).
fn build_far_network(topo: &Topology, host: &Host) -> (String, Ipv4Addr) {
    let far = topo.netns_name("far");
    add_netns(&far);
    let out = topo.outside();
    let far_ip = Ipv4Addr::new(203, 0, 113, 2);
    run_ok(
        "ip",
        &[
            "-n", out, "link", "add", "name", "tofar", "mtu", "1280", "type", "veth", "peer",
            "name", "eth0", "mtu", "1280", "netns", &far,
        ],
    );
    run_ok(
        "ip",
        &["-n", out, "addr", "add", "203.0.113.1/24", "dev", "tofar"],
    );
    run_ok("ip", &["-n", out, "link", "set", "tofar", "up"]);
    run_ok(
        "ip",
        &["-n", &far, "addr", "add", "203.0.113.2/24", "dev", "eth0"],
    );
    run_ok("ip", &["-n", &far, "link", "set", "eth0", "up"]);
    run_ok("ip", &["-n", &far, "link", "set", "lo", "up"]);
    // The far server advertises a 1460-byte MSS, as a server on a 1500-byte LAN behind the narrow
    // link would: the endpoint's full-sized segments then meet the 1280 link at the router.
    run_ok(
        "ip",
        &[
            "-n",
            &far,
            "route",
            "add",
            "198.18.0.0/24",
            "via",
            "203.0.113.1",
            "advmss",
            "1460",
        ],
    );
    exec_in_ok(out, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    run_ok(
        "ip",
        &[
            "-n",
            host.netns(),
            "route",
            "add",
            "203.0.113.0/24",
            "via",
            &OUTSIDE_IP.to_string(),
        ],
    );
    (far, far_ip)
}

#[test]
fn path_mtu_discovery_through_masquerade() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    let agent = start_masquerading(host, &[]);
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let a = agent.endpoint_create("a", "blue", &[]);
    let (far, far_ip) = build_far_network(&topo, host);
    assert_eq!(link(&a.netns, "eth0").mtu, 1500, "the endpoint's MTU");
    // Linux TCP sets DF unless PMTU discovery is switched off.
    assert_eq!(
        exec_in_ok(&a.netns, &["sysctl", "-n", "net.ipv4.ip_no_pmtu_disc"]).trim(),
        "0",
        "PMTU discovery is off in the endpoint: DF would not be set"
    );
    // The endpoint's sockets route by source (a table per interface): ask as they do.
    let from = Some(a.ip());
    assert_eq!(
        route_mtu(&a.netns, far_ip, from),
        None,
        "a path MTU before any traffic"
    );

    let server = peer_echo_server(&far, SocketAddrV4::new(far_ip, TCP_PORT));
    let sniffer = icmp_sniffer(&a.netns);
    let conn = tcp_connect(&a.netns, server.addr(), CONNECT_TIMEOUT)
        .unwrap_or_else(|e| panic!("TCP from a to the far server {}: {e}", server.addr()));
    let data = Pattern::bytes(0x1280, MIB);
    let start = Instant::now();
    // Without the ICMP error translated back to a, its 1500-byte segments are dropped at the
    // router forever and the echo stalls until the read timeout.
    let echoed = echo_exchange(&conn, &data).unwrap_or_else(|e| {
        panic!(
            "1 MiB from a to the far server through the 1280-byte link: {e}\nICMP seen in a: \
             {:?}\nflows:\n{}",
            sniffer.seen(),
            flows_text(&agent.ct_list(&[]))
        )
    });
    assert_eq!(
        echoed,
        Digest::of(&data),
        "the echo from the far server differs"
    );
    let took = start.elapsed();
    close_echo(&conn).expect("closing");
    let (peer, at_server) = server.next_report(IO_TIMEOUT);
    assert_eq!(at_server, Digest::of(&data));
    assert_eq!(peer.ip(), host.underlay_ip(), "the far server's peer");

    let needed: Vec<_> = sniffer
        .seen()
        .into_iter()
        .filter(|m| m.icmp_type == 3 && m.code == 4)
        .collect();
    assert!(
        !needed.is_empty(),
        "no fragmentation-needed reached a (the transfer took {took:?}): {:?}",
        sniffer.seen()
    );
    assert!(
        needed
            .iter()
            .all(|m| m.src == OUTSIDE_IP && m.dst == a.ip()),
        "fragmentation-needed as a saw it: {needed:?}"
    );
    assert_eq!(
        route_mtu(&a.netns, far_ip, from),
        Some(1280),
        "a's route cache towards {far_ip}: {}",
        exec_in_ok(
            &a.netns,
            &[
                "ip",
                "route",
                "get",
                &far_ip.to_string(),
                "from",
                &a.ip().to_string()
            ]
        )
    );
}

#[test]
fn a_network_without_masquerade_keeps_its_addresses() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    let agent = start_masquerading(host, &[]);
    let plain = agent.network_create("plain", "10.20.0.0/24", &["--no-masquerade"]);
    assert!(
        !plain.masquerade,
        "network create --no-masquerade: {plain:?}"
    );
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let p = agent.endpoint_create("p", "plain", &[]);
    let a = agent.endpoint_create("a", "blue", &[]);
    // The outside routes the un-masqueraded network back through the host.
    run_ok(
        "ip",
        &[
            "-n",
            topo.outside(),
            "route",
            "add",
            "10.20.0.0/24",
            "via",
            &host.underlay_ip().to_string(),
        ],
    );

    let server = peer_echo_server(topo.outside(), SocketAddrV4::new(OUTSIDE_IP, TCP_PORT));
    let conn = tcp_connect(&p.netns, server.addr(), CONNECT_TIMEOUT)
        .unwrap_or_else(|e| panic!("TCP from p (no masquerade) to the outside: {e}"));
    let data = Pattern::bytes(0x20, 256 * 1024);
    let echoed = echo_exchange(&conn, &data).unwrap_or_else(|e| panic!("TCP from p: {e}"));
    assert_eq!(echoed, Digest::of(&data));
    let local = conn.local_addr().expect("local address");
    assert_eq!(
        server.peers(),
        vec![local],
        "the outside should see p's own address and port"
    );
    close_echo(&conn).expect("closing");
    assert_eq!(server.next_report(IO_TIMEOUT).1, Digest::of(&data));

    let udp = udp_echo_server(topo.outside(), sock(OUTSIDE_IP, UDP_PORT));
    let socket = udp_socket(&p.netns, None);
    udp_exchange(&socket, udp.addr(), b"plain", "UDP from p");
    assert_eq!(
        udp.senders(),
        vec![sock(p.ip(), local_port(&socket))],
        "UDP senders the outside saw"
    );
    let flows = agent.ct_list(&["--addr", &p.ip().to_string()]);
    assert!(flows.is_empty(), "flows of p:\n{}", flows_text(&flows));
    assert_eq!(agent.nat_status().flows_created, 0, "flows created so far");

    // The masquerading network next to it still masquerades.
    let socket = udp_socket(&a.netns, None);
    udp_exchange(&socket, udp.addr(), b"blue", "UDP from a");
    let last = *udp.senders().last().expect("a datagram from a");
    assert_eq!(
        last.ip(),
        host.underlay_ip(),
        "a's datagram came from {last}"
    );
    assert_eq!(agent.nat_status().flows_created, 1);
}

/// Sets a flag when dropped: stops a helper thread also when the test panics.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn idle_flows_expire_and_active_ones_stay() {
    const TIMEOUT_SECS: u64 = 2;
    const ACTIVE_FOR: Duration = Duration::from_secs(7);
    let topo = Topology::new(1);
    let host = topo.host(1);
    let agent = start_masquerading(
        host,
        &[
            "--conntrack-timeouts",
            "udp=2,udp_established=2",
            "--conntrack-gc-interval",
            "1",
        ],
    );
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let a = agent.endpoint_create("a", "blue", &[]);
    let udp = udp_echo_server(topo.outside(), sock(OUTSIDE_IP, UDP_PORT));
    let idle_socket = udp_socket(&a.netns, None);
    let active_socket = udp_socket(&a.netns, None);
    let (idle_port, active_port) = (local_port(&idle_socket), local_port(&active_socket));
    let stop = AtomicBool::new(false);

    thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        // The active flow: one request every 0.5 s, each waiting for its reply.
        let active_started = Instant::now();
        let active = s.spawn(|| {
            let (mut sent, mut replied) = (0u32, 0u32);
            while !stop.load(Ordering::Relaxed) {
                let tick = Instant::now();
                sent += 1;
                if udp_once(
                    &active_socket,
                    udp.addr(),
                    b"active",
                    Duration::from_secs(2),
                ) {
                    replied += 1;
                }
                thread::sleep(Duration::from_millis(500).saturating_sub(tick.elapsed()));
            }
            (sent, replied)
        });
        // The idle flow: one exchange, then nothing.
        let idle_last_sent = Instant::now();
        udp_exchange(
            &idle_socket,
            udp.addr(),
            b"idle",
            "the idle flow's exchange",
        );
        let idle_flow = the_flow(&agent, "udp", a.ip(), idle_port);
        let active_flow = wait_for(TIMEOUT, "the active flow to appear", || {
            find_flow(&agent.ct_list(&[]), "udp", a.ip(), active_port).cloned()
        });

        // Every listing: the active flow is there with the same NAT port and growing counters
        // (a removed and re-created flow would start over, most likely on another port).
        let mut last_packets = active_flow.packets_original;
        let mut idle_gone_after = None;
        loop {
            let flows = agent.ct_list(&[]);
            let now = find_flow(&flows, "udp", a.ip(), active_port).unwrap_or_else(|| {
                panic!(
                    "the active flow (sending every 0.5 s, timeout {TIMEOUT_SECS} s) was removed \
                     after {:?}:\n{}",
                    active_started.elapsed(),
                    flows_text(&flows)
                )
            });
            assert_eq!(
                now.new_source_port, active_flow.new_source_port,
                "the active flow was re-created: was {active_flow:?}, now {now:?}"
            );
            assert!(
                now.packets_original >= last_packets,
                "the active flow's counters went back: was {last_packets}, now {now:?}"
            );
            last_packets = now.packets_original;
            if idle_gone_after.is_none() && find_flow(&flows, "udp", a.ip(), idle_port).is_none() {
                idle_gone_after = Some(idle_last_sent.elapsed());
            }
            if idle_gone_after.is_some() && active_started.elapsed() >= ACTIVE_FOR {
                break;
            }
            assert!(
                active_started.elapsed() < TIMEOUT,
                "the idle flow {idle_flow:?} was still listed {:?} after its last packet \
                 (timeout {TIMEOUT_SECS} s, GC every 1 s):\n{}",
                idle_last_sent.elapsed(),
                flows_text(&flows)
            );
            thread::sleep(Duration::from_millis(200));
        }
        let gone_after = idle_gone_after.expect("set before leaving the loop");
        assert!(
            gone_after >= Duration::from_secs(TIMEOUT_SECS),
            "the idle flow went {gone_after:?} after its last packet, before its {TIMEOUT_SECS} s \
             timeout"
        );
        stop.store(true, Ordering::Relaxed);
        let (sent, replied) = active.join().expect("active flow thread");
        assert!(sent >= 10, "the active flow sent only {sent} requests");
        assert_eq!(replied, sent, "the active flow lost replies");
    });
    // Once quiet, the active flow expires too.
    wait_until(
        Duration::from_secs(15),
        "the formerly active flow to expire",
        || find_flow(&agent.ct_list(&[]), "udp", a.ip(), active_port).is_none(),
    );
}

#[test]
fn closed_and_reset_tcp_flows_expire_and_idle_established_ones_stay() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    let agent = start_masquerading(
        host,
        &[
            "--conntrack-timeouts",
            "tcp_closing=1",
            "--conntrack-gc-interval",
            "1",
        ],
    );
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let a = agent.endpoint_create("a", "blue", &[]);
    let server = peer_echo_server(topo.outside(), SocketAddrV4::new(OUTSIDE_IP, TCP_PORT));
    let conns: Vec<TcpStream> = (0..2)
        .map(|i| {
            tcp_connect(&a.netns, server.addr(), CONNECT_TIMEOUT)
                .unwrap_or_else(|e| panic!("connection {i}: {e}"))
        })
        .collect();
    let data = Pattern::bytes(5, 32 * 1024);
    for c in &conns {
        assert_eq!(
            echo_exchange(c, &data).expect("exchange"),
            Digest::of(&data)
        );
    }
    let port = |c: &TcpStream| c.local_addr().expect("local address").port();
    let (closed_port, idle_port) = (port(&conns[0]), port(&conns[1]));
    let idle_before = the_flow(&agent, "tcp", a.ip(), idle_port);
    assert_eq!(idle_before.state, "established", "{idle_before:?}");

    // FIN both ways: the flow is "closed" and goes after tcp_closing (1 s).
    close_echo(&conns[0]).expect("closing the first connection");
    let closed_at = Instant::now();
    if let Some(f) = find_flow(&agent.ct_list(&[]), "tcp", a.ip(), closed_port) {
        assert_eq!(
            f.state, "closed",
            "the flow of a connection closed both ways: {f:?}"
        );
    }
    // A RST (a closed port on the outside): "reset", also tcp_closing.
    let refused = tcp_connect(&a.netns, sock(OUTSIDE_IP, 7998), CONNECT_TIMEOUT);
    assert!(refused.is_err(), "nothing listens on 7998: {refused:?}");
    wait_until(
        Duration::from_secs(15),
        "the closed and the reset flow to expire (tcp_closing=1, GC every 1 s)",
        || {
            let flows = agent.ct_list(&["--proto", "tcp"]);
            find_flow(&flows, "tcp", a.ip(), closed_port).is_none()
                && !flows.iter().any(|f| f.destination_port == 7998)
        },
    );
    // The idle established connection (no packet for several GC rounds) is still tracked,
    // on the same port, and still works.
    assert!(
        closed_at.elapsed() >= Duration::from_secs(1),
        "the closed flow went {:?} after its last packet",
        closed_at.elapsed()
    );
    let idle_after = the_flow(&agent, "tcp", a.ip(), idle_port);
    assert_eq!(
        (idle_after.new_source_port, idle_after.state.as_str()),
        (idle_before.new_source_port, "established"),
        "the idle established flow: before {idle_before:?}, after {idle_after:?}"
    );
    assert_eq!(
        echo_exchange(&conns[1], &data).expect("the idle connection after the GC rounds"),
        Digest::of(&data)
    );
}

/// Tables of a realistic size: 16,000 flows are an eighth of the default capacity.
/// Listing them (from the pins) and garbage-collecting them (under the agent's lock, every
/// second here) must stay quick: the agent answers nothing while GC holds its lock.
#[test]
fn conntrack_listing_and_gc_keep_up_with_sixteen_thousand_flows() {
    const FLOWS: u16 = 16_000;
    const LIST_WITHIN: Duration = Duration::from_secs(5);
    const STATUS_WITHIN: Duration = Duration::from_secs(2);
    let topo = Topology::new(1);
    let host = topo.host(1);
    let agent = start_masquerading(
        host,
        &[
            "--conntrack-timeouts",
            "udp=600",
            "--conntrack-gc-interval",
            "1",
        ],
    );
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let a = agent.endpoint_create("a", "blue", &[]);
    // One datagram to each of 16,000 ports of the outside: one flow each (nothing listens; the
    // port-unreachable errors that come back are rate-limited and do not matter here).
    let socket = udp_socket(&a.netns, None);
    for p in 0..FLOWS {
        if p % 256 == 0 {
            // Paced, so no backlog on the way overflows.
            thread::sleep(Duration::from_millis(1));
        }
        socket
            .send_to(b"x", sock(OUTSIDE_IP, 10_000 + p))
            .unwrap_or_else(|e| panic!("UDP to port {}: {e}", 10_000 + p));
    }

    let start = Instant::now();
    let flows = agent.ct_list(&[]);
    let list_took = start.elapsed();
    assert_eq!(flows.len(), usize::from(FLOWS), "flows listed");

    // The agent keeps answering while GC walks the table every second.
    let mut worst = Duration::ZERO;
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(5) {
        let start = Instant::now();
        let nat = agent.nat_status();
        worst = worst.max(start.elapsed());
        assert_eq!(
            nat.conntrack_entries,
            2 * usize::from(FLOWS),
            "{}",
            nat_text(&nat)
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        list_took < LIST_WITHIN && worst < STATUS_WITHIN,
        "with {FLOWS} flows: `netctl bpf ct list` took {list_took:?} (bound {LIST_WITHIN:?}); \
         `netctl status` took up to {worst:?} with GC every second (bound {STATUS_WITHIN:?})"
    );
}

/// The collector reads the table in batches of thousands (`BPF_MAP_LOOKUP_BATCH`) and removes
/// what expired: over 40,000 flows written into the pinned table, the 20,000 idle for an hour
/// go, every entry of the 20,000 live ones stays as written, and nothing else is touched. Read
/// back key by key, not through the agent's batched reads.
#[test]
fn the_collector_removes_expired_flows_in_bulk_and_keeps_live_ones() {
    const FLOWS: u32 = 40_000;
    let topo = Topology::new(1);
    let host = topo.host(1);
    let agent = start_masquerading(host, &["--conntrack-gc-interval", "1"]);
    let mut maps = Maps::open_pinned(agent.bpffs_dir()).unwrap_or_else(|e| {
        panic!(
            "opening the pins under {}: {e}",
            agent.bpffs_dir().display()
        )
    });
    let now = net_agent::conntrack::monotonic_now_ns();
    let hour_ago = now - 3_600 * 1_000_000_000;
    let (endpoint, outside, host_ip) = ([10, 10, 0, 2], [198, 51, 100, 7], [192, 0, 2, 1]);
    let mut live = HashMap::new();
    for i in 0..FLOWS {
        let sport = (10_000 + i % 50_000) as u16;
        let nat_port = (i % 60_000) as u16;
        // Distinct flows: the destination address carries the rest of the number.
        let daddr = [outside[0], outside[1], (i / 50_000) as u8, outside[3]];
        let last_seen_ns = if i % 2 == 0 { hour_ago } else { now };
        let entry = |direction, new_saddr, new_daddr, new_sport: u16, new_dport: u16| CtEntry {
            last_seen_ns,
            packets: 1,
            bytes: 100,
            new_saddr,
            new_daddr,
            new_sport: new_sport.to_be_bytes(),
            new_dport: new_dport.to_be_bytes(),
            direction,
            state: 0,
            kind: CT_KIND_MASQUERADE,
            flags: 0,
            ifindex: 0,
            _pad: 0,
        };
        let key = |saddr, daddr, sport: u16, dport: u16| CtKey {
            saddr,
            daddr,
            sport: sport.to_be_bytes(),
            dport: dport.to_be_bytes(),
            proto: 17,
            _pad: [0; 3],
        };
        let pair = [
            (
                key(endpoint, daddr, sport, 53),
                entry(CT_DIR_ORIGINAL, host_ip, daddr, nat_port, 53),
            ),
            (
                key(daddr, host_ip, 53, nat_port),
                entry(CT_DIR_REPLY, daddr, endpoint, 53, sport),
            ),
        ];
        for (k, v) in pair {
            maps.conntrack
                .insert(k, v, 0)
                .unwrap_or_else(|e| panic!("writing conntrack entry {i}: {e}"));
            if last_seen_ns == now {
                live.insert(k, v);
            }
        }
    }
    let read_back = |maps: &Maps| -> HashMap<CtKey, CtEntry> {
        maps.conntrack
            .iter()
            .map(|item| item.expect("reading a conntrack entry"))
            .collect()
    };
    wait_until(TIMEOUT, "the collector to remove the idle flows", || {
        read_back(&maps).len() <= live.len()
    });
    let left = read_back(&maps);
    assert!(
        left == live,
        "after the collection: {} entries left, {} of them live ones as written, of {} live",
        left.len(),
        left.iter().filter(|(k, v)| live.get(k) == Some(v)).count(),
        live.len()
    );
    assert_eq!(agent.nat_status().conntrack_entries, live.len());
}

#[test]
fn a_full_conntrack_table_refuses_new_flows_and_keeps_the_old() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    // Room for two flows.
    let agent = start_masquerading(host, &["--conntrack-entries", "4"]);
    assert_eq!(agent.nat_status().conntrack_capacity, 4);
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let a = agent.endpoint_create("a", "blue", &[]);
    let server = peer_echo_server(topo.outside(), SocketAddrV4::new(OUTSIDE_IP, TCP_PORT));
    let other = peer_echo_server(topo.outside(), SocketAddrV4::new(OUTSIDE_IP, TCP_PORT + 2));

    let conns: Vec<TcpStream> = (0..2)
        .map(|i| {
            tcp_connect(&a.netns, server.addr(), CONNECT_TIMEOUT)
                .unwrap_or_else(|e| panic!("connection {i} while the table has room: {e}"))
        })
        .collect();
    let exchange = |round: u64| {
        for (i, c) in conns.iter().enumerate() {
            let data = Pattern::bytes(round * 10 + i as u64, 64 * 1024);
            let echoed = echo_exchange(c, &data)
                .unwrap_or_else(|e| panic!("connection {i}, round {round}: {e}"));
            assert_eq!(echoed, Digest::of(&data), "connection {i}, round {round}");
        }
    };
    exchange(1);
    let nat = agent.nat_status();
    assert_eq!(
        (nat.conntrack_entries, nat.table_full),
        (4, 0),
        "two flows in a table of four entries: {}",
        nat_text(&nat)
    );

    let third = tcp_connect(&a.netns, other.addr(), REFUSED_CONNECT);
    assert!(
        third.is_err(),
        "a third flow got through a full table: {third:?}\nflows:\n{}",
        flows_text(&agent.ct_list(&[]))
    );
    assert!(
        other.peers().is_empty(),
        "the server behind the full table saw {:?}",
        other.peers()
    );
    exchange(2);

    let nat = agent.nat_status();
    assert!(
        nat.table_full > 0,
        "status after a refused flow: {}",
        nat_text(&nat)
    );
    assert!(
        uplink_drops(&agent, DropReason::ConntrackFull) > 0,
        "the data plane counted no conntrack-full drop at the uplink"
    );
    // Where an operator would look for the endpoint's drops.
    let stats = agent.endpoint_stats("a");
    let shown = drop_count(&stats, DropReason::ConntrackFull);
    if shown == 0 {
        eprintln!(
            "GAP: `netctl endpoint stats a` shows no conntrack-full drops (they are counted under \
             the uplink's ifindex, which no netctl command reports); stats: {}",
            serde_json::to_string(&stats).expect("stats as JSON")
        );
    }

    // Once a flow goes (closed, then flushed), the table takes a new one again.
    let second = &conns[1];
    let second_port = second.local_addr().expect("local address").port();
    close_echo(second).expect("closing the second connection");
    assert_eq!(
        agent.ct_flush(&["--port", &second_port.to_string()]),
        1,
        "flushing the closed connection's flow"
    );
    let conn = tcp_connect(&a.netns, other.addr(), CONNECT_TIMEOUT).unwrap_or_else(|e| {
        panic!(
            "a new flow after one was removed from the full table: {e}\nflows:\n{}",
            flows_text(&agent.ct_list(&[]))
        )
    });
    let data = Pattern::bytes(77, 64 * 1024);
    assert_eq!(
        echo_exchange(&conn, &data).expect("exchange on the new flow"),
        Digest::of(&data)
    );
    let first = Pattern::bytes(78, 64 * 1024);
    assert_eq!(
        echo_exchange(&conns[0], &first).expect("the first connection after all that"),
        Digest::of(&first)
    );
}

#[test]
fn exhausted_nat_ports_refuse_the_next_flow_to_the_same_destination() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    let agent = start_masquerading(host, &["--nat-ports", "61000-61001"]);
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let a = agent.endpoint_create("a", "blue", &[]);
    let server = peer_echo_server(topo.outside(), SocketAddrV4::new(OUTSIDE_IP, TCP_PORT));
    let other = peer_echo_server(topo.outside(), SocketAddrV4::new(OUTSIDE_IP, TCP_PORT + 1));

    let conns: Vec<TcpStream> = (0..2)
        .map(|i| {
            tcp_connect(&a.netns, server.addr(), CONNECT_TIMEOUT)
                .unwrap_or_else(|e| panic!("connection {i} with a free NAT port: {e}"))
        })
        .collect();
    wait_until(TIMEOUT, "the server to accept both connections", || {
        server.peers().len() == 2
    });
    let peer_ports: BTreeSet<u16> = server.peers().iter().map(|p| p.port()).collect();
    assert_eq!(
        peer_ports,
        BTreeSet::from([61_000, 61_001]),
        "the two connections' masqueraded ports"
    );
    let third = tcp_connect(&a.netns, server.addr(), REFUSED_CONNECT);
    assert!(
        third.is_err(),
        "a third connection to {} got a NAT port out of two: {third:?}\nflows:\n{}",
        server.addr(),
        flows_text(&agent.ct_list(&[]))
    );
    assert_eq!(
        server.peers().len(),
        2,
        "the server accepted {:?}",
        server.peers()
    );
    let nat = agent.nat_status();
    assert!(nat.ports_exhausted > 0, "status: {}", nat_text(&nat));
    assert!(
        uplink_drops(&agent, DropReason::NatPortsExhausted) > 0,
        "the data plane counted no nat-ports-exhausted drop at the uplink"
    );

    // A flow that goes frees its port for the next connection to the same destination.
    let freed = conns[1].local_addr().expect("local address").port();
    close_echo(&conns[1]).expect("closing the second connection");
    assert_eq!(agent.ct_flush(&["--port", &freed.to_string()]), 1);
    let again = tcp_connect(&a.netns, server.addr(), CONNECT_TIMEOUT).unwrap_or_else(|e| {
        panic!(
            "a connection after a NAT port was freed: {e}\nflows:\n{}",
            flows_text(&agent.ct_list(&[]))
        )
    });
    let data = Pattern::bytes(8, 64 * 1024);
    assert_eq!(
        echo_exchange(&again, &data).expect("exchange on the freed port"),
        Digest::of(&data)
    );
    let conns = [&conns[0], &again];

    // Another destination port is another set of tuples: its ports are free.
    let conn = tcp_connect(&a.netns, other.addr(), CONNECT_TIMEOUT)
        .unwrap_or_else(|e| panic!("TCP to another server port with the range exhausted: {e}"));
    let data = Pattern::bytes(9, 64 * 1024);
    assert_eq!(
        echo_exchange(&conn, &data).expect("exchange on the other port"),
        Digest::of(&data)
    );
    // The connections on the exhausted destination still work.
    for (i, c) in conns.into_iter().enumerate() {
        let data = Pattern::bytes(i as u64, 64 * 1024);
        let echoed = echo_exchange(c, &data).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(echoed, Digest::of(&data));
    }
}

#[test]
fn masqueraded_flows_survive_kill_9_and_restart() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    let mut agent = start_masquerading(host, &[]);
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let a = agent.endpoint_create("a", "blue", &[]);
    let flow = start_stream(&a.netns, topo.outside(), sock(OUTSIDE_IP, STREAM_PORT));
    flow.wait_progress("before the restart", 256 * KIB);
    let tracked = |agent: &Agent<'_>| -> Flow {
        let flows = agent.ct_list(&["--proto", "tcp", "--port", &STREAM_PORT.to_string()]);
        assert_eq!(
            flows.len(),
            1,
            "the stream's flows:\n{}",
            flows_text(&flows)
        );
        flows[0].clone()
    };
    let before = tracked(&agent);
    let created_before = agent.nat_status().flows_created;

    agent.kill9();
    flow.wait_progress("while the agent is dead (SIGKILL)", 512 * KIB);
    agent.netctl_err(&["status"]);
    let while_dead = tracked(&agent);
    assert_eq!(
        (
            while_dead.new_source,
            while_dead.new_source_port,
            while_dead.source_port
        ),
        (
            before.new_source,
            before.new_source_port,
            before.source_port
        ),
        "the flow as listed with the agent dead: {while_dead:?}, before: {before:?}"
    );
    assert!(
        while_dead.packets_original > before.packets_original,
        "the pinned flow did not count while the agent was dead: {before:?} -> {while_dead:?}"
    );

    agent.restart();
    flow.wait_progress("after the restart", 512 * KIB);
    let after = tracked(&agent);
    assert_eq!(
        after.new_source_port, before.new_source_port,
        "the flow after the restart: {after:?}"
    );
    assert_eq!(
        agent.nat_status().flows_created,
        created_before,
        "the restart made the stream a new flow"
    );
    // New flows work after the restart too.
    let udp = udp_echo_server(topo.outside(), sock(OUTSIDE_IP, UDP_PORT));
    udp_exchange(
        &udp_socket(&a.netns, None),
        udp.addr(),
        b"after",
        "UDP from a after the restart",
    );
    let digest = flow.finish();
    assert!(
        digest.bytes >= 1024 * KIB,
        "the stream carried {} bytes",
        digest.bytes
    );
}

/// A flow as the filter tests compare it: protocol, remote address, remote port (0 for ICMP).
type FlowKind = (String, Ipv4Addr, u16);
type ExpectedKind = (&'static str, Ipv4Addr, u16);

#[test]
fn ct_list_filters_and_flush_by_protocol() {
    let topo = Topology::new(2);
    let host = topo.host(1);
    let h2 = topo.host(2);
    let agent = start_masquerading(host, &[]);
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let a = agent.endpoint_create("a", "blue", &[]);

    // TCP to the outside (kept open), UDP to the outside and to host 2, ICMP to the outside.
    let server = peer_echo_server(topo.outside(), SocketAddrV4::new(OUTSIDE_IP, TCP_PORT));
    let conn = tcp_connect(&a.netns, server.addr(), CONNECT_TIMEOUT).expect("TCP from a");
    let data = Pattern::bytes(11, 16 * 1024);
    assert_eq!(
        echo_exchange(&conn, &data).expect("TCP exchange"),
        Digest::of(&data)
    );
    let udp_out = udp_echo_server(topo.outside(), sock(OUTSIDE_IP, UDP_PORT));
    let udp_h2 = udp_echo_server(h2.netns(), sock(h2.underlay_ip(), UDP_PORT));
    let socket = udp_socket(&a.netns, None);
    udp_exchange(&socket, udp_out.addr(), b"out", "UDP from a to the outside");
    udp_exchange(&socket, udp_h2.addr(), b"h2", "UDP from a to host 2");
    let ping = exec_in(
        &a.netns,
        &["ping", "-n", "-c", "1", "-w", "5", &OUTSIDE_IP.to_string()],
    );
    assert!(ping.success(), "ping from a\n{ping}");

    let all = agent.ct_list(&[]);
    let kinds = |flows: &[Flow]| -> Vec<FlowKind> {
        let mut k: Vec<_> = flows
            .iter()
            .map(|f| {
                (
                    f.proto.clone(),
                    f.destination,
                    if f.proto == "icmp" {
                        0
                    } else {
                        f.destination_port
                    },
                )
            })
            .collect();
        k.sort();
        k
    };
    let expect = |list: &[(&str, Ipv4Addr, u16)]| -> Vec<FlowKind> {
        let mut k: Vec<_> = list
            .iter()
            .map(|(p, a, port)| (p.to_string(), *a, *port))
            .collect();
        k.sort();
        k
    };
    let h2_ip = h2.underlay_ip();
    assert_eq!(
        kinds(&all),
        expect(&[
            ("icmp", OUTSIDE_IP, 0),
            ("tcp", OUTSIDE_IP, TCP_PORT),
            ("udp", OUTSIDE_IP, UDP_PORT),
            ("udp", h2_ip, UDP_PORT),
        ]),
        "all flows:\n{}",
        flows_text(&all)
    );
    let cases: Vec<(Vec<String>, Vec<ExpectedKind>)> = vec![
        (
            vec!["--addr".into(), h2_ip.to_string()],
            vec![("udp", h2_ip, UDP_PORT)],
        ),
        (
            vec!["--port".into(), TCP_PORT.to_string()],
            vec![("tcp", OUTSIDE_IP, TCP_PORT)],
        ),
        (
            vec!["--port".into(), UDP_PORT.to_string()],
            vec![("udp", OUTSIDE_IP, UDP_PORT), ("udp", h2_ip, UDP_PORT)],
        ),
        (
            vec![
                "--addr".into(),
                OUTSIDE_IP.to_string(),
                "--proto".into(),
                "udp".into(),
            ],
            vec![("udp", OUTSIDE_IP, UDP_PORT)],
        ),
        (
            vec!["--proto".into(), "icmp".into()],
            vec![("icmp", OUTSIDE_IP, 0)],
        ),
        // The endpoint's and the translated address match every flow.
        (
            vec!["--addr".into(), a.ip().to_string()],
            vec![
                ("icmp", OUTSIDE_IP, 0),
                ("tcp", OUTSIDE_IP, TCP_PORT),
                ("udp", OUTSIDE_IP, UDP_PORT),
                ("udp", h2_ip, UDP_PORT),
            ],
        ),
        (vec!["--addr".into(), "192.0.2.99".into()], vec![]),
        (
            vec![
                "--port".into(),
                local_port(&socket).to_string(),
                "--proto".into(),
                "udp".into(),
            ],
            vec![("udp", OUTSIDE_IP, UDP_PORT), ("udp", h2_ip, UDP_PORT)],
        ),
    ];
    for (filter, expected) in &cases {
        let args: Vec<&str> = filter.iter().map(String::as_str).collect();
        let got = agent.ct_list(&args);
        assert_eq!(
            kinds(&got),
            expect(expected),
            "`netctl bpf ct list {}`:\n{}",
            args.join(" "),
            flows_text(&got)
        );
    }
    let translated = agent.ct_list(&["--addr", &host.underlay_ip().to_string()]);
    assert_eq!(
        translated.len(),
        4,
        "--addr <host address>:\n{}",
        flows_text(&translated)
    );

    // Bad filters are refused with a message naming them.
    let message = agent.netctl_err(&["bpf", "ct", "list", "--proto", "sctp"]);
    assert!(message.contains("sctp"), "{message}");

    let entries_before = agent.nat_status().conntrack_entries;
    assert_eq!(
        agent.ct_flush(&["--proto", "udp"]),
        2,
        "flows flushed by --proto udp"
    );
    let left = agent.ct_list(&[]);
    assert_eq!(
        kinds(&left),
        expect(&[("icmp", OUTSIDE_IP, 0), ("tcp", OUTSIDE_IP, TCP_PORT)]),
        "flows left after flushing UDP:\n{}",
        flows_text(&left)
    );
    assert_eq!(
        agent.nat_status().conntrack_entries,
        entries_before - 4,
        "both entries of each flushed flow went"
    );
    // The TCP flow was not touched: the connection carries on, on the same NAT port.
    let tcp_before = all
        .iter()
        .find(|f| f.proto == "tcp")
        .expect("the TCP flow")
        .clone();
    assert_eq!(
        echo_exchange(&conn, &data).expect("TCP after the flush"),
        Digest::of(&data)
    );
    let tcp_after = the_flow(&agent, "tcp", a.ip(), tcp_before.source_port);
    assert_eq!(tcp_after.new_source_port, tcp_before.new_source_port);
    // A flushed UDP flow starts over on its next packet.
    udp_exchange(
        &socket,
        udp_out.addr(),
        b"again",
        "UDP from a after the flush",
    );
    assert_eq!(agent.ct_list(&["--proto", "udp"]).len(), 1);
    assert_eq!(agent.ct_flush(&[]), 3, "flows flushed by a bare flush");
    assert!(agent.ct_list(&[]).is_empty());
}

#[test]
fn agent_refuses_bad_nat_and_conntrack_flags() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    let dir = host.dir().join("bad-nat-args");
    let state = dir.join("state").display().to_string();
    let socket = dir.join("agent.sock").display().to_string();
    let pins = host.bpffs_dir();
    let pins_arg = pins.display().to_string();
    let prefix = host.agent_prefix();
    let cases: &[(&[&str], &[&str])] = &[
        (&["--nat-ports", "5-1"], &["5-1", "port"]),
        (&["--nat-ports", "x"], &["nat-ports", "x"]),
        (&["--nat-ports", "0-100"], &["0-100"]),
        (&["--nat-ports", "61000-70000"], &["61000-70000"]),
        (&["--conntrack-timeouts", "sctp=3"], &["sctp"]),
        (&["--conntrack-timeouts", "udp=x"], &["udp=x"]),
        (&["--conntrack-entries", "1"], &["conntrack", "1"]),
        (&["--conntrack-entries", "0"], &["conntrack", "0"]),
        (&["--conntrack-gc-interval", "0"], &["gc-interval"]),
        (&["--uplink", "nosuchif"], &["nosuchif"]),
    ];
    for (bad, mentions) in cases {
        let mut args = vec![
            "--state-dir",
            &state,
            "--bpffs-dir",
            &pins_arg,
            "--socket",
            &socket,
            "--name-prefix",
            &prefix,
            "--dns-upstream",
            "198.18.0.254",
        ];
        // A valid uplink unless the case is about it.
        if !bad.contains(&"--uplink") {
            args.extend(["--uplink", UPLINK]);
        }
        args.extend_from_slice(bad);
        let out = run_agent_once(host, &args);
        assert!(
            !out.success(),
            "the agent accepted `{}`\n{out}",
            bad.join(" ")
        );
        let lower = out.stderr.to_lowercase();
        let missing: Vec<&&str> = mentions
            .iter()
            .filter(|m| !lower.contains(&m.to_lowercase()))
            .collect();
        assert!(
            missing.is_empty(),
            "the agent's error for `{}` does not mention {missing:?}\n{out}",
            bad.join(" ")
        );
        let pinned: Vec<String> = std::fs::read_dir(&pins)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            pinned.is_empty(),
            "the refused `{}` left pins under {}: {pinned:?}",
            bad.join(" "),
            pins.display()
        );
    }
    // After all that, a good command line works.
    let agent = start_masquerading(host, &["--nat-ports", "62000-62999"]);
    let nat = agent.nat_status();
    assert_eq!((nat.port_min, nat.port_max), (62_000, 62_999));
}

#[test]
fn closed_connections_free_their_nat_port_for_the_next_one() {
    // Two ports, and many more short connections one after another to one server: each new
    // SYN takes over the tuple of a connection that has finished, as Linux reuses a tuple in
    // TIME_WAIT, instead of waiting for the collector.
    const CONNS: usize = 40;
    let topo = Topology::new(1);
    let host = topo.host(1);
    let agent = start_masquerading(host, &["--nat-ports", "61000-61001"]);
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let a = agent.endpoint_create("a", "blue", &[]);
    let server = peer_echo_server(topo.outside(), SocketAddrV4::new(OUTSIDE_IP, TCP_PORT));
    for i in 0..CONNS {
        let conn = tcp_connect(&a.netns, server.addr(), CONNECT_TIMEOUT)
            .unwrap_or_else(|e| panic!("connection {i} of {CONNS}: {e}"));
        let data = Pattern::bytes(i as u64, 1024);
        assert_eq!(
            echo_exchange(&conn, &data).expect("echo"),
            Digest::of(&data)
        );
        close_echo(&conn).expect("closing");
        server.next_report(IO_TIMEOUT);
    }
    let nat = agent.nat_status();
    assert!(
        nat.closed_reused >= (CONNS - 2) as u64 && nat.ports_exhausted == 0,
        "status: {}",
        nat_text(&nat)
    );
}
