//! One simulated host, one agent, real endpoints and real packets: forwarding between endpoints
//! on a network, isolation between networks, host access, anti-spoofing, inspection, namespace
//! adoption, address management and MTU.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use net_tests::{
    DropReason, EndpointExt, TIMEOUT, Topology,
    api::{BpfCounters, BpfEndpointEntry, DropCount, Endpoint, EndpointStats},
    assert_consistent, drop_count, exec_in, exec_in_ok,
    frames::{Arp, BROADCAST, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, Udp4, mac, raw_frame, send_frame},
    netns::{add_netns, link, links, netns_path, ping, routes},
    run_ok,
    topology::{OUTSIDE_IP, UPLINK},
    traffic::{
        sock, tcp_connect, tcp_echo_server, tcp_send_verify, udp_blast, udp_echo_server,
        udp_roundtrip, udp_socket,
    },
    wait_until,
};

const TCP_PORT: u16 = 7000;
const UDP_PORT: u16 = 7001;
const MIB: usize = 1 << 20;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("test address")
}

/// Whether one UDP request from `from` reaches `to`'s echo server and comes back.
fn udp_works(from: &Endpoint, server: &net_tests::traffic::UdpEchoServer) -> bool {
    udp_roundtrip(&from.netns, None, server.addr(), 5, Duration::from_secs(1))
}

fn stats_text(stats: &EndpointStats) -> String {
    serde_json::to_string_pretty(stats).expect("stats as JSON")
}

#[test]
fn endpoints_on_one_network_exchange_tcp_and_udp() {
    let topo = Topology::new(1);
    let agent = topo.host(1).start_agent();
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let a = agent.endpoint_create("a", "blue", &[]);
    let b = agent.endpoint_create("b", "blue", &[]);

    // 1 MiB each way on each connection (echoed), checked by digest on both sides.
    let server_b = tcp_echo_server(&b.netns, sock(b.ip(), TCP_PORT));
    tcp_send_verify(&a.netns, &server_b, MIB);
    let server_a = tcp_echo_server(&a.netns, sock(a.ip(), TCP_PORT));
    tcp_send_verify(&b.netns, &server_a, MIB);

    let udp_b = udp_echo_server(&b.netns, sock(b.ip(), UDP_PORT));
    assert!(udp_works(&a, &udp_b), "UDP from a to b got no reply");
    assert!(udp_b.received_from(a.ip()) >= 1);
    let udp_a = udp_echo_server(&a.netns, sock(a.ip(), UDP_PORT));
    assert!(udp_works(&b, &udp_a), "UDP from b to a got no reply");
    assert!(ping(&a.netns, b.ip()), "ping from a to b");

    // The counters saw the megabytes, and nothing was dropped as a violation.
    for name in ["a", "b"] {
        let stats = agent.endpoint_stats(name);
        let text = stats_text(&stats);
        assert_eq!(stats.name, name);
        assert!(
            stats.from_endpoint.bytes >= 2 * MIB as u64,
            "{name} sent 2 MiB of payload; stats: {text}"
        );
        assert!(
            stats.to_endpoint.bytes >= 2 * MIB as u64,
            "{name} received 2 MiB of payload; stats: {text}"
        );
        for reason in [
            DropReason::SpoofedSourceIp,
            DropReason::SpoofedSourceMac,
            DropReason::NetworkIsolation,
        ] {
            assert_eq!(drop_count(&stats, reason), 0, "{name}: {text}");
        }
    }
}

#[test]
fn a_removed_endpoints_counter_slot_goes_to_the_next_endpoint_counted_from_zero() {
    let topo = Topology::new(1);
    let agent = topo.host(1).start_agent();
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let a = agent.endpoint_create("a", "blue", &[]);
    let b = agent.endpoint_create("b", "blue", &[]);
    let server_b = tcp_echo_server(&b.netns, sock(b.ip(), TCP_PORT));
    tcp_send_verify(&a.netns, &server_b, MIB);
    assert!(agent.endpoint_stats("a").from_endpoint.bytes >= MIB as u64);
    let slot_of = |ip: Ipv4Addr| {
        agent
            .bpf_endpoints()
            .into_iter()
            .find(|e| e.ip == ip)
            .unwrap_or_else(|| panic!("no ENDPOINTS entry for {ip}"))
            .slot
    };
    let a_slot = slot_of(a.ip());

    agent.endpoint_rm("a");
    let c = agent.endpoint_create("c", "blue", &[]);
    assert_eq!(slot_of(c.ip()), a_slot, "c takes the slot a gave back");
    let stats = agent.endpoint_stats("c");
    assert!(
        stats.from_endpoint.bytes < MIB as u64 && stats.to_endpoint.bytes < MIB as u64,
        "c starts from zero, not from a's megabyte: {}",
        stats_text(&stats)
    );
    tcp_send_verify(&c.netns, &server_b, 64 * 1024);
    let stats = agent.endpoint_stats("c");
    assert!(
        stats.from_endpoint.bytes >= 64 * 1024,
        "c's own traffic is counted in the slot: {}",
        stats_text(&stats)
    );
    let stats = agent.endpoint_stats("b");
    assert!(
        stats.to_endpoint.bytes >= MIB as u64 + 64 * 1024,
        "b kept its slot and its counts: {}",
        stats_text(&stats)
    );
}

#[test]
fn endpoints_on_different_networks_cannot_reach_each_other() {
    let topo = Topology::new(1);
    let agent = topo.host(1).start_agent();
    agent.network_create("blue", "10.10.0.0/24", &[]);
    agent.network_create("red", "10.20.0.0/24", &[]);
    let a = agent.endpoint_create("a", "blue", &[]);
    let b = agent.endpoint_create("b", "blue", &[]);
    let c = agent.endpoint_create("c", "red", &[]);
    let d = agent.endpoint_create("d", "red", &[]);

    let server_a = tcp_echo_server(&a.netns, sock(a.ip(), TCP_PORT));
    let udp_a = udp_echo_server(&a.netns, sock(a.ip(), UDP_PORT));
    let server_c = tcp_echo_server(&c.netns, sock(c.ip(), TCP_PORT));
    // Each network works on its own.
    tcp_send_verify(&b.netns, &server_a, 64 * 1024);
    tcp_send_verify(&d.netns, &server_c, 64 * 1024);

    // red -> blue: TCP connect fails within its timeout, ping and UDP get no answer.
    let start = Instant::now();
    let connect_timeout = Duration::from_secs(2);
    let attempt = tcp_connect(&c.netns, server_a.addr(), connect_timeout);
    assert!(
        attempt.is_err(),
        "c (red) opened a TCP connection to a (blue): {attempt:?}"
    );
    assert!(
        start.elapsed() < connect_timeout + Duration::from_secs(3),
        "the refused connect took {:?}",
        start.elapsed()
    );
    assert!(!ping(&c.netns, a.ip()), "c (red) pinged a (blue)");
    assert!(
        !udp_roundtrip(&c.netns, None, udp_a.addr(), 2, Duration::from_millis(500)),
        "c (red) got a UDP reply from a (blue)"
    );
    assert_eq!(udp_a.received_from(c.ip()), 0, "a received UDP from c");

    // blue -> red as well.
    let attempt = tcp_connect(&a.netns, server_c.addr(), connect_timeout);
    assert!(
        attempt.is_err(),
        "a (blue) opened a TCP connection to c (red): {attempt:?}"
    );

    // Both senders' drops are counted under the isolation reason.
    for name in ["c", "a"] {
        wait_until(
            TIMEOUT,
            format!("endpoint stats {name} to count network-isolation drops"),
            || drop_count(&agent.endpoint_stats(name), DropReason::NetworkIsolation) > 0,
        );
    }
    // Same-network traffic still flows.
    tcp_send_verify(&b.netns, &server_a, 64 * 1024);
}

