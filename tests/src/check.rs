//! Whole-state checks: what the agent lists must be exactly what the kernel has.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use net_agent::datapath::PinLayout;
use net_ebpf_common::program_names;

use crate::{
    agent::Agent,
    netns::{NETNS_DIR, links, list_netns, routes},
};

/// Checks that the agent's endpoints and the kernel agree, in both directions:
///
/// - every listed endpoint has its namespace, `eth0` with its MAC and address, its host veth
///   (with the listed ifindex and MAC), its host route, its pinned program links, and an entry in
///   the pinned endpoint map pointing at that veth;
/// - every namespace, host veth, link pin and map entry carrying this agent's names belongs to a
///   listed endpoint (nothing leaked by an interrupted change).
///
/// Panics describing every mismatch found.
pub fn assert_consistent(agent: &Agent<'_>) {
    let host = agent.host().netns();
    let prefix = agent.prefix();
    let endpoints = agent.endpoints();
    let map = agent.bpf_endpoints();
    let host_links = links(host);
    let host_routes = routes(host);
    let pins = PinLayout::new(agent.bpffs_dir());
    let mut problems = Vec::new();

    for e in &endpoints {
        let name = &e.name;
        if !Path::new(&e.netns).exists() {
            problems.push(format!("{name}: namespace {} is missing", e.netns));
        } else {
            let inner = links(&e.netns);
            match inner.iter().find(|l| l.name == e.ifname) {
                None => problems.push(format!("{name}: no {} in {}", e.ifname, e.netns)),
                Some(l) if l.mac != e.mac => problems.push(format!(
                    "{name}: {} has MAC {}, listed {}",
                    e.ifname, l.mac, e.mac
                )),
                Some(_) => {}
            }
            let addrs = crate::netns::exec_in(&e.netns, &["ip", "-4", "-o", "addr", "show"]).stdout;
            if !addrs.contains(&format!("inet {}/{}", e.ip, e.prefix_len)) {
                problems.push(format!(
                    "{name}: {}/{} not configured: {addrs}",
                    e.ip, e.prefix_len
                ));
            }
        }
        match host_links.iter().find(|l| l.name == e.host_ifname) {
            None => problems.push(format!("{name}: host veth {} is missing", e.host_ifname)),
            Some(l) => {
                if l.index != e.host_ifindex {
                    problems.push(format!(
                        "{name}: host veth {} has ifindex {}, listed {}",
                        e.host_ifname, l.index, e.host_ifindex
                    ));
                }
                if l.mac != e.host_mac {
                    problems.push(format!(
                        "{name}: host veth {} has MAC {}, listed {}",
                        e.host_ifname, l.mac, e.host_mac
                    ));
                }
            }
        }
        let route = format!("{} dev {}", e.ip, e.host_ifname);
        if !host_routes.iter().any(|r| r.starts_with(&route)) {
            problems.push(format!("{name}: host route `{route}` is missing"));
        }
        for program in program_names::ALL {
            let pin = pins.link(&e.host_ifname, program);
            if !pin.exists() {
                problems.push(format!("{name}: link pin {} is missing", pin.display()));
            }
        }
        match map.iter().find(|m| m.ip == e.ip) {
            None => problems.push(format!("{name}: no map entry for {}", e.ip)),
            Some(m)
                if m.ifindex != e.host_ifindex || m.mac != e.mac || m.host_mac != e.host_mac =>
            {
                problems.push(format!("{name}: map entry {m:?} does not match {e:?}"))
            }
            Some(_) => {}
        }
    }

    let listed_ips: BTreeSet<_> = endpoints.iter().map(|e| e.ip).collect();
    for m in &map {
        if !listed_ips.contains(&m.ip) {
            problems.push(format!("map entry for unlisted address: {m:?}"));
        }
    }
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
    let host_ifnames: BTreeSet<&str> = endpoints.iter().map(|e| e.host_ifname.as_str()).collect();
    for l in &host_links {
        if l.name.starts_with(&prefix) && !host_ifnames.contains(l.name.as_str()) {
            problems.push(format!("host interface {} belongs to no endpoint", l.name));
        }
    }
    let expected_pins: BTreeSet<PathBuf> = endpoints
        .iter()
        .flat_map(|e| {
            program_names::ALL
                .iter()
                .map(|p| pins.link(&e.host_ifname, p))
        })
        .collect();
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
