//! The overlay on a real etcd: three simulated hosts on one underlay, etcd in a namespace of its
//! own. Every pair of hosts carries TCP (data verified) and UDP between endpoints; a host that
//! leaves has its routes withdrawn by the others and a host that joins becomes reachable; with
//! etcd stopped, running traffic goes on, and once etcd is back a host that started meanwhile
//! joins and the leases are still those from before. Endpoint names resolve on every host, and
//! those of a host that left stop resolving with its lease.

use std::time::Duration;

use net_tests::{
    Agent, EndpointExt, Host, Topology,
    api::{Endpoint, HostLease},
    dns::{fake_upstream, wait_resolves},
    etcd::Etcd,
    overlay::{self, OverlayExt, cluster_agent},
    topology::OUTSIDE_IP,
    traffic::{
        sock, start_stream, tcp_echo_server, tcp_send_verify, udp_echo_server, udp_roundtrip,
    },
};

const POOL: &str = "10.244.0.0/16";
fn etcd_agent<'t>(host: &'t Host, etcd: &Etcd<'_>, lease_ttl: u64) -> Agent<'t> {
    cluster_agent(host, &["--store", &etcd.spec()], lease_ttl)
}

/// TCP (data verified) both ways and UDP both ways between two endpoints.
fn exchange(a: &Endpoint, b: &Endpoint) {
    for (from, to) in [(a, b), (b, a)] {
        let server = tcp_echo_server(&to.netns, sock(to.ip(), 7000));
        tcp_send_verify(&from.netns, &server, 256 * 1024);
        let udp = udp_echo_server(&to.netns, sock(to.ip(), 7001));
        assert!(
            udp_roundtrip(&from.netns, None, udp.addr(), 5, Duration::from_millis(500)),
            "no UDP echo from {} to {}",
            from.name,
            to.name
        );
    }
}

#[test]
fn three_hosts_on_etcd_reach_each_other_and_follow_joins_and_leaves() {
    let topo = Topology::new(3);
    // The world's DNS, for the names no host knows: NXDOMAIN at once instead of a timeout.
    let _upstream = fake_upstream(topo.outside(), sock(OUTSIDE_IP, 53), &[]);
    let etcd = Etcd::start(&topo);
    let a1 = etcd_agent(topo.host(1), &etcd, 3);
    let a2 = etcd_agent(topo.host(2), &etcd, 3);
    let (e1, e2) = overlay::endpoint_on_each_host(&a1, &a2, POOL);
    let (n1, n2) = (a1.wait_network("ov"), a2.wait_network("ov"));
    exchange(&e1, &e2);
    wait_resolves(&e1.netns, "e2", &[e2.ip()]);

    // A host joins: the others route to it within moments, and it to them.
    let mut a3 = etcd_agent(topo.host(3), &etcd, 3);
    let n3 = a3.wait_network("ov");
    let e3 = a3.endpoint_create("e3", "ov", &[]);
    a1.wait_route(&n3.subnet, true);
    a2.wait_route(&n3.subnet, true);
    a3.wait_route(&n1.subnet, true);
    a3.wait_route(&n2.subnet, true);
    exchange(&e1, &e3);
    exchange(&e2, &e3);
    wait_resolves(&e1.netns, "e3", &[e3.ip()]);
    wait_resolves(&e3.netns, "e2", &[e2.ip()]);
    let hosts: Vec<HostLease> = a1.netctl_json(&["host", "ls"]);
    assert_eq!(
        hosts.iter().map(|h| h.host.as_str()).collect::<Vec<_>>(),
        ["h1", "h2", "h3"],
        "{hosts:?}"
    );

    // A host leaves (its agent is gone, so its lease is not renewed): once the lease runs out,
    // the others withdraw its route.
    a3.kill9();
    a1.wait_route(&n3.subnet, false);
    a2.wait_route(&n3.subnet, false);
    wait_resolves(&e1.netns, "e3", &[]);
    exchange(&e1, &e2);
}

#[test]
fn with_etcd_down_traffic_goes_on_and_the_cluster_catches_up_after() {
    let topo = Topology::new(3);
    let mut etcd = Etcd::start(&topo);
    // Leases long enough to outlast the outage.
    let a1 = etcd_agent(topo.host(1), &etcd, 30);
    let a2 = etcd_agent(topo.host(2), &etcd, 30);
    let (e1, e2) = overlay::endpoint_on_each_host(&a1, &a2, POOL);
    let (n1, n2) = (a1.wait_network("ov"), a2.wait_network("ov"));
    let leases_before: Vec<HostLease> = a1.netctl_json(&["host", "ls"]);

    let stream = start_stream(&e1.netns, &e2.netns, sock(e2.ip(), 7100));
    stream.wait_progress("before etcd stops", 1 << 20);
    etcd.stop();
    // A host that starts while etcd is down waits for it.
    let a3 = etcd_agent(topo.host(3), &etcd, 30);
    stream.wait_progress("while etcd is down", 8 << 20);
    assert!(
        a1.routes().iter().any(|r| r.subnet == n2.subnet),
        "h1 lost its route to h2 while etcd was down"
    );
    // Local changes still work without the cluster store.
    let e1b = a1.endpoint_create("e1b", "ov", &[]);

    etcd.restart();
    let n3 = a3.wait_network("ov");
    for (agent, subnet) in [
        (&a1, &n3.subnet),
        (&a2, &n3.subnet),
        (&a3, &n1.subnet),
        (&a3, &n2.subnet),
    ] {
        agent.wait_route(subnet, true);
    }
    let e3 = a3.endpoint_create("e3", "ov", &[]);
    exchange(&e1b, &e3);
    exchange(&e2, &e3);
    stream.wait_progress("after etcd is back", 1 << 20);
    stream.finish();
    // The leases held before the outage are still the hosts' own.
    let after: Vec<HostLease> = a1.netctl_json(&["host", "ls"]);
    for before in &leases_before {
        assert!(
            after
                .iter()
                .any(|l| l.host == before.host && l.subnet == before.subnet),
            "{} lost its lease {} across the etcd restart: {after:?}",
            before.host,
            before.subnet
        );
    }
    assert_eq!(n1.subnet, a1.wait_network("ov").subnet);
}
