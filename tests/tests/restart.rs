//! Agent restarts: the data plane is pinned, so established flows keep going while the agent is
//! down (SIGKILL or SIGTERM), and the restarted agent knows every network and endpoint as before
//! and can add new ones that reach the old.

use std::{thread, time::Duration};

use net_tests::{
    Agent, EndpointExt, Topology,
    api::{Endpoint, Network},
    assert_consistent, exec_in_ok,
    netns::{add_netns, in_netns, netns_path},
    run_ok,
    traffic::{
        TcpStreamFlow, UdpEchoServer, sock, start_stream, tcp_echo_server, tcp_send_verify,
        udp_echo_server, udp_roundtrip,
    },
};

const STREAM_PORT: u16 = 7100;
const TCP_PORT: u16 = 7000;
const UDP_PORT: u16 = 7001;
const KIB: u64 = 1024;

/// Endpoints `a` and `b` on blue with a stream from `a` to `b` that is already flowing, `x` on
/// blue in a namespace the test made (adopted), and `c` on red.
fn setup(topo: &Topology, agent: &Agent<'_>) -> (Endpoint, Endpoint, TcpStreamFlow) {
    agent.network_create("blue", "10.10.0.0/24", &[]);
    agent.network_create("red", "10.20.0.0/24", &[]);
    let a = agent.endpoint_create("a", "blue", &[]);
    let b = agent.endpoint_create("b", "blue", &[]);
    let adopted = topo.netns_name("adopt");
    add_netns(&adopted);
    let path = netns_path(&adopted).display().to_string();
    agent.endpoint_create("x", "blue", &["--netns", &path]);
    agent.endpoint_create("c", "red", &[]);
    let flow = start_stream(&a.netns, &b.netns, sock(b.ip(), STREAM_PORT));
    flow.wait_progress("before the restart", 256 * KIB);
    (a, b, flow)
}

/// What netctl shows, sorted, for comparisons across restarts.
fn state(agent: &Agent<'_>) -> (Vec<Network>, Vec<Endpoint>) {
    let mut networks = agent.networks();
    networks.sort_by(|x, y| x.name.cmp(&y.name));
    let mut endpoints = agent.endpoints();
    endpoints.sort_by(|x, y| x.name.cmp(&y.name));
    (networks, endpoints)
}

/// After a restart: same state, the stream still flows, a new endpoint gets the next address and
/// reaches the old ones both ways, then the stream is stopped and its bytes verified.
fn check_after_restart(
    agent: &Agent<'_>,
    before: &(Vec<Network>, Vec<Endpoint>),
    a: &Endpoint,
    b: &Endpoint,
    flow: TcpStreamFlow,
) {
    flow.wait_progress("after the agent restarted", 512 * KIB);
    assert_eq!(
        &state(agent),
        before,
        "networks and endpoints after the restart"
    );
    let status = agent.status();
    // blue, red and the agent's own `default`.
    assert_eq!((status.networks, status.endpoints), (3, 4));

    let d = agent.endpoint_create("d", "blue", &[]);
    assert_eq!(
        d.ip().to_string(),
        "10.10.0.5",
        "next free address after a restart"
    );
    let x = agent.endpoint_inspect("x");
    for old in [a, b, &x] {
        let server = tcp_echo_server(&old.netns, sock(old.ip(), TCP_PORT));
        tcp_send_verify(&d.netns, &server, 256 * 1024);
    }
    let udp_d = udp_echo_server(&d.netns, sock(d.ip(), UDP_PORT));
    assert!(
        udp_roundtrip(&a.netns, None, udp_d.addr(), 5, Duration::from_secs(1)),
        "UDP from the old endpoint a to the new endpoint d"
    );
    flow.wait_progress("after adding an endpoint", 256 * KIB);
    let digest = flow.finish();
    assert!(
        digest.bytes >= 1024 * KIB,
        "the stream carried {} bytes",
        digest.bytes
    );
}

