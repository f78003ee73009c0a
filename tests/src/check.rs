//! Whole-state checks: what the agent lists must be exactly what the kernel has.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use net_agent::datapath::PinLayout;
use net_ebpf_common::program_names;

use crate::{
    agent::Agent,
    api::{BpfPublishedEntry, Endpoint, Network, PublishedPort},
    names::ETC_NETNS,
    netns::{NETNS_DIR, exec_in, links, list_netns, routes},
};

/// Where every endpoint namespace's embedded resolver listens.
pub const RESOLVER: &str = "127.0.0.11:53";

/// Checks that the agent's networks and endpoints and the kernel agree, in both directions:
///
/// - every listed endpoint is well formed for its mode (`host`: no namespace and no interface;
///   `container:X`: X's namespace, no interface of its own; `bridge`/`none`: its namespace,
///   made by the agent as `/run/netns/<prefix>-<name>` with a resolv.conf pointing at the
///   embedded resolver, or adopted);
/// - every interface of every endpoint (not only eth0) is in the namespace with its MAC, MTU
///   and address, the first listed interface (eth0 whenever there is one) on a network that is
///   not internal, else the first, carries the only default route, and on the host side there
///   are its veth (with the listed ifindex and MAC), its /32 route, its pinned program links
///   and an entry in the pinned endpoint map pointing at that veth with the network's id;
/// - every namespace of an endpoint has the embedded resolver listening on 127.0.0.11:53, UDP
///   and TCP; a namespace the agent made has no interface besides `lo` and the listed ones;
/// - every network lists exactly the endpoints that have an interface on it;
/// - every namespace, resolver directory, host veth, link pin and map entry carrying this
///   agent's names belongs to a listed endpoint (nothing leaked by an interrupted change).
///
/// Panics describing every mismatch found.
pub fn assert_consistent(agent: &Agent<'_>) {
    let host = agent.host().netns();
    let prefix = agent.prefix();
    let networks: BTreeMap<String, Network> = agent
        .networks()
        .into_iter()
        .map(|n| (n.name.clone(), n))
        .collect();
    let endpoints = agent.endpoints();
    let map = agent.bpf_endpoints();
    let host_links = links(host);
    let host_routes = routes(host);
    let pins = PinLayout::new(agent.bpffs_dir());
    let mut problems = Vec::new();

    for e in &endpoints {
        check_endpoint(agent, e, &endpoints, &networks, &mut problems);
        let name = &e.name;
        for i in &e.interfaces {
            let what = format!("{name} ({} on {})", i.ifname, i.network);
            match host_links.iter().find(|l| l.name == i.host_ifname) {
                None => problems.push(format!("{what}: host veth {} is missing", i.host_ifname)),
                Some(l) => {
                    if l.index != i.host_ifindex {
                        problems.push(format!(
                            "{what}: host veth {} has ifindex {}, listed {}",
                            i.host_ifname, l.index, i.host_ifindex
                        ));
                    }
                    if l.mac != i.host_mac {
                        problems.push(format!(
                            "{what}: host veth {} has MAC {}, listed {}",
                            i.host_ifname, l.mac, i.host_mac
                        ));
                    }
                }
            }
            let route = format!("{} dev {}", i.ip, i.host_ifname);
            if !host_routes.iter().any(|r| r.starts_with(&route)) {
                problems.push(format!("{what}: host route `{route}` is missing"));
            }
            for program in program_names::ENDPOINT {
                let pin = pins.link(&i.host_ifname, program);
                if !pin.exists() {
                    problems.push(format!("{what}: link pin {} is missing", pin.display()));
                }
            }
            let network_id = networks.get(&i.network).map(|n| n.id);
            match map.iter().find(|m| m.ip == i.ip) {
                None => problems.push(format!("{what}: no map entry for {}", i.ip)),
                Some(m)
                    if m.ifindex != i.host_ifindex
                        || m.mac != i.mac
                        || m.host_mac != i.host_mac
                        || m.gateway != i.gateway
                        || Some(m.network_id) != network_id =>
                {
                    problems.push(format!(
                        "{what}: map entry {m:?} does not match {i:?} (network id {network_id:?})"
                    ))
                }
                Some(_) => {}
            }
        }
    }

    for n in networks.values() {
        let mut on: Vec<&str> = endpoints
            .iter()
            .filter(|e| e.interfaces.iter().any(|i| i.network == n.name))
            .map(|e| e.name.as_str())
            .collect();
        on.sort();
        if n.endpoints != on {
            problems.push(format!(
                "network {} lists endpoints {:?}, but these have an interface on it: {on:?}",
                n.name, n.endpoints
            ));
        }
    }

    let listed_ips: BTreeSet<_> = endpoints
        .iter()
        .flat_map(|e| e.interfaces.iter().map(|i| i.ip))
        .collect();
    for m in &map {
        if !listed_ips.contains(&m.ip) {
            problems.push(format!("map entry for unlisted address: {m:?}"));
        }
    }
    check_published(agent, &endpoints, &mut problems);
    let owned_netns: BTreeSet<String> = endpoints
        .iter()
        .filter(|e| e.netns_owned)
        .map(|e| e.netns.clone())
        .collect();
    for ns in list_netns(&format!("{prefix}-")) {
        let path = format!("{NETNS_DIR}/{ns}");
        if !owned_netns.contains(&path) {
            problems.push(format!("namespace {path} belongs to no endpoint"));
        }
    }
    for dir in agent.resolver_dirs() {
        if !owned_netns.contains(&format!("{NETNS_DIR}/{dir}")) {
            problems.push(format!("{ETC_NETNS}/{dir} belongs to no endpoint"));
        }
    }
    let host_ifnames: BTreeSet<&str> = endpoints
        .iter()
        .flat_map(|e| e.interfaces.iter().map(|i| i.host_ifname.as_str()))
        .collect();
    // The VXLAN device is the agent's own (one for every overlay network), made when the first
    // overlay network came and kept.
    let vxlan = format!("{prefix}-vxlan");
    let has_vxlan = host_links.iter().any(|l| l.name == vxlan);
    for l in &host_links {
        if l.name == vxlan {
            continue;
        }
        if l.name.starts_with(&prefix) && !host_ifnames.contains(l.name.as_str()) {
            problems.push(format!("host interface {} belongs to no endpoint", l.name));
        }
    }
    // Exactly the internal networks have the rule that leaves them no route beyond the host
    // (the agent's, with protocol 110; one outlives its network if its removal was cut short).
    let internal_subnets: BTreeSet<String> = networks
        .values()
        .filter(|n| n.internal)
        .map(|n| n.subnet.clone())
        .collect();
    let unroutable: BTreeSet<String> = exec_in(host, &["ip", "-4", "rule", "show"])
        .stdout
        .lines()
        .filter(|rule| rule.contains("unreachable") && rule.contains("proto 110"))
        .filter_map(|rule| {
            let mut words = rule.split_whitespace();
            words.find(|w| *w == "from")?;
            words.next().map(str::to_owned)
        })
        .collect();
    if unroutable != internal_subnets {
        problems.push(format!(
            "unreachable rules for {unroutable:?}, internal networks {internal_subnets:?}"
        ));
    }
    let mut expected_pins: BTreeSet<PathBuf> = host_ifnames
        .iter()
        .flat_map(|ifname| program_names::ENDPOINT.iter().map(|p| pins.link(ifname, p)))
        .collect();
    if has_vxlan {
        expected_pins.extend(program_names::OVERLAY.iter().map(|p| pins.link(&vxlan, p)));
    }
    if let Ok(entries) = std::fs::read_dir(pins.links_dir()) {
        for entry in entries.filter_map(|e| e.ok()) {
            let file = entry.file_name().to_string_lossy().into_owned();
            if file.starts_with(&prefix) && !expected_pins.contains(&entry.path()) {
                problems.push(format!("link pin {file} belongs to no endpoint"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "the agent's listing and the kernel disagree:\n  {}\nendpoints: {endpoints:#?}\nmap: {map:#?}",
        problems.join("\n  ")
    );
}

/// The published ports three ways must agree: `port ls`, each endpoint's own list, and the
/// data plane's `PUBLISHED` map; and every port goes to an address of its endpoint.
fn check_published(agent: &Agent<'_>, endpoints: &[Endpoint], problems: &mut Vec<String>) {
    let listed: Vec<PublishedPort> = agent.netctl_json(&["port", "ls"]);
    let in_map: Vec<BpfPublishedEntry> = agent.netctl_json(&["bpf", "nat", "list"]);
    let side = |host_ip: Option<std::net::Ipv4Addr>, port: u16, proto: &str| {
        (host_ip, port, proto.to_owned())
    };
    let listed_sides: BTreeSet<_> = listed
        .iter()
        .map(|p| side(p.host_ip, p.host_port, p.proto.name()))
        .collect();
    let map_sides: BTreeSet<_> = in_map
        .iter()
        .map(|m| side(m.host_ip, m.host_port, &m.proto))
        .collect();
    if listed_sides != map_sides {
        problems.push(format!(
            "published ports listed {listed_sides:?}, but the map holds {map_sides:?}"
        ));
    }
    for e in endpoints {
        let own: Vec<&PublishedPort> = listed.iter().filter(|p| p.endpoint == e.name).collect();
        if e.published.iter().collect::<Vec<_>>() != own {
            problems.push(format!(
                "endpoint {} shows ports {:?}, `port ls` lists {own:?}",
                e.name, e.published
            ));
        }
        for p in &own {
            if !e.interfaces.iter().any(|i| i.ip == p.ip) {
                problems.push(format!(
                    "port {}/{} of {} goes to {}, none of its addresses",
                    p.host_port,
                    p.proto.name(),
                    e.name,
                    p.ip
                ));
            }
        }
    }
    for p in &listed {
        if !endpoints.iter().any(|e| e.name == p.endpoint) {
            problems.push(format!("port {p:?} belongs to no endpoint"));
        }
    }
}

/// The checks of one endpoint that look inside its namespace.
fn check_endpoint(
    agent: &Agent<'_>,
    e: &Endpoint,
    endpoints: &[Endpoint],
    networks: &BTreeMap<String, Network>,
    problems: &mut Vec<String>,
) {
    let name = &e.name;
    let mut ifnames = BTreeSet::new();
    for i in &e.interfaces {
        if !ifnames.insert(i.ifname.as_str()) {
            problems.push(format!("{name}: interface {} listed twice", i.ifname));
        }
        match networks.get(&i.network) {
            None => problems.push(format!("{name}: on unknown network {}", i.network)),
            Some(n) => {
                let prefix_len = n.subnet.rsplit('/').next().and_then(|p| p.parse().ok());
                if i.gateway != n.gateway || Some(i.prefix_len) != prefix_len {
                    problems.push(format!(
                        "{name}: {} lists gateway {} /{}, network {} has {} {}",
                        i.ifname, i.gateway, i.prefix_len, n.name, n.gateway, n.subnet
                    ));
                }
            }
        }
    }
    match e.mode.as_str() {
        "host" => {
            if !e.netns.is_empty() || e.netns_owned || !e.interfaces.is_empty() {
                problems.push(format!(
                    "{name}: a host-mode endpoint has no namespace and no interfaces: {e:?}"
                ));
            }
            return;
        }
        mode if mode.starts_with("container:") => {
            let owner_name = &mode["container:".len()..];
            match endpoints.iter().find(|o| o.name == owner_name) {
                None => problems.push(format!(
                    "{name}: shares the namespace of unlisted {owner_name}"
                )),
                Some(owner) if owner.mode != "bridge" && owner.mode != "none" => {
                    problems.push(format!(
                        "{name}: joins {owner_name}, which is in mode {}",
                        owner.mode
                    ))
                }
                Some(owner) if owner.netns != e.netns => problems.push(format!(
                    "{name}: listed namespace {}, its owner {owner_name} has {}",
                    e.netns, owner.netns
                )),
                Some(_) => {}
            }
            if e.netns_owned || !e.interfaces.is_empty() {
                problems.push(format!(
                    "{name}: a container-mode endpoint owns neither namespace nor interfaces: {e:?}"
                ));
            }
            return;
        }
        "bridge" | "none" => {}
        other => {
            problems.push(format!("{name}: unknown mode {other:?}"));
            return;
        }
    }

    if e.netns_owned {
        let netns_name = agent.endpoint_netns(name);
        let expected = format!("{NETNS_DIR}/{netns_name}");
        if e.netns != expected {
            problems.push(format!(
                "{name}: the agent made namespace {}, expected {expected}",
                e.netns
            ));
        }
        let resolv_conf = Path::new(ETC_NETNS).join(&netns_name).join("resolv.conf");
        match std::fs::read_to_string(&resolv_conf) {
            Ok(text) if text.lines().any(|l| l.trim() == "nameserver 127.0.0.11") => {}
            Ok(text) => problems.push(format!(
                "{name}: {} does not point at 127.0.0.11:\n{text}",
                resolv_conf.display()
            )),
            Err(err) => problems.push(format!("{name}: {}: {err}", resolv_conf.display())),
        }
    }
    if !Path::new(&e.netns).exists() {
        problems.push(format!("{name}: namespace {} is missing", e.netns));
        return;
    }

    let inner = links(&e.netns);
    if e.netns_owned {
        let mut expected: BTreeSet<&str> = ifnames.clone();
        expected.insert("lo");
        let found: BTreeSet<&str> = inner.iter().map(|l| l.name.as_str()).collect();
        if found != expected {
            problems.push(format!(
                "{name}: interfaces in {}: {found:?}, expected {expected:?}",
                e.netns
            ));
        }
    }
    match inner.iter().find(|l| l.name == "lo") {
        Some(lo) if lo.up => {}
        _ => problems.push(format!("{name}: lo is not up in {}", e.netns)),
    }
    for i in &e.interfaces {
        match inner.iter().find(|l| l.name == i.ifname) {
            None => problems.push(format!("{name}: no {} in {}", i.ifname, e.netns)),
            Some(l) => {
                if l.mac != i.mac {
                    problems.push(format!(
                        "{name}: {} has MAC {}, listed {}",
                        i.ifname, l.mac, i.mac
                    ));
                }
                if !l.up {
                    problems.push(format!("{name}: {} is down", i.ifname));
                }
                if let Some(n) = networks.get(&i.network)
                    && l.mtu != n.mtu
                {
                    problems.push(format!(
                        "{name}: {} has MTU {}, network {} has {}",
                        i.ifname, l.mtu, n.name, n.mtu
                    ));
                }
            }
        }
        let addrs = exec_in(
            &e.netns,
            &["ip", "-4", "-o", "addr", "show", "dev", &i.ifname],
        )
        .stdout;
        if !addrs.contains(&format!("inet {}/{}", i.ip, i.prefix_len)) {
            problems.push(format!(
                "{name}: {}/{} not configured on {}: {addrs}",
                i.ip, i.prefix_len, i.ifname
            ));
        }
    }
    // The first listed interface (eth0 whenever there is one) on a network that is not
    // internal, else the first, carries the only default route; further networks are reached
    // over their own subnet routes.
    let defaults: Vec<String> = routes(&e.netns)
        .into_iter()
        .filter(|r| r.starts_with("default"))
        .collect();
    if let Some(first) = e.interfaces.first() {
        if e.interfaces.iter().any(|i| i.ifname == "eth0") && first.ifname != "eth0" {
            problems.push(format!(
                "{name}: eth0 is not the first interface listed: {:?}",
                e.interfaces.iter().map(|i| &i.ifname).collect::<Vec<_>>()
            ));
        }
        let via = e
            .interfaces
            .iter()
            .find(|i| networks.get(&i.network).is_some_and(|n| !n.internal))
            .unwrap_or(first);
        let expected = format!("default via {} dev {}", via.gateway, via.ifname);
        if defaults.len() != 1 || !defaults[0].starts_with(&expected) {
            problems.push(format!(
                "{name}: default routes {defaults:?}, expected exactly `{expected}`"
            ));
        }
    } else if e.netns_owned && !defaults.is_empty() {
        problems.push(format!(
            "{name}: default routes {defaults:?} without an interface"
        ));
    }
    let listening = exec_in(&e.netns, &["ss", "-H", "-l", "-n", "-u", "-t"]).stdout;
    for proto in ["udp", "tcp"] {
        let found = listening.lines().any(|l| {
            let mut cols = l.split_whitespace();
            cols.next() == Some(proto) && cols.any(|c| c == RESOLVER)
        });
        if !found {
            problems.push(format!(
                "{name}: no embedded resolver on {RESOLVER}/{proto} in {}; listening:\n{listening}",
                e.netns
            ));
        }
    }
}
