//! The cluster store on a real etcd: etcd runs in a namespace of its own on the simulated
//! underlay (see `net_tests::etcd`), and each simulated host opens its store from inside its own
//! namespace, as its agent would. The same contract the embedded store's unit tests check:
//! networks defined once with unique VNIs, never one subnet for two hosts, expiry, a restarting
//! agent getting its subnet back, watches, hosts' published names going with their lease and
//! their network; and what only a server brings: leases surviving an etcd restart, and calls
//! failing cleanly while etcd is down.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    sync::{Arc, Barrier},
    thread,
    time::{Duration, Instant},
};

use net_agent::cluster::{
    Changes, ClusterError, ClusterStore, EndpointName, HostNames, Ipv4Network, Lease,
    OverlayNetwork,
};
use net_tests::{
    Topology,
    etcd::{Etcd, block_on, open_store},
    wait::TIMEOUT,
    wait_for, wait_until,
};

/// A TTL that does not run out during a test.
const LONG: Duration = Duration::from_secs(600);
/// etcd's shortest lease with its default timings (it grants its minimum when asked for less).
const SHORT: Duration = Duration::from_secs(2);
/// How soon every agent must learn of a peer's change.
const PROPAGATION: Duration = Duration::from_secs(1);

fn net(s: &str) -> Ipv4Network {
    s.parse().unwrap()
}

fn vtep(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, n)
}

fn define(store: &dyn ClusterStore, name: &str, pool: &str, subnet_len: u8) -> OverlayNetwork {
    block_on(store.define_network(name, net(pool), subnet_len, None))
        .unwrap_or_else(|e| panic!("defining {name} ({pool} /{subnet_len}): {e}"))
}

fn acquire(
    store: &dyn ClusterStore,
    network: &OverlayNetwork,
    host: &str,
    ip: Ipv4Addr,
    prefer: Option<Ipv4Network>,
    ttl: Duration,
) -> Lease {
    block_on(store.acquire_lease(network, host, ip, prefer, ttl))
        .unwrap_or_else(|e| panic!("leasing a subnet of {} for {host}: {e}", network.name))
}

fn leases(store: &dyn ClusterStore, network: &str) -> Vec<Lease> {
    block_on(store.leases(network)).unwrap_or_else(|e| panic!("reading leases of {network}: {e}"))
}

/// What `host` publishes on `network`: one endpoint `name` at the `nth` address of `subnet`.
fn host_names(network: &str, host: &str, name: &str, subnet: Ipv4Network, nth: u32) -> HostNames {
    let ip = subnet
        .nth(nth)
        .unwrap_or_else(|| panic!("{subnet} has no address {nth}"));
    HostNames {
        network: network.to_owned(),
        host: host.to_owned(),
        names: vec![EndpointName {
            name: name.to_owned(),
            aliases: vec![format!("{name}-alias")],
            ip,
        }],
    }
}

fn put_names(store: &dyn ClusterStore, names: &HostNames) {
    block_on(store.put_names(names)).unwrap_or_else(|e| {
        panic!(
            "publishing the names of {} on {}: {e}",
            names.host, names.network
        )
    });
}

fn all_names(store: &dyn ClusterStore) -> Vec<HostNames> {
    block_on(store.all_names()).unwrap_or_else(|e| panic!("reading names: {e}"))
}

/// Waits until `changes` moves (at most `timeout`), then marks it seen.
fn notified(changes: &mut Changes, timeout: Duration, what: &str) {
    wait_until(timeout, format!("the watch to fire for {what}"), || {
        changes.has_changed().expect("the store's watch is alive")
    });
    changes.borrow_and_update();
}