#[test]
fn flows_survive_kill_9_and_the_restarted_agent_knows_everything() {
    let topo = Topology::new(1);
    let mut agent = topo.host(1).start_agent();
    let (a, b, flow) = setup(&topo, &agent);
    let before = state(&agent);
    let map_before = agent.bpf_endpoints();
    let sent_before = agent.endpoint_stats("a").from_endpoint;

    agent.kill9();
    flow.wait_progress("while the agent is dead (SIGKILL)", 512 * KIB);
    agent.netctl_err(&["status"]);
    assert_eq!(
        agent.bpf_endpoints(),
        map_before,
        "the pinned endpoint map while the agent is dead"
    );

    agent.restart();
    // The counters are pinned too: they kept counting while the agent was dead.
    let sent_after = agent.endpoint_stats("a").from_endpoint;
    assert!(
        sent_after.bytes >= sent_before.bytes + 512 * KIB,
        "a's from_endpoint counter went from {sent_before:?} to {sent_after:?} across the restart"
    );
    assert_consistent(&agent);
    check_after_restart(&agent, &before, &a, &b, flow);
}

#[test]
fn flows_survive_a_graceful_restart() {
    let topo = Topology::new(1);
    let mut agent = topo.host(1).start_agent();
    let (a, b, flow) = setup(&topo, &agent);
    let before = state(&agent);

    agent.stop();
    flow.wait_progress("while the agent is stopped (SIGTERM)", 512 * KIB);
    agent.restart();
    flow.wait_progress("after the first restart", 256 * KIB);
    // Once more, without waiting in between: a restart right after a restart.
    agent.restart();
    assert_consistent(&agent);
    check_after_restart(&agent, &before, &a, &b, flow);
}

#[test]
fn removals_while_up_stay_removed_after_a_restart() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    let mut agent = host.start_agent();
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let a = agent.endpoint_create("a", "blue", &[]);
    let b = agent.endpoint_create("b", "blue", &[]);
    agent.endpoint_rm("a");
    agent.network_create("gone", "10.30.0.0/24", &[]);
    agent.netctl_ok(&["network", "rm", "gone"]);
    let before = state(&agent);
    let snapshot = agent.snapshot();

    agent.kill9();
    agent.restart();
    assert_eq!(state(&agent), before);
    assert_eq!(agent.snapshot(), snapshot, "kernel state after the restart");
    assert!(!std::path::Path::new(&a.netns).exists());
    // The freed address goes to the next endpoint, which works.
    let c = agent.endpoint_create("c", "blue", &[]);
    assert_eq!(c.ip(), a.ip());
    let server = tcp_echo_server(&b.netns, sock(b.ip(), TCP_PORT));
    tcp_send_verify(&c.netns, &server, 64 * 1024);
}

/// Whether `from` gets a UDP reply from `server`.
fn reaches(from: &Endpoint, server: &UdpEchoServer) -> bool {
    udp_roundtrip(&from.netns, None, server.addr(), 5, Duration::from_secs(1))
}

#[test]
fn plumbing_removed_or_left_down_while_the_agent_was_down_is_rebuilt() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    let mut agent = host.start_agent();
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let a = agent.endpoint_create("a", "blue", &[]);
    let b = agent.endpoint_create("b", "blue", &[]);
    let c = agent.endpoint_create("c", "blue", &[]);
    let d = agent.endpoint_create("d", "blue", &[]);
    agent.stop();

    // d lost its default route, as when a crash cut a connect or disconnect short after the
    // route had moved to an interface since torn down.
    run_ok(
        "ip",
        &["-n", &agent.endpoint_netns("d"), "route", "del", "default"],
    );
    // b's namespace and c's host veth disappear (an operator's mistake, a crash of something),
    // and a's veth is as an agent killed while making it leaves it: the host side down (a veth
    // comes up only once complete) and the endpoint's side without its address yet.
    run_ok("ip", &["netns", "del", &agent.endpoint_netns("b")]);
    exec_in_ok(host.netns(), &["ip", "link", "del", &c.eth0().host_ifname]);
    exec_in_ok(
        host.netns(),
        &["ip", "link", "set", &a.eth0().host_ifname, "down"],
    );
    let a_netns = agent.endpoint_netns("a");
    run_ok("ip", &["-n", &a_netns, "addr", "flush", "dev", "eth0"]);

    agent.restart();
    let listed: Vec<String> = agent.endpoints().into_iter().map(|e| e.name).collect();
    assert_eq!(listed.len(), 4, "endpoints after the rebuild: {listed:?}");
    // The default routes too (d's is back).
    assert_consistent(&agent);
    let b_now = agent.endpoint_inspect("b");
    let c_now = agent.endpoint_inspect("c");
    assert_eq!((b_now.ip(), c_now.ip()), (b.ip(), c.ip()), "addresses kept");
    let udp_a = udp_echo_server(&a.netns, sock(a.ip(), UDP_PORT));
    for e in [&b_now, &c_now] {
        assert!(reaches(e, &udp_a), "{} (rebuilt) reaches a", e.name);
    }
    assert!(reaches(&d, &udp_a), "d reaches a");
    let udp_b = udp_echo_server(&b_now.netns, sock(b_now.ip(), UDP_PORT));
    assert!(reaches(&c_now, &udp_b), "c reaches b, both rebuilt");
}

