//! Published ports with real packets: TCP and UDP reached from the outside namespace through
//! the host's uplink address, from the host itself (its uplink address and loopback), and from
//! endpoints on the same host (hairpin, also to themselves); `--allow` enforced before any
//! translation; ranges; a thousand concurrent connections with data verified; ports that are
//! taken, in the masquerade range, the overlay's VXLAN port or listened on by the host refused
//! with no change of state; publish and unpublish on a running endpoint; a removed endpoint's
//! ports freed for another; published ports kept across kill -9 and restart. Replies to outside clients leave without the host's forwarding.
//!
//! Hosts in the topology have no default route, so every agent here is told its uplink.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use net_tests::{
    Agent, EndpointExt, Host, Topology,
    api::PublishedPort,
    nat::{
        NatExt, PeerEchoServer, close_all_and_check, close_echo, echo_exchange, echo_on_all,
        flows_text, open_concurrently, peer_echo_server, raise_nofile,
    },
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

/// An agent on `host` with its uplink, and the network `blue` (10.10.0.0/24) every test here
/// puts its endpoints on.
fn start_with_blue(host: &Host) -> Agent<'_> {
    let agent = host.start_agent_with(&["--uplink", UPLINK]);
    agent.network_create("blue", "10.10.0.0/24", &[]);
    agent
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

/// The host's `net.ipv4.ip_local_reserved_ports`, entry by entry.
fn reserved_ports(host: &Host) -> Vec<String> {
    net_tests::in_netns(host.netns(), || {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports")
    })
    .expect("reading the reserved ports")
    .trim()
    .split(',')
    .map(str::to_owned)
    .collect()
}

fn refused(netns: &str, to: SocketAddr) -> bool {
    tcp_connect(netns, to, REFUSED_CONNECT).is_err()
}

#[test]
fn a_published_port_is_reached_from_outside_from_the_host_and_by_hairpin() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    let agent = start_with_blue(host);
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

    // From the outside: the endpoint sees the client's own address. Its replies leave through
    // the uplink straight from `tc_from_endpoint`, not through the host's IP forwarding.
    let forwarded = host.forwarded_packets();
    let peer = echo_through(
        topo.outside(),
        published,
        &server,
        "outside -> published port",
    );
    assert_eq!(peer.ip(), OUTSIDE_IP, "the endpoint saw {peer}");
    assert_eq!(
        host.forwarded_packets() - forwarded,
        0,
        "the host forwarded packets of a connection from outside to a published port"
    );

    // From the host itself, to its uplink address.
    let peer = echo_through(host.netns(), published, &server, "host -> its own address");
    assert_eq!(peer.ip(), host_ip, "the endpoint saw {peer}");

    // From the host, to its loopback: the endpoint sees its gateway, not 127.0.0.1.
    let loopback = sock(Ipv4Addr::LOCALHOST, HOST_PORT);
    let peer = echo_through(host.netns(), loopback, &server, "host -> 127.0.0.1");
    let gateway = web.primary().expect("web's interface").gateway;
    assert_eq!(peer.ip(), gateway, "the endpoint saw {peer}");

    // Hairpin from another endpoint, and from the endpoint to itself: the endpoint sees its
    // gateway, as behind Docker's default proxy.
    let peer = echo_through(
        &client.netns,
        published,
        &server,
        "client -> published port",
    );
    assert_eq!(peer.ip(), gateway, "the endpoint saw {peer}");
    let peer = echo_through(&web.netns, published, &server, "web -> its own port");
    assert_eq!(peer.ip(), gateway, "the endpoint saw {peer}");
    // Also through the gateway address, which is the host's too.
    let via_gateway = sock(gateway, HOST_PORT);
    let peer = echo_through(
        &client.netns,
        via_gateway,
        &server,
        "client -> gateway:port",
    );
    assert_eq!(peer.ip(), gateway, "the endpoint saw {peer}");

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
    assert!(
        udp_echoed(&client.netns, udp_published, b"by hairpin"),
        "no UDP echo through {udp_published} for the client endpoint"
    );

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