#[test]
fn endpoints_of_a_network_without_icc_reach_the_host_but_not_each_other() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    let mut agent = host.start_agent_with(&["--uplink", net_tests::topology::UPLINK]);
    let quiet = agent.network_create("quiet", "10.30.0.0/24", &["--no-icc"]);
    assert!(!quiet.icc, "{quiet:?}");
    let blue = agent.network_create("blue", "10.10.0.0/24", &[]);
    assert!(blue.icc, "{blue:?}");
    let a = agent.endpoint_create("a", "quiet", &[]);
    let b = agent.endpoint_create("b", "quiet", &[]);
    let c = agent.endpoint_create("c", "blue", &[]);
    let d = agent.endpoint_create("d", "blue", &[]);
    let server_b = tcp_echo_server(&b.netns, sock(b.ip(), TCP_PORT));
    let server_d = tcp_echo_server(&d.netns, sock(d.ip(), TCP_PORT));
    // A server in the host's own namespace, on its address.
    let server_host = tcp_echo_server(host.netns(), sock(host.underlay_ip(), TCP_PORT));

    let refused = |what: &str| {
        let attempt = tcp_connect(&a.netns, server_b.addr(), Duration::from_secs(1));
        assert!(
            attempt.is_err(),
            "{what}: a reached b on quiet: {attempt:?}"
        );
        assert!(!ping(&b.netns, a.ip()), "{what}: b pinged a on quiet");
    };
    refused("first");
    wait_until(TIMEOUT, "a's refused packets to be counted", || {
        drop_count(&agent.endpoint_stats("a"), DropReason::IccDisabled) > 0
    });
    // The host and a network with inter-endpoint traffic: as ever.
    tcp_send_verify(&a.netns, &server_host, 64 * 1024);
    tcp_send_verify(&b.netns, &server_host, 64 * 1024);
    tcp_send_verify(&c.netns, &server_d, 64 * 1024);
    assert!(ping(&a.netns, host.underlay_ip()), "a cannot ping the host");
    // b's published port through the host's address (hairpin), as through Docker's proxy.
    agent.netctl_ok(&["port", "publish", "b", &format!("8080:{TCP_PORT}")]);
    let published = std::net::SocketAddr::from((host.underlay_ip(), 8080));
    tcp_connect(&a.netns, published, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("a to b's published port through the host: {e}"));
    let text = agent.netctl_ok(&["network", "inspect", "quiet"]);
    assert!(text.contains("icc:        no"), "{text}");

    // The choice is the network's, kept across a restart.
    agent.restart();
    assert!(!agent.network_inspect("quiet").icc);
    refused("after a restart");
    tcp_send_verify(&c.netns, &server_d, 64 * 1024);
}

