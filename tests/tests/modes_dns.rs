//! Docker's network modes, connect and disconnect, the embedded DNS and `netctl run`, on one
//! simulated host with real endpoints and real packets.
//!
//! DNS tests point the agent at a fake upstream resolver in the topology's outside namespace
//! (198.18.0.254:53), which knows `upstream.example` and nothing else, so forwarding is
//! observable and no real resolver is ever asked.

use std::{net::Ipv4Addr, path::Path, time::Duration};

use net_tests::{
    Agent, EndpointExt, TIMEOUT, Topology, assert_consistent,
    dns::{
        DnsReply, FakeUpstream, RESOLVER, RecordType, ResponseCode, Transport, ask, fake_upstream,
        query, reverse_name,
    },
    exec_in, exec_in_ok,
    netns::{ProcessReaper, link, links, netns_id, routes},
    topology::OUTSIDE_IP,
    traffic::{
        sock, start_stream, tcp_connect, tcp_echo_server, tcp_send_verify, tcp_sink,
        udp_echo_server, udp_roundtrip,
    },
    wait_until,
};

const KIB: u64 = 1024;
/// The one name the fake upstream knows, and its address (TEST-NET-1, never routed).
const UPSTREAM_NAME: &str = "upstream.example";
const UPSTREAM_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);

fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("test address")
}

/// An agent whose DNS forwards to a fake upstream in the outside namespace.
fn agent_with_upstream(topo: &Topology) -> (Agent<'_>, FakeUpstream) {
    let upstream = fake_upstream(
        topo.outside(),
        sock(OUTSIDE_IP, 53),
        &[(UPSTREAM_NAME, UPSTREAM_IP)],
    );
    let agent = topo
        .host(1)
        .start_agent_with(&["--dns-upstream", &OUTSIDE_IP.to_string()]);
    (agent, upstream)
}

/// The name resolves, from inside `netns`, to exactly `expected`, answered by the agent itself.
fn assert_resolves(netns: &str, name: &str, expected: &[Ipv4Addr], transport: Transport) {
    let reply = ask(netns, name, RecordType::A, transport);
    assert!(
        reply.rcode == ResponseCode::NoError && reply.authoritative && reply.a == expected,
        "{name} asked from {netns} over {transport:?}: expected {expected:?}, got {reply}"
    );
}

/// The name does not resolve from inside `netns`: no address, NXDOMAIN (the agent's own or the
/// fake upstream's, which knows nothing but `upstream.example`).
fn assert_unresolved(netns: &str, name: &str) -> DnsReply {
    let reply = ask(netns, name, RecordType::A, Transport::Udp);
    assert!(
        reply.a.is_empty() && reply.rcode == ResponseCode::NXDomain,
        "{name} asked from {netns} should not resolve, got {reply}"
    );
    reply
}

/// `dig +short ... NAME` run in `netns` through `ip netns exec`, so with the namespace's
/// `/etc/netns/<name>/resolv.conf`: the answer lines.
fn dig(netns: &str, extra: &[&str], name: &str) -> Vec<String> {
    let mut args = vec!["dig", "+short", "+time=3", "+tries=2"];
    args.extend_from_slice(extra);
    args.push(name);
    exec_in_ok(netns, &args)
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

/// `netctl run` must have succeeded; returns stdout.
fn run_ok(agent: &Agent<'_>, args: &[&str]) -> String {
    let out = agent.netctl_run(args, None);
    assert!(out.success(), "netctl run failed (agent log below)\n{out}");
    out.stdout
}

/// The inode in `net:[INODE]`, as `readlink /proc/self/ns/net` prints it.
fn ns_inode(readlink: &str) -> u64 {
    readlink
        .trim()
        .strip_prefix("net:[")
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a namespace link: {readlink:?}"))
}

// ---- modes ----

#[test]
fn none_mode_has_a_namespace_with_only_loopback() {
    let topo = Topology::new(1);
    let agent = topo.host(1).start_agent();
    let n = agent.endpoint_create_with("n", &["--mode", "none"]);
    assert_eq!(n.mode, "none");
    assert!(n.interfaces.is_empty(), "{n:#?}");
    assert!(n.netns_owned, "{n:#?}");
    assert_eq!(n.netns, format!("/run/netns/{}", agent.endpoint_netns("n")));

    let only_lo = |what: &str, text: &str| {
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines.len() == 1 && lines[0].contains(" lo:") && lines[0].contains("LOOPBACK,UP"),
            "{what}: `ip -o link` should show only lo, up:\n{text}"
        );
    };
    only_lo(
        "endpoint n",
        &exec_in_ok(&n.netns, &["ip", "-o", "link", "show"]),
    );
    assert!(
        routes(&n.netns).is_empty(),
        "a none-mode namespace has no routes: {:?}",
        routes(&n.netns)
    );
    for network in agent.networks() {
        assert!(network.endpoints.is_empty(), "{network:?}");
    }

    // The same through `netctl run --net none`, which cannot reach the host either.
    only_lo(
        "netctl run --net none",
        &run_ok(&agent, &["--net", "none", "--", "ip", "-o", "link", "show"]),
    );
    let host_ip = topo.host(1).underlay_ip().to_string();
    let out = agent.netctl_run(
        &[
            "--net", "none", "--", "ping", "-n", "-c", "1", "-W", "1", &host_ip,
        ],
        None,
    );
    assert!(
        !out.success(),
        "a none-mode command reached the host\n{out}"
    );
    assert_consistent(&agent);
    agent.endpoint_rm("n");
    assert!(!Path::new(&n.netns).exists(), "{} still exists", n.netns);
    assert_consistent(&agent);
}

