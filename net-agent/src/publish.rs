//! Published ports as users write them (`--publish [HOSTIP:]HOSTPORT:PORT[/PROTO]`, with ranges
//! as Docker takes them) and the checks made before one is installed. Pure logic, except for
//! [`HostSockets::read`], which asks the kernel for the host's sockets.

use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::Ipv4Network;
use thiserror::Error;

use crate::{
    api::{PortSpec, Proto},
    sock_diag::{Bound, Family, SockDiag, SockDiagError},
};

#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid --publish {spec:?}: {reason}")]
pub struct SpecError {
    pub spec: String,
    pub reason: String,
}

/// Parses `[HOSTIP:]HOSTPORT[-END]:PORT[-END][/tcp|/udp]`. Both ranges must have the same length
/// (Docker's rule); port 0 is refused (Docker's "random host port" is not supported: a published
/// port should be predictable for a firewall).
pub fn parse_spec(input: &str) -> Result<PortSpec, SpecError> {
    let fail = |reason: String| SpecError {
        spec: input.to_string(),
        reason,
    };
    let (rest, proto) = split_proto(input).map_err(fail)?;
    let parts: Vec<&str> = rest.split(':').collect();
    let (host_ip, host, port) = match parts.as_slice() {
        [host, port] => (None, *host, *port),
        [ip, host, port] => {
            let ip: Ipv4Addr = ip
                .parse()
                .map_err(|_| fail(format!("{ip:?} is not an IPv4 address")))?;
            // 0.0.0.0 is Docker's spelling of "every address".
            (Some(ip).filter(|ip| !ip.is_unspecified()), *host, *port)
        }
        [_] => {
            return Err(fail(
                "give a host port and an endpoint port, as HOSTPORT:PORT".to_string(),
            ));
        }
        _ => return Err(fail("too many ':'".to_string())),
    };
    if host_ip.is_some_and(|ip| ip.is_multicast() || ip.is_broadcast()) {
        return Err(fail(
            "the host address must be a unicast address".to_string(),
        ));
    }
    let host_ports = parse_range(host, "host port").map_err(fail)?;
    let ports = parse_range(port, "endpoint port").map_err(fail)?;
    if host_ports.1 - host_ports.0 != ports.1 - ports.0 {
        return Err(fail(format!(
            "the host range has {} ports and the endpoint range {}; they must match",
            host_ports.1 - host_ports.0 + 1,
            ports.1 - ports.0 + 1
        )));
    }
    Ok(PortSpec {
        host_ip,
        host_ports,
        ports,
        proto,
    })
}

/// Parses `HOSTPORT[-END]/PROTO` or the full publish syntax, for unpublishing: only the host
/// side counts.
pub fn parse_host_spec(input: &str) -> Result<PortSpec, SpecError> {
    if let Ok(spec) = parse_spec(input) {
        return Ok(spec);
    }
    let fail = |reason: String| SpecError {
        spec: input.to_string(),
        reason,
    };
    let (rest, proto) = split_proto(input).map_err(fail)?;
    let (host_ip, host) = match rest.rsplit_once(':') {
        Some((ip, host)) => {
            let ip: Ipv4Addr = ip
                .parse()
                .map_err(|_| fail(format!("{ip:?} is not an IPv4 address")))?;
            (Some(ip).filter(|ip| !ip.is_unspecified()), host)
        }
        None => (None, rest),
    };
    let host_ports = parse_range(host, "host port").map_err(fail)?;
    Ok(PortSpec {
        host_ip,
        host_ports,
        ports: host_ports,
        proto,
    })
}

/// `SPEC[/tcp|/udp]`: the spec and its protocol (TCP when none is given).
fn split_proto(input: &str) -> Result<(&str, Proto), String> {
    match input.rsplit_once('/') {
        Some((rest, "tcp")) => Ok((rest, Proto::Tcp)),
        Some((rest, "udp")) => Ok((rest, Proto::Udp)),
        Some((_, other)) => Err(format!("unknown protocol {other:?} (expected tcp or udp)")),
        None => Ok((input, Proto::Tcp)),
    }
}