#[test]
fn endpoints_of_an_internal_network_reach_each_other_and_the_host_only() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    let mut agent = host.start_agent_with(&["--uplink", UPLINK]);
    let internal = agent.network_create("inner", "10.40.0.0/24", &["--internal"]);
    assert!(internal.internal && !internal.masquerade, "{internal:?}");
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let i = agent.endpoint_create("i", "inner", &[]);
    let j = agent.endpoint_create("j", "inner", &[]);
    let c = agent.endpoint_create("c", "blue", &[]);
    // The outside could route to the internal network through the host; it must not get in.
    #[rustfmt::skip]
    run_ok("ip", &[
        "-n", topo.outside(), "route", "add", "10.40.0.0/24", "via", &host.underlay_ip().to_string(),
    ]);
    let server_j = tcp_echo_server(&j.netns, sock(j.ip(), TCP_PORT));
    let server_i = tcp_echo_server(&i.netns, sock(i.ip(), TCP_PORT));
    let server_host = tcp_echo_server(host.netns(), sock(host.underlay_ip(), TCP_PORT));
    let server_outside = tcp_echo_server(topo.outside(), sock(OUTSIDE_IP, TCP_PORT));
    let udp_outside = udp_echo_server(topo.outside(), sock(OUTSIDE_IP, UDP_PORT));
    let udp_i = udp_echo_server(&i.netns, sock(i.ip(), UDP_PORT));
    let server_c = tcp_echo_server(&c.netns, sock(c.ip(), TCP_PORT));
    // Its own server: a connection that only tests a path to c must not be taken for server_c's.
    let _published_c = tcp_echo_server(&c.netns, sock(c.ip(), TCP_PORT + 10));
    agent.netctl_ok(&["port", "publish", "c", &format!("8080:{}", TCP_PORT + 10)]);
    let c_published = std::net::SocketAddr::from((host.underlay_ip(), 8080));
    // The host's own DNAT rules (as Docker's or kube-proxy's would be), to c and to the outside.
    let dnat_to_c = std::net::SocketAddr::from((host.underlay_ip(), 9090));
    let dnat_to_outside = std::net::SocketAddr::from((host.underlay_ip(), 9091));
    for (port, to) in [
        (9090, sock(c.ip(), TCP_PORT + 10)),
        (9091, sock(OUTSIDE_IP, TCP_PORT)),
    ] {
        #[rustfmt::skip]
        exec_in_ok(host.netns(), &[
            "iptables", "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", &port.to_string(),
            "-j", "DNAT", "--to-destination", &to.to_string(),
        ]);
    }
    let confined = |agent: &net_tests::Agent<'_>, what: &str| {
        let internal_drops = || drop_count(&agent.endpoint_stats("i"), DropReason::InternalNetwork);
        // Its own network, the host's address, and the host's own connections to it.
        tcp_send_verify(&i.netns, &server_j, 64 * 1024);
        tcp_send_verify(&i.netns, &server_host, 64 * 1024);
        assert!(
            ping(&i.netns, host.underlay_ip()),
            "{what}: i cannot ping the host"
        );
        tcp_send_verify(host.netns(), &server_i, 64 * 1024);
        // One way only, so that each direction's check is seen on its own (a connection also
        // fails when only its replies are dropped), and first, while no other drop of i's can
        // be on its way to the counter: datagrams out, dropped as they leave i, and datagrams
        // in, routed by the outside through the host, dropped before i.
        let received_outside = || udp_outside.received_from(i.ip());
        let received_by_i = || udp_i.received_from(OUTSIDE_IP);
        let one_way: [(&str, &str, _, &dyn Fn() -> usize); 2] = [
            (
                "out of i",
                i.netns.as_str(),
                udp_outside.addr(),
                &received_outside,
            ),
            ("into i", topo.outside(), udp_i.addr(), &received_by_i),
        ];
        for (direction, from, to, received) in one_way {
            let sent = 5;
            let before = internal_drops();
            let socket = udp_socket(from, None);
            for _ in 0..sent {
                socket.send_to(b"one way", to).expect("sending");
            }
            wait_until(
                TIMEOUT,
                format!("{what}: datagrams {direction} to be counted"),
                || internal_drops() >= before + sent,
            );
            assert_eq!(
                received(),
                0,
                "{what}: datagrams {direction} were delivered"
            );
        }
        // Nothing the host would forward: the outside, another network's published port, and
        // what the host's own netfilter rewrites to either after the data plane let it through
        // to a host address (the host stack forwards nothing from i's veth).
        for to in [
            server_outside.addr(),
            c_published,
            dnat_to_c,
            dnat_to_outside,
        ] {
            let attempt = tcp_connect(&i.netns, to, Duration::from_secs(1));
            assert!(attempt.is_err(), "{what}: i reached {to}: {attempt:?}");
        }
        assert!(!ping(&i.netns, OUTSIDE_IP), "{what}: i pinged the outside");
        let forwarding = format!("net.ipv4.conf.{}.forwarding", i.eth0().host_ifname);
        assert_eq!(
            exec_in_ok(host.netns(), &["sysctl", "-n", &forwarding]).trim(),
            "0",
            "{what}: {forwarding}"
        );
        // And whatever forwarding says, nothing from the network finds a route beyond the host.
        assert_eq!(
            unroutable_rules(host.netns(), "10.40.0.0/24"),
            1,
            "{what}: the network's unreachable rule"
        );
        let attempt = tcp_connect(topo.outside(), server_i.addr(), Duration::from_secs(1));
        assert!(
            attempt.is_err(),
            "{what}: the outside reached i: {attempt:?}"
        );
    };
    confined(&agent, "first");
    // A write of the host-wide setting turns every device's forwarding on (c's stays so), the
    // internal veths' too: the agent turns theirs off again.
    for value in ["0", "1"] {
        let setting = format!("net.ipv4.ip_forward={value}");
        exec_in_ok(host.netns(), &["sysctl", "-qw", &setting]);
    }
    let forwarding_of = |e: &net_tests::api::Endpoint| {
        let setting = format!("net.ipv4.conf.{}.forwarding", e.eth0().host_ifname);
        exec_in_ok(host.netns(), &["sysctl", "-n", &setting])
            .trim()
            .to_owned()
    };
    assert_eq!(
        forwarding_of(&c),
        "1",
        "the toggle left c's veth not forwarding"
    );
    wait_until(
        TIMEOUT,
        "the agent to turn i's forwarding off again",
        || forwarding_of(&i) == "0",
    );
    // The rules work for others: the outside reaches c through the first.
    tcp_connect(topo.outside(), dnat_to_c, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("the outside to c through the host's DNAT rule: {e}"));
    // The port itself works, from the host; and blue's endpoint reaches the outside as ever.
    tcp_connect(host.netns(), c_published, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("the host to c's published port: {e}"));
    tcp_send_verify(&c.netns, &server_outside, 64 * 1024);
    let text = agent.netctl_ok(&["network", "inspect", "inner"]);
    assert!(text.contains("internal:   yes"), "{text}");
    let flags: Vec<String> = agent
        .bpf_endpoints()
        .into_iter()
        .find(|e| e.ip == i.ip())
        .map(|e| e.flags)
        .unwrap_or_default();
    assert_eq!(flags, ["internal"], "i's ENDPOINTS flags");

    // Nothing outside the host reaches an internal address, so nothing is published to one.
    agent.assert_refused(
        &["port", "publish", "i", &format!("8081:{TCP_PORT}")],
        &["internal", "inner"],
    );
    agent.assert_refused(
        &[
            "endpoint",
            "create",
            "k",
            "--network",
            "inner",
            "-p",
            "8082:80",
        ],
        &["internal", "inner"],
    );

    // Connected to a network that is not internal as well, i goes out through that one, as a
    // Docker container's gateway is its first network that is not internal...
    agent.network_connect("blue", "i", &[]);
    let via_blue = format!(
        "default via {} dev eth1",
        agent.network_inspect("blue").gateway
    );
    assert!(
        routes(&i.netns).iter().any(|r| r.starts_with(&via_blue)),
        "i's routes with blue: {:?}",
        routes(&i.netns)
    );
    tcp_send_verify(&i.netns, &server_outside, 64 * 1024);
    tcp_send_verify(&i.netns, &server_c, 64 * 1024);
    assert_consistent(&agent);
    // ...and when it leaves, the default route is the internal network's again.
    agent.network_disconnect("blue", "i");
    let via_inner = format!("default via {} dev eth0", internal.gateway);
    assert!(
        routes(&i.netns).iter().any(|r| r.starts_with(&via_inner)),
        "i's routes without blue: {:?}",
        routes(&i.netns)
    );

    // The network stays internal across a restart.
    agent.restart();
    assert_consistent(&agent);
    assert!(agent.network_inspect("inner").internal);
    confined(&agent, "after a restart");
    // The network's rule goes with the network.
    for name in ["i", "j"] {
        agent.endpoint_rm(name);
    }
    agent.netctl_ok(&["network", "rm", "inner"]);
    assert_eq!(
        unroutable_rules(host.netns(), "10.40.0.0/24"),
        0,
        "the rule after the network's removal"
    );
}