/// The change a kill -9 interrupts, and what the listing shows once it was made.
enum Change<'a> {
    Create(&'a str),
    Remove(&'a str),
    Connect(&'a str, &'a str),
    Disconnect(&'a str, &'a str),
}

impl Change<'_> {
    fn args(&self) -> Vec<&str> {
        match *self {
            Change::Create(name) => vec!["endpoint", "create", name, "--network", "blue"],
            Change::Remove(name) => vec!["endpoint", "rm", name],
            Change::Connect(network, name) => vec!["network", "connect", network, name],
            Change::Disconnect(network, name) => vec!["network", "disconnect", network, name],
        }
    }

    /// Whether `endpoints` show the change made.
    fn made(&self, endpoints: &[Endpoint]) -> bool {
        let find = |name: &str| endpoints.iter().find(|e| e.name == name);
        match *self {
            Change::Create(name) => find(name).is_some(),
            Change::Remove(name) => find(name).is_none(),
            Change::Connect(network, name) => {
                find(name).is_some_and(|e| e.find_on(network).is_some())
            }
            Change::Disconnect(network, name) => {
                find(name).is_some_and(|e| e.find_on(network).is_none())
            }
        }
    }
}

/// Starts `change` with netctl on another thread, kills the agent `after` that, restarts it,
/// and checks that an acknowledged change was kept, that the listing and the kernel agree and
/// that every endpoint still reaches the probe endpoint of each network it is on (`probes`:
/// network name, probe endpoint name, its UDP echo server).
fn interrupt(
    agent: &mut Agent<'_>,
    change: Change<'_>,
    after: Duration,
    probes: &[(&str, &str, &UdpEchoServer)],
) {
    let netctl = agent.netctl_handle();
    let args: Vec<String> = change.args().iter().map(|a| a.to_string()).collect();
    let running = thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        netctl.run(&args)
    });
    // The delay only chooses which step of the change the kill interrupts (callers vary it);
    // the checks below must hold whatever the step was.
    thread::sleep(after);
    agent.kill9();
    let out = running.join().expect("netctl thread");
    agent.restart();

    let endpoints = agent.endpoints();
    if out.success() {
        assert!(
            change.made(&endpoints),
            "`{}` was acknowledged, then the agent was killed: the change was not kept: {endpoints:#?}",
            out.cmdline
        );
    }
    assert_consistent(agent);
    for e in &endpoints {
        for (network, probe_name, probe) in probes {
            let Some(iface) = e.find_on(network) else {
                continue;
            };
            if e.name == *probe_name {
                continue;
            }
            assert!(
                udp_roundtrip(
                    &e.netns,
                    Some(iface.ip),
                    probe.addr(),
                    5,
                    Duration::from_secs(1)
                ),
                "{} cannot reach {probe_name} on {network} after `{}` was interrupted by kill -9",
                e.name,
                out.cmdline
            );
        }
    }
}