fn parse_range(input: &str, what: &str) -> Result<(u16, u16), String> {
    let port = |s: &str| -> Result<u16, String> {
        match s.parse::<u16>() {
            Ok(0) => Err(format!("{what} 0 is not a port")),
            Ok(p) => Ok(p),
            Err(_) => Err(format!("{what} {s:?} is not a number from 1 to 65535")),
        }
    };
    match input.split_once('-') {
        Some((first, last)) => {
            let (first, last) = (port(first)?, port(last)?);
            if last < first {
                return Err(format!("{what} range {input:?} ends before it starts"));
            }
            Ok((first, last))
        }
        None => {
            let p = port(input)?;
            Ok((p, p))
        }
    }
}

/// One host port -> endpoint port pair of a spec, in order.
pub fn expand(spec: &PortSpec) -> impl Iterator<Item = (u16, u16)> + '_ {
    (spec.host_ports.0..=spec.host_ports.1).zip(spec.ports.0..=spec.ports.1)
}

/// Parses the `--allow` CIDRs (a bare address means that one address).
pub fn parse_allow(inputs: &[String]) -> Result<Vec<Ipv4Network>, String> {
    inputs
        .iter()
        .map(|s| {
            let net: Ipv4Network = s.parse().map_err(|_| {
                format!("invalid --allow {s:?}: expected an IPv4 CIDR such as 192.0.2.0/24")
            })?;
            // Normalise 192.0.2.7/24 to 192.0.2.0/24, as the data plane matches prefixes.
            Ipv4Network::new(net.network(), net.prefix())
                .map_err(|e| format!("invalid --allow {s:?}: {e}"))
        })
        .collect()
}

/// Whether two published host sides clash: same protocol and port, and addresses that overlap
/// (`None`, every address, overlaps everything).
pub fn clashes(a: (Option<Ipv4Addr>, u16, Proto), b: (Option<Ipv4Addr>, u16, Proto)) -> bool {
    a.1 == b.1
        && a.2 == b.2
        && match (a.0, b.0) {
            (Some(x), Some(y)) => x == y,
            _ => true,
        }
}

/// The host's sockets a published port would take over, read once for a whole request: TCP
/// listeners and bound UDP sockets, IPv4 and IPv6, of the caller's network namespace.
pub struct HostSockets {
    tcp: Vec<Bound>,
    udp: Vec<Bound>,
}

impl HostSockets {
    pub fn read() -> Result<Self, SockDiagError> {
        let mut diag = SockDiag::open()?;
        let mut tcp = diag.tcp_listeners(Family::V4)?;
        tcp.extend(diag.tcp_listeners(Family::V6)?);
        let mut udp = diag.udp_sockets(Family::V4)?;
        udp.extend(diag.udp_sockets(Family::V6)?);
        Ok(Self { tcp, udp })
    }

    /// Whether a socket of the host listens on `port` (TCP) or is bound to it (UDP), on `addr`
    /// or on every address. A published port there would take the host's own service away
    /// from it.
    pub fn listens(&self, addr: Option<Ipv4Addr>, port: u16, proto: Proto) -> bool {
        let sockets = match proto {
            Proto::Tcp => &self.tcp,
            Proto::Udp => &self.udp,
        };
        sockets.iter().any(|bound| takes(*bound, addr, port))
    }
}

/// Whether a socket bound to `bound` holds `port` on `addr` (`None`: every address). An IPv4
/// socket on 0.0.0.0 holds it on every address, one on a given address holds it there (and
/// so clashes with a publish on every address). An IPv6 socket on `::` takes IPv4 connections
/// too (dual stack) unless it is `IPV6_V6ONLY`; one on an IPv4-mapped address
/// (`::ffff:10.0.0.1`) is an IPv4 socket on that address; one on any other IPv6 address does
/// not touch IPv4.
fn takes(bound: Bound, addr: Option<Ipv4Addr>, port: u16) -> bool {
    let on_ipv4 = |ip: Ipv4Addr| ip.is_unspecified() || addr.is_none() || addr == Some(ip);
    bound.addr.port() == port
        && match bound.addr.ip() {
            IpAddr::V4(ip) => on_ipv4(ip),
            IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
                Some(mapped) => on_ipv4(mapped),
                None => ip.is_unspecified() && !bound.v6_only,
            },
        }
}