#[test]
fn allow_lists_admit_their_sources_and_drop_the_rest_before_translation() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    let agent = start_with_blue(host);
    let outside_only = format!("{}/32", OUTSIDE_IP);
    let web = agent.endpoint_create(
        "web",
        "blue",
        &[
            "--publish",
            &format!("{HOST_PORT}:{WEB_PORT}"),
            "--allow",
            &outside_only,
        ],
    );
    // A second port whose list leaves the outside namespace out.
    agent.netctl_ok(&[
        "port",
        "publish",
        "web",
        &format!("{}:{WEB_PORT}", HOST_PORT + 1),
        "--allow",
        "192.0.2.0/24",
    ]);
    let host_ip = host.underlay_ip();
    let server = peer_echo_server(&web.netns, SocketAddrV4::new(web.ip(), WEB_PORT));

    let peer = echo_through(
        topo.outside(),
        sock(host_ip, HOST_PORT),
        &server,
        "an allowed source",
    );
    assert_eq!(peer.ip(), OUTSIDE_IP);

    let denied = sock(host_ip, HOST_PORT + 1);
    let before = agent.nat_status();
    assert!(
        tcp_connect(topo.outside(), denied, REFUSED_CONNECT).is_err(),
        "a source outside the allow list reached {denied}"
    );
    // The host itself is not on that list either.
    assert!(tcp_connect(host.netns(), denied, REFUSED_CONNECT).is_err());
    let after = agent.nat_status();
    let not_allowed = |drops: &[net_tests::api::DropCount]| -> u64 {
        drops
            .iter()
            .filter(|d| d.reason == "not-allowed")
            .map(|d| d.packets)
            .sum()
    };
    assert!(
        not_allowed(&after.uplink_drops) > not_allowed(&before.uplink_drops),
        "no not-allowed drop counted at the uplink: {:?}",
        after.uplink_drops
    );
    assert!(
        not_allowed(&after.loopback_drops) > not_allowed(&before.loopback_drops),
        "no not-allowed drop counted at the loopback: {:?}",
        after.loopback_drops
    );
    // Checked before translation: a denied connection leaves no flow behind.
    let flows = agent.ct_list(&["--port", &(HOST_PORT + 1).to_string()]);
    assert!(flows.is_empty(), "flows:\n{}", flows_text(&flows));

    let listed = agent.netctl_ok(&["bpf", "nat", "list"]);
    for needle in [outside_only.as_str(), "192.0.2.0/24"] {
        assert!(
            listed.contains(needle),
            "`bpf nat list` lacks {needle}:\n{listed}"
        );
    }
}

#[test]
fn ranges_publish_one_port_per_position() {
    const FIRST: u16 = 9000;
    const COUNT: u16 = 3;
    let topo = Topology::new(1);
    let host = topo.host(1);
    let agent = start_with_blue(host);
    let spec = format!(
        "{FIRST}-{}:{}-{}",
        FIRST + COUNT - 1,
        WEB_PORT,
        WEB_PORT + COUNT - 1
    );
    let web = agent.endpoint_create("web", "blue", &["--publish", &spec]);
    let ports: Vec<PublishedPort> = agent.netctl_json(&["port", "ls", "web"]);
    assert_eq!(
        ports
            .iter()
            .map(|p| (p.host_port, p.port))
            .collect::<Vec<_>>(),
        (0..COUNT)
            .map(|i| (FIRST + i, WEB_PORT + i))
            .collect::<Vec<_>>()
    );
    for i in 0..COUNT {
        let server = peer_echo_server(&web.netns, SocketAddrV4::new(web.ip(), WEB_PORT + i));
        let peer = echo_through(
            topo.outside(),
            sock(host.underlay_ip(), FIRST + i),
            &server,
            &format!("port {} of the range", FIRST + i),
        );
        assert_eq!(peer.ip(), OUTSIDE_IP);
    }
}