#[test]
fn host_mode_uses_the_hosts_own_namespace() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    let agent = host.start_agent();
    let before = agent.snapshot();

    let h = agent.endpoint_create_with("h", &["--mode", "host"]);
    assert_eq!(h.mode, "host");
    assert_eq!(
        h.netns, "",
        "a host-mode endpoint has no namespace of its own: {h:#?}"
    );
    assert!(!h.netns_owned && h.interfaces.is_empty(), "{h:#?}");
    let during = agent.snapshot();
    assert_eq!(
        (
            &during.namespaces,
            &during.host_links,
            &during.host_routes,
            &during.bpf_endpoints
        ),
        (
            &before.namespaces,
            &before.host_links,
            &before.host_routes,
            &before.bpf_endpoints
        ),
        "a host-mode endpoint made namespaces, interfaces, routes or map entries"
    );
    assert_consistent(&agent);
    agent.endpoint_rm("h");
    assert_eq!(agent.snapshot(), before);

    // `--net host` runs the command where netctl runs: here, on the simulated host.
    let (_, host_inode) = netns_id(host.netns()).expect("the host namespace");
    let out = agent.netctl_on_host(&[
        "run",
        "--net",
        "host",
        "--name",
        "hostcmd",
        "--",
        "sh",
        "-c",
        "readlink /proc/self/ns/net; cat /proc/self/net/dev",
    ]);
    assert!(out.success(), "netctl run --net host\n{out}");
    let mut lines = out.stdout.lines();
    let inode = ns_inode(lines.next().unwrap_or_default());
    assert_eq!(
        inode, host_inode,
        "the command ran in another namespace than the host's\n{out}"
    );
    assert!(
        out.stdout.contains("uplink0:"),
        "the host's interfaces are not visible to the command\n{out}"
    );
    assert_eq!(
        agent.snapshot(),
        before,
        "netctl run --net host left something behind"
    );
}

#[test]
fn bridge_mode_on_the_default_network_and_on_a_named_one() {
    let topo = Topology::new(1);
    let agent = topo.host(1).start_agent();
    // Without --network an endpoint goes on `default`.
    let d1 = agent.endpoint_create_with("d1", &[]);
    let d2 = agent.endpoint_create_with("d2", &["--mode", "bridge"]);
    for (e, expected) in [(&d1, "172.17.0.2"), (&d2, "172.17.0.3")] {
        assert_eq!(e.mode, "bridge");
        assert_eq!(e.networks(), ["default"], "{e:#?}");
        assert_eq!(e.ip(), ip(expected));
        assert_eq!(
            (e.eth0().gateway, e.eth0().prefix_len),
            (ip("172.17.0.1"), 16)
        );
    }
    assert_eq!(agent.network_inspect("default").endpoints, ["d1", "d2"]);
    let server = tcp_echo_server(&d2.netns, sock(d2.ip(), 7300));
    tcp_send_verify(&d1.netns, &server, 256 * 1024);

    let blue = agent.network_create("blue", "10.10.0.0/24", &[]);
    let b1 = agent.endpoint_create("b1", "blue", &[]);
    assert_eq!(b1.networks(), ["blue"]);
    assert_eq!(b1.eth0().gateway, blue.gateway);
    let udp_b1 = udp_echo_server(&b1.netns, sock(b1.ip(), 7301));
    // `default` is a network like the others: isolated from blue.
    assert!(
        !udp_roundtrip(
            &d1.netns,
            None,
            udp_b1.addr(),
            2,
            Duration::from_millis(500)
        ),
        "d1 (default) reached b1 (blue)"
    );

    // `netctl run` puts the command on `default` (also with --net bridge) or on the network
    // named, with the address, default route and reach of an endpoint there.
    let show = "ip -4 -o addr show dev eth0; ip route show default";
    for (net, subnet, gateway, peer) in [
        (None, "172.17.0.", "172.17.0.1", d2.ip()),
        (Some("bridge"), "172.17.0.", "172.17.0.1", d2.ip()),
        (Some("blue"), "10.10.0.", "10.10.0.1", b1.ip()),
    ] {
        let mut args = vec![];
        if let Some(net) = net {
            args.extend(["--network", net]);
        }
        let ping_peer = format!("{show}; ping -n -c 1 -W 2 {peer} >/dev/null && echo reached");
        args.extend(["--", "sh", "-c", &ping_peer]);
        let out = run_ok(&agent, &args);
        assert!(
            out.contains(&format!("inet {subnet}"))
                && out.contains(&format!("default via {gateway} dev eth0"))
                && out.contains("reached"),
            "netctl run {args:?}:\n{out}"
        );
    }
    assert_eq!(
        udp_b1.received_from(d1.ip()),
        0,
        "b1 (blue) received from d1 (default)"
    );
    // --ip picks the address.
    let out = run_ok(
        &agent,
        &[
            "--network",
            "blue",
            "--ip",
            "10.10.0.77",
            "--",
            "ip",
            "-4",
            "-o",
            "addr",
            "show",
            "dev",
            "eth0",
        ],
    );
    assert!(out.contains("inet 10.10.0.77/24"), "{out}");
    assert_consistent(&agent);
}