/// Where the host keeps the ports its own sockets must never pick as ephemeral ports.
pub const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// A set of port numbers, one bit each: what the reserved-ports list holds. Every operation
/// costs the same however many ports are in it (8 KiB, at most 65,536 ports).
#[derive(Clone, PartialEq, Eq)]
pub struct PortSet(Box<[u64; 1024]>);

impl Default for PortSet {
    fn default() -> Self {
        Self(Box::new([0; 1024]))
    }
}

impl std::fmt::Debug for PortSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PortSet({self})")
    }
}

impl PortSet {
    pub fn insert(&mut self, port: u16) {
        self.0[usize::from(port >> 6)] |= 1 << (port & 63);
    }

    pub fn remove(&mut self, port: u16) {
        self.0[usize::from(port >> 6)] &= !(1 << (port & 63));
    }

    /// Inserts `first..=last` (nothing when `last < first`), a word at a time.
    pub fn insert_range(&mut self, first: u16, last: u16) {
        let (mut port, last) = (u32::from(first), u32::from(last));
        while port <= last {
            let word = (port >> 6) as usize;
            let from = port & 63;
            let to = (last - (port & !63)).min(63);
            // Bits from..=to of this word.
            self.0[word] |= (u64::MAX >> (63 - to)) & (u64::MAX << from);
            port = (port | 63) + 1;
        }
    }

    pub fn contains(&self, port: u16) -> bool {
        self.0[usize::from(port >> 6)] & (1 << (port & 63)) != 0
    }

    /// Parses the kernel's form: `8080,9000-9002` (empty: no port).
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut set = Self::default();
        for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (first, last) = part.split_once('-').unwrap_or((part, part));
            let parse = |s: &str| {
                s.trim()
                    .parse::<u16>()
                    .map_err(|_| format!("unexpected reserved-ports entry {part:?}"))
            };
            set.insert_range(parse(first)?, parse(last)?);
        }
        Ok(set)
    }
}

impl FromIterator<u16> for PortSet {
    fn from_iter<I: IntoIterator<Item = u16>>(ports: I) -> Self {
        let mut set = Self::default();
        for port in ports {
            set.insert(port);
        }
        set
    }
}

/// The kernel's form: ranges of consecutive ports, `8080,9000-9002`.
impl std::fmt::Display for PortSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut first_range = true;
        let mut port: u32 = 0;
        while port <= u32::from(u16::MAX) {
            if self.0[(port >> 6) as usize] == 0 {
                port = (port | 63) + 1;
                continue;
            }
            if !self.contains(port as u16) {
                port += 1;
                continue;
            }
            let first = port;
            while port < u32::from(u16::MAX) && self.contains(port as u16 + 1) {
                port += 1;
                // A word of ones at a time through long ranges.
                while port & 63 == 63
                    && port + 64 <= u32::from(u16::MAX)
                    && self.0[((port + 1) >> 6) as usize] == u64::MAX
                {
                    port += 64;
                }
            }
            if !first_range {
                f.write_str(",")?;
            }
            first_range = false;
            if first == port {
                write!(f, "{first}")?;
            } else {
                write!(f, "{first}-{port}")?;
            }
            port += 1;
        }
        Ok(())
    }
}

