//! Published ports as users write them (`--publish [HOSTIP:]HOSTPORT:PORT[/PROTO]`, with ranges
//! as Docker takes them) and the checks made before one is installed. Pure logic, except for
//! [`host_listens`], which reads the host's socket tables.

use std::{collections::BTreeSet, fs, net::Ipv4Addr};

use ipnetwork::Ipv4Network;
use thiserror::Error;

use crate::api::{PortSpec, Proto};

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

/// The host's socket tables (of the caller's network namespace), read once for a whole
/// request: reading them walks the kernel's entire socket hash, a few ms each time.
pub struct HostSockets {
    tcp: String,
    tcp6: String,
    udp: String,
    udp6: String,
}

impl HostSockets {
    pub fn read() -> std::io::Result<Self> {
        let optional = |path: &str| fs::read_to_string(path).unwrap_or_default();
        Ok(Self {
            tcp: fs::read_to_string("/proc/net/tcp")?,
            tcp6: optional("/proc/net/tcp6"),
            udp: fs::read_to_string("/proc/net/udp")?,
            udp6: optional("/proc/net/udp6"),
        })
    }

    /// Whether a socket of the host listens on `port` (TCP) or is bound to it (UDP), on `addr`
    /// or on every address. A published port there would take the host's own service away
    /// from it.
    pub fn listens(&self, addr: Option<Ipv4Addr>, port: u16, proto: Proto) -> bool {
        let (v4, v6, listening_state) = match proto {
            Proto::Tcp => (&self.tcp, &self.tcp6, Some("0A")),
            Proto::Udp => (&self.udp, &self.udp6, None),
        };
        sockets_on(v4, addr, port, listening_state) || sockets_on6(v6, port, listening_state)
    }
}

/// Parses `/proc/net/{tcp,udp}`: `sl local_address rem_address st ...`, addresses as
/// `AABBCCDD:PPPP` with the address in host byte order (little-endian here).
fn sockets_on(text: &str, addr: Option<Ipv4Addr>, port: u16, state: Option<&str>) -> bool {
    text.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(st)) = (fields.get(1), fields.get(3)) else {
            return false;
        };
        if state.is_some_and(|s| s != *st) {
            return false;
        }
        let Some((a, p)) = local.split_once(':') else {
            return false;
        };
        let (Ok(a), Ok(p)) = (u32::from_str_radix(a, 16), u16::from_str_radix(p, 16)) else {
            return false;
        };
        let bound = Ipv4Addr::from(u32::from_be(a));
        p == port && (bound.is_unspecified() || addr.is_none() || addr == Some(bound))
    })
}

/// The IPv6 tables: a socket bound to `::` (dual stack) also takes IPv4 connections.
fn sockets_on6(text: &str, port: u16, state: Option<&str>) -> bool {
    text.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(st)) = (fields.get(1), fields.get(3)) else {
            return false;
        };
        if state.is_some_and(|s| s != *st) {
            return false;
        }
        let Some((a, p)) = local.split_once(':') else {
            return false;
        };
        u16::from_str_radix(p, 16) == Ok(port) && a.chars().all(|c| c == '0')
    })
}

/// Where the host keeps the ports its own sockets must never pick as ephemeral ports.
pub const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// The reserved-ports list (`8080,9000-9002` as the kernel reads and writes it) with `ours_before`
/// taken out and `ours_now` put in; the host's other reservations are kept. Returns the list
/// in the kernel's form. A published port must be reserved: a host connection using it as its
/// source port would have its replies taken for connections to the published port.
pub fn merge_reserved(
    current: &str,
    ours_before: &BTreeSet<u16>,
    ours_now: &BTreeSet<u16>,
) -> Result<String, String> {
    let mut ports: BTreeSet<u16> = BTreeSet::new();
    for part in current.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let parse = |s: &str| {
            s.trim()
                .parse::<u16>()
                .map_err(|_| format!("unexpected reserved-ports entry {part:?}"))
        };
        ports.extend(parse(first)?..=parse(last)?);
    }
    ports.retain(|p| !ours_before.contains(p));
    ports.extend(ours_now);
    // Back to ranges, as the kernel prints them.
    let mut out: Vec<String> = Vec::new();
    let mut iter = ports.into_iter().peekable();
    while let Some(first) = iter.next() {
        let mut last = first;
        while iter.peek() == Some(&(last.wrapping_add(1))) && last != u16::MAX {
            last = iter.next().unwrap_or(last);
        }
        out.push(if first == last {
            first.to_string()
        } else {
            format!("{first}-{last}")
        });
    }
    Ok(out.join(","))
}

#[cfg(test)]
mod tests {
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
        let set = |ports: &[u16]| ports.iter().copied().collect::<BTreeSet<u16>>();
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
    }

    #[test]
    fn proc_net_tables_are_read() {
        let tcp = "  sl  local_address rem_address   st\n\
                   0: 00000000:1F90 00000000:0000 0A 0\n\
                   1: 0100007F:0035 00000000:0000 0A 0\n\
                   2: 0101A8C0:1F91 00000000:0000 01 0\n";
        let listen = Some("0A");
        assert!(sockets_on(tcp, None, 8080, listen));
        assert!(sockets_on(
            tcp,
            Some(Ipv4Addr::new(10, 0, 0, 1)),
            8080,
            listen
        ));
        // Bound to loopback: taken by a publish on every address, not by one on another.
        assert!(sockets_on(tcp, None, 53, listen));
        assert!(!sockets_on(
            tcp,
            Some(Ipv4Addr::new(10, 0, 0, 1)),
            53,
            listen
        ));
        // An established connection's local port is not a listener.
        assert!(!sockets_on(tcp, None, 8081, listen));
        let tcp6 = "  sl  local_address rem_address st\n\
                    0: 00000000000000000000000000000000:1F92 00000000000000000000000000000000:0000 0A 0\n";
        assert!(sockets_on6(tcp6, 8082, listen));
        assert!(!sockets_on6(tcp6, 8083, listen));
    }
}