#[test]
fn container_mode_shares_the_owners_namespace() {
    let topo = Topology::new(1);
    let agent = topo.host(1).start_agent();
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let web = agent.endpoint_create("web", "blue", &[]);
    let client = agent.endpoint_create("client", "blue", &[]);

    let side = agent.endpoint_create_with("side", &["--mode", "container:web"]);
    assert_eq!(side.mode, "container:web");
    assert_eq!(side.netns, web.netns, "{side:#?}");
    assert!(!side.netns_owned && side.interfaces.is_empty(), "{side:#?}");
    assert_eq!(agent.network_inspect("blue").endpoints, ["client", "web"]);
    assert_consistent(&agent);

    // A command joining web sees web's namespace, address and localhost: a listener on
    // 127.0.0.1 in web gets what the joiner sends.
    let local = tcp_sink(&web.netns, sock(ip("127.0.0.1"), 7310));
    let out = run_ok(
        &agent,
        &[
            "--net",
            "container:web",
            "--",
            "bash",
            "-c",
            "readlink /proc/self/ns/net; ip -4 -o addr show dev eth0; \
             exec 3<>/dev/tcp/127.0.0.1/7310; printf shared-localhost >&3; \
             exec 3>&-",
        ],
    );
    let (_, web_inode) = netns_id(&web.netns).expect("web's namespace");
    assert_eq!(
        ns_inode(out.lines().next().unwrap_or_default()),
        web_inode,
        "{out}"
    );
    assert!(out.contains(&format!("inet {}/24", web.ip())), "{out}");
    assert_eq!(
        String::from_utf8_lossy(&local.received()),
        "shared-localhost",
        "what web's 127.0.0.1 listener received from the joiner"
    );

    // Removing the joiner leaves the owner as it was, and working.
    agent.endpoint_rm("side");
    assert_eq!(agent.endpoint_inspect("web"), web);
    assert!(link(&web.netns, "eth0").up);
    let server = tcp_echo_server(&web.netns, sock(web.ip(), 7311));
    tcp_send_verify(&client.netns, &server, 64 * 1024);
    drop(server);
    assert_consistent(&agent);

    // The owner cannot go while a joiner exists, unless forced; then both go.
    agent.endpoint_create_with("side", &["--mode", "container:web"]);
    agent.assert_refused(&["endpoint", "rm", "web"], &["web", "side"]);
    agent.endpoint_rm_force("web");
    let names: Vec<String> = agent.endpoints().into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["client"], "after `endpoint rm --force web`");
    assert!(
        !Path::new(&web.netns).exists(),
        "{} still exists",
        web.netns
    );
    assert_consistent(&agent);
}

// ---- connect and disconnect ----

#[test]
fn connect_and_disconnect_while_a_stream_flows() {
    let topo = Topology::new(1);
    let agent = topo.host(1).start_agent();
    agent.network_create("alpha", "10.50.0.0/24", &[]);
    let beta = agent.network_create("beta", "10.51.0.0/24", &[]);
    let a1 = agent.endpoint_create("a1", "alpha", &[]);
    let a2 = agent.endpoint_create("a2", "alpha", &[]);
    let b1 = agent.endpoint_create("b1", "beta", &[]);
    let udp_b1 = udp_echo_server(&b1.netns, sock(b1.ip(), 7321));
    let tcp_b1 = tcp_echo_server(&b1.netns, sock(b1.ip(), 7322));
    let reaches_b1 = || udp_roundtrip(&a1.netns, None, udp_b1.addr(), 5, Duration::from_secs(1));
    let cannot_reach_b1 = || {
        !udp_roundtrip(
            &a1.netns,
            None,
            udp_b1.addr(),
            2,
            Duration::from_millis(500),
        )
    };

    let flow = start_stream(&a1.netns, &a2.netns, sock(a2.ip(), 7320));
    flow.wait_progress("before connecting", 256 * KIB);
    assert!(
        cannot_reach_b1(),
        "a1 (alpha) reached b1 (beta) before being connected"
    );

    // Connect: eth1 on beta; eth0 and the default route stay as they were.
    let connected = agent.network_connect("beta", "a1", &[]);
    assert_eq!(connected.interfaces.len(), 2, "{connected:#?}");
    assert_eq!(connected.interfaces[0], a1.interfaces[0], "eth0 changed");
    let eth1 = connected.on("beta").clone();
    assert_eq!(eth1.ifname, "eth1");
    assert_eq!((eth1.ip, eth1.gateway), (ip("10.51.0.3"), beta.gateway));
    assert_eq!(agent.endpoint_inspect("a1"), connected);
    assert_eq!(link(&a1.netns, "eth1").mac, eth1.mac);
    let inner = routes(&a1.netns);
    assert!(
        inner.iter().filter(|r| r.starts_with("default")).count() == 1
            && inner
                .iter()
                .any(|r| r.starts_with("default via 10.50.0.1 dev eth0"))
            && inner.iter().any(|r| r.starts_with("10.51.0.0/24 dev eth1")),
        "routes in a1 after connecting: {inner:?}"
    );
    assert_eq!(agent.network_inspect("beta").endpoints, ["a1", "b1"]);
    wait_until(TIMEOUT, "a1 to reach b1 over eth1", reaches_b1);
    tcp_send_verify(&a1.netns, &tcp_b1, 256 * 1024);
    let back = tcp_echo_server(&a1.netns, sock(eth1.ip, 7323));
    tcp_send_verify(&b1.netns, &back, 256 * 1024);
    drop(back);
    flow.wait_progress("after connecting", 256 * KIB);
    assert_consistent(&agent);

    // Disconnect: eth1 gone, beta out of reach again, the stream on alpha untouched.
    let disconnected = agent.network_disconnect("beta", "a1");
    assert_eq!(disconnected.interfaces, a1.interfaces, "{disconnected:#?}");
    let names: Vec<String> = links(&a1.netns).into_iter().map(|l| l.name).collect();
    assert_eq!(
        names,
        ["eth0", "lo"],
        "interfaces in a1 after disconnecting"
    );
    assert!(
        !links(topo.host(1).netns())
            .iter()
            .any(|l| l.name == eth1.host_ifname),
        "host veth {} of the disconnected interface is still there",
        eth1.host_ifname
    );
    assert!(!agent.bpf_endpoints().iter().any(|m| m.ip == eth1.ip));
    assert_eq!(agent.network_inspect("beta").endpoints, ["b1"]);
    assert!(cannot_reach_b1(), "a1 reached b1 after disconnecting");
    let attempt = tcp_connect(&b1.netns, sock(eth1.ip, 7323), Duration::from_secs(2));
    assert!(
        attempt.is_err(),
        "b1 connected to a1's old beta address: {attempt:?}"
    );
    flow.wait_progress("after disconnecting", 256 * KIB);
    assert_consistent(&agent);

    let digest = flow.finish();
    assert!(
        digest.bytes >= 768 * KIB,
        "the stream carried {} bytes",
        digest.bytes
    );
}