#[test]
fn ports_publish_and_unpublish_on_a_running_endpoint() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    let agent = start_with_blue(host);
    let web = agent.endpoint_create("web", "blue", &[]);
    let published = sock(host.underlay_ip(), HOST_PORT);
    let server = peer_echo_server(&web.netns, SocketAddrV4::new(web.ip(), WEB_PORT));
    assert!(
        refused(topo.outside(), published),
        "reachable before publishing"
    );

    let added: Vec<PublishedPort> =
        agent.netctl_json(&["port", "publish", "web", &format!("{HOST_PORT}:{WEB_PORT}")]);
    assert_eq!(added.len(), 1, "{added:?}");
    // Reserved: the host never picks it as the source port of a connection of its own, whose
    // replies would then be taken for connections to the published port.
    assert!(
        reserved_ports(host).contains(&HOST_PORT.to_string()),
        "{HOST_PORT} is not reserved: {:?}",
        reserved_ports(host)
    );
    echo_through(topo.outside(), published, &server, "after publishing");
    let inspected = agent.endpoint_inspect("web");
    assert_eq!(
        inspected.published, added,
        "endpoint inspect shows the ports"
    );

    // A connection under way when the port goes keeps working; new ones find no port.
    let conn = tcp_connect(topo.outside(), published, CONNECT_TIMEOUT).expect("connecting");
    let removed: Vec<PublishedPort> =
        agent.netctl_json(&["port", "unpublish", "web", &HOST_PORT.to_string()]);
    assert_eq!(removed, added);
    let data = Pattern::bytes(7, 16 * KIB);
    assert_eq!(
        echo_exchange(&conn, &data).expect("echo on the open connection"),
        Digest::of(&data)
    );
    close_echo(&conn).expect("closing");
    server.next_report(IO_TIMEOUT);
    assert!(
        refused(topo.outside(), published),
        "reachable after unpublishing"
    );
    let listed: Vec<PublishedPort> = agent.netctl_json(&["port", "ls"]);
    assert!(listed.is_empty(), "{listed:?}");
    assert!(
        !reserved_ports(host).contains(&HOST_PORT.to_string()),
        "{HOST_PORT} is still reserved"
    );
    let in_map: Vec<net_tests::api::BpfPublishedEntry> = agent.netctl_json(&["bpf", "nat", "list"]);
    assert!(in_map.is_empty(), "{in_map:?}");
}

#[test]
fn taken_ports_and_bad_requests_are_refused_without_a_change() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    let agent = start_with_blue(host);
    agent.endpoint_create(
        "web",
        "blue",
        &["--publish", &format!("{HOST_PORT}:{WEB_PORT}")],
    );
    agent.endpoint_create("other", "blue", &[]);
    let taken = format!("{HOST_PORT}:81");
    agent.assert_refused(
        &[
            "endpoint",
            "create",
            "b",
            "--network",
            "blue",
            "--publish",
            &taken,
        ],
        &["8080/tcp", "already published", "web"],
    );
    agent.assert_refused(
        &[
            "port",
            "publish",
            "other",
            &format!("198.18.0.1:{HOST_PORT}:80"),
        ],
        &["already published", "web"],
    );
    agent.assert_refused(
        &["port", "publish", "other", "61000:80"],
        &["masquerade", "--nat-ports"],
    );
    agent.assert_refused(
        &["port", "publish", "other", "4789:80/udp"],
        &["4789/udp", "VXLAN"],
    );
    agent.assert_refused(
        &["port", "publish", "other", "9100:80", "9100:81"],
        &["9100/tcp", "twice"],
    );
    // A port the host itself listens on.
    let _listener = net_tests::in_netns(host.netns(), || {
        std::net::TcpListener::bind(("0.0.0.0", 9090)).expect("a host listener")
    });
    agent.assert_refused(
        &["port", "publish", "other", "9090:80"],
        &["9090/tcp", "listens"],
    );
    for (spec, mentions) in [
        ("80", &["HOSTPORT:PORT"][..]),
        ("8000-8010:80", &["must match"][..]),
        ("8080:80/sctp", &["sctp"][..]),
        ("0:80", &["host port 0"][..]),
    ] {
        agent.assert_refused(&["port", "publish", "other", spec], mentions);
    }
    agent.assert_refused(
        &["port", "publish", "other", "9200:80", "--allow", "nope"],
        &["--allow", "nope"],
    );
    agent.assert_refused(
        &[
            "endpoint",
            "create",
            "c",
            "--network",
            "blue",
            "--allow",
            "10.0.0.0/8",
        ],
        &["--allow", "--publish"],
    );
    agent.assert_refused(
        &[
            "endpoint",
            "create",
            "h",
            "--mode",
            "host",
            "--publish",
            "9300:80",
        ],
        &["host", "--publish"],
    );
    agent.assert_refused(
        &["port", "unpublish", "other", "9400"],
        &["9400/tcp", "not found"],
    );
    agent.assert_refused(&["port", "publish", "ghost", "9500:80"], &["ghost"]);
    // The refused creations took no ids: the next endpoint and its veth number on from `other`.
    let other = agent.endpoint_inspect("other");
    let next = agent.endpoint_create("next", "blue", &[]);
    assert_eq!(
        next.id,
        other.id + 1,
        "endpoint ids: {other:?} then {next:?}"
    );
    let veth_number = |e: &net_tests::api::Endpoint| -> u32 {
        let name = &e.interfaces[0].host_ifname;
        // The agent's prefix, then the interface id.
        name[name.trim_end_matches(|c: char| c.is_ascii_digit()).len()..]
            .parse()
            .unwrap_or_else(|_| panic!("host veth {name} ends in no number"))
    };
    assert_eq!(veth_number(&next), veth_number(&other) + 1);
}