/// How many `from SUBNET ... unreachable` rules the host's namespace has: the agent's rule
/// that leaves an internal network no route beyond the host.
fn unroutable_rules(netns: &str, subnet: &str) -> usize {
    exec_in_ok(netns, &["ip", "-4", "rule", "show", "from", subnet])
        .lines()
        .filter(|rule| rule.contains("unreachable"))
        .count()
}

/// Gives `socket` a loose source route through `hop`: the kernel then sends each datagram to
/// `hop`, with its real destination in the IP option (ip(7), `IP_OPTIONS`).
fn loose_source_route(socket: &std::net::UdpSocket, hop: Ipv4Addr) {
    use std::os::fd::AsRawFd as _;
    // LSRR (131), length 7, pointer 4, the one address: padded to 8 bytes by the kernel.
    let mut option = vec![131, 7, 4];
    option.extend_from_slice(&hop.octets());
    // SAFETY: a valid socket descriptor and a buffer of the given length.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_OPTIONS,
            option.as_ptr().cast(),
            option.len() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "IP_OPTIONS: {}", std::io::Error::last_os_error());
}

#[test]
fn source_routed_packets_cannot_carry_an_endpoint_past_isolation() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    // With an uplink, so with the host's IP forwarding on, as on any host that masquerades.
    let agent = host.start_agent_with(&["--uplink", net_tests::topology::UPLINK]);
    agent.network_create("blue", "10.10.0.0/24", &[]);
    agent.network_create("red", "10.20.0.0/24", &[]);
    let a = agent.endpoint_create("a", "blue", &[]);
    let c = agent.endpoint_create("c", "red", &[]);
    // A host that honours source routes as far as its own setting goes; the agent's veths say no.
    exec_in_ok(
        host.netns(),
        &["sysctl", "-qw", "net.ipv4.conf.all.accept_source_route=1"],
    );
    let veth_setting = format!("net.ipv4.conf.{}.accept_source_route", a.eth0().host_ifname);
    assert_eq!(
        exec_in_ok(host.netns(), &["sysctl", "-n", &veth_setting]).trim(),
        "0"
    );

    // From a, through the host's address, on to c on another network.
    let _server = udp_echo_server(&c.netns, sock(c.ip(), UDP_PORT));
    let sender = udp_socket(&a.netns, None);
    loose_source_route(&sender, host.underlay_ip());
    let to_c = sock(c.ip(), UDP_PORT);
    let delivered_to_c = || agent.endpoint_stats("c").to_endpoint.packets;
    let before = delivered_to_c();
    for _ in 0..5 {
        sender.send_to(b"source-routed", to_c).expect("sending");
    }
    // The host takes a's packets in order: once it has answered one sent after them, it has
    // dealt with them, and counted anything it forwarded into c on the way.
    let host_echo = udp_echo_server(host.netns(), sock(host.underlay_ip(), UDP_PORT));
    assert!(
        udp_works(&a, &host_echo),
        "a's packets to the host went unanswered"
    );
    assert_eq!(
        delivered_to_c(),
        before,
        "the host forwarded a's source-routed packets into c"
    );

    // Without the agent's setting on a's veth, the same packets do reach c: the check above
    // can fail.
    exec_in_ok(
        host.netns(),
        &["sysctl", "-qw", &format!("{veth_setting}=1")],
    );
    wait_until(TIMEOUT, "a source-routed packet to reach c", || {
        sender.send_to(b"source-routed", to_c).expect("sending");
        delivered_to_c() > before
    });
}

#[test]
fn host_reaches_its_endpoints() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    let agent = host.start_agent();
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let a = agent.endpoint_create("a", "blue", &[]);

    let expected_route = format!("{} dev {}", a.ip(), a.eth0().host_ifname);
    let host_routes = routes(host.netns());
    assert!(
        host_routes.iter().any(|r| r.starts_with(&expected_route)),
        "no route `{expected_route}` in {}: {host_routes:?}",
        host.netns()
    );
    let server = tcp_echo_server(&a.netns, sock(a.ip(), TCP_PORT));
    tcp_send_verify(host.netns(), &server, 256 * 1024);
    assert!(ping(host.netns(), a.ip()), "ping from the host to a");
}

#[test]
fn spoofed_source_ip_is_dropped_and_counted() {
    let topo = Topology::new(1);
    let agent = topo.host(1).start_agent();
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let a = agent.endpoint_create("a", "blue", &[]);
    let b = agent.endpoint_create("b", "blue", &[]);
    let c = agent.endpoint_create("c", "blue", &[]);
    let udp_b = udp_echo_server(&b.netns, sock(b.ip(), UDP_PORT));
    assert!(udp_works(&a, &udp_b), "UDP from a to b before spoofing");

    // An address nobody has, then the address of another endpoint (impersonation).
    for spoofed in [ip("10.10.0.99"), c.ip()] {
        exec_in_ok(
            &a.netns,
            &["ip", "addr", "add", &format!("{spoofed}/32"), "dev", "eth0"],
        );
        let before = drop_count(&agent.endpoint_stats("a"), DropReason::SpoofedSourceIp);
        udp_blast(&a.netns, Some(spoofed), udp_b.addr(), 20);
        wait_until(
            TIMEOUT,
            format!("a's spoofed-source-ip drops to grow after sending from {spoofed}"),
            || drop_count(&agent.endpoint_stats("a"), DropReason::SpoofedSourceIp) > before,
        );
        assert_eq!(
            udp_b.received_from(spoofed),
            0,
            "b received datagrams with the spoofed source {spoofed}"
        );
    }
    // The endpoint's own address still works.
    assert!(
        udp_roundtrip(
            &a.netns,
            Some(a.ip()),
            udp_b.addr(),
            5,
            Duration::from_secs(1)
        ),
        "UDP from a's own address after spoofing"
    );
    let stats = agent.endpoint_stats("a");
    assert_eq!(
        drop_count(&stats, DropReason::SpoofedSourceMac),
        0,
        "{}",
        stats_text(&stats)
    );
}