#[test]
fn the_host_reaches_an_endpoint_on_every_network_it_is_on() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    let agent = host.start_agent();
    agent.network_create("alpha", "10.50.0.0/24", &[]);
    agent.network_create("beta", "10.51.0.0/24", &[]);
    let a = agent.endpoint_create("a", "alpha", &[]);
    let connected = agent.network_connect("beta", "a", &[]);
    // As for a single-network endpoint (single_host::host_reaches_its_endpoints), the host
    // reaches each of the endpoint's addresses; the replies from the beta address must not be
    // dropped as spoofed on the way out.
    for iface in &connected.interfaces {
        assert!(
            ping_ok(host.netns(), iface.ip),
            "the host cannot ping a at {} ({}); a's stats: {:?}",
            iface.ip,
            iface.ifname,
            agent.endpoint_stats("a")
        );
        let server = tcp_echo_server(&a.netns, sock(iface.ip, 7330));
        tcp_send_verify(host.netns(), &server, 64 * 1024);
    }
}

#[test]
fn disconnecting_the_first_network_keeps_a_default_route_and_eth0_first() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    let agent = host.start_agent();
    agent.network_create("alpha", "10.50.0.0/24", &[]);
    agent.network_create("beta", "10.51.0.0/24", &[]);
    let a = agent.endpoint_create("a", "alpha", &[]);
    let on_beta = agent.network_connect("beta", "a", &[]).on("beta").clone();
    assert!(ping_ok(host.netns(), a.ip()), "the host pings a on alpha");

    // Without alpha, the remaining interface is the first (primary) one: it carries the
    // default route, so a still answers the host (whose address is off every subnet).
    let left = agent.network_disconnect("alpha", "a");
    assert_eq!(left.interfaces, std::slice::from_ref(&on_beta), "{left:#?}");
    let inner = routes(&a.netns);
    assert!(
        inner
            .iter()
            .any(|r| r.starts_with(&format!("default via {} dev eth1", on_beta.gateway))),
        "a has no default route via its remaining interface eth1 (the primary one now): {inner:?}"
    );
    assert!(
        ping_ok(host.netns(), on_beta.ip),
        "the host cannot ping a on beta after a was disconnected from alpha; routes in a: {inner:?}"
    );
    assert_consistent(&agent);

    // Back on alpha: eth0 again, listed first, with the default route.
    let back = agent.network_connect("alpha", "a", &[]);
    let names: Vec<&str> = back.interfaces.iter().map(|i| i.ifname.as_str()).collect();
    assert_eq!(names, ["eth0", "eth1"], "eth0 first: {back:#?}");
    assert_consistent(&agent);
}

// ---- DNS ----

#[test]
fn names_resolve_within_a_network_and_never_across() {
    let topo = Topology::new(1);
    let (agent, upstream) = agent_with_upstream(&topo);
    agent.network_create("front", "10.60.0.0/24", &[]);
    agent.network_create("back", "10.61.0.0/24", &[]);
    let web = agent.endpoint_create("web", "front", &["--alias", "www", "--alias", "site"]);
    assert_eq!(web.eth0().aliases, ["www", "site"]);
    let api = agent.endpoint_create("api", "front", &[]);
    let db = agent.endpoint_create("db", "back", &[]);

    // Same network: names, aliases, `name.network`, any case, UDP and TCP.
    for transport in [Transport::Udp, Transport::Tcp] {
        for name in [
            "web",
            "www",
            "site",
            "web.front",
            "www.front",
            "WEB",
            "Web.Front.",
        ] {
            assert_resolves(&api.netns, name, &[web.ip()], transport);
        }
        assert_resolves(&web.netns, "api", &[api.ip()], transport);
        assert_resolves(&web.netns, "web", &[web.ip()], transport);
    }
    // PTR for those addresses.
    for transport in [Transport::Udp, Transport::Tcp] {
        let reply = ask(
            &api.netns,
            &reverse_name(web.ip()),
            RecordType::PTR,
            transport,
        );
        assert!(
            reply.rcode == ResponseCode::NoError && reply.ptr == ["web"],
            "PTR of web's address from api over {transport:?}: {reply}"
        );
    }
    // Through the namespace's resolv.conf (`ip netns exec`), over UDP and TCP.
    assert_eq!(dig(&api.netns, &[], "web"), [web.ip().to_string()]);
    assert_eq!(dig(&api.netns, &["+tcp"], "www"), [web.ip().to_string()]);
    assert_eq!(
        dig(&api.netns, &["-x"], &web.ip().to_string()),
        ["web."],
        "dig -x from api"
    );

    // Names that resolve locally are never sent upstream.
    assert!(
        upstream.all_asked().is_empty(),
        "the upstream was asked {:?}",
        upstream.all_asked()
    );

    // Across networks: nothing, in either direction, by any form of the name.
    for name in ["db", "db.back"] {
        assert_unresolved(&api.netns, name);
    }
    for name in ["web", "www", "web.front", "api"] {
        assert_unresolved(&db.netns, name);
    }
    let reply = ask(
        &db.netns,
        &reverse_name(web.ip()),
        RecordType::PTR,
        Transport::Udp,
    );
    assert!(
        reply.ptr.is_empty() && reply.rcode == ResponseCode::NXDomain,
        "PTR of web's address from db (other network): {reply}"
    );
    assert!(dig(&db.netns, &[], "web").is_empty());

    // Other names go to the upstream resolver, over UDP and TCP.
    let asked = upstream.asked(UPSTREAM_NAME);
    for transport in [Transport::Udp, Transport::Tcp] {
        let reply = ask(&api.netns, UPSTREAM_NAME, RecordType::A, transport);
        assert!(
            reply.rcode == ResponseCode::NoError && reply.a == [UPSTREAM_IP],
            "{UPSTREAM_NAME} from api over {transport:?}: {reply}"
        );
    }
    assert_eq!(
        dig(&db.netns, &["+tcp"], UPSTREAM_NAME),
        [UPSTREAM_IP.to_string()]
    );
    assert!(
        upstream.asked(UPSTREAM_NAME) >= asked + 3,
        "the fake upstream was not asked: {:?}",
        upstream.all_asked()
    );
    assert_consistent(&agent);
}