/// The reserved-ports list (`8080,9000-9002` as the kernel reads and writes it) with `ours_before`
/// taken out and `ours_now` put in; the host's other reservations are kept. Returns the list
/// in the kernel's form. A published port must be reserved: a host connection using it as its
/// source port would have its replies taken for connections to the published port.
pub fn merge_reserved(
    current: &str,
    ours_before: &PortSet,
    ours_now: &PortSet,
) -> Result<String, String> {
    let mut ports = PortSet::parse(current)?;
    for ((word, before), now) in ports
        .0
        .iter_mut()
        .zip(ours_before.0.iter())
        .zip(ours_now.0.iter())
    {
        *word = (*word & !before) | now;
    }
    Ok(ports.to_string())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn spec(host_ip: Option<[u8; 4]>, h: (u16, u16), p: (u16, u16), proto: Proto) -> PortSpec {
        PortSpec {
            host_ip: host_ip.map(Ipv4Addr::from),
            host_ports: h,
            ports: p,
            proto,
        }
    }

    #[test]
    fn docker_forms_parse() {
        assert_eq!(
            parse_spec("8080:80"),
            Ok(spec(None, (8080, 8080), (80, 80), Proto::Tcp))
        );
        assert_eq!(
            parse_spec("127.0.0.1:53:53/udp"),
            Ok(spec(Some([127, 0, 0, 1]), (53, 53), (53, 53), Proto::Udp))
        );
        assert_eq!(
            parse_spec("0.0.0.0:8000-8010:80-90/tcp"),
            Ok(spec(None, (8000, 8010), (80, 90), Proto::Tcp))
        );
    }

    #[test]
    fn bad_specs_name_what_is_wrong() {
        for (input, needle) in [
            ("80", "HOSTPORT:PORT"),
            ("8080:80/sctp", "unknown protocol"),
            ("8000-8010:80", "must match"),
            ("0:80", "host port 0"),
            ("70000:80", "not a number"),
            ("8010-8000:80-90", "ends before it starts"),
            ("300.1.1.1:80:80", "not an IPv4 address"),
            ("1:2:3:4", "too many"),
            ("224.0.0.1:80:80", "unicast"),
        ] {
            let err = parse_spec(input).expect_err(input).to_string();
            assert!(err.contains(needle), "{input}: {err}");
            assert!(err.contains(input), "{input}: {err}");
        }
    }

    #[test]
    fn ranges_expand_pairwise() {
        let s = parse_spec("8000-8002:80-82").unwrap();
        assert_eq!(
            expand(&s).collect::<Vec<_>>(),
            [(8000, 80), (8001, 81), (8002, 82)]
        );
    }

    #[test]
    fn unpublish_takes_the_host_side_alone() {
        assert_eq!(
            parse_host_spec("8080/udp"),
            Ok(spec(None, (8080, 8080), (8080, 8080), Proto::Udp))
        );
        assert_eq!(
            parse_host_spec("10.0.0.1:8080"),
            Ok(spec(
                Some([10, 0, 0, 1]),
                (8080, 8080),
                (8080, 8080),
                Proto::Tcp
            ))
        );
        assert_eq!(parse_host_spec("8080:80").unwrap().host_ports, (8080, 8080));
    }

    #[test]
    fn allow_normalises_and_refuses_garbage() {
        let got = parse_allow(&["192.0.2.7/24".into(), "198.51.100.9".into()]).unwrap();
        assert_eq!(got[0].to_string(), "192.0.2.0/24");
        assert_eq!(got[1].to_string(), "198.51.100.9/32");
        let err = parse_allow(&["nope".into()]).unwrap_err();
        assert!(err.contains("\"nope\""), "{err}");
    }

    #[test]
    fn clashes_follow_addresses_ports_and_protocols() {
        let any = None;
        let one = Some(Ipv4Addr::new(10, 0, 0, 1));
        let two = Some(Ipv4Addr::new(10, 0, 0, 2));
        assert!(clashes((any, 80, Proto::Tcp), (one, 80, Proto::Tcp)));
        assert!(!clashes((one, 80, Proto::Tcp), (two, 80, Proto::Tcp)));
        assert!(!clashes((any, 80, Proto::Tcp), (any, 80, Proto::Udp)));
        assert!(!clashes((any, 80, Proto::Tcp), (any, 81, Proto::Tcp)));
    }

    #[test]
    fn reserved_ports_keep_the_hosts_own_and_swap_ours() {
        let set = |ports: &[u16]| ports.iter().copied().collect::<PortSet>();
        assert_eq!(
            merge_reserved("", &set(&[]), &set(&[8080, 9000, 9001, 9002])).unwrap(),
            "8080,9000-9002"
        );
        assert_eq!(
            merge_reserved("22,8080,9000-9002", &set(&[8080, 9001]), &set(&[7000])).unwrap(),
            "22,7000,9000,9002"
        );
        assert_eq!(
            merge_reserved("\n", &set(&[]), &set(&[65535])).unwrap(),
            "65535"
        );
        assert!(merge_reserved("x", &set(&[]), &set(&[])).is_err());
        // The edges of the port space and of the set's words.
        assert_eq!(
            merge_reserved("0-1,63-64,127", &set(&[]), &set(&[65534, 65535])).unwrap(),
            "0-1,63-64,127,65534-65535"
        );
        assert_eq!(
            merge_reserved("1-50000", &set(&[]), &set(&[50001, 60000])).unwrap(),
            "1-50001,60000"
        );
        assert_eq!(
            merge_reserved("0-65535", &set(&(0..=65535).collect::<Vec<_>>()), &set(&[])).unwrap(),
            ""
        );
        assert_eq!(PortSet::parse("0-65535").unwrap().to_string(), "0-65535");
        assert_eq!(
            PortSet::parse("1-64,66-200,256-511,65471-65535")
                .unwrap()
                .to_string(),
            "1-64,66-200,256-511,65471-65535"
        );
        for (first, last) in [
            (0, 0),
            (5, 70),
            (63, 64),
            (64, 127),
            (100, 1000),
            (65000, 65535),
        ] {
            let mut set = PortSet::default();
            set.insert_range(first, last);
            assert_eq!(set, (first..=last).collect::<PortSet>(), "{first}-{last}");
        }
        let mut set = PortSet::default();
        set.insert_range(9, 8);
        assert_eq!(set, PortSet::default());
    }

    #[test]
    fn sockets_take_ports_by_address() {
        let at = |addr: &str| Bound {
            addr: addr.parse().unwrap(),
            v6_only: false,
        };
        let v6_only = |addr: &str| Bound {
            v6_only: true,
            ..at(addr)
        };
        let one = Some(Ipv4Addr::new(10, 0, 0, 1));
        // Every address: taken by a publish on every address and on one.
        assert!(takes(at("0.0.0.0:8080"), None, 8080));
        assert!(takes(at("0.0.0.0:8080"), one, 8080));
        assert!(!takes(at("0.0.0.0:8080"), None, 8081));
        // Bound to loopback: taken by a publish on every address, not by one on another.
        assert!(takes(at("127.0.0.1:53"), None, 53));
        assert!(!takes(at("127.0.0.1:53"), one, 53));
        assert!(takes(at("10.0.0.1:53"), one, 53));
        // IPv6: `::` takes IPv4 too; a given IPv6 address does not.
        assert!(takes(at("[::]:8082"), None, 8082));
        assert!(takes(at("[::]:8082"), one, 8082));
        assert!(!takes(at("[::]:8082"), None, 8083));
        assert!(!takes(at("[::1]:8082"), None, 8082));
        // IPV6_V6ONLY on `::`: IPv6 alone.
        assert!(!takes(v6_only("[::]:8082"), None, 8082));
        assert!(!takes(v6_only("[::]:8082"), one, 8082));
        // An IPv4-mapped address is that IPv4 address.
        assert!(takes(at("[::ffff:10.0.0.1]:53"), one, 53));
        assert!(takes(at("[::ffff:10.0.0.1]:53"), None, 53));
        assert!(!takes(at("[::ffff:10.0.0.2]:53"), one, 53));
        assert!(takes(at("[::ffff:0.0.0.0]:53"), one, 53));
    }

    /// Real sockets of this test's own network namespace, on ports the kernel picks, through
    /// the same netlink queries the agent makes.
    #[test]
    fn host_sockets_see_real_listeners_and_bound_ports() {
        use std::net::{TcpListener, TcpStream, UdpSocket};

        let port_of = |addr: std::io::Result<SocketAddr>| addr.expect("a local address").port();
        let tcp4 = TcpListener::bind("127.0.0.1:0").expect("a TCP listener on 127.0.0.1");
        let tcp4_port = port_of(tcp4.local_addr());
        // A connection's local port is not a listener (the established hash is not asked for).
        // Loopback may be down in a namespace made for the tests (`unshare -n`).
        let client = TcpStream::connect(("127.0.0.1", tcp4_port))
            .inspect_err(|e| eprintln!("skipping the connection to 127.0.0.1:{tcp4_port}: {e}"))
            .ok();
        let udp4 = UdpSocket::bind("0.0.0.0:0").expect("a UDP socket on 0.0.0.0");
        // IPv6 may be off in the namespace the tests run in.
        let tcp6 = TcpListener::bind("[::]:0")
            .inspect_err(|e| eprintln!("skipping the IPv6 listener: binding [::]:0: {e}"))
            .ok();
        let udp6 = UdpSocket::bind("[::]:0")
            .inspect_err(|e| eprintln!("skipping the IPv6 UDP socket: binding [::]:0: {e}"))
            .ok();
        // IPV6_V6ONLY on `::`: holds the IPv6 port alone.
        let tcp6_only = v6_only_socket(nix::sys::socket::SockType::Stream)
            .inspect_err(|e| eprintln!("skipping the IPV6_V6ONLY listener: {e}"))
            .ok();
        let udp6_only = v6_only_socket(nix::sys::socket::SockType::Datagram)
            .inspect_err(|e| eprintln!("skipping the IPV6_V6ONLY UDP socket: {e}"))
            .ok();
        // Ports nothing holds: ones the kernel just gave out and took back.
        let free_tcp = port_of(TcpListener::bind("0.0.0.0:0").and_then(|l| l.local_addr()));
        let free_udp = port_of(UdpSocket::bind("0.0.0.0:0").and_then(|s| s.local_addr()));

        let sockets = HostSockets::read().expect("reading the host's sockets");
        let found = format!(
            "TCP listeners {:?}, UDP sockets {:?}",
            sockets.tcp, sockets.udp
        );
        let other = Some(Ipv4Addr::new(192, 0, 2, 1));
        let mut expected: Vec<(Option<Ipv4Addr>, u16, Proto, bool, String)> = vec![
            (
                None,
                tcp4_port,
                Proto::Tcp,
                true,
                "a listener on 127.0.0.1".into(),
            ),
            (
                other,
                tcp4_port,
                Proto::Tcp,
                false,
                "127.0.0.1's listener on 192.0.2.1".into(),
            ),
            (
                None,
                tcp4_port,
                Proto::Udp,
                false,
                "a TCP listener's port as UDP".into(),
            ),
            (None, free_tcp, Proto::Tcp, false, "a free TCP port".into()),
            (None, free_udp, Proto::Udp, false, "a free UDP port".into()),
        ];
        let udp4_port = port_of(udp4.local_addr());
        expected.push((other, udp4_port, Proto::Udp, true, "UDP on 0.0.0.0".into()));
        if let Some(client) = &client {
            let port = port_of(client.local_addr());
            expected.push((None, port, Proto::Tcp, false, "a connection's port".into()));
        }
        if let Some(tcp6) = &tcp6 {
            let port = port_of(tcp6.local_addr());
            expected.push((other, port, Proto::Tcp, true, "a listener on [::]".into()));
        }
        if let Some(udp6) = &udp6 {
            let port = port_of(udp6.local_addr());
            expected.push((other, port, Proto::Udp, true, "UDP on [::]".into()));
        }
        for (socket, proto) in [(&tcp6_only, Proto::Tcp), (&udp6_only, Proto::Udp)] {
            if let Some((_, port)) = socket {
                let what = format!("an IPV6_V6ONLY {} socket on [::]", proto.name());
                expected.push((None, *port, proto, false, what.clone()));
                expected.push((other, *port, proto, false, what));
            }
        }
        for (addr, port, proto, taken, what) in expected {
            assert_eq!(
                sockets.listens(addr, port, proto),
                taken,
                "{what}: port {port}/{} on {addr:?}; found {found}",
                proto.name()
            );
        }
    }

    /// A socket on `[::]:0` with IPV6_V6ONLY set before the bind, listening if it is a stream
    /// socket, and the port the kernel gave it.
    fn v6_only_socket(
        kind: nix::sys::socket::SockType,
    ) -> nix::Result<(std::os::fd::OwnedFd, u16)> {
        use nix::sys::socket::{
            AddressFamily, Backlog, SockFlag, SockType, SockaddrIn6, bind, getsockname, listen,
            setsockopt, socket, sockopt::Ipv6V6Only,
        };
        let fd = socket(AddressFamily::Inet6, kind, SockFlag::SOCK_CLOEXEC, None)?;
        setsockopt(&fd, Ipv6V6Only, &true)?;
        let any = std::net::SocketAddrV6::new(std::net::Ipv6Addr::UNSPECIFIED, 0, 0, 0);
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &SockaddrIn6::from(any),
        )?;
        if kind == SockType::Stream {
            listen(&fd, Backlog::MAXCONN)?;
        }
        let local: SockaddrIn6 = getsockname(std::os::fd::AsRawFd::as_raw_fd(&fd))?;
        Ok((fd, local.port()))
    }
}