#[test]
fn spoofed_source_mac_is_dropped_and_counted() {
    let topo = Topology::new(1);
    let agent = topo.host(1).start_agent();
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let a = agent.endpoint_create("a", "blue", &[]);
    let b = agent.endpoint_create("b", "blue", &[]);
    let udp_b = udp_echo_server(&b.netns, sock(b.ip(), UDP_PORT));
    assert!(udp_works(&a, &udp_b), "UDP from a to b before spoofing");
    assert_eq!(link(&a.netns, "eth0").mac, a.eth0().mac, "a's eth0 MAC");

    exec_in_ok(
        &a.netns,
        &["ip", "link", "set", "eth0", "address", "02:00:00:00:00:99"],
    );
    let received = udp_b.received_from(a.ip());
    udp_blast(&a.netns, None, udp_b.addr(), 20);
    wait_until(
        TIMEOUT,
        "a's spoofed-source-mac drops to be counted",
        || drop_count(&agent.endpoint_stats("a"), DropReason::SpoofedSourceMac) > 0,
    );
    assert_eq!(
        udp_b.received_from(a.ip()),
        received,
        "b received datagrams sent with a spoofed source MAC"
    );

    // Back to its own MAC, the endpoint talks again.
    exec_in_ok(
        &a.netns,
        &["ip", "link", "set", "eth0", "address", &a.eth0().mac],
    );
    wait_until(TIMEOUT, "UDP from a to b with its MAC restored", || {
        udp_works(&a, &udp_b)
    });
}

#[test]
fn bpf_endpoints_list_reads_the_pinned_map_also_with_the_agent_stopped() {
    let topo = Topology::new(1);
    let mut agent = topo.host(1).start_agent();
    let blue = agent.network_create("blue", "10.10.0.0/24", &[]);
    let red = agent.network_create("red", "10.20.0.0/24", &["--no-icc"]);
    let a = agent.endpoint_create("a", "blue", &[]);
    let c = agent.endpoint_create("c", "red", &[]);

    // Fresh maps: the two veths get the two lowest counter slots, in the order they came.
    // Flags by name: both networks masquerade (the default), red lets no endpoint reach another.
    let entry = |e: &Endpoint, network_id: u32, slot: u32, flags: &[&str]| BpfEndpointEntry {
        ip: e.ip(),
        ifindex: e.eth0().host_ifindex,
        network_id,
        gateway: e.eth0().gateway,
        mac: e.eth0().mac.clone(),
        host_mac: e.eth0().host_mac.clone(),
        slot,
        flags: flags.iter().map(|f| (*f).to_owned()).collect(),
    };
    let expected = vec![
        entry(&a, blue.id, 0, &["masquerade"]),
        entry(&c, red.id, 1, &["masquerade", "no-icc"]),
    ];
    assert_ne!(blue.id, red.id, "networks need distinct ids");
    assert_ne!(
        a.eth0().host_ifindex,
        0,
        "endpoint a has no host ifindex: {a:?}"
    );
    assert_eq!(agent.bpf_endpoints(), expected);

    agent.stop();
    assert_eq!(
        agent.bpf_endpoints(),
        expected,
        "netctl bpf endpoints list with the agent stopped"
    );
    agent.netctl_err(&["status"]);
    let text = agent.netctl_ok(&["bpf", "endpoints", "list"]);
    for e in [&a, &c] {
        assert!(
            text.contains(&e.ip().to_string()) && text.contains(&e.eth0().mac),
            "the text listing lacks {}: {text}",
            e.ip()
        );
    }
}

#[test]
fn bpf_counters_list_decodes_the_counter_maps_also_with_the_agent_stopped() {
    let topo = Topology::new(1);
    let mut agent = topo.host(1).start_agent();
    agent.network_create("blue", "10.10.0.0/24", &[]);
    agent.network_create("red", "10.20.0.0/24", &[]);
    let a = agent.endpoint_create("a", "blue", &[]);
    let b = agent.endpoint_create("b", "blue", &[]);
    let c = agent.endpoint_create("c", "red", &[]);
    let server = tcp_echo_server(&b.netns, sock(b.ip(), TCP_PORT));
    tcp_send_verify(&a.netns, &server, 64 * 1024);
    assert!(!ping(&a.netns, c.ip()), "a (blue) pinged c (red)");
    wait_until(TIMEOUT, "a's isolation drop to be counted", || {
        drop_count(&agent.endpoint_stats("a"), DropReason::NetworkIsolation) > 0
    });

    // What the agent says of each endpoint, the maps say of its veth (read after the traffic,
    // so both see the same counts).
    let check = |counters: &BpfCounters, stats: &[EndpointStats]| {
        for (e, stats) in [&a, &b, &c].into_iter().zip(stats) {
            let ifindex = e.eth0().host_ifindex;
            let traffic = counters
                .traffic
                .iter()
                .find(|t| t.ifindex == ifindex)
                .unwrap_or_else(|| panic!("no traffic entry of {}: {counters:?}", e.name));
            assert_eq!(
                (&traffic.from_endpoint, &traffic.to_endpoint),
                (&stats.from_endpoint, &stats.to_endpoint),
                "{}",
                e.name
            );
            let drops: Vec<DropCount> = counters
                .drops
                .iter()
                .filter(|d| d.ifindex == ifindex)
                .map(|d| DropCount {
                    reason: d.reason.clone(),
                    code: d.code,
                    packets: d.packets,
                    bytes: d.bytes,
                })
                .collect();
            assert_eq!(drops, stats.drops, "{}", e.name);
        }
        assert!(
            counters.traffic[0].from_endpoint.packets > 0,
            "no traffic counted: {counters:?}"
        );
        let names: Vec<&str> = counters.nat.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "flows_created",
                "port_retries",
                "ports_exhausted",
                "table_full",
                "published_flows",
                "closed_reused"
            ]
        );
        assert_eq!(counters.vxlan_ifindex, 0, "no overlay network here");
    };
    let stats: Vec<EndpointStats> = ["a", "b", "c"]
        .into_iter()
        .map(|n| agent.endpoint_stats(n))
        .collect();
    let counters: BpfCounters = agent.netctl_json(&["bpf", "counters", "list"]);
    check(&counters, &stats);

    agent.stop();
    let stopped: BpfCounters = agent.netctl_json(&["bpf", "counters", "list"]);
    assert_eq!(
        stopped, counters,
        "netctl bpf counters list with the agent stopped"
    );
    let text = agent.netctl_ok(&["bpf", "counters", "list"]);
    assert!(
        text.contains("network-isolation") && text.contains("flows_created"),
        "{text}"
    );
}