#[test]
fn aliases_from_create_run_and_connect() {
    let topo = Topology::new(1);
    let (agent, _upstream) = agent_with_upstream(&topo);
    agent.network_create("front", "10.60.0.0/24", &[]);
    agent.network_create("back", "10.61.0.0/24", &[]);
    let web = agent.endpoint_create("web", "front", &[]);
    let api = agent.endpoint_create("api", "front", &["--alias", "service"]);
    let db = agent.endpoint_create("db", "back", &[]);
    assert_resolves(&web.netns, "service", &[api.ip()], Transport::Udp);

    // `netctl run --alias`: the command finds itself and others by name, and others find it.
    let out = run_ok(
        &agent,
        &[
            "--network",
            "front",
            "--name",
            "runner",
            "--alias",
            "helper",
            "--",
            "sh",
            "-c",
            "ip -4 -o addr show dev eth0; dig +short +time=3 +tries=2 helper; \
             dig +short +time=3 +tries=2 service.front",
        ],
    );
    let runner_ip = out
        .split_whitespace()
        .find_map(|w| w.strip_suffix("/24"))
        .unwrap_or_else(|| panic!("no address in the output of netctl run:\n{out}"));
    assert!(
        out.lines().any(|l| l.trim() == runner_ip)
            && out.lines().any(|l| l.trim() == api.ip().to_string()),
        "the command should resolve its alias helper to {runner_ip} and service.front to {}:\n{out}",
        api.ip()
    );
    // The detached command is killed with bg's namespace below, or by the topology's cleanup
    // if the test fails first.
    let out = agent.netctl_run(
        &[
            "-d",
            "--network",
            "front",
            "--name",
            "bg",
            "--alias",
            "worker",
            "--",
            "sleep",
            "300",
        ],
        None,
    );
    assert!(
        out.success() && out.stdout == "bg\n",
        "netctl run -d\n{out}"
    );
    let bg = agent.endpoint_inspect("bg");
    let bg_reaper = ProcessReaper::new(&bg.netns);
    assert_eq!(bg.eth0().aliases, ["worker"]);
    assert_resolves(&web.netns, "worker", &[bg.ip()], Transport::Udp);
    assert_resolves(&web.netns, "worker.front", &[bg.ip()], Transport::Tcp);
    bg_reaper.kill_all();
    agent.endpoint_rm("bg");

    // `network connect --alias`: the alias lives on that network only, and on that network
    // the endpoint's own name means its address there.
    let connected =
        agent.network_connect("back", "api", &["--alias", "api-b", "--ip", "10.61.0.50"]);
    let api_back = connected.on("back");
    assert_eq!(
        (api_back.ip, &api_back.aliases),
        (ip("10.61.0.50"), &vec!["api-b".to_owned()])
    );
    assert_eq!(connected.on("front").aliases, ["service"]);
    for name in ["api-b", "api", "api.back", "api-b.back"] {
        assert_resolves(&db.netns, name, &[api_back.ip], Transport::Udp);
    }
    assert_unresolved(&db.netns, "service");
    assert_unresolved(&web.netns, "api-b");
    assert_resolves(&web.netns, "api", &[api.ip()], Transport::Udp);
    // api itself sees both networks.
    assert_resolves(&api.netns, "db", &[db.ip()], Transport::Udp);
    assert_resolves(&api.netns, "web", &[web.ip()], Transport::Udp);
    let reply = ask(
        &db.netns,
        &reverse_name(api_back.ip),
        RecordType::PTR,
        Transport::Udp,
    );
    assert_eq!(
        reply.ptr,
        ["api"],
        "PTR of api's back address from db: {reply}"
    );

    // Disconnecting takes the names on that network along, at once.
    agent.network_disconnect("back", "api");
    for name in ["api-b", "api"] {
        assert_unresolved(&db.netns, name);
    }
    assert_unresolved(&api.netns, "db");
    assert_resolves(&web.netns, "service", &[api.ip()], Transport::Udp);
    assert_consistent(&agent);
}

#[test]
fn removed_endpoints_stop_resolving_at_once() {
    let topo = Topology::new(1);
    let (agent, _upstream) = agent_with_upstream(&topo);
    agent.network_create("front", "10.60.0.0/24", &[]);
    let web = agent.endpoint_create("web", "front", &["--alias", "www"]);
    let api = agent.endpoint_create("api", "front", &[]);
    assert_resolves(&api.netns, "web", &[web.ip()], Transport::Udp);
    let resolv_dir = Path::new("/etc/netns").join(agent.endpoint_netns("web"));
    assert!(resolv_dir.join("resolv.conf").exists());

    agent.endpoint_rm("web");
    // No waiting: the very next queries must not find it.
    for name in ["web", "www", "web.front"] {
        assert_unresolved(&api.netns, name);
    }
    let reply = ask(
        &api.netns,
        &reverse_name(web.ip()),
        RecordType::PTR,
        Transport::Tcp,
    );
    assert!(
        reply.ptr.is_empty(),
        "PTR of removed web's address: {reply}"
    );
    assert!(
        !resolv_dir.exists(),
        "{} is still there",
        resolv_dir.display()
    );

    // A new endpoint with the same name resolves to its own address.
    agent.endpoint_create("other", "front", &[]);
    let again = agent.endpoint_create("web", "front", &[]);
    assert_ne!(again.ip(), web.ip());
    assert_resolves(&api.netns, "web", &[again.ip()], Transport::Udp);
    assert_unresolved(&api.netns, "www");

    // The endpoint of a `netctl run` resolves while the command runs, and not after.
    let resolve_tmp =
        "dig +short +time=3 +tries=2 tmp; dig +short +time=3 +tries=2 tmp-alias.front";
    let out = run_ok(
        &agent,
        &[
            "--network",
            "front",
            "--name",
            "tmp",
            "--alias",
            "tmp-alias",
            "--",
            "sh",
            "-c",
            resolve_tmp,
        ],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines.len() == 2 && lines[0] == lines[1] && lines[0].starts_with("10.60.0."),
        "{out}"
    );
    assert_unresolved(&api.netns, "tmp");
    assert_unresolved(&api.netns, "tmp-alias");
    assert_consistent(&agent);
}