#[test]
fn a_removed_endpoints_ports_go_with_it_and_are_free_again() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    let agent = start_with_blue(host);
    agent.endpoint_create(
        "web",
        "blue",
        &[
            "--publish",
            &format!("{HOST_PORT}:{WEB_PORT}"),
            "--publish",
            "9000-9002:9000-9002/udp",
            // Before 8080 by port, after it by protocol: both lists show one order.
            "--publish",
            "7000:7000/udp",
        ],
    );
    let api = agent.endpoint_create("api", "blue", &[]);
    let spec = format!("{HOST_PORT}:{WEB_PORT}");
    agent.assert_refused(
        &["port", "publish", "api", &spec],
        &[&HOST_PORT.to_string(), "web"],
    );
    net_tests::assert_consistent(&agent);

    agent.endpoint_rm("web");
    let listed: Vec<PublishedPort> = agent.netctl_json(&["port", "ls"]);
    assert!(listed.is_empty(), "{listed:?}");
    let reserved = reserved_ports(host);
    assert!(
        !reserved.contains(&HOST_PORT.to_string())
            && !reserved.iter().any(|r| r.starts_with("900")),
        "still reserved: {reserved:?}"
    );
    net_tests::assert_consistent(&agent);

    // Free for another endpoint, and reached through it.
    let added: Vec<PublishedPort> = agent.netctl_json(&["port", "publish", "api", &spec]);
    assert_eq!(added.len(), 1, "{added:?}");
    let server = peer_echo_server(&api.netns, SocketAddrV4::new(api.ip(), WEB_PORT));
    echo_through(
        topo.outside(),
        sock(host.underlay_ip(), HOST_PORT),
        &server,
        "to the port's new endpoint",
    );
    net_tests::assert_consistent(&agent);
}