#[test]
fn kill_9_in_the_middle_of_changes_leaves_a_consistent_state() {
    let topo = Topology::new(1);
    let mut agent = topo.host(1).start_agent();
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let probe = agent.endpoint_create("probe", "blue", &[]);
    let udp_probe = udp_echo_server(&probe.netns, sock(probe.ip(), UDP_PORT));
    let probes = [("blue", "probe", &udp_probe)];

    // A creation takes some tens of milliseconds including netctl's start: kills from 0 to
    // 77 ms land before, during and after it.
    for round in 0..12u64 {
        let after = Duration::from_millis(round * 7);
        interrupt(
            &mut agent,
            Change::Create(&format!("c{round}")),
            after,
            &probes,
        );
    }
    for i in 0..8 {
        agent.endpoint_create(&format!("r{i}"), "blue", &[]);
    }
    for round in 0..8u64 {
        let after = Duration::from_millis(round * 6);
        interrupt(
            &mut agent,
            Change::Remove(&format!("r{round}")),
            after,
            &probes,
        );
    }
}

#[test]
fn kill_9_in_the_middle_of_connects_and_disconnects_leaves_a_consistent_state() {
    let topo = Topology::new(1);
    let mut agent = topo.host(1).start_agent();
    agent.network_create("blue", "10.10.0.0/24", &[]);
    agent.network_create("red", "10.20.0.0/24", &[]);
    let probe = agent.endpoint_create("probe", "blue", &[]);
    let red_probe = agent.endpoint_create("rprobe", "red", &[]);
    let udp_probe = udp_echo_server(&probe.netns, sock(probe.ip(), UDP_PORT));
    let udp_red = udp_echo_server(&red_probe.netns, sock(red_probe.ip(), UDP_PORT));
    let probes = [("blue", "probe", &udp_probe), ("red", "rprobe", &udp_red)];
    let names: Vec<String> = (0..8).map(|i| format!("m{i}")).collect();
    for name in &names {
        agent.endpoint_create(name, "blue", &[]);
    }

    // A connect makes a veth, addresses and programs like a creation does; kills from 0 to
    // 63 ms land before, during and after it.
    for (round, name) in names.iter().enumerate() {
        let after = Duration::from_millis(round as u64 * 9);
        interrupt(&mut agent, Change::Connect("red", name), after, &probes);
    }
    // Every endpoint on red again, whatever the kills left, then disconnects interrupted.
    for name in &names {
        if agent.endpoint_inspect(name).find_on("red").is_none() {
            agent.network_connect("red", name, &[]);
        }
    }
    for (round, name) in names.iter().enumerate() {
        let after = Duration::from_millis(round as u64 * 8);
        interrupt(&mut agent, Change::Disconnect("red", name), after, &probes);
    }
    // Whatever the kills left, each endpoint can be connected and disconnected once more.
    for name in &names {
        if agent.endpoint_inspect(name).find_on("red").is_some() {
            agent.network_disconnect("red", name);
        }
        agent.network_connect("red", name, &[]);
    }
    assert_consistent(&agent);
}

#[test]
fn kill_9_in_the_middle_of_connects_to_endpoints_of_an_internal_network_leaves_a_consistent_state()
{
    // A connect to a network that is not internal moves the default route of an endpoint on an
    // internal network; a kill in the middle must leave it where the interfaces say, and the
    // internal veths' unreachable rules exactly as many as they are.
    let topo = Topology::new(1);
    let mut agent = topo.host(1).start_agent();
    agent.network_create("inner", "10.40.0.0/24", &["--internal"]);
    agent.network_create("red", "10.20.0.0/24", &[]);
    let probe = agent.endpoint_create("iprobe", "inner", &[]);
    let red_probe = agent.endpoint_create("rprobe", "red", &[]);
    let udp_probe = udp_echo_server(&probe.netns, sock(probe.ip(), UDP_PORT));
    let udp_red = udp_echo_server(&red_probe.netns, sock(red_probe.ip(), UDP_PORT));
    let probes = [("inner", "iprobe", &udp_probe), ("red", "rprobe", &udp_red)];
    let names: Vec<String> = (0..6).map(|i| format!("n{i}")).collect();
    for name in &names {
        agent.endpoint_create(name, "inner", &[]);
    }
    for (round, name) in names.iter().enumerate() {
        let after = Duration::from_millis(round as u64 * 11);
        interrupt(&mut agent, Change::Connect("red", name), after, &probes);
    }
    for name in &names {
        if agent.endpoint_inspect(name).find_on("red").is_none() {
            agent.network_connect("red", name, &[]);
        }
    }
    for (round, name) in names.iter().enumerate() {
        let after = Duration::from_millis(round as u64 * 10);
        interrupt(&mut agent, Change::Disconnect("red", name), after, &probes);
    }
    for (round, name) in names.iter().enumerate() {
        let after = Duration::from_millis(round as u64 * 12);
        interrupt(&mut agent, Change::Remove(name), after, &probes);
    }
}