#[test]
fn the_default_network_has_no_name_resolution_but_forwards() {
    let topo = Topology::new(1);
    let (agent, upstream) = agent_with_upstream(&topo);
    let d1 = agent.endpoint_create_with("d1", &[]);
    let d2 = agent.endpoint_create_with("d2", &["--alias", "dee"]);
    for name in ["d2", "dee", "d2.default", "d1"] {
        assert_unresolved(&d1.netns, name);
    }
    let reply = ask(
        &d1.netns,
        &reverse_name(d2.ip()),
        RecordType::PTR,
        Transport::Udp,
    );
    assert!(reply.ptr.is_empty(), "PTR of d2 on default: {reply}");
    assert!(dig(&d1.netns, &[], "d2").is_empty());
    // Other names are forwarded as for everyone.
    assert_eq!(
        dig(&d1.netns, &[], UPSTREAM_NAME),
        [UPSTREAM_IP.to_string()]
    );
    assert!(upstream.asked(UPSTREAM_NAME) >= 1);
    // `netctl run` on default: no names either.
    let out = agent.netctl_run(&["--", "ping", "-c", "1", "-W", "1", "d2"], None);
    assert!(!out.success(), "ping d2 by name from default\n{out}");
}

#[test]
fn an_internal_network_resolves_its_names_and_refuses_the_rest() {
    let topo = Topology::new(1);
    let (agent, upstream) = agent_with_upstream(&topo);
    agent.network_create("inner", "10.40.0.0/24", &["--internal"]);
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let i = agent.endpoint_create("i", "inner", &["--alias", "eye"]);
    let j = agent.endpoint_create("j", "inner", &[]);
    for transport in [Transport::Udp, Transport::Tcp] {
        assert_resolves(&j.netns, "i", &[i.ip()], transport);
        assert_resolves(&j.netns, "eye.inner", &[i.ip()], transport);
        // Not ours: refused at once, and the upstream never hears of it, as with Docker's
        // resolver for a container on internal networks alone.
        let reply = ask(&j.netns, UPSTREAM_NAME, RecordType::A, transport);
        assert!(
            reply.rcode == ResponseCode::Refused && reply.a.is_empty(),
            "{UPSTREAM_NAME} asked from j over {transport:?}: {reply}"
        );
    }
    assert_eq!(
        upstream.asked(UPSTREAM_NAME),
        0,
        "{:?}",
        upstream.all_asked()
    );
    // On a network that is not internal as well, j may reach beyond the host: forwarded.
    agent.network_connect("blue", "j", &[]);
    let reply = ask(&j.netns, UPSTREAM_NAME, RecordType::A, Transport::Udp);
    assert_eq!(reply.a, [UPSTREAM_IP], "{reply}");
    assert!(upstream.asked(UPSTREAM_NAME) >= 1);
    // i is still confined.
    let reply = ask(&i.netns, UPSTREAM_NAME, RecordType::A, Transport::Udp);
    assert_eq!(reply.rcode, ResponseCode::Refused, "{reply}");
}

#[test]
fn a_silent_upstream_gives_servfail_not_a_hang() {
    let topo = Topology::new(1);
    // The harness's default upstream is the outside namespace, where nothing listens here.
    let agent = topo.host(1).start_agent();
    agent.network_create("front", "10.60.0.0/24", &[]);
    let web = agent.endpoint_create("web", "front", &[]);
    agent.endpoint_create("api", "front", &[]);
    let reply = ask(&web.netns, UPSTREAM_NAME, RecordType::A, Transport::Udp);
    assert!(
        reply.rcode == ResponseCode::ServFail && reply.a.is_empty(),
        "{UPSTREAM_NAME} without an upstream: {reply}"
    );
    // Local names do not depend on the upstream.
    assert_resolves(
        &web.netns,
        "api",
        &[agent.endpoint_inspect("api").ip()],
        Transport::Udp,
    );
}

#[test]
fn idle_dns_tcp_connections_do_not_starve_the_agent() {
    let topo = Topology::new(1);
    let agent = topo.host(1).start_agent();
    agent.network_create("front", "10.60.0.0/24", &[]);
    let a = agent.endpoint_create("a", "front", &[]);
    let b = agent.endpoint_create("b", "front", &[]);
    // The agent gets the descriptor limit systemd gives services by default (soft 1024).
    let pid = agent.pid().expect("the agent runs").to_string();
    net_tests::run_ok("prlimit", &["--pid", &pid, "--nofile=1024:1024"]);

    // One endpoint opens more idle TCP connections to its resolver than that and sends
    // nothing on them.
    let idle: Vec<std::net::TcpStream> = net_tests::in_netns(&a.netns, || {
        (0..1100)
            .filter_map(|_| {
                std::net::TcpStream::connect_timeout(&RESOLVER, Duration::from_secs(2)).ok()
            })
            .collect()
    });
    assert!(idle.len() >= 1000, "only {} connections opened", idle.len());

    // Another endpoint's resolver must answer over TCP, and the API must answer, at the latest
    // once the agent has dropped connections that stay idle.
    wait_until(
        TIMEOUT,
        format!(
            "b's resolver to answer over TCP while a holds {} idle connections (agent fds: {})",
            idle.len(),
            std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
        ),
        || {
            query(&b.netns, RESOLVER, "a", RecordType::A, Transport::Tcp)
                .is_ok_and(|r| r.a == [a.ip()])
        },
    );
    assert_eq!(agent.status().endpoints, 2);
    drop(idle);
}

// ---- netctl run ----