#[test]
fn listings_describe_networks_and_endpoints() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    let agent = host.start_agent();
    let blue = agent.network_create("blue", "10.10.0.0/24", &[]);
    assert_eq!(blue.name, "blue");
    assert_eq!(blue.subnet, "10.10.0.0/24");
    assert_eq!(blue.gateway, ip("10.10.0.1"));
    assert_eq!(blue.mtu, 1500);
    assert!(blue.endpoints.is_empty());
    let red = agent.network_create("red", "10.20.0.0/16", &["--gateway", "10.20.255.254"]);
    assert_eq!(red.gateway, ip("10.20.255.254"));

    // The agent's own `default` network is there from the start (Docker's `bridge`).
    let default = agent.network_inspect("default");
    assert_eq!(default.subnet, "172.17.0.0/16");
    assert_eq!(default.gateway, ip("172.17.0.1"));
    assert!(default.endpoints.is_empty());

    // Created out of order: listings are sorted by name.
    let b = agent.endpoint_create("b", "blue", &[]);
    let a = agent.endpoint_create("a", "blue", &[]);
    let c = agent.endpoint_create("c", "red", &[]);

    let blue_now = agent.network_inspect("blue");
    assert_eq!(blue_now.endpoints, ["a", "b"]);
    assert_eq!((blue_now.id, &blue_now.subnet), (blue.id, &blue.subnet));
    let networks = agent.networks();
    let names: Vec<&str> = networks.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["blue", "default", "red"]);
    assert_eq!(networks[2].endpoints, ["c"]);
    assert_eq!(networks[1], default);

    let mut listed = agent.endpoints();
    listed.sort_by(|x, y| x.name.cmp(&y.name));
    assert_eq!(listed, [a.clone(), b.clone(), c.clone()]);
    assert_eq!(agent.endpoint_inspect("a"), a);
    let status = agent.status();
    assert_eq!((status.networks, status.endpoints), (3, 3));

    let prefix = agent.prefix();
    let host_links = links(host.netns());
    let mut host_ifnames = Vec::new();
    for (e, net, prefix_len) in [(&a, &blue, 24), (&b, &blue, 24), (&c, &red, 16)] {
        assert_eq!(e.mode, "bridge", "{e:?}");
        assert_eq!(e.interfaces.len(), 1, "one interface: {e:?}");
        assert_eq!(e.eth0().network, net.name);
        assert_eq!(e.eth0().gateway, net.gateway);
        assert_eq!(e.eth0().prefix_len, prefix_len);
        assert!(e.eth0().aliases.is_empty(), "{e:?}");
        assert_eq!(e.netns, format!("/run/netns/{prefix}-{}", e.name));
        assert!(e.netns_owned);
        assert_eq!(e.eth0().ifname, "eth0");
        // Host veths are `<prefix><number>`, short enough for IFNAMSIZ, never shared.
        let host_ifname = &e.eth0().host_ifname;
        assert!(
            host_ifname.len() <= 15
                && host_ifname
                    .strip_prefix(&prefix)
                    .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit())),
            "{}: host veth {host_ifname} is not {prefix}<number>",
            e.name
        );
        host_ifnames.push(host_ifname.clone());
        // Inside: eth0 with the address, the MAC and a default route via the gateway.
        let eth0 = link(&e.netns, "eth0");
        assert!(eth0.up, "{}: eth0 is down", e.name);
        assert_eq!(eth0.mac, e.eth0().mac, "{}: eth0 MAC", e.name);
        let addrs = exec_in_ok(&e.netns, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
        assert!(
            addrs.contains(&format!("inet {}/{prefix_len}", e.ip())),
            "{}: eth0 addresses: {addrs}",
            e.name
        );
        let inner_routes = routes(&e.netns);
        assert!(
            inner_routes
                .iter()
                .any(|r| r.starts_with(&format!("default via {} dev eth0", e.eth0().gateway))),
            "{}: routes in its namespace: {inner_routes:?}",
            e.name
        );
        // IPv6 is off (the data plane forwards IPv4 and ARP only).
        let v6 = exec_in_ok(
            &e.netns,
            &["cat", "/proc/sys/net/ipv6/conf/eth0/disable_ipv6"],
        );
        assert_eq!(v6.trim(), "1", "{}: IPv6 on eth0 should be off", e.name);
        // Outside: the host veth with its MAC and the /32 route.
        let host_link = host_links
            .iter()
            .find(|l| l.name == e.eth0().host_ifname)
            .unwrap_or_else(|| panic!("no host veth {} in {host_links:?}", e.eth0().host_ifname));
        assert_eq!(host_link.mac, e.eth0().host_mac);
        assert!(
            routes(host.netns()).iter().any(|r| r.starts_with(&format!(
                "{} dev {}",
                e.ip(),
                e.eth0().host_ifname
            ))),
            "{}: no host route",
            e.name
        );
    }
    host_ifnames.sort();
    host_ifnames.dedup();
    assert_eq!(
        host_ifnames.len(),
        3,
        "host veth names shared: {host_ifnames:?}"
    );
    let text = agent.netctl_ok(&["endpoint", "ls"]);
    for e in [&a, &b, &c] {
        assert!(
            text.contains(&e.name) && text.contains(&e.ip().to_string()),
            "endpoint ls text lacks {}: {text}",
            e.name
        );
    }

    // Removal takes the namespace, the veth, the route and the map entry with it.
    agent.endpoint_rm("a");
    assert!(
        !std::path::Path::new(&a.netns).exists(),
        "{} still exists",
        a.netns
    );
    assert!(
        !links(host.netns())
            .iter()
            .any(|l| l.name == a.eth0().host_ifname),
        "host veth {} still exists",
        a.eth0().host_ifname
    );
    assert!(
        !routes(host.netns())
            .iter()
            .any(|r| r.starts_with(&format!("{} ", a.ip()))),
        "host route to {} still exists",
        a.ip()
    );
    assert!(!agent.bpf_endpoints().iter().any(|x| x.ip == a.ip()));
    assert_eq!(agent.network_inspect("blue").endpoints, ["b"]);
    agent.endpoint_rm("c");
    agent.netctl_ok(&["network", "rm", "red"]);
    let names: Vec<String> = agent.networks().into_iter().map(|n| n.name).collect();
    assert_eq!(names, ["blue", "default"]);

    // A removed network's name and subnet can be used again; it is a new network.
    let red_again = agent.network_create("red", "10.20.0.0/16", &[]);
    assert_ne!(red_again.id, red.id, "network ids are not reused");
    let c2 = agent.endpoint_create("c", "red", &[]);
    assert_eq!(c2.ip(), ip("10.20.0.2"));
    let udp_b = udp_echo_server(&b.netns, sock(b.ip(), UDP_PORT));
    assert!(
        !udp_roundtrip(&c2.netns, None, udp_b.addr(), 2, Duration::from_millis(500)),
        "the re-created red network reaches blue"
    );
    assert_consistent(&agent);
}

