//! The cross-host overlay with real packets: hosts lease subnets of an overlay network's pool
//! from a shared cluster store and reach each other's endpoints through VXLAN encapsulated in
//! eBPF. Here with the embedded store, two agents on one machine sharing its directory; the
//! etcd-backed cluster has its own suite (`overlay_etcd.rs`).

use std::{os::fd::AsRawFd as _, path::Path, time::Duration};

use net_agent::cluster::{ClusterStore as _, HostNames, embedded::EmbeddedStore};
use net_tests::{
    Agent, EndpointExt, Host, TIMEOUT, Topology,
    api::{Endpoint, HostLease, Network},
    dns::{RecordType, Transport, ask, fake_upstream, reverse_name, wait_resolves},
    etcd::block_on,
    overlay::{self, OverlayExt},
    topology::OUTSIDE_IP,
    traffic::{sock, tcp_echo_server, tcp_send_verify, udp_echo_server, udp_roundtrip, udp_socket},
    wait_for, wait_until,
};

const POOL: &str = "10.244.0.0/16";
/// Short, so that a host that left is noticed quickly.
const LEASE_TTL: u64 = 3;

/// An agent on `host` in the cluster whose embedded store lives in `dir`.
fn cluster_agent<'t>(host: &'t Host, dir: &Path) -> Agent<'t> {
    let dir = dir.display().to_string();
    overlay::cluster_agent(
        host,
        &["--store", "embedded", "--cluster-dir", &dir],
        LEASE_TTL,
    )
}

/// Both hosts' agents in one cluster, the overlay network `ov` on [`POOL`], endpoint `e1` on h1
/// and `e2` on h2, once each host routes the other's subnet.
fn endpoint_on_each_host(topo: &Topology) -> (Agent<'_>, Agent<'_>, Endpoint, Endpoint) {
    let dir = topo.dir().join("cluster");
    let a1 = cluster_agent(topo.host(1), &dir);
    let a2 = cluster_agent(topo.host(2), &dir);
    let (e1, e2) = overlay::endpoint_on_each_host(&a1, &a2, POOL);
    (a1, a2, e1, e2)
}

#[test]
fn two_agents_sharing_an_embedded_store_carry_traffic_over_vxlan() {
    let topo = Topology::new(2);
    let dir = topo.dir().join("cluster");
    let a1 = cluster_agent(topo.host(1), &dir);
    let a2 = cluster_agent(topo.host(2), &dir);
    let created: Network = a1.netctl_json(&[
        "network", "create", "ov", "--driver", "overlay", "--subnet", POOL,
    ]);
    assert_eq!(created.driver, "overlay");
    assert_eq!(created.mtu, 1450, "underlay 1500 minus VXLAN's 50");
    let on_h2 = a2.wait_network("ov");
    assert_ne!(on_h2.subnet, created.subnet, "two hosts leased one subnet");
    assert_eq!(on_h2.vni, created.vni);

    let e1 = a1.endpoint_create("e1", "ov", &[]);
    let e2 = a2.endpoint_create("e2", "ov", &[]);
    // Each host routes the other's subnet to it.
    a1.wait_route(&on_h2.subnet, true);
    a2.wait_route(&created.subnet, true);

    let server = tcp_echo_server(&e2.netns, sock(e2.ip(), 7000));
    tcp_send_verify(&e1.netns, &server, 4 << 20);
    let udp = udp_echo_server(&e1.netns, sock(e1.ip(), 7001));
    assert!(
        udp_roundtrip(&e2.netns, None, udp.addr(), 5, Duration::from_millis(500)),
        "no UDP echo from e1 to e2 across the overlay"
    );

    let hosts: Vec<HostLease> = a1.netctl_json(&["host", "ls"]);
    assert_eq!(
        hosts
            .iter()
            .map(|h| (h.host.as_str(), h.vtep))
            .collect::<Vec<_>>(),
        [
            ("h1", topo.host(1).underlay_ip()),
            ("h2", topo.host(2).underlay_ip())
        ],
        "{hosts:?}"
    );
}