#[test]
fn run_passes_streams_exit_codes_and_stdin_through_and_cleans_up() {
    let topo = Topology::new(1);
    let agent = topo.host(1).start_agent();
    let before = agent.snapshot();

    let out = agent.netctl_run(&["--", "sh", "-c", "echo out; echo err >&2; exit 7"], None);
    assert_eq!(out.status.code(), Some(7), "{out}");
    assert_eq!(
        (out.stdout.as_str(), out.stderr.as_str()),
        ("out\n", "err\n"),
        "{out}"
    );
    assert_eq!(agent.snapshot(), before, "netctl run left state behind");

    // stdin, large enough to need several pipe buffers.
    let input: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
    let out = agent.netctl_run(&["--", "cat"], Some(input.as_bytes()));
    assert!(out.success(), "{out}");
    assert!(
        out.stdout == input,
        "cat returned {} bytes of {}",
        out.stdout.len(),
        input.len()
    );

    // A command killed by a signal: 128 + the signal number, as shells report it.
    let out = agent.netctl_run(&["--", "sh", "-c", "kill -TERM $$"], None);
    assert_eq!(out.status.code(), Some(128 + 15), "{out}");
    assert_eq!(agent.snapshot(), before, "netctl run left state behind");

    // The same in every mode (host: netctl itself runs on the host).
    let owner = agent.endpoint_create_with("owner", &["--mode", "none"]);
    let with_owner = agent.snapshot();
    let script = "echo out-$0; echo err-$0 >&2; exit 5";
    for mode in ["none", "container:owner", "bridge"] {
        let out = agent.netctl_run(&["--net", mode, "--", "sh", "-c", script, mode], None);
        assert_eq!(out.status.code(), Some(5), "{out}");
        assert_eq!(
            (out.stdout.clone(), out.stderr.clone()),
            (format!("out-{mode}\n"), format!("err-{mode}\n")),
            "{out}"
        );
    }
    let out = agent.netctl_on_host(&["run", "--net", "host", "--", "sh", "-c", script, "host"]);
    assert_eq!(out.status.code(), Some(5), "{out}");
    assert_eq!(
        (out.stdout.as_str(), out.stderr.as_str()),
        ("out-host\n", "err-host\n"),
        "{out}"
    );
    let out = agent.netctl_run(
        &["--net", "container:owner", "--", "cat"],
        Some(b"via owner\n"),
    );
    assert_eq!(out.stdout, "via owner\n", "{out}");
    assert_eq!(agent.snapshot(), with_owner, "netctl run left state behind");
    assert!(owner.interfaces.is_empty());
    agent.endpoint_rm("owner");

    // While it runs, the command is in the endpoint's namespace; afterwards that is gone.
    let netns = agent.endpoint_netns("probe");
    let out = run_ok(
        &agent,
        &[
            "--name",
            "probe",
            "--",
            "sh",
            "-c",
            "readlink /proc/self/ns/net; ip -4 -o addr show dev eth0; cat /etc/resolv.conf",
        ],
    );
    assert!(out.contains("inet 172.17.0.2/16"), "{out}");
    assert!(
        out.contains("nameserver 127.0.0.11"),
        "the command's resolv.conf:\n{out}"
    );
    assert!(
        !Path::new("/run/netns").join(&netns).exists(),
        "{netns} is still there"
    );
    agent.assert_refused(&["endpoint", "inspect", "probe"], &["probe", "not found"]);
    assert_eq!(agent.snapshot(), before, "netctl run left state behind");
}

#[test]
fn run_detach_keeps_the_endpoint_and_prints_its_name() {
    let topo = Topology::new(1);
    let agent = topo.host(1).start_agent();
    agent.network_create("front", "10.60.0.0/24", &[]);
    let web = agent.endpoint_create("web", "front", &[]);
    // The detached command is killed below, or by the topology's cleanup if the test fails
    // first.
    let out = agent.netctl_run(
        &[
            "--detach",
            "--network",
            "front",
            "--name",
            "bg",
            "--",
            "sh",
            "-c",
            "echo started >&2; exec sleep 300",
        ],
        None,
    );
    assert!(out.success(), "{out}");
    assert_eq!(out.stdout, "bg\n", "{out}");
    let bg = agent.endpoint_inspect("bg");
    let reaper = ProcessReaper::new(&bg.netns);
    wait_until(
        TIMEOUT,
        "the detached command to run in bg's namespace",
        || !reaper.pids().is_empty(),
    );
    assert_eq!(bg.networks(), ["front"]);
    assert!(
        ping_ok(&web.netns, bg.ip()),
        "web cannot ping the detached bg"
    );
    assert_consistent(&agent);
    reaper.kill_all();
    agent.endpoint_rm("bg");
    assert_consistent(&agent);
}

fn ping_ok(netns: &str, to: Ipv4Addr) -> bool {
    exec_in(
        netns,
        &["ping", "-n", "-c", "1", "-W", "2", &to.to_string()],
    )
    .success()
}

#[test]
fn run_reaches_another_endpoint_by_name() {
    let topo = Topology::new(1);
    let (agent, _upstream) = agent_with_upstream(&topo);
    agent.network_create("front", "10.60.0.0/24", &[]);
    let web = agent.endpoint_create("web", "front", &[]);
    let sink = tcp_sink(&web.netns, sock(web.ip(), 7400));

    run_ok(
        &agent,
        &["--network", "front", "--", "sh", "-c", "ping -c1 -W2 web"],
    );
    run_ok(
        &agent,
        &[
            "--network",
            "front",
            "--",
            "bash",
            "-c",
            "exec 3<>/dev/tcp/web/7400; printf by-name >&3; exec 3>&-",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&sink.received()), "by-name");
    // A joiner of an endpoint on front resolves through its owner's resolver.
    let api = agent.endpoint_create("api", "front", &[]);
    let out = run_ok(
        &agent,
        &[
            "--net",
            "container:api",
            "--",
            "dig",
            "+short",
            "+time=3",
            "web",
        ],
    );
    assert_eq!(out.trim(), web.ip().to_string(), "{out}");
    assert_eq!(api.networks(), ["front"]);
    assert_consistent(&agent);
}