#[test]
fn adopted_namespace_is_used_and_left_in_place() {
    let topo = Topology::new(1);
    let agent = topo.host(1).start_agent();
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let ns = topo.netns_name("adopt");
    add_netns(&ns);
    let path = netns_path(&ns).display().to_string();

    let x = agent.endpoint_create("x", "blue", &["--netns", &path]);
    assert_eq!(x.netns, path);
    assert!(
        !x.netns_owned,
        "an adopted namespace is not the agent's: {x:?}"
    );
    assert_eq!(link(&ns, "eth0").mac, x.eth0().mac);
    let b = agent.endpoint_create("b", "blue", &[]);
    let server = tcp_echo_server(&ns, sock(x.ip(), TCP_PORT));
    tcp_send_verify(&b.netns, &server, 64 * 1024);
    drop(server);

    agent.endpoint_rm("x");
    assert!(
        netns_path(&ns).exists(),
        "the agent deleted the adopted namespace {path}"
    );
    let left: Vec<String> = links(&ns).into_iter().map(|l| l.name).collect();
    assert_eq!(left, ["lo"], "interfaces left in the adopted namespace");
    assert!(exec_in(&ns, &["true"]).success(), "{ns} is still usable");

    // The namespace can be adopted again, and its endpoint removed after the namespace itself
    // went away (the owner deleted it first); the same for a namespace the agent made.
    agent.endpoint_create("x", "blue", &["--netns", &path]);
    run_ok("ip", &["netns", "del", &ns]);
    agent.endpoint_rm("x");
    run_ok("ip", &["netns", "del", &agent.endpoint_netns("b")]);
    agent.endpoint_rm("b");
    assert!(agent.endpoints().is_empty());
    assert_consistent(&agent);
}

#[test]
fn addresses_are_allocated_lowest_first_reused_and_requestable() {
    let topo = Topology::new(1);
    let agent = topo.host(1).start_agent();
    let blue = agent.network_create("blue", "10.30.0.0/24", &[]);
    assert_eq!(blue.gateway, ip("10.30.0.1"), "default gateway: first host");

    let e1 = agent.endpoint_create("e1", "blue", &[]);
    assert_eq!(
        e1.ip(),
        ip("10.30.0.2"),
        "first address: first host after the gateway"
    );
    let e2 = agent.endpoint_create("e2", "blue", &[]);
    assert_eq!(e2.ip(), ip("10.30.0.3"));
    agent.endpoint_rm("e1");
    let e3 = agent.endpoint_create("e3", "blue", &[]);
    assert_eq!(
        e3.ip(),
        ip("10.30.0.2"),
        "the removed endpoint's address is reused"
    );
    let e4 = agent.endpoint_create("e4", "blue", &["--ip", "10.30.0.50"]);
    assert_eq!(e4.ip(), ip("10.30.0.50"), "requested address");
    let e5 = agent.endpoint_create("e5", "blue", &[]);
    assert_eq!(e5.ip(), ip("10.30.0.4"));

    // The reused address reaches its new owner, not a stale entry of the old one.
    let udp_e3 = udp_echo_server(&e3.netns, sock(e3.ip(), UDP_PORT));
    assert!(
        udp_works(&e2, &udp_e3),
        "UDP from e2 to e3 (reused address)"
    );
    let udp_e4 = udp_echo_server(&e4.netns, sock(e4.ip(), UDP_PORT));
    assert!(
        udp_works(&e5, &udp_e4),
        "UDP from e5 to e4 (requested address)"
    );

    // With the gateway at the end, allocation starts at the first host.
    let green = agent.network_create("green", "10.31.0.0/24", &["--gateway", "10.31.0.254"]);
    assert_eq!(green.gateway, ip("10.31.0.254"));
    let g1 = agent.endpoint_create("g1", "green", &[]);
    assert_eq!(g1.ip(), ip("10.31.0.1"));
    assert_eq!(g1.eth0().gateway, ip("10.31.0.254"));

    // A removed endpoint's name can be used again; names may be 32 characters long.
    agent.endpoint_rm("e2");
    let again = agent.endpoint_create("e2", "blue", &[]);
    assert_eq!(again.ip(), ip("10.30.0.3"));
    let long = "n".repeat(32);
    let l = agent.endpoint_create(&long, "blue", &[]);
    assert!(
        udp_works(&l, &udp_e3),
        "UDP from the 32-character endpoint to e3"
    );
    assert!(
        udp_works(&again, &udp_e4),
        "UDP from the re-created e2 to e4"
    );
    assert_consistent(&agent);
}

#[test]
fn network_mtu_is_set_on_endpoint_interfaces() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    let agent = host.start_agent();
    let small = agent.network_create("small", "10.40.0.0/24", &["--mtu", "1400"]);
    assert_eq!(small.mtu, 1400);
    agent.network_create("plain", "10.41.0.0/24", &[]);
    let s1 = agent.endpoint_create("s1", "small", &[]);
    let s2 = agent.endpoint_create("s2", "small", &[]);
    let p1 = agent.endpoint_create("p1", "plain", &[]);

    for e in [&s1, &s2] {
        assert_eq!(link(&e.netns, "eth0").mtu, 1400, "{}: eth0 MTU", e.name);
        assert_eq!(
            link(host.netns(), &e.eth0().host_ifname).mtu,
            1400,
            "{}: host veth MTU",
            e.name
        );
    }
    assert_eq!(link(&p1.netns, "eth0").mtu, 1500, "default MTU");
    // Full-size segments at the smaller MTU get through.
    let server = tcp_echo_server(&s2.netns, sock(s2.ip(), TCP_PORT));
    tcp_send_verify(&s1.netns, &server, 256 * 1024);

    // Jumbo frames: a packet of exactly the MTU passes unfragmented (DF set) both ways.
    agent.network_create("jumbo", "10.42.0.0/24", &["--mtu", "9000"]);
    let j1 = agent.endpoint_create("j1", "jumbo", &[]);
    let j2 = agent.endpoint_create("j2", "jumbo", &[]);
    let full = (9000 - 28).to_string();
    for (from, to) in [(&j1, &j2), (&j2, &j1)] {
        let out = exec_in(
            &from.netns,
            &[
                "ping",
                "-n",
                "-q",
                "-c",
                "1",
                "-W",
                "2",
                "-M",
                "do",
                "-s",
                &full,
                &to.ip().to_string(),
            ],
        );
        assert!(
            out.success(),
            "a 9000-byte packet from {} to {}\n{out}",
            from.name,
            to.name
        );
    }
    let server = tcp_echo_server(&j2.netns, sock(j2.ip(), TCP_PORT));
    tcp_send_verify(&j1.netns, &server, MIB);
}

