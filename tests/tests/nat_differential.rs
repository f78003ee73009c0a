//! Differential test of published ports and masquerade: the same probes, with real packets,
//! against (A) a host running our agent and (B) a host where the kernel's own NAT is set up as
//! Docker sets it (`net_tests::kernel_nat`: a Linux bridge, iptables DNAT and MASQUERADE, as
//! `dockerd --userland-proxy=false` writes them), on identical topologies: the same host
//! address (198.18.0.1), network (10.30.0.0/24, gateway .1), endpoints (`web` .2 with 8080/tcp
//! and 5353/udp published to its ports 80 and 53, `client` .3) and outside namespace
//! (198.18.0.254).
//!
//! Each setup yields [`Observations`]: for each probe, whether data went through and came back
//! unchanged and which peer address the server saw. Docker's two modes disagree on some peers
//! (see [`ModeDependent`]); those are checked against each setup's own expectation, everything
//! else must be equal. `kernel_reference_behaves_as_docker_without_its_proxy` pins the
//! reference itself, so that a broken reference cannot make the comparison pass.
//!
//! Hosts in the topology have no default route, so the agent is told its uplink
//! (`--uplink uplink0`), as in `masquerade.rs`.

use std::{
    collections::BTreeSet,
    io::{self, ErrorKind},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use net_tests::{
    Agent, Host, Topology,
    api::{Endpoint, Proto},
    kernel_nat::KernelNatHost,
    nat::{PeerEchoServer, close_echo, echo_exchange, peer_echo_server},
    topology::{OUTSIDE_IP, UPLINK},
    traffic::{
        CONNECT_TIMEOUT, Digest, IO_TIMEOUT, Pattern, UdpEchoServer, sock, tcp_connect,
        udp_echo_server, udp_roundtrip,
    },
};

const NETWORK: &str = "n";
const SUBNET: &str = "10.30.0.0/24";
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 30, 0, 1);
const WEB_IP: Ipv4Addr = Ipv4Addr::new(10, 30, 0, 2);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 30, 0, 3);
/// `--publish 8080:80`.
const HOST_TCP: u16 = 8080;
const WEB_TCP: u16 = 80;
/// `--publish 5353:53/udp`.
const HOST_UDP: u16 = 5353;
const WEB_UDP: u16 = 53;
/// Published by nobody, listened on by nobody on the host.
const UNPUBLISHED: u16 = 8081;
/// The outside's echo server, for masquerade.
const OUTSIDE_TCP: u16 = 7000;
/// Bytes echoed per TCP probe: several segments each way, quick on a loaded machine.
const ECHO_BYTES: usize = 64 * 1024;
/// UDP tries and the wait for each reply.
const UDP_TRIES: u32 = 5;
const UDP_WAIT: Duration = Duration::from_secs(1);

/// What one probe did.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Data went through and came back unchanged (TCP: checked at the server too); the server
    /// saw the connection or the datagrams come from `peer`.
    Echoed { peer: Ipv4Addr },
    /// The connection was refused: a TCP RST came back.
    Refused,
    /// Nothing came back in time.
    NoAnswer,
    /// A connection was made where none was expected.
    Connected,
    /// Anything else, with what went wrong.
    Failed(String),
}

/// What every Docker-compatible setup must do the same way, whatever its mode.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shared {
    /// TCP from the outside to HOSTIP:8080: DNAT only, the server sees the outside's address.
    outside_tcp: Outcome,
    /// UDP from the outside to HOSTIP:5353, the same way.
    outside_udp: Outcome,
    /// `web` to its own published port (HOSTIP:8080). Docker, with or without its proxy, shows
    /// the gateway: the connection has to come from an address other than `web`'s own, which
    /// `web` would drop as a martian source (see `net_tests::kernel_nat`).
    self_hairpin: Outcome,
    /// `client` to a TCP server in the outside namespace: masqueraded to the host's address.
    masquerade: Outcome,
    /// The outside to HOSTIP:8081, which nothing publishes or listens on: refused by the host.
    unpublished: Outcome,
}

/// Peers that Docker itself shows differently with and without its userland proxy, so a
/// setup is checked against its own expectation (`NatSetup::expected_mode_dependent`) rather
/// than against the other setup.
///
/// - Without the proxy (the kernel reference): `client` -> HOSTIP:8080 is only DNATed, and the
///   bridged reply is translated back by br_netfilter, so `web` sees `client`'s own address; the
///   host's own connection to HOSTIP:8080 is DNATed in OUTPUT and then masqueraded by
///   `-o <bridge> -m addrtype --src-type LOCAL -j MASQUERADE`, so `web` sees the gateway.
/// - With the proxy (Docker's default): `client`'s connection is not DNATed (`-i <bridge> -j
///   RETURN`) but accepted by `docker-proxy` on the host, which connects to `web` from the
///   gateway; the host's own connection is DNATed in OUTPUT and nothing masquerades it, so
///   `web` sees the host's uplink address.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ModeDependent {
    /// A TCP connection from the host's namespace to its own uplink address, HOSTIP:8080.
    host_local: Outcome,
    /// A TCP connection from `client` (same host, same network) to HOSTIP:8080.
    client_hairpin: Outcome,
}