#[test]
fn published_ports_survive_kill_9_and_restart() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    let mut agent = start_with_blue(host);
    let web = agent.endpoint_create(
        "web",
        "blue",
        &[
            "--publish",
            &format!("{HOST_PORT}:{WEB_PORT}"),
            "--allow",
            "198.18.0.0/24",
        ],
    );
    let published = sock(host.underlay_ip(), HOST_PORT);
    let server = peer_echo_server(&web.netns, SocketAddrV4::new(web.ip(), WEB_PORT));
    let conn = tcp_connect(topo.outside(), published, CONNECT_TIMEOUT).expect("connecting");
    let ports_before: Vec<PublishedPort> = agent.netctl_json(&["port", "ls"]);

    agent.kill9();
    // The data plane goes on without the agent: the open connection and new ones.
    let data = Pattern::bytes(9, 16 * KIB);
    assert_eq!(
        echo_exchange(&conn, &data).expect("echo while the agent is down"),
        Digest::of(&data)
    );
    echo_through(
        topo.outside(),
        published,
        &server,
        "a new connection, agent down",
    );

    agent.restart();
    let ports_after: Vec<PublishedPort> = agent.netctl_json(&["port", "ls"]);
    assert_eq!(ports_after, ports_before);
    assert_eq!(
        echo_exchange(&conn, &data).expect("echo after the restart"),
        Digest::of(&data)
    );
    close_echo(&conn).expect("closing");
    server.next_report(IO_TIMEOUT);
    echo_through(topo.outside(), published, &server, "after the restart");
    net_tests::assert_consistent(&agent);
}

#[test]
fn a_thousand_concurrent_connections_through_a_published_port() {
    const CONNS: usize = 1000;
    const THREADS: usize = 4;
    const PER_CONN: usize = 8 * KIB;
    // Both ends of every connection live in this process, next to other tests' sockets.
    raise_nofile(4 * CONNS as u64 + 1024);
    let topo = Topology::new(1);
    let host = topo.host(1);
    let agent = start_with_blue(host);
    let web = agent.endpoint_create(
        "web",
        "blue",
        &["--publish", &format!("{HOST_PORT}:{WEB_PORT}")],
    );
    let server = peer_echo_server(&web.netns, SocketAddrV4::new(web.ip(), WEB_PORT));
    let published = sock(host.underlay_ip(), HOST_PORT);

    let conns = open_concurrently(topo.outside(), published, CONNS, THREADS);
    let sent = echo_on_all(&conns, PER_CONN, THREADS);
    // While all are open: every one is its own flow, each seen by the endpoint as the client.
    let peers = server.peers();
    assert_eq!(peers.len(), CONNS);
    assert!(peers.iter().all(|p| p.ip() == OUTSIDE_IP));
    let flows = agent.ct_list(&["--proto", "tcp", "--port", &HOST_PORT.to_string()]);
    assert_eq!(flows.len(), CONNS, "published flows listed");
    assert!(
        flows
            .iter()
            .all(|f| f.kind == "published" && f.state == "established"),
        "{}",
        flows_text(&flows)
    );
    assert!(agent.nat_status().published_flows >= CONNS as u64);
    close_all_and_check(&conns, &server, &sent);
}

#[test]
fn netctl_run_publishes_for_as_long_as_the_command_runs() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    let agent = start_with_blue(host);
    // A run's ports go with its endpoint when the command exits, whatever its status.
    let out = agent.netctl_run(
        &[
            "--network",
            "blue",
            "--name",
            "job",
            "-p",
            "8090:80/udp",
            "--",
            "sh",
            "-c",
            "exit 3",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(3), "{out}");
    let ports: Vec<PublishedPort> = agent.netctl_json(&["port", "ls"]);
    assert!(ports.is_empty(), "the run's port outlived it: {ports:?}");
    let in_map: Vec<net_tests::api::BpfPublishedEntry> = agent.netctl_json(&["bpf", "nat", "list"]);
    assert!(in_map.is_empty(), "{in_map:?}");

    let out = agent.netctl_run(
        &[
            "-d",
            "--network",
            "blue",
            "--name",
            "svc",
            "-p",
            "8091:80",
            "--",
            "sleep",
            "600",
        ],
        None,
    );
    assert!(out.success(), "{out}");
    let ports: Vec<PublishedPort> = agent.netctl_json(&["port", "ls", "svc"]);
    assert_eq!(ports.len(), 1, "{ports:?}");
    let refused_out = agent.netctl_run(&["--net", "host", "-p", "8092:80", "--", "true"], None);
    assert!(
        !refused_out.success() && refused_out.stderr.contains("--net host"),
        "{refused_out}"
    );
    agent.endpoint_rm("svc");
}