/// Drop counters that changed between two readings: (reason, packets, bytes) added.
fn drops_added(before: &[DropCount], after: &[DropCount]) -> Vec<(String, u64, u64)> {
    after
        .iter()
        .filter_map(|d| {
            let (p, b) = before
                .iter()
                .find(|x| x.code == d.code)
                .map_or((0, 0), |x| (x.packets, x.bytes));
            (d.packets != p || d.bytes != b).then(|| (d.reason.clone(), d.packets - p, d.bytes - b))
        })
        .collect()
}

#[test]
fn forged_and_malformed_frames_are_dropped_with_their_reason() {
    let topo = Topology::new(1);
    let agent = topo.host(1).start_agent();
    agent.network_create("blue", "10.10.0.0/24", &[]);
    agent.network_create("red", "10.20.0.0/24", &[]);
    let a = agent.endpoint_create("a", "blue", &[]);
    let b = agent.endpoint_create("b", "blue", &[]);
    let c = agent.endpoint_create("c", "blue", &[]);
    let r = agent.endpoint_create("r", "red", &[]);
    let udp_b = udp_echo_server(&b.netns, sock(b.ip(), UDP_PORT));

    let a_mac = mac(&a.eth0().mac);
    let gateway_mac = mac(&a.eth0().host_mac);
    let foreign_mac = mac("02:00:00:00:00:99");
    let unknown_ip = ip("10.10.0.200");
    let udp = |src_mac: [u8; 6], src: Ipv4Addr| {
        Udp4 {
            eth_src: src_mac,
            eth_dst: gateway_mac,
            src,
            dst: b.ip(),
            src_port: 40000,
            dst_port: UDP_PORT,
            payload: b"hand-made".to_vec(),
        }
        .frame()
    };

    // Control: a hand-made frame that is correct gets through, so the frames below are sound
    // and only their forged or broken part can explain a drop.
    send_frame(&a.netns, "eth0", &udp(a_mac, a.ip()));
    wait_until(
        TIMEOUT,
        "b to receive a correct hand-made frame from a",
        || udp_b.received_from(a.ip()) >= 1,
    );

    let forged_arp_mac = Arp {
        sender_mac: foreign_mac,
        ..Arp::request(a_mac, a.ip(), b.ip())
    };
    let cases: Vec<(&str, Vec<u8>, DropReason)> = vec![
        (
            "IPv4 from another endpoint's address",
            udp(a_mac, c.ip()),
            DropReason::SpoofedSourceIp,
        ),
        (
            "IPv4 from an address nobody has",
            udp(a_mac, unknown_ip),
            DropReason::SpoofedSourceIp,
        ),
        (
            "IPv4 from a foreign MAC",
            udp(foreign_mac, a.ip()),
            DropReason::SpoofedSourceMac,
        ),
        (
            "ARP request claiming another endpoint's address",
            Arp::request(a_mac, c.ip(), b.ip()).frame(),
            DropReason::SpoofedSourceIp,
        ),
        (
            "ARP request whose sender MAC is not the frame's",
            forged_arp_mac.frame(),
            DropReason::SpoofedSourceMac,
        ),
        (
            "ARP request for an endpoint on another network",
            Arp::request(a_mac, a.ip(), r.ip()).frame(),
            DropReason::NetworkIsolation,
        ),
        (
            "ARP request for an address nobody has",
            Arp::request(a_mac, a.ip(), unknown_ip).frame(),
            DropReason::ArpTargetUnknown,
        ),
        (
            "IPv6",
            raw_frame(a_mac, gateway_mac, ETH_P_IPV6, &[0x60; 40]),
            DropReason::UnsupportedProtocol,
        ),
        (
            "a truncated IPv4 header",
            raw_frame(a_mac, gateway_mac, ETH_P_IP, &[0x45, 0, 0, 20, 0, 0]),
            DropReason::Malformed,
        ),
        (
            "a truncated ARP header",
            raw_frame(a_mac, BROADCAST, ETH_P_ARP, &[0, 1, 8, 0, 6, 4]),
            DropReason::Malformed,
        ),
    ];
    for (what, frame, reason) in cases {
        let before = agent.endpoint_stats("a").drops;
        send_frame(&a.netns, "eth0", &frame);
        wait_until(
            TIMEOUT,
            format!("{what}: a drop counted as {}", reason.name()),
            || {
                drop_count(&agent.endpoint_stats("a"), reason)
                    > before
                        .iter()
                        .filter(|d| d.reason == reason.name())
                        .map(|d| d.packets)
                        .sum()
            },
        );
        let after = agent.endpoint_stats("a").drops;
        assert_eq!(
            drops_added(&before, &after),
            [(reason.name().to_owned(), 1, frame.len() as u64)],
            "{what}: exactly this frame should be counted, under exactly this reason"
        );
    }
    for forged in [c.ip(), unknown_ip] {
        assert_eq!(
            udp_b.received_from(forged),
            0,
            "b received a frame forged with source {forged}"
        );
    }
}

#[test]
fn concurrent_requests_all_succeed_without_sharing_addresses() {
    let topo = Topology::new(1);
    let agent = topo.host(1).start_agent();
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let probe = agent.endpoint_create("probe", "blue", &[]);
    let udp_probe = udp_echo_server(&probe.netns, sock(probe.ip(), UDP_PORT));

    let outputs: Vec<net_tests::CmdOutput> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..8)
            .map(|i| {
                let netctl = agent.netctl_handle();
                s.spawn(move || {
                    let name = format!("e{i}");
                    if i % 4 == 3 {
                        // Readers interleaved with the writers.
                        netctl.run(&["-o", "json", "endpoint", "ls"])
                    } else {
                        netctl.run(&[
                            "-o",
                            "json",
                            "endpoint",
                            "create",
                            &name,
                            "--network",
                            "blue",
                        ])
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("netctl thread"))
            .collect()
    });
    for out in &outputs {
        assert!(out.success(), "a concurrent request failed\n{out}");
    }
    let endpoints = agent.endpoints();
    assert_eq!(endpoints.len(), 7, "probe + 6 created: {endpoints:#?}");
    let mut ips: Vec<Ipv4Addr> = endpoints
        .iter()
        .flat_map(|e| e.interfaces.iter().map(|i| i.ip))
        .collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 7, "addresses handed out twice: {endpoints:#?}");
    assert!(
        endpoints.iter().all(|e| e.networks() == ["blue"]),
        "each endpoint has exactly its blue interface: {endpoints:#?}"
    );
    let mut ids: Vec<u32> = endpoints.iter().map(|e| e.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 7, "ids handed out twice: {endpoints:#?}");
    assert_consistent(&agent);
    for e in endpoints.iter().filter(|e| e.name != "probe") {
        assert!(udp_works(e, &udp_probe), "{} reaches probe", e.name);
    }
}