/// Everything the probe list saw on one setup.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Observations {
    shared: Shared,
    mode_dependent: ModeDependent,
}

impl Observations {
    /// What Docker without its userland proxy does on a host whose uplink address is
    /// `host_ip` (the module's addresses otherwise).
    fn docker_without_proxy(host_ip: Ipv4Addr) -> Observations {
        Observations {
            shared: Shared {
                outside_tcp: Outcome::Echoed { peer: OUTSIDE_IP },
                outside_udp: Outcome::Echoed { peer: OUTSIDE_IP },
                self_hairpin: Outcome::Echoed { peer: GATEWAY },
                masquerade: Outcome::Echoed { peer: host_ip },
                unpublished: Outcome::Refused,
            },
            mode_dependent: ModeDependent {
                host_local: Outcome::Echoed { peer: GATEWAY },
                client_hairpin: Outcome::Echoed { peer: CLIENT_IP },
            },
        }
    }
}

/// What differs between the setups; the probes (and the addresses) are the same for all.
trait NatSetup {
    /// For messages.
    fn label(&self) -> &'static str;
    /// The simulated host's namespace (its own connections start there).
    fn host_netns(&self) -> &str;
    /// The host's uplink address: published ports are reached on it.
    fn host_ip(&self) -> Ipv4Addr;
    /// The namespace standing for the rest of the network.
    fn outside_netns(&self) -> &str;
    /// The namespace of endpoint `web` or `client` (servers and clients run inside it).
    fn endpoint_netns(&self, endpoint: &str) -> &str;
    /// The peers this setup is meant to show where Docker's modes differ.
    fn expected_mode_dependent(&self) -> ModeDependent;
    /// What to print when the setup did not behave as expected.
    fn diagnostics(&self) -> String;
}

/// (B) The kernel's NAT as Docker sets it up, on host 1 of `topo`.
struct KernelSetup<'t> {
    topo: &'t Topology,
    kernel: KernelNatHost<'t>,
}

impl<'t> KernelSetup<'t> {
    fn build(topo: &'t Topology) -> KernelSetup<'t> {
        let mut kernel = KernelNatHost::new(topo.host(1), SUBNET, GATEWAY);
        kernel.add_endpoint("web", WEB_IP);
        kernel.add_endpoint("client", CLIENT_IP);
        kernel.publish(HOST_TCP, WEB_IP, WEB_TCP, Proto::Tcp);
        kernel.publish(HOST_UDP, WEB_IP, WEB_UDP, Proto::Udp);
        KernelSetup { topo, kernel }
    }
}

impl NatSetup for KernelSetup<'_> {
    fn label(&self) -> &'static str {
        "kernel NAT (Docker, --userland-proxy=false)"
    }

    fn host_netns(&self) -> &str {
        self.kernel.host().netns()
    }

    fn host_ip(&self) -> Ipv4Addr {
        self.kernel.host().underlay_ip()
    }

    fn outside_netns(&self) -> &str {
        self.topo.outside()
    }

    fn endpoint_netns(&self, endpoint: &str) -> &str {
        &self.kernel.endpoint(endpoint).netns
    }

    fn expected_mode_dependent(&self) -> ModeDependent {
        Observations::docker_without_proxy(self.host_ip()).mode_dependent
    }

    fn diagnostics(&self) -> String {
        self.kernel.diagnostics()
    }
}

/// (A) Our agent on host 1 of `topo`, with the same network, endpoints and published ports.
struct AgentSetup<'t> {
    topo: &'t Topology,
    host: &'t Host,
    agent: Agent<'t>,
    web: Endpoint,
    client: Endpoint,
}