/// How many programs run at the tcx `hook` of `ifname` in `netns`.
fn tcx_programs(netns: &str, ifname: &str, hook: aya::programs::TcAttachType) -> usize {
    in_netns(netns, || {
        aya::programs::SchedClassifier::query_tcx(ifname, hook)
            .unwrap_or_else(|e| panic!("querying the tcx {hook:?} programs of {ifname}: {e}"))
            .1
            .len()
    })
}

#[test]
fn pins_of_another_map_layout_are_removed_and_everything_is_rebuilt_in_this_one() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    let mut agent = host.start_agent();
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let a = agent.endpoint_create("a", "blue", &[]);
    let b = agent.endpoint_create("b", "blue", &[]);
    agent.stop();

    // An agent of another version left its pins: this build's, moved to a layout directory
    // of another number. Its links still hold its programs on a's and b's veths.
    let ours = agent
        .bpffs_dir()
        .join(format!("v{}", net_ebpf_common::PIN_LAYOUT_VERSION));
    let other = agent.bpffs_dir().join("v1");
    std::fs::rename(&ours, &other).expect("moving the pins to another layout's directory");

    agent.restart();
    assert!(!other.exists(), "{} is still there", other.display());
    // The old links went with the directory: one program a hook, this agent's.
    for e in [&a, &b] {
        for hook in [
            aya::programs::TcAttachType::Ingress,
            aya::programs::TcAttachType::Egress,
        ] {
            assert_eq!(
                tcx_programs(host.netns(), &e.eth0().host_ifname, hook),
                1,
                "programs at {hook:?} of {}'s veth",
                e.name
            );
        }
    }
    assert_consistent(&agent);
    let server = tcp_echo_server(&b.netns, sock(b.ip(), TCP_PORT));
    tcp_send_verify(&a.netns, &server, 64 * 1024);
    // Counted by this agent's programs, in its own maps.
    assert!(agent.endpoint_stats("a").from_endpoint.bytes >= 64 * KIB);
}

#[test]
fn a_counter_slot_no_endpoint_names_is_freed_at_start_and_the_others_kept() {
    let topo = Topology::new(1);
    let mut agent = topo.host(1).start_agent();
    agent.network_create("blue", "10.10.0.0/24", &[]);
    agent.endpoint_create("a", "blue", &[]);
    agent.endpoint_create("b", "blue", &[]);
    let listed = agent.bpf_endpoints();
    agent.stop();

    // What an agent that died between writing a veth's slot and its endpoint entry leaves.
    const NO_VETH: u32 = 999_999;
    let bpffs_dir = agent.bpffs_dir().to_owned();
    let open = || net_agent::datapath::Maps::open_pinned(&bpffs_dir).expect("opening the pins");
    open()
        .slots
        .insert(NO_VETH, 7, 0)
        .expect("a stray ENDPOINT_SLOTS entry");

    agent.restart();
    assert!(
        matches!(
            open().slots.get(&NO_VETH, 0),
            Err(aya::maps::MapError::KeyNotFound)
        ),
        "the stray slot is still held"
    );
    assert_eq!(
        agent.bpf_endpoints(),
        listed,
        "a's and b's entries, slots included"
    );
}