// ---- survives a restart ----

#[test]
fn modes_connections_and_names_survive_a_restart() {
    let topo = Topology::new(1);
    let (mut agent, upstream) = agent_with_upstream(&topo);
    agent.network_create("front", "10.60.0.0/24", &[]);
    agent.network_create("back", "10.61.0.0/24", &[]);
    let web = agent.endpoint_create("web", "front", &["--alias", "www"]);
    let api = agent.endpoint_create("api", "front", &[]);
    let db = agent.endpoint_create("db", "back", &[]);
    agent.network_connect("back", "api", &["--alias", "api-b"]);
    agent.endpoint_create_with("n", &["--mode", "none"]);
    agent.endpoint_create_with("h", &["--mode", "host"]);
    agent.endpoint_create_with("side", &["--mode", "container:web"]);
    agent.endpoint_create_with("d", &[]);
    assert_consistent(&agent);
    let before = agent.snapshot();
    let api_back = agent.endpoint_inspect("api").on("back").ip;

    agent.kill9();
    agent.restart();
    assert_eq!(
        agent.snapshot(),
        before,
        "state after kill -9 and a restart"
    );
    assert_consistent(&agent);
    assert_resolves(&api.netns, "www", &[web.ip()], Transport::Udp);
    assert_resolves(&db.netns, "api-b", &[api_back], Transport::Tcp);
    assert_unresolved(&web.netns, "db");
    let reply = ask(&web.netns, UPSTREAM_NAME, RecordType::A, Transport::Udp);
    assert_eq!(reply.a, [UPSTREAM_IP], "{reply}");
    assert!(upstream.asked(UPSTREAM_NAME) >= 1);
    let server = tcp_echo_server(&db.netns, sock(db.ip(), 7500));
    tcp_send_verify(&api.netns, &server, 64 * 1024);
}

// ---- refusals ----

#[test]
fn bad_modes_names_and_connections_are_refused() {
    let topo = Topology::new(1);
    let agent = topo.host(1).start_agent();
    agent.network_create("front", "10.60.0.0/24", &[]);
    agent.network_create("back", "10.61.0.0/24", &[]);
    agent.endpoint_create("web", "front", &[]);
    agent.endpoint_create_with("h", &["--mode", "host"]);
    agent.endpoint_create_with("side", &["--mode", "container:web"]);

    // Unknown modes and containers.
    agent.assert_refused(
        &["run", "--net", "foo:bar", "--", "true"],
        &["foo:bar", "mode"],
    );
    agent.assert_refused(
        &["endpoint", "create", "x", "--mode", "bridged"],
        &["bridged", "mode"],
    );
    agent.assert_refused(
        &["run", "--net", "container:nope", "--", "true"],
        &["nope", "not found"],
    );
    agent.assert_refused(
        &["endpoint", "create", "x", "--mode", "container:nope"],
        &["nope", "not found"],
    );
    agent.assert_refused(
        &["run", "--net", "nope", "--", "true"],
        &["nope", "not found"],
    );
    // Joining a host-mode endpoint or a joiner.
    agent.assert_refused(
        &["endpoint", "create", "x", "--mode", "container:h"],
        &["h", "host"],
    );
    agent.assert_refused(
        &["run", "--net", "container:side", "--", "true"],
        &["side", "web"],
    );
    // Options that do not apply to a mode.
    agent.assert_refused(
        &[
            "endpoint",
            "create",
            "x",
            "--mode",
            "none",
            "--ip",
            "10.60.0.9",
        ],
        &["--ip", "none"],
    );
    agent.assert_refused(
        &["run", "--net", "host", "--alias", "a", "--", "true"],
        &["--alias", "host"],
    );

    // Name clashes, whatever the mode.
    agent.assert_refused(
        &["run", "--name", "web", "--network", "front", "--", "true"],
        &["web", "exists"],
    );
    agent.assert_refused(
        &["run", "--name", "h", "--net", "none", "--", "true"],
        &["h", "exists"],
    );
    agent.assert_refused(
        &["endpoint", "create", "side", "--mode", "host"],
        &["side", "exists"],
    );

    // --publish: not with host mode (its ports are the host's already).
    agent.assert_refused(
        &["run", "--net", "host", "--publish", "8080:80", "--", "true"],
        &["does not apply with --net host"],
    );

    // Connections: twice to the same network, from a network it is not on, host and joiner
    // endpoints, unknown names, a taken address.
    agent.assert_refused(&["network", "connect", "front", "web"], &["web", "front"]);
    agent.assert_refused(&["network", "disconnect", "back", "web"], &["web", "back"]);
    agent.assert_refused(&["network", "connect", "back", "h"], &["h", "host"]);
    agent.assert_refused(&["network", "disconnect", "front", "h"], &["h", "front"]);
    agent.assert_refused(&["network", "connect", "back", "side"], &["side", "web"]);
    agent.assert_refused(
        &["network", "connect", "nope", "web"],
        &["nope", "not found"],
    );
    agent.assert_refused(
        &["network", "connect", "back", "ghost"],
        &["ghost", "not found"],
    );
    agent.assert_refused(
        &["network", "disconnect", "nope", "web"],
        &["nope", "not found"],
    );
    agent.endpoint_create("other", "back", &[]);
    let other_ip = agent.endpoint_inspect("other").ip().to_string();
    agent.assert_refused(
        &["network", "connect", "back", "web", "--ip", &other_ip],
        &[&other_ip, "other"],
    );
    agent.assert_refused(
        &["network", "connect", "back", "web", "--alias", "bad/alias"],
        &["alias"],
    );

    // The default network stays.
    agent.assert_refused(&["network", "rm", "default"], &["default"]);
    agent.assert_refused(
        &["network", "create", "clash", "--subnet", "172.17.5.0/24"],
        &["overlap", "default"],
    );
    assert_consistent(&agent);
}