#[test]
fn endpoint_names_resolve_on_every_host_of_their_overlay_network_only() {
    let topo = Topology::new(2);
    // The world's DNS, for the names no host knows: NXDOMAIN at once instead of a timeout.
    let _upstream = fake_upstream(topo.outside(), sock(OUTSIDE_IP, 53), &[]);
    // Leases long enough that a slow sync on a loaded machine never lets one lapse (which
    // would hide a host's names for a moment), short enough to see one expire at the end.
    let dir = topo.dir().join("cluster");
    let store = [
        "--store",
        "embedded",
        "--cluster-dir",
        dir.to_str().expect("UTF-8 path"),
    ];
    let a1 = overlay::cluster_agent(topo.host(1), &store, 10);
    let mut a2 = overlay::cluster_agent(topo.host(2), &store, 10);
    let (e1, e2) = overlay::endpoint_on_each_host(&a1, &a2, POOL);
    let db = a2.endpoint_create("db", "ov", &["--alias", "postgres"]);
    // Another overlay network, and a bridge network, on h2: their names stay there.
    a2.netctl_ok(&[
        "network",
        "create",
        "ov2",
        "--driver",
        "overlay",
        "--subnet",
        "10.245.0.0/16",
    ]);
    a1.wait_network("ov2");
    let hidden = a2.endpoint_create("hidden", "ov2", &[]);
    a2.network_create("local", "10.60.0.0/24", &[]);
    a2.endpoint_create("bridged", "local", &[]);

    // Names, aliases and `name.network` of the other host's endpoints, both ways, and PTR.
    wait_resolves(&e1.netns, "e2", &[e2.ip()]);
    wait_resolves(&e1.netns, "postgres", &[db.ip()]);
    wait_resolves(&e1.netns, "db.ov", &[db.ip()]);
    wait_resolves(&e2.netns, "e1", &[e1.ip()]);
    wait_until(TIMEOUT, "a PTR answer for db from h1", || {
        let reply = ask(
            &e1.netns,
            &reverse_name(db.ip()),
            RecordType::PTR,
            Transport::Udp,
        );
        reply.ptr == ["db"] && reply.authoritative
    });
    // What h1 knows of them.
    let expected = [
        (
            "db".to_owned(),
            "h2".to_owned(),
            vec!["postgres".to_owned()],
        ),
        ("e2".to_owned(), "h2".to_owned(), Vec::new()),
    ];
    wait_until(
        TIMEOUT,
        "network inspect ov on h1 to list db and e2",
        || {
            let remote: Vec<(String, String, Vec<String>)> = a1
                .network_inspect("ov")
                .remote_endpoints
                .into_iter()
                .map(|e| (e.name, e.host, e.aliases))
                .collect();
            remote == expected
        },
    );
    // Never across networks, nor from a bridge network of another host: checked once h1 has
    // what h2 published of ov2 (h2 publishes all its networks in one sync).
    let far = a1.endpoint_create("far", "ov2", &[]);
    wait_resolves(&far.netns, "hidden", &[hidden.ip()]);
    wait_resolves(&e1.netns, "hidden", &[]);
    wait_resolves(&e1.netns, "bridged", &[]);
    wait_resolves(&far.netns, "bridged", &[]);
    wait_resolves(&far.netns, "e2", &[]);

    // Removed, and connected, as they happen.
    a2.endpoint_rm("db");
    wait_resolves(&e1.netns, "postgres", &[]);
    a2.network_connect("ov", "hidden", &["--alias", "joined"]);
    let joined = a2.endpoint_inspect("hidden");
    let on_ov = joined
        .interfaces
        .iter()
        .find(|i| i.network == "ov")
        .expect("hidden's interface on ov");
    wait_resolves(&e1.netns, "joined", &[on_ov.ip]);

    // A record that goes from under its host (here deleted straight in the store) comes back
    // at its next sync.
    let cluster = EmbeddedStore::open(&dir).expect("opening the cluster store");
    let h2_on_ov = || {
        block_on(cluster.all_names())
            .expect("reading names")
            .into_iter()
            .find(|r| r.network == "ov" && r.host == "h2")
    };
    let record = h2_on_ov().expect("h2's names on ov in the store");
    block_on(cluster.put_names(&HostNames {
        names: Vec::new(),
        ..record.clone()
    }))
    .expect("deleting h2's record");
    wait_until(TIMEOUT, "h2 to publish its names on ov again", || {
        h2_on_ov().as_ref() == Some(&record)
    });
    wait_resolves(&e1.netns, "e2", &[e2.ip()]);

    // A host that stops without a word: its names go with its lease.
    a2.kill9();
    wait_resolves(&e1.netns, "e2", &[]);
}