impl<'t> AgentSetup<'t> {
    /// Starts the agent from the calling thread (it dies with the thread that started it).
    fn build(topo: &'t Topology) -> AgentSetup<'t> {
        let host = topo.host(1);
        let agent = host.start_agent_with(&["--uplink", UPLINK]);
        agent.network_create(NETWORK, SUBNET, &[]);
        let tcp = format!("{HOST_TCP}:{WEB_TCP}");
        let udp = format!("{HOST_UDP}:{WEB_UDP}/udp");
        let web = agent.endpoint_create(
            "web",
            NETWORK,
            &[
                "--ip",
                &WEB_IP.to_string(),
                "--publish",
                &tcp,
                "--publish",
                &udp,
            ],
        );
        let client = agent.endpoint_create("client", NETWORK, &["--ip", &CLIENT_IP.to_string()]);
        AgentSetup {
            topo,
            host,
            agent,
            web,
            client,
        }
    }
}

impl NatSetup for AgentSetup<'_> {
    fn label(&self) -> &'static str {
        "net-agent (eBPF)"
    }

    fn host_netns(&self) -> &str {
        self.host.netns()
    }

    fn host_ip(&self) -> Ipv4Addr {
        self.host.underlay_ip()
    }

    fn outside_netns(&self) -> &str {
        self.topo.outside()
    }

    fn endpoint_netns(&self, endpoint: &str) -> &str {
        match endpoint {
            "web" => &self.web.netns,
            "client" => &self.client.netns,
            other => panic!("the agent setup has no endpoint {other}"),
        }
    }

    /// Docker's default, proxy mode, by design: a hairpin connection is translated to come from
    /// the endpoint's gateway (so the reply comes back through the host, where it is translated
    /// back, whatever the two endpoints' networks), and the host's own connection keeps the
    /// host's address (it needs no source translation: the reply is handed back to the host's
    /// loopback). Both are what users of Docker's default see.
    fn expected_mode_dependent(&self) -> ModeDependent {
        ModeDependent {
            host_local: Outcome::Echoed {
                peer: self.host_ip(),
            },
            client_hairpin: Outcome::Echoed { peer: GATEWAY },
        }
    }

    fn diagnostics(&self) -> String {
        let mut text = String::new();
        for args in [&["status"][..], &["bpf", "ct", "list"]] {
            let out = self.agent.netctl(args);
            text.push_str(&format!(
                "$ netctl {}\n{}{}\n",
                args.join(" "),
                out.stdout,
                out.stderr
            ));
        }
        text
    }
}

/// Runs the probe list against `setup`, one probe at a time (each with its own server, so a
/// probe that fails cannot leave a connection behind for the next to report).
fn observe(setup: &impl NatSetup) -> Observations {
    let host_ip = setup.host_ip();
    let published_tcp = SocketAddrV4::new(host_ip, HOST_TCP);
    let web = setup.endpoint_netns("web");
    let client = setup.endpoint_netns("client");
    let outside = setup.outside_netns();
    // Printed as it goes: with --nocapture, a run shows each setup's answers side by side.
    let probe = |what: &str, outcome: Outcome| {
        eprintln!("{}: {what}: {outcome:?}", setup.label());
        outcome
    };

    let outside_tcp = probe(
        "TCP from the outside to the published port",
        tcp_to_web(setup, outside, published_tcp),
    );
    let outside_udp = probe("UDP from the outside to the published port", {
        let server = udp_echo_server(web, sock(WEB_IP, WEB_UDP));
        udp_probe(outside, SocketAddrV4::new(host_ip, HOST_UDP), &server)
    });
    let host_local = probe(
        "TCP from the host to its own address",
        tcp_to_web(setup, setup.host_netns(), published_tcp),
    );
    let client_hairpin = probe(
        "TCP from client to the published port (hairpin)",
        tcp_to_web(setup, client, published_tcp),
    );
    let self_hairpin = probe(
        "TCP from web to its own published port (hairpin)",
        tcp_to_web(setup, web, published_tcp),
    );
    let masquerade = probe("TCP from client to the outside (masquerade)", {
        let server = peer_echo_server(outside, SocketAddrV4::new(OUTSIDE_IP, OUTSIDE_TCP));
        tcp_probe(client, SocketAddrV4::new(OUTSIDE_IP, OUTSIDE_TCP), &server)
    });
    let unpublished = probe(
        "TCP from the outside to a port nobody published",
        tcp_refusal_probe(outside, SocketAddrV4::new(host_ip, UNPUBLISHED)),
    );
    Observations {
        shared: Shared {
            outside_tcp,
            outside_udp,
            self_hairpin,
            masquerade,
            unpublished,
        },
        mode_dependent: ModeDependent {
            host_local,
            client_hairpin,
        },
    }
}

fn ipv4(addr: SocketAddr) -> Ipv4Addr {
    match addr.ip() {
        IpAddr::V4(ip) => ip,
        IpAddr::V6(ip) => panic!("expected an IPv4 peer, got {ip}"),
    }
}