#[test]
fn networks_are_defined_once_with_unique_vnis() {
    let topo = Topology::new(2);
    let etcd = Etcd::start(&topo);
    let (s1, s2) = (
        open_store(topo.host(1), &etcd.spec()),
        open_store(topo.host(2), &etcd.spec()),
    );
    // Two hosts define six networks at once, and both define "shared" the same way.
    let start = Barrier::new(2);
    let defined: Vec<OverlayNetwork> = thread::scope(|s| {
        let workers: Vec<_> = [(&s1, 1u8), (&s2, 4u8)]
            .into_iter()
            .map(|(store, first)| {
                let start = &start;
                s.spawn(move || {
                    start.wait();
                    let mut out: Vec<OverlayNetwork> = (first..first + 3)
                        .map(|n| {
                            define(
                                store.as_ref(),
                                &format!("n{n}"),
                                &format!("10.{n}.0.0/16"),
                                24,
                            )
                        })
                        .collect();
                    out.push(define(store.as_ref(), "shared", "10.100.0.0/16", 24));
                    out
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let shared: Vec<&OverlayNetwork> = defined.iter().filter(|n| n.name == "shared").collect();
    assert_eq!(
        shared[0], shared[1],
        "both hosts must get the one stored definition"
    );
    let stored = block_on(s1.networks()).expect("listing networks");
    assert_eq!(stored.len(), 7, "{stored:?}");
    let vnis: BTreeSet<u32> = stored.iter().map(|n| n.vni).collect();
    assert_eq!(
        vnis,
        (1..=7).collect(),
        "VNIs must be 1-7, each once: {stored:?}"
    );

    let err = block_on(s2.define_network("n1", net("10.200.0.0/16"), 24, None)).unwrap_err();
    assert!(
        matches!(err, ClusterError::NetworkConflict { .. })
            && err.to_string().contains("10.1.0.0/16")
            && err.to_string().contains("10.200.0.0/16"),
        "{err}"
    );
    let err = block_on(s2.define_network("big", net("10.0.0.0/8"), 24, None)).unwrap_err();
    assert!(matches!(err, ClusterError::PoolOverlap { .. }), "{err}");

    // Refused while a host holds a lease; its VNI is reused once it is gone.
    let n1 = stored.iter().find(|n| n.name == "n1").unwrap().clone();
    let lease = acquire(s1.as_ref(), &n1, "node1", vtep(1), None, LONG);
    let err = block_on(s2.remove_network("n1")).unwrap_err();
    assert!(
        matches!(err, ClusterError::NetworkInUse { .. }) && err.to_string().contains("node1"),
        "{err}"
    );
    block_on(s1.release_lease(&lease)).expect("releasing node1's lease");
    block_on(s2.remove_network("n1")).expect("removing n1");
    let again = define(s2.as_ref(), "n9", "10.9.0.0/16", 24);
    assert_eq!(again.vni, n1.vni);
}

#[test]
fn concurrent_acquirers_never_share_a_subnet() {
    let topo = Topology::new(2);
    let etcd = Etcd::start(&topo);
    let stores = [
        open_store(topo.host(1), &etcd.spec()),
        open_store(topo.host(2), &etcd.spec()),
    ];
    // 16 subnets for 2 x 10 hosts: 16 get one, 4 find the pool exhausted.
    let network = define(stores[0].as_ref(), "ov", "10.244.0.0/20", 24);
    let start = Arc::new(Barrier::new(2));
    let results: Vec<(String, Result<Lease, ClusterError>)> = thread::scope(|s| {
        let workers: Vec<_> = stores
            .iter()
            .enumerate()
            .map(|(side, store)| {
                let (network, start) = (&network, Arc::clone(&start));
                s.spawn(move || {
                    start.wait();
                    (0..10u8)
                        .map(|n| {
                            let host = format!("h{}-node{n}", side + 1);
                            let result =
                                block_on(store.acquire_lease(network, &host, vtep(n), None, LONG));
                            (host, result)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let granted: Vec<&Lease> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .collect();
    let subnets: BTreeSet<Ipv4Network> = granted.iter().map(|l| l.subnet).collect();
    assert_eq!(granted.len(), 16, "{results:#?}");
    assert_eq!(subnets.len(), 16, "a subnet was given twice: {granted:#?}");
    for (host, result) in &results {
        if let Err(e) = result {
            assert!(
                matches!(e, ClusterError::PoolExhausted { .. }),
                "{host}: {e}"
            );
        }
    }
    let stored = leases(stores[1].as_ref(), "ov");
    let stored_pairs: BTreeSet<(Ipv4Network, String)> =
        stored.iter().map(|l| (l.subnet, l.host.clone())).collect();
    let granted_pairs: BTreeSet<(Ipv4Network, String)> =
        granted.iter().map(|l| (l.subnet, l.host.clone())).collect();
    assert_eq!(
        stored_pairs, granted_pairs,
        "the store must hold exactly what was granted"
    );
}

#[test]
fn expiry_frees_a_subnet_and_a_restarting_agent_gets_its_own_back() {
    let topo = Topology::new(2);
    let etcd = Etcd::start(&topo);
    let s1 = open_store(topo.host(1), &etcd.spec());
    let mut s2 = open_store(topo.host(2), &etcd.spec());

    // A pool of one subnet: node2 gets it only once node1's lease ran out.
    let single = define(s1.as_ref(), "single", "10.250.0.0/24", 24);
    let first = acquire(s1.as_ref(), &single, "node1", vtep(1), None, SHORT);
    let err = block_on(s2.acquire_lease(&single, "node2", vtep(2), None, LONG)).unwrap_err();
    assert!(
        matches!(err, ClusterError::PoolExhausted { .. })
            && err.to_string().contains("pool exhausted"),
        "{err}"
    );
    let second = wait_for(
        TIMEOUT,
        "node1's lease to expire and free the subnet",
        || block_on(s2.acquire_lease(&single, "node2", vtep(2), None, LONG)).ok(),
    );
    assert_eq!(second.subnet, first.subnet);
    let err = block_on(s1.renew_lease(&first, LONG)).unwrap_err();
    assert!(
        matches!(&err, ClusterError::LeaseLost { held_by: Some(h), .. } if h == "node2"),
        "{err}"
    );
    // node1 releasing what it lost must not free node2's lease.
    block_on(s1.release_lease(&first)).expect("releasing a lost lease");
    assert_eq!(leases(s1.as_ref(), "single"), vec![second.clone()]);

    // A restarted agent (a new store) gets the lease it still holds, with its new VTEP.
    drop(s2);
    s2 = open_store(topo.host(2), &etcd.spec());
    let back = acquire(s2.as_ref(), &single, "node2", vtep(22), None, LONG);
    assert_eq!((back.subnet, back.vtep), (second.subnet, vtep(22)));

    // One whose lease expired while it was down gets its remembered subnet back if it is free,
    // though a lower one is free too.
    let pool = define(s1.as_ref(), "pool", "10.251.0.0/22", 24);
    let other = acquire(s1.as_ref(), &pool, "node1", vtep(1), None, LONG);
    assert_eq!(other.subnet, net("10.251.0.0/24"));
    let mine = acquire(
        s2.as_ref(),
        &pool,
        "node2",
        vtep(2),
        Some(net("10.251.2.0/24")),
        SHORT,
    );
    assert_eq!(mine.subnet, net("10.251.2.0/24"));
    drop(s2);
    wait_until(TIMEOUT, "node2's lease on pool to expire", || {
        leases(s1.as_ref(), "pool").len() == 1
    });
    let s2 = open_store(topo.host(2), &etcd.spec());
    let again = acquire(
        s2.as_ref(),
        &pool,
        "node2",
        vtep(2),
        Some(mine.subnet),
        LONG,
    );
    assert_eq!(again.subnet, mine.subnet);
    // And an expired lease nobody took is renewed in place.
    let short = block_on(s2.renew_lease(&again, SHORT)).expect("renewing");
    wait_until(TIMEOUT, "node2's renewed lease to expire", || {
        leases(s1.as_ref(), "pool").len() == 1
    });
    let renewed = block_on(s2.renew_lease(&short, LONG)).expect("renewing an expired lease");
    assert_eq!(renewed.subnet, mine.subnet);
    assert!(renewed.expires_unix_ms > short.expires_unix_ms);
}

#[test]
fn leases_survive_an_etcd_restart() {
    let topo = Topology::new(2);
    let mut etcd = Etcd::start(&topo);
    let s1 = open_store(topo.host(1), &etcd.spec());
    let s2 = open_store(topo.host(2), &etcd.spec());
    let network = define(s1.as_ref(), "ov", "10.244.0.0/16", 24);
    let lease = acquire(
        s1.as_ref(),
        &network,
        "node1",
        vtep(1),
        None,
        Duration::from_secs(60),
    );

    etcd.stop();
    etcd.restart();

    // The same stores, connected before the restart, carry on.
    let after = wait_for(TIMEOUT, "the store to answer after etcd restarted", || {
        block_on(s2.leases("ov")).ok()
    });
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(
        (&after[0].host, after[0].subnet, after[0].vtep),
        (&lease.host, lease.subnet, lease.vtep)
    );
    assert_eq!(
        block_on(s2.networks()).expect("listing networks"),
        vec![network.clone()]
    );
    let renewed = wait_for(TIMEOUT, "renewing node1's lease after the restart", || {
        block_on(s1.renew_lease(&lease, LONG)).ok()
    });
    assert_eq!(renewed.subnet, lease.subnet);
    let other = acquire(s2.as_ref(), &network, "node2", vtep(2), None, LONG);
    assert_ne!(other.subnet, lease.subnet);
}

#[test]
fn watch_fires_on_a_peers_change_within_a_second() {
    let topo = Topology::new(2);
    let etcd = Etcd::start(&topo);
    let s1 = open_store(topo.host(1), &etcd.spec());
    let s2 = open_store(topo.host(2), &etcd.spec());
    let mut changes = s1.watch();
    notified(&mut changes, TIMEOUT, "the watch starting");

    let network = define(s2.as_ref(), "ov", "10.244.0.0/16", 24);
    notified(&mut changes, PROPAGATION, "a network a peer defined");
    let joined = acquire(s2.as_ref(), &network, "node2", vtep(2), None, LONG);
    notified(&mut changes, PROPAGATION, "a peer joining");
    assert_eq!(leases(s1.as_ref(), "ov"), vec![joined.clone()]);
    let moved = acquire(s2.as_ref(), &network, "node2", vtep(12), None, LONG);
    notified(&mut changes, PROPAGATION, "a peer changing its VTEP");
    assert_eq!(leases(s1.as_ref(), "ov")[0].vtep, vtep(12));
    block_on(s2.release_lease(&moved)).expect("releasing node2's lease");
    notified(&mut changes, PROPAGATION, "a peer leaving");
    assert!(leases(s1.as_ref(), "ov").is_empty());

    // A peer that dies without leaving: etcd deletes its key when its lease runs out.
    acquire(s2.as_ref(), &network, "node3", vtep(3), None, SHORT);
    notified(
        &mut changes,
        PROPAGATION,
        "a peer joining for a short while",
    );
    let started = Instant::now();
    notified(&mut changes, TIMEOUT, "a peer's lease expiring");
    assert!(
        leases(s1.as_ref(), "ov").is_empty(),
        "expired after {:?}",
        started.elapsed()
    );
}

#[test]
fn calls_fail_cleanly_while_etcd_is_down_and_work_after() {
    let topo = Topology::new(2);
    let mut etcd = Etcd::start(&topo);
    let s1 = open_store(topo.host(1), &etcd.spec());
    let s2 = open_store(topo.host(2), &etcd.spec());
    let network = define(s1.as_ref(), "ov", "10.244.0.0/16", 24);
    let mut changes = s1.watch();
    notified(&mut changes, TIMEOUT, "the watch starting");

    etcd.stop();
    let started = Instant::now();
    let err = block_on(s2.acquire_lease(&network, "node2", vtep(2), None, LONG)).unwrap_err();
    assert!(
        matches!(err, ClusterError::Etcd { .. }) && err.to_string().contains("198.18.0.250:2379"),
        "{err}"
    );
    let err = block_on(s1.networks()).unwrap_err();
    assert!(matches!(err, ClusterError::Etcd { .. }), "{err}");
    assert!(
        started.elapsed() < 2 * net_agent::cluster::etcd::OPERATION_TIMEOUT,
        "failing took {:?}",
        started.elapsed()
    );

    etcd.restart();
    let lease = wait_for(TIMEOUT, "leasing a subnet once etcd is back", || {
        block_on(s2.acquire_lease(&network, "node2", vtep(2), None, LONG)).ok()
    });
    // The watcher catches up: after a notification, a re-read shows what happened meanwhile.
    wait_until(
        TIMEOUT,
        "host 1 to learn of node2's lease after etcd came back",
        || {
            // Host 1's own connection may still be coming back: a failed read is "not yet",
            // and the change stays unseen until a read succeeds.
            changes.has_changed().expect("the store's watch is alive")
                && block_on(s1.leases("ov")).is_ok_and(|l| l == vec![lease.clone()])
                && {
                    changes.borrow_and_update();
                    true
                }
        },
    );
    // And it keeps watching.
    block_on(s2.release_lease(&lease)).expect("releasing node2's lease");
    notified(
        &mut changes,
        PROPAGATION,
        "a peer leaving after the reconnection",
    );
}

#[test]
fn calls_time_out_while_etcd_is_unreachable_and_work_after() {
    let topo = Topology::new(2);
    let etcd = Etcd::start(&topo);
    let s1 = open_store(topo.host(1), &etcd.spec());
    let s2 = open_store(topo.host(2), &etcd.spec());
    let network = define(s1.as_ref(), "ov", "10.244.0.0/16", 24);
    let mut changes = s1.watch();
    notified(&mut changes, TIMEOUT, "the watch starting");

    // Nothing answers and nothing refuses: only the client's timeouts end the calls.
    etcd.set_reachable(false);
    let started = Instant::now();
    let err = block_on(s2.acquire_lease(&network, "node2", vtep(2), None, LONG)).unwrap_err();
    assert!(
        matches!(err, ClusterError::Etcd { .. }) && err.to_string().contains("198.18.0.250:2379"),
        "{err}"
    );
    // Host 1's connection was established before: its request times out on it.
    let err = block_on(s1.networks()).unwrap_err();
    assert!(matches!(err, ClusterError::Etcd { .. }), "{err}");
    assert!(
        started.elapsed() <= 2 * net_agent::cluster::etcd::OPERATION_TIMEOUT,
        "failing took {:?}",
        started.elapsed()
    );

    etcd.set_reachable(true);
    let lease = wait_for(TIMEOUT, "leasing a subnet once etcd is reachable", || {
        block_on(s2.acquire_lease(&network, "node2", vtep(2), None, LONG)).ok()
    });
    wait_until(
        TIMEOUT,
        "host 1 to learn of node2's lease once etcd was reachable",
        || {
            // Host 1's own connection may still be coming back: a failed read is "not yet",
            // and the change stays unseen until a read succeeds.
            changes.has_changed().expect("the store's watch is alive")
                && block_on(s1.leases("ov")).is_ok_and(|l| l == vec![lease.clone()])
                && {
                    changes.borrow_and_update();
                    true
                }
        },
    );
}

#[test]
fn names_go_with_their_hosts_lease_and_their_network() {
    let topo = Topology::new(2);
    let etcd = Etcd::start(&topo);
    let s1 = open_store(topo.host(1), &etcd.spec());
    let s2 = open_store(topo.host(2), &etcd.spec());
    // "ov2" shares a prefix with "ov": removing one must not touch the other's names.
    let ov = define(s1.as_ref(), "ov", "10.244.0.0/16", 24);
    let ov2 = define(s1.as_ref(), "ov2", "10.245.0.0/16", 24);
    let node1 = acquire(s1.as_ref(), &ov, "node1", vtep(1), None, LONG);
    let node2 = acquire(s2.as_ref(), &ov, "node2", vtep(2), None, LONG);
    let node2_ov2 = acquire(s2.as_ref(), &ov2, "node2", vtep(2), None, LONG);
    // Started after the setup: the watch begins at the revision the setup ended with, so every
    // change it reports from here on is one this test makes.
    let mut changes = s1.watch();
    notified(&mut changes, TIMEOUT, "the watch starting");

    // A peer publishes; the other host sees it.
    let web = host_names("ov", "node2", "web", node2.subnet, 2);
    put_names(s2.as_ref(), &web);
    notified(&mut changes, PROPAGATION, "a peer publishing names");
    assert_eq!(all_names(s1.as_ref()), vec![web.clone()]);
    let replaced = host_names("ov", "node2", "db", node2.subnet, 3);
    put_names(s2.as_ref(), &replaced);
    notified(&mut changes, PROPAGATION, "a peer replacing its names");
    assert_eq!(all_names(s1.as_ref()), vec![replaced]);

    // An empty list removes the record.
    let none = HostNames {
        names: Vec::new(),
        ..web.clone()
    };
    put_names(s2.as_ref(), &none);
    notified(&mut changes, PROPAGATION, "a peer withdrawing its names");
    assert_eq!(all_names(s1.as_ref()), Vec::new());

    // A network the store does not define: refused, nothing written.
    let stray = host_names("nope", "node2", "web", node2.subnet, 2);
    let err = block_on(s2.put_names(&stray)).unwrap_err();
    assert!(
        matches!(&err, ClusterError::NetworkNotFound { name } if name == "nope"),
        "{err}"
    );
    assert_eq!(all_names(s1.as_ref()), Vec::new());
    assert_eq!(
        block_on(s1.networks()).expect("listing networks"),
        vec![ov.clone(), ov2.clone()]
    );

    // Releasing node2's lease on ov removes its names there, and nobody else's: not node1's on
    // ov, not its own on ov2. node3 publishes without a lease, as a host whose lease expired
    // while it was down would have left its record.
    let records = [
        host_names("ov", "node1", "api", node1.subnet, 2),
        host_names("ov", "node2", "web", node2.subnet, 2),
        host_names("ov", "node3", "old", net("10.244.99.0/24"), 2),
        host_names("ov2", "node2", "web", node2_ov2.subnet, 2),
    ];
    for names in &records {
        put_names(s2.as_ref(), names);
    }
    assert_eq!(
        all_names(s1.as_ref()),
        records.to_vec(),
        "by network then host"
    );
    block_on(s2.release_lease(&node2)).expect("releasing node2's lease on ov");
    let [node1_ov, _, node3_ov, node2_ov2_names] = records;
    assert_eq!(
        all_names(s1.as_ref()),
        vec![node1_ov, node3_ov.clone(), node2_ov2_names.clone()]
    );
    block_on(s1.release_lease(&node1)).expect("releasing node1's lease on ov");
    assert_eq!(
        all_names(s1.as_ref()),
        vec![node3_ov, node2_ov2_names.clone()]
    );

    // Removing the network removes what is left of its names, and only its own.
    block_on(s1.remove_network("ov")).expect("removing ov");
    assert_eq!(all_names(s1.as_ref()), vec![node2_ov2_names]);
}