/// A VXLAN packet (outer UDP payload): VNI `vni`, inner Ethernet + IPv4 + UDP from `src` to
/// `dst`, port 7 to port 7.
fn vxlan_payload(vni: u32, src: std::net::Ipv4Addr, dst: std::net::Ipv4Addr) -> Vec<u8> {
    let mut p = vec![0x08, 0, 0, 0];
    p.extend_from_slice(&(vni << 8).to_be_bytes());
    // Inner Ethernet: any MACs, IPv4.
    p.extend_from_slice(&[2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00]);
    let payload = b"forged";
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let csum = net_tests::fixture::internet_checksum(&[&ip]);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    p.extend_from_slice(&ip);
    p.extend_from_slice(&[0, 7, 0, 7]);
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

fn overlay_drops(agent: &Agent<'_>, reason: &str) -> u64 {
    let status = agent.status();
    status
        .overlay
        .map(|o| {
            o.drops
                .iter()
                .filter(|d| d.reason == reason)
                .map(|d| d.packets)
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn overlay_networks_stay_isolated_and_forged_vxlan_is_dropped() {
    let topo = Topology::new(2);
    let dir = topo.dir().join("cluster");
    let a1 = cluster_agent(topo.host(1), &dir);
    let a2 = cluster_agent(topo.host(2), &dir);
    a1.netctl_ok(&[
        "network",
        "create",
        "red",
        "-d",
        "overlay",
        "--subnet",
        "10.244.0.0/16",
    ]);
    a1.netctl_ok(&[
        "network",
        "create",
        "blue",
        "-d",
        "overlay",
        "--subnet",
        "10.245.0.0/16",
    ]);
    a2.wait_network("red");
    a2.wait_network("blue");
    let r1 = a1.endpoint_create("r1", "red", &[]);
    let b2 = a2.endpoint_create("b2", "blue", &[]);
    let r2 = a2.endpoint_create("r2", "red", &[]);
    for agent in [&a1, &a2] {
        wait_until(
            overlay::FOLLOW,
            format!(
                "{}'s routes to both hosts' subnets of both networks",
                agent.host().netns()
            ),
            || agent.routes().iter().filter(|r| r.vtep.is_some()).count() == 4,
        );
    }

    // Same network across hosts: through. Other network: dropped at the sender.
    let server = tcp_echo_server(&r2.netns, sock(r2.ip(), 7000));
    tcp_send_verify(&r1.netns, &server, 64 * 1024);
    let udp = udp_echo_server(&b2.netns, sock(b2.ip(), 7001));
    assert!(
        !udp_roundtrip(&r1.netns, None, udp.addr(), 3, Duration::from_millis(300)),
        "red reached blue across hosts"
    );
    assert!(
        net_tests::drop_count(
            &a1.endpoint_stats("r1"),
            net_tests::DropReason::NetworkIsolation
        ) > 0
    );

    // VXLAN from the outside namespace, which holds no lease, claiming to be h1's subnet: the
    // VXLAN device's program drops it before it reaches an endpoint.
    let forged = vxlan_payload(
        a2.wait_network("red").vni.expect("red's VNI"),
        r1.ip(),
        r2.ip(),
    );
    let before = overlay_drops(&a2, "overlay-bad-source");
    let socket = net_tests::traffic::udp_socket(topo.outside(), None);
    let h2_vtep = sock(topo.host(2).underlay_ip(), 4789);
    wait_until(
        Duration::from_secs(5),
        "the forged VXLAN packet counted as overlay-bad-source on h2",
        || {
            socket.send_to(&forged, h2_vtep).expect("sending VXLAN");
            overlay_drops(&a2, "overlay-bad-source") > before
        },
    );
    // The uplink left it to the VXLAN device, which is where it was refused.
    assert!(vxlan_device_rx_packets(&a2) > 0);
}

/// Packets the VXLAN device of `agent`'s host has received (what its uplink left to it), as
/// `netctl status` reports them, once they agree with the device's own counter (a packet still
/// on its way may land between the two reads).
fn vxlan_device_rx_packets(agent: &Agent<'_>) -> u64 {
    wait_for(
        Duration::from_secs(5),
        "netctl status to count what ip -s link counts on the VXLAN device",
        || {
            let overlay = agent.status().overlay.expect("an overlay status");
            let device = overlay.vxlan.expect("the agent has a VXLAN device");
            let reported = overlay
                .vxlan_rx_packets
                .expect("netctl status counts the VXLAN device's packets");
            let links = net_tests::netns::ip_json(
                agent.host().netns(),
                &["-s", "link", "show", "dev", &device],
            );
            let counted = links[0]["stats64"]["rx"]["packets"]
                .as_u64()
                .unwrap_or_else(|| panic!("no rx packet count for {device}: {links}"));
            (reported == counted).then_some(reported)
        },
    )
}

#[test]
fn a_large_transfer_crosses_the_overlay_decapsulated_at_the_uplink_without_ip_fragments() {
    let topo = Topology::new(2);
    let (_a1, a2, e1, e2) = endpoint_on_each_host(&topo);
    let device_rx_before = vxlan_device_rx_packets(&a2);
    let sniffer = net_tests::nat::ipv4_sniffer(topo.host(2).netns());
    let server = tcp_echo_server(&e2.netns, sock(e2.ip(), 7000));
    tcp_send_verify(&e1.netns, &server, 32 << 20);
    // Veths carry GSO packets whole, so sizes on the underlay say little; what matters is that
    // nothing was fragmented, and that no outer packet could be (DF): the endpoints' MTU
    // leaves room for the encapsulation.
    let seen = sniffer.seen();
    let vxlan: Vec<_> = seen.iter().filter(|p| p.proto == 17).collect();
    assert!(!vxlan.is_empty(), "no VXLAN seen on h2's underlay");
    let fragments: Vec<_> = seen.iter().filter(|p| p.fragment).collect();
    assert!(
        fragments.is_empty(),
        "IP fragments on the underlay: {fragments:?}"
    );
    let without_df: Vec<_> = vxlan.iter().filter(|p| !p.dont_fragment).collect();
    assert!(without_df.is_empty(), "VXLAN without DF: {without_df:?}");
    // The 32 MB arrived (and came back) intact, and h2 decapsulated all of it at its uplink:
    // its VXLAN device received none of it, GSO packets (more than one MTU in one skb)
    // included.
    let h2 = topo.host(2).underlay_ip();
    let gso_in = vxlan
        .iter()
        .filter(|p| !p.outgoing && p.dst == h2 && p.len > 1500)
        .count();
    assert!(gso_in > 0, "no GSO VXLAN packet arrived at h2: {vxlan:?}");
    assert_eq!(
        vxlan_device_rx_packets(&a2),
        device_rx_before,
        "h2's VXLAN device decapsulated packets that its uplink should have"
    );
}

/// One `UDP_SEGMENT` send of four 1,000-byte datagrams from e1 crosses to e2 as one GSO packet
/// (veths keep it whole); e2 must get the four datagrams as they were sent. The receiving
/// host's uplink leaves such a packet to its VXLAN device: decapsulated there, its stale tunnel
/// GSO type would have the receiving socket segment it as a tunnel packet.
#[test]
fn udp_gso_datagrams_cross_the_overlay_whole() {
    const SEGMENT: usize = 1000;
    const SEGMENTS: usize = 4;
    let topo = Topology::new(2);
    let (_a1, _a2, e1, e2) = endpoint_on_each_host(&topo);
    let sniffer = net_tests::nat::ipv4_sniffer(topo.host(2).netns());
    let receiver = udp_socket(&e2.netns, Some(e2.ip()));
    receiver
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("a read timeout");
    let to = receiver.local_addr().expect("the receiver's address");
    let sender = udp_socket(&e1.netns, None);
    let segment_size = SEGMENT as libc::c_int;
    // SAFETY: setsockopt on a socket we own, with an int option and its size.
    let set = unsafe {
        libc::setsockopt(
            sender.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            (&segment_size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0, "UDP_SEGMENT: {}", std::io::Error::last_os_error());
    // Datagram i is SEGMENT bytes of i + 1.
    let payload: Vec<u8> = (0..SEGMENTS)
        .flat_map(|i| std::iter::repeat_n(i as u8 + 1, SEGMENT))
        .collect();
    let mut got = Vec::new();
    wait_until(
        Duration::from_secs(5),
        "one GSO send's datagrams to arrive whole at e2",
        || {
            sender.send_to(&payload, to).expect("the GSO send");
            let mut buf = [0u8; 2 * SEGMENT];
            got.clear();
            while let Ok(n) = receiver.recv(&mut buf) {
                got.push(buf[..n].to_vec());
            }
            got.len() == SEGMENTS
        },
    );
    for (i, datagram) in got.iter().enumerate() {
        assert!(
            datagram.len() == SEGMENT && datagram.iter().all(|&b| b == i as u8 + 1),
            "datagram {i} arrived as {} bytes: {:?}...",
            datagram.len(),
            &datagram[..datagram.len().min(16)]
        );
    }
    let h2 = topo.host(2).underlay_ip();
    assert!(
        sniffer.seen().iter().any(|p| !p.outgoing
            && p.dst == h2
            && p.proto == 17
            && usize::from(p.len) > payload.len()),
        "the GSO send did not reach h2 as one packet"
    );
}

#[test]
fn a_restarted_agent_keeps_its_subnet_and_its_traffic() {
    let topo = Topology::new(2);
    // Both ways routed before h1's agent goes: what it had not learnt yet it cannot learn down.
    let (mut a1, a2, e1, e2) = endpoint_on_each_host(&topo);
    let n1 = a1.wait_network("ov");
    let server = tcp_echo_server(&e2.netns, sock(e2.ip(), 7000));

    // Down, then back: the same subnet, the same endpoints, traffic as before.
    a1.kill9();
    tcp_send_verify(&e1.netns, &server, 256 * 1024);
    a1.restart();
    let again = a1.wait_network("ov");
    assert_eq!(again.subnet, n1.subnet, "h1 came back with another subnet");
    let hosts: Vec<HostLease> = a2.netctl_json(&["host", "ls"]);
    assert!(
        hosts
            .iter()
            .any(|h| h.host == "h1" && h.subnet == n1.subnet),
        "{hosts:?}"
    );
    tcp_send_verify(&e1.netns, &server, 256 * 1024);
    net_tests::assert_consistent(&a1);
}

#[test]
fn bad_overlay_requests_are_refused_and_removal_reaches_every_host() {
    let topo = Topology::new(2);
    let dir = topo.dir().join("cluster");
    let a1 = cluster_agent(topo.host(1), &dir);
    let a2 = cluster_agent(topo.host(2), &dir);
    a1.netctl_ok(&["network", "create", "ov", "-d", "overlay", "--subnet", POOL]);
    a2.wait_network("ov");
    for (args, mentions) in [
        (
            &["-d", "mesh", "--subnet", "10.50.0.0/16"][..],
            &["mesh", "driver"][..],
        ),
        (
            &["--subnet", "10.50.0.0/24", "--subnet-len", "26"][..],
            &["--subnet-len", "overlay"][..],
        ),
        (
            &[
                "-d",
                "overlay",
                "--subnet",
                "10.50.0.0/16",
                "--gateway",
                "10.50.0.1",
            ][..],
            &["--gateway"][..],
        ),
        (
            &["-d", "overlay", "--subnet", "10.244.128.0/17"][..],
            &["overlaps", "10.244.0.0/16"][..],
        ),
        (
            &[
                "-d",
                "overlay",
                "--subnet",
                "10.60.0.0/24",
                "--subnet-len",
                "16",
            ][..],
            &["subnet length /16", "/24"][..],
        ),
    ] {
        let mut full = vec!["network", "create", "x"];
        full.extend_from_slice(args);
        a1.assert_refused(&full, mentions);
    }
    // An endpoint keeps the network here; once it is gone, removal clears every host.
    a1.endpoint_create("e1", "ov", &[]);
    a1.assert_refused(&["network", "rm", "ov"], &["e1"]);
    a1.endpoint_rm("e1");
    a1.netctl_ok(&["network", "rm", "ov"]);
    wait_until(Duration::from_secs(5), "ov gone from host 2", || {
        let networks: Vec<Network> = a2.netctl_json(&["network", "ls"]);
        !networks.iter().any(|n| n.name == "ov")
    });
    let hosts: Vec<HostLease> = a2.netctl_json(&["host", "ls"]);
    assert!(hosts.is_empty(), "{hosts:?}");
    wait_until(Duration::from_secs(5), "h2's routes withdrawn", || {
        a2.routes().is_empty()
    });
}