/// [`tcp_probe`] from `from` to `to` with a fresh echo server on `web`'s port 80.
fn tcp_to_web(setup: &impl NatSetup, from: &str, to: SocketAddrV4) -> Outcome {
    let server = peer_echo_server(
        setup.endpoint_netns("web"),
        SocketAddrV4::new(WEB_IP, WEB_TCP),
    );
    tcp_probe(from, to, &server)
}

/// What a failed connect means.
fn connect_failure(e: &io::Error) -> Outcome {
    match e.kind() {
        ErrorKind::ConnectionRefused => Outcome::Refused,
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Outcome::NoAnswer,
        _ => Outcome::Failed(format!("connect: {e}")),
    }
}

/// Connects from `from` to `to`, echoes [`ECHO_BYTES`] through `server` (which `to` must lead
/// to) and closes; checks both what came back and what the server received, and returns the
/// peer the server saw.
fn tcp_probe(from: &str, to: SocketAddrV4, server: &PeerEchoServer) -> Outcome {
    let conn = match tcp_connect(from, SocketAddr::V4(to), CONNECT_TIMEOUT) {
        Ok(conn) => conn,
        Err(e) => return connect_failure(&e),
    };
    let data = Pattern::bytes(u64::from(to.port()), ECHO_BYTES);
    let sent = Digest::of(&data);
    match echo_exchange(&conn, &data) {
        Ok(echoed) if echoed == sent => {}
        Ok(echoed) => return Outcome::Failed(format!("echo {echoed:?}, sent {sent:?}")),
        Err(e) => return Outcome::Failed(format!("echo: {e}")),
    }
    if let Err(e) = close_echo(&conn) {
        return Outcome::Failed(format!("close: {e}"));
    }
    let (peer, received) = server.next_report(IO_TIMEOUT);
    if received != sent {
        return Outcome::Failed(format!(
            "the server received {received:?}, the client sent {sent:?}"
        ));
    }
    Outcome::Echoed { peer: ipv4(peer) }
}

/// A connection from `from` to `to`, where no server is expected: refused, unanswered, or
/// (unexpectedly) made.
fn tcp_refusal_probe(from: &str, to: SocketAddrV4) -> Outcome {
    match tcp_connect(from, SocketAddr::V4(to), CONNECT_TIMEOUT) {
        Ok(_) => Outcome::Connected,
        Err(e) => connect_failure(&e),
    }
}

/// A UDP request from `from` to `to` (retried) whose echo must come back from `to`, and the
/// address `server` saw it come from.
fn udp_probe(from: &str, to: SocketAddrV4, server: &UdpEchoServer) -> Outcome {
    if !udp_roundtrip(from, None, SocketAddr::V4(to), UDP_TRIES, UDP_WAIT) {
        return Outcome::NoAnswer;
    }
    let peers: BTreeSet<Ipv4Addr> = server.senders().into_iter().map(ipv4).collect();
    match peers.iter().collect::<Vec<_>>().as_slice() {
        [peer] => Outcome::Echoed { peer: **peer },
        _ => Outcome::Failed(format!("the server saw datagrams from {peers:?}")),
    }
}

/// Panics with both values and the setup's diagnostics unless `seen` is `expected`.
fn check<T: PartialEq + std::fmt::Debug>(
    setup: &impl NatSetup,
    what: &str,
    seen: &T,
    expected: &T,
) {
    if seen != expected {
        panic!(
            "{}: {what} differ\nseen:     {seen:#?}\nexpected: {expected:#?}\n{}",
            setup.label(),
            setup.diagnostics()
        );
    }
}

#[test]
fn kernel_reference_behaves_as_docker_without_its_proxy() {
    let topo = Topology::new(1);
    let kernel = KernelSetup::build(&topo);
    let seen = observe(&kernel);
    check(
        &kernel,
        "the observations",
        &seen,
        &Observations::docker_without_proxy(kernel.host_ip()),
    );
}

#[test]
fn published_ports_and_masquerade_match_the_kernel_nat() {
    // One setup at a time: each has the machine to itself, and each topology (with its
    // namespaces) is gone before the next is built.
    let reference = {
        let topo = Topology::new(1);
        let kernel = KernelSetup::build(&topo);
        let seen = observe(&kernel);
        check(
            &kernel,
            "the peers that depend on Docker's mode",
            &seen.mode_dependent,
            &kernel.expected_mode_dependent(),
        );
        seen
    };
    let topo = Topology::new(1);
    let ours = AgentSetup::build(&topo);
    let seen = observe(&ours);
    check(
        &ours,
        "the observations shared with the kernel reference",
        &seen.shared,
        &reference.shared,
    );
    check(
        &ours,
        "the peers that depend on Docker's mode",
        &seen.mode_dependent,
        &ours.expected_mode_dependent(),
    );
}
